//! The import flow end to end against the real binary: a cluster is added with the CLI, its
//! manifest fetched, an agent-like client registers with the manifest's token and pinned CA,
//! opens the aggregation tunnel and is listed as connected; users then reach a stand-in
//! apiserver through `/k8s/clusters/<id>/…` (auth, grants, impersonation, streaming, upgrades),
//! and the tunnel endpoint answers Rancher's statuses and messages.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tunnel_proto::driver::connector::{ConnectError, Trust};

use support::*;

const BOUND: Duration = Duration::from_secs(120);

/// The CA pin an agent derives from the manifest and `/v3/settings/cacerts`.
async fn pinned_trust(server: &ServerProc, manifest: &str) -> Trust {
    let checksum = manifest
        .lines()
        .skip_while(|l| !l.contains("CATTLE_CA_CHECKSUM"))
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("value: "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("CATTLE_CA_CHECKSUM in the manifest");
    let setting = server
        .client()
        .get("/v3/settings/cacerts", None)
        .await
        .json();
    let ca_pem = setting["value"].as_str().unwrap().to_owned();
    assert_eq!(ca_pem, ca_pem.trim(), "cacerts value is trimmed");
    Trust::PinnedCa {
        checksum,
        ca_pem,
        with_system_roots: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_register_connect_and_proxy_the_kubernetes_api() {
    timeout(BOUND, async {
        let dir = TempDir::new("flow");
        let server = ServerProc::start(dir.path());
        let http = server.client();

        // Agent endpoints.
        assert_eq!(http.get("/ping", None).await.body, "pong");
        assert_eq!(http.get("/healthz", None).await.status, StatusCode::OK);
        assert_eq!(http.get("/cacerts", None).await.body, server.ca_pem().trim());
        assert_eq!(http.get("/v3/connect/config", None).await.status, StatusCode::NOT_FOUND);

        // Cluster, users, grant with the CLI.
        let (cluster_id, reg_token, import_url) = add_cluster(dir.path(), "prod");
        println!("cluster {cluster_id}, import URL {import_url}");
        assert!(import_url.starts_with(&server.url));
        let alice = add_user(dir.path(), "alice", &["--group", "devs", "--group", "ops"]);
        let bob = add_user(dir.path(), "bob", &[]);
        let admin = add_user(dir.path(), "root", &["--admin"]);
        cli(dir.path(), &["grant", "alice", "prod"]);

        // The manifest.
        let path = import_url.strip_prefix(&server.url).unwrap();
        let manifest = http.get(path, None).await;
        assert_eq!(manifest.status, StatusCode::OK);
        for needle in [
            "kind: Namespace",
            "name: cattle-system",
            "name: cattle-admin",
            "kind: Deployment",
            "image: \"tunnel-project/cattle-cluster-agent:dev\"",
            "kind: Service",
            &format!("value: \"{}\"", server.url),
            &format!("token: \"{}\"", data_encoding::BASE64.encode(reg_token.as_bytes())),
        ] {
            assert!(manifest.body.contains(needle), "manifest lacks {needle}:\n{}", manifest.body);
        }
        let wrong = format!("/v3/import/{}_{cluster_id}.yaml", "x".repeat(54));
        let r = http.get(&wrong, None).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::BAD_REQUEST, "cluster not found or invalid token"));

        // Before any agent: the cluster has no tunnel, and the proxy says so at once.
        let started = Instant::now();
        let r = http.get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&alice)).await;
        println!("no agent yet: {} {:?} in {:?}", r.status, r.body, started.elapsed());
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(2));

        // The cluster agent registers with the manifest's token, pinning the manifest's CA.
        let apiserver = FakeApiserver::start().await;
        let trust = pinned_trust(&server, &manifest.body).await;
        let params = apiserver.cluster_params("sa-jwt-token");
        let _agent = connect_agent(&server, "/v3/connect/register", agent_headers(&reg_token, &params), trust.clone(), None)
            .await
            .expect("agent registers");
        // The main tunnel alone is not "connected" (spec §6.3): that needs /ping over stv.
        let c = eventually(Duration::from_secs(10), "main tunnel listed", || async {
            let c = http.api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None).await.json();
            (c["tunnel"] == true && !c["checkedAt"].is_null()).then_some(c)
        })
        .await;
        println!("main tunnel only: connected={} {}", c["connected"], c["connectedMessage"]);
        assert_eq!(c["connected"], false);
        let _stv = connect_stv(&server, &reg_token, trust.clone()).await;

        let listed = eventually(Duration::from_secs(10), "cluster connected", || async {
            let c = http.api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None).await.json();
            (c["tunnel"] == true && c["connected"] == true).then_some(c)
        })
        .await;
        println!("listed: {listed}");
        assert_eq!(listed["apiEndpoint"], format!("https://{}", apiserver.addr));
        // And stays connected over several probe rounds.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = http.api("GET", "/v1/clusters", &admin, None).await.json();
        assert_eq!(c["items"][0]["connected"], true, "{c}");

        // A granted user reaches the apiserver; forged impersonation is dropped.
        let r = http
            .request(
                "GET",
                &format!("/k8s/clusters/{cluster_id}/api/v1/namespaces?limit=5"),
                &[
                    ("authorization", &format!("Bearer {alice}")),
                    ("impersonate-user", "system:admin"),
                    ("impersonate-group", "system:masters"),
                ],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.json()["path"], "/api/v1/namespaces?limit=5");
        let seen = apiserver.last();
        println!("apiserver saw {} {} {:?}", seen.method, seen.path, seen.headers);
        assert_eq!(seen.headers["authorization"], "Bearer sa-jwt-token");
        let users: Vec<_> = seen.headers.get_all("impersonate-user").iter().collect();
        assert_eq!(users, ["alice"]);
        let groups: Vec<_> = seen.headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["devs", "ops"]);

        // Sequential requests reuse one pooled upstream connection (no new dial or TLS
        // handshake through the tunnel).
        let before = apiserver.accepted.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..5 {
            let r = http.get(&format!("/k8s/clusters/{cluster_id}/api/v1/pods?i={i}"), Some(&alice)).await;
            assert_eq!(r.json()["path"], format!("/api/v1/pods?i={i}"));
        }
        let opened = apiserver.accepted.load(std::sync::atomic::Ordering::Relaxed) - before;
        println!("5 sequential requests opened {opened} upstream connection(s)");
        assert!(opened <= 1, "{opened} upstream connections for 5 sequential requests");

        // Not granted: 403; bad token: 401; unknown cluster: 404; path tricks: 400.
        let r = http.get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&bob)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        let r = http.get(&format!("/k8s/clusters/{cluster_id}/api"), Some("token-xxxxx:nope")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = http.get(&format!("/k8s/clusters/{cluster_id}/api"), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = http.get("/k8s/clusters/c-zzzzz/api", Some(&alice)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = http.get("/k8s/clusters/C-..%2f/api", Some(&alice)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // A watch streams: the first event arrives before the apiserver sends the second.
        let req = Request::get(format!("/k8s/clusters/{cluster_id}/watch"))
            .header("host", "x")
            .header("authorization", format!("Bearer {alice}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = http.send_streaming(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = timeout(Duration::from_secs(5), body.frame()).await.expect("first event streamed").unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "event-1\n");
        apiserver.release_watch();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "event-2\n");

        // An upgrade (kubectl exec over SPDY) is spliced both ways.
        let req = Request::post(format!("/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods/p/exec?command=sh"))
            .header("host", "x")
            .header("authorization", format!("Bearer {alice}"))
            .header("connection", "Upgrade")
            .header("upgrade", "SPDY/3.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let mut resp = http.send_streaming(req).await;
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()["upgrade"], "SPDY/3.1");
        let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
        io.write_all(b"hello exec").await.unwrap();
        let mut buf = [0u8; 10];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HELLO EXEC");
        assert_eq!(apiserver.last().headers["impersonate-user"], "alice");

        // A websocket upgrade (kubectl >= 1.30 exec) too; its handshake headers pass through.
        let req = Request::get(format!("/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods/p/exec?command=sh"))
            .header("host", "x")
            .header("authorization", format!("Bearer {alice}"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "v5.channel.k8s.io")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let mut resp = http.send_streaming(req).await;
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let seen = apiserver.last();
        assert_eq!(seen.headers["sec-websocket-protocol"], "v5.channel.k8s.io");
        assert_eq!(seen.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(seen.headers["upgrade"], "websocket");
        let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
        io.write_all(b"ws bytes").await.unwrap();
        let mut buf = [0u8; 8];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"WS BYTES");

        // Metrics and audit lines.
        let metrics = server.metrics().await;
        assert!(metrics.contains(&format!("tunnel_server_proxied_requests_total{{kind=\"k8s\",target=\"{cluster_id}\",status=\"200\"}}")), "{metrics}");
        assert!(metrics.contains("tunnel_server_dials_total{result=\"ok\"}"), "{metrics}");
        assert!(
            metrics.contains("tunnel_server_dials_total{result=\"pooled\"}"),
            "{metrics}"
        );
        let log = server.log();
        assert!(log.contains("proxied request") && log.contains("user=alice"), "no audit line in:\n{log}");

        // Revoking alice's token makes it 401 at once.
        let tokens = http.api("GET", "/v1/tokens?user=alice", &admin, None).await.json();
        let id = tokens["items"][0]["id"].as_str().unwrap().to_owned();
        assert_eq!(http.api("DELETE", &format!("/v1/tokens/{id}"), &admin, None).await.status, StatusCode::NO_CONTENT);
        let r = http.get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&alice)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    })
    .await
    .expect("test exceeded its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_endpoint_statuses_and_messages_match_rancher() {
    timeout(BOUND, async {
        let dir = TempDir::new("auth");
        let server = ServerProc::start(dir.path());
        let (_, token, _) = add_cluster(dir.path(), "c1");
        let trust = Trust::CaBundle { pem: server.ca_pem().into_bytes(), with_system_roots: false };
        let refused = |r: Result<tunnel_proto::driver::Tunnel, ConnectError>| match r {
            Err(ConnectError::Handshake { status, body, .. }) => (status, body),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("tunnel accepted"),
        };
        let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
        let cases: Vec<(HeaderMap, u16, &str)> = vec![
            (HeaderMap::new(), 401, "failed authentication"),
            (agent_headers(&"b".repeat(54), &json!({})), 400, "cluster not found"),
            (agent_headers(&token, &json!({})), 400, "missing node or cluster registration info"),
            (agent_headers(&token, &json!({"node": {}})), 400, "invalid input, hostname empty"),
            (agent_headers(&token, &json!({"cluster": {}})), 400, "invalid input, address empty"),
            (agent_headers(&token, &json!({"cluster": {"address": "a:1"}})), 400, "invalid input, token empty"),
            (agent_headers(&token, &json!({"cluster": {"address": "a:1", "token": "t"}})), 400, "invalid input, caCert empty"),
            (agent_headers(&token, &json!({"node": {"requestedHostname": "node1"}})), 400, "node.management.cattle.io \"m-164546f60261\" not found"),
        ];
        for (headers, status, body) in cases {
            let (s, b) = refused(connect_agent(&server, "/v3/connect", headers, trust.clone(), None).await);
            println!("{s} {b:?}");
            assert_eq!((s, b.as_str()), (status, body));
        }
        let mut bad_b64 = HeaderMap::new();
        bad_b64.insert("x-api-tunnel-token", token.parse().unwrap());
        bad_b64.insert("x-api-tunnel-params", "!!!!".parse().unwrap());
        let (s, b) = refused(connect_agent(&server, "/v3/connect", bad_b64, trust.clone(), None).await);
        assert_eq!(s, 400);
        assert!(b.starts_with("illegal base64 data"), "{b}");
        let _ = b64;

        // Token rotation with the CLI: a new token registers, the revoked one is refused.
        let new_cmd = cli(dir.path(), &["cluster", "token", "c1", "--new"]);
        let new_token = new_cmd.trim().rsplit('/').next().unwrap().split('_').next().unwrap().to_owned();
        assert_ne!(new_token, token);
        let listed = cli(dir.path(), &["cluster", "token", "c1"]);
        assert_eq!(listed.lines().count(), 2, "{listed}");
        let cluster_params = json!({"cluster": {"address": "127.0.0.1:1", "token": "t", "caCert": "Y2E="}});
        connect_agent(&server, "/v3/connect", agent_headers(&new_token, &cluster_params), trust.clone(), None)
            .await
            .expect("the new token registers");
        cli(dir.path(), &["cluster", "token", "c1", "--revoke", &token]);
        let (s, b) = refused(connect_agent(&server, "/v3/connect", agent_headers(&token, &cluster_params), trust.clone(), None).await);
        assert_eq!((s, b.as_str()), (400, "cluster not found"));
        let token = new_token;

        // A node registers on /register (created), then connects on /v3/connect.
        let node = json!({"node": {"requestedHostname": "node1", "customConfig": {"address": "10.0.0.5"}}});
        let t = connect_agent(&server, "/v3/connect/register", agent_headers(&token, &node), trust.clone(), None).await.expect("node registers");
        // The server stores the node once the websocket is up (a registration token alone
        // writes nothing), so registration is over when the node is listed, not when the
        // handshake returns: a reconnect before that gets "not found" and retries.
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let http = server.client();
        eventually(Duration::from_secs(10), "the node stored", || async {
            let n = http.api("GET", "/v1/nodes", &admin, None).await.json();
            (n["items"].as_array().map(Vec::len) == Some(1)).then_some(())
        })
        .await;
        t.close();
        connect_agent(&server, "/v3/connect", agent_headers(&token, &node), trust.clone(), None).await.expect("node reconnects");
    })
    .await
    .expect("test exceeded its bound");
}
