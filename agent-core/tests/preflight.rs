//! The pre-flight of spec §3 against tunnel-proto's real acceptor (TLS with an rcgen CA,
//! `/ping` and `/v3/settings/cacerts` from the test router): CA pinning, checksum mismatch,
//! STRICT_VERIFY both ways, an untrusted server, a missing CA, and the GETs through a real
//! tinyproxy with basic auth. Configuration comes from a `HashMap`, never the process env.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use agent_core::CommonConfig;
use agent_core::preflight::{self, PreflightError};
use support::*;
use test_support::{Tinyproxy, free_port};
use tunnel_proto::driver::connector::{ProxyUrl, Trust};

fn config(server: &TestServer, extra: &[(&'static str, String)]) -> CommonConfig {
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("CATTLE_SERVER", server.url());
    for (k, v) in extra {
        env.insert(k, v.clone());
    }
    CommonConfig::from_strings(&env).expect("config")
}

async fn run(common: &CommonConfig) -> Result<preflight::Preflight, PreflightError> {
    tokio::time::timeout(
        Duration::from_secs(30),
        preflight::run(common, &common.server),
    )
    .await
    .expect("pre-flight took too long")
}

#[tokio::test]
async fn matching_checksum_pins_the_ca_alone() {
    let server = TestServer::start(ServerOptions::default()).await;
    let c = config(&server, &[("CATTLE_CA_CHECKSUM", server.pki.checksum())]);
    let p = run(&c).await.expect("pre-flight");
    assert!(p.cacerts_valid);
    assert_eq!(p.ca_pem.as_deref(), Some(server.pki.ca_setting().as_str()));
    match p.trust {
        Trust::PinnedCa {
            checksum,
            with_system_roots,
            ..
        } => {
            assert_eq!(checksum, server.pki.checksum());
            assert!(!with_system_roots);
        }
        other => panic!("expected the pinned CA, got {other:?}"),
    }
    // Upper case and surrounding whitespace in the variable are accepted.
    let c = config(
        &server,
        &[(
            "CATTLE_CA_CHECKSUM",
            format!(" {}\n", server.pki.checksum().to_uppercase()),
        )],
    );
    assert!(run(&c).await.is_ok());
}

#[tokio::test]
async fn checksum_mismatch_names_both_checksums() {
    let server = TestServer::start(ServerOptions::default()).await;
    let wrong = "ab".repeat(32);
    let c = config(&server, &[("CATTLE_CA_CHECKSUM", wrong.clone())]);
    let err = run(&c).await.unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, PreflightError::Mismatch { .. }));
    assert!(text.contains(&wrong) && text.contains(&server.pki.checksum()));
}

#[tokio::test]
async fn strict_mode_without_a_checksum_refuses_to_start() {
    let server = TestServer::start(ServerOptions::default()).await;
    let c = config(&server, &[("STRICT_VERIFY", "true".into())]);
    let err = run(&c).await.unwrap_err();
    println!("{err}");
    assert!(matches!(err, PreflightError::StrictWithoutCa));
}

#[tokio::test]
async fn a_served_ca_that_does_not_verify_the_server() {
    // The server serves (and the manifest pins) a CA that did not sign its certificate.
    let other = Pki::new("unrelated-ca");
    let server = TestServer::start(ServerOptions {
        cacerts_override: Some(other.ca_setting()),
    })
    .await;
    let pin = ("CATTLE_CA_CHECKSUM", other.checksum());

    // Strict: the pinned CA must verify the server; it does not.
    let c = config(&server, &[pin.clone(), ("STRICT_VERIFY", "true".into())]);
    let err = run(&c).await.unwrap_err();
    println!("strict: {err}");
    assert!(matches!(err, PreflightError::StrictFailed { .. }));

    // Not strict: falls through to the system store, which does not know the test CA either:
    // a certificate error there is fatal, as in Rancher's agent.
    let c = config(&server, &[pin]);
    let err = run(&c).await.unwrap_err();
    println!("system-store: {err}");
    assert!(matches!(err, PreflightError::Untrusted { .. }));
}

#[tokio::test]
async fn no_checksum_and_an_untrusted_server_is_fatal() {
    let server = TestServer::start(ServerOptions::default()).await;
    let err = run(&config(&server, &[])).await.unwrap_err();
    println!("{err}");
    assert!(matches!(err, PreflightError::Untrusted { .. }));
}

#[tokio::test]
async fn empty_cacerts_with_a_checksum_is_fatal() {
    let server = TestServer::start(ServerOptions {
        cacerts_override: Some(String::new()),
    })
    .await;
    let c = config(&server, &[("CATTLE_CA_CHECKSUM", server.pki.checksum())]);
    let err = run(&c).await.unwrap_err();
    println!("{err}");
    assert!(matches!(err, PreflightError::NoCa { .. }));
}

#[tokio::test]
async fn unreachable_server_fails_the_ping() {
    let port = free_port();
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("CATTLE_SERVER", format!("https://127.0.0.1:{port}"));
    let c = CommonConfig::from_strings(&env).unwrap();
    let err = run(&c).await.unwrap_err();
    println!("{err}");
    assert!(matches!(err, PreflightError::Ping { .. }));
    assert!(err.to_string().contains("/ping is not accessible"));
}

#[tokio::test]
async fn preflight_goes_through_an_authenticating_proxy() {
    let server = TestServer::start(ServerOptions::default()).await;
    let proxy = Tinyproxy::start(Some(("agent", "s3cret")));
    let url = format!("http://agent:%733cret@127.0.0.1:{}", proxy.port);
    let mut c = config(
        &server,
        &[
            ("CATTLE_CA_CHECKSUM", server.pki.checksum()),
            ("HTTPS_PROXY", url.clone()),
        ],
    );
    // Loopback bypasses proxies (as in Go); the test has only loopback.
    c.proxy
        .set_https_proxy(Some(ProxyUrl::parse(&url).unwrap()))
        .set_bypass_loopback(false);
    let before = proxy.tunnels();
    run(&c).await.expect("pre-flight through the proxy");
    let through = proxy.tunnels() - before;
    println!("CONNECT tunnels through tinyproxy: {through}");
    // /ping, /v3/settings/cacerts, and the pinned-CA check.
    assert!(through >= 3, "{}", proxy.log());

    // Wrong password: the proxy refuses, and the error says so.
    let bad = format!("http://agent:wrong@127.0.0.1:{}", proxy.port);
    let mut c = config(&server, &[("HTTPS_PROXY", bad.clone())]);
    c.proxy
        .set_https_proxy(Some(ProxyUrl::parse(&bad).unwrap()))
        .set_bypass_loopback(false);
    let err = run(&c).await.unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("refused CONNECT"), "{err}");
}
