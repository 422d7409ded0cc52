//! Assembles and runs the server: store, PKI, tunnel registry, acceptor (tunnel upgrades at
//! `/v3/connect[/register]`, everything else to [`crate::routes`]), the Connected prober.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{
    AcceptedTunnel, Acceptor, AcceptorConfig, AuthRequest, tls_server_config,
};
use tunnel_proto::driver::capability::Capabilities;
use tunnel_proto::driver::registry::{Registry, RegistryEvent, serve_acceptor_tunnel};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, websocket_config};
use tunnel_proto::mux::refuse_all;
use tunnel_proto::{Role, SessionConfig};

use crate::app::{App, AppConfig, SharedApp};
use crate::auth_limit::{AuthLimitConfig, AuthLimitConfigError};
use crate::store::{LAST_USE_FLUSH_INTERVAL, SqliteStore, Store, StoreError, TokenUseFlusher};

/// The tunnel mount paths.
pub const MOUNT_PATHS: [&str; 2] = ["/v3/connect", "/v3/connect/register"];

/// Default cluster agent image in import manifests.
pub const DEFAULT_AGENT_IMAGE: &str = "tunnel-project/cattle-cluster-agent:dev";
/// Default node agent image in import manifests.
pub const DEFAULT_NODE_AGENT_IMAGE: &str = "tunnel-project/cattle-node-agent:dev";
/// Store file name inside the data directory.
pub const STORE_FILE: &str = "state.db";

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// A CA and serving certificate the server creates on first start and keeps in the store.
    Generated,
    /// Operator-provided files.
    Files {
        /// PEM chain, leaf first.
        cert: PathBuf,
        /// PEM key.
        key: PathBuf,
        /// The CA agents should pin (`/cacerts`); none for a publicly trusted certificate.
        cacerts: Option<PathBuf>,
    },
    /// Plain HTTP (tests only).
    InsecureHttp,
}

/// Which store the server keeps its state in.
#[derive(Clone, Default)]
pub enum StoreBackend {
    /// The SQLite file in the data directory (the embedded default).
    #[default]
    Sqlite,
    /// A store opened by the caller (the Kubernetes store: it must be opened outside the
    /// runtime, see [`crate::store::KubeStore`]).
    Opened(Arc<dyn Store>),
}

impl std::fmt::Debug for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Opened(_) => f.write_str("Opened"),
        }
    }
}

/// `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Listen address.
    pub listen: String,
    /// Data directory (store file, `ca.pem`).
    pub data_dir: PathBuf,
    /// The store (default: SQLite in the data directory).
    pub store: StoreBackend,
    /// This replica's name in the store's presence records (default:
    /// [`crate::presence::default_replica_name`]).
    pub replica: String,
    /// Public URL; default `https://<listen address>`.
    pub server_url: Option<String>,
    /// TLS.
    pub tls: TlsSource,
    /// Cluster agent image.
    pub agent_image: String,
    /// Node agent image.
    pub node_agent_image: String,
    /// Connected probe interval (default 15 s).
    pub probe_interval: Duration,
    /// How long shutdown waits for requests and tunnels (default 10 s).
    pub shutdown_grace: Duration,
    /// The rate limit on failed agent authentications (default: burst 10, 1 per second).
    pub auth_limit: AuthLimitConfig,
    /// A separate address serving `GET /metrics` without authentication (plain HTTP); on the
    /// main listener `/metrics` needs an admin's API token.
    pub metrics_listen: Option<String>,
    /// Most connections open at once on the listener (tunnels included).
    pub max_connections: usize,
    /// Most connections open at once from one address (IPv6: its /64).
    pub max_connections_per_peer: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// The peer listener, for forwarding requests to the replica that holds a tunnel
    /// ([`crate::peers`]; several replicas on the Kubernetes store). `None`: no forwarding.
    pub peers: Option<crate::peers::PeerConfig>,
    /// Leader election among the replicas and the controllers the leader runs
    /// ([`crate::leader`]; the Kubernetes store). `None`: none (SQLite: one replica).
    pub leader: Option<crate::leader::LeaderConfig>,
}

impl ServeConfig {
    /// Defaults for everything but the listen address and data directory.
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: listen.into(),
            data_dir: data_dir.into(),
            store: StoreBackend::Sqlite,
            replica: crate::presence::default_replica_name(),
            server_url: None,
            tls: TlsSource::Generated,
            agent_image: DEFAULT_AGENT_IMAGE.to_owned(),
            node_agent_image: DEFAULT_NODE_AGENT_IMAGE.to_owned(),
            probe_interval: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(10),
            auth_limit: AuthLimitConfig::default(),
            metrics_listen: None,
            max_connections: tunnel_proto::driver::acceptor::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer:
                tunnel_proto::driver::acceptor::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            header_read_timeout: tunnel_proto::driver::acceptor::DEFAULT_HEADER_READ_TIMEOUT,
            peers: None,
            leader: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The data directory or a TLS file could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The PKI could not be created.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(#[from] tunnel_proto::driver::acceptor::ServerTlsError),
    /// The rate-limit settings are unusable.
    #[error("auth rate limit: {0}")]
    AuthLimit(#[from] AuthLimitConfigError),
    /// The peer listener could not be set up.
    #[error("peers: {0}")]
    Peers(#[from] crate::peers::PeerError),
    /// The server URL is not a URL.
    #[error("invalid --server-url {0:?}: expected http(s)://host[:port]")]
    ServerUrl(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Opens the store in a data directory, creating the directory (mode 0700) if needed.
pub fn open_store(data_dir: &std::path::Path) -> Result<SqliteStore, ServeError> {
    std::fs::create_dir_all(data_dir)
        .map_err(io_err(format!("creating {}", data_dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(SqliteStore::open(&data_dir.join(STORE_FILE))?)
}

/// A bound, ready server.
pub struct Server {
    app: SharedApp,
    listener: TcpListener,
    acceptor: Acceptor,
    local_addr: SocketAddr,
    metrics_listener: Option<TcpListener>,
    peer_listener: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    leader: Option<crate::leader::LeaderConfig>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, sets up TLS and binds the listener.
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        config.auth_limit.validate()?;
        let store: Arc<dyn Store> = match &config.store {
            StoreBackend::Sqlite => Arc::new(open_store(&config.data_dir)?),
            StoreBackend::Opened(store) => store.clone(),
        };
        let listener = tunnel_proto::driver::acceptor::bind_listener(&config.listen)
            .await
            .map_err(io_err(format!("binding {}", config.listen)))?;
        let local_addr = listener
            .local_addr()
            .map_err(io_err("reading the listen address"))?;
        let metrics_listener = match &config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(io_err(format!("binding the metrics address {addr}")))?,
            ),
            None => None,
        };
        let scheme = match config.tls {
            TlsSource::InsecureHttp => "http",
            _ => "https",
        };
        let server_url = match &config.server_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let mut addr = local_addr;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    tracing::warn!(
                        "no --server-url: manifests and kubeconfigs will point at {addr}"
                    );
                }
                format!("{scheme}://{addr}")
            }
        };
        let url_host = server_url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str().is_some())
            .and_then(|u| {
                u.host()
                    .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            })
            .ok_or_else(|| ServeError::ServerUrl(server_url.clone()))?;

        let (tls, cacerts) = match &config.tls {
            TlsSource::InsecureHttp => {
                tracing::warn!("serving plain HTTP (--insecure-http): for tests only");
                (None, String::new())
            }
            TlsSource::Generated => {
                let mut sans = vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                    url_host,
                ];
                if !local_addr.ip().is_unspecified() {
                    sans.push(local_addr.ip().to_string());
                }
                let pki = crate::pki::ensure(store.as_ref(), &sans)?;
                let chain = format!("{}{}", pki.cert_pem, pki.ca_cert_pem);
                let ca_file = config.data_dir.join("ca.pem");
                match (std::fs::write(&ca_file, &pki.ca_cert_pem), &config.store) {
                    (Ok(()), _) => {}
                    (Err(err), StoreBackend::Sqlite) => {
                        return Err(io_err(format!("writing {}", ca_file.display()))(err));
                    }
                    // Without a data directory (a replica on the Kubernetes store) the CA is
                    // still served at /cacerts.
                    (Err(err), StoreBackend::Opened(_)) => {
                        tracing::debug!(%err, "not writing {}", ca_file.display());
                    }
                }
                (
                    Some(tls_server_config(chain.as_bytes(), pki.key_pem.as_bytes())?),
                    crate::pki::cacerts_value(&pki.ca_cert_pem),
                )
            }
            TlsSource::Files { cert, key, cacerts } => {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(io_err(format!("reading {}", p.display())))
                };
                let cert_pem = read(cert)?;
                let key_pem = read(key)?;
                let cacerts = match cacerts {
                    Some(p) => crate::pki::cacerts_value(&String::from_utf8_lossy(&read(p)?)),
                    None => String::new(),
                };
                (Some(tls_server_config(&cert_pem, &key_pem)?), cacerts)
            }
        };
        store.set_setting("server-url", &server_url)?;
        store.set_setting("cacerts", &cacerts)?;

        let mut peer_listener = None;
        let mut peers = None;
        if let Some(peer_config) = &config.peers {
            let listener = TcpListener::bind(&peer_config.listen)
                .await
                .map_err(io_err(format!(
                    "binding the peer address {}",
                    peer_config.listen
                )))?;
            let bound = listener
                .local_addr()
                .map_err(io_err("reading the peer listen address"))?;
            let address = crate::peers::advertised_address(peer_config, bound)?;
            let host = address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or_default();
            let tls = crate::peers::PeerTls::issue(store.as_ref(), &config.replica, host)?;
            tracing::info!(%bound, %address, "peer listener (mutual TLS) for requests forwarded by other replicas");
            peers = Some(crate::peers::Peers::new(
                config.replica.clone(),
                address,
                &tls,
            ));
            peer_listener = Some((listener, tls.server));
        }

        let registry = Registry::default();
        let app = App::new(
            store,
            registry.clone(),
            AppConfig {
                server_url,
                cacerts,
                agent_image: config.agent_image.clone(),
                node_agent_image: config.node_agent_image.clone(),
                probe_interval: config.probe_interval,
                auth_limit: config.auth_limit.clone(),
                replica: config.replica.clone(),
            },
        );
        let app = Arc::new(match peers {
            Some(peers) => app.with_peers(peers),
            None => app,
        });

        let mut acceptor_config = AcceptorConfig::new(MOUNT_PATHS);
        acceptor_config
            .set_tls(tls)
            .set_shutdown_grace(config.shutdown_grace)
            .set_max_connections(config.max_connections)
            .set_max_connections_per_peer(config.max_connections_per_peer)
            .set_header_read_timeout(config.header_read_timeout)
            .set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)))
            // Our agents offer per-stream credit windows; serve_acceptor_tunnel applies what was
            // agreed. Go agents never offer it and keep the plain protocol.
            .set_capabilities(Capabilities::ALL);
        let auth_app = app.clone();
        let tunnel_app = app.clone();
        let route_app = app.clone();
        let acceptor = Acceptor::new(
            acceptor_config,
            move |req: AuthRequest| {
                let app = auth_app.clone();
                async move { crate::tunnel_auth::authorize(&app, &req).await }
            },
            move |tunnel| serve_tunnel(tunnel_app.clone(), tunnel),
            move |req| crate::routes::route(route_app.clone(), req),
        );
        Ok(Self {
            app,
            listener,
            acceptor,
            local_addr,
            metrics_listener,
            peer_listener,
            leader: config.leader.clone(),
        })
    }

    /// The bound peer listener address, if any.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound `--metrics-listen` address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The shared state.
    pub fn app(&self) -> &SharedApp {
        &self.app
    }

    /// Serves until `shutdown` fires, then drains (bounded by the shutdown grace).
    pub async fn run(self, shutdown: CancellationToken) {
        let background = shutdown.child_token();
        tokio::spawn(crate::probe::run(self.app.clone(), background.clone()));
        tokio::spawn(count_sessions(self.app.clone(), background.clone()));
        tokio::spawn(crate::live::run(self.app.clone(), background.clone()));
        let presence = tokio::spawn(crate::presence::run(self.app.clone(), background.clone()));
        let leader = self.leader.map(|config| {
            tokio::spawn(crate::leader::run(
                self.app.clone(),
                config,
                background.clone(),
            ))
        });
        if let Some(listener) = self.metrics_listener {
            tokio::spawn(crate::routes::serve_metrics(
                self.app.clone(),
                listener,
                background.clone(),
            ));
        }
        if let Some((listener, tls)) = self.peer_listener {
            tokio::spawn(crate::peers::serve(
                self.app.clone(),
                listener,
                tls,
                background.clone(),
            ));
        }
        let store = self.app.store.clone();
        let flusher = TokenUseFlusher::new(store.clone(), LAST_USE_FLUSH_INTERVAL);
        tokio::spawn(flusher.run(background.clone()));
        self.acceptor.serve(self.listener, shutdown).await;
        background.cancel();
        // Tunnels still held are marked disconnected (bounded).
        let _ = presence.await;
        // The Lease given up, for another replica to take over at once.
        if let Some(leader) = leader {
            let _ = leader.await;
        }
        // The API-token uses noted since the last flush.
        if let Err(err) = store.flush_token_uses().await {
            tracing::warn!(error = %err, "cannot record the last API token uses at shutdown");
        }
    }
}

/// Runs an accepted tunnel: stores what its params say ([`crate::tunnel_auth::record_params`]),
/// ties it to the registration token that let it in ([`crate::live`]: it closes when the
/// token or its cluster is deleted), and serves it as a registered session until it ends.
async fn serve_tunnel(app: SharedApp, mut tunnel: AcceptedTunnel) {
    let key = tunnel.client_key.clone();
    let Some((token, cluster_id)) = crate::tunnel_auth::authority_of(&key, &tunnel.headers) else {
        tracing::warn!(%key, remote = %tunnel.remote_addr, "tunnel without a credential: dropped");
        return;
    };
    if let Err(err) =
        crate::tunnel_auth::record_params(&app, &key, &tunnel.uri, &tunnel.headers).await
    {
        tracing::warn!(%key, remote = %tunnel.remote_addr, error = %err, "tunnel params not stored: dropped");
        return;
    }
    let (cut, _live) = app.live.tunnel(&key, &token, &cluster_id, &tunnel.shutdown);
    // The token may have been deleted between the authorization and this registration, when
    // no reconcile could see this session yet.
    match app.store.cluster_for_registration_token(&token).await {
        Ok(Some(owner)) if owner == cluster_id => {}
        _ => cut.cancel(),
    }
    tunnel.shutdown = cut;
    let config = SessionConfig::new(Role::Server);
    let _ = serve_acceptor_tunnel(&app.registry, tunnel, config, refuse_all()).await;
}

async fn count_sessions(app: SharedApp, shutdown: CancellationToken) {
    let mut events = app.registry.subscribe();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(RegistryEvent::Added { key, .. }) => {
                tracing::debug!(%key, "tunnel session registered");
                app.metrics.session_added();
            }
            Ok(RegistryEvent::Removed { key, reason, .. }) => {
                tracing::debug!(%key, %reason, "tunnel session removed");
                app.metrics.session_removed();
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
