//! Leader election between replicas (issue 18 point 3): two real `tunnel-server --store
//! kubernetes serve` processes on one REAL kube-apiserver.
//!
//! 1. Exactly one of them holds the `tunnel-server-controllers` Lease and runs the
//!    controllers (its log says so; the other's does not), and the holder stays put;
//! 2. a stale presence (connected, last seen long ago: a replica that crashed without
//!    marking its tunnels down) is marked disconnected by the leader, in the dead owner's name;
//!    and (2b) a cluster deleted through the follower closes its agent's tunnel on the leader
//!    (no leader needed: each replica's store watch cuts what it holds), printed;
//! 3. the leader killed with SIGKILL (no release of the Lease): the other takes it over within
//!    15 s (printed), and as the new leader marks the next stale presence disconnected.
//!
//! Without the binaries: fails under `CI=true`, otherwise one SKIP line.

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;
#[path = "support/replicas.rs"]
mod replicas;

use std::time::{Duration, Instant};

use serde_json::json;
use server_side::leader::LEASE_NAME;
use server_side::store::kube::crd;
use tokio::time::timeout;

use real_kube::RealKube;
use replicas::{KubeStore, start_kube};
use support::*;

const LEADING: &str = "leading: running the controllers";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_and_a_takeover_after_kill() {
    let dir = TempDir::new("kube-leader");
    let parent = dir.path().to_owned();
    let Some(kube) =
        tokio::task::spawn_blocking(move || start_kube("server-side kube_leader", &parent))
            .await
            .unwrap()
    else {
        return;
    };
    timeout(Duration::from_secs(180), scenario(&dir, &kube))
        .await
        .expect("the scenario took over 180 s");
}

fn holder(kube: &RealKube, store: &KubeStore) -> String {
    kube.kubectl(&[
        "-n",
        &store.namespace,
        "get",
        "lease",
        LEASE_NAME,
        "--ignore-not-found",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
}

fn transitions(kube: &RealKube, store: &KubeStore) -> String {
    kube.kubectl(&[
        "-n",
        &store.namespace,
        "get",
        "lease",
        LEASE_NAME,
        "-o",
        "jsonpath={.spec.leaseTransitions}",
    ])
}

/// Writes a presence that says connected to `replica`, last seen 1000 s ago.
fn write_stale_presence(kube: &RealKube, store: &KubeStore, cluster_id: &str, replica: &str) {
    let long_ago = k8s_openapi::jiff::Timestamp::now().as_second() - 1000;
    let at = k8s_openapi::jiff::Timestamp::from_second(long_ago)
        .unwrap()
        .to_string();
    let stale = json!({ "status": {
        "conditions": [{ "type": "Connected", "status": "True", "lastTransitionTime": at,
                         "reason": "TunnelUp", "message": "stale, written by the test" }],
        "replica": replica,
        "peer": "",
        "lastSeen": long_ago,
    }});
    kube.kubectl(&[
        "-n",
        &store.namespace,
        "patch",
        &format!("clusters.{}", crd::GROUP),
        cluster_id,
        "--subresource=status",
        "--type=merge",
        "-p",
        &stale.to_string(),
    ]);
}

/// The Cluster's Connected condition status and its replica.
fn connected(kube: &RealKube, store: &KubeStore, cluster_id: &str) -> String {
    kube.kubectl(&[
        "-n",
        &store.namespace,
        "get",
        &format!("clusters.{}", crd::GROUP),
        cluster_id,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Connected\")].status}/{.status.replica}",
    ])
}

async fn scenario(dir: &TempDir, kube: &RealKube) {
    let store = KubeStore::create(kube, "leader");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let admin = store.add_admin(&dir_a, "root");
    let a = store.replica(&dir_a, "replica-a", &[]);
    let b = store.replica(&dir_b, "replica-b", &[]);

    // === 1. exactly one leader ===
    let elected = Instant::now();
    let first = eventually(Duration::from_secs(30), "a Lease holder", || async {
        let h = holder(kube, &store);
        (!h.is_empty()).then_some(h)
    })
    .await;
    println!(
        "1. {first} holds the Lease {:?} after both started",
        elected.elapsed()
    );
    assert!(first == "replica-a" || first == "replica-b", "{first}");
    let (leader, follower) = if first == "replica-a" { (a, b) } else { (b, a) };
    let follower_name = if first == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };
    let transitions_before = transitions(kube, &store);
    // Several renewal periods: the holder stays, the other never starts the controllers.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(holder(kube, &store), first, "the holder changed");
    assert_eq!(
        transitions(kube, &store),
        transitions_before,
        "the Lease changed hands"
    );
    assert!(leader.log().contains(LEADING), "{}", leader.log());
    assert!(!follower.log().contains(LEADING), "{}", follower.log());
    println!(
        "1. held by {first} for 6 s more (transitions {transitions_before:?}); only its log says it leads"
    );

    // === 2. a stale presence marked disconnected by the leader ===
    let (c1, _) = follower.client().create_cluster(&admin, "c1").await;
    write_stale_presence(kube, &store, &c1, "crashed-replica");
    let started = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the stale presence marked",
        || async { (connected(kube, &store, &c1) == "False/crashed-replica").then_some(()) },
    )
    .await;
    println!(
        "2. stale presence of {c1} marked disconnected after {:?}",
        started.elapsed()
    );
    assert!(
        leader.log().contains("stale presence marked disconnected"),
        "{}",
        leader.log()
    );
    assert!(
        !follower
            .log()
            .contains("stale presence marked disconnected")
    );
    let (c2, _) = follower.client().create_cluster(&admin, "c2").await;

    // === 2b. a cluster deleted through one replica closes its tunnel on the other ===
    // No leader involved: every replica's store watch cuts what it holds (crate::live).
    let (c3, c3_token) = follower.client().create_cluster(&admin, "c3").await;
    let apiserver = FakeApiserver::start().await;
    let agent = connect_cluster_agent(&leader, &c3_token, &apiserver, "sa-secret").await;
    eventually(
        Duration::from_secs(10),
        "c3 connected on the leader",
        || async { (connected(kube, &store, &c3) == format!("True/{first}")).then_some(()) },
    )
    .await;
    assert!(agent.close_reason().is_none(), "closed before the delete");
    let started = Instant::now();
    let reply = follower
        .client()
        .api("DELETE", &format!("/v1/clusters/{c3}"), &admin, None)
        .await;
    assert!(reply.status.is_success(), "{} {}", reply.status, reply.body);
    let reason = timeout(Duration::from_secs(5), agent.closed())
        .await
        .expect("the tunnel on the other replica still open 5 s after the delete");
    println!(
        "2b. {c3} deleted through {follower_name}: its tunnel on {first} closed after {:?} ({reason})",
        started.elapsed()
    );

    // === 3. kill -9 the leader: the other takes over ===
    let follower_name = if first == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };
    let killed = Instant::now();
    leader.kill9();
    let took_over = eventually(Duration::from_secs(15), "the takeover", || async {
        (holder(kube, &store) == follower_name).then(|| killed.elapsed())
    })
    .await;
    println!("3. {first} killed with SIGKILL; {follower_name} holds the Lease after {took_over:?}");
    eventually(Duration::from_secs(5), "the new leader's log", || async {
        follower.log().contains(LEADING).then_some(())
    })
    .await;
    write_stale_presence(kube, &store, &c2, "replica-gone");
    let started = Instant::now();
    eventually(Duration::from_secs(20), "the new leader marks", || async {
        (connected(kube, &store, &c2) == "False/replica-gone").then_some(())
    })
    .await;
    println!(
        "3. the new leader marked {c2}'s stale presence after {:?}",
        started.elapsed()
    );
}
