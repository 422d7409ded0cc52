//! Forwarding between replicas (issue 18 points 1 and 2): two real `tunnel-server --store
//! kubernetes serve --peer-listen` processes on one REAL kube-apiserver, a cluster agent's
//! tunnel on replica A (a stand-in apiserver behind it: it echoes upgrades and shows the
//! headers it got), and the user talking to replica B:
//!
//! 1. B learns that A holds the tunnel, and A's peer address, from the Cluster's status
//!    through its watch: printed, and under 1 s after A's own view shows it;
//! 2. requests through B reach the cluster through A, as the user (`Impersonate-User`), with
//!    the agent's credentials; several in a row (pooled peer connections); exec-style upgrades
//!    (SPDY/3.1 and websocket) echo both ways across the hop; the same for a node agent's
//!    Docker API (a stand-in dockerd): `_ping` and an exec hijack (`Upgrade: tcp`);
//! 3. B authenticates and authorises: no token → 401, a user without a grant → 403, a forged
//!    forwarding header on the public listener → 401; the peer listener refuses a client
//!    without a certificate from the server's CA;
//! 4. one hop at most: with the status saying A holds a tunnel it no longer holds (as a replica
//!    killed without marking its tunnels down leaves it), B forwards once and A answers 503
//!    saying that a forwarded request is not forwarded again.
//!
//! Without the binaries: fails under `CI=true`, otherwise one SKIP line.

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;
#[path = "support/replicas.rs"]
mod replicas;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::json;
use server_side::store::kube::crd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use real_kube::RealKube;
use replicas::{KubeStore, start_kube};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_without_the_tunnel_forwards_to_the_one_with_it() {
    let dir = TempDir::new("kube-forwarding");
    let parent = dir.path().to_owned();
    let Some(kube) =
        tokio::task::spawn_blocking(move || start_kube("server-side kube_forwarding", &parent))
            .await
            .unwrap()
    else {
        return;
    };
    let kube = Arc::new(kube);
    timeout(Duration::from_secs(180), scenario(&dir, kube))
        .await
        .expect("the scenario took over 180 s");
}

async fn scenario(dir: &TempDir, kube: Arc<RealKube>) {
    let store = KubeStore::create(&kube, "forwarding");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let admin = store.add_admin(&dir_a, "root");
    let peer = ["--peer-listen", "127.0.0.1:0"];
    let a = store.replica(&dir_a, "replica-a", &peer);
    let b = store.replica(&dir_b, "replica-b", &peer);
    let a_peer = a.peer_addr.unwrap().to_string();
    let (on_a, on_b) = (a.client(), b.client());

    let (cluster_id, registration_token) = on_a.create_cluster(&admin, "far").await;
    let user = |name: &'static str| {
        let on_a = on_a.clone();
        let admin = admin.clone();
        async move {
            let reply = on_a
                .api("POST", "/v1/users", &admin, Some(json!({ "name": name })))
                .await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
            let created = reply.json();
            (
                created["user"]["id"].as_str().unwrap().to_owned(),
                created["value"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (alice_id, alice) = user("alice").await;
    let (_, bob) = user("bob").await;
    let grant = json!({ "userId": alice_id, "clusterId": cluster_id });
    let reply = on_a.api("POST", "/v1/grants", &admin, Some(grant)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);

    // === 1. B learns who holds the tunnel, and where that replica listens ===
    let apiserver = FakeApiserver::start().await;
    let agent = connect_cluster_agent(&a, &registration_token, &apiserver, "sa-secret").await;
    let presence = |server: HttpClient| {
        let (admin, cluster_id) = (admin.clone(), cluster_id.clone());
        async move {
            server
                .api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None)
                .await
                .json()["presence"]
                .clone()
        }
    };
    let on_a_view = eventually(Duration::from_secs(10), "the presence on A", || async {
        let p = presence(on_a.clone()).await;
        (p["connected"] == true).then_some(p)
    })
    .await;
    let a_saw = Instant::now();
    let on_b_view = eventually(Duration::from_secs(10), "the presence on B", || async {
        let p = presence(on_b.clone()).await;
        (p["connected"] == true).then_some(p)
    })
    .await;
    let lag = a_saw.elapsed();
    println!("1. A's view {on_a_view}; B's {lag:?} later: {on_b_view}");
    assert_eq!(on_b_view["replica"], "replica-a");
    assert_eq!(on_b_view["peer"], a_peer.as_str());
    assert!(
        lag < Duration::from_secs(1),
        "B learned the owner {lag:?} after A"
    );

    // === 2. through B, to the cluster through A's tunnel ===
    let version = format!("/k8s/clusters/{cluster_id}/version");
    let started = Instant::now();
    for _ in 0..5 {
        let reply = on_b.get(&version, Some(&alice)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(reply.body.contains("v1.30.0-fake"), "{}", reply.body);
    }
    println!("2. 5 GETs through B → A: {:?}", started.elapsed());
    let seen = apiserver.last();
    assert_eq!(seen.path, "/version");
    assert_eq!(seen.headers["impersonate-user"], "alice");
    assert_eq!(seen.headers["authorization"], "Bearer sa-secret");
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.as_str().starts_with("x-tunnel-server-")),
        "forwarding headers reached the cluster: {:?}",
        seen.headers
    );
    // A's audit line names the forwarding replica.
    assert!(
        a.log().contains("alice (via replica-b)"),
        "A's log has no forwarded request:\n{}",
        a.log()
    );
    for protocol in ["SPDY/3.1", "websocket"] {
        let echoed = upgrade_through(
            &on_b,
            &format!("/k8s/clusters/{cluster_id}/api/v1/namespaces/default/pods/p/exec?command=sh"),
            &alice,
            protocol,
        )
        .await;
        assert_eq!(echoed, "HELLO ACROSS THE HOP", "{protocol}");
        let seen = apiserver.last();
        assert_eq!(seen.headers["upgrade"], protocol);
        assert_eq!(seen.headers["impersonate-user"], "alice");
    }
    println!("2. SPDY/3.1 and websocket upgrades through B → A echo both ways");

    // === 3. authentication and authorisation on B; the peer listener wants a CA certificate ===
    assert_eq!(
        on_b.get(&version, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = on_b.get(&version, Some(&bob)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let forged = on_b
        .request(
            "GET",
            &version,
            &[
                ("x-tunnel-server-forwarded-user", alice_id.as_str()),
                ("x-tunnel-server-forwarded-by", "replica-a"),
            ],
            None,
        )
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{}", forged.body);
    let refused = without_client_certificate(a.peer_addr.unwrap(), &a.ca_pem(), &version).await;
    println!(
        "3. 401 without a token, 403 without a grant, 401 with forged headers; peer listener without a client certificate: {refused}"
    );

    // === 2b. the Docker API of a node whose agent is on A, through B ===
    let dockerd = FakeDockerd::start(dir.path());
    let node_id = "m-164546f60261"; // md5("node1")
    let _node_agent = connect_agent(
        &a,
        "/v3/connect/register",
        agent_headers(
            &registration_token,
            &json!({"node": {"requestedHostname": "node1"}}),
        ),
        a.trust(),
        Some(dockerd.socket.clone()),
    )
    .await
    .unwrap();
    let ping = format!("/docker/nodes/{node_id}/_ping");
    // B forwards once its watch has the node's presence.
    let reply = eventually(Duration::from_secs(10), "docker ping through B", || async {
        let reply = on_b.get(&ping, Some(&alice)).await;
        (reply.status == StatusCode::OK).then_some(reply)
    })
    .await;
    assert_eq!(reply.body, "OK");
    let req = Request::post(format!("/docker/nodes/{node_id}/v1.41/exec/abc/start"))
        .header("host", "x")
        .header("authorization", format!("Bearer {alice}"))
        .header("connection", "Upgrade")
        .header("upgrade", "tcp")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = on_b.send_streaming(req).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ls -l\n").await.unwrap();
    let mut buf = [0u8; 6];
    timeout(Duration::from_secs(10), io.read_exact(&mut buf))
        .await
        .expect("no echo from dockerd within 10 s")
        .unwrap();
    assert_eq!(&buf, b"LS -L\n");
    println!("2b. docker _ping and an exec hijack (Upgrade: tcp) through B → A's node tunnel");

    // === 4. one hop: a stale status names A, which no longer holds the tunnel ===
    agent.close();
    eventually(
        Duration::from_secs(10),
        "the tunnel gone on B's view",
        || async { (presence(on_b.clone()).await["connected"] == false).then_some(()) },
    )
    .await;
    let now = chrono_like_now();
    let stale = json!({ "status": {
        "conditions": [{ "type": "Connected", "status": "True", "lastTransitionTime": now,
                         "reason": "TunnelUp", "message": "stale, written by the test" }],
        "replica": "replica-a",
        "peer": a_peer,
    }});
    kube.kubectl(&[
        "-n",
        &store.namespace,
        "patch",
        &format!("clusters.{}", crd::GROUP),
        &cluster_id,
        "--subresource=status",
        "--type=merge",
        "-p",
        &stale.to_string(),
    ]);
    eventually(Duration::from_secs(10), "the stale status on B", || async {
        (presence(on_b.clone()).await["connected"] == true).then_some(())
    })
    .await;
    let reply = on_b.get(&version, Some(&alice)).await;
    println!(
        "4. through B with a stale owner: {} {}",
        reply.status,
        reply.body.trim()
    );
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("replica replica-b forwarded")
            && reply.body.contains("is not forwarded again"),
        "{}",
        reply.body
    );
    // Straight to A (which reads the status as its own): the usual 503, no forwarding.
    let reply = on_a.get(&version, Some(&alice)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert!(reply.body.contains("not connected"), "{}", reply.body);
    drop((a, b));
}

/// An upgrade request through `server`; after the `101`, writes a line and returns what comes
/// back (the stand-in apiserver upper-cases it).
async fn upgrade_through(server: &HttpClient, path: &str, token: &str, protocol: &str) -> String {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", server.addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("connection", "Upgrade")
        .header("upgrade", protocol)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = server.send_streaming(req).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS, "{protocol}");
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let sent = b"hello across the hop";
    io.write_all(sent).await.unwrap();
    io.flush().await.unwrap();
    let mut got = vec![0u8; sent.len()];
    timeout(Duration::from_secs(10), io.read_exact(&mut got))
        .await
        .expect("no echo within 10 s")
        .unwrap();
    String::from_utf8(got).unwrap()
}

/// A request to a peer listener over TLS that trusts its CA but presents no client
/// certificate: it must get no HTTP answer. Returns how it failed.
async fn without_client_certificate(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
) -> String {
    let tls = client_tls(ca_pem.as_bytes());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = match tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    {
        Ok(conn) => conn,
        Err(err) => return format!("handshake failed: {err}"),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: peer\r\nx-tunnel-server-forwarded-by: x\r\nx-tunnel-server-forwarded-user: y\r\n\r\n"
    );
    let _ = conn.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let read = timeout(Duration::from_secs(10), conn.read_to_end(&mut buf))
        .await
        .expect("the peer listener neither answered nor closed in 10 s");
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/1.1"),
        "the peer listener answered a client without a certificate: {}",
        String::from_utf8_lossy(&buf)
    );
    match read {
        Ok(_) => "closed without an answer".to_owned(),
        Err(err) => format!("refused: {err}"),
    }
}

/// RFC 3339 UTC of now, second precision.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .unwrap()
        .to_string()
}
