//! Presence (`crate::presence`): the real server records in its store which tunnel ends it
//! holds. A cluster agent and a node agent connect: GET of the cluster and of the node show
//! `presence.connected`, the replica name given with `--replica-name`, and a `since` time;
//! the agents leave: `connected` turns false, `since` moves, `lastSeen` stays. A graceful
//! shutdown marks what it still held as disconnected (read back after a restart).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

fn trust(server: &ServerProc) -> Trust {
    Trust::CaBundle {
        pem: server.ca_pem().into_bytes(),
        with_system_roots: false,
    }
}

/// `presence` of a GET once `connected` is `want`.
async fn presence_when(http: &HttpClient, admin: &str, path: &str, want: bool) -> Value {
    eventually(
        Duration::from_secs(10),
        &format!("{path} connected={want}"),
        || async {
            let v = http.api("GET", path, admin, None).await.json();
            (v["presence"]["connected"] == want).then(|| v["presence"].clone())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_ends_are_recorded_as_connected_then_disconnected_with_their_replica() {
    timeout(Duration::from_secs(120), async {
        let dir = TempDir::new("presence");
        let server = ServerProc::start_with(dir.path(), &["--replica-name", "replica-a"]);
        let http = server.client();
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let (cluster_id, token, _) = add_cluster(dir.path(), "prod");
        let cluster_path = format!("/v1/clusters/{cluster_id}");
        let before = http.api("GET", &cluster_path, &admin, None).await.json();
        assert_eq!(
            before["presence"],
            Value::Null,
            "never connected: no record"
        );

        let apiserver = FakeApiserver::start().await;
        let params = apiserver.cluster_params("sa");
        let agent = connect_agent(
            &server,
            "/v3/connect",
            agent_headers(&token, &params),
            trust(&server),
            None,
        )
        .await
        .unwrap();
        let node_params = json!({ "node": { "requestedHostname": "node-1" } });
        let node = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &node_params),
            trust(&server),
            None,
        )
        .await
        .unwrap();
        let up = presence_when(&http, &admin, &cluster_path, true).await;
        println!("cluster up: {up}");
        assert_eq!(up["replica"], "replica-a");
        let since_up = up["since"].as_i64().unwrap();
        assert!(up["lastSeen"].as_i64().unwrap() >= since_up);

        let nodes = http.api("GET", "/v1/nodes", &admin, None).await.json();
        let node_ref = nodes["items"][0]["ref"].as_str().unwrap().to_owned();
        let node_path = format!("/v1/nodes/{node_ref}");
        let node_up = presence_when(&http, &admin, &node_path, true).await;
        assert_eq!(node_up["replica"], "replica-a");

        // One second later, so that `since` visibly moves.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        agent.close();
        let down = presence_when(&http, &admin, &cluster_path, false).await;
        println!("cluster down: {down}");
        assert_eq!(down["replica"], "replica-a");
        assert!(down["since"].as_i64().unwrap() > since_up, "since moves");
        assert!(down["lastSeen"].as_i64().unwrap() >= since_up);
        let node_still = http.api("GET", &node_path, &admin, None).await.json();
        assert_eq!(
            node_still["presence"]["connected"], true,
            "the node agent stays"
        );

        // A graceful shutdown marks what the replica still held as disconnected.
        let status = server.terminate();
        assert!(status.success(), "{status:?}");
        drop(node);
        let server = ServerProc::start_with(dir.path(), &["--replica-name", "replica-b"]);
        let http = server.client();
        let after = http.api("GET", &node_path, &admin, None).await.json();
        println!("node after the shutdown: {}", after["presence"]);
        assert_eq!(after["presence"]["connected"], false);
        assert_eq!(after["presence"]["replica"], "replica-a");
    })
    .await
    .expect("presence test timed out");
}
