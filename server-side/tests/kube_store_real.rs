//! The Kubernetes store's deployment against a REAL kube-apiserver (the e2e suite's cached
//! build, `agent-cluster/tests/real_kube`):
//!
//! - `deploy/server/kubernetes-store/crds.yaml` is what `tunnel-server crds` prints, the CRDs
//!   install, and `kubectl get clusters.tunnel-server.dev` shows their printer columns;
//! - `tunnel-server migrate` copies a SQLite store populated through the `Store` API into the
//!   Kubernetes store and back, every record equal, a bearer token and a registration token made
//!   before the move still good after it;
//! - the overlay `deploy/server/kubernetes-store` renders, passes a server dry-run and applies;
//!   with nothing but its Role (a token of its ServiceAccount), the store does every kind of
//!   write and read it needs, and another Secret is forbidden.
//!
//! Without the binaries: fails under `CI=true`, otherwise one SKIP line.

mod support;

#[path = "../../agent-cluster/tests/real_kube/mod.rs"]
mod real_kube;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use server_side::store::kube::crd::crds_yaml;
use server_side::store::{
    ClusterAgentReport, KubeStore, KubeStoreConfig, Node, SqliteStore, Store,
};
use support::{BIN, TempDir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const CRDS_FILE: &str = "deploy/server/kubernetes-store/crds.yaml";

#[test]
fn crds_file_is_what_the_code_generates() {
    let file = std::fs::read_to_string(repo().join(CRDS_FILE)).unwrap();
    assert!(
        file == crds_yaml(),
        "{CRDS_FILE} differs from crd::crds_yaml(); regenerate it with \
         `tunnel-server crds > {CRDS_FILE}`"
    );
}

/// `tunnel-server ARGS`.
fn tunnel_server(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    println!(
        "$ tunnel-server {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("Error"))
            .map(|l| format!("  stderr: {l}\n"))
            .collect::<String>()
    );
    out
}

/// A store with a bit of everything, through the `Store` API; returns a bearer value, a
/// registration token and its cluster's id.
fn populate(store: &dyn Store) -> (String, String, String) {
    let (prod, prod_token) = store.create_cluster("prod").unwrap();
    store
        .set_cluster_agent_report(
            &prod.id,
            &ClusterAgentReport {
                api_endpoint: "https://10.43.0.1:443".into(),
                ca_cert: "Y2E=".into(),
                sa_token: "eyJhbGciOi.sa-token".into(),
            },
        )
        .unwrap();
    store.create_registration_token(&prod.id).unwrap();
    let (staging, _) = store.create_cluster("staging").unwrap();
    for (cluster, host) in [(&prod.id, "n1"), (&prod.id, "n2"), (&staging.id, "n1")] {
        store
            .upsert_node(&Node {
                id: server_side::tokens::machine_name(host),
                cluster_id: cluster.clone(),
                hostname: host.into(),
                docker_socket: server_side::store::DEFAULT_DOCKER_SOCKET.into(),
                created_at: 1_700_000_000,
                params: serde_json::json!({"node": {"requestedHostname": host, "labels": {"a": "b"}}}),
            })
            .unwrap();
    }
    store
        .set_node_docker_socket(
            &prod.id,
            &server_side::tokens::machine_name("n2"),
            "/run/d.sock",
        )
        .unwrap();
    let admin = store.create_user("root", &[], true).unwrap();
    let alice = store
        .create_user("alice", &["dev".into(), "ops".into()], false)
        .unwrap();
    store.create_api_token(&admin.id, "admin", None).unwrap();
    let (revoked, _) = store.create_api_token(&alice.id, "old", None).unwrap();
    store.revoke_api_token(&revoked.id).unwrap();
    store
        .create_api_token(&alice.id, "expired", Some(1_000))
        .unwrap();
    let (used, bearer) = store
        .create_api_token(&alice.id, "kubeconfig", Some(4_000_000_000))
        .unwrap();
    store
        .record_api_token_uses(&[(used.id.clone(), 1_750_000_000)])
        .unwrap();
    store.grant(&alice.id, &prod.id).unwrap();
    store.grant(&alice.id, &staging.id).unwrap();
    server_side::pki::ensure(store, &["localhost".into(), "tunnel.example".into()]).unwrap();
    store
        .set_setting("server_url", "https://tunnel.example:8443")
        .unwrap();
    (bearer, prod_token.token, prod.id)
}

#[test]
fn migrate_to_kubernetes_and_back_and_the_overlay_role_is_enough() {
    let dir = TempDir::new("kube-store");
    let Some(kube) = real_kube::RealKube::start("server-side kube_store_real", dir.path()) else {
        return;
    };
    let admin_kubeconfig = kube.dir.join("admin.kubeconfig");
    let admin_kc = admin_kubeconfig.to_str().unwrap();

    // === the CRDs install, and kubectl shows their columns ===
    let crds = repo().join(CRDS_FILE);
    print!("{}", kube.kubectl(&["apply", "-f", crds.to_str().unwrap()]));
    kube.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/clusters.tunnel-server.dev",
        "crd/nodes.tunnel-server.dev",
        "crd/clusterregistrationtokens.tunnel-server.dev",
        "crd/users.tunnel-server.dev",
        "crd/tokens.tunnel-server.dev",
        "crd/grants.tunnel-server.dev",
    ]);
    kube.kubectl(&["create", "namespace", "migrated"]);

    // === SQLite → Kubernetes ===
    let sqlite_dir = dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).unwrap();
    let sqlite = SqliteStore::open(&sqlite_dir.join("state.db")).unwrap();
    let (bearer, registration_token, prod_id) = populate(&sqlite);
    let before = sqlite.export().unwrap();
    println!("populated SQLite: {}", before.counts());

    let from = format!("sqlite:{}", sqlite_dir.display());
    let kube_flags = ["--kubeconfig", admin_kc, "--namespace", "migrated"];
    let migrate = |from: &str, to: &str| {
        let mut args = kube_flags.to_vec();
        args.extend(["migrate", "--from", from, "--to", to]);
        tunnel_server(&args)
    };
    let out = migrate(&from, "kubernetes");
    assert!(out.status.success(), "migrate to kubernetes failed");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&before.counts()), "{said}");

    let config = KubeStoreConfig {
        kubeconfig: Some(admin_kubeconfig.clone()),
        namespace: Some("migrated".into()),
    };
    let kube_store = KubeStore::open(&config).unwrap();
    let after = kube_store.export().unwrap();
    assert_eq!(after, before, "the Kubernetes store holds other records");
    println!("Kubernetes store after migrate: {}", after.counts());
    let user = kube_store.authenticate(&bearer).unwrap();
    assert_eq!(user.map(|u| u.name).as_deref(), Some("alice"));
    assert_eq!(
        kube_store
            .cluster_for_registration_token(&registration_token)
            .unwrap(),
        Some(prod_id.clone())
    );
    assert_eq!(
        kube_store
            .cluster(&prod_id)
            .unwrap()
            .unwrap()
            .sa_token
            .as_deref(),
        Some("eyJhbGciOi.sa-token")
    );
    println!("bearer token of alice and registration token of {prod_id}: good after the move");

    let table = kube.kubectl(&["-n", "migrated", "get", "clusters.tunnel-server.dev"]);
    print!("{table}");
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "DISPLAY NAME", "CONNECTED", "REPLICA", "ENDPOINT"] {
        assert!(header.contains(column), "no column {column}: {header}");
    }
    assert!(
        table.lines().any(|l| l.starts_with(&prod_id)
            && l.contains("prod")
            && l.contains("https://10.43.0.1:443")),
        "{table}"
    );

    // Not twice into the same store.
    let again = migrate(&from, "kubernetes");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // === Kubernetes → SQLite ===
    let back = dir.path().join("back.db");
    let out = migrate("kubernetes", &format!("sqlite:{}", back.display()));
    assert!(out.status.success(), "migrate back failed");
    let back = SqliteStore::open(&back).unwrap();
    assert_eq!(
        back.export().unwrap(),
        before,
        "the round trip lost something"
    );
    assert!(back.authenticate(&bearer).unwrap().is_some());
    drop(kube_store);

    // === the overlay ===
    let rendered = Command::new(&kube.paths["KUBECTL"])
        .args(["kustomize"])
        .arg(repo().join("deploy/server/kubernetes-store"))
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let rendered = String::from_utf8(rendered.stdout).unwrap();
    assert!(!rendered.contains("kind: PersistentVolumeClaim"));
    assert!(rendered.contains("- --store=kubernetes"));
    // A server dry-run needs the namespace for real; then the whole overlay, for real too.
    kube.kubectl(&["create", "namespace", "tunnel-system"]);
    print!(
        "{}",
        kube.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered))
    );
    kube.kubectl_stdin(&["apply", "-f", "-"], Some(&rendered));

    // === the Role is enough: the store as the ServiceAccount ===
    let token = kube.kubectl(&[
        "-n",
        "tunnel-system",
        "create",
        "token",
        "tunnel-server",
        "--duration=1h",
    ]);
    let sa_kubeconfig = dir.path().join("sa.kubeconfig");
    std::fs::write(
        &sa_kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n\
             - name: sa\n  context:\n    cluster: c\n    user: sa\n    namespace: tunnel-system\n\
             current-context: sa\n",
            kube.env["APISERVER_URL"],
            kube.dir.join("pki/ca.crt").display(),
            token.trim()
        ),
    )
    .unwrap();
    let sa_kc = sa_kubeconfig.to_str().unwrap();

    // Every kind of write the server makes, and reads from its caches.
    let store = KubeStore::open(&KubeStoreConfig {
        kubeconfig: Some(sa_kubeconfig.clone()),
        namespace: None,
    })
    .unwrap();
    assert_eq!(store.namespace(), "tunnel-system");
    store
        .import(&before, server_side::store::ImportInto::Empty)
        .unwrap();
    assert_eq!(store.export().unwrap(), before);
    let (c, t) = store.create_cluster("as-the-sa").unwrap();
    store
        .set_cluster_agent_report(
            &c.id,
            &ClusterAgentReport {
                api_endpoint: "https://x".into(),
                ca_cert: "eA==".into(),
                sa_token: "t".into(),
            },
        )
        .unwrap();
    let node = Node {
        id: server_side::tokens::machine_name("sa-node"),
        cluster_id: c.id.clone(),
        hostname: "sa-node".into(),
        docker_socket: server_side::store::DEFAULT_DOCKER_SOCKET.into(),
        created_at: 5,
        params: serde_json::json!({}),
    };
    store.upsert_node(&node).unwrap();
    store.upsert_node(&node).unwrap();
    let u = store.create_user("sa-user", &[], false).unwrap();
    let (tok, sa_bearer) = store.create_api_token(&u.id, "x", None).unwrap();
    store.record_api_token_uses(&[(tok.id.clone(), 9)]).unwrap();
    store.grant(&u.id, &c.id).unwrap();
    store.set_setting("probe", "1").unwrap();
    assert_eq!(store.authenticate(&sa_bearer).unwrap().unwrap().id, u.id);
    assert_eq!(
        store.cluster_for_registration_token(&t.token).unwrap(),
        Some(c.id.clone())
    );
    assert!(store.delete_cluster(&c.id).unwrap());
    assert!(store.delete_user(&u.id).unwrap());
    assert_eq!(store.setting("probe").unwrap().as_deref(), Some("1"));
    drop(store);
    println!(
        "as system:serviceaccount:tunnel-system:tunnel-server: import, create, status patches, deletecollection, state Secret: ok"
    );

    // The admin CLI as the ServiceAccount.
    let out = tunnel_server(&[
        "--store",
        "kubernetes",
        "--kubeconfig",
        sa_kc,
        "cluster",
        "add",
        "from-the-cli",
        "--server-url",
        "https://tunnel.example:8443",
    ]);
    assert!(out.status.success());
    let out = tunnel_server(&[
        "--store",
        "kubernetes",
        "--kubeconfig",
        sa_kc,
        "cluster",
        "list",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-the-cli"));

    // And nothing else.
    kube.kubectl(&[
        "-n",
        "tunnel-system",
        "create",
        "secret",
        "generic",
        "other",
        "--from-literal=k=v",
    ]);
    let as_sa = |args: &[&str]| {
        let out = Command::new(&kube.paths["KUBECTL"])
            .arg("--kubeconfig")
            .arg(&sa_kubeconfig)
            .args(args)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "$ kubectl (as the SA) {}\n  {}",
            args.join(" "),
            said.trim()
        );
        (out.status.success(), said)
    };
    let (ok, said) = as_sa(&["get", "secret", "other"]);
    assert!(!ok && said.contains("forbidden"), "{said}");
    let (ok, said) = as_sa(&["get", "secret", "tunnel-server-state", "-o", "name"]);
    assert!(ok, "{said}");
    let (_, said) = as_sa(&["auth", "can-i", "create", "secrets"]);
    assert_eq!(said.trim(), "no");
    let (ok, said) = as_sa(&["-n", "migrated", "get", "clusters.tunnel-server.dev"]);
    assert!(!ok && said.contains("forbidden"), "{said}");
    let (_, said) = as_sa(&["auth", "can-i", "list", "secrets"]);
    assert_eq!(said.trim(), "no");
}
