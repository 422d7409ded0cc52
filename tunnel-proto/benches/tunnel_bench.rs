//! Loopback benchmark of the tunnel, with its baselines measured in the same run.
//!
//! `cargo bench -p tunnel-proto --bench tunnel_bench` prints:
//! - one stream's throughput each way over ws and wss (the real connector and acceptor), as a
//!   ratio to raw loopback TCP and raw TLS;
//! - a TCP-forwarded path (client -> server port -> tunnel -> agent -> service) beside rathole
//!   on the same path, when a `rathole` binary is on PATH (`cargo install rathole`);
//! - 16 and 64 parallel streams;
//! - 64-byte and 1 KB echo round trips, idle and while another stream saturates the tunnel;
//! - memory per idle tunnel and per idle stream (RSS deltas, each in a fresh process of this
//!   binary; `TUNNEL_BENCH_SECTION=memory` runs only those).
//!
//! Figures, not assertions: the machines are shared and noisy. Every loop is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{
    Acceptor, AcceptorConfig, ClientKey, text_response, tls_server_config,
};
use tunnel_proto::driver::connector::{Connector, ConnectorConfig, Trust};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, pipe, websocket_config};
use tunnel_proto::{Role, SessionConfig};

const GIB: u64 = 1 << 30;
const SINGLE: u64 = GIB;

fn main() {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    rlimit::Resource::NOFILE.set(hard, hard).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match std::env::var(SECTION_ENV).as_deref() {
        Ok("memory-tunnels") => runtime.block_on(memory_tunnels(false)),
        Ok("memory-tunnels-tls") => runtime.block_on(memory_tunnels(true)),
        Ok("memory-streams") => runtime.block_on(memory_streams()),
        Ok("memory") => memory_in_fresh_processes(),
        _ => runtime.block_on(run()),
    }
}

// === services: sink, source, echo, over any byte stream ===

/// Reads an 8-byte length, then that many bytes, then answers one byte.
async fn sink<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let Ok(len) = s.read_u64().await else { return };
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        match s.read(&mut buf[..left.min(64 << 10) as usize]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n as u64,
        }
    }
    let _ = s.write_all(b"k").await;
    let _ = s.flush().await;
    let _ = s.read(&mut buf[..1]).await;
}

/// Reads an 8-byte length, then writes that many bytes.
async fn source<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let Ok(len) = s.read_u64().await else { return };
    let buf = vec![0x5au8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = s.flush().await;
    let mut b = [0u8; 1];
    let _ = s.read(&mut b).await;
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

#[derive(Clone, Copy)]
enum Service {
    Sink,
    Source,
    Echo,
}

async fn serve(service: Service, s: TcpStream) {
    s.set_nodelay(true).unwrap();
    match service {
        Service::Sink => sink(s).await,
        Service::Source => source(s).await,
        Service::Echo => echo(s).await,
    }
}

async fn spawn_service(service: Service) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(service, s));
        }
    });
    addr
}

/// Sends `len` bytes through `s` to a sink; seconds until the sink confirmed.
async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, len: u64) -> f64 {
    let start = Instant::now();
    s.write_u64(len).await.unwrap();
    let buf = vec![0xa5u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    s.flush().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    start.elapsed().as_secs_f64()
}

/// Asks a source for `len` bytes through `s`; seconds until the last arrived.
async fn download<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, len: u64) -> f64 {
    let start = Instant::now();
    s.write_u64(len).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "source ended early");
        left -= n as u64;
    }
    start.elapsed().as_secs_f64()
}

fn gbit(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

// === tunnels ===

struct Tls {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn tls() -> Tls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let server = tls_server_config(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    Tls {
        ca_pem: ca.pem(),
        server,
    }
}

/// An agent (client) and server connected through the real connector and acceptor.
struct Pair {
    server: Tunnel,
    agent: Tunnel,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn pair(tls: Option<&Tls>) -> Pair {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut ws_config = websocket_config(DEFAULT_MAX_MESSAGE);
    // An experiment knob of the memory sections: both ends' websocket read buffer, in bytes.
    if let Some(bytes) = std::env::var(READ_BUFFER_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        ws_config.read_buffer_size = bytes;
    }
    let mut config = AcceptorConfig::new(["/connect"]);
    config.set_websocket_config(Some(ws_config));
    config.set_tls(tls.map(|t| t.server.clone()));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let acceptor = Acceptor::new(
        config,
        |_req| async { Ok::<_, tunnel_proto::driver::acceptor::Reject>(ClientKey::new("bench")) },
        move |accepted: tunnel_proto::driver::acceptor::AcceptedTunnel| {
            let tx = tx.clone();
            async move {
                let (tunnel, driver) = Tunnel::new(
                    accepted.ws,
                    SessionConfig::new(Role::Server),
                    Arc::new(|_| false),
                );
                let _ = tx.send(tunnel).await;
                driver.await;
            }
        },
        |_req| async { text_response(http::StatusCode::NOT_FOUND, "no") },
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { acceptor.serve(listener, token).await });
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let mut cc = ConnectorConfig::new(format!("{scheme}://127.0.0.1:{}/connect", addr.port()));
    cc.set_websocket_config(Some(ws_config));
    if let Some(t) = tls {
        cc.set_trust(Trust::CaBundle {
            pem: t.ca_pem.clone().into_bytes(),
            with_system_roots: false,
        });
    }
    let ws = Connector::new(cc).unwrap().connect().await.unwrap();
    let agent = Tunnel::spawn(
        ws,
        SessionConfig::new(Role::Client),
        Arc::new(|t| t.proto == "tcp"),
    );
    let server = rx.recv().await.unwrap();
    let agent_loop = agent.clone();
    tokio::spawn(async move {
        while let Some(stream) = agent_loop.accept().await {
            tokio::spawn(async move {
                if let Ok(socket) = TcpStream::connect(&stream.target().address).await {
                    socket.set_nodelay(true).unwrap();
                    let _ = pipe(stream, socket).await;
                }
            });
        }
    });
    Pair {
        server,
        agent,
        _shutdown: shutdown.drop_guard(),
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    size: usize,
    count: usize,
) -> (Duration, Duration) {
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

// === rathole ===

struct Rathole {
    children: Vec<std::process::Child>,
    port: u16,
    _dir: std::path::PathBuf,
}

impl Drop for Rathole {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn rathole(service: SocketAddr) -> Option<Rathole> {
    let binary = std::env::var("RATHOLE").unwrap_or_else(|_| "rathole".into());
    if std::process::Command::new(&binary)
        .arg("--help")
        .output()
        .is_err()
    {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("tunnel-bench-rathole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (control, port) = (free_port(), free_port());
    std::fs::write(
        dir.join("server.toml"),
        format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.services.bench]\ntoken = \"t\"\nbind_addr = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.services.bench]\ntoken = \"t\"\nlocal_addr = \"{service}\"\n"),
    )
    .unwrap();
    let spawn = |args: [&str; 2]| {
        std::process::Command::new(&binary)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut guard = Rathole {
        children: vec![spawn([
            "--server",
            dir.join("server.toml").to_str().unwrap(),
        ])],
        port,
        _dir: dir.clone(),
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    guard.children.push(spawn([
        "--client",
        dir.join("client.toml").to_str().unwrap(),
    ]));
    // Wait (bounded) until the service port answers through the tunnel; the guard kills and
    // reaps both processes if it never does.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await
            && s.write_u64(1).await.is_ok()
            && s.write_all(b"x").await.is_ok()
        {
            let mut b = [0u8; 1];
            let answered = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut b)).await;
            if answered.is_ok_and(|r| r.is_ok()) {
                return Some(guard);
            }
        }
    }
    None
}

/// A TCP port on the server side whose connections are forwarded into the tunnel to `target`:
/// the same path as rathole's (client -> server port -> tunnel -> agent -> service).
async fn forwarder(server: Tunnel, target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = l.accept().await {
            socket.set_nodelay(true).unwrap();
            let stream = server.open("tcp", &target.to_string()).unwrap();
            tokio::spawn(pipe(stream, socket));
        }
    });
    addr
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn run() {
    let sink_addr = spawn_service(Service::Sink).await;
    let source_addr = spawn_service(Service::Source).await;
    let echo_addr = spawn_service(Service::Echo).await;
    let tls = tls();
    println!(
        "tunnel-proto loopback benchmark ({} cores); every figure is one run on a shared machine\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Raw baselines.
    let raw_up = gbit(SINGLE, upload(tcp(sink_addr).await, SINGLE).await);
    let raw_down = gbit(SINGLE, download(tcp(source_addr).await, SINGLE).await);
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = tls_listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                s.set_nodelay(true).unwrap();
                let mut s = acceptor.accept(s).await.unwrap();
                let mut kind = [0u8; 1];
                s.read_exact(&mut kind).await.unwrap();
                if kind[0] == b'u' {
                    sink(s).await
                } else {
                    source(s).await
                }
            });
        }
    });
    let tls_client = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&tls.ca_pem) {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let tls_stream = |kind: u8| {
        let tls_client = tls_client.clone();
        async move {
            let mut s = tls_client
                .connect(
                    rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                    tcp(tls_addr).await,
                )
                .await
                .unwrap();
            s.write_all(&[kind]).await.unwrap();
            s
        }
    };
    let tls_up = gbit(SINGLE, upload(tls_stream(b'u').await, SINGLE).await);
    let tls_down = gbit(SINGLE, download(tls_stream(b'd').await, SINGLE).await);

    // One stream through the tunnel, ws and wss.
    let ws = pair(None).await;
    let wss = pair(Some(&tls)).await;
    let ws_down = gbit(
        SINGLE,
        upload(
            ws.server.open("tcp", &sink_addr.to_string()).unwrap(),
            SINGLE,
        )
        .await,
    );
    let ws_up = gbit(
        SINGLE,
        download(
            ws.server.open("tcp", &source_addr.to_string()).unwrap(),
            SINGLE,
        )
        .await,
    );
    let wss_down = gbit(
        SINGLE,
        upload(
            wss.server.open("tcp", &sink_addr.to_string()).unwrap(),
            SINGLE,
        )
        .await,
    );
    let wss_up = gbit(
        SINGLE,
        download(
            wss.server.open("tcp", &source_addr.to_string()).unwrap(),
            SINGLE,
        )
        .await,
    );

    println!(
        "single stream, {} MiB each                     Gbit/s   vs raw",
        SINGLE >> 20
    );
    println!("  raw TCP      write / read                {raw_up:6.2} / {raw_down:5.2}");
    println!("  raw TLS      write / read                {tls_up:6.2} / {tls_down:5.2}");
    println!(
        "  ws  server->agent / agent->server        {ws_down:6.2} / {ws_up:5.2}   {:.0}% / {:.0}% of raw TCP",
        100.0 * ws_down / raw_up,
        100.0 * ws_up / raw_down
    );
    println!(
        "  wss server->agent / agent->server        {wss_down:6.2} / {wss_up:5.2}   {:.0}% / {:.0}% of raw TCP ({:.0}% / {:.0}% of raw TLS)",
        100.0 * wss_down / raw_up,
        100.0 * wss_up / raw_down,
        100.0 * wss_down / tls_up,
        100.0 * wss_up / tls_down
    );

    // The forwarded path beside rathole.
    let fwd = forwarder(ws.server.clone(), sink_addr).await;
    let fwd_rate = gbit(SINGLE, upload(tcp(fwd).await, SINGLE).await);
    match rathole(sink_addr).await {
        Some(r) => {
            let rh = gbit(
                SINGLE,
                upload(
                    tcp(SocketAddr::from(([127, 0, 0, 1], r.port))).await,
                    SINGLE,
                )
                .await,
            );
            println!(
                "  forwarded TCP -> ws tunnel -> service    {fwd_rate:6.2}           rathole on the same path {rh:.2} ({:.0}% of raw); ours / rathole = {:.2}",
                100.0 * rh / raw_up,
                fwd_rate / rh
            );
        }
        None => println!(
            "  forwarded TCP -> ws tunnel -> service    {fwd_rate:6.2}           rathole: not on PATH (cargo install rathole), not measured"
        ),
    }

    // Parallel streams.
    for n in [16u64, 64] {
        let each = SINGLE / n;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let s = ws.server.open("tcp", &sink_addr.to_string()).unwrap();
            tasks.spawn(upload(s, each));
        }
        while tasks.join_next().await.is_some() {}
        let rate = gbit(each * n, start.elapsed().as_secs_f64());
        println!(
            "  {n:2} parallel streams (ws, server->agent)  {rate:6.2}           {:.0}% of one stream",
            100.0 * rate / ws_down
        );
    }

    // Latency, idle and beside a saturating stream.
    println!("\nround trips through the ws tunnel (echo service)          p50        p99");
    let mut probe = ws.server.open("tcp", &echo_addr.to_string()).unwrap();
    let (p50, p99) = round_trips(&mut probe, 64, 5000).await;
    println!(
        "  64 B, idle tunnel                                  {:>10} {:>10}",
        us(p50),
        us(p99)
    );
    let mut raw_probe = tcp(echo_addr).await;
    let (r50, r99) = round_trips(&mut raw_probe, 64, 5000).await;
    println!(
        "  64 B, raw TCP to the same echo service             {:>10} {:>10}",
        us(r50),
        us(r99)
    );
    // Control: the same load on another tunnel, so only the CPU is shared, not the tunnel.
    let other = pair(None).await;
    let bulk = other.server.open("tcp", &source_addr.to_string()).unwrap();
    let bulk_task = tokio::spawn(download(bulk, 64 * GIB));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (o50, o99) = round_trips(&mut probe, 64, 3000).await;
    bulk_task.abort();
    drop(other);
    println!(
        "  64 B, while a bulk stream saturates another tunnel {:>10} {:>10}   (CPU shared, tunnel not)",
        us(o50),
        us(o99)
    );
    let bulk = ws.server.open("tcp", &source_addr.to_string()).unwrap();
    let bulk_task = tokio::spawn(download(bulk, 64 * GIB));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = ws.server.stats().data_bytes_in;
    let start = Instant::now();
    let (s50, s99) = round_trips(&mut probe, 64, 3000).await;
    let (k50, k99) = round_trips(&mut probe, 1024, 3000).await;
    let bulk_rate = gbit(
        ws.server.stats().data_bytes_in - before,
        start.elapsed().as_secs_f64(),
    );
    bulk_task.abort();
    println!(
        "  64 B, while a bulk stream saturates the tunnel     {:>10} {:>10}",
        us(s50),
        us(s99)
    );
    println!(
        "  1 KB, while a bulk stream saturates the tunnel     {:>10} {:>10}   (bulk ran at {bulk_rate:.2} Gbit/s meanwhile)",
        us(k50),
        us(k99)
    );
    drop(probe);

    drop(ws);
    drop(wss);
    memory_in_fresh_processes();
}

// === memory, each figure in a fresh process ===

/// Runs each memory section in a fresh copy of this binary and prints what it printed. In the
/// process that moved gigabytes, the allocator keeps freed arenas and the RSS delta of new
/// tunnels says little; a fresh process starts from the bare runtime.
fn memory_in_fresh_processes() {
    println!("\nmemory (RSS deltas, each in a fresh process; both ends of each tunnel live there)");
    let runs: [(&str, Option<&str>); 4] = [
        ("memory-tunnels", None),
        ("memory-tunnels-tls", None),
        // Where an idle tunnel's memory goes: the same with 4 KiB websocket read buffers
        // (tungstenite fills its read buffer to capacity on the first read, so all of it is
        // resident).
        ("memory-tunnels-tls", Some("4096")),
        ("memory-streams", None),
    ];
    for (section, read_buffer) in runs {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.env(SECTION_ENV, section);
        if let Some(bytes) = read_buffer {
            child.env(READ_BUFFER_ENV, bytes);
        }
        let out = child
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            println!("  {section}: the child failed ({})", out.status);
        }
    }
}

/// Which part a child process runs: `memory-tunnels`, `memory-streams`; `memory` runs both
/// children and nothing else (no transfers).
const SECTION_ENV: &str = "TUNNEL_BENCH_SECTION";

/// The websocket read buffer of both ends in bytes, for the memory experiments (default: the
/// crate's `websocket_config`, 16 KiB).
const READ_BUFFER_ENV: &str = "TUNNEL_BENCH_WS_READ_BUFFER";

/// Idle tunnels (connector + acceptor, both sessions; ws, or wss with `tls`) per tunnel,
/// divided by the tunnels that are up (each `pair` returns once both ends are).
async fn memory_tunnels(with_tls: bool) {
    const TUNNELS: usize = 200;
    let tls = with_tls.then(tls);
    // One pair first: the runtime's and the TLS/ws code's one-time allocations are not a
    // tunnel's.
    let warm = pair(tls.as_ref()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib();
    let mut pairs = Vec::new();
    for _ in 0..TUNNELS {
        pairs.push(pair(tls.as_ref()).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let up = pairs
        .iter()
        .filter(|p| p.server.close_reason().is_none() && p.agent.close_reason().is_none())
        .count();
    let per_tunnel = (rss_kib().saturating_sub(base)) as f64 / up.max(1) as f64;
    let read_buffer = std::env::var(READ_BUFFER_ENV)
        .map(|b| format!(", {b} B ws read buffers"))
        .unwrap_or_default();
    println!(
        "  idle tunnel (agent + server ends, connector + acceptor, {}{read_buffer})  {per_tunnel:6.1} KiB  ({up} of {TUNNELS} tunnels up)",
        if tls.is_some() { "wss" } else { "ws" }
    );
    drop(warm);
}

/// Idle streams through one tunnel to a local listener that holds its sockets, per stream,
/// divided by the streams whose local socket was accepted.
async fn memory_streams() {
    const STREAMS: usize = 5000;
    let holder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let holder_addr = holder.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let held2 = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = holder.accept().await {
            held2.lock().unwrap().push(s);
        }
    });
    let one = pair(None).await;
    // A few streams first, so the session tables' first growth is not counted.
    let mut streams = Vec::with_capacity(STREAMS + 16);
    for _ in 0..16 {
        streams.push(one.server.open("tcp", &holder_addr.to_string()).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib();
    let held_before = held.lock().unwrap().len();
    for _ in 0..STREAMS {
        streams.push(one.server.open("tcp", &holder_addr.to_string()).unwrap());
    }
    // Bounded wait for the agent's dials (a burst of 5,000 goes through the listen backlog).
    for _ in 0..400 {
        if held.lock().unwrap().len() >= held_before + STREAMS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connected = held.lock().unwrap().len() - held_before;
    let per_stream = (rss_kib().saturating_sub(base)) as f64 * 1024.0 / connected.max(1) as f64;
    println!(
        "  idle stream (both ends, agent pipe task, local socket)    {per_stream:6.0} B    ({connected} of {STREAMS} streams connected, {} open on the agent)",
        one.agent.stream_count()
    );
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}
