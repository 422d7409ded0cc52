//! [`Store`] on one SQLite file: WAL journal, `synchronous=FULL`, foreign keys with cascading
//! deletes, and schema migrations applied in order at open (table `schema_version`).
//!
//! A committed transaction survives the process being killed (`kill -9`): WAL with
//! `synchronous=FULL` syncs the log on every commit. Other processes (the CLI while the server
//! runs) may open the same file; writers wait up to 5 s for each other.
//!
//! Connections: one writer, behind a mutex, for every call that writes; and a small pool of
//! reader connections ([`READERS`]) for every call that only reads. In WAL mode a reader sees
//! the last commit and never waits for a writer, so a read does not queue behind a write that
//! waits for another process's lock. An in-memory database (tests) has no readers: every call
//! uses the writer.

use std::ops::Deref;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ApiToken, Cluster, ClusterAgentReport, Grant, ImportInto, Node, Presence, RegistrationToken,
    Result, ServerPki, Snapshot, Store, StoreError, StoredApiToken, TunnelEnd, User, now_unix,
};
use crate::tokens;

/// Schema migrations, in order; migration `i` brings the schema to version `i + 1`. Never edit
/// a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "
    CREATE TABLE clusters (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        api_endpoint TEXT,
        ca_cert TEXT,
        sa_token TEXT
    );
    CREATE TABLE registration_tokens (
        token TEXT PRIMARY KEY,
        cluster_id TEXT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX registration_tokens_cluster ON registration_tokens(cluster_id);
    CREATE TABLE nodes (
        cluster_id TEXT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        id TEXT NOT NULL,
        hostname TEXT NOT NULL,
        docker_socket TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (cluster_id, id)
    );
    CREATE INDEX nodes_id ON nodes(id);
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        groups_json TEXT NOT NULL,
        admin INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        secret_sha256 BLOB NOT NULL,
        description TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE grants (
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        cluster_id TEXT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, cluster_id)
    );
    CREATE TABLE pki (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        ca_cert_pem TEXT NOT NULL,
        ca_key_pem TEXT NOT NULL,
        cert_pem TEXT NOT NULL,
        key_pem TEXT NOT NULL,
        sans_json TEXT NOT NULL
    );
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    ",
    // 2: API token expiry and last use.
    "
    ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER;
    ALTER TABLE api_tokens ADD COLUMN last_used_at INTEGER;
    ",
    // 3: live state of tunnel ends (node_id '' is the cluster agent).
    "
    CREATE TABLE presence (
        cluster_id TEXT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        node_id TEXT NOT NULL,
        connected INTEGER NOT NULL,
        replica TEXT NOT NULL,
        last_seen INTEGER NOT NULL,
        since INTEGER NOT NULL,
        PRIMARY KEY (cluster_id, node_id)
    );
    ",
];

/// Reader connections of a file database.
pub(crate) const READERS: usize = 4;

/// How long a connection waits for another connection's (or process's) lock before the call
/// fails with `SQLITE_BUSY`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded store. See the module docs.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    /// Empty for an in-memory database.
    readers: ReaderPool,
    /// A connection of its own for [`Store::revision`]: SQLite's `data_version` only moves for
    /// commits made by *other* connections, so this one sees this process's writes as well as
    /// the CLI's. None for an in-memory database (no other connection can open it).
    watch: Option<Mutex<Connection>>,
}

/// Idle reader connections; a caller takes one and gives it back when done.
struct ReaderPool {
    idle: Mutex<Vec<Connection>>,
    returned: Condvar,
    size: usize,
}

/// A connection for one read call: a pooled reader, or the writer when there are none.
enum ReadConn<'a> {
    Pooled {
        pool: &'a ReaderPool,
        conn: Option<Connection>,
    },
    Writer(MutexGuard<'a, Connection>),
}

impl Deref for ReadConn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Self::Pooled { conn, .. } => conn.as_ref().expect("taken until drop"),
            Self::Writer(guard) => guard,
        }
    }
}

impl Drop for ReadConn<'_> {
    fn drop(&mut self) {
        if let Self::Pooled { pool, conn } = self
            && let Some(conn) = conn.take()
        {
            pool.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            pool.returned.notify_one();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, migrates it, and opens
    /// [`READERS`] reader connections.
    pub fn open(path: &Path) -> Result<Self> {
        let writer = Self::init(Connection::open(path)?)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // A guard against a write slipping onto a reader.
            conn.execute_batch("PRAGMA query_only=ON; PRAGMA foreign_keys=ON;")?;
            readers.push(conn);
        }
        let watch = Connection::open(path)?;
        watch.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Self {
            watch: Some(Mutex::new(watch)),
            writer: Mutex::new(writer),
            readers: ReaderPool {
                size: readers.len(),
                idle: Mutex::new(readers),
                returned: Condvar::new(),
            },
        })
    }

    /// An in-memory database (tests); every call uses its one connection.
    pub fn open_in_memory() -> Result<Self> {
        Ok(Self {
            watch: None,
            writer: Mutex::new(Self::init(Connection::open_in_memory()?)?),
            readers: ReaderPool {
                idle: Mutex::new(Vec::new()),
                returned: Condvar::new(),
                size: 0,
            },
        })
    }

    fn init(mut conn: Connection) -> Result<Connection> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // journal_mode answers with a row; in-memory databases stay "memory".
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    /// The writer connection.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-call leaves SQLite's own transaction state consistent (an open
        // transaction is rolled back when its guard drops).
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection for a call that only reads: an idle reader (waiting for one to come back
    /// when all are busy), or the writer of an in-memory database.
    fn read(&self) -> ReadConn<'_> {
        let pool = &self.readers;
        if pool.size == 0 {
            return ReadConn::Writer(self.conn());
        }
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = idle.pop() {
                return ReadConn::Pooled {
                    pool,
                    conn: Some(conn),
                };
            }
            idle = pool.returned.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .read()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: Option<i64> = tx
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()?;
    let current = match current {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", [])?;
            0
        }
    };
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tracing::info!(version = i + 1, "applying schema migration");
        tx.execute_batch(sql)?;
        tx.execute("UPDATE schema_version SET version = ?1", [i as i64 + 1])?;
    }
    tx.commit()?;
    Ok(())
}

fn conflict_or(err: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what())
        }
        _ => StoreError::Sqlite(err),
    }
}

/// A foreign-key violation as the missing record it names.
fn missing(err: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match conflict_or(err, String::new) {
        StoreError::Conflict(_) => StoreError::NotFound(what()),
        other => other,
    }
}

const CLUSTER_COLS: &str = "id, name, created_at, api_endpoint, ca_cert, sa_token";

fn cluster_row(r: &Row<'_>) -> rusqlite::Result<Cluster> {
    Ok(Cluster {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        api_endpoint: r.get(3)?,
        ca_cert: r.get(4)?,
        sa_token: r.get(5)?,
    })
}

fn registration_token_row(r: &Row<'_>) -> rusqlite::Result<RegistrationToken> {
    Ok(RegistrationToken {
        token: r.get(0)?,
        cluster_id: r.get(1)?,
        created_at: r.get(2)?,
    })
}

fn grant_row(r: &Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        user_id: r.get(0)?,
        cluster_id: r.get(1)?,
        created_at: r.get(2)?,
    })
}

fn presence_row(r: &Row<'_>) -> rusqlite::Result<Presence> {
    Ok(Presence {
        connected: r.get(0)?,
        replica: r.get(1)?,
        peer: None,
        last_seen: r.get(2)?,
        since: r.get(3)?,
    })
}

const NODE_COLS: &str = "id, cluster_id, hostname, docker_socket, created_at, params";

fn node_row(r: &Row<'_>) -> rusqlite::Result<Node> {
    let params: String = r.get(5)?;
    Ok(Node {
        id: r.get(0)?,
        cluster_id: r.get(1)?,
        hostname: r.get(2)?,
        docker_socket: r.get(3)?,
        created_at: r.get(4)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
    })
}

const USER_COLS: &str = "id, name, groups_json, admin, created_at";

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    let groups: String = r.get(2)?;
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        groups: serde_json::from_str(&groups).unwrap_or_default(),
        admin: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const TOKEN_COLS: &str = "id, user_id, description, created_at, revoked, expires_at, last_used_at";

fn token_row(r: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get(0)?,
        user_id: r.get(1)?,
        description: r.get(2)?,
        created_at: r.get(3)?,
        revoked: r.get(4)?,
        expires_at: r.get(5)?,
        last_used_at: r.get(6)?,
    })
}

fn collect<T>(rows: impl Iterator<Item = rusqlite::Result<T>>) -> Result<Vec<T>> {
    Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
}

impl Store for SqliteStore {
    fn create_cluster(&self, name: &str) -> Result<(Cluster, RegistrationToken)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_unix();
        // Retry on the (unlikely, 27^5) id collision.
        let mut id = tokens::cluster_id();
        for _ in 0..8 {
            let taken: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM clusters WHERE id = ?1)",
                [&id],
                |r| r.get(0),
            )?;
            if !taken {
                break;
            }
            id = tokens::cluster_id();
        }
        tx.execute(
            "INSERT INTO clusters (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![id, name, now],
        )
        .map_err(|e| conflict_or(e, || format!("cluster {name:?}")))?;
        let token = tokens::registration_token();
        tx.execute(
            "INSERT INTO registration_tokens (token, cluster_id, created_at) VALUES (?1, ?2, ?3)",
            params![token, id, now],
        )?;
        tx.commit()?;
        Ok((
            Cluster {
                id: id.clone(),
                name: name.to_owned(),
                created_at: now,
                api_endpoint: None,
                ca_cert: None,
                sa_token: None,
            },
            RegistrationToken {
                token,
                cluster_id: id,
                created_at: now,
            },
        ))
    }

    fn cluster(&self, id: &str) -> Result<Option<Cluster>> {
        Ok(self
            .read()
            .query_row(
                &format!("SELECT {CLUSTER_COLS} FROM clusters WHERE id = ?1"),
                [id],
                cluster_row,
            )
            .optional()?)
    }

    fn cluster_by_id_or_name(&self, id_or_name: &str) -> Result<Option<Cluster>> {
        Ok(self
            .read()
            .query_row(
                &format!(
                    "SELECT {CLUSTER_COLS} FROM clusters WHERE id = ?1 OR name = ?1 \
                     ORDER BY id = ?1 DESC LIMIT 1"
                ),
                [id_or_name],
                cluster_row,
            )
            .optional()?)
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!(
            "SELECT {CLUSTER_COLS} FROM clusters ORDER BY name"
        ))?;
        collect(stmt.query_map([], cluster_row)?)
    }

    fn delete_cluster(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM clusters WHERE id = ?1", [id])?
            > 0)
    }

    fn set_cluster_agent_report(&self, id: &str, report: &ClusterAgentReport) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE clusters SET api_endpoint = ?2, ca_cert = ?3, sa_token = ?4 \
             WHERE id = ?1 AND (api_endpoint IS NOT ?2 OR ca_cert IS NOT ?3 OR sa_token IS NOT ?4)",
            params![id, report.api_endpoint, report.ca_cert, report.sa_token],
        )?;
        Ok(n > 0)
    }

    fn cluster_for_registration_token(&self, token: &str) -> Result<Option<String>> {
        // The primary-key lookup finds the row; the constant-time comparison keeps the final
        // decision independent of how many leading bytes matched (SQLite's own comparison
        // is not constant-time, but it only ever sees the exact token).
        let found: Option<(String, String)> = self
            .read()
            .query_row(
                "SELECT token, cluster_id FROM registration_tokens WHERE token = ?1",
                [token],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(found
            .filter(|(stored, _)| tokens::constant_time_eq(stored, token))
            .map(|(_, cluster)| cluster))
    }

    fn registration_tokens(&self, cluster_id: &str) -> Result<Vec<RegistrationToken>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT token, cluster_id, created_at FROM registration_tokens \
             WHERE cluster_id = ?1 ORDER BY created_at, rowid",
        )?;
        collect(stmt.query_map([cluster_id], registration_token_row)?)
    }

    fn create_registration_token(&self, cluster_id: &str) -> Result<RegistrationToken> {
        let token = RegistrationToken {
            token: tokens::registration_token(),
            cluster_id: cluster_id.to_owned(),
            created_at: now_unix(),
        };
        self.conn()
            .execute(
                "INSERT INTO registration_tokens (token, cluster_id, created_at) VALUES (?1, ?2, ?3)",
                params![token.token, token.cluster_id, token.created_at],
            )
            .map_err(|e| match conflict_or(e, String::new) {
                StoreError::Conflict(_) => StoreError::NotFound(format!("cluster {cluster_id}")),
                other => other,
            })?;
        Ok(token)
    }

    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM registration_tokens WHERE cluster_id = ?1 AND token = ?2",
            [cluster_id, token],
        )? > 0)
    }

    fn node(&self, cluster_id: &str, id: &str) -> Result<Option<Node>> {
        Ok(self
            .read()
            .query_row(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE cluster_id = ?1 AND id = ?2"),
                [cluster_id, id],
                node_row,
            )
            .optional()?)
    }

    fn nodes_named(&self, id: &str) -> Result<Vec<Node>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!(
            "SELECT {NODE_COLS} FROM nodes WHERE id = ?1 ORDER BY created_at, rowid"
        ))?;
        collect(stmt.query_map([id], node_row)?)
    }

    fn nodes(&self, cluster_id: Option<&str>) -> Result<Vec<Node>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!(
            "SELECT {NODE_COLS} FROM nodes WHERE ?1 IS NULL OR cluster_id = ?1 \
             ORDER BY cluster_id, hostname"
        ))?;
        collect(stmt.query_map([cluster_id], node_row)?)
    }

    fn upsert_node(&self, node: &Node) -> Result<()> {
        let params = node.params.to_string();
        self.conn()
            .execute(
                "INSERT INTO nodes (cluster_id, id, hostname, docker_socket, params, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (cluster_id, id) DO UPDATE SET hostname = ?3, params = ?5",
                params![
                    node.cluster_id,
                    node.id,
                    node.hostname,
                    node.docker_socket,
                    params,
                    node.created_at
                ],
            )
            .map_err(|e| match conflict_or(e, String::new) {
                StoreError::Conflict(_) => {
                    StoreError::NotFound(format!("cluster {}", node.cluster_id))
                }
                other => other,
            })?;
        Ok(())
    }

    fn set_node_docker_socket(&self, cluster_id: &str, id: &str, socket: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "UPDATE nodes SET docker_socket = ?3 WHERE cluster_id = ?1 AND id = ?2",
            [cluster_id, id, socket],
        )? > 0)
    }

    fn delete_node(&self, cluster_id: &str, id: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM presence WHERE cluster_id = ?1 AND node_id = ?2",
            [cluster_id, id],
        )?;
        let deleted = tx.execute(
            "DELETE FROM nodes WHERE cluster_id = ?1 AND id = ?2",
            [cluster_id, id],
        )? > 0;
        tx.commit()?;
        Ok(deleted)
    }

    fn create_user(&self, name: &str, groups: &[String], admin: bool) -> Result<User> {
        let user = User {
            id: tokens::user_id(),
            name: name.to_owned(),
            groups: groups.to_vec(),
            admin,
            created_at: now_unix(),
        };
        let groups_json =
            serde_json::to_string(&user.groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn()
            .execute(
                "INSERT INTO users (id, name, groups_json, admin, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user.id, user.name, groups_json, user.admin, user.created_at],
            )
            .map_err(|e| conflict_or(e, || format!("user {name:?}")))?;
        Ok(user)
    }

    fn user(&self, id: &str) -> Result<Option<User>> {
        Ok(self
            .read()
            .query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                [id],
                user_row,
            )
            .optional()?)
    }

    fn user_by_id_or_name(&self, id_or_name: &str) -> Result<Option<User>> {
        Ok(self
            .read()
            .query_row(
                &format!(
                    "SELECT {USER_COLS} FROM users WHERE id = ?1 OR name = ?1 \
                     ORDER BY id = ?1 DESC LIMIT 1"
                ),
                [id_or_name],
                user_row,
            )
            .optional()?)
    }

    fn users(&self) -> Result<Vec<User>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY name"))?;
        collect(stmt.query_map([], user_row)?)
    }

    fn delete_user(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM users WHERE id = ?1", [id])?
            > 0)
    }

    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        expires_at: Option<i64>,
    ) -> Result<(ApiToken, String)> {
        let token = ApiToken {
            id: tokens::api_token_id(),
            user_id: user_id.to_owned(),
            description: description.to_owned(),
            created_at: now_unix(),
            revoked: false,
            expires_at,
            last_used_at: None,
        };
        let secret = tokens::api_token_secret();
        let hash = tokens::hash_secret(&secret);
        self.conn()
            .execute(
                "INSERT INTO api_tokens \
                 (id, user_id, secret_sha256, description, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    token.id,
                    token.user_id,
                    &hash[..],
                    token.description,
                    token.created_at,
                    token.expires_at
                ],
            )
            .map_err(|e| match conflict_or(e, String::new) {
                StoreError::Conflict(_) => StoreError::NotFound(format!("user {user_id}")),
                other => other,
            })?;
        let bearer = format!("{}:{secret}", token.id);
        Ok((token, bearer))
    }

    fn authenticate(&self, bearer: &str) -> Result<Option<User>> {
        let Some((id, secret)) = bearer.split_once(':') else {
            return Ok(None);
        };
        if !tokens::valid_id(id) {
            return Ok(None);
        }
        let conn = self.read();
        let found: Option<(Vec<u8>, bool, Option<i64>, String)> = conn
            .query_row(
                "SELECT secret_sha256, revoked, expires_at, user_id FROM api_tokens WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((hash, revoked, expires_at, user_id)) = found else {
            return Ok(None);
        };
        let expired = expires_at.is_some_and(|at| at <= now_unix());
        if !tokens::verify_secret(secret, &hash) || revoked || expired {
            return Ok(None);
        }
        Ok(conn
            .query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                [user_id],
                user_row,
            )
            .optional()?)
    }

    fn api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiToken>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!(
            "SELECT {TOKEN_COLS} FROM api_tokens WHERE ?1 IS NULL OR user_id = ?1 \
             ORDER BY created_at, id"
        ))?;
        collect(stmt.query_map([user_id], token_row)?)
    }

    fn record_api_token_uses(&self, uses: &[(String, i64)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "UPDATE api_tokens SET last_used_at = ?2 \
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
            )?;
            for (id, at) in uses {
                stmt.execute(params![id, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn revoke_api_token(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("UPDATE api_tokens SET revoked = 1 WHERE id = ?1", [id])?
            > 0)
    }

    fn grant(&self, user_id: &str, cluster_id: &str) -> Result<Grant> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO grants (user_id, cluster_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, cluster_id) DO NOTHING",
            params![user_id, cluster_id, now_unix()],
        )
        .map_err(|e| match conflict_or(e, String::new) {
            StoreError::Conflict(_) => {
                StoreError::NotFound(format!("user {user_id} or cluster {cluster_id}"))
            }
            other => other,
        })?;
        Ok(conn.query_row(
            "SELECT user_id, cluster_id, created_at FROM grants \
             WHERE user_id = ?1 AND cluster_id = ?2",
            [user_id, cluster_id],
            grant_row,
        )?)
    }

    fn revoke_grant(&self, user_id: &str, cluster_id: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM grants WHERE user_id = ?1 AND cluster_id = ?2",
            [user_id, cluster_id],
        )? > 0)
    }

    fn grants(&self) -> Result<Vec<Grant>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT user_id, cluster_id, created_at FROM grants ORDER BY user_id, cluster_id",
        )?;
        collect(stmt.query_map([], grant_row)?)
    }

    fn is_granted(&self, user_id: &str, cluster_id: &str) -> Result<bool> {
        Ok(self.read().query_row(
            "SELECT EXISTS(SELECT 1 FROM grants WHERE user_id = ?1 AND cluster_id = ?2)",
            [user_id, cluster_id],
            |r| r.get(0),
        )?)
    }

    fn pki(&self) -> Result<Option<ServerPki>> {
        let row: Option<(String, String, String, String, String)> = self
            .read()
            .query_row(
                "SELECT ca_cert_pem, ca_key_pem, cert_pem, key_pem, sans_json FROM pki WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        row.map(|(ca_cert_pem, ca_key_pem, cert_pem, key_pem, sans)| {
            Ok(ServerPki {
                ca_cert_pem,
                ca_key_pem,
                cert_pem,
                key_pem,
                sans: serde_json::from_str(&sans)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            })
        })
        .transpose()
    }

    fn set_pki(&self, pki: &ServerPki) -> Result<()> {
        let sans =
            serde_json::to_string(&pki.sans).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO pki (id, ca_cert_pem, ca_key_pem, cert_pem, key_pem, sans_json) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO UPDATE SET \
             ca_cert_pem = ?1, ca_key_pem = ?2, cert_pem = ?3, key_pem = ?4, sans_json = ?5",
            params![
                pki.ca_cert_pem,
                pki.ca_key_pem,
                pki.cert_pem,
                pki.key_pem,
                sans
            ],
        )?;
        Ok(())
    }

    fn setting(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .read()
            .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO settings (name, value) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET value = ?2",
            [name, value],
        )?;
        Ok(())
    }

    fn record_presence(
        &self,
        end: &TunnelEnd,
        connected: bool,
        replica: &str,
        _peer: &str,
        now: i64,
    ) -> Result<bool> {
        let node_id = end.node_id.as_deref().unwrap_or("");
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool = match &end.node_id {
            None => tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM clusters WHERE id = ?1)",
                [&end.cluster_id],
                |r| r.get(0),
            )?,
            Some(node) => tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM nodes WHERE cluster_id = ?1 AND id = ?2)",
                [&end.cluster_id, node],
                |r| r.get(0),
            )?,
        };
        if !exists {
            return Ok(false);
        }
        let previous = tx
            .query_row(
                "SELECT connected, replica, last_seen, since FROM presence \
                 WHERE cluster_id = ?1 AND node_id = ?2",
                [&end.cluster_id, node_id],
                presence_row,
            )
            .optional()?;
        if let Some(p) = Presence::after(previous.as_ref(), connected, replica, "", now) {
            tx.execute(
                "INSERT INTO presence (cluster_id, node_id, connected, replica, last_seen, since) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (cluster_id, node_id) DO UPDATE SET \
                 connected = ?3, replica = ?4, last_seen = ?5, since = ?6",
                params![
                    end.cluster_id,
                    node_id,
                    p.connected,
                    p.replica,
                    p.last_seen,
                    p.since
                ],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn presence(&self, end: &TunnelEnd) -> Result<Option<Presence>> {
        Ok(self
            .read()
            .query_row(
                "SELECT connected, replica, last_seen, since FROM presence \
                 WHERE cluster_id = ?1 AND node_id = ?2",
                [&end.cluster_id, end.node_id.as_deref().unwrap_or("")],
                presence_row,
            )
            .optional()?)
    }

    fn reads_from_memory(&self) -> bool {
        false
    }

    fn revision(&self) -> Result<u64> {
        let value: i64 = match &self.watch {
            Some(watch) => watch.lock().unwrap_or_else(|p| p.into_inner()).query_row(
                "PRAGMA data_version",
                [],
                |r| r.get(0),
            )?,
            // Only this connection can write an in-memory database.
            None => self
                .conn()
                .query_row("SELECT total_changes()", [], |r| r.get(0))?,
        };
        Ok(value as u64)
    }

    fn export(&self) -> Result<Snapshot> {
        let conn = self.read();
        // One read transaction: a consistent picture while the server keeps writing.
        let tx = conn.unchecked_transaction()?;
        let mut snapshot = Snapshot {
            clusters: collect(
                tx.prepare(&format!("SELECT {CLUSTER_COLS} FROM clusters"))?
                    .query_map([], cluster_row)?,
            )?,
            registration_tokens: collect(
                tx.prepare("SELECT token, cluster_id, created_at FROM registration_tokens")?
                    .query_map([], registration_token_row)?,
            )?,
            nodes: collect(
                tx.prepare(&format!("SELECT {NODE_COLS} FROM nodes"))?
                    .query_map([], node_row)?,
            )?,
            users: collect(
                tx.prepare(&format!("SELECT {USER_COLS} FROM users"))?
                    .query_map([], user_row)?,
            )?,
            api_tokens: collect(
                tx.prepare(&format!(
                    "SELECT {TOKEN_COLS}, secret_sha256 FROM api_tokens"
                ))?
                .query_map([], |r| {
                    Ok(StoredApiToken {
                        token: token_row(r)?,
                        secret_sha256: r.get(7)?,
                    })
                })?,
            )?,
            grants: collect(
                tx.prepare("SELECT user_id, cluster_id, created_at FROM grants")?
                    .query_map([], grant_row)?,
            )?,
            pki: None,
            settings: collect(
                tx.prepare("SELECT name, value FROM settings")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?,
            )?
            .into_iter()
            .collect(),
        };
        tx.commit()?;
        drop(conn);
        snapshot.pki = self.pki()?;
        snapshot.sort();
        Ok(snapshot)
    }

    fn import(&self, snapshot: &Snapshot, into: ImportInto) -> Result<()> {
        let mut conn = self.conn();
        // One write transaction: all of it or nothing, and nobody writes in between the check
        // for an empty store and the inserts.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if into == ImportInto::Empty {
            let held: i64 = tx.query_row(
                "SELECT (SELECT count(*) FROM clusters) + (SELECT count(*) FROM registration_tokens) \
                 + (SELECT count(*) FROM nodes) + (SELECT count(*) FROM users) \
                 + (SELECT count(*) FROM api_tokens) + (SELECT count(*) FROM grants) \
                 + (SELECT count(*) FROM pki) + (SELECT count(*) FROM settings)",
                [],
                |r| r.get(0),
            )?;
            if held > 0 {
                return Err(StoreError::NotEmpty(format!("{held} rows")));
            }
        }
        // A taken key keeps the target's row (ON CONFLICT on the primary key); a display name
        // taken under another id violates UNIQUE: a conflict.
        for c in &snapshot.clusters {
            tx.execute(
                "INSERT INTO clusters (id, name, created_at, api_endpoint, ca_cert, sa_token) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
                params![
                    c.id,
                    c.name,
                    c.created_at,
                    c.api_endpoint,
                    c.ca_cert,
                    c.sa_token
                ],
            )
            .map_err(|e| conflict_or(e, || format!("cluster {:?}", c.name)))?;
        }
        for t in &snapshot.registration_tokens {
            tx.execute(
                "INSERT INTO registration_tokens (token, cluster_id, created_at) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (token) DO NOTHING",
                params![t.token, t.cluster_id, t.created_at],
            )
            .map_err(|e| {
                missing(e, || {
                    format!("cluster {} of a registration token", t.cluster_id)
                })
            })?;
        }
        for n in &snapshot.nodes {
            tx.execute(
                "INSERT INTO nodes (cluster_id, id, hostname, docker_socket, params, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (cluster_id, id) DO NOTHING",
                params![
                    n.cluster_id,
                    n.id,
                    n.hostname,
                    n.docker_socket,
                    n.params.to_string(),
                    n.created_at
                ],
            )
            .map_err(|e| missing(e, || format!("cluster {} of node {}", n.cluster_id, n.id)))?;
        }
        for u in &snapshot.users {
            let groups =
                serde_json::to_string(&u.groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO users (id, name, groups_json, admin, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                params![u.id, u.name, groups, u.admin, u.created_at],
            )
            .map_err(|e| conflict_or(e, || format!("user {:?}", u.name)))?;
        }
        for StoredApiToken {
            token: t,
            secret_sha256,
        } in &snapshot.api_tokens
        {
            tx.execute(
                "INSERT INTO api_tokens (id, user_id, secret_sha256, description, created_at, \
                 revoked, expires_at, last_used_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (id) DO NOTHING",
                params![
                    t.id,
                    t.user_id,
                    secret_sha256,
                    t.description,
                    t.created_at,
                    t.revoked,
                    t.expires_at,
                    t.last_used_at
                ],
            )
            .map_err(|e| missing(e, || format!("user {} of token {}", t.user_id, t.id)))?;
        }
        for g in &snapshot.grants {
            tx.execute(
                "INSERT INTO grants (user_id, cluster_id, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (user_id, cluster_id) DO NOTHING",
                params![g.user_id, g.cluster_id, g.created_at],
            )
            .map_err(|e| {
                missing(e, || {
                    format!("user {} or cluster {} of a grant", g.user_id, g.cluster_id)
                })
            })?;
        }
        if let Some(pki) = &snapshot.pki {
            let sans =
                serde_json::to_string(&pki.sans).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO pki (id, ca_cert_pem, ca_key_pem, cert_pem, key_pem, sans_json) \
                 VALUES (1, ?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                params![
                    pki.ca_cert_pem,
                    pki.ca_key_pem,
                    pki.cert_pem,
                    pki.key_pem,
                    sans
                ],
            )?;
        }
        for (name, value) in &snapshot.settings {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                [name, value],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_moves_on_commits_from_any_connection() {
        let dir = std::env::temp_dir().join(format!("revision-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let server = SqliteStore::open(&path).unwrap();
        let cli = SqliteStore::open(&path).unwrap();
        let r0 = server.revision().unwrap();
        assert_eq!(server.revision().unwrap(), r0, "no commit, no change");
        let (c, _) = server.create_cluster("own-write").unwrap();
        let r1 = server.revision().unwrap();
        assert_ne!(r1, r0, "this process's own commit");
        cli.delete_cluster(&c.id).unwrap();
        let r2 = server.revision().unwrap();
        assert_ne!(r2, r1, "another process's commit (the CLI)");
        assert_eq!(server.revision().unwrap(), r2);

        let memory = SqliteStore::open_in_memory().unwrap();
        let m0 = memory.revision().unwrap();
        memory.create_cluster("m").unwrap();
        assert_ne!(memory.revision().unwrap(), m0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn clusters_tokens_nodes_users_grants() {
        let store = SqliteStore::open_in_memory().unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let (c, t) = store.create_cluster("prod").unwrap();
        assert!(matches!(
            store.create_cluster("prod"),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.cluster_for_registration_token(&t.token).unwrap(),
            Some(c.id.clone())
        );
        assert_eq!(store.cluster_for_registration_token("nope").unwrap(), None);
        let report = ClusterAgentReport {
            api_endpoint: "https://10.43.0.1:443".into(),
            ca_cert: "Y2E=".into(),
            sa_token: "jwt".into(),
        };
        assert!(store.set_cluster_agent_report(&c.id, &report).unwrap());
        assert!(!store.set_cluster_agent_report(&c.id, &report).unwrap());
        assert_eq!(
            store
                .cluster_by_id_or_name("prod")
                .unwrap()
                .unwrap()
                .sa_token
                .as_deref(),
            Some("jwt")
        );

        let node = Node {
            id: tokens::machine_name("n1"),
            cluster_id: c.id.clone(),
            hostname: "n1".into(),
            docker_socket: super::super::DEFAULT_DOCKER_SOCKET.into(),
            created_at: 1,
            params: serde_json::json!({"requestedHostname": "n1"}),
        };
        store.upsert_node(&node).unwrap();
        store.upsert_node(&node).unwrap();
        assert_eq!(store.nodes_named(&node.id).unwrap(), vec![node.clone()]);
        assert!(
            store
                .set_node_docker_socket(&c.id, &node.id, "/run/docker.sock")
                .unwrap()
        );
        // A re-registration keeps the configured socket.
        store.upsert_node(&node).unwrap();
        assert_eq!(
            store.node(&c.id, &node.id).unwrap().unwrap().docker_socket,
            "/run/docker.sock"
        );

        let u = store.create_user("alice", &["dev".into()], false).unwrap();
        let (tok, bearer) = store.create_api_token(&u.id, "cli", None).unwrap();
        assert_eq!(store.authenticate(&bearer).unwrap(), Some(u.clone()));
        assert_eq!(
            store.authenticate(&format!("{}:wrong", tok.id)).unwrap(),
            None
        );
        assert_eq!(store.authenticate("garbage").unwrap(), None);
        store.grant(&u.id, &c.id).unwrap();
        store.grant(&u.id, &c.id).unwrap();
        assert!(store.is_granted(&u.id, &c.id).unwrap());
        assert!(matches!(
            store.grant(&u.id, "c-none"),
            Err(StoreError::NotFound(_))
        ));
        assert!(store.revoke_api_token(&tok.id).unwrap());
        assert_eq!(store.authenticate(&bearer).unwrap(), None);

        let t2 = store.create_registration_token(&c.id).unwrap();
        assert_eq!(store.registration_tokens(&c.id).unwrap().len(), 2);
        assert!(store.delete_registration_token(&c.id, &t.token).unwrap());
        assert_eq!(
            store.cluster_for_registration_token(&t.token).unwrap(),
            None
        );
        assert_eq!(
            store.cluster_for_registration_token(&t2.token).unwrap(),
            Some(c.id.clone())
        );
        assert!(store.delete_cluster(&c.id).unwrap());
        assert!(store.nodes(None).unwrap().is_empty());
        assert!(store.grants().unwrap().is_empty());
        assert_eq!(
            store.cluster_for_registration_token(&t.token).unwrap(),
            None
        );
    }

    #[test]
    fn expired_tokens_authenticate_nobody() {
        let store = SqliteStore::open_in_memory().unwrap();
        let u = store.create_user("eve", &[], false).unwrap();
        let now = now_unix();
        let (past, past_bearer) = store.create_api_token(&u.id, "old", Some(now - 1)).unwrap();
        let (_, future_bearer) = store
            .create_api_token(&u.id, "new", Some(now + 3600))
            .unwrap();
        let (_, forever_bearer) = store.create_api_token(&u.id, "forever", None).unwrap();
        assert_eq!(store.authenticate(&past_bearer).unwrap(), None);
        assert_eq!(store.authenticate(&future_bearer).unwrap(), Some(u.clone()));
        assert_eq!(
            store.authenticate(&forever_bearer).unwrap(),
            Some(u.clone())
        );
        let listed = store.api_tokens(Some(&u.id)).unwrap();
        let old = listed.iter().find(|t| t.id == past.id).unwrap();
        assert_eq!(old.expires_at, Some(now - 1));
        assert!(old.expired(now) && !old.revoked);
        assert_eq!(old.last_used_at, None);
        store
            .record_api_token_uses(&[(past.id.clone(), now)])
            .unwrap();
        let listed = store.api_tokens(Some(&u.id)).unwrap();
        assert_eq!(
            listed
                .iter()
                .find(|t| t.id == past.id)
                .unwrap()
                .last_used_at,
            Some(now)
        );
    }

    /// A temporary database file, removed on drop.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tunnel-server-store-{tag}-{}-{}",
                std::process::id(),
                tokens::random_string(6)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self) -> std::path::PathBuf {
            self.0.join("state.db")
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_do_not_wait_for_another_writer() {
        let tmp = TempDb::new("locked");
        let store = SqliteStore::open(&tmp.file()).unwrap();
        let (c, t) = store.create_cluster("prod").unwrap();
        let report = ClusterAgentReport {
            api_endpoint: "https://10.43.0.1:443".into(),
            ca_cert: "Y2E=".into(),
            sa_token: "jwt".into(),
        };
        assert!(store.set_cluster_agent_report(&c.id, &report).unwrap());
        let node = Node {
            id: tokens::machine_name("n1"),
            cluster_id: c.id.clone(),
            hostname: "n1".into(),
            docker_socket: super::super::DEFAULT_DOCKER_SOCKET.into(),
            created_at: 1,
            params: serde_json::json!({"requestedHostname": "n1"}),
        };
        store.upsert_node(&node).unwrap();

        // Another process holds the write lock.
        let other = Connection::open(tmp.file()).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO settings (name, value) VALUES ('x', 'y');")
            .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            store.cluster_for_registration_token(&t.token).unwrap(),
            Some(c.id.clone())
        );
        assert_eq!(store.clusters().unwrap().len(), 1);
        assert_eq!(store.nodes(None).unwrap(), vec![node.clone()]);
        // Uncommitted writes of the other process are not visible.
        assert_eq!(store.setting("x").unwrap(), None);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reads waited {:?} for the lock",
            started.elapsed()
        );
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(store.setting("x").unwrap().as_deref(), Some("y"));
        // A changed report is written once the lock is free.
        let changed = ClusterAgentReport {
            sa_token: "jwt-2".into(),
            ..report
        };
        assert!(store.set_cluster_agent_report(&c.id, &changed).unwrap());
    }
}
