//! `cattle-cluster-agent`: the Rancher 2.12+ cluster agent's tunnel side (spec
//! `cattle-agent.md` §3–§5), and the steve tunnel Rancher needs to show the cluster Connected.
//!
//! ```text
//!  /cattle-credentials/{url,token} ─┐
//!  KUBERNETES_SERVICE_HOST/PORT,    ├─▶ main tunnel  wss://<url host>/v3/connect[/register]
//!  SA token + ca.crt ───────────────┘     X-API-Tunnel-Token, X-API-Tunnel-Params
//!                                         {"cluster":{"address","caCert","token"}}
//!                                         allow-list: tcp any, unix docker.sock, npipe pipe
//!                                         on connect: touch `connected`, apply stv-aggregation
//!                                   └─▶ steve tunnel wss://<url host>/v3/connect
//!                                         Authorization: Bearer stv-cluster-<token>
//!                                         every stream: in-process HTTP/1.1 (GET /ping → pong)
//! ```
//!
//! What the Go agent does and this one does not is listed in `README.md`.

pub mod kube;
pub mod steve;

use std::collections::HashMap;
use std::sync::Arc;

use agent_core::allow::AllowList;
use agent_core::config::{CommonArgs, put};
use agent_core::env::{ConfigErrors, Strings, parse_bool};
use agent_core::runtime::{OnConnect, Runtime, main_tunnel};
use agent_core::{CommonConfig, Credentials, CredentialsPrecedence};

use crate::kube::{
    ENV_KUBECONFIG, ENV_SA_CA_FILE, ENV_SA_TOKEN_FILE, ENV_SERVICE_HOST, ENV_SERVICE_PORT,
    KubeAccess, StvSecret,
};

/// Namespace of `stv-aggregation` (this project's variable; Rancher's is fixed).
pub const ENV_NAMESPACE: &str = "CATTLE_NAMESPACE";
/// Whether to open the steve tunnel (this project's variable).
pub const ENV_STEVE_TUNNEL: &str = "CATTLE_STEVE_TUNNEL";
/// Whether to write `stv-aggregation` (this project's variable).
pub const ENV_WRITE_STV_SECRET: &str = "CATTLE_WRITE_STV_SECRET";

/// Command line of `cattle-cluster-agent`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cattle-cluster-agent",
    version,
    about = "Rancher-compatible cluster agent: keeps a reverse tunnel to the management server \
             so it can reach this cluster's kube-apiserver",
    long_about = "Rancher-compatible cluster agent: keeps a reverse tunnel to the management \
                  server (wss://<server>/v3/connect) and serves the streams the server opens \
                  through it (tcp to any address, unix only to /var/run/docker.sock), reporting \
                  the cluster's API address, CA and service-account token. A second tunnel \
                  (Authorization: Bearer stv-cluster-<token>) answers Rancher's /ping probe so \
                  the cluster shows as Connected. Every flag can also be given as the \
                  environment variable shown with it."
)]
pub struct Args {
    /// Settings shared with the node agent.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Host of the kube-apiserver service, reported as the cluster's address. Set by
    /// Kubernetes in every pod.
    #[arg(long, env = ENV_SERVICE_HOST, value_name = "HOST")]
    pub kube_service_host: Option<String>,

    /// Port of the kube-apiserver service. Set by Kubernetes in every pod.
    #[arg(long, env = ENV_SERVICE_PORT, value_name = "PORT")]
    pub kube_service_port: Option<String>,

    /// The service-account token reported to the server (whitespace-trimmed). Default
    /// /var/run/secrets/kubernetes.io/serviceaccount/token.
    #[arg(long, env = ENV_SA_TOKEN_FILE, value_name = "PATH")]
    pub sa_token_file: Option<String>,

    /// The cluster CA reported to the server (base64 of the PEM). Default
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt.
    #[arg(long, env = ENV_SA_CA_FILE, value_name = "PATH")]
    pub sa_ca_file: Option<String>,

    /// A JSON kubeconfig (kubectl config view --flatten -o json) to use instead of the
    /// in-cluster settings above: its server, CA and token. For tests and debugging.
    #[arg(long, env = ENV_KUBECONFIG, value_name = "PATH")]
    pub kubeconfig: Option<String>,

    /// Namespace of the stv-aggregation Secret. Default cattle-system.
    #[arg(long, env = ENV_NAMESPACE, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Open the steve aggregation tunnel that Rancher's Connected condition needs. Default true.
    #[arg(long, env = ENV_STEVE_TUNNEL, value_name = "BOOL")]
    pub steve_tunnel: Option<String>,

    /// Write the stv-aggregation Secret through the Kubernetes API on each connect. Default
    /// true.
    #[arg(long, env = ENV_WRITE_STV_SECRET, value_name = "BOOL")]
    pub write_stv_secret: Option<String>,
}

impl Args {
    /// The parsed flags as variable-keyed strings.
    pub fn to_strings(&self) -> HashMap<&'static str, String> {
        let mut out = HashMap::new();
        self.common.to_strings(&mut out);
        put(&mut out, ENV_SERVICE_HOST, &self.kube_service_host);
        put(&mut out, ENV_SERVICE_PORT, &self.kube_service_port);
        put(&mut out, ENV_SA_TOKEN_FILE, &self.sa_token_file);
        put(&mut out, ENV_SA_CA_FILE, &self.sa_ca_file);
        put(&mut out, ENV_KUBECONFIG, &self.kubeconfig);
        put(&mut out, ENV_NAMESPACE, &self.namespace);
        put(&mut out, ENV_STEVE_TUNNEL, &self.steve_tunnel);
        put(&mut out, ENV_WRITE_STV_SECRET, &self.write_stv_secret);
        out
    }
}

/// Everything the cluster agent runs with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Shared settings.
    pub common: CommonConfig,
    /// Tunnel server and registration token.
    pub credentials: Credentials,
    /// The downstream kube-apiserver.
    pub kube: KubeAccess,
    /// Namespace of `stv-aggregation`.
    pub namespace: String,
    /// Open the steve tunnel.
    pub steve_tunnel: bool,
    /// Write `stv-aggregation`.
    pub write_stv_secret: bool,
}

impl ClusterConfig {
    /// Parses and checks every setting, reporting all problems at once.
    pub fn from_strings(strings: &impl Strings) -> Result<Self, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let loaded = agent_core::config::load(strings, CredentialsPrecedence::FilesFirst)
            .map_err(|e| errs.extend(e))
            .ok();
        let kube = KubeAccess::from_strings(strings)
            .map_err(|e| errs.extend(e))
            .ok();
        let steve_tunnel = errs.take(parse_bool(strings, ENV_STEVE_TUNNEL, true));
        let write_stv_secret = errs.take(parse_bool(strings, ENV_WRITE_STV_SECRET, true));
        let namespace = strings
            .get_nonempty(ENV_NAMESPACE)
            .unwrap_or_else(|| "cattle-system".to_owned());
        match (loaded, kube, steve_tunnel, write_stv_secret) {
            (Some((common, credentials)), Some(kube), Some(steve_tunnel), Some(write))
                if errs.is_empty() =>
            {
                Ok(Self {
                    common,
                    credentials,
                    kube,
                    namespace,
                    steve_tunnel,
                    write_stv_secret: write,
                })
            }
            _ => Err(errs),
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT and the drain are over. Errors are start-up failures.
pub async fn run(config: ClusterConfig) -> Result<(), String> {
    let common = &config.common;
    let rt = Runtime::new(common.shutdown_grace);
    let health = rt
        .serve_health(common.health_addr)
        .await
        .map_err(|e| format!("health endpoint on {}: {e}", common.health_addr))?;
    tracing::info!(addr = %health, "health and metrics endpoint listening on http://{health}");

    let Some(preflight) = rt
        .unless_signalled(agent_core::preflight::run(
            common,
            &config.credentials.server,
        ))
        .await
    else {
        return Ok(());
    };
    let preflight = preflight.map_err(|e| e.to_string())?;
    let params = config.kube.params();
    let token = &config.credentials.token;
    let half: String = token.chars().take(token.chars().count() / 2).collect();
    tracing::info!(
        url = %config.credentials.server.tunnel_url(common.register()),
        api = %config.kube.address(),
        "Connecting with token starting with {half}"
    );

    let on_connect: Option<OnConnect> = config.write_stv_secret.then(|| {
        let secret = StvSecret {
            server: config.credentials.server.root(),
            token: token.clone(),
            ca_checksum: common.ca_checksum.clone().unwrap_or_default(),
            ca_pem: preflight.ca_pem.clone(),
            cacerts_valid: preflight.cacerts_valid,
        };
        let kube = config.kube.clone();
        let proxy = common.proxy.clone();
        let proxy_auth = common.proxy_auth.clone();
        let namespace = config.namespace.clone();
        let hook: OnConnect = Arc::new(move |_tunnel| {
            let (secret, kube, proxy, auth, ns) = (
                secret.clone(),
                kube.clone(),
                proxy.clone(),
                proxy_auth.clone(),
                namespace.clone(),
            );
            Box::pin(async move { write_secret(&kube, proxy, auth, &ns, &secret).await })
        });
        hook
    });

    let main = main_tunnel(
        common,
        &config.credentials,
        &params,
        preflight.trust.clone(),
        AllowList::rancher(),
        on_connect,
    )
    .map_err(|e| e.to_string())?;
    rt.spawn_tunnel(main);
    if config.steve_tunnel {
        let spec = steve::steve_tunnel(
            common,
            config.credentials.server.tunnel_url(false),
            token,
            preflight.trust,
        )
        .map_err(|e| e.to_string())?;
        rt.spawn_tunnel(spec);
    }
    rt.run_until_signal().await;
    Ok(())
}

/// Writes `stv-aggregation`, retrying a few times; failures are logged, not fatal (the next
/// connect tries again).
async fn write_secret(
    kube: &KubeAccess,
    proxy: tunnel_proto::driver::connector::ProxyConfig,
    auth: agent_core::http::ProxyAuth,
    namespace: &str,
    secret: &StvSecret,
) {
    for attempt in 1..=3 {
        match kube::apply_stv_secret(kube, proxy.clone(), auth.clone(), namespace, secret).await {
            Ok(()) => {
                tracing::info!(
                    secret = %format!("{namespace}/{}", kube::STV_SECRET),
                    "applied the steve aggregation secret"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(attempt, %error, "applying the steve aggregation secret failed");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
    tracing::error!("giving up on the steve aggregation secret until the next connect");
}
