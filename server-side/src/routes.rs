//! The router behind the acceptor: every request that is not a tunnel upgrade.
//!
//! | path | what |
//! |---|---|
//! | `GET /ping` | `pong` (agents' pre-flight) |
//! | `GET /healthz` | `ok` |
//! | `GET /v3/settings/cacerts` | JSON setting, `value` = the CA PEM, trimmed |
//! | `GET /cacerts` | the CA PEM |
//! | `/v3/connect/config` | 404 (≤ 2.11 agents: "no plan") |
//! | `GET /v3/import/<token>_<cluster-id>.yaml` | the import manifest |
//! | `/k8s/clusters/<cluster-id>/…` | the cluster's Kubernetes API ([`crate::proxy::kube`]) |
//! | `/docker/nodes/<node-id>/…` | the node's Docker API ([`crate::proxy::docker`]) |
//! | `/v1/…` | the management API ([`crate::api`]) |
//! | `GET /metrics` | Prometheus text, for an admin's API token (or without one on `--metrics-listen`) |
//! | `/`, `/assets/…`, `/console/…` | the web console ([`crate::console`]) |
//!
//! A request to `/k8s`, `/docker` or `/v1` with the console's session cookie and no
//! `Authorization` gets its session's bearer token first ([`crate::session`]; mutations need the
//! CSRF token), so the console goes through exactly the checks the CLI does.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tunnel_proto::driver::acceptor::ResponseBody;

use crate::app::SharedApp;
use crate::http_util::{json_response, text};
use crate::import::{ImportParams, render};
use crate::tokens::valid_id;

/// Longest request path (and query) accepted; hyper bounds the header block as a whole.
pub const MAX_URI_LEN: usize = 8 << 10;

/// Answers one request.
pub async fn route(app: SharedApp, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let uri_len = req.uri().path().len() + req.uri().query().map_or(0, str::len);
    if uri_len > MAX_URI_LEN {
        return text(StatusCode::URI_TOO_LONG, "request URI too long");
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    tracing::debug!(%method, %path, "request");

    let proxied_or_api = path.starts_with("/k8s/clusters/")
        || path.starts_with("/docker/nodes/")
        || path == "/v1"
        || path.starts_with("/v1/");
    if proxied_or_api {
        let now = tokio::time::Instant::now();
        if let Err(err) = app.sessions.authorize(&method, req.headers_mut(), now) {
            let status = match err {
                crate::session::SessionError::Unknown => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            return text(status, err.to_string());
        }
    }
    if crate::console::is_console_path(&path) {
        return crate::console::handle(app, req).await;
    }

    if let Some(rest) = path.strip_prefix("/k8s/clusters/") {
        let (id, rest) = split_id(rest);
        if !valid_id(id) {
            return text(StatusCode::BAD_REQUEST, "invalid cluster id");
        }
        return crate::proxy::kube::handle(app.clone(), req, id, rest).await;
    }
    if let Some(rest) = path.strip_prefix("/docker/nodes/") {
        let (id, rest) = split_id(rest);
        if !crate::store::valid_node_reference(id) {
            return text(StatusCode::BAD_REQUEST, "invalid node id");
        }
        return crate::proxy::docker::handle(app.clone(), req, id, rest).await;
    }
    if path == "/v1" || path.starts_with("/v1/") {
        return crate::api::handle(app, req).await;
    }
    if let Some(name) = path.strip_prefix("/v3/import/") {
        return import(&app, &req, name).await;
    }

    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/ping") => text(StatusCode::OK, "pong"),
        (Method::GET | Method::HEAD, "/healthz") => text(StatusCode::OK, "ok"),
        (Method::GET, "/v3/settings/cacerts") => json_response(
            StatusCode::OK,
            &serde_json::json!({
                "type": "setting",
                "id": "cacerts",
                "name": "cacerts",
                "value": app.config.cacerts,
            }),
        ),
        (Method::GET, "/cacerts") => {
            let mut resp = text(StatusCode::OK, app.config.cacerts.clone());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-pem-file"),
            );
            resp
        }
        (_, "/v3/connect/config") => text(StatusCode::NOT_FOUND, "404 page not found"),
        (Method::GET, "/metrics") => match crate::http_util::authenticate(&app, &req).await {
            Ok(user) if user.admin => metrics(&app),
            Ok(user) => text(
                StatusCode::FORBIDDEN,
                format!("user {} is not an admin", user.name),
            ),
            Err(resp) => resp,
        },
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// The Prometheus text of the server's metrics.
pub fn metrics(app: &SharedApp) -> Response<ResponseBody> {
    let mut resp = text(
        StatusCode::OK,
        app.metrics.render(&app.registry, app.upstreams.live()),
    );
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Serves `GET /metrics` without authentication on a listener of its own
/// (`--metrics-listen`: a private address for Prometheus), until `shutdown`. Nothing else is
/// served there.
pub async fn serve_metrics(
    app: SharedApp,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => metrics(&app),
                    _ => text(StatusCode::NOT_FOUND, "404 page not found"),
                })
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(10))
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// `<id>/rest…` → (`<id>`, `/rest…`).
fn split_id(s: &str) -> (&str, &str) {
    match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

async fn import(app: &SharedApp, req: &Request<Incoming>, name: &str) -> Response<ResponseBody> {
    let invalid = || {
        text(
            StatusCode::BAD_REQUEST,
            "cluster not found or invalid token",
        )
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let Some((token, cluster_id)) = name.strip_suffix(".yaml").and_then(|n| n.rsplit_once('_'))
    else {
        return invalid();
    };
    if !valid_id(cluster_id) {
        return invalid();
    }
    // The token in the path is a credential: guessing it costs like a guessed tunnel token.
    let now = tokio::time::Instant::now();
    let addr = req
        .extensions()
        .get::<tunnel_proto::driver::acceptor::PeerAddr>()
        .map(|p| crate::auth_limit::AddrKey::of(p.0.ip()));
    if let Some(addr) = addr.filter(|_| !app.known_good.contains(token))
        && let Err(retry_after) =
            crate::http_util::auth_limit_gate(app, addr, now, crate::http_util::Credential::Tunnel)
    {
        return crate::http_util::too_many_failures(addr, retry_after);
    }
    match app.store.cluster_for_registration_token(token).await {
        Ok(Some(owner)) if owner == cluster_id => app.known_good.insert(token, now),
        Ok(_) => {
            app.known_good.remove(token);
            app.metrics.agent_auth_failure("unknown_token");
            if let Some(addr) = addr {
                app.auth_limiter.record_failure(addr, now);
                app.metrics.set_auth_limit_addresses(app.auth_limiter.len());
            }
            return invalid();
        }
        Err(err) => return crate::http_util::store_failure(&err),
    }
    let node_agent = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "nodeAgent=true"));
    let checksum = app.ca_checksum();
    let yaml = render(&ImportParams {
        server_url: &app.config.server_url,
        token,
        ca_checksum: &checksum,
        agent_image: &app.config.agent_image,
        node_agent_image: &app.config.node_agent_image,
        node_agent,
    });
    text(StatusCode::OK, yaml)
}
