//! The shared wire vectors (`../shared/spec/vectors/frames.json`), every case, both ways.
//!
//! - `cases`: encoding the fields gives exactly the bytes; decoding the bytes gives the fields.
//! - `malformed`: a typed error at the stage Go fails at: the codec (`newServerMessage`) or the
//!   session core (`Serve`, `clientConnect`, `addRemoteClient`, `removeRemoteClient`,
//!   `syncConnections`), for the kind of session the vector names; and the session lives on.
//! - `tolerated`: accepted, with the behaviour the vector lists.
//! - `websocket_level`: gorilla's frame-level behaviour, against a real tunnel from a raw peer
//!   (fragmented and huge messages reassembled, empty Pongs count, Close echoed, bad frames end
//!   the session with a typed error; nothing this side sends would trip a Go peer).
//!
//! The file is found through `TUNNEL_SPEC_DIR`, or as `shared/spec` beside the project root.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tunnel_proto::mux::{Authorizer, Chunk, Event, ProtocolError, Session, StreamError, Transmit};
use tunnel_proto::wire::{Body, DecodeError, Message, Target};
use tunnel_proto::{Role, SessionConfig};

fn vectors() -> Value {
    let dir = std::env::var_os("TUNNEL_SPEC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec"));
    let path = dir.join("vectors/frames.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (set TUNNEL_SPEC_DIR)", path.display()));
    serde_json::from_str(&text).expect("frames.json is JSON")
}

fn unhex(value: &Value) -> Vec<u8> {
    hex::decode(value.as_str().expect("hex string")).expect("valid hex")
}

fn int(value: &Value) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("not an int64: {value}"))
}

fn body_from_fields(fields: &Value) -> Body {
    let payload = Bytes::from(unhex(&fields["payload_hex"]));
    match fields["type"].as_str().unwrap() {
        "Data" => Body::Data(payload),
        "Connect" => {
            let text = std::str::from_utf8(&payload).unwrap();
            let (proto, address) = text.split_once('/').unwrap();
            Body::Connect(Target::new(proto, address))
        }
        "Error" => Body::Error(payload),
        "AddClient" => Body::AddClient(payload),
        "RemoveClient" => Body::RemoveClient(payload),
        "Pause" => Body::Pause,
        "Resume" => Body::Resume,
        "SyncConnections" => Body::SyncConnections(payload),
        other => panic!("unknown type {other}"),
    }
}

fn allow_all() -> Authorizer {
    Arc::new(|_| true)
}

/// A session of `role` on which the peer has opened `open` streams (ids as the vector gives).
fn session_with_streams(role: Role, open: &[i64], authorizer: Authorizer) -> (Session, Instant) {
    let start = Instant::now();
    let mut config = SessionConfig::new(role);
    config.sync_grace(Duration::ZERO);
    let mut session = Session::new(config, allow_all(), start);
    for &id in open {
        let connect = Message::new(1, id, Body::Connect(Target::new("tcp", "127.0.0.1:1")));
        session.handle_binary(start, connect.to_bytes()).unwrap();
    }
    drain(&mut session);
    // The vector's authorizer decides the Connects that follow.
    session.set_authorizer(authorizer);
    (session, start)
}

fn drain(session: &mut Session) -> (Vec<Message>, Vec<Event>) {
    let mut sent = Vec::new();
    while let Some(t) = session.poll_transmit() {
        if let Transmit::Message(bytes) = t {
            sent.push(Message::decode(bytes).unwrap());
        }
    }
    let mut events = Vec::new();
    while let Some(e) = session.poll_event() {
        events.push(e);
    }
    (sent, events)
}

fn roles_for(receiver: &str) -> Vec<Role> {
    if receiver.starts_with("Go client-side") || receiver.starts_with("Go client session") {
        vec![Role::Client]
    } else if receiver.starts_with("Go server-side") {
        vec![Role::Server]
    } else {
        vec![Role::Client, Role::Server]
    }
}

#[test]
fn cases_both_ways() {
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len() as i64, int(&v["counts"]["cases"]));
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let fields = &case["fields"];
        let wire = unhex(&case["hex"]);

        let message = Message::new(
            int(&fields["id"]),
            int(&fields["conn_id"]),
            body_from_fields(fields),
        );
        assert_eq!(
            message.to_bytes().as_ref(),
            wire.as_slice(),
            "{name}: encoding"
        );
        assert_eq!(
            message.body.type_number(),
            int(&fields["type_number"]),
            "{name}"
        );

        let decoded =
            Message::decode(Bytes::from(wire.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded.id, int(&fields["id"]), "{name}: id");
        assert_eq!(decoded.conn_id, int(&fields["conn_id"]), "{name}: conn_id");
        assert_eq!(
            decoded.body.type_number(),
            int(&fields["type_number"]),
            "{name}: type"
        );
        assert_eq!(
            decoded.deadline,
            fields["deadline"].as_i64(),
            "{name}: deadline"
        );
        assert_eq!(decoded.body, message.body, "{name}: body");
        check_decoded(name, &decoded, &case["decoded"]);
    }
    println!("vectors: {} cases passed both ways", cases.len());
}

/// Checks the `decoded` block: what the Go receiver extracts from the payload.
fn check_decoded(name: &str, message: &Message, decoded: &Value) {
    if decoded.is_null() {
        return;
    }
    if let Some(proto) = decoded.get("proto") {
        let Body::Connect(target) = &message.body else {
            panic!("{name}: not a Connect")
        };
        assert_eq!(target.proto, proto.as_str().unwrap(), "{name}: proto");
        assert_eq!(
            target.address,
            decoded["address"].as_str().unwrap(),
            "{name}: address"
        );
    }
    if let Some(text) = decoded.get("error_text") {
        let Body::Error(got) = &message.body else {
            panic!("{name}: not an Error")
        };
        assert_eq!(
            got.as_ref(),
            text.as_str().unwrap().as_bytes(),
            "{name}: error text"
        );
        if let Some(graceful) = decoded.get("graceful_eof") {
            assert_eq!(
                got.as_ref() == b"EOF",
                graceful.as_bool().unwrap(),
                "{name}: EOF"
            );
        }
    }
    if let Some(ids) = decoded.get("ids") {
        let Body::SyncConnections(payload) = &message.body else {
            panic!("{name}: not a Sync")
        };
        let got: Vec<i64> = payload
            .chunks(8)
            .map(|w| i64::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let want: Vec<i64> = ids.as_array().unwrap().iter().map(int).collect();
        assert_eq!(got, want, "{name}: ids");
    }
    if let Some(key) = decoded.get("client_key") {
        let payload = match &message.body {
            Body::AddClient(p) | Body::RemoveClient(p) => p,
            _ => panic!("{name}: not a client announcement"),
        };
        let parsed = tunnel_proto::mux::Announcement::parse(payload).unwrap();
        assert_eq!(parsed.client_key_str(), key.as_str().unwrap(), "{name}");
        assert_eq!(parsed.session_key, int(&decoded["session_key"]), "{name}");
    }
}

#[test]
fn malformed_fail_at_go_stage() {
    let v = vectors();
    let malformed = v["malformed"].as_array().unwrap();
    assert_eq!(malformed.len() as i64, int(&v["counts"]["malformed"]));
    for case in malformed {
        let name = case["name"].as_str().unwrap();
        let wire = Bytes::from(unhex(&case["hex"]));
        let go_error = case["go_error"].as_str().unwrap();
        let stage = case["go_stage"].as_str().unwrap();
        let text = case["websocket_opcode"].as_str() == Some("text");
        for role in roles_for(case["receiver"].as_str().unwrap()) {
            let refuse: Authorizer = Arc::new(|_| false);
            let (mut session, now) = session_with_streams(role, &[2], refuse);
            let error = if text {
                session.handle_text(now)
            } else {
                session.handle_binary(now, wire.clone()).expect_err(name)
            };
            // The stage: codec errors are DecodeError, the rest come from the session core.
            match stage {
                "newServerMessage" => {
                    assert!(
                        matches!(error, ProtocolError::Decode(_)),
                        "{name}: {error:?}"
                    );
                    let ProtocolError::Decode(decode) = &error else {
                        unreachable!()
                    };
                    assert_eq!(
                        Message::decode(wire.clone()).unwrap_err(),
                        *decode,
                        "{name}"
                    );
                }
                "Serve" => assert_eq!(error, ProtocolError::WrongMessageType, "{name}"),
                "clientConnect" => {
                    assert!(
                        matches!(error, ProtocolError::ConnectNotAllowed { .. }),
                        "{name}"
                    )
                }
                "addRemoteClient" | "removeRemoteClient" => {
                    assert!(
                        matches!(error, ProtocolError::InvalidRemoteSession { .. }),
                        "{name}"
                    );
                    Message::decode(wire.clone()).expect("decodes at the codec stage");
                }
                "syncConnections" => assert_eq!(error, ProtocolError::SyncFormat, "{name}"),
                other => panic!("{name}: unknown stage {other}"),
            }
            assert_eq!(error.to_string(), go_error, "{name}: same text as Go");
            // Unlike Go, the session survives: stream 2 is still open and working.
            assert!(session.closed().is_none(), "{name}");
            assert!(
                session.open_stream_ids().contains(&2),
                "{name}: stream 2 survived"
            );
            let (sent, _) = drain(&mut session);
            if matches!(error, ProtocolError::ConnectNotAllowed { .. })
                || matches!(error, ProtocolError::Decode(DecodeError::ConnectAddress))
            {
                // The refused stream alone gets an Error.
                let conn = Message::decode(wire.clone())
                    .map(|m| m.conn_id)
                    .unwrap_or(2);
                assert!(
                    sent.iter().any(|m| matches!(m.body, Body::Error(_))
                        && (m.conn_id == conn || stage == "newServerMessage")),
                    "{name}: an Error for the refused stream: {sent:?}"
                );
            }
        }
    }
    println!(
        "vectors: {} malformed inputs rejected at Go's stage, session kept",
        malformed.len()
    );
}

#[test]
fn tolerated_accepted_with_listed_behaviour() {
    let v = vectors();
    let tolerated = v["tolerated"].as_array().unwrap();
    assert_eq!(tolerated.len() as i64, int(&v["counts"]["tolerated"]));
    for case in tolerated {
        let name = case["name"].as_str().unwrap();
        let wire = Bytes::from(unhex(&case["hex"]));
        let decoded = &case["decoded"];
        let message = Message::decode(wire.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(message.id, int(&decoded["id"]), "{name}");
        assert_eq!(message.conn_id, int(&decoded["conn_id"]), "{name}");
        assert_eq!(
            message.body.type_number(),
            int(&decoded["type_number"]),
            "{name}"
        );
        assert_eq!(
            message.deadline,
            decoded["deadline"].as_i64(),
            "{name}: deadline"
        );
        if let Some(canonical) = case.get("canonical_hex") {
            let canonical = unhex(canonical);
            // Re-encoding gives Go's canonical form (our sender writes deadline 15000).
            if !matches!(message.body, Body::Connect(_)) || message.deadline == Some(15000) {
                assert_eq!(
                    message.to_bytes().as_ref(),
                    canonical.as_slice(),
                    "{name}: canonical"
                );
            }
        }
        check_decoded(name, &message, decoded);
        if let Some(payload) = case.get("payload_seen_by_go_hex") {
            let Body::Data(got) = &message.body else {
                panic!("{name}")
            };
            assert_eq!(
                got.as_ref(),
                unhex(payload).as_slice(),
                "{name}: payload as Go sees it"
            );
        }

        let open: Vec<i64> = case["receiver_open_streams"]
            .as_array()
            .map(|a| a.iter().map(int).collect())
            // Cases about a stream's data imply the stream is open even where the list is absent.
            .unwrap_or_else(|| match case["go_outcome"].as_str() {
                Some("data_buffered" | "paused") => vec![message.conn_id],
                _ => Vec::new(),
            });
        for role in roles_for(case["receiver"].as_str().unwrap()) {
            let (mut session, now) = session_with_streams(role, &open, Arc::new(|_| true));
            let later = now + Duration::from_secs(1);
            session
                .handle_binary(later, wire.clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(session.closed().is_none(), "{name}");
            let (sent, events) = drain(&mut session);
            check_behaviour(name, case, &mut session, &message, &sent, &events);
        }
    }
    println!("vectors: {} tolerated inputs accepted", tolerated.len());
}

fn check_behaviour(
    name: &str,
    case: &Value,
    session: &mut Session,
    message: &Message,
    sent: &[Message],
    events: &[Event],
) {
    let conn = message.conn_id;
    match case["go_outcome"].as_str().unwrap() {
        "data_buffered" => {
            let Body::Data(payload) = &message.body else {
                panic!("{name}")
            };
            assert_eq!(
                session.read_chunk(conn, usize::MAX).unwrap(),
                Chunk::Data(payload.clone()),
                "{name}"
            );
        }
        "paused" => {
            // The stream is paused for sending: a write is queued but not transmitted.
            assert_eq!(session.write(conn, b"x").unwrap(), 1, "{name}");
            assert!(
                session.poll_transmit().is_none(),
                "{name}: paused stream sent data"
            );
        }
        "stream_opened" => {
            assert!(
                events.contains(&Event::Incoming(conn)),
                "{name}: {events:?}"
            );
            let decoded = &case["decoded"];
            let (target, _) = session.stream_target(conn).unwrap();
            assert_eq!(target.proto, decoded["proto"].as_str().unwrap(), "{name}");
            assert_eq!(
                target.address,
                decoded["address"].as_str().unwrap(),
                "{name}"
            );
        }
        "ignored" | "no_change" | "recorded" => {
            assert!(sent.is_empty(), "{name}: nothing is answered: {sent:?}");
            for id in case["receiver_open_streams"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert!(
                    session.open_stream_ids().contains(&int(id)),
                    "{name}: stream kept"
                );
            }
            if case["go_outcome"] == "recorded" && session.config().role() == Role::Server {
                let Some(Event::ClientAdded(a)) = events.first() else {
                    panic!("{name}: {events:?}")
                };
                assert_eq!(
                    a.client_key.as_ref(),
                    unhex(&case["recorded_client_key_hex"]).as_slice(),
                    "{name}"
                );
                assert_eq!(a.session_key, int(&case["recorded_session_key"]), "{name}");
            }
        }
        "stream_closed_and_error_echoed" => {
            // Closed; this side does not echo (Go never waits for an echo, spec §4.2).
            let Body::Error(text) = &message.body else {
                panic!("{name}")
            };
            let err = session.read_chunk(conn, 1).unwrap_err();
            assert_eq!(
                err,
                StreamError::Reset(String::from_utf8_lossy(text).into_owned()),
                "{name}"
            );
            assert!(!session.open_stream_ids().contains(&conn), "{name}");
        }
        "reply_error" => {
            let reply = &case["reply"];
            assert_eq!(sent.len(), 1, "{name}: {sent:?}");
            assert_eq!(sent[0].conn_id, int(&reply["conn_id"]), "{name}");
            let Body::Error(text) = &sent[0].body else {
                panic!("{name}")
            };
            assert_eq!(
                text.as_ref(),
                reply["text"].as_str().unwrap().as_bytes(),
                "{name}"
            );
        }
        "streams_closed_silently" => {
            assert!(
                sent.is_empty(),
                "{name}: closed without any message: {sent:?}"
            );
            let closed: Vec<i64> = case["streams_closed_without_error_message"]
                .as_array()
                .unwrap()
                .iter()
                .map(int)
                .collect();
            let listed: Vec<i64> = case["decoded"]["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(int)
                .collect();
            for id in case["receiver_open_streams"]
                .as_array()
                .unwrap()
                .iter()
                .map(int)
            {
                let open = session.open_stream_ids().contains(&id);
                if listed.contains(&id) {
                    // Deviation on purpose: Go's merge closes listed streams when the list is
                    // unsorted (its bug); this side keeps every listed stream.
                    assert!(open, "{name}: listed stream {id} kept");
                } else {
                    assert!(
                        closed.contains(&id) && !open,
                        "{name}: unlisted stream {id} closed"
                    );
                }
            }
        }
        other => panic!("{name}: unhandled outcome {other}"),
    }
}

// === websocket_level ===
//
// Frame-level vectors: how gorilla/websocket (under a Go peer) treats frames. Each entry is
// checked against a real tunnel (the driver over tungstenite) from a raw peer that writes the
// vector's frame bytes and parses every frame the tunnel sends back, both ways that matter:
// what this side does with the frame, and that nothing it sends would trip the Go behaviour
// (no Text, no RSV bits, masked exactly when it is the client, Close only when ending).

mod websocket_level {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
    use tunnel_proto::driver::{DEFAULT_MAX_MESSAGE, Tunnel, websocket_config};
    use tunnel_proto::mux::SessionError;

    /// The leading hex bytes of a `frames_hex` entry, and whether a mask key follows
    /// (`MMMMMMMM`). What comes after (`<...>`, `..`) is the payload the check supplies.
    fn frame_head(entry: &Value) -> (Vec<u8>, bool) {
        let mut head = Vec::new();
        for token in entry.as_str().expect("frame string").split_whitespace() {
            if token == "MMMMMMMM" {
                return (head, true);
            }
            match u8::from_str_radix(token, 16) {
                Ok(b) if token.len() == 2 => head.push(b),
                _ => break,
            }
        }
        (head, false)
    }

    fn frames(case: &Value) -> Vec<(Vec<u8>, bool)> {
        case["frames_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(frame_head)
            .collect()
    }

    /// One frame: the vector's head, then (if masked) a key, then the payload masked with it.
    fn frame(head: &[u8], masked: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = head.to_vec();
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// A frame the tunnel sent, as the raw peer parsed it.
    #[derive(Debug)]
    struct Frame {
        first: u8,
        masked: bool,
        payload: Vec<u8>,
    }

    impl Frame {
        fn opcode(&self) -> u8 {
            self.first & 0x0f
        }
    }

    /// The peer end: raw bytes in and out, every frame read from the tunnel checked against
    /// what a Go peer treats as fatal.
    struct RawPeer {
        io: DuplexStream,
        /// The role of the tunnel under test: its frames must be masked iff it is the client.
        tunnel_role: Role,
    }

    impl RawPeer {
        async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }

        /// The next frame from the tunnel, `None` at EOF, bounded in time.
        async fn next(&mut self) -> Option<Frame> {
            tokio::time::timeout(Duration::from_secs(10), self.read_frame())
                .await
                .expect("no frame from the tunnel within 10 s")
        }

        async fn read_frame(&mut self) -> Option<Frame> {
            let mut h = [0u8; 2];
            self.io.read_exact(&mut h).await.ok()?;
            let masked = h[1] & 0x80 != 0;
            let len = match h[1] & 0x7f {
                126 => u64::from(self.io.read_u16().await.unwrap()),
                127 => self.io.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut key = [0u8; 4];
            if masked {
                self.io.read_exact(&mut key).await.unwrap();
            }
            let mut payload = vec![0; usize::try_from(len).unwrap()];
            self.io.read_exact(&mut payload).await.unwrap();
            if masked {
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b ^= key[i % 4]);
            }
            let f = Frame {
                first: h[0],
                masked,
                payload,
            };
            assert_eq!(f.first & 0x70, 0, "the tunnel set RSV bits: {f:?}");
            assert_ne!(f.opcode(), 1, "the tunnel sent a Text frame");
            assert_eq!(
                f.masked,
                self.tunnel_role == Role::Client,
                "masking must follow the role ({:?}): {f:?}",
                self.tunnel_role
            );
            Some(f)
        }

        /// The next binary message from the tunnel, skipping Pings.
        async fn next_message(&mut self) -> Message {
            loop {
                let f = self.next().await.expect("EOF while waiting for a message");
                match f.opcode() {
                    2 => return Message::decode(Bytes::from(f.payload)).unwrap(),
                    9 | 10 => continue,
                    op => panic!("unexpected frame opcode {op}: {f:?}"),
                }
            }
        }
    }

    async fn tunnel_with_raw_peer(role: Role, config: SessionConfig) -> (Tunnel, RawPeer) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let ws_role = match role {
            Role::Client => WsRole::Client,
            Role::Server => WsRole::Server,
        };
        let config_ws = Some(websocket_config(DEFAULT_MAX_MESSAGE));
        let ws = WebSocketStream::from_raw_socket(ours, ws_role, config_ws).await;
        let tunnel = Tunnel::spawn(ws, config, allow_all());
        (
            tunnel,
            RawPeer {
                io: theirs,
                tunnel_role: role,
            },
        )
    }

    async fn closed_within(tunnel: &Tunnel, secs: u64) -> SessionError {
        tokio::time::timeout(Duration::from_secs(secs), tunnel.closed())
            .await
            .unwrap_or_else(|_| panic!("the tunnel did not end within {secs} s"))
    }

    /// A Data message of exactly `total` encoded bytes for `conn`.
    fn data_message_of_len(conn: i64, total: usize) -> (Message, Bytes) {
        let empty = Message::new(9, conn, Body::Data(Bytes::new())).encoded_len();
        let payload = Bytes::from(payload_bytes(total - empty));
        let m = Message::new(9, conn, Body::Data(payload.clone()));
        assert_eq!(m.encoded_len(), total);
        (m, payload)
    }

    fn payload_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    async fn read_all(stream: tunnel_proto::driver::Stream, len: usize) -> Vec<u8> {
        let mut stream = stream;
        let mut got = vec![0; len];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
            .await
            .expect("stream data within 10 s")
            .unwrap();
        got
    }

    /// Our server opens a stream to the raw client; returns the stream and its conn id.
    async fn server_opens_stream(
        tunnel: &Tunnel,
        peer: &mut RawPeer,
    ) -> (tunnel_proto::driver::Stream, i64) {
        let stream = tunnel.open("tcp", "127.0.0.1:1").unwrap();
        let connect = peer.next_message().await;
        assert!(matches!(connect.body, Body::Connect(_)), "{connect:?}");
        (stream, connect.conn_id)
    }

    async fn check(name: &str, case: &Value) {
        let fr = frames(case);
        match name {
            "go_client_fragments_messages_over_4096_bytes" => {
                // A 4097-byte message as gorilla writes it: 4096 bytes non-final, 1 continuation.
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                let (stream, conn) = server_opens_stream(&tunnel, &mut peer).await;
                let (message, payload) = data_message_of_len(conn, 4097);
                let bytes = message.to_bytes();
                assert_eq!(
                    fr[0].0,
                    [0x02, 0xfe, 0x10, 0x00],
                    "{name}: header as listed"
                );
                peer.send(&frame(&fr[0].0, fr[0].1, &bytes[..4096])).await;
                peer.send(&frame(&fr[1].0, fr[1].1, &bytes[4096..])).await;
                assert_eq!(
                    read_all(stream, payload.len()).await,
                    payload,
                    "{name}: reassembled"
                );
                assert!(tunnel.close_reason().is_none(), "{name}");
            }
            "go_server_sends_one_frame_per_message" => {
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Client, SessionConfig::new(Role::Client)).await;
                let connect = Message::new(2, 2, Body::Connect(Target::new("tcp", "127.0.0.1:1")));
                let len = connect.encoded_len() as u8;
                peer.send(&[&[0x82, len][..], &connect.to_bytes()].concat())
                    .await;
                let stream = tokio::time::timeout(Duration::from_secs(10), tunnel.accept())
                    .await
                    .unwrap()
                    .expect("the Connect is accepted");
                let (message, payload) = data_message_of_len(2, 70_000);
                assert_eq!(fr[0].0[..2], [0x82, 0x7f], "{name}: 64-bit length form");
                let declared = u64::from_be_bytes(fr[0].0[2..10].try_into().unwrap());
                assert_eq!(declared, 70_000, "{name}");
                peer.send(&frame(&fr[0].0, fr[0].1, &message.to_bytes()))
                    .await;
                assert_eq!(read_all(stream, payload.len()).await, payload, "{name}");
            }
            "text_frame_is_fatal" => {
                // To a Go peer a Text frame is fatal, so this side never sends one (every frame
                // RawPeer reads is checked). Received here, it is a typed protocol error and the
                // session goes on: bad input costs that message, nothing else.
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                let (stream, conn) = server_opens_stream(&tunnel, &mut peer).await;
                assert_eq!(fr[0].0, [0x81, 0x85], "{name}");
                peer.send(&frame(&fr[0].0, fr[0].1, b"hello")).await;
                let (message, payload) = data_message_of_len(conn, 100);
                let bytes = message.to_bytes();
                peer.send(&frame(&[0x82, 0x80 | bytes.len() as u8], true, &bytes))
                    .await;
                assert_eq!(read_all(stream, payload.len()).await, payload, "{name}");
                assert_eq!(
                    tunnel.take_protocol_errors(),
                    vec![ProtocolError::WrongMessageType],
                    "{name}"
                );
            }
            "ping_payload_not_echoed" => {
                // A Go server answers every Ping with an EMPTY Pong: our client's keepalive must
                // count that as liveness. Control: without Pongs the same client gives up.
                let mut config = SessionConfig::new(Role::Client);
                config
                    .keepalive_interval(Some(Duration::from_millis(100)))
                    .keepalive_timeout(Duration::from_millis(600));
                let (tunnel, mut peer) = tunnel_with_raw_peer(Role::Client, config.clone()).await;
                let go_pong = unhex_spaced(&case["go_reply_hex"][0]);
                assert_eq!(go_pong, [0x8a, 0x00], "{name}");
                let started = Instant::now();
                let mut pings = 0;
                while started.elapsed() < Duration::from_secs(2) {
                    let f = peer.next().await.expect("tunnel open");
                    if f.opcode() == 9 {
                        pings += 1;
                        peer.send(&go_pong).await;
                    }
                }
                assert!(pings >= 5, "{name}: {pings} pings in 2 s");
                assert!(
                    tunnel.close_reason().is_none(),
                    "{name}: empty Pongs keep it alive"
                );

                let (silent, _peer) = tunnel_with_raw_peer(Role::Client, config).await;
                let reason = closed_within(&silent, 5).await;
                assert!(
                    matches!(reason, SessionError::KeepaliveTimeout(_)),
                    "{name}: {reason}"
                );

                // The other way: a Ping with a payload to our server gets exactly one Pong.
                let (_server, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                assert_eq!(fr[0].0, [0x89, 0x83], "{name}");
                peer.send(&frame(&fr[0].0, fr[0].1, b"abc")).await;
                let pong = peer.next().await.unwrap();
                assert_eq!(pong.opcode(), 10, "{name}: {pong:?}");
            }
            "close_frame_is_echoed_and_ends_session" => {
                // From the client side, the vector's frame; we are the server here and echo it.
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                assert_eq!(fr[0].0, [0x88, 0x82], "{name}");
                peer.send(&frame(&fr[0].0, fr[0].1, &[0x03, 0xe8])).await;
                let echo = peer.next().await.expect("a Close in answer");
                assert_eq!(echo.opcode(), 8, "{name}: {echo:?}");
                assert_eq!(echo.payload[..2], [0x03, 0xe8], "{name}: same code");
                let reason = closed_within(&tunnel, 5).await;
                assert!(
                    reason.to_string().contains("1000") || reason.to_string().contains("Normal"),
                    "{name}: {reason}"
                );
            }
            "frame_length_with_top_bit_set" => {
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                assert_eq!(fr[0].0.len(), 10, "{name}: head and 64-bit length");
                peer.send(&frame(&fr[0].0, fr[0].1, &[])).await;
                let reason = closed_within(&tunnel, 5).await;
                assert!(
                    matches!(reason, SessionError::Transport(_)),
                    "{name}: {reason}"
                );
            }
            "unmasked_client_frame" => {
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                assert!(!fr[0].1, "{name}: the vector's frame has no mask");
                peer.send(&fr[0].0).await;
                let reason = closed_within(&tunnel, 5).await;
                assert!(
                    matches!(reason, SessionError::Transport(_)),
                    "{name}: {reason}"
                );
            }
            "rsv1_without_negotiated_compression" => {
                let (tunnel, mut peer) =
                    tunnel_with_raw_peer(Role::Server, SessionConfig::new(Role::Server)).await;
                assert_eq!(fr[0].0, [0xc2], "{name}");
                let message = Message::new(1, 1, Body::Pause).to_bytes();
                peer.send(&frame(&[0xc2, 0x80 | message.len() as u8], true, &message))
                    .await;
                let reason = closed_within(&tunnel, 5).await;
                assert!(
                    matches!(reason, SessionError::Transport(_)),
                    "{name}: {reason}"
                );
            }
            other => panic!("no check for the websocket-level vector {other}"),
        }
    }

    fn unhex_spaced(value: &Value) -> Vec<u8> {
        let (head, _) = frame_head(value);
        head
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_level_frames() {
        let v = vectors();
        let cases = v["websocket_level"].as_array().unwrap();
        assert_eq!(cases.len() as i64, int(&v["counts"]["websocket_level"]));
        for case in cases {
            let name = case["name"].as_str().unwrap();
            check(name, case).await;
            println!("vectors: websocket_level {name}: ok");
        }
        println!("vectors: {} websocket-level frames checked", cases.len());
    }
}
