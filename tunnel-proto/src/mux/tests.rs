//! The session core driven by messages alone: two sessions on in-memory queues under virtual
//! time (quinn-proto's `Pair`), scripted Go-like peers, and random operation sequences.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::wire::{Body, Message, Target};

fn allow_all() -> Authorizer {
    Arc::new(|_| true)
}

/// A client and a server session joined by in-memory queues, with a virtual clock.
struct Pair {
    client: Session,
    server: Session,
    now: Instant,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
}

impl Pair {
    fn new() -> Self {
        Self::with(
            SessionConfig::new(Role::Client),
            SessionConfig::new(Role::Server),
        )
    }

    fn with(client: SessionConfig, server: SessionConfig) -> Self {
        let now = Instant::now();
        Self {
            client: Session::new(client, allow_all(), now),
            server: Session::new(server, allow_all(), now),
            now,
            client_events: Vec::new(),
            server_events: Vec::new(),
        }
    }

    /// Moves frames both ways until neither side has anything to send.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.client.poll_transmit() {
                moved = true;
                deliver(&mut self.server, self.now, t);
            }
            while let Some(t) = self.server.poll_transmit() {
                moved = true;
                deliver(&mut self.client, self.now, t);
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push(e);
            }
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
    }

    /// Opens a stream from the server to the client and returns (server id, client id).
    fn open_from_server(&mut self) -> i64 {
        let id = self
            .server
            .open(self.now, Target::new("tcp", "10.43.0.1:443"))
            .unwrap();
        self.drive();
        assert!(self.client_events.contains(&Event::Incoming(id)));
        id
    }
}

fn deliver(to: &mut Session, now: Instant, transmit: Transmit) {
    match transmit {
        Transmit::Message(bytes) => to.handle_binary(now, bytes).unwrap(),
        Transmit::Ping => to.handle_ping(now),
        Transmit::Pong => to.handle_pong(now),
    }
}

fn read_all(session: &mut Session, id: i64) -> (Vec<u8>, Result<ReadOutcome, StreamError>) {
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        match session.read(id, &mut buf) {
            Ok(ReadOutcome::Data(n)) => out.extend_from_slice(&buf[..n]),
            other => return (out, other),
        }
    }
}

/// Everything a session sends, decoded (pings and pongs dropped).
fn sent(session: &mut Session) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(t) = session.poll_transmit() {
        if let Transmit::Message(bytes) = t {
            out.push(Message::decode(bytes).unwrap());
        }
    }
    out
}

#[test]
fn data_both_ways_then_graceful_close() {
    let mut pair = Pair::new();
    let id = pair.open_from_server();
    assert!(
        id < 0 && id % 2 == 0,
        "server ids are negative and even: {id}"
    );
    pair.server.write(id, b"GET /version").unwrap();
    pair.drive();
    assert_eq!(read_all(&mut pair.client, id).0, b"GET /version");
    pair.client.write(id, b"{\"major\":\"1\"}").unwrap();
    pair.client.close(id);
    pair.drive();
    let (data, end) = read_all(&mut pair.server, id);
    assert_eq!(
        data, b"{\"major\":\"1\"}",
        "data sent before the close arrives first"
    );
    assert_eq!(end, Ok(ReadOutcome::Finished));
    assert!(
        pair.server.write(id, b"late").is_err(),
        "no half-close: writing after EOF fails"
    );
}

#[test]
fn close_waits_for_queued_data_and_error_eof_follows_it() {
    let mut pair = Pair::new();
    let id = pair.open_from_server();
    let big = vec![7u8; 100_000];
    assert_eq!(pair.server.write(id, &big).unwrap(), big.len());
    pair.server.close(id);
    let messages = sent(&mut pair.server);
    let last = messages.last().unwrap();
    assert_eq!(last.body, Body::Error(Bytes::from_static(b"EOF")));
    let data: usize = messages
        .iter()
        .map(|m| match &m.body {
            Body::Data(d) => d.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(data, big.len());
    assert!(
        messages[..messages.len() - 1]
            .iter()
            .all(|m| matches!(m.body, Body::Data(_)))
    );
}

#[test]
fn error_is_a_full_close_and_idempotent() {
    let mut pair = Pair::new();
    let id = pair.open_from_server();
    pair.client.write(id, b"partial").unwrap();
    pair.drive();
    let dial_error = Message::new(
        9,
        id,
        Body::Error(Bytes::from_static(
            b"dial tcp 10.43.0.1:443: connect: connection refused",
        )),
    );
    pair.server
        .handle_message(pair.now, dial_error.clone())
        .unwrap();
    // Go sends a second Error EOF and sometimes a third; all ignored, none answered.
    pair.server.handle_message(pair.now, dial_error).unwrap();
    pair.server
        .handle_message(
            pair.now,
            Message::new(10, id, Body::Error(Bytes::from_static(b"EOF"))),
        )
        .unwrap();
    assert!(
        sent(&mut pair.server).is_empty(),
        "no echo, no answer to duplicates"
    );
    let (data, end) = read_all(&mut pair.server, id);
    assert_eq!(data, b"partial", "buffered bytes first");
    assert_eq!(
        end,
        Err(StreamError::Reset(
            "dial tcp 10.43.0.1:443: connect: connection refused".into()
        ))
    );
    assert!(pair.server.write(id, b"x").is_err());
    pair.server.release(id);
    assert_eq!(pair.server.stream_count(), 0, "forgotten once released");
}

#[test]
fn unknown_streams_and_types_never_end_the_session() {
    let mut session = Session::new(
        SessionConfig::new(Role::Server),
        allow_all(),
        Instant::now(),
    );
    let now = Instant::now();
    for body in [
        Body::Error(Bytes::from_static(b"EOF")),
        Body::Pause,
        Body::Resume,
    ] {
        session
            .handle_message(now, Message::new(1, 77, body))
            .unwrap();
    }
    assert!(
        sent(&mut session).is_empty(),
        "Error/Pause/Resume for unknown ids are ignored"
    );
    session
        .handle_message(
            now,
            Message::new(2, 77, Body::Data(Bytes::from_static(b"x"))),
        )
        .unwrap();
    let reply = sent(&mut session);
    assert_eq!(reply.len(), 1);
    assert_eq!(
        reply[0].body,
        Body::Error(Bytes::from_static(b"connection not found server/0/77"))
    );
    session
        .handle_message(
            now,
            Message::new(
                3,
                5,
                Body::Unknown {
                    type_number: 42,
                    payload: Bytes::new(),
                },
            ),
        )
        .unwrap();
    assert!(session.closed().is_none());
    assert_eq!(session.stats().unknown_messages, 1);
}

#[test]
fn pause_stops_the_sender_and_resume_restarts_it() {
    let mut client = SessionConfig::new(Role::Client);
    client.pause_thresholds(64 << 10, 16 << 10);
    let mut pair = Pair::with(client, SessionConfig::new(Role::Server));
    let id = pair.open_from_server();
    let chunk = vec![1u8; 32 << 10];
    // Fill well past the client's pause point without the client application reading.
    for _ in 0..8 {
        pair.server.write(id, &chunk).unwrap();
        pair.drive();
    }
    assert_eq!(pair.client.stats().pauses_sent, 1);
    assert_eq!(pair.server.stats().pauses_received, 1);
    let buffered = pair.client.stream_buffered(id);
    pair.server.write(id, &chunk).unwrap();
    pair.drive();
    assert_eq!(
        pair.client.stream_buffered(id),
        buffered,
        "paused: nothing more arrives"
    );
    let queued = pair.server.send_queued(id);
    assert!(queued >= chunk.len(), "the data waits on the sender");
    // Reading below the resume point sends Resume; the queued data flows again.
    let (data, _) = read_all(&mut pair.client, id);
    assert_eq!(data.len(), buffered);
    pair.drive();
    assert_eq!(pair.server.send_queued(id), 0);
    assert_eq!(read_all(&mut pair.client, id).0.len(), queued);
}

#[test]
fn data_after_pause_is_buffered_up_to_the_hard_bound_then_only_that_stream_resets() {
    let mut config = SessionConfig::new(Role::Client);
    config
        .max_stream_recv_buffer(1 << 20)
        .pause_thresholds(512 << 10, 128 << 10);
    let now = Instant::now();
    let mut client = Session::new(config, allow_all(), now);
    for id in [2, 3] {
        let connect = Message::new(1, id, Body::Connect(Target::new("tcp", "x:1")));
        client.handle_message(now, connect).unwrap();
    }
    let chunk = Bytes::from(vec![0u8; 256 << 10]);
    for i in 0..4 {
        client
            .handle_message(now, Message::new(10 + i, 2, Body::Data(chunk.clone())))
            .unwrap();
    }
    assert_eq!(
        client.stream_buffered(2),
        1 << 20,
        "Go overshoots Pause; this side keeps buffering"
    );
    client
        .handle_message(now, Message::new(20, 2, Body::Data(chunk.clone())))
        .unwrap();
    let out = sent(&mut client);
    assert!(out.iter().any(|m| m.conn_id == 2 && m.body == Body::Pause));
    assert!(
        out.iter()
            .any(|m| m.conn_id == 2 && matches!(m.body, Body::Error(_)))
    );
    assert_eq!(
        client.read_chunk(2, 10),
        Err(StreamError::BufferLimit { limit: 1 << 20 })
    );
    client
        .handle_message(
            now,
            Message::new(21, 3, Body::Data(Bytes::from_static(b"ok"))),
        )
        .unwrap();
    assert_eq!(
        client.read_chunk(3, 10),
        Ok(Chunk::Data(Bytes::from_static(b"ok")))
    );
    assert!(client.closed().is_none());
}

#[test]
fn control_goes_before_data_and_streams_take_fair_turns() {
    let mut pair = Pair::new();
    let bulk = pair.open_from_server();
    let interactive = pair.open_from_server();
    pair.server.write(bulk, &vec![0u8; 200 << 10]).unwrap();
    pair.server.write(interactive, b"ls\n").unwrap();
    pair.server.handle_ping(pair.now);
    let first = pair.server.poll_transmit().unwrap();
    assert_eq!(first, Transmit::Pong, "control first");
    let order: Vec<i64> = sent(&mut pair.server).iter().map(|m| m.conn_id).collect();
    let position = order.iter().position(|&id| id == interactive).unwrap();
    assert!(
        position <= 1,
        "the interactive frame goes at its first turn, not after 200 KiB: {order:?}"
    );
}

#[test]
fn client_pings_every_five_seconds_and_dies_after_sixty_silent() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(5));
    assert_eq!(pair.client.poll_transmit(), Some(Transmit::Ping));
    assert_eq!(pair.server.poll_transmit(), None, "servers never ping");
    pair.server.handle_ping(pair.now);
    assert_eq!(
        pair.server.poll_transmit(),
        Some(Transmit::Pong),
        "every Ping is answered"
    );
    // Kept alive for ten minutes of pings and pongs.
    for _ in 0..120 {
        pair.advance(Duration::from_secs(5));
        pair.drive();
    }
    assert!(pair.client.closed().is_none() && pair.server.closed().is_none());
    // Then the server goes silent.
    for _ in 0..11 {
        pair.advance(Duration::from_secs(5));
        while pair.client.poll_transmit().is_some() {}
    }
    assert!(
        pair.client.closed().is_none(),
        "55 s of silence is still alive"
    );
    pair.advance(Duration::from_secs(5));
    assert_eq!(
        pair.client.closed(),
        Some(&SessionError::KeepaliveTimeout(Duration::from_secs(60)))
    );
}

#[test]
fn sync_spares_young_streams_and_pads_the_peer_range() {
    let mut pair = Pair::new();
    let old = pair.open_from_server();
    pair.advance(Duration::from_secs(59));
    pair.drive();
    let young = pair.open_from_server();
    // Go's race: the server opened `young` but the client's snapshot does not list it.
    pair.advance(Duration::from_secs(1));
    let sync = sent(&mut pair.client)
        .into_iter()
        .find(|m| matches!(m.body, Body::SyncConnections(_)))
        .expect("client syncs at 60 s");
    let Body::SyncConnections(payload) = &sync.body else {
        unreachable!()
    };
    let ids: Vec<i64> = payload
        .chunks(8)
        .map(|w| i64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ascending as signed: {ids:?}"
    );
    assert!(ids.contains(&old) && ids.contains(&young));
    assert!(
        ids.contains(&2) && ids.contains(&17),
        "padding covers Go server ids in flight: {ids:?}"
    );
    // A Go client's snapshot without either stream: only the old one closes.
    let stale = Message::new(1, 0, Body::sync_connections([]));
    pair.server.handle_message(pair.now, stale).unwrap();
    assert!(
        pair.server.open_stream_ids().contains(&young),
        "young stream spared"
    );
    assert!(
        !pair.server.open_stream_ids().contains(&old),
        "old unlisted stream closed"
    );
    assert!(
        sent(&mut pair.server).is_empty(),
        "closed silently, as Go does"
    );
    assert_eq!(read_all(&mut pair.server, old).1, Err(StreamError::Synced));
}

#[test]
fn ids_from_both_sides_never_collide() {
    let mut pair = Pair::new();
    let from_server: Vec<i64> = (0..50).map(|_| pair.open_from_server()).collect();
    let from_client: Vec<i64> = (0..50)
        .map(|_| {
            pair.client
                .open(pair.now, Target::new("tcp", "127.0.0.1:6080"))
                .unwrap()
        })
        .collect();
    pair.drive();
    let mut all: Vec<i64> = from_server.iter().chain(&from_client).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100);
    assert!(
        all.iter().all(|&id| id < 0),
        "never in a Go peer's positive range"
    );
    assert_eq!(pair.client.stream_count(), 100);
    assert_eq!(pair.server.stream_count(), 100);
}

#[test]
fn refused_connect_fails_only_that_stream() {
    let now = Instant::now();
    let mut client = Session::new(
        SessionConfig::new(Role::Client),
        Arc::new(|t| t.proto == "tcp"),
        now,
    );
    let err = client
        .handle_message(
            now,
            Message::new(1, 2, Body::Connect(Target::new("unix", "/etc/shadow"))),
        )
        .unwrap_err();
    assert_eq!(err, ProtocolError::ConnectNotAllowed { conn_id: 2 });
    let reply = sent(&mut client);
    assert_eq!(
        reply[0].body,
        Body::Error(Bytes::from_static(b"connect not allowed"))
    );
    client
        .handle_message(
            now,
            Message::new(2, 3, Body::Connect(Target::new("tcp", "10.0.0.1:6443"))),
        )
        .unwrap();
    assert_eq!(client.poll_event(), Some(Event::Incoming(3)));
    assert_eq!(client.stats().connects_refused, 1);
}

#[test]
fn open_checks_what_a_go_receiver_could_parse() {
    let mut session = Session::new(
        SessionConfig::new(Role::Server),
        allow_all(),
        Instant::now(),
    );
    let now = Instant::now();
    let long = "a".repeat(100);
    assert!(matches!(
        session.open(now, Target::new("tcp", long)),
        Err(OpenError::TargetTooLong { .. })
    ));
    assert!(matches!(
        session.open(now, Target::new("", "x")),
        Err(OpenError::InvalidProto(_))
    ));
    assert!(matches!(
        session.open(now, Target::new("a/b", "x")),
        Err(OpenError::InvalidProto(_))
    ));
    session.close_session(SessionError::Local);
    assert!(matches!(
        session.open(now, Target::new("tcp", "x:1")),
        Err(OpenError::Closed(_))
    ));
}

#[test]
fn tunnel_loss_fails_every_stream_after_its_buffered_bytes() {
    let mut pair = Pair::new();
    let a = pair.open_from_server();
    let b = pair.open_from_server();
    pair.client.write(a, b"last words").unwrap();
    pair.drive();
    pair.server
        .close_session(SessionError::Transport("connection reset".into()));
    let (data, end) = read_all(&mut pair.server, a);
    assert_eq!(data, b"last words");
    assert!(matches!(end, Err(StreamError::Tunnel(_))));
    assert!(matches!(
        read_all(&mut pair.server, b).1,
        Err(StreamError::Tunnel(_))
    ));
    assert_eq!(
        pair.server.poll_transmit(),
        None,
        "nothing is written to a lost websocket"
    );
}

// === random operation sequences ===

#[derive(Debug, Clone)]
enum Op {
    Open {
        from_server: bool,
    },
    Write {
        from_server: bool,
        pick: usize,
        len: usize,
    },
    Read {
        from_server: bool,
        pick: usize,
    },
    Close {
        from_server: bool,
        pick: usize,
    },
    Reset {
        from_server: bool,
        pick: usize,
    },
    Release {
        from_server: bool,
        pick: usize,
    },
    Advance {
        secs: u8,
    },
    Raw {
        to_server: bool,
        bytes: Vec<u8>,
    },
    Deliver {
        steps: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|from_server| Op::Open { from_server }),
        (any::<bool>(), any::<usize>(), 0usize..100_000).prop_map(|(from_server, pick, len)| {
            Op::Write {
                from_server,
                pick,
                len,
            }
        }),
        (any::<bool>(), any::<usize>())
            .prop_map(|(from_server, pick)| Op::Read { from_server, pick }),
        (any::<bool>(), any::<usize>())
            .prop_map(|(from_server, pick)| Op::Close { from_server, pick }),
        (any::<bool>(), any::<usize>())
            .prop_map(|(from_server, pick)| Op::Reset { from_server, pick }),
        (any::<bool>(), any::<usize>())
            .prop_map(|(from_server, pick)| Op::Release { from_server, pick }),
        (0u8..70).prop_map(|secs| Op::Advance { secs }),
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(to_server, bytes)| Op::Raw { to_server, bytes }),
        (0u8..20).prop_map(|steps| Op::Deliver { steps }),
    ]
}

fn pick(ids: &[i64], pick: usize) -> Option<i64> {
    (!ids.is_empty()).then(|| ids[pick % ids.len()])
}

/// Invariants that hold after every operation.
fn check_invariants(session: &Session) {
    let config = session.config();
    for stream in session.streams.values() {
        assert!(
            stream.recv_len <= config.max_stream_recv_buffer,
            "receive bound kept"
        );
        assert!(
            stream.send_len <= config.max_stream_send_buffer,
            "send bound kept"
        );
        assert_eq!(
            stream.recv_len,
            stream.recv.iter().map(Bytes::len).sum::<usize>()
        );
    }
    assert!(session.streams.len() <= config.max_streams);
    assert_eq!(
        session.recv_total,
        session.streams.values().map(|s| s.recv_len).sum::<usize>(),
        "session receive total matches its streams"
    );
    assert!(session.recv_total <= config.max_session_recv_buffer);
    assert_eq!(
        session.control_bytes,
        session.control.iter().map(Control::cost).sum::<usize>()
    );
    let replies: usize = session
        .control
        .iter()
        .filter(|c| c.reply)
        .map(Control::cost)
        .sum();
    assert_eq!(session.reply_bytes, replies);
    assert!(session.reply_bytes <= config.max_control_queue);
    let ids = session.open_stream_ids();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_sequences_never_panic_or_break_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut client = SessionConfig::new(Role::Client);
        client.max_stream_recv_buffer(512 << 10).pause_thresholds(128 << 10, 32 << 10).max_streams(64);
        let mut server = SessionConfig::new(Role::Server);
        server.max_stream_recv_buffer(512 << 10).max_streams(64).max_session_recv_buffer(1 << 20).max_control_queue(4 << 10);
        let mut pair = Pair::with(client, server);
        let mut in_flight: Vec<(bool, Transmit)> = Vec::new();
        for op in ops {
            match op {
                Op::Open { from_server } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    let _ = s.open(pair.now, Target::new("tcp", "127.0.0.1:1"));
                }
                Op::Write { from_server, pick: p, len } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    if let Some(id) = pick(&s.open_stream_ids(), p) {
                        let _ = s.write(id, &vec![1u8; len]);
                    }
                }
                Op::Read { from_server, pick: p } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    if let Some(id) = pick(&s.open_stream_ids(), p) {
                        let _ = s.read(id, &mut [0u8; 50_000]);
                    }
                }
                Op::Close { from_server, pick: p } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    if let Some(id) = pick(&s.open_stream_ids(), p) { s.close(id); }
                }
                Op::Reset { from_server, pick: p } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    if let Some(id) = pick(&s.open_stream_ids(), p) { s.reset(id, "test reset"); }
                }
                Op::Release { from_server, pick: p } => {
                    let s = if from_server { &mut pair.server } else { &mut pair.client };
                    if let Some(id) = pick(&s.open_stream_ids(), p) { s.release(id); }
                }
                Op::Advance { secs } => pair.advance(Duration::from_secs(u64::from(secs))),
                Op::Raw { to_server, bytes } => {
                    let s = if to_server { &mut pair.server } else { &mut pair.client };
                    let _ = s.handle_binary(pair.now, Bytes::from(bytes));
                }
                Op::Deliver { steps } => {
                    for _ in 0..steps {
                        if let Some(t) = pair.client.poll_transmit() { in_flight.push((true, t)); }
                        if let Some(t) = pair.server.poll_transmit() { in_flight.push((false, t)); }
                    }
                    for (to_server, t) in in_flight.drain(..) {
                        let s = if to_server { &mut pair.server } else { &mut pair.client };
                        if let Transmit::Message(bytes) = t {
                            // Messages from one of our sessions always decode.
                            prop_assert!(Message::decode(bytes.clone()).is_ok());
                            let _ = s.handle_binary(pair.now, bytes);
                        } else if t == Transmit::Ping {
                            s.handle_ping(pair.now);
                        } else {
                            s.handle_pong(pair.now);
                        }
                    }
                }
            }
            while pair.client.poll_event().is_some() {}
            while pair.server.poll_event().is_some() {}
            check_invariants(&pair.client);
            check_invariants(&pair.server);
        }
    }
}

// === bounds on what a peer can make a session hold ===

fn server_session(config: SessionConfig, authorizer: Authorizer) -> (Session, Instant) {
    let now = Instant::now();
    (Session::new(config, authorizer, now), now)
}

fn junk_data(i: i64) -> Message {
    Message::new(i, 77, Body::Data(Bytes::from_static(b"x")))
}

#[test]
fn junk_data_from_a_peer_that_never_reads_ends_the_session_at_the_control_bound() {
    let mut config = SessionConfig::new(Role::Server);
    config.max_control_queue(4 << 10);
    let (mut session, now) = server_session(config, allow_all());
    let mut handled = 0;
    while session.closed().is_none() {
        handled += 1;
        session.handle_message(now, junk_data(handled)).unwrap();
        assert!(session.reply_bytes <= 4 << 10);
        assert!(handled < 10_000, "bound never reached");
    }
    println!(
        "closed after {handled} junk Data: {}",
        session.closed().unwrap()
    );
    assert_eq!(
        session.closed(),
        Some(&SessionError::ControlQueueOverflow { limit: 4 << 10 })
    );
    assert_eq!(session.control_backlog(), 0, "queue freed");
    assert_eq!(session.poll_transmit(), None, "nothing more goes out");
}

#[test]
fn refused_connects_from_a_peer_that_never_reads_end_the_session_at_the_control_bound() {
    let mut config = SessionConfig::new(Role::Client);
    config.max_control_queue(4 << 10);
    let (mut session, now) = server_session(config, refuse_all());
    let mut handled = 0;
    while session.closed().is_none() {
        handled += 1;
        let connect = Message::new(
            handled,
            handled + 1,
            Body::Connect(Target::new("tcp", "x:1")),
        );
        assert_eq!(
            session.handle_message(now, connect),
            Err(ProtocolError::ConnectNotAllowed {
                conn_id: handled + 1
            })
        );
        assert!(handled < 10_000, "bound never reached");
    }
    assert_eq!(
        session.closed(),
        Some(&SessionError::ControlQueueOverflow { limit: 4 << 10 })
    );
}

#[test]
fn a_peer_that_reads_its_replies_never_reaches_the_control_bound() {
    let mut config = SessionConfig::new(Role::Server);
    config.max_control_queue(256);
    let (mut session, now) = server_session(config, refuse_all());
    for i in 1..=10_000 {
        session.handle_message(now, junk_data(i)).unwrap();
        let connect = Message::new(i, i + 1, Body::Connect(Target::new("tcp", "x:1")));
        let _ = session.handle_message(now, connect);
        assert_eq!(sent(&mut session).len(), 2);
    }
    assert!(session.closed().is_none());
}

#[test]
fn frames_this_side_originates_do_not_count_against_the_reply_bound() {
    let mut config = SessionConfig::new(Role::Server);
    config.max_control_queue(256).max_streams(1000);
    let (mut session, now) = server_session(config, allow_all());
    for _ in 0..1000 {
        session
            .open(now, Target::new("tcp", "10.43.0.1:443"))
            .unwrap();
    }
    assert!(
        session.control_backlog() > 20_000,
        "a thousand Connects queued"
    );
    session.handle_message(now, junk_data(1)).unwrap();
    assert!(session.closed().is_none());
    assert_eq!(sent(&mut session).len(), 1001);
    assert_eq!(session.control_backlog(), 0);
}

#[test]
fn pings_and_pongs_coalesce_to_one_each() {
    let (mut session, now) = server_session(SessionConfig::new(Role::Server), allow_all());
    for _ in 0..100_000 {
        session.handle_ping(now);
    }
    assert_eq!(session.control_backlog(), PING_COST);
    assert_eq!(session.poll_transmit(), Some(Transmit::Pong));
    assert_eq!(session.poll_transmit(), None);
    session.handle_ping(now);
    assert_eq!(
        session.poll_transmit(),
        Some(Transmit::Pong),
        "queued again once sent"
    );

    let mut client = SessionConfig::new(Role::Client);
    client.keepalive_timeout(Duration::from_secs(3600));
    let (mut session, now) = server_session(client, allow_all());
    for s in 1..=60 {
        session.handle_timeout(now + Duration::from_secs(5 * s));
    }
    let pings = std::iter::from_fn(|| session.poll_transmit())
        .filter(|t| *t == Transmit::Ping)
        .count();
    assert_eq!(
        pings, 1,
        "a peer that reads nothing for 5 minutes gets one Ping queued"
    );
}

#[test]
fn outbound_backlog_says_when_the_driver_should_stop_reading() {
    let mut config = SessionConfig::new(Role::Server);
    config.max_outbound_backlog(1000).max_control_queue(1 << 20);
    let (mut session, now) = server_session(config, allow_all());
    let mut i = 0;
    while !session.outbound_backlogged() {
        i += 1;
        session.handle_message(now, junk_data(i)).unwrap();
    }
    assert!(session.control_backlog() > 1000);
    assert!(session.closed().is_none(), "back-pressure, not loss");
    let replies = sent(&mut session);
    assert_eq!(replies.len() as i64, i, "every reply kept");
    assert!(!session.outbound_backlogged());
}

/// Opens `n` streams from the peer (ids 2, 3, ...) on a client session.
fn client_with_streams(config: SessionConfig, n: i64) -> (Session, Instant) {
    let (mut session, now) = server_session(config, allow_all());
    for id in 2..2 + n {
        let connect = Message::new(id, id, Body::Connect(Target::new("tcp", "x:1")));
        session.handle_message(now, connect).unwrap();
    }
    (session, now)
}

#[test]
fn unread_bytes_across_streams_have_a_session_bound() {
    let mut config = SessionConfig::new(Role::Client);
    config
        .max_stream_recv_buffer(1 << 20)
        .max_session_recv_buffer(2 << 20);
    let (mut session, now) = client_with_streams(config, 8);
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    let mut offered = 0;
    'flood: for round in 0..16 {
        for id in 2..10 {
            let data = Message::new(100 + round * 8 + id, id, Body::Data(chunk.clone()));
            session.handle_message(now, data).unwrap();
            offered += chunk.len();
            if session.closed().is_some() {
                break 'flood;
            }
            assert!(session.recv_buffered() <= 2 << 20);
        }
    }
    println!(
        "offered {offered} bytes; session: {:?}",
        session.closed().unwrap()
    );
    assert_eq!(
        session.closed(),
        Some(&SessionError::RecvBufferLimit { limit: 2 << 20 })
    );
    assert!(
        offered <= (2 << 20) + chunk.len(),
        "ended at the bound, no later"
    );
    // What was buffered stays readable, then the tunnel's end shows.
    let (data, end) = read_all(&mut session, 2);
    assert!(!data.is_empty());
    assert!(matches!(
        end,
        Err(StreamError::Tunnel(SessionError::RecvBufferLimit { .. }))
    ));
}

#[test]
fn past_half_the_session_bound_every_stream_that_gets_data_is_paused() {
    let mut config = SessionConfig::new(Role::Client);
    config
        .max_session_recv_buffer(1 << 20)
        .pause_thresholds(1 << 20, 64 << 10);
    let (mut session, now) = client_with_streams(config, 3);
    let data = |id: i64, conn_id: i64, len: usize| {
        Message::new(id, conn_id, Body::Data(Bytes::from(vec![0u8; len])))
    };
    session.handle_message(now, data(10, 2, 400 << 10)).unwrap();
    assert_eq!(sent(&mut session), [], "400 KiB in all: no pressure");
    session.handle_message(now, data(11, 3, 200 << 10)).unwrap();
    session.handle_message(now, data(12, 4, 10)).unwrap();
    let paused: Vec<(i64, Body)> = sent(&mut session)
        .into_iter()
        .map(|m| (m.conn_id, m.body))
        .collect();
    assert_eq!(
        paused,
        [(3, Body::Pause), (4, Body::Pause)],
        "over half the bound: streams that get Data are paused, however little they hold"
    );
    // A stream that is read resumes: it is not the one holding memory.
    assert_eq!(read_all(&mut session, 4).0.len(), 10);
    let out = sent(&mut session);
    assert_eq!((out[0].conn_id, &out[0].body), (4, &Body::Resume));
    // Reading stream 3 ends the pressure; it resumes and Data pauses no one any more.
    assert_eq!(read_all(&mut session, 3).0.len(), 200 << 10);
    let out = sent(&mut session);
    assert_eq!((out[0].conn_id, &out[0].body), (3, &Body::Resume));
    session.handle_message(now, data(13, 4, 10)).unwrap();
    assert_eq!(sent(&mut session), []);
    assert_eq!(session.recv_buffered(), (400 << 10) + 10);
    assert!(session.closed().is_none());
}

#[test]
fn released_and_reset_streams_give_back_their_share_of_the_session_bound() {
    let (mut session, now) = client_with_streams(SessionConfig::new(Role::Client), 2);
    for id in [2, 3] {
        let data = Message::new(10 + id, id, Body::Data(Bytes::from(vec![1u8; 1000])));
        session.handle_message(now, data).unwrap();
    }
    assert_eq!(session.recv_buffered(), 2000);
    session.release(2);
    assert_eq!(session.recv_buffered(), 1000);
    session.reset(3, "gone");
    assert_eq!(session.recv_buffered(), 0);
}

#[test]
fn a_go_like_peer_within_the_protocol_never_trips_a_bound() {
    // Defaults on both ends, many streams, data both ways, everything read: no bound is near.
    let mut pair = Pair::new();
    let ids: Vec<i64> = (0..50).map(|_| pair.open_from_server()).collect();
    for &id in &ids {
        pair.server.write(id, &vec![5u8; 200 << 10]).unwrap();
    }
    pair.drive();
    for &id in &ids {
        assert_eq!(read_all(&mut pair.client, id).0.len(), 200 << 10);
    }
    assert!(pair.client.closed().is_none() && pair.server.closed().is_none());
    assert_eq!(pair.client.recv_buffered(), 0);
}

// === credit windows (negotiated extension) ===

mod credit {
    use super::*;

    const WINDOW: u32 = 64 << 10;

    fn credit_pair() -> Pair {
        let mut client = SessionConfig::new(Role::Client);
        let mut server = SessionConfig::new(Role::Server);
        client.credit_window(Some(WINDOW));
        server.credit_window(Some(WINDOW));
        Pair::with(client, server)
    }

    fn data_len(messages: &[Message]) -> usize {
        messages
            .iter()
            .map(|m| match &m.body {
                Body::Data(d) => d.len(),
                _ => 0,
            })
            .sum()
    }

    fn deliver_all(to: &mut Session, now: Instant, messages: &[Message]) {
        for m in messages {
            to.handle_message(now, m.clone()).unwrap();
        }
    }

    #[test]
    fn sender_stops_at_the_window_and_resumes_on_grants() {
        let mut pair = credit_pair();
        let id = pair.open_from_server();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(pair.server.write(id, &big).unwrap(), big.len());
        let first = sent(&mut pair.server);
        assert_eq!(
            data_len(&first),
            WINDOW as usize,
            "exactly one window goes out"
        );
        assert!(
            !pair.server.has_transmit(),
            "then nothing until credit comes back"
        );
        deliver_all(&mut pair.client, pair.now, &first);
        assert!(sent(&mut pair.client).is_empty(), "no grant before a read");

        // Reading a quarter of the window grants it back, and that much more goes out.
        let mut buf = vec![0u8; WINDOW as usize / 4];
        assert_eq!(
            pair.client.read(id, &mut buf).unwrap(),
            ReadOutcome::Data(buf.len())
        );
        let grants = sent(&mut pair.client);
        assert_eq!(
            grants.iter().map(|m| &m.body).collect::<Vec<_>>(),
            [&Body::WindowUpdate(WINDOW / 4)]
        );
        deliver_all(&mut pair.server, pair.now, &grants);
        let more = sent(&mut pair.server);
        assert_eq!(data_len(&more), WINDOW as usize / 4);
        deliver_all(&mut pair.client, pair.now, &more);

        // Driven to the end, every byte arrives in order.
        let mut got = buf;
        loop {
            pair.drive();
            let (more, _) = read_all(&mut pair.client, id);
            if more.is_empty() {
                break;
            }
            got.extend_from_slice(&more);
        }
        assert_eq!(got, big);
        assert!(pair.client.stream_buffered(id) <= WINDOW as usize);
    }

    #[test]
    fn data_past_the_window_resets_that_stream_only() {
        let mut pair = credit_pair();
        let id = pair.open_from_server();
        let other = pair.open_from_server();
        let too_much = Message::new(
            77,
            id,
            Body::Data(Bytes::from(vec![1u8; WINDOW as usize + 1])),
        );
        assert_eq!(
            pair.client.handle_message(pair.now, too_much),
            Err(ProtocolError::WindowExceeded {
                conn_id: id,
                len: WINDOW as usize + 1,
                credit: u64::from(WINDOW),
            })
        );
        let replies = sent(&mut pair.client);
        assert!(
            matches!(&replies[..], [Message { conn_id, body: Body::Error(_), .. }] if *conn_id == id)
        );
        assert_eq!(
            read_all(&mut pair.client, id).1,
            Err(StreamError::WindowExceeded { window: WINDOW })
        );
        pair.server.write(other, b"still fine").unwrap();
        pair.drive();
        assert_eq!(read_all(&mut pair.client, other).0, b"still fine");
    }

    #[test]
    fn grants_past_the_credit_limit_are_refused() {
        let mut pair = credit_pair();
        let id = pair.open_from_server();
        let grant = |n| Message::new(5, id, Body::WindowUpdate(n));
        // Up to the limit exactly is fine; one byte more is refused.
        let up_to_limit = u32::try_from(MAX_SEND_CREDIT - u64::from(WINDOW)).unwrap();
        pair.server
            .handle_message(pair.now, grant(up_to_limit))
            .unwrap();
        assert_eq!(
            pair.server.handle_message(pair.now, grant(1)),
            Err(ProtocolError::WindowOverflow { conn_id: id })
        );
    }

    #[test]
    fn interactive_messages_go_first_and_bulk_shrinks_meanwhile() {
        let mut pair = credit_pair();
        let bulk = pair.open_from_server();
        let echo = pair.open_from_server();
        pair.server.write(bulk, &vec![9u8; 200_000]).unwrap();
        // Before any interactive message, bulk goes in full 32 KiB frames.
        let t = pair.server.poll_transmit().unwrap();
        let Transmit::Message(bytes) = t else {
            panic!("{t:?}")
        };
        let first = Message::decode(bytes).unwrap();
        assert!(matches!(&first.body, Body::Data(d) if d.len() == 32 << 10));
        pair.client.handle_message(pair.now, first).unwrap();

        pair.server.write(echo, &[1u8; 1024]).unwrap();
        let next = sent(&mut pair.server);
        assert_eq!(
            next[0].conn_id, echo,
            "the small frame jumps the bulk frames"
        );
        assert!(matches!(&next[0].body, Body::Data(d) if d.len() == 1024));
        // Now bulk frames are cut to INTERACTIVE_CHUNK, and only a quarter of the window is
        // left unread at the peer (32 KiB already were, so nothing more here).
        assert!(next[1..].iter().all(|m| m.conn_id == bulk));
        assert_eq!(data_len(&next[1..]), 0);

        // The client reads the bulk stream: grants arrive, and bulk goes on in small frames
        // with at most a quarter window unread.
        deliver_all(&mut pair.client, pair.now, &next);
        let mut buf = vec![0u8; 1 << 20];
        let _ = pair.client.read(bulk, &mut buf).unwrap();
        let grants = sent(&mut pair.client);
        deliver_all(&mut pair.server, pair.now, &grants);
        let more = sent(&mut pair.server);
        assert!(!more.is_empty());
        assert!(
            more.iter()
                .all(|m| matches!(&m.body, Body::Data(d) if d.len() <= INTERACTIVE_CHUNK))
        );
        assert!(data_len(&more) <= WINDOW as usize / 4);
    }

    #[test]
    fn plain_sessions_never_send_grants_and_ignore_them() {
        let mut pair = Pair::new();
        let id = pair.open_from_server();
        let taken = pair.server.write(id, &vec![3u8; 300_000]).unwrap();
        let data = sent(&mut pair.server);
        assert_eq!(
            data_len(&data),
            taken,
            "no window: the whole send queue goes"
        );
        deliver_all(&mut pair.client, pair.now, &data);
        let _ = read_all(&mut pair.client, id);
        assert!(
            sent(&mut pair.client)
                .iter()
                .all(|m| !matches!(m.body, Body::WindowUpdate(_)))
        );
        pair.client
            .handle_message(pair.now, Message::new(1, id, Body::WindowUpdate(5)))
            .unwrap();
        assert_eq!(pair.client.stats().unknown_messages, 1);
    }

    proptest! {
        /// Random writes and reads on two streams with windows: every byte arrives in order
        /// and no receiver ever holds more than a window unread per stream.
        #[test]
        fn windows_hold_and_bytes_arrive(ops in proptest::collection::vec((0u8..4, 1usize..50_000), 1..60)) {
            let mut pair = credit_pair();
            let ids = [pair.open_from_server(), pair.open_from_server()];
            let mut written = [Vec::new(), Vec::new()];
            let mut read = [Vec::new(), Vec::new()];
            let mut counter = 0u8;
            for (op, n) in ops {
                let s = usize::from(op % 2);
                if op < 2 {
                    let data: Vec<u8> = (0..n).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                    let taken = pair.server.write(ids[s], &data).unwrap();
                    written[s].extend_from_slice(&data[..taken]);
                } else {
                    let mut buf = vec![0u8; n];
                    if let Ok(ReadOutcome::Data(k)) = pair.client.read(ids[s], &mut buf) {
                        read[s].extend_from_slice(&buf[..k]);
                    }
                }
                pair.drive();
                for id in ids {
                    prop_assert!(pair.client.stream_buffered(id) <= WINDOW as usize);
                }
            }
            for s in 0..2 {
                loop {
                    pair.drive();
                    let (more, _) = read_all(&mut pair.client, ids[s]);
                    if more.is_empty() { break; }
                    read[s].extend_from_slice(&more);
                }
                prop_assert_eq!(&read[s], &written[s]);
            }
        }
    }
}
