//! Server acceptor: one HTTP(S) port that upgrades tunnel websockets at the application's mount
//! paths and hands every other request to the application's router.
//!
//! remotedialer's server is an `http.Handler` the application mounts where it likes (wire spec
//! §1.1); this is the same shape for hyper 1.x. On a mount path the request goes, in this order
//! (spec §1.2, which Go agents and operators' scripts observe):
//!
//! 1. the [`Authorizer`]: [`Reject::Unauthorized`] → 401 `failed authentication`,
//!    [`Reject::BadRequest`] → 400 with its message, [`Reject::TooManyRequests`] → 429 with
//!    `Retry-After` (ours; remotedialer has no limit). These come **before** any websocket
//!    check, so a plain `curl` of the mount path gets the authorizer's answer;
//! 2. gorilla's websocket checks, in gorilla's order and with its statuses: 400 without
//!    `Connection: upgrade`, 426 without `Upgrade: websocket`, 405 for a method other than GET,
//!    400 for a `Sec-WebSocket-Version` other than 13 or a malformed `Sec-WebSocket-Key`;
//! 3. 101, then the upgraded websocket goes to the application's tunnel callback as an
//!    [`AcceptedTunnel`], in its own task.
//!
//! HTTP/1.1 only: a websocket upgrade needs it (RFC 8441's HTTP/2 websockets are not what agents
//! speak), and ALPN advertises only `http/1.1` on TLS.
//!
//! Shutdown: when the token passed to [`Acceptor::serve`] fires, the listener is dropped, every
//! HTTP connection is told to finish its current request and close, tunnel callbacks see the
//! same token in [`AcceptedTunnel::shutdown`], and `serve` returns once all of that is done, or
//! after the grace period, when whatever is left is dropped. Dropping the `serve` future itself
//! (aborting its task) drops every connection and tunnel callback at once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::capability::{self, Capabilities};
use super::connector::BoxedIo;

/// Error type of [`ResponseBody`]: anything, so a router can stream a proxied upstream body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the acceptor writes, the router's included.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// A websocket upgraded by the acceptor.
pub type ServerWebSocket = WebSocketStream<TokioIo<Upgraded>>;

/// Default for [`AcceptorConfig::set_handshake_timeout`]: 5 s, remotedialer's upgrader
/// handshake timeout.
pub const DEFAULT_SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default for [`AcceptorConfig::set_shutdown_grace`]: 30 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default [`AcceptorConfig::set_max_connections`]: room for tens of thousands of agents.
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// Default [`AcceptorConfig::set_max_connections_per_peer`]: one address may be a NAT gateway
/// with a few thousand agents behind it, but not the whole listener.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 5_000;
/// Default [`AcceptorConfig::set_header_read_timeout`] (hyper's own default).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// === authorization ===

/// The routing key of a tunnel session, returned by the [`Authorizer`].
///
/// Opaque to the acceptor. The session registry and remotedialer peering put constraints on it
/// (no `/`, no `::`, at most 80 bytes; wire spec §1.2) that the registry enforces, not this
/// type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(String);

impl ClientKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for ClientKey {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for ClientKey {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// What the [`Authorizer`] sees of a request to a mount path (owned, so an async authorizer can
/// keep it across a database lookup).
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The request method (not yet checked to be GET; see the module docs for the order).
    pub method: Method,
    /// The request URI (path and query).
    pub uri: Uri,
    /// All request headers (`X-API-Tunnel-Token`, `X-API-Tunnel-Params`, `Authorization`, …).
    pub headers: HeaderMap,
    /// The TCP peer.
    pub remote_addr: SocketAddr,
}

/// Why the [`Authorizer`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// 401 with the body `failed authentication` (remotedialer's `!authed`).
    Unauthorized,
    /// 400 with this text as the body (remotedialer's `err != nil`, e.g. `cluster not found`).
    BadRequest(String),
    /// 429 with a `Retry-After` header (whole seconds, rounded up) and this text as the body: the
    /// caller is refused before its credentials are looked at (a failed-authentication rate
    /// limit). Go agents treat it like any other non-101 answer: logged, retried later.
    TooManyRequests {
        /// When the caller may try again.
        retry_after: Duration,
        /// The body.
        message: String,
    },
}

/// The listen backlog [`bind_listener`] asks for when `/proc/sys/net/core/somaxconn` cannot be
/// read (the kernel caps it at that value anyway).
pub const FALLBACK_LISTEN_BACKLOG: u32 = 4096;

/// The kernel's largest listen backlog (`net.core.somaxconn`).
pub fn max_listen_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(FALLBACK_LISTEN_BACKLOG)
}

/// Binds a TCP listener with the kernel's largest backlog, where `TcpListener::bind` asks for
/// 1024: a reconnect storm of agents, or a burst of Connects to a local service, can complete
/// more handshakes than the accept loop takes in a scheduling turn. Past the backlog Linux
/// answers with SYN cookies and drops the final ACK while the accept queue is full; the
/// client believes it is connected, writes, and may then get a reset (seen as `Connection
/// reset by peer` on streams of a 1,000-stream burst on a loaded 2-core machine). Go's
/// `net.Listen` likewise asks for `somaxconn`.
pub async fn bind_listener(addr: &str) -> std::io::Result<TcpListener> {
    let mut last_err = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(max_listen_backlog()),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// The TCP peer of a request, in the extensions of every request handed to the router (the
/// application's rate limits and audit lines need it; hyper's `Request` has no peer address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Decides whether a request to a mount path may open a tunnel, and under which key.
///
/// Implemented for any `Fn(AuthRequest) -> impl Future<Output = Result<ClientKey, Reject>>`, so a
/// closure works; implement it on a struct to hold a database handle.
pub trait Authorizer: Send + Sync + 'static {
    /// Authorizes one request; runs before any websocket check.
    fn authorize(
        &self,
        request: AuthRequest,
    ) -> impl Future<Output = Result<ClientKey, Reject>> + Send;
}

impl<F, Fut> Authorizer for F
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<ClientKey, Reject>> + Send,
{
    fn authorize(
        &self,
        request: AuthRequest,
    ) -> impl Future<Output = Result<ClientKey, Reject>> + Send {
        self(request)
    }
}

/// Object-safe face of [`Authorizer`], so [`Acceptor`] is not generic.
trait DynAuthorizer: Send + Sync {
    fn authorize_boxed(&self, request: AuthRequest) -> BoxFuture<'_, Result<ClientKey, Reject>>;
}

impl<A: Authorizer> DynAuthorizer for A {
    fn authorize_boxed(&self, request: AuthRequest) -> BoxFuture<'_, Result<ClientKey, Reject>> {
        Box::pin(self.authorize(request))
    }
}

/// A websocket that passed authorization and the upgrade, handed to the application.
#[derive(Debug)]
pub struct AcceptedTunnel {
    /// What the [`Authorizer`] returned.
    pub client_key: ClientKey,
    /// The upgrade request's headers (the agent's params, a peer's `X-API-Tunnel-ID`, any
    /// capability header).
    pub headers: HeaderMap,
    /// The upgrade request's URI (which mount path, query).
    pub uri: Uri,
    /// The TCP peer.
    pub remote_addr: SocketAddr,
    /// The websocket, server role, configured with the acceptor's [`WebSocketConfig`].
    pub ws: ServerWebSocket,
    /// Fires when the acceptor shuts down; the tunnel callback should end its session then.
    pub shutdown: CancellationToken,
    /// The extensions agreed in the upgrade (offered by the connector, and allowed by
    /// [`AcceptorConfig::set_capabilities`]). The session must run with them
    /// ([`Capabilities::apply`]): the peer does.
    pub capabilities: Capabilities,
}

// === config ===

/// Acceptor settings. Build with [`AcceptorConfig::new`] and the setters.
#[derive(Debug, Clone)]
pub struct AcceptorConfig {
    mount_paths: Vec<String>,
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    websocket: WebSocketConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    max_connections_per_peer: usize,
    header_read_timeout: Duration,
    capabilities: Capabilities,
}

impl AcceptorConfig {
    /// Upgrades tunnels at each of `mount_paths` (exact path match, query ignored; e.g.
    /// `/v3/connect` and `/v3/connect/register`). Plain HTTP, 5 s handshake timeout,
    /// tungstenite's default websocket limits, 30 s shutdown grace.
    pub fn new<I, S>(mount_paths: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            mount_paths: mount_paths.into_iter().map(Into::into).collect(),
            handshake_timeout: DEFAULT_SERVER_HANDSHAKE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            websocket: WebSocketConfig::default(),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            capabilities: Capabilities::NONE,
        }
    }

    /// Extensions this acceptor agrees to when a connector offers them (answered in the 101
    /// response, and handed to the tunnel callback in [`AcceptedTunnel::capabilities`]).
    /// Default [`Capabilities::NONE`]: only a callback that applies them should turn them on.
    pub fn set_capabilities(&mut self, capabilities: Capabilities) -> &mut Self {
        self.capabilities = capabilities;
        self
    }

    /// Most connections (HTTP requests and tunnels alike) open at once on a listener; one more
    /// is closed as soon as it is accepted, before any TLS work. Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub fn set_max_connections(&mut self, max: usize) -> &mut Self {
        self.max_connections = max;
        self
    }

    /// Most connections open at once from one peer address (IPv6: its /64); one more is closed
    /// as soon as it is accepted. Default [`DEFAULT_MAX_CONNECTIONS_PER_PEER`].
    pub fn set_max_connections_per_peer(&mut self, max: usize) -> &mut Self {
        self.max_connections_per_peer = max;
        self
    }

    /// How long a client may take to send a request's headers (from the first byte it is
    /// waited for): a client that trickles them (slowloris) is cut then. Default
    /// [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub fn set_header_read_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Bound on the TLS handshake and, separately, on completing an accepted upgrade (writing the
    /// 101 and taking over the socket). Default 5 s. Request headers have their own bound,
    /// [`AcceptorConfig::set_header_read_timeout`].
    pub fn set_handshake_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long [`Acceptor::serve`] waits, after shutdown fires, for requests and tunnel
    /// callbacks to finish before dropping them. Default 30 s.
    pub fn set_shutdown_grace(&mut self, grace: Duration) -> &mut Self {
        self.shutdown_grace = grace;
        self
    }

    /// Buffer and size limits of accepted websockets; `None` restores tungstenite's defaults.
    pub fn set_websocket_config(&mut self, config: Option<WebSocketConfig>) -> &mut Self {
        self.websocket = config.unwrap_or_default();
        self
    }

    /// Serve HTTPS with this configuration (see [`tls_server_config`]); `None` for plain HTTP.
    /// Default: plain HTTP.
    pub fn set_tls(&mut self, tls: Option<Arc<rustls::ServerConfig>>) -> &mut Self {
        self.tls = tls;
        self
    }
}

/// Why [`tls_server_config`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTlsError {
    /// The certificate PEM holds no usable certificate.
    #[error("invalid certificate chain PEM: {0}")]
    InvalidCertificate(String),
    /// The key PEM holds no usable private key.
    #[error("invalid private key PEM: {0}")]
    InvalidKey(String),
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("TLS server configuration: {0}")]
    Rustls(String),
}

/// Builds a rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN `http/1.1`, no
/// client certificates) from a PEM certificate chain, leaf first, and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1).
pub fn tls_server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerTlsError::InvalidCertificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(ServerTlsError::InvalidCertificate(
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServerTlsError::InvalidKey(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerTlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServerTlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// === responses ===

/// A body holding `bytes`, boxed as [`ResponseBody`].
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A `text/plain` response, the way Go's `DefaultErrorWriter` writes errors.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

// === impl Acceptor ===

type TunnelFn = dyn Fn(AcceptedTunnel) -> BoxFuture<'static, ()> + Send + Sync;
type RouterFn =
    dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<ResponseBody>> + Send + Sync;

struct Inner {
    config: AcceptorConfig,
    authorizer: Box<dyn DynAuthorizer>,
    on_tunnel: Box<TunnelFn>,
    router: Box<RouterFn>,
    open: std::sync::Mutex<OpenConnections>,
}

/// Connections open now, in all and per peer (for the connection limits).
#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    per_peer: std::collections::HashMap<std::net::IpAddr, usize>,
    /// Refused since the last warning, and when that was (one warning per 10 s).
    refused: u64,
    warned: Option<tokio::time::Instant>,
}

/// The peer an address counts as for [`AcceptorConfig::set_max_connections_per_peer`]: IPv4
/// as is, IPv4-mapped IPv6 as IPv4, other IPv6 by its /64 (one host usually holds a whole /64).
fn peer_of(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
        },
        v4 => v4,
    }
}

/// A connection's place under the connection limits, in the extensions of every request the
/// router gets. A router that upgrades the connection and keeps serving it after the response
/// (a proxied `exec`) should hold it until the upgraded connection ends, so that it still
/// counts.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<Admitted>);

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConnectionSlot").field(&self.0.peer).finish()
    }
}

/// One admitted connection; frees its place when dropped.
struct Admitted {
    inner: Arc<Inner>,
    peer: std::net::IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) = open.per_peer.entry(self.peer) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl Inner {
    /// Takes a place for a connection from `remote`, or says why there is none.
    fn admit(self: &Arc<Self>, remote: SocketAddr) -> Result<Admitted, &'static str> {
        let peer = peer_of(remote.ip());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_peer = open.per_peer.get(&peer).copied().unwrap_or(0);
        let refusal = if open.total >= self.config.max_connections {
            Some("the listener's connection limit")
        } else if from_peer >= self.config.max_connections_per_peer {
            Some("the per-address connection limit")
        } else {
            None
        };
        if let Some(why) = refusal {
            open.refused += 1;
            let now = tokio::time::Instant::now();
            if open
                .warned
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                tracing::warn!(%remote, refused = open.refused, total = open.total, from_peer, "connection refused: {why} (logged at most every 10 s)");
                open.refused = 0;
                open.warned = Some(now);
            }
            return Err(why);
        }
        open.total += 1;
        *open.per_peer.entry(peer).or_default() += 1;
        Ok(Admitted {
            inner: self.clone(),
            peer,
        })
    }
}

/// The tunnel server's HTTP front: authorizer, websocket upgrade, and the application's router
/// on one port. Cheap to clone; serve any number of listeners with it.
#[derive(Clone)]
pub struct Acceptor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("mount_paths", &self.inner.config.mount_paths)
            .field("tls", &self.inner.config.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Assembles an acceptor.
    ///
    /// * `authorizer` runs on every request to a mount path;
    /// * `on_tunnel` gets each accepted websocket, in a task of its own, and should run the
    ///   session until it ends (or until [`AcceptedTunnel::shutdown`] fires);
    /// * `router` answers every request that is not on a mount path.
    pub fn new<A, T, TFut, R, RFut>(
        config: AcceptorConfig,
        authorizer: A,
        on_tunnel: T,
        router: R,
    ) -> Self
    where
        A: Authorizer,
        T: Fn(AcceptedTunnel) -> TFut + Send + Sync + 'static,
        TFut: Future<Output = ()> + Send + 'static,
        R: Fn(Request<Incoming>) -> RFut + Send + Sync + 'static,
        RFut: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        Self {
            inner: Arc::new(Inner {
                config,
                authorizer: Box::new(authorizer),
                on_tunnel: Box::new(move |t| Box::pin(on_tunnel(t))),
                router: Box::new(move |r| Box::pin(router(r))),
                open: std::sync::Mutex::default(),
            }),
        }
    }

    /// Accepts connections on `listener` until `shutdown` fires, then shuts down gracefully
    /// (module docs). Returns once every connection and tunnel callback has finished or the
    /// grace period has run out. Dropping this future drops every connection and tunnel
    /// callback it started.
    ///
    /// Accept errors (such as running out of file descriptors) are logged and retried after a
    /// short pause rather than ending the server.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        // Fired after the grace period, or when this future is dropped (the server is "killed"):
        // drops every connection and tunnel callback still running.
        let hard_stop = CancellationToken::new();
        let _kill_on_drop = hard_stop.clone().drop_guard();
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, remote)) => {
                    // Over a limit: closed at once, before any TLS or HTTP work.
                    let Ok(admitted) = self.inner.admit(remote) else {
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let conn = Conn {
                        admitted: Arc::new(admitted),
                        inner: self.inner.clone(),
                        remote,
                        shutdown: shutdown.clone(),
                        hard_stop: hard_stop.clone(),
                        tracker: tracker.clone(),
                    };
                    tracker.spawn(conn.serve(tcp));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(listener);
        tracker.close();
        let grace = self.inner.config.shutdown_grace;
        tracing::info!(
            connections = tracker.len(),
            ?grace,
            "acceptor shutting down; draining"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = tracker.len(),
                "shutdown grace period over; dropping remaining connections"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
    }
}

/// One accepted TCP connection.
struct Conn {
    /// Its place under the connection limits, held for as long as it is served, and after an
    /// upgrade by the tunnel task or (through [`ConnectionSlot`]) the router's upgrade.
    admitted: Arc<Admitted>,
    inner: Arc<Inner>,
    remote: SocketAddr,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

impl Conn {
    async fn serve(self, tcp: TcpStream) {
        let timeout = self.inner.config.handshake_timeout;
        let io: BoxedIo = match &self.inner.config.tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(error)) => {
                        tracing::debug!(remote = %self.remote, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(remote = %self.remote, "TLS handshake timed out");
                        return;
                    }
                }
            }
            None => Box::new(tcp),
        };
        let shutdown = self.shutdown.clone();
        let hard_stop = self.hard_stop.clone();
        let remote = self.remote;
        let header_read_timeout = self.inner.config.header_read_timeout;
        let this = Arc::new(self);
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = hard_stop.cancelled() => Ok(()),
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = hard_stop.cancelled() => Ok(()),
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%remote, %error, "HTTP connection ended with an error");
        }
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<ResponseBody> {
        req.extensions_mut().insert(PeerAddr(self.remote));
        req.extensions_mut()
            .insert(ConnectionSlot(self.admitted.clone()));
        let on_mount = self
            .inner
            .config
            .mount_paths
            .iter()
            .any(|p| p == req.uri().path());
        if on_mount {
            self.upgrade(req).await
        } else {
            (self.inner.router)(req).await
        }
    }

    async fn upgrade(&self, mut req: Request<Incoming>) -> Response<ResponseBody> {
        let auth = AuthRequest {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            remote_addr: self.remote,
        };
        let client_key = match self.inner.authorizer.authorize_boxed(auth).await {
            Ok(key) => key,
            Err(Reject::Unauthorized) => {
                tracing::debug!(remote = %self.remote, uri = %req.uri(), "tunnel request unauthorized");
                return text_response(StatusCode::UNAUTHORIZED, "failed authentication");
            }
            Err(Reject::BadRequest(msg)) => {
                tracing::debug!(remote = %self.remote, uri = %req.uri(), %msg, "tunnel request rejected");
                return text_response(StatusCode::BAD_REQUEST, msg);
            }
            Err(Reject::TooManyRequests {
                retry_after,
                message,
            }) => {
                tracing::debug!(remote = %self.remote, uri = %req.uri(), ?retry_after, "tunnel request rate-limited");
                let mut resp = text_response(StatusCode::TOO_MANY_REQUESTS, message);
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                resp.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from(secs.max(1)),
                );
                return resp;
            }
        };
        let accept_key = match check_websocket_request(&req) {
            Ok(k) => k,
            Err(reject) => {
                tracing::debug!(remote = %self.remote, %client_key, status = %reject.status, "not a websocket request");
                return reject.into_response();
            }
        };

        let headers = req.headers().clone();
        let capabilities = Capabilities::answer(&headers, self.inner.config.capabilities);
        let uri = req.uri().clone();
        let on_upgrade = hyper::upgrade::on(&mut req);
        let inner = self.inner.clone();
        let remote = self.remote;
        let shutdown = self.shutdown.clone();
        let hard_stop = self.hard_stop.clone();
        let timeout = inner.config.handshake_timeout;
        let slot = self.admitted.clone();
        self.tracker.spawn(async move {
            let _slot = slot;
            let upgraded = match tokio::time::timeout(timeout, on_upgrade).await {
                Ok(Ok(u)) => u,
                Ok(Err(error)) => {
                    tracing::warn!(%remote, %client_key, %error, "websocket upgrade failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, %client_key, "websocket upgrade timed out");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(inner.config.websocket),
            )
            .await;
            tracing::info!(%remote, %client_key, "tunnel accepted");
            let tunnel = AcceptedTunnel {
                client_key,
                headers,
                uri,
                remote_addr: remote,
                ws,
                shutdown,
                capabilities,
            };
            tokio::select! {
                () = (inner.on_tunnel)(tunnel) => {}
                () = hard_stop.cancelled() => {}
            }
        });

        let mut resp = Response::new(full_body(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept_key) {
            h.insert(SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(v) = capabilities.header_value() {
            h.insert(capability::HEADER, v);
        }
        resp
    }
}

/// A failed websocket check: status, gorilla's text, and the header gorilla adds to some.
#[derive(Debug)]
struct WsReject {
    status: StatusCode,
    text: String,
    header: Option<(http::HeaderName, &'static str)>,
}

impl WsReject {
    fn new(status: StatusCode, text: impl Into<String>) -> Self {
        Self {
            status,
            text: text.into(),
            header: None,
        }
    }

    fn into_response(self) -> Response<ResponseBody> {
        let mut resp = text_response(self.status, self.text);
        if let Some((name, value)) = self.header {
            resp.headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        resp
    }
}

/// gorilla's `Upgrader.Upgrade` checks, in its order, with its statuses and texts. Returns the
/// `Sec-WebSocket-Accept` value.
fn check_websocket_request<B>(req: &Request<B>) -> Result<String, WsReject> {
    const BAD_HANDSHAKE: &str = "websocket: the client is not using the websocket protocol: ";
    let headers = req.headers();
    if !header_has_token(headers, &CONNECTION, "upgrade") {
        return Err(WsReject::new(
            StatusCode::BAD_REQUEST,
            format!("{BAD_HANDSHAKE}'upgrade' token not found in 'Connection' header"),
        ));
    }
    if !header_has_token(headers, &UPGRADE, "websocket") {
        return Err(WsReject {
            header: Some((UPGRADE, "websocket")),
            ..WsReject::new(
                StatusCode::UPGRADE_REQUIRED,
                format!("{BAD_HANDSHAKE}'websocket' token not found in 'Upgrade' header"),
            )
        });
    }
    if req.method() != Method::GET {
        return Err(WsReject::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{BAD_HANDSHAKE}request method is not GET"),
        ));
    }
    if !header_has_token(headers, &SEC_WEBSOCKET_VERSION, "13") {
        return Err(WsReject {
            header: Some((SEC_WEBSOCKET_VERSION, "13")),
            ..WsReject::new(
                StatusCode::BAD_REQUEST,
                "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
            )
        });
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let valid = data_encoding::BASE64
        .decode(key)
        .is_ok_and(|raw| raw.len() == 16);
    if !valid {
        return Err(WsReject::new(
            StatusCode::BAD_REQUEST,
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 \
             encoded value of 16-byte in length",
        ));
    }
    Ok(derive_accept_key(key))
}

/// gorilla's `tokenListContainsValue`: a comma-separated token, case-insensitive, in any of the
/// header's values.
fn header_has_token(headers: &HeaderMap, name: &http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/connect");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn status_of(r: Result<String, WsReject>) -> Option<u16> {
        r.err()
            .map(|reject| reject.into_response().status().as_u16())
    }

    #[test]
    fn websocket_checks_in_gorilla_order() {
        // RFC 6455's example key and accept.
        assert_eq!(
            check_websocket_request(&req(Method::GET, &GOOD))
                .ok()
                .as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(
            status_of(check_websocket_request(&req(Method::GET, &GOOD[1..]))),
            Some(400)
        );
        assert_eq!(
            status_of(check_websocket_request(&req(Method::GET, &[GOOD[0]]))),
            Some(426)
        );
        assert_eq!(
            status_of(check_websocket_request(&req(Method::POST, &GOOD))),
            Some(405)
        );
        assert_eq!(
            status_of(check_websocket_request(&req(
                Method::GET,
                &[GOOD[0], GOOD[1], ("sec-websocket-version", "8"), GOOD[3]]
            ))),
            Some(400)
        );
        assert_eq!(
            status_of(check_websocket_request(&req(
                Method::GET,
                &[GOOD[0], GOOD[1], GOOD[2], ("sec-websocket-key", "c2hvcnQ=")]
            ))),
            Some(400)
        );
    }
}
