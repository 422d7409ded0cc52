//! Connector trust modes against a real TLS acceptor with a test CA: the `CATTLE_CA_CHECKSUM`
//! pin, a CA bundle, the presented-CA pin, and refusal of servers we have no reason to trust.

mod connector_support;

use connector_support::*;
use http::HeaderMap;
use tunnel_proto::driver::connector::{
    ConfigError, ConnectError, Connector, ConnectorConfig, TlsConfigError, Trust, ca_checksum,
};

fn config(server: &TestServer, trust: Trust) -> ConnectorConfig {
    let mut cfg =
        ConnectorConfig::new(format!("wss://127.0.0.1:{}/v3/connect", server.addr.port()));
    let mut headers = HeaderMap::new();
    headers.insert(TOKEN_HEADER, GOOD_TOKEN.parse().unwrap());
    cfg.set_headers(headers).set_trust(trust);
    cfg
}

#[tokio::test]
async fn pinned_ca_is_accepted() {
    bounded(async {
        let pki = Pki::new("pinned test CA");
        let server = spawn_server(Some(pki.server_config(false))).await;
        // What an agent does: fetch the `cacerts` setting (trimmed) and compare with
        // CATTLE_CA_CHECKSUM, which the server computed as sha256(setting + "\n").
        let setting = pki.ca_setting();
        let checksum = ca_checksum(&setting);
        println!("CATTLE_CA_CHECKSUM = {checksum}");
        let connector = Connector::new(config(
            &server,
            Trust::PinnedCa {
                checksum: checksum.clone(),
                ca_pem: setting,
                with_system_roots: false,
            },
        ))
        .expect("pin matches");
        let mut ws = connector.connect().await.expect("connect with pinned CA");
        echo_roundtrip(&mut ws).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_pin_is_refused_naming_both_checksums() {
    let pki = Pki::new("pinned test CA");
    let setting = pki.ca_setting();
    let wrong = ca_checksum("some other CA");
    let mut cfg = ConnectorConfig::new("wss://127.0.0.1:1/v3/connect");
    cfg.set_trust(Trust::PinnedCa {
        checksum: wrong.clone(),
        ca_pem: setting.clone(),
        with_system_roots: true,
    });
    let err = Connector::new(cfg).expect_err("a wrong pin must not connect");
    println!("{err}");
    assert_eq!(
        err,
        ConfigError::Tls(TlsConfigError::CaChecksumMismatch {
            expected: wrong.clone(),
            actual: ca_checksum(&setting),
        })
    );
    let msg = err.to_string();
    assert!(msg.contains(&wrong) && msg.contains(&ca_checksum(&setting)));
}

#[tokio::test]
async fn ca_bundle_trust_works() {
    bounded(async {
        let pki = Pki::new("bundle test CA");
        let other = Pki::new("unrelated CA");
        let server = spawn_server(Some(pki.server_config(false))).await;
        // A bundle with an unrelated CA first: every certificate of the bundle is trusted.
        let bundle = format!("{}{}", other.ca_pem, pki.ca_pem);
        let connector = Connector::new(config(
            &server,
            Trust::CaBundle {
                pem: bundle.into_bytes(),
                with_system_roots: false,
            },
        ))
        .unwrap();
        let mut ws = connector.connect().await.expect("connect with CA bundle");
        echo_roundtrip(&mut ws).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn untrusted_server_is_refused() {
    bounded(async {
        let pki = Pki::new("server CA");
        let other = Pki::new("the CA we trust");
        let server = spawn_server(Some(pki.server_config(true))).await;

        let connector = Connector::new(config(
            &server,
            Trust::CaBundle {
                pem: other.ca_pem.clone().into_bytes(),
                with_system_roots: false,
            },
        ))
        .unwrap();
        let err = connector.connect().await.expect_err("untrusted server");
        println!("bundle: {err}");
        assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        // The platform store does not know a CA made a second ago either (skipped only where
        // the machine has no trust store at all, which Connector::new reports as an error).
        match Connector::new(config(&server, Trust::SystemRoots)) {
            Ok(connector) => {
                let err = connector.connect().await.expect_err("untrusted server");
                println!("system roots: {err}");
                assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
            }
            Err(e) => println!("no system trust store here: {e}"),
        }
        assert_eq!(connector.stats().snapshot().failures, 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn presented_ca_pin_accepts_matching_chain() {
    bounded(async {
        let pki = Pki::new("presented CA");
        // The server sends its CA in the chain, as the pin requires.
        let server = spawn_server(Some(pki.server_config(true))).await;
        let connector = Connector::new(config(
            &server,
            Trust::PinnedPresentedCa {
                checksum: ca_checksum(&pki.ca_setting()),
            },
        ))
        .unwrap();
        let mut ws = connector.connect().await.expect("presented CA matches pin");
        echo_roundtrip(&mut ws).await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn presented_ca_pin_mismatch_names_both_checksums() {
    bounded(async {
        let pki = Pki::new("presented CA");
        let server = spawn_server(Some(pki.server_config(true))).await;
        let wrong = ca_checksum("not this CA");
        let connector = Connector::new(config(
            &server,
            Trust::PinnedPresentedCa {
                checksum: wrong.clone(),
            },
        ))
        .unwrap();
        let err = connector.connect().await.expect_err("pin mismatch");
        println!("{err}");
        match &err {
            ConnectError::PresentedCaMismatch {
                expected,
                presented,
            } => {
                assert_eq!(expected, &wrong);
                assert_eq!(presented, &vec![ca_checksum(&pki.ca_setting())]);
            }
            other => panic!("expected PresentedCaMismatch, got {other:?}"),
        }

        // A server that sends only its leaf cannot satisfy a presented-CA pin.
        let leaf_only = spawn_server(Some(pki.server_config(false))).await;
        let connector = Connector::new(config(
            &leaf_only,
            Trust::PinnedPresentedCa {
                checksum: ca_checksum(&pki.ca_setting()),
            },
        ))
        .unwrap();
        let err = connector.connect().await.expect_err("no CA presented");
        println!("{err}");
        assert!(
            matches!(&err, ConnectError::PresentedCaMismatch { presented, .. } if presented.is_empty()),
            "{err:?}"
        );
        server.stop().await;
        leaf_only.stop().await;
    })
    .await;
}

#[tokio::test]
async fn insecure_skip_verify_is_explicit_and_works() {
    bounded(async {
        let pki = Pki::new("anything");
        let server = spawn_server(Some(pki.server_config(false))).await;
        let connector = Connector::new(config(&server, Trust::InsecureSkipVerify)).unwrap();
        let mut ws = connector.connect().await.expect("insecure connect");
        echo_roundtrip(&mut ws).await;
        server.stop().await;
    })
    .await;
}
