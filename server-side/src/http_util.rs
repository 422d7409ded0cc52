//! Small HTTP helpers shared by the handlers.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tunnel_proto::driver::acceptor::{ResponseBody, full_body, text_response};

use crate::app::App;
use crate::store::User;

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

/// Why a user could not be authenticated: 401 (no or bad token) or 500 (store failure).
pub fn authenticate(app: &App, headers: &HeaderMap) -> Result<User, Response<ResponseBody>> {
    let Some(token) = bearer(headers) else {
        return Err(unauthorized("missing bearer token"));
    };
    match app.store.authenticate(token) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(unauthorized("invalid or revoked token")),
        Err(err) => Err(internal(&err)),
    }
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

/// Empty-bodied response with a status.
pub fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut resp = Response::new(full_body(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
