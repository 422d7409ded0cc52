//! Bad input is refused early and cheaply: over-long URIs (414), too many headers (hyper's
//! bound, 431), ids with path tricks (400), unknown paths (404), and the tunnel endpoint's
//! non-websocket requests get the authorizer's answer before any websocket check.

mod support;

use std::time::Duration;

use http::StatusCode;
use tokio::time::timeout;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("bad");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let admin = add_user(dir.path(), "root", &["--admin"]);

        let long = format!("/k8s/clusters/c-abcde/{}", "a".repeat(10_000));
        assert_eq!(
            http.get(&long, Some(&admin)).await.status,
            StatusCode::URI_TOO_LONG
        );

        let many: Vec<(String, String)> = (0..150)
            .map(|i| (format!("x-h{i}"), "v".to_owned()))
            .collect();
        let headers: Vec<(&str, &str)> =
            many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = http.request("GET", "/ping", &headers, None).await;
        println!("150 headers: {}", r.status);
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

        for path in [
            "/k8s/clusters/../v1/users",
            "/k8s/clusters/c-ABC/api",
            "/k8s/clusters/c%2D1/api",
            "/k8s/clusters//api",
            "/docker/nodes/m-1.2/_ping",
        ] {
            let r = http.get(path, Some(&admin)).await;
            println!("{path} -> {} {}", r.status, r.body);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        }
        assert_eq!(http.get("/nope", None).await.status, StatusCode::NOT_FOUND);
        let r = http.get("/v3/import/short.yaml", None).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (
                StatusCode::BAD_REQUEST,
                "cluster not found or invalid token"
            )
        );

        // A plain GET of the tunnel endpoint: the authorizer answers first.
        let r = http.get("/v3/connect", None).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::UNAUTHORIZED, "failed authentication")
        );
        let r = http
            .request(
                "GET",
                "/v3/connect/register",
                &[("x-api-tunnel-token", "nope")],
                None,
            )
            .await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::BAD_REQUEST, "cluster not found")
        );
    })
    .await
    .expect("test exceeded its bound");
}
