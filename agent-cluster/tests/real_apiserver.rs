//! `cattle-cluster-agent` against a REAL kube-apiserver (and etcd) from the e2e suite's cached
//! build, with tunnel-proto's real acceptor as the server (as in `cluster_agent.rs`):
//!
//! 1. **Fallback**: without kube-controller-manager nothing fills a token Secret. The agent
//!    creates SA `cattle`'s `kubernetes.io/service-account-token` Secret as Rancher does
//!    (generateName `cattle-token-`, label, annotation, owner, the SA's secret-ref
//!    annotation), waits `CATTLE_SA_TOKEN_WAIT`, logs one WARN and reports the projected token.
//! 2. **Token controller**: kube-controller-manager (built by `build-k8s.sh`; only its
//!    `serviceaccount-token` controller) is started and fills `data.token`. When that binary
//!    is not built, the test plays the controller's part by writing a TokenRequest token into
//!    `data.token` itself through the API. The agent's re-check sees it and re-establishes the
//!    main tunnel: the new handshake's params carry the Secret's token.
//! 3. **Projected token rewritten** (the kubelet rotating it; here an invalid one): a request
//!    through the tunnel to the apiserver, made as Rancher makes it (TLS with the reported CA,
//!    bearer = the reported token), still succeeds, and the agent does not redial.
//!
//! `server-side/tests/kube_token_real.rs` does the same through the real tunnel-server with
//! kubectl. Needs the binaries: under `CI=true` it fails without them, otherwise it prints one
//! SKIP line.

mod real_kube;
#[path = "../../agent-core/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use real_kube::RealKube;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_cattle-cluster-agent");

async fn next_main(server: &mut TestServer) -> Accepted {
    loop {
        let t = tokio::time::timeout(Duration::from_secs(60), server.next_tunnel())
            .await
            .expect("no main tunnel in time");
        if t.client_key == CLUSTER {
            return t;
        }
    }
}

fn reported_token(t: &Accepted) -> String {
    t.params.as_ref().expect("params")["cluster"]["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// GET `path` on the apiserver through `tunnel`, as Rancher does with the params.
async fn get_through(tunnel: &Accepted, path: &str) -> (u16, String) {
    let cluster = &tunnel.params.as_ref().unwrap()["cluster"];
    let ca = data_encoding::BASE64
        .decode(cluster["caCert"].as_str().unwrap().as_bytes())
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = tunnel
        .tunnel
        .open("tcp", cluster["address"].as_str().unwrap())
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), stream)
        .await
        .expect("TLS to the real apiserver through the tunnel");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: kubernetes\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        cluster["token"].as_str().unwrap()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_token_secret_falls_back_and_survives_a_rewritten_projected_token() {
    let dir = temp_dir();
    let started = Instant::now();
    let parent = dir.path().to_owned();
    let Some(mut kube) = tokio::task::spawn_blocking(move || {
        RealKube::start("agent-cluster real_apiserver", &parent)
    })
    .await
    .unwrap() else {
        return;
    };
    println!("kube-apiserver ready in {:?}", started.elapsed());
    let projected = kube.cattle_service_account();

    let mut server = TestServer::start(ServerOptions::default()).await;
    let mut env = base_env(&server, dir.path());
    let creds = dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("url"), server.url()).unwrap();
    std::fs::write(creds.join("token"), TOKEN).unwrap();
    let sa = dir.path().join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    let token_file = sa.join("token");
    std::fs::write(&token_file, &projected).unwrap();
    std::fs::write(sa.join("ca.crt"), kube.ca_pem()).unwrap();
    env.insert("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into());
    env.insert("KUBERNETES_SERVICE_PORT".into(), kube.port().to_string());
    env.insert("CATTLE_SA_TOKEN_FILE".into(), path_str(&token_file));
    env.insert("CATTLE_SA_CA_FILE".into(), path_str(&sa.join("ca.crt")));
    env.insert("CATTLE_SA_TOKEN_WAIT".into(), "2s".into());
    env.insert("CATTLE_SA_TOKEN_RECHECK".into(), "1s".into());
    let mut agent = AgentProcess::spawn(BIN, &env, &[]);

    // 1. Fallback: one WARN, the projected token reported.
    let warn = agent
        .wait_log("reporting the pod's projected service account token")
        .await;
    println!("{warn}");
    assert!(warn.contains("WARN"), "{warn}");
    assert!(
        warn.contains("did not fill secret cattle-system/cattle-token-"),
        "{warn}"
    );
    let first = next_main(&mut server).await;
    assert_eq!(reported_token(&first), projected);

    // The Secret, as Rancher's EnsureSecretForServiceAccount makes it.
    let list: serde_json::Value = serde_json::from_str(&kube.kubectl(&[
        "-n",
        "cattle-system",
        "get",
        "secrets",
        "-l",
        "cattle.io/service-account.name=cattle",
        "-o",
        "json",
    ]))
    .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    let secret = &items[0];
    let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
    println!("token secret: {name}");
    assert!(name.starts_with("cattle-token-"));
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    assert_eq!(
        secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
        "cattle"
    );
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "ServiceAccount"
    );
    let sa_ref = kube.kubectl(&[
        "-n",
        "cattle-system",
        "get",
        "sa",
        "cattle",
        "-o",
        r"jsonpath={.metadata.annotations.rancher\.io/service-account\.secret-ref}",
    ]);
    assert_eq!(sa_ref, format!("cattle-system/{name}"));
    // stv-aggregation, written on connect through Api<Secret>.
    let stv = loop {
        let out = std::process::Command::new(&kube.paths["KUBECTL"])
            .arg("--kubeconfig")
            .arg(kube.dir.join("admin.kubeconfig"))
            .args([
                "-n",
                "cattle-system",
                "get",
                "secret",
                "stv-aggregation",
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no stv-aggregation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stv["data"].as_object().unwrap().len(), 7, "{stv}");

    // 2. The token controller fills data.token; the agent redials with it.
    if kube.has_controller_manager() {
        println!("starting kube-controller-manager (serviceaccount-token controller)");
        kube.start_token_controller();
    } else {
        println!("no kube-controller-manager built: filling data.token through the API");
        let token = kube.cattle_service_account();
        let patch =
            serde_json::json!({"data": {"token": data_encoding::BASE64.encode(token.as_bytes())}});
        kube.kubectl(&[
            "-n",
            "cattle-system",
            "patch",
            "secret",
            &name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }
    let secret_token = loop {
        let b64 = kube.kubectl(&[
            "-n",
            "cattle-system",
            "get",
            "secret",
            &name,
            "-o",
            "jsonpath={.data.token}",
        ]);
        if !b64.trim().is_empty() {
            break String::from_utf8(data_encoding::BASE64.decode(b64.trim().as_bytes()).unwrap())
                .unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the token controller never filled {name}; its log:\n{}",
            kube.controller_manager_log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(secret_token, projected);
    let line = agent.wait_log("re-establishing the main tunnel").await;
    println!("{line}");
    let second = tokio::time::timeout(Duration::from_secs(30), next_main(&mut server))
        .await
        .expect("the main tunnel was not re-established");
    assert_eq!(second.path, "/v3/connect");
    assert_eq!(reported_token(&second), secret_token);
    println!(
        "reported token switched to the secret's ({} chars) {:?} after start",
        secret_token.len(),
        started.elapsed()
    );

    // 3. The projected token file rewritten with an invalid token: the reported one still
    // works through the tunnel, and the params do not change.
    std::fs::write(&token_file, "invalid.rotated.token").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, text) = get_through(
        &second,
        "/api/v1/namespaces/cattle-system/serviceaccounts/cattle",
    )
    .await;
    println!("GET serviceaccounts/cattle through the tunnel: {status}");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"name\":\"cattle\""), "{text}");
    let (status, _) = get_through(&second, "/api/v1/namespaces").await;
    assert_eq!(status, 200);
    // The old projected token is what a server holding it would have used; it is not the
    // reported one.
    assert!(
        server.accepted.try_recv().is_err(),
        "the agent redialed after the projected token changed"
    );

    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    println!("done in {:?}", started.elapsed());
}
