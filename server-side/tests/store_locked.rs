//! An admin write holding the database for 5 s does not stall the server: against the real
//! `tunnel-server serve`, this test opens the same `state.db`, takes the write lock
//! (`BEGIN IMMEDIATE` and a write, as the CLI does) and holds it for 5 s, while it measures
//! agents' tunnel authentications (a cluster agent's and a node agent's reconnects, which
//! store what they report) and users' requests (`GET /v1/clusters`, `GET /v1/tokens`, and
//! `/k8s` proxied through an agent to a stand-in apiserver). It prints p50/p99/max of each and
//! requires every one to succeed in well under the lock's 5 s. A `/v1` write started during the
//! lock waits for it (that is expected) without holding up the reads.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tokio::time::{Instant, timeout};
use tunnel_proto::driver::connector::Trust;

use support::*;

const BOUND: Duration = Duration::from_secs(90);
/// How long the test holds the write lock.
const LOCK_HELD: Duration = Duration::from_secs(5);
/// The slowest any measured operation may be while the lock is held.
const LIMIT: Duration = Duration::from_secs(1);
/// Bound on one operation, so a stalled server fails the test instead of hanging it.
const OP_BOUND: Duration = Duration::from_secs(15);

/// Latencies of one kind of operation started while the lock was held.
struct Samples {
    what: &'static str,
    ok: Vec<Duration>,
    failed: Vec<String>,
}

impl Samples {
    fn report(&mut self) -> Duration {
        self.ok.sort();
        let n = self.ok.len();
        let pick = |q: f64| {
            if n == 0 {
                Duration::ZERO
            } else {
                self.ok[(((n as f64) * q).ceil() as usize).clamp(1, n) - 1]
            }
        };
        let max = self.ok.last().copied().unwrap_or_default();
        println!(
            "{:<32} n={:<4} failed={:<3} p50={:>7.1?} p99={:>7.1?} max={:>7.1?}",
            self.what,
            n,
            self.failed.len(),
            pick(0.50),
            pick(0.99),
            max
        );
        max
    }
}

/// Runs `op` again and again until `held` turns false, timing each run that started while the
/// lock was held.
async fn measure<F, Fut>(what: &'static str, held: Arc<AtomicBool>, mut op: F) -> Samples
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut samples = Samples {
        what,
        ok: Vec::new(),
        failed: Vec::new(),
    };
    while held.load(Ordering::Acquire) {
        let started = Instant::now();
        match timeout(OP_BOUND, op()).await {
            Ok(Ok(())) => samples.ok.push(started.elapsed()),
            Ok(Err(e)) => samples
                .failed
                .push(format!("{e} after {:?}", started.elapsed())),
            Err(_) => samples.failed.push(format!("no answer in {OP_BOUND:?}")),
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_lock_stalls_neither_tunnels_nor_requests() {
    timeout(BOUND, async {
        let dir = TempDir::new("locked");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let (proxied_id, proxied_token, _) = add_cluster(dir.path(), "proxied");
        let (_, churn_token, _) = add_cluster(dir.path(), "churn");

        // A steady cluster agent for the /k8s requests; another cluster's agents reconnect in a
        // loop. Their first registrations (stored before the lock) make later ones unchanged.
        let apiserver = FakeApiserver::start().await;
        let _agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&proxied_token, &apiserver.cluster_params("jwt-proxied")),
            trust.clone(),
            None,
        )
        .await
        .expect("cluster agent connects");
        let churn_cluster = agent_headers(&churn_token, &apiserver.cluster_params("jwt-churn"));
        let churn_node = agent_headers(
            &churn_token,
            &json!({"node": {"requestedHostname": "churn-node"}}),
        );
        for headers in [&churn_cluster, &churn_node] {
            connect_agent(&server, "/v3/connect/register", headers.clone(), trust.clone(), None)
                .await
                .expect("first registration")
                .close();
        }
        let k8s_path = format!("/k8s/clusters/{proxied_id}/version");
        eventually(Duration::from_secs(10), "/k8s through the agent", || async {
            (http.get(&k8s_path, Some(&admin)).await.status == StatusCode::OK).then_some(())
        })
        .await;

        // Hold the write lock from another connection, as an admin CLI write would.
        let db = dir.path().join("state.db");
        let held = Arc::new(AtomicBool::new(true));
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let holder = std::thread::spawn({
            let (db, held) = (db.clone(), held.clone());
            move || {
                let conn = rusqlite::Connection::open(&db).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch(
                    "BEGIN IMMEDIATE; \
                     INSERT INTO settings (name, value) VALUES ('lock-test', 'held') \
                     ON CONFLICT (name) DO UPDATE SET value = 'held';",
                )
                .unwrap();
                locked_tx.send(()).unwrap();
                // The point of the test: the lock is held this long.
                std::thread::sleep(LOCK_HELD);
                held.store(false, Ordering::Release);
                conn.execute_batch("COMMIT").unwrap();
            }
        });
        locked_rx.await.unwrap();
        // The lock is really held: another writer is refused at once.
        let probe = rusqlite::Connection::open(&db).unwrap();
        probe.busy_timeout(Duration::ZERO).unwrap();
        let refused = probe.execute_batch("BEGIN IMMEDIATE");
        assert!(refused.is_err(), "the write lock is not held");
        drop(probe);
        let lock_started = Instant::now();

        // A /v1 write waits for the lock; the reads below must not queue behind it.
        let writer = tokio::spawn({
            let (http, admin) = (http.clone(), admin.clone());
            async move {
                let started = Instant::now();
                let r = http
                    .api("POST", "/v1/users", &admin, Some(json!({"name": "during-lock"})))
                    .await;
                (r.status, started.elapsed())
            }
        });

        let tunnels = tokio::spawn(measure("tunnel auth (cluster + node)", held.clone(), {
            let (server_addr, trust) = (server.addr, trust.clone());
            let (churn_cluster, churn_node) = (churn_cluster.clone(), churn_node.clone());
            let server = ServerRef(server_addr);
            move || {
                let (server, trust) = (server.clone(), trust.clone());
                let (cluster, node) = (churn_cluster.clone(), churn_node.clone());
                async move {
                    for (path, headers) in [("/v3/connect", cluster), ("/v3/connect/register", node)] {
                        let tunnel = server
                            .dial(path, headers, trust.clone())
                            .await
                            .map_err(|e| format!("tunnel {path}: {e}"))?;
                        tunnel.close();
                    }
                    Ok(())
                }
            }
        }));
        let get = |what: &'static str, path: String| {
            let (http, admin, held) = (http.clone(), admin.clone(), held.clone());
            tokio::spawn(async move {
                measure(what, held, || {
                    let (http, admin, path) = (http.clone(), admin.clone(), path.clone());
                    async move {
                        let r = http.get(&path, Some(&admin)).await;
                        if r.status == StatusCode::OK {
                            Ok(())
                        } else {
                            Err(format!("GET {path}: {} {}", r.status, r.body))
                        }
                    }
                })
                .await
            })
        };
        let clusters = get("GET /v1/clusters", "/v1/clusters".to_owned());
        let tokens = get("GET /v1/tokens", "/v1/tokens".to_owned());
        let proxied = get("GET /k8s/clusters/<id>/version", k8s_path.clone());

        let mut all = Vec::new();
        for task in [tunnels, clusters, tokens, proxied] {
            all.push(task.await.unwrap());
        }
        holder.join().unwrap();
        let lock_held_for = lock_started.elapsed();
        let (write_status, write_took) = writer.await.unwrap();
        println!("write lock held for {lock_held_for:.1?} (from the first measurement)");
        println!(
            "POST /v1/users started during the lock: {write_status} after {write_took:.1?} (waits for the lock)"
        );
        let mut slowest = Duration::ZERO;
        for s in &mut all {
            slowest = slowest.max(s.report());
        }
        assert!(
            slowest < LIMIT,
            "an operation took {slowest:?} while the database was locked (limit {LIMIT:?})"
        );
        for s in &all {
            assert!(s.failed.is_empty(), "{}: {:?}", s.what, s.failed);
            assert!(s.ok.len() >= 5, "{}: only {} runs during the lock", s.what, s.ok.len());
        }
        // After the lock, the write went through (or was refused after the busy timeout, never
        // lost silently), and the server still writes.
        assert!(
            write_status == StatusCode::CREATED || write_status.is_server_error(),
            "{write_status}"
        );
        let r = http
            .api("POST", "/v1/clusters", &admin, Some(json!({"name": "after-lock"})))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    })
    .await
    .expect("test timed out");
}

/// What the tunnel loop needs of the server, owned (the task outlives no borrow).
#[derive(Clone)]
struct ServerRef(std::net::SocketAddr);

impl ServerRef {
    async fn dial(
        &self,
        path: &str,
        headers: http::HeaderMap,
        trust: Trust,
    ) -> Result<tunnel_proto::driver::Tunnel, tunnel_proto::driver::connector::ConnectError> {
        use tunnel_proto::driver::connector::{Connector, ConnectorConfig};
        use tunnel_proto::{Role, SessionConfig};
        let mut config = ConnectorConfig::new(format!("wss://127.0.0.1:{}{path}", self.0.port()));
        config.set_headers(headers).set_trust(trust);
        let ws = Connector::new(config).unwrap().connect().await?;
        Ok(tunnel_proto::driver::Tunnel::spawn(
            ws,
            SessionConfig::new(Role::Client),
            allow_all(),
        ))
    }
}
