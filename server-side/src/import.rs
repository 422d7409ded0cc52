//! The import manifest (`GET /v3/import/<token>_<cluster-id>.yaml`, spec cattle-agent §7),
//! rendered from `deploy/templates/import.yaml` (and `deploy/templates/node-agent.yaml` on
//! request). `deploy/` holds the one copy of these templates; `tests/deploy_manifests.rs`
//! checks that what the server serves is them, object by object.
//!
//! Placeholders are `{{NAME}}`; every value is inserted as a JSON string, which YAML reads as a
//! double-quoted scalar, so no value can break out of its field.

/// The cluster-agent objects.
pub const IMPORT_TEMPLATE: &str = include_str!("../../deploy/templates/import.yaml");
/// The optional node-agent DaemonSet.
pub const NODE_AGENT_TEMPLATE: &str = include_str!("../../deploy/templates/node-agent.yaml");

/// What a manifest is rendered from.
#[derive(Debug, Clone)]
pub struct ImportParams<'a> {
    /// The server URL agents dial (`CATTLE_SERVER`, credentials `url`).
    pub server_url: &'a str,
    /// The registration token.
    pub token: &'a str,
    /// `CATTLE_CA_CHECKSUM` (empty: no pinning).
    pub ca_checksum: &'a str,
    /// Cluster agent image.
    pub agent_image: &'a str,
    /// Node agent image.
    pub node_agent_image: &'a str,
    /// Include the node-agent DaemonSet.
    pub node_agent: bool,
}

/// `cattle-credentials-<first 10 hex of sha256(url.token.namespace)>`; the namespace is empty
/// in the import-URL variant, as Rancher's.
pub fn credential_name(url: &str, token: &str, namespace: &str) -> String {
    let hex = crate::tokens::sha256_hex(format!("{url}.{token}.{namespace}").as_bytes());
    format!("cattle-credentials-{}", &hex[..10])
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Replaces every `{{NAME}}` in `template` by the quoted value of `NAME`; an unknown name is a
/// bug in the template and panics in tests (it is left as is otherwise).
pub fn render_template(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 512);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        match vars.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => out.push_str(&quoted(value)),
            None => {
                debug_assert!(false, "unknown template variable {name}");
                out.push_str(&rest[start..start + 4 + end]);
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The manifest for `params`.
pub fn render(params: &ImportParams<'_>) -> String {
    let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
    let credential = credential_name(params.server_url, params.token, "");
    let strict = if params.ca_checksum.is_empty() {
        "false"
    } else {
        "true"
    };
    let vars = [
        ("SERVER_URL", params.server_url.to_owned()),
        ("CA_CHECKSUM", params.ca_checksum.to_owned()),
        ("AGENT_IMAGE", params.agent_image.to_owned()),
        ("NODE_AGENT_IMAGE", params.node_agent_image.to_owned()),
        ("CREDENTIAL_NAME", credential),
        ("URL_B64", b64(params.server_url)),
        ("TOKEN_B64", b64(params.token)),
        ("NAMESPACE_B64", b64("")),
        ("STRICT_VERIFY", strict.to_owned()),
    ];
    let mut out = render_template(IMPORT_TEMPLATE, &vars);
    if params.node_agent {
        out.push_str(&render_template(NODE_AGENT_TEMPLATE, &vars));
    }
    out
}

/// The import URL of a cluster token.
pub fn import_url(server_url: &str, token: &str, cluster_id: &str) -> String {
    format!("{server_url}/v3/import/{token}_{cluster_id}.yaml")
}

/// The command an operator runs in the cluster to import it.
pub fn import_command(server_url: &str, token: &str, cluster_id: &str) -> String {
    format!(
        "kubectl apply -f {}",
        import_url(server_url, token, cluster_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder_quoted() {
        let p = ImportParams {
            server_url: "https://mgmt.example:8443",
            token: "tok\"en",
            ca_checksum: "abc",
            agent_image: "tunnel-project/cattle-cluster-agent:dev",
            node_agent_image: "tunnel-project/cattle-node-agent:dev",
            node_agent: true,
        };
        let y = render(&p);
        assert!(!y.contains("{{"), "{y}");
        assert!(y.contains("image: \"tunnel-project/cattle-cluster-agent:dev\""));
        assert!(y.contains("kind: DaemonSet"));
        assert!(y.contains(&format!(
            "name: \"{}\"",
            credential_name(p.server_url, p.token, "")
        )));
        // Object order of spec §7.
        let kinds: Vec<&str> = y.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
        assert_eq!(
            kinds,
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "Namespace",
                "ServiceAccount",
                "ClusterRoleBinding",
                "Secret",
                "ClusterRole",
                "Deployment",
                "Service",
                "DaemonSet"
            ]
        );
    }
}
