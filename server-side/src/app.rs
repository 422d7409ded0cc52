//! The state every handler shares: the store, the tunnel registry, the server's identity and
//! the live status the server derives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tunnel_proto::driver::acceptor::ClientKey;
use tunnel_proto::driver::registry::Registry;

use crate::auth_limit::{AuthLimitConfig, AuthLimiter, DEFAULT_KNOWN_GOOD, KnownGood};
use crate::metrics::Metrics;
use crate::store::{Store, StoreHandle};

/// Settings handlers need.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The URL agents and users reach this server at, without a trailing `/`.
    pub server_url: String,
    /// The `cacerts` setting: the CA PEM, trimmed; empty for a publicly trusted certificate.
    pub cacerts: String,
    /// Cluster agent image in import manifests.
    pub agent_image: String,
    /// Node agent image in import manifests (when the DaemonSet is asked for).
    pub node_agent_image: String,
    /// How often the Connected status of each cluster is probed.
    pub probe_interval: Duration,
    /// The rate limit on failed agent authentications.
    pub auth_limit: AuthLimitConfig,
    /// This replica's name, recorded as the holder of its tunnels ([`crate::presence`]).
    pub replica: String,
}

/// Live connectivity of a cluster, as derived by the prober.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connectivity {
    /// `GET /ping` through the `stv-cluster-<id>` tunnel returned 200 at the last probe.
    pub connected: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Unix seconds of the last probe.
    pub checked_at: i64,
}

/// Changes of Connected a slow console listener may fall behind by before it is told to
/// re-read everything.
const CONNECTIVITY_CHANGES: usize = 256;

/// Shared server state.
pub struct App {
    /// Durable state, called off the runtime ([`StoreHandle`]).
    pub store: StoreHandle,
    /// Live tunnels.
    pub registry: Registry,
    /// Settings.
    pub config: AppConfig,
    /// Counters.
    pub metrics: Metrics,
    /// Idle upstream connections of the proxies.
    pub upstreams: crate::proxy::pool::Pool,
    /// Failed agent authentications per address ([`crate::auth_limit`]).
    pub auth_limiter: AuthLimiter,
    /// Agent credentials accepted since start; they skip the limiter.
    pub known_good: KnownGood,
    /// Live tunnels and proxied requests, by the credential that let them in
    /// ([`crate::live`]).
    pub live: crate::live::Live,
    /// New nodes per cluster over the last minute (bounded, [`crate::tunnel_auth`]).
    pub node_creations: crate::tunnel_auth::NodeCreations,
    /// Forwarding to the replica that holds a tunnel ([`crate::peers`]); `None` with one
    /// replica (SQLite, or no `--peer-listen`).
    pub peers: Option<crate::peers::Peers>,
    /// Signed-in browsers of the web console ([`crate::session`]).
    pub sessions: crate::session::Sessions,
    /// The id of a cluster whose Connected status just changed, for the console's live view
    /// ([`crate::console`]); nobody listening is fine.
    pub connectivity_changes: tokio::sync::broadcast::Sender<String>,
    connectivity: Mutex<HashMap<String, Connectivity>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Client key of a cluster's steve-aggregation tunnel.
pub fn stv_key(cluster_id: &str) -> ClientKey {
    ClientKey::new(format!("stv-cluster-{cluster_id}"))
}

impl App {
    /// Assembles the state; the store gets a [`StoreHandle`] with the default bounds.
    pub fn new(store: Arc<dyn Store>, registry: Registry, config: AppConfig) -> Self {
        Self {
            store: StoreHandle::new(store),
            registry,
            auth_limiter: AuthLimiter::new(config.auth_limit.clone()),
            known_good: KnownGood::new(DEFAULT_KNOWN_GOOD),
            live: crate::live::Live::default(),
            node_creations: crate::tunnel_auth::NodeCreations::default(),
            peers: None,
            sessions: crate::session::Sessions::default(),
            connectivity_changes: tokio::sync::broadcast::channel(CONNECTIVITY_CHANGES).0,
            config,
            metrics: Metrics::default(),
            upstreams: crate::proxy::pool::Pool::default(),
            connectivity: Mutex::new(HashMap::new()),
        }
    }

    /// With forwarding to the replicas that hold tunnels ([`crate::peers`]).
    pub fn with_peers(mut self, peers: crate::peers::Peers) -> Self {
        self.peers = Some(peers);
        self
    }

    /// The `CATTLE_CA_CHECKSUM` agents should pin.
    pub fn ca_checksum(&self) -> String {
        crate::pki::ca_checksum(&self.config.cacerts)
    }

    /// The last probe result of a cluster.
    pub fn connectivity(&self, cluster_id: &str) -> Option<Connectivity> {
        self.connectivity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cluster_id)
            .cloned()
    }

    /// Records a probe result.
    pub fn set_connectivity(&self, cluster_id: &str, c: Connectivity) {
        let mut map = self.connectivity.lock().unwrap_or_else(|p| p.into_inner());
        let changed = map
            .get(cluster_id)
            .is_none_or(|old| old.connected != c.connected);
        let id = cluster_id.to_owned();
        map.insert(id.clone(), c.clone());
        drop(map);
        if changed {
            tracing::info!(cluster = cluster_id, connected = c.connected, message = ?c.message, "cluster connectivity changed");
            // No receiver (no console open) is not an error.
            let _ = self.connectivity_changes.send(id);
        }
    }

    /// Whether the cluster's main tunnel (the cluster agent) is registered.
    pub fn has_tunnel(&self, cluster_id: &str) -> bool {
        self.registry.has_session(&ClientKey::new(cluster_id))
    }
}

/// Shared handle on the state.
pub type SharedApp = Arc<App>;
