//! The failed-authentication rate limit on `/v3/connect`, against the real `tunnel-server
//! serve` (burst 10, 0.2 tokens per second, so a refused address waits up to 5 s): ten wrong
//! websocket attempts get Rancher's answers, the next ones are refused before any lookup, an
//! agent whose token was accepted before still connects while one whose token the server has
//! not seen yet waits like everyone else, one log line per address and window, the metrics, and
//! normal answers once a token has refilled.
//!
//! The refusal is a 429 with `Retry-After` and a text naming the wait.

mod support;

use std::time::Duration;

use http::HeaderMap;
use serde_json::json;
use tokio::time::{Instant, timeout};
use tunnel_proto::driver::connector::{ConnectError, Trust};

use support::*;

const BOUND: Duration = Duration::from_secs(60);
const LOG_LINE: &str = "too many failed tunnel authentications";

fn refused(r: Result<tunnel_proto::driver::Tunnel, ConnectError>) -> (u16, String) {
    match r {
        Err(ConnectError::Handshake { status, body, .. }) => (status, body),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("tunnel accepted"),
    }
}

/// `retry after Ns` in a refusal's text.
fn retry_after(body: &str) -> u64 {
    body.rsplit_once("retry after ")
        .and_then(|(_, s)| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no wait in {body:?}"))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_rate_limited_per_address() {
    timeout(BOUND, async {
        let dir = TempDir::new("authlimit");
        let server = ServerProc::start_with(
            dir.path(),
            &["--auth-failure-burst", "10", "--auth-failure-refill", "0.2"],
        );
        let (_, token, _) = add_cluster(dir.path(), "known");
        let (_, unseen_token, _) = add_cluster(dir.path(), "unseen");
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let cluster = json!({"cluster": {"address": "127.0.0.1:1", "token": "t", "caCert": "Y2E="}});
        let attempt = |headers: HeaderMap| connect_agent(&server, "/v3/connect", headers, trust.clone(), None);

        // An agent connects before the flood: its token is now known good.
        let first = attempt(agent_headers(&token, &cluster)).await.expect("agent connects");
        first.close();

        // Ten wrong attempts from 127.0.0.1 get Rancher's answers.
        let mut stv_unknown = HeaderMap::new();
        stv_unknown.insert("authorization", "Bearer stv-cluster-nosuchtoken".parse().unwrap());
        let started = Instant::now();
        for i in 0..10 {
            let (headers, want) = match i % 3 {
                0 => (HeaderMap::new(), (401, "failed authentication")),
                1 => (agent_headers(&"b".repeat(54), &cluster), (400, "cluster not found")),
                _ => (stv_unknown.clone(), (401, "failed authentication")),
            };
            let (status, body) = refused(attempt(headers).await);
            println!("wrong attempt {}: {status} {body:?}", i + 1);
            assert_eq!((status, body.as_str()), want);
        }
        println!("10 failures in {:?}", started.elapsed());

        // The 11th is refused before any lookup, with a clear text and the wait.
        let (status, body) = refused(attempt(agent_headers(&"c".repeat(54), &cluster)).await);
        println!("11th: {status} {body:?}");
        assert_eq!(status, 429);
        assert!(body.starts_with("too many failed authentications from 127.0.0.1: retry after "), "{body}");
        let wait = retry_after(&body);
        assert!((1..=5).contains(&wait), "{body}");
        // A plain request sees the same (the limit comes before the websocket checks).
        let plain = server.client().get("/v3/connect", None).await;
        println!("plain GET: {} {:?} retry-after header: {:?}", plain.status, plain.body, plain.headers.get("retry-after"));
        assert_eq!(plain.status, 429);
        assert!(plain.body.starts_with("too many failed authentications"), "{}", plain.body);
        let header: u64 = plain.headers.get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
        assert!((1..=wait).contains(&header), "Retry-After {header}, body said {wait}");

        // NAT: an agent whose token was accepted before still connects (it skips the limit,
        // not the checks); a correct token the server has not accepted yet cannot be told from
        // a guess without a lookup, so it waits like everyone else at this address.
        attempt(agent_headers(&token, &cluster)).await.expect("known agent connects while the address is limited").close();
        let node = json!({"node": {"requestedHostname": "node-behind-nat"}});
        connect_agent(&server, "/v3/connect/register", agent_headers(&token, &node), trust.clone(), None)
            .await
            .expect("a node agent of the known cluster registers while the address is limited")
            .close();
        let (status, body) = refused(attempt(agent_headers(&unseen_token, &cluster)).await);
        println!("unseen correct token while limited: {status} {body:?}");
        assert_eq!(status, 429);
        assert!(body.starts_with("too many failed authentications"), "{body}");

        // Metrics: 4 without credentials, 6 unknown tokens (3 registration, 3 stv bearer), 3
        // refusals.
        let metrics = server.metrics().await;
        let missing = metric(&metrics, "tunnel_server_agent_auth_failures_total{reason=\"missing_credentials\"}");
        let unknown = metric(&metrics, "tunnel_server_agent_auth_failures_total{reason=\"unknown_token\"}");
        let limited = metric(&metrics, "tunnel_server_agent_auth_rate_limited_total");
        println!("metrics: missing_credentials={missing} unknown_token={unknown} rate_limited={limited} addresses={}",
            metric(&metrics, "tunnel_server_auth_limit_addresses"));
        assert_eq!((missing, unknown, limited), (4, 6, 3));
        assert_eq!(metric(&metrics, "tunnel_server_auth_limit_addresses"), 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the limited phase took {:?}: a token may have refilled meanwhile",
            started.elapsed()
        );

        // One log line for all three refusals.
        let log = server.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(LOG_LINE)).collect();
        println!("log: {lines:#?}");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].contains("remote=127.0.0.1") && lines[0].contains("refused=1"), "{}", lines[0]);
        assert_eq!(log.matches("tunnel request failed authentication").count(), 7);

        // Once the wait is over: answered normally (one token's worth), then refused again.
        let waited = Instant::now();
        tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(300)).await;
        attempt(agent_headers(&unseen_token, &cluster)).await.expect("the other cluster's agent connects").close();
        let (status, body) = refused(attempt(agent_headers(&"d".repeat(54), &cluster)).await);
        println!("after {:?}: {status} {body:?}", waited.elapsed());
        assert_eq!((status, body.as_str()), (400, "cluster not found"));
        let (status, body) = refused(attempt(HeaderMap::new()).await);
        println!("and then: {status} {body:?}");
        assert!(body.starts_with("too many failed authentications"), "{body}");
        // Still one line: the address is logged once per minute.
        assert_eq!(server.log().matches(LOG_LINE).count(), 1);
    })
    .await
    .expect("test exceeded its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_user_api_tokens_share_the_limit() {
    timeout(BOUND, async {
        let dir = TempDir::new("userlimit");
        let server = ServerProc::start_with(
            dir.path(),
            &["--auth-failure-burst", "5", "--auth-failure-refill", "0.2"],
        );
        let http = server.client();
        let known = add_user(dir.path(), "known", &["--admin"]);
        let unseen = add_user(dir.path(), "unseen", &["--admin"]);
        let (cluster_id, _, _) = add_cluster(dir.path(), "c1");
        cli(dir.path(), &["grant", "known", "c1"]);

        // A user whose token worked before the flood.
        assert_eq!(http.get("/v1/clusters", Some(&known)).await.status, 200);

        // Missing tokens guess nothing and are not counted; invalid ones are, on every route.
        for _ in 0..8 {
            assert_eq!(http.get("/v1/clusters", None).await.status, 401);
        }
        let started = Instant::now();
        let routes = [
            "/v1/clusters".to_owned(),
            format!("/k8s/clusters/{cluster_id}/api"),
            "/docker/nodes/m-x/_ping".to_owned(),
        ];
        for i in 0..5 {
            let r = http.get(&routes[i % 3], Some("not-a-token")).await;
            println!("invalid token {}: {} {}", i + 1, r.status, r.body);
            assert_eq!(r.status, 401, "{}", r.body);
        }
        let r = http.get("/v1/clusters", Some("not-a-token")).await;
        let after: u64 = r
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse().unwrap())
            .unwrap_or(0);
        println!("6th: {} {:?} Retry-After {after}", r.status, r.body);
        assert_eq!(r.status, 429);
        assert!(
            r.body
                .starts_with("too many failed authentications from 127.0.0.1"),
            "{}",
            r.body
        );
        assert!((1..=5).contains(&after), "Retry-After {after}");

        // The known user goes on; an unseen valid token waits like everyone else here; the
        // tunnel endpoint shares the budget.
        let r = http
            .get(&format!("/k8s/clusters/{cluster_id}/api"), Some(&known))
            .await;
        println!("known user while limited: {} {}", r.status, r.body);
        assert_eq!(r.status, 503, "past the limit (no agent): {}", r.body);
        let r = http.get("/v1/clusters", Some(&unseen)).await;
        println!(
            "unseen valid token while limited: {} {:?}",
            r.status, r.body
        );
        assert_eq!(r.status, 429);
        assert_eq!(http.get("/v3/connect", None).await.status, 429);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a token may have refilled: {:?}",
            started.elapsed()
        );

        let metrics = server.metrics().await;
        let failures = metric(&metrics, "tunnel_server_user_auth_failures_total");
        let limited = metric(&metrics, "tunnel_server_user_auth_rate_limited_total");
        println!("metrics: user_auth_failures={failures} user_auth_rate_limited={limited}");
        assert_eq!((failures, limited), (5, 2));

        // After the wait: answered normally again.
        tokio::time::sleep(Duration::from_secs(after) + Duration::from_millis(300)).await;
        let r = http.get("/v1/clusters", Some(&unseen)).await;
        println!("after {after}s: unseen valid token -> {}", r.status);
        assert_eq!(r.status, 200);
    })
    .await
    .expect("test exceeded its bound");
}
