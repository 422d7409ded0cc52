//! The downstream cluster as the agent reports it and reaches it: the kube-apiserver's
//! in-cluster address, the service account's token and CA, the params of spec §4.2, and the
//! one Kubernetes API call the agent makes (writing `stv-aggregation`, spec §4.4).
//!
//! The files are read directly (no `kube` crate: one PUT/POST does not justify it). The
//! Go agent obtains its token from a `kubernetes.io/service-account-token` Secret of SA
//! `cattle-system/cattle` and its CA from ConfigMap `kube-root-ca.crt`; this agent uses the
//! projected token and CA mounted into its own pod, which are the same SA's when the pod runs
//! as `cattle`, as Rancher's manifest makes it. The projected token is rotated by the kubelet;
//! it is read once at start, so a restart picks up a new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_core::config::{ServerUrl, bracket};
use agent_core::env::{ConfigError, ConfigErrors, Strings};
use agent_core::http::{HttpClient, HttpError, ProxyAuth, TlsTrust, pem_has_certificate};
use bytes::Bytes;
use serde_json::{Value, json};
use tunnel_proto::driver::connector::ProxyConfig;

/// `KUBERNETES_SERVICE_HOST`.
pub const ENV_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
/// `KUBERNETES_SERVICE_PORT`.
pub const ENV_SERVICE_PORT: &str = "KUBERNETES_SERVICE_PORT";
/// Path of the service-account token (this project's variable).
pub const ENV_SA_TOKEN_FILE: &str = "CATTLE_SA_TOKEN_FILE";
/// Path of the service-account CA (this project's variable).
pub const ENV_SA_CA_FILE: &str = "CATTLE_SA_CA_FILE";
/// A JSON kubeconfig used instead of the in-cluster settings (this project's, for tests).
pub const ENV_KUBECONFIG: &str = "CATTLE_KUBECONFIG";

/// Where Kubernetes mounts the service-account token.
pub const DEFAULT_SA_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where Kubernetes mounts the cluster CA.
pub const DEFAULT_SA_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How to reach the kube-apiserver, and what the server is told about it.
#[derive(Clone, PartialEq, Eq)]
pub struct KubeAccess {
    /// Host (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The CA PEM, byte for byte as read (reported base64-encoded).
    pub ca_pem: Vec<u8>,
    /// The bearer token, whitespace-trimmed.
    pub token: String,
}

impl std::fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAccess")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("ca_pem_len", &self.ca_pem.len())
            .finish_non_exhaustive()
    }
}

impl KubeAccess {
    /// `host:port`, IPv6 bracketed (Rancher 2.13+).
    pub fn address(&self) -> String {
        format!("{}:{}", bracket(&self.host), self.port)
    }

    /// `https://host:port`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.address())
    }

    /// The cluster params of spec §4.2.
    pub fn params(&self) -> Value {
        json!({
            "cluster": {
                "address": self.address(),
                "caCert": data_encoding::BASE64.encode(&self.ca_pem),
                "token": self.token,
            }
        })
    }

    /// Reads the in-cluster settings, or a kubeconfig when `CATTLE_KUBECONFIG` is set.
    pub fn from_strings(strings: &impl Strings) -> Result<Self, ConfigErrors> {
        if let Some(path) = strings.get_nonempty(ENV_KUBECONFIG) {
            return from_kubeconfig(Path::new(&path)).map_err(|e| ConfigErrors(vec![e]));
        }
        let mut errs = ConfigErrors::default();
        let host = strings.get_nonempty(ENV_SERVICE_HOST).map(|h| {
            h.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        if host.is_none() {
            errs.push(ConfigError::missing(
                ENV_SERVICE_HOST,
                "the cluster agent must run in a pod (or get --kube-service-host, or --kubeconfig)",
            ));
        }
        let port = match strings.get_nonempty(ENV_SERVICE_PORT) {
            None => {
                errs.push(ConfigError::missing(
                    ENV_SERVICE_PORT,
                    "the cluster agent must run in a pod (or get --kube-service-port)",
                ));
                None
            }
            Some(raw) => errs.take(
                raw.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| ConfigError::invalid(ENV_SERVICE_PORT, raw, "not a port")),
            ),
        };
        let token_path = PathBuf::from(
            strings
                .get_nonempty(ENV_SA_TOKEN_FILE)
                .unwrap_or_else(|| DEFAULT_SA_TOKEN_FILE.to_owned()),
        );
        let ca_path = PathBuf::from(
            strings
                .get_nonempty(ENV_SA_CA_FILE)
                .unwrap_or_else(|| DEFAULT_SA_CA_FILE.to_owned()),
        );
        let token = errs.take(read_token(&token_path));
        let ca_pem = errs.take(read_ca(&ca_path));
        match (host, port, token, ca_pem) {
            (Some(host), Some(port), Some(token), Some(ca_pem)) if errs.is_empty() => Ok(Self {
                host,
                port,
                ca_pem,
                token,
            }),
            _ => Err(errs),
        }
    }
}

fn read_token(path: &Path) -> Result<String, ConfigError> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file("service-account token", path.display(), e))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(ConfigError::file(
            "service-account token",
            path.display(),
            "is empty",
        ));
    }
    Ok(token.to_owned())
}

fn read_ca(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::file("service-account CA", path.display(), e))?;
    if !pem_has_certificate(&pem) {
        return Err(ConfigError::file(
            "service-account CA",
            path.display(),
            "holds no PEM certificate",
        ));
    }
    Ok(pem)
}

/// Reads a **JSON** kubeconfig (`kubectl config view --flatten -o json`): the current
/// context's cluster `server`, `certificate-authority-data` (or `certificate-authority`), and
/// the user's `token` (or `tokenFile`). YAML is not parsed, to keep a YAML parser out of the
/// agent; the flag exists for tests and debugging.
pub fn from_kubeconfig(path: &Path) -> Result<KubeAccess, ConfigError> {
    let bad = |reason: String| ConfigError::file("kubeconfig", path.display(), reason);
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let doc: Value = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "not JSON ({e}); convert it with `kubectl config view --flatten -o json`"
        ))
    })?;
    let named = |list: &str, name: &str, field: &str| -> Option<Value> {
        doc.get(list)?
            .as_array()?
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
            .get(field)
            .cloned()
    };
    let current = doc
        .get("current-context")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no current-context".into()))?;
    let context = named("contexts", current, "context")
        .ok_or_else(|| bad(format!("context {current:?} not found")))?;
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let cluster_name =
        field(&context, "cluster").ok_or_else(|| bad("context has no cluster".into()))?;
    let user_name = field(&context, "user").unwrap_or_default();
    let cluster = named("clusters", &cluster_name, "cluster")
        .ok_or_else(|| bad(format!("cluster {cluster_name:?} not found")))?;
    let user = named("users", &user_name, "user").unwrap_or(Value::Null);
    let server = field(&cluster, "server").ok_or_else(|| bad("cluster has no server".into()))?;
    let url = ServerUrl::parse(&server).map_err(|e| bad(format!("server {server:?}: {e}")))?;
    let ca_pem = match (
        field(&cluster, "certificate-authority-data"),
        field(&cluster, "certificate-authority"),
    ) {
        (Some(data), _) => data_encoding::BASE64
            .decode(data.trim().as_bytes())
            .map_err(|e| bad(format!("certificate-authority-data: {e}")))?,
        (None, Some(file)) => std::fs::read(&file).map_err(|e| bad(format!("{file}: {e}")))?,
        (None, None) => return Err(bad("cluster has no certificate authority".into())),
    };
    if !pem_has_certificate(&ca_pem) {
        return Err(bad(
            "the certificate authority holds no PEM certificate".into()
        ));
    }
    let token = match (field(&user, "token"), field(&user, "tokenFile")) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(file)) => read_token(Path::new(&file))?,
        (None, None) => return Err(bad("user has no token or tokenFile".into())),
    };
    Ok(KubeAccess {
        port: url.port_or_default(),
        host: url.host,
        ca_pem,
        token,
    })
}

// === the stv-aggregation Secret ===

/// Name of the Secret the embedded Rancher watches for its aggregation tunnel.
pub const STV_SECRET: &str = "stv-aggregation";

/// What goes into `stv-aggregation` (spec §4.4 step 3.1: all seven keys).
#[derive(Clone, PartialEq, Eq)]
pub struct StvSecret {
    /// `CATTLE_SERVER`.
    pub server: String,
    /// `CATTLE_TOKEN`: the registration token.
    pub token: String,
    /// `CATTLE_CA_CHECKSUM` (may be empty).
    pub ca_checksum: String,
    /// `ca.crt`: the server CA PEM, if one was pinned.
    pub ca_pem: Option<String>,
    /// `CATTLE_CACERTS_VALID`.
    pub cacerts_valid: bool,
}

impl std::fmt::Debug for StvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StvSecret")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl StvSecret {
    /// The Secret object.
    pub fn to_json(&self, namespace: &str) -> Value {
        let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": STV_SECRET, "namespace": namespace },
            "type": "Opaque",
            "data": {
                "CATTLE_SERVER": b64(&self.server),
                "CATTLE_TOKEN": b64(&self.token),
                "CATTLE_CA_CHECKSUM": b64(&self.ca_checksum),
                "url": b64(&format!("{}/v3/connect", self.server)),
                "token": b64(&format!("stv-cluster-{}", self.token)),
                "ca.crt": b64(self.ca_pem.as_deref().unwrap_or("")),
                "CATTLE_CACERTS_VALID": b64(if self.cacerts_valid { "true" } else { "false" }),
            }
        })
    }
}

/// Why writing the Secret failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request could not be made.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The API server refused it.
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        /// Method.
        method: &'static str,
        /// Path.
        path: String,
        /// Status.
        status: u16,
        /// Body (bounded).
        body: String,
    },
}

/// Creates or replaces `namespace/stv-aggregation` with plain HTTPS calls using the
/// service-account token: PUT (an unconditional update; Secrets allow it), and POST when the
/// PUT says 404.
pub async fn apply_stv_secret(
    kube: &KubeAccess,
    proxy: ProxyConfig,
    proxy_auth: ProxyAuth,
    namespace: &str,
    secret: &StvSecret,
) -> Result<(), ApplyError> {
    let client = HttpClient::new(
        &TlsTrust::Pem {
            pem: kube.ca_pem.clone(),
            with_system_roots: false,
        },
        proxy,
        proxy_auth,
        Duration::from_secs(10),
    )?;
    let body = Bytes::from(secret.to_json(namespace).to_string());
    let base = kube.base_url();
    let item = format!("/api/v1/namespaces/{namespace}/secrets/{STV_SECRET}");
    let collection = format!("/api/v1/namespaces/{namespace}/secrets");
    let send = |method: &'static str, path: String| {
        let client = client.clone();
        let body = body.clone();
        let url = format!("{base}{path}");
        let token = kube.token.clone();
        async move {
            let req = http::Request::builder()
                .method(method)
                .uri(&url)
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json")
                .body(body)
                .map_err(|e| HttpError::Url(format!("{url}: {e}")))?;
            let resp = client.send(req).await?;
            Ok::<_, ApplyError>((resp.status().as_u16(), resp.into_body(), path, method))
        }
    };
    let fail =
        |(status, body, path, method): (u16, Bytes, String, &'static str)| ApplyError::Status {
            method,
            path,
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned(),
        };
    let put = send("PUT", item.clone()).await?;
    match put.0 {
        200 | 201 => return Ok(()),
        404 => {}
        _ => return Err(fail(put)),
    }
    let post = send("POST", collection).await?;
    match post.0 {
        200..=202 => Ok(()),
        // Created in between by another replica: replace it.
        409 => {
            let put = send("PUT", item).await?;
            if matches!(put.0, 200 | 201) {
                Ok(())
            } else {
                Err(fail(put))
            }
        }
        _ => Err(fail(post)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ca() -> String {
        rcgen::generate_simple_self_signed(vec!["kube-ca".to_owned()])
            .unwrap()
            .cert
            .pem()
    }

    #[test]
    fn params_bracket_ipv6_and_trim_the_token() {
        let k = KubeAccess {
            host: "fd00::1".into(),
            port: 443,
            ca_pem: b"PEM\n".to_vec(),
            token: "jwt".into(),
        };
        assert_eq!(
            agent_core::params::go_json(&k.params()),
            r#"{"cluster":{"address":"[fd00::1]:443","caCert":"UEVNCg==","token":"jwt"}}"#
        );
    }

    #[test]
    fn in_cluster_files_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  eyJhbGciOi.payload.sig \n").unwrap();
        let ca_pem = ca();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, &ca_pem).unwrap();
        let mut env: HashMap<&str, String> = HashMap::new();
        env.insert(ENV_SERVICE_HOST, "10.43.0.1".into());
        env.insert(ENV_SERVICE_PORT, "443".into());
        env.insert(ENV_SA_TOKEN_FILE, token.to_str().unwrap().into());
        env.insert(ENV_SA_CA_FILE, ca.to_str().unwrap().into());
        let k = KubeAccess::from_strings(&env).unwrap();
        assert_eq!(k.address(), "10.43.0.1:443");
        assert_eq!(k.token, "eyJhbGciOi.payload.sig");
        assert_eq!(k.ca_pem, ca_pem.as_bytes());

        let mut bad: HashMap<&str, String> = HashMap::new();
        bad.insert(ENV_SERVICE_PORT, "https".into());
        bad.insert(ENV_SA_TOKEN_FILE, "/nonexistent/token".into());
        bad.insert(ENV_SA_CA_FILE, token.to_str().unwrap().into());
        let errs = KubeAccess::from_strings(&bad).unwrap_err();
        let text = errs.to_string();
        assert_eq!(errs.0.len(), 4, "{text}");
        for needle in [
            ENV_SERVICE_HOST,
            ENV_SERVICE_PORT,
            "/nonexistent/token",
            "no PEM",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn json_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig.json");
        let kc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
            "clusters": [{"name": "c", "cluster": {
                "server": "https://[::1]:6443",
                "certificate-authority-data": data_encoding::BASE64.encode(ca().as_bytes()),
            }}],
            "users": [{"name": "u", "user": {"token": "tok\n"}}],
        });
        std::fs::write(&path, kc.to_string()).unwrap();
        let k = from_kubeconfig(&path).unwrap();
        assert_eq!(k.address(), "[::1]:6443");
        assert_eq!(k.token, "tok");
        std::fs::write(&path, "apiVersion: v1\n").unwrap();
        assert!(
            from_kubeconfig(&path)
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
    }

    #[test]
    fn stv_secret_has_all_seven_keys() {
        let s = StvSecret {
            server: "https://r.example".into(),
            token: "abc".into(),
            ca_checksum: "00".into(),
            ca_pem: None,
            cacerts_valid: false,
        };
        let v = s.to_json("cattle-system");
        let data = v["data"].as_object().unwrap();
        assert_eq!(data.len(), 7);
        let get = |k: &str| {
            String::from_utf8(
                data_encoding::BASE64
                    .decode(data[k].as_str().unwrap().as_bytes())
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(get("url"), "https://r.example/v3/connect");
        assert_eq!(get("token"), "stv-cluster-abc");
        assert_eq!(get("CATTLE_CACERTS_VALID"), "false");
        assert_eq!(get("ca.crt"), "");
    }
}
