//! Scale bench (issue #19): N simulated cluster agents in this one process, each a real TLS
//! websocket tunnel through tunnel-proto's connector with the headers agent-core builds
//! (`X-API-Tunnel-Token`, `X-API-Tunnel-Params`), against a real `tunnel-server` in its own
//! process with its SQLite store; then the same clients against the Go remotedialer server
//! (`tests/interop/gopeer server`, with TLS) for Go's memory per tunnel and time to reach N.
//!
//! ```text
//!   this process                                     tunnel-server (own process, SQLite)
//!   N agents: Connector ─wss /v3/connect─────────────▶ Acceptor ─▶ Registry
//!     run_forever (jittered backoff)                       │
//!   kubectl-style GETs ─https /k8s/clusters/<id>/…───────▶ proxy::kube ─stream─▶ agent ─▶
//!   stand-in apiserver (TLS) ◀──────────────────────────────────────────────────── dial tcp
//! ```
//!
//! Prints, per N: server RSS per idle tunnel (VmRSS growth / sessions the server's metrics
//! count), server CPU while idle, accept rate while reaching N, the reconnect storm after a
//! `kill -9` and restart (time to N again, failed attempts, agents stuck), and the p50/p99 of a
//! kubectl-style GET to a random cluster. Nothing is asserted: the machine is shared.
//!
//! ```sh
//! cargo bench -p server-side --bench scale
//! ## knobs (all optional):
//! ##   SCALE_BENCH_N=1000,5000,10000   agent counts, one round each (default these three)
//! ##   SCALE_BENCH_IDLE_SECS=20        idle CPU window
//! ##   SCALE_BENCH_REQUESTS=1000       kubectl-style GETs per round
//! ##   SCALE_BENCH_GO=0                skip the Go server
//! ##   SCALE_BENCH_TSV=path            also write one line per round and server (for the plot)
//! ```
//!
//! Every phase has a time bound; a phase that runs out says so and the round goes on.
//! `cargo test -p server-side --bench scale` runs a smoke instead: 50 agents, a few seconds,
//! checking outcomes (all connected, GETs answered, the storm settled), never figures.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use server_side::store::{Cluster, ImportInto, RegistrationToken, Snapshot, SqliteStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::connector::{
    Connector, ConnectorConfig, ConnectorStats, SessionEnd, Trust, run_forever,
};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, pipe, websocket_config};
use tunnel_proto::{Role, SessionConfig};

use support::{FakeApiserver, HttpClient, TempDir, test_pki};

/// Handshakes in flight while the fleet first connects: the accept rate is the server's, not
/// the listen backlog's (a burst of 10,000 SYNs overflows it and costs 1 s SYN retransmits).
const RAMP_WINDOW: usize = 256;

/// The server's `/proc/PID/stat` ticks per second (`getconf CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

struct Knobs {
    ns: Vec<usize>,
    idle: Duration,
    requests: usize,
    go: bool,
    tsv: Option<PathBuf>,
    /// Pause after reaching N before measuring RSS (transient handshake memory goes back).
    settle: Duration,
    /// `cargo test`: 50 agents, a few seconds, and the round's outcome checked.
    smoke: bool,
}

impl Knobs {
    fn from_env() -> Self {
        let ns = std::env::var("SCALE_BENCH_N")
            .unwrap_or_else(|_| "1000,5000,10000".to_owned())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("SCALE_BENCH_N: comma-separated counts")
            })
            .collect();
        let num = |name: &str, default: u64| {
            std::env::var(name)
                .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
                .unwrap_or(default)
        };
        Self {
            ns,
            idle: Duration::from_secs(num("SCALE_BENCH_IDLE_SECS", 20)),
            requests: num("SCALE_BENCH_REQUESTS", 1000) as usize,
            go: std::env::var("SCALE_BENCH_GO").map_or(true, |v| v != "0"),
            tsv: std::env::var_os("SCALE_BENCH_TSV").map(PathBuf::from),
            settle: Duration::from_secs(3),
            smoke: false,
        }
    }

    /// What `cargo test` runs (this target has `test = true`): one small round against our
    /// server only, checking that every agent connected, every GET crossed a tunnel and the
    /// storm settled with no agent stuck. No figure is checked.
    fn smoke() -> Self {
        Self {
            ns: vec![50],
            idle: Duration::from_secs(1),
            requests: 50,
            go: false,
            tsv: None,
            settle: Duration::from_millis(300),
            smoke: true,
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` runs this target with no argument.
    let knobs = if std::env::args().any(|a| a == "--bench") {
        Knobs::from_env()
    } else {
        Knobs::smoke()
    };
    let max_n = knobs.ns.iter().copied().max().unwrap_or(0);
    raise_nofile(max_n as u64 + 4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(knobs));
}

async fn run(knobs: Knobs) {
    let gopeer = if knobs.go { build_gopeer() } else { None };
    println!(
        "scale bench: N = {:?}, idle window {:?}, {} kubectl-style GETs per round; 2-core shared \
         machine, load average {}",
        knobs.ns,
        knobs.idle,
        knobs.requests,
        load_average()
    );
    let apiserver = FakeApiserver::start().await;
    let mut rows = Vec::new();
    for &n in &knobs.ns {
        let ours = ours_round(n, &knobs, &apiserver).await;
        ours.print();
        if knobs.smoke {
            ours.check();
        }
        rows.push(ours);
        if let Some(gopeer) = &gopeer {
            let go = go_round(gopeer, n, &knobs, &apiserver).await;
            go.print();
            rows.push(go);
        }
    }
    println!("\nsummary (load average now {})", load_average());
    println!(
        "| server | N | connected | time to N, s | accepts/s | RSS before, MiB | RSS at N, MiB | RSS/tunnel, KiB | idle CPU, % of a core | storm: all back in, s | storm: failed attempts | storm: not back | GET p50 / p99, ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.table_row());
    }
    if let Some(path) = &knobs.tsv {
        let mut out = String::from(
            "server\tn\tconnected\treach_s\trss_before_kib\trss_at_n_kib\tkib_per_tunnel\tidle_cpu_pct\n",
        );
        for r in &rows {
            out.push_str(&format!(
                "{}\t{}\t{}\t{:.3}\t{}\t{}\t{:.2}\t{:.2}\n",
                r.server,
                r.n,
                r.connected,
                r.reach.as_secs_f64(),
                r.rss_before,
                r.rss_at_n,
                r.kib_per_tunnel(),
                r.idle_cpu_pct
            ));
        }
        std::fs::write(path, out).unwrap();
        println!("wrote {}", path.display());
    }
}

// === one round ===

#[derive(Default)]
struct Round {
    server: &'static str,
    n: usize,
    /// Sessions the server counted (ours: its metrics; Go: the clients' count).
    connected: usize,
    reached: bool,
    reach: Duration,
    rss_before: u64,
    rss_at_n: u64,
    idle_cpu_pct: f64,
    storm: Option<Storm>,
    gets: Option<Gets>,
    notes: Vec<String>,
}

struct Storm {
    settled: Option<Duration>,
    failed_attempts: u64,
    attempts: u64,
    stuck: usize,
}

struct Gets {
    ok: usize,
    failed: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Round {
    /// The smoke's checks: outcomes, never timings.
    fn check(&self) {
        assert!(
            self.reached,
            "only {} of {} agents connected",
            self.connected, self.n
        );
        assert_eq!(self.connected, self.n);
        let gets = self.gets.as_ref().unwrap();
        assert_eq!(gets.failed, 0, "kubectl-style GETs failed");
        let storm = self.storm.as_ref().unwrap();
        assert!(
            storm.settled.is_some(),
            "the reconnect storm did not settle"
        );
        assert_eq!(storm.stuck, 0, "agents stuck after the restart");
        assert!(storm.failed_attempts <= storm.attempts);
    }

    fn kib_per_tunnel(&self) -> f64 {
        if self.connected == 0 {
            return 0.0;
        }
        self.rss_at_n.saturating_sub(self.rss_before) as f64 / self.connected as f64
    }

    fn accepts_per_sec(&self) -> f64 {
        self.connected as f64 / self.reach.as_secs_f64().max(1e-9)
    }

    fn print(&self) {
        println!("\n== {} server, N = {} ==", self.server, self.n);
        println!(
            "  reach N:      {} of {} connected in {:.2} s{} ({:.0} accepts/s)",
            self.connected,
            self.n,
            self.reach.as_secs_f64(),
            if self.reached { "" } else { " (TIMED OUT)" },
            self.accepts_per_sec()
        );
        println!(
            "  server RSS:   {} KiB before, {} KiB at N: {:.2} KiB per idle tunnel",
            self.rss_before,
            self.rss_at_n,
            self.kib_per_tunnel()
        );
        println!("  idle CPU:     {:.2} % of one core", self.idle_cpu_pct);
        if let Some(g) = &self.gets {
            println!(
                "  kubectl GET:  {} ok, {} failed; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                g.ok,
                g.failed,
                ms(g.p50),
                ms(g.p99),
                ms(g.max)
            );
        }
        if let Some(s) = &self.storm {
            match s.settled {
                Some(t) => println!(
                    "  storm:        all back {:.2} s after the restart; {} attempts, {} failed; {} not back",
                    t.as_secs_f64(),
                    s.attempts,
                    s.failed_attempts,
                    s.stuck
                ),
                None => println!(
                    "  storm:        NOT settled within 90 s; {} attempts, {} failed; {} agents not back yet",
                    s.attempts, s.failed_attempts, s.stuck
                ),
            }
        }
        for note in &self.notes {
            println!("  note: {note}");
        }
    }

    fn table_row(&self) -> String {
        let storm = match &self.storm {
            Some(Storm {
                settled: Some(t), ..
            }) => format!("{:.1}", t.as_secs_f64()),
            Some(_) => "not within 90".to_owned(),
            None => "-".to_owned(),
        };
        let (failed, stuck) = match &self.storm {
            Some(s) => (s.failed_attempts.to_string(), s.stuck.to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let gets = match &self.gets {
            Some(g) => format!("{:.2} / {:.2}", ms(g.p50), ms(g.p99)),
            None => "-".to_owned(),
        };
        format!(
            "| {} | {} | {} | {:.2}{} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {} |",
            self.server,
            self.n,
            self.connected,
            self.reach.as_secs_f64(),
            if self.reached { "" } else { " (timed out)" },
            self.accepts_per_sec(),
            self.rss_before as f64 / 1024.0,
            self.rss_at_n as f64 / 1024.0,
            self.kib_per_tunnel(),
            self.idle_cpu_pct,
            storm,
            failed,
            stuck,
            gets
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bound on reaching N from a cold start: generous, a phase that runs out is reported.
fn reach_bound(n: usize) -> Duration {
    Duration::from_secs(60 + n as u64 / 100)
}

async fn ours_round(n: usize, knobs: &Knobs, apiserver: &FakeApiserver) -> Round {
    let mut round = Round {
        server: "tunnel-server",
        n,
        ..Round::default()
    };
    let dir = TempDir::new("scale");
    let started = Instant::now();
    let (clusters, admin_token) = register_clusters(dir.path(), n);
    println!(
        "\n[{n}] registered {n} clusters and an admin in the SQLite store in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let mut server = ServerProc::start(dir.path(), "127.0.0.1:0", n);
    tokio::time::sleep(Duration::from_secs(1)).await;
    round.rss_before = rss_kib(server.pid());
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let trust = Trust::CaBundle {
        pem: ca_pem.clone().into_bytes(),
        with_system_roots: false,
    };
    let params = apiserver.cluster_params("sa-token");
    let url = format!("wss://{}/v3/connect", server.addr);
    let agents: Vec<(String, HeaderMap)> = clusters
        .iter()
        .map(|(_, token)| {
            let headers = agent_core::runtime::main_headers(token, &params).unwrap();
            (url.clone(), headers)
        })
        .collect();

    let t0 = Instant::now();
    let fleet = Fleet::spawn(agents, trust);
    let reached = wait_for(reach_bound(n), || async {
        let s = server.sessions().await;
        (s >= n).then_some(s)
    })
    .await;
    round.reach = t0.elapsed();
    round.reached = reached.is_some();
    round.connected = server.sessions().await;
    println!(
        "[{n}] {} sessions after {:.2} s (clients up: {})",
        round.connected,
        round.reach.as_secs_f64(),
        fleet.up()
    );

    // Let the handshakes' transient allocations go back before measuring the idle tunnels.
    tokio::time::sleep(knobs.settle).await;
    round.rss_at_n = rss_kib(server.pid());
    round.connected = server.sessions().await;
    round.idle_cpu_pct = idle_cpu(server.pid(), knobs.idle).await;
    let rss_after_idle = rss_kib(server.pid());
    round.notes.push(format!(
        "server RSS after the idle window: {rss_after_idle} KiB; this process (all {n} agent ends): {} KiB",
        rss_kib(std::process::id())
    ));

    round.gets = Some(
        kubectl_gets(
            &server,
            ca_pem.as_bytes(),
            &admin_token,
            &clusters,
            knobs.requests,
        )
        .await,
    );

    // The reconnect storm: kill -9, restart on the same port, every agent's backoff brings it
    // back.
    let before = fleet.stats();
    let port_addr = server.addr.to_string();
    server.kill9();
    let killed = Instant::now();
    let restarted = ServerProc::start(dir.path(), &port_addr, n);
    let restart = Instant::now();
    round.notes.push(format!(
        "restart took {:.2} s from the kill to the listening line",
        killed.elapsed().as_secs_f64()
    ));
    let settled = wait_for(Duration::from_secs(90), || async {
        let s = restarted.sessions().await;
        (s >= n && fleet.up() >= n).then_some(())
    })
    .await
    .map(|()| restart.elapsed());
    let after = fleet.stats();
    round.storm = Some(Storm {
        settled,
        attempts: after.0 - before.0,
        failed_attempts: after.1 - before.1,
        stuck: n.saturating_sub(fleet.up()),
    });
    let log = restarted.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    if let Some(first) = errors.first() {
        round.notes.push(format!(
            "{} ERROR lines in the restarted server's log, the first: {first}",
            errors.len()
        ));
    }
    fleet.stop().await;
    restarted.kill();
    round
}

async fn go_round(gopeer: &Path, n: usize, knobs: &Knobs, apiserver: &FakeApiserver) -> Round {
    let mut round = Round {
        server: "Go remotedialer",
        n,
        ..Round::default()
    };
    let dir = TempDir::new("scale-go");
    let (ca_pem, cert_pem, key_pem) = test_pki("gopeer");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let mut child = Command::new(gopeer)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--forward-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("gopeer.log")).unwrap(),
        ))
        .spawn()
        .expect("start gopeer server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let announced: serde_json::Value = serde_json::from_str(&line).expect("gopeer's JSON line");
    let url = announced["ws"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id();
    round.rss_before = rss_kib(pid);

    let params = apiserver.cluster_params("sa-token");
    let agents: Vec<(String, HeaderMap)> = (0..n)
        .map(|i| {
            let mut headers =
                agent_core::runtime::main_headers(&format!("token-{i}"), &params).unwrap();
            // gopeer's client key.
            headers.insert(
                "x-tunnel-id",
                HeaderValue::from_str(&format!("agent-{i}")).unwrap(),
            );
            (url.clone(), headers)
        })
        .collect();
    let trust = Trust::CaBundle {
        pem: ca_pem.into_bytes(),
        with_system_roots: false,
    };
    let t0 = Instant::now();
    let fleet = Fleet::spawn(agents, trust);
    // remotedialer has no session count to ask: the clients' count it is (a session is up on
    // the client once the upgrade answered 101, which the Go server sends after registering).
    let reached = wait_for(reach_bound(n), || async { (fleet.up() >= n).then_some(()) }).await;
    round.reach = t0.elapsed();
    round.reached = reached.is_some();
    tokio::time::sleep(knobs.settle).await;
    round.rss_at_n = rss_kib(pid);
    round.connected = fleet.up();
    round.idle_cpu_pct = idle_cpu(pid, knobs.idle).await;
    fleet.stop().await;
    let _ = child.kill();
    let _ = child.wait();
    round
}

// === the agents ===

/// N agent tunnels, each on tunnel-proto's `run_forever` with the default jittered backoff.
struct Fleet {
    cancel: CancellationToken,
    up: Arc<AtomicUsize>,
    stats: Vec<Arc<ConnectorStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn spawn(agents: Vec<(String, HeaderMap)>, trust: Trust) -> Self {
        let cancel = CancellationToken::new();
        let up = Arc::new(AtomicUsize::new(0));
        let window = Arc::new(Semaphore::new(RAMP_WINDOW));
        let mut stats = Vec::with_capacity(agents.len());
        let mut tasks = Vec::with_capacity(agents.len());
        for (url, headers) in agents {
            let mut config = ConnectorConfig::new(url);
            // As agent-core's `connector_config`, without a proxy.
            config
                .set_headers(headers)
                .set_trust(trust.clone())
                .set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
            let connector = Connector::new(config).expect("connector");
            stats.push(connector.stats().clone());
            let (cancel, up, window) = (cancel.clone(), up.clone(), window.clone());
            tasks.push(tokio::spawn(async move {
                let mut permit = Some(window.acquire_owned().await.unwrap());
                run_forever(&connector, cancel, |ws| {
                    let first = permit.take();
                    let up = up.clone();
                    async move {
                        drop(first);
                        let tunnel = Tunnel::spawn(
                            ws,
                            SessionConfig::new(Role::Client),
                            Arc::new(|t| t.proto == "tcp"),
                        );
                        up.fetch_add(1, Ordering::Relaxed);
                        let _down = Decrement(up);
                        SessionEnd::Reconnect {
                            reason: serve_streams(tunnel).await,
                        }
                    }
                })
                .await;
            }));
        }
        Self {
            cancel,
            up,
            stats,
            tasks,
        }
    }

    fn up(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }

    /// (attempts, failures) summed over every agent.
    fn stats(&self) -> (u64, u64) {
        self.stats.iter().fold((0, 0), |(a, f), s| {
            let s = s.snapshot();
            (a + s.attempts, f + s.failures)
        })
    }

    async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The agent's side of each stream: dial the target locally and pipe, as agent-core's
/// `dial_and_pipe` does. Returns why the tunnel ended.
async fn serve_streams(tunnel: Tunnel) -> String {
    while let Some(stream) = tunnel.accept().await {
        tokio::spawn(async move {
            let address = stream.target().address.clone();
            match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&address)).await
            {
                Ok(Ok(socket)) => {
                    let _ = pipe(stream, socket).await;
                }
                Ok(Err(e)) => stream.reset(&format!("dial tcp {address}: {e}")),
                Err(_) => stream.reset(&format!("dial tcp {address}: timed out")),
            }
        });
    }
    tunnel.closed().await.to_string()
}

// === the kubectl-style requests ===

/// `GET /k8s/clusters/<random id>/api/v1/namespaces` over one kept-alive HTTPS connection (as
/// kubectl keeps one), sequentially; each crosses the server, a tunnel, the agent and the
/// stand-in apiserver, whose JSON echo of the path is checked.
async fn kubectl_gets(
    server: &ServerProc,
    ca_pem: &[u8],
    admin_token: &str,
    clusters: &[(String, String)],
    count: usize,
) -> Gets {
    let client = HttpClient::tls(server.addr, ca_pem);
    let bound = Instant::now() + Duration::from_secs(120);
    let mut rng = fastrand_seed();
    let mut samples = Vec::with_capacity(count);
    let mut failed = 0;
    let mut sender = None;
    for _ in 0..count {
        if Instant::now() > bound {
            break;
        }
        let (id, _) = &clusters[(next(&mut rng) % clusters.len() as u64) as usize];
        let path = format!("/k8s/clusters/{id}/api/v1/namespaces?limit=1");
        if sender.is_none() {
            let io = client.connect().await;
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>> =
            sender.as_mut().unwrap();
        let req = Request::get(&path)
            .header("host", server.addr.to_string())
            .header("authorization", format!("Bearer {admin_token}"))
            .body(Empty::new())
            .unwrap();
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        match result {
            Ok(Ok((status, body)))
                if status == 200
                    && String::from_utf8_lossy(&body).contains("/api/v1/namespaces") =>
            {
                samples.push(started.elapsed());
            }
            Ok(Ok((status, body))) => {
                failed += 1;
                if failed <= 3 {
                    println!("  GET {path}: {status} {}", String::from_utf8_lossy(&body));
                }
            }
            other => {
                failed += 1;
                sender = None;
                if failed <= 3 {
                    println!("  GET {path}: {:?}", other.map(|r| r.map(|_| ())));
                }
            }
        }
    }
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Gets {
        ok: samples.len(),
        failed,
        p50: at(0.50),
        p99: at(0.99),
        max: samples.last().copied().unwrap_or_default(),
    }
}

/// A tiny xorshift generator (no `rand` dependency for picking clusters).
fn fastrand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

// === registration in bulk ===

/// Creates `n` clusters with a registration token each (one `Store::import` transaction, so
/// 10,000 take a second instead of 10,000 synced commits) and an admin user with an API token.
/// Returns (cluster id, registration token) pairs and the admin's bearer token.
fn register_clusters(dir: &Path, n: usize) -> (Vec<(String, String)>, String) {
    let store = SqliteStore::open(&dir.join(server_side::server::STORE_FILE)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut ids = HashSet::with_capacity(n);
    let mut snapshot = Snapshot::default();
    for i in 0..n {
        // Ids are random (27^5): draw again on the rare collision.
        let id = loop {
            let id = server_side::tokens::cluster_id();
            if ids.insert(id.clone()) {
                break id;
            }
        };
        let token = server_side::tokens::registration_token();
        snapshot.clusters.push(Cluster {
            id: id.clone(),
            name: format!("scale-{i}"),
            created_at: now,
            api_endpoint: None,
            ca_cert: None,
            sa_token: None,
        });
        snapshot.registration_tokens.push(RegistrationToken {
            token,
            cluster_id: id,
            created_at: now,
        });
    }
    store.import(&snapshot, ImportInto::Empty).unwrap();
    let admin = store.create_user("scale-admin", &[], true).unwrap();
    let (_, bearer) = store
        .create_api_token(&admin.id, "scale bench", None)
        .unwrap();
    let pairs = snapshot
        .registration_tokens
        .into_iter()
        .map(|t| (t.cluster_id, t.token))
        .collect();
    (pairs, bearer)
}

// === the server process ===

/// `tunnel-server serve` on `listen`, TLS from its generated CA, metrics on their own port.
struct ServerProc {
    child: Child,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    log_path: PathBuf,
}

impl ServerProc {
    fn start(dir: &Path, listen: &str, n: usize) -> Self {
        let log_path = dir.join(format!("server-{}.log", listen.replace(':', "_")));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        // Every simulated agent comes from 127.0.0.1; real ones come from their own addresses,
        // so the per-address cap (5,000 by default) is raised to N plus room for the requests.
        let per_peer = (n + 1000).to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tunnel-server"))
            .arg("--data-dir")
            .arg(dir)
            .args([
                "serve",
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--max-connections-per-peer", &per_peer])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tunnel-server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next_line = || {
            lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("tunnel-server exited; log:\n{}", read(&log_path)))
        };
        let listening = next_line();
        let addr = listening
            .strip_prefix("listening on ")
            .and_then(|r| r.split_once(' '))
            .unwrap_or_else(|| panic!("unexpected first line {listening:?}"))
            .0
            .parse()
            .unwrap();
        let metrics = next_line();
        let metrics_addr = metrics
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("unexpected second line {metrics:?}"))
            .parse()
            .unwrap();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            addr,
            metrics_addr,
            log_path,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        read(&self.log_path)
    }

    /// `tunnel_server_sessions` from `/metrics`; 0 while the server does not answer.
    async fn sessions(&self) -> usize {
        let text = tokio::time::timeout(Duration::from_secs(5), async {
            let mut tcp = TcpStream::connect(self.metrics_addr).await.ok()?;
            tcp.write_all(b"GET /metrics HTTP/1.0\r\nhost: metrics\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            tcp.read_to_end(&mut out).await.ok()?;
            Some(String::from_utf8_lossy(&out).into_owned())
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("tunnel_server_sessions "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn kill(mut self) {
        self.kill9();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// === /proc, limits, helpers ===

fn rss_kib(pid: u32) -> u64 {
    read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = read(Path::new(&format!("/proc/{pid}/stat")));
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The process's CPU over `window`, in percent of one core.
async fn idle_cpu(pid: u32, window: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pid) - c0;
    ticks as f64 / CLK_TCK / t0.elapsed().as_secs_f64() * 100.0
}

/// Polls `f` every 100 ms until it returns `Some`, or `None` after `limit`.
async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn load_average() -> String {
    read(Path::new("/proc/loadavg"))
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Raises this process's open-file limit to at least `need` (the spawned servers inherit it):
/// past the hard limit when privileged, else the soft limit up to the hard one. Says what it got.
fn raise_nofile(need: u64) {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if need > hard && rlimit::Resource::NOFILE.set(need, need).is_ok() {
        println!("RLIMIT_NOFILE raised to {need}");
        return;
    }
    rlimit::Resource::NOFILE.set(hard, hard).unwrap();
    if need > hard {
        println!("RLIMIT_NOFILE {hard} (hard limit; about {need} wanted: expect refused sockets)");
    } else {
        println!("RLIMIT_NOFILE {hard}");
    }
}

/// Builds `tests/interop/gopeer` (the real Go remotedialer) with its build script; `None`, and
/// a note, when Go is missing or the build fails.
fn build_gopeer() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("gopeer")
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines().last().map(|l| PathBuf::from(l.trim()))
        }
        other => {
            println!("no Go server this run (tests/interop/build.sh gopeer: {other:?})");
            None
        }
    }
}
