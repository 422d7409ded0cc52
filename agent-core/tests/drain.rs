//! Streams of the main tunnel against tunnel-proto's real acceptor on loopback: the splice
//! (bytes both ways under back-pressure, either end closing), and the drain: a stream that
//! moves no bytes is closed about `--shutdown-idle` (2 s) after it starts and the shutdown ends
//! long before the grace, while streams that move bytes (echoed chunks, or a one-way ticker as
//! `logs -f`) keep going until they finish or the grace is over.
//!
//! The agent side runs in-process (the `Runtime` and `main_tunnel` the binaries use); the
//! server side opens streams as Rancher does. Everything is on 127.0.0.1, every wait bounded,
//! and timings are printed.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::CommonConfig;
use agent_core::allow::AllowList;
use agent_core::config::{Credentials, DEFAULT_SHUTDOWN_IDLE};
use agent_core::runtime::{Runtime, connector_config, main_headers, main_tunnel};
use agent_core::splice::{Activity, SpliceEnd, Tracked, splice_draining};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::Connector;
use tunnel_proto::driver::pipe;
use tunnel_proto::{Role, SessionConfig};

async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its time bound")
}

fn node_params() -> serde_json::Value {
    serde_json::json!({ "node": { "requestedHostname": "drain-test" } })
}

/// The agent's settings against `server`, as the binaries parse them.
async fn agent_config(
    server: &TestServer,
    dir: &std::path::Path,
    extra: &[(&'static str, &str)],
) -> (
    CommonConfig,
    Credentials,
    tunnel_proto::driver::connector::Trust,
) {
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("CATTLE_SERVER", server.url());
    env.insert("CATTLE_CA_CHECKSUM", server.pki.checksum());
    env.insert("CATTLE_AGENT_STATE_DIR", path_str(&dir.join("state")));
    env.insert("CATTLE_AGENT_BACKOFF_MIN", "200ms".into());
    env.insert("CATTLE_AGENT_BACKOFF_MAX", "1s".into());
    for (k, v) in extra {
        env.insert(k, (*v).to_owned());
    }
    let common = CommonConfig::from_strings(&env).expect("config");
    let credentials = Credentials {
        server: common.server.clone(),
        token: TOKEN.to_owned(),
    };
    let preflight = tokio::time::timeout(
        WAIT,
        agent_core::preflight::run(&common, &credentials.server),
    )
    .await
    .expect("pre-flight took too long")
    .expect("pre-flight");
    (common, credentials, preflight.trust)
}

/// A local service that writes `tick\n` every 200 ms, `count` times (forever if `None`), then
/// closes; returns its address.
async fn ticker(count: Option<usize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sent = 0;
                while count.is_none_or(|c| sent < c) {
                    if tcp.write_all(b"tick\n").await.is_err() {
                        return;
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    });
    addr
}

/// Reads until the stream ends or fails; returns the bytes and how it ended.
async fn read_to_end_or_error<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

// === splice ===

/// An agent-side tunnel to `server` that allows every Connect, without the runtime.
async fn client_tunnel(server: &TestServer, dir: &std::path::Path) -> Tunnel {
    let (common, credentials, trust) = agent_config(server, dir, &[]).await;
    let headers = main_headers(&credentials.token, &node_params()).unwrap();
    let cfg = connector_config(
        &credentials.server.tunnel_url(false),
        headers,
        trust,
        &common,
    );
    let ws = Connector::new(cfg)
        .unwrap()
        .connect()
        .await
        .expect("websocket");
    Tunnel::spawn(ws, SessionConfig::new(Role::Client), Arc::new(|_| true))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_moves_bytes_both_ways_under_back_pressure() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let dir = temp_dir();
        let agent = client_tunnel(&server, dir.path()).await;
        let accepted = server.next_tunnel().await;
        const LEN: usize = 8 << 20;
        let (from_server, from_local) = (pattern(LEN, 1), pattern(LEN, 2));

        // The local service sends its 8 MiB and reads the server's, at the same time.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = listener.local_addr().unwrap();
        let to_send = from_local.clone();
        let local = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = tcp.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&to_send).await.unwrap();
                w
            });
            let mut got = vec![0u8; LEN];
            r.read_exact(&mut got).await.unwrap();
            // After the server closes, the socket ends too.
            let (rest, error) = read_to_end_or_error(&mut r).await;
            let _w = writer.await.unwrap();
            (got, rest.len(), error)
        });

        let started = Instant::now();
        let mut remote = accepted
            .tunnel
            .open("tcp", &local_addr.to_string())
            .unwrap();
        let stream = agent.accept().await.expect("stream");
        let tcp = TcpStream::connect(local_addr).await.unwrap();
        let spliced = tokio::spawn(async move {
            let activity = Activity::new();
            pipe(stream, Tracked::new(tcp, &activity)).await
        });

        let (mut rr, mut rw) = tokio::io::split(&mut remote);
        let send = async {
            rw.write_all(&from_server).await.unwrap();
        };
        let recv = async {
            let mut got = vec![0u8; LEN];
            rr.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got_remote) = tokio::join!(send, recv);
        println!(
            "8 MiB each way through pipe over Tracked in {:?}",
            started.elapsed()
        );
        assert!(got_remote == from_local, "local -> tunnel bytes differ");
        drop(remote);

        let (got_local, extra, error) = local.await.unwrap();
        assert!(got_local == from_server, "tunnel -> local bytes differ");
        assert_eq!((extra, error), (0, None), "the socket ends cleanly");
        let stats = spliced.await.unwrap().expect("splice ends without error");
        println!("splice stats: {stats:?}");
        assert_eq!(stats.to_local, LEN as u64);
        assert_eq!(stats.to_tunnel, LEN as u64);
        assert!(!stats.local_ended, "the server ended it");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_end_closes_the_stream_after_its_bytes() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let dir = temp_dir();
        let agent = client_tunnel(&server, dir.path()).await;
        let accepted = server.next_tunnel().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(b"last words").await.unwrap();
        });
        let mut remote = accepted.tunnel.open("tcp", &addr.to_string()).unwrap();
        let stream = agent.accept().await.unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let activity = Activity::new();
        let stats = pipe(stream, Tracked::new(tcp, &activity)).await.unwrap();
        assert!(stats.local_ended);
        assert_eq!(stats.to_tunnel, 10);
        let (got, error) = read_to_end_or_error(&mut remote).await;
        assert_eq!((got.as_slice(), error), (&b"last words"[..], None));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_draining_closes_only_when_idle_for_the_threshold() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let dir = temp_dir();
        let agent = client_tunnel(&server, dir.path()).await;
        let accepted = server.next_tunnel().await;
        let echo = echo_service().await;
        let drain = CancellationToken::new();

        let mut remote = accepted.tunnel.open("tcp", &echo.to_string()).unwrap();
        let stream = agent.accept().await.unwrap();
        let tcp = TcpStream::connect(echo).await.unwrap();
        let d = drain.clone();
        let served =
            tokio::spawn(
                async move { splice_draining(stream, tcp, &d, Duration::from_secs(1)).await },
            );

        // Before the drain, idleness does not matter.
        remote.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        remote.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!served.is_finished(), "closed before the drain");
        // (Idle that long when the drain starts, it would be closed at the first check.)
        remote.write_all(b"pong").await.unwrap();
        remote.read_exact(&mut buf).await.unwrap();

        // Draining, with a chunk every 200 ms for 2.4 s: never idle for 1 s.
        drain.cancel();
        let started = Instant::now();
        for i in 0..12u8 {
            remote.write_all(&[i; 4]).await.unwrap();
            remote.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [i; 4]);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!served.is_finished(), "a busy stream was closed");
        let quiet = Instant::now();
        println!("busy for {:?} into the drain", quiet - started);

        // Then quiet: closed within the threshold plus one check.
        let (rest, error) = read_to_end_or_error(&mut remote).await;
        let closed_after = quiet.elapsed();
        println!("quiet stream closed {closed_after:?} after its last bytes");
        assert_eq!((rest.len(), error), (0, None), "a graceful end (EOF)");
        match served.await.unwrap() {
            SpliceEnd::ClosedIdle(idle) => {
                println!("idle for {idle:?} when closed");
                assert!(idle >= Duration::from_secs(1));
            }
            SpliceEnd::Done(r) => panic!("expected an idle close, got {r:?}"),
        }
        assert!(
            closed_after >= Duration::from_millis(900),
            "{closed_after:?}"
        );
        assert!(
            closed_after < Duration::from_millis(3000),
            "{closed_after:?}"
        );
    })
    .await;
}

// === the drain of a running agent ===

/// An in-process agent (the binaries' runtime and main tunnel) connected to its own server.
struct Agent {
    rt: Arc<Runtime>,
    /// The server's end of the main tunnel.
    tunnel: Tunnel,
    _server: TestServer,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(grace: &str) -> Self {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let dir = temp_dir();
        let (common, credentials, trust) = agent_config(
            &server,
            dir.path(),
            &[("CATTLE_AGENT_SHUTDOWN_GRACE", grace)],
        )
        .await;
        assert_eq!(common.shutdown_idle, DEFAULT_SHUTDOWN_IDLE);
        let spec = main_tunnel(
            &common,
            &credentials,
            &node_params(),
            trust,
            AllowList::rancher(),
            None,
        )
        .unwrap();
        let rt = Arc::new(Runtime::new(common.shutdown_grace));
        rt.spawn_tunnel(spec);
        let tunnel = server.next_tunnel().await.tunnel;
        Self {
            rt,
            tunnel,
            _server: server,
            _dir: dir,
        }
    }

    /// Starts the drain (as SIGTERM does); the task returns how long the shutdown took.
    fn drain(&self) -> tokio::task::JoinHandle<Duration> {
        let rt = self.rt.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            rt.shutdown(std::future::pending::<()>()).await;
            started.elapsed()
        })
    }

    fn closed_idle(&self) -> u64 {
        self.rt.metrics().streams_closed_idle_on_drain()
    }
}

/// Opens an echo stream and checks it carries bytes.
async fn echo_stream(agent: &Agent, echo: SocketAddr) -> tunnel_proto::driver::Stream {
    let mut s = agent.tunnel.open("tcp", &echo.to_string()).unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_two_seconds_into_the_drain() {
    bounded(60, async {
        let agent = Agent::start("20s").await;
        let echo = echo_service().await;
        let mut idle_a = echo_stream(&agent, echo).await;
        let mut idle_b = echo_stream(&agent, echo).await;
        let last_bytes = Instant::now();

        let drain_started = Instant::now();
        let shutdown = agent.drain();
        let (rest, error) = read_to_end_or_error(&mut idle_a).await;
        let closed = drain_started.elapsed();
        println!(
            "idle stream closed {closed:?} after the drain started ({:?} after its last bytes)",
            last_bytes.elapsed()
        );
        assert_eq!((rest.len(), error), (0, None), "a graceful end (EOF)");
        assert_eq!(read_to_end_or_error(&mut idle_b).await, (Vec::new(), None));
        assert!(
            last_bytes.elapsed() >= DEFAULT_SHUTDOWN_IDLE - Duration::from_millis(100),
            "closed before it had been idle for the threshold"
        );
        assert!(closed < Duration::from_secs(4), "{closed:?}");

        let took = shutdown.await.unwrap();
        println!("shutdown took {took:?} (grace 20s)");
        assert!(took < Duration::from_secs(6), "{took:?}");
        assert_eq!(agent.closed_idle(), 2);
        let m = agent.rt.metrics().render();
        assert!(
            m.contains("cattle_agent_streams_closed_idle_on_drain_total{tunnel=\"main\"} 2\n"),
            "{m}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_moving_bytes_keep_the_grace_until_they_finish() {
    bounded(60, async {
        let agent = Agent::start("20s").await;
        let echo = echo_service().await;
        let mut idle = echo_stream(&agent, echo).await;
        let mut echoed = echo_stream(&agent, echo).await;
        // One way, as `kubectl logs -f`: the local side sends, the server only reads.
        let mut ticks = agent
            .tunnel
            .open("tcp", &ticker(Some(25)).await.to_string())
            .unwrap();
        let mut first = [0u8; 5];
        ticks.read_exact(&mut first).await.unwrap();

        let started = Instant::now();
        let shutdown = agent.drain();
        let idle_closed = tokio::spawn(async move {
            let end = read_to_end_or_error(&mut idle).await;
            (end, started.elapsed())
        });
        let ticks_done = tokio::spawn(async move {
            let end = read_to_end_or_error(&mut ticks).await;
            (end, started.elapsed())
        });
        // A chunk every 200 ms for 4 s, each echoed, then this side closes.
        for i in 0..20u8 {
            echoed.write_all(&[i; 16]).await.unwrap();
            let mut buf = [0u8; 16];
            echoed.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [i; 16], "chunk {i} at {:?}", started.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("20 chunks echoed over {:?} of drain", started.elapsed());
        let ((rest, error), at) = idle_closed.await.unwrap();
        println!("the idle stream was closed {at:?} into the drain");
        assert_eq!((rest.len(), error), (0, None));
        assert!(at < Duration::from_secs(4), "{at:?}");
        drop(echoed);

        let ((got, error), at) = ticks_done.await.unwrap();
        println!(
            "the ticker finished {at:?} into the drain after {} more bytes",
            got.len()
        );
        assert_eq!(error, None);
        assert_eq!(got.len(), 24 * 5, "every tick arrived");
        let took = shutdown.await.unwrap();
        println!("shutdown took {took:?} (grace 20s)");
        assert!(took >= Duration::from_secs(4), "{took:?}");
        assert!(took < Duration::from_secs(9), "{took:?}");
        assert_eq!(agent.closed_idle(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_stream_is_cut_only_when_the_grace_ends() {
    bounded(60, async {
        let agent = Agent::start("3s").await;
        let mut ticks = agent
            .tunnel
            .open("tcp", &ticker(None).await.to_string())
            .unwrap();
        let mut first = [0u8; 5];
        ticks.read_exact(&mut first).await.unwrap();

        let started = Instant::now();
        let shutdown = agent.drain();
        let (got, error) = read_to_end_or_error(&mut ticks).await;
        let cut = started.elapsed();
        println!(
            "ticker cut {cut:?} into the drain (grace 3s) after {} ticks, ending with {error:?}",
            got.len() / 5
        );
        assert!(cut >= Duration::from_millis(2900), "{cut:?}");
        assert!(got.len() / 5 >= 12, "ticks kept coming: {}", got.len() / 5);
        let took = shutdown.await.unwrap();
        println!("shutdown took {took:?}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        assert_eq!(agent.closed_idle(), 0);
    })
    .await;
}
