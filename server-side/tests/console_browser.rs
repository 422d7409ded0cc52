//! The web console in headless Chromium: the real `tunnel-server` binary (console embedded),
//! a REAL kube-apiserver (the e2e suite's cached build) and the real cluster agent
//! (in-process, `agent_cluster::run`, what its binary calls), driven by
//! `console/tests/browser.mjs` (playwright-core on Debian's `/usr/bin/chromium`).
//!
//! The script signs in as an admin, adds a cluster on the page, asks this test to start the
//! agent with the registration token the page showed, and checks that the list turns Connected
//! within 2 s of the server saying so, without a reload; then a non-admin sees only the cluster
//! granted to it (from the page), the registration token is rotated on the cluster's page (the
//! agent's revoked, which closes its tunnels) and both pages turn Disconnected live;
//! no console error on any page; screenshots of each page in `$CONSOLE_SCREENSHOTS` (default
//! `target/console-browser`).
//!
//! Ignored by `cargo test --workspace`: it needs chromium and the console's `node_modules`, so
//! `scripts/test.sh` runs it as its own step after building the console
//! (`cargo test -p server-side --test console_browser -- --ignored`).

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use std::io::{BufRead, BufReader, Write};

use tokio::time::timeout;

use support::*;

/// The whole browser run, apiserver start included, is bounded by this.
const RUN_WITHIN: Duration = Duration::from_secs(100);

fn console_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and the console's node_modules: scripts/test.sh runs it (-- --ignored)"]
async fn the_console_in_headless_chromium() {
    assert!(
        server_side::console::is_built(),
        "the binary has no console: run `npm ci && npm run build` in server-side/console first"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} missing: apt-get install chromium (scripts/install-test-deps.sh)"
    );
    assert!(
        console_dir().join("node_modules/playwright-core").exists(),
        "playwright-core missing: npm ci in server-side/console"
    );
    let shots = std::env::var("CONSOLE_SCREENSHOTS").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-browser"),
        PathBuf::from,
    );

    let dir = TempDir::new("console-browser");
    let parent = dir.path().to_owned();
    let Some(kube) = tokio::task::spawn_blocking(move || {
        real_kube::RealKube::start("server-side console_browser", &parent)
    })
    .await
    .unwrap() else {
        return;
    };
    let projected = kube.cattle_service_account();
    // The server impersonates the console's user; the admin is the cluster's admin (its pods page
    // lists namespaces through the tunnel), bob is given nothing.
    kube.kubectl(&[
        "create",
        "clusterrolebinding",
        "console-root-admin",
        "--clusterrole=cluster-admin",
        "--user=root",
    ]);

    let server = ServerProc::start(dir.path());
    let http = server.client();
    let admin = add_user(dir.path(), "root", &["--admin"]);
    let bob = add_user(dir.path(), "bob", &[]);
    let (other_id, _, _) = add_cluster(dir.path(), "other");

    // std::process (the workspace's tokio has no `process` feature): a thread forwards the
    // script's lines, the answers are one short write each.
    let mut node = std::process::Command::new("node")
        .arg(console_dir().join("tests/browser.mjs"))
        .current_dir(console_dir())
        .env("CONSOLE_URL", &server.url)
        .env("ADMIN_TOKEN", &admin)
        .env("USER_TOKEN", &bob)
        .env("USER_NAME", "bob")
        .env("OTHER_CLUSTER", &other_id)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node (node 20 is needed)");
    let mut to_script = node.stdin.take().unwrap();
    let script_out = node.stdout.take().unwrap();
    let (line_tx, mut from_script) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(script_out).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    let path = |name: &str| dir.path().join(name).display().to_string();
    let mut agent = None;
    let run = async {
        while let Some(line) = from_script.recv().await {
            println!("browser: {line}");
            if let Some(rest) = line.strip_prefix("AGENT ") {
                let (cluster_id, token) = rest.split_once(' ').expect("AGENT <id> <token>");
                let import = http
                    .api(
                        "GET",
                        &format!("/v1/clusters/{cluster_id}/import"),
                        &admin,
                        None,
                    )
                    .await
                    .json();
                std::fs::create_dir_all(dir.path().join("creds")).unwrap();
                std::fs::write(dir.path().join("creds/url"), &server.url).unwrap();
                std::fs::write(dir.path().join("creds/token"), token).unwrap();
                std::fs::write(dir.path().join("sa-token"), &projected).unwrap();
                std::fs::write(dir.path().join("sa-ca.crt"), kube.ca_pem()).unwrap();
                let env: HashMap<String, String> = [
                    ("CATTLE_SERVER", server.url.clone()),
                    (
                        "CATTLE_CA_CHECKSUM",
                        import["caChecksum"].as_str().unwrap().to_owned(),
                    ),
                    ("CATTLE_AGENT_STATE_DIR", path("state")),
                    ("CATTLE_CREDENTIALS_DIR", path("creds")),
                    ("CATTLE_AGENT_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
                    ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
                    ("KUBERNETES_SERVICE_PORT", kube.port().to_string()),
                    ("CATTLE_SA_TOKEN_FILE", path("sa-token")),
                    ("CATTLE_SA_CA_FILE", path("sa-ca.crt")),
                    // No token controller runs: report the projected token at once.
                    ("CATTLE_SA_TOKEN_WAIT", "0s".to_owned()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                let config =
                    agent_cluster::ClusterConfig::from_strings(&env).expect("agent config");
                agent = Some(tokio::spawn(agent_cluster::run(config)));
                to_script.write_all(b"started\n").unwrap();
            }
        }
        // The script closed its stdout: it is exiting.
        if let Some(agent) = agent.take() {
            agent.abort();
        }
        node.wait().unwrap()
    };
    let Ok(status) = timeout(RUN_WITHIN, run).await else {
        let _ = node.kill();
        panic!("the browser run took over {RUN_WITHIN:?}");
    };
    assert!(
        status.success(),
        "the browser checks failed ({status}); server log:\n{}",
        server.log()
    );
}
