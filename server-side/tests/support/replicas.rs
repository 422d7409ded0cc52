//! Several `tunnel-server --store kubernetes serve` replicas on one real kube-apiserver
//! ([`crate::real_kube::RealKube`]), each in its own namespace of the store. Included by the
//! tests that need it next to `real_kube`:
//!
//! ```ignore
//! #[path = "../../agent-cluster/tests/real_kube/mod.rs"]
//! mod real_kube;
//! #[path = "support/replicas.rs"]
//! mod replicas;
//! ```
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use crate::real_kube::RealKube;
use crate::support::{BIN, ServerProc, add_user};

/// Starts the apiserver with the store's CRDs installed; `None` (a SKIP line) without the
/// binaries outside CI.
pub fn start_kube(test: &str, parent: &Path) -> Option<RealKube> {
    let kube = RealKube::start(test, parent)?;
    let crds = String::from_utf8(
        std::process::Command::new(BIN)
            .arg("crds")
            .output()
            .expect("tunnel-server crds")
            .stdout,
    )
    .unwrap();
    kube.install_crds(&crds);
    Some(kube)
}

/// One store: a fresh namespace of the apiserver, and the global flags that name it.
pub struct KubeStore {
    pub namespace: String,
    pub kubeconfig: String,
}

impl KubeStore {
    /// Creates a namespace `<prefix>-<random>`.
    pub fn create(kube: &RealKube, prefix: &str) -> Self {
        let namespace = format!("{prefix}-{}", server_side::tokens::random_string(6));
        kube.kubectl(&["create", "namespace", &namespace]);
        Self {
            namespace,
            kubeconfig: kube.dir.join("admin.kubeconfig").display().to_string(),
        }
    }

    /// `--store kubernetes --kubeconfig … --namespace …`.
    pub fn global(&self) -> Vec<&str> {
        vec![
            "--store",
            "kubernetes",
            "--kubeconfig",
            self.kubeconfig.as_str(),
            "--namespace",
            self.namespace.as_str(),
        ]
    }

    /// An admin user made with the CLI on the store directly; returns its API token.
    pub fn add_admin(&self, data_dir: &Path, name: &str) -> String {
        std::fs::create_dir_all(data_dir).unwrap();
        let mut args = self.global();
        args.push("--admin");
        add_user(data_dir, name, &args)
    }

    /// Starts the replica `name` (`--replica-name`) with its own data directory and `extra`
    /// serve flags. Start replicas one after the other: the first creates the PKI in the
    /// store, the next ones find it.
    pub fn replica(&self, data_dir: &Path, name: &str, extra: &[&str]) -> ServerProc {
        let mut args = self.global();
        args.extend(["--replica-name", name]);
        args.extend(extra);
        ServerProc::start_with(data_dir, &args)
    }
}
