//! Kubeconfigs that point `kubectl` at a cluster through this server.

use serde_json::Value;

/// Lifetime of the API token `tunnel-server kubeconfig` mints unless `--ttl` says otherwise
/// (`--ttl 0`: never expires). A kubeconfig file is copied around and forgotten; a month bounds
/// what a lost one can do, and the user asks for a new one.
pub const DEFAULT_TOKEN_TTL: &str = "30d";

/// A kubeconfig (YAML; every value a JSON-quoted string) for `server_url/k8s/clusters/<id>`,
/// trusting `cacerts` (empty: the system roots) and authenticating with `token`.
pub fn render(
    server_url: &str,
    cluster_id: &str,
    cluster_name: &str,
    user: &str,
    token: &str,
    cacerts: &str,
) -> String {
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    let server = format!("{server_url}/k8s/clusters/{cluster_id}");
    let ca = if cacerts.is_empty() {
        String::new()
    } else {
        let data = data_encoding::BASE64.encode(format!("{cacerts}\n").as_bytes());
        format!("    certificate-authority-data: {}\n", q(&data))
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {name}\n  cluster:\n    server: {server}\n{ca}\
         users:\n\
         - name: {user}\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: {name}\n  context:\n    cluster: {name}\n    user: {user}\n\
         current-context: {name}\n",
        name = q(cluster_name),
        server = q(&server),
        user = q(user),
        token = q(token),
    )
}
