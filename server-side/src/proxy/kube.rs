//! `/k8s/clusters/<cluster-id>/…`: the Kubernetes API of a connected cluster.
//!
//! The user authenticates with an API token (401), must hold a grant on the cluster (403; admins
//! reach every cluster), and the request goes through the cluster agent's tunnel to the
//! apiserver address the agent reported, over TLS verified with the CA the agent reported. The
//! server authenticates as the agent's service account and impersonates the user
//! (`Impersonate-User`, `Impersonate-Group`); whatever credentials or impersonation headers the
//! client sent are dropped. The `/k8s/clusters/<id>` prefix is removed.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tunnel_proto::driver::acceptor::{ClientKey, ResponseBody};
use tunnel_proto::mux::StreamError;

use super::pool::{current_session, usable_sessions};
use super::{Audit, Fresh, ProxyError, Rewrite, Upstream, dial_label, forward, handshake};
use crate::app::SharedApp;
use crate::http_util::{store_failure, text};
use crate::store::Cluster;

/// Bound on the TLS handshake with the apiserver through the tunnel.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one request for cluster `cluster_id`; `rest` is the path after the prefix (starting
/// with `/`, or empty) and `query` the query string.
pub async fn handle(
    app: SharedApp,
    req: Request<Incoming>,
    cluster_id: &str,
    rest: &str,
) -> Response<ResponseBody> {
    let (mut audit, user) = match Audit::authenticate(&app, &req, "k8s", cluster_id).await {
        Ok(started) => started,
        Err(resp) => return resp,
    };
    let cluster = match app.store.cluster(cluster_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return audit.respond(text(
                StatusCode::NOT_FOUND,
                format!("cluster {cluster_id} not found"),
            ));
        }
        Err(err) => return audit.respond(store_failure(&err)),
    };
    audit.reaches_cluster(cluster_id);
    match app.store.is_granted(&user.id, cluster_id).await {
        Ok(true) => {}
        Ok(false) if user.admin => {}
        Ok(false) => {
            return audit.respond(text(
                StatusCode::FORBIDDEN,
                format!("user {} has no access to cluster {cluster_id}", user.name),
            ));
        }
        Err(err) => return audit.respond(store_failure(&err)),
    }
    let client_key = ClientKey::new(cluster_id);
    let (req, audit) =
        match crate::peers::forward_unless_local(&app, req, audit, &user, &client_key).await {
            Ok(local) => local,
            Err(resp) => return resp,
        };
    let target = match Target::of(&cluster) {
        Ok(t) => t,
        Err(err) => return audit.respond(err.into_response()),
    };
    let mut set_headers = vec![
        (http::header::AUTHORIZATION, target.bearer.clone()),
        (
            HeaderName::from_static("impersonate-user"),
            match HeaderValue::from_str(&user.name) {
                Ok(v) => v,
                Err(_) => {
                    return audit.respond(text(
                        StatusCode::BAD_REQUEST,
                        "user name is not a valid header value",
                    ));
                }
            },
        ),
    ];
    for group in &user.groups {
        if let Ok(v) = HeaderValue::from_str(group) {
            set_headers.push((HeaderName::from_static("impersonate-group"), v));
        }
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let rewrite = Rewrite {
        path_and_query,
        host: target.authority.clone(),
        set_headers,
    };
    let upstream = Upstream {
        target: format!("k8s/{cluster_id}/{}/{}", target.authority, target.ca_digest),
        client_key: client_key.clone(),
        what: format!("the apiserver of {cluster_id} at {}", target.authority),
        connect: || connect(&app, client_key, target),
    };
    forward(&app, req, rewrite, audit, upstream).await
}

/// Dials the apiserver through the cluster's tunnel, does TLS with the agent's CA and the
/// HTTP/1.1 handshake.
///
/// A draining replica of the cluster agent (its pod deleted, or replaced in a rolling update)
/// refuses every dial until it exits while its tunnel stays registered, and as the newest
/// session it is the one dialed first. When the agent refuses, the dial is made again through
/// the cluster's other healthy sessions, newest first: the refusal comes back on the first read
/// of the TLS handshake, before anything of the request went out, so another replica can serve
/// it.
async fn connect(app: &SharedApp, key: ClientKey, target: Target) -> Fresh {
    let cluster_id = key.as_str();
    let session = current_session(&app.registry, &key);
    let stream = match app.registry.open(&key, "tcp", &target.authority) {
        Ok(s) => {
            app.metrics.dial("ok");
            s
        }
        Err(err) => {
            app.metrics.dial(dial_label(&err));
            let who = format!("cluster agent of {cluster_id}");
            return Err(ProxyError::from_dial(err, &who).into_response());
        }
    };
    let mut refusal = match tls_connect(&target, stream, cluster_id).await {
        Ok(tls) => return Ok((handshake(tls).await?, session)),
        Err(Handshake::Failed(resp)) => return Err(resp),
        Err(Handshake::Refused(err)) => err,
    };
    for other in usable_sessions(&app.registry, &key) {
        if Some(other.id()) == session {
            continue;
        }
        let Ok(stream) = other.tunnel().open("tcp", &target.authority) else {
            continue;
        };
        app.metrics.dial("retried_after_refusal");
        match tls_connect(&target, stream, cluster_id).await {
            Ok(tls) => return Ok((handshake(tls).await?, Some(other.id()))),
            Err(Handshake::Failed(resp)) => return Err(resp),
            Err(Handshake::Refused(err)) => refusal = err,
        }
    }
    Err(text(
        StatusCode::BAD_GATEWAY,
        format!(
            "cannot reach the apiserver of {cluster_id} at {}: every cluster agent refused the dial ({refusal})",
            target.authority
        ),
    ))
}

/// Why a TLS handshake through the tunnel did not complete.
enum Handshake {
    /// The agent refused the dial (a draining agent refuses all): another session may serve.
    Refused(std::io::Error),
    /// Anything else, with the response it deserves.
    Failed(Response<ResponseBody>),
}

/// The TLS handshake with the apiserver over a freshly dialed stream, bounded in time.
async fn tls_connect(
    target: &Target,
    stream: tunnel_proto::driver::Stream,
    cluster_id: &str,
) -> Result<tokio_rustls::client::TlsStream<tunnel_proto::driver::Stream>, Handshake> {
    let connector = tokio_rustls::TlsConnector::from(target.tls.clone());
    match tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        connector.connect(target.server_name.clone(), stream),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(err)) if is_refusal(&err) => Err(Handshake::Refused(err)),
        Ok(Err(err)) => Err(Handshake::Failed(text(
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot reach the apiserver of {cluster_id} at {} through the tunnel: {err}",
                target.authority
            ),
        ))),
        Err(_) => Err(Handshake::Failed(text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("TLS handshake with the apiserver of {cluster_id} timed out"),
        ))),
    }
}

/// Whether `err` is the agent refusing the Connect (remotedialer's `connect not allowed`).
fn is_refusal(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<StreamError>())
        .is_some_and(|e| matches!(e, StreamError::Refused(_)))
}

/// Where and how to reach a cluster's apiserver.
struct Target {
    authority: String,
    /// Short digest of the CA, so pooled connections are keyed by what they trust.
    ca_digest: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    bearer: HeaderValue,
}

impl Target {
    fn of(cluster: &Cluster) -> Result<Self, ProxyError> {
        let (Some(endpoint), Some(ca), Some(token)) =
            (&cluster.api_endpoint, &cluster.ca_cert, &cluster.sa_token)
        else {
            return Err(ProxyError::Unavailable(format!(
                "the cluster agent of {} has not registered yet",
                cluster.id
            )));
        };
        let uri: http::Uri = endpoint.parse().map_err(|_| {
            ProxyError::BadGateway(format!(
                "invalid apiEndpoint {endpoint:?} reported by the agent"
            ))
        })?;
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(443);
        let authority = format!("{host}:{port}");
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(bare_host).map_err(|_| {
            ProxyError::BadGateway(format!(
                "invalid apiserver host {host:?} reported by the agent"
            ))
        })?;
        let ca_pem = data_encoding::BASE64
            .decode(ca.trim().as_bytes())
            .map_err(|_| ProxyError::BadGateway("the agent's caCert is not base64".to_owned()))?;
        let tls = client_tls(&ca_pem).map_err(ProxyError::BadGateway)?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ProxyError::BadGateway("the agent's token is not a valid header value".to_owned())
        })?;
        let ca_digest = crate::tokens::sha256_hex(&ca_pem)[..16].to_owned();
        Ok(Self {
            authority,
            ca_digest,
            server_name,
            tls,
            bearer,
        })
    }
}

/// A TLS client configuration trusting only the CA(s) in `ca_pem`, HTTP/1.1 by ALPN.
pub fn client_tls(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("the agent's caCert is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the agent's caCert is not a usable CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the agent's caCert holds no certificate".to_owned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
