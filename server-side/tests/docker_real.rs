//! The real docker CLI against a real dockerd through a node tunnel: `DOCKER_HOST` is
//! `tcp://127.0.0.1:<port>/docker/nodes/<node-id>` with TLS verified against the server's CA,
//! and the user's token comes from the `HttpHeaders` of the CLI's `config.json` (the setup
//! server-side/README.md documents). `docker version`, `ps`, `exec` and `exec -i` with piped
//! stdin (a hijacked `Upgrade: tcp` stream) go through the tunnel.
//!
//! Needs root, Debian's `docker.io` (dockerd) and `busybox-static`: it starts a private
//! dockerd with `tests/e2e/lib/dockerd.sh`. Without them it FAILS saying so; it never skips.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

const IMAGE: &str = "tpe2e/busybox:latest";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A private dockerd, purged on drop.
struct Dockerd {
    dir: PathBuf,
    socket: PathBuf,
}

impl Dockerd {
    fn start(dir: PathBuf) -> Self {
        for tool in ["dockerd", "docker"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap();
            assert!(
                found.status.success(),
                "this test needs `{tool}` (Debian package docker.io; run scripts/install-test-deps.sh)"
            );
        }
        let script = repo_root().join("tests/e2e/lib/dockerd.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dockerd.sh start failed (needs root and docker.io):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join("docker.sock");
        let image = repo_root().join("tests/e2e/lib/busybox-image.sh");
        let out = Command::new("bash")
            .arg(&image)
            .arg(&socket)
            .arg(IMAGE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "busybox-image.sh failed (needs busybox-static):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir, socket }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let script = repo_root().join("tests/e2e/lib/dockerd.sh");
        let _ = Command::new("bash")
            .arg(&script)
            .arg("purge")
            .arg(&self.dir)
            .output();
    }
}

/// Runs the docker CLI with `env`; returns (success, stdout, stderr).
fn docker(env: &[(&str, String)], args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new("docker");
    cmd.args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        let mut s = child.stdin.take().unwrap();
        s.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_docker_cli_through_a_node_tunnel() {
    let dir = TempDir::new("dockerreal");
    let dockerd = tokio::task::spawn_blocking({
        let d = dir.path().join("dockerd");
        move || Dockerd::start(d)
    })
    .await
    .unwrap();
    timeout(Duration::from_secs(180), async {
        let server = ServerProc::start(dir.path());
        let (_cluster, token, _) = add_cluster(dir.path(), "docker-hosts");
        let user = add_user(dir.path(), "ops", &[]);
        cli(dir.path(), &["grant", "ops", "docker-hosts"]);
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let params = json!({"node": {"requestedHostname": "docker-host-1"}});
        let _agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &params),
            trust,
            Some(dockerd.socket.clone()),
        )
        .await
        .expect("node agent registers");
        let node_id = server_side::tokens::machine_name("docker-host-1");

        // The docker CLI set-up of server-side/README.md.
        let certs = dir.path().join("docker-certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.pem"), server.ca_pem()).unwrap();
        let config = dir.path().join("docker-config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(
            config.join("config.json"),
            json!({"HttpHeaders": {"Authorization": format!("Bearer {user}")}}).to_string(),
        )
        .unwrap();
        let env = vec![
            (
                "DOCKER_HOST",
                format!(
                    "tcp://127.0.0.1:{}/docker/nodes/{node_id}",
                    server.addr.port()
                ),
            ),
            ("DOCKER_TLS_VERIFY", "1".to_owned()),
            ("DOCKER_CERT_PATH", certs.display().to_string()),
            ("DOCKER_CONFIG", config.display().to_string()),
        ];

        let run = |args: Vec<&'static str>, stdin: Option<&'static str>| {
            let env = env.clone();
            tokio::task::spawn_blocking(move || docker(&env, &args, stdin))
        };
        let (ok, out, err) = run(vec!["version", "--format", "{{.Server.Version}}"], None)
            .await
            .unwrap();
        println!("docker version through the tunnel: ok={ok} {out:?} {err:?}");
        assert!(
            ok,
            "docker version failed: {err}\nserver log:\n{}",
            server.log()
        );

        let (ok, id, err) = run(
            vec!["run", "-d", "--network", "none", IMAGE, "sleep", "300"],
            None,
        )
        .await
        .unwrap();
        assert!(ok, "docker run failed: {err}");
        let id: &'static str = Box::leak(id.trim().to_owned().into_boxed_str());
        let (ok, out, err) = run(vec!["ps", "--format", "{{.ID}} {{.Image}}"], None)
            .await
            .unwrap();
        assert!(ok && out.contains(&id[..12]), "docker ps: {out} {err}");
        let (ok, out, err) = run(vec!["exec", id, "echo", "hello from the node"], None)
            .await
            .unwrap();
        assert!(ok, "docker exec failed: {err}");
        assert_eq!(out.trim(), "hello from the node");
        // The tunnel has no half-close, so the command must end by itself (`head -n 1`), not
        // wait for stdin's EOF (see server-side/README.md).
        let (ok, out, err) = run(
            vec!["exec", "-i", id, "head", "-n", "1"],
            Some("piped through the tunnel\n"),
        )
        .await
        .unwrap();
        println!("exec -i: ok={ok} {out:?} {err:?}");
        assert!(ok, "docker exec -i failed: {err}");
        assert_eq!(out.trim(), "piped through the tunnel");
        let (ok, _, err) = run(vec!["rm", "-f", id], None).await.unwrap();
        assert!(ok, "docker rm: {err}");

        // Without the header: 401 from the server.
        let (ok, _, err) = tokio::task::spawn_blocking({
            let mut env = env.clone();
            env.retain(|(k, _)| *k != "DOCKER_CONFIG");
            let empty = dir.path().join("empty-config");
            std::fs::create_dir_all(&empty).unwrap();
            env.push(("DOCKER_CONFIG", empty.display().to_string()));
            move || docker(&env, &["ps"], None)
        })
        .await
        .unwrap();
        println!("without a token: {err:?}");
        assert!(!ok);
        let log = server.log();
        assert!(
            log.contains("user=ops kind=\"docker\""),
            "no docker audit line:\n{log}"
        );
    })
    .await
    .expect("test exceeded its bound");
}
