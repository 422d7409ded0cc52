//! Client connector: dial the server's websocket (TLS, CA pin, proxy), and keep redialing.
//!
//! The session driver runs a tunnel over any connected websocket; this module is how an agent
//! gets one, and gets another when it drops. It is separate from the driver because everything
//! here is about reaching the server (trust, proxies, timeouts, pacing), none of it about the
//! protocol.
//!
//! ```text
//!   ConnectorConfig ──Connector::new──▶ Connector (TLS config built, CA pin checked once)
//!                                          │ connect(): TCP ─▶ [proxy CONNECT] ─▶ [TLS] ─▶ GET+Upgrade
//!                                          ▼              (all within handshake_timeout)
//!   run_forever(connector, cancel, |ws| session) : connect ─▶ session ─▶ backoff ─▶ connect …
//! ```
//!
//! * Trust: [`Trust`] (system roots, a PEM bundle, Rancher's `CATTLE_CA_CHECKSUM` pin, a pin of
//!   the presented CA, or an explicit insecure mode).
//! * Proxy: [`ProxyConfig`], from the environment the way Go reads it.
//! * Reused by applications for their other requests to the server: [`client_config`] builds
//!   the rustls configuration of a [`Trust`], [`dial_tcp`] opens a TCP connection through the
//!   proxy the rules pick ([`connect_tunnel`] is its `CONNECT` step alone).
//! * A failed upgrade is [`ConnectError::Handshake`] with the HTTP status and up to
//!   `max_error_body` bytes of the body, because that text (`failed authentication`,
//!   `cluster not found`) is what an operator needs.
//! * Reconnection: [`run_forever`] with [`BackoffConfig`], counted in [`ConnectorStats`].
//! * Extensions between two ends of this project ([`super::capability`]): offered only by
//!   [`Connector::connect_agreed`] and [`run_forever_agreed`], which hand the agreed set to the
//!   caller to run the session with; [`Connector::connect`] and [`run_forever`] never offer any.
//! * Headers that change while the loop runs (the cluster agent's params when its reported
//!   token changes): [`SharedHeaders`], read afresh on every attempt.

mod backoff;
mod http1;
mod proxy;
mod tls;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Uri};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

pub use self::backoff::BackoffConfig;
pub use self::proxy::{
    ENV_HTTP_PROXY, ENV_HTTPS_PROXY, ENV_NO_PROXY, ENV_REQUEST_METHOD, EnvSource, NoProxy,
    ProcessEnv, ProxyConfig, ProxyConfigError, ProxyUrl, connect_tunnel,
};
pub use self::tls::{TlsConfigError, Trust, ca_checksum, client_config};
use super::capability::{self, Capabilities};

/// Any byte stream a websocket can run on: plain TCP, TLS, a proxy tunnel, or a test pipe.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}

impl<T: AsyncRead + AsyncWrite + ?Sized> AsyncReadWrite for T {}

/// The type-erased transport under a connected websocket.
pub type BoxedIo = Box<dyn AsyncReadWrite + Send + Unpin>;

impl std::fmt::Debug for dyn AsyncReadWrite + Send + Unpin {
    // So `WebSocketStream<BoxedIo>` is `Debug`, as `Result::unwrap` and friends need.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxedIo")
    }
}

/// Default for [`ConnectorConfig::set_handshake_timeout`]: 10 s, remotedialer's
/// `HandshakeTimeOut`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ConnectorConfig::set_max_error_body`]: 64 KiB.
pub const DEFAULT_MAX_ERROR_BODY: usize = 64 * 1024;

/// Request headers the connector writes itself; a caller supplying one is a config error, as in
/// gorilla (`duplicate header not allowed`).
/// The capability header is the connector's too: an offer the caller did not see answered
/// would leave the two ends running different protocols.
const RESERVED_HEADERS: [&str; 6] = [
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "x-tunnel-capabilities",
];

// === impl ConnectorConfig ===

/// Where and how to dial. Build with [`ConnectorConfig::new`] and the setters, then
/// [`Connector::new`].
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    url: String,
    headers: HeaderMap,
    trust: Trust,
    proxy: ProxyConfig,
    handshake_timeout: Duration,
    max_error_body: usize,
    websocket: WebSocketConfig,
    backoff: BackoffConfig,
    shared_headers: Option<SharedHeaders>,
    capabilities: Capabilities,
}

impl ConnectorConfig {
    /// A config for `url` (`ws://` or `wss://`), with system-root trust, no proxy, no extra
    /// headers, and the defaults of each setter.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            headers: HeaderMap::new(),
            trust: Trust::default(),
            proxy: ProxyConfig::none(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_error_body: DEFAULT_MAX_ERROR_BODY,
            websocket: WebSocketConfig::default(),
            backoff: BackoffConfig::default(),
            shared_headers: None,
            capabilities: Capabilities::ALL,
        }
    }

    /// The extensions [`Connector::connect_agreed`] and [`run_forever_agreed`] offer. Default
    /// [`Capabilities::ALL`]; a server that does not answer (any Go server) gets none of them.
    pub fn set_capabilities(&mut self, capabilities: Capabilities) -> &mut Self {
        self.capabilities = capabilities;
        self
    }

    /// Extra request headers sent with the upgrade (the agents' `X-API-Tunnel-Token` and
    /// `X-API-Tunnel-Params`). A `Host` header here replaces the one derived from the URL.
    /// Default: none.
    pub fn set_headers(&mut self, headers: HeaderMap) -> &mut Self {
        self.headers = headers;
        self
    }

    /// Headers read afresh on every attempt, sent after (and replacing same-named) ones of
    /// [`set_headers`](Self::set_headers). Default: none.
    pub fn set_shared_headers(&mut self, headers: SharedHeaders) -> &mut Self {
        self.shared_headers = Some(headers);
        self
    }

    /// Which server certificates to believe for `wss://`. Default [`Trust::SystemRoots`].
    pub fn set_trust(&mut self, trust: Trust) -> &mut Self {
        self.trust = trust;
        self
    }

    /// Which proxy to go through. Default: none; pass
    /// `ProxyConfig::from_env(&ProcessEnv)?` for Go-compatible behaviour.
    pub fn set_proxy(&mut self, proxy: ProxyConfig) -> &mut Self {
        self.proxy = proxy;
        self
    }

    /// Bound on one whole attempt: TCP connect, proxy `CONNECT`, TLS and the upgrade exchange
    /// (like gorilla's `HandshakeTimeout`, which covers the dial too). Default 10 s.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How much of a failed response's body is kept for [`ConnectError::Handshake`] and
    /// [`ConnectError::ProxyRefused`]. Default 64 KiB.
    pub fn set_max_error_body(&mut self, bytes: usize) -> &mut Self {
        self.max_error_body = bytes;
        self
    }

    /// The websocket's buffer and size limits; `None` restores tungstenite's defaults (16 MiB
    /// frames, 64 MiB messages), which fit Go servers that write large single frames (wire spec
    /// §1.5).
    pub fn set_websocket_config(&mut self, config: Option<WebSocketConfig>) -> &mut Self {
        self.websocket = config.unwrap_or_default();
        self
    }

    /// Reconnect pacing for [`run_forever`]. Default: [`BackoffConfig::default`].
    pub fn set_backoff(&mut self, backoff: BackoffConfig) -> &mut Self {
        self.backoff = backoff;
        self
    }

    /// See [`set_backoff`](Self::set_backoff).
    pub fn backoff(&self) -> &BackoffConfig {
        &self.backoff
    }
}

fn check_headers(headers: &HeaderMap) -> Result<(), ConfigError> {
    for name in headers.keys() {
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(ConfigError::ReservedHeader(name.as_str().to_owned()));
        }
    }
    Ok(())
}

// === impl SharedHeaders ===

/// Upgrade headers that can be replaced while [`run_forever`] keeps dialing: each attempt
/// sends the latest set. Clones share one set.
///
/// [`replace`](Self::replace) bumps a generation; each attempt records the generation it
/// sent, so a session can tell whether it was dialed with the latest headers
/// ([`is_stale`](Self::is_stale)) when a replace raced with its dial.
#[derive(Clone, Default)]
pub struct SharedHeaders(Arc<SharedHeadersInner>);

#[derive(Default)]
struct SharedHeadersInner {
    headers: std::sync::Mutex<(u64, HeaderMap)>,
    sent: AtomicU64,
}

impl std::fmt::Debug for SharedHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be credentials: names only.
        let guard = self.lock();
        f.debug_struct("SharedHeaders")
            .field("generation", &guard.0)
            .field("names", &guard.1.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SharedHeaders {
    /// A set holding `headers` (generation 0).
    pub fn new(headers: HeaderMap) -> Self {
        let shared = Self::default();
        shared.lock().1 = headers;
        shared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HeaderMap)> {
        self.0.headers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current headers.
    pub fn get(&self) -> HeaderMap {
        self.lock().1.clone()
    }

    /// Replaces the set for the next attempts (a connected session keeps what it was dialed
    /// with). Refuses headers the websocket handshake owns, leaving the set as it was.
    pub fn replace(&self, headers: HeaderMap) -> Result<(), ConfigError> {
        check_headers(&headers)?;
        let mut guard = self.lock();
        guard.0 += 1;
        guard.1 = headers;
        Ok(())
    }

    /// Bumped by each [`replace`](Self::replace).
    pub fn generation(&self) -> u64 {
        self.lock().0
    }

    /// Whether the last attempt sent an older set than the current one.
    pub fn is_stale(&self) -> bool {
        self.0.sent.load(Ordering::SeqCst) != self.generation()
    }

    fn take_for_attempt(&self) -> HeaderMap {
        let guard = self.lock();
        self.0.sent.store(guard.0, Ordering::SeqCst);
        guard.1.clone()
    }
}

/// Why a [`ConnectorConfig`] cannot be used. These never get better by retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL is not `ws://host[:port]/…` or `wss://…`.
    #[error("invalid tunnel URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller set a header the websocket handshake owns.
    #[error("header {0:?} is set by the websocket handshake and may not be supplied")]
    ReservedHeader(String),
    /// The trust settings are unusable, including a CA checksum mismatch.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect to the server failed, including name resolution (a proxy that cannot be
    /// reached is [`ConnectError::ProxyIo`]).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// `host:port` dialed.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The proxy answered `CONNECT` with a non-200 status. 407 means credentials are missing or
    /// wrong; some proxies (tinyproxy) answer wrong credentials with 401 instead.
    #[error("proxy {proxy} refused CONNECT with HTTP {status}{}: {body}", proxy_hint(*status))]
    ProxyRefused {
        /// The proxy, without credentials.
        proxy: String,
        /// Its HTTP status.
        status: u16,
        /// Its response body, bounded.
        body: String,
    },
    /// The proxy could not be reached, or the conversation with it broke off.
    #[error("talking to proxy {proxy}: {source}")]
    ProxyIo {
        /// The proxy, without credentials.
        proxy: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The proxy said something that is not a usable `CONNECT` answer.
    #[error("proxy {proxy}: {reason}")]
    ProxyProtocol {
        /// The proxy, without credentials.
        proxy: String,
        /// What went wrong.
        reason: String,
    },
    /// [`Trust::PinnedPresentedCa`]: no CA the server presented matches the pin.
    #[error(
        "CA checksum mismatch: expected {expected}, the server presented CA certificates with checksums {presented:?}"
    )]
    PresentedCaMismatch {
        /// The pinned checksum.
        expected: String,
        /// Checksums of each CA certificate the server sent (empty: it sent only its leaf).
        presented: Vec<String>,
    },
    /// The TLS handshake failed (unknown issuer, name mismatch, expired, …).
    #[error("TLS handshake with {server}: {source}")]
    Tls {
        /// The server name verified.
        server: String,
        /// rustls' error, inside an `io::Error`.
        #[source]
        source: io::Error,
    },
    /// The server answered the upgrade with something other than 101.
    #[error("websocket handshake refused: HTTP {status}: {body}")]
    Handshake {
        /// The HTTP status (401 `failed authentication`, 400 with the authorizer's message, …).
        status: u16,
        /// The response body, bounded by `max_error_body`, lossily decoded as UTF-8.
        body: String,
    },
    /// A 101 that is not a valid websocket accept (wrong `Sec-WebSocket-Accept`, missing
    /// `Upgrade`).
    #[error("invalid websocket handshake response: {0}")]
    Protocol(String),
    /// I/O failure during the upgrade exchange.
    #[error("websocket handshake I/O: {0}")]
    Io(#[source] io::Error),
    /// The attempt did not finish within the handshake timeout.
    #[error("websocket handshake timed out after {0:?}")]
    Timeout(Duration),
}

fn proxy_hint(status: u16) -> &'static str {
    match status {
        407 | 401 => {
            " (proxy credentials missing or wrong; check the user:password in the proxy URL)"
        }
        403 => " (the proxy does not allow this destination)",
        _ => "",
    }
}

// === impl ConnectorStats ===

/// Counters of a connector's life, for metrics. All monotonic except `up`.
#[derive(Debug, Default)]
pub struct ConnectorStats {
    attempts: AtomicU64,
    connected: AtomicU64,
    failures: AtomicU64,
    reconnects: AtomicU64,
    up: AtomicU64,
}

/// A point-in-time copy of [`ConnectorStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connection attempts started.
    pub attempts: u64,
    /// Attempts that produced a websocket.
    pub connected: u64,
    /// Attempts that failed (any [`ConnectError`]).
    pub failures: u64,
    /// Times [`run_forever`] went back to dialing after an established session ended.
    pub reconnects: u64,
    /// 1 while a session from [`run_forever`] is running, else 0.
    pub up: u64,
}

impl ConnectorStats {
    /// Copies every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            attempts: self.attempts.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            up: self.up.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

// === impl Connector ===

/// Parsed target of a connector.
#[derive(Debug, Clone)]
struct Target {
    tls: bool,
    /// Host as in the URL, IPv6 without brackets.
    host: String,
    port: u16,
    /// `Host` header value: `host` or `host:port` when the port is not the scheme's default.
    host_header: String,
    path_and_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(invalid("scheme must be ws or wss")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL are not supported; use headers",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            authority.host().to_owned()
        } else {
            format!("{}:{port}", authority.host())
        };
        let path_and_query = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let path_and_query = if path_and_query.is_empty() {
            "/".to_owned()
        } else {
            path_and_query
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            host_header,
            path_and_query,
        })
    }
}

/// A ready-to-dial client: URL parsed, headers checked, TLS configuration built (and a
/// [`Trust::PinnedCa`] checksum verified) once, up front.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ConnectorConfig>,
    target: Arc<Target>,
    tls: Option<tokio_rustls::TlsConnector>,
    stats: Arc<ConnectorStats>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &self.config.url)
            .field("trust", &self.config.trust)
            .field("proxy", &self.config.proxy)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Validates `config` and builds the TLS client configuration.
    ///
    /// Errors here are configuration errors, including [`TlsConfigError::CaChecksumMismatch`]
    /// for a [`Trust::PinnedCa`] whose PEM does not hash to the checksum.
    pub fn new(config: ConnectorConfig) -> Result<Self, ConfigError> {
        let target = Target::parse(&config.url)?;
        check_headers(&config.headers)?;
        if let Some(shared) = &config.shared_headers {
            check_headers(&shared.get())?;
        }
        let tls = if target.tls {
            if matches!(config.trust, Trust::InsecureSkipVerify) {
                tracing::warn!(
                    "TLS certificate verification is DISABLED (Trust::InsecureSkipVerify): \
                     anyone on the path can impersonate the server"
                );
            }
            Some(tokio_rustls::TlsConnector::from(client_config(
                &config.trust,
            )?))
        } else {
            None
        };
        Ok(Self {
            config: Arc::new(config),
            target: Arc::new(target),
            tls,
            stats: Arc::new(ConnectorStats::default()),
        })
    }

    /// The counters this connector (and [`run_forever`] with it) updates.
    pub fn stats(&self) -> &Arc<ConnectorStats> {
        &self.stats
    }

    /// The configuration this connector was built from.
    pub fn config(&self) -> &ConnectorConfig {
        &self.config
    }

    /// One attempt: dial, optionally through the proxy, optionally TLS, then the websocket
    /// upgrade, all within the handshake timeout. Counts `attempts` and `connected` or
    /// `failures`.
    pub async fn connect(&self) -> Result<WebSocketStream<BoxedIo>, ConnectError> {
        self.connect_offering(Capabilities::NONE)
            .await
            .map(|(ws, _)| ws)
    }

    /// Like [`Connector::connect`], offering the configured extensions
    /// ([`ConnectorConfig::set_capabilities`]); returns the websocket and the extensions the
    /// server agreed to. Run the session with them ([`Capabilities::apply`]): the server does.
    pub async fn connect_agreed(
        &self,
    ) -> Result<(WebSocketStream<BoxedIo>, Capabilities), ConnectError> {
        self.connect_offering(self.config.capabilities).await
    }

    async fn connect_offering(
        &self,
        offer: Capabilities,
    ) -> Result<(WebSocketStream<BoxedIo>, Capabilities), ConnectError> {
        bump(&self.stats.attempts);
        let timeout = self.config.handshake_timeout;
        let deadline = Instant::now() + timeout;
        let result =
            match tokio::time::timeout_at(deadline, self.connect_inner(deadline, offer)).await {
                Ok(r) => r,
                Err(_) => Err(ConnectError::Timeout(timeout)),
            };
        match &result {
            Ok(_) => bump(&self.stats.connected),
            Err(_) => bump(&self.stats.failures),
        }
        result
    }

    async fn connect_inner(
        &self,
        deadline: Instant,
        offer: Capabilities,
    ) -> Result<(WebSocketStream<BoxedIo>, Capabilities), ConnectError> {
        let t = &*self.target;
        let tcp = dial_tcp(
            &self.config.proxy,
            t.tls,
            &t.host,
            t.port,
            self.config.max_error_body,
            deadline,
        )
        .await?;
        let io: BoxedIo =
            match &self.tls {
                Some(connector) => {
                    let server_name = rustls_pki_types::ServerName::try_from(t.host.clone())
                        .map_err(|e| ConnectError::Tls {
                            server: t.host.clone(),
                            source: io::Error::new(io::ErrorKind::InvalidInput, e),
                        })?;
                    let stream = connector
                        .connect(server_name, tcp)
                        .await
                        .map_err(|e| tls_error(&t.host, e))?;
                    Box::new(stream)
                }
                None => Box::new(tcp),
            };
        self.upgrade(io, deadline, offer).await
    }

    async fn upgrade(
        &self,
        mut io: BoxedIo,
        deadline: Instant,
        offer: Capabilities,
    ) -> Result<(WebSocketStream<BoxedIo>, Capabilities), ConnectError> {
        let t = &*self.target;
        let key = generate_key();
        let mut headers = self.config.headers.clone();
        if let Some(shared) = &self.config.shared_headers {
            for (name, value) in shared.take_for_attempt() {
                if let Some(name) = name {
                    headers.insert(name, value);
                }
            }
        }
        if let Some(value) = offer.header_value() {
            headers.insert(capability::HEADER, value);
        }
        let mut req = format!("GET {} HTTP/1.1\r\n", t.path_and_query);
        if !headers.contains_key(http::header::HOST) {
            req.push_str(&format!("Host: {}\r\n", t.host_header));
        }
        req.push_str(&format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n"
        ));
        let mut bytes = req.into_bytes();
        for (name, value) in &headers {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        io.write_all(&bytes).await.map_err(ConnectError::Io)?;
        io.flush().await.map_err(ConnectError::Io)?;

        let head = http1::read_head(&mut io).await.map_err(ConnectError::Io)?;
        if head.status != 101 {
            let body =
                http1::read_body(&mut io, &head, self.config.max_error_body, Some(deadline)).await;
            return Err(ConnectError::Handshake {
                status: head.status,
                body,
            });
        }
        let has_token = |name: HeaderName, token: &str| {
            head.headers.get_all(name).iter().any(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(token))
                })
            })
        };
        if !has_token(http::header::UPGRADE, "websocket") {
            return Err(ConnectError::Protocol(
                "101 without `Upgrade: websocket`".to_owned(),
            ));
        }
        if !has_token(http::header::CONNECTION, "upgrade") {
            return Err(ConnectError::Protocol(
                "101 without `Connection: upgrade`".to_owned(),
            ));
        }
        let expected = derive_accept_key(key.as_bytes());
        let accept = head.headers.get(http::header::SEC_WEBSOCKET_ACCEPT);
        if accept.map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
            return Err(ConnectError::Protocol(format!(
                "Sec-WebSocket-Accept {accept:?} does not match the key (expected {expected})"
            )));
        }
        // Only what was offered counts: a server cannot turn on what this side did not ask for.
        let agreed = Capabilities::from_headers(&head.headers).intersect(offer);
        let ws = WebSocketStream::from_partially_read(
            io,
            head.leftover,
            Role::Client,
            Some(self.config.websocket),
        )
        .await;
        Ok((ws, agreed))
    }
}

/// Opens a TCP connection to `host:port` (IPv6 without brackets) the way the connector does:
/// through the proxy `proxies` picks for it ([`ProxyConfig::proxy_for`]: `HTTPS_PROXY` when
/// `tls`, else `HTTP_PROXY`; none for `NO_PROXY` matches and loopback) with an HTTP `CONNECT`
/// tunnel ([`connect_tunnel`]), else directly. Nagle is turned off either way.
///
/// Public so that an application's other requests to the server (an agent's pre-flight GETs)
/// take the same way through the same proxies. The caller bounds the call; `deadline` and
/// `max_error_body` are as for [`connect_tunnel`]. Errors: [`ConnectError::Connect`] when the
/// target cannot be reached directly, [`ConnectError::ProxyIo`] when the proxy cannot,
/// and the other `Proxy*` variants when the proxy refuses or misbehaves.
pub async fn dial_tcp(
    proxies: &ProxyConfig,
    tls: bool,
    host: &str,
    port: u16,
    max_error_body: usize,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let target = proxy::join_host_port(host, port);
    let Some(p) = proxies.proxy_for(tls, host, port) else {
        return dial(&target).await;
    };
    tracing::debug!(proxy = %p, %target, "dialing through proxy");
    let mut tcp = dial(&p.authority()).await.map_err(|e| match e {
        ConnectError::Connect { source, .. } => ConnectError::ProxyIo {
            proxy: p.to_string(),
            source,
        },
        other => other,
    })?;
    connect_tunnel(&mut tcp, p, &target, max_error_body, deadline).await?;
    Ok(tcp)
}

async fn dial(addr: &str) -> Result<TcpStream, ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    // The tunnel carries interactive traffic (exec, port-forward); Nagle only adds latency.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Turns tokio-rustls' `io::Error` into a typed error, recovering a presented-CA pin mismatch.
fn tls_error(server: &str, err: io::Error) -> ConnectError {
    let mismatch = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::Other(other) => other.0.downcast_ref::<tls::PresentedCaMismatch>(),
            _ => None,
        });
    match mismatch {
        Some(m) => ConnectError::PresentedCaMismatch {
            expected: m.expected.clone(),
            presented: m.presented.clone(),
        },
        None => ConnectError::Tls {
            server: server.to_owned(),
            source: err,
        },
    }
}

// === run_forever ===

/// How the caller's session closure ended, telling [`run_forever`] what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The session is over (peer closed, websocket error, keepalive timeout); dial again after
    /// the backoff delay.
    Reconnect {
        /// Why, for the log.
        reason: String,
    },
    /// Do not reconnect; [`run_forever`] returns [`RunEnd::Stopped`].
    Stop,
}

/// Why [`run_forever`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunEnd {
    /// The cancellation token fired.
    Cancelled,
    /// The session closure returned [`SessionEnd::Stop`].
    Stopped,
}

/// Connects, runs `on_connected` on each websocket until it returns, and reconnects forever
/// with the connector's [`BackoffConfig`], until `cancel` fires or a session returns
/// [`SessionEnd::Stop`].
///
/// Order of events in one round: attempt (`attempts`), then either `connected` and the
/// session, or `failures`; then a backoff delay, reset first if the session lasted at least
/// `reset_after`. Every transition is logged with `tracing` and counted in
/// [`Connector::stats`].
///
/// Cancellation is prompt: it interrupts an attempt, a backoff sleep, or a running session (whose
/// future is dropped, closing the websocket). A session that wants to close gracefully should
/// watch the same token and return on its own.
pub async fn run_forever<F, Fut>(
    connector: &Connector,
    cancel: CancellationToken,
    mut on_connected: F,
) -> RunEnd
where
    F: FnMut(WebSocketStream<BoxedIo>) -> Fut,
    Fut: Future<Output = SessionEnd>,
{
    run_loop(connector, cancel, Capabilities::NONE, |ws, _| {
        on_connected(ws)
    })
    .await
}

/// [`run_forever`], offering the configured extensions on every attempt
/// ([`ConnectorConfig::set_capabilities`]) and handing each session the set the server agreed
/// to, which it must run with ([`Capabilities::apply`]).
pub async fn run_forever_agreed<F, Fut>(
    connector: &Connector,
    cancel: CancellationToken,
    on_connected: F,
) -> RunEnd
where
    F: FnMut(WebSocketStream<BoxedIo>, Capabilities) -> Fut,
    Fut: Future<Output = SessionEnd>,
{
    let offer = connector.config.capabilities;
    run_loop(connector, cancel, offer, on_connected).await
}

async fn run_loop<F, Fut>(
    connector: &Connector,
    cancel: CancellationToken,
    offer: Capabilities,
    mut on_connected: F,
) -> RunEnd
where
    F: FnMut(WebSocketStream<BoxedIo>, Capabilities) -> Fut,
    Fut: Future<Output = SessionEnd>,
{
    let url = &connector.config.url;
    let backoff = &connector.config.backoff;
    let stats = &connector.stats;
    let mut delays = backoff.delays();
    loop {
        tracing::debug!(%url, "connecting");
        let attempt = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            r = connector.connect_offering(offer) => r,
        };
        match attempt {
            Ok((ws, agreed)) => {
                tracing::info!(%url, ?agreed, "tunnel connected");
                stats.up.store(1, Ordering::Relaxed);
                let started = Instant::now();
                let end = tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    end = on_connected(ws, agreed) => Some(end),
                };
                stats.up.store(0, Ordering::Relaxed);
                let uptime = started.elapsed();
                match end {
                    None => break,
                    Some(SessionEnd::Stop) => {
                        tracing::info!(%url, ?uptime, "session asked to stop; not reconnecting");
                        return RunEnd::Stopped;
                    }
                    Some(SessionEnd::Reconnect { reason }) => {
                        bump(&stats.reconnects);
                        if uptime >= backoff.reset_after() {
                            delays = backoff.delays();
                        }
                        tracing::info!(%url, ?uptime, %reason, "tunnel disconnected; reconnecting");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%url, %error, "tunnel connect failed");
            }
        }
        let delay = delays.next_delay();
        tracing::debug!(%url, ?delay, "backing off");
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!(%url, "connector cancelled");
    RunEnd::Cancelled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parsing() {
        let t = Target::parse("wss://rancher.example.com/v3/connect?x=1").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("rancher.example.com", 443));
        assert_eq!(t.host_header, "rancher.example.com");
        assert_eq!(t.path_and_query, "/v3/connect?x=1");
        let t = Target::parse("ws://[::1]:8080").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.host_header, "[::1]:8080");
        assert_eq!(t.path_and_query, "/");
        assert!(Target::parse("https://x/").is_err());
        assert!(Target::parse("wss://u:p@x/").is_err());
    }

    #[tokio::test]
    async fn shared_headers_are_read_on_every_attempt() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
                    head.push(byte[0]);
                }
                tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .unwrap();
                heads.push(String::from_utf8(head).unwrap().to_ascii_lowercase());
            }
            heads
        });
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-api-tunnel-params", v.parse().unwrap());
            h
        };
        let shared = SharedHeaders::new(header("first"));
        let mut cfg = ConnectorConfig::new(format!("ws://{addr}/v3/connect"));
        cfg.set_headers(header("static"))
            .set_shared_headers(shared.clone());
        let c = Connector::new(cfg).unwrap();
        assert!(c.connect().await.is_err());
        assert!(!shared.is_stale());
        shared.replace(header("second")).unwrap();
        assert!(shared.is_stale(), "replaced after the attempt");
        let mut reserved = HeaderMap::new();
        reserved.insert("upgrade", "x".parse().unwrap());
        assert!(shared.replace(reserved).is_err());
        assert!(c.connect().await.is_err());
        assert!(!shared.is_stale());
        let heads = heads.await.unwrap();
        assert!(
            heads[0].contains("x-api-tunnel-params: first\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].contains("x-api-tunnel-params: second\r\n"),
            "{}",
            heads[1]
        );
        for head in &heads {
            assert!(
                !head.contains("static"),
                "the shared value replaces the static one"
            );
            assert_eq!(head.matches("x-api-tunnel-params").count(), 1);
        }
        assert!(
            !format!("{shared:?}").contains("second"),
            "values stay out of Debug"
        );
    }

    #[test]
    fn reserved_headers_are_refused() {
        let mut cfg = ConnectorConfig::new("ws://127.0.0.1:1/connect");
        let mut headers = HeaderMap::new();
        headers.insert("sec-websocket-key", "x".parse().unwrap());
        cfg.set_headers(headers);
        assert_eq!(
            Connector::new(cfg).unwrap_err(),
            ConfigError::ReservedHeader("sec-websocket-key".to_owned())
        );
    }

    #[test]
    fn pin_mismatch_names_both_checksums() {
        let mut cfg = ConnectorConfig::new("wss://127.0.0.1:1/connect");
        let wrong = "0".repeat(64);
        cfg.set_trust(Trust::PinnedCa {
            checksum: wrong.clone(),
            ca_pem: "not even a pem".to_owned(),
            with_system_roots: false,
        });
        let err = Connector::new(cfg).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong) && msg.contains(&ca_checksum("not even a pem")),
            "{msg}"
        );
    }
}
