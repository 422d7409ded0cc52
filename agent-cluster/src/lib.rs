//! `cattle-cluster-agent`: the Rancher 2.12+ cluster agent's tunnel side (spec
//! `cattle-agent.md` §3–§5), and the steve tunnel Rancher needs to show the cluster Connected.
//!
//! ```text
//!  /cattle-credentials/{url,token} ─┐
//!  KUBERNETES_SERVICE_HOST/PORT,    ├─▶ main tunnel  wss://<url host>/v3/connect[/register]
//!  ca.crt, token of Secret          │     X-API-Tunnel-Token, X-API-Tunnel-Params
//!  cattle-token-* (sa_token) ───────┘     {"cluster":{"address","caCert","token"}}
//!                                         allow-list: tcp any, unix docker.sock, npipe pipe
//!                                         on connect: touch `connected`, apply stv-aggregation
//!                                   └─▶ steve tunnel wss://<url host>/v3/connect
//!                                         Authorization: Bearer stv-cluster-<token>
//!                                         every stream: in-process HTTP/1.1 (GET /ping → pong)
//!  sa_token::watch ── reported token changed ─▶ new params into the main tunnel's
//!                                               SharedHeaders, current session closed ─▶
//!                                               redial ─▶ the server stores the new params
//! ```
//!
//! **How the server learns new params**: only from the headers of a main-tunnel handshake
//! (tunnel-server's authorizer stores `address`/`caCert`/`token` of every authenticated
//! handshake, `/register` or not, and its Kubernetes proxy reads them per request). So when the
//! reported token changes (the Secret's token appears after a fallback, or the Secret is
//! replaced), the agent puts the new params into the connector's [`SharedHeaders`] and closes
//! the current main session; the connect loop redials after its shortest backoff with the new
//! headers. Streams open on the old session end with it (kubectl retries or reconnects its
//! watches); a session dialed with the old headers while the change raced it is closed as soon
//! as it connects.
//!
//! [`SharedHeaders`]: tunnel_proto::driver::connector::SharedHeaders
//!
//! What the Go agent does and this one does not is listed in `README.md`.

pub mod kube;
pub mod sa_token;
pub mod steve;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_core::allow::AllowList;
use agent_core::config::CommonArgs;
use agent_core::env::{ConfigError, ConfigErrors, Strings, parse_bool, parse_duration};
use agent_core::runtime::{
    ConnectorFactory, OnConnect, Runtime, connector_config, log_connecting, main_headers,
    main_tunnel,
};
use agent_core::{CommonConfig, Credentials, CredentialsPrecedence};
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::{Connector, SharedHeaders};

use crate::sa_token::{Reported, TokenSettings};

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
/// Bound on the wait for the token controller (this project's variable).
pub const ENV_SA_TOKEN_WAIT: &str = "CATTLE_SA_TOKEN_WAIT";
/// Interval of the token Secret re-checks (this project's variable).
pub const ENV_SA_TOKEN_RECHECK: &str = "CATTLE_SA_TOKEN_RECHECK";

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

    /// The pod's projected service-account token: the agent's own credential for its API
    /// calls (re-read as the kubelet rotates it), and the token reported to the server only
    /// when SA cattle's token Secret has none. Default
    /// /var/run/secrets/kubernetes.io/serviceaccount/token.
    #[arg(long, env = ENV_SA_TOKEN_FILE, value_name = "PATH")]
    pub sa_token_file: Option<String>,

    /// The cluster CA reported to the server (base64 of the PEM). Default
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt.
    #[arg(long, env = ENV_SA_CA_FILE, value_name = "PATH")]
    pub sa_ca_file: Option<String>,

    /// A kubeconfig (YAML or JSON) to use instead of the in-cluster settings above: its
    /// current context's server, CA and bearer token (token or tokenFile). For tests and
    /// debugging.
    #[arg(long, env = ENV_KUBECONFIG, value_name = "PATH")]
    pub kubeconfig: Option<String>,

    /// Namespace of the stv-aggregation Secret and of service account cattle and its token
    /// Secret. Default cattle-system.
    #[arg(long, env = ENV_NAMESPACE, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Open the steve aggregation tunnel that Rancher's Connected condition needs. Default true.
    #[arg(long, env = ENV_STEVE_TUNNEL, value_name = "BOOL")]
    pub steve_tunnel: Option<String>,

    /// Write the stv-aggregation Secret through the Kubernetes API on each connect. Default
    /// true.
    #[arg(long, env = ENV_WRITE_STV_SECRET, value_name = "BOOL")]
    pub write_stv_secret: Option<String>,

    /// How long to wait at start for kube-controller-manager's token controller to fill the
    /// token of service account cattle's kubernetes.io/service-account-token Secret (created
    /// if missing, as Rancher's agent does) before reporting the pod's projected token
    /// instead. Default 10s (the controller takes milliseconds; Rancher waits about 5 s).
    #[arg(long, env = ENV_SA_TOKEN_WAIT, value_name = "DURATION")]
    pub sa_token_wait: Option<String>,

    /// How often to check the token Secret again; when the reported token changes, the main
    /// tunnel is re-established so the server gets the new one. Default 60s.
    #[arg(long, env = ENV_SA_TOKEN_RECHECK, value_name = "DURATION")]
    pub sa_token_recheck: Option<String>,
}

impl Args {
    /// The parsed flags as variable-keyed strings.
    pub fn to_strings(&self) -> HashMap<&'static str, String> {
        self.common.strings_with([
            (ENV_SERVICE_HOST, &self.kube_service_host),
            (ENV_SERVICE_PORT, &self.kube_service_port),
            (ENV_SA_TOKEN_FILE, &self.sa_token_file),
            (ENV_SA_CA_FILE, &self.sa_ca_file),
            (ENV_KUBECONFIG, &self.kubeconfig),
            (ENV_NAMESPACE, &self.namespace),
            (ENV_STEVE_TUNNEL, &self.steve_tunnel),
            (ENV_WRITE_STV_SECRET, &self.write_stv_secret),
            (ENV_SA_TOKEN_WAIT, &self.sa_token_wait),
            (ENV_SA_TOKEN_RECHECK, &self.sa_token_recheck),
        ])
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
    /// Bound on the first wait for the token Secret's token.
    pub sa_token_wait: Duration,
    /// Interval of the token Secret re-checks.
    pub sa_token_recheck: Duration,
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
        let wait = errs.take(parse_duration(
            strings,
            ENV_SA_TOKEN_WAIT,
            sa_token::DEFAULT_WAIT,
        ));
        let recheck = errs.take(
            parse_duration(strings, ENV_SA_TOKEN_RECHECK, sa_token::DEFAULT_RECHECK).and_then(
                |d| {
                    if d.is_zero() {
                        Err(ConfigError::invalid(
                            ENV_SA_TOKEN_RECHECK,
                            "0",
                            "must be > 0",
                        ))
                    } else {
                        Ok(d)
                    }
                },
            ),
        );
        let namespace = strings
            .get_nonempty(ENV_NAMESPACE)
            .unwrap_or_else(|| "cattle-system".to_owned());
        match (loaded, kube, steve_tunnel, write_stv_secret, wait, recheck) {
            (
                Some((common, credentials)),
                Some(kube),
                Some(steve_tunnel),
                Some(write),
                Some(sa_token_wait),
                Some(sa_token_recheck),
            ) if errs.is_empty() => Ok(Self {
                common,
                credentials,
                kube,
                namespace,
                steve_tunnel,
                write_stv_secret: write,
                sa_token_wait,
                sa_token_recheck,
            }),
            _ => Err(errs),
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT and the drain are over. Errors are start-up failures.
pub async fn run(config: ClusterConfig) -> Result<(), String> {
    let common = &config.common;
    let Some((rt, preflight)) = Runtime::start(common, &config.credentials.server)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let client = config
        .kube
        .client(&config.namespace)
        .map_err(|e| e.to_string())?;
    let settings = TokenSettings {
        namespace: config.namespace.clone(),
        service_account: sa_token::SERVICE_ACCOUNT.to_owned(),
        wait: config.sa_token_wait,
        recheck: config.sa_token_recheck,
        projected_file: config.kube.token_file.clone(),
    };
    let Some(reported) = rt
        .unless_signalled(sa_token::initial(&client, &settings, &config.kube.token))
        .await
    else {
        return Ok(());
    };
    log_connecting(
        common,
        &config.credentials,
        format_args!(
            "api={} sa_token={}",
            config.kube.address(),
            reported.source()
        ),
    );
    let token = &config.credentials.token;

    // The main tunnel's headers live in a SharedHeaders the connector reads on every dial, so
    // a new token reaches the server with the next handshake (see the crate docs).
    let headers = {
        let (token, kube) = (token.clone(), config.kube.clone());
        move |reported: &Reported| main_headers(&token, &kube.params_with_token(reported.token()))
    };
    let shared = SharedHeaders::new(headers(&reported).map_err(|e| e.to_string())?);
    let session: Arc<Mutex<Option<Tunnel>>> = Arc::default();

    let stv = config.write_stv_secret.then(|| StvSecret {
        server: config.credentials.server.root(),
        token: token.clone(),
        ca_checksum: common.ca_checksum.clone().unwrap_or_default(),
        ca_pem: preflight.ca_pem.clone(),
        cacerts_valid: preflight.cacerts_valid,
    });
    let on_connect: OnConnect = {
        let (client, namespace) = (client.clone(), config.namespace.clone());
        let (shared, session) = (shared.clone(), session.clone());
        Arc::new(move |tunnel: Tunnel| {
            *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel.clone());
            if shared.is_stale() {
                tracing::info!("the main tunnel was dialed with superseded params; redialing");
                tunnel.close();
            }
            let (client, namespace, stv) = (client.clone(), namespace.clone(), stv.clone());
            Box::pin(async move {
                if let Some(stv) = stv {
                    write_secret(&client, &namespace, &stv).await;
                }
            })
        })
    };

    let mut main = main_tunnel(
        common,
        &config.credentials,
        &config.kube.params_with_token(reported.token()),
        preflight.trust.clone(),
        AllowList::rancher(),
        Some(on_connect),
    )
    .map_err(|e| e.to_string())?;
    main.connector = {
        let (trust, common, shared) = (preflight.trust.clone(), common.clone(), shared.clone());
        let factory: ConnectorFactory = Arc::new(move |url: &str| {
            let mut cfg = connector_config(url, http::HeaderMap::new(), trust.clone(), &common);
            cfg.set_shared_headers(shared.clone());
            Connector::new(cfg).map_err(|e| ConfigError::Other {
                name: "tunnel".to_owned(),
                reason: e.to_string(),
            })
        });
        factory
    };
    rt.spawn_tunnel(main);

    let (tx, mut rx) = tokio::sync::watch::channel(reported);
    let drain = rt.drain_token();
    tokio::spawn(sa_token::watch(client.clone(), settings, tx, drain.clone()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = drain.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let reported = rx.borrow_and_update().clone();
            let replaced = headers(&reported)
                .map_err(|e| e.to_string())
                .and_then(|h| shared.replace(h).map_err(|e| e.to_string()));
            if let Err(error) = replaced {
                tracing::error!(%error, "cannot use the new params");
                continue;
            }
            let current = session.lock().unwrap_or_else(|p| p.into_inner()).clone();
            tracing::info!(
                sa_token = %reported.source(),
                "re-establishing the main tunnel so the server stores the new cluster params"
            );
            if let Some(tunnel) = current {
                tunnel.close();
            }
        }
    });

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
async fn write_secret(client: &::kube::Client, namespace: &str, secret: &StvSecret) {
    for attempt in 1..=3 {
        match kube::apply_stv_secret(client, namespace, secret).await {
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
