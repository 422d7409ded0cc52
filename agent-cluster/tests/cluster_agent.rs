//! `cattle-cluster-agent` end to end: the real binary against tunnel-proto's real acceptor on
//! loopback (TLS, CA checksum pinning, token and params checked by the server's authorizer),
//! a stand-in kube-apiserver over HTTPS (its own CA) that records the `stv-aggregation` Secret
//! and answers `/readyz` when dialed through the tunnel the way Rancher does (TLS with the
//! reported CA, bearer = the reported token), the steve tunnel's `/ping`, refusals on
//! /metrics, and SIGTERM. The stand-in has no service account `cattle`, so the agent reports
//! the projected token (the fallback); `real_apiserver.rs` covers the token Secret against a
//! real kube-apiserver.

#[path = "../../agent-core/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_cattle-cluster-agent");
const SA_TOKEN: &str = "sa-jwt-token.payload.signature";

async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its time bound")
}

// === a stand-in kube-apiserver ===

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    auth: Option<String>,
    body: Vec<u8>,
    status: u16,
}

struct FakeApi {
    addr: SocketAddr,
    pki: Pki,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeApi {
    async fn start() -> Self {
        let pki = Pki::new("kube-ca");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let exists = Arc::new(Mutex::new(false));
        let reqs = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let reqs = reqs.clone();
                let exists = exists.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let reqs = reqs.clone();
                        let exists = exists.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let authed = auth.as_deref() == Some(&format!("Bearer {SA_TOKEN}"));
                            let item = "/api/v1/namespaces/cattle-system/secrets/stv-aggregation";
                            // Writes echo the object, as the apiserver answers with it.
                            let echo = Bytes::from(body.to_vec());
                            let (status, text) = match (method.as_str(), path.as_str()) {
                                _ if !authed => (401, Bytes::from("Unauthorized")),
                                ("GET", "/readyz") => (200, Bytes::from("ok")),
                                ("PUT", p) if p == item && *exists.lock().unwrap() => (200, echo),
                                ("PUT", p) if p == item => (404, Bytes::from("not found")),
                                ("POST", "/api/v1/namespaces/cattle-system/secrets") => {
                                    *exists.lock().unwrap() = true;
                                    (201, echo)
                                }
                                // No service account here: the agent falls back to the
                                // projected token.
                                _ => (404, Bytes::from("not found")),
                            };
                            reqs.lock().unwrap().push(Recorded {
                                method,
                                path,
                                auth,
                                body: body.to_vec(),
                                status,
                            });
                            let mut resp = http::Response::new(Full::new(text));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            pki,
            requests,
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

fn cluster_env(server: &TestServer, api: &FakeApi, dir: &Path) -> HashMap<String, String> {
    let mut env = base_env(server, dir);
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    // As the mounted cattle-credentials Secret: no trailing newline.
    std::fs::write(creds.join("url"), server.url()).unwrap();
    std::fs::write(creds.join("token"), TOKEN).unwrap();
    let sa = dir.join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), format!("{SA_TOKEN}\n")).unwrap();
    std::fs::write(sa.join("ca.crt"), &api.pki.ca_pem).unwrap();
    env.insert("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into());
    env.insert(
        "KUBERNETES_SERVICE_PORT".into(),
        api.addr.port().to_string(),
    );
    env.insert("CATTLE_SA_TOKEN_FILE".into(), path_str(&sa.join("token")));
    env.insert("CATTLE_SA_CA_FILE".into(), path_str(&sa.join("ca.crt")));
    env
}

/// Reads one HTTP/1.1 response with a Content-Length body, leaving the connection open.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.unwrap();
        assert!(n > 0, "connection ended in the head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_and_steve_tunnels_params_secret_dials_and_sigterm() {
    bounded(90, async {
        let mut server = TestServer::start(ServerOptions::default()).await;
        let api = FakeApi::start().await;
        let dir = temp_dir();
        let mut env = cluster_env(&server, &api, dir.path());
        env.insert("CATTLE_AGENT_SHUTDOWN_GRACE".into(), "20s".into());
        let mut agent = AgentProcess::spawn(BIN, &env, &[]);

        // Both tunnels arrive, in either order.
        let a = server.next_tunnel().await;
        let b = server.next_tunnel().await;
        let (main, steve) = if a.client_key == CLUSTER {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(main.client_key, CLUSTER);
        assert_eq!(steve.client_key, format!("stv-cluster-{CLUSTER}"));

        // Main tunnel: /register, the token from the credentials file, spec §4.2 params.
        assert_eq!(main.path, "/v3/connect/register");
        assert_eq!(main.headers["x-api-tunnel-token"], TOKEN);
        let params = main.params.clone().expect("params");
        println!("cluster params: {params}");
        let cluster = &params["cluster"];
        assert_eq!(cluster["address"], format!("127.0.0.1:{}", api.addr.port()));
        assert_eq!(
            cluster["caCert"],
            data_encoding::BASE64.encode(api.pki.ca_pem.as_bytes())
        );
        assert_eq!(cluster["token"], SA_TOKEN);

        // Steve tunnel: only the bearer header, /v3/connect, and /ping answered in-process.
        assert_eq!(steve.path, "/v3/connect");
        assert_eq!(
            steve.headers["authorization"],
            format!("Bearer stv-cluster-{TOKEN}")
        );
        assert!(steve.headers.get("x-api-tunnel-token").is_none());
        let s = steve.tunnel.open("tcp", "not-used:80").unwrap();
        let (status, body) = http_get_on(s, "not-used", "/ping").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "pong"));
        let s = steve.tunnel.open("tcp", "127.0.0.1:6080").unwrap();
        let (status, body) = http_get_on(s, "127.0.0.1:6080", "/v1/schemas")
            .await
            .unwrap();
        assert_eq!(status, 404, "{body}");

        // What Rancher does with the params: TLS to the reported address through the main
        // tunnel, trusting the reported CA, with the reported token.
        let ca_pem = data_encoding::BASE64
            .decode(cluster["caCert"].as_str().unwrap().as_bytes())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let stream = main
            .tunnel
            .open("tcp", cluster["address"].as_str().unwrap())
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
            .connect("127.0.0.1".try_into().unwrap(), stream)
            .await
            .expect("TLS to the kube-apiserver through the tunnel");
        let req = format!(
            "GET /readyz HTTP/1.1\r\nHost: kube\r\nAuthorization: Bearer {}\r\n\r\n",
            cluster["token"].as_str().unwrap()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut tls).await, (200, "ok".to_owned()));
        drop(tls);

        // The stv-aggregation Secret: PUT (404), then POST with all seven keys.
        eventually("the Secret to be created", || {
            api.requests()
                .iter()
                .any(|r| r.method == "POST" && r.status == 201)
        })
        .await;
        let reqs = api.requests();
        let writes: Vec<_> = reqs.iter().filter(|r| r.method != "GET").collect();
        assert_eq!(writes[0].method, "PUT");
        assert_eq!(writes[0].status, 404);
        let post = writes.iter().find(|r| r.method == "POST").unwrap();
        assert_eq!(post.path, "/api/v1/namespaces/cattle-system/secrets");
        assert_eq!(
            post.auth.as_deref(),
            Some(format!("Bearer {SA_TOKEN}").as_str())
        );
        let secret: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(secret["metadata"]["name"], "stv-aggregation");
        let data = secret["data"].as_object().unwrap();
        let get = |k: &str| {
            String::from_utf8(
                data_encoding::BASE64
                    .decode(data[k].as_str().unwrap().as_bytes())
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(data.len(), 7);
        assert_eq!(get("CATTLE_SERVER"), server.url());
        assert_eq!(get("CATTLE_TOKEN"), TOKEN);
        assert_eq!(get("CATTLE_CA_CHECKSUM"), server.pki.checksum());
        assert_eq!(get("url"), format!("{}/v3/connect", server.url()));
        assert_eq!(get("token"), format!("stv-cluster-{TOKEN}"));
        assert_eq!(get("ca.crt"), server.pki.ca_setting());
        assert_eq!(get("CATTLE_CACERTS_VALID"), "true");

        // Outside the allow-list: refused, counted, the tunnel lives on.
        let refused = main
            .tunnel
            .open("unix", "/run/containerd/containerd.sock")
            .unwrap();
        assert_eq!(read_error(refused).await, Some(ErrorKind::PermissionDenied));
        let health = agent.health_addr().await;
        assert_eq!(http_get(health, "/readyz").await.0, 200);
        let m = agent.metrics().await;
        println!("{m}");
        assert_eq!(
            metric(
                &m,
                r#"cattle_agent_dials_total{tunnel="main",proto="unix",result="refused"}"#
            ),
            Some(1)
        );
        assert_eq!(
            metric(
                &m,
                r#"cattle_agent_dials_total{tunnel="main",proto="tcp",result="allowed"}"#
            ),
            Some(1)
        );
        assert_eq!(
            metric(
                &m,
                r#"cattle_agent_dials_total{tunnel="steve",proto="tcp",result="allowed"}"#
            ),
            Some(2)
        );
        assert_eq!(
            metric(&m, r#"cattle_agent_tunnel_up{tunnel="steve"}"#),
            Some(1)
        );

        // The server drops the main tunnel: back on /v3/connect, Secret re-applied (PUT 200).
        main.tunnel.close();
        let again = server.next_tunnel().await;
        assert_eq!(again.client_key, CLUSTER);
        assert_eq!(again.path, "/v3/connect");
        eventually("the Secret to be re-applied", || {
            api.requests()
                .iter()
                .any(|r| r.method == "PUT" && r.status == 200)
        })
        .await;

        // SIGTERM with an idle keep-alive HTTP connection on the steve tunnel: the in-process
        // server closes it gracefully, so the agent exits long before the 20 s grace.
        let mut keepalive = steve.tunnel.open("tcp", "not-used:80").unwrap();
        keepalive
            .write_all(b"GET /ping HTTP/1.1\r\nHost: not-used\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut keepalive).await,
            (200, "pong".to_owned())
        );
        let m = agent.metrics().await;
        assert_eq!(
            metric(&m, r#"cattle_agent_streams_open{tunnel="steve"}"#),
            Some(1),
            "the keep-alive connection is open"
        );
        // And an idle stream on the main tunnel, as a keep-alive connection the server pools:
        // the agent closes it about 2 s into the drain (--shutdown-idle).
        let echo = echo_service().await;
        let mut pooled = again.tunnel.open("tcp", &echo.to_string()).unwrap();
        pooled.write_all(b"used once").await.unwrap();
        let mut buf = [0u8; 9];
        pooled.read_exact(&mut buf).await.unwrap();
        let started = Instant::now();
        agent.sigterm();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, pooled.read_to_end(&mut rest))
            .await
            .expect("the idle stream was not closed");
        println!(
            "idle main-tunnel stream ended {:?} after SIGTERM: {end:?}",
            started.elapsed()
        );
        assert!(end.is_ok() && rest.is_empty(), "{end:?} {rest:?}");
        let status = agent.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        println!("exited {:?} after SIGTERM", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(6));
        let line = agent.wait_log("idle streams closed during the drain").await;
        assert!(line.contains("closed=1"), "{line}");
    })
    .await;
}

#[test]
fn bad_configuration_names_every_variable_and_exits_non_zero() {
    let dir = temp_dir();
    let out = Command::new(BIN)
        .env_clear()
        .env("CATTLE_CREDENTIALS_DIR", path_str(dir.path()))
        .env("KUBERNETES_SERVICE_PORT", "https")
        .env("CATTLE_SA_TOKEN_FILE", path_str(&dir.path().join("none")))
        .env("CATTLE_SA_CA_FILE", path_str(&dir.path().join("none.crt")))
        .env("CATTLE_STEVE_TUNNEL", "perhaps")
        .env("CATTLE_AGENT_BACKOFF_MIN", "soon")
        .env("CATTLE_SA_TOKEN_WAIT", "a while")
        .env("CATTLE_SA_TOKEN_RECHECK", "0")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(1));
    for needle in [
        "CATTLE_SERVER",
        "CATTLE_TOKEN",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "service-account token",
        "service-account CA",
        "CATTLE_STEVE_TUNNEL",
        "CATTLE_AGENT_BACKOFF_MIN",
        "CATTLE_SA_TOKEN_WAIT",
        "CATTLE_SA_TOKEN_RECHECK",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    assert_eq!(stderr.matches("invalid configuration").count(), 1);
}

#[test]
fn help_documents_every_variable() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in [
        "CATTLE_SERVER",
        "CATTLE_CA_CHECKSUM",
        "STRICT_VERIFY",
        "CATTLE_CREDENTIALS_DIR",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "CATTLE_SA_TOKEN_FILE",
        "CATTLE_SA_CA_FILE",
        "CATTLE_KUBECONFIG",
        "CATTLE_STEVE_TUNNEL",
        "CATTLE_SA_TOKEN_WAIT",
        "CATTLE_SA_TOKEN_RECHECK",
        "HTTPS_PROXY",
    ] {
        assert!(help.contains(name), "{name} missing from --help");
    }
}
