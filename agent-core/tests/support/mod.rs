//! Test fixtures shared by the agents' integration tests (included with `#[path]` from
//! agent-node and agent-cluster): an rcgen PKI, a tunnel server built on tunnel-proto's real
//! acceptor (TLS, `/ping`, `/v3/settings/cacerts`, an authorizer that checks the agents'
//! headers), the agent binaries as child processes, and small HTTP helpers.
//!
//! Everything listens on 127.0.0.1 with OS-chosen ports, and every wait is bounded.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::acceptor::{
    AcceptedTunnel, Acceptor, AcceptorConfig, AuthRequest, ClientKey, Reject, ResponseBody,
    text_response, tls_server_config,
};
use tunnel_proto::{Role, SessionConfig};

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

// === PKI ===

pub struct Pki {
    pub ca_pem: String,
    pub leaf_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A CA, and a leaf for 127.0.0.1 and localhost signed by it.
    pub fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} server"));
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
        Self {
            ca_pem: ca_cert.pem(),
            leaf_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    }

    /// The CA as Rancher serves its `cacerts` setting: trimmed.
    pub fn ca_setting(&self) -> String {
        self.ca_pem.trim().to_owned()
    }

    /// `CATTLE_CA_CHECKSUM` for this CA.
    pub fn checksum(&self) -> String {
        tunnel_proto::driver::connector::ca_checksum(&self.ca_setting())
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        tls_server_config(self.leaf_pem.as_bytes(), self.key_pem.as_bytes()).expect("TLS config")
    }
}

// === the tunnel server ===

/// The registration token the test server accepts.
pub const TOKEN: &str = "reg-token-abcdefghijklmnop";
/// The cluster id it assigns.
pub const CLUSTER: &str = "c-test1";

/// One accepted tunnel: what the server saw, and the server's end of the session.
pub struct Accepted {
    pub client_key: String,
    pub path: String,
    pub headers: http::HeaderMap,
    /// The decoded `X-API-Tunnel-Params`, if sent.
    pub params: Option<serde_json::Value>,
    pub tunnel: Tunnel,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub pki: Pki,
    pub accepted: mpsc::UnboundedReceiver<Accepted>,
    /// Requests the authorizer refused, as (path, status).
    pub rejected: Arc<Mutex<Vec<(String, u16)>>>,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options of the test server.
#[derive(Clone, Default)]
pub struct ServerOptions {
    /// Serve this as the `cacerts` value instead of the real CA.
    pub cacerts_override: Option<String>,
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> Self {
        let pki = Pki::new("agent-test-ca");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = AcceptorConfig::new(["/v3/connect", "/v3/connect/register"]);
        config
            .set_tls(Some(pki.server_config()))
            .set_shutdown_grace(Duration::from_secs(1));
        let (tx, accepted) = mpsc::unbounded_channel();
        let rejected = Arc::new(Mutex::new(Vec::new()));
        let rej = rejected.clone();
        let cacerts = options.cacerts_override.unwrap_or_else(|| pki.ca_setting());
        let acceptor = Acceptor::new(
            config,
            move |req: AuthRequest| {
                let rej = rej.clone();
                async move {
                    let r = authorize(&req);
                    if let Err(e) = &r {
                        let status = match e {
                            Reject::Unauthorized => 401,
                            Reject::BadRequest(_) => 400,
                            Reject::TooManyRequests { .. } => 429,
                        };
                        rej.lock()
                            .unwrap()
                            .push((req.uri.path().to_owned(), status));
                    }
                    r
                }
            },
            move |t: AcceptedTunnel| {
                let tx = tx.clone();
                async move {
                    let params = t
                        .headers
                        .get("x-api-tunnel-params")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| agent_core::params::decode_params(v).ok());
                    let tunnel = Tunnel::spawn(
                        t.ws,
                        SessionConfig::new(Role::Server),
                        tunnel_proto::mux::refuse_all(),
                    );
                    let _ = tx.send(Accepted {
                        client_key: t.client_key.to_string(),
                        path: t.uri.path().to_owned(),
                        headers: t.headers,
                        params,
                        tunnel: tunnel.clone(),
                    });
                    tokio::select! {
                        _ = tunnel.closed() => {}
                        () = t.shutdown.cancelled() => tunnel.close(),
                    }
                }
            },
            move |req: http::Request<hyper::body::Incoming>| {
                let cacerts = cacerts.clone();
                async move { route(req.uri().path(), &cacerts) }
            },
        );
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move { acceptor.serve(listener, token).await });
        Self {
            addr,
            pki,
            accepted,
            rejected,
            shutdown,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The next accepted tunnel.
    pub async fn next_tunnel(&mut self) -> Accepted {
        tokio::time::timeout(WAIT, self.accepted.recv())
            .await
            .expect("no tunnel was accepted in time")
            .expect("server stopped")
    }
}

/// The agents' checks, as a Rancher server makes them: the main tunnel needs the token and
/// params headers; the steve tunnel `Authorization: Bearer stv-cluster-<token>`.
fn authorize(req: &AuthRequest) -> Result<ClientKey, Reject> {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(auth) = header("authorization") {
        return if auth == format!("Bearer stv-cluster-{TOKEN}") {
            Ok(ClientKey::new(format!("stv-cluster-{CLUSTER}")))
        } else {
            Err(Reject::Unauthorized)
        };
    }
    match header("x-api-tunnel-token") {
        Some(TOKEN) => {}
        Some(_) => return Err(Reject::BadRequest("cluster not found".to_owned())),
        None => return Err(Reject::Unauthorized),
    }
    let params = header("x-api-tunnel-params")
        .ok_or_else(|| Reject::BadRequest("missing node or cluster registration info".into()))?;
    let params = agent_core::params::decode_params(params).map_err(Reject::BadRequest)?;
    if let Some(cluster) = params.get("cluster") {
        for key in ["address", "caCert", "token"] {
            if cluster
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .is_empty()
            {
                return Err(Reject::BadRequest(format!("invalid input, {key} empty")));
            }
        }
        Ok(ClientKey::new(CLUSTER))
    } else if let Some(node) = params.get("node") {
        let host = node
            .get("requestedHostname")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if host.is_empty() {
            return Err(Reject::BadRequest("invalid input, hostname empty".into()));
        }
        Ok(ClientKey::new(format!("{CLUSTER}:{host}")))
    } else {
        Err(Reject::BadRequest(
            "missing node or cluster registration info".into(),
        ))
    }
}

fn route(path: &str, cacerts: &str) -> Response<ResponseBody> {
    match path {
        "/ping" => text_response(StatusCode::OK, "pong"),
        "/v3/settings/cacerts" => {
            let body = serde_json::json!({
                "id": "cacerts", "type": "setting", "name": "cacerts", "value": cacerts,
            });
            let mut resp = text_response(StatusCode::OK, body.to_string());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/" => text_response(StatusCode::OK, "{}"),
        _ => text_response(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

// === a local HTTP service the agent dials ===

/// An HTTP/1.1 server answering every request with `hello from <name>`; returns its address.
pub async fn http_service(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {name}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// A TCP echo server; returns its address.
pub async fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `GET path` on `io` (`Connection: close`) and reads the response to the end.
pub async fn http_get_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    io.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, io.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET http://addr/path` over plain TCP.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    http_get_on(tcp, &addr.to_string(), path)
        .await
        .expect("HTTP GET")
}

/// The value of the metric line starting with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// === the agent process ===

/// A running agent binary; killed on drop.
pub struct AgentProcess {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub health: Option<SocketAddr>,
}

impl AgentProcess {
    /// Starts `bin` with exactly `env` (plus PATH) and `args`; stderr is collected.
    pub fn spawn(bin: &str, env: &HashMap<String, String>, args: &[&str]) -> Self {
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("    agent| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            health: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`; returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the health endpoint's address in the log.
    pub async fn health_addr(&mut self) -> SocketAddr {
        if let Some(a) = self.health {
            return a;
        }
        let line = self.wait_log("listening on http://").await;
        let addr: SocketAddr = line
            .rsplit("http://")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        self.health = Some(addr);
        addr
    }

    /// `GET /metrics`.
    pub async fn metrics(&mut self) -> String {
        let addr = self.health_addr().await;
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        body
    }

    /// Sends SIGTERM with `kill`.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Whether the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment every agent test starts from: the server, its CA checksum, private state
/// dir, health on a free port, quick reconnects.
pub fn base_env(server: &TestServer, dir: &Path) -> HashMap<String, String> {
    let state = dir.join("state");
    let mut env = HashMap::new();
    env.insert("CATTLE_SERVER".into(), server.url());
    env.insert("CATTLE_CA_CHECKSUM".into(), server.pki.checksum());
    env.insert("CATTLE_AGENT_STATE_DIR".into(), path_str(&state));
    env.insert(
        "CATTLE_CREDENTIALS_DIR".into(),
        path_str(&dir.join("creds")),
    );
    env.insert("CATTLE_AGENT_HEALTH_ADDR".into(), "127.0.0.1:0".into());
    env.insert("CATTLE_AGENT_BACKOFF_MIN".into(), "200ms".into());
    env.insert("CATTLE_AGENT_BACKOFF_MAX".into(), "1s".into());
    env
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// A fresh temp dir for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("agent-test-")
        .tempdir()
        .expect("temp dir")
}

/// Reads from `s` until it fails or ends; returns the error kind, if any.
pub async fn read_error<S: AsyncRead + Unpin>(mut s: S) -> Option<std::io::ErrorKind> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.kind()),
        Err(_) => panic!("read neither failed nor ended in time"),
    }
}

/// Polls `cond` every 20 ms until it holds or [`WAIT`] passes.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unused, for paths given to the agent that must not exist.
pub fn missing_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
