//! A real etcd + kube-apiserver (and, where built, kube-controller-manager) for tests, from the
//! e2e suite's cached build (`tests/e2e/lib/build-k8s.sh`, started by
//! `tests/e2e/lib/kube-apiserver.sh`). Shared by agent-cluster's and server-side's tests.
//!
//! Without the binaries a test must not pass silently: [`RealKube::start`] panics under
//! `CI=true` and otherwise prints one `SKIP` line and returns `None`.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The binaries `build-k8s.sh paths` names, those that exist.
pub fn k8s_paths() -> HashMap<String, PathBuf> {
    let out = Command::new("bash")
        .arg(repo_root().join("tests/e2e/lib/build-k8s.sh"))
        .arg("paths")
        .output()
        .expect("run build-k8s.sh paths");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), PathBuf::from(v.trim().trim_matches('"'))))
        .filter(|(_, p)| p.is_file())
        .collect()
}

/// A running apiserver; purged (processes stopped, directory removed) on drop.
pub struct RealKube {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
    pub paths: HashMap<String, PathBuf>,
    controller_manager: Option<Child>,
}

impl Drop for RealKube {
    fn drop(&mut self) {
        if let Some(mut kcm) = self.controller_manager.take() {
            let _ = kcm.kill();
            let _ = kcm.wait();
        }
        let _ = Command::new("bash")
            .arg(repo_root().join("tests/e2e/lib/kube-apiserver.sh"))
            .arg("purge")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl RealKube {
    /// Starts etcd and kube-apiserver on loopback in a fresh directory under `parent`, or
    /// `None` (after one SKIP line) when the binaries are not built and `CI` is not `true`.
    pub fn start(test: &str, parent: &Path) -> Option<Self> {
        let paths = k8s_paths();
        let missing: Vec<&str> = ["KUBE_APISERVER", "ETCD", "KUBECTL"]
            .into_iter()
            .filter(|k| !paths.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            let msg = format!(
                "{test}: needs {} from tests/e2e/lib/build-k8s.sh (run `bash tests/e2e/lib/build-k8s.sh build`)",
                missing.join(", ")
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
            println!("SKIP {msg}");
            return None;
        }
        let dir = parent.join("kube");
        let out = Command::new("bash")
            .arg(repo_root().join("tests/e2e/lib/kube-apiserver.sh"))
            .arg("start")
            .arg(&dir)
            .env("KUBECTL", &paths["KUBECTL"])
            .output()
            .expect("run kube-apiserver.sh");
        assert!(
            out.status.success(),
            "kube-apiserver.sh start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Self {
            dir,
            env,
            paths,
            controller_manager: None,
        })
    }

    /// Stops kube-apiserver, then etcd, keeping the directory (data, PKI, port).
    pub fn stop(&self) {
        self.script("stop");
    }

    /// Starts etcd and kube-apiserver again after [`RealKube::stop`], on the same port, so
    /// every kubeconfig written so far stays valid (panics if the port was taken meanwhile).
    pub fn start_again(&self) {
        self.script("start");
        let env = std::fs::read_to_string(self.dir.join("env")).unwrap();
        let port = env
            .lines()
            .find_map(|l| l.strip_prefix("APISERVER_PORT="))
            .unwrap_or_default();
        assert_eq!(
            port, self.env["APISERVER_PORT"],
            "the apiserver moved to another port"
        );
    }

    /// [`RealKube::stop`], then [`RealKube::start_again`].
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    fn script(&self, cmd: &str) {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/e2e/lib/kube-apiserver.sh"))
            .arg(cmd)
            .arg(&self.dir)
            .env("KUBECTL", &self.paths["KUBECTL"])
            .output()
            .expect("run kube-apiserver.sh");
        assert!(
            out.status.success(),
            "kube-apiserver.sh {cmd} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn port(&self) -> u16 {
        self.env["APISERVER_PORT"].parse().unwrap()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("pki/ca.crt")).unwrap()
    }

    /// `kubectl` as the admin; panics unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, None)
    }

    /// Applies CustomResourceDefinitions (YAML) and waits until every CRD is established.
    pub fn install_crds(&self, yaml: &str) -> String {
        let applied = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]);
        applied
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(&self.paths["KUBECTL"])
            .arg("--kubeconfig")
            .arg(self.dir.join("admin.kubeconfig"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the import manifest sets up for the agent, reduced: namespace `cattle-system`,
    /// SA `cattle` bound to cluster-admin. Returns a token of it from the TokenRequest API,
    /// as the kubelet projects into the pod.
    pub fn cattle_service_account(&self) -> String {
        self.kubectl_stdin(
            &["apply", "-f", "-"],
            Some(
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: cattle-system}\n---\n\
                 apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: cattle, namespace: cattle-system}\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
                 metadata: {name: cattle-admin-binding}\n\
                 roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\n\
                 subjects: [{kind: ServiceAccount, name: cattle, namespace: cattle-system}]\n",
            ),
        );
        self.kubectl(&[
            "-n",
            "cattle-system",
            "create",
            "token",
            "cattle",
            "--duration=1h",
        ])
        .trim()
        .to_owned()
    }

    pub fn has_controller_manager(&self) -> bool {
        self.paths.contains_key("KUBE_CONTROLLER_MANAGER")
    }

    /// Starts kube-controller-manager with only the service-account token controller (the
    /// one that fills `kubernetes.io/service-account-token` Secrets).
    pub fn start_token_controller(&mut self) {
        let kcm = &self.paths["KUBE_CONTROLLER_MANAGER"];
        let log = std::fs::File::create(self.dir.join("kube-controller-manager.log")).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(kcm)
            .arg(format!(
                "--kubeconfig={}",
                self.dir.join("admin.kubeconfig").display()
            ))
            .arg(format!(
                "--service-account-private-key-file={}",
                self.dir.join("pki/sa.key").display()
            ))
            .arg(format!(
                "--root-ca-file={}",
                self.dir.join("pki/ca.crt").display()
            ))
            .arg("--controllers=serviceaccount-token")
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg("--v=1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kube-controller-manager");
        self.controller_manager = Some(child);
    }

    pub fn controller_manager_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kube-controller-manager.log")).unwrap_or_default()
    }
}
