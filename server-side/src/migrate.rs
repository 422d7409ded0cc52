//! `tunnel-server migrate`: copies the whole state from one store backend to another.
//!
//! ```text
//!   --from sqlite:PATH ──▶ Store::export ──▶ Snapshot ──▶ Store::import ──▶ --to kubernetes
//!                                   (API tokens as hashes,            (ids, timestamps,
//!                                    registration tokens verbatim)     hashes kept)
//! ```
//!
//! Ids, timestamps, token hashes and registration tokens are kept, so agents reconnect with
//! the tokens they have and users' bearer tokens and kubeconfigs keep working. Stop the server
//! (or at least the admin CLI) on the source while migrating: changes made after the export are
//! not carried over.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::store::{
    ImportInto, KubeStore, KubeStoreConfig, Snapshot, SqliteStore, Store, StoreError,
};

/// One end of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `sqlite:PATH`: a SQLite file (or a data directory holding `state.db`).
    Sqlite(PathBuf),
    /// `kubernetes`: the Kubernetes store of `--kubeconfig` and `--namespace`.
    Kubernetes,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kubernetes" => Ok(Self::Kubernetes),
            _ => match s.strip_prefix("sqlite:") {
                Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
                _ => Err(format!(
                    "{s:?}: expected sqlite:PATH (a state.db file or a data directory) or kubernetes"
                )),
            },
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Both ends are the same store.
    #[error("--from and --to are the same store ({0})")]
    SameStore(Endpoint),
    /// `--from sqlite:PATH` names no file or directory (opening would create an empty store).
    #[error("{0}: no such file or directory")]
    NoSource(PathBuf),
    /// Opening a store failed.
    #[error("opening {endpoint}")]
    Open {
        /// Which end.
        endpoint: Endpoint,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Reading the source failed.
    #[error("exporting from {endpoint}")]
    Export {
        /// The source.
        endpoint: Endpoint,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Writing the target failed.
    #[error("importing into {endpoint}")]
    Import {
        /// The target.
        endpoint: Endpoint,
        /// Why.
        #[source]
        source: StoreError,
    },
}

/// `tunnel-server migrate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The store to copy: `sqlite:PATH` (a state.db file or a data directory) or `kubernetes`
    /// (--kubeconfig, --namespace).
    #[arg(long)]
    pub from: Endpoint,
    /// The store to fill, empty unless --merge: `sqlite:PATH` or `kubernetes`.
    #[arg(long)]
    pub to: Endpoint,
    /// Import into a store that already holds records: what it has is kept, the rest added
    /// (completes an interrupted migration).
    #[arg(long)]
    pub merge: bool,
}

/// Runs `tunnel-server migrate` and prints what it copied.
pub fn run(args: &MigrateArgs, kube: &KubeStoreConfig) -> Result<(), MigrateError> {
    let into = if args.merge {
        ImportInto::Existing
    } else {
        ImportInto::Empty
    };
    let copied = migrate(&args.from, &args.to, into, kube)?;
    println!("migrated {} -> {}: {}", args.from, args.to, copied.counts());
    Ok(())
}

/// Opens `endpoint` (outside a tokio runtime: the Kubernetes store runs its own).
pub fn open(endpoint: &Endpoint, kube: &KubeStoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match endpoint {
        Endpoint::Sqlite(path) => {
            let file = if path.is_dir() {
                path.join(crate::server::STORE_FILE)
            } else {
                path.clone()
            };
            Arc::new(SqliteStore::open(&file)?)
        }
        Endpoint::Kubernetes => Arc::new(KubeStore::open(kube)?),
    })
}

/// Copies every record of `from` into `to` (empty unless `into` says otherwise); returns what
/// was copied.
pub fn migrate(
    from: &Endpoint,
    to: &Endpoint,
    into: ImportInto,
    kube: &KubeStoreConfig,
) -> Result<Snapshot, MigrateError> {
    if from == to {
        return Err(MigrateError::SameStore(from.clone()));
    }
    if let Endpoint::Sqlite(path) = from
        && !path.exists()
    {
        return Err(MigrateError::NoSource(path.clone()));
    }
    let open = |endpoint: &Endpoint| {
        open(endpoint, kube).map_err(|source| MigrateError::Open {
            endpoint: endpoint.clone(),
            source,
        })
    };
    let source = open(from)?;
    let target = open(to)?;
    let snapshot = source.export().map_err(|source| MigrateError::Export {
        endpoint: from.clone(),
        source,
    })?;
    target
        .import(&snapshot, into)
        .map_err(|source| MigrateError::Import {
            endpoint: to.clone(),
            source,
        })?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClusterAgentReport, Node};

    #[test]
    fn endpoints_parse() {
        assert_eq!("kubernetes".parse(), Ok(Endpoint::Kubernetes));
        assert_eq!(
            "sqlite:/var/lib/tunnel-server/state.db".parse(),
            Ok(Endpoint::Sqlite("/var/lib/tunnel-server/state.db".into()))
        );
        assert!("sqlite:".parse::<Endpoint>().is_err());
        assert!("postgres://x".parse::<Endpoint>().is_err());
    }

    /// A store with one of everything, through the Store API.
    fn populate(store: &dyn Store) -> (String, String) {
        let (c, t) = store.create_cluster("prod").unwrap();
        store
            .set_cluster_agent_report(
                &c.id,
                &ClusterAgentReport {
                    api_endpoint: "https://10.43.0.1:443".into(),
                    ca_cert: "Y2E=".into(),
                    sa_token: "jwt".into(),
                },
            )
            .unwrap();
        store.create_cluster("staging").unwrap();
        let node = Node {
            id: crate::tokens::machine_name("n1"),
            cluster_id: c.id.clone(),
            hostname: "n1".into(),
            docker_socket: "/run/docker.sock".into(),
            created_at: 7,
            params: serde_json::json!({"node": {"requestedHostname": "n1"}}),
        };
        store.upsert_node(&node).unwrap();
        let u = store.create_user("alice", &["dev".into()], false).unwrap();
        let (old, _) = store.create_api_token(&u.id, "old", Some(1)).unwrap();
        store.revoke_api_token(&old.id).unwrap();
        let (used, bearer) = store.create_api_token(&u.id, "cli", None).unwrap();
        store.record_api_token_uses(&[(used.id, 42)]).unwrap();
        store.grant(&u.id, &c.id).unwrap();
        store.set_setting("server_url", "https://x:8443").unwrap();
        (bearer, t.token)
    }

    #[test]
    fn sqlite_to_sqlite_keeps_every_record() {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-server-migrate-{}-{}",
            std::process::id(),
            crate::tokens::random_string(6)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (
            Endpoint::Sqlite(dir.join("a.db")),
            Endpoint::Sqlite(dir.join("b.db")),
        );
        let kube = KubeStoreConfig::default();
        let source = open(&from, &kube).unwrap();
        let (bearer, token) = populate(source.as_ref());
        crate::pki::ensure(source.as_ref(), &["localhost".into()]).unwrap();

        let copied = migrate(&from, &to, ImportInto::Empty, &kube).unwrap();
        let target = open(&to, &kube).unwrap();
        assert_eq!(target.export().unwrap(), source.export().unwrap());
        assert_eq!(copied, source.export().unwrap());
        assert_eq!(target.authenticate(&bearer).unwrap().unwrap().name, "alice");
        assert!(
            target
                .cluster_for_registration_token(&token)
                .unwrap()
                .is_some()
        );

        // Not into a store that has anything, unless told; then nothing changes.
        let again = migrate(&from, &to, ImportInto::Empty, &kube).unwrap_err();
        assert!(
            matches!(
                &again,
                MigrateError::Import {
                    source: StoreError::NotEmpty(_),
                    ..
                }
            ),
            "{again}"
        );
        migrate(&from, &to, ImportInto::Existing, &kube).unwrap();
        assert_eq!(target.export().unwrap(), source.export().unwrap());

        // A display name held under another id is a conflict.
        let other = Endpoint::Sqlite(dir.join("c.db"));
        open(&other, &kube).unwrap().create_cluster("prod").unwrap();
        let clash = migrate(&from, &other, ImportInto::Existing, &kube).unwrap_err();
        assert!(
            matches!(
                &clash,
                MigrateError::Import {
                    source: StoreError::Conflict(_),
                    ..
                }
            ),
            "{clash}"
        );
        assert!(matches!(
            migrate(&from, &from, ImportInto::Empty, &kube),
            Err(MigrateError::SameStore(_))
        ));
        assert!(matches!(
            migrate(
                &Endpoint::Sqlite(dir.join("none.db")),
                &to,
                ImportInto::Empty,
                &kube
            ),
            Err(MigrateError::NoSource(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
