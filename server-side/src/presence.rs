//! Presence: which tunnel ends (cluster agents, node agents) this replica holds, written to the
//! store so that anyone reading it (an admin with `kubectl get clusters.tunnel-server.dev`,
//! the other replicas) sees `Connected`, the replica that holds the tunnel, and when it was last
//! seen, without asking every replica.
//!
//! Driven by the registry's events: a session of a key registered → connected; the last
//! session of a key removed → disconnected (unless another replica took the tunnel over since:
//! [`crate::store::Presence::after`]). Every [`HEARTBEAT`] the ends still held get a fresh
//! last-seen time, and at shutdown they are marked disconnected (bounded). Writes go through
//! the store's write lane; a failed write is retried at the next heartbeat, never queued
//! without bound: the state to write is the registry's, re-read each time.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::registry::RegistryEvent;

use crate::app::SharedApp;
use crate::store::{TunnelEnd, now_unix};

/// How often held ends get a fresh last-seen time.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// How long shutdown waits to mark the held ends disconnected.
const SHUTDOWN_WRITES_WITHIN: Duration = Duration::from_secs(2);

/// The replica name: `$POD_NAME` (a pod's, from the downward API), else the host name.
pub fn default_replica_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tunnel-server".to_owned())
}

/// What this replica last wrote for an end: connected or not.
type Written = HashMap<TunnelEnd, bool>;

/// Writes `connected` for `end` unless it is what was last written; on failure forgets the
/// end, so the next heartbeat writes it again.
async fn write(
    app: &SharedApp,
    written: &mut Written,
    end: TunnelEnd,
    connected: bool,
    heartbeat: bool,
) {
    if !heartbeat && written.get(&end) == Some(&connected) {
        return;
    }
    let replica = &app.config.replica;
    let peer = app.peers.as_ref().map_or("", |p| p.address());
    match app
        .store
        .record_presence(&end, connected, replica, peer, now_unix())
        .await
    {
        Ok(_) => {
            written.insert(end, connected);
        }
        Err(err) => {
            tracing::warn!(cluster = %end.cluster_id, node = ?end.node_id, error = %err, "presence not recorded; retrying at the next heartbeat");
            written.remove(&end);
        }
    }
}

/// The ends this replica holds a session for now.
fn held(app: &SharedApp) -> Vec<TunnelEnd> {
    app.registry
        .list_clients()
        .iter()
        .filter_map(|k| TunnelEnd::of_client_key(k.as_str()))
        .collect()
}

/// Records presence until `shutdown`, then marks the held ends disconnected.
pub async fn run(app: SharedApp, shutdown: CancellationToken) {
    let mut events = app.registry.subscribe();
    let mut written = Written::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = heartbeat.tick() => {
                let now_held = held(&app);
                for end in &now_held {
                    write(&app, &mut written, end.clone(), true, true).await;
                }
                // Ends whose removal was missed (a lagged event, a failed write).
                let gone: Vec<TunnelEnd> = written
                    .iter()
                    .filter(|(end, connected)| **connected && !now_held.contains(end))
                    .map(|(end, _)| end.clone())
                    .collect();
                for end in gone {
                    write(&app, &mut written, end, false, false).await;
                }
            }
            event = events.recv() => match event {
                Ok(RegistryEvent::Added { key, .. }) => {
                    if let Some(end) = TunnelEnd::of_client_key(key.as_str()) {
                        write(&app, &mut written, end, true, false).await;
                    }
                }
                Ok(RegistryEvent::Removed { key, .. }) => {
                    if let Some(end) = TunnelEnd::of_client_key(key.as_str())
                        && !app.registry.has_session(&key)
                    {
                        write(&app, &mut written, end, false, false).await;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => heartbeat.reset_immediately(),
                Err(RecvError::Closed) => break,
            },
        }
    }
    let held: Vec<TunnelEnd> = written
        .iter()
        .filter(|(_, connected)| **connected)
        .map(|(end, _)| end.clone())
        .collect();
    let mark_down = async {
        for end in held {
            write(&app, &mut written, end, false, false).await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_WRITES_WITHIN, mark_down)
        .await
        .is_err()
    {
        tracing::warn!("shutdown: not every held tunnel was marked disconnected in time");
    }
}
