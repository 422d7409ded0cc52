//! What is live, and on whose authority: every tunnel session and every proxied request is
//! tied to the credential that let it in, and is cut when that credential goes.
//!
//! Authentication happens once, when a tunnel or a request starts; a watch, an exec or a
//! tunnel can then run for days. Revoking the credential must end them, not only refuse the
//! next attempt:
//!
//! | live thing | authority | cut when |
//! |---|---|---|
//! | tunnel session | a cluster's registration token | the token is deleted, or the cluster is |
//! | proxied request (watch, logs -f, exec, port-forward, docker attach) | a user's API token and, unless admin, a grant | the token is revoked, expires or its user is deleted; the grant is withdrawn; the cluster is deleted |
//!
//! Each live thing registers here with a [`CancellationToken`] that its driver obeys (the
//! tunnel's session closes; the proxied body or spliced upgrade ends). The [`run`] loop
//! reconciles them against the store whenever the store changes: at once after a change made
//! through this process's API (which calls [`Live::changed`]), and within [`POLL_INTERVAL`]
//! after a change by another process (the admin CLI writes the database directly), seen by
//! polling [`crate::store::Store::revision`]. A reconcile checks each distinct credential once,
//! so its cost is the number of distinct tokens, not of streams.
//!
//! Registrations are dropped with the [`Guard`] their owner holds, so the table only ever lists
//! what is running.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::ClientKey;

use crate::app::SharedApp;
use crate::store::{Store, StoreError};

/// How often the store's revision is polled for changes made by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The authority a live thing runs on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Authority {
    /// A tunnel session authenticated with a cluster's registration token.
    Tunnel {
        /// The registration token as the agent sent it.
        token: String,
        /// The cluster it belonged to then.
        cluster_id: String,
    },
    /// A proxied request of a user.
    Request {
        /// The user's bearer value (`token-xxxxx:<secret>`).
        bearer: String,
        /// The cluster the request reaches, once known ([`Guard::set_cluster`]).
        cluster_id: Option<String>,
    },
}

#[derive(Debug)]
struct Entry {
    authority: Authority,
    /// Names the thing in the log line when it is cut.
    what: String,
    cut: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

/// The table of live tunnels and requests. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Live {
    shared: Arc<Shared>,
}

/// Keeps a live thing registered; dropping it removes the registration (the thing ended).
#[derive(Debug)]
pub struct Guard {
    shared: Arc<Shared>,
    id: u64,
}

impl Guard {
    /// Names the cluster a request registered with [`Live::request`] reaches, once it is
    /// known (before its grant is checked, so a grant withdrawn in between is still seen).
    pub fn set_cluster(&self, cluster: &str) {
        let mut inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Entry {
            authority: Authority::Request { cluster_id, .. },
            ..
        }) = inner.entries.get_mut(&self.id)
        {
            *cluster_id = Some(cluster.to_owned());
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .remove(&self.id);
    }
}

impl Live {
    fn register(&self, authority: Authority, what: String, cut: CancellationToken) -> Guard {
        let mut inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.next_id += 1;
        let id = inner.next_id;
        inner.entries.insert(
            id,
            Entry {
                authority,
                what,
                cut,
            },
        );
        Guard {
            shared: self.shared.clone(),
            id,
        }
    }

    /// Registers a tunnel session of `key`, let in by registration token `token` of
    /// `cluster_id`: the returned token (a child of `shutdown`) is cancelled when the
    /// credential goes. The session must close when it fires.
    pub fn tunnel(
        &self,
        key: &ClientKey,
        token: &str,
        cluster_id: &str,
        shutdown: &CancellationToken,
    ) -> (CancellationToken, Guard) {
        let cut = shutdown.child_token();
        let guard = self.register(
            Authority::Tunnel {
                token: token.to_owned(),
                cluster_id: cluster_id.to_owned(),
            },
            format!("tunnel session of {key}"),
            cut.clone(),
        );
        (cut, guard)
    }

    /// Registers a proxied request of a user (bearer value `bearer`) before it is
    /// authenticated, so that no revocation committed after its authentication can miss it:
    /// the returned token is cancelled when the bearer no longer authenticates or, once
    /// [`Guard::set_cluster`] named it, the user may no longer reach the cluster.
    pub fn request(&self, bearer: &str, what: String) -> (CancellationToken, Guard) {
        let cut = CancellationToken::new();
        let guard = self.register(
            Authority::Request {
                bearer: bearer.to_owned(),
                cluster_id: None,
            },
            what,
            cut.clone(),
        );
        (cut, guard)
    }

    /// Says that credentials, grants or clusters may have changed (an API mutation of this
    /// process): the next reconcile runs at once.
    pub fn changed(&self) {
        self.shared.changed.notify_one();
    }

    /// How many tunnels and requests are registered.
    pub fn len(&self) -> usize {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The distinct authorities registered now.
    fn authorities(&self) -> HashSet<Authority> {
        let inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .entries
            .values()
            .map(|e| e.authority.clone())
            .collect()
    }

    /// Cuts everything running on `authority`; returns what was cut.
    fn cut(&self, authority: &Authority) -> Vec<String> {
        let inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .entries
            .values()
            .filter(|e| &e.authority == authority && !e.cut.is_cancelled())
            .map(|e| {
                e.cut.cancel();
                e.what.clone()
            })
            .collect()
    }
}

/// Why an authority no longer holds.
fn revoked(store: &dyn Store, authority: &Authority) -> Result<Option<String>, StoreError> {
    Ok(match authority {
        Authority::Tunnel { token, cluster_id } => {
            match store.cluster_for_registration_token(token)? {
                Some(owner) if &owner == cluster_id => None,
                _ if store.cluster(cluster_id)?.is_none() => {
                    Some(format!("cluster {cluster_id} was deleted"))
                }
                _ => Some(format!(
                    "the registration token it used was deleted from cluster {cluster_id}"
                )),
            }
        }
        Authority::Request { bearer, cluster_id } => match store.authenticate(bearer)? {
            None => {
                Some("the user's API token was revoked or expired, or its user deleted".to_owned())
            }
            Some(user) => match cluster_id {
                None => None,
                Some(cluster_id) if store.cluster(cluster_id)?.is_none() => {
                    Some(format!("cluster {cluster_id} was deleted"))
                }
                Some(cluster_id) if !user.admin && !store.is_granted(&user.id, cluster_id)? => {
                    Some(format!(
                        "user {}'s grant on cluster {cluster_id} was withdrawn",
                        user.name
                    ))
                }
                Some(_) => None,
            },
        },
    })
}

/// Checks every live authority against the store and cuts what lost it; closes the tunnels
/// of clusters that no longer exist (even a session registered some other way). Returns how
/// many things were cut. Blocking: call it off the runtime.
pub fn reconcile(app: &SharedApp, store: &dyn Store) -> Result<usize, StoreError> {
    let mut cut = 0;
    for authority in app.live.authorities() {
        if let Some(reason) = revoked(store, &authority)? {
            for what in app.live.cut(&authority) {
                cut += 1;
                tracing::info!(target: "audit", what = %what, reason = %reason, "cut: its authority was revoked");
            }
        }
    }
    let clusters: HashSet<String> = store.clusters()?.into_iter().map(|c| c.id).collect();
    for key in app.registry.list_clients() {
        let k = key.as_str();
        let cluster = k
            .strip_prefix(crate::tunnel_auth::STV_BEARER_PREFIX)
            .unwrap_or_else(|| k.split(':').next().unwrap_or(k));
        if !clusters.contains(cluster) {
            let n = app.registry.remove_key(&key);
            cut += n;
            tracing::info!(target: "audit", %key, sessions = n, "closed the tunnels of a deleted cluster");
        }
    }
    Ok(cut)
}

/// Reconciles at once after [`Live::changed`], and whenever the store's revision moves
/// (polled every [`POLL_INTERVAL`]), until `shutdown`. Store calls run in the store's read
/// lane, off the runtime.
pub async fn run(app: SharedApp, shutdown: CancellationToken) {
    let mut last_revision = None;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let notified = tokio::select! {
            () = shutdown.cancelled() => return,
            () = app.live.shared.changed.notified() => true,
            _ = ticker.tick() => false,
        };
        let task_app = app.clone();
        let previous = last_revision;
        let outcome = app
            .store
            .read_with(move |store| {
                let revision = store.revision()?;
                if notified || previous != Some(revision) {
                    reconcile(&task_app, store)?;
                }
                Ok::<_, StoreError>(revision)
            })
            .await
            .and_then(|r| r);
        match outcome {
            Ok(revision) => last_revision = Some(revision),
            Err(err) => {
                tracing::warn!(error = %err, "cannot check live tunnels and requests against the store")
            }
        }
    }
}
