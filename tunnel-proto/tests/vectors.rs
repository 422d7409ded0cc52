//! The shared wire vectors (`../shared/spec/vectors/frames.json`), every case, both ways.
//!
//! - `cases`: encoding the fields gives exactly the bytes; decoding the bytes gives the fields.
//! - `malformed`: a typed error at the stage Go fails at: the codec (`newServerMessage`) or the
//!   session core (`Serve`, `clientConnect`, `addRemoteClient`, `removeRemoteClient`,
//!   `syncConnections`), for the kind of session the vector names; and the session lives on.
//! - `tolerated`: accepted, with the behaviour the vector lists.
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
