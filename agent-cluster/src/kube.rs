//! The downstream cluster as the agent reports it and reaches it: the kube-apiserver's
//! in-cluster address, the service account's CA and projected token, the params of spec §4.2,
//! the `kube` client the agent talks to its own apiserver with, and the `stv-aggregation`
//! Secret it writes there (spec §4.4).
//!
//! ```text
//!  KUBERNETES_SERVICE_HOST/PORT ─┐
//!  CATTLE_SA_TOKEN_FILE (token) ─┼─▶ KubeAccess ─ client() ─▶ kube::Client (rustls + ring;
//!  CATTLE_SA_CA_FILE (ca.crt) ───┘   (or CATTLE_KUBECONFIG)    token file and CA re-read)
//!                                      │
//!                                      └─ params(token) ─▶ {"cluster":{"address","caCert","token"}}
//! ```
//!
//! The client is built from a `kube::Config` assembled here rather than `Config::incluster()`,
//! because the paths can be moved (`CATTLE_SA_*`) and a kubeconfig may replace them: the token
//! file and CA file are given to kube, which re-reads both (the kubelet rotates the projected
//! token), so the agent's own calls keep working. Which token is *reported* to the server is
//! decided in [`crate::sa_token`]: the token of a `kubernetes.io/service-account-token` Secret
//! of SA `cattle`, as Rancher's agent reports, with the projected token only as a fallback.
//! The CA is reported from the mounted `ca.crt`, which holds what Rancher reads from ConfigMap
//! `kube-root-ca.crt` (the kube-controller-manager publishes the same bundle in both).
//!
//! The client dials the apiserver directly: the `HTTPS_PROXY` of the tunnel is not applied to
//! the in-cluster service (kube's `http-proxy` feature is left out).

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_core::config::{ServerUrl, bracket};
use agent_core::env::{ConfigError, ConfigErrors, Strings};
use agent_core::http::pem_has_certificate;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

/// `KUBERNETES_SERVICE_HOST`.
pub const ENV_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
/// `KUBERNETES_SERVICE_PORT`.
pub const ENV_SERVICE_PORT: &str = "KUBERNETES_SERVICE_PORT";
/// Path of the service-account token (this project's variable).
pub const ENV_SA_TOKEN_FILE: &str = "CATTLE_SA_TOKEN_FILE";
/// Path of the service-account CA (this project's variable).
pub const ENV_SA_CA_FILE: &str = "CATTLE_SA_CA_FILE";
/// A kubeconfig used instead of the in-cluster settings (this project's, for tests).
pub const ENV_KUBECONFIG: &str = "CATTLE_KUBECONFIG";

/// Where Kubernetes mounts the service-account token.
pub const DEFAULT_SA_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where Kubernetes mounts the cluster CA.
pub const DEFAULT_SA_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Bound on each call the agent makes to its apiserver (kube sets no read timeout).
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the kube-apiserver, and what the server is told about it.
#[derive(Clone, PartialEq, Eq)]
pub struct KubeAccess {
    /// Host (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The CA PEM, byte for byte as read (reported base64-encoded).
    pub ca_pem: Vec<u8>,
    /// The token read at start (the pod's projected token), whitespace-trimmed.
    pub token: String,
    /// Where the token was read; kube re-reads it, and so does the fallback in
    /// [`crate::sa_token`]. `None` for a kubeconfig with an inline token.
    pub token_file: Option<PathBuf>,
    /// Where the CA was read; kube re-reads it. `None` for inline kubeconfig data.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAccess")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("ca_pem_len", &self.ca_pem.len())
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

/// Why the Kubernetes client could not be built or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// The client configuration is unusable (URL, CA).
    #[error("kubernetes client for {url}: {reason}")]
    Config {
        /// The apiserver URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The API call failed (transport, or an error status).
    #[error("{what}: {source}")]
    Api {
        /// Which call.
        what: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
    /// The API call did not finish within [`API_TIMEOUT`].
    #[error("{what}: no answer within {API_TIMEOUT:?}")]
    Timeout {
        /// Which call.
        what: String,
    },
}

impl KubeError {
    /// The HTTP status of an API error, if the apiserver answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            KubeError::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }
}

/// Runs one API call within [`API_TIMEOUT`], naming it in errors.
pub async fn call<T>(
    what: impl Into<String>,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(KubeError::Api {
            what: what.into(),
            source,
        }),
        Err(_) => Err(KubeError::Timeout { what: what.into() }),
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

    /// The cluster params of spec §4.2 with the token read at start.
    pub fn params(&self) -> Value {
        self.params_with_token(&self.token)
    }

    /// The cluster params of spec §4.2 reporting `token`.
    pub fn params_with_token(&self, token: &str) -> Value {
        json!({
            "cluster": {
                "address": self.address(),
                "caCert": data_encoding::BASE64.encode(&self.ca_pem),
                "token": token.trim(),
            }
        })
    }

    /// The `kube` configuration: the apiserver URL, the CA (and its file, which kube
    /// re-reads), the token file (re-read by kube) or the inline token.
    pub fn kube_config(&self, namespace: &str) -> Result<kube::Config, KubeError> {
        let url = self.base_url();
        let bad = |reason: String| KubeError::Config {
            url: url.clone(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        let roots = CertificateDer::pem_slice_iter(&self.ca_pem)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("CA: {e}")))?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = namespace.to_owned();
        config.root_cert = Some(roots);
        config.root_cert_file = self.ca_file.clone();
        // kube sends the file's bytes as they are: a file with surrounding whitespace (a
        // hand-written one; the kubelet writes none) would make an invalid header, so its
        // trimmed token is used as read at start, without reloads.
        match &self.token_file {
            Some(file) if token_file_is_trimmed(file) => {
                config.auth_info.token_file = Some(file.display().to_string());
            }
            _ => config.auth_info.token = Some(self.token.clone().into()),
        }
        Ok(config)
    }

    /// A `kube` client for the agent's own calls (needs a tokio runtime).
    pub fn client(&self, namespace: &str) -> Result<kube::Client, KubeError> {
        let config = self.kube_config(namespace)?;
        kube::Client::try_from(config).map_err(|e| KubeError::Config {
            url: self.base_url(),
            reason: e.to_string(),
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
                token_file: Some(token_path),
                ca_file: Some(ca_path),
            }),
            _ => Err(errs),
        }
    }
}

fn token_file_is_trimmed(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|raw| raw.trim() == raw && !raw.is_empty())
}

/// Reads a service-account token file, whitespace-trimmed; empty is an error.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
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

/// Reads a kubeconfig (YAML or JSON, parsed by kube's `Kubeconfig`): the current context's
/// cluster `server`, `certificate-authority-data` (or `certificate-authority`), and the user's
/// `token` (or `tokenFile`). Client certificates and exec plugins are not used: the agent
/// reports a bearer token, so it needs one. For tests and debugging.
pub fn from_kubeconfig(path: &Path) -> Result<KubeAccess, ConfigError> {
    use secrecy::ExposeSecret;
    let bad = |reason: String| ConfigError::file("kubeconfig", path.display(), reason);
    let doc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let current = doc
        .current_context
        .clone()
        .ok_or_else(|| bad("no current-context".into()))?;
    let context = doc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.clone())
        .ok_or_else(|| bad(format!("context {current:?} not found")))?;
    let cluster = doc
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| bad(format!("cluster {:?} not found", context.cluster)))?;
    let user = context
        .user
        .as_ref()
        .and_then(|u| doc.auth_infos.iter().find(|a| &a.name == u))
        .and_then(|a| a.auth_info.clone())
        .unwrap_or_default();
    let server = cluster
        .server
        .ok_or_else(|| bad("cluster has no server".into()))?;
    let url = ServerUrl::parse(&server).map_err(|e| bad(format!("server {server:?}: {e}")))?;
    let (ca_pem, ca_file) = match (
        cluster.certificate_authority_data,
        cluster.certificate_authority,
    ) {
        (Some(data), _) => (
            data_encoding::BASE64
                .decode(data.trim().as_bytes())
                .map_err(|e| bad(format!("certificate-authority-data: {e}")))?,
            None,
        ),
        (None, Some(file)) => (
            std::fs::read(&file).map_err(|e| bad(format!("{file}: {e}")))?,
            Some(PathBuf::from(file)),
        ),
        (None, None) => return Err(bad("cluster has no certificate authority".into())),
    };
    if !pem_has_certificate(&ca_pem) {
        return Err(bad(
            "the certificate authority holds no PEM certificate".into()
        ));
    }
    let (token, token_file) = match (user.token, user.token_file) {
        (Some(t), _) => (t.expose_secret().trim().to_owned(), None),
        (None, Some(file)) => {
            let file = PathBuf::from(file);
            (read_token(&file)?, Some(file))
        }
        (None, None) => return Err(bad("user has no token or tokenFile".into())),
    };
    Ok(KubeAccess {
        port: url.port_or_default(),
        host: url.host,
        ca_pem,
        token,
        token_file,
        ca_file,
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
    pub fn to_secret(&self, namespace: &str) -> Secret {
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        let data = [
            ("CATTLE_SERVER", bytes(&self.server)),
            ("CATTLE_TOKEN", bytes(&self.token)),
            ("CATTLE_CA_CHECKSUM", bytes(&self.ca_checksum)),
            ("url", bytes(&format!("{}/v3/connect", self.server))),
            ("token", bytes(&format!("stv-cluster-{}", self.token))),
            ("ca.crt", bytes(self.ca_pem.as_deref().unwrap_or(""))),
            (
                "CATTLE_CACERTS_VALID",
                bytes(if self.cacerts_valid { "true" } else { "false" }),
            ),
        ];
        Secret {
            metadata: ObjectMeta {
                name: Some(STV_SECRET.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
            ..Secret::default()
        }
    }
}

/// How many times [`apply_stv_secret`] goes round replace → create when another writer keeps
/// winning (a second replica applying at the same moment).
pub const APPLY_ROUNDS: usize = 3;

/// Creates or replaces `namespace/stv-aggregation` through `Api<Secret>`: a replace without
/// `resourceVersion` (an unconditional update, which Secrets allow), a create when that says
/// 404, and another replace when the create says 409 (created in between by another replica);
/// 409s on the replace (a write raced with ours) are retried the same way.
pub async fn apply_stv_secret(
    client: &kube::Client,
    namespace: &str,
    secret: &StvSecret,
) -> Result<(), KubeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let object = secret.to_secret(namespace);
    let pp = PostParams::default();
    let mut last = None;
    for _ in 0..APPLY_ROUNDS {
        let what = format!("replace secret {namespace}/{STV_SECRET}");
        match call(what, api.replace(STV_SECRET, &pp, &object)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(404) => {}
            Err(e) if e.status() == Some(409) => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        let what = format!("create secret {namespace}/{STV_SECRET}");
        match call(what, api.create(&pp, &object)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(409) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("a round ended in a conflict"))
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
            token_file: None,
            ca_file: None,
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
        assert_eq!(k.token_file.as_deref(), Some(token.as_path()));
        assert_eq!(
            agent_core::params::go_json(&k.params_with_token(" secret-token\n")),
            format!(
                r#"{{"cluster":{{"address":"10.43.0.1:443","caCert":"{}","token":"secret-token"}}}}"#,
                data_encoding::BASE64.encode(ca_pem.as_bytes())
            )
        );

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
    fn kubeconfig_json_and_yaml() {
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
        assert_eq!(k.token_file, None);
        assert_eq!(k.ca_file, None);
        // YAML too (kube's parser), with a token file and a CA file.
        let token = dir.path().join("token");
        std::fs::write(&token, "file-token\n").unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca()).unwrap();
        let yaml = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: ctx\ncontexts:\n- name: ctx\n  context: {{cluster: c, user: u}}\n\
             clusters:\n- name: c\n  cluster: {{server: 'https://10.0.0.1:6443', certificate-authority: '{}'}}\n\
             users:\n- name: u\n  user: {{tokenFile: '{}'}}\n",
            ca_file.display(),
            token.display()
        );
        std::fs::write(&path, yaml).unwrap();
        let k = from_kubeconfig(&path).unwrap();
        assert_eq!(
            (k.address().as_str(), k.token.as_str()),
            ("10.0.0.1:6443", "file-token")
        );
        assert_eq!(k.token_file.as_deref(), Some(token.as_path()));
        assert_eq!(k.ca_file.as_deref(), Some(ca_file.as_path()));
        std::fs::write(&path, "current-context: [").unwrap();
        assert!(
            from_kubeconfig(&path)
                .unwrap_err()
                .to_string()
                .contains("kubeconfig")
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
        let v = s.to_secret("cattle-system");
        assert_eq!(v.metadata.name.as_deref(), Some(STV_SECRET));
        assert_eq!(v.metadata.namespace.as_deref(), Some("cattle-system"));
        assert_eq!(v.type_.as_deref(), Some("Opaque"));
        let data = v.data.unwrap();
        assert_eq!(data.len(), 7);
        let get = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
        assert_eq!(get("url"), "https://r.example/v3/connect");
        assert_eq!(get("token"), "stv-cluster-abc");
        assert_eq!(get("CATTLE_SERVER"), "https://r.example");
        assert_eq!(get("CATTLE_TOKEN"), "abc");
        assert_eq!(get("CATTLE_CA_CHECKSUM"), "00");
        assert_eq!(get("CATTLE_CACERTS_VALID"), "false");
        assert_eq!(get("ca.crt"), "");
        // On the wire, base64 as the old hand-written JSON had it.
        let json = serde_json::to_value(
            StvSecret {
                ca_pem: Some("PEM".into()),
                ..s
            }
            .to_secret("ns"),
        )
        .unwrap();
        assert_eq!(json["data"]["ca.crt"], "UEVN");
        assert_eq!(json["kind"], "Secret");
    }

    #[tokio::test]
    async fn kube_config_carries_the_files_kube_re_reads() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok").unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca()).unwrap();
        let k = KubeAccess {
            host: "127.0.0.1".into(),
            port: 6443,
            ca_pem: std::fs::read(&ca_file).unwrap(),
            token: "tok".into(),
            token_file: Some(token.clone()),
            ca_file: Some(ca_file.clone()),
        };
        let c = k.kube_config("cattle-system").unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(c.default_namespace, "cattle-system");
        assert_eq!(c.root_cert.as_ref().map(Vec::len), Some(1));
        assert_eq!(c.root_cert_file.as_deref(), Some(ca_file.as_path()));
        assert_eq!(
            c.auth_info.token_file.as_deref(),
            Some(token.to_str().unwrap())
        );
        assert!(c.auth_info.token.is_none());
        k.client("cattle-system").expect("a client");
        std::fs::write(&token, "tok\n").unwrap();
        let c = k.kube_config("cattle-system").unwrap();
        assert!(
            c.auth_info.token_file.is_none(),
            "kube would send the newline"
        );
        assert!(c.auth_info.token.is_some());
        let bad = KubeAccess {
            ca_pem: b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
                .to_vec(),
            ..k
        };
        assert!(bad.kube_config("x").unwrap_err().to_string().contains("CA"));
    }
}
