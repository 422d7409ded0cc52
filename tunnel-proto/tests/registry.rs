//! The session registry: dials take the newest healthy session of a key and fail at once when
//! there is none or all are silent (wire spec §6.4, §8 items 13-15); a dead peer is detected
//! within the keepalive deadline on both ends and its session removed; nothing leaks over a
//! hundred connect/disconnect cycles through the real acceptor.
//!
//! Keepalive tests run on in-memory websockets under virtual time; a "blackholed" peer is an
//! end whose driver is kept alive but never polled again, so its socket stays open and silent.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{
    Acceptor, AcceptorConfig, AuthRequest, ClientKey, Reject, text_response,
};
use tunnel_proto::driver::connector::{ConnectError, Connector, ConnectorConfig};
use tunnel_proto::driver::registry::{
    DialError, InvalidClientKey, MAX_CLIENT_KEY_LEN, Registry, RegistryEvent, SessionId,
    check_client_key, serve_acceptor_tunnel,
};
use tunnel_proto::driver::{Stream, Tunnel, pipe};
use tunnel_proto::mux::{SessionError, refuse_all};
use tunnel_proto::{Role, SessionConfig};

use support::{Peer, allow_tcp, connect_memory, echo_server, payload, ws_pair_memory};

/// Every test body runs under this bound (virtual time in the paused tests).
const BOUND: Duration = Duration::from_secs(120);

async fn bounded<F: Future>(fut: F) -> F::Output {
    timeout(BOUND, fut).await.expect("test exceeded its bound")
}

fn opened(peer: &Peer) -> u64 {
    peer.tunnel.stats().streams_opened_local
}

async fn next_event(events: &mut broadcast::Receiver<RegistryEvent>) -> RegistryEvent {
    timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("no registry event within 5 s")
        .expect("event channel")
}

/// Dials and asserts the dial returned without waiting (virtual or real time).
fn dial_now(registry: &Registry, key: &str) -> Result<Stream, DialError> {
    let started = Instant::now();
    let result = registry.open(&ClientKey::new(key), "tcp", "127.0.0.1:9");
    assert_eq!(started.elapsed(), Duration::ZERO);
    result
}

#[tokio::test(start_paused = true)]
async fn newest_healthy_session_wins_then_an_older_healthy_one_then_no_session() {
    bounded(async {
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let (agent_a, server_a, id_a) = connect_memory(&registry, "c-1").await;
        sleep(Duration::from_secs(1)).await;
        let (mut agent_b, server_b, id_b) = connect_memory(&registry, "c-1").await;
        assert!(id_b > id_a);

        // Both healthy: the newer one gets the dial (Go would use the older).
        let s1 = dial_now(&registry, "c-1").expect("dial with two healthy sessions");
        println!(
            "two healthy: a opened {}, b opened {}",
            opened(&server_a),
            opened(&server_b)
        );
        assert_eq!((opened(&server_a), opened(&server_b)), (0, 1));

        // The newer goes silent (blackholed); past the max silence, dials go to the older.
        agent_b.freeze();
        sleep(Duration::from_secs(16)).await;
        assert!(!server_b.tunnel.is_healthy(Duration::from_secs(15)));
        assert!(
            server_b.tunnel.close_reason().is_none(),
            "not dead yet, just silent"
        );
        let s2 = dial_now(&registry, "c-1").expect("dial falls back to the older session");
        println!(
            "newer silent: a opened {}, b opened {}",
            opened(&server_a),
            opened(&server_b)
        );
        assert_eq!((opened(&server_a), opened(&server_b)), (1, 1));

        // Both silent: a typed error at once instead of a stream that hangs.
        let mut agent_a = agent_a;
        agent_a.freeze();
        sleep(Duration::from_secs(16)).await;
        let err = dial_now(&registry, "c-1").unwrap_err();
        println!("both silent: {err}");
        assert!(
            matches!(&err, DialError::Unhealthy { sessions: 2, max_silence, .. }
                if *max_silence == Duration::from_secs(15)),
            "{err:?}"
        );
        assert!(registry.has_session(&ClientKey::new("c-1")));

        // Both gone: NoSession at once.
        agent_a.abort().await;
        agent_b.abort().await;
        let mut removed = Vec::new();
        while removed.len() < 2 {
            match next_event(&mut events).await {
                RegistryEvent::Added { session_id, .. } => {
                    assert!(session_id == id_a || session_id == id_b)
                }
                RegistryEvent::Removed {
                    session_id, reason, ..
                } => removed.push((session_id, reason)),
                other => panic!("unexpected event {other:?}"),
            }
        }
        removed.sort_by_key(|(id, _)| *id);
        println!("removed: {removed:?}");
        assert_eq!(
            removed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [id_a, id_b]
        );
        for (_, reason) in &removed {
            assert!(matches!(reason, SessionError::Transport(_)), "{reason:?}");
        }
        let err = dial_now(&registry, "c-1").unwrap_err();
        assert_eq!(err, DialError::NoSession(ClientKey::new("c-1")));
        assert!(!registry.has_session(&ClientKey::new("c-1")));
        assert!(registry.list_clients().is_empty());
        assert_eq!(registry.session_count(), 0);
        drop((s1, s2));
        server_a.abort().await;
        server_b.abort().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn blackholed_agent_fails_dials_after_15s_and_is_removed_within_60s() {
    bounded(async {
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let (mut agent, server, id) = connect_memory(&registry, "edge-7").await;
        assert!(matches!(
            next_event(&mut events).await,
            RegistryEvent::Added { .. }
        ));
        // Healthy for a while on the agent's 5 s pings.
        sleep(Duration::from_secs(32)).await;
        assert!(server.tunnel.is_healthy(Duration::from_secs(6)));
        agent.freeze();
        let frozen_at = Instant::now();

        // Silence under 15 s (the last ping was at most 5 s before the freeze): still dialled.
        sleep(Duration::from_secs(9)).await;
        let mut hung = dial_now(&registry, "edge-7").expect("healthy within the max silence");
        let hung_read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let r = hung.read(&mut buf).await;
            (Instant::now(), r.map_err(|e| e.to_string()))
        });

        // Past 15 s of silence: Unhealthy at once, instead of a stream that hangs.
        sleep(Duration::from_millis(6_500)).await;
        let err = dial_now(&registry, "edge-7").unwrap_err();
        println!("{:?} after the freeze: {err}", frozen_at.elapsed());
        assert!(
            matches!(err, DialError::Unhealthy { sessions: 1, .. }),
            "{err:?}"
        );
        assert!(server.tunnel.close_reason().is_none());

        // The server's keepalive timeout (60 s after it last heard) ends and removes it.
        let event = timeout(Duration::from_secs(70), events.recv())
            .await
            .expect("not removed within 70 s")
            .unwrap();
        let removed_after = frozen_at.elapsed();
        println!("removed {removed_after:?} after the freeze: {event:?}");
        match event {
            RegistryEvent::Removed {
                session_id, reason, ..
            } => {
                assert_eq!(session_id, id);
                assert!(
                    matches!(reason, SessionError::KeepaliveTimeout(_)),
                    "{reason:?}"
                );
            }
            other => panic!("expected Removed, got {other:?}"),
        }
        assert!(
            removed_after >= Duration::from_secs(55)
                && removed_after <= Duration::from_secs(60) + Duration::from_millis(500),
            "{removed_after:?}"
        );
        // The stream dialled while the agent was already silent hung until then (the Go
        // behaviour this avoids for later dials), and then failed rather than hanging forever.
        let (read_done, read) = hung_read.await.unwrap();
        println!(
            "stream dialled 9 s into the silence: read ended {:?} after the freeze with {read:?}",
            read_done.duration_since(frozen_at)
        );
        assert!(read.is_err(), "{read:?}");
        assert_eq!(
            dial_now(&registry, "edge-7").unwrap_err(),
            DialError::NoSession(ClientKey::new("edge-7"))
        );
        assert_eq!(registry.session_count(), 0);
        agent.abort().await;
        server.abort().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn agent_detects_a_blackholed_server_within_60s() {
    bounded(async {
        let (client_ws, server_ws) = ws_pair_memory().await;
        let agent = Peer::start(client_ws, Role::Client);
        let mut server = Peer::start(server_ws, Role::Server);
        sleep(Duration::from_secs(20)).await;
        assert!(agent.tunnel.close_reason().is_none());
        server.freeze();
        let frozen_at = Instant::now();
        let reason = agent.tunnel.closed().await;
        let after = frozen_at.elapsed();
        println!("agent gave up {after:?} after the server froze: {reason}");
        assert!(
            matches!(reason, SessionError::KeepaliveTimeout(_)),
            "{reason:?}"
        );
        assert!(
            after >= Duration::from_secs(55) && after <= Duration::from_secs(61),
            "{after:?}"
        );
        agent.abort().await;
        server.abort().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn list_clients_has_session_events_and_remove_key() {
    bounded(async {
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let (agent_b, _server_b, id_b) = connect_memory(&registry, "b").await;
        let (agent_a1, _server_a1, id_a1) = connect_memory(&registry, "a").await;
        let (agent_a2, _server_a2, id_a2) = connect_memory(&registry, "a").await;
        let (a, b) = (ClientKey::new("a"), ClientKey::new("b"));

        assert_eq!(registry.list_clients(), [a.clone(), b.clone()]);
        assert!(registry.has_session(&a) && registry.has_session(&b));
        assert!(!registry.has_session(&ClientKey::new("c")));
        assert_eq!(registry.session_count(), 3);
        let ids: Vec<SessionId> = registry.sessions(&a).iter().map(|h| h.id()).collect();
        assert_eq!(ids, [id_a1, id_a2], "oldest first");
        for (key, id) in [(&b, id_b), (&a, id_a1), (&a, id_a2)] {
            assert_eq!(
                next_event(&mut events).await,
                RegistryEvent::Added {
                    key: key.clone(),
                    session_id: id
                }
            );
        }

        // Keys that would break peering are refused.
        let long = "k".repeat(MAX_CLIENT_KEY_LEN + 1);
        assert!(check_client_key(&ClientKey::new("k".repeat(MAX_CLIENT_KEY_LEN))).is_ok());
        for (key, expected) in [
            ("x/y", InvalidClientKey::Slash(ClientKey::new("x/y"))),
            (
                "k::tcp",
                InvalidClientKey::DoubleColon(ClientKey::new("k::tcp")),
            ),
            (
                long.as_str(),
                InvalidClientKey::TooLong {
                    len: MAX_CLIENT_KEY_LEN + 1,
                },
            ),
        ] {
            let (_c, s) = ws_pair_memory().await;
            let tunnel = Tunnel::spawn(s, SessionConfig::new(Role::Server), refuse_all());
            let err = registry.register(ClientKey::new(key), tunnel).unwrap_err();
            println!("{err}");
            assert_eq!(err, expected);
        }
        assert_eq!(registry.session_count(), 3);

        // remove_key: gone at once, both announced, both tunnels closed.
        assert_eq!(registry.remove_key(&a), 2);
        assert!(!registry.has_session(&a));
        assert_eq!(registry.list_clients(), std::slice::from_ref(&b));
        assert_eq!(
            dial_now(&registry, "a").unwrap_err(),
            DialError::NoSession(a.clone())
        );
        for id in [id_a1, id_a2] {
            assert_eq!(
                next_event(&mut events).await,
                RegistryEvent::Removed {
                    key: a.clone(),
                    session_id: id,
                    reason: SessionError::Local
                }
            );
        }
        for agent in [&agent_a1, &agent_a2] {
            let reason = timeout(Duration::from_secs(5), agent.tunnel.closed())
                .await
                .expect("agent of a removed key sees its session end");
            println!("agent of removed key: {reason}");
        }

        // A handle closes its own session.
        let handle = registry.sessions(&b).pop().unwrap();
        assert_eq!((handle.key(), handle.id()), (&b, id_b));
        handle.close();
        assert_eq!(registry.session_count(), 0);
        assert!(registry.list_clients().is_empty());
        assert_eq!(
            next_event(&mut events).await,
            RegistryEvent::Removed {
                key: b.clone(),
                session_id: id_b,
                reason: SessionError::Local
            }
        );
        // The watchers do not announce a second removal when the tunnels end.
        sleep(Duration::from_secs(1)).await;
        assert!(matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
        for agent in [agent_a1, agent_a2, agent_b] {
            agent.abort().await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_registry_closes_its_sessions() {
    bounded(async {
        let registry = Registry::default();
        let (agent, server, _) = connect_memory(&registry, "k").await;
        drop(registry);
        let reason = timeout(Duration::from_secs(5), server.tunnel.closed())
            .await
            .expect("session closed when the registry was dropped");
        println!(
            "server session: {reason}; agent: {:?}",
            timeout(Duration::from_secs(5), agent.tunnel.closed()).await
        );
        assert_eq!(reason, SessionError::Local);
        agent.abort().await;
        server.abort().await;
    })
    .await;
}

// === through the real acceptor ===

const TUNNEL_ID: &str = "x-tunnel-id";

async fn authorize(req: AuthRequest) -> Result<ClientKey, Reject> {
    match req.headers.get(TUNNEL_ID).and_then(|v| v.to_str().ok()) {
        Some(id) => Ok(ClientKey::new(id)),
        None => Err(Reject::Unauthorized),
    }
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(registry: &Registry) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = AcceptorConfig::new(["/v3/connect"]);
        config.set_shutdown_grace(Duration::from_secs(2));
        let registry = registry.clone();
        let acceptor = Acceptor::new(
            config,
            authorize,
            move |t| {
                let registry = registry.clone();
                async move {
                    let end = serve_acceptor_tunnel(
                        &registry,
                        t,
                        SessionConfig::new(Role::Server),
                        refuse_all(),
                    )
                    .await;
                    tracing::debug!(?end, "tunnel callback done");
                }
            },
            |_req| async { text_response(StatusCode::NOT_FOUND, "no route") },
        );
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { acceptor.serve(listener, token).await });
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(Duration::from_secs(5), self.task)
            .await
            .expect("acceptor did not stop")
            .unwrap();
    }
}

fn connector(addr: SocketAddr, id: Option<&str>) -> Connector {
    let mut cfg = ConnectorConfig::new(format!("ws://{addr}/v3/connect"));
    let mut headers = HeaderMap::new();
    if let Some(id) = id {
        headers.insert(TUNNEL_ID, id.parse().unwrap());
    }
    cfg.set_headers(headers)
        .set_handshake_timeout(Duration::from_secs(5));
    Connector::new(cfg).unwrap()
}

/// A real agent: connects, then runs its session and pipes every stream to its TCP target,
/// all owned by the returned task, so aborting it drops the client abruptly (no close frame).
async fn start_agent(addr: SocketAddr, id: &str) -> (Tunnel, JoinHandle<()>) {
    let ws = connector(addr, Some(id))
        .connect()
        .await
        .expect("agent connects");
    let (tunnel, driver) = Tunnel::new(ws, SessionConfig::new(Role::Client), allow_tcp());
    let agent = tunnel.clone();
    let task = tokio::spawn(async move {
        let accept = async {
            while let Some(stream) = agent.accept().await {
                tokio::spawn(async move {
                    let address = stream.target().address.clone();
                    match TcpStream::connect(&address).await {
                        Ok(socket) => {
                            let _ = pipe(stream, socket).await;
                        }
                        Err(err) => stream.reset(&format!("dial tcp {address}: {err}")),
                    }
                });
            }
        };
        tokio::select! {
            _ = driver => {}
            () = accept => {}
        }
    });
    (tunnel, task)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test]
async fn unauthorized_client_gets_401_and_no_session() {
    bounded(async {
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let server = Server::start(&registry).await;

        let err = connector(server.addr, None).connect().await.unwrap_err();
        println!("no credentials: {err}");
        assert!(
            matches!(&err, ConnectError::Handshake { status: 401, body } if body.contains("failed authentication")),
            "{err:?}"
        );
        // A key the registry refuses: upgraded (the authorizer said yes), then dropped.
        let ws = connector(server.addr, Some("bad/key")).connect().await;
        println!("bad key: upgraded = {}", ws.is_ok());
        drop(ws);
        sleep(Duration::from_millis(200)).await;
        assert_eq!(registry.session_count(), 0);
        assert!(registry.list_clients().is_empty());
        assert!(matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));

        // An authorized agent is registered, and shutdown removes it.
        let (agent, agent_task) = start_agent(server.addr, "agent-1").await;
        let added = next_event(&mut events).await;
        println!("authorized: {added:?}; clients {:?}", registry.list_clients());
        assert!(matches!(&added, RegistryEvent::Added { key, .. } if key.as_str() == "agent-1"));
        assert_eq!(registry.list_clients(), [ClientKey::new("agent-1")]);
        server.stop().await;
        let removed = next_event(&mut events).await;
        println!("after shutdown: {removed:?}");
        assert!(
            matches!(&removed, RegistryEvent::Removed { reason: SessionError::Local, .. }),
            "{removed:?}"
        );
        assert_eq!(registry.session_count(), 0);
        let reason = timeout(Duration::from_secs(5), agent.closed()).await.unwrap();
        println!("agent: {reason}");
        agent_task.abort();
    })
    .await;
}

#[tokio::test]
async fn hundred_abrupt_disconnects_leak_no_session_stream_or_task() {
    const CYCLES: usize = 100;
    const STREAMS: u64 = 3;
    bounded(async {
        let echo = echo_server().await.to_string();
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let server = Server::start(&registry).await;
        let key = ClientKey::new("agent-1");
        // Let the listeners settle before counting.
        sleep(Duration::from_millis(50)).await;
        let baseline = (registry.session_count(), registry.stream_count(), alive_tasks());
        println!("baseline: sessions {}, streams {}, tasks {}", baseline.0, baseline.1, baseline.2);

        let mut server_tunnels = Vec::new();
        let mut agent_tunnels = Vec::new();
        let mut peak_tasks = 0;
        let mut reasons = std::collections::BTreeMap::<String, usize>::new();
        for cycle in 0..CYCLES {
            let (agent, agent_task) = start_agent(server.addr, key.as_str()).await;
            let session_id = match next_event(&mut events).await {
                RegistryEvent::Added { key: k, session_id } if k == key => session_id,
                other => panic!("cycle {cycle}: expected Added, got {other:?}"),
            };
            let session = registry.sessions(&key).pop().expect("registered");
            assert_eq!(session.id(), session_id);

            let mut streams = Vec::new();
            for i in 0..STREAMS {
                let mut stream = registry.dial(&key, "tcp", &echo).await.expect("dial");
                let data = payload(cycle as u64 * STREAMS + i, 4096);
                stream.write_all(&data).await.unwrap();
                let mut back = vec![0; data.len()];
                timeout(Duration::from_secs(5), stream.read_exact(&mut back))
                    .await
                    .expect("echo timed out")
                    .unwrap();
                assert_eq!(back, data);
                streams.push(stream);
            }
            assert_eq!(registry.stream_count(), STREAMS as usize);
            peak_tasks = peak_tasks.max(alive_tasks());

            // Drop the client abruptly: its task (driver and socket) is dropped mid-session.
            agent_task.abort();
            let _ = agent_task.await;
            match next_event(&mut events).await {
                RegistryEvent::Removed {
                    session_id: id,
                    reason,
                    ..
                } => {
                    assert_eq!(id, session_id, "cycle {cycle}");
                    *reasons.entry(reason.to_string()).or_default() += 1;
                }
                other => panic!("cycle {cycle}: expected Removed, got {other:?}"),
            }
            assert!(!registry.has_session(&key));
            // The server's streams fail rather than hang.
            for mut stream in streams {
                let mut buf = [0u8; 1];
                let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .expect("stream read hung after the tunnel ended");
                assert!(read.is_err(), "cycle {cycle}: {read:?}");
            }
            server_tunnels.push(session.tunnel().clone());
            agent_tunnels.push(agent);
        }

        // Back to the baseline (bounded wait: the echo and pipe tasks wind down on their own).
        let settled = timeout(Duration::from_secs(10), async {
            loop {
                let now = (registry.session_count(), registry.stream_count(), alive_tasks());
                if now == baseline {
                    return;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let after = (registry.session_count(), registry.stream_count(), alive_tasks());
        let leftover_streams: usize = server_tunnels
            .iter()
            .chain(&agent_tunnels)
            .map(Tunnel::stream_count)
            .sum();
        let ended = server_tunnels
            .iter()
            .chain(&agent_tunnels)
            .filter(|t| t.close_reason().is_some())
            .count();
        println!(
            "after {CYCLES} cycles: sessions {}, streams {} (in the {} ended tunnels: {leftover_streams}), \
             tasks {} (peak while connected {peak_tasks}); removal reasons {reasons:?}",
            after.0,
            after.1,
            ended,
            after.2
        );
        assert!(settled.is_ok(), "did not return to the baseline {baseline:?}: {after:?}");
        assert_eq!(leftover_streams, 0);
        assert_eq!(ended, 2 * CYCLES);
        server.stop().await;
    })
    .await;
}
