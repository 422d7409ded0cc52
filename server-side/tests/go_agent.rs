//! A real Go agent against the real `tunnel-server` binary: `tests/interop/goagent`, built on
//! the real `github.com/rancher/remotedialer` (v0.6.2), does what Rancher's
//! cattle-cluster-agent does on the wire (spec cattle-agent §3-§5): the `/ping` and
//! `/v3/settings/cacerts` pre-flight with the manifest's CA checksum, the main tunnel to
//! `/v3/connect/register` with `X-API-Tunnel-Token` and `X-API-Tunnel-Params`, and the steve
//! aggregation tunnel with `Authorization: Bearer stv-cluster-<token>` answering `GET /ping`.
//!
//! Checked: the cluster becomes Connected (the probe goes through the Go steve tunnel), the
//! server stores the Go agent's params as sent, a granted user reaches the stand-in apiserver
//! through `/k8s/clusters/<id>/…` (plain request and an upgrade, both through Go's stream
//! pipe), a wrong token gets Rancher's 400/401 answers and the Go agent logs them, a wrong CA
//! checksum stops the Go agent's pre-flight, and after the Go agent is killed the cluster is
//! disconnected and requests get 503 at once; restarted with its `connected` marker, it
//! reconnects on `/v3/connect`.
//!
//! The Go program is built by `tests/interop/build.sh goagent` (or taken from `GOAGENT=/path`).
//! Without a Go toolchain the test fails with the reason; it never skips. Run with
//! `--nocapture` to see the figures.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};

use support::*;

const BOUND: Duration = Duration::from_secs(180);

// === building and running goagent ===

/// The goagent binary: `GOAGENT=/path`, or built (or found up to date) by
/// `tests/interop/build.sh goagent`. Panics with the reason if it cannot be built.
fn goagent() -> PathBuf {
    if let Some(path) = std::env::var_os("GOAGENT") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "GOAGENT={} is not a file", path.display());
        return path;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate is inside the workspace");
    let script = repo.join("tests/interop/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("goagent")
        .current_dir(repo)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "GO AGENT TEST CANNOT RUN: the Go agent could not be built by {} goagent ({}).\n\
         This test needs a Go toolchain (go 1.26+ with GOTOOLCHAIN=auto and access to the Go \
         module proxy, see tests/interop/README.md), or GOAGENT=/path/to/goagent; it fails \
         rather than skips.\nbuild.sh stderr:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    assert!(path.is_file(), "build.sh printed {path:?}, not a file");
    path
}

/// One running goagent: stdout announcements (JSON lines) collected, stderr (logrus) in a
/// file; SIGKILLed on drop, and by the kernel if the test thread dies (`setpriv --pdeathsig`).
struct GoAgent {
    name: String,
    child: Child,
    log_path: PathBuf,
    announcements: Arc<Mutex<Vec<Value>>>,
}

impl GoAgent {
    fn spawn(bin: &Path, name: &str, env: &[(&str, String)], args: &[&str]) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go_agent");
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join(format!("{name}-{}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).unwrap();
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut cmd = if setpriv.exists() {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        // Only what the test gives: no CATTLE_* or proxy variables from the caller.
        cmd.env_clear();
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let announcements: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = announcements.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        Self {
            name: name.to_owned(),
            child,
            log_path,
            announcements,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The first announcement with `key` (and, if given, that value), waited for up to `within`.
    async fn announced(&self, key: &str, value: Option<&str>, within: Duration) -> Value {
        let what = format!("{}: announcement {key}={value:?}", self.name);
        let found = timeout(within, async {
            loop {
                let hit = self.announcements.lock().unwrap().iter().find_map(|a| {
                    let v = a.get(key)?;
                    (value.is_none() || v.as_str() == value).then(|| a.clone())
                });
                if let Some(a) = hit {
                    return a;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} within {within:?}; log:\n{}", self.log()))
    }

    /// The first log line containing every one of `needles`, waited for up to `within`.
    async fn log_line(&self, needles: &[&str], within: Duration) -> String {
        let found = timeout(within, async {
            loop {
                if let Some(l) = self
                    .log()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                {
                    return l.to_owned();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "{}: no log line with {needles:?} within {within:?}; log:\n{}",
                self.name,
                self.log()
            )
        })
    }

    async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "{} still running after {within:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GoAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

// === the manifest ===

/// What the import manifest gives the agent: (CATTLE_SERVER, CATTLE_CA_CHECKSUM,
/// STRICT_VERIFY, and the cattle-credentials Secret's decoded url and token).
struct FromManifest {
    server: String,
    ca_checksum: String,
    strict_verify: String,
    url: String,
    token: String,
}

fn read_manifest(yaml: &str) -> FromManifest {
    let unquote = |v: &str| v.trim().trim_matches('"').to_owned();
    let env = |name: &str| {
        let mut lines = yaml.lines();
        lines
            .find(|l| l.trim() == format!("- name: {name}"))
            .and_then(|_| lines.next())
            .and_then(|l| l.trim().strip_prefix("value:").map(unquote))
            .unwrap_or_else(|| panic!("no env {name} in the manifest:\n{yaml}"))
    };
    // The cattle-credentials Secret's data: the first `url:`/`token:` lines after `data:`.
    let data = |key: &str| {
        let b64 = yaml
            .lines()
            .skip_while(|l| l.trim() != "data:")
            .find_map(|l| l.trim().strip_prefix(&format!("{key}:")).map(unquote))
            .unwrap_or_else(|| panic!("no Secret data {key} in the manifest:\n{yaml}"));
        String::from_utf8(data_encoding::BASE64.decode(b64.as_bytes()).unwrap()).unwrap()
    };
    FromManifest {
        server: env("CATTLE_SERVER"),
        ca_checksum: env("CATTLE_CA_CHECKSUM"),
        strict_verify: env("STRICT_VERIFY"),
        url: data("url"),
        token: data("token"),
    }
}

// === the test ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agent_on_real_remotedialer_registers_and_shows_connected() {
    // Outside the bound: a first build on a fresh machine downloads the toolchain and modules.
    let bin = goagent();
    eprintln!("goagent: {}", bin.display());
    timeout(BOUND, scenario(bin))
        .await
        .expect("test exceeded its bound");
}

async fn scenario(bin: PathBuf) {
    let dir = TempDir::new("goagent");
    let server = ServerProc::start(dir.path());
    let http = server.client();
    let (cluster_id, url_token, import_url) = add_cluster(dir.path(), "go");
    let admin = add_user(dir.path(), "root", &["--admin"]);
    let grace = add_user(dir.path(), "grace", &["--group", "sre"]);
    let bob = add_user(dir.path(), "bob", &[]);
    cli(dir.path(), &["grant", "grace", "go"]);
    eprintln!("server {} ; cluster {cluster_id}", server.url);

    // What `kubectl apply -f <import URL>` would give the agent's pod.
    let manifest = http
        .get(import_url.strip_prefix(&server.url).unwrap(), None)
        .await;
    assert_eq!(manifest.status, StatusCode::OK);
    let m = read_manifest(&manifest.body);
    let import = http
        .api(
            "GET",
            &format!("/v1/clusters/{cluster_id}/import"),
            &admin,
            None,
        )
        .await
        .json();
    eprintln!(
        "manifest: CATTLE_SERVER={} CATTLE_CA_CHECKSUM={} STRICT_VERIFY={} secret url={} token={}…",
        m.server,
        m.ca_checksum,
        m.strict_verify,
        m.url,
        &m.token[..8]
    );
    assert_eq!(m.token, url_token);
    assert_eq!(import["registrationToken"], m.token.as_str());
    assert_eq!(import["caChecksum"], m.ca_checksum.as_str());
    assert_eq!(m.url, server.url);

    // The pod's files: the mounted credentials Secret, the service account, the apiserver.
    let apiserver = FakeApiserver::start().await;
    let creds = dir.path().join("cattle-credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("url"), &m.url).unwrap();
    std::fs::write(creds.join("token"), &m.token).unwrap();
    let sa_token = dir.path().join("sa-token");
    let sa_ca = dir.path().join("sa-ca.crt");
    std::fs::write(&sa_token, "go-agent-sa-jwt\n").unwrap();
    std::fs::write(&sa_ca, &apiserver.ca_pem).unwrap();
    let state = dir.path().join("agent-workdir");
    std::fs::create_dir_all(&state).unwrap();
    let env = vec![
        ("CATTLE_SERVER", m.server.clone()),
        ("CATTLE_CA_CHECKSUM", m.ca_checksum.clone()),
        ("STRICT_VERIFY", m.strict_verify.clone()),
        ("CATTLE_CLUSTER", "true".to_owned()),
        ("CATTLE_K8S_MANAGED", "true".to_owned()),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
        ("KUBERNETES_SERVICE_PORT", apiserver.addr.port().to_string()),
    ];
    let args = [
        "-credentials-dir",
        creds.to_str().unwrap(),
        "-sa-token-file",
        sa_token.to_str().unwrap(),
        "-sa-ca-file",
        sa_ca.to_str().unwrap(),
        "-state-dir",
        state.to_str().unwrap(),
    ];

    // === register and Connected ===
    let started = Instant::now();
    let mut agent = GoAgent::spawn(&bin, "goagent", &env, &args);
    let pre = agent
        .announced("preflight", None, Duration::from_secs(20))
        .await;
    eprintln!("go agent pre-flight: {}", pre["preflight"]);
    assert_eq!(pre["preflight"]["pinned"], true);
    assert_eq!(pre["preflight"]["cacertsValid"], true);
    let params = agent
        .announced("params", None, Duration::from_secs(5))
        .await;
    let params = String::from_utf8(
        data_encoding::BASE64
            .decode(params["params"].as_str().unwrap().as_bytes())
            .unwrap(),
    )
    .unwrap();
    let ca_b64 = data_encoding::BASE64.encode(apiserver.ca_pem.as_bytes());
    // Go marshals a map with its keys sorted, compact.
    let expected = format!(
        r#"{{"cluster":{{"address":"127.0.0.1:{}","caCert":"{ca_b64}","token":"go-agent-sa-jwt"}}}}"#,
        apiserver.addr.port()
    );
    eprintln!(
        "go agent X-API-Tunnel-Params (decoded, caCert cut): {}…",
        &params[..params.find("caCert").unwrap() + 20]
    );
    assert_eq!(params, expected);
    let main = agent
        .announced("connected", Some("main"), Duration::from_secs(20))
        .await;
    let t_main = started.elapsed();
    let steve = agent
        .announced("connected", Some("steve"), Duration::from_secs(20))
        .await;
    let t_steve = started.elapsed();
    eprintln!(
        "go agent main tunnel up at {t_main:?}: {}",
        main["url"].as_str().unwrap()
    );
    eprintln!(
        "go agent steve tunnel up at {t_steve:?}: {}",
        steve["url"].as_str().unwrap()
    );
    assert!(
        main["url"]
            .as_str()
            .unwrap()
            .ends_with("/v3/connect/register")
    );
    assert!(steve["url"].as_str().unwrap().ends_with("/v3/connect"));
    let line = agent
        .log_line(
            &[
                "Connecting to wss://",
                "/v3/connect/register with token starting with",
            ],
            Duration::from_secs(1),
        )
        .await;
    eprintln!("go agent log: {line}");

    let cluster_path = format!("/v1/clusters/{cluster_id}");
    let c = eventually(
        Duration::from_secs(20),
        "Go agent's cluster connected",
        || async {
            let c = http.api("GET", &cluster_path, &admin, None).await.json();
            (c["connected"] == true).then_some(c)
        },
    )
    .await;
    eprintln!(
        "Connected at {:?}: tunnel={} aggregationTunnel={} connected={} apiEndpoint={} caCert={}…",
        started.elapsed(),
        c["tunnel"],
        c["aggregationTunnel"],
        c["connected"],
        c["apiEndpoint"],
        &c["caCert"].as_str().unwrap_or_default()[..16]
    );
    assert_eq!(c["tunnel"], true);
    assert_eq!(c["aggregationTunnel"], true);
    assert_eq!(c["connectedMessage"], Value::Null);
    assert_eq!(
        c["apiEndpoint"],
        format!("https://127.0.0.1:{}", apiserver.addr.port())
    );
    assert_eq!(c["caCert"], ca_b64.as_str());
    // And it stays so over several 300 ms probe rounds through the Go steve tunnel.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = http.api("GET", &cluster_path, &admin, None).await.json();
    assert_eq!(c["connected"], true, "{c}");
    assert!(std::fs::metadata(state.join("connected")).is_ok());

    // === the Kubernetes API through the Go agent's main tunnel ===
    let path = format!("/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods?limit=1");
    let r = http.get(&path, Some(&grace)).await;
    eprintln!("grace GET {path} -> {} {}", r.status, r.body);
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["path"], "/api/v1/namespaces/default/pods?limit=1");
    let seen = apiserver.last();
    eprintln!(
        "apiserver saw {} {} authorization={:?} impersonate-user={:?} impersonate-group={:?}",
        seen.method,
        seen.path,
        seen.headers.get("authorization"),
        seen.headers.get("impersonate-user"),
        seen.headers.get("impersonate-group")
    );
    assert_eq!(seen.headers["authorization"], "Bearer go-agent-sa-jwt");
    assert_eq!(seen.headers["impersonate-user"], "grace");
    assert_eq!(seen.headers["impersonate-group"], "sre");
    let r = http
        .get(&format!("/k8s/clusters/{cluster_id}/version"), Some(&grace))
        .await;
    assert_eq!(r.json()["gitVersion"], "v1.30.0-fake");
    let r = http
        .get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&bob))
        .await;
    eprintln!("bob (no grant) -> {} {}", r.status, r.body);
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // An upgrade (kubectl exec) is spliced both ways through Go's stream pipe.
    let req = Request::post(format!(
        "/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods/p/exec?command=sh"
    ))
    .header("host", "x")
    .header("authorization", format!("Bearer {grace}"))
    .header("connection", "Upgrade")
    .header("upgrade", "SPDY/3.1")
    .body(Empty::<Bytes>::new())
    .unwrap();
    let mut resp = http.send_streaming(req).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    let payload = vec![b'x'; 256 << 10];
    io.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    timeout(Duration::from_secs(20), io.read_exact(&mut back))
        .await
        .expect("exec echo within 20 s")
        .unwrap();
    assert!(back.iter().all(|&b| b == b'X'));
    eprintln!(
        "exec upgrade through the Go agent: {} KiB echoed",
        back.len() >> 10
    );
    drop(io);

    // === Rancher's refusals, as the Go agent logs them ===
    let wrong = "x".repeat(54);
    let mut bad = GoAgent::spawn(
        &bin,
        "goagent-wrong-token",
        &[
            ("CATTLE_SERVER", m.server.clone()),
            ("CATTLE_TOKEN", wrong.clone()),
            ("CATTLE_CA_CHECKSUM", m.ca_checksum.clone()),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
            ("KUBERNETES_SERVICE_PORT", apiserver.addr.port().to_string()),
        ],
        &[
            "-sa-token-file",
            sa_token.to_str().unwrap(),
            "-sa-ca-file",
            sa_ca.to_str().unwrap(),
            "-state-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let line = bad
        .log_line(
            &[
                "Failed to connect to proxy",
                "Response status: 400",
                "cluster not found",
            ],
            Duration::from_secs(20),
        )
        .await;
    eprintln!("wrong token, main tunnel: {line}");
    bad.kill();
    let mut bad = GoAgent::spawn(
        &bin,
        "goagent-wrong-stv-token",
        &[
            ("CATTLE_SERVER", m.server.clone()),
            ("CATTLE_TOKEN", wrong),
            ("CATTLE_CA_CHECKSUM", m.ca_checksum.clone()),
        ],
        &["-steve-only", "-state-dir", dir.path().to_str().unwrap()],
    );
    let line = bad
        .log_line(
            &[
                "Failed to connect to proxy",
                "Response status: 401",
                "failed authentication",
            ],
            Duration::from_secs(20),
        )
        .await;
    eprintln!("wrong token, steve tunnel: {line}");
    bad.kill();
    let mut bad = GoAgent::spawn(
        &bin,
        "goagent-wrong-checksum",
        &[
            ("CATTLE_SERVER", m.server.clone()),
            ("CATTLE_TOKEN", m.token.clone()),
            ("CATTLE_CA_CHECKSUM", "0".repeat(64)),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
            ("KUBERNETES_SERVICE_PORT", "1".to_owned()),
        ],
        &["-state-dir", dir.path().to_str().unwrap()],
    );
    let status = bad.exit_status(Duration::from_secs(20)).await;
    let line = bad
        .log_line(
            &["does not match given --ca-checksum"],
            Duration::from_secs(1),
        )
        .await;
    eprintln!("wrong CA checksum: {status}: {line}");
    assert_eq!(status.code(), Some(1));
    let server_log = server.log();
    assert!(
        server_log.contains("tunnel request failed authentication"),
        "{server_log}"
    );
    // None of that disturbed the real agent.
    let c = http.api("GET", &cluster_path, &admin, None).await.json();
    assert_eq!(c["connected"], true, "{c}");

    // Nothing the server sent ended a Go session.
    let log = agent.log();
    for bad_line in [
        "Remotedialer proxy error",
        "refusing connect",
        "Failed to dial steve",
    ] {
        assert!(
            !log.contains(bad_line),
            "go agent logged {bad_line:?}:\n{log}"
        );
    }

    // === the Go agent dies ===
    agent.kill();
    let killed = Instant::now();
    let c = eventually(Duration::from_secs(10), "cluster disconnected", || async {
        let c = http.api("GET", &cluster_path, &admin, None).await.json();
        (c["connected"] == false && c["tunnel"] == false && c["aggregationTunnel"] == false)
            .then_some(c)
    })
    .await;
    eprintln!(
        "killed: disconnected after {:?}: connected={} message={}",
        killed.elapsed(),
        c["connected"],
        c["connectedMessage"]
    );
    let t = Instant::now();
    let r = http
        .get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&grace))
        .await;
    let took = t.elapsed();
    eprintln!(
        "after the kill: GET /k8s/clusters/{cluster_id}/api -> {} {:?} in {took:?}",
        r.status, r.body
    );
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(took < Duration::from_secs(2), "503 took {took:?}");

    // === restarted: ./connected exists, so it connects on /v3/connect ===
    let restarted = Instant::now();
    let agent = GoAgent::spawn(&bin, "goagent-restarted", &env, &args);
    let main = agent
        .announced("connected", Some("main"), Duration::from_secs(20))
        .await;
    let url = main["url"].as_str().unwrap();
    assert!(url.ends_with("/v3/connect"), "{url}");
    eventually(Duration::from_secs(20), "connected again", || async {
        let c = http.api("GET", &cluster_path, &admin, None).await.json();
        (c["connected"] == true).then_some(())
    })
    .await;
    let r = http.get(&path, Some(&grace)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    eprintln!(
        "restarted: reconnected on {url}, Connected again after {:?}, GET -> {}",
        restarted.elapsed(),
        r.status
    );
}
