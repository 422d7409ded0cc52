//! The driver end to end on loopback: real TCP websockets, real TCP services behind an
//! agent-style acceptor, and (for keepalive) in-memory websockets under virtual time.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tunnel_proto::driver::Tunnel;
use tunnel_proto::mux::SessionError;
use tunnel_proto::wire::{Body, Message, Target};
use tunnel_proto::{Role, SessionConfig};

use support::*;

/// Waits (bounded) until both tunnels have forgotten every stream.
async fn assert_streams_drain(tunnels: &[&Tunnel]) {
    let drained = timeout(Duration::from_secs(10), async {
        while tunnels.iter().any(|t| t.stream_count() > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let counts: Vec<usize> = tunnels.iter().map(|t| t.stream_count()).collect();
    assert!(drained.is_ok(), "streams left behind: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_echo_a_mebibyte_each() {
    const STREAMS: u64 = 1000;
    const SIZE: usize = 1 << 20;
    let echo = echo_server().await;
    let (client_ws, server_ws) = ws_pair_tcp().await;
    let (agent, server) = start_pair(client_ws, server_ws);

    let started = std::time::Instant::now();
    let mut tasks = JoinSet::new();
    for seed in 0..STREAMS {
        let stream = server.open("tcp", &echo.to_string()).unwrap();
        tasks.spawn(async move {
            let data = payload(seed, SIZE);
            let (mut reader, mut writer) = tokio::io::split(stream);
            let write = async {
                writer.write_all(&data).await.unwrap();
                writer
            };
            let read = async {
                let mut got = vec![0; SIZE];
                reader.read_exact(&mut got).await.unwrap();
                got
            };
            let (writer, got) = tokio::join!(write, read);
            assert_eq!(
                checksum(&got),
                checksum(&data),
                "stream {seed} echoed other bytes"
            );
            drop(reader.unsplit(writer));
        });
    }
    let all = timeout(Duration::from_secs(300), async {
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
    })
    .await;
    assert!(all.is_ok(), "1000 echo streams did not finish in 300 s");
    println!(
        "1000 streams x 1 MiB echoed in {:.2?} ({} pauses sent by the agent, {} by the server)",
        started.elapsed(),
        agent.stats().pauses_sent,
        server.stats().pauses_sent
    );
    assert_streams_drain(&[&agent, &server]).await;
}

/// A service that writes forever (until its reader goes away).
async fn source_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 << 10];
                // Bounded: 4 GiB at most, far more than any test reads.
                for _ in 0..65_536 {
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_reader_is_paused_while_round_trips_go_on() {
    let echo = echo_server().await;
    let source = source_server().await;
    let (client_ws, server_ws) = ws_pair_tcp().await;
    let (agent, server) = start_pair(client_ws, server_ws);

    // Stream A: the source pours data in and this side never reads it.
    let stuck = server.open("tcp", &source.to_string()).unwrap();
    // Wait (bounded) until the server has paused the agent on that stream.
    timeout(Duration::from_secs(10), async {
        while agent.stats().pauses_received == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stuck stream was never paused");

    // Stream B: 1 KB round trips keep completing while A stays stuck.
    let mut interactive = server.open("tcp", &echo.to_string()).unwrap();
    let request = payload(42, 1024);
    let mut reply = vec![0; 1024];
    let mut latencies = Vec::new();
    for _ in 0..500 {
        let start = std::time::Instant::now();
        interactive.write_all(&request).await.unwrap();
        timeout(Duration::from_secs(5), interactive.read_exact(&mut reply))
            .await
            .expect("a round trip stalled behind the stuck stream")
            .unwrap();
        assert_eq!(reply, request);
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let received = server.stats().data_bytes_in;
    println!(
        "500 round trips beside a paused stream: p50 {:?}, p99 {:?}; server holds {} KiB of the stuck stream",
        latencies[250],
        latencies[495],
        received / 1024
    );
    println!(
        "server stats: {:?}\nagent stats: {:?}",
        server.stats(),
        agent.stats()
    );
    // The stuck stream's buffer stays bounded: well under the hard cap despite an endless source.
    assert!(
        received < 8 << 20,
        "the server kept receiving {received} bytes despite Pause"
    );
    assert!(agent.take_protocol_errors().is_empty());
    drop(stuck);
}

/// A TCP relay between client and server that the test can cut.
async fn relay(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (mut down, _) = listener.accept().await.unwrap();
        let mut up = TcpStream::connect(upstream).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });
    (addr, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_websocket_fails_every_stream_promptly() {
    let source = source_server().await;
    // Server side of the websocket behind a relay we can cut.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let config = tunnel_proto::driver::websocket_config(tunnel_proto::driver::DEFAULT_MAX_MESSAGE);
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio_tungstenite::accept_async_with_config(tcp, Some(config))
            .await
            .unwrap()
    });
    let (relay_addr, relay_task) = relay(server_addr).await;
    let tcp = TcpStream::connect(relay_addr).await.unwrap();
    let (client_ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{relay_addr}/"),
        tcp,
        Some(config),
    )
    .await
    .unwrap();
    let (agent, server) = start_pair(client_ws, accept.await.unwrap());

    let mut readers = JoinSet::new();
    for _ in 0..20 {
        let mut stream = server.open("tcp", &source.to_string()).unwrap();
        readers.spawn(async move {
            let mut buf = vec![0; 64 << 10];
            let mut total = 0usize;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Err(total),
                    Ok(n) => total += n,
                    Err(err) => return Ok((total, err)),
                }
            }
        });
    }
    // Let data flow, then cut the websocket mid-transfer.
    timeout(Duration::from_secs(10), async {
        while server.stats().data_bytes_in < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no data flowed");
    let cut = std::time::Instant::now();
    relay_task.abort();

    let mut failed = 0;
    let results = timeout(Duration::from_secs(5), async {
        let mut out = Vec::new();
        while let Some(r) = readers.join_next().await {
            out.push(r.unwrap());
        }
        out
    })
    .await
    .expect("streams did not fail within 5 s of the websocket dropping");
    for result in results {
        let (_, err) = result.expect("a stream ended cleanly instead of failing");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
        assert!(err.to_string().contains("tunnel closed"), "{err}");
        failed += 1;
    }
    println!(
        "{failed} streams failed {:?} after the websocket was cut",
        cut.elapsed()
    );
    assert!(matches!(server.closed().await, SessionError::Transport(_)));
    assert!(matches!(agent.closed().await, SessionError::Transport(_)));
    assert!(server.accept().await.is_none());
    assert!(
        server.open("tcp", "127.0.0.1:1").is_err(),
        "no new streams on a dead tunnel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_dials_fail_only_their_stream() {
    let echo = echo_server().await;
    let (client_ws, server_ws) = ws_pair_tcp().await;
    let (agent, server) = start_pair(client_ws, server_ws);

    let mut refused = server.open("unix", "/etc/passwd").unwrap();
    let err = refused.read(&mut [0; 16]).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut failed = server.open("tcp", &closed_port.to_string()).unwrap();
    let err = failed.read(&mut [0; 16]).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let mut fine = server.open("tcp", &echo.to_string()).unwrap();
    fine.write_all(b"still here").await.unwrap();
    let mut buf = [0; 10];
    fine.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    assert_eq!(agent.stats().connects_refused, 1);
    assert!(server.close_reason().is_none() && agent.close_reason().is_none());
}

#[tokio::test(start_paused = true)]
async fn idle_tunnel_stays_up_on_pings_and_a_silent_peer_times_out() {
    let (client_ws, server_ws) = ws_pair_memory().await;
    let (agent, server) = start_pair(client_ws, server_ws);
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert!(agent.close_reason().is_none(), "{:?}", agent.close_reason());
    assert!(
        server.close_reason().is_none(),
        "{:?}",
        server.close_reason()
    );
    assert!(
        server.is_healthy(Duration::from_secs(6)),
        "the server hears the client's 5 s pings"
    );

    // A peer that never answers: it drains the bytes but speaks no websocket, so no Pong ever
    // comes back. The client gives up after 60 s.
    let (near, mut far) = tokio::io::duplex(64 << 10);
    let client_ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        near,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let agent = Tunnel::spawn(client_ws, SessionConfig::new(Role::Client), allow_tcp());
    let reader = tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while far.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    let started = tokio::time::Instant::now();
    let reason = agent.closed().await;
    let elapsed = started.elapsed();
    assert!(
        matches!(reason, SessionError::KeepaliveTimeout(_)),
        "{reason:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(60) && elapsed < Duration::from_secs(66),
        "{elapsed:?}"
    );
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ignoring_pause_gets_that_stream_reset_and_the_tunnel_lives() {
    // A raw peer, Go-like: it opens stream 2 and sends 40 MiB whatever we say.
    let (client_ws, mut raw) = ws_pair_tcp().await;
    let agent = Tunnel::spawn(client_ws, SessionConfig::new(Role::Client), allow_tcp());
    let send = |m: Message| WsMessage::Binary(m.to_bytes());
    raw.send(send(Message::new(
        1,
        2,
        Body::Connect(Target::new("tcp", "10.0.0.1:80")),
    )))
    .await
    .unwrap();
    let stuck = agent.accept().await.unwrap();
    assert_eq!(stuck.id(), 2);
    let chunk = Bytes::from(vec![1u8; 1 << 20]);
    for i in 0..40 {
        raw.send(send(Message::new(10 + i, 2, Body::Data(chunk.clone()))))
            .await
            .unwrap();
    }
    // What came back: a Pause, then an Error on stream 2 only.
    let mut seen = Vec::new();
    timeout(Duration::from_secs(10), async {
        while let Some(Ok(WsMessage::Binary(bytes))) = raw.next().await {
            let message = Message::decode(bytes).unwrap();
            let done = matches!(message.body, Body::Error(_));
            seen.push(message);
            if done {
                break;
            }
        }
    })
    .await
    .expect("no Error for the overrun stream");
    assert!(
        seen.iter().any(|m| m.conn_id == 2 && m.body == Body::Pause),
        "{seen:?}"
    );
    let error = seen.last().unwrap();
    assert_eq!(error.conn_id, 2);
    let Body::Error(text) = &error.body else {
        unreachable!()
    };
    assert!(
        std::str::from_utf8(text).unwrap().contains("limit"),
        "{text:?}"
    );
    assert_eq!(agent.stats().buffer_limit_resets, 1);

    // The tunnel carries on: a new stream works.
    raw.send(send(Message::new(
        90,
        3,
        Body::Connect(Target::new("tcp", "10.0.0.1:81")),
    )))
    .await
    .unwrap();
    raw.send(send(Message::new(
        91,
        3,
        Body::Data(Bytes::from_static(b"hi")),
    )))
    .await
    .unwrap();
    let mut next = agent.accept().await.unwrap();
    let mut buf = [0; 2];
    next.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");
    assert!(agent.close_reason().is_none());
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_and_large_messages_are_reassembled() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    // The raw peer plays a Go client: messages over 4096 bytes go out as 4096-byte frames.
    let (mut raw, server_ws) = ws_pair_tcp().await;
    let server = Tunnel::spawn(server_ws, SessionConfig::new(Role::Server), allow_tcp());
    let send = |m: Message| WsMessage::Binary(m.to_bytes());
    raw.send(send(Message::new(
        1,
        1,
        Body::Connect(Target::new("tcp", "127.0.0.1:9")),
    )))
    .await
    .unwrap();
    let mut stream = server.accept().await.unwrap();

    let fragmented = payload(7, 10_000);
    let wire = Message::new(2, 1, Body::Data(Bytes::from(fragmented.clone()))).to_bytes();
    let pieces: Vec<&[u8]> = wire.chunks(4096).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let header = FrameHeader {
            is_final: i == pieces.len() - 1,
            opcode: if i == 0 {
                OpCode::Data(OpData::Binary)
            } else {
                OpCode::Data(OpData::Continue)
            },
            ..FrameHeader::default()
        };
        raw.send(WsMessage::Frame(Frame::from_payload(
            header,
            Bytes::copy_from_slice(piece),
        )))
        .await
        .unwrap();
    }
    let mut got = vec![0; fragmented.len()];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, fragmented, "three frames, one message");

    // A Go server writes one message per application write, however large: 20 MiB here.
    let large = payload(8, 20 << 20);
    raw.send(send(Message::new(
        3,
        1,
        Body::Data(Bytes::from(large.clone())),
    )))
    .await
    .unwrap();
    let mut got = vec![0; large.len()];
    timeout(Duration::from_secs(20), stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checksum(&got), checksum(&large));
    assert!(server.close_reason().is_none());
    assert!(server.take_protocol_errors().is_empty());
}

/// A local service with a small receive buffer that reads nothing until `go`, then reads
/// slowly (so the agent's writes keep finding the socket full) to the end. Returns what it read.
async fn gated_sink() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<Vec<u8>>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let (done, got) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        if gate.await.is_err() {
            return;
        }
        let mut received = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        // Bounded: 10,000 reads of at most 16 KiB, 1 ms apart.
        for _ in 0..10_000 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = done.send(received);
    });
    (addr, go, got)
}

/// The peer writes and closes while the agent's local socket is full; every byte it wrote
/// before the close still reaches that socket. (The pipe used to end with an error as soon as
/// the close made the stream unwritable, dropping what the stream still held for the socket.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_before_a_close_reach_a_blocked_local_socket() {
    // Under the agent's pause threshold, so the server sends it all without waiting for the sink.
    const SIZE: usize = 768 << 10;
    let (sink, go, received) = gated_sink().await;
    let (client_ws, server_ws) = ws_pair_tcp().await;
    let agent = Tunnel::spawn(client_ws, SessionConfig::new(Role::Client), allow_tcp());
    let server = Tunnel::spawn(server_ws, SessionConfig::new(Role::Server), allow_none());
    // The agent's side of each local connection gets a small send buffer (no autotuning), so the
    // agent's writes find the socket full and the stream keeps what the socket cannot take.
    let pipes = agent.clone();
    tokio::spawn(async move {
        while let Some(stream) = pipes.accept().await {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(16 << 10).unwrap();
            let address = stream.target().address.parse().unwrap();
            let local = socket.connect(address).await.unwrap();
            tokio::spawn(tunnel_proto::driver::pipe(stream, local));
        }
    });
    let echo = echo_server().await;

    let data = payload(11, SIZE);
    let mut stream = server.open("tcp", &sink.to_string()).unwrap();
    stream.write_all(&data).await.unwrap();
    drop(stream);
    // The server forgets the stream once its close is on the wire, after all of its data.
    let sent = timeout(Duration::from_secs(10), async {
        while server.stream_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(sent.is_ok(), "the server did not send its data and close");
    // One session, handled in order: once a later stream has echoed, the agent has the close.
    let mut probe = server.open("tcp", &echo.to_string()).unwrap();
    probe.write_all(b"?").await.unwrap();
    let mut byte = [0u8; 1];
    probe.read_exact(&mut byte).await.unwrap();
    drop(probe);
    let held = agent.stream_count();
    go.send(()).unwrap();

    let got = timeout(Duration::from_secs(30), received)
        .await
        .expect("the sink saw its socket end")
        .unwrap();
    println!(
        "the agent held {held} stream(s) when the sink began to read; it got {} of {SIZE} bytes",
        got.len()
    );
    assert_eq!(got.len(), SIZE, "bytes written before the close were lost");
    assert_eq!(checksum(&got), checksum(&data));
    assert_streams_drain(&[&agent, &server]).await;
}
