//! One source of truth for the agents' manifests: what the real `tunnel-server` serves at
//! `/v3/import/<token>_<cluster-id>.yaml[?nodeAgent=true]` must be `deploy/templates/*.yaml`
//! rendered with that cluster's values, object by object.
//!
//! The templates are read from disk here (not through the crate's `include_str!`), and the
//! placeholders are filled by this test's own code (base64, the credential name and the CA
//! checksum computed independently), so a second copy of a template, a change in how the server
//! fills one, or a server-side edit of the objects all show up as a named object that differs.
//! Semantic checks of the same manifests (schema, admission) are `deploy/test/dry-run.sh`'s.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(60);

fn templates_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/templates")
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `{{NAME}}` → the JSON-quoted value; panics on a placeholder it does not know.
fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed placeholder") + start;
        let name = &rest[start + 2..end];
        let value = vars
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("template placeholder {{{{{name}}}}} unknown to this test"));
        out.push_str(&serde_json::Value::String(value.1.clone()).to_string());
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// One YAML document of a multi-document manifest: its identity and its significant lines.
#[derive(Debug)]
struct Object {
    key: String,
    lines: Vec<String>,
}

/// Splits on `---` lines, drops comment-only and blank lines (they are not part of an object),
/// and names each object `Kind namespace/name`.
fn objects(manifest: &str) -> Vec<Object> {
    let mut docs: Vec<Vec<String>> = vec![Vec::new()];
    for line in manifest.lines() {
        if line.trim_end() == "---" {
            docs.push(Vec::new());
            continue;
        }
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        docs.last_mut().unwrap().push(line.trim_end().to_owned());
    }
    docs.into_iter()
        .filter(|d| !d.is_empty())
        .map(|lines| {
            let top = |field: &str| {
                lines
                    .iter()
                    .find_map(|l| l.strip_prefix(&format!("{field}: ")))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            // metadata.name / metadata.namespace: the two-space-indented fields under `metadata:`.
            let meta = |field: &str| {
                lines
                    .iter()
                    .skip_while(|l| *l != "metadata:")
                    .skip(1)
                    .take_while(|l| l.starts_with(' '))
                    .find_map(|l| l.strip_prefix(&format!("  {field}: ")))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            let key = format!(
                "{} {}/{}",
                top("kind").unwrap_or_else(|| panic!("object without kind: {lines:?}")),
                meta("namespace").unwrap_or_default(),
                meta("name").unwrap_or_else(|| panic!("object without metadata.name: {lines:?}")),
            );
            Object { key, lines }
        })
        .collect()
}

fn assert_same_objects(what: &str, served: &str, deploy: &str) {
    let served = objects(served);
    let deploy = objects(deploy);
    let keys = |o: &[Object]| o.iter().map(|o| o.key.clone()).collect::<Vec<_>>();
    assert_eq!(
        keys(&served),
        keys(&deploy),
        "{what}: the server serves other objects (or another order) than deploy/templates"
    );
    for (s, d) in served.iter().zip(&deploy) {
        if s.lines != d.lines {
            let at = s
                .lines
                .iter()
                .zip(&d.lines)
                .position(|(a, b)| a != b)
                .unwrap_or(s.lines.len().min(d.lines.len()));
            panic!(
                "{what}: object {} differs at its line {}:\n  served: {:?}\n  deploy: {:?}",
                s.key,
                at + 1,
                s.lines.get(at),
                d.lines.get(at)
            );
        }
        println!("{what}: {:<58} same ({} lines)", s.key, s.lines.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_import_manifest_is_deploy_templates_object_by_object() {
    timeout(BOUND, async {
        let dir = TempDir::new("deploy");
        let server = ServerProc::start(dir.path());
        let http = server.client();
        let (cluster_id, token, import_url) = add_cluster(dir.path(), "deploy-check");
        let path = import_url.strip_prefix(&server.url).unwrap().to_owned();

        let ca_pem = server.ca_pem();
        let checksum = sha256_hex(format!("{}\n", ca_pem.trim()).as_bytes());
        let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
        let credential = format!(
            "cattle-credentials-{}",
            &sha256_hex(format!("{}.{}.", server.url, token).as_bytes())[..10]
        );
        let vars = [
            ("SERVER_URL", server.url.clone()),
            ("CA_CHECKSUM", checksum),
            (
                "AGENT_IMAGE",
                "tunnel-project/cattle-cluster-agent:dev".to_owned(),
            ),
            (
                "NODE_AGENT_IMAGE",
                "tunnel-project/cattle-node-agent:dev".to_owned(),
            ),
            ("CREDENTIAL_NAME", credential),
            ("URL_B64", b64(&server.url)),
            ("TOKEN_B64", b64(&token)),
            ("NAMESPACE_B64", b64("")),
            ("STRICT_VERIFY", "true".to_owned()),
        ];
        let import = std::fs::read_to_string(templates_dir().join("import.yaml")).unwrap();
        let node = std::fs::read_to_string(templates_dir().join("node-agent.yaml")).unwrap();
        println!(
            "cluster {cluster_id}; templates from {}",
            templates_dir().display()
        );

        let served = http.get(&path, None).await;
        assert_eq!(served.status, StatusCode::OK, "{}", served.body);
        assert_same_objects("import", &served.body, &fill(&import, &vars));

        let served = http.get(&format!("{path}?nodeAgent=true"), None).await;
        assert_eq!(served.status, StatusCode::OK, "{}", served.body);
        let both = format!("{}{}", fill(&import, &vars), fill(&node, &vars));
        assert_same_objects("import+nodeAgent", &served.body, &both);
        assert_eq!(objects(&served.body).len(), 10);
    })
    .await
    .expect("test timed out");
}

/// The server must not keep a template of its own next to `deploy/templates`.
#[test]
fn no_second_copy_of_the_templates() {
    let old = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates");
    assert!(
        !old.exists(),
        "{} exists: the templates live in deploy/templates only",
        old.display()
    );
    let src =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/import.rs"))
            .unwrap();
    assert!(src.contains("include_str!(\"../../deploy/templates/import.yaml\")"));
    assert!(src.contains("include_str!(\"../../deploy/templates/node-agent.yaml\")"));
}
