//! Failed upgrades report the HTTP status and (bounded) body; a server that never answers is cut
//! off by the handshake timeout; caller headers reach the server.

mod connector_support;

use std::time::Duration;

use connector_support::*;
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tunnel_proto::driver::connector::{ConnectError, Connector, ConnectorConfig};

fn connector(url: String, token: Option<&str>) -> ConnectorConfig {
    let mut cfg = ConnectorConfig::new(url);
    let mut headers = HeaderMap::new();
    if let Some(t) = token {
        headers.insert(TOKEN_HEADER, t.parse().unwrap());
    }
    headers.insert("x-api-tunnel-params", "eyJrIjoidiJ9".parse().unwrap());
    cfg.set_headers(headers);
    cfg
}

#[tokio::test]
async fn unauthorized_reports_401_and_body() {
    bounded(async {
        let server = spawn_server(None).await;
        let c = Connector::new(connector(
            format!("ws://{}/v3/connect", server.addr),
            Some("nope"),
        ))
        .unwrap();
        let err = c.connect().await.expect_err("must be refused");
        println!("{err}");
        match err {
            ConnectError::Handshake { status, body } => {
                assert_eq!(status, 401);
                assert_eq!(body, "failed authentication");
            }
            other => panic!("expected Handshake, got {other:?}"),
        }
        let stats = c.stats().snapshot();
        assert_eq!((stats.attempts, stats.failures, stats.connected), (1, 1, 0));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_request_reports_400_and_the_authorizers_message() {
    bounded(async {
        let server = spawn_server(None).await;
        let c = Connector::new(connector(
            format!("ws://{}/v3/connect", server.addr),
            Some(BAD_REQUEST_TOKEN),
        ))
        .unwrap();
        let err = c.connect().await.expect_err("must be refused");
        println!("{err}");
        assert!(
            matches!(&err, ConnectError::Handshake { status: 400, body } if body == "cluster not found"),
            "{err:?}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn headers_reach_the_server() {
    bounded(async {
        let mut server = spawn_server(None).await;
        let c = Connector::new(connector(
            format!("ws://{}/v3/connect/register", server.addr),
            Some(GOOD_TOKEN),
        ))
        .unwrap();
        let mut ws = c.connect().await.expect("connect");
        echo_roundtrip(&mut ws).await;
        let seen = server.seen.recv().await.expect("server saw the tunnel");
        println!("{seen:?}");
        assert_eq!(seen.client_key, "agent-1");
        assert_eq!(seen.path, "/v3/connect/register");
        assert_eq!(seen.params.as_deref(), Some("eyJrIjoidiJ9"));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn error_body_is_bounded() {
    bounded(async {
        // A server that refuses with a 200 KiB chunked body and then keeps the socket open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let chunk = "x".repeat(10 * 1024);
            let mut resp = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..20 {
                resp.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
            }
            resp.extend_from_slice(b"0\r\n\r\n");
            tcp.write_all(&resp).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let c = Connector::new(connector(format!("ws://{addr}/connect"), None)).unwrap();
        let started = Instant::now();
        let err = c.connect().await.expect_err("403");
        match err {
            ConnectError::Handshake { status, body } => {
                println!("HTTP {status}, body cut at {} bytes", body.len());
                assert_eq!(status, 403);
                assert_eq!(body.len(), 64 * 1024);
                assert!(body.bytes().all(|b| b == b'x'));
            }
            other => panic!("expected Handshake, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn silent_server_hits_the_handshake_timeout() {
    bounded(async {
        // Accepts TCP, reads the request, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                held.push(tcp);
            }
        });
        for scheme in ["ws", "wss"] {
            let mut cfg = connector(format!("{scheme}://{addr}/v3/connect"), Some(GOOD_TOKEN));
            cfg.set_handshake_timeout(Duration::from_millis(300));
            let c = Connector::new(cfg).unwrap();
            let started = Instant::now();
            let err = c.connect().await.expect_err("must time out");
            let took = started.elapsed();
            println!("{scheme}: {err} (after {took:?})");
            assert!(
                matches!(err, ConnectError::Timeout(d) if d == Duration::from_millis(300)),
                "{err:?}"
            );
            assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2));
        }
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn non_websocket_101_is_a_protocol_error() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            tcp.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n",
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let c = Connector::new(connector(format!("ws://{addr}/connect"), None)).unwrap();
        let err = c.connect().await.expect_err("bad accept key");
        println!("{err}");
        assert!(matches!(err, ConnectError::Protocol(_)), "{err:?}");
        server.abort();
    })
    .await;
}
