//! The Connected probe with two replicas of the cluster agent, the newer one draining (its pod
//! deleted, or replaced in a rolling update: after SIGTERM an agent refuses every dial until it
//! exits). The cluster stays Connected through the older replica, and is reported disconnected
//! once only the refusing one is left.
//!
//! Found by tests/e2e/pods.sh: deleting the newest of two cluster-agent pods showed the cluster
//! not Connected for ~1.3 s while kubectl through the other replica kept working, because the
//! probe tried only the newest session; and a request that needs a fresh dial (`kubectl exec`)
//! failed once with 502, because the proxy dialed only the newest session too.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::Trust;

use support::*;

/// An aggregation tunnel whose agent refuses every dial, as a draining agent does.
async fn draining_stv(server: &ServerProc, registration_token: &str, trust: Trust) -> Tunnel {
    dial_stv(server, registration_token, trust, Arc::new(|_| false)).await
}

async fn sessions(server: &ServerProc) -> String {
    let m = server.metrics().await;
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

/// A request that needs a fresh dial (an upgrade: `kubectl exec`, `attach`, `port-forward`)
/// while the newest cluster-agent replica drains: the proxy dials it first, it refuses, and the
/// dial is made again through the older replica, which serves the exec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_dial_refused_by_a_draining_replica_goes_through_the_older_one() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("dial-draining");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, reg_token, _) = add_cluster(dir.path(), "replicas");
        let alice = add_user(dir.path(), "alice", &["--admin"]);
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let apiserver = FakeApiserver::start().await;
        let params = apiserver.cluster_params("sa-jwt-token");
        let headers = || agent_headers(&reg_token, &params);

        let older = connect_agent(
            &server,
            "/v3/connect/register",
            headers(),
            trust.clone(),
            None,
        )
        .await
        .expect("older replica");
        // The server registers a session only after storing its params, so the older one
        // must be registered before the newer dials: otherwise the newer could register first
        // and be the one the proxy treats as older.
        eventually(
            Duration::from_secs(10),
            "the older session registered",
            || async { (sessions(&server).await == "1").then_some(()) },
        )
        .await;
        let newer = dial_agent(
            &server,
            "/v3/connect",
            headers(),
            trust.clone(),
            Arc::new(|_| false),
        )
        .await
        .expect("newer, draining replica");
        eventually(
            Duration::from_secs(10),
            "both main sessions registered",
            || async { (sessions(&server).await == "2").then_some(()) },
        )
        .await;

        for round in 1..=3 {
            let req = Request::post(format!(
                "/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods/p/exec?command=sh"
            ))
            .header("host", "x")
            .header("authorization", format!("Bearer {alice}"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(Empty::<Bytes>::new())
            .unwrap();
            let started = Instant::now();
            let mut resp = http.send_streaming(req).await;
            assert_eq!(
                resp.status(),
                StatusCode::SWITCHING_PROTOCOLS,
                "round {round}"
            );
            let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
            io.write_all(b"exec-through-the-older-replica")
                .await
                .unwrap();
            let mut back = [0u8; 30];
            timeout(Duration::from_secs(10), io.read_exact(&mut back))
                .await
                .expect("echo within 10 s")
                .unwrap();
            assert_eq!(&back, b"EXEC-THROUGH-THE-OLDER-REPLICA");
            println!(
                "round {round}: exec upgraded and echoed in {:?}",
                started.elapsed()
            );
        }
        let metrics = server.metrics().await;
        let retried = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("tunnel_server_dials_total{result=\"retried_after_refusal\"} ")
            })
            .unwrap_or("0")
            .to_owned();
        println!("dials retried after a refusal: {retried}");
        assert_eq!(
            retried, "3",
            "each fresh dial went to the draining replica first"
        );

        // Only the refusing replica left: a clear 502 at once, naming the refusal.
        older.close();
        eventually(Duration::from_secs(10), "one session left", || async {
            (sessions(&server).await == "1").then_some(())
        })
        .await;
        let r = http
            .get(&format!("/k8s/clusters/{cluster_id}/version"), Some(&alice))
            .await;
        println!("only the draining replica: {} {}", r.status, r.body);
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(r.body.contains("refused"), "{}", r.body);
        drop(newer);
    })
    .await
    .expect("test timed out");
}
