//! `/docker/nodes/<node-id>/…` through a node agent's tunnel to a stand-in dockerd on a Unix
//! socket: the path prefix and the user's `Authorization` are removed, a granted user gets
//! through, others get 403/404/401, and `exec start` with `Upgrade: tcp` is spliced both ways.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tunnel_proto::driver::connector::Trust;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_of_a_node_through_its_tunnel() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("docker");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (_cluster_id, token, _) = add_cluster(dir.path(), "edge");
        let dana = add_user(dir.path(), "dana", &[]);
        let eve = add_user(dir.path(), "eve", &[]);
        cli(dir.path(), &["grant", "dana", "edge"]);
        let dockerd = FakeDockerd::start(dir.path());
        let node_id = "m-164546f60261"; // md5("node1")

        // Unknown node, then a registered node without a tunnel.
        assert_eq!(
            http.get(&format!("/docker/nodes/{node_id}/_ping"), Some(&dana))
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        let trust = Trust::CaBundle {
            pem: server.ca_pem().into_bytes(),
            with_system_roots: false,
        };
        let params = json!({"node": {"requestedHostname": "node1"}});
        let agent = connect_agent(
            &server,
            "/v3/connect/register",
            agent_headers(&token, &params),
            trust.clone(),
            Some(dockerd.socket.clone()),
        )
        .await
        .unwrap();
        agent.close();
        let r = eventually(Duration::from_secs(5), "503 without tunnel", || async {
            let r = http
                .get(&format!("/docker/nodes/{node_id}/_ping"), Some(&dana))
                .await;
            (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
        })
        .await;
        println!("no tunnel: {} {}", r.status, r.body);

        let agent = connect_agent(
            &server,
            "/v3/connect",
            agent_headers(&token, &params),
            trust,
            Some(dockerd.socket.clone()),
        )
        .await
        .unwrap();
        let r = eventually(
            Duration::from_secs(5),
            "ping through the node tunnel",
            || async {
                let r = http
                    .get(&format!("/docker/nodes/{node_id}/_ping"), Some(&dana))
                    .await;
                (r.status == StatusCode::OK).then_some(r)
            },
        )
        .await;
        assert_eq!(r.body, "OK");
        assert_eq!(r.headers["api-version"], "1.41");
        let r = http
            .get(
                &format!("/docker/nodes/{node_id}/v1.41/containers/json?all=1"),
                Some(&dana),
            )
            .await;
        assert_eq!(r.json()["path"], "/v1.41/containers/json?all=1");
        let seen = dockerd.seen.lock().unwrap().last().cloned().unwrap();
        assert!(
            !seen.headers.contains_key("authorization"),
            "the user's token leaked to dockerd: {:?}",
            seen.headers
        );

        assert_eq!(
            http.get(&format!("/docker/nodes/{node_id}/_ping"), Some(&eve))
                .await
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http.get(&format!("/docker/nodes/{node_id}/_ping"), None)
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            http.get("/docker/nodes/M-..%2F/_ping", Some(&dana))
                .await
                .status,
            StatusCode::BAD_REQUEST
        );

        // The node's socket path is configurable; the agent's allow-list then refuses it.
        let admin = add_user(dir.path(), "root", &["--admin"]);
        let r = http
            .api(
                "PATCH",
                &format!("/v1/nodes/{node_id}"),
                &admin,
                Some(json!({"dockerSocket": "/run/other.sock"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.json()["dockerSocket"], "/run/other.sock");
        let r = http
            .get(&format!("/docker/nodes/{node_id}/_ping"), Some(&dana))
            .await;
        println!("refused by the agent: {} {}", r.status, r.body);
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(
            r.body.contains("refused"),
            "the agent's reason is passed on: {}",
            r.body
        );
        let r = http
            .api(
                "PATCH",
                &format!("/v1/nodes/{node_id}"),
                &admin,
                Some(json!({"dockerSocket": "/var/run/docker.sock"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);

        // docker exec -it: POST /exec/{id}/start with Upgrade: tcp, then raw bytes both ways.
        let req = Request::post(format!("/docker/nodes/{node_id}/v1.41/exec/abc/start"))
            .header("host", "x")
            .header("authorization", format!("Bearer {dana}"))
            .header("connection", "Upgrade")
            .header("upgrade", "tcp")
            .header("content-type", "application/json")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let mut resp = http.send_streaming(req).await;
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            resp.headers()["content-type"],
            "application/vnd.docker.raw-stream"
        );
        let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
        io.write_all(b"ls -l\n").await.unwrap();
        let mut buf = [0u8; 6];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"LS -L\n");

        // The agent reconnects on a new session: pooled connections of the old one are not
        // reused, the first request after the reconnect goes through the new tunnel.
        agent.close();
        let _agent = connect_agent(
            &server,
            "/v3/connect",
            agent_headers(&token, &params),
            Trust::CaBundle {
                pem: server.ca_pem().into_bytes(),
                with_system_roots: false,
            },
            Some(dockerd.socket.clone()),
        )
        .await
        .unwrap();
        let r = eventually(
            Duration::from_secs(5),
            "ping after the reconnect",
            || async {
                let r = http
                    .get(&format!("/docker/nodes/{node_id}/_ping"), Some(&dana))
                    .await;
                println!("after reconnect: {} {}", r.status, r.body);
                (r.status == StatusCode::OK).then_some(r)
            },
        )
        .await;
        assert_eq!(r.body, "OK");
    })
    .await
    .expect("test exceeded its bound");
}
