//! Nothing is lost across a graceful restart or `kill -9` of the real binary: clusters and
//! their registration tokens and agent reports, nodes, users and their tokens (hashed),
//! grants, and the server CA (so agents' CA pins keep working). SIGTERM ends the process
//! cleanly.

mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

const BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_sigterm_and_kill_9() {
    timeout(BOUND, async {
        let dir = TempDir::new("persist");
        let server = ServerProc::start(dir.path());
        let ca_before = server.ca_pem();
        let http = server.client();

        // Write through the CLI and through the API.
        let (cluster_id, token, _) = add_cluster(dir.path(), "kept");
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let created = http
            .api(
                "POST",
                "/v1/users",
                &admin,
                Some(json!({"name": "carol", "groups": ["g1"]})),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        let carol = created.json()["value"].as_str().unwrap().to_owned();
        let r = http
            .api(
                "POST",
                "/v1/grants",
                &admin,
                Some(json!({"userId": "carol", "clusterId": "kept"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let r = http
            .api(
                "POST",
                "/v1/clusters",
                &admin,
                Some(json!({"name": "second"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let second_id = r.json()["cluster"]["id"].as_str().unwrap().to_owned();

        // An agent report and a node, through real registrations.
        let apiserver = FakeApiserver::start().await;
        let trust = Trust::CaBundle {
            pem: ca_before.clone().into_bytes(),
            with_system_roots: false,
        };
        let agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &apiserver.cluster_params("jwt-1")),
            trust.clone(),
            None,
        )
        .await
        .unwrap();
        let node = json!({"node": {"requestedHostname": "worker-1"}});
        let node_agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &node),
            trust.clone(),
            None,
        )
        .await
        .unwrap();
        eventually(
            Duration::from_secs(10),
            "node listed as connected",
            || async {
                let n = http.api("GET", "/v1/nodes", &admin, None).await.json();
                (n["items"][0]["connected"] == true).then_some(())
            },
        )
        .await;

        let snapshot = |http: HttpClient, admin: String| async move {
            let mut out = Vec::new();
            for path in [
                "/v1/clusters",
                "/v1/nodes",
                "/v1/users",
                "/v1/grants",
                "/v1/tokens",
            ] {
                let mut v = http.api("GET", path, &admin, None).await.json();
                // Live state is not a record; a token's last use moves with these very
                // requests (checked on its own below).
                for item in v["items"].as_array_mut().unwrap() {
                    for live in [
                        "tunnel",
                        "aggregationTunnel",
                        "connected",
                        "connectedMessage",
                        "checkedAt",
                        "lastUsedAt",
                    ] {
                        item.as_object_mut().unwrap().remove(live);
                    }
                }
                out.push(v);
            }
            out
        };
        let before = snapshot(http.clone(), admin.clone()).await;
        println!("before: {}", serde_json::to_string(&before).unwrap());

        // Graceful stop.
        let status = server.terminate();
        println!("SIGTERM exit: {status}");
        assert!(status.success(), "exit status after SIGTERM: {status}");
        drop((agent, node_agent));
        // The admin token's uses, noted in memory, were written at shutdown.
        let listed = cli(dir.path(), &["token", "list", "--user", "root"]);
        println!("{listed}");
        let row = listed.lines().nth(1).expect("the admin's token");
        // ID USER CREATED EXPIRES LAST-USED STATE DESCRIPTION
        let last_used = row.split_whitespace().nth(4).unwrap();
        assert_ne!(
            last_used, "never",
            "last use not recorded at shutdown: {row}"
        );

        // Restart, write one more thing, then kill -9 right after it was acknowledged.
        let server = ServerProc::start(dir.path());
        assert_eq!(server.ca_pem(), ca_before, "the CA is kept");
        let http = server.client();
        assert_eq!(snapshot(http.clone(), admin.clone()).await, before);
        let r = http
            .api(
                "POST",
                "/v1/clusters",
                &admin,
                Some(json!({"name": "last-write"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let r = http
            .api("DELETE", &format!("/v1/clusters/{second_id}"), &admin, None)
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let after_writes = snapshot(http.clone(), admin.clone()).await;
        server.kill9();

        // A cluster deleted with the CLI while its agent is connected: the running server
        // closes the agent's tunnel at its next probe round.
        let server2 = ServerProc::start(dir.path());
        let (doomed, doomed_token, _) = add_cluster(dir.path(), "doomed");
        let trust2 = Trust::CaBundle {
            pem: server2.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let doomed_agent = connect_agent(
            &server2,
            "/v3/connect/register",
            agent_headers(&doomed_token, &apiserver.cluster_params("x")),
            trust2,
            None,
        )
        .await
        .unwrap();
        cli(dir.path(), &["cluster", "rm", &doomed]);
        timeout(Duration::from_secs(10), doomed_agent.closed())
            .await
            .expect("tunnel of the deleted cluster closed");
        server2.kill9();

        let server = ServerProc::start(dir.path());
        let http = server.client();
        assert_eq!(snapshot(http.clone(), admin.clone()).await, after_writes);
        assert_eq!(server.ca_pem(), ca_before);
        let names: Vec<String> = after_writes[0]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["kept", "last-write"]);

        // Tokens still authenticate, the registration token still registers, the stored
        // agent report is used, and a cluster whose agent is gone answers 503 at once.
        let started = tokio::time::Instant::now();
        let r = http
            .get(
                &format!("/k8s/clusters/{cluster_id}/api/v1/nodes"),
                Some(&carol),
            )
            .await;
        println!(
            "agent gone: {} {:?} in {:?}",
            r.status,
            r.body,
            started.elapsed()
        );
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.body.contains("not connected"), "{}", r.body);
        assert!(started.elapsed() < Duration::from_secs(2));
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let _agent = connect_agent(
            &server,
            "/v3/connect",
            agent_headers(&token, &apiserver.cluster_params("jwt-1")),
            trust,
            None,
        )
        .await
        .expect("the kept registration token registers again");
        let r = eventually(
            Duration::from_secs(10),
            "proxy through the new tunnel",
            || async {
                let r = http
                    .get(
                        &format!("/k8s/clusters/{cluster_id}/api/v1/nodes"),
                        Some(&carol),
                    )
                    .await;
                (r.status == StatusCode::OK).then_some(r)
            },
        )
        .await;
        assert_eq!(r.json()["path"], "/api/v1/nodes");
        assert_eq!(apiserver.last().headers["authorization"], "Bearer jwt-1");
    })
    .await
    .expect("test exceeded its bound");
}
