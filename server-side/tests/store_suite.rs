//! One conformance suite for [`Store`] ([`conformance`]), run against both backends:
//! `SqliteStore` on a temporary file (a second handle on the same file plays the CLI), and
//! `KubeStore` on a REAL etcd + kube-apiserver (the e2e suite's cached build), in a fresh
//! namespace with the CRDs of `tunnel-server crds` applied by kubectl (a second `KubeStore`
//! on the same namespace plays another replica).
//!
//! And two `KubeStore` handles writing at once from several threads: users with distinct
//! names and grants (nothing lost, no duplicate ids) and, in rounds, every thread creating the
//! same name (exactly one wins).
//!
//! Without the apiserver binaries the Kubernetes tests fail under `CI=true`, otherwise print one
//! SKIP line.

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;

#[path = "store_suite/conformance.rs"]
mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use server_side::store::kube::crd;
use server_side::store::{KubeStore, KubeStoreConfig, SqliteStore, Store, StoreError, User};

use conformance::{Subject, until};
use real_kube::RealKube;
use support::TempDir;

#[test]
fn sqlite_store_conforms() {
    let dir = TempDir::new("store-suite-sqlite");
    let file = dir.path().join("state.db");
    let store = SqliteStore::open(&file).unwrap();
    let other = SqliteStore::open(&file).unwrap();
    conformance::run(&Subject {
        store: &store,
        other: &other,
    });
}

#[test]
fn kube_store_conforms() {
    let dir = TempDir::new("store-suite-kube");
    let Some(kube) = start_kube("store_suite kube_store_conforms", &dir) else {
        return;
    };
    let ns = fresh_namespace(&kube, "suite");
    let store = open_kube(&kube, &ns);
    let other = open_kube(&kube, &ns);
    let started = Instant::now();
    conformance::run(&Subject {
        store: &store,
        other: &other,
    });
    println!("kube conformance suite: {:?}", started.elapsed());
}

#[test]
fn kube_handles_write_at_once() {
    const THREADS: usize = 4;
    const USERS_PER_THREAD: usize = 12;
    const CONTESTED_ROUNDS: usize = 4;

    let dir = TempDir::new("store-suite-kube-race");
    let Some(kube) = start_kube("store_suite kube_handles_write_at_once", &dir) else {
        return;
    };
    let ns = fresh_namespace(&kube, "race");
    let handles: [Arc<dyn Store>; 2] = [
        Arc::new(open_kube(&kube, &ns)),
        Arc::new(open_kube(&kube, &ns)),
    ];
    let (cluster, _) = handles[0].create_cluster("shared").unwrap();
    until("the cluster on the second handle", || {
        handles[1].cluster(&cluster.id).unwrap()
    });

    let barrier = Arc::new(Barrier::new(THREADS));
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = handles[t % 2].clone();
            let barrier = barrier.clone();
            let cluster_id = cluster.id.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut contested = Vec::new();
                for i in 0..USERS_PER_THREAD {
                    if i % (USERS_PER_THREAD / CONTESTED_ROUNDS) == 0 {
                        // Every thread, on both handles, at the same moment.
                        let round = contested.len();
                        barrier.wait();
                        contested.push(store.create_user(
                            &format!("contested-{round}"),
                            &[],
                            false,
                        ));
                    }
                    let user = store
                        .create_user(&format!("t{t}-u{i}"), &[format!("g{t}")], i % 2 == 0)
                        .unwrap();
                    let grant = store.grant(&user.id, &cluster_id).unwrap();
                    assert_eq!(grant.user_id, user.id);
                    mine.push(user);
                }
                (mine, contested)
            })
        })
        .collect();
    let mut created: Vec<User> = Vec::new();
    let mut winners: BTreeMap<String, User> = BTreeMap::new();
    for thread in threads {
        let (mine, contested) = thread.join().unwrap();
        created.extend(mine);
        for (round, result) in contested.into_iter().enumerate() {
            match result {
                Ok(user) => {
                    if let Some(first) = winners.insert(format!("contested-{round}"), user.clone())
                    {
                        panic!("two winners of contested-{round}: {first:?} and {user:?}");
                    }
                    created.push(user);
                }
                Err(StoreError::Conflict(_)) => {}
                Err(other) => panic!("contested-{round}: {other}"),
            }
        }
    }
    println!(
        "{} users and {} grants from {THREADS} threads on 2 handles in {:?}",
        created.len(),
        THREADS * USERS_PER_THREAD,
        started.elapsed()
    );
    assert_eq!(
        winners.len(),
        CONTESTED_ROUNDS,
        "every contested name has exactly one winner: {winners:?}"
    );

    let ids: BTreeSet<&str> = created.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids.len(), created.len(), "duplicate ids");
    let mut expected: Vec<User> = created.clone();
    expected.sort_by(|a, b| a.name.cmp(&b.name));
    let expected_grants: Vec<(String, String)> = {
        let mut g: Vec<_> = created
            .iter()
            .filter(|u| !u.name.starts_with("contested-"))
            .map(|u| (u.id.clone(), cluster.id.clone()))
            .collect();
        g.sort();
        g
    };
    for (h, store) in handles.iter().enumerate() {
        until(&format!("every user on handle {h}"), || {
            (store.users().unwrap() == expected).then_some(())
        });
        until(&format!("every grant on handle {h}"), || {
            let grants: Vec<_> = store
                .grants()
                .unwrap()
                .into_iter()
                .map(|g| (g.user_id, g.cluster_id))
                .collect();
            (grants == expected_grants).then_some(())
        });
        for (name, winner) in &winners {
            assert_eq!(
                store.user_by_id_or_name(name).unwrap().as_ref(),
                Some(winner)
            );
        }
    }
    // What the apiserver holds, not only what the caches show.
    let listed = kube.kubectl(&[
        "-n",
        &ns,
        "get",
        &format!("users.{}", crd::GROUP),
        "-o",
        "name",
    ]);
    assert_eq!(listed.lines().count(), created.len(), "{listed}");
}

// === the Kubernetes fixture ===

/// A real apiserver with the store's CRDs established, or `None` (SKIP) without the binaries.
fn start_kube(test: &str, dir: &TempDir) -> Option<RealKube> {
    let kube = RealKube::start(test, dir.path())?;
    kube.install_crds(&crd::crds_yaml());
    Some(kube)
}

/// A new namespace, `<prefix>-<random>`.
fn fresh_namespace(kube: &RealKube, prefix: &str) -> String {
    let ns = format!("{prefix}-{}", server_side::tokens::random_string(6));
    kube.kubectl(&["create", "namespace", &ns]);
    ns
}

fn open_kube(kube: &RealKube, namespace: &str) -> KubeStore {
    KubeStore::open(&KubeStoreConfig {
        kubeconfig: Some(kube.dir.join("admin.kubeconfig")),
        namespace: Some(namespace.to_owned()),
    })
    .unwrap()
}
