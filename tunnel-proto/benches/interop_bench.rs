//! Go remotedialer vs this crate, same workload, on loopback: `cargo bench -p tunnel-proto
//! --bench interop_bench`.
//!
//! Four pairings of separate processes: Go client -> Go server (both `gopeer`, on the real
//! remotedialer v0.6.2), Rust client -> Rust server (this binary re-executed as `rust-client`
//! / `rust-server`, which follow gopeer's command-line and stdout contract), and both mixed
//! pairs. For each: one-way single-stream throughput in each direction (1 GiB, capped at 10 s),
//! 64 streams in each direction (16 MiB each, capped at 10 s), 1 KiB interactive round trips
//! while a bulk stream saturates the tunnel (p50/p99), resident memory of each process (idle,
//! per extra idle tunnel on the server, peak), and CPU seconds (utime+stime of both tunnel
//! processes) per GiB moved. The sources, sinks and echo targets live in this (driver) process,
//! identical for every pairing. One-way transfers only: Go deadlocks on bidirectional bulk echo
//! (tests/interop/README.md).
//!
//! All four pairings run side by side and every measurement is repeated in interleaved rounds
//! (`INTEROP_BENCH_ROUNDS`, default 3), because the machine is shared: throughput is the median
//! round, latency percentiles pool all rounds' samples, CPU per GiB sums all rounds.
//! `INTEROP_BENCH_ONLY=rust-rust,go-go` restricts the pairings; `INTEROP_BENCH_WS_SNDBUF=BYTES`
//! fixes the Rust server's websocket send buffer (an experiment knob).
//!
//! Nothing is asserted; the table ends with the Rust/Go ratios against the project's targets.
//!
//! `cargo bench -p tunnel-proto --bench interop_bench -- interactive` runs only the interactive
//! latency suite ([`interactive_suite`]): the Go pair, the Rust pair on the plain protocol, and
//! the Rust pair with credit windows negotiated (`Rust+cw`: the peers run with
//! `--credit-windows`, so the client offers the extension and the server agrees), each in
//! separate processes, 1 KiB round trips beside a bulk stream in each direction, p50 / p99 /
//! p99.9 and the ratios to Go.

#[allow(missing_docs)]
#[path = "../tests/support/go.rs"]
mod go;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use go::{GoProcess, cpu_seconds, rss_kib};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::capability::{self, Capabilities};
use tunnel_proto::driver::connector::{
    BackoffConfig, Connector, ConnectorConfig, SessionEnd, run_forever_agreed,
};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, pipe, websocket_config};
use tunnel_proto::{Role, SessionConfig};

const GIB: u64 = 1 << 30;
const CAP: Duration = Duration::from_secs(10);
const STREAMS: u64 = 64;
const EXTRA_TUNNELS: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("rust-server") => rust_server(&args[2..]),
        Some("rust-client") => rust_client(&args[2..]),
        _ if args.iter().any(|a| a == "interactive") => interactive_suite(),
        _ => driver(),
    }
}

// === the Rust peers (separate processes, gopeer's contract) ===

fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("missing {name}"));
    &args[i + 1]
}

/// Whether the peers run with credit windows (`--credit-windows`): the client offers them, the
/// server agrees to them.
fn credit_windows(args: &[String]) -> Capabilities {
    if args.iter().any(|a| a == "--credit-windows") {
        Capabilities::ALL
    } else {
        Capabilities::NONE
    }
}

fn announce(v: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn allow_tcp() -> tunnel_proto::mux::Authorizer {
    Arc::new(|t| t.proto == "tcp")
}

/// Serves streams the peer opens: dial the TCP target and pipe, like an agent.
fn serve_streams(tunnel: Tunnel) {
    tokio::spawn(async move {
        while let Some(stream) = tunnel.accept().await {
            tokio::spawn(async move {
                let address = stream.target().address.clone();
                match TcpStream::connect(&address).await {
                    Ok(socket) => {
                        let _ = socket.set_nodelay(true);
                        let _ = pipe(stream, socket).await;
                    }
                    Err(err) => stream.reset(&format!("dial tcp {address}: {err}")),
                }
            });
        }
    });
}

/// Reads one `\n`-terminated header line without consuming anything after it, so the rest
/// of the connection can go to `pipe` untouched.
async fn read_header(tcp: &TcpStream) -> Option<String> {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = timeout(
            deadline.saturating_duration_since(Instant::now()),
            tcp.peek(&mut buf),
        )
        .await
        .ok()?
        .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(pos) = buf[..n].iter().position(|&b| b == b'\n') {
            let mut line = vec![0u8; pos + 1];
            let mut read = 0;
            while read < line.len() {
                tcp.readable().await.ok()?;
                match tcp.try_read(&mut line[read..]) {
                    Ok(0) => return None,
                    Ok(k) => read += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return None,
                }
            }
            return Some(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
        if n == buf.len() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn rust_server(args: &[String]) {
    let listen = flag(args, "--listen").to_owned();
    let fwd = flag(args, "--forward-listen").to_owned();
    let willing = credit_windows(args);
    runtime().block_on(async move {
        let ws_ln = ws_listener(&listen);
        let fwd_ln = TcpListener::bind(&fwd).await.unwrap();
        let sessions: Arc<Mutex<HashMap<String, Tunnel>>> = Arc::default();
        announce(serde_json::json!({
            "ws": format!("ws://{}/connect", ws_ln.local_addr().unwrap()),
            "forward": fwd_ln.local_addr().unwrap().to_string(),
        }));
        let s = sessions.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = fwd_ln.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let Some(line) = read_header(&tcp).await else {
                        return;
                    };
                    let mut f = line.splitn(3, ' ');
                    let (Some(key), Some(proto), Some(addr)) = (f.next(), f.next(), f.next())
                    else {
                        return;
                    };
                    let tunnel = s.lock().unwrap().get(key).cloned();
                    let Some(tunnel) = tunnel else { return };
                    if let Ok(stream) = tunnel.open(proto, addr) {
                        let _ = pipe(stream, tcp).await;
                    }
                });
            }
        });
        loop {
            let Ok((tcp, _)) = ws_ln.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let key = Arc::new(Mutex::new(String::new()));
                let k = key.clone();
                let agreed = Arc::new(Mutex::new(Capabilities::NONE));
                let answer = agreed.clone();
                #[allow(clippy::result_large_err)]
                let check =
                    move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                        let capabilities = Capabilities::answer(req.headers(), willing);
                        if let Some(v) = capabilities.header_value() {
                            resp.headers_mut().insert(capability::HEADER, v);
                        }
                        *answer.lock().unwrap() = capabilities;
                        match req
                            .headers()
                            .get("x-tunnel-id")
                            .and_then(|v| v.to_str().ok())
                        {
                            Some(v) if !v.is_empty() => {
                                *k.lock().unwrap() = v.to_owned();
                                Ok(resp)
                            }
                            _ => Err(http::Response::builder()
                                .status(401)
                                .body(Some("failed authentication".to_owned()))
                                .unwrap()),
                        }
                    };
                let config = websocket_config(DEFAULT_MAX_MESSAGE);
                let Ok(ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(config)).await
                else {
                    return;
                };
                let mut session = SessionConfig::new(Role::Server);
                agreed.lock().unwrap().apply(&mut session);
                let tunnel = Tunnel::spawn(ws, session, allow_tcp());
                let key = key.lock().unwrap().clone();
                // The newest session per key wins (spec §9, "should").
                sessions.lock().unwrap().insert(key.clone(), tunnel.clone());
                serve_streams(tunnel.clone());
                tunnel.closed().await;
                let mut map = sessions.lock().unwrap();
                if map.get(&key).is_some_and(|t| t.close_reason().is_some()) {
                    map.remove(&key);
                }
            });
        }
    });
}

/// The websocket listener. `INTEROP_BENCH_WS_SNDBUF=BYTES` (an experiment knob, not set by
/// default) fixes the send buffer of accepted websocket sockets, which bounds how much bulk
/// data can queue in the kernel ahead of an interactive frame.
fn ws_listener(listen: &str) -> TcpListener {
    let addr: SocketAddr = listen.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    if let Some(bytes) = std::env::var("INTEROP_BENCH_WS_SNDBUF")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        socket.set_send_buffer_size(bytes).unwrap();
    }
    socket.bind(addr).unwrap();
    socket.listen(1024).unwrap()
}

fn rust_client(args: &[String]) {
    let url = flag(args, "--url").to_owned();
    let id = flag(args, "--id").to_owned();
    let fwd = flag(args, "--forward-listen").to_owned();
    let offer = credit_windows(args);
    runtime().block_on(async move {
        let current: Arc<Mutex<Option<Tunnel>>> = Arc::default();
        let fwd_ln = TcpListener::bind(&fwd).await.unwrap();
        announce(serde_json::json!({ "forward": fwd_ln.local_addr().unwrap().to_string() }));
        let c = current.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = fwd_ln.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let c = c.clone();
                tokio::spawn(async move {
                    let Some(line) = read_header(&tcp).await else {
                        return;
                    };
                    let Some((proto, addr)) = line.split_once(' ') else {
                        return;
                    };
                    let tunnel = c.lock().unwrap().clone();
                    if let Some(Ok(stream)) = tunnel.map(|t| t.open(proto, addr)) {
                        let _ = pipe(stream, tcp).await;
                    }
                });
            }
        });
        let mut cfg = ConnectorConfig::new(url);
        let mut headers = HeaderMap::new();
        headers.insert("x-tunnel-id", id.parse().unwrap());
        let mut backoff = BackoffConfig::default();
        backoff
            .set_min_delay(Duration::from_millis(200))
            .set_max_delay(Duration::from_secs(1));
        cfg.set_headers(headers)
            .set_backoff(backoff)
            .set_capabilities(offer)
            .set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
        let connector = Connector::new(cfg).unwrap();
        run_forever_agreed(&connector, CancellationToken::new(), |ws, agreed| {
            let mut session = SessionConfig::new(Role::Client);
            agreed.apply(&mut session);
            let (tunnel, driver) = Tunnel::new(ws, session, allow_tcp());
            serve_streams(tunnel.clone());
            *current.lock().unwrap() = Some(tunnel);
            announce(serde_json::json!({
                "connected": true,
                "credit_windows": agreed.credit_windows,
            }));
            async move {
                SessionEnd::Reconnect {
                    reason: driver.await.to_string(),
                }
            }
        })
        .await;
    });
}

// === the driver ===

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Impl {
    Go,
    Rust,
    /// Rust with credit windows offered (client) and agreed to (server).
    RustCw,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Go => "Go",
            Impl::Rust => "Rust",
            Impl::RustCw => "Rust+cw",
        }
    }
}

/// Targets in the driver process: a sink that counts, a source that writes a set budget, and
/// an echo.
struct Targets {
    sink: SocketAddr,
    source: SocketAddr,
    echo: SocketAddr,
    sunk: Arc<AtomicU64>,
    source_budget: Arc<AtomicU64>,
}

async fn targets() -> Targets {
    let sunk = Arc::new(AtomicU64::new(0));
    let source_budget = Arc::new(AtomicU64::new(GIB));
    let sink = go::tcp_service({
        let sunk = sunk.clone();
        move |mut s| {
            let sunk = sunk.clone();
            async move {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sunk.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    })
    .await;
    let source = go::tcp_service({
        let budget = source_budget.clone();
        move |mut s| {
            let mut left = budget.load(Ordering::Relaxed);
            async move {
                let buf = vec![0x5au8; 256 << 10];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            }
        }
    })
    .await;
    let echo = go::tcp_service(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    Targets {
        sink,
        source,
        echo,
        sunk,
        source_budget,
    }
}

struct Peers {
    server: GoProcess,
    client: GoProcess,
    forward: SocketAddr,
    ws_url: String,
    client_impl: Impl,
}

fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn spawn_server(which: Impl) -> GoProcess {
    let args = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--forward-listen",
        "127.0.0.1:0",
    ];
    match which {
        Impl::Go => GoProcess::spawn(&args),
        Impl::Rust | Impl::RustCw => {
            let mut a = vec!["rust-server"];
            a.extend_from_slice(&args[1..]);
            if which == Impl::RustCw {
                a.push("--credit-windows");
            }
            GoProcess::spawn_program(&self_exe(), &a)
        }
    }
}

fn spawn_client(which: Impl, url: &str, id: &str) -> GoProcess {
    let args = [
        "client",
        "--url",
        url,
        "--id",
        id,
        "--forward-listen",
        "127.0.0.1:0",
    ];
    match which {
        Impl::Go => GoProcess::spawn(&args),
        Impl::Rust | Impl::RustCw => {
            let mut a = vec!["rust-client"];
            a.extend_from_slice(&args[1..]);
            if which == Impl::RustCw {
                a.push("--credit-windows");
            }
            GoProcess::spawn_program(&self_exe(), &a)
        }
    }
}

const KEY: &str = "bench-agent";

async fn start_pair(client: Impl, server: Impl) -> Peers {
    let s = spawn_server(server);
    let ws_url = s
        .announcement("ws", 0, Duration::from_secs(20))
        .await
        .as_str()
        .unwrap()
        .to_owned();
    let forward = s
        .announcement("forward", 0, Duration::from_secs(5))
        .await
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let c = spawn_client(client, &ws_url, KEY);
    let connected = c
        .announcement("connected", 0, Duration::from_secs(20))
        .await;
    if client == Impl::RustCw {
        let agreed = c
            .announcement("credit_windows", 0, Duration::from_secs(1))
            .await;
        assert_eq!(agreed, true, "credit windows not agreed ({connected})");
    }
    Peers {
        server: s,
        client: c,
        forward,
        ws_url,
        client_impl: client,
    }
}

impl Peers {
    /// A server-initiated stream to `target` (the normal direction).
    async fn open(&self, target: SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(self.forward).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(format!("{KEY} tcp {target}\n").as_bytes())
            .await
            .unwrap();
        tcp
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.server.pid).unwrap_or(0.0) + cpu_seconds(self.client.pid).unwrap_or(0.0)
    }

    /// Waits until an echo round trip works (the Go server registers a session just after
    /// the upgrade).
    async fn ready(&self, t: &Targets) {
        let ok = timeout(Duration::from_secs(10), async {
            loop {
                let mut s = self.open(t.echo).await;
                if timeout(Duration::from_secs(2), go::echo_round(&mut s, b"ready?"))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "pair never became ready; server log:\n{}",
            self.server.log_tail(20)
        );
    }
}

#[derive(Default, Clone)]
struct Results {
    /// metric -> value
    m: HashMap<&'static str, f64>,
}

/// Server -> client, `streams` streams, `total` bytes: the driver writes into the server's
/// forward listener, the client pipes to the sink. Returns (MiB/s, bytes, CPU s per GiB).
async fn run_s2c(p: &Peers, t: &Targets, streams: u64, total: u64) -> (f64, u64, f64) {
    t.sunk.store(0, Ordering::Relaxed);
    let per = total / streams;
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(p.open(t.sink).await);
    }
    let cpu0 = p.cpu();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for mut c in conns {
        let stop = stop.clone();
        let written = written.clone();
        set.spawn(async move {
            let buf = vec![0xa5u8; 64 << 10];
            let mut left = per;
            while left > 0 && !stop.load(Ordering::Relaxed) {
                let n = left.min(buf.len() as u64) as usize;
                if c.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                written.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            c
        });
    }
    let capped = timeout(CAP, async { while set.join_next().await.is_some() {} })
        .await
        .is_err();
    stop.store(true, Ordering::Relaxed);
    if capped {
        // Writers blocked on a full socket are cut loose.
        set.abort_all();
    }
    let mut keep = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(c) = r {
            keep.push(c);
        }
    }
    let target = written.load(Ordering::Relaxed);
    let end = if capped {
        start + CAP
    } else {
        start + CAP + Duration::from_secs(5)
    };
    // Count what reached the sink by the cap (or until all written bytes arrived).
    loop {
        let now = Instant::now();
        if t.sunk.load(Ordering::Relaxed) >= target || now >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let bytes = t.sunk.load(Ordering::Relaxed);
    let cpu = p.cpu() - cpu0;
    drop(keep);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (
        mib_s(bytes, elapsed),
        bytes,
        cpu / (bytes as f64 / GIB as f64),
    )
}

/// Client -> server: the client dials the source, the driver reads from the forward
/// connections.
async fn run_c2s(p: &Peers, t: &Targets, streams: u64, total: u64) -> (f64, u64, f64) {
    let per = total / streams;
    t.source_budget.store(per, Ordering::Relaxed);
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(p.open(t.source).await);
    }
    let cpu0 = p.cpu();
    let start = Instant::now();
    let got = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for mut c in conns {
        let got = got.clone();
        set.spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            let mut n_total = 0;
            while n_total < per {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        n_total += n as u64;
                        got.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let _ = timeout(CAP, async { while set.join_next().await.is_some() {} }).await;
    let elapsed = start.elapsed();
    let bytes = got.load(Ordering::Relaxed);
    let cpu = p.cpu() - cpu0;
    set.abort_all();
    while set.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(300)).await;
    (
        mib_s(bytes, elapsed),
        bytes,
        cpu / (bytes as f64 / GIB as f64),
    )
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// 1 KiB round trips for up to 3 s, measured on their own thread and runtime (with their own
/// echo target), so the driver's bulk work adds no task-scheduling delay of its own.
fn round_trips(forward: SocketAddr, run_for: Duration, max_samples: usize) -> Vec<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let echo = go::tcp_service(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await;
        let mut s = TcpStream::connect(forward).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(format!("{KEY} tcp {echo}\n").as_bytes())
            .await
            .unwrap();
        let request = vec![0x42u8; 1024];
        let mut reply = vec![0u8; 1024];
        let _ = timeout(Duration::from_secs(5), go::echo_round(&mut s, &request)).await;
        let start = Instant::now();
        let mut lat = Vec::new();
        while start.elapsed() < run_for && lat.len() < max_samples {
            let t0 = Instant::now();
            let ok = timeout(Duration::from_secs(5), async {
                s.write_all(&request).await?;
                s.read_exact(&mut reply).await
            })
            .await;
            if !matches!(ok, Ok(Ok(_))) {
                break;
            }
            lat.push(t0.elapsed());
        }
        lat
    })
}

/// 1 KiB round trips on one stream while one bulk stream moves data in direction `bulk_s2c`
/// as fast as it can. Returns (p50 µs, p99 µs, rounds, bulk MiB/s meanwhile).
async fn interactive(
    p: &Peers,
    t: &Targets,
    bulk_s2c: bool,
    run_for: Duration,
    max_samples: usize,
) -> (Vec<Duration>, f64) {
    t.source_budget.store(8 * GIB, Ordering::Relaxed);
    t.sunk.store(0, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mut bulk = p.open(if bulk_s2c { t.sink } else { t.source }).await;
    let bulk_task = {
        let stop = stop.clone();
        let moved = moved.clone();
        tokio::spawn(async move {
            let mut buf = vec![0x33u8; 256 << 10];
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = if bulk_s2c {
                    timeout(Duration::from_secs(1), bulk.write_all(&buf))
                        .await
                        .map(|r| r.map(|()| buf.len()))
                } else {
                    timeout(Duration::from_secs(1), bulk.read(&mut buf)).await
                };
                match r {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved0 = moved.load(Ordering::Relaxed);
    let start = Instant::now();
    let forward = p.forward;
    let lat = tokio::task::spawn_blocking(move || round_trips(forward, run_for, max_samples))
        .await
        .unwrap();
    let bulk_rate = mib_s(moved.load(Ordering::Relaxed) - moved0, start.elapsed());
    stop.store(true, Ordering::Relaxed);
    let _ = timeout(Duration::from_secs(3), bulk_task).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (lat, bulk_rate)
}

/// Rounds per measurement (`INTEROP_BENCH_ROUNDS`, default 3). Rounds interleave the four
/// pairings, so load from elsewhere on the machine spreads over all of them; throughput is the
/// median round, latency percentiles pool every round's samples, CPU per GiB sums all rounds.
fn rounds() -> usize {
    std::env::var("INTEROP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

struct Bench {
    label: String,
    peers: Peers,
    r: Results,
    samples: HashMap<&'static str, Vec<f64>>,
    cpu: HashMap<&'static str, (f64, u64)>,
    lat: HashMap<&'static str, Vec<Duration>>,
    errors: Vec<String>,
    server_log_from: usize,
    client_log_from: usize,
}

/// Starts one pairing and measures its memory while idle (one tunnel, then per extra tunnel).
async fn setup_pair(client: Impl, server: Impl, t: &Targets) -> Bench {
    let label = format!("{} client -> {} server", client.name(), server.name());
    let p = start_pair(client, server).await;
    p.ready(t).await;
    let mut r = Results::default();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s_rss, _) = rss_kib(p.server.pid).unwrap();
    let (c_rss, _) = rss_kib(p.client.pid).unwrap();
    r.m.insert("idle_rss_server_kib", s_rss as f64);
    r.m.insert("idle_rss_client_kib", c_rss as f64);

    // Per extra idle tunnel on the server: EXTRA_TUNNELS more clients of the same kind.
    let mut extras = Vec::new();
    for i in 0..EXTRA_TUNNELS {
        extras.push(spawn_client(
            p.client_impl,
            &p.ws_url,
            &format!("bench-extra-{i}"),
        ));
    }
    for e in &extras {
        e.announcement("connected", 0, Duration::from_secs(30))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s_rss_more, _) = rss_kib(p.server.pid).unwrap();
    r.m.insert(
        "server_kib_per_idle_tunnel",
        (s_rss_more as f64 - s_rss as f64) / EXTRA_TUNNELS as f64,
    );
    // Killing the extra clients ends their sessions on the server (a Go server logs each as
    // `close 1006`): look at the logs before, and again after that has settled.
    let errors = [
        go::session_errors(&p.server.log()),
        go::session_errors(&p.client.log()),
    ]
    .concat();
    drop(extras);
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "== {label}: idle RSS server {s_rss} KiB, client {c_rss} KiB; server +{} KiB per extra idle tunnel",
        r.m["server_kib_per_idle_tunnel"]
    );
    Bench {
        label,
        r,
        samples: HashMap::new(),
        cpu: HashMap::new(),
        lat: HashMap::new(),
        errors,
        server_log_from: p.server.log().len(),
        client_log_from: p.client.log().len(),
        peers: p,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn driver() {
    let rt = runtime();
    rt.block_on(async {
        // Fail early and clearly without Go.
        let gopeer = go::gopeer();
        let rounds = rounds();
        eprintln!("gopeer: {}\nrust peers: {} rust-server|rust-client\nrounds: {rounds}", gopeer.display(), self_exe().display());
        let t = targets().await;
        let pairs = [
            (Impl::Go, Impl::Go),
            (Impl::Rust, Impl::Rust),
            (Impl::Rust, Impl::Go),
            (Impl::Go, Impl::Rust),
        ];
        // INTEROP_BENCH_ONLY=rust-rust,go-go (client-server) restricts the pairings.
        let only = std::env::var("INTEROP_BENCH_ONLY").unwrap_or_default().to_lowercase();
        let pairs: Vec<(Impl, Impl)> = pairs
            .into_iter()
            .filter(|(c, s)| only.is_empty() || only.split(',').any(|o| o.trim() == format!("{}-{}", c.name(), s.name()).to_lowercase()))
            .collect();
        let mut benches = Vec::new();
        for &(c, s) in &pairs {
            benches.push(setup_pair(c, s, &t).await);
        }
        type Run = (&'static str, &'static str, bool, u64);
        let runs: [Run; 4] = [
            ("s2c_1_mibs", "s2c_1_cpu_per_gib", true, 1),
            ("c2s_1_mibs", "c2s_1_cpu_per_gib", false, 1),
            ("s2c_64_mibs", "s2c_64_cpu_per_gib", true, STREAMS),
            ("c2s_64_mibs", "c2s_64_cpu_per_gib", false, STREAMS),
        ];
        for round in 0..rounds {
            for (key, cpu_key, s2c, streams) in runs {
                for b in &mut benches {
                    let cpu0 = b.peers.cpu();
                    let (mbs, bytes, _) = if s2c {
                        run_s2c(&b.peers, &t, streams, GIB).await
                    } else {
                        run_c2s(&b.peers, &t, streams, GIB).await
                    };
                    let cpu = b.peers.cpu() - cpu0;
                    eprintln!("   round {round} {:<28} {key:<12} {mbs:8.1} MiB/s ({} MiB)", b.label, bytes >> 20);
                    b.samples.entry(key).or_default().push(mbs);
                    let e = b.cpu.entry(cpu_key).or_insert((0.0, 0));
                    e.0 += cpu;
                    e.1 += bytes;
                }
            }
        }
        for round in 0..rounds {
            for (s2c, key) in [(true, "s2c"), (false, "c2s")] {
                for b in &mut benches {
                    let (lat, bulk) =
                        interactive(&b.peers, &t, s2c, Duration::from_secs(3), 3000).await;
                    eprintln!("   round {round} {:<28} RTT under bulk {key}: {} rounds, bulk {bulk:.0} MiB/s", b.label, lat.len());
                    b.lat.entry(key).or_default().extend(lat);
                    b.samples.entry(if s2c { "bulk_s2c_during_rtt_mibs" } else { "bulk_c2s_during_rtt_mibs" }).or_default().push(bulk);
                }
            }
        }
        let mut all = Vec::new();
        for (mut b, pair) in benches.into_iter().zip(pairs.iter().copied()) {
            for (k, v) in &b.samples {
                b.r.m.insert(k, median(v));
            }
            for (k, (cpu, bytes)) in &b.cpu {
                b.r.m.insert(k, cpu / (*bytes as f64 / GIB as f64));
            }
            for (dir, lat) in &mut b.lat {
                lat.sort();
                if lat.is_empty() {
                    continue;
                }
                let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
                let (k50, k99) = if *dir == "s2c" {
                    ("rtt_p50_bulk_s2c_us", "rtt_p99_bulk_s2c_us")
                } else {
                    ("rtt_p50_bulk_c2s_us", "rtt_p99_bulk_c2s_us")
                };
                b.r.m.insert(k50, pct(0.50));
                b.r.m.insert(k99, pct(0.99));
            }
            let (_, s_hwm) = rss_kib(b.peers.server.pid).unwrap();
            let (_, c_hwm) = rss_kib(b.peers.client.pid).unwrap();
            b.r.m.insert("peak_rss_server_kib", s_hwm as f64);
            b.r.m.insert("peak_rss_client_kib", c_hwm as f64);
            b.errors.extend(go::session_errors(&b.peers.server.log()[b.server_log_from..]));
            b.errors.extend(go::session_errors(&b.peers.client.log()[b.client_log_from..]));
            if !b.errors.is_empty() {
                eprintln!("WARNING: {}: session errors in the peers' logs:\n{}", b.label, b.errors.join("\n"));
            }
            eprintln!("{}: samples {:?}", b.label, b.samples);
            all.push((pair, b.r));
        }
        print_table(&all, rounds);
    });
}

/// Percentile `q` (0..1) of sorted samples, in µs.
fn percentile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

/// The interactive latency suite (`-- interactive`): the Go pair, the Rust pair and the Rust
/// pair with credit windows, each a server and a client process; per round, direction and
/// pairing, one bulk stream runs as fast as it can while one 1 KiB echo stream does round
/// trips on the same tunnel for `INTEROP_BENCH_RTT_SECS` (default 5) seconds. Percentiles
/// pool every round. Rounds interleave the pairings so load from elsewhere spreads over all.
fn interactive_suite() {
    let rt = runtime();
    rt.block_on(async {
        let gopeer = go::gopeer();
        let rounds = rounds();
        let secs: u64 = std::env::var("INTEROP_BENCH_RTT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        eprintln!("gopeer: {}\nrounds: {rounds}, {secs} s of round trips each", gopeer.display());
        let t = targets().await;
        let impls = [Impl::Go, Impl::Rust, Impl::RustCw];
        let mut pairs = Vec::new();
        for which in impls {
            let p = start_pair(which, which).await;
            p.ready(&t).await;
            pairs.push((which, p));
        }
        let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!("load average at start: {}", load().trim());
        let mut lat: HashMap<(Impl, bool), Vec<Duration>> = HashMap::new();
        let mut bulk: HashMap<(Impl, bool), Vec<f64>> = HashMap::new();
        for round in 0..rounds {
            for s2c in [true, false] {
                for (which, p) in &pairs {
                    let run_for = Duration::from_secs(secs);
                    let (l, rate) = interactive(p, &t, s2c, run_for, 1_000_000).await;
                    let mut sorted = l.clone();
                    sorted.sort();
                    eprintln!(
                        "   round {round} {:<8} bulk {}: {} round trips, p99 {:.0} us, bulk {rate:.0} MiB/s",
                        which.name(),
                        if s2c { "S->C" } else { "C->S" },
                        l.len(),
                        percentile_us(&sorted, 0.99)
                    );
                    lat.entry((*which, s2c)).or_default().extend(l);
                    bulk.entry((*which, s2c)).or_default().push(rate);
                }
            }
        }
        eprintln!("load average at end: {}", load().trim());
        for (which, p) in &pairs {
            let errors = [go::session_errors(&p.server.log()), go::session_errors(&p.client.log())].concat();
            if !errors.is_empty() {
                eprintln!("WARNING: {}: session errors in the peers' logs:\n{}", which.name(), errors.join("\n"));
            }
        }

        println!(
            "\n1 KiB round trips beside one bulk stream on the same tunnel (agent and server in separate \
             processes; {rounds} rounds x {secs} s per pairing and direction; percentiles over all rounds)\n"
        );
        println!(
            "| pair (client -> server) | bulk | round trips | p50 µs | p99 µs | p99.9 µs | bulk MiB/s (median) |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut p99 = HashMap::new();
        for s2c in [true, false] {
            for which in impls {
                let mut v = lat.remove(&(which, s2c)).unwrap_or_default();
                v.sort();
                let (a, b, c) = (percentile_us(&v, 0.5), percentile_us(&v, 0.99), percentile_us(&v, 0.999));
                p99.insert((which, s2c), (b, c));
                println!(
                    "| {n} -> {n} | {dir} | {} | {} | {} | {} | {} |",
                    v.len(),
                    fmt(a),
                    fmt(b),
                    fmt(c),
                    fmt(median(&bulk[&(which, s2c)])),
                    n = which.name(),
                    dir = if s2c { "S->C" } else { "C->S" },
                );
            }
        }
        println!("\ntargets for Rust+cw (reported, not asserted):");
        for s2c in [true, false] {
            let dir = if s2c { "S->C" } else { "C->S" };
            let (cw99, cw999) = p99[&(Impl::RustCw, s2c)];
            let (go99, go999) = p99[&(Impl::Go, s2c)];
            let (r99, r999) = p99[&(Impl::Rust, s2c)];
            let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
            println!(
                "  bulk {dir}: p99 {cw99:.0} us <= 1000: {}; p99.9 {cw999:.0} us <= 5000: {}; \
                 Go/Rust+cw p99 {:.1}x, p99.9 {:.1}x (>= 10x: {}); plain Rust/Rust+cw p99 {:.1}x, p99.9 {:.1}x",
                verdict(cw99 <= 1000.0),
                verdict(cw999 <= 5000.0),
                go99 / cw99,
                go999 / cw999,
                verdict(go99 / cw99 >= 10.0),
                r99 / cw99,
                r999 / cw999,
            );
        }
    });
}

fn print_table(all: &[((Impl, Impl), Results)], rounds: usize) {
    let rows: [(&str, &str, bool); 20] = [
        ("s2c_1_mibs", "1 stream S->C, MiB/s", true),
        ("c2s_1_mibs", "1 stream C->S, MiB/s", true),
        ("s2c_64_mibs", "64 streams S->C, MiB/s", true),
        ("c2s_64_mibs", "64 streams C->S, MiB/s", true),
        (
            "rtt_p50_bulk_s2c_us",
            "1 KiB RTT p50 under bulk S->C, µs",
            false,
        ),
        (
            "rtt_p99_bulk_s2c_us",
            "1 KiB RTT p99 under bulk S->C, µs",
            false,
        ),
        (
            "bulk_s2c_during_rtt_mibs",
            "  bulk S->C meanwhile, MiB/s",
            true,
        ),
        (
            "rtt_p50_bulk_c2s_us",
            "1 KiB RTT p50 under bulk C->S, µs",
            false,
        ),
        (
            "rtt_p99_bulk_c2s_us",
            "1 KiB RTT p99 under bulk C->S, µs",
            false,
        ),
        (
            "bulk_c2s_during_rtt_mibs",
            "  bulk C->S meanwhile, MiB/s",
            true,
        ),
        (
            "idle_rss_server_kib",
            "idle RSS server (1 tunnel), KiB",
            false,
        ),
        ("idle_rss_client_kib", "idle RSS client, KiB", false),
        (
            "server_kib_per_idle_tunnel",
            "server RSS per extra idle tunnel, KiB",
            false,
        ),
        ("peak_rss_server_kib", "peak RSS server (VmHWM), KiB", false),
        ("peak_rss_client_kib", "peak RSS client (VmHWM), KiB", false),
        (
            "s2c_1_cpu_per_gib",
            "CPU s/GiB, 1 stream S->C (both)",
            false,
        ),
        (
            "c2s_1_cpu_per_gib",
            "CPU s/GiB, 1 stream C->S (both)",
            false,
        ),
        (
            "s2c_64_cpu_per_gib",
            "CPU s/GiB, 64 streams S->C (both)",
            false,
        ),
        (
            "c2s_64_cpu_per_gib",
            "CPU s/GiB, 64 streams C->S (both)",
            false,
        ),
        ("", "", false),
    ];
    let get = |c: Impl, s: Impl, k: &str| {
        all.iter()
            .find(|((ac, as_), _)| *ac == c && *as_ == s)
            .and_then(|(_, r)| r.m.get(k).copied())
            .unwrap_or(f64::NAN)
    };
    println!();
    println!(
        "interop_bench: loopback, {} CPUs, {rounds} interleaved rounds; 1 GiB per throughput run (10 s cap), 64 streams x 16 MiB; \
         S = server, C = client; (↑) higher is better, (↓) lower is better; Rust/Go = Rust->Rust divided by Go->Go",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| {:<44} | {:>10} | {:>10} | {:>12} | {:>10} | {:>10} |",
        "metric", "Go->Go", "Rust->Rust", "Rust/Go", "RustC->GoS", "GoC->RustS"
    );
    println!(
        "|{:-<46}|{:->12}|{:->12}|{:->14}|{:->12}|{:->12}|",
        "", "", "", "", "", ""
    );
    for (key, label, higher_better) in rows.iter().filter(|r| !r.0.is_empty()) {
        let label = format!("{label} {}", if *higher_better { "(↑)" } else { "(↓)" });
        let gg = get(Impl::Go, Impl::Go, key);
        let rr = get(Impl::Rust, Impl::Rust, key);
        let rg = get(Impl::Rust, Impl::Go, key);
        let gr = get(Impl::Go, Impl::Rust, key);
        println!(
            "| {:<44} | {:>10} | {:>10} | {:>12} | {:>10} | {:>10} |",
            label,
            fmt(gg),
            fmt(rr),
            format!("{:.2}x", rr / gg),
            fmt(rg),
            fmt(gr)
        );
    }
    println!();
    let ratio = |k: &str| get(Impl::Rust, Impl::Rust, k) / get(Impl::Go, Impl::Go, k);
    let thr = ["s2c_1_mibs", "c2s_1_mibs", "s2c_64_mibs", "c2s_64_mibs"].map(ratio);
    let p99 = ["rtt_p99_bulk_s2c_us", "rtt_p99_bulk_c2s_us"].map(|k| 1.0 / ratio(k));
    let mem = [
        "idle_rss_server_kib",
        "idle_rss_client_kib",
        "server_kib_per_idle_tunnel",
    ]
    .map(ratio);
    let cpu = [
        "s2c_1_cpu_per_gib",
        "c2s_1_cpu_per_gib",
        "s2c_64_cpu_per_gib",
        "c2s_64_cpu_per_gib",
    ]
    .map(ratio);
    let verdict = |ok: bool| {
        if ok {
            "met"
        } else {
            "NOT met (or not measured)"
        }
    };
    // NaN (a pairing not run) propagates, so its verdict is never "met".
    let min = |v: &[f64]| {
        v.iter().copied().fold(f64::INFINITY, |a, b| {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.min(b)
            }
        })
    };
    let max = |v: &[f64]| {
        v.iter().copied().fold(f64::NEG_INFINITY, |a, b| {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.max(b)
            }
        })
    };
    println!("targets (Rust->Rust vs Go->Go; reported, not asserted):");
    println!(
        "  throughput >= 3x Go:            {} (worst {:.2}x, {:?})",
        verdict(min(&thr) >= 3.0),
        min(&thr),
        thr.map(|x| (x * 100.0).round() / 100.0)
    );
    println!(
        "  RTT p99 under bulk >= 10x lower: {} (worst {:.1}x lower, {:?})",
        verdict(min(&p99) >= 10.0),
        min(&p99),
        p99.map(|x| (x * 10.0).round() / 10.0)
    );
    println!(
        "  idle memory <= 1/4 of Go:        {} (worst {:.2} of Go, {:?})",
        verdict(max(&mem) <= 0.25),
        max(&mem),
        mem.map(|x| (x * 100.0).round() / 100.0)
    );
    println!(
        "  CPU per GiB <= 1/2 of Go:        {} (worst {:.2} of Go, {:?})",
        verdict(max(&cpu) <= 0.5),
        max(&cpu),
        cpu.map(|x| (x * 100.0).round() / 100.0)
    );
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
