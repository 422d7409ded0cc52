//! The whole stack across a server restart: an agent on `run_forever` (connector, backoff),
//! sessions in a registry behind the real acceptor. The server is killed and started again on
//! the same port; the agent is back within the backoff cap and dials through it work again.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{
    Acceptor, AcceptorConfig, AuthRequest, ClientKey, Reject, text_response,
};
use tunnel_proto::driver::connector::{
    BackoffConfig, Connector, ConnectorConfig, SessionEnd, run_forever,
};
use tunnel_proto::driver::registry::{DialError, Registry, serve_acceptor_tunnel};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, websocket_config};
use tunnel_proto::{Role, SessionConfig};

use support::{allow_tcp, echo_server, serve_agent};

const KEY: &str = "c-restart";

/// Starts the server side on `listener`; returns its registry and the token that stops it.
fn start_server(
    listener: TcpListener,
) -> (Registry, CancellationToken, tokio::task::JoinHandle<()>) {
    let registry = Registry::default();
    let mut config = AcceptorConfig::new(["/v3/connect"]);
    config.set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
    let reg = registry.clone();
    let acceptor = Acceptor::new(
        config,
        |req: AuthRequest| async move {
            match req.headers.get("x-tunnel-id").and_then(|v| v.to_str().ok()) {
                Some(KEY) => Ok(ClientKey::new(KEY)),
                _ => Err(Reject::Unauthorized),
            }
        },
        move |accepted| {
            let reg = reg.clone();
            async move {
                let _ = serve_acceptor_tunnel(
                    &reg,
                    accepted,
                    SessionConfig::new(Role::Server),
                    Arc::new(|_| false),
                )
                .await;
            }
        },
        |_req| async { text_response(http::StatusCode::NOT_FOUND, "no route") },
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { acceptor.serve(listener, token).await });
    (registry, shutdown, task)
}

async fn wait_for_session(registry: &Registry) -> Duration {
    let start = Instant::now();
    timeout(Duration::from_secs(10), async {
        while !registry.has_session(&ClientKey::new(KEY)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the agent never registered");
    start.elapsed()
}

async fn echo_through(registry: &Registry, target: &str) {
    let mut stream = registry
        .open(&ClientKey::new(KEY), "tcp", target)
        .expect("dial through the tunnel");
    stream.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_returns_after_server_restart_and_dials_work_again() {
    let echo = echo_server().await.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (registry, stop, task) = start_server(listener);

    // The agent: reconnects forever with a small, capped backoff.
    let cap = Duration::from_millis(800);
    let mut config = ConnectorConfig::new(format!("ws://{addr}/v3/connect"));
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tunnel-id", KEY.parse().unwrap());
    config.set_headers(headers);
    config.set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
    let mut backoff = BackoffConfig::default();
    backoff
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(cap);
    config.set_backoff(backoff);
    let connector = Connector::new(config).unwrap();
    let cancel = CancellationToken::new();
    let agent_cancel = cancel.clone();
    let agent = tokio::spawn(async move {
        run_forever(&connector, agent_cancel, |ws| async move {
            let tunnel = Tunnel::spawn(ws, SessionConfig::new(Role::Client), allow_tcp());
            serve_agent(tunnel.clone());
            SessionEnd::Reconnect {
                reason: tunnel.closed().await.to_string(),
            }
        })
        .await
    });

    wait_for_session(&registry).await;
    echo_through(&registry, &echo).await;

    // Kill the server: its sessions end; dials fail at once instead of hanging.
    stop.cancel();
    drop(registry);
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // a few failed attempts, backing off
    let (registry, stop, task) = start_server(TcpListener::bind(addr).await.unwrap());
    let early = Instant::now();
    let err = registry
        .open(&ClientKey::new(KEY), "tcp", &echo)
        .unwrap_err();
    assert!(matches!(err, DialError::NoSession(_)), "{err}");
    assert!(
        early.elapsed() < Duration::from_millis(50),
        "a dial with no session fails at once"
    );

    let back = wait_for_session(&registry).await;
    println!("agent back {back:?} after the restart (backoff cap {cap:?})");
    assert!(
        back <= cap + Duration::from_millis(500),
        "not back within the backoff cap: {back:?}"
    );
    echo_through(&registry, &echo).await;

    cancel.cancel();
    timeout(Duration::from_secs(5), agent)
        .await
        .expect("the agent loop stops on cancel")
        .unwrap();
    stop.cancel();
    task.await.unwrap();
}
