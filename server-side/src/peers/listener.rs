//! The peer listener: mutual TLS with the server's CA, and on it only forwarded proxy
//! requests (`/k8s/clusters/…`, `/docker/nodes/…`) naming the forwarding replica and the user.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{FORWARDED_BY, FORWARDED_USER, Forwarded};
use crate::app::SharedApp;
use crate::http_util::text;

/// Bound on a peer's TLS handshake and on its request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Peer connections open at once (each carries one request at a time; upgraded ones stay
/// open while spliced).
const MAX_CONNECTIONS: usize = 4096;

/// Serves the peer listener until `shutdown`.
pub async fn serve(
    app: SharedApp,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, remote) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "peer listener: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, shutdown) = (app.clone(), acceptor.clone(), shutdown.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::warn!(%remote, error = %err, "peer listener: TLS refused (a client certificate from the server's CA is required)");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "peer listener: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(app, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// One forwarded request: its forwarding headers become a [`Forwarded`] and it is routed as
/// any other; anything else is refused.
async fn answer(
    app: SharedApp,
    mut req: Request<Incoming>,
) -> http::Response<tunnel_proto::driver::acceptor::ResponseBody> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let (Some(by), Some(user_id)) = (header(FORWARDED_BY), header(FORWARDED_USER)) else {
        return text(
            StatusCode::BAD_REQUEST,
            "the peer listener serves forwarded requests only (no forwarding headers)",
        );
    };
    let path = req.uri().path();
    if !(path.starts_with("/k8s/clusters/") || path.starts_with("/docker/nodes/")) {
        return text(
            StatusCode::NOT_FOUND,
            "the peer listener serves forwarded proxy requests only",
        );
    }
    req.headers_mut().remove(FORWARDED_BY);
    req.headers_mut().remove(FORWARDED_USER);
    req.extensions_mut().insert(Forwarded { by, user_id });
    crate::routes::route(app, req).await
}
