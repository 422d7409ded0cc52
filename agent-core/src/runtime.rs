//! The running agent: tunnels on connect loops, the streams they serve, and the shutdown.
//!
//! ```text
//!  Runtime::start: signal handlers ─▶ health endpoint ─▶ pre-flight (a signal: exit 0)
//!  Runtime ─ spawn_tunnel(spec) ─▶ loop: build Connector for spec.url()
//!                                        run_forever(connector) ── each websocket ──▶ session:
//!                                          Tunnel::spawn(ws, client config, allow-list authorizer)
//!                                          on_connect(tunnel)           (marker file, Secret, …)
//!                                          accept() ─▶ tracker.spawn(handler(stream, drain))
//!                                          until the tunnel closes ─▶ Reconnect (or Stop when the
//!                                          URL changed, e.g. /register → /v3/connect, or draining)
//!  main tunnel's handler: dial_and_pipe ─▶ dial tcp/unix locally ─▶ splice_draining(stream,
//!                         socket): both ways, each local read/write stamps the stream's Activity
//!  run_until_signal: SIGTERM/SIGINT ─▶ draining (authorizers refuse, /readyz 503, handlers told)
//!                    ─▶ main-tunnel streams check every 1 s: idle ≥ --shutdown-idle (2 s) ─▶
//!                       closed and counted; moving bytes ─▶ go on
//!                    ─▶ wait for open streams ≤ grace ─▶ log the idle closes ─▶ close tunnels
//!                    ─▶ return (exit 0)
//! ```
//!
//! **Idle streams are closed during the drain**: the management server pools idle HTTP/1.1
//! keep-alive connections for up to a minute, each holding a stream open, so waiting for every
//! stream would make every drain last the whole grace. A stream that has moved no bytes for
//! `--shutdown-idle` ([`DEFAULT_SHUTDOWN_IDLE`](crate::config::DEFAULT_SHUTDOWN_IDLE)) is closed
//! (see [`crate::splice`] for what counts as idle); one with traffic keeps the rest of the
//! grace. The closes are counted (`cattle_agent_streams_closed_idle_on_drain_total`) and logged
//! once per drain. Other handlers get the drain token and wind down themselves (the steve
//! tunnel's HTTP server closes its idle connections gracefully).
//!
//! The connect loop is tunnel-proto's `run_forever`: jittered exponential backoff between
//! attempts (defaults 1 s doubling to 30 s, reset after a minute up), where Rancher's Go agents
//! wait a fixed ~10 s.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::driver::connector::{
    Connector, ConnectorConfig, RunEnd, SessionEnd, Trust, run_forever_agreed,
};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Stream, Tunnel, websocket_config};
use tunnel_proto::{Role, SessionConfig};

use crate::allow::{AllowList, authorizer};
use crate::config::{CommonConfig, Credentials, ServerUrl};
use crate::env::ConfigError;
use crate::metrics::{Metrics, TunnelMetrics};
use crate::params::{PARAMS_HEADER, TOKEN_HEADER, encode_params};
use crate::preflight::{self, Preflight, PreflightError};
use crate::splice::{SpliceEnd, splice_draining};

/// A boxed, sendable unit future.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one accepted stream. Gets the tunnel's metrics and a token that fires when the agent
/// starts draining (a handler with idle keep-alive connections should wind them down then).
pub type StreamHandler =
    Arc<dyn Fn(Stream, Arc<TunnelMetrics>, CancellationToken) -> BoxFuture + Send + Sync>;

/// Runs once per established session, concurrently with it.
pub type OnConnect = Arc<dyn Fn(Tunnel) -> BoxFuture + Send + Sync>;

/// The URL the next dial goes to (re-evaluated after each session).
pub type UrlSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Builds a connector for a URL.
pub type ConnectorFactory = Arc<dyn Fn(&str) -> Result<Connector, ConfigError> + Send + Sync>;

/// One tunnel the agent keeps up.
pub struct TunnelSpec {
    /// Metrics label and log name (`main`, `steve`).
    pub name: &'static str,
    /// Where to dial.
    pub url: UrlSource,
    /// How to dial it.
    pub connector: ConnectorFactory,
    /// What the server may open.
    pub allow: AllowList,
    /// How each stream is served.
    pub handler: StreamHandler,
    /// Touched on each connect before the tunnel counts as up, so that once `/readyz` answers
    /// 200 the marker exists (Rancher's agent writes its `connected` file the same way, before
    /// the session serves).
    pub connected_marker: Option<PathBuf>,
    /// Run on each connect, concurrently with the session.
    pub on_connect: Option<OnConnect>,
}

impl std::fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("name", &self.name)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

struct LoopHandle {
    task: JoinHandle<()>,
    in_session: Arc<AtomicBool>,
    hard_stop: CancellationToken,
}

/// Everything that runs: metrics, tunnels, stream tasks, and the tokens that stop them.
pub struct Runtime {
    metrics: Arc<Metrics>,
    streams: TaskTracker,
    /// Fires when draining starts.
    drain: CancellationToken,
    /// Fires when sessions must close (after the drain).
    stop: CancellationToken,
    loops: Mutex<Vec<LoopHandle>>,
    grace: Duration,
    signals: tokio::sync::Mutex<Option<crate::signal::Signals>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime whose open streams get `grace` after SIGTERM. Installs the SIGTERM/SIGINT
    /// handlers, so it must be called inside a tokio runtime.
    pub fn new(grace: Duration) -> Self {
        let signals = crate::signal::Signals::install()
            .map_err(|error| tracing::error!(%error, "cannot install signal handlers"))
            .ok();
        Self {
            signals: tokio::sync::Mutex::new(signals),
            metrics: Arc::new(Metrics::default()),
            streams: TaskTracker::new(),
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            loops: Mutex::new(Vec::new()),
            grace,
        }
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Fires when draining starts.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// Starts the health and metrics endpoint; returns its bound address.
    pub async fn serve_health(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<std::net::SocketAddr> {
        // The endpoint outlives the drain so probes and scrapes still answer during it.
        crate::health::serve(addr, self.metrics.clone(), self.stop.child_token()).await
    }

    /// Starts keeping `spec`'s tunnel up.
    pub fn spawn_tunnel(&self, spec: TunnelSpec) {
        let in_session = Arc::new(AtomicBool::new(false));
        let hard_stop = CancellationToken::new();
        let ctx = LoopCtx {
            metrics: self.metrics.clone(),
            tunnel_metrics: self.metrics.tunnel(spec.name),
            streams: self.streams.clone(),
            drain: self.drain.clone(),
            stop: self.stop.clone(),
            hard_stop: hard_stop.clone(),
            in_session: in_session.clone(),
        };
        let task = tokio::spawn(tunnel_loop(spec, ctx));
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(LoopHandle {
                task,
                in_session,
                hard_stop,
            });
    }

    /// The next SIGTERM or SIGINT (never, if the handlers could not be installed).
    pub async fn signal(&self) -> &'static str {
        match self.signals.lock().await.as_mut() {
            Some(signals) => signals.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The start-up both agents share, in this order: the SIGTERM/SIGINT handlers (so a signal
    /// at any later point is seen), the health and metrics endpoint on `common.health_addr`
    /// (its bound address logged as `listening on http://…`, which tests and operators read),
    /// then the pre-flight against `server` ([`crate::preflight::run`]).
    ///
    /// `Ok(None)`: a signal came during the pre-flight, and the agent should exit cleanly.
    /// After `Ok(Some(..))` the agent spawns its tunnels and calls
    /// [`run_until_signal`](Self::run_until_signal).
    pub async fn start(
        common: &CommonConfig,
        server: &ServerUrl,
    ) -> Result<Option<(Self, Preflight)>, StartError> {
        let rt = Self::new(common.shutdown_grace);
        let health = rt
            .serve_health(common.health_addr)
            .await
            .map_err(|source| StartError::Health {
                addr: common.health_addr,
                source,
            })?;
        tracing::info!(addr = %health, "health and metrics endpoint listening on http://{health}");
        match rt.unless_signalled(preflight::run(common, server)).await {
            None => Ok(None),
            Some(preflight) => Ok(Some((rt, preflight?))),
        }
    }

    /// Runs `fut` (a start-up step) unless SIGTERM/SIGINT comes first; then `None`.
    pub async fn unless_signalled<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            out = fut => Some(out),
            signal = self.signal() => {
                tracing::info!(signal, "signal during start-up; exiting");
                None
            }
        }
    }

    /// Waits for SIGTERM or SIGINT, then shuts down: see [`Runtime::shutdown`]. A second
    /// signal cuts the grace period short.
    pub async fn run_until_signal(&self) {
        let signal = self.signal().await;
        tracing::info!(signal, "shutdown requested");
        self.shutdown(self.signal()).await;
    }

    /// Drains and stops: new Connects are refused, open streams get the grace period (or until
    /// `hurry` resolves, e.g. a second signal), then every tunnel is closed. Handlers see the
    /// drain token fire at the start; the main tunnel's close their idle streams then (see the
    /// module docs).
    pub async fn shutdown(&self, hurry: impl Future) {
        self.metrics.set_draining();
        self.drain.cancel();
        self.streams.close();
        let open = self.metrics.streams_open();
        tracing::info!(
            open_streams = open,
            grace = ?self.grace,
            "refusing new streams; waiting for open ones to finish"
        );
        tokio::select! {
            () = self.streams.wait() => tracing::info!("all streams finished"),
            () = tokio::time::sleep(self.grace) => tracing::warn!(
                open_streams = self.metrics.streams_open(),
                "grace period over; closing the streams still open"
            ),
            _ = hurry => tracing::warn!("second signal; not waiting any longer"),
        }
        // The stream handlers closed these themselves (see `dial_and_pipe`); one line per drain.
        tracing::info!(
            closed = self.metrics.streams_closed_idle_on_drain(),
            "idle streams closed during the drain"
        );
        let loops: Vec<LoopHandle> =
            std::mem::take(&mut *self.loops.lock().unwrap_or_else(|p| p.into_inner()));
        for l in &loops {
            if !l.in_session.load(Ordering::SeqCst) {
                l.hard_stop.cancel();
            }
        }
        self.stop.cancel();
        for l in loops {
            let hard = l.hard_stop.clone();
            let mut task = l.task;
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                hard.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
            }
        }
        tracing::info!("stopped");
    }
}

/// Why an agent could not start ([`Runtime::start`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The health and metrics endpoint could not listen.
    #[error("health endpoint on {addr}: {source}")]
    Health {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The pre-flight refused to let the agent start.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
}

/// Logs the line Rancher's agents log before the first dial, `Connecting with token starting
/// with <the first half of the token>`, with the URL the main tunnel dials and `reports`:
/// what this agent tells the server about itself (its node, its cluster's API).
pub fn log_connecting(
    common: &CommonConfig,
    credentials: &Credentials,
    reports: impl std::fmt::Display,
) {
    let token = &credentials.token;
    let half: String = token.chars().take(token.chars().count() / 2).collect();
    tracing::info!(
        url = %credentials.server.tunnel_url(common.register()),
        %reports,
        "Connecting with token starting with {half}"
    );
}

struct LoopCtx {
    metrics: Arc<Metrics>,
    tunnel_metrics: Arc<TunnelMetrics>,
    streams: TaskTracker,
    drain: CancellationToken,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    in_session: Arc<AtomicBool>,
}

/// Closes the tunnel when the session future is dropped (cancelled), so its websocket does not
/// outlive it.
struct CloseOnDrop(Tunnel);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

async fn tunnel_loop(spec: TunnelSpec, ctx: LoopCtx) {
    let name = spec.name;
    let authorizer = authorizer(
        spec.allow.clone(),
        ctx.metrics.clone(),
        ctx.tunnel_metrics.clone(),
    );
    loop {
        let url = (spec.url)();
        let connector = match (spec.connector)(&url) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(tunnel = name, %url, %error, "cannot build the connector; this tunnel stays down");
                return;
            }
        };
        ctx.tunnel_metrics.set_connector(connector.stats().clone());
        tracing::info!(tunnel = name, %url, "connecting");
        let min_delay = connector.config().backoff().min_delay();
        // Offers the credit-window extension on every attempt; a Go server never answers it and
        // the session runs the plain protocol.
        let end = run_forever_agreed(&connector, ctx.hard_stop.clone(), |ws, agreed| {
            let authorizer = authorizer.clone();
            let ctx = &ctx;
            let spec = &spec;
            let url = &url;
            async move {
                ctx.in_session.store(true, Ordering::SeqCst);
                let mut session_config = SessionConfig::new(Role::Client);
                agreed.apply(&mut session_config);
                let tunnel = Tunnel::spawn(ws, session_config, authorizer.clone());
                let _close = CloseOnDrop(tunnel.clone());
                if let Some(marker) = &spec.connected_marker {
                    touch_marker(marker);
                }
                ctx.tunnel_metrics.session_started(&tunnel);
                if let Some(hook) = &spec.on_connect {
                    tokio::spawn(hook(tunnel.clone()));
                }
                let reason = loop {
                    tokio::select! {
                        stream = tunnel.accept() => match stream {
                            Some(stream) => {
                                let handler = spec.handler.clone();
                                let tm = ctx.tunnel_metrics.clone();
                                let drain = ctx.drain.clone();
                                ctx.streams.spawn(async move {
                                    let _guard = tm.stream_guard();
                                    handler(stream, tm.clone(), drain).await;
                                });
                            }
                            None => break tunnel.closed().await.to_string(),
                        },
                        () = ctx.stop.cancelled() => {
                            tunnel.close();
                            let _ = tokio::time::timeout(Duration::from_secs(1), tunnel.closed()).await;
                            break "agent stopping".to_owned();
                        }
                    }
                };
                ctx.tunnel_metrics.session_ended();
                ctx.in_session.store(false, Ordering::SeqCst);
                if ctx.stop.is_cancelled() || ctx.metrics.is_draining() {
                    tracing::info!(tunnel = name, %reason, "session ended during shutdown");
                    return SessionEnd::Stop;
                }
                ctx.tunnel_metrics.reconnecting();
                if (spec.url)() != *url {
                    tracing::info!(tunnel = name, %reason, "session ended; the tunnel URL changed");
                    return SessionEnd::Stop;
                }
                SessionEnd::Reconnect { reason }
            }
        })
        .await;
        match end {
            RunEnd::Stopped if !ctx.stop.is_cancelled() && !ctx.metrics.is_draining() => {
                // The URL changed (first registration done): dial the new one after a pause.
                tokio::select! {
                    () = ctx.hard_stop.cancelled() => return,
                    () = tokio::time::sleep(min_delay) => {}
                }
            }
            _ => return,
        }
    }
}

// === the main tunnel ===

/// The headers of the main tunnel: `X-API-Tunnel-Token` and `X-API-Tunnel-Params`.
pub fn main_headers(token: &str, params: &serde_json::Value) -> Result<HeaderMap, ConfigError> {
    let mut headers = HeaderMap::new();
    let token_value = HeaderValue::from_str(token).map_err(|_| {
        ConfigError::invalid("token", "(redacted)", "not a valid HTTP header value")
    })?;
    headers.insert(TOKEN_HEADER, token_value);
    let params_value = HeaderValue::from_str(&encode_params(params))
        .map_err(|e| ConfigError::invalid("params", "", e.to_string()))?;
    headers.insert(PARAMS_HEADER, params_value);
    Ok(headers)
}

/// A connector configuration with the agent's shared settings: trust, proxy, backoff, and a
/// websocket sized for Go servers' large messages.
pub fn connector_config(
    url: &str,
    headers: HeaderMap,
    trust: Trust,
    common: &CommonConfig,
) -> ConnectorConfig {
    let mut cfg = ConnectorConfig::new(url);
    cfg.set_headers(headers)
        .set_trust(trust)
        .set_proxy(common.proxy.clone())
        .set_backoff(common.backoff.clone())
        .set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
    cfg
}

/// The main tunnel of either agent: `wss://<server>/v3/connect[/register]` with the token and
/// params headers, Rancher's allow-list, local dials, and the `connected` marker on connect.
pub fn main_tunnel(
    common: &CommonConfig,
    credentials: &Credentials,
    params: &serde_json::Value,
    trust: Trust,
    allow: AllowList,
    on_connect: Option<OnConnect>,
) -> Result<TunnelSpec, ConfigError> {
    let headers = main_headers(&credentials.token, params)?;
    // Built once up front so configuration errors surface before the loop starts.
    let _ = Connector::new(connector_config(
        &credentials.server.tunnel_url(false),
        headers.clone(),
        trust.clone(),
        common,
    ))
    .map_err(|e| ConfigError::Other {
        name: "tunnel".to_owned(),
        reason: e.to_string(),
    })?;
    let server = credentials.server.clone();
    let c = common.clone();
    let url: UrlSource = Arc::new(move || server.tunnel_url(c.register()));
    let c = common.clone();
    let connector: ConnectorFactory = Arc::new(move |url: &str| {
        Connector::new(connector_config(url, headers.clone(), trust.clone(), &c)).map_err(|e| {
            ConfigError::Other {
                name: "tunnel".to_owned(),
                reason: e.to_string(),
            }
        })
    });
    let list = allow.clone();
    let idle_after = common.shutdown_idle;
    let handler: StreamHandler = Arc::new(move |stream, metrics, drain| {
        let list = list.clone();
        Box::pin(async move { dial_and_pipe(stream, &list, &metrics, &drain, idle_after).await })
    });
    Ok(TunnelSpec {
        name: "main",
        url,
        connector,
        allow,
        handler,
        connected_marker: Some(common.marker_path()),
        on_connect,
    })
}

fn touch_marker(path: &Path) {
    if let Some(dir) = path.parent()
        && let Err(error) = std::fs::create_dir_all(dir)
    {
        tracing::warn!(dir = %dir.display(), %error, "cannot create the state directory");
        return;
    }
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(_) => tracing::debug!(path = %path.display(), "marked as connected"),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot write the connected marker")
        }
    }
}

/// Local dials give up after a minute, like the Go agent's `net.Dialer`.
pub const LOCAL_DIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves a stream of the main tunnel: dials its target locally (the allow-list already said
/// yes) and splices the two until either ends. A failed dial is answered with an Error carrying
/// the dial error, as Go does. Once `drain` fires, the stream is closed as soon as it has moved
/// no bytes for `idle_after` (checked every [`DRAIN_IDLE_CHECK`](crate::splice::DRAIN_IDLE_CHECK))
/// and counted in `metrics`; with traffic it goes on until it ends or the grace is over.
pub async fn dial_and_pipe(
    stream: Stream,
    allow: &AllowList,
    metrics: &TunnelMetrics,
    drain: &CancellationToken,
    idle_after: Duration,
) {
    let target = stream.target().clone();
    let result = match target.proto.as_str() {
        "tcp" => {
            match tokio::time::timeout(LOCAL_DIAL_TIMEOUT, TcpStream::connect(&target.address))
                .await
            {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    Ok(splice_draining(stream, tcp, drain, idle_after).await)
                }
                Ok(Err(e)) => Err((stream, format!("dial tcp {}: {e}", target.address))),
                Err(_) => Err((stream, format!("dial tcp {}: i/o timeout", target.address))),
            }
        }
        "unix" => {
            let path = allow
                .unix_path(&target.address)
                .map_or_else(|| PathBuf::from(&target.address), |p| p.to_path_buf());
            match tokio::time::timeout(LOCAL_DIAL_TIMEOUT, UnixStream::connect(&path)).await {
                Ok(Ok(sock)) => Ok(splice_draining(stream, sock, drain, idle_after).await),
                Ok(Err(e)) => Err((stream, format!("dial unix {}: {e}", path.display()))),
                Err(_) => Err((stream, format!("dial unix {}: i/o timeout", path.display()))),
            }
        }
        other => Err((
            stream,
            format!(
                "dial {other} {}: not supported on this platform",
                target.address
            ),
        )),
    };
    match result {
        Ok(SpliceEnd::Done(Ok(stats))) => tracing::debug!(
            %target,
            to_local = stats.to_local,
            to_tunnel = stats.to_tunnel,
            "stream done"
        ),
        Ok(SpliceEnd::Done(Err(error))) => {
            tracing::debug!(%target, %error, "stream ended with an error")
        }
        Ok(SpliceEnd::ClosedIdle(idle)) => {
            metrics.stream_closed_idle_on_drain();
            tracing::debug!(%target, ?idle, "closed during the drain: no bytes moved");
        }
        Err((stream, error)) => {
            metrics.dial_error(&target.proto);
            tracing::warn!(%target, %error, "local dial failed");
            stream.reset(&error);
        }
    }
}
