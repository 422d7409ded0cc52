//! Random operations on a client and a server session joined by an in-memory link, with raw
//! bytes injected on either side: no panic, and the bounds hold after every step. Half the
//! inputs run both sessions with credit windows (the negotiated extension), where no stream
//! may ever hold more than a window unread, whatever the injected bytes say.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tunnel_proto::mux::{Session, Transmit};
use tunnel_proto::wire::Target;
use tunnel_proto::{Role, SessionConfig};

#[derive(Debug, Arbitrary)]
enum Op {
    Open { server: bool, proto: u8 },
    Write { server: bool, pick: u16, len: u16 },
    Read { server: bool, pick: u16, len: u16 },
    Close { server: bool, pick: u16 },
    Reset { server: bool, pick: u16 },
    Release { server: bool, pick: u16 },
    Advance { secs: u8 },
    Raw { server: bool, bytes: Vec<u8> },
    Text { server: bool },
    Ping { server: bool },
    Deliver { frames: u8 },
    CloseSession { server: bool },
}

#[derive(Debug, Arbitrary)]
struct Input {
    credit_windows: bool,
    ops: Vec<Op>,
}

const MAX_RECV: usize = 256 << 10;
const MAX_STREAMS: usize = 32;
const WINDOW: u32 = 32 << 10;

fn session(role: Role, now: Instant, credit_windows: bool) -> Session {
    let mut config = SessionConfig::new(role);
    config
        .max_stream_recv_buffer(MAX_RECV)
        .pause_thresholds(64 << 10, 16 << 10)
        .max_streams(MAX_STREAMS)
        .credit_window(credit_windows.then_some(WINDOW));
    Session::new(config, Arc::new(|t: &Target| t.proto != "unix"), now)
}

fn pick(session: &Session, pick: u16) -> Option<i64> {
    let ids = session.open_stream_ids();
    (!ids.is_empty()).then(|| ids[usize::from(pick) % ids.len()])
}

fn check(session: &Session, credit_windows: bool) {
    assert!(session.stream_count() <= MAX_STREAMS);
    let bound = if credit_windows { WINDOW as usize } else { MAX_RECV };
    for id in session.open_stream_ids() {
        assert!(session.stream_buffered(id) <= bound);
    }
}

fuzz_target!(|input: Input| {
    let Input { credit_windows, ops } = input;
    let mut now = Instant::now();
    let mut sides = [
        session(Role::Client, now, credit_windows),
        session(Role::Server, now, credit_windows),
    ];
    for op in ops.into_iter().take(256) {
        match op {
            Op::Open { server, proto } => {
                let proto = ["tcp", "unix", "npipe"][usize::from(proto) % 3];
                let _ = sides[usize::from(server)].open(now, Target::new(proto, "127.0.0.1:1"));
            }
            Op::Write { server, pick: p, len } => {
                let s = &mut sides[usize::from(server)];
                if let Some(id) = pick(s, p) {
                    let _ = s.write(id, &vec![0xa5; usize::from(len)]);
                }
            }
            Op::Read { server, pick: p, len } => {
                let s = &mut sides[usize::from(server)];
                if let Some(id) = pick(s, p) {
                    let _ = s.read(id, &mut vec![0; usize::from(len)]);
                }
            }
            Op::Close { server, pick: p } => {
                let s = &mut sides[usize::from(server)];
                if let Some(id) = pick(s, p) {
                    s.close(id);
                }
            }
            Op::Reset { server, pick: p } => {
                let s = &mut sides[usize::from(server)];
                if let Some(id) = pick(s, p) {
                    s.reset(id, "fuzz");
                }
            }
            Op::Release { server, pick: p } => {
                let s = &mut sides[usize::from(server)];
                if let Some(id) = pick(s, p) {
                    s.release(id);
                }
            }
            Op::Advance { secs } => {
                now += Duration::from_secs(u64::from(secs));
                for s in &mut sides {
                    s.handle_timeout(now);
                }
            }
            Op::Raw { server, bytes } => {
                let _ = sides[usize::from(server)].handle_binary(now, Bytes::from(bytes));
            }
            Op::Text { server } => {
                let _ = sides[usize::from(server)].handle_text(now);
            }
            Op::Ping { server } => sides[usize::from(server)].handle_ping(now),
            Op::Deliver { frames } => {
                for _ in 0..frames {
                    for from in 0..2 {
                        let Some(t) = sides[from].poll_transmit() else { continue };
                        let to = &mut sides[1 - from];
                        match t {
                            Transmit::Message(bytes) => {
                                let _ = to.handle_binary(now, bytes);
                            }
                            Transmit::Ping => to.handle_ping(now),
                            Transmit::Pong => to.handle_pong(now),
                        }
                    }
                }
            }
            Op::CloseSession { server } => {
                sides[usize::from(server)].close_session(tunnel_proto::mux::SessionError::Local);
            }
        }
        for s in &mut sides {
            while s.poll_event().is_some() {}
            check(s, credit_windows);
        }
    }
});
