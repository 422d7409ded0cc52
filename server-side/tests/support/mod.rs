//! Shared test helpers: the real `tunnel-server` binary on a loopback port chosen by the OS,
//! an HTTPS client trusting its generated CA, an agent-like tunnel client built on
//! tunnel-proto's `Connector`, a stand-in kube-apiserver (TLS with its own rcgen CA), and a
//! stand-in dockerd on a Unix socket.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tunnel_proto::driver::connector::{Connector, ConnectorConfig, Trust};
use tunnel_proto::driver::{Tunnel, pipe};
use tunnel_proto::mux::Authorizer;
use tunnel_proto::{Role, SessionConfig};

pub mod docker;

pub const BIN: &str = env!("CARGO_BIN_EXE_tunnel-server");

// === temp dirs ===

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tunnel-server-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// === the server process ===

/// A running `tunnel-server serve`; killed (SIGKILL) on drop.
pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    /// `--metrics-listen`: `/metrics` without a token, plain HTTP.
    pub metrics_addr: SocketAddr,
    pub url: String,
    pub data_dir: PathBuf,
    pub stderr_log: PathBuf,
    /// `--peer-listen`: the bound peer listener (mutual TLS).
    pub peer_addr: Option<SocketAddr>,
}

impl ServerProc {
    /// Starts the server on 127.0.0.1:0 with TLS from its generated CA and a 300 ms Connected
    /// probe interval.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let stderr_log = data_dir.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log = std::fs::File::create(&stderr_log).unwrap();
        // A test may choose its own probe interval.
        let probe = if extra.contains(&"--probe-interval") {
            &[][..]
        } else {
            &["--probe-interval", "0.3"][..]
        };
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(probe)
            .args(["--shutdown-grace", "3", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("TEST_SERVER_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tunnel-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            // "listening on …", then "metrics on …" (and "peers on …" with --peer-listen).
            for line in lines.by_ref().take(3) {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "tunnel-server printed no listening line in 30 s; log:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        // "listening on 127.0.0.1:PORT (URL)"
        let rest = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let (addr, url) = rest.split_once(' ').unwrap();
        let metrics_line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tunnel-server printed no metrics line");
        let metrics_addr = metrics_line
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("unexpected second line {metrics_line:?}"))
            .parse()
            .unwrap();
        let peer_addr = extra.contains(&"--peer-listen").then(|| {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("tunnel-server printed no peers line");
            line.strip_prefix("peers on ")
                .unwrap_or_else(|| panic!("unexpected third line {line:?}"))
                .parse()
                .unwrap()
        });
        Self {
            child,
            addr: addr.parse().unwrap(),
            metrics_addr,
            url: url.trim_matches(|c| c == '(' || c == ')').to_owned(),
            data_dir: data_dir.to_owned(),
            stderr_log,
            peer_addr,
        }
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca.pem")).unwrap()
    }

    pub fn client(&self) -> HttpClient {
        HttpClient::tls(self.addr, self.ca_pem().as_bytes())
    }

    /// What an agent trusts to reach this server: its CA alone.
    pub fn trust(&self) -> Trust {
        Trust::CaBundle {
            pem: self.ca_pem().into_bytes(),
            with_system_roots: false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The Prometheus text, from the `--metrics-listen` address.
    pub async fn metrics(&self) -> String {
        HttpClient {
            addr: self.metrics_addr,
            tls: None,
        }
        .get("/metrics", None)
        .await
        .body
    }

    /// SIGKILL, and wait.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and wait for the exit status (bounded).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "server did not exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an admin command of the binary; returns stdout, panics on failure.
pub fn cli(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("run tunnel-server");
    assert!(
        out.status.success(),
        "tunnel-server {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `user add NAME` → the API token it printed.
pub fn add_user(data_dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["user", "add", name];
    args.extend_from_slice(extra);
    let out = cli(data_dir, &args);
    out.lines()
        .find_map(|l| l.strip_prefix("API token (shown once): "))
        .unwrap_or_else(|| panic!("no token in {out:?}"))
        .to_owned()
}

/// `cluster add NAME` → (cluster id, registration token, import URL).
pub fn add_cluster(data_dir: &Path, name: &str) -> (String, String, String) {
    let out = cli(data_dir, &["cluster", "add", name]);
    let url = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("kubectl apply -f "))
        .unwrap_or_else(|| panic!("no import command in {out:?}"))
        .to_owned();
    let file = url
        .rsplit('/')
        .next()
        .unwrap()
        .strip_suffix(".yaml")
        .unwrap();
    let (token, id) = file.rsplit_once('_').unwrap();
    (id.to_owned(), token.to_owned(), url)
}

// === TLS ===

pub fn client_tls(ca_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A CA and a serving certificate for 127.0.0.1/localhost: (ca_pem, cert_pem, key_pem).
pub fn test_pki(cn: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{cn} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

// === HTTP client ===

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One connection per request; HTTPS trusting one CA, or plain HTTP.
#[derive(Clone)]
pub struct HttpClient {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl HttpClient {
    pub fn tls(addr: SocketAddr, ca_pem: &[u8]) -> Self {
        Self {
            addr,
            tls: Some(client_tls(ca_pem)),
        }
    }

    pub async fn connect(&self) -> Box<dyn Io> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                Box::new(
                    tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .unwrap(),
                )
            }
            None => Box::new(tcp),
        }
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send_streaming<B>(&self, req: Request<B>) -> Response<Incoming>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = self.connect().await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender.send_request(req).await.unwrap()
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self.send_streaming(b.body(body).unwrap()).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        self.request("GET", path, &headers, None).await
    }

    /// `POST /v1/clusters` as `admin`: the new cluster's id and registration token.
    pub async fn create_cluster(&self, admin: &str, name: &str) -> (String, String) {
        let body = serde_json::json!({ "name": name });
        let reply = self.api("POST", "/v1/clusters", admin, Some(body)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        let json = reply.json();
        let id = json["cluster"]["id"].as_str().unwrap().to_owned();
        let token = json["registrationToken"].as_str().unwrap().to_owned();
        (id, token)
    }

    pub async fn api(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {token}");
        self.request(method, path, &[("authorization", &auth)], body)
            .await
    }
}

// === agent-like tunnel client ===

/// The agents' allow-list: `tcp` anywhere, `unix` only the Docker socket.
pub fn allow_all() -> Authorizer {
    Arc::new(|t| t.proto == "tcp" || (t.proto == "unix" && t.address == "/var/run/docker.sock"))
}

/// Connects a tunnel to the server as an agent would; returns the running tunnel. Streams are
/// piped to their tcp targets; `unix` `/var/run/docker.sock` goes to `docker` when given.
pub async fn connect_agent(
    server: &ServerProc,
    path: &str,
    headers: HeaderMap,
    trust: Trust,
    docker: Option<PathBuf>,
) -> Result<Tunnel, tunnel_proto::driver::connector::ConnectError> {
    let tunnel = dial_agent(server, path, headers, trust, allow_all()).await?;
    let accept = tunnel.clone();
    tokio::spawn(async move {
        while let Some(stream) = accept.accept().await {
            let docker = docker.clone();
            tokio::spawn(async move {
                let target = stream.target().clone();
                match target.proto.as_str() {
                    "tcp" => match TcpStream::connect(&target.address).await {
                        Ok(s) => {
                            let _ = pipe(stream, s).await;
                        }
                        Err(e) => stream.reset(&format!("dial tcp {}: {e}", target.address)),
                    },
                    "unix" => match UnixStream::connect(
                        docker.unwrap_or_else(|| target.address.clone().into()),
                    )
                    .await
                    {
                        Ok(s) => {
                            let _ = pipe(stream, s).await;
                        }
                        Err(e) => stream.reset(&format!("dial unix {}: {e}", target.address)),
                    },
                    _ => stream.reset("not allowed"),
                }
            });
        }
    });
    Ok(tunnel)
}

/// A cluster agent on `server` (its CA trusted) whose cluster params point at `apiserver` with
/// service-account token `sa_token`: [`connect_agent`] on `/v3/connect`.
pub async fn connect_cluster_agent(
    server: &ServerProc,
    registration_token: &str,
    apiserver: &FakeApiserver,
    sa_token: &str,
) -> Tunnel {
    let headers = agent_headers(registration_token, &apiserver.cluster_params(sa_token));
    connect_agent(server, "/v3/connect", headers, server.trust(), None)
        .await
        .expect("cluster agent connects")
}

/// Dials a tunnel to the server as an agent would, with `authorizer` deciding the server's
/// Connects; nothing serves its streams.
pub async fn dial_agent(
    server: &ServerProc,
    path: &str,
    headers: HeaderMap,
    trust: Trust,
    authorizer: tunnel_proto::mux::Authorizer,
) -> Result<Tunnel, tunnel_proto::driver::connector::ConnectError> {
    let mut config = ConnectorConfig::new(format!("wss://127.0.0.1:{}{path}", server.addr.port()));
    config.set_headers(headers).set_trust(trust);
    let ws = Connector::new(config).unwrap().connect().await?;
    Ok(Tunnel::spawn(
        ws,
        SessionConfig::new(Role::Client),
        authorizer,
    ))
}

/// Dials the steve-aggregation tunnel (`Bearer stv-cluster-<token>`) with `authorizer`
/// deciding the server's Connects; nothing serves its streams.
pub async fn dial_stv(
    server: &ServerProc,
    registration_token: &str,
    trust: Trust,
    authorizer: tunnel_proto::mux::Authorizer,
) -> Tunnel {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer stv-cluster-{registration_token}")).unwrap(),
    );
    let mut config =
        ConnectorConfig::new(format!("wss://127.0.0.1:{}/v3/connect", server.addr.port()));
    config.set_headers(headers).set_trust(trust);
    let ws = Connector::new(config)
        .unwrap()
        .connect()
        .await
        .expect("stv tunnel");
    Tunnel::spawn(ws, SessionConfig::new(Role::Client), authorizer)
}

/// The steve-aggregation tunnel: every stream is served by a local HTTP server answering
/// `GET /ping` with `pong`.
pub async fn connect_stv(server: &ServerProc, registration_token: &str, trust: Trust) -> Tunnel {
    let tunnel = dial_stv(server, registration_token, trust, Arc::new(|_| true)).await;
    let accept = tunnel.clone();
    tokio::spawn(async move {
        while let Some(stream) = accept.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let (status, body) = if req.uri().path() == "/ping" {
                        (200, "pong")
                    } else {
                        (404, "not found")
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    tunnel
}

/// `X-API-Tunnel-Token` and `X-API-Tunnel-Params` headers.
pub fn agent_headers(token: &str, params: &Value) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-tunnel-token", HeaderValue::from_str(token).unwrap());
    let b64 = data_encoding::BASE64.encode(params.to_string().as_bytes());
    h.insert("x-api-tunnel-params", HeaderValue::from_str(&b64).unwrap());
    h
}

// === a body fed from a channel ===

pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

// === stand-in kube-apiserver ===

/// What the stand-in apiserver saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// Echoes what `io` reads, upper-cased, until it ends. Each answer is flushed: over TLS a write
/// that met a full socket leaves its tail buffered in the TLS session, and nothing else would
/// push it out once the peer stops sending.
async fn echo_upper_cased<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let answer = buf[..n].to_ascii_uppercase();
        if io.write_all(&answer).await.is_err() || io.flush().await.is_err() {
            break;
        }
    }
}

/// A TLS HTTP/1.1 server with its own CA. Routes:
/// * `/watch`: 200, chunked; sends `event-1\n`, then waits for [`FakeApiserver::release`]
///   before `event-2\n` and the end (so a test can see the first chunk arrive alone);
/// * upgrade requests: 101, then echoes bytes upper-cased;
/// * `/version`: a version JSON (`v1.30.0-fake`);
/// * anything else: 200 JSON `{"path": ...}`.
pub struct FakeApiserver {
    pub addr: SocketAddr,
    /// TLS connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<tokio::sync::Notify>,
}

impl FakeApiserver {
    pub async fn start() -> Self {
        let (ca_pem, cert_pem, key_pem) = test_pki("apiserver");
        let tls = tunnel_proto::driver::acceptor::tls_server_config(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let (seen2, release2) = (seen.clone(), release.clone());
        let accepted: Arc<AtomicU64> = Arc::default();
        let accepted2 = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                accepted2.fetch_add(1, Ordering::Relaxed);
                let tls = tokio_rustls::TlsAcceptor::from(tls.clone());
                let (seen, release) = (seen2.clone(), release2.clone());
                tokio::spawn(async move {
                    let Ok(io) = tls.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let (seen, release) = (seen.clone(), release.clone());
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                headers: req.headers().clone(),
                            });
                            let resp: Response<
                                http_body_util::combinators::BoxBody<
                                    Bytes,
                                    std::convert::Infallible,
                                >,
                            > = if req.headers().contains_key("upgrade") {
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    echo_upper_cased(TokioIo::new(on.await.unwrap())).await;
                                });
                                Response::builder()
                                    .status(101)
                                    .header("connection", "Upgrade")
                                    .header("upgrade", req.headers()["upgrade"].clone())
                                    .body(Full::new(Bytes::new()).boxed())
                                    .unwrap()
                            } else if req.uri().path() == "/watch" {
                                let (tx, rx) = mpsc::channel(4);
                                tokio::spawn(async move {
                                    let _ = tx.send(Bytes::from_static(b"event-1\n")).await;
                                    release.notified().await;
                                    let _ = tx.send(Bytes::from_static(b"event-2\n")).await;
                                });
                                Response::builder()
                                    .status(200)
                                    .body(ChannelBody(rx).boxed())
                                    .unwrap()
                            } else {
                                let body = if req.uri().path() == "/version" {
                                    serde_json::json!({ "major": "1", "minor": "30", "gitVersion": "v1.30.0-fake", "platform": "linux/amd64" })
                                } else {
                                    serde_json::json!({ "path": req.uri().to_string() })
                                }
                                .to_string();
                                Response::builder()
                                    .status(200)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)).boxed())
                                    .unwrap()
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            accepted,
            ca_pem,
            seen,
            release,
        }
    }

    pub fn release_watch(&self) {
        self.release.notify_one();
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the apiserver saw no request")
    }

    /// Cluster params as the cluster agent sends them.
    pub fn cluster_params(&self, sa_token: &str) -> Value {
        serde_json::json!({
            "cluster": {
                "address": self.addr.to_string(),
                "caCert": data_encoding::BASE64.encode(self.ca_pem.as_bytes()),
                "token": sa_token,
            }
        })
    }
}

// === stand-in dockerd ===

/// An HTTP/1.1 server on a Unix socket: `/_ping` → `OK`, `/exec/<id>/start` with
/// `Upgrade: tcp` → `101 UPGRADED` and an upper-casing echo, anything else → JSON of the path.
/// Records request headers.
pub struct FakeDockerd {
    pub socket: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeDockerd {
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                headers: req.headers().clone(),
                            });
                            let resp = if req.uri().path().ends_with("/start")
                                && req.headers().contains_key("upgrade")
                            {
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    echo_upper_cased(TokioIo::new(on.await.unwrap())).await;
                                });
                                Response::builder()
                                    .status(101)
                                    .header("content-type", "application/vnd.docker.raw-stream")
                                    .header("connection", "Upgrade")
                                    .header("upgrade", "tcp")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap()
                            } else if req.uri().path() == "/_ping" {
                                Response::builder()
                                    .status(200)
                                    .header("api-version", "1.41")
                                    .body(Full::new(Bytes::from_static(b"OK")))
                                    .unwrap()
                            } else {
                                let body = serde_json::json!({ "path": req.uri().to_string() })
                                    .to_string();
                                Response::builder()
                                    .status(200)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap()
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { socket, seen }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, up to `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn lookup<'a>(map: &'a HashMap<String, String>, k: &str) -> &'a str {
    map.get(k).map(String::as_str).unwrap_or_default()
}
