//! The registry's cap on sessions per client key: a new session is always taken (a reconnect
//! must never be refused because of a stale session), and the session it displaces is a
//! silent one if there is any, else the oldest.

mod support;

use std::future::Future;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::{sleep, timeout};
use tunnel_proto::driver::acceptor::ClientKey;
use tunnel_proto::driver::registry::{Registry, RegistryConfig, RegistryEvent, SessionId};
use tunnel_proto::mux::SessionError;

use support::connect_memory;

async fn bounded<F: Future>(fut: F) -> F::Output {
    timeout(Duration::from_secs(120), fut)
        .await
        .expect("test exceeded its bound")
}

async fn next_removed(
    events: &mut broadcast::Receiver<RegistryEvent>,
) -> (SessionId, SessionError) {
    loop {
        let event = timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("a registry event within 5 s")
            .expect("event channel");
        if let RegistryEvent::Removed {
            session_id, reason, ..
        } = event
        {
            return (session_id, reason);
        }
    }
}

fn ids(registry: &Registry, key: &str) -> Vec<SessionId> {
    registry
        .sessions(&ClientKey::new(key))
        .iter()
        .map(|h| h.id())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_session_over_the_cap_evicts_the_oldest_and_is_never_refused() {
    bounded(async {
        let mut config = RegistryConfig::new();
        config.set_max_sessions_per_key(3);
        let registry = Registry::new(config);
        let mut events = registry.subscribe();
        let mut peers = Vec::new();
        for _ in 0..3 {
            peers.push(connect_memory(&registry, "c-1").await);
        }
        let other = connect_memory(&registry, "c-2").await;
        let first = peers[0].2;

        // The fourth session of c-1 is taken; the oldest of c-1 leaves with a clear reason,
        // and its tunnel ends (the agent sees its socket close and reconnects).
        let fourth = connect_memory(&registry, "c-1").await;
        let (evicted, reason) = next_removed(&mut events).await;
        println!("evicted session {evicted}: {reason}");
        assert_eq!(evicted, first);
        assert_eq!(reason, SessionError::Evicted { limit: 3 });
        assert_eq!(ids(&registry, "c-1"), [peers[1].2, peers[2].2, fourth.2]);
        assert_eq!(ids(&registry, "c-2"), [other.2], "other keys untouched");
        let ended = timeout(Duration::from_secs(5), peers[0].1.tunnel.closed())
            .await
            .expect("evicted tunnel ends");
        println!("evicted tunnel: {ended}");
        assert_eq!(ended, SessionError::Evicted { limit: 3 });
        let agent_end = timeout(Duration::from_secs(5), peers[0].0.tunnel.closed())
            .await
            .expect("the evicted agent sees its session end");
        println!("evicted agent: {agent_end}");
        for (agent, server, _) in peers.into_iter().chain([fourth, other]) {
            agent.task.abort();
            server.task.abort();
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_session_is_evicted_before_an_older_healthy_one() {
    bounded(async {
        let mut config = RegistryConfig::new();
        config.set_max_sessions_per_key(2);
        let registry = Registry::new(config);
        let mut events = registry.subscribe();
        let healthy = connect_memory(&registry, "c-1").await;
        let mut silent = connect_memory(&registry, "c-1").await;
        // The newer agent is blackholed (a NAT forgot its flow); past the max silence its
        // session is stale, while the older one still hears pings.
        silent.0.freeze.take().unwrap().send(()).unwrap();
        sleep(Duration::from_secs(16)).await;
        assert!(healthy.1.tunnel.is_healthy(Duration::from_secs(15)));
        assert!(!silent.1.tunnel.is_healthy(Duration::from_secs(15)));

        // The agent reconnects: the stale session goes, not the healthy older one.
        let reconnect = connect_memory(&registry, "c-1").await;
        let (evicted, reason) = next_removed(&mut events).await;
        println!("evicted session {evicted}: {reason}");
        assert_eq!(evicted, silent.2);
        assert_eq!(ids(&registry, "c-1"), [healthy.2, reconnect.2]);
        for (agent, server, _) in [healthy, silent, reconnect] {
            agent.task.abort();
            server.task.abort();
        }
    })
    .await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A flood of sessions on one key (a leaked token reconnecting in a loop): the registry never
/// holds more than the cap, every displaced session ends, and memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sessions_on_one_key_stays_at_the_cap() {
    bounded(async {
        let registry = Registry::default();
        let cap = 8;
        let flood = |n: usize| {
            let registry = registry.clone();
            async move {
                let mut peers = std::collections::VecDeque::new();
                for _ in 0..n {
                    let (agent, server, _) = connect_memory(&registry, "flooded").await;
                    assert!(ids(&registry, "flooded").len() <= cap);
                    peers.push_back((agent, server));
                    // Displaced sessions end, at both ends; keep only the newest.
                    if peers.len() > 4 * cap {
                        let (agent, server) = peers.pop_front().unwrap();
                        agent.tunnel.closed().await;
                        server.tunnel.closed().await;
                    }
                }
            }
        };
        flood(500).await;
        let warm = rss_kib();
        flood(4_500).await;
        let after = rss_kib();
        let held = ids(&registry, "flooded").len();
        println!(
            "5000 sessions on one key: {held} registered (cap {cap}); RSS {warm} -> {after} KiB after the last 4500 ({:+} KiB)",
            after as i64 - warm as i64
        );
        assert_eq!(held, cap);
        assert!(after < warm + 16 * 1024, "RSS grew {warm} -> {after} KiB");
    })
    .await;
}
