//! Admin mutations leave audit lines, and API tokens expire, against the real binary: `/v1`
//! mutations name the admin (and a non-admin's refused attempt), CLI mutations name
//! `cli:<OS user>`; `token add --ttl`, `POST /v1/tokens` with `ttlSeconds` and `kubeconfig`
//! (30 days by default, `--ttl 0` for never) set `expiresAt`; `token list` and `GET /v1/tokens`
//! show expiry and last use.

mod support;

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tokio::time::timeout;

use support::*;

const BOUND: Duration = Duration::from_secs(60);

/// Runs an admin command as OS user `tester`; returns (success, stdout, stderr).
fn run_as_tester(data_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("USER", "tester")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_as_tester`] for a command that must succeed: (stdout, stderr).
fn cli_as_tester(data_dir: &std::path::Path, args: &[&str]) -> (String, String) {
    let (ok, out, err) = run_as_tester(data_dir, args);
    assert!(ok, "{args:?}: {err}");
    (out, err)
}

fn audit_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("admin mutation"))
        .collect()
}

fn has_line(lines: &[&str], parts: &[&str]) -> bool {
    lines.iter().any(|l| parts.iter().all(|p| l.contains(p)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mutations_are_audited_and_tokens_expire() {
    timeout(BOUND, async {
        let dir = TempDir::new("audit");
        let server = ServerProc::start(dir.path());
        let http = server.client();

        // CLI: who is the OS user.
        let (out, err) = cli_as_tester(dir.path(), &["user", "add", "root", "--admin"]);
        let admin = out
            .lines()
            .find_map(|l| l.strip_prefix("API token (shown once): "))
            .unwrap()
            .to_owned();
        let lines = audit_lines(&err);
        println!("CLI audit: {lines:?}");
        assert!(
            has_line(
                &lines,
                &[
                    "user=cli:tester",
                    "via=\"cli\"",
                    "verb=\"create\"",
                    "object=\"user\"",
                    "(root)",
                    "outcome=\"ok\""
                ]
            ),
            "{err}"
        );
        let (ok, _, err) = run_as_tester(dir.path(), &["token", "revoke", "token-zzzzz"]);
        assert!(!ok);
        assert!(
            has_line(
                &audit_lines(&err),
                &[
                    "user=cli:tester",
                    "verb=\"revoke\"",
                    "id=\"token-zzzzz\"",
                    "outcome=\"failed\""
                ]
            ),
            "{err}"
        );
        // Listing changes nothing and leaves no audit line.
        let (_, err) = cli_as_tester(dir.path(), &["cluster", "list"]);
        assert!(audit_lines(&err).is_empty(), "{err}");

        // /v1: who is the admin; a non-admin's attempt is audited as refused.
        let r = http
            .api(
                "POST",
                "/v1/clusters",
                &admin,
                Some(json!({"name": "audited"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let cluster_id = r.json()["cluster"]["id"].as_str().unwrap().to_owned();
        let r = http
            .api("POST", "/v1/users", &admin, Some(json!({"name": "dev"})))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let dev = r.json()["value"].as_str().unwrap().to_owned();
        let r = http
            .api("POST", "/v1/clusters", &dev, Some(json!({"name": "nope"})))
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = http
            .api(
                "POST",
                "/v1/tokens",
                &admin,
                Some(json!({"userId": "dev", "ttlSeconds": 3600})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let created = r.json();
        let token_id = created["token"]["id"].as_str().unwrap().to_owned();
        let created_at = created["token"]["createdAt"].as_i64().unwrap();
        assert_eq!(
            created["token"]["expiresAt"].as_i64(),
            Some(created_at + 3600)
        );
        let r = http
            .api("DELETE", &format!("/v1/tokens/{token_id}"), &admin, None)
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = http.api("DELETE", "/v1/users/ghost", &admin, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = http.api("GET", "/v1/clusters", &admin, None).await;
        assert_eq!(r.status, StatusCode::OK);

        let log = server.log();
        let lines = audit_lines(&log);
        for l in &lines {
            println!("server audit: {l}");
        }
        let cluster_target = format!("id=\"{cluster_id} (audited)\"");
        let token_target = format!("id=\"{token_id}");
        for (what, parts) in [
            (
                "create cluster",
                vec![
                    "user=root",
                    "via=\"api\"",
                    "verb=\"create\"",
                    "object=\"cluster\"",
                    &cluster_target,
                    "outcome=\"ok\"",
                    "detail=\"201\"",
                ],
            ),
            ("create user", vec!["user=root", "object=\"user\"", "(dev)"]),
            (
                "non-admin",
                vec![
                    "user=dev",
                    "object=\"cluster\"",
                    "outcome=\"refused\"",
                    "detail=\"403\"",
                ],
            ),
            (
                "create token",
                vec![
                    "user=root",
                    "verb=\"create\"",
                    "object=\"api-token\"",
                    &token_target,
                    "for dev",
                ],
            ),
            (
                "revoke token",
                vec![
                    "user=root",
                    "verb=\"revoke\"",
                    "object=\"api-token\"",
                    &token_target,
                    "detail=\"204\"",
                ],
            ),
            (
                "missing user",
                vec![
                    "user=root",
                    "verb=\"delete\"",
                    "object=\"user\"",
                    "id=\"ghost\"",
                    "outcome=\"refused\"",
                    "detail=\"404\"",
                ],
            ),
        ] {
            assert!(
                has_line(&lines, &parts),
                "no audit line for {what} in:\n{log}"
            );
        }
        assert_eq!(lines.len(), 6, "reads leave no audit line:\n{log}");

        // Expiry through the CLI: token add --ttl, kubeconfig's default and --ttl 0.
        let (out, err) = cli_as_tester(dir.path(), &["token", "create", "dev", "--ttl", "24h"]);
        let day_token = out.trim().to_owned();
        assert!(err.contains("expires at"), "{err}");
        let (_, err) = cli_as_tester(dir.path(), &["kubeconfig", "audited", "--user", "dev"]);
        assert!(err.contains("expires at"), "{err}");
        let (_, err) = cli_as_tester(
            dir.path(),
            &["kubeconfig", "audited", "--user", "dev", "--ttl", "0"],
        );
        assert!(err.contains("never expires"), "{err}");
        let r = http.get("/v1/users", Some(&day_token)).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "a valid token of a non-admin"
        );

        let tokens = http
            .api("GET", "/v1/tokens?user=dev", &admin, None)
            .await
            .json();
        let items = tokens["items"].as_array().unwrap();
        let lifetime = |desc: &str| {
            let mut v = items
                .iter()
                .filter(|t| t["description"].as_str().unwrap().starts_with(desc))
                .map(|t| {
                    t["expiresAt"]
                        .as_i64()
                        .map(|e| e - t["createdAt"].as_i64().unwrap())
                })
                .collect::<Vec<_>>();
            v.sort();
            v
        };
        assert_eq!(lifetime("created with the CLI"), [Some(24 * 3600)]);
        assert_eq!(
            lifetime("kubeconfig for audited"),
            [None, Some(30 * 86_400)]
        );
        assert_eq!(lifetime("created with the user"), [None]);
        // The day token was used just now; the list shows it before the flush.
        let day_id = day_token.split(':').next().unwrap();
        let day = items.iter().find(|t| t["id"] == day_id).unwrap();
        assert!(day["lastUsedAt"].as_i64().is_some(), "{day}");

        // `token list` shows expiry, last use (once flushed) and state.
        eventually(Duration::from_secs(15), "the last use flushed", || async {
            let (out, _) = cli_as_tester(dir.path(), &["token", "list", "--user", "dev"]);
            let row = out.lines().find(|l| l.starts_with(day_id))?.to_owned();
            // ID USER CREATED EXPIRES LAST-USED STATE DESCRIPTION
            let cols: Vec<&str> = row.split_whitespace().collect();
            (cols[4] != "never").then(|| println!("{out}"))
        })
        .await;
        let (out, _) = cli_as_tester(dir.path(), &["token", "list"]);
        let revoked = out.lines().find(|l| l.starts_with(&token_id)).unwrap();
        assert!(revoked.contains("revoked"), "{out}");
    })
    .await
    .expect("test exceeded its bound");
}
