//! The main job until the management server lands: a tunnel server and an agent on loopback,
//! with a real TCP service piped through the tunnel.
//!
//! ```text
//! curl 127.0.0.1:8080 ─► forward port ─► server Tunnel ═ws═► agent ─► TCP service
//! ```
//!
//! `cargo run --release -p tunnel-proto --example demo -- [--listen ADDR] [--forward ADDR]
//! [--target ADDR]`. Without `--target` a small built-in HTTP service is the target. Ctrl-C
//! stops it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tunnel_proto::driver::acceptor::{Acceptor, AcceptorConfig, ClientKey, Reject, text_response};
use tunnel_proto::driver::connector::{Connector, ConnectorConfig, SessionEnd, run_forever};
use tunnel_proto::driver::registry::{Registry, RegistryEvent, serve_acceptor_tunnel};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, pipe, websocket_config};
use tunnel_proto::{Role, SessionConfig};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// A minimal HTTP service, so the demo needs nothing else running.
async fn hello_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let body = "hello through the reverse tunnel\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() {
    let listen = arg("--listen", "127.0.0.1:8443");
    let forward = arg("--forward", "127.0.0.1:8080");
    let target = match arg("--target", "") {
        t if t.is_empty() => hello_service().await.to_string(),
        t => t,
    };
    let shutdown = CancellationToken::new();
    let registry = Registry::default();

    // The server: an acceptor at /v3/connect whose authorizer takes the key from a header.
    let listener = TcpListener::bind(&listen).await.expect("bind --listen");
    let mut config = AcceptorConfig::new(["/v3/connect"]);
    config.set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
    let reg = registry.clone();
    let acceptor = Acceptor::new(
        config,
        |req: tunnel_proto::driver::acceptor::AuthRequest| async move {
            match req.headers.get("x-tunnel-id").and_then(|v| v.to_str().ok()) {
                Some(key) if !key.is_empty() => Ok(ClientKey::new(key)),
                _ => Err(Reject::Unauthorized),
            }
        },
        move |accepted| {
            let reg = reg.clone();
            async move {
                let _ = serve_acceptor_tunnel(
                    &reg,
                    accepted,
                    SessionConfig::new(Role::Server),
                    Arc::new(|_| false),
                )
                .await;
            }
        },
        |_req| async { text_response(http::StatusCode::OK, "pong") },
    );
    let token = shutdown.clone();
    tokio::spawn(async move { acceptor.serve(listener, token).await });
    println!("tunnel server listening on ws://{listen}/v3/connect");

    let mut events = registry.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                RegistryEvent::Added { key, .. } => println!("agent connected (client key {key})"),
                RegistryEvent::Removed { key, reason, .. } => {
                    println!("agent {key} left: {reason}")
                }
                _ => {}
            }
        }
    });

    // The agent: dials out, reconnects with backoff, pipes every allowed stream to its target.
    let mut agent_config = ConnectorConfig::new(format!("ws://{listen}/v3/connect"));
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tunnel-id", "demo-agent".parse().unwrap());
    agent_config.set_headers(headers);
    agent_config.set_websocket_config(Some(websocket_config(DEFAULT_MAX_MESSAGE)));
    let connector = Connector::new(agent_config).unwrap();
    let token = shutdown.clone();
    tokio::spawn(async move {
        run_forever(&connector, token, |ws| async move {
            let agent = Tunnel::spawn(
                ws,
                SessionConfig::new(Role::Client),
                Arc::new(|t| t.proto == "tcp"),
            );
            let accepting = agent.clone();
            tokio::spawn(async move {
                while let Some(stream) = accepting.accept().await {
                    tokio::spawn(async move {
                        match TcpStream::connect(&stream.target().address).await {
                            Ok(socket) => drop(pipe(stream, socket).await),
                            Err(err) => stream
                                .reset(&format!("dial tcp {}: {err}", stream.target().address)),
                        }
                    });
                }
            });
            SessionEnd::Reconnect {
                reason: agent.closed().await.to_string(),
            }
        })
        .await;
    });

    // The user side: a local port whose connections go through the agent's tunnel.
    let forwarder = TcpListener::bind(&forward).await.expect("bind --forward");
    println!("forwarding {forward} -> tunnel -> {target}");
    println!("try: curl http://{forward}/   (Ctrl-C to stop)");
    let reg = registry.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = forwarder.accept().await {
            match reg.open(&ClientKey::new("demo-agent"), "tcp", &target) {
                Ok(stream) => drop(tokio::spawn(pipe(stream, socket))),
                Err(err) => eprintln!("dial through the tunnel failed: {err}"),
            }
        }
    });
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}
