//! The acceptor: upgrades at its mount paths, sends every other path to the router, answers a
//! mount path with the authorizer's 401/400 before any websocket check (wire spec §1.2), then
//! gorilla's websocket checks, and shuts down gracefully.

mod connector_support;

use std::time::Duration;

use connector_support::*;
use http::HeaderMap;
use tokio::net::TcpStream;
use tunnel_proto::driver::connector::{Connector, ConnectorConfig};

const WS_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n\
                          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn request(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n")
}

#[tokio::test]
async fn upgrade_works_at_every_mount_path() {
    bounded(async {
        let mut server = spawn_server(None).await;
        for path in MOUNTS {
            let mut cfg = ConnectorConfig::new(format!("ws://{}{path}?x=1", server.addr));
            let mut headers = HeaderMap::new();
            headers.insert(TOKEN_HEADER, GOOD_TOKEN.parse().unwrap());
            cfg.set_headers(headers);
            let mut ws = Connector::new(cfg).unwrap().connect().await.expect(path);
            echo_roundtrip(&mut ws).await;
            let seen = server.seen.recv().await.unwrap();
            println!("{path}: {seen:?}");
            assert_eq!(seen.path, path);
            assert_eq!(seen.client_key, "agent-1");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn other_paths_reach_the_router() {
    bounded(async {
        let server = spawn_server(None).await;
        let r = raw_http(server.addr, &request("GET", "/ping", "")).await;
        println!("/ping -> {} {:?}", r.status, r.body);
        assert_eq!((r.status, r.body.as_str()), (200, "pong"));
        // Near-misses of a mount path are not mount paths.
        for path in ["/v3/connect/", "/v3/connectx", "/v3"] {
            let r = raw_http(server.addr, &request("GET", path, WS_HEADERS)).await;
            println!("{path} -> {} {:?}", r.status, r.body);
            assert_eq!((r.status, r.body.as_str()), (404, "no route"));
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn authorizer_answers_before_websocket_checks() {
    bounded(async {
        let server = spawn_server(None).await;
        let token = |t: &str| format!("{TOKEN_HEADER}: {t}\r\n");
        let cases = [
            // A plain GET (no upgrade headers) gets the authorizer's answer first.
            (request("GET", "/v3/connect", ""), 401, "failed authentication"),
            (request("POST", "/v3/connect", ""), 401, "failed authentication"),
            (
                request("GET", "/v3/connect", &token(BAD_REQUEST_TOKEN)),
                400,
                "cluster not found",
            ),
            // Authorized, then gorilla's checks in gorilla's order.
            (
                request("GET", "/v3/connect", &token(GOOD_TOKEN)),
                400,
                "'upgrade' token not found in 'Connection' header",
            ),
            (
                request(
                    "GET",
                    "/v3/connect",
                    &format!("{}Connection: upgrade\r\n", token(GOOD_TOKEN)),
                ),
                426,
                "'websocket' token not found in 'Upgrade' header",
            ),
            (
                request("POST", "/v3/connect", &format!("{}{WS_HEADERS}", token(GOOD_TOKEN))),
                405,
                "request method is not GET",
            ),
            (
                request(
                    "GET",
                    "/v3/connect",
                    &format!(
                        "{}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n",
                        token(GOOD_TOKEN)
                    ),
                ),
                400,
                "unsupported version",
            ),
            (
                request(
                    "GET",
                    "/v3/connect",
                    &format!(
                        "{}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                         Sec-WebSocket-Key: short\r\n",
                        token(GOOD_TOKEN)
                    ),
                ),
                400,
                "Sec-WebSocket-Key",
            ),
        ];
        for (req, status, body) in cases {
            let r = raw_http(server.addr, &req).await;
            println!(
                "{} -> {} {:?}",
                req.lines().next().unwrap_or_default(),
                r.status,
                r.body
            );
            assert_eq!(r.status, status, "{req}");
            assert!(r.body.contains(body), "{req}: body {:?}", r.body);
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_and_stops_accepting() {
    bounded(async {
        let server = spawn_server(None).await;
        let addr = server.addr;
        // A request in flight (the router takes 500 ms) when shutdown fires.
        let slow = tokio::spawn(async move { raw_http(addr, &request("GET", "/slow", "")).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = tokio::time::Instant::now();
        server.stop().await;
        let r = slow.await.unwrap();
        println!(
            "in-flight request: {} {:?}; serve returned after {:?}",
            r.status,
            r.body,
            started.elapsed()
        );
        assert_eq!((r.status, r.body.as_str()), (200, "slow done"));
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener must be closed"
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_tunnels() {
    bounded(async {
        let server = spawn_server(None).await;
        let mut cfg = ConnectorConfig::new(format!("ws://{}/v3/connect", server.addr));
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, GOOD_TOKEN.parse().unwrap());
        cfg.set_headers(headers);
        let mut ws = Connector::new(cfg).unwrap().connect().await.unwrap();
        echo_roundtrip(&mut ws).await;
        server.stop().await;
        // The tunnel callback saw the shutdown token and returned; the websocket is gone.
        use futures_util::StreamExt;
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("tunnel must end on shutdown");
        println!("client saw after shutdown: {next:?}");
        assert!(!matches!(
            next,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_)))
        ));
    })
    .await;
}
