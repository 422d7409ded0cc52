//! Reverse proxying through tunnel streams: one HTTP/1.1 exchange per stream, bodies streamed
//! both ways without buffering, and HTTP upgrades (SPDY, websocket, Docker's `tcp` hijack)
//! spliced both ways after the `101`.
//!
//! ```text
//!   client ──hyper server──▶ handler ──Stream (tunnel)──[TLS]──▶ hyper client http1 ──▶ agent ──▶ apiserver / dockerd
//!            ◀── response head + streamed body ◀───────────────────────────────
//!   on 101: hyper::upgrade::on(client req) ⇄ copy_bidirectional ⇄ hyper::upgrade::on(upstream resp)
//! ```
//!
//! Every proxied request leaves one audit line (target `audit`) and updates the metrics when it
//! ends: when its response body has been sent (or dropped), or when an upgraded connection
//! closes.

pub mod docker;
pub mod kube;
pub mod pool;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{BoxError, ClientKey, ResponseBody};
use tunnel_proto::driver::registry::{DialError, SessionId};

use crate::app::SharedApp;
use crate::http_util::text;

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded as such.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Whether a request asks for a protocol upgrade (`Connection: upgrade` plus `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers, including those named in `Connection`; keeps `Upgrade` and
/// `Connection: Upgrade` when `keep_upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade = headers.get(UPGRADE).cloned();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(UPGRADE);
    if keep_upgrade && let Some(upgrade) = upgrade {
        headers.insert(UPGRADE, upgrade);
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    }
}

/// Removes what a client must never be able to pass downstream: its own credentials and any
/// impersonation request.
pub fn strip_client_credentials(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    headers.remove(http::header::AUTHORIZATION);
    headers.remove(http::header::COOKIE);
    // Only replicas name a forwarded request's user, and only on the peer listener.
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(crate::peers::HEADER_PREFIX))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

// === audit ===

/// One proxied request's audit record; logs and counts when dropped (when the response body
/// or the upgraded connection is done).
pub struct Audit {
    app: SharedApp,
    kind: &'static str,
    target: String,
    user: String,
    method: Method,
    path: String,
    /// The protocol asked for in `Upgrade` (`websocket`, `SPDY/3.1`), for streaming requests.
    upgrade: Option<String>,
    started: tokio::time::Instant,
    status: AtomicU16,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    /// The target names a cluster or node that exists: only then is it a metric label
    /// (anyone can put any id in a URL).
    target_known: bool,
    /// Registered in [`crate::live`]: fires when the user's authority is revoked.
    live: Option<(CancellationToken, crate::live::Guard)>,
}

impl Audit {
    /// Starts a record for a request to `kind` (`k8s`, `docker`) `target`.
    pub fn new(
        app: SharedApp,
        kind: &'static str,
        target: &str,
        method: &Method,
        path: &str,
    ) -> Self {
        Self {
            app,
            kind,
            target: target.to_owned(),
            user: "-".to_owned(),
            method: method.clone(),
            path: path.to_owned(),
            upgrade: None,
            started: tokio::time::Instant::now(),
            status: AtomicU16::new(0),
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            target_known: false,
            live: None,
        }
    }

    /// Starts the record of a proxied request and authenticates its user: the audit record
    /// (naming the user) and the user, or the response already given (401, 429, 500).
    pub async fn authenticate<B>(
        app: &SharedApp,
        req: &Request<B>,
        kind: &'static str,
        target: &str,
    ) -> Result<(Self, crate::store::User), Response<ResponseBody>> {
        let mut audit = Self::new(app.clone(), kind, target, req.method(), req.uri().path());
        // Forwarded by another replica, which authenticated the user and holds the user's
        // connection (and so cuts it on a revocation): the user is re-read here, by id.
        if let Some(fwd) = req.extensions().get::<crate::peers::Forwarded>() {
            return match crate::peers::forwarded_user(app, fwd).await {
                Ok(user) => {
                    audit.set_user(&format!("{} (via {})", user.name, fwd.by));
                    Ok((audit, user))
                }
                Err(resp) => Err(audit.respond(resp)),
            };
        }
        // Registered before the token is checked: a revocation committed after the check
        // then always finds this request ([`crate::live`]).
        if let Some(bearer) = crate::http_util::bearer(req.headers()) {
            let what = format!(
                "{kind} request {} {} of {target}",
                req.method(),
                req.uri().path()
            );
            audit.live = Some(app.live.request(bearer, what));
        }
        match crate::http_util::authenticate(app, req).await {
            Ok(user) => {
                audit.set_user(&user.name);
                Ok((audit, user))
            }
            Err(resp) => Err(audit.respond(resp)),
        }
    }

    /// Says that the target exists and belongs to `cluster_id`: the target becomes a metric
    /// label, and the request is cut if the user loses access to the cluster. Call it before
    /// checking the user's grant.
    pub fn reaches_cluster(&mut self, cluster_id: &str) {
        self.target_known = true;
        if let Some((_, guard)) = &self.live {
            guard.set_cluster(cluster_id);
        }
    }

    /// Fires when the user's authority over this request is revoked.
    fn revoked(&self) -> CancellationToken {
        self.live
            .as_ref()
            .map_or_else(CancellationToken::new, |(cut, _)| cut.clone())
    }

    /// Names the authenticated user.
    pub fn set_user(&mut self, user: &str) {
        user.clone_into(&mut self.user);
    }

    /// Finishes a request answered locally (an error before reaching the target).
    pub fn respond(self, resp: Response<ResponseBody>) -> Response<ResponseBody> {
        self.status.store(resp.status().as_u16(), Ordering::Relaxed);
        resp
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let status = self.status.load(Ordering::Relaxed);
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let bytes_out = self.bytes_out.load(Ordering::Relaxed);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(
            target: "audit",
            user = %self.user,
            kind = self.kind,
            target_id = %self.target,
            verb = %self.method,
            path = %self.path,
            upgrade = self.upgrade.as_deref().unwrap_or("-"),
            status,
            cut = self.live.as_ref().is_some_and(|(cut, _)| cut.is_cancelled()),
            bytes_in,
            bytes_out,
            duration_ms,
            "proxied request"
        );
        let label = if self.target_known {
            self.target.as_str()
        } else {
            crate::metrics::UNKNOWN_TARGET
        };
        self.app
            .metrics
            .proxied(self.kind, label, status, bytes_in, bytes_out);
    }
}

/// A body that counts the data bytes through it and holds the audit record until it is done.
pub(crate) struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    _audit: Option<Arc<Audit>>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === forwarding ===

/// What changes between the client's request and the upstream one.
pub struct Rewrite {
    /// The upstream request target (origin form: path and query).
    pub path_and_query: String,
    /// The upstream `Host`.
    pub host: String,
    /// Headers to set (credentials, impersonation), after the client's were stripped.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
}

/// A failure on the way to the target, with the status it deserves: 503 when the tunnel is
/// not there, 502 when the agent or target failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No usable tunnel.
    #[error("{0}")]
    Unavailable(String),
    /// The agent, the target or the connection to it failed.
    #[error("{0}")]
    BadGateway(String),
}

impl ProxyError {
    /// The response for this error.
    pub fn into_response(self) -> Response<ResponseBody> {
        match self {
            Self::Unavailable(msg) => text(StatusCode::SERVICE_UNAVAILABLE, msg),
            Self::BadGateway(msg) => text(StatusCode::BAD_GATEWAY, msg),
        }
    }

    /// From a failed registry dial, naming who is unreachable.
    pub fn from_dial(err: DialError, who: &str) -> Self {
        match err {
            DialError::NoSession(_) => {
                Self::Unavailable(format!("{who} is not connected (no tunnel session)"))
            }
            DialError::Unhealthy { .. } => Self::Unavailable(format!(
                "{who} is not responding: its tunnel has been silent ({err})"
            )),
            other => Self::BadGateway(format!("{who}: {other}")),
        }
    }
}

/// An error and its sources, `a: b: c` (hyper's own text hides the tunnel's reason, such as
/// the agent refusing the dial, in its source).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The dial result label for metrics.
pub fn dial_label(err: &DialError) -> &'static str {
    match err {
        DialError::NoSession(_) => "no_session",
        DialError::Unhealthy { .. } => "unhealthy",
        _ => "refused",
    }
}

/// A fresh upstream connection and the tunnel session it goes through.
pub(crate) type Fresh = Result<(pool::Sender, Option<SessionId>), Response<ResponseBody>>;

/// Where [`forward`] takes its upstream connection from.
pub(crate) struct Upstream<C> {
    /// Pool key of the target (what the connection reaches, and how: address, CA).
    pub target: String,
    /// The tunnel's client key.
    pub client_key: ClientKey,
    /// What is reached, for error messages ("the apiserver of c-x at 10.43.0.1:443").
    pub what: String,
    /// Opens a fresh connection (dial, TLS, HTTP/1.1 handshake).
    pub connect: C,
}

/// The HTTP/1.1 handshake over a fresh stream; the connection runs in its own task (with
/// upgrades) until both halves are done.
pub(crate) async fn handshake<S>(io: S) -> Result<pool::Sender, Response<ResponseBody>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| {
            text(
                StatusCode::BAD_GATEWAY,
                format!("HTTP handshake through the tunnel failed: {err}"),
            )
        })?;
    tokio::spawn(async move {
        if let Err(err) = conn.with_upgrades().await {
            tracing::debug!(error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// The client's request made ready to go upstream: hop-by-hop headers and the client's
/// credentials removed, [`Rewrite`] applied, the body counted.
pub(crate) struct Prepared {
    /// The upstream request.
    pub req: Request<Counted<Incoming>>,
    /// Whether it asks for an upgrade.
    pub upgrade: bool,
    /// The client side of the upgrade, if it asks for one.
    pub client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The listener's connection slot, held while an upgraded connection lives.
    pub slot: Option<tunnel_proto::driver::acceptor::ConnectionSlot>,
}

/// Prepares `req` for upstream ([`Prepared`]); on a bad rewrite, the response already given.
pub(crate) fn prepare(
    mut req: Request<Incoming>,
    rewrite: Rewrite,
    mut audit: Audit,
) -> Result<(Prepared, Audit), Response<ResponseBody>> {
    let upgrade = is_upgrade(req.headers());
    if upgrade {
        // Named in the audit line (capped: the client chose it).
        let asked = req.headers().get(UPGRADE).map(HeaderValue::as_bytes);
        let asked = String::from_utf8_lossy(asked.unwrap_or_default());
        audit.upgrade = Some(asked.chars().take(40).collect());
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // An upgraded connection still counts under the listener's connection limits.
    let slot = req
        .extensions_mut()
        .remove::<tunnel_proto::driver::acceptor::ConnectionSlot>();
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    strip_client_credentials(&mut parts.headers);
    for (name, value) in rewrite.set_headers {
        parts.headers.append(name, value);
    }
    let host = match HeaderValue::from_str(&rewrite.host) {
        Ok(h) => h,
        Err(_) => return Err(audit.respond(text(StatusCode::BAD_GATEWAY, "invalid upstream host"))),
    };
    parts.headers.insert(HOST, host);
    parts.uri = match rewrite.path_and_query.parse() {
        Ok(uri) => uri,
        Err(_) => return Err(audit.respond(text(StatusCode::BAD_REQUEST, "invalid request path"))),
    };
    parts.version = http::Version::HTTP_11;
    let bytes_in = audit.bytes_in.clone();
    let req = Request::from_parts(
        parts,
        Counted {
            inner: body,
            count: bytes_in,
            _audit: None,
        },
    );
    Ok((
        Prepared {
            req,
            upgrade,
            client_upgrade,
            slot,
        },
        audit,
    ))
}

/// Sends `req` upstream as one HTTP/1.1 exchange, on a pooled connection when one is idle
/// (retrying on a fresh one if the pooled one turns out closed before the request went out),
/// and returns the response to give the client: the body streamed, or, after a `101`, both
/// connections spliced.
pub(crate) async fn forward<C, F>(
    app: &crate::app::App,
    req: Request<Incoming>,
    rewrite: Rewrite,
    audit: Audit,
    upstream: Upstream<C>,
) -> Response<ResponseBody>
where
    C: FnOnce() -> F,
    F: std::future::Future<Output = Fresh>,
{
    let (prepared, audit) = match prepare(req, rewrite, audit) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let upgrade = prepared.upgrade;
    let upstream_req = prepared.req;
    let pool = &app.upstreams;
    // Ok: answered on a pooled connection; Err: still to send.
    let mut outcome = Err(upstream_req);
    if !upgrade {
        while let Err(req) = outcome {
            let Some((mut sender, session)) =
                pool.checkout(&upstream.target, &app.registry, &upstream.client_key)
            else {
                outcome = Err(req);
                break;
            };
            let answer = tokio::select! {
                answer = sender.try_send_request(req) => answer,
                () = pool::gone_silent(&app.registry, &upstream.client_key, Some(session)) => {
                    return audit.respond(went_silent(&upstream.what));
                }
            };
            outcome = match answer {
                Ok(resp) => {
                    app.metrics.dial("pooled");
                    pool.checkin(upstream.target.clone(), session, sender);
                    Ok(resp)
                }
                Err(mut err) => match err.take_message() {
                    // Not sent: that connection was gone; try the next one.
                    Some(req) => Err(req),
                    None => {
                        return audit.respond(text(
                            StatusCode::BAD_GATEWAY,
                            format!(
                                "error from {} through the tunnel: {}",
                                upstream.what,
                                error_chain(&err.into_error())
                            ),
                        ));
                    }
                },
            };
        }
    }
    let resp = match outcome {
        Ok(resp) => resp,
        Err(upstream_req) => {
            let exchange = async {
                let (mut sender, session) = (upstream.connect)().await?;
                let resp = sender.send_request(upstream_req).await.map_err(|err| {
                    text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "error from {} through the tunnel (the agent may have refused the dial): {}",
                            upstream.what,
                            error_chain(&err)
                        ),
                    )
                })?;
                if let (false, Some(session)) = (upgrade, session) {
                    pool.checkin(upstream.target.clone(), session, sender);
                }
                Ok(resp)
            };
            // The session a fresh dial goes through is the current one (the dial itself fails
            // at once with 503 when there is none, or it is already silent).
            let watched = pool::current_session(&app.registry, &upstream.client_key);
            let answer = tokio::select! {
                answer = exchange => answer,
                () = pool::gone_silent(&app.registry, &upstream.client_key, watched), if watched.is_some() => {
                    Err(went_silent(&upstream.what))
                }
            };
            match answer {
                Ok(resp) => resp,
                Err(resp) => return audit.respond(resp),
            }
        }
    };
    relay(resp, prepared.client_upgrade, prepared.slot, audit)
}

/// The client's response from the upstream one: its body streamed (counted, cut when the
/// user's access is revoked), or after a `101` both upgraded connections spliced.
pub(crate) fn relay(
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    slot: Option<tunnel_proto::driver::acceptor::ConnectionSlot>,
    audit: Audit,
) -> Response<ResponseBody> {
    audit
        .status
        .store(resp.status().as_u16(), Ordering::Relaxed);

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return audit.respond(text(
                StatusCode::BAD_GATEWAY,
                "the target switched protocols without being asked to",
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let mut out = crate::http_util::empty(StatusCode::SWITCHING_PROTOCOLS);
        for (name, value) in resp.headers() {
            out.headers_mut().append(name, value.clone());
        }
        tokio::spawn(async move {
            splice(client_upgrade, upstream_upgrade, audit).await;
            drop(slot);
        });
        return out;
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let bytes_out = audit.bytes_out.clone();
    let revoked = audit.revoked();
    let body = Counted {
        inner: body,
        count: bytes_out,
        _audit: Some(Arc::new(audit)),
    }
    .map_err(|e| -> BoxError { Box::new(e) });
    let body = Revocable {
        inner: body,
        revoked: Box::pin(revoked.cancelled_owned()),
    }
    .boxed();
    Response::from_parts(parts, body)
}

/// A response body that ends with an error (the client sees the response cut off) when the
/// user's authority over it is revoked: a `watch` or `logs -f` must not outlive its token.
struct Revocable<B> {
    inner: B,
    revoked: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

/// The error a [`Revocable`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the user's access was revoked")]
struct AccessRevoked;

impl<B> Body for Revocable<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(AccessRevoked))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request whose tunnel went silent while it waited for the response head.
fn went_silent(what: &str) -> Response<ResponseBody> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "{what} is not responding: its tunnel went silent while the request waited for an answer (the agent's link is down or it stopped)"
        ),
    )
}

/// Joins an upgraded client connection with the upgraded upstream one.
///
/// The tunnel has no half-close (remotedialer's Close ends both directions), so a client that
/// shuts down its write side (the docker CLI does after stdin ends, and at once when no stdin is
/// attached) must not close the upstream: its output would be cut off. Client EOF therefore
/// only ends the client-to-upstream copy; the exchange ends when the upstream ends (or either
/// side fails), and then the client's write side is shut down.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    audit: Audit,
) {
    use tokio::io::AsyncWriteExt;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    let (mut client_rd, mut client_wr) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_rd, mut upstream_wr) = tokio::io::split(TokioIo::new(upstream));
    let bytes_in = audit.bytes_in.clone();
    let bytes_out = audit.bytes_out.clone();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut client_rd, &mut buf).await {
                Ok(0) => {
                    // Client half-close: keep the upstream open for its output.
                    let _ = upstream_wr.flush().await;
                    return std::future::pending::<()>().await;
                }
                Ok(n) => n,
                Err(_) => return,
            };
            if upstream_wr.write_all(&buf[..n]).await.is_err() || upstream_wr.flush().await.is_err()
            {
                return;
            }
            bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut upstream_rd, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client_wr.write_all(&buf[..n]).await.is_err() || client_wr.flush().await.is_err() {
                return;
            }
            bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = client_wr.shutdown().await;
    };
    let revoked = audit.revoked();
    tokio::select! {
        () = up => {}
        () = down => {}
        () = revoked.cancelled() => {}
    }
    drop(audit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_forged_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer user"));
        h.insert("impersonate-user", HeaderValue::from_static("admin"));
        h.append(
            "impersonate-group",
            HeaderValue::from_static("system:masters"),
        );
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("x"));
        h.insert("connection", HeaderValue::from_static("Upgrade, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("SPDY/3.1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        strip_client_credentials(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["accept", "connection", "upgrade"]);
        assert_eq!(h["connection"], "Upgrade");
    }
}
