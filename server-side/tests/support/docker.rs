//! A private real dockerd (Debian docker.io, `tests/e2e/lib/dockerd.sh`) reached by the real
//! docker CLI through the server: `DOCKER_HOST` is
//! `tcp://127.0.0.1:<port>/docker/nodes/<node-id>` with TLS verified against the server's CA,
//! and the user's token comes from the `HttpHeaders` of the CLI's `config.json` (the setup
//! server-side/README.md documents).
//!
//! Needs root, `docker.io` and `busybox-static`; without them the caller FAILS saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::Trust;

use super::{ServerProc, add_cluster, add_user, agent_headers, cli, connect_agent};

/// The image `busybox-image.sh` makes with `docker import`.
pub const IMAGE: &str = "tpe2e/busybox:latest";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Fails the test unless `tool` is on the PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "this test needs `{tool}` (Debian package {package}; run scripts/install-test-deps.sh)"
    );
}

/// A private dockerd, purged on drop.
pub struct Dockerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Dockerd {
    /// Starts it in `dir` and imports [`IMAGE`] (blocking).
    pub fn start(dir: PathBuf) -> Self {
        for tool in ["dockerd", "docker"] {
            require_tool(tool, "docker.io");
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

/// The docker CLI's environment for a node through the server.
pub type DockerEnv = Vec<(&'static str, String)>;

/// A `docker` command with `env` (and no inherited `DOCKER_HOST`/`DOCKER_CONTEXT`).
pub fn docker_command(env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the docker CLI with `env`; returns (success, stdout, stderr).
pub fn docker(
    env: &[(&str, String)],
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut cmd = docker_command(env, args);
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

/// The server, a node agent registered as `hostname` whose Docker socket is a private
/// dockerd, a user `ops` granted the node's cluster, and the docker CLI's environment.
/// Dropped in field order: agent, server, then the dockerd is purged.
pub struct DockerNode {
    pub agent: Tunnel,
    pub server: ServerProc,
    pub node_id: String,
    pub user: String,
    pub env: DockerEnv,
    pub dockerd: Dockerd,
}

impl DockerNode {
    /// Starts everything under `dir` (the dockerd in `dir/dockerd`).
    pub async fn start(dir: &Path, hostname: &str) -> Self {
        let dockerd = tokio::task::spawn_blocking({
            let d = dir.join("dockerd");
            move || Dockerd::start(d)
        })
        .await
        .unwrap();
        let server = ServerProc::start(dir);
        let (_cluster, token, _) = add_cluster(dir, "docker-hosts");
        let user = add_user(dir, "ops", &[]);
        cli(dir, &["grant", "ops", "docker-hosts"]);
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let params = json!({"node": {"requestedHostname": hostname}});
        let agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &params),
            trust,
            Some(dockerd.socket.clone()),
        )
        .await
        .expect("node agent registers");
        let node_id = server_side::tokens::machine_name(hostname);

        // The docker CLI set-up of server-side/README.md.
        let certs = dir.join("docker-certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.pem"), server.ca_pem()).unwrap();
        let config = dir.join("docker-config");
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
        Self {
            agent,
            server,
            node_id,
            user,
            env,
            dockerd,
        }
    }

    /// Runs the docker CLI through the server (in a blocking task).
    pub async fn docker(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let env = self.env.clone();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let stdin = stdin.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            docker(&env, &args, stdin.as_deref())
        })
        .await
        .unwrap()
    }
}
