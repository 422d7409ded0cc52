//! Server-side session registry: which agent tunnels are up, under which client key, and which
//! one a dial goes through.
//!
//! remotedialer's server keeps every session of a key in insertion order and always dials
//! through the **oldest** (wire spec §1.2, §6.4). When an agent's network drops without a FIN
//! (a NAT or load balancer forgets the flow), the agent reconnects on a fresh socket while the
//! old session lingers until its 60 s ping timeout; meanwhile every dial goes into the dead
//! one, returns a connection at once, and its reads hang until the caller gives up
//! (rancher#39597 measured about 30 s per call; rancher#37250, spec §8 items 14-15). This
//! registry differs in two ways:
//!
//! * a dial takes the **newest healthy** session of the key: the newest because a reconnect is
//!   the agent telling us its old socket is gone, healthy because a session that has not heard
//!   from its agent for [`RegistryConfig::set_max_silence`] (default 15 s, three missed 5 s
//!   pings) is skipped. A silent newer session is skipped in favour of a healthy older one;
//! * when every session of a key is silent, the dial fails at once with
//!   [`DialError::Unhealthy`] instead of handing out a stream that hangs; with no session at
//!   all it fails at once with [`DialError::NoSession`], as Go does.
//!
//! A silent session is only skipped, not closed: the session's own keepalive timeout (60 s, as
//! Go) decides when it is dead, so a slow-but-alive agent is not cut off early.
//!
//! A key holds at most [`RegistryConfig::set_max_sessions_per_key`] sessions (default 8; Go
//! has no cap, so a looping or hostile agent with a valid token could pile up sessions until
//! each one's 60 s timeout). Past the cap the **new session is taken and an old one is
//! evicted**, not the other way round: a reconnect is exactly the moment when stale sessions
//! of the key are still registered (their agent's socket vanished without a FIN), and refusing
//! it would lock a real agent out for up to a minute because of its own ghosts. The session
//! evicted is the oldest *silent* one if there is any (the ghost), else the oldest; it ends
//! with [`SessionError::Evicted`]. The default leaves room for the two replicas of a cluster
//! agent plus a few reconnects in flight; it is reached only by a key that keeps opening
//! sessions, and then the tunnels it loses are its own.
//!
//! ```text
//!   Acceptor ──AcceptedTunnel──▶ serve_acceptor_tunnel ──register(key, tunnel)──▶ Registry
//!                                 (runs the driver)           │ one watcher task per session:
//!                                                             │ tunnel.closed() → remove
//!   dial(key, proto, addr) ──newest healthy session──▶ Tunnel::open ──▶ Stream
//!   subscribe() ──▶ RegistryEvent::{Added, Removed}   (peering announcements, metrics)
//! ```
//!
//! Sessions leave the registry by themselves: [`Registry::register`] spawns a small watcher
//! per session that waits for the tunnel to end and removes it, emitting
//! [`RegistryEvent::Removed`] with the reason. [`Registry::remove_key`] (a cluster was
//! deleted) and [`SessionHandle::close`] remove at once and close the tunnel. Dropping the last
//! clone of the registry closes every session it holds.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use super::acceptor::{AcceptedTunnel, ClientKey};
use super::{Stream, Tunnel};
use crate::config::SessionConfig;
use crate::mux::{Authorizer, OpenError, SessionError};

/// Default for [`RegistryConfig::set_max_silence`]: 15 s, three missed pings of a Go client
/// (which pings every 5 s).
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(15);

/// Default for [`RegistryConfig::set_event_capacity`]: 1024 events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Longest client key a Go peer reads back from an `AddClient` announcement (wire spec §1.2:
/// 100-byte cap minus `/` and a 19-digit session key).
pub const MAX_CLIENT_KEY_LEN: usize = 80;

/// Default for [`RegistryConfig::set_max_sessions_per_key`]: 8 sessions.
pub const DEFAULT_MAX_SESSIONS_PER_KEY: usize = 8;

// === config ===

/// Registry settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    max_silence: Duration,
    event_capacity: usize,
    max_sessions_per_key: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_silence: DEFAULT_MAX_SILENCE,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            max_sessions_per_key: DEFAULT_MAX_SESSIONS_PER_KEY,
        }
    }
}

impl RegistryConfig {
    /// The defaults: 15 s max silence, 1024 buffered events, 8 sessions per key.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a session may go without hearing from its agent and still get new dials.
    /// Default 15 s ([`DEFAULT_MAX_SILENCE`]): Go clients ping every 5 s, so this is three
    /// missed pings. Shorter fails over sooner after a silent network drop but may skip an
    /// agent whose pings are merely late; it must stay above the agent's ping interval.
    pub fn set_max_silence(&mut self, max_silence: Duration) -> &mut Self {
        self.max_silence = max_silence;
        self
    }

    /// The max silence in force.
    pub fn max_silence(&self) -> Duration {
        self.max_silence
    }

    /// How many [`RegistryEvent`]s a slow subscriber may fall behind before it misses some
    /// (it then gets `RecvError::Lagged` and should resynchronise from
    /// [`Registry::list_clients`]). Default 1024; at least 1.
    pub fn set_event_capacity(&mut self, capacity: usize) -> &mut Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Most sessions one client key may hold (default 8, [`DEFAULT_MAX_SESSIONS_PER_KEY`]; at
    /// least 1). A session registered past the cap is taken and evicts the oldest silent
    /// session of the key, else the oldest (see the module docs for why not refuse it). Keep
    /// it above the number of agents sharing a key (cluster-agent replicas) plus the
    /// reconnects that may overlap their old sessions.
    pub fn set_max_sessions_per_key(&mut self, max: usize) -> &mut Self {
        self.max_sessions_per_key = max.max(1);
        self
    }

    /// The per-key session cap in force.
    pub fn max_sessions_per_key(&self) -> usize {
        self.max_sessions_per_key
    }
}

// === ids, events, errors ===

/// Identifies one session among all sessions of a registry; assigned in registration order,
/// so a larger id is a newer session. Fits in 63 bits, as a remotedialer `sessionKey` in
/// `AddClient` announcements must.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl SessionId {
    /// The id as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A change in the registry, in the order the registry saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A session was registered.
    Added {
        /// Its client key.
        key: ClientKey,
        /// Its id.
        session_id: SessionId,
    },
    /// A session left the registry.
    Removed {
        /// Its client key.
        key: ClientKey,
        /// Its id.
        session_id: SessionId,
        /// Why: how the tunnel ended, or [`SessionError::Local`] when it was removed with
        /// [`Registry::remove_key`] or [`SessionHandle::close`].
        reason: SessionError,
    },
}

/// Why a dial through the registry failed. Every variant is returned at once; none waits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No live session for the key (Go's text).
    #[error("failed to find Session for client {0}")]
    NoSession(ClientKey),
    /// Every session of the key has been silent for longer than the max silence: the agent's
    /// link is probably dead, and a stream through it would hang until the keepalive timeout.
    #[error(
        "no healthy session for client {key}: {sessions} session(s), none heard from in {max_silence:?}"
    )]
    Unhealthy {
        /// The key.
        key: ClientKey,
        /// How many sessions it has, all silent.
        sessions: usize,
        /// The max silence in force.
        max_silence: Duration,
    },
    /// The chosen session refused to open the stream (bad target, stream limit).
    #[error("opening a stream through client {key}: {source}")]
    Open {
        /// The key.
        key: ClientKey,
        /// The session's reason.
        #[source]
        source: OpenError,
    },
}

impl From<DialError> for io::Error {
    /// For dialers that must return `io::Error` (HTTP client connectors): no session is
    /// `NotConnected`, a silent one `TimedOut`, a bad target `InvalidInput`.
    fn from(err: DialError) -> Self {
        let kind = match &err {
            DialError::NoSession(_) => io::ErrorKind::NotConnected,
            DialError::Unhealthy { .. } => io::ErrorKind::TimedOut,
            DialError::Open {
                source: OpenError::Closed(_),
                ..
            } => io::ErrorKind::ConnectionAborted,
            DialError::Open {
                source: OpenError::TooManyStreams(_),
                ..
            } => io::ErrorKind::Other,
            DialError::Open { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}

/// Why a client key cannot be registered: it would break remotedialer peering, which carries
/// keys in `AddClient` announcements and forwarded dials (wire spec §1.2, §6.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidClientKey {
    /// The key contains `/`, where peers split `AddClient` payloads.
    #[error("client key {0:?} contains '/'")]
    Slash(ClientKey),
    /// The key contains `::`, where peers split forwarded dials.
    #[error("client key {0:?} contains '::'")]
    DoubleColon(ClientKey),
    /// The key is longer than peers read back.
    #[error("client key is {len} bytes; the limit is {MAX_CLIENT_KEY_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

/// Checks a client key against the registry's rules (no `/`, no `::`, at most
/// [`MAX_CLIENT_KEY_LEN`] bytes). An [`Authorizer`](super::acceptor::Authorizer) can call this
/// to refuse with 400 before the upgrade rather than after it.
pub fn check_client_key(key: &ClientKey) -> Result<(), InvalidClientKey> {
    let s = key.as_str();
    if s.len() > MAX_CLIENT_KEY_LEN {
        return Err(InvalidClientKey::TooLong { len: s.len() });
    }
    if s.contains('/') {
        return Err(InvalidClientKey::Slash(key.clone()));
    }
    if s.contains("::") {
        return Err(InvalidClientKey::DoubleColon(key.clone()));
    }
    Ok(())
}

// === impl Registry ===

/// Client key → live sessions, shared by the acceptor (which registers) and whoever dials.
/// Cheap to clone; clones share the sessions. Dropping the last clone closes them all.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.inner.config)
            .field("sessions", &self.session_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: RegistryConfig,
    /// Sessions per key, oldest first.
    clients: Mutex<HashMap<ClientKey, Vec<Entry>>>,
    events: broadcast::Sender<RegistryEvent>,
    next_id: AtomicU64,
}

struct Entry {
    id: SessionId,
    tunnel: Tunnel,
    watcher: AbortHandle,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(RegistryConfig::default())
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(config: RegistryConfig) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity);
        Self {
            inner: Arc::new(Inner {
                config,
                clients: Mutex::new(HashMap::new()),
                events,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// Adds a running session under `key` and spawns its watcher, which removes it once the
    /// tunnel ends. Emits [`RegistryEvent::Added`] (and, when the tunnel ends,
    /// [`RegistryEvent::Removed`] with its [`SessionError`]). Several sessions may share a key.
    ///
    /// Never refused for their number: past [`RegistryConfig::set_max_sessions_per_key`] an
    /// older session of the key is evicted, the oldest silent one if any, else the oldest
    /// (removed with [`SessionError::Evicted`], and its tunnel closed).
    ///
    /// Must be called within a tokio runtime (the watcher is a task). Dropping the returned
    /// handle changes nothing; it is for closing this one session or looking at it.
    pub fn register(
        &self,
        key: ClientKey,
        tunnel: Tunnel,
    ) -> Result<SessionHandle, InvalidClientKey> {
        check_client_key(&key)?;
        let id = SessionId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let mut clients = self.inner.lock();
        // Spawned under the lock: the watcher's removal takes the same lock, so even a tunnel
        // that has already ended is listed (and announced) before it is removed.
        let watcher = tokio::spawn(watch(
            Arc::downgrade(&self.inner),
            key.clone(),
            id,
            tunnel.clone(),
        ));
        clients.entry(key.clone()).or_default().push(Entry {
            id,
            tunnel: tunnel.clone(),
            watcher: watcher.abort_handle(),
        });
        tracing::debug!(%key, session = %id, "session registered");
        let _ = self.inner.events.send(RegistryEvent::Added {
            key: key.clone(),
            session_id: id,
        });
        let evicted = self.inner.evict_over_cap(&mut clients, &key);
        drop(clients);
        for tunnel in evicted {
            tunnel.close_with(SessionError::Evicted {
                limit: self.inner.config.max_sessions_per_key,
            });
        }
        Ok(SessionHandle {
            registry: Arc::downgrade(&self.inner),
            key,
            id,
            tunnel,
        })
    }

    /// Opens a stream to `proto`/`address` through the newest healthy session of `key`, or fails
    /// at once: [`DialError::NoSession`] when the key has no live session,
    /// [`DialError::Unhealthy`] when all of them have been silent for longer than the max
    /// silence. A silent session is skipped in favour of a healthy older one. Never waits; like
    /// [`Tunnel::open`], a refused dial on the agent shows as an error on the first read.
    pub fn open(&self, key: &ClientKey, proto: &str, address: &str) -> Result<Stream, DialError> {
        let candidates: Vec<Tunnel> = match self.inner.lock().get(key) {
            // Newest first.
            Some(entries) => entries.iter().rev().map(|e| e.tunnel.clone()).collect(),
            None => Vec::new(),
        };
        let max_silence = self.inner.config.max_silence;
        let mut silent = 0;
        for tunnel in candidates {
            // Ended but not yet removed by its watcher: as good as gone.
            if tunnel.close_reason().is_some() {
                continue;
            }
            if !tunnel.is_healthy(max_silence) {
                silent += 1;
                continue;
            }
            match tunnel.open(proto, address) {
                Ok(stream) => return Ok(stream),
                // It ended between the check and the open.
                Err(OpenError::Closed(_)) => continue,
                Err(source) => {
                    return Err(DialError::Open {
                        key: key.clone(),
                        source,
                    });
                }
            }
        }
        if silent == 0 {
            Err(DialError::NoSession(key.clone()))
        } else {
            Err(DialError::Unhealthy {
                key: key.clone(),
                sessions: silent,
                max_silence,
            })
        }
    }

    /// [`Registry::open`] in the shape of a dialer (Go's `Server.Dialer(clientKey)`), for HTTP
    /// clients and proxies. Resolves at once.
    pub async fn dial(
        &self,
        key: &ClientKey,
        proto: &str,
        address: &str,
    ) -> Result<Stream, DialError> {
        self.open(key, proto, address)
    }

    /// Whether `key` has a session that has not ended (healthy or not; [`Registry::open`] says
    /// which). Go's `HasSession`, without peers.
    pub fn has_session(&self, key: &ClientKey) -> bool {
        self.inner
            .lock()
            .get(key)
            .is_some_and(|entries| entries.iter().any(|e| e.tunnel.close_reason().is_none()))
    }

    /// Keys with at least one session that has not ended, sorted. Go's `ListClients`.
    pub fn list_clients(&self) -> Vec<ClientKey> {
        let mut keys: Vec<ClientKey> = self
            .inner
            .lock()
            .iter()
            .filter(|(_, entries)| entries.iter().any(|e| e.tunnel.close_reason().is_none()))
            .map(|(key, _)| key.clone())
            .collect();
        keys.sort();
        keys
    }

    /// The sessions of `key`, oldest first (including any that ended a moment ago and whose
    /// watcher has not yet removed them).
    pub fn sessions(&self, key: &ClientKey) -> Vec<SessionHandle> {
        self.inner
            .lock()
            .get(key)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| SessionHandle {
                        registry: Arc::downgrade(&self.inner),
                        key: key.clone(),
                        id: e.id,
                        tunnel: e.tunnel.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sessions held, over all keys. A session that ended is counted until its watcher removes
    /// it, which happens as soon as the runtime gets to it; this is the figure to watch for
    /// leaks.
    pub fn session_count(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Streams in the tables of all sessions held.
    pub fn stream_count(&self) -> usize {
        self.inner
            .lock()
            .values()
            .flatten()
            .map(|e| e.tunnel.stream_count())
            .sum()
    }

    /// Removes every session of `key` at once and closes them (a cluster was deleted). Emits
    /// [`RegistryEvent::Removed`] with [`SessionError::Local`] for each; returns how many.
    pub fn remove_key(&self, key: &ClientKey) -> usize {
        let mut clients = self.inner.lock();
        let entries = clients.remove(key).unwrap_or_default();
        for entry in &entries {
            self.inner.announce_removed(key, entry, SessionError::Local);
        }
        drop(clients);
        for entry in &entries {
            entry.tunnel.close();
        }
        entries.len()
    }

    /// A receiver of every [`RegistryEvent`] from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientKey, Vec<Entry>>> {
        // Every update is a single push or removal, so a poisoned map is still consistent.
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes session `id` of `key` out of the map; `None` if it is no longer there.
    fn take(
        clients: &mut HashMap<ClientKey, Vec<Entry>>,
        key: &ClientKey,
        id: SessionId,
    ) -> Option<Entry> {
        let entries = clients.get_mut(key)?;
        let at = entries.iter().position(|e| e.id == id)?;
        let entry = entries.remove(at);
        if entries.is_empty() {
            clients.remove(key);
        }
        Some(entry)
    }

    /// Stops the watcher and emits `Removed`. Called with the map locked, so events come out in
    /// the order of the map's changes.
    fn announce_removed(&self, key: &ClientKey, entry: &Entry, reason: SessionError) {
        entry.watcher.abort();
        tracing::debug!(%key, session = %entry.id, %reason, "session removed");
        let _ = self.events.send(RegistryEvent::Removed {
            key: key.clone(),
            session_id: entry.id,
            reason,
        });
    }

    /// Removes sessions of `key` past the cap, the oldest silent one first, else the oldest
    /// (never the newest, just registered), and returns their tunnels to close once the map
    /// is unlocked.
    fn evict_over_cap(
        &self,
        clients: &mut HashMap<ClientKey, Vec<Entry>>,
        key: &ClientKey,
    ) -> Vec<Tunnel> {
        let limit = self.config.max_sessions_per_key;
        let max_silence = self.config.max_silence;
        let mut evicted = Vec::new();
        while let Some(entries) = clients.get(key)
            && entries.len() > limit
        {
            let older = &entries[..entries.len() - 1];
            let victim = older
                .iter()
                .find(|e| !e.tunnel.is_healthy(max_silence))
                .unwrap_or(&older[0])
                .id;
            let Some(entry) = Self::take(clients, key, victim) else {
                break;
            };
            tracing::info!(%key, session = %victim, limit, "session evicted: over the per-key cap");
            self.announce_removed(key, &entry, SessionError::Evicted { limit });
            evicted.push(entry.tunnel);
        }
        evicted
    }

    fn remove(&self, key: &ClientKey, id: SessionId, reason: SessionError) -> Option<Tunnel> {
        let mut clients = self.lock();
        let entry = Self::take(&mut clients, key, id)?;
        self.announce_removed(key, &entry, reason);
        Some(entry.tunnel)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let clients = std::mem::take(
            self.clients
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for entry in clients.into_values().flatten() {
            entry.watcher.abort();
            entry.tunnel.close();
        }
    }
}

/// The per-session watcher: waits for the tunnel to end, then removes it. Holds the registry
/// weakly, so watchers do not keep a dropped registry alive.
async fn watch(registry: Weak<Inner>, key: ClientKey, id: SessionId, tunnel: Tunnel) {
    let reason = tunnel.closed().await;
    drop(tunnel);
    if let Some(inner) = registry.upgrade() {
        inner.remove(&key, id, reason);
    }
}

// === impl SessionHandle ===

/// One registered session. Dropping it changes nothing: the session stays registered until its
/// tunnel ends or it is closed.
#[derive(Clone)]
pub struct SessionHandle {
    registry: Weak<Inner>,
    key: ClientKey,
    id: SessionId,
    tunnel: Tunnel,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("key", &self.key)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The client key it is registered under.
    pub fn key(&self) -> &ClientKey {
        &self.key
    }

    /// The session itself (stats, stream count, health).
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// Removes the session from the registry at once (emitting [`RegistryEvent::Removed`] with
    /// [`SessionError::Local`] if it was still there) and closes its tunnel.
    pub fn close(&self) {
        if let Some(inner) = self.registry.upgrade() {
            inner.remove(&self.key, self.id, SessionError::Local);
        }
        self.tunnel.close();
    }
}

// === acceptor glue ===

/// Runs an [`AcceptedTunnel`] as a registered session: starts the session over its websocket,
/// registers it under its client key, and drives it in the calling task until it ends (the
/// watcher then removes it). When [`AcceptedTunnel::shutdown`] fires, the session is closed and
/// driven to its end. Use it as the body of the acceptor's tunnel callback:
///
/// ```no_run
/// # use tunnel_proto::driver::acceptor::{Acceptor, AcceptorConfig, AuthRequest, ClientKey, Reject};
/// # use tunnel_proto::driver::acceptor::text_response;
/// # use tunnel_proto::driver::registry::{Registry, serve_acceptor_tunnel};
/// # use tunnel_proto::mux::refuse_all;
/// # use tunnel_proto::{Role, SessionConfig};
/// # async fn authorize(_: AuthRequest) -> Result<ClientKey, Reject> { Err(Reject::Unauthorized) }
/// let registry = Registry::default();
/// let sessions = registry.clone();
/// let acceptor = Acceptor::new(
///     AcceptorConfig::new(["/v3/connect"]),
///     authorize,
///     move |tunnel| {
///         let registry = sessions.clone();
///         async move {
///             let config = SessionConfig::new(Role::Server);
///             let _ = serve_acceptor_tunnel(&registry, tunnel, config, refuse_all()).await;
///         }
///     },
///     |_request| async { text_response(http::StatusCode::NOT_FOUND, "no route") },
/// );
/// // `registry.dial(&key, "tcp", "10.43.0.1:443")` now reaches the agents `acceptor` serves.
/// ```
///
/// The extensions agreed in the upgrade ([`AcceptedTunnel::capabilities`]) are applied to
/// `config`.
///
/// Returns why the session ended, or the key's fault when it cannot be registered (the
/// websocket is then dropped; an authorizer that calls [`check_client_key`] answers 400
/// instead, before the upgrade).
pub async fn serve_acceptor_tunnel(
    registry: &Registry,
    accepted: AcceptedTunnel,
    mut config: SessionConfig,
    authorizer: Authorizer,
) -> Result<SessionError, InvalidClientKey> {
    let AcceptedTunnel {
        client_key,
        remote_addr,
        ws,
        shutdown,
        capabilities,
        ..
    } = accepted;
    capabilities.apply(&mut config);
    let (tunnel, driver) = Tunnel::new(ws, config, authorizer);
    let handle = match registry.register(client_key.clone(), tunnel.clone()) {
        Ok(handle) => handle,
        Err(err) => {
            tracing::warn!(remote = %remote_addr, key = %client_key, error = %err, "tunnel refused");
            return Err(err);
        }
    };
    tokio::pin!(driver);
    let reason = tokio::select! {
        reason = &mut driver => reason,
        () = shutdown.cancelled() => {
            tunnel.close();
            driver.await
        }
    };
    tracing::info!(remote = %remote_addr, key = %client_key, session = %handle.id(), %reason, "tunnel ended");
    Ok(reason)
}
