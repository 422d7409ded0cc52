//! `/v1/openapi.json` describes exactly the routes the router serves: the document's
//! operations equal the API's intended route list, every documented operation is dispatched
//! by the running server (never its "no such API route"), other methods on those paths get
//! 405, and undocumented paths 404.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;
use tokio::time::timeout;

use support::*;

/// The management API as specified in issue #7 (P6).
const EXPECTED: &[(&str, &str)] = &[
    ("get", "/v1/clusters"),
    ("post", "/v1/clusters"),
    ("get", "/v1/clusters/{id}"),
    ("delete", "/v1/clusters/{id}"),
    ("get", "/v1/clusters/{id}/import"),
    ("get", "/v1/clusters/{id}/tokens"),
    ("post", "/v1/clusters/{id}/tokens"),
    ("delete", "/v1/clusters/{id}/tokens/{token}"),
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{id}"),
    ("patch", "/v1/nodes/{id}"),
    ("get", "/v1/users"),
    ("post", "/v1/users"),
    ("get", "/v1/users/{id}"),
    ("delete", "/v1/users/{id}"),
    ("get", "/v1/tokens"),
    ("post", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("get", "/v1/grants"),
    ("post", "/v1/grants"),
    ("delete", "/v1/grants/{userId}/{clusterId}"),
    ("get", "/v1/openapi.json"),
];

fn is_no_route(r: &Reply) -> bool {
    r.body.contains("no such API route")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    timeout(Duration::from_secs(60), async {
        let dir = TempDir::new("openapi");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let admin = add_user(dir.path(), "root", &["--admin"]);

        let doc = http.get("/v1/openapi.json", None).await;
        assert_eq!(doc.status, StatusCode::OK);
        let doc = doc.json();
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    op["responses"].is_object(),
                    "{method} {path} has no responses"
                );
                documented.insert((method.clone(), path.clone()));
            }
        }
        let expected: BTreeSet<(String, String)> = EXPECTED
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, expected);

        // Every documented operation reaches a handler (ids that do not exist give the
        // handler's own 404, bodies that are empty its 400).
        for (method, path) in &documented {
            let concrete = path
                .replace("{id}", "x-none")
                .replace("{userId}", "x-none")
                .replace("{clusterId}", "x-none")
                .replace("{token}", "x-none");
            let r = http
                .api(&method.to_uppercase(), &concrete, &admin, None)
                .await;
            println!(
                "{method} {concrete} -> {} {}",
                r.status,
                r.body.lines().next().unwrap_or("")
            );
            assert!(
                !is_no_route(&r),
                "{method} {path} is documented but not routed"
            );
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED);
            // A method the document does not list for the path is refused by the router.
            for other in ["get", "post", "put", "delete", "patch"] {
                if !documented.contains(&(other.to_owned(), path.clone())) {
                    let r = http
                        .api(&other.to_uppercase(), &concrete, &admin, None)
                        .await;
                    assert_eq!(
                        r.status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{other} {path}: {}",
                        r.body
                    );
                    assert!(is_no_route(&r));
                }
            }
        }
        let r = http.api("GET", "/v1/undocumented", &admin, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(is_no_route(&r));

        // The API needs an admin, but for the reads of the clusters (and nodes) granted to
        // the user: none here.
        let user = add_user(dir.path(), "plain", &[]);
        assert_eq!(
            http.api("GET", "/v1/users", &user, None).await.status,
            StatusCode::FORBIDDEN
        );
        let r = http.api("GET", "/v1/clusters", &user, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.json()["items"], serde_json::json!([]));
        assert_eq!(
            http.get("/v1/clusters", None).await.status,
            StatusCode::UNAUTHORIZED
        );
    })
    .await
    .expect("test exceeded its bound");
}
