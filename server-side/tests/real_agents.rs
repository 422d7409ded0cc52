//! The project's real agents (`agent-cluster`, `agent-node`, run in-process through their
//! library `run` functions, exactly what their binaries call) against the real `tunnel-server`
//! binary: the cluster agent registers with the served manifest's token and CA checksum, opens
//! the steve tunnel and the cluster becomes Connected; a granted user reaches the agent's
//! (stand-in) apiserver through `/k8s/clusters/<id>/…` with impersonation; the node agent
//! registers its node and the Docker API of its (stand-in) dockerd answers through
//! `/docker/nodes/<node-id>/…`.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use http::StatusCode;
use tokio::time::timeout;

use support::*;

fn common_env(
    server: &ServerProc,
    checksum: &str,
    dir: &std::path::Path,
    tag: &str,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("CATTLE_SERVER".to_owned(), server.url.clone());
    env.insert("CATTLE_CA_CHECKSUM".to_owned(), checksum.to_owned());
    env.insert(
        "CATTLE_AGENT_STATE_DIR".to_owned(),
        dir.join(format!("{tag}-state")).display().to_string(),
    );
    env.insert(
        "CATTLE_CREDENTIALS_DIR".to_owned(),
        dir.join(format!("{tag}-creds")).display().to_string(),
    );
    env.insert(
        "CATTLE_AGENT_HEALTH_ADDR".to_owned(),
        "127.0.0.1:0".to_owned(),
    );
    env.insert("CATTLE_AGENT_BACKOFF_MIN".to_owned(), "200ms".to_owned());
    env.insert("CATTLE_AGENT_BACKOFF_MAX".to_owned(), "1s".to_owned());
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_and_node_agents() {
    timeout(Duration::from_secs(90), async {
        let dir = TempDir::new("agents");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, token, import_url) = add_cluster(dir.path(), "real");
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let grace = add_user(dir.path(), "grace", &["--group", "sre"]);
        cli(dir.path(), &["grant", "grace", "real"]);

        // What the manifest gives the agent.
        let manifest = http
            .get(import_url.strip_prefix(&server.url).unwrap(), None)
            .await
            .body;
        let checksum = manifest
            .lines()
            .skip_while(|l| !l.contains("CATTLE_CA_CHECKSUM"))
            .nth(1)
            .and_then(|l| l.trim().strip_prefix("value: "))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap();

        // The cluster agent: credentials as mounted from the manifest's Secret, in-cluster
        // service-account files, and the apiserver address.
        let apiserver = FakeApiserver::start().await;
        let mut env = common_env(&server, &checksum, dir.path(), "cluster");
        let creds = dir.path().join("cluster-creds");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("url"), &server.url).unwrap();
        std::fs::write(creds.join("token"), &token).unwrap();
        std::fs::write(dir.path().join("sa-token"), "real-agent-sa-token\n").unwrap();
        std::fs::write(dir.path().join("sa-ca.crt"), &apiserver.ca_pem).unwrap();
        env.insert("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned());
        env.insert(
            "KUBERNETES_SERVICE_PORT".to_owned(),
            apiserver.addr.port().to_string(),
        );
        env.insert(
            "CATTLE_SA_TOKEN_FILE".to_owned(),
            dir.path().join("sa-token").display().to_string(),
        );
        env.insert(
            "CATTLE_SA_CA_FILE".to_owned(),
            dir.path().join("sa-ca.crt").display().to_string(),
        );
        let config =
            agent_cluster::ClusterConfig::from_strings(&env).expect("cluster agent config");
        let cluster_agent = tokio::spawn(agent_cluster::run(config));

        let c = eventually(
            Duration::from_secs(20),
            "cluster connected through the real agent",
            || async {
                let c = http
                    .api("GET", &format!("/v1/clusters/{cluster_id}"), &admin, None)
                    .await
                    .json();
                (c["tunnel"] == true && c["connected"] == true).then_some(c)
            },
        )
        .await;
        println!(
            "cluster: tunnel={} aggregationTunnel={} connected={} apiEndpoint={}",
            c["tunnel"], c["aggregationTunnel"], c["connected"], c["apiEndpoint"]
        );
        assert_eq!(
            c["apiEndpoint"],
            format!("https://127.0.0.1:{}", apiserver.addr.port())
        );

        let r = http
            .get(
                &format!("/k8s/clusters/{cluster_id}/api/v1/pods"),
                Some(&grace),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let seen = apiserver.last();
        println!(
            "apiserver saw {} {} user={:?} group={:?}",
            seen.method,
            seen.path,
            seen.headers.get("impersonate-user"),
            seen.headers.get("impersonate-group")
        );
        assert_eq!(seen.path, "/api/v1/pods");
        assert_eq!(seen.headers["authorization"], "Bearer real-agent-sa-token");
        assert_eq!(seen.headers["impersonate-user"], "grace");
        assert_eq!(seen.headers["impersonate-group"], "sre");

        // The node agent, docker socket pointed at a stand-in dockerd.
        let dockerd = FakeDockerd::start(dir.path());
        let mut env = common_env(&server, &checksum, dir.path(), "node");
        env.insert("CATTLE_TOKEN".to_owned(), token.clone());
        env.insert("CATTLE_NODE_NAME".to_owned(), "real-node-1".to_owned());
        env.insert("CATTLE_ADDRESS".to_owned(), "127.0.0.1".to_owned());
        env.insert("CATTLE_INTERNAL_ADDRESS".to_owned(), "127.0.0.1".to_owned());
        env.insert(
            "CATTLE_DOCKER_SOCKET".to_owned(),
            dockerd.socket.display().to_string(),
        );
        let config = agent_node::NodeConfig::from_strings(&env, &agent_node::RealHost)
            .expect("node agent config");
        let node_agent = tokio::spawn(agent_node::run(config));
        let node_id = server_side::tokens::machine_name("real-node-1");
        let n = eventually(Duration::from_secs(20), "node connected", || async {
            let n = http
                .api("GET", &format!("/v1/nodes/{node_id}"), &admin, None)
                .await;
            (n.status == StatusCode::OK && n.json()["connected"] == true).then(|| n.json())
        })
        .await;
        println!(
            "node: {} {} connected={}",
            n["id"], n["hostname"], n["connected"]
        );
        let r = http
            .get(&format!("/docker/nodes/{node_id}/_ping"), Some(&grace))
            .await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "OK"));

        cluster_agent.abort();
        node_agent.abort();
    })
    .await
    .expect("test exceeded its bound");
}
