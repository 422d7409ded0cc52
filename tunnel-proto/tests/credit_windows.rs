//! Credit windows between two ends of this project, through real sockets: the connector offers
//! them in the upgrade, the acceptor answers, and only when both said so do the sessions run
//! them (then a bulk stream and an interactive one share the tunnel). Go peers never agree:
//! `tests/interop_go.rs` covers that against the real Go remotedialer.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::acceptor::{
    Acceptor, AcceptorConfig, AuthRequest, ClientKey, text_response,
};
use tunnel_proto::driver::capability::{self, Capabilities};
use tunnel_proto::driver::connector::{ConfigError, Connector, ConnectorConfig};
use tunnel_proto::{Role, SessionConfig};

/// An acceptor willing to speak `willing`, whose sessions echo every stream the client opens.
/// Each session is reported with the extensions agreed in its upgrade.
struct Server {
    url: String,
    sessions: mpsc::UnboundedReceiver<(Tunnel, Capabilities)>,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(willing: Capabilities) -> Self {
        let mut config = AcceptorConfig::new(["/connect"]);
        config
            .set_capabilities(willing)
            .set_shutdown_grace(Duration::from_secs(1));
        let (tx, sessions) = mpsc::unbounded_channel();
        let acceptor = Acceptor::new(
            config,
            |_req: AuthRequest| async { Ok(ClientKey::new("agent")) },
            move |accepted| {
                let tx = tx.clone();
                async move {
                    let mut session = SessionConfig::new(Role::Server);
                    accepted.capabilities.apply(&mut session);
                    let (tunnel, driver) =
                        Tunnel::new(accepted.ws, session, Arc::new(|t| t.proto == "tcp"));
                    let echo = tunnel.clone();
                    tokio::spawn(async move {
                        while let Some(stream) = echo.accept().await {
                            tokio::spawn(async move {
                                let (mut r, mut w) = tokio::io::split(stream);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            });
                        }
                    });
                    let _ = tx.send((tunnel, accepted.capabilities));
                    driver.await;
                }
            },
            |_req| async { text_response(http::StatusCode::NOT_FOUND, "no route") },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/connect", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move { acceptor.serve(listener, stop).await });
        Self {
            url,
            sessions,
            shutdown,
        }
    }

    async fn next_session(&mut self) -> (Tunnel, Capabilities) {
        timeout(Duration::from_secs(10), self.sessions.recv())
            .await
            .expect("a session within 10 s")
            .expect("acceptor alive")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn connector(url: &str, offer: Capabilities) -> Connector {
    let mut cfg = ConnectorConfig::new(url);
    cfg.set_capabilities(offer);
    Connector::new(cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_ends_agree_and_windows_carry_bulk_beside_round_trips() {
    timeout(Duration::from_secs(60), async {
        let mut server = Server::start(Capabilities::ALL).await;
        let (ws, agreed) = connector(&server.url, Capabilities::ALL)
            .connect_agreed()
            .await
            .unwrap();
        let (server_tunnel, server_agreed) = server.next_session().await;
        assert_eq!(
            (agreed, server_agreed),
            (Capabilities::ALL, Capabilities::ALL)
        );
        let mut config = SessionConfig::new(Role::Client);
        agreed.apply(&mut config);
        let client = Tunnel::spawn(ws, config, Arc::new(|_| false));

        // A bulk stream echoes 16 MiB (written and read at once) while another stream does
        // 1 KiB round trips; every byte comes back in order.
        const BULK: usize = 16 << 20;
        let bulk = client.open("tcp", "bulk:1").unwrap();
        let (mut r, mut w) = tokio::io::split(bulk);
        let writer = tokio::spawn(async move {
            let block: Vec<u8> = (0..64 << 10).map(|i: u32| (i % 251) as u8).collect();
            for _ in 0..BULK / block.len() {
                w.write_all(&block).await.unwrap();
            }
            w
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0usize;
            while got < BULK {
                let n = r.read(&mut buf).await.unwrap();
                assert!(n > 0, "bulk stream ended after {got} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, (((got + k) % (64 << 10)) % 251) as u8);
                }
                got += n;
            }
            got
        });
        let mut echo = client.open("tcp", "echo:1").unwrap();
        let request = [0x42u8; 1024];
        let mut reply = [0u8; 1024];
        for _ in 0..200 {
            echo.write_all(&request).await.unwrap();
            echo.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply, request);
        }
        assert_eq!(reader.await.unwrap(), BULK);
        drop(writer.await.unwrap());

        let (c, s) = (client.stats(), server_tunnel.stats());
        println!("client {c:?}\nserver {s:?}");
        // Both ends received Data and granted credit for it; neither broke a window.
        assert!(
            c.window_updates_sent > 0 && c.window_updates_received > 0,
            "{c:?}"
        );
        assert!(
            s.window_updates_sent > 0 && s.window_updates_received > 0,
            "{s:?}"
        );
        assert_eq!((c.protocol_errors, s.protocol_errors), (0, 0));
        assert_eq!((c.pauses_sent, s.pauses_sent), (0, 0), "windows, not Pause");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_agreed_unless_both_ends_say_so() {
    timeout(Duration::from_secs(30), async {
        // An acceptor that is not willing (the default) answers nothing.
        let mut unwilling = Server::start(Capabilities::NONE).await;
        let (_ws, agreed) = connector(&unwilling.url, Capabilities::ALL)
            .connect_agreed()
            .await
            .unwrap();
        let (_, server_agreed) = unwilling.next_session().await;
        assert_eq!(
            (agreed, server_agreed),
            (Capabilities::NONE, Capabilities::NONE)
        );

        // A willing acceptor, and a connector that offers nothing: plain `connect`, or
        // `connect_agreed` with the offer turned off.
        let mut willing = Server::start(Capabilities::ALL).await;
        let _ws = connector(&willing.url, Capabilities::ALL)
            .connect()
            .await
            .unwrap();
        assert_eq!(willing.next_session().await.1, Capabilities::NONE);
        let (_ws, agreed) = connector(&willing.url, Capabilities::NONE)
            .connect_agreed()
            .await
            .unwrap();
        assert_eq!(agreed, Capabilities::NONE);
        assert_eq!(willing.next_session().await.1, Capabilities::NONE);
    })
    .await
    .expect("bounded");
}

#[test]
fn the_capability_header_is_the_connectors_own() {
    let mut cfg = ConnectorConfig::new("ws://127.0.0.1:1/connect");
    let mut headers = HeaderMap::new();
    headers.insert(capability::HEADER, "credit-windows/1".parse().unwrap());
    cfg.set_headers(headers);
    assert_eq!(
        Connector::new(cfg).unwrap_err(),
        ConfigError::ReservedHeader(capability::HEADER.to_string())
    );
}
