//! [`StoreHandle`]: the async face of a [`Store`] for code on the runtime.
//!
//! Each call runs on tokio's blocking pool, in one of two lanes: reads (as many at once as the
//! store has reader connections) and writes (one at a time: there is one writer). A lane admits
//! at most `running + queued` calls; the next one fails at once with [`StoreError::Busy`], so a
//! database locked by another process for seconds costs a bounded number of waiting calls and
//! then quick 503s, never an unbounded queue nor a stalled runtime worker. Reads never wait
//! behind writes: a burst of writes stuck on a lock fills only the write lane.
//!
//! Successful API-token authentications are noted in memory; [`StoreHandle::flush_token_uses`]
//! writes them (coalesced: one row update per token per flush) through the write lane, every
//! [`LAST_USE_FLUSH_INTERVAL`] by a [`TokenUseFlusher`] and once more at shutdown. So the
//! request path only reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{
    ApiToken, Cluster, ClusterAgentReport, Grant, Node, Presence, RegistrationToken, Result,
    ServerPki, Store, StoreError, TunnelEnd, User, now_unix,
};

/// How often noted API-token uses are written to the store.
pub const LAST_USE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Bounds of a [`StoreHandle`]'s lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Read calls running at once (default 4, the SQLite store's reader connections: more would only wait
    /// for a reader connection on a blocking thread).
    pub reads_running: usize,
    /// Write calls running at once (default 1: there is one writer connection).
    pub writes_running: usize,
    /// Calls of one lane waiting for their turn beyond those running (default 256); the next
    /// fails with [`StoreError::Busy`].
    pub queued: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            reads_running: super::sqlite::READERS,
            writes_running: 1,
            queued: 256,
        }
    }
}

/// Which lane a call runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneKind {
    Read,
    /// A read the store may answer from memory ([`Store::reads_from_memory`]): then it runs
    /// inline, without a blocking thread; otherwise in the read lane.
    Cached,
    Write,
}

/// One lane: a semaphore of running calls and a count of admitted (running or waiting) ones.
#[derive(Debug)]
struct Lane {
    name: &'static str,
    running: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    limit: usize,
}

impl Lane {
    fn new(name: &'static str, running: usize, queued: usize) -> Self {
        let running = running.max(1);
        Self {
            name,
            running: Arc::new(Semaphore::new(running)),
            admitted: Arc::new(AtomicUsize::new(0)),
            limit: running + queued,
        }
    }
}

/// Gives an admission back when the call ends (or is abandoned before it runs).
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The async face of a [`Store`]; a cheap clone. See the module docs.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    reads: Lane,
    writes: Lane,
    /// Token id → Unix seconds of its last successful authentication, not yet written.
    uses: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("reads", &self.inner.reads)
            .field("writes", &self.inner.writes)
            .finish_non_exhaustive()
    }
}

/// An owned copy of a borrowed argument, moved to the blocking thread.
trait OwnedArg: Send + 'static {
    type Ref<'a>
    where
        Self: 'a;
    fn get(&self) -> Self::Ref<'_>;
}

/// A borrowed argument as the trait takes it, and its owned copy.
trait IntoOwnedArg {
    type Owned: OwnedArg;
    fn into_owned_arg(self) -> Self::Owned;
}

macro_rules! owned_arg {
    ($( $borrowed:ty => $owned:ty, |$v:ident| $get:expr, |$b:ident| $own:expr; )*) => {$(
        impl OwnedArg for $owned {
            type Ref<'a> = $borrowed;
            fn get(&self) -> Self::Ref<'_> {
                let $v = self;
                $get
            }
        }
        impl<'a> IntoOwnedArg for $borrowed {
            type Owned = $owned;
            fn into_owned_arg(self) -> $owned {
                let $b = self;
                $own
            }
        }
    )*};
}

owned_arg! {
    &'a str => String, |v| v.as_str(), |b| b.to_owned();
    Option<&'a str> => Option<String>, |v| v.as_deref(), |b| b.map(str::to_owned);
    &'a [String] => Vec<String>, |v| v.as_slice(), |b| b.to_vec();
    &'a Node => Node, |v| v, |b| b.clone();
    &'a ClusterAgentReport => ClusterAgentReport, |v| v, |b| b.clone();
    &'a ServerPki => ServerPki, |v| v, |b| b.clone();
    &'a [(String, i64)] => Vec<(String, i64)>, |v| v.as_slice(), |b| b.to_vec();
    &'a TunnelEnd => TunnelEnd, |v| v, |b| b.clone();
}

impl OwnedArg for bool {
    type Ref<'a> = bool;
    fn get(&self) -> bool {
        *self
    }
}

impl IntoOwnedArg for bool {
    type Owned = bool;
    fn into_owned_arg(self) -> bool {
        self
    }
}

impl OwnedArg for i64 {
    type Ref<'a> = i64;
    fn get(&self) -> i64 {
        *self
    }
}

impl IntoOwnedArg for i64 {
    type Owned = i64;
    fn into_owned_arg(self) -> i64 {
        self
    }
}

impl OwnedArg for Option<i64> {
    type Ref<'a> = Option<i64>;
    fn get(&self) -> Option<i64> {
        *self
    }
}

impl IntoOwnedArg for Option<i64> {
    type Owned = Option<i64>;
    fn into_owned_arg(self) -> Option<i64> {
        self
    }
}

/// Async mirrors of [`Store`] methods: same names and arguments, run in a lane.
macro_rules! mirror {
    ($lane:ident: $( fn $name:ident(&self $(, $arg:ident: $ty:ty)* ) -> $ret:ty; )*) => {$(
        #[doc = concat!("[`Store::", stringify!($name), "`], off the runtime (", stringify!($lane), " lane).")]
        pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
            $( let $arg = IntoOwnedArg::into_owned_arg($arg); )*
            self.run(LaneKind::$lane, move |store| store.$name($( OwnedArg::get(&$arg) ),*))
                .await?
        }
    )*};
}

impl StoreHandle {
    /// A handle with the default [`StoreLimits`].
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_limits(store, StoreLimits::default())
    }

    /// A handle with these bounds.
    pub fn with_limits(store: Arc<dyn Store>, limits: StoreLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                reads: Lane::new("read", limits.reads_running, limits.queued),
                writes: Lane::new("write", limits.writes_running, limits.queued),
                uses: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The synchronous store (for code already off the runtime).
    pub fn sync(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Runs `f` on the store in the read lane: for several reads in a row, or code that takes
    /// a `&dyn Store`. `f` must only read.
    pub async fn read_with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> T + Send + 'static,
    {
        self.run(LaneKind::Read, f).await
    }

    /// Runs `f` on the store in the write lane.
    pub async fn write_with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> T + Send + 'static,
    {
        self.run(LaneKind::Write, f).await
    }

    /// Admits the call to its lane (or fails with [`StoreError::Busy`]), waits for its turn,
    /// and runs it on the blocking pool. A caller that gives up does not cancel a call already
    /// running: it keeps its place in the bound until it ends.
    async fn run<T, F>(&self, kind: LaneKind, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> T + Send + 'static,
    {
        let lane = match kind {
            LaneKind::Cached if self.inner.store.reads_from_memory() => {
                return Ok(f(self.inner.store.as_ref()));
            }
            LaneKind::Read | LaneKind::Cached => &self.inner.reads,
            LaneKind::Write => &self.inner.writes,
        };
        if lane.admitted.fetch_add(1, Ordering::AcqRel) >= lane.limit {
            lane.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Busy {
                lane: lane.name,
                limit: lane.limit,
            });
        }
        let admitted = Admitted(lane.admitted.clone());
        let permit = lane
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("the lane's semaphore is never closed");
        let store = self.inner.store.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _held = (permit, admitted);
            f(store.as_ref())
        });
        match task.await {
            Ok(value) => Ok(value),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(StoreError::Busy {
                lane: lane.name,
                limit: lane.limit,
            }),
        }
    }

    mirror! { Read:
        fn pki(&self) -> Option<ServerPki>;
        fn setting(&self, name: &str) -> Option<String>;
    }

    mirror! { Cached:
        fn cluster(&self, id: &str) -> Option<Cluster>;
        fn cluster_by_id_or_name(&self, id_or_name: &str) -> Option<Cluster>;
        fn clusters(&self) -> Vec<Cluster>;
        fn cluster_for_registration_token(&self, token: &str) -> Option<String>;
        fn registration_tokens(&self, cluster_id: &str) -> Vec<RegistrationToken>;
        fn node(&self, cluster_id: &str, id: &str) -> Option<Node>;
        fn nodes_named(&self, id: &str) -> Vec<Node>;
        fn nodes(&self, cluster_id: Option<&str>) -> Vec<Node>;
        fn user(&self, id: &str) -> Option<User>;
        fn user_by_id_or_name(&self, id_or_name: &str) -> Option<User>;
        fn users(&self) -> Vec<User>;
        fn grants(&self) -> Vec<Grant>;
        fn is_granted(&self, user_id: &str, cluster_id: &str) -> bool;
        fn presence(&self, end: &TunnelEnd) -> Option<Presence>;
        fn revision(&self) -> u64;
    }

    mirror! { Write:
        fn create_cluster(&self, name: &str) -> (Cluster, RegistrationToken);
        fn delete_cluster(&self, id: &str) -> bool;
        fn create_registration_token(&self, cluster_id: &str) -> RegistrationToken;
        fn delete_registration_token(&self, cluster_id: &str, token: &str) -> bool;
        fn set_node_docker_socket(&self, cluster_id: &str, id: &str, socket: &str) -> bool;
        fn delete_node(&self, cluster_id: &str, id: &str) -> bool;
        fn create_user(&self, name: &str, groups: &[String], admin: bool) -> User;
        fn delete_user(&self, id: &str) -> bool;
        fn create_api_token(&self, user_id: &str, description: &str, expires_at: Option<i64>) -> (ApiToken, String);
        fn record_api_token_uses(&self, uses: &[(String, i64)]) -> ();
        fn revoke_api_token(&self, id: &str) -> bool;
        fn grant(&self, user_id: &str, cluster_id: &str) -> Grant;
        fn revoke_grant(&self, user_id: &str, cluster_id: &str) -> bool;
        fn set_pki(&self, pki: &ServerPki) -> ();
        fn set_setting(&self, name: &str, value: &str) -> ();
        fn record_presence(&self, end: &TunnelEnd, connected: bool, replica: &str, peer: &str, now: i64) -> bool;
    }

    /// [`super::resolve_node`]: the node a user-facing reference names.
    pub async fn resolve_node(&self, reference: &str) -> Result<Option<Node>> {
        let reference = reference.to_owned();
        self.read_with(move |s| super::resolve_node(s, &reference))
            .await?
    }

    // === agents' reports: written only when changed ===

    /// [`Store::set_cluster_agent_report`]; an unchanged report (every reconnect of a cluster
    /// agent) is answered in the read lane, so it does not wait behind writes.
    pub async fn set_cluster_agent_report(
        &self,
        id: &str,
        report: &ClusterAgentReport,
    ) -> Result<bool> {
        let stored = self.cluster(id).await?;
        let unchanged = stored.is_none_or(|c| {
            c.api_endpoint.as_deref() == Some(report.api_endpoint.as_str())
                && c.ca_cert.as_deref() == Some(report.ca_cert.as_str())
                && c.sa_token.as_deref() == Some(report.sa_token.as_str())
        });
        if unchanged {
            return Ok(false);
        }
        let (id, report) = (id.to_owned(), report.clone());
        self.run(LaneKind::Write, move |store| {
            store.set_cluster_agent_report(&id, &report)
        })
        .await?
    }

    /// [`Store::upsert_node`]; a node re-registering unchanged (every reconnect of a node
    /// agent) is answered in the read lane, so it does not wait behind writes.
    pub async fn upsert_node(&self, node: &Node) -> Result<()> {
        let stored = self.node(&node.cluster_id, &node.id).await?;
        if stored.is_some_and(|n| n.hostname == node.hostname && n.params == node.params) {
            return Ok(());
        }
        let node = node.clone();
        self.run(LaneKind::Write, move |store| store.upsert_node(&node))
            .await?
    }

    // === API tokens: reads on the request path, uses noted in memory ===

    /// [`Store::authenticate`] (read lane, or inline from memory); a success is noted as the token's last use, written
    /// by the next [`StoreHandle::flush_token_uses`].
    pub async fn authenticate(&self, bearer: &str) -> Result<Option<User>> {
        let owned = bearer.to_owned();
        let user = self
            .run(LaneKind::Cached, move |store| store.authenticate(&owned))
            .await??;
        if user.is_some()
            && let Some((id, _)) = bearer.split_once(':')
        {
            self.note_token_use(id, now_unix());
        }
        Ok(user)
    }

    /// [`Store::api_tokens`] (read lane), with uses noted since the last flush.
    pub async fn api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiToken>> {
        let user_id = user_id.map(str::to_owned);
        let mut tokens = self
            .run(LaneKind::Read, move |store| {
                store.api_tokens(user_id.as_deref())
            })
            .await??;
        let uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
        for t in &mut tokens {
            if let Some(&at) = uses.get(&t.id) {
                t.last_used_at = t.last_used_at.max(Some(at));
            }
        }
        Ok(tokens)
    }

    /// Notes a use of token `id` at `at` (Unix seconds), kept in memory until the next flush.
    pub fn note_token_use(&self, id: &str, at: i64) {
        let mut uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
        match uses.get_mut(id) {
            Some(t) => *t = (*t).max(at),
            None => {
                uses.insert(id.to_owned(), at);
            }
        }
    }

    /// Writes the uses noted since the last flush, in one transaction through the write lane;
    /// on failure they are kept for the next flush. Returns how many tokens were written.
    pub async fn flush_token_uses(&self) -> Result<usize> {
        let batch: Vec<(String, i64)> = {
            let mut uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
            uses.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        let written = self
            .run(LaneKind::Write, {
                let batch = batch.clone();
                move |store| store.record_api_token_uses(&batch)
            })
            .await
            .and_then(|r| r);
        match written {
            Ok(()) => Ok(n),
            Err(err) => {
                for (id, at) in batch {
                    self.note_token_use(&id, at);
                }
                Err(err)
            }
        }
    }

    /// Uses noted and not yet written (tests, metrics).
    pub fn pending_token_uses(&self) -> usize {
        self.inner
            .uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Writes noted API-token uses every interval until cancelled (see
/// [`StoreHandle::flush_token_uses`]); the final flush at shutdown is the caller's.
#[derive(Debug)]
pub struct TokenUseFlusher {
    store: StoreHandle,
    interval: Duration,
}

impl TokenUseFlusher {
    /// A flusher of `store` every `interval` ([`LAST_USE_FLUSH_INTERVAL`] in the server).
    pub fn new(store: StoreHandle, interval: Duration) -> Self {
        Self { store, interval }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(err) = self.store.flush_token_uses().await {
                tracing::warn!(error = %err, pending = self.store.pending_token_uses(), "cannot record API token uses yet; retrying at the next flush");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn handle(limits: StoreLimits) -> StoreHandle {
        StoreHandle::with_limits(Arc::new(SqliteStore::open_in_memory().unwrap()), limits)
    }

    #[tokio::test]
    async fn mirrors_reach_the_store() {
        let store = handle(StoreLimits::default());
        let (c, t) = store.create_cluster("prod").await.unwrap();
        assert_eq!(
            store
                .cluster_for_registration_token(&t.token)
                .await
                .unwrap(),
            Some(c.id.clone())
        );
        assert_eq!(store.nodes(Some(c.id.as_str())).await.unwrap(), vec![]);
        let u = store.create_user("bob", &[], true).await.unwrap();
        assert!(store.grant(&u.id, &c.id).await.is_ok());
        assert!(store.is_granted(&u.id, &c.id).await.unwrap());
    }

    /// Starts a call that holds a place of `kind`'s lane until the returned sender is used, and
    /// waits until it runs.
    async fn occupy(
        store: &StoreHandle,
        kind: LaneKind,
    ) -> (
        tokio::task::JoinHandle<Result<()>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let store = store.clone();
        let held = tokio::spawn(async move {
            store
                .run(kind, move |_| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
                .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        (held, release_tx)
    }

    #[tokio::test]
    async fn a_full_lane_answers_busy_at_once() {
        let store = handle(StoreLimits {
            reads_running: 1,
            writes_running: 1,
            queued: 1,
        });
        // One read runs and blocks; a second waits for its turn: the lane (1 + 1) is full.
        let (running, release_tx) = occupy(&store, LaneKind::Read).await;
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.clusters().await }
        });
        // The waiting call is admitted once its task has run up to the semaphore.
        while store.inner.reads.admitted.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let busy = store.users().await;
        assert!(
            matches!(
                busy,
                Err(StoreError::Busy {
                    lane: "read",
                    limit: 2
                })
            ),
            "{busy:?}"
        );
        // The write lane is separate: writes are admitted while reads are full.
        store.create_user("w", &[], false).await.unwrap();
        release_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), vec![]);
        // And the lane admits again.
        assert_eq!(store.users().await.unwrap().len(), 1);
        assert_eq!(store.inner.reads.admitted.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn unchanged_agent_reports_do_not_wait_for_the_write_lane() {
        let store = handle(StoreLimits {
            reads_running: 1,
            writes_running: 1,
            queued: 0,
        });
        let (c, _) = store.create_cluster("prod").await.unwrap();
        let report = ClusterAgentReport {
            api_endpoint: "https://10.43.0.1:443".into(),
            ca_cert: "Y2E=".into(),
            sa_token: "jwt".into(),
        };
        assert!(
            store
                .set_cluster_agent_report(&c.id, &report)
                .await
                .unwrap()
        );
        let node = Node {
            id: "m-1".into(),
            cluster_id: c.id.clone(),
            hostname: "n1".into(),
            docker_socket: crate::store::DEFAULT_DOCKER_SOCKET.into(),
            created_at: 1,
            params: serde_json::json!({"requestedHostname": "n1"}),
        };
        store.upsert_node(&node).await.unwrap();
        // A write holds the only place of the write lane.
        let (writing, release_tx) = occupy(&store, LaneKind::Write).await;
        // Unchanged: answered by reads. Changed: the full write lane says so.
        assert!(
            !store
                .set_cluster_agent_report(&c.id, &report)
                .await
                .unwrap()
        );
        store.upsert_node(&node).await.unwrap();
        let changed = ClusterAgentReport {
            sa_token: "jwt-2".into(),
            ..report.clone()
        };
        assert!(matches!(
            store.set_cluster_agent_report(&c.id, &changed).await,
            Err(StoreError::Busy { lane: "write", .. })
        ));
        release_tx.send(()).unwrap();
        writing.await.unwrap().unwrap();
        assert!(
            store
                .set_cluster_agent_report(&c.id, &changed)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn token_uses_are_noted_then_flushed() {
        let store = handle(StoreLimits::default());
        let u = store.create_user("alice", &[], false).await.unwrap();
        let (t, bearer) = store.create_api_token(&u.id, "t", None).await.unwrap();
        assert_eq!(store.authenticate(&bearer).await.unwrap(), Some(u.clone()));
        // Noted in memory and shown by the handle, not yet written.
        assert_eq!(store.pending_token_uses(), 1);
        let stored = store.sync().api_tokens(None).unwrap();
        assert_eq!(stored[0].last_used_at, None);
        let shown = store.api_tokens(Some(&u.id)).await.unwrap();
        let used = shown[0].last_used_at.expect("last use shown");
        assert!((now_unix() - used).abs() <= 2);
        // A wrong secret is not a use.
        store
            .authenticate(&format!("{}:wrong", t.id))
            .await
            .unwrap();
        // Two uses of one token make one row update.
        store.note_token_use(&t.id, used + 1);
        assert_eq!(store.flush_token_uses().await.unwrap(), 1);
        assert_eq!(store.pending_token_uses(), 0);
        let stored = store.sync().api_tokens(None).unwrap();
        assert_eq!(stored[0].last_used_at, Some(used + 1));
        // An older use does not move it back; an unknown token is ignored.
        store.note_token_use(&t.id, used - 100);
        store.note_token_use("token-zzzzz", used);
        assert_eq!(store.flush_token_uses().await.unwrap(), 2);
        let stored = store.sync().api_tokens(None).unwrap();
        assert_eq!(stored[0].last_used_at, Some(used + 1));
        assert_eq!(store.flush_token_uses().await.unwrap(), 0);
    }
}
