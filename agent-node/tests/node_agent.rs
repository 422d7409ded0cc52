//! `cattle-node-agent` end to end: the real binary against tunnel-proto's real acceptor on
//! loopback (TLS with an rcgen CA, CA checksum pinning, token and params checked by the
//! server's authorizer), dials through the tunnel, allow-list refusals on /metrics, SIGTERM,
//! and the Docker CLI through the tunnel to a real dockerd.

#[path = "../../agent-core/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_cattle-node-agent");

fn node_env(server: &TestServer, dir: &Path) -> HashMap<String, String> {
    let mut env = base_env(server, dir);
    env.insert("CATTLE_TOKEN".into(), TOKEN.into());
    env.insert("CATTLE_NODE_NAME".into(), "test-node".into());
    env.insert("CATTLE_ADDRESS".into(), "127.0.0.1".into());
    env.insert("CATTLE_ROLE".into(), "worker,etcd".into());
    env.insert(
        "CATTLE_DOCKER_SOCKET".into(),
        path_str(&dir.join("no-docker.sock")),
    );
    env
}

async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its time bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_then_connects_dials_and_refuses() {
    bounded(90, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let svc = http_service("svc").await;
        let dir = temp_dir();
        let mut agent = AgentProcess::spawn(BIN, &node_env(&server, dir.path()), &[]);

        // First connect: /register, token and node params as spec §4.3.
        let first = server.next_tunnel().await;
        assert_eq!(first.path, "/v3/connect/register");
        assert_eq!(first.client_key, "c-test1:test-node");
        assert_eq!(first.headers["x-api-tunnel-token"], TOKEN);
        let params = first.params.clone().expect("params");
        println!("node params: {params}");
        let node = &params["node"];
        assert_eq!(node["requestedHostname"], "test-node");
        assert_eq!(node["worker"], true);
        assert_eq!(node["etcd"], true);
        assert_eq!(node["controlPlane"], false);
        assert_eq!(node["customConfig"]["address"], "127.0.0.1");
        assert_eq!(
            node["customConfig"]["roles"],
            serde_json::json!(["worker", "etcd"])
        );
        assert!(node["customConfig"]["taints"].is_null());
        assert!(
            node.get("dockerInfo").is_none(),
            "Docker is not running here"
        );

        // A dial through the tunnel to a local HTTP service.
        let s = first.tunnel.open("tcp", &svc.to_string()).unwrap();
        let (status, body) = http_get_on(s, "svc", "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "hello from svc"));

        // Outside the allow-list: that stream is refused, the tunnel lives on.
        let refused = first.tunnel.open("unix", "/etc/passwd").unwrap();
        assert_eq!(read_error(refused).await, Some(ErrorKind::PermissionDenied));
        let refused = first.tunnel.open("udp", "8.8.8.8:53").unwrap();
        assert_eq!(read_error(refused).await, Some(ErrorKind::PermissionDenied));
        let s = first.tunnel.open("tcp", &svc.to_string()).unwrap();
        let (status, _) = http_get_on(s, "svc", "/").await.unwrap();
        assert_eq!(status, 200);
        // Allowed, but nothing listens: the dial error comes back on the stream.
        let s = first.tunnel.open("unix", "/var/run/docker.sock").unwrap();
        assert!(read_error(s).await.is_some());

        let health = agent.health_addr().await;
        let m = agent.metrics().await;
        println!("{m}");
        let row = |labels: &str| metric(&m, &format!("cattle_agent_dials_total{{{labels}}}"));
        assert_eq!(
            row(r#"tunnel="main",proto="tcp",result="allowed""#),
            Some(2)
        );
        assert_eq!(
            row(r#"tunnel="main",proto="unix",result="refused""#),
            Some(1)
        );
        assert_eq!(
            row(r#"tunnel="main",proto="other",result="refused""#),
            Some(1)
        );
        assert_eq!(
            row(r#"tunnel="main",proto="unix",result="allowed""#),
            Some(1)
        );
        assert_eq!(
            metric(
                &m,
                r#"cattle_agent_dial_errors_total{tunnel="main",proto="unix"}"#
            ),
            Some(1)
        );
        assert_eq!(
            metric(&m, r#"cattle_agent_tunnel_up{tunnel="main"}"#),
            Some(1)
        );
        assert!(
            metric(
                &m,
                r#"cattle_agent_tunnel_bytes_total{tunnel="main",direction="sent"}"#
            )
            .unwrap()
                > 0
        );
        assert_eq!(http_get(health, "/readyz").await.0, 200);
        assert_eq!(http_get(health, "/healthz").await.0, 200);
        assert!(dir.path().join("state/connected").exists());

        // The server drops the tunnel: the agent comes back, now without /register.
        first.tunnel.close();
        let second = server.next_tunnel().await;
        assert_eq!(second.path, "/v3/connect");
        let s = second.tunnel.open("tcp", &svc.to_string()).unwrap();
        assert_eq!(http_get_on(s, "svc", "/").await.unwrap().0, 200);
        let m = agent.metrics().await;
        assert!(
            metric(&m, r#"cattle_agent_tunnel_reconnects_total{tunnel="main"}"#).unwrap() >= 1,
            "{m}"
        );

        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_stream_finish_then_exits_zero() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let echo = echo_service().await;
        let svc = http_service("svc").await;
        let dir = temp_dir();
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "20s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let t = server.next_tunnel().await;
        let health = agent.health_addr().await;

        let mut open = t.tunnel.open("tcp", &echo.to_string()).unwrap();
        open.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        tokio::io::AsyncReadExt::read_exact(&mut open, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"before");

        agent.sigterm();
        agent.wait_log("refusing new streams").await;
        // Still running, the open stream still works, new streams are refused.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(agent.try_exit().is_none(), "exited with a stream open");
        open.write_all(b"during").await.unwrap();
        tokio::io::AsyncReadExt::read_exact(&mut open, &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"during");
        let refused = t.tunnel.open("tcp", &svc.to_string()).unwrap();
        assert_eq!(read_error(refused).await, Some(ErrorKind::PermissionDenied));
        assert_eq!(http_get(health, "/readyz").await.0, 503);
        let m = agent.metrics().await;
        assert_eq!(metric(&m, "cattle_agent_draining "), Some(1));
        assert_eq!(
            metric(&m, r#"cattle_agent_streams_open{tunnel="main"}"#),
            Some(1)
        );

        // The stream ends: the agent exits 0 well before the grace period.
        let started = Instant::now();
        drop(open);
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        println!(
            "exited {:?} after the last stream closed",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_streams_while_busy_ones_finish() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let echo = echo_service().await;
        let dir = temp_dir();
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "20s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let t = server.next_tunnel().await;
        let mut buf = [0u8; 8];
        let open = |name: &'static [u8; 8]| {
            let mut s = t.tunnel.open("tcp", &echo.to_string()).unwrap();
            async move {
                s.write_all(name).await.unwrap();
                let mut b = [0u8; 8];
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
                    .await
                    .unwrap();
                assert_eq!(&b, name);
                s
            }
        };
        // As the server's pooled keep-alive connections: opened, used, then left alone.
        let mut idle = open(b"idle-one").await;
        let mut busy = open(b"busy-one").await;
        let m = agent.metrics().await;
        assert_eq!(
            metric(&m, r#"cattle_agent_streams_open{tunnel="main"}"#),
            Some(2)
        );

        let started = Instant::now();
        agent.sigterm();
        let idle_end = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let r = tokio::io::AsyncReadExt::read(&mut idle, &mut b).await;
            (r.map_err(|e| e.kind()), started.elapsed())
        });
        // The busy stream moves a chunk every 200 ms for 4 s, all echoed.
        for i in 0..20u8 {
            busy.write_all(&[i; 8]).await.unwrap();
            tokio::io::AsyncReadExt::read_exact(&mut busy, &mut buf)
                .await
                .unwrap();
            assert_eq!(buf, [i; 8], "chunk {i} at {:?}", started.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "20 chunks echoed over {:?} after SIGTERM",
            started.elapsed()
        );
        let (end, at) = idle_end.await.unwrap();
        println!("the idle stream ended {at:?} after SIGTERM: {end:?}");
        assert_eq!(end, Ok(0), "a graceful end (EOF)");
        assert!(at >= Duration::from_millis(1500), "{at:?}");
        assert!(at < Duration::from_secs(4), "{at:?}");
        assert!(agent.try_exit().is_none(), "exited with a busy stream open");

        drop(busy);
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        let took = started.elapsed();
        println!("exited {took:?} after SIGTERM (grace 20s)");
        assert!(took < Duration::from_secs(8), "{took:?}");
        let line = agent.wait_log("idle streams closed during the drain").await;
        assert!(line.contains("closed=1"), "{line}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_only_idle_streams_exits_in_about_two_seconds() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let echo = echo_service().await;
        let dir = temp_dir();
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "30s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let t = server.next_tunnel().await;
        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut s = t.tunnel.open("tcp", &echo.to_string()).unwrap();
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
                .await
                .unwrap();
            streams.push(s);
        }
        let started = Instant::now();
        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        let took = started.elapsed();
        println!("exited {took:?} after SIGTERM with 3 idle streams (grace 30s)");
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let line = agent.wait_log("idle streams closed during the drain").await;
        assert!(line.contains("closed=3"), "{line}");
        drop(streams);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_period_runs_out_and_still_exits_zero() {
    bounded(60, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let echo = echo_service().await;
        let dir = temp_dir();
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "1s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let t = server.next_tunnel().await;
        let mut open = t.tunnel.open("tcp", &echo.to_string()).unwrap();
        open.write_all(b"x").await.unwrap();
        agent.metrics().await;
        let started = Instant::now();
        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        let took = started.elapsed();
        println!("exited {took:?} after SIGTERM with a stream still open (grace 1s)");
        assert!(took >= Duration::from_millis(900), "{took:?}");
        agent.wait_log("grace period over").await;
        drop(open);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_is_retried_and_sigterm_while_backing_off_exits_at_once() {
    bounded(60, async {
        let server = TestServer::start(ServerOptions::default()).await;
        let dir = temp_dir();
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_TOKEN".into(), "stale-token".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let rejected = server.rejected.clone();
        eventually("three rejected attempts", || {
            rejected.lock().unwrap().len() >= 3
        })
        .await;
        assert!(
            rejected
                .lock()
                .unwrap()
                .iter()
                .all(|(path, status)| path == "/v3/connect/register" && *status == 400)
        );
        agent.wait_log("HTTP 400: cluster not found").await;
        let health = agent.health_addr().await;
        assert_eq!(http_get(health, "/readyz").await.0, 503);
        let m = agent.metrics().await;
        assert!(
            metric(
                &m,
                r#"cattle_agent_tunnel_connect_failures_total{tunnel="main"}"#
            )
            .unwrap()
                >= 3,
            "{m}"
        );
        assert_eq!(
            metric(&m, r#"cattle_agent_tunnel_up{tunnel="main"}"#),
            Some(0)
        );
        let started = Instant::now();
        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(5)).await;
        assert!(status.success(), "exit status {status}");
        println!(
            "exited {:?} after SIGTERM while backing off",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_preflight_exits_zero() {
    bounded(30, async {
        // A server that accepts and then says nothing: the pre-flight GET hangs (for 5 s).
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = silent.accept().await {
                keep.lock().unwrap().push(tcp);
            }
        });
        let dir = temp_dir();
        let mut env = HashMap::new();
        env.insert("CATTLE_SERVER".to_owned(), format!("https://{addr}"));
        env.insert("CATTLE_TOKEN".to_owned(), TOKEN.to_owned());
        env.insert("CATTLE_NODE_NAME".to_owned(), "n".to_owned());
        env.insert("CATTLE_ADDRESS".to_owned(), "127.0.0.1".to_owned());
        env.insert(
            "CATTLE_AGENT_HEALTH_ADDR".to_owned(),
            "127.0.0.1:0".to_owned(),
        );
        env.insert(
            "CATTLE_AGENT_STATE_DIR".to_owned(),
            path_str(&dir.path().join("state")),
        );
        env.insert(
            "CATTLE_CREDENTIALS_DIR".to_owned(),
            path_str(&dir.path().join("creds")),
        );
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        agent.health_addr().await;
        eventually("the pre-flight connection", || {
            !held.lock().unwrap().is_empty()
        })
        .await;
        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(3)).await;
        assert!(status.success(), "exit status {status}");
        agent.wait_log("signal during start-up").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_checksum_mismatch_is_fatal() {
    bounded(30, async {
        let other = Pki::new("some-other-ca");
        let server = TestServer::start(ServerOptions {
            cacerts_override: Some(other.ca_setting()),
        })
        .await;
        let dir = temp_dir();
        let mut agent = AgentProcess::spawn(BIN, &node_env(&server, dir.path()), &[]);
        let status = agent.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(1));
        let log = agent.log();
        println!("{log}");
        assert!(log.contains("does not match given --ca-checksum"), "{log}");
    })
    .await;
}

#[test]
fn bad_configuration_names_every_variable_and_exits_non_zero() {
    let out = Command::new(BIN)
        .env_clear()
        .env("CATTLE_CA_CHECKSUM", "xyz")
        .env("STRICT_VERIFY", "ture")
        .env("CATTLE_ROLE", "worker,boss")
        .env("CATTLE_AGENT_HEALTH_ADDR", "localhost")
        .env("CATTLE_AGENT_SHUTDOWN_GRACE", "a while")
        .env("CATTLE_NODE_TAINTS", "k=v:Often")
        .env("CATTLE_CREDENTIALS_DIR", "/nonexistent-agent-test")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(1));
    for name in [
        "CATTLE_SERVER",
        "CATTLE_TOKEN",
        "CATTLE_CA_CHECKSUM",
        "STRICT_VERIFY",
        "CATTLE_ROLE",
        "CATTLE_AGENT_HEALTH_ADDR",
        "CATTLE_AGENT_SHUTDOWN_GRACE",
        "CATTLE_NODE_TAINTS",
    ] {
        assert!(stderr.contains(name), "{name} missing from:\n{stderr}");
    }
    assert_eq!(stderr.matches("invalid configuration").count(), 1);
}

#[test]
fn help_documents_every_variable() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in [
        "CATTLE_SERVER",
        "CATTLE_TOKEN",
        "CATTLE_CA_CHECKSUM",
        "STRICT_VERIFY",
        "CATTLE_AGENT_CONNECT",
        "CATTLE_NODE_NAME",
        "CATTLE_ADDRESS",
        "CATTLE_INTERNAL_ADDRESS",
        "CATTLE_ROLE",
        "CATTLE_NODE_LABEL",
        "CATTLE_NODE_TAINTS",
        "CATTLE_DOCKER_SOCKET",
        "HTTPS_PROXY",
        "NO_PROXY",
        "CATTLE_AGENT_HEALTH_ADDR",
        "CATTLE_AGENT_SHUTDOWN_GRACE",
        "CATTLE_AGENT_SHUTDOWN_IDLE",
    ] {
        assert!(help.contains(name), "{name} missing from --help");
    }
}

// === Docker ===

fn e2e_lib(script: &str) -> String {
    format!("{}/../tests/e2e/lib/{script}", env!("CARGO_MANIFEST_DIR"))
}

fn require_dockerd() {
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(
        root,
        "the Docker test runs a private dockerd and needs root (CI runs as root)"
    );
    for bin in ["dockerd", "docker", "busybox"] {
        assert!(
            have(bin),
            "{bin} is not installed: the Docker test needs a real Docker engine; run \
             `apt-get install -y docker.io busybox-static` (CI installs them)"
        );
    }
}

/// A private dockerd, stopped and purged on drop.
struct Dockerd {
    dir: std::path::PathBuf,
    socket: String,
}

impl Dockerd {
    fn start(dir: &Path) -> Self {
        let out = Command::new("timeout")
            .args(["120", &e2e_lib("dockerd.sh"), "start", &path_str(dir)])
            .output()
            .expect("run dockerd.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "dockerd.sh start failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = stdout
            .lines()
            .rev()
            .find(|l| l.trim().ends_with("docker.sock"))
            .map_or_else(
                || path_str(&dir.join("docker.sock")),
                |l| l.trim().to_owned(),
            );
        Self {
            dir: dir.to_owned(),
            socket,
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["90", &e2e_lib("dockerd.sh"), "purge", &path_str(&self.dir)])
            .output();
    }
}

/// Runs the docker CLI against `host`, bounded; returns stdout, failing on a non-zero exit.
async fn docker(host: &str, args: &[&str], stdin: Option<&str>) -> String {
    let host = host.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg("docker")
            .args(&args)
            .env("DOCKER_HOST", &host)
            .env_remove("DOCKER_CONTEXT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
        let mut child = cmd.spawn().expect("run docker");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(input.as_bytes()).expect("write stdin");
        }
        let out = child.wait_with_output().expect("docker output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        println!("$ docker {}\n{}", args.join(" "), stdout.trim_end());
        stdout
    })
    .await
    .expect("docker task")
}

/// Splices a client TCP connection with a tunnel stream the way a Go remotedialer `net.Conn`
/// behaves: the protocol has no half-close, so the client's `CloseWrite` (the Docker CLI sends
/// one as soon as it has no more stdin for an attach) is not passed on; only the stream ending
/// ends the pair. `copy_bidirectional` would turn that half-close into a full close and lose
/// the container's output.
async fn forward(tcp: tokio::net::TcpStream, stream: tunnel_proto::driver::Stream) {
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let (mut st_r, mut st_w) = tokio::io::split(stream);
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tcp_r, &mut st_w).await;
        st_w
    });
    let _ = tokio::io::copy(&mut st_r, &mut tcp_w).await;
    let _ = tcp_w.shutdown().await;
    up.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cli_through_the_tunnel_to_a_real_dockerd() {
    require_dockerd();
    let dir = temp_dir();
    let dockerd = Dockerd::start(&dir.path().join("docker"));
    let status = Command::new("timeout")
        .args(["120", &e2e_lib("busybox-image.sh"), &dockerd.socket])
        .status()
        .expect("busybox-image.sh");
    assert!(status.success(), "busybox-image.sh failed");
    let image = "tpe2e/busybox:latest";

    bounded(240, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let mut env = node_env(&server, dir.path());
        env.insert("CATTLE_DOCKER_SOCKET".into(), dockerd.socket.clone());
        // `forward` cannot tell a client's full close from a half-close, so the streams of
        // finished docker commands stay open until dockerd drops its idle connections; the
        // agent closes them when the grace period is over.
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "2s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);
        let accepted = server.next_tunnel().await;
        let info = &accepted.params.as_ref().expect("params")["node"]["dockerInfo"];
        println!(
            "dockerInfo: ServerVersion={} Driver={}",
            info["ServerVersion"], info["Driver"]
        );
        assert!(
            info["ServerVersion"]
                .as_str()
                .is_some_and(|v| !v.is_empty())
        );

        // The server side: every TCP connection becomes a stream to the node's Docker socket.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tunnel = accepted.tunnel.clone();
        let socket = dockerd.socket.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let stream = tunnel.open("unix", &socket).expect("open");
                tokio::spawn(forward(tcp, stream));
            }
        });
        let host = format!("tcp://127.0.0.1:{port}");

        let version = docker(&host, &["version", "--format", "{{.Server.Version}}"], None).await;
        assert!(!version.trim().is_empty());
        docker(&host, &["ps"], None).await;
        let out = docker(
            &host,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                image,
                "echo",
                "hello-through-the-tunnel",
            ],
            None,
        )
        .await;
        assert_eq!(out.trim(), "hello-through-the-tunnel");
        let name = format!("agent-node-test-{}", std::process::id());
        docker(
            &host,
            &[
                "run",
                "-d",
                "--network",
                "none",
                "--name",
                &name,
                image,
                "sleep",
                "300",
            ],
            None,
        )
        .await;
        let ps = docker(&host, &["ps", "--format", "{{.Names}}"], None).await;
        assert!(ps.contains(&name), "{ps}");
        let out = docker(&host, &["exec", &name, "echo", "exec-ok"], None).await;
        assert_eq!(out.trim(), "exec-ok");
        let out = docker(
            &host,
            &[
                "exec",
                "-i",
                &name,
                "sh",
                "-c",
                "read line; echo got: $line",
            ],
            Some("piped through stdin\n"),
        )
        .await;
        assert_eq!(out.trim(), "got: piped through stdin");
        docker(&host, &["rm", "-f", &name], None).await;

        let m = agent.metrics().await;
        let allowed = metric(
            &m,
            r#"cattle_agent_dials_total{tunnel="main",proto="unix",result="allowed"}"#,
        )
        .unwrap();
        println!("unix dials allowed through the tunnel: {allowed}");
        assert!(allowed >= 8);
        agent.sigterm();
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
    })
    .await;
    drop(dockerd);
}
