//! The three TLS modes of `serve`: the generated CA (kept across restarts, covered elsewhere),
//! operator files (`--tls-cert/--tls-key/--cacerts`: served as given, `/cacerts` and the
//! manifest's checksum follow `--cacerts`), and `--insecure-http` for tests.

mod support;

use std::time::Duration;

use http::StatusCode;
use tokio::time::timeout;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificate_and_plain_http() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("tls");
        let (ca_pem, cert_pem, key_pem) = test_pki("operator");
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("tls.crt"), &cert_pem).unwrap();
        std::fs::write(files.join("tls.key"), &key_pem).unwrap();
        std::fs::write(files.join("ca.crt"), format!("{ca_pem}\n\n")).unwrap();
        let data = dir.path().join("data");
        let (crt, key, ca) = (
            files.join("tls.crt").display().to_string(),
            files.join("tls.key").display().to_string(),
            files.join("ca.crt").display().to_string(),
        );
        let args = ["--tls-cert", &crt, "--tls-key", &key, "--cacerts", &ca];
        let server = ServerProc::start_with(&data, &args);
        let http = HttpClient::tls(server.addr, ca_pem.as_bytes());
        assert_eq!(http.get("/ping", None).await.body, "pong");
        assert_eq!(http.get("/cacerts", None).await.body, ca_pem.trim());
        let (_, _, url) = add_cluster(&data, "c");
        let manifest = http
            .get(url.strip_prefix(&server.url).unwrap(), None)
            .await
            .body;
        let expected = server_side::pki::ca_checksum(ca_pem.trim());
        assert!(
            manifest.contains(&format!("value: \"{expected}\"")),
            "{manifest}"
        );
        assert!(
            !data.join("ca.pem").exists(),
            "no generated CA in file mode"
        );
        drop(server);

        // Plain HTTP.
        let server = ServerProc::start_with(&dir.path().join("plain"), &["--insecure-http"]);
        assert!(server.url.starts_with("http://"));
        let http = HttpClient {
            addr: server.addr,
            tls: None,
        };
        assert_eq!(http.get("/ping", None).await.body, "pong");
        let r = http.get("/v3/settings/cacerts", None).await;
        assert_eq!(
            (r.status, r.json()["value"].as_str()),
            (StatusCode::OK, Some(""))
        );
    })
    .await
    .expect("test exceeded its bound");
}
