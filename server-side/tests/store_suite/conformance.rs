//! The contract of [`Store`], written once and run against every backend: what `SqliteStore`
//! does is the reference, so a backend that differs has a bug.
//!
//! Each section works on objects of its own (names carry the section's prefix) and looks only
//! at those in listings, so the sections share one store.

use std::time::{Duration, Instant};

use serde_json::json;
use server_side::store::{
    ClusterAgentReport, DEFAULT_DOCKER_SOCKET, Node, ServerPki, Store, StoreError,
};

/// The store under test and a second handle on the same state (another process's view).
pub(crate) struct Subject<'a> {
    pub(crate) store: &'a dyn Store,
    pub(crate) other: &'a dyn Store,
}

/// Runs every section.
pub(crate) fn run(s: &Subject<'_>) {
    clusters(s.store);
    registration_tokens(s.store);
    nodes(s.store);
    users(s.store);
    api_tokens(s.store);
    grants(s.store);
    cascades(s.store);
    server_state(s.store);
    revision(s);
}

/// Polls `f` every 20 ms until it returns `Some`, up to 10 s.
pub(crate) fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn assert_recent(at: i64, what: &str) {
    let n = now();
    assert!(
        (n - 5..=n + 1).contains(&at),
        "{what}: created_at {at}, now {n}"
    );
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict(_)))
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound(_)))
}

fn node(cluster_id: &str, hostname: &str, created_at: i64) -> Node {
    Node {
        id: server_side::tokens::machine_name(hostname),
        cluster_id: cluster_id.to_owned(),
        hostname: hostname.to_owned(),
        docker_socket: DEFAULT_DOCKER_SOCKET.to_owned(),
        created_at,
        params: json!({ "requestedHostname": hostname, "labels": { "a": "1" } }),
    }
}

fn report(n: u32) -> ClusterAgentReport {
    ClusterAgentReport {
        api_endpoint: format!("https://10.43.0.{n}:443"),
        ca_cert: "Y2E=".to_owned(),
        sa_token: format!("jwt-{n}"),
    }
}

// === sections ===

fn clusters(store: &dyn Store) {
    let (c, t) = store.create_cluster("cl-prod").unwrap();
    assert!(c.id.starts_with("c-") && c.id.len() == 7, "{c:?}");
    assert_eq!(c.name, "cl-prod");
    assert_recent(c.created_at, "cluster");
    assert_eq!(
        (c.api_endpoint.as_deref(), c.ca_cert.as_deref()),
        (None, None)
    );
    assert_eq!(c.sa_token, None);
    assert_eq!(t.cluster_id, c.id);
    assert_eq!(t.token.len(), 54);
    assert_eq!(t.created_at, c.created_at);
    assert!(
        is_conflict(store.create_cluster("cl-prod")),
        "duplicate name"
    );

    assert_eq!(store.cluster(&c.id).unwrap(), Some(c.clone()));
    assert_eq!(store.cluster("c-nonex").unwrap(), None);
    assert_eq!(
        store.cluster_by_id_or_name("cl-prod").unwrap(),
        Some(c.clone())
    );
    assert_eq!(store.cluster_by_id_or_name(&c.id).unwrap(), Some(c.clone()));
    assert_eq!(store.cluster_by_id_or_name("cl-none").unwrap(), None);
    // A cluster whose name is another's id: the id wins.
    let (shadow, _) = store.create_cluster(&c.id).unwrap();
    assert_eq!(store.cluster_by_id_or_name(&c.id).unwrap(), Some(c.clone()));
    assert_eq!(
        store.cluster_by_id_or_name(&shadow.id).unwrap(),
        Some(shadow.clone())
    );

    // Listed by name.
    for name in ["cl-b", "cl-a", "cl-c"] {
        store.create_cluster(name).unwrap();
    }
    let names: Vec<String> = store
        .clusters()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .filter(|n| n.starts_with("cl-"))
        .collect();
    assert_eq!(names, ["cl-a", "cl-b", "cl-c", "cl-prod"]);

    // The agent's report: true when anything changed.
    assert!(store.set_cluster_agent_report(&c.id, &report(1)).unwrap());
    assert!(!store.set_cluster_agent_report(&c.id, &report(1)).unwrap());
    let got = store.cluster(&c.id).unwrap().unwrap();
    assert_eq!(got.api_endpoint.as_deref(), Some("https://10.43.0.1:443"));
    assert_eq!(got.ca_cert.as_deref(), Some("Y2E="));
    assert_eq!(got.sa_token.as_deref(), Some("jwt-1"));
    let only_token = ClusterAgentReport {
        sa_token: "jwt-1b".to_owned(),
        ..report(1)
    };
    assert!(store.set_cluster_agent_report(&c.id, &only_token).unwrap());
    assert_eq!(
        store
            .cluster_by_id_or_name("cl-prod")
            .unwrap()
            .unwrap()
            .sa_token
            .as_deref(),
        Some("jwt-1b")
    );
    assert!(
        !store
            .set_cluster_agent_report("c-nonex", &report(2))
            .unwrap()
    );
    assert_eq!(store.cluster("c-nonex").unwrap(), None);

    assert!(store.delete_cluster(&c.id).unwrap());
    assert!(!store.delete_cluster(&c.id).unwrap());
    assert_eq!(store.cluster(&c.id).unwrap(), None);
    assert_eq!(store.cluster_by_id_or_name("cl-prod").unwrap(), None);
    // The name is free again.
    store.create_cluster("cl-prod").unwrap();
}

fn registration_tokens(store: &dyn Store) {
    let (c, t1) = store.create_cluster("rt-one").unwrap();
    let (other, t_other) = store.create_cluster("rt-two").unwrap();
    assert_eq!(
        store.cluster_for_registration_token(&t1.token).unwrap(),
        Some(c.id.clone())
    );
    assert_eq!(
        store
            .cluster_for_registration_token(&t_other.token)
            .unwrap(),
        Some(other.id.clone())
    );
    assert_eq!(store.cluster_for_registration_token("nope").unwrap(), None);
    assert_eq!(store.cluster_for_registration_token("").unwrap(), None);
    // A token differing in its last character.
    let mut near = t1.token.clone();
    let last = near.pop().unwrap();
    near.push(if last == 'a' { 'b' } else { 'a' });
    assert_eq!(store.cluster_for_registration_token(&near).unwrap(), None);

    // Oldest first: creation order, also within one second.
    let t2 = store.create_registration_token(&c.id).unwrap();
    let t3 = store.create_registration_token(&c.id).unwrap();
    let t4 = store.create_registration_token(&c.id).unwrap();
    assert_eq!(t2.cluster_id, c.id);
    assert_recent(t2.created_at, "registration token");
    assert_eq!(
        store.registration_tokens(&c.id).unwrap(),
        vec![t1.clone(), t2.clone(), t3.clone(), t4.clone()]
    );
    assert_eq!(
        store.registration_tokens(&other.id).unwrap(),
        vec![t_other.clone()]
    );
    assert!(store.registration_tokens("c-nonex").unwrap().is_empty());
    assert!(
        is_not_found(store.create_registration_token("c-nonex")),
        "token of an unknown cluster"
    );

    // Deleting: only from its own cluster.
    assert!(
        !store
            .delete_registration_token(&other.id, &t2.token)
            .unwrap()
    );
    assert!(store.delete_registration_token(&c.id, &t2.token).unwrap());
    assert!(!store.delete_registration_token(&c.id, &t2.token).unwrap());
    assert!(!store.delete_registration_token(&c.id, "nope").unwrap());
    assert_eq!(
        store.cluster_for_registration_token(&t2.token).unwrap(),
        None
    );
    assert_eq!(
        store.registration_tokens(&c.id).unwrap(),
        vec![t1.clone(), t3.clone(), t4.clone()]
    );
}

fn nodes(store: &dyn Store) {
    let (a, _) = store.create_cluster("nd-a").unwrap();
    let (b, _) = store.create_cluster("nd-b").unwrap();
    assert!(
        is_not_found(store.upsert_node(&node("c-nonex", "h1", 1))),
        "node of an unknown cluster"
    );

    let n1 = node(&a.id, "h1", 100);
    store.upsert_node(&n1).unwrap();
    assert_eq!(store.node(&a.id, &n1.id).unwrap(), Some(n1.clone()));
    assert_eq!(store.node(&b.id, &n1.id).unwrap(), None);
    assert_eq!(store.node(&a.id, "m-000000000000").unwrap(), None);
    store.upsert_node(&n1).unwrap();
    assert_eq!(store.nodes(Some(&a.id)).unwrap(), vec![n1.clone()]);

    // The Docker socket is set apart; a re-registration keeps it and the creation time, and
    // takes the new hostname and params.
    assert!(
        store
            .set_node_docker_socket(&a.id, &n1.id, "/run/docker.sock")
            .unwrap()
    );
    assert!(
        !store
            .set_node_docker_socket(&a.id, "m-000000000000", "/x")
            .unwrap()
    );
    assert!(!store.set_node_docker_socket(&b.id, &n1.id, "/x").unwrap());
    let again = Node {
        hostname: "H1".to_owned(),
        docker_socket: DEFAULT_DOCKER_SOCKET.to_owned(),
        created_at: 999,
        params: json!({ "requestedHostname": "H1" }),
        ..n1.clone()
    };
    store.upsert_node(&again).unwrap();
    let stored = store.node(&a.id, &n1.id).unwrap().unwrap();
    assert_eq!(
        stored,
        Node {
            docker_socket: "/run/docker.sock".to_owned(),
            created_at: 100,
            ..again.clone()
        },
        "params are replaced, not merged"
    );

    // The same machine name in two clusters: oldest first, whichever was written first.
    let older = node(&b.id, "h1", 50);
    store.upsert_node(&older).unwrap();
    let named = store.nodes_named(&n1.id).unwrap();
    assert_eq!(
        named
            .iter()
            .map(|n| n.cluster_id.as_str())
            .collect::<Vec<_>>(),
        [b.id.as_str(), a.id.as_str()]
    );
    assert!(store.nodes_named("m-000000000000").unwrap().is_empty());

    // All nodes: by cluster, then hostname.
    let n2 = node(&a.id, "g2", 200);
    store.upsert_node(&n2).unwrap();
    let mut ids = [a.id.clone(), b.id.clone()];
    ids.sort();
    let listed: Vec<(String, String)> = store
        .nodes(None)
        .unwrap()
        .into_iter()
        .filter(|n| n.cluster_id == a.id || n.cluster_id == b.id)
        .map(|n| (n.cluster_id, n.hostname))
        .collect();
    let mut expected = vec![
        (a.id.clone(), "H1".to_owned()),
        (a.id.clone(), "g2".to_owned()),
        (b.id.clone(), "h1".to_owned()),
    ];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(
        store.nodes(Some(&a.id)).unwrap().len(),
        2,
        "the nodes of one cluster"
    );
    assert!(store.nodes(Some("c-nonex")).unwrap().is_empty());

    assert!(store.delete_node(&a.id, &n2.id).unwrap());
    assert!(!store.delete_node(&a.id, &n2.id).unwrap());
    assert!(!store.delete_node(&b.id, "m-000000000000").unwrap());
    assert_eq!(store.node(&a.id, &n2.id).unwrap(), None);
    assert_eq!(store.nodes(Some(&a.id)).unwrap().len(), 1);
}

fn users(store: &dyn Store) {
    let u = store
        .create_user("us-alice", &["dev".to_owned(), "ops".to_owned()], false)
        .unwrap();
    assert!(u.id.starts_with("u-"), "{u:?}");
    assert_eq!(u.name, "us-alice");
    assert_eq!(u.groups, ["dev", "ops"]);
    assert!(!u.admin);
    assert_recent(u.created_at, "user");
    assert!(
        is_conflict(store.create_user("us-alice", &[], true)),
        "duplicate name"
    );

    assert_eq!(store.user(&u.id).unwrap(), Some(u.clone()));
    assert_eq!(store.user("u-nonexist").unwrap(), None);
    assert_eq!(
        store.user_by_id_or_name("us-alice").unwrap(),
        Some(u.clone())
    );
    assert_eq!(store.user_by_id_or_name(&u.id).unwrap(), Some(u.clone()));
    assert_eq!(store.user_by_id_or_name("us-nobody").unwrap(), None);
    let shadow = store.create_user(&u.id, &[], false).unwrap();
    assert_eq!(store.user_by_id_or_name(&u.id).unwrap(), Some(u.clone()));
    assert!(store.delete_user(&shadow.id).unwrap());

    let admin = store.create_user("us-root", &[], true).unwrap();
    assert!(admin.admin && admin.groups.is_empty());
    store.create_user("us-bob", &[], false).unwrap();
    let names: Vec<String> = store
        .users()
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .filter(|n| n.starts_with("us-"))
        .collect();
    assert_eq!(names, ["us-alice", "us-bob", "us-root"]);

    assert!(store.delete_user(&u.id).unwrap());
    assert!(!store.delete_user(&u.id).unwrap());
    assert_eq!(store.user(&u.id).unwrap(), None);
    store.create_user("us-alice", &[], false).unwrap();
}

fn api_tokens(store: &dyn Store) {
    let u = store
        .create_user("tk-eve", &["g".to_owned()], false)
        .unwrap();
    let other = store.create_user("tk-mallory", &[], false).unwrap();
    assert!(
        is_not_found(store.create_api_token("u-nonexist", "x", None)),
        "token of an unknown user"
    );
    let n = now();
    let (forever, forever_bearer) = store.create_api_token(&u.id, "cli", None).unwrap();
    assert!(forever.id.starts_with("token-"), "{forever:?}");
    assert!(forever_bearer.starts_with(&format!("{}:", forever.id)));
    assert_eq!(
        (forever.user_id.as_str(), forever.description.as_str()),
        (u.id.as_str(), "cli")
    );
    assert_recent(forever.created_at, "token");
    assert!(!forever.revoked && forever.expires_at.is_none() && forever.last_used_at.is_none());
    let (past, past_bearer) = store.create_api_token(&u.id, "old", Some(n - 1)).unwrap();
    let (future, future_bearer) = store
        .create_api_token(&u.id, "new", Some(n + 3600))
        .unwrap();
    let (theirs, theirs_bearer) = store.create_api_token(&other.id, "", None).unwrap();

    assert_eq!(
        store.authenticate(&forever_bearer).unwrap(),
        Some(u.clone())
    );
    assert_eq!(store.authenticate(&future_bearer).unwrap(), Some(u.clone()));
    assert_eq!(
        store.authenticate(&theirs_bearer).unwrap(),
        Some(other.clone())
    );
    assert_eq!(store.authenticate(&past_bearer).unwrap(), None, "expired");
    let secret = forever_bearer.split_once(':').unwrap().1;
    for bad in [
        format!("{}:wrong", forever.id),
        format!("{}:{secret}", theirs.id),
        format!("{}:", forever.id),
        forever.id.clone(),
        format!("token-nonex:{secret}"),
        format!("../x:{secret}"),
        "garbage".to_owned(),
        String::new(),
    ] {
        assert_eq!(store.authenticate(&bad).unwrap(), None, "{bad:?}");
    }

    // Listed oldest first (then by id); all, or one user's.
    let listed = store.api_tokens(Some(&u.id)).unwrap();
    let mut expected = vec![forever.clone(), past.clone(), future.clone()];
    expected.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    assert_eq!(listed, expected);
    let all: Vec<_> = store
        .api_tokens(None)
        .unwrap()
        .into_iter()
        .filter(|t| t.user_id == u.id || t.user_id == other.id)
        .collect();
    let mut expected_all = vec![
        forever.clone(),
        past.clone(),
        future.clone(),
        theirs.clone(),
    ];
    expected_all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    assert_eq!(all, expected_all);
    assert!(store.api_tokens(Some("u-nonexist")).unwrap().is_empty());
    assert!(past.expired(n) && !future.expired(n) && !forever.expired(n));

    // Last use only moves forward; unknown ids are ignored; one batch for several tokens.
    store.record_api_token_uses(&[]).unwrap();
    store
        .record_api_token_uses(&[
            (forever.id.clone(), n - 100),
            (theirs.id.clone(), n - 50),
            ("token-nonex".to_owned(), n),
        ])
        .unwrap();
    let last_used = |id: &str| {
        store
            .api_tokens(None)
            .unwrap()
            .into_iter()
            .find(|t| t.id == id)
            .unwrap()
            .last_used_at
    };
    assert_eq!(last_used(&forever.id), Some(n - 100));
    assert_eq!(last_used(&theirs.id), Some(n - 50));
    store
        .record_api_token_uses(&[(forever.id.clone(), n - 200)])
        .unwrap();
    assert_eq!(
        last_used(&forever.id),
        Some(n - 100),
        "an older use is ignored"
    );
    store
        .record_api_token_uses(&[(forever.id.clone(), n - 100), (past.id.clone(), n)])
        .unwrap();
    assert_eq!(last_used(&forever.id), Some(n - 100));
    assert_eq!(
        last_used(&past.id),
        Some(n),
        "expired tokens still record uses"
    );
    store
        .record_api_token_uses(&[(forever.id.clone(), n + 5)])
        .unwrap();
    assert_eq!(last_used(&forever.id), Some(n + 5));

    // Revoked: authenticates nobody, listed as revoked, other tokens unaffected.
    assert!(store.revoke_api_token(&forever.id).unwrap());
    assert!(
        store.revoke_api_token(&forever.id).unwrap(),
        "revoking twice"
    );
    assert!(!store.revoke_api_token("token-nonex").unwrap());
    assert_eq!(store.authenticate(&forever_bearer).unwrap(), None);
    assert_eq!(store.authenticate(&future_bearer).unwrap(), Some(u.clone()));
    let revoked = store
        .api_tokens(Some(&u.id))
        .unwrap()
        .into_iter()
        .find(|t| t.id == forever.id)
        .unwrap();
    assert!(revoked.revoked);
    assert_eq!(revoked.last_used_at, Some(n + 5));
}

fn grants(store: &dyn Store) {
    let (c1, _) = store.create_cluster("gr-one").unwrap();
    let (c2, _) = store.create_cluster("gr-two").unwrap();
    let u1 = store.create_user("gr-ann", &[], false).unwrap();
    let u2 = store.create_user("gr-ben", &[], false).unwrap();

    let g = store.grant(&u1.id, &c1.id).unwrap();
    assert_eq!(
        (g.user_id.as_str(), g.cluster_id.as_str()),
        (u1.id.as_str(), c1.id.as_str())
    );
    assert_recent(g.created_at, "grant");
    assert_eq!(store.grant(&u1.id, &c1.id).unwrap(), g, "idempotent");
    assert!(
        is_not_found(store.grant(&u1.id, "c-nonex")),
        "unknown cluster"
    );
    assert!(
        is_not_found(store.grant("u-nonexist", &c1.id)),
        "unknown user"
    );

    store.grant(&u2.id, &c2.id).unwrap();
    store.grant(&u2.id, &c1.id).unwrap();
    store.grant(&u1.id, &c2.id).unwrap();
    let listed: Vec<(String, String)> = store
        .grants()
        .unwrap()
        .into_iter()
        .filter(|g| g.user_id == u1.id || g.user_id == u2.id)
        .map(|g| (g.user_id, g.cluster_id))
        .collect();
    let mut expected = vec![
        (u1.id.clone(), c1.id.clone()),
        (u1.id.clone(), c2.id.clone()),
        (u2.id.clone(), c1.id.clone()),
        (u2.id.clone(), c2.id.clone()),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    assert!(store.is_granted(&u1.id, &c1.id).unwrap());
    assert!(!store.is_granted(&u1.id, "c-nonex").unwrap());
    assert!(!store.is_granted("u-nonexist", &c1.id).unwrap());
    assert!(store.revoke_grant(&u1.id, &c1.id).unwrap());
    assert!(!store.revoke_grant(&u1.id, &c1.id).unwrap());
    assert!(!store.is_granted(&u1.id, &c1.id).unwrap());
    assert!(store.is_granted(&u1.id, &c2.id).unwrap());
    let again = store.grant(&u1.id, &c1.id).unwrap();
    assert!(store.is_granted(&u1.id, &c1.id).unwrap());
    assert_eq!(store.grant(&u1.id, &c1.id).unwrap(), again);
}

fn cascades(store: &dyn Store) {
    // A cluster takes its tokens, nodes and grants with it; other clusters keep theirs.
    let (c, t) = store.create_cluster("cc-gone").unwrap();
    let (keep, keep_t) = store.create_cluster("cc-kept").unwrap();
    let t2 = store.create_registration_token(&c.id).unwrap();
    let u = store.create_user("cc-user", &[], false).unwrap();
    let n = node(&c.id, "cc-host", 10);
    let n_keep = node(&keep.id, "cc-host", 20);
    store.upsert_node(&n).unwrap();
    store.upsert_node(&n_keep).unwrap();
    store.grant(&u.id, &c.id).unwrap();
    store.grant(&u.id, &keep.id).unwrap();

    assert!(store.delete_cluster(&c.id).unwrap());
    for token in [&t.token, &t2.token] {
        assert_eq!(store.cluster_for_registration_token(token).unwrap(), None);
    }
    assert!(store.registration_tokens(&c.id).unwrap().is_empty());
    assert_eq!(store.node(&c.id, &n.id).unwrap(), None);
    assert!(store.nodes(Some(&c.id)).unwrap().is_empty());
    assert!(
        !store
            .nodes(None)
            .unwrap()
            .iter()
            .any(|x| x.cluster_id == c.id)
    );
    assert_eq!(store.nodes_named(&n.id).unwrap(), vec![n_keep.clone()]);
    assert!(!store.is_granted(&u.id, &c.id).unwrap());
    assert!(!store.grants().unwrap().iter().any(|g| g.cluster_id == c.id));
    assert_eq!(
        store.cluster_for_registration_token(&keep_t.token).unwrap(),
        Some(keep.id.clone())
    );
    assert!(store.is_granted(&u.id, &keep.id).unwrap());
    // A cluster created again under the same name starts empty.
    let (again, _) = store.create_cluster("cc-gone").unwrap();
    assert_ne!(again.id, c.id);
    assert!(store.nodes(Some(&again.id)).unwrap().is_empty());

    // A user takes their tokens and grants with them; other users keep theirs.
    let other = store.create_user("cc-other", &[], false).unwrap();
    let (tok, bearer) = store.create_api_token(&u.id, "", None).unwrap();
    let (_, other_bearer) = store.create_api_token(&other.id, "", None).unwrap();
    store.grant(&other.id, &keep.id).unwrap();
    assert!(store.delete_user(&u.id).unwrap());
    assert_eq!(store.authenticate(&bearer).unwrap(), None);
    assert!(store.api_tokens(Some(&u.id)).unwrap().is_empty());
    assert!(
        !store
            .api_tokens(None)
            .unwrap()
            .iter()
            .any(|t| t.id == tok.id)
    );
    assert!(!store.revoke_api_token(&tok.id).unwrap());
    assert!(!store.is_granted(&u.id, &keep.id).unwrap());
    assert!(!store.grants().unwrap().iter().any(|g| g.user_id == u.id));
    assert_eq!(
        store.authenticate(&other_bearer).unwrap(),
        Some(other.clone())
    );
    assert!(store.is_granted(&other.id, &keep.id).unwrap());
}

fn server_state(store: &dyn Store) {
    assert_eq!(store.pki().unwrap(), None);
    let pki = ServerPki {
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into(),
        ca_key_pem: "ca key".into(),
        cert_pem: "cert".into(),
        key_pem: "key".into(),
        sans: vec!["localhost".into(), "127.0.0.1".into()],
    };
    store.set_pki(&pki).unwrap();
    assert_eq!(store.pki().unwrap(), Some(pki.clone()));
    let reissued = ServerPki {
        cert_pem: "cert 2".into(),
        sans: vec![],
        ..pki
    };
    store.set_pki(&reissued).unwrap();
    assert_eq!(store.pki().unwrap(), Some(reissued));

    assert_eq!(store.setting("st-a").unwrap(), None);
    store.set_setting("st-a", "1").unwrap();
    store.set_setting("st-b", "").unwrap();
    assert_eq!(store.setting("st-a").unwrap().as_deref(), Some("1"));
    assert_eq!(store.setting("st-b").unwrap().as_deref(), Some(""));
    store.set_setting("st-a", "2 ✓").unwrap();
    assert_eq!(store.setting("st-a").unwrap().as_deref(), Some("2 ✓"));
}

fn revision(s: &Subject<'_>) {
    let (store, other) = (s.store, s.other);
    let r0 = store.revision().unwrap();
    assert_eq!(store.revision().unwrap(), r0, "no write, no change");

    // This handle's own write is visible to it at once, and moves its revision at once.
    let (c, _) = store.create_cluster("rv-one").unwrap();
    let r1 = store.revision().unwrap();
    assert_ne!(r1, r0, "own write");

    // Another handle's write: visible here, and the revision has moved, once it has arrived.
    let o0 = other.revision().unwrap();
    let u = other.create_user("rv-user", &[], false).unwrap();
    assert_ne!(other.revision().unwrap(), o0, "own write (other handle)");
    until("the other handle's user", || {
        store.user(&u.id).unwrap().filter(|found| *found == u)
    });
    assert_ne!(store.revision().unwrap(), r1, "another handle's write");
    until("this handle's cluster on the other handle", || {
        other.cluster(&c.id).unwrap().filter(|found| *found == c)
    });

    // Each kind of write moves it, whichever handle made it.
    let moves = |what: &str, write: &dyn Fn()| {
        let before = store.revision().unwrap();
        write();
        until(what, || (store.revision().unwrap() != before).then_some(()));
    };
    moves("grant", &|| drop(other.grant(&u.id, &c.id).unwrap()));
    moves("revoke grant", &|| {
        assert!(other.revoke_grant(&u.id, &c.id).unwrap())
    });
    moves("delete user", &|| {
        assert!(other.delete_user(&u.id).unwrap())
    });
    moves("delete cluster", &|| {
        assert!(store.delete_cluster(&c.id).unwrap())
    });
    until("the deletions on both handles", || {
        let gone = store.user(&u.id).unwrap().is_none()
            && other.cluster(&c.id).unwrap().is_none()
            && !store.is_granted(&u.id, &c.id).unwrap();
        gone.then_some(())
    });
}
