//! Helpers shared by the loopback tests: websocket pairs over real loopback TCP (or in-memory
//! pipes for virtual-time tests), a TCP echo service, an agent-style acceptor that pipes every
//! stream to its target, and deterministic payloads with checksums.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tunnel_proto::driver::acceptor::ClientKey;
use tunnel_proto::driver::registry::{Registry, SessionId};
use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, pipe, websocket_config};
use tunnel_proto::mux::{Authorizer, refuse_all};
use tunnel_proto::{Role, SessionConfig};

pub fn allow_tcp() -> Authorizer {
    Arc::new(|t| t.proto == "tcp")
}

/// A server's authorizer: the agent opens nothing.
pub fn allow_none() -> Authorizer {
    Arc::new(|_| false)
}

/// A websocket pair over real loopback TCP: (client side, server side).
pub async fn ws_pair_tcp() -> (WebSocketStream<TcpStream>, WebSocketStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = websocket_config(DEFAULT_MAX_MESSAGE);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::accept_async_with_config(tcp, Some(config))
            .await
            .unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/connect"),
        tcp,
        Some(config),
    )
    .await
    .unwrap();
    (client, server.await.unwrap())
}

/// A websocket pair over an in-memory pipe (for virtual-time tests).
pub async fn ws_pair_memory() -> (
    WebSocketStream<tokio::io::DuplexStream>,
    WebSocketStream<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(256 << 10);
    let config = Some(websocket_config(DEFAULT_MAX_MESSAGE));
    let client = WebSocketStream::from_raw_socket(a, WsRole::Client, config).await;
    let server = WebSocketStream::from_raw_socket(b, WsRole::Server, config).await;
    (client, server)
}

/// Starts both ends: the client ("agent") pipes every accepted stream to its TCP target.
pub fn start_pair<S>(
    client_ws: WebSocketStream<S>,
    server_ws: WebSocketStream<S>,
) -> (Tunnel, Tunnel)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let agent = Tunnel::spawn(client_ws, SessionConfig::new(Role::Client), allow_tcp());
    let server = Tunnel::spawn(server_ws, SessionConfig::new(Role::Server), allow_none());
    serve_agent(agent.clone());
    (agent, server)
}

/// Accepts streams and pipes each to its TCP target, like an agent.
pub fn serve_agent(agent: Tunnel) {
    tokio::spawn(async move {
        while let Some(stream) = agent.accept().await {
            tokio::spawn(async move {
                let address = stream.target().address.clone();
                match TcpStream::connect(&address).await {
                    Ok(socket) => {
                        let _ = pipe(stream, socket).await;
                    }
                    Err(err) => stream.reset(&format!("dial tcp {address}: {err}")),
                }
            });
        }
    });
}

/// Raises the open-files limit to the hard limit: a thousand streams need a few thousand
/// sockets, more than the usual soft limit of 1024.
pub fn raise_fd_limit() {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    rlimit::Resource::NOFILE.set(hard, hard).unwrap();
}

/// A TCP echo service on loopback, with the kernel's largest backlog: the 1,000-stream burst
/// makes the agent complete 1,000 handshakes at once, more than `TcpListener::bind`'s 1024
/// backlog holds while this accept loop waits for a turn on a loaded machine.
pub async fn echo_server() -> std::net::SocketAddr {
    raise_fd_limit();
    let listener = tunnel_proto::driver::acceptor::bind_listener("127.0.0.1:0")
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let mut socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(err) => panic!("echo server cannot accept: {err}"),
            };
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Deterministic bytes for stream `seed` (xorshift), so every stream carries different data.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, 64 bits.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// === registered sessions (registry tests) ===

/// One end of a tunnel whose driver runs in a task until frozen (kept alive, never polled
/// again: the socket stays open and nothing more is read, written or pinged) or aborted
/// (dropped: the socket closes).
pub struct Peer {
    pub tunnel: Tunnel,
    pub freeze: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Peer {
    pub fn start<S>(ws: WebSocketStream<S>, role: Role) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let authorizer = match role {
            Role::Client => allow_tcp(),
            Role::Server => refuse_all(),
        };
        let (tunnel, driver) = Tunnel::new(ws, SessionConfig::new(role), authorizer);
        let (freeze, frozen) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::pin!(driver);
            tokio::select! {
                _ = &mut driver => {}
                _ = frozen => std::future::pending::<()>().await,
            }
        });
        Self {
            tunnel,
            freeze: Some(freeze),
            task,
        }
    }

    pub fn freeze(&mut self) {
        let _ = self.freeze.take().expect("frozen twice").send(());
    }

    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// An agent and a registered server session over an in-memory websocket.
pub async fn connect_memory(registry: &Registry, key: &str) -> (Peer, Peer, SessionId) {
    let (client_ws, server_ws) = ws_pair_memory().await;
    let agent = Peer::start(client_ws, Role::Client);
    let server = Peer::start(server_ws, Role::Server);
    let handle = registry
        .register(ClientKey::new(key), server.tunnel.clone())
        .expect("valid key");
    (agent, server, handle.id())
}
