//! Limits that hold against a real server process:
//! * unauthenticated requests with made-up cluster and node ids leave `/metrics` and the
//!   server's memory flat, and `/metrics` itself needs an admin token (or `--metrics-listen`);
//! * a request that only carries a registration token changes nothing stored, and a second
//!   session cannot repoint a connected cluster;
//! * guessing the token of an import URL costs like any failed authentication;
//! * a node of one cluster cannot shadow another cluster's node, new nodes per cluster are
//!   rate limited and params are bounded.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

const BOUND: Duration = Duration::from_secs(300);

fn trust(server: &ServerProc) -> Trust {
    Trust::CaBundle {
        pem: server.ca_pem().into_bytes(),
        with_system_roots: false,
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sends `count` requests without credentials to random `/k8s/clusters/<id>` and
/// `/docker/nodes/<id>` paths over `connections` keep-alive connections.
async fn random_id_requests(http: &HttpClient, count: usize, connections: usize, seed: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let http = http.clone();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(c as u64 + 1)
            | 1;
        let share = count / connections + usize::from(c < count % connections);
        tasks.spawn(async move {
            let io = http.connect().await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .unwrap();
            tokio::spawn(conn);
            for i in 0..share {
                // xorshift64: a fresh id for every request.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let path = if i % 2 == 0 {
                    format!("/k8s/clusters/c-{state:016x}/api")
                } else {
                    format!("/docker/nodes/m-{state:016x}/_ping")
                };
                let req = Request::get(path)
                    .header("host", "x")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                resp.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ids_leave_metrics_and_memory_flat_and_metrics_need_an_admin() {
    timeout(BOUND, async {
        let dir = TempDir::new("metrics-flat");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let pid = server.child.id();

        // /metrics: 401 without a token, 403 for a user, 200 for an admin and on the
        // separate listener.
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let alice = add_user(dir.path(), "alice", &[]);
        assert_eq!(http.get("/metrics", None).await.status, StatusCode::UNAUTHORIZED);
        assert_eq!(http.get("/metrics", Some(&alice)).await.status, StatusCode::FORBIDDEN);
        let m = http.get("/metrics", Some(&admin)).await;
        assert_eq!(m.status, StatusCode::OK);
        assert!(m.body.contains("tunnel_server_sessions "), "{}", m.body);
        assert!(server.metrics().await.contains("tunnel_server_sessions "));

        let started = std::time::Instant::now();
        random_id_requests(&http, 10_000, 4, 1).await;
        let warm = server.metrics().await;
        let rss_warm = rss_kib(pid);
        random_id_requests(&http, 90_000, 4, 2).await;
        let after = server.metrics().await;
        let rss_after = rss_kib(pid);
        let took = started.elapsed();
        let series = |m: &str| m.lines().filter(|l| l.starts_with("tunnel_server_proxied_requests_total{")).count();
        println!(
            "100000 requests with random ids in {took:.1?}: /metrics {} -> {} bytes, {} -> {} request series; server RSS {rss_warm} -> {rss_after} KiB ({:+} KiB)",
            warm.len(),
            after.len(),
            series(&warm),
            series(&after),
            rss_after as i64 - rss_warm as i64
        );
        for line in after.lines().filter(|l| l.starts_with("tunnel_server_proxied_requests_total{")) {
            println!("  {line}");
        }
        assert_eq!(series(&after), 2, "one series per kind for every unknown id");
        assert!(after.contains(r#"tunnel_server_proxied_requests_total{kind="k8s",target="unknown",status="401"} 50000"#));
        // The counters' digits may grow; nothing else.
        assert!(after.len() <= warm.len() + 16, "/metrics grew: {} -> {}", warm.len(), after.len());
        assert!(
            rss_after <= rss_warm + 8 * 1024,
            "server RSS grew by {} KiB over 90000 requests",
            rss_after - rss_warm
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_token_alone_changes_nothing_stored() {
    timeout(BOUND, async {
        let dir = TempDir::new("params-rewrite");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let (cluster_id, token, _) = add_cluster(dir.path(), "prod");
        let apiserver = FakeApiserver::start().await;
        let genuine = apiserver.cluster_params("sa");
        let forged = json!({ "cluster": { "address": "10.9.9.9:443", "caCert": "Zm9yZ2Vk", "token": "forged" } });
        let endpoint = || async {
            let c = http.api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None).await.json();
            (c["apiEndpoint"].clone(), c["tunnel"] == true)
        };
        let plain = |params: serde_json::Value| {
            let http = http.clone();
            let token = token.clone();
            async move {
                let b64 = data_encoding::BASE64.encode(params.to_string().as_bytes());
                http.request("GET", "/v3/connect/register", &[("x-api-tunnel-token", &token), ("x-api-tunnel-params", &b64)], None).await
            }
        };

        // Nothing stored before an agent's websocket is up.
        let r = plain(genuine.clone()).await;
        println!("plain request with the token and params: {} {:?}", r.status, r.body);
        assert_eq!(endpoint().await.0, serde_json::Value::Null, "a plain request stored params");

        let agent = connect_agent(&server, "/v3/connect/register", agent_headers(&token, &genuine), trust(&server), None)
            .await
            .unwrap();
        let genuine_endpoint = format!("https://{}", apiserver.addr);
        eventually(Duration::from_secs(10), "endpoint stored", || async {
            let (e, connected) = endpoint().await;
            (connected && e == genuine_endpoint.as_str()).then_some(())
        })
        .await;

        // While the agent is connected: a plain request and a real second session with other
        // params are both refused, and change nothing.
        let r = plain(forged.clone()).await;
        println!("plain request with forged params while connected: {} {:?}", r.status, r.body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.body.contains("live agent session"), "{}", r.body);
        let second = dial_agent(&server, "/v3/connect", agent_headers(&token, &forged), trust(&server), allow_all()).await;
        println!("second session with forged params: {:?}", second.as_ref().err());
        assert!(second.is_err(), "a session with forged params was accepted");
        assert_eq!(endpoint().await.0, genuine_endpoint.as_str());

        // Once the agent is gone, a plain request still changes nothing...
        agent.close();
        eventually(Duration::from_secs(10), "agent gone", || async { (!endpoint().await.1).then_some(()) }).await;
        let r = plain(forged.clone()).await;
        println!("plain request with forged params, no agent: {} {:?}", r.status, r.body);
        assert_eq!(endpoint().await.0, genuine_endpoint.as_str(), "a plain request repointed the cluster");

        // ...and a real session that reports a new address changes it, with an audit line.
        let _moved = connect_agent(&server, "/v3/connect", agent_headers(&token, &forged), trust(&server), None)
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "new endpoint stored", || async {
            (endpoint().await.0 == "https://10.9.9.9:443").then_some(())
        })
        .await;
        let log = server.log();
        let audit = log
            .lines()
            .find(|l| l.contains("cluster agent report changed") && l.contains("new_address=https://10.9.9.9:443"))
            .unwrap_or_else(|| panic!("no audit line for the change:\n{log}"));
        println!("audit: {audit}");
        assert!(audit.contains(&format!("old_address={genuine_endpoint}")), "{audit}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_an_import_token_is_rate_limited() {
    timeout(BOUND, async {
        let dir = TempDir::new("import-limit");
        let server = ServerProc::start_with(
            dir.path(),
            &["--auth-failure-burst", "5", "--auth-failure-refill", "0.01"],
        );
        let http = server.client();
        let (cluster_id, token, _) = add_cluster(dir.path(), "prod");
        let good = format!("/v3/import/{token}_{cluster_id}.yaml");
        assert_eq!(http.get(&good, None).await.status, StatusCode::OK);
        let mut statuses = Vec::new();
        for i in 0..8 {
            let guess = format!("/v3/import/{}{i}_{cluster_id}.yaml", "x".repeat(53));
            statuses.push(http.get(&guess, None).await.status.as_u16());
        }
        println!("8 guessed import URLs: {statuses:?}");
        assert_eq!(statuses, [400, 400, 400, 400, 400, 429, 429, 429]);
        // The known-good URL still works from the same address.
        assert_eq!(http.get(&good, None).await.status, StatusCode::OK);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_cannot_shadow_other_clusters_nodes_and_registration_is_bounded() {
    timeout(BOUND, async {
        let dir = TempDir::new("node-shadow");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let bob = add_user(dir.path(), "bob", &[]);
        let (a_id, a_token, _) = add_cluster(dir.path(), "a");
        let (b_id, b_token, _) = add_cluster(dir.path(), "b");
        cli(dir.path(), &["grant", "bob", "b"]);
        let node = json!({ "node": { "requestedHostname": "shared-host" } });

        let _a_node = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&a_token, &node),
            trust(&server),
            None,
        )
        .await
        .unwrap();
        let machine = eventually(Duration::from_secs(10), "node of a", || async {
            let n = http.api("GET", "/v1/nodes", &admin, None).await.json();
            n["items"][0]["id"].as_str().map(str::to_owned)
        })
        .await;
        // Cluster b's token registers a node of the same host name later.
        let _b_node = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&b_token, &node),
            trust(&server),
            None,
        )
        .await
        .unwrap();
        eventually(Duration::from_secs(10), "node of b", || async {
            let n = http.api("GET", "/v1/nodes", &admin, None).await.json();
            (n["items"].as_array().is_some_and(|i| i.len() == 2)).then_some(())
        })
        .await;
        let bare = http
            .api("GET", &format!("/v1/nodes/{machine}"), &admin, None)
            .await
            .json();
        println!(
            "bare {machine}: cluster {} (a is {a_id}), ref {}",
            bare["clusterId"], bare["ref"]
        );
        assert_eq!(
            bare["clusterId"],
            a_id.as_str(),
            "the later node of b shadows a's"
        );
        let qualified = http
            .api("GET", &format!("/v1/nodes/{b_id}:{machine}"), &admin, None)
            .await
            .json();
        assert_eq!(qualified["clusterId"], b_id.as_str());
        assert_eq!(qualified["ref"], format!("{b_id}:{machine}").as_str());
        // Bob (granted b only) reaches b's node by its reference, not a's by the bare name.
        let r = http
            .get(&format!("/docker/nodes/{machine}/_ping"), Some(&bob))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        let r = http
            .get(&format!("/docker/nodes/{b_id}:{machine}/_ping"), Some(&bob))
            .await;
        println!("bob on {b_id}:{machine}: {} {:?}", r.status, r.body);
        assert_ne!(r.status, StatusCode::FORBIDDEN);
        assert_ne!(r.status, StatusCode::NOT_FOUND);

        // At most 60 new nodes per cluster per minute (two exist in b's budget: one).
        let mut refused = None;
        for i in 0..62 {
            let params = json!({ "node": { "requestedHostname": format!("flood-{i}") } });
            let b64 = data_encoding::BASE64.encode(params.to_string().as_bytes());
            let r = http
                .request(
                    "GET",
                    "/v3/connect/register",
                    &[
                        ("x-api-tunnel-token", &b_token),
                        ("x-api-tunnel-params", &b64),
                    ],
                    None,
                )
                .await;
            if r.body.contains("new nodes in the last minute") {
                refused = Some((i, r.status, r.body));
                break;
            }
        }
        let (i, status, body) = refused.expect("62 new nodes in a minute were not refused");
        println!("registration {i} refused: {status} {body:?}");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            i, 59,
            "b had registered one node: the 60th new one is the last"
        );

        // Params are bounded.
        let big = json!({ "node": { "requestedHostname": "big", "labels": "x".repeat(40_000) } });
        let b64 = data_encoding::BASE64.encode(big.to_string().as_bytes());
        let r = http
            .request(
                "GET",
                "/v3/connect/register",
                &[
                    ("x-api-tunnel-token", &a_token),
                    ("x-api-tunnel-params", &b64),
                ],
                None,
            )
            .await;
        println!("{} bytes of params: {} {:?}", b64.len(), r.status, r.body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.body.contains("at most"), "{}", r.body);
    })
    .await
    .expect("test timed out");
}

/// Connects over TLS from `local` (a loopback address), or says why not: a connection over a
/// limit is closed at accept, so its TLS handshake fails.
async fn tls_from(
    server: &ServerProc,
    local: std::net::IpAddr,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(local, 0)).unwrap();
    let tcp = socket.connect(server.addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(server.ca_pem().as_bytes()));
    timeout(Duration::from_secs(10), tls.connect(name, tcp))
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_bounded_and_cut_by_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    timeout(BOUND, async {
        let dir = TempDir::new("slowloris");
        let server = ServerProc::start_with(
            dir.path(),
            &["--max-connections", "700", "--max-connections-per-peer", "600", "--header-read-timeout", "12"],
        );
        let pid = server.child.id();
        let rss_idle = rss_kib(pid);

        // 1,000 connections: 900 from 127.0.0.1 (600 fit its per-address limit), 100 from
        // 127.0.0.2 (all fit: with them the listener holds its 700).
        let mut held = Vec::new();
        let mut refused = [0usize; 2];
        let started = std::time::Instant::now();
        for (i, (local, count)) in [("127.0.0.1", 900), ("127.0.0.2", 100)].into_iter().enumerate() {
            for _ in 0..count {
                match tls_from(&server, local.parse().unwrap()).await {
                    Some(mut tls) => {
                        // The first header byte.
                        tls.write_all(b"G").await.unwrap();
                        tls.flush().await.unwrap();
                        held.push(tls);
                    }
                    None => refused[i] += 1,
                }
            }
        }
        let connected_in = started.elapsed();
        let rss_full = rss_kib(pid);
        println!(
            "1000 slow connections in {connected_in:.1?}: {} held, refused {} from 127.0.0.1 (per-address limit 600) and {} from 127.0.0.2 (listener limit 700); server RSS {rss_idle} -> {rss_full} KiB ({} KiB per held connection)",
            held.len(),
            refused[0],
            refused[1],
            (rss_full.saturating_sub(rss_idle)) / held.len().max(1) as u64
        );
        assert_eq!(held.len(), 700);
        assert_eq!(refused, [300, 0]);
        // Over the listener limit: one more from a third address is refused too.
        assert!(tls_from(&server, "127.0.0.3".parse().unwrap()).await.is_none());
        assert!(rss_full < rss_idle + 128 * 1024, "server RSS {rss_idle} -> {rss_full} KiB");

        // A header byte every 10 s: the 12 s header timeout cuts every one of them.
        tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
        let mut still_open = 0;
        for tls in &mut held {
            if tls.write_all(b"E").await.is_ok() && tls.flush().await.is_ok() {
                still_open += 1;
            }
        }
        println!("after 10 s: {still_open} connections took a second header byte");
        let mut cut_after = Vec::new();
        for mut tls in held {
            let mut buf = [0u8; 256];
            // The server closes (EOF, or an error after a 408 it may send): never data
            // beyond that.
            let read = timeout(Duration::from_secs(20), async {
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(read.is_ok(), "a slow connection is still open 20 s after its 10th second");
            cut_after.push(started.elapsed());
        }
        let last = cut_after.iter().max().unwrap();
        let rss_after = rss_kib(pid);
        println!("all 700 cut by {last:.1?} after they started (header timeout 12 s); server RSS {rss_after} KiB");
        assert!(*last >= Duration::from_secs(11), "cut before the header timeout: {last:?}");
        // Their places are free again.
        assert!(tls_from(&server, "127.0.0.3".parse().unwrap()).await.is_some());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_bodies_are_bounded() {
    timeout(BOUND, async {
        let dir = TempDir::new("body-limit");
        let server = ServerProc::start(dir.path());
        let admin = add_user(dir.path(), "root", &["--admin"]);
        // A body over the 1 MiB bound: the server answers 413 as soon as the bound is
        // crossed, so the client sends exactly one byte more than the bound (all of which the
        // server reads) and never writes into a connection the server has answered and closed.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const MAX_BODY: usize = 1 << 20;
        let read_head = |mut io: Box<dyn Io>| async move {
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            timeout(Duration::from_secs(45), async {
                while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await
            .expect("no answer within 45 s");
            String::from_utf8_lossy(&answer).into_owned()
        };
        let mut io = server.client().connect().await;
        let head = format!(
            "POST /v1/users HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            2 * MAX_BODY
        );
        io.write_all(head.as_bytes()).await.unwrap();
        io.write_all(&vec![b' '; MAX_BODY + 1]).await.unwrap();
        io.flush().await.unwrap();
        let answer = read_head(io).await;
        let status = answer.lines().next().unwrap_or_default().to_owned();
        println!("a body over 1 MiB: {status:?}");
        assert!(status.starts_with("HTTP/1.1 413"), "{answer}");

        // A body that stops arriving: 408 after the 30 s body timeout, not a held task.
        let mut io = server.client().connect().await;
        let head = format!(
            "POST /v1/users HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"name\":"
        );
        io.write_all(head.as_bytes()).await.unwrap();
        io.flush().await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_head(io).await;
        let status = answer.lines().next().unwrap_or_default().to_owned();
        println!("body stopped after 9 of 100 bytes: {status:?} after {:.1?}", started.elapsed());
        assert!(status.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() >= Duration::from_secs(29));
    })
    .await
    .expect("test timed out");
}
