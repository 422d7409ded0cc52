//! Small HTTP helpers shared by the handlers.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tunnel_proto::driver::acceptor::{PeerAddr, ResponseBody, full_body, text_response};

use crate::app::App;
use crate::auth_limit::{AddrKey, Verdict};
use crate::store::{StoreError, User};

/// A JSON response.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<ResponseBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
    let mut resp = Response::new(full_body(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    text_response(status, body)
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The user behind a request's bearer token; otherwise the response to give: 401 (no, invalid,
/// revoked or expired token), 429 (the address failed authentication too often, see
/// [`crate::auth_limit`]; the same limiter as the tunnel endpoints), 503 (the store is busy) or
/// 500 (store failure). It only reads the store: the token's use is noted in memory.
///
/// A missing token is not counted as a failure (it guesses nothing); an invalid one is. A token
/// this process has accepted before skips the limit, so one client's guessing does not lock out
/// the others behind its NAT address.
pub async fn authenticate<B>(
    app: &App,
    req: &http::Request<B>,
) -> Result<User, Response<ResponseBody>> {
    let Some(token) = bearer(req.headers()) else {
        return Err(unauthorized("missing bearer token"));
    };
    let now = tokio::time::Instant::now();
    let addr = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| AddrKey::of(p.0.ip()));
    if let Some(addr) = addr.filter(|_| !app.known_good.contains(token))
        && let Err(retry_after) = auth_limit_gate(app, addr, now, Credential::ApiToken)
    {
        return Err(too_many_failures(addr, retry_after));
    }
    match app.store.authenticate(token).await {
        Ok(Some(user)) => {
            app.known_good.insert(token, now);
            Ok(user)
        }
        Ok(None) => {
            app.known_good.remove(token);
            app.metrics.user_auth_failure();
            if let Some(addr) = addr {
                app.auth_limiter.record_failure(addr, now);
                app.metrics.set_auth_limit_addresses(app.auth_limiter.len());
            }
            Err(unauthorized("invalid, revoked or expired token"))
        }
        Err(err) => Err(store_failure(&err)),
    }
}

/// 429 with `Retry-After`, for an address refused by the failed-authentication limit.
pub fn too_many_failures(addr: AddrKey, retry_after: u64) -> Response<ResponseBody> {
    let mut resp = text(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many failed authentications from {addr}: retry after {retry_after}s"),
    );
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp
}

/// What a rate-limited request presented, for the limiter's metrics and log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An agent's tunnel request (`/v3/connect`).
    Tunnel,
    /// A user's API token (`/k8s`, `/docker`, `/v1`).
    ApiToken,
}

/// The failed-authentication limit for a request from `addr` (see [`crate::auth_limit`]):
/// `Err(retry_after_secs)` when it is refused, counted and logged once per address and window.
pub fn auth_limit_gate(
    app: &App,
    addr: AddrKey,
    now: tokio::time::Instant,
    what: Credential,
) -> Result<(), u64> {
    let verdict = app.auth_limiter.check(addr, now);
    let Verdict::Refuse { log, .. } = verdict else {
        return Ok(());
    };
    let retry_after = verdict.retry_after_secs();
    match what {
        Credential::Tunnel => app.metrics.agent_auth_rate_limited(),
        Credential::ApiToken => app.metrics.user_auth_rate_limited(),
    }
    if let Some(refused) = log {
        let kind = match what {
            Credential::Tunnel => "tunnel",
            Credential::ApiToken => "API token",
        };
        tracing::warn!(
            remote = %addr,
            refused,
            retry_after,
            "too many failed {kind} authentications from this address: its requests are refused before any lookup (logged once a minute per address)"
        );
    }
    Err(retry_after)
}

/// 401 with a `WWW-Authenticate` challenge.
pub fn unauthorized(msg: &str) -> Response<ResponseBody> {
    let mut resp = text(StatusCode::UNAUTHORIZED, format!("Unauthorized: {msg}"));
    resp.headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    resp
}

/// 500 for a failure that is ours; the details go to the log, not the client.
pub fn internal(err: &dyn std::fmt::Display) -> Response<ResponseBody> {
    tracing::error!(error = %err, "internal error");
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// The answer to a failed store call: 503 with `Retry-After: 1` when the store is busy (its
/// queue is full), 503 with `Retry-After: 5` when the Kubernetes store's apiserver is
/// unavailable, else 500.
pub fn store_failure(err: &StoreError) -> Response<ResponseBody> {
    match err {
        StoreError::Busy { .. } => {
            tracing::warn!(error = %err, "store busy: request refused");
            let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "store busy, retry later");
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        StoreError::Backend(_) => {
            // The apiserver of the Kubernetes store is down or refusing: the request may
            // succeed later, as with a busy store. (Debug only: the store's watches already
            // say once that the apiserver is gone; a line per request would flood the log.)
            tracing::debug!(error = %err, "store unavailable: request refused");
            let mut resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store's apiserver is unavailable, retry later",
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
        other => internal(other),
    }
}

/// Empty-bodied response with a status.
pub fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut resp = Response::new(full_body(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
