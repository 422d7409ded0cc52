//! The real `tunnel-server` binary, the real cluster agent (in-process, `agent_cluster::run`,
//! what its binary calls) and a REAL kube-apiserver with kube-controller-manager's token
//! controller (the e2e suite's cached build): the agent reports the token of SA `cattle`'s
//! `kubernetes.io/service-account-token` Secret, and `kubectl` with a kubeconfig from
//! `tunnel-server kubeconfig` keeps working through the server after the pod's projected token
//! file is rewritten with an invalid token (what the server holds does not expire with it).
//!
//! Without the binaries: fails under `CI=true`, otherwise one SKIP line. Without a
//! kube-controller-manager binary the test fills `data.token` itself through the API, playing
//! the token controller's part.

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use tokio::time::timeout;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_through_the_server_survives_a_rewritten_projected_token() {
    let dir = TempDir::new("kube-token");
    let parent = dir.path().to_owned();
    let Some(mut kube) = tokio::task::spawn_blocking(move || {
        real_kube::RealKube::start("server-side kube_token_real", &parent)
    })
    .await
    .unwrap() else {
        return;
    };
    timeout(Duration::from_secs(240), async {
        let projected = kube.cattle_service_account();
        // The user of the kubeconfig below may read the cluster (the server impersonates it).
        kube.kubectl(&[
            "create",
            "clusterrolebinding",
            "frank-admin",
            "--clusterrole=cluster-admin",
            "--user=frank",
        ]);
        if kube.has_controller_manager() {
            kube.start_token_controller();
        }

        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, token, import_url) = add_cluster(dir.path(), "real-kube");
        let admin = add_user(dir.path(), "root", &["--admin"]);
        add_user(dir.path(), "frank", &[]);
        cli(dir.path(), &["grant", "frank", "real-kube"]);
        let manifest = http
            .get(import_url.strip_prefix(&server.url).unwrap(), None)
            .await
            .body;
        let checksum = manifest
            .lines()
            .skip_while(|l| !l.contains("CATTLE_CA_CHECKSUM"))
            .nth(1)
            .and_then(|l| l.trim().strip_prefix("value: "))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap();

        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::create_dir_all(dir.path().join("creds")).unwrap();
        std::fs::write(dir.path().join("creds/url"), &server.url).unwrap();
        std::fs::write(dir.path().join("creds/token"), &token).unwrap();
        std::fs::write(dir.path().join("sa-token"), &projected).unwrap();
        std::fs::write(dir.path().join("sa-ca.crt"), kube.ca_pem()).unwrap();
        let env: HashMap<String, String> = [
            ("CATTLE_SERVER", server.url.clone()),
            ("CATTLE_CA_CHECKSUM", checksum),
            ("CATTLE_AGENT_STATE_DIR", path("state")),
            ("CATTLE_CREDENTIALS_DIR", path("creds")),
            ("CATTLE_AGENT_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("CATTLE_AGENT_BACKOFF_MIN", "200ms".to_owned()),
            ("CATTLE_AGENT_BACKOFF_MAX", "1s".to_owned()),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_owned()),
            ("KUBERNETES_SERVICE_PORT", kube.port().to_string()),
            ("CATTLE_SA_TOKEN_FILE", path("sa-token")),
            ("CATTLE_SA_CA_FILE", path("sa-ca.crt")),
            ("CATTLE_SA_TOKEN_WAIT", "60s".to_owned()),
            ("CATTLE_SA_TOKEN_RECHECK", "1s".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if !kube.has_controller_manager() {
            // Play the token controller: fill the Secret the agent creates.
            let k = kube.paths["KUBECTL"].clone();
            let kc = kube.dir.join("admin.kubeconfig");
            let filler = kube.cattle_service_account();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let out = Command::new(&k)
                        .arg("--kubeconfig")
                        .arg(&kc)
                        .args([
                            "-n",
                            "cattle-system",
                            "get",
                            "secret",
                            "-l",
                            "cattle.io/service-account.name=cattle",
                            "-o",
                            "name",
                        ])
                        .output()
                        .unwrap();
                    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    if !name.is_empty() {
                        let patch = format!(
                            r#"{{"data":{{"token":"{}"}}}}"#,
                            data_encoding::BASE64.encode(filler.as_bytes())
                        );
                        let _ = Command::new(&k)
                            .arg("--kubeconfig")
                            .arg(&kc)
                            .args([
                                "-n",
                                "cattle-system",
                                "patch",
                                &name,
                                "--type=merge",
                                "-p",
                                &patch,
                            ])
                            .status();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let config = agent_cluster::ClusterConfig::from_strings(&env).expect("agent config");
        let agent = tokio::spawn(agent_cluster::run(config));

        let c = eventually(Duration::from_secs(90), "cluster connected", || async {
            let c = http
                .api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None)
                .await
                .json();
            (c["connected"] == true).then_some(c)
        })
        .await;
        println!(
            "cluster: connected={} apiEndpoint={}",
            c["connected"], c["apiEndpoint"]
        );

        // The token the server stores is the Secret's.
        let secret_token = {
            let b64 = kube.kubectl(&[
                "-n",
                "cattle-system",
                "get",
                "secret",
                "-l",
                "cattle.io/service-account.name=cattle",
                "-o",
                "jsonpath={.items[0].data.token}",
            ]);
            String::from_utf8(data_encoding::BASE64.decode(b64.trim().as_bytes()).unwrap()).unwrap()
        };
        assert!(!secret_token.is_empty() && secret_token != projected);
        let db = server_db_token(dir.path(), &cluster_id);
        assert_eq!(
            db.as_deref(),
            Some(secret_token.as_str()),
            "the server stores the Secret's token"
        );

        let kubeconfig = cli(dir.path(), &["kubeconfig", "real-kube", "--user", "frank"]);
        let kc_path = dir.path().join("frank.kubeconfig");
        std::fs::write(&kc_path, &kubeconfig).unwrap();
        let kubectl = |args: &'static [&'static str]| {
            let (k, kc) = (kube.paths["KUBECTL"].clone(), kc_path.clone());
            tokio::task::spawn_blocking(move || {
                Command::new(k)
                    .arg("--kubeconfig")
                    .arg(kc)
                    .args(args)
                    .output()
                    .unwrap()
            })
        };
        let out = kubectl(&["-n", "cattle-system", "get", "serviceaccounts"])
            .await
            .unwrap();
        println!(
            "kubectl get sa: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "server log:\n{}", server.log());

        // The kubelet rotates the projected token; here it becomes invalid.
        std::fs::write(dir.path().join("sa-token"), "invalid.rotated.token").unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let out = kubectl(&[
            "-n",
            "cattle-system",
            "get",
            "serviceaccounts",
            "cattle",
            "-o",
            "name",
        ])
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "after the rewrite: kubectl get sa cattle: {} {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "server log:\n{}", server.log());
        assert_eq!(stdout.trim(), "serviceaccount/cattle");
        assert_eq!(
            server_db_token(dir.path(), &cluster_id).as_deref(),
            Some(secret_token.as_str())
        );
        agent.abort();
    })
    .await
    .expect("test exceeded its bound");
}

/// The service-account token the server stored for the cluster (its SQLite store).
fn server_db_token(data_dir: &std::path::Path, cluster_id: &str) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        data_dir.join("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row(
        "SELECT sa_token FROM clusters WHERE id = ?1",
        [cluster_id],
        |r| r.get(0),
    )
    .unwrap()
}
