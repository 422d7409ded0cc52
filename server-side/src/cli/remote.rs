//! The admin CLI's client of a running server's `/v1` API: one HTTP/1 request per connection
//! (a command makes a handful), over TLS trusting what the context says, on a current-thread
//! runtime the command builds for itself.
//!
//! Failures name who is at fault: the network or TLS (with a hint at the trust setting), the
//! token (401: log in again; 403: not an admin), or the request (the server's message).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;
use tunnel_proto::driver::connector::{TlsConfigError, Trust, client_config};

use super::context::Context;

/// Bound on one request, from connecting to the last body byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to the server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    /// The context's `server` is not a URL we can dial.
    #[error("invalid server URL {0:?}: expected https://host[:port]")]
    BadUrl(String),
    /// The context's CA data is unusable, or the system roots are missing.
    #[error("TLS set-up for {server}")]
    TlsConfig {
        /// The server URL.
        server: String,
        /// What is wrong.
        #[source]
        source: TlsConfigError,
    },
    /// Building the runtime failed.
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    /// TCP connect failed.
    #[error("cannot reach {server}")]
    Connect {
        /// The server URL.
        server: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed, most often because the certificate is not trusted.
    #[error("TLS handshake with {server} failed{hint}")]
    Tls {
        /// The server URL.
        server: String,
        /// The failure (a rustls error inside).
        #[source]
        source: std::io::Error,
        /// What to check, for a certificate the trust setting refused.
        hint: &'static str,
    },
    /// No full answer within [`REQUEST_TIMEOUT`].
    #[error("{server} did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// The server URL.
        server: String,
    },
    /// The HTTP exchange broke.
    #[error("HTTP exchange with {server} failed")]
    Http {
        /// The server URL.
        server: String,
        /// The failure.
        #[source]
        source: hyper::Error,
    },
    /// 401: the token is invalid, revoked or expired.
    #[error(
        "the server refused the token of context {context:?} ({message}): log in again with `tunnel-server login`"
    )]
    Unauthorized {
        /// The context.
        context: String,
        /// The server's words.
        message: String,
    },
    /// 403: the token's user is not an admin.
    #[error("{message}: the admin commands need an admin user's token (context {context:?})")]
    Forbidden {
        /// The context.
        context: String,
        /// The server's words (`user X is not an admin`).
        message: String,
    },
    /// Any other non-success status, with the server's message.
    #[error("{message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The server's message, or the status line.
        message: String,
    },
    /// A success whose body is not what the API documents.
    #[error("unexpected answer from {server} to {what}")]
    Decode {
        /// The server URL.
        server: String,
        /// `METHOD path`.
        what: String,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
}

impl RemoteError {
    /// The status of an API error, if it is one.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Unauthorized { .. } => Some(StatusCode::UNAUTHORIZED),
            Self::Forbidden { .. } => Some(StatusCode::FORBIDDEN),
            _ => None,
        }
    }
}

/// How the client checks the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustKind {
    Ca,
    SystemRoots,
    Insecure,
}

/// A client of one server, for one command.
pub(crate) struct Client {
    /// Context name, for error messages.
    context: String,
    /// Base URL as given (no trailing slash).
    server: String,
    /// `host[:port]` for the Host header.
    authority: String,
    host: String,
    port: u16,
    /// Path prefix of the base URL (empty or `/prefix`).
    prefix: String,
    /// `None`: plain HTTP.
    tls: Option<Arc<ClientConfig>>,
    trust: TrustKind,
    token: Option<String>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    // No token in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("context", &self.context)
            .field("server", &self.server)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `context`'s server with its token and trust.
    pub(crate) fn new(context: &Context) -> Result<Self, RemoteError> {
        let trust = if context.insecure_skip_tls_verify {
            Trust::InsecureSkipVerify
        } else {
            match &context.certificate_authority_data {
                Some(pem) => Trust::CaBundle {
                    pem: pem.as_bytes().to_vec(),
                    with_system_roots: false,
                },
                None => Trust::SystemRoots,
            }
        };
        Self::with_trust(
            &context.name,
            &context.server,
            Some(context.token.clone()),
            trust,
        )
    }

    /// A client of `server` trusting `trust`; `token` goes in every request when given.
    pub(crate) fn with_trust(
        context: &str,
        server: &str,
        token: Option<String>,
        trust: Trust,
    ) -> Result<Self, RemoteError> {
        let server = server.trim_end_matches('/').to_owned();
        let bad = || RemoteError::BadUrl(server.clone());
        let uri: Uri = server.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?.clone();
        if authority.as_str().contains('@') || uri.query().is_some() {
            return Err(bad());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let kind = match trust {
            Trust::InsecureSkipVerify => TrustKind::Insecure,
            Trust::SystemRoots => TrustKind::SystemRoots,
            _ => TrustKind::Ca,
        };
        let tls = if https {
            Some(
                client_config(&trust).map_err(|source| RemoteError::TlsConfig {
                    server: server.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        Ok(Self {
            context: context.to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            authority: authority.as_str().to_owned(),
            server,
            host,
            port,
            tls,
            trust: kind,
            token,
            runtime,
        })
    }

    /// The base URL.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// `GET path`, decoded.
    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        self.json(Method::GET, path, None)
    }

    /// A request with an optional JSON body whose answer is JSON, decoded.
    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, RemoteError> {
        let what = format!("{method} {path}");
        let bytes = self.call(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|source| RemoteError::Decode {
            server: self.server.clone(),
            what,
            source,
        })
    }

    /// A request; the body of a success, or the error the status means.
    pub(crate) fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Bytes, RemoteError> {
        let (status, bytes) = self.runtime.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body))
                .await
                .map_err(|_| RemoteError::Timeout {
                    server: self.server.clone(),
                })?
        })?;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = message_of(status, &bytes);
        let context = self.context.clone();
        Err(match status {
            StatusCode::UNAUTHORIZED => RemoteError::Unauthorized { context, message },
            StatusCode::FORBIDDEN => RemoteError::Forbidden { context, message },
            _ => RemoteError::Status { status, message },
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Bytes), RemoteError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| RemoteError::Connect {
                server: self.server.clone(),
                source,
            })?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::USER_AGENT,
                concat!("tunnel-server-cli/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|_| RemoteError::BadUrl(self.server.clone()))?;
        match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|_| RemoteError::BadUrl(self.server.clone()))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| RemoteError::Tls {
                        server: self.server.clone(),
                        hint: self.tls_hint(&source),
                        source,
                    })?;
                self.send(stream, req).await
            }
            None => self.send(tcp, req).await,
        }
    }

    async fn send<S>(
        &self,
        io: S,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), RemoteError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let http = |source| RemoteError::Http {
            server: self.server.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        drop(sender);
        conn.abort();
        Ok((status, bytes))
    }

    fn tls_hint(&self, err: &std::io::Error) -> &'static str {
        let bad_cert = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
        match (bad_cert, self.trust) {
            (true, TrustKind::Ca) => {
                " (the server's certificate is not signed by the context's CA: log in again with the right --certificate-authority)"
            }
            (true, TrustKind::SystemRoots) => {
                " (the server's certificate is not trusted by the system roots: pass --certificate-authority FILE, or --fetch-ca to trust the CA the server sends)"
            }
            _ => "",
        }
    }
}

/// The server's message: the `message` of a JSON error, else the text body, else the status.
fn message_of(status: StatusCode, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(m) = v.get("message").and_then(Value::as_str)
    {
        return m.to_owned();
    }
    let text = String::from_utf8_lossy(body).trim().to_owned();
    if text.is_empty() {
        status.to_string()
    } else {
        text
    }
}

/// A path segment: every byte outside RFC 3986's `pchar` percent-encoded (the server matches
/// raw segments, so a name with `/` becomes a 404 rather than another route).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("c-1.x@y"), "c-1.x@y");
        assert_eq!(segment("a/b c?"), "a%2Fb%20c%3F");
    }

    #[test]
    fn messages_come_from_the_body() {
        assert_eq!(
            message_of(
                StatusCode::NOT_FOUND,
                br#"{"status":404,"message":"cluster not found"}"#
            ),
            "cluster not found"
        );
        assert_eq!(
            message_of(StatusCode::UNAUTHORIZED, b"Unauthorized: x\n"),
            "Unauthorized: x"
        );
        assert_eq!(message_of(StatusCode::BAD_GATEWAY, b""), "502 Bad Gateway");
    }

    #[test]
    fn urls_are_checked() {
        let c = |url: &str| Client::with_trust("t", url, None, Trust::InsecureSkipVerify);
        let ok = c("https://[::1]:8443/").unwrap();
        assert_eq!((ok.host.as_str(), ok.port), ("::1", 8443));
        assert_eq!(ok.server(), "https://[::1]:8443");
        let ok = c("http://h/prefix").unwrap();
        assert_eq!((ok.port, ok.prefix.as_str()), (80, "/prefix"));
        for bad in ["h:1", "ftp://h", "https://u@h", "https://h?x=1", ""] {
            assert!(matches!(c(bad), Err(RemoteError::BadUrl(_))), "{bad}");
        }
    }
}
