//! Idle upstream HTTP/1.1 connections, kept per target so that a client's next request skips
//! the tunnel dial and the TLS handshake (two round trips through the agent).
//!
//! A connection is reused only when it is idle (its last response fully read), not closed,
//! younger than the idle timeout, and the tunnel session it was opened on is the one a dial
//! would take now (registered, healthy, the newest such): a pooled connection must not outlive
//! the registry's protection against silent sessions (a stream through one would hang instead
//! of failing at once), nor keep traffic on an agent's older session once it has reconnected
//! or a newer replica has connected. Connections that fail this are dropped. Upgrades always get a
//! fresh connection, since the connection becomes the upgraded stream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;
use tunnel_proto::driver::acceptor::ClientKey;
use tunnel_proto::driver::registry::{Registry, SessionHandle, SessionId};

use super::Counted;

/// The client half of one upstream HTTP/1.1 connection.
pub(crate) type Sender = SendRequest<Counted<Incoming>>;

/// Default for how long an idle connection is kept: 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for how many connections are kept per target: 8.
pub const DEFAULT_MAX_PER_TARGET: usize = 8;

struct Idle {
    sender: Sender,
    session: SessionId,
    since: Instant,
}

/// The pool. One per server, shared by the proxies.
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    idle_timeout: Duration,
    max_per_target: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle_timeout", &self.idle_timeout)
            .field("max_per_target", &self.max_per_target)
            .finish_non_exhaustive()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_PER_TARGET)
    }
}

/// The sessions of `key` a dial may use: not ended and healthy, newest first, in the order
/// [`Registry::open`] tries them.
pub(crate) fn usable_sessions(
    registry: &Registry,
    key: &ClientKey,
) -> impl Iterator<Item = SessionHandle> {
    let max_silence = registry.config().max_silence();
    registry
        .sessions(key)
        .into_iter()
        .rev()
        .filter(move |s| s.tunnel().close_reason().is_none() && s.tunnel().is_healthy(max_silence))
}

/// The session a dial through `key` uses now: the newest usable one, as [`Registry::open`]
/// picks it.
pub(crate) fn current_session(registry: &Registry, key: &ClientKey) -> Option<SessionId> {
    usable_sessions(registry, key).next().map(|s| s.id())
}

/// How often [`gone_silent`] looks at the session.
const SILENCE_POLL: Duration = Duration::from_millis(250);

/// Resolves once `session` (or, with `None`, the session a dial through `key` would use now)
/// is no longer registered and healthy: the registry's silence threshold passed with nothing
/// heard from the agent, or the session ended.
///
/// A request waiting for its response head on a stream through a session that went silent
/// would otherwise wait until the keepalive gives up on the session (60 s): a link cut under
/// a pooled connection, or a dial sent just before the cut. Raced against that wait, it ends
/// the request with a 503 as soon as the registry stops offering the session to new requests.
pub(crate) async fn gone_silent(registry: &Registry, key: &ClientKey, session: Option<SessionId>) {
    let Some(id) = session.or_else(|| current_session(registry, key)) else {
        return;
    };
    while session_healthy(registry, key, id) {
        tokio::time::sleep(SILENCE_POLL).await;
    }
}

fn session_healthy(registry: &Registry, key: &ClientKey, id: SessionId) -> bool {
    let max_silence = registry.config().max_silence();
    registry.sessions(key).iter().any(|s| {
        s.id() == id && s.tunnel().close_reason().is_none() && s.tunnel().is_healthy(max_silence)
    })
}

impl Pool {
    /// A pool keeping connections idle for at most `idle_timeout`, at most `max_per_target`
    /// per target.
    pub fn new(idle_timeout: Duration, max_per_target: usize) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            max_per_target: max_per_target.max(1),
        }
    }

    /// Takes a reusable connection to `target` opened through `key`'s tunnel, if there is one.
    /// Connections still busy (a response body streaming) stay; dead or stale ones are dropped.
    pub(crate) fn checkout(
        &self,
        target: &str,
        registry: &Registry,
        key: &ClientKey,
    ) -> Option<(Sender, SessionId)> {
        // Only connections through the session a dial would take now: a newer session means
        // the agent reconnected (its older socket may be dead) or a newer replica took over.
        let current = current_session(registry, key);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(target)?;
        let now = Instant::now();
        let mut found = None;
        let mut keep = Vec::with_capacity(list.len());
        // Newest first: the most recently used connection is the likeliest to be alive.
        while let Some(entry) = list.pop() {
            let usable = !entry.sender.is_closed()
                && now.saturating_duration_since(entry.since) <= self.idle_timeout
                && Some(entry.session) == current;
            if !usable {
                continue;
            }
            if found.is_none() && entry.sender.is_ready() {
                found = Some((entry.sender, entry.session));
            } else {
                keep.push(entry);
            }
        }
        keep.reverse();
        *list = keep;
        if list.is_empty() {
            idle.remove(target);
        }
        found
    }

    /// Returns a connection after its response head arrived; it becomes reusable once the
    /// response body has been read.
    pub(crate) fn checkin(&self, target: String, session: SessionId, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(target).or_default();
        list.push(Idle {
            sender,
            session,
            since: Instant::now(),
        });
        if list.len() > self.max_per_target {
            list.remove(0);
        }
    }

    /// Connections held, over all targets (busy ones included).
    pub fn len(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Connections held after dropping the closed and expired ones (for the metrics).
    pub fn live(&self) -> usize {
        self.prune();
        self.len()
    }

    /// Whether the pool holds no connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops closed and expired connections (called periodically, so targets nobody asks for
    /// any more do not keep theirs).
    pub fn prune(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in idle.values_mut() {
            list.retain(|e| {
                !e.sender.is_closed() && now.saturating_duration_since(e.since) <= self.idle_timeout
            });
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Drops every connection to targets whose key starts with `prefix` (a cluster deleted).
    pub fn forget(&self, prefix: &str) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(prefix));
    }
}
