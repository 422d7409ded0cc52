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
//! tunnel-proto's connector does the same TCP/proxy/TLS dance for the websocket, but its TLS
//! configuration builder and its `CONNECT` code are private to it, so they are repeated here in
//! small form.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tunnel_proto::driver::connector::ProxyConfig;

/// Default bound on a response body.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// Which certificates an `https` request believes.
#[derive(Clone)]
pub enum TlsTrust {
    /// Anything (`curl --insecure`, as `run.sh` fetches `/ping` and `/v3/settings/cacerts`).
    Insecure,
    /// The platform store.
    SystemRoots,
    /// The certificates of a PEM bundle, optionally plus the platform store.
    Pem {
        /// One or more `CERTIFICATE` blocks.
        pem: Vec<u8>,
        /// Also trust the platform store.
        with_system_roots: bool,
    },
}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Insecure => f.write_str("Insecure"),
            Self::SystemRoots => f.write_str("SystemRoots"),
            Self::Pem {
                pem,
                with_system_roots,
            } => f
                .debug_struct("Pem")
                .field("pem_len", &pem.len())
                .field("with_system_roots", with_system_roots)
                .finish(),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL is not `http(s)://host[:port]/…`.
    #[error("invalid URL {0}")]
    Url(String),
    /// The trust settings cannot be turned into a TLS configuration.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// TCP connect (or name resolution) failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// What was dialed.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The proxy refused or broke the `CONNECT`.
    #[error("proxy {proxy}: {reason}")]
    Proxy {
        /// The proxy, without credentials.
        proxy: String,
        /// What went wrong.
        reason: String,
    },
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

/// `Basic` credentials for the proxies, which tunnel-proto's `ProxyUrl` keeps private.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyAuth {
    /// `Proxy-Authorization` value for the `http://` proxy.
    pub http: Option<String>,
    /// `Proxy-Authorization` value for the `https://` proxy.
    pub https: Option<String>,
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("http", &self.http.is_some())
            .field("https", &self.https.is_some())
            .finish()
    }
}

impl ProxyAuth {
    /// Reads the user information of `HTTP_PROXY`/`HTTPS_PROXY` (upper case first, then lower
    /// case, empty = unset, as Go) and makes `Basic` header values of it.
    pub fn from_strings(strings: &impl crate::env::Strings) -> Self {
        let any = |upper: &str| {
            strings
                .get_nonempty(upper)
                .or_else(|| strings.get_nonempty(&upper.to_ascii_lowercase()))
        };
        Self {
            http: any(crate::env::ENV_HTTP_PROXY).and_then(|v| basic_auth_of(&v)),
            https: any(crate::env::ENV_HTTPS_PROXY).and_then(|v| basic_auth_of(&v)),
        }
    }
}

fn basic_auth_of(raw: &str) -> Option<String> {
    let rest = raw.split_once("://").map_or(raw, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let creds = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
    Some(format!(
        "Basic {}",
        data_encoding::BASE64.encode(creds.as_bytes())
    ))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// === HttpClient ===

/// Sends one request per connection over TCP/TLS, through a proxy when the rules say so.
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<ClientConfig>,
    proxy: ProxyConfig,
    proxy_auth: ProxyAuth,
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
    /// A client trusting `trust`, with each request bounded by `timeout`.
    pub fn new(
        trust: &TlsTrust,
        proxy: ProxyConfig,
        proxy_auth: ProxyAuth,
        timeout: Duration,
    ) -> Result<Self, HttpError> {
        Ok(Self {
            tls: client_config(trust)?,
            proxy,
            proxy_auth,
            timeout,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// Sends `req` (absolute URI) and reads the whole response, within the timeout.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
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

    async fn send_inner(&self, mut req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = req.uri().clone();
        let (tls, host, port) = split_uri(&uri)?;
        let addr = join_host_port(&host, port);
        let tcp = match self.proxy.proxy_for(tls, &host, port) {
            Some(proxy) => {
                let auth = if tls {
                    &self.proxy_auth.https
                } else {
                    &self.proxy_auth.http
                };
                let proxy_addr = proxy.authority();
                let mut tcp = dial(&proxy_addr).await.map_err(|e| match e {
                    HttpError::Connect { source, .. } => HttpError::Proxy {
                        proxy: proxy.to_string(),
                        reason: source.to_string(),
                    },
                    other => other,
                })?;
                connect_tunnel(&mut tcp, &proxy.to_string(), &addr, auth.as_deref()).await?;
                tcp
            }
            None => dial(&addr).await?,
        };
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

async fn dial(addr: &str) -> Result<TcpStream, HttpError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// HTTP `CONNECT` on an open connection to the proxy. The 200 reply's head is read byte by
/// byte so nothing after it (the server's TLS bytes) is swallowed.
async fn connect_tunnel(
    io: &mut TcpStream,
    proxy: &str,
    target: &str,
    auth: Option<&str>,
) -> Result<(), HttpError> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = auth {
        req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    let fail = |reason: String| HttpError::Proxy {
        proxy: proxy.to_owned(),
        reason,
    };
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 << 10 {
            return Err(fail("CONNECT response head too large".to_owned()));
        }
        let b = io.read_u8().await.map_err(|e| fail(e.to_string()))?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| fail(format!("not an HTTP answer to CONNECT: {text:?}")))?;
    if status != 200 {
        return Err(fail(format!(
            "refused CONNECT to {target} with HTTP {status}"
        )));
    }
    Ok(())
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

// === TLS configuration ===

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a rustls client configuration for `trust` (ring, TLS 1.2 and 1.3, ALPN http/1.1).
pub fn client_config(trust: &TlsTrust) -> Result<Arc<ClientConfig>, HttpError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::TlsConfig(e.to_string()))?;
    let mut config = match trust {
        TlsTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification { provider }))
            .with_no_client_auth(),
        TlsTrust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            add_system_roots(&mut roots)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsTrust::Pem {
            pem,
            with_system_roots,
        } => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HttpError::TlsConfig(format!("CA PEM: {e}")))?;
            if certs.is_empty() {
                return Err(HttpError::TlsConfig(
                    "CA PEM holds no CERTIFICATE block".to_owned(),
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| HttpError::TlsConfig(format!("CA certificate: {e}")))?;
            }
            if *with_system_roots {
                add_system_roots(&mut roots)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn add_system_roots(roots: &mut RootCertStore) -> Result<(), HttpError> {
    let loaded = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(HttpError::TlsConfig(
            "no usable certificate in the system trust store".to_owned(),
        ));
    }
    Ok(())
}

/// Whether `pem` holds at least one certificate that parses.
pub fn pem_has_certificate(pem: &[u8]) -> bool {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .is_some_and(|c| c.is_ok())
}

/// Accepts any certificate (but still checks the handshake signature with its key).
#[derive(Debug)]
struct NoVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_basic_auth_from_env() {
        let env: std::collections::HashMap<&str, &str> = [
            ("HTTPS_PROXY", ""),
            ("https_proxy", "http://us%40er:p%3Ass@proxy:3128"),
            ("HTTP_PROXY", "proxy:3128"),
        ]
        .into_iter()
        .collect();
        let auth = ProxyAuth::from_strings(&env);
        assert_eq!(
            auth.https.as_deref(),
            Some(format!("Basic {}", data_encoding::BASE64.encode(b"us@er:p:ss")).as_str())
        );
        assert_eq!(auth.http, None);
    }
}
