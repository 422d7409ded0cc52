//! The Connected probe with two replicas of the cluster agent, the newer one draining (its pod
//! deleted, or replaced in a rolling update: after SIGTERM an agent refuses every dial until it
//! exits). The cluster stays Connected through the older replica, and is reported disconnected
//! once only the refusing one is left.
//!
//! Found by tests/e2e/pods.sh: deleting the newest of two cluster-agent pods showed the cluster
//! not Connected for ~1.3 s while kubectl through the other replica kept working, because the
//! probe tried only the newest session.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::Trust;

use support::*;

/// An aggregation tunnel whose agent refuses every dial, as a draining agent does.
async fn draining_stv(server: &ServerProc, registration_token: &str, trust: Trust) -> Tunnel {
    dial_stv(server, registration_token, trust, Arc::new(|_| false)).await
}

async fn sessions(server: &ServerProc) -> String {
    let m = server.client().get("/metrics", None).await.body;
    m.lines()
        .find_map(|l| l.strip_prefix("tunnel_server_sessions "))
        .unwrap_or("?")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_newer_replica_does_not_make_the_cluster_look_disconnected() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("probe-draining");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, reg_token, _) = add_cluster(dir.path(), "replicas");
        let admin = add_user(dir.path(), "admin", &["--admin"]);
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let cluster = format!("/v1/clusters/{cluster_id}");

        let older = connect_stv(&server, &reg_token, trust.clone()).await;
        eventually(
            Duration::from_secs(10),
            "connected through the older replica",
            || async {
                let c = http.api("GET", &cluster, &admin, None).await.json();
                (c["connected"] == true).then_some(())
            },
        )
        .await;

        // The newer replica registers and drains at once: every probe round (0.3 s) and the
        // one its registration triggers dial it first.
        let newer = draining_stv(&server, &reg_token, trust.clone()).await;
        eventually(
            Duration::from_secs(10),
            "both sessions registered",
            || async { (sessions(&server).await == "2").then_some(()) },
        )
        .await;
        let watch = Instant::now();
        let mut samples = 0;
        while watch.elapsed() < Duration::from_secs(2) {
            let c = http.api("GET", &cluster, &admin, None).await.json();
            assert_eq!(
                c["connected"], true,
                "not Connected beside a draining replica: {c}"
            );
            samples += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("{samples} samples over 2 s: Connected throughout");

        // Only the refusing replica left: not connected.
        older.close();
        let c = eventually(Duration::from_secs(10), "disconnected", || async {
            let c = http.api("GET", &cluster, &admin, None).await.json();
            (c["connected"] == false).then_some(c)
        })
        .await;
        println!("only the draining replica: {c}");
        drop(newer);
    })
    .await
    .expect("test timed out");
}
