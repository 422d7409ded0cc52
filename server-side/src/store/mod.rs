//! Durable state: clusters, registration tokens, nodes, users, API tokens, grants, the server's
//! PKI and a few settings.
//!
//! [`Store`] is the synchronous interface (the CLI, tests and other backends implement or use
//! it); [`SqliteStore`] is the embedded implementation (one SQLite file in WAL mode, one writer
//! connection and a few reader connections, schema migrations in code).
//!
//! Code on the async runtime never calls a [`Store`] directly: a call can wait up to the busy
//! timeout on another process's write lock (the admin CLI). It goes through a [`StoreHandle`],
//! which runs each call on tokio's blocking pool in one of two lanes (reads, writes), each with
//! a bound on calls running and waiting; a call beyond it fails at once with
//! [`StoreError::Busy`] (503 to clients) instead of queueing without bound.
//!
//! ```text
//!   handler ──await──▶ StoreHandle ──read lane (4 running, 256 waiting)──▶ spawn_blocking ──▶ reader connections
//!                                 └─write lane (1 running, 256 waiting)──▶ spawn_blocking ──▶ the writer connection
//!   authenticate ─▶ last use noted in memory ─(every 5 s, and at shutdown)─▶ write lane
//! ```
//!
//! Secrets: registration tokens are kept as given, because agents send them verbatim and a
//! Go agent's token must match byte for byte; API tokens are kept only as SHA-256 hashes and
//! compared in constant time.

mod handle;
pub mod kube;
mod sqlite;

pub use handle::{LAST_USE_FLUSH_INTERVAL, StoreHandle, StoreLimits, TokenUseFlusher};
pub use kube::{KubeStore, KubeStoreConfig};
pub use sqlite::SqliteStore;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused the operation or could not be opened.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The Kubernetes store's apiserver refused the call or could not be reached.
    #[error("kubernetes: {0}")]
    Backend(String),
    /// A unique name or id is already taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// A referenced object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A stored value could not be read back.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Too many calls are already running or waiting in this lane of a [`StoreHandle`]; the
    /// caller should answer 503 and let the client retry.
    #[error("store busy: {limit} {lane} calls already running or queued")]
    Busy {
        /// `read` or `write`.
        lane: &'static str,
        /// The lane's bound (running plus waiting).
        limit: usize,
    },
    /// [`Store::import`] with [`ImportInto::Empty`] into a store that holds something.
    #[error("the target store is not empty: it has {0}")]
    NotEmpty(String),
    /// The database was written by a newer version of this program.
    #[error("database schema version {found} is newer than this program's {supported}")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this program knows.
        supported: i64,
    },
}

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An imported cluster and what its agent last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// `c-xxxxx`.
    pub id: String,
    /// Unique display name.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `https://<address>` as reported by the cluster agent (status.apiEndpoint).
    pub api_endpoint: Option<String>,
    /// The base64 of the apiserver CA PEM, as the agent sent it (status.caCert).
    pub ca_cert: Option<String>,
    /// The agent's service-account token; never serialized.
    #[serde(skip)]
    pub sa_token: Option<String>,
}

/// What a cluster agent reported in its tunnel params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAgentReport {
    /// `https://<address>`.
    pub api_endpoint: String,
    /// Base64 of the CA PEM.
    pub ca_cert: String,
    /// The service-account token.
    pub sa_token: String,
}

/// A registration token of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationToken {
    /// The token, 54 characters.
    pub token: String,
    /// Its cluster.
    pub cluster_id: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A node (a node agent's host) of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Machine name, `m-<first 12 hex of md5(hostname)>`.
    pub id: String,
    /// Its cluster.
    pub cluster_id: String,
    /// The requested hostname the agent sent.
    pub hostname: String,
    /// Docker socket path dialed through the node's tunnel.
    pub docker_socket: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The node params as last sent (JSON).
    pub params: serde_json::Value,
}

impl Node {
    /// The tunnel client key of this node: `<cluster>:<machine>`.
    pub fn client_key(&self) -> String {
        format!("{}:{}", self.cluster_id, self.id)
    }
}

/// Default Docker socket of a node.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// A user of the proxied APIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// `u-xxxxxxxx`.
    pub id: String,
    /// Unique name; also the `Impersonate-User` downstream.
    pub name: String,
    /// Groups sent as `Impersonate-Group`.
    pub groups: Vec<String>,
    /// May use the `/v1` management API and reach every cluster.
    pub admin: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// An API token (its secret is shown once, at creation, and kept only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    /// `token-xxxxx`, the part before `:` in the bearer token.
    pub id: String,
    /// Its user.
    pub user_id: String,
    /// Free text.
    pub description: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Revoked tokens authenticate nobody.
    pub revoked: bool,
    /// Unix seconds after which the token authenticates nobody; `None`: never expires.
    pub expires_at: Option<i64>,
    /// Unix seconds of the last successful authentication, as last flushed (the server keeps
    /// recent uses in memory and writes them every few seconds); `None`: never used.
    pub last_used_at: Option<i64>,
}

impl ApiToken {
    /// Whether the token has expired at `now` (Unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// A user's access to a cluster (its API and its nodes' Docker APIs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// The user.
    pub user_id: String,
    /// The cluster.
    pub cluster_id: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// The server's CA and serving certificate, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPki {
    /// The CA certificate (what `/cacerts` serves).
    pub ca_cert_pem: String,
    /// The CA private key.
    pub ca_key_pem: String,
    /// The serving certificate, signed by the CA.
    pub cert_pem: String,
    /// The serving key.
    pub key_pem: String,
    /// The names the serving certificate covers (to know when to reissue it).
    pub sans: Vec<String>,
}

/// Where a tunnel ends: a cluster (its cluster agent) or one of its nodes (a node agent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelEnd {
    /// The cluster.
    pub cluster_id: String,
    /// The node's machine name; `None`: the cluster agent.
    pub node_id: Option<String>,
}

impl TunnelEnd {
    /// The end a tunnel client key names: `c-xxxxx` (a cluster agent) or `c-xxxxx:m-…` (a node
    /// agent); `None` for other keys (the aggregation tunnels, `stv-cluster-…`).
    pub fn of_client_key(key: &str) -> Option<Self> {
        let (cluster_id, node_id) = match key.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (key, None),
        };
        let valid = cluster_id.starts_with("c-")
            && crate::tokens::valid_id(cluster_id)
            && node_id.is_none_or(crate::tokens::valid_id);
        valid.then(|| Self {
            cluster_id: cluster_id.to_owned(),
            node_id: node_id.map(str::to_owned),
        })
    }
}

/// The live state of a tunnel end, as the replicas last recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    /// Whether a replica holds a tunnel to it.
    pub connected: bool,
    /// The replica that holds (or last held) the tunnel.
    pub replica: String,
    /// Where the other replicas reach that replica to forward requests to it
    /// ([`crate::peers`]): `host:port` of its peer listener; `None` when it has none (SQLite,
    /// or a replica without `--peer-listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Unix seconds it was last seen up.
    pub last_seen: i64,
    /// Unix seconds `connected` last changed.
    pub since: i64,
}

impl Presence {
    /// The state after `replica` (reachable at `peer`, empty: not reachable) reports
    /// `connected` at `now`, or `None` when the report changes nothing durable: a replica that
    /// no longer holds the tunnel (another one took it over since) reporting it gone.
    pub fn after(
        previous: Option<&Presence>,
        connected: bool,
        replica: &str,
        peer: &str,
        now: i64,
    ) -> Option<Self> {
        let peer = (!peer.is_empty()).then(|| peer.to_owned());
        match previous {
            Some(p) if !connected && p.connected && p.replica != replica => None,
            Some(p) if !connected && !p.connected => None,
            Some(p) => Some(Self {
                connected,
                replica: replica.to_owned(),
                peer,
                last_seen: now.max(p.last_seen),
                since: if p.connected == connected {
                    p.since
                } else {
                    now
                },
            }),
            None => Some(Self {
                connected,
                replica: replica.to_owned(),
                peer,
                last_seen: now,
                since: now,
            }),
        }
    }
}

/// The state the server keeps. Implementations must be safe to share across tasks.
pub trait Store: Send + Sync + 'static {
    // === clusters ===

    /// Creates a cluster named `name` with one fresh registration token.
    fn create_cluster(&self, name: &str) -> Result<(Cluster, RegistrationToken)>;
    /// A cluster by id.
    fn cluster(&self, id: &str) -> Result<Option<Cluster>>;
    /// A cluster by id or name.
    fn cluster_by_id_or_name(&self, id_or_name: &str) -> Result<Option<Cluster>>;
    /// All clusters, by name.
    fn clusters(&self) -> Result<Vec<Cluster>>;
    /// Deletes a cluster and everything that belongs to it; false if there was none.
    fn delete_cluster(&self, id: &str) -> Result<bool>;
    /// Stores what the cluster agent reported; true if anything changed.
    fn set_cluster_agent_report(&self, id: &str, report: &ClusterAgentReport) -> Result<bool>;

    // === registration tokens ===

    /// The cluster a registration token belongs to (exact match, as sent by the agent).
    fn cluster_for_registration_token(&self, token: &str) -> Result<Option<String>>;
    /// The tokens of a cluster, oldest first.
    fn registration_tokens(&self, cluster_id: &str) -> Result<Vec<RegistrationToken>>;
    /// Adds a fresh token to a cluster.
    fn create_registration_token(&self, cluster_id: &str) -> Result<RegistrationToken>;
    /// Deletes a token of a cluster (agents using it get `cluster not found`); false if there
    /// was none.
    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> Result<bool>;

    // === nodes ===

    /// A node of a cluster.
    fn node(&self, cluster_id: &str, id: &str) -> Result<Option<Node>>;
    /// Nodes with machine name `id` in any cluster, oldest first (the same host name in two
    /// clusters gives the same machine name).
    fn nodes_named(&self, id: &str) -> Result<Vec<Node>>;
    /// All nodes, or those of one cluster.
    fn nodes(&self, cluster_id: Option<&str>) -> Result<Vec<Node>>;
    /// Creates a node, or updates its hostname and params if it exists.
    fn upsert_node(&self, node: &Node) -> Result<()>;
    /// Sets the Docker socket path dialed through a node's tunnel; false if there is no node.
    fn set_node_docker_socket(&self, cluster_id: &str, id: &str, socket: &str) -> Result<bool>;
    /// Deletes a node; false if there was none.
    fn delete_node(&self, cluster_id: &str, id: &str) -> Result<bool>;

    // === users and API tokens ===

    /// Creates a user.
    fn create_user(&self, name: &str, groups: &[String], admin: bool) -> Result<User>;
    /// A user by id.
    fn user(&self, id: &str) -> Result<Option<User>>;
    /// A user by id or name.
    fn user_by_id_or_name(&self, id_or_name: &str) -> Result<Option<User>>;
    /// All users, by name.
    fn users(&self) -> Result<Vec<User>>;
    /// Deletes a user, their tokens and grants; false if there was none.
    fn delete_user(&self, id: &str) -> Result<bool>;
    /// Creates an API token that expires at `expires_at` (Unix seconds; `None`: never);
    /// returns it and the bearer value `token-xxxxx:<secret>`, which is not kept.
    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        expires_at: Option<i64>,
    ) -> Result<(ApiToken, String)>;
    /// The user a bearer value authenticates (hash matches, not revoked, not expired), if any.
    /// Only reads: the caller records the use (see [`Store::record_api_token_uses`]).
    fn authenticate(&self, bearer: &str) -> Result<Option<User>>;
    /// Records when tokens were last used: `(token id, Unix seconds)`; a time older than the
    /// stored one and an unknown id are ignored. One transaction for the batch.
    fn record_api_token_uses(&self, uses: &[(String, i64)]) -> Result<()>;
    /// All API tokens, or those of one user.
    fn api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiToken>>;
    /// Revokes a token; false if there was none.
    fn revoke_api_token(&self, id: &str) -> Result<bool>;

    // === grants ===

    /// Grants a user access to a cluster (idempotent).
    fn grant(&self, user_id: &str, cluster_id: &str) -> Result<Grant>;
    /// Withdraws a grant; false if there was none.
    fn revoke_grant(&self, user_id: &str, cluster_id: &str) -> Result<bool>;
    /// All grants.
    fn grants(&self) -> Result<Vec<Grant>>;
    /// Whether the user may reach the cluster.
    fn is_granted(&self, user_id: &str, cluster_id: &str) -> Result<bool>;

    // === server ===

    /// The server's PKI, if created.
    fn pki(&self) -> Result<Option<ServerPki>>;
    /// Stores the server's PKI.
    fn set_pki(&self, pki: &ServerPki) -> Result<()>;
    /// A setting.
    fn setting(&self, name: &str) -> Result<Option<String>>;
    /// Sets a setting.
    fn set_setting(&self, name: &str, value: &str) -> Result<()>;

    // === live state ===

    /// Records that `replica` (whose peer listener is at `peer`; empty: none) holds
    /// (`connected`) or lost a tunnel to `end` at `now` (Unix seconds), as [`Presence::after`]
    /// says; false if the cluster or node does not exist. SQLite keeps no peer address (one
    /// replica).
    fn record_presence(
        &self,
        end: &TunnelEnd,
        connected: bool,
        replica: &str,
        peer: &str,
        now: i64,
    ) -> Result<bool>;
    /// The live state of `end` as last recorded.
    fn presence(&self, end: &TunnelEnd) -> Result<Option<Presence>>;

    // === how reads are served ===

    /// Whether every read but [`Store::pki`] and [`Store::setting`] is answered from memory
    /// without blocking (the Kubernetes store's caches), so that [`StoreHandle`] may call it
    /// on the runtime instead of a blocking thread. SQLite reads may wait on a lock: false.
    fn reads_from_memory(&self) -> bool;

    // === change detection ===

    /// A number that changes whenever anyone (this process or another one, such as the admin
    /// CLI) has committed a change since the last call. Cheap enough to poll a few times a
    /// second: the server's revocation loop ([`crate::live`]) reconciles live tunnels and
    /// streams only when it moves.
    fn revision(&self) -> Result<u64>;

    // === moving between backends ===

    /// Every record, API tokens as their stored hashes, in [`Snapshot::sort`]'s order: what
    /// [`Store::import`] into another backend needs to carry on where this one was.
    fn export(&self) -> Result<Snapshot>;
    /// Creates every record of `snapshot` with its ids, timestamps, hashes and tokens as they
    /// are, so agents' registration tokens and users' bearer tokens keep working.
    ///
    /// Into an empty store unless `into` is [`ImportInto::Existing`]: then a record whose id
    /// is already taken is kept as the target has it (re-running an interrupted import
    /// completes it), and so are the PKI and any setting the target already has; a display
    /// name held by another id is a [`StoreError::Conflict`]. Not one transaction for the
    /// Kubernetes store: a failure leaves what was created so far.
    fn import(&self, snapshot: &Snapshot, into: ImportInto) -> Result<()>;
}

/// Every record of a store ([`Store::export`], [`Store::import`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// With the agent's report, service-account token included.
    pub clusters: Vec<Cluster>,
    /// The tokens themselves (agents send them verbatim).
    pub registration_tokens: Vec<RegistrationToken>,
    /// With params and Docker socket.
    pub nodes: Vec<Node>,
    /// Users.
    pub users: Vec<User>,
    /// API tokens with the SHA-256 of their secrets.
    pub api_tokens: Vec<StoredApiToken>,
    /// Grants.
    pub grants: Vec<Grant>,
    /// The server's CA and serving certificate, if created.
    pub pki: Option<ServerPki>,
    /// Settings by name.
    pub settings: BTreeMap<String, String>,
}

/// An API token as stored: its record and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredApiToken {
    /// The record.
    pub token: ApiToken,
    /// SHA-256 of the secret (the part after `:` of the bearer value).
    pub secret_sha256: Vec<u8>,
}

/// What [`Store::import`] may import into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportInto {
    /// Only a store without any record, PKI or setting.
    Empty,
    /// Any store: what it already has stays as it is.
    Existing,
}

impl Snapshot {
    /// Puts every list in one order (by id; nodes by cluster and machine; grants by user and
    /// cluster), so snapshots of two backends compare equal when their records are.
    pub fn sort(&mut self) {
        self.clusters.sort_by(|a, b| a.id.cmp(&b.id));
        self.registration_tokens
            .sort_by(|a, b| (&a.cluster_id, &a.token).cmp(&(&b.cluster_id, &b.token)));
        self.nodes
            .sort_by(|a, b| (&a.cluster_id, &a.id).cmp(&(&b.cluster_id, &b.id)));
        self.users.sort_by(|a, b| a.id.cmp(&b.id));
        self.api_tokens.sort_by(|a, b| a.token.id.cmp(&b.token.id));
        self.grants
            .sort_by(|a, b| (&a.user_id, &a.cluster_id).cmp(&(&b.user_id, &b.cluster_id)));
    }

    /// Whether there is no record, PKI or setting at all.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
            && self.registration_tokens.is_empty()
            && self.nodes.is_empty()
            && self.users.is_empty()
            && self.api_tokens.is_empty()
            && self.grants.is_empty()
            && self.pki.is_none()
            && self.settings.is_empty()
    }

    /// `3 clusters, 4 registration tokens, ...`: what it holds, for humans.
    pub fn counts(&self) -> String {
        format!(
            "{} clusters ({} with an agent report), {} registration tokens, {} nodes, {} users, \
             {} API tokens, {} grants, {} PKI, {} settings",
            self.clusters.len(),
            self.clusters
                .iter()
                .filter(|c| c.sa_token.is_some())
                .count(),
            self.registration_tokens.len(),
            self.nodes.len(),
            self.users.len(),
            self.api_tokens.len(),
            self.grants.len(),
            if self.pki.is_some() { "a" } else { "no" },
            self.settings.len(),
        )
    }
}

/// Fails with [`StoreError::NotEmpty`] if `into` asks for an empty target and `target`'s
/// snapshot is not.
pub(crate) fn check_target(target: &dyn Store, into: ImportInto) -> Result<()> {
    if into == ImportInto::Empty {
        let existing = target.export()?;
        if !existing.is_empty() {
            return Err(StoreError::NotEmpty(existing.counts()));
        }
    }
    Ok(())
}

/// The node a user-facing reference names: `<cluster-id>:<machine>` (always unambiguous), or
/// a bare machine name, which names the **oldest** node of that name. Machine names derive from
/// host names, so two clusters can hold the same one; resolving a bare name to the first
/// registered node means that no later registration, by any cluster's token, can shadow or
/// take over a node that users already reach by its bare name.
pub fn resolve_node(store: &dyn Store, reference: &str) -> Result<Option<Node>> {
    match reference.split_once(':') {
        Some((cluster_id, machine)) => store.node(cluster_id, machine),
        None => Ok(store.nodes_named(reference)?.into_iter().next()),
    }
}

/// Whether `reference` has the shape of a node reference ([`resolve_node`]).
pub fn valid_node_reference(reference: &str) -> bool {
    match reference.split_once(':') {
        Some((cluster_id, machine)) => {
            crate::tokens::valid_id(cluster_id) && crate::tokens::valid_id(machine)
        }
        None => crate::tokens::valid_id(reference),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
