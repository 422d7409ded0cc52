//! [`KubeStore`]: the store in a Kubernetes apiserver (and so etcd), for running several server
//! replicas on a management cluster, as Rancher keeps its state in custom resources.
//!
//! ```text
//!   Store call (blocking thread) ──▶ KubeStore ──spawn──▶ its own runtime ──▶ apiserver
//!                                      │                         ▲
//!            reads: the caches ◀───────┘    watch (one per kind) │  writes: create / patch /
//!                                            feeds the caches    │  replace with resourceVersion
//! ```
//!
//! - **Reads** come from watch-fed caches (`kube_runtime::reflector`), one per kind, so the
//!   request path (bearer → token → user, grant, registration token) is a hash lookup, never a
//!   round trip; the object names are chosen so that every such lookup is by name ([`crd`]).
//! - **Writes** go to the apiserver. A read-modify-write replaces the object with the
//!   resourceVersion it read and retries on a conflict; a write then waits (bounded) until this
//!   process's cache has seen it, so a caller reads its own writes as with SQLite.
//! - **Other processes' writes** arrive through the watches within milliseconds; each event
//!   moves [`Store::revision`], which is what the server's revocation loop polls.
//! - **An apiserver restart**: the watches re-list with backoff and the caches keep serving
//!   what they had; writes fail (503 to clients) until it is back.
//!
//! The store runs its own small tokio runtime, so it can be used from the admin CLI (no
//! runtime) and from the server's blocking pool ([`super::StoreHandle`]) alike.

pub mod crd;
mod seal;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;

use self::crd::{
    AgentReport, Cluster as ClusterObj, ClusterRegistrationToken, ClusterRegistrationTokenSpec,
    ClusterSpec, Grant as GrantObj, GrantSpec, LABEL_CLUSTER, LABEL_NAME_HASH, LABEL_USER,
    Node as NodeObj, NodeSpec, Token, TokenSpec, User as UserObj, UserSpec,
};
use self::seal::Sealer;
use super::{
    ApiToken, Cluster, ClusterAgentReport, Grant, ImportInto, Node, Presence, RegistrationToken,
    Result, ServerPki, Snapshot, Store, StoreError, StoredApiToken, TunnelEnd, User, now_unix,
};
use crate::tokens;

/// The Secret that holds the server's CA and key, the sealing key and the settings.
pub const STATE_SECRET: &str = "tunnel-server-state";
/// How long a write waits for this process's cache to show it.
const OWN_WRITE_VISIBLE_WITHIN: Duration = Duration::from_secs(5);
/// How long opening the store waits for the first list of every kind.
const INITIAL_SYNC_WITHIN: Duration = Duration::from_secs(30);
/// Attempts of a read-modify-write that keeps meeting conflicts.
const CONFLICT_RETRIES: usize = 16;

/// Where the store lives.
#[derive(Debug, Clone, Default)]
pub struct KubeStoreConfig {
    /// A kubeconfig file; `None`: in-cluster config, else `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the objects; `None`: the kubeconfig context's, in-cluster the pod's.
    pub namespace: Option<String>,
}

/// The store in Kubernetes custom resources. See the module docs.
pub struct KubeStore {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

struct Shared {
    namespace: String,
    /// The client of every kind's API (also the Lease's).
    client: Client,
    clusters: Kind<ClusterObj>,
    nodes: Kind<NodeObj>,
    registration_tokens: Kind<ClusterRegistrationToken>,
    users: Kind<UserObj>,
    tokens: Kind<Token>,
    grants: Kind<GrantObj>,
    secrets: Api<Secret>,
    sealer: Sealer,
    /// Moves on every watch event of any kind.
    revision: AtomicU64,
    /// Woken on every watch event.
    changed: Notify,
}

/// What every custom resource of the store is.
trait Object:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Object for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// One kind: its API and its watch-fed cache.
struct Kind<K: Object> {
    api: Api<K>,
    cache: reflector::Store<K>,
    /// The cache's writer until its watch starts.
    writer: std::sync::Mutex<Option<reflector::store::Writer<K>>>,
    namespace: String,
}

impl<K: Object> Kind<K> {
    fn get(&self, name: &str) -> Option<Arc<K>> {
        self.cache
            .get(&ObjectRef::new(name).within(&self.namespace))
    }

    fn all(&self) -> Vec<Arc<K>> {
        self.cache.state()
    }
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.shared.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's task would panic; this never blocks.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl From<kube::Error> for StoreError {
    fn from(err: kube::Error) -> Self {
        StoreError::Backend(err.to_string())
    }
}

fn is_api<F: Fn(&kube::core::Status) -> bool>(err: &kube::Error, f: F) -> bool {
    matches!(err, kube::Error::Api(s) if f(s))
}

/// First 40 hex characters of SHA-256: a label value or an object name part.
fn short_hash(data: &str) -> String {
    tokens::sha256_hex(data.as_bytes())[..40].to_owned()
}

fn registration_token_name(token: &str) -> String {
    format!("rt-{}", short_hash(token))
}

fn node_name(cluster_id: &str, machine: &str) -> String {
    format!("{cluster_id}.{machine}")
}

fn grant_name(user_id: &str, cluster_id: &str) -> String {
    format!("{user_id}.{cluster_id}")
}

fn node_obj(node: &Node) -> NodeObj {
    NodeObj {
        metadata: meta(
            &node_name(&node.cluster_id, &node.id),
            &[(LABEL_CLUSTER, &node.cluster_id)],
        ),
        spec: NodeSpec {
            cluster_id: node.cluster_id.clone(),
            machine_id: node.id.clone(),
            hostname: node.hostname.clone(),
            docker_socket: node.docker_socket.clone(),
            created_at: node.created_at,
            params: node.params.clone(),
        },
        status: None,
    }
}

/// Whether `obj` has `label` set to `value`.
fn labelled<K: Resource>(obj: &K, label: &str, value: &str) -> bool {
    obj.meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(label))
        .is_some_and(|v| v == value)
}

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

impl KubeStore {
    /// Connects, checks that the resources are installed and readable, starts the watches and
    /// waits for their first lists, and creates the state Secret (with a fresh sealing key) if
    /// there is none.
    pub fn open(config: &KubeStoreConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("starting the store's runtime: {e}")))?;
        let shared = runtime.block_on(Shared::connect(config))?;
        let shared = Arc::new(shared);
        runtime.block_on(shared.clone().start_watches())?;
        Ok(Self {
            runtime: Some(runtime),
            shared,
        })
    }

    /// The presence part of an end's status: `None` if the end does not exist, `Some(None)`
    /// if it has no status yet.
    fn presence_status(&self, end: &TunnelEnd) -> Option<Option<crd::Presence>> {
        let s = &self.shared;
        match &end.node_id {
            None => s
                .clusters
                .get(&end.cluster_id)
                .map(|c| c.status.as_ref().map(|st| st.presence.clone())),
            Some(node) => s
                .nodes
                .get(&node_name(&end.cluster_id, node))
                .map(|n| n.status.as_ref().map(|st| st.presence.clone())),
        }
    }

    /// The namespace the objects live in.
    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// The Leases of the store's namespace (the replicas' leader election,
    /// [`crate::leader`]). Its requests run on the store's client.
    pub fn leases(&self) -> Api<k8s_openapi::api::coordination::v1::Lease> {
        Api::namespaced(self.shared.client.clone(), &self.shared.namespace)
    }

    /// Runs `f` on the store's runtime and waits for it (from any thread that is not one of
    /// the store's own).
    fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.shared.clone());
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Backend("the store's runtime stopped".to_owned()))?
    }
}

impl Shared {
    async fn connect(config: &KubeStoreConfig) -> Result<Self> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    StoreError::Backend(format!("reading kubeconfig {}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| {
                        StoreError::Backend(format!("kubeconfig {}: {e}", path.display()))
                    })?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| StoreError::Backend(format!("no Kubernetes configuration: {e}")))?,
        };
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        let client = Client::try_from(kube_config)?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let sealer = Self::sealer(&secrets).await?;
        Ok(Self {
            clusters: Kind::new(&client, &namespace),
            nodes: Kind::new(&client, &namespace),
            registration_tokens: Kind::new(&client, &namespace),
            users: Kind::new(&client, &namespace),
            tokens: Kind::new(&client, &namespace),
            grants: Kind::new(&client, &namespace),
            namespace,
            client,
            secrets,
            sealer,
            revision: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    /// The sealing key from the state Secret, creating the Secret if it does not exist.
    async fn sealer(secrets: &Api<Secret>) -> Result<Sealer> {
        for _ in 0..CONFLICT_RETRIES {
            match secrets.get_opt(STATE_SECRET).await {
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                        "reading Secret {STATE_SECRET}: {e} (is the server's Role bound?)"
                    )));
                }
                Ok(Some(secret)) => {
                    if let Some(key) = secret_value(&secret, seal::KEY_FIELD) {
                        return Sealer::from_key(&key);
                    }
                    let mut secret = secret;
                    secret
                        .data
                        .get_or_insert_with(BTreeMap::new)
                        .insert(seal::KEY_FIELD.to_owned(), ByteString(Sealer::new_key()));
                    match secrets
                        .replace(STATE_SECRET, &PostParams::default(), &secret)
                        .await
                    {
                        Ok(_) => continue,
                        Err(e) if is_api(&e, |s| s.is_conflict()) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(None) => {
                    let secret = Secret {
                        metadata: meta(STATE_SECRET, &[]),
                        data: Some(BTreeMap::from([(
                            seal::KEY_FIELD.to_owned(),
                            ByteString(Sealer::new_key()),
                        )])),
                        ..Secret::default()
                    };
                    match secrets.create(&PostParams::default(), &secret).await {
                        Ok(_) => continue,
                        Err(e) if is_api(&e, |s| s.is_already_exists()) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(StoreError::Backend(format!(
            "Secret {STATE_SECRET} kept changing while reading its sealing key"
        )))
    }

    /// Starts one watch per kind feeding its cache, and waits for every first list.
    async fn start_watches(self: Arc<Self>) -> Result<()> {
        // A quick list of each kind first: a missing CRD or a missing permission is an error
        // now, not a watch retrying forever in the background.
        let probe = ListParams::default().limit(1);
        let missing = |(kind, e): (String, kube::Error)| {
            let group = crd::GROUP;
            StoreError::Backend(if is_api(&e, |s| s.code == 404) {
                format!(
                    "the resource {kind}.{group} is not served: install the CRDs \
                     (`tunnel-server crds | kubectl apply -f -`)"
                )
            } else if is_api(&e, |s| s.code == 403) {
                format!(
                    "listing {kind}.{group} is forbidden in namespace {}: bind the server's \
                     Role (deploy/server/kubernetes-store/rbac.yaml): {e}",
                    self.namespace
                )
            } else {
                format!("listing {kind}.{group}: {e}")
            })
        };
        self.clusters.probe(&probe).await.map_err(missing)?;
        self.nodes.probe(&probe).await.map_err(missing)?;
        self.registration_tokens
            .probe(&probe)
            .await
            .map_err(missing)?;
        self.users.probe(&probe).await.map_err(missing)?;
        self.tokens.probe(&probe).await.map_err(missing)?;
        self.grants.probe(&probe).await.map_err(missing)?;

        self.clusters.spawn_watch(&self);
        self.nodes.spawn_watch(&self);
        self.registration_tokens.spawn_watch(&self);
        self.users.spawn_watch(&self);
        self.tokens.spawn_watch(&self);
        self.grants.spawn_watch(&self);
        let ready = async {
            self.clusters.cache.wait_until_ready().await.ok();
            self.nodes.cache.wait_until_ready().await.ok();
            self.registration_tokens.cache.wait_until_ready().await.ok();
            self.users.cache.wait_until_ready().await.ok();
            self.tokens.cache.wait_until_ready().await.ok();
            self.grants.cache.wait_until_ready().await.ok();
        };
        tokio::time::timeout(INITIAL_SYNC_WITHIN, ready)
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "the first list of the store's resources took over {INITIAL_SYNC_WITHIN:?}"
                ))
            })
    }

    fn changed(&self) {
        self.revision.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Waits (bounded) until `done` holds of this process's caches: after a write, so that the
    /// caller's next read sees it. Then moves the revision: the cache can show a watch event
    /// before the watch task has counted it, and the caller's next [`Store::revision`] must
    /// have moved past its own write.
    async fn until_cached(&self, done: impl Fn() -> bool) {
        self.until_cached_unmoved(done).await;
        self.revision.fetch_add(1, Ordering::AcqRel);
    }

    async fn until_cached_unmoved(&self, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + OWN_WRITE_VISIBLE_WITHIN;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    "the store's cache has not shown a write after {OWN_WRITE_VISIBLE_WITHIN:?}"
                );
                return;
            }
        }
    }
}

/// The resourceVersion as a number (an etcd revision), for ordering; unparsable: last.
fn revision_of(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Whether `cached` is at least as new as `written` (resourceVersions are etcd revisions;
/// compared as numbers, else for equality).
fn at_least(cached: Option<&str>, written: Option<&str>) -> bool {
    match (cached, written) {
        (Some(c), Some(w)) => match (c.parse::<u64>(), w.parse::<u64>()) {
            (Ok(c), Ok(w)) => c >= w,
            _ => c == w,
        },
        _ => false,
    }
}

impl<K: Object> Kind<K> {
    fn new(client: &Client, namespace: &str) -> Self {
        let (cache, writer) = reflector::store::<K>();
        Self {
            api: Api::namespaced(client.clone(), namespace),
            cache,
            writer: std::sync::Mutex::new(Some(writer)),
            namespace: namespace.to_owned(),
        }
    }

    /// Starts the watch that feeds this kind's cache; every event moves the revision. The
    /// watch re-lists with backoff after errors (an apiserver restart), the cache serving
    /// what it had meanwhile.
    fn spawn_watch(&self, shared: &Arc<Shared>) {
        let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let shared = Arc::downgrade(shared);
        let stream = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        let kind = K::plural(&()).into_owned();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                match event {
                    Ok(_) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!(kind, "store watch is back");
                        }
                        shared.changed();
                    }
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(kind, %err, "store watch failed; retrying with backoff");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// Lists at most `probe`'s limit of this kind: an error names the kind.
    async fn probe(&self, probe: &ListParams) -> std::result::Result<(), (String, kube::Error)> {
        self.api
            .list_metadata(probe)
            .await
            .map(drop)
            .map_err(|e| (K::plural(&()).into_owned(), e))
    }

    /// Waits until the cache holds `name` at `written`'s resourceVersion or newer.
    async fn until_holds(&self, shared: &Shared, written: &K) {
        let name = written.name_any();
        let rv = written.resource_version();
        shared
            .until_cached(|| {
                self.get(&name)
                    .is_some_and(|c| at_least(c.resource_version().as_deref(), rv.as_deref()))
            })
            .await;
    }

    /// Waits until the cache no longer holds `name`.
    async fn until_gone(&self, shared: &Shared, name: &str) {
        shared.until_cached(|| self.get(name).is_none()).await;
    }

    /// Creates `obj`; `Ok(None)` if its name is taken.
    async fn create(&self, shared: &Shared, obj: &K) -> Result<Option<K>> {
        match self.api.create(&PostParams::default(), obj).await {
            Ok(created) => {
                self.until_holds(shared, &created).await;
                Ok(Some(created))
            }
            Err(e) if is_api(&e, |s| s.is_already_exists()) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `name`; false if there was none.
    async fn delete(&self, shared: &Shared, name: &str) -> Result<bool> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                self.until_gone(shared, name).await;
                Ok(true)
            }
            Err(e) if is_api(&e, |s| s.is_not_found()) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object with `label=value` (a collection delete, then waits for the cache).
    async fn delete_labelled(&self, shared: &Shared, label: &str, value: &str) -> Result<()> {
        let selector = format!("{label}={value}");
        self.api
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&selector),
            )
            .await?;
        shared
            .until_cached(|| {
                !self.all().iter().any(|o| {
                    o.meta()
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(label))
                        .map(String::as_str)
                        == Some(value)
                })
            })
            .await;
        Ok(())
    }

    /// A JSON merge patch of `name` (of its status with `status`); `Ok(None)` if there is none.
    async fn merge(
        &self,
        shared: &Shared,
        name: &str,
        patch: serde_json::Value,
        status: bool,
    ) -> Result<Option<K>> {
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let result = if status {
            self.api.patch_status(name, &params, &patch).await
        } else {
            self.api.patch(name, &params, &patch).await
        };
        match result {
            Ok(patched) => {
                self.until_holds(shared, &patched).await;
                Ok(Some(patched))
            }
            Err(e) if is_api(&e, |s| s.is_not_found()) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|b| b.0.clone())
}

// === conversions ===

impl Shared {
    fn cluster_of(&self, obj: &ClusterObj) -> Cluster {
        let agent = obj.status.as_ref().and_then(|s| s.agent.as_ref());
        Cluster {
            id: obj.name_any(),
            name: obj.spec.display_name.clone(),
            created_at: obj.spec.created_at,
            api_endpoint: agent.map(|a| a.api_endpoint.clone()),
            ca_cert: agent.map(|a| a.ca_cert.clone()),
            sa_token: agent.and_then(
                |a| match self.sealer.open(&a.sealed_service_account_token) {
                    Ok(token) => Some(token),
                    Err(err) => {
                        tracing::warn!(cluster = %obj.name_any(), %err, "service-account token");
                        None
                    }
                },
            ),
        }
    }

    fn registration_token_of(&self, obj: &ClusterRegistrationToken) -> Result<RegistrationToken> {
        Ok(RegistrationToken {
            token: self.sealer.open(&obj.spec.sealed_token)?,
            cluster_id: obj.spec.cluster_id.clone(),
            created_at: obj.spec.created_at,
        })
    }

    fn user_of(obj: &UserObj) -> User {
        User {
            id: obj.name_any(),
            name: obj.spec.display_name.clone(),
            groups: obj.spec.groups.clone(),
            admin: obj.spec.admin,
            created_at: obj.spec.created_at,
        }
    }

    fn node_of(obj: &NodeObj) -> Node {
        Node {
            id: obj.spec.machine_id.clone(),
            cluster_id: obj.spec.cluster_id.clone(),
            hostname: obj.spec.hostname.clone(),
            docker_socket: obj.spec.docker_socket.clone(),
            created_at: obj.spec.created_at,
            params: obj.spec.params.clone(),
        }
    }

    fn api_token_of(obj: &Token) -> ApiToken {
        ApiToken {
            id: obj.name_any(),
            user_id: obj.spec.user_id.clone(),
            description: obj.spec.description.clone(),
            created_at: obj.spec.created_at,
            revoked: obj.spec.revoked,
            expires_at: obj.spec.expires_at,
            last_used_at: obj.status.as_ref().and_then(|s| s.last_used_at),
        }
    }

    fn grant_of(obj: &GrantObj) -> Grant {
        Grant {
            user_id: obj.spec.user_id.clone(),
            cluster_id: obj.spec.cluster_id.clone(),
            created_at: obj.spec.created_at,
        }
    }

    fn cluster_exists(&self, id: &str) -> bool {
        self.clusters.get(id).is_some()
    }

    fn user_exists(&self, id: &str) -> bool {
        self.users.get(id).is_some()
    }
}

// === writes (on the store's runtime) ===

impl Shared {
    /// Creates an object under a fresh random name from `new_name`, retrying when the name
    /// is taken, then claims its display name (see [`Shared::claim_unique_name`]).
    async fn create_named<K>(
        &self,
        kind: &Kind<K>,
        what: &str,
        display_name: &str,
        new_name: fn() -> String,
        build: impl Fn(ObjectMeta) -> K,
    ) -> Result<K>
    where
        K: Object,
    {
        let taken = || StoreError::Conflict(format!("{what} {display_name:?}"));
        let name_hash = short_hash(display_name);
        let holds_name = |o: &Arc<K>| {
            o.meta()
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_NAME_HASH))
                == Some(&name_hash)
        };
        if kind.all().iter().any(holds_name) {
            return Err(taken());
        }
        for _ in 0..8 {
            let obj = build(meta(&new_name(), &[(LABEL_NAME_HASH, &name_hash)]));
            let Some(created) = kind.create(self, &obj).await? else {
                continue; // a random id collided: draw another
            };
            self.claim_unique_name(kind, &created, &name_hash)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => taken(),
                    other => other,
                })?;
            return Ok(created);
        }
        Err(StoreError::Backend(format!(
            "no free {what} id after 8 draws"
        )))
    }

    /// The apiserver makes names unique, not display names. After creating `created`, list
    /// (a quorum read) the holders of its display name: the oldest holder keeps the name, by
    /// creation time and then resourceVersion (the etcd revision of its creation, as long as
    /// it has not been modified since), and every other holder withdraws (deletes its object)
    /// and reports a conflict. Of concurrent creators exactly one keeps the name: the oldest
    /// never sees an older holder, and every later one's list sees it.
    async fn claim_unique_name<K>(&self, kind: &Kind<K>, created: &K, name_hash: &str) -> Result<()>
    where
        K: Object,
    {
        let mine = created.name_any();
        let holders = kind
            .api
            .list_metadata(&ListParams::default().labels(&format!("{LABEL_NAME_HASH}={name_hash}")))
            .await?;
        let oldest = holders.items.iter().min_by(|a, b| {
            let key = |o: &kube::core::PartialObjectMeta<K>| {
                (
                    o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    revision_of(&o.metadata),
                    o.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        if oldest.is_none_or(|o| o.metadata.name.as_deref() == Some(mine.as_str())) {
            return Ok(());
        }
        kind.delete(self, &mine).await?;
        Err(StoreError::Conflict(mine))
    }

    async fn create_cluster(&self, name: &str) -> Result<(Cluster, RegistrationToken)> {
        let now = now_unix();
        let created = self
            .create_named(
                &self.clusters,
                "cluster",
                name,
                tokens::cluster_id,
                |metadata| ClusterObj {
                    metadata,
                    spec: ClusterSpec {
                        display_name: name.to_owned(),
                        created_at: now,
                    },
                    status: None,
                },
            )
            .await?;
        let id = created.name_any();
        // The first token carries the cluster's creation time, as in SQLite's one transaction.
        let token = match self.create_registration_token(&id, now).await {
            Ok(token) => token,
            Err(err) => {
                // No cluster without a token: take it back.
                let _ = self.clusters.delete(self, &id).await;
                return Err(err);
            }
        };
        Ok((self.cluster_of(&created), token))
    }

    async fn delete_cluster(&self, id: &str) -> Result<bool> {
        // The cluster first: its agents lose it at once (a token or node whose cluster is gone
        // counts as gone); then what belonged to it.
        let existed = self.clusters.delete(self, id).await?;
        self.registration_tokens
            .delete_labelled(self, LABEL_CLUSTER, id)
            .await?;
        self.nodes.delete_labelled(self, LABEL_CLUSTER, id).await?;
        self.grants.delete_labelled(self, LABEL_CLUSTER, id).await?;
        Ok(existed)
    }

    async fn set_cluster_agent_report(
        &self,
        id: &str,
        report: &ClusterAgentReport,
    ) -> Result<bool> {
        let Some(current) = self.clusters.get(id) else {
            return Ok(false);
        };
        let before = self.cluster_of(&current);
        if before.api_endpoint.as_deref() == Some(report.api_endpoint.as_str())
            && before.ca_cert.as_deref() == Some(report.ca_cert.as_str())
            && before.sa_token.as_deref() == Some(report.sa_token.as_str())
        {
            return Ok(false);
        }
        let agent = AgentReport {
            api_endpoint: report.api_endpoint.clone(),
            ca_cert: report.ca_cert.clone(),
            sealed_service_account_token: self.sealer.seal(&report.sa_token),
        };
        Ok(self
            .clusters
            .merge(self, id, json!({ "status": { "agent": agent } }), true)
            .await?
            .is_some())
    }

    async fn create_registration_token(
        &self,
        cluster_id: &str,
        created_at: i64,
    ) -> Result<RegistrationToken> {
        if !self.cluster_exists(cluster_id) {
            return Err(StoreError::NotFound(format!("cluster {cluster_id}")));
        }
        let token = tokens::registration_token();
        let record = RegistrationToken {
            token: token.clone(),
            cluster_id: cluster_id.to_owned(),
            created_at,
        };
        if !self.put_registration_token(&record).await? {
            return Err(StoreError::Conflict("registration token".into()));
        }
        Ok(record)
    }

    /// Creates a registration token object; false if the token is taken.
    async fn put_registration_token(&self, record: &RegistrationToken) -> Result<bool> {
        let obj = ClusterRegistrationToken {
            metadata: meta(
                &registration_token_name(&record.token),
                &[(LABEL_CLUSTER, &record.cluster_id)],
            ),
            spec: ClusterRegistrationTokenSpec {
                cluster_id: record.cluster_id.clone(),
                token_hash: tokens::sha256_hex(record.token.as_bytes()),
                sealed_token: self.sealer.seal(&record.token),
                created_at: record.created_at,
            },
        };
        Ok(self.registration_tokens.create(self, &obj).await?.is_some())
    }

    async fn delete_registration_token(&self, cluster_id: &str, token: &str) -> Result<bool> {
        let name = registration_token_name(token);
        match self.registration_tokens.get(&name) {
            Some(obj) if obj.spec.cluster_id == cluster_id => {
                self.registration_tokens.delete(self, &name).await
            }
            _ => Ok(false),
        }
    }

    async fn upsert_node(&self, node: &Node) -> Result<()> {
        if !self.cluster_exists(&node.cluster_id) {
            return Err(StoreError::NotFound(format!("cluster {}", node.cluster_id)));
        }
        let name = node_name(&node.cluster_id, &node.id);
        for _ in 0..CONFLICT_RETRIES {
            if self.nodes.create(self, &node_obj(node)).await?.is_some() {
                return Ok(());
            }
            // It exists: the hostname and params change, the rest stays (as SQLite's upsert).
            // Replaced with the resourceVersion read: a merge patch would merge the old params
            // into the new ones, and `params: null` first is refused (the field is required).
            let Some(mut current) = self.nodes.api.get_opt(&name).await? else {
                continue; // deleted meanwhile: create it
            };
            current.spec.hostname = node.hostname.clone();
            current.spec.params = node.params.clone();
            match self
                .nodes
                .api
                .replace(&name, &PostParams::default(), &current)
                .await
            {
                Ok(replaced) => {
                    self.nodes.until_holds(self, &replaced).await;
                    return Ok(());
                }
                Err(e) if is_api(&e, |s| s.is_conflict() || s.is_not_found()) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Backend(format!(
            "node {name}: still conflicting after {CONFLICT_RETRIES} attempts"
        )))
    }

    async fn create_user(&self, name: &str, groups: &[String], admin: bool) -> Result<User> {
        let now = now_unix();
        let created = self
            .create_named(&self.users, "user", name, tokens::user_id, |metadata| {
                UserObj {
                    metadata,
                    spec: UserSpec {
                        display_name: name.to_owned(),
                        groups: groups.to_vec(),
                        admin,
                        created_at: now,
                    },
                }
            })
            .await?;
        Ok(Self::user_of(&created))
    }

    async fn delete_user(&self, id: &str) -> Result<bool> {
        let existed = self.users.delete(self, id).await?;
        self.tokens.delete_labelled(self, LABEL_USER, id).await?;
        self.grants.delete_labelled(self, LABEL_USER, id).await?;
        Ok(existed)
    }

    async fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        expires_at: Option<i64>,
    ) -> Result<(ApiToken, String)> {
        if !self.user_exists(user_id) {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        let secret = tokens::api_token_secret();
        for _ in 0..8 {
            let id = tokens::api_token_id();
            let record = ApiToken {
                id: id.clone(),
                user_id: user_id.to_owned(),
                description: description.to_owned(),
                created_at: now_unix(),
                revoked: false,
                expires_at,
                last_used_at: None,
            };
            let hash = data_encoding::HEXLOWER.encode(&tokens::hash_secret(&secret));
            if self.put_api_token(&record, &hash).await? {
                return Ok((record, format!("{id}:{secret}")));
            }
        }
        Err(StoreError::Backend("no free token id after 8 draws".into()))
    }

    /// Creates a token object; false if its id is taken.
    async fn put_api_token(&self, record: &ApiToken, secret_hash: &str) -> Result<bool> {
        let obj = Token {
            metadata: meta(&record.id, &[(LABEL_USER, &record.user_id)]),
            spec: TokenSpec {
                user_id: record.user_id.clone(),
                secret_hash: secret_hash.to_owned(),
                description: record.description.clone(),
                created_at: record.created_at,
                expires_at: record.expires_at,
                revoked: record.revoked,
            },
            status: None,
        };
        let Some(created) = self.tokens.create(self, &obj).await? else {
            return Ok(false);
        };
        if let Some(at) = record.last_used_at {
            let patch = json!({ "status": { "lastUsedAt": at } });
            self.tokens
                .merge(self, &created.name_any(), patch, true)
                .await?;
        }
        Ok(true)
    }

    async fn record_api_token_uses(&self, uses: &[(String, i64)]) -> Result<()> {
        for (id, at) in uses {
            let newer = self.tokens.get(id).is_some_and(|t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.last_used_at)
                    .is_none_or(|old| old < *at)
            });
            if newer {
                let patch = json!({ "status": { "lastUsedAt": at } });
                self.tokens.merge(self, id, patch, true).await?;
            }
        }
        Ok(())
    }

    async fn grant(&self, user_id: &str, cluster_id: &str) -> Result<Grant> {
        if !self.user_exists(user_id) || !self.cluster_exists(cluster_id) {
            return Err(StoreError::NotFound(format!(
                "user {user_id} or cluster {cluster_id}"
            )));
        }
        let record = Grant {
            user_id: user_id.to_owned(),
            cluster_id: cluster_id.to_owned(),
            created_at: now_unix(),
        };
        self.put_grant(&record).await
    }

    /// Creates a grant, or returns the one there is.
    async fn put_grant(&self, record: &Grant) -> Result<Grant> {
        let name = grant_name(&record.user_id, &record.cluster_id);
        let obj = GrantObj {
            metadata: meta(
                &name,
                &[
                    (LABEL_USER, &record.user_id),
                    (LABEL_CLUSTER, &record.cluster_id),
                ],
            ),
            spec: GrantSpec {
                user_id: record.user_id.clone(),
                cluster_id: record.cluster_id.clone(),
                created_at: record.created_at,
            },
        };
        if let Some(created) = self.grants.create(self, &obj).await? {
            return Ok(Self::grant_of(&created));
        }
        match self.grants.api.get_opt(&name).await? {
            Some(existing) => Ok(Self::grant_of(&existing)),
            None => Err(StoreError::Conflict(format!(
                "grant {name} (deleted meanwhile)"
            ))),
        }
    }

    /// Reads the state Secret, applies `change` to its data and replaces it with the
    /// resourceVersion it read, retrying on conflicts.
    async fn update_state(&self, change: impl Fn(&mut BTreeMap<String, ByteString>)) -> Result<()> {
        for _ in 0..CONFLICT_RETRIES {
            let mut secret = self.secrets.get(STATE_SECRET).await?;
            change(secret.data.get_or_insert_with(BTreeMap::new));
            match self
                .secrets
                .replace(STATE_SECRET, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_api(&e, |s| s.is_conflict()) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Backend(format!(
            "Secret {STATE_SECRET}: still conflicting after {CONFLICT_RETRIES} attempts"
        )))
    }

    /// [`Store::import`]'s work: every object created under its record's id, in an order in
    /// which what an object refers to exists first; an object whose name is taken is kept.
    async fn import(&self, snapshot: &Snapshot) -> Result<()> {
        for c in &snapshot.clusters {
            self.check_name_free(&self.clusters, "cluster", &c.name, &c.id)?;
            let obj = ClusterObj {
                metadata: meta(&c.id, &[(LABEL_NAME_HASH, &short_hash(&c.name))]),
                spec: ClusterSpec {
                    display_name: c.name.clone(),
                    created_at: c.created_at,
                },
                status: None,
            };
            let created = self.clusters.create(self, &obj).await?.is_some();
            if let (true, Some(api_endpoint), Some(ca_cert), Some(sa_token)) =
                (created, &c.api_endpoint, &c.ca_cert, &c.sa_token)
            {
                let report = ClusterAgentReport {
                    api_endpoint: api_endpoint.clone(),
                    ca_cert: ca_cert.clone(),
                    sa_token: sa_token.clone(),
                };
                self.set_cluster_agent_report(&c.id, &report).await?;
            }
        }
        for t in &snapshot.registration_tokens {
            if !self.cluster_exists(&t.cluster_id) {
                return Err(StoreError::NotFound(format!(
                    "cluster {} of a registration token",
                    t.cluster_id
                )));
            }
            self.put_registration_token(t).await?;
        }
        for n in &snapshot.nodes {
            if !self.cluster_exists(&n.cluster_id) {
                return Err(StoreError::NotFound(format!(
                    "cluster {} of node {}",
                    n.cluster_id, n.id
                )));
            }
            self.nodes.create(self, &node_obj(n)).await?;
        }
        for u in &snapshot.users {
            self.check_name_free(&self.users, "user", &u.name, &u.id)?;
            let obj = UserObj {
                metadata: meta(&u.id, &[(LABEL_NAME_HASH, &short_hash(&u.name))]),
                spec: UserSpec {
                    display_name: u.name.clone(),
                    groups: u.groups.clone(),
                    admin: u.admin,
                    created_at: u.created_at,
                },
            };
            self.users.create(self, &obj).await?;
        }
        for t in &snapshot.api_tokens {
            if !self.user_exists(&t.token.user_id) {
                return Err(StoreError::NotFound(format!(
                    "user {} of token {}",
                    t.token.user_id, t.token.id
                )));
            }
            let hash = data_encoding::HEXLOWER.encode(&t.secret_sha256);
            self.put_api_token(&t.token, &hash).await?;
        }
        for g in &snapshot.grants {
            if !self.user_exists(&g.user_id) || !self.cluster_exists(&g.cluster_id) {
                return Err(StoreError::NotFound(format!(
                    "user {} or cluster {} of a grant",
                    g.user_id, g.cluster_id
                )));
            }
            self.put_grant(g).await?;
        }
        let pki = snapshot.pki.as_ref().map(pki_values).transpose()?;
        let settings = &snapshot.settings;
        if pki.is_none() && settings.is_empty() {
            return Ok(());
        }
        self.update_state(|data| {
            if let Some(values) = &pki
                && !PKI_FIELDS.iter().any(|k| data.contains_key(*k))
            {
                for (key, value) in PKI_FIELDS.iter().zip(values) {
                    data.insert((*key).to_owned(), ByteString(value.clone().into_bytes()));
                }
            }
            for (name, value) in settings {
                data.entry(format!("{SETTING_PREFIX}{name}"))
                    .or_insert_with(|| ByteString(value.clone().into_bytes()));
            }
        })
        .await
    }

    /// A conflict if another object than `id` holds the display name `name`.
    fn check_name_free<K: Object>(
        &self,
        kind: &Kind<K>,
        what: &str,
        name: &str,
        id: &str,
    ) -> Result<()> {
        let name_hash = short_hash(name);
        let taken = kind
            .all()
            .iter()
            .any(|o| o.name_any() != id && labelled(o.as_ref(), LABEL_NAME_HASH, &name_hash));
        if taken {
            return Err(StoreError::Conflict(format!("{what} {name:?}")));
        }
        Ok(())
    }

    async fn state(&self) -> Result<BTreeMap<String, ByteString>> {
        Ok(self
            .secrets
            .get(STATE_SECRET)
            .await?
            .data
            .unwrap_or_default())
    }
}

/// The condition type of a tunnel end's presence.
const CONNECTED: &str = "Connected";

/// A [`Presence`] of a status, if it has the `Connected` condition.
fn presence_of(status: &crd::Presence) -> Option<Presence> {
    let condition = status.conditions.iter().find(|c| c.type_ == CONNECTED)?;
    let since = condition
        .last_transition_time
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| t.as_second())
        .unwrap_or(0);
    Some(Presence {
        connected: condition.status == "True",
        replica: status.replica.clone().unwrap_or_default(),
        peer: status.peer.clone().filter(|p| !p.is_empty()),
        last_seen: status.last_seen.unwrap_or(since),
        since,
    })
}

/// The status of a [`Presence`].
fn status_of(p: &Presence) -> crd::Presence {
    let at = k8s_openapi::jiff::Timestamp::from_second(p.since)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let (reason, message) = if p.connected {
        (
            "TunnelUp",
            format!("the agent's tunnel is held by {}", p.replica),
        )
    } else {
        (
            "TunnelDown",
            format!("the agent's tunnel to {} closed", p.replica),
        )
    };
    crd::Presence {
        conditions: vec![crd::Condition {
            type_: CONNECTED.to_owned(),
            status: if p.connected { "True" } else { "False" }.to_owned(),
            last_transition_time: at,
            reason: reason.to_owned(),
            message,
        }],
        replica: Some(p.replica.clone()),
        // Written even when empty: a merge patch must clear an older replica's address.
        peer: Some(p.peer.clone().unwrap_or_default()),
        last_seen: Some(p.last_seen),
    }
}

const PKI_FIELDS: [&str; 5] = ["ca.crt", "ca.key", "tls.crt", "tls.key", "sans"];
const SETTING_PREFIX: &str = "setting.";

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Result<Option<String>> {
    data.get(key)
        .map(|b| {
            String::from_utf8(b.0.clone())
                .map_err(|_| StoreError::Corrupt(format!("{STATE_SECRET}: {key} is not UTF-8")))
        })
        .transpose()
}

// === the Store ===

impl Store for KubeStore {
    fn create_cluster(&self, name: &str) -> Result<(Cluster, RegistrationToken)> {
        let name = name.to_owned();
        self.run(|s| async move { s.create_cluster(&name).await })
    }

    fn cluster(&self, id: &str) -> Result<Option<Cluster>> {
        let s = &self.shared;
        Ok(s.clusters.get(id).map(|c| s.cluster_of(&c)))
    }

    fn cluster_by_id_or_name(&self, id_or_name: &str) -> Result<Option<Cluster>> {
        let s = &self.shared;
        let found = s
            .clusters
            .get(id_or_name)
            .or_else(|| s.clusters.cache.find(|c| c.spec.display_name == id_or_name));
        Ok(found.map(|c| s.cluster_of(&c)))
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        let s = &self.shared;
        let mut all: Vec<Cluster> = s.clusters.all().iter().map(|c| s.cluster_of(c)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    fn delete_cluster(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.run(|s| async move { s.delete_cluster(&id).await })
    }

    fn set_cluster_agent_report(&self, id: &str, report: &ClusterAgentReport) -> Result<bool> {
        let (id, report) = (id.to_owned(), report.clone());
        self.run(|s| async move { s.set_cluster_agent_report(&id, &report).await })
    }

    fn cluster_for_registration_token(&self, token: &str) -> Result<Option<String>> {
        let s = &self.shared;
        let Some(obj) = s.registration_tokens.get(&registration_token_name(token)) else {
            return Ok(None);
        };
        let matches =
            tokens::constant_time_eq(&obj.spec.token_hash, &tokens::sha256_hex(token.as_bytes()));
        Ok(
            (matches && s.cluster_exists(&obj.spec.cluster_id))
                .then(|| obj.spec.cluster_id.clone()),
        )
    }

    fn registration_tokens(&self, cluster_id: &str) -> Result<Vec<RegistrationToken>> {
        let s = &self.shared;
        let mut objs = s
            .registration_tokens
            .cache
            .state_filter(|t| t.spec.cluster_id == cluster_id);
        // Registration tokens are never modified: their resourceVersion is the etcd revision
        // of their creation, which orders tokens of the same second as SQLite's rowid does.
        objs.sort_by_key(|t| (t.spec.created_at, revision_of(t.meta())));
        if !s.cluster_exists(cluster_id) {
            return Ok(Vec::new());
        }
        objs.iter().map(|t| s.registration_token_of(t)).collect()
    }

    fn create_registration_token(&self, cluster_id: &str) -> Result<RegistrationToken> {
        let id = cluster_id.to_owned();
        self.run(|s| async move { s.create_registration_token(&id, now_unix()).await })
    }

    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> Result<bool> {
        let (id, token) = (cluster_id.to_owned(), token.to_owned());
        self.run(|s| async move { s.delete_registration_token(&id, &token).await })
    }

    fn node(&self, cluster_id: &str, id: &str) -> Result<Option<Node>> {
        let s = &self.shared;
        if !s.cluster_exists(cluster_id) {
            return Ok(None);
        }
        Ok(s.nodes
            .get(&node_name(cluster_id, id))
            .map(|n| Shared::node_of(&n)))
    }

    fn nodes_named(&self, id: &str) -> Result<Vec<Node>> {
        let s = &self.shared;
        let mut nodes: Vec<Node> = s
            .nodes
            .cache
            .state_filter(|n| n.spec.machine_id == id && s.cluster_exists(&n.spec.cluster_id))
            .iter()
            .map(|n| Shared::node_of(n))
            .collect();
        nodes.sort_by(|a, b| (a.created_at, &a.cluster_id).cmp(&(b.created_at, &b.cluster_id)));
        Ok(nodes)
    }

    fn nodes(&self, cluster_id: Option<&str>) -> Result<Vec<Node>> {
        let s = &self.shared;
        let mut nodes: Vec<Node> = s
            .nodes
            .cache
            .state_filter(|n| {
                cluster_id.is_none_or(|c| n.spec.cluster_id == c)
                    && s.cluster_exists(&n.spec.cluster_id)
            })
            .iter()
            .map(|n| Shared::node_of(n))
            .collect();
        nodes.sort_by(|a, b| (&a.cluster_id, &a.hostname).cmp(&(&b.cluster_id, &b.hostname)));
        Ok(nodes)
    }

    fn upsert_node(&self, node: &Node) -> Result<()> {
        let node = node.clone();
        self.run(|s| async move { s.upsert_node(&node).await })
    }

    fn set_node_docker_socket(&self, cluster_id: &str, id: &str, socket: &str) -> Result<bool> {
        let name = node_name(cluster_id, id);
        let patch = json!({ "spec": { "dockerSocket": socket } });
        self.run(|s| async move { Ok(s.nodes.merge(&s, &name, patch, false).await?.is_some()) })
    }

    fn delete_node(&self, cluster_id: &str, id: &str) -> Result<bool> {
        let name = node_name(cluster_id, id);
        self.run(|s| async move { s.nodes.delete(&s, &name).await })
    }

    fn create_user(&self, name: &str, groups: &[String], admin: bool) -> Result<User> {
        let (name, groups) = (name.to_owned(), groups.to_vec());
        self.run(|s| async move { s.create_user(&name, &groups, admin).await })
    }

    fn user(&self, id: &str) -> Result<Option<User>> {
        Ok(self.shared.users.get(id).map(|u| Shared::user_of(&u)))
    }

    fn user_by_id_or_name(&self, id_or_name: &str) -> Result<Option<User>> {
        let s = &self.shared;
        let found = s
            .users
            .get(id_or_name)
            .or_else(|| s.users.cache.find(|u| u.spec.display_name == id_or_name));
        Ok(found.map(|u| Shared::user_of(&u)))
    }

    fn users(&self) -> Result<Vec<User>> {
        let mut all: Vec<User> = self
            .shared
            .users
            .all()
            .iter()
            .map(|u| Shared::user_of(u))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    fn delete_user(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.run(|s| async move { s.delete_user(&id).await })
    }

    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        expires_at: Option<i64>,
    ) -> Result<(ApiToken, String)> {
        let (user_id, description) = (user_id.to_owned(), description.to_owned());
        self.run(|s| async move { s.create_api_token(&user_id, &description, expires_at).await })
    }

    fn authenticate(&self, bearer: &str) -> Result<Option<User>> {
        let Some((id, secret)) = bearer.split_once(':') else {
            return Ok(None);
        };
        if !tokens::valid_id(id) {
            return Ok(None);
        }
        let s = &self.shared;
        let Some(token) = s.tokens.get(id) else {
            return Ok(None);
        };
        let Ok(hash) = data_encoding::HEXLOWER.decode(token.spec.secret_hash.as_bytes()) else {
            return Ok(None);
        };
        let expired = token.spec.expires_at.is_some_and(|at| at <= now_unix());
        if !tokens::verify_secret(secret, &hash) || token.spec.revoked || expired {
            return Ok(None);
        }
        Ok(s.users
            .get(&token.spec.user_id)
            .map(|u| Shared::user_of(&u)))
    }

    fn record_api_token_uses(&self, uses: &[(String, i64)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let uses = uses.to_vec();
        self.run(|s| async move { s.record_api_token_uses(&uses).await })
    }

    fn api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiToken>> {
        let mut all: Vec<ApiToken> = self
            .shared
            .tokens
            .cache
            .state_filter(|t| user_id.is_none_or(|u| t.spec.user_id == u))
            .iter()
            .map(|t| Shared::api_token_of(t))
            .collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    fn revoke_api_token(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        let patch = json!({ "spec": { "revoked": true } });
        self.run(|s| async move { Ok(s.tokens.merge(&s, &id, patch, false).await?.is_some()) })
    }

    fn grant(&self, user_id: &str, cluster_id: &str) -> Result<Grant> {
        let (user_id, cluster_id) = (user_id.to_owned(), cluster_id.to_owned());
        self.run(|s| async move { s.grant(&user_id, &cluster_id).await })
    }

    fn revoke_grant(&self, user_id: &str, cluster_id: &str) -> Result<bool> {
        let name = grant_name(user_id, cluster_id);
        self.run(|s| async move { s.grants.delete(&s, &name).await })
    }

    fn grants(&self) -> Result<Vec<Grant>> {
        let mut all: Vec<Grant> = self
            .shared
            .grants
            .all()
            .iter()
            .map(|g| Shared::grant_of(g))
            .collect();
        all.sort_by(|a, b| (&a.user_id, &a.cluster_id).cmp(&(&b.user_id, &b.cluster_id)));
        Ok(all)
    }

    fn is_granted(&self, user_id: &str, cluster_id: &str) -> Result<bool> {
        let s = &self.shared;
        Ok(s.grants.get(&grant_name(user_id, cluster_id)).is_some()
            && s.user_exists(user_id)
            && s.cluster_exists(cluster_id))
    }

    fn pki(&self) -> Result<Option<ServerPki>> {
        let data = self.run(|s| async move { s.state().await })?;
        pki_of(&data)
    }

    fn set_pki(&self, pki: &ServerPki) -> Result<()> {
        let values = pki_values(pki)?;
        self.run(|s| async move {
            s.update_state(|data| {
                for (key, value) in PKI_FIELDS.iter().zip(&values) {
                    data.insert((*key).to_owned(), ByteString(value.clone().into_bytes()));
                }
            })
            .await
        })
    }

    fn setting(&self, name: &str) -> Result<Option<String>> {
        let key = format!("{SETTING_PREFIX}{name}");
        let data = self.run(|s| async move { s.state().await })?;
        text(&data, &key)
    }

    fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        let key = format!("{SETTING_PREFIX}{name}");
        let value = value.to_owned();
        self.run(|s| async move {
            s.update_state(|data| {
                data.insert(key.clone(), ByteString(value.clone().into_bytes()));
            })
            .await
        })
    }

    fn record_presence(
        &self,
        end: &TunnelEnd,
        connected: bool,
        replica: &str,
        peer: &str,
        now: i64,
    ) -> Result<bool> {
        let Some(previous) = self.presence_status(end) else {
            return Ok(false);
        };
        let previous = previous.as_ref().and_then(presence_of);
        let Some(next) = Presence::after(previous.as_ref(), connected, replica, peer, now) else {
            return Ok(true);
        };
        let patch = json!({ "status": status_of(&next) });
        let end = end.clone();
        self.run(|s| async move {
            Ok(match &end.node_id {
                None => s
                    .clusters
                    .merge(&s, &end.cluster_id, patch, true)
                    .await?
                    .is_some(),
                Some(node) => {
                    let name = node_name(&end.cluster_id, node);
                    s.nodes.merge(&s, &name, patch, true).await?.is_some()
                }
            })
        })
    }

    fn presence(&self, end: &TunnelEnd) -> Result<Option<Presence>> {
        Ok(self
            .presence_status(end)
            .flatten()
            .as_ref()
            .and_then(presence_of))
    }

    fn reads_from_memory(&self) -> bool {
        true
    }

    fn revision(&self) -> Result<u64> {
        Ok(self.shared.revision.load(Ordering::Acquire))
    }

    fn export(&self) -> Result<Snapshot> {
        let data = self.run(|s| async move { s.state().await })?;
        let s = &self.shared;
        // As the reads: a record whose cluster or user is gone (a delete that stopped half
        // way) counts as gone.
        let mut snapshot = Snapshot {
            clusters: s.clusters.all().iter().map(|c| s.cluster_of(c)).collect(),
            registration_tokens: s
                .registration_tokens
                .cache
                .state_filter(|t| s.cluster_exists(&t.spec.cluster_id))
                .iter()
                .map(|t| s.registration_token_of(t))
                .collect::<Result<_>>()?,
            nodes: s
                .nodes
                .cache
                .state_filter(|n| s.cluster_exists(&n.spec.cluster_id))
                .iter()
                .map(|n| Shared::node_of(n))
                .collect(),
            users: s.users.all().iter().map(|u| Shared::user_of(u)).collect(),
            api_tokens: s
                .tokens
                .cache
                .state_filter(|t| s.user_exists(&t.spec.user_id))
                .iter()
                .map(|t| {
                    Ok(StoredApiToken {
                        token: Shared::api_token_of(t),
                        secret_sha256: data_encoding::HEXLOWER
                            .decode(t.spec.secret_hash.as_bytes())
                            .map_err(|e| {
                                StoreError::Corrupt(format!("token {}: {e}", t.name_any()))
                            })?,
                    })
                })
                .collect::<Result<_>>()?,
            grants: s
                .grants
                .cache
                .state_filter(|g| {
                    s.user_exists(&g.spec.user_id) && s.cluster_exists(&g.spec.cluster_id)
                })
                .iter()
                .map(|g| Shared::grant_of(g))
                .collect(),
            pki: pki_of(&data)?,
            settings: data
                .keys()
                .filter_map(|k| k.strip_prefix(SETTING_PREFIX))
                .map(|name| {
                    let value = text(&data, &format!("{SETTING_PREFIX}{name}"))?;
                    Ok((name.to_owned(), value.unwrap_or_default()))
                })
                .collect::<Result<_>>()?,
        };
        snapshot.sort();
        Ok(snapshot)
    }

    fn import(&self, snapshot: &Snapshot, into: ImportInto) -> Result<()> {
        super::check_target(self, into)?;
        let snapshot = snapshot.clone();
        self.run(|s| async move { s.import(&snapshot).await })
    }
}

/// The PKI in the state Secret's data, if all of it is there.
fn pki_of(data: &BTreeMap<String, ByteString>) -> Result<Option<ServerPki>> {
    let mut fields = Vec::with_capacity(PKI_FIELDS.len());
    for key in PKI_FIELDS {
        match text(data, key)? {
            Some(v) => fields.push(v),
            None => return Ok(None),
        }
    }
    let sans = serde_json::from_str(&fields[4]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Some(ServerPki {
        ca_cert_pem: fields[0].clone(),
        ca_key_pem: fields[1].clone(),
        cert_pem: fields[2].clone(),
        key_pem: fields[3].clone(),
        sans,
    }))
}

/// The state Secret's values of `pki`, in [`PKI_FIELDS`]' order.
fn pki_values(pki: &ServerPki) -> Result<[String; 5]> {
    let sans = serde_json::to_string(&pki.sans).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok([
        pki.ca_cert_pem.clone(),
        pki.ca_key_pem.clone(),
        pki.cert_pem.clone(),
        pki.key_pem.clone(),
        sans,
    ])
}
