//! The second tunnel (spec §4.5): what Rancher needs before it marks a cluster Connected.
//!
//! The Go agent's embedded Rancher dials `wss://<server>/v3/connect` again with only
//! `Authorization: Bearer stv-cluster-<token>`, as a remotedialer client that allows every
//! Connect and hands every stream, whatever its address, to an in-process HTTP/1.1 server
//! (steve). The management server probes `GET http://not-used/ping` through it every 15 s and
//! proxies the dashboard's `/k8s/clusters/<id>/v1/…` calls to `127.0.0.1:6080` through it.
//!
//! This agent serves the same way, with a much smaller handler: `GET /ping` → `pong`,
//! `GET /healthz` → `ok`; everything else is answered 404 with a text that says it is not
//! served (see README.md for what that leaves out).

use std::convert::Infallible;
use std::sync::Arc;

use agent_core::allow::AllowList;
use agent_core::config::CommonConfig;
use agent_core::env::ConfigError;
use agent_core::runtime::{
    ConnectorFactory, StreamHandler, TunnelSpec, UrlSource, connector_config,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tunnel_proto::driver::connector::{Connector, Trust};

/// The metrics/log name of this tunnel.
pub const STEVE_TUNNEL: &str = "steve";

/// The steve tunnel's spec: `url` (the main tunnel's server, always `/v3/connect`), the bearer
/// header, the same trust as the main tunnel, an allow-all list, and an in-process HTTP/1.1 server on every stream.
pub fn steve_tunnel(
    common: &CommonConfig,
    url: String,
    token: &str,
    trust: Trust,
) -> Result<TunnelSpec, ConfigError> {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer stv-cluster-{token}")).map_err(|_| {
        ConfigError::invalid("token", "(redacted)", "not a valid HTTP header value")
    })?;
    headers.insert(http::header::AUTHORIZATION, value);
    let c = common.clone();
    let connector: ConnectorFactory = Arc::new(move |url: &str| {
        Connector::new(connector_config(url, headers.clone(), trust.clone(), &c)).map_err(|e| {
            ConfigError::Other {
                name: "steve tunnel".to_owned(),
                reason: e.to_string(),
            }
        })
    });
    // Checked once up front so a bad setting fails start-up rather than the loop.
    connector(&url)?;
    let url: UrlSource = Arc::new(move || url.clone());
    let handler: StreamHandler = Arc::new(|stream, _metrics, drain| {
        Box::pin(async move {
            let target = stream.target().to_string();
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(route(req.method(), req.uri().path()))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(error) = r {
                    tracing::debug!(%target, %error, "steve stream ended with an error");
                },
                () = drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        })
    });
    Ok(TunnelSpec {
        name: STEVE_TUNNEL,
        url,
        connector,
        allow: AllowList::All,
        handler,
        connected_marker: None,
        on_connect: None,
    })
}

fn route(method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body): (StatusCode, Bytes) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/ping") => (StatusCode::OK, Bytes::from_static(b"pong")),
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, Bytes::from_static(b"ok")),
        _ => {
            tracing::debug!(%method, path, "steve request not served");
            (
                StatusCode::NOT_FOUND,
                Bytes::from(format!(
                    "{method} {path} is not served by the Rust cattle-cluster-agent: it has no \
                     embedded Rancher (steve /v1 API, kubectl shell, …); only /ping and /healthz\n"
                )),
            )
        }
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(&Method::GET, "/ping").status(), StatusCode::OK);
        assert_eq!(route(&Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(
            route(&Method::GET, "/v1/schemas").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/ping").status(),
            StatusCode::NOT_FOUND
        );
    }
}
