//! The Connected status (spec cattle-agent §6.3): a cluster is connected only if its
//! `stv-cluster-<id>` tunnel exists **and** `GET /ping` through it answers 200 (through any of
//! its sessions, newest first: a draining replica refuses dials while another still serves). Probed every
//! [`AppConfig::probe_interval`](crate::app::AppConfig) for every cluster, and at once when an
//! aggregation tunnel registers.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::registry::RegistryEvent;

use crate::app::{Connectivity, SharedApp, stv_key};
use crate::store::now_unix;

/// Bound on one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sessions a probe tries at most (newest first).
const PROBE_SESSIONS: usize = 3;

/// Probes one cluster and records the result.
pub async fn probe_cluster(app: &SharedApp, cluster_id: &str) -> Connectivity {
    let result = ping(app, cluster_id).await;
    let c = Connectivity {
        connected: result.is_ok(),
        message: result.err(),
        checked_at: now_unix(),
    };
    app.set_connectivity(cluster_id, c.clone());
    c
}

/// `GET /ping` through the cluster's aggregation tunnel. With several sessions (replicas of the
/// cluster agent) they are tried newest first until one answers: the newest can belong to an
/// agent that is draining (SIGTERM, e.g. its pod deleted or replaced by a rolling update),
/// which refuses every dial until it exits, while an older replica still serves. The cluster is
/// connected when any session answers.
async fn ping(app: &SharedApp, cluster_id: &str) -> Result<(), String> {
    let key = stv_key(cluster_id);
    let max_silence = app.registry.config().max_silence();
    let sessions: Vec<_> = app
        .registry
        .sessions(&key)
        .into_iter()
        .rev()
        .filter(|s| s.tunnel().close_reason().is_none() && s.tunnel().is_healthy(max_silence))
        .take(PROBE_SESSIONS)
        .collect();
    if sessions.is_empty() {
        // No live, healthy session: the registry's own error says which (none, or silent).
        let stream = app
            .registry
            .open(&key, "tcp", "not-used:80")
            .map_err(|e| format!("Cluster agent is not connected: {e}"))?;
        return ping_bounded(stream).await;
    }
    let mut first_err = None;
    for session in sessions {
        let result = match session.tunnel().open("tcp", "not-used:80") {
            Ok(stream) => ping_bounded(stream).await,
            Err(e) => Err(format!("Cluster agent is not connected: {e}")),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_default())
}

async fn ping_bounded(stream: tunnel_proto::driver::Stream) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, ping_stream(stream)).await {
        Ok(r) => r,
        Err(_) => Err("ping through the aggregation tunnel timed out".to_owned()),
    }
}

async fn ping_stream(stream: tunnel_proto::driver::Stream) -> Result<(), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/ping")
        .header(http::header::HOST, "not-used")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() == StatusCode::OK {
        Ok(())
    } else {
        Err(format!(
            "GET /ping through the aggregation tunnel answered {}",
            resp.status()
        ))
    }
}

/// Probes every cluster each interval, and a cluster at once when its aggregation tunnel
/// registers or leaves, until `shutdown`.
pub async fn run(app: SharedApp, shutdown: CancellationToken) {
    let mut events = app.registry.subscribe();
    let mut ticker = tokio::time::interval(app.config.probe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {
                let clusters = match app.store.clusters().await {
                    Ok(c) => c,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot list clusters to probe");
                        continue;
                    }
                };
                app.upstreams.prune();
                let mut probes = tokio::task::JoinSet::new();
                for cluster in clusters {
                    let app = app.clone();
                    probes.spawn(async move { probe_cluster(&app, &cluster.id).await });
                }
                while probes.join_next().await.is_some() {}
            }
            event = events.recv() => {
                let key = match event {
                    Ok(RegistryEvent::Added { key, .. } | RegistryEvent::Removed { key, .. }) => key,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if let Some(cluster_id) = key.as_str().strip_prefix("stv-cluster-") {
                    let app = app.clone();
                    let cluster_id = cluster_id.to_owned();
                    tokio::spawn(async move { probe_cluster(&app, &cluster_id).await });
                }
            }
        }
    }
}
