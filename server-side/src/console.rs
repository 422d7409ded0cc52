//! The web console: a single-page application (`server-side/console`, Preact + TypeScript built
//! by Vite) embedded in the binary, its sign-in, and its live feed.
//!
//! | path | what |
//! |---|---|
//! | `GET /`, `GET /index.html` | the page (`no-cache`: it names the current asset files) |
//! | `GET /assets/…` | the built scripts and styles (names carry a content hash: cached for a year) |
//! | `POST /console/session` | sign in: `{"token": "<API token>"}` → session cookie + `{user, csrfToken}` |
//! | `GET /console/session` | who the session's user is, and its CSRF token again (after a reload); `{"user": null}` without a session |
//! | `DELETE /console/session` | sign out (needs the CSRF token) |
//! | `GET /console/events` | server-sent events: `cluster` with `{"id"}` when a cluster's tunnel or Connected changes |
//!
//! The console has no API of its own: it calls `/v1`, `/k8s` and `/docker` with its cookie,
//! which [`crate::session`] turns into the user's bearer token, so the same checks apply as to
//! the CLI. The files come from `build.rs`; a binary built without `console/dist` answers `/`
//! with a page saying how to build it.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tunnel_proto::driver::acceptor::{ResponseBody, full_body};
use tunnel_proto::driver::registry::RegistryEvent;

use crate::app::SharedApp;
use crate::http_util::{authenticate, json_response};
use crate::session::{SessionError, check_csrf, clear_cookie, session_cookie};
use crate::store::{TunnelEnd, User};

/// The built console: (URL path, content type, bytes), from `build.rs`.
static ASSETS: &[(&str, &str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// How often an idle event stream sends a comment, so proxies and the browser keep it open.
const EVENTS_KEEPALIVE: Duration = Duration::from_secs(15);

/// The page's policy: everything from this origin only, no inline script, no framing. Inline
/// `<style>` is allowed because xterm.js writes its cell sizes and theme into style elements
/// it creates (it has no nonce option); styles cannot run code, scripts stay 'self' only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>tunnel-server</title></head><body><h1>tunnel-server</h1><p>This binary was built \
without the web console. Build it with <code>npm ci &amp;&amp; npm run build</code> in \
<code>server-side/console</code>, then rebuild the server.</p></body></html>";

/// Whether a path is the console's (the router sends it here).
pub fn is_console_path(path: &str) -> bool {
    path == "/"
        || path == "/index.html"
        || path.starts_with("/assets/")
        || path == "/console"
        || path.starts_with("/console/")
}

/// Whether the binary holds a built console.
pub fn is_built() -> bool {
    ASSETS.iter().any(|(p, _, _)| *p == "/index.html")
}

/// Serves one console request.
pub async fn handle(app: SharedApp, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/console/session") => sign_in(&app, req).await,
        (Method::GET, "/console/session") => whoami(&app, &req).await,
        (Method::DELETE, "/console/session") => sign_out(&app, &req),
        (Method::GET, "/console/events") => events(app, req).await,
        (Method::GET | Method::HEAD, "/" | "/index.html") => page(),
        (Method::GET | Method::HEAD, p) if p.starts_with("/assets/") => asset(p),
        _ => crate::api::error(StatusCode::NOT_FOUND, "no such console path"),
    }
}

fn with_security_headers(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

fn page() -> Response<ResponseBody> {
    let body: &'static [u8] = ASSETS
        .iter()
        .find(|(p, _, _)| *p == "/index.html")
        .map_or(NOT_BUILT.as_bytes(), |(_, _, b)| b);
    let mut resp = Response::new(full_body(Bytes::from_static(body)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(resp)
}

fn asset(path: &str) -> Response<ResponseBody> {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return crate::http_util::text(StatusCode::NOT_FOUND, "404 page not found");
    };
    let mut resp = Response::new(full_body(Bytes::from_static(bytes)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    with_security_headers(resp)
}

fn user_view(user: &User) -> serde_json::Value {
    json!({ "id": user.id, "name": user.name, "admin": user.admin, "groups": user.groups })
}

fn session_error(err: &SessionError) -> Response<ResponseBody> {
    let status = match err {
        SessionError::Unknown => StatusCode::UNAUTHORIZED,
        SessionError::MissingCsrf | SessionError::BadCsrf => StatusCode::FORBIDDEN,
    };
    crate::api::error(status, err.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// Checks the token as the API does (same limiter, same store lookup), then starts a session.
async fn sign_in(app: &SharedApp, req: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let sign_in: SignIn = match crate::api::read_json(body).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let token = sign_in.token.trim();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return crate::api::error(StatusCode::BAD_REQUEST, "the token has invalid characters");
    };
    // The request as the API would see it: the peer address (for the limiter) and the token.
    let mut probe = Request::new(());
    *probe.extensions_mut() = parts.extensions;
    probe
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    let user = match authenticate(app, &probe).await {
        Ok(user) => user,
        Err(resp) => return resp,
    };
    let (id, csrf) = app.sessions.create(token, tokio::time::Instant::now());
    tracing::info!(user = %user.name, "console sign-in");
    let mut resp = json_response(
        StatusCode::OK,
        &json!({ "user": user_view(&user), "csrfToken": csrf }),
    );
    if let Ok(cookie) = HeaderValue::from_str(&app.sessions.set_cookie(&id)) {
        resp.headers_mut().insert(SET_COOKIE, cookie);
    }
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn whoami(app: &SharedApp, req: &Request<Incoming>) -> Response<ResponseBody> {
    let now = tokio::time::Instant::now();
    let Some(session) = session_cookie(req.headers()).and_then(|id| app.sessions.get(id, now))
    else {
        // Not signed in is the page's normal first state, not an error (a 401 here would put
        // an error in the browser's console on every first visit).
        return json_response(StatusCode::OK, &json!({ "user": null }));
    };
    let mut headers = req.headers().clone();
    if let Err(err) = app.sessions.authorize(req.method(), &mut headers, now) {
        return session_error(&err);
    }
    let mut probe = Request::new(());
    *probe.headers_mut() = headers;
    if let Some(peer) = req
        .extensions()
        .get::<tunnel_proto::driver::acceptor::PeerAddr>()
    {
        probe.extensions_mut().insert(*peer);
    }
    match authenticate(app, &probe).await {
        Ok(user) => {
            let mut resp = json_response(
                StatusCode::OK,
                &json!({ "user": user_view(&user), "csrfToken": session.csrf }),
            );
            resp.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(resp) => resp,
    }
}

fn sign_out(app: &SharedApp, req: &Request<Incoming>) -> Response<ResponseBody> {
    let now = tokio::time::Instant::now();
    let Some(id) = session_cookie(req.headers()) else {
        return session_error(&SessionError::Unknown);
    };
    let Some(session) = app.sessions.get(id, now) else {
        return session_error(&SessionError::Unknown);
    };
    if let Err(err) = check_csrf(&session, req.headers()) {
        return session_error(&err);
    }
    app.sessions.remove(id);
    let mut resp = crate::http_util::empty(StatusCode::NO_CONTENT);
    if let Ok(cookie) = HeaderValue::from_str(&clear_cookie()) {
        resp.headers_mut().insert(SET_COOKIE, cookie);
    }
    resp
}

/// What the event stream tells the page.
enum Feed {
    /// This cluster's tunnels or Connected changed.
    Cluster(String),
    /// Events were missed: re-read everything.
    Resync,
    /// Nothing for a while.
    Keepalive,
}

/// `text/event-stream` of cluster changes the user may see (admins: all; others: the clusters
/// granted to them). The page re-reads `/v1/clusters` on each, so the feed itself carries no
/// state and a missed event costs one re-read.
async fn events(app: SharedApp, req: Request<Incoming>) -> Response<ResponseBody> {
    let (mut parts, _) = req.into_parts();
    if let Err(err) = app.sessions.authorize(
        &parts.method,
        &mut parts.headers,
        tokio::time::Instant::now(),
    ) {
        return session_error(&err);
    }
    let probe = Request::from_parts(parts, ());
    let user = match authenticate(&app, &probe).await {
        Ok(user) => user,
        Err(resp) => return resp,
    };
    let state = (
        app.clone(),
        user,
        app.registry.subscribe(),
        app.connectivity_changes.subscribe(),
        true,
    );
    let stream = futures_util::stream::unfold(
        state,
        |(app, user, mut registry, mut changes, first)| async move {
            if first {
                // Opens the stream at once (the browser's `open` event) and tells the page to
                // read the current state, which may have changed since it last did.
                let frame = Frame::data(Bytes::from_static(
                    b"retry: 2000\nevent: resync\ndata: {}\n\n",
                ));
                return Some((
                    Ok::<_, Infallible>(frame),
                    (app, user, registry, changes, false),
                ));
            }
            loop {
                let feed = tokio::select! {
                    ev = registry.recv() => match ev {
                        Ok(RegistryEvent::Added { key, .. } | RegistryEvent::Removed { key, .. }) => {
                            let key = key.as_str();
                            let end = TunnelEnd::of_client_key(key.strip_prefix("stv-cluster-").unwrap_or(key));
                            match end {
                                Some(end) => Feed::Cluster(end.cluster_id),
                                None => continue,
                            }
                        }
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => Feed::Resync,
                        Err(RecvError::Closed) => return None,
                    },
                    changed = changes.recv() => match changed {
                        Ok(id) => Feed::Cluster(id),
                        Err(RecvError::Lagged(_)) => Feed::Resync,
                        Err(RecvError::Closed) => return None,
                    },
                    () = tokio::time::sleep(EVENTS_KEEPALIVE) => Feed::Keepalive,
                };
                let text = match feed {
                    Feed::Cluster(id) => {
                        let visible = user.admin
                            || app.store.is_granted(&user.id, &id).await.unwrap_or(false);
                        if !visible {
                            continue;
                        }
                        format!("event: cluster\ndata: {}\n\n", json!({ "id": id }))
                    }
                    Feed::Resync => "event: resync\ndata: {}\n\n".to_owned(),
                    Feed::Keepalive => ": keepalive\n\n".to_owned(),
                };
                let frame = Frame::data(Bytes::from(text));
                return Some((Ok(frame), (app, user, registry, changes, false)));
            }
        },
    );
    let mut resp = Response::new(
        StreamBody::new(stream)
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_paths_are_only_the_consoles() {
        for p in [
            "/",
            "/index.html",
            "/assets/index-abc.js",
            "/console/session",
        ] {
            assert!(is_console_path(p), "{p}");
        }
        for p in [
            "/v1/clusters",
            "/k8s/clusters/c-1/api",
            "/ping",
            "/assetsx",
            "/consolex",
        ] {
            assert!(!is_console_path(p), "{p}");
        }
    }

    #[test]
    fn assets_have_a_content_type_and_the_page_a_policy() {
        for (path, content_type, _) in ASSETS {
            assert!(path.starts_with('/'), "{path}");
            assert!(!content_type.is_empty());
        }
        let resp = page();
        assert_eq!(resp.headers()["content-security-policy"], CSP);
        assert_eq!(resp.headers()[CACHE_CONTROL], "no-cache");
    }
}
