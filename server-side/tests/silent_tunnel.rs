//! A tunnel that goes silent under requests (the agent's NAT link cut, no FIN): requests
//! waiting for an answer end with a 503 once the registry stops trusting the session (15 s of
//! silence), instead of hanging until the session's keepalive gives up on it (60 s). Both
//! paths are covered: a request on a pooled upstream connection, and one on a fresh dial.
//!
//! The agent reaches the server through a TCP relay in this test that can stop carrying bytes
//! both ways without closing anything, as a cut link does.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tunnel_proto::driver::connector::{Connector, ConnectorConfig, Trust};
use tunnel_proto::driver::{Tunnel, pipe};
use tunnel_proto::{Role, SessionConfig};

use support::*;

/// A relay to `upstream` that holds every byte while `frozen` is set.
async fn freezable_relay(upstream: SocketAddr, frozen: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(copy_unless_frozen(cr, sw, frozen.clone()));
            tokio::spawn(copy_unless_frozen(sr, cw, frozen.clone()));
        }
    });
    addr
}

async fn copy_unless_frozen(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// An agent-like tunnel through `relay`, piping `tcp` streams to their targets.
async fn agent_through(relay: SocketAddr, headers: http::HeaderMap, trust: Trust) -> Tunnel {
    let mut config = ConnectorConfig::new(format!("wss://{relay}/v3/connect/register"));
    config.set_headers(headers).set_trust(trust);
    let ws = Connector::new(config)
        .unwrap()
        .connect()
        .await
        .expect("agent connects through the relay");
    let tunnel = Tunnel::spawn(ws, SessionConfig::new(Role::Client), allow_all());
    let accept = tunnel.clone();
    tokio::spawn(async move {
        while let Some(stream) = accept.accept().await {
            tokio::spawn(async move {
                let address = stream.target().address.clone();
                match TcpStream::connect(&address).await {
                    Ok(s) => {
                        let _ = pipe(stream, s).await;
                    }
                    Err(e) => stream.reset(&format!("dial tcp {address}: {e}")),
                }
            });
        }
    });
    tunnel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_a_tunnel_that_goes_silent_end_with_503_not_a_hang() {
    timeout(Duration::from_secs(120), async {
        let dir = TempDir::new("silent");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, reg_token, _) = add_cluster(dir.path(), "cut");
        let alice = add_user(dir.path(), "alice", &[]);
        cli(dir.path(), &["grant", "alice", "cut"]);

        let apiserver = FakeApiserver::start().await;
        let frozen = Arc::new(AtomicBool::new(false));
        let relay = freezable_relay(server.addr, frozen.clone()).await;
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let params = apiserver.cluster_params("sa-jwt-token");
        let _agent = agent_through(relay, agent_headers(&reg_token, &params), trust).await;

        let version = format!("/k8s/clusters/{cluster_id}/version");
        let r = eventually(Duration::from_secs(10), "proxying works", || async {
            let r = http.get(&version, Some(&alice)).await;
            (r.status == StatusCode::OK).then_some(r)
        })
        .await;
        println!("before the cut: {} {}", r.status, r.body.trim());
        let tls_before = apiserver.accepted.load(Ordering::Relaxed);

        // The link goes silent. One request takes the pooled connection the last one left
        // idle; the other, sent beside it, finds the pool empty and dials.
        frozen.store(true, Ordering::Relaxed);
        let cut = Instant::now();
        let (pooled, fresh) = tokio::join!(http.get(&version, Some(&alice)), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            http.get(&version, Some(&alice)).await
        });
        let took = cut.elapsed();
        println!(
            "during the cut: {} {:?} / {} {:?}, both answered {took:?} after the cut",
            pooled.status, pooled.body, fresh.status, fresh.body
        );
        assert_eq!(
            apiserver.accepted.load(Ordering::Relaxed),
            tls_before,
            "nothing reached the apiserver"
        );
        // The pooled request waits for the registry's verdict (15 s silence), then 503.
        assert_eq!(
            pooled.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            pooled.body
        );
        assert!(pooled.body.contains("went silent"), "{}", pooled.body);
        // The fresh dial ends at the TLS handshake timeout (10 s, 504) or, if the session
        // turns silent first, with the same 503: never the keepalive's 60 s.
        assert!(
            matches!(
                fresh.status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "{} {}",
            fresh.status,
            fresh.body
        );
        assert!(
            took < Duration::from_secs(25),
            "answers took {took:?}: they waited for the keepalive"
        );

        // Now the session is known silent: new requests fail at once.
        let started = Instant::now();
        let r = http.get(&version, Some(&alice)).await;
        println!(
            "after the verdict: {} {:?} in {:?}",
            r.status,
            r.body,
            started.elapsed()
        );
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(2));

        // The link comes back before the keepalive gave up: the same session serves again.
        frozen.store(false, Ordering::Relaxed);
        let r = eventually(
            Duration::from_secs(15),
            "the session is trusted again",
            || async {
                let r = http.get(&version, Some(&alice)).await;
                (r.status == StatusCode::OK).then_some(r)
            },
        )
        .await;
        println!(
            "link back after {:?}: {} {}",
            cut.elapsed(),
            r.status,
            r.body.trim()
        );
    })
    .await
    .expect("test bounded at 120 s");
}
