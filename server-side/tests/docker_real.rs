//! The real docker CLI against a real dockerd through a node tunnel (the harness is in
//! `support/docker.rs`): `docker version`, `ps`, `exec` and `exec -i` with piped stdin (a
//! hijacked `Upgrade: tcp` stream) go through the tunnel.
//!
//! Needs root, Debian's `docker.io` (dockerd) and `busybox-static`: it starts a private
//! dockerd with `tests/e2e/lib/dockerd.sh`. Without them it FAILS saying so; it never skips.

mod support;

use std::time::Duration;

use tokio::time::timeout;

use support::docker::{DockerNode, IMAGE, docker};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_docker_cli_through_a_node_tunnel() {
    let dir = TempDir::new("dockerreal");
    timeout(Duration::from_secs(180), async {
        let node = DockerNode::start(dir.path(), "docker-host-1").await;
        let server = &node.server;

        let (ok, out, err) = node
            .docker(&["version", "--format", "{{.Server.Version}}"], None)
            .await;
        println!("docker version through the tunnel: ok={ok} {out:?} {err:?}");
        assert!(
            ok,
            "docker version failed: {err}\nserver log:\n{}",
            server.log()
        );

        let (ok, id, err) = node
            .docker(
                &["run", "-d", "--network", "none", IMAGE, "sleep", "300"],
                None,
            )
            .await;
        assert!(ok, "docker run failed: {err}");
        let id = id.trim();
        let (ok, out, err) = node
            .docker(&["ps", "--format", "{{.ID}} {{.Image}}"], None)
            .await;
        assert!(ok && out.contains(&id[..12]), "docker ps: {out} {err}");
        let (ok, out, err) = node
            .docker(&["exec", id, "echo", "hello from the node"], None)
            .await;
        assert!(ok, "docker exec failed: {err}");
        assert_eq!(out.trim(), "hello from the node");
        // The tunnel has no half-close, so the command must end by itself (`head -n 1`), not
        // wait for stdin's EOF (see server-side/README.md).
        let (ok, out, err) = node
            .docker(
                &["exec", "-i", id, "head", "-n", "1"],
                Some("piped through the tunnel\n"),
            )
            .await;
        println!("exec -i: ok={ok} {out:?} {err:?}");
        assert!(ok, "docker exec -i failed: {err}");
        assert_eq!(out.trim(), "piped through the tunnel");
        let (ok, _, err) = node.docker(&["rm", "-f", id], None).await;
        assert!(ok, "docker rm: {err}");

        // Without the header: 401 from the server.
        let (ok, _, err) = tokio::task::spawn_blocking({
            let mut env = node.env.clone();
            env.retain(|(k, _)| *k != "DOCKER_CONFIG");
            let empty = dir.path().join("empty-config");
            std::fs::create_dir_all(&empty).unwrap();
            env.push(("DOCKER_CONFIG", empty.display().to_string()));
            move || docker(&env, &["ps"], None)
        })
        .await
        .unwrap();
        println!("without a token: {err:?}");
        assert!(!ok);
        let log = server.log();
        assert!(
            log.contains("user=ops kind=\"docker\""),
            "no docker audit line:\n{log}"
        );
    })
    .await
    .expect("test exceeded its bound");
}
