//! `run_forever`: back within the backoff cap after the server dies and returns on the same
//! port, counters tell the story, cancellation is prompt in every state.

mod connector_support;

use std::time::Duration;

use connector_support::*;
use futures_util::StreamExt;
use http::HeaderMap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::connector::{
    BackoffConfig, Connector, ConnectorConfig, RunEnd, SessionEnd, run_forever,
};

const MIN: Duration = Duration::from_millis(50);
const CAP: Duration = Duration::from_millis(200);

fn echo_connector(addr: std::net::SocketAddr) -> Connector {
    let mut cfg = ConnectorConfig::new(format!("ws://{addr}/v3/connect"));
    let mut headers = HeaderMap::new();
    headers.insert(TOKEN_HEADER, GOOD_TOKEN.parse().unwrap());
    let mut backoff = BackoffConfig::default();
    backoff.set_min_delay(MIN).set_max_delay(CAP);
    cfg.set_headers(headers)
        .set_backoff(backoff)
        .set_handshake_timeout(Duration::from_secs(2));
    Connector::new(cfg).unwrap()
}

/// The session every test runs: one echo, report, then wait for the websocket to end.
async fn session(
    mut ws: tokio_tungstenite::WebSocketStream<tunnel_proto::driver::connector::BoxedIo>,
    up: mpsc::UnboundedSender<Instant>,
) -> SessionEnd {
    echo_roundtrip(&mut ws).await;
    let _ = up.send(Instant::now());
    let reason = loop {
        match ws.next().await {
            None => break "websocket ended".to_owned(),
            Some(Err(e)) => break e.to_string(),
            Some(Ok(_)) => {}
        }
    };
    SessionEnd::Reconnect { reason }
}

#[tokio::test]
async fn reconnects_after_server_restart_within_the_cap() {
    bounded(async {
        let server = spawn_server(None).await;
        let addr = server.addr;
        let connector = echo_connector(addr);
        let cancel = CancellationToken::new();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let loop_task = {
            let connector = connector.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                run_forever(&connector, cancel, move |ws| session(ws, up_tx.clone())).await
            })
        };

        timeout(Duration::from_secs(5), up_rx.recv())
            .await
            .expect("first connect")
            .unwrap();
        assert_eq!(connector.stats().snapshot().up, 1);

        // Kill the server (no graceful close); the session ends; the loop fails to connect
        // for a while.
        server.kill().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let down = connector.stats().snapshot();
        println!("while down: {down:?}");
        assert_eq!(down.up, 0);
        assert!(down.failures >= 1, "{down:?}");
        assert_eq!(down.reconnects, 1);

        // Restart on the same port.
        let listener = TcpListener::bind(addr).await.expect("rebind same port");
        let restarted_at = Instant::now();
        let server = start_server(listener, None);
        let back_at = timeout(Duration::from_secs(5), up_rx.recv())
            .await
            .expect("reconnect")
            .unwrap();
        let gap = back_at.duration_since(restarted_at);
        println!("back {gap:?} after the restart (cap {CAP:?})");
        // Within one capped delay plus a connect and an echo.
        assert!(gap < CAP + Duration::from_millis(500), "{gap:?}");

        let stats = connector.stats().snapshot();
        println!("after reconnect: {stats:?}");
        assert_eq!(stats.connected, 2);
        assert_eq!(stats.reconnects, 1);
        assert_eq!(stats.attempts, stats.connected + stats.failures);
        assert_eq!(stats.up, 1);

        cancel.cancel();
        let end = timeout(Duration::from_secs(1), loop_task)
            .await
            .expect("prompt cancel")
            .unwrap();
        assert_eq!(end, RunEnd::Cancelled);
        assert_eq!(connector.stats().snapshot().up, 0);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn cancellation_is_prompt_while_backing_off_and_while_connected() {
    bounded(async {
        // Backing off: nothing listens, and the delay is long.
        let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cfg = ConnectorConfig::new(format!("ws://{dead}/v3/connect"));
        let mut backoff = BackoffConfig::default();
        backoff
            .set_min_delay(Duration::from_secs(30))
            .set_max_delay(Duration::from_secs(60));
        cfg.set_backoff(backoff);
        let connector = Connector::new(cfg).unwrap();
        let cancel = CancellationToken::new();
        let task = {
            let (connector, cancel) = (connector.clone(), cancel.clone());
            tokio::spawn(async move {
                run_forever(&connector, cancel, |_ws| async { SessionEnd::Stop }).await
            })
        };
        // Wait for the first failure, so the loop is asleep in its backoff.
        while connector.stats().snapshot().failures == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = Instant::now();
        cancel.cancel();
        let end = timeout(Duration::from_secs(1), task)
            .await
            .expect("cancel while backing off")
            .unwrap();
        println!("cancelled while backing off in {:?}", t0.elapsed());
        assert_eq!(end, RunEnd::Cancelled);

        // Connected: the session would run forever; cancel drops it.
        let server = spawn_server(None).await;
        let connector = echo_connector(server.addr);
        let cancel = CancellationToken::new();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let task = {
            let (connector, cancel) = (connector.clone(), cancel.clone());
            tokio::spawn(async move {
                run_forever(&connector, cancel, move |ws| session(ws, up_tx.clone())).await
            })
        };
        up_rx.recv().await.unwrap();
        let t0 = Instant::now();
        cancel.cancel();
        let end = timeout(Duration::from_secs(1), task)
            .await
            .expect("cancel while connected")
            .unwrap();
        println!("cancelled while connected in {:?}", t0.elapsed());
        assert_eq!(end, RunEnd::Cancelled);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn session_stop_ends_the_loop() {
    bounded(async {
        let server = spawn_server(None).await;
        let connector = echo_connector(server.addr);
        let end = timeout(
            Duration::from_secs(5),
            run_forever(&connector, CancellationToken::new(), |mut ws| async move {
                echo_roundtrip(&mut ws).await;
                SessionEnd::Stop
            }),
        )
        .await
        .unwrap();
        assert_eq!(end, RunEnd::Stopped);
        let stats = connector.stats().snapshot();
        println!("{stats:?}");
        assert_eq!(
            (stats.attempts, stats.connected, stats.reconnects),
            (1, 1, 0)
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn failures_back_off_exponentially_up_to_the_cap() {
    bounded(async {
        // Nothing listens: every attempt fails at once, so attempt times show the delays.
        let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let connector = echo_connector(dead);
        let cancel = CancellationToken::new();
        let task = {
            let (connector, cancel) = (connector.clone(), cancel.clone());
            tokio::spawn(async move {
                run_forever(&connector, cancel, |_ws| async { SessionEnd::Stop }).await
            })
        };
        let window = Duration::from_millis(1500);
        tokio::time::sleep(window).await;
        cancel.cancel();
        task.await.unwrap();
        let attempts = connector.stats().snapshot().attempts;
        println!("{attempts} attempts in {window:?} (min {MIN:?}, cap {CAP:?})");
        // Delays are 25-50, 50-100, 100-200, then 100-200 ms each: between ~8 and ~16
        // attempts in 1.5 s. Allow slack for a loaded machine on the low side.
        assert!((4..=18).contains(&attempts), "{attempts}");
    })
    .await;
}
