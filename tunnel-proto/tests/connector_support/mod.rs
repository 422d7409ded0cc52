//! Shared fixtures of the connector and acceptor tests: a test PKI made with rcgen, an echo
//! tunnel server built on the real acceptor, a real tinyproxy (the workspace's `test-support`
//! crate), and a raw HTTP client.
//!
//! Everything listens on 127.0.0.1 with OS-chosen ports.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Response, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{
    AcceptedTunnel, Acceptor, AcceptorConfig, AuthRequest, ClientKey, Reject, ResponseBody,
    text_response, tls_server_config,
};

/// Every test body runs under this bound.
pub const TEST_BOUND: Duration = Duration::from_secs(60);

/// Runs `fut` under [`TEST_BOUND`], failing the test if it takes longer.
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(TEST_BOUND, fut)
        .await
        .expect("test exceeded its time bound")
}

// === PKI ===

/// A CA and a server certificate for `127.0.0.1` and `localhost` signed by it.
pub struct Pki {
    /// The CA certificate as rcgen writes it (Go-style PEM, ending in one newline).
    pub ca_pem: String,
    /// The server's leaf certificate.
    pub leaf_pem: String,
    /// The server's private key.
    pub key_pem: String,
}

impl Pki {
    pub fn new(ca_name: &str) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "tunnel-server");
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("leaf cert");
        Self {
            ca_pem: ca_cert.pem(),
            leaf_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    }

    /// The CA PEM the way Rancher serves its `cacerts` setting: trimmed.
    pub fn ca_setting(&self) -> String {
        self.ca_pem.trim().to_owned()
    }

    /// Server TLS config; `with_ca` also sends the CA certificate in the chain.
    pub fn server_config(&self, with_ca: bool) -> Arc<rustls::ServerConfig> {
        let mut chain = self.leaf_pem.clone();
        if with_ca {
            chain.push_str(&self.ca_pem);
        }
        tls_server_config(chain.as_bytes(), self.key_pem.as_bytes()).expect("server TLS config")
    }
}

// === echo tunnel server ===

/// The token the test authorizer accepts.
pub const GOOD_TOKEN: &str = "good-token";
/// The token for which it answers 400 `cluster not found`.
pub const BAD_REQUEST_TOKEN: &str = "stale-token";
/// Header the agents carry their token in.
pub const TOKEN_HEADER: &str = "x-api-tunnel-token";

/// What the server saw of one accepted tunnel.
#[derive(Debug, Clone)]
pub struct Seen {
    pub client_key: String,
    pub path: String,
    pub params: Option<String>,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
}

impl TestServer {
    /// Kills the server: aborts `serve`, which drops every connection and tunnel at once.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Stops the server (graceful, 1 s grace) and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not stop")
            .expect("server task panicked");
    }
}

async fn authorize(req: AuthRequest) -> Result<ClientKey, Reject> {
    // An async authorizer, as a database-backed one would be.
    tokio::task::yield_now().await;
    match req.headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        Some(GOOD_TOKEN) => Ok(ClientKey::new("agent-1")),
        Some(BAD_REQUEST_TOKEN) => Err(Reject::BadRequest("cluster not found".to_owned())),
        _ => Err(Reject::Unauthorized),
    }
}

async fn router(req: http::Request<hyper::body::Incoming>) -> Response<ResponseBody> {
    match req.uri().path() {
        "/ping" => text_response(StatusCode::OK, "pong"),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            text_response(StatusCode::OK, "slow done")
        }
        _ => text_response(StatusCode::NOT_FOUND, "no route"),
    }
}

/// Echoes binary messages until the client closes or the server shuts down.
async fn echo(mut t: AcceptedTunnel) {
    loop {
        tokio::select! {
            () = t.shutdown.cancelled() => break,
            msg = t.ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if t.ws.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Mount paths of the test server.
pub const MOUNTS: [&str; 2] = ["/v3/connect", "/v3/connect/register"];

/// Starts the echo tunnel server on `listener`.
pub fn start_server(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> TestServer {
    let addr = listener.local_addr().expect("local addr");
    let mut config = AcceptorConfig::new(MOUNTS);
    config
        .set_tls(tls)
        .set_shutdown_grace(Duration::from_secs(1));
    let (tx, seen) = mpsc::unbounded_channel();
    let acceptor = Acceptor::new(
        config,
        authorize,
        move |t: AcceptedTunnel| {
            let _ = tx.send(Seen {
                client_key: t.client_key.to_string(),
                path: t.uri.path().to_owned(),
                params: t
                    .headers
                    .get("x-api-tunnel-params")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            });
            echo(t)
        },
        router,
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { acceptor.serve(listener, token).await });
    TestServer {
        addr,
        shutdown,
        task,
        seen,
    }
}

/// Binds 127.0.0.1 on an OS-chosen port and starts the echo server there.
pub async fn spawn_server(tls: Option<Arc<rustls::ServerConfig>>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_server(listener, tls)
}

/// Sends one binary message and expects it back.
pub async fn echo_roundtrip<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let payload = Bytes::from_static(b"\x00\x01tunnel echo\xff");
    ws.send(Message::Binary(payload.clone()))
        .await
        .expect("send");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo timed out")
        {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(b, payload);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

// === raw HTTP ===

/// A parsed raw HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `request` verbatim (it should say `Connection: close`) and reads the response to EOF.
pub async fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("response timed out")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("no head/body split");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

// === tinyproxy ===

/// The real tinyproxy harness, shared with agent-core's tests. Not every test binary that
/// includes this module uses it.
#[allow(unused_imports)]
pub use test_support::{Tinyproxy, free_port};
