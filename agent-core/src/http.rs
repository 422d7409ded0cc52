//! A small HTTP/1.1 client for the few requests an agent makes outside the tunnel: the
//! pre-flight GETs to the server, the Kubernetes API call that writes `stv-aggregation`, and
//! `GET /info` on the Docker socket.
//!
//! hyper's connection-level client does the HTTP; this module only provides the transport:
//! TCP (through an HTTP `CONNECT` proxy when the proxy rules say so), then TLS for `https`
//! with the trust the caller chose, or a Unix socket. Each request gets a fresh connection and
//! an overall timeout; response bodies are bounded. That is all the agents need, and it keeps
//! reqwest and its dependency tree out.
//!
//! The TCP leg (proxy choice, `CONNECT`, proxy credentials) is tunnel-proto's
//! [`dial_tcp`], and the TLS configuration its [`client_config`], the very code the tunnel's
//! connector runs: a pre-flight request and the tunnel behind it trust the same certificates
//! and take the same way through the same proxy.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tunnel_proto::driver::connector::{
    ConnectError, DEFAULT_MAX_ERROR_BODY, ProxyConfig, TlsConfigError, Trust, client_config,
    dial_tcp,
};

/// Default bound on a response body.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL is not `http(s)://host[:port]/…`.
    #[error("invalid URL {0}")]
    Url(String),
    /// The trust settings cannot be turned into a TLS configuration.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] TlsConfigError),
    /// Connecting to the Unix socket failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// What was dialed.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The TCP leg failed: the server or the proxy unreachable, or the proxy refused or broke
    /// the `CONNECT` (tunnel-proto's [`dial_tcp`] error, which says which).
    #[error(transparent)]
    Dial(ConnectError),
    /// The server's certificate was not accepted (Go's `x509:` errors): unknown authority,
    /// expired, wrong name.
    #[error("TLS certificate of {server} not trusted: {reason}")]
    Certificate {
        /// The server name checked.
        server: String,
        /// rustls' reason.
        reason: String,
    },
    /// Another TLS failure.
    #[error("TLS handshake with {server}: {source}")]
    Tls {
        /// The server name.
        server: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// HTTP-level failure.
    #[error("HTTP: {0}")]
    Http(String),
    /// The request did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl HttpError {
    /// Whether this is a certificate verification failure (what Go reports as `x509: …`).
    pub fn is_certificate_error(&self) -> bool {
        matches!(self, Self::Certificate { .. })
    }
}

// === HttpClient ===

/// Sends one request per connection over TCP/TLS, through a proxy when the rules say so.
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<ClientConfig>,
    proxy: ProxyConfig,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("proxy", &self.proxy)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client trusting `trust`, going through `proxy` (credentials from its URLs), with each
    /// request bounded by `timeout`.
    pub fn new(trust: &Trust, proxy: ProxyConfig, timeout: Duration) -> Result<Self, HttpError> {
        Ok(Self {
            tls: client_config(trust).map_err(HttpError::TlsConfig)?,
            proxy,
            timeout,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// Sends `req` (absolute URI) and reads the whole response, within the timeout.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let deadline = Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, self.send_inner(req, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(self.timeout)),
        }
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response<Bytes>, HttpError> {
        let req = Request::get(url)
            .body(Bytes::new())
            .map_err(|e| HttpError::Url(format!("{url}: {e}")))?;
        self.send(req).await
    }

    async fn send_inner(
        &self,
        mut req: Request<Bytes>,
        deadline: Instant,
    ) -> Result<Response<Bytes>, HttpError> {
        let uri = req.uri().clone();
        let (tls, host, port) = split_uri(&uri)?;
        let addr = join_host_port(&host, port);
        let tcp = dial_tcp(
            &self.proxy,
            tls,
            &host,
            port,
            DEFAULT_MAX_ERROR_BODY,
            deadline,
        )
        .await
        .map_err(HttpError::Dial)?;
        // Origin-form request target on the wire; Host from the URL.
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let default_port = if tls { 443 } else { 80 };
        let host_header = if port == default_port {
            bracket(&host)
        } else {
            addr.clone()
        };
        *req.uri_mut() = path
            .parse()
            .map_err(|e| HttpError::Url(format!("{uri}: {e}")))?;
        if !req.headers().contains_key(http::header::HOST) {
            let value = http::HeaderValue::from_str(&host_header)
                .map_err(|e| HttpError::Url(format!("{uri}: {e}")))?;
            req.headers_mut().insert(http::header::HOST, value);
        }
        if tls {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| HttpError::Url(format!("{uri}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(&host, e))?;
            send_over(stream, req, self.max_body).await
        } else {
            send_over(tcp, req, self.max_body).await
        }
    }
}

/// Sends `req` over the Unix socket at `path` (for the Docker API), within `timeout`. The
/// request's URI is the origin form (`/info`); `Host` defaults to `docker`.
pub async fn unix_request(
    path: &Path,
    mut req: Request<Bytes>,
    timeout: Duration,
) -> Result<Response<Bytes>, HttpError> {
    if !req.headers().contains_key(http::header::HOST) {
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("docker"));
    }
    let fut = async {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| HttpError::Connect {
                addr: format!("unix:{}", path.display()),
                source,
            })?;
        send_over(sock, req, DEFAULT_MAX_BODY).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout(timeout)),
    }
}

async fn send_over<IO>(
    io: IO,
    req: Request<Bytes>,
    max_body: usize,
) -> Result<Response<Bytes>, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| HttpError::Http(e.to_string()))?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let resp = sender
            .send_request(req.map(Full::new))
            .await
            .map_err(|e| HttpError::Http(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| HttpError::Http(format!("reading the body: {e}")))?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
    .await;
    conn_task.abort();
    result
}

fn split_uri(uri: &Uri) -> Result<(bool, String, u16), HttpError> {
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(HttpError::Url(format!(
                "{uri}: scheme must be http or https"
            )));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| HttpError::Url(format!("{uri}: no host")))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port))
}

fn bracket(host: &str) -> String {
    crate::config::bracket(host)
}

fn join_host_port(host: &str, port: u16) -> String {
    format!("{}:{port}", bracket(host))
}

fn tls_error(server: &str, err: io::Error) -> HttpError {
    let rustls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(
            e @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
        ) => HttpError::Certificate {
            server: server.to_owned(),
            reason: e.to_string(),
        },
        _ => HttpError::Tls {
            server: server.to_owned(),
            source: err,
        },
    }
}

/// Whether `pem` holds at least one certificate that parses.
pub fn pem_has_certificate(pem: &[u8]) -> bool {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .is_some_and(|c| c.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_detection() {
        assert!(!pem_has_certificate(b""));
        assert!(!pem_has_certificate(b"not a pem"));
        assert!(pem_has_certificate(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        ));
    }

    #[test]
    fn a_bad_ca_is_a_config_error() {
        let trust = Trust::CaBundle {
            pem: b"no certificate here".to_vec(),
            with_system_roots: false,
        };
        let err = HttpClient::new(&trust, ProxyConfig::none(), Duration::from_secs(1))
            .expect_err("no CA");
        assert!(
            matches!(err, HttpError::TlsConfig(TlsConfigError::InvalidCa(_))),
            "{err:?}"
        );
    }
}
