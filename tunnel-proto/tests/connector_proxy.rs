//! The connector through a real HTTP proxy (Debian's tinyproxy, started per test on loopback),
//! configured through `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` read from a map, never from the
//! process environment.
//!
//! These tests fail (they do not skip) when tinyproxy is missing: `apt-get install -y
//! tinyproxy`.

mod connector_support;

use std::collections::HashMap;

use connector_support::*;
use http::HeaderMap;
use tunnel_proto::driver::connector::{
    ConnectError, Connector, ConnectorConfig, ProxyConfig, Trust,
};

const USER: &str = "agent";
const PASS: &str = "s3cret-pw";

/// A connector for the echo server, with the proxy settings of `env`. Loopback bypass is off:
/// like Go, the connector would otherwise never proxy 127.0.0.1, and loopback is all a test
/// may use.
fn connector(server: &TestServer, tls: Option<&Pki>, env: &[(&str, String)]) -> Connector {
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let mut cfg = ConnectorConfig::new(format!(
        "{scheme}://127.0.0.1:{}/v3/connect",
        server.addr.port()
    ));
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut proxy = ProxyConfig::from_env(&env).expect("proxy env");
    proxy.set_bypass_loopback(false);
    let mut headers = HeaderMap::new();
    headers.insert(TOKEN_HEADER, GOOD_TOKEN.parse().unwrap());
    cfg.set_headers(headers).set_proxy(proxy);
    if let Some(pki) = tls {
        cfg.set_trust(Trust::CaBundle {
            pem: pki.ca_pem.clone().into_bytes(),
            with_system_roots: false,
        });
    }
    Connector::new(cfg).expect("connector")
}

#[tokio::test]
async fn ws_through_tinyproxy() {
    bounded(async {
        let proxy = Tinyproxy::start(None);
        let server = spawn_server(None).await;
        let c = connector(&server, None, &[("HTTP_PROXY", proxy.url(None))]);
        let mut ws = c.connect().await.expect("ws via proxy");
        echo_roundtrip(&mut ws).await;
        println!("tinyproxy tunnels: {}", proxy.tunnels());
        assert_eq!(proxy.tunnels(), 1, "log:\n{}", proxy.log());
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wss_through_tinyproxy() {
    bounded(async {
        let pki = Pki::new("proxy test CA");
        let proxy = Tinyproxy::start(None);
        let server = spawn_server(Some(pki.server_config(false))).await;
        // Lower case only: read when the upper-case variable is unset.
        let c = connector(&server, Some(&pki), &[("https_proxy", proxy.url(None))]);
        let mut ws = c.connect().await.expect("wss via proxy");
        echo_roundtrip(&mut ws).await;
        assert_eq!(proxy.tunnels(), 1, "log:\n{}", proxy.log());
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn ws_and_wss_through_tinyproxy_with_basic_auth() {
    bounded(async {
        let pki = Pki::new("proxy test CA");
        let proxy = Tinyproxy::start(Some((USER, PASS)));
        let url = proxy.url(Some((USER, PASS)));

        let plain = spawn_server(None).await;
        let c = connector(&plain, None, &[("HTTP_PROXY", url.clone())]);
        let mut ws = c.connect().await.expect("ws via authenticating proxy");
        echo_roundtrip(&mut ws).await;

        let secure = spawn_server(Some(pki.server_config(false))).await;
        let c = connector(&secure, Some(&pki), &[("HTTPS_PROXY", url)]);
        let mut ws = c.connect().await.expect("wss via authenticating proxy");
        echo_roundtrip(&mut ws).await;

        assert_eq!(proxy.tunnels(), 2, "log:\n{}", proxy.log());
        plain.stop().await;
        secure.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_or_missing_proxy_credentials_are_a_clear_error() {
    bounded(async {
        let proxy = Tinyproxy::start(Some((USER, PASS)));
        let server = spawn_server(None).await;
        // tinyproxy answers missing credentials with 407 and wrong ones with 401 (its
        // `basicauth` code path); both must surface as ProxyRefused with the status.
        for (url, want) in [
            (proxy.url(None), 407),
            (proxy.url(Some((USER, "wrong-pw"))), 401),
        ] {
            let c = connector(&server, None, &[("HTTP_PROXY", url)]);
            let err = c.connect().await.expect_err("proxy must refuse");
            let msg = err.to_string();
            println!("{}", msg.lines().next().unwrap_or_default());
            match &err {
                ConnectError::ProxyRefused { status, proxy, .. } => {
                    assert_eq!(*status, want);
                    // The error names the proxy, never its credentials.
                    assert!(!proxy.contains("wrong-pw"), "{proxy}");
                }
                other => panic!("expected ProxyRefused, got {other:?}"),
            }
            assert!(msg.contains("proxy credentials missing or wrong"), "{msg}");
            assert!(!msg.contains("wrong-pw"), "{msg}");
        }
        assert_eq!(proxy.tunnels(), 0);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn no_proxy_bypasses_the_proxy() {
    bounded(async {
        let pki = Pki::new("proxy test CA");
        let proxy = Tinyproxy::start(None);
        let server = spawn_server(Some(pki.server_config(false))).await;
        for no_proxy in [
            "127.0.0.0/8",
            "example.com, 127.0.0.1",
            &format!("127.0.0.1:{}", server.addr.port()),
            "*",
        ] {
            let c = connector(
                &server,
                Some(&pki),
                &[
                    ("HTTPS_PROXY", proxy.url(None)),
                    ("no_proxy", no_proxy.to_owned()),
                ],
            );
            let mut ws = c.connect().await.expect("direct connect");
            echo_roundtrip(&mut ws).await;
        }
        assert_eq!(proxy.tunnels(), 0, "NO_PROXY must bypass:\n{}", proxy.log());

        // A NO_PROXY entry for another port does not match: the proxy is used.
        let c = connector(
            &server,
            Some(&pki),
            &[
                ("HTTPS_PROXY", proxy.url(None)),
                ("NO_PROXY", "127.0.0.1:1".to_owned()),
            ],
        );
        let mut ws = c.connect().await.expect("via proxy");
        echo_roundtrip(&mut ws).await;
        assert_eq!(proxy.tunnels(), 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn proxy_that_is_down_is_a_connect_error_naming_it() {
    bounded(async {
        let server = spawn_server(None).await;
        let dead = free_port();
        let c = connector(
            &server,
            None,
            &[("HTTP_PROXY", format!("http://{USER}:{PASS}@127.0.0.1:{dead}"))],
        );
        let err = c.connect().await.expect_err("no proxy there");
        println!("{err}");
        assert!(
            matches!(&err, ConnectError::ProxyIo { proxy, .. } if proxy == &format!("http://127.0.0.1:{dead}")),
            "{err:?}"
        );
        assert!(!err.to_string().contains(PASS));
        server.stop().await;
    })
    .await;
}
