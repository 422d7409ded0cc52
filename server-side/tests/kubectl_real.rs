//! The real `kubectl` with a kubeconfig from `tunnel-server kubeconfig CLUSTER --user U`:
//! it trusts the server's CA, authenticates with a fresh API token of the user and reaches the
//! stand-in apiserver through the cluster's tunnel (`kubectl version`, and `kubectl get --raw`,
//! whose path replaces the kubeconfig's whole path, prefix included, as with Rancher). Needs
//! `kubectl` on PATH and FAILS saying so without it.

mod support;

use std::process::Command;
use std::time::Duration;

use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_a_generated_kubeconfig() {
    let found = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .unwrap();
    assert!(found.status.success(), "this test needs `kubectl` on PATH");
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("kubectl");
        let server = ServerProc::start(dir.path());
        let (cluster_id, token, _) = add_cluster(dir.path(), "kube1");
        add_user(dir.path(), "frank", &["--group", "team-a"]);
        cli(dir.path(), &["grant", "frank", "kube1"]);
        let apiserver = FakeApiserver::start().await;
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let _agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &apiserver.cluster_params("sa")),
            trust,
            None,
        )
        .await
        .unwrap();

        let kubeconfig = cli(dir.path(), &["kubeconfig", "kube1", "--user", "frank"]);
        println!(
            "{}",
            kubeconfig
                .lines()
                .filter(|l| !l.contains("token:") && !l.contains("certificate-authority-data"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(kubeconfig.contains(&format!(
            "server: \"{}/k8s/clusters/{cluster_id}\"",
            server.url
        )));
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, &kubeconfig).unwrap();

        let kubectl = |args: Vec<String>| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&path)
                    .args(args)
                    .output()
                    .unwrap()
            })
        };
        let out = kubectl(vec!["version".into(), "-o".into(), "json".into()])
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "kubectl version: {} {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && stdout.contains("v1.30.0-fake"),
            "server log:\n{}",
            server.log()
        );

        let raw = format!("/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods?limit=1");
        let out = kubectl(vec!["get".into(), "--raw".into(), raw])
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "kubectl: {} {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "server log:\n{}", server.log());
        assert!(stdout.contains("/api/v1/namespaces/default/pods?limit=1"));
        let seen = apiserver.last();
        assert_eq!(seen.headers["impersonate-user"], "frank");
        assert_eq!(seen.headers["impersonate-group"], "team-a");
        assert_eq!(seen.headers["authorization"], "Bearer sa");
    })
    .await
    .expect("test exceeded its bound");
}
