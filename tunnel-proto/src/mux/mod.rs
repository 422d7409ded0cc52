//! The session core: one remotedialer session as a state machine, with no I/O, no clock and no
//! tasks (quinn-proto's shape).
//!
//! Inputs are what arrived on the websocket ([`Session::handle_binary`], [`Session::handle_ping`],
//! ...) and the time ([`Session::handle_timeout`]). Commands come from the application
//! ([`Session::open`], [`Session::write`], [`Session::read`], [`Session::close`]). Outputs are
//! polled: [`Session::poll_transmit`] gives the next websocket frame to send, control first and
//! then Data in fair turns; [`Session::poll_event`] says which streams to wake;
//! [`Session::poll_timeout`] says when to call [`Session::handle_timeout`].
//!
//! ```text
//!  websocket in ──handle_*──►┌──────────────┐──poll_transmit──► websocket out
//!  clock ───handle_timeout──►│   Session    │──poll_event─────► wake readers/writers
//!  app ──open/read/write/───►│ streams, DRR │──poll_timeout───► next timer
//!        close               └──────────────┘
//! ```
//!
//! The rules it keeps (spec §2–§4): Error is a full close, idempotent, never echoed; Pause and
//! Resume are honoured but Data after Pause is buffered up to a hard bound, past which only that
//! stream is reset; unknown types and unknown streams never end the session; stream ids are
//! negative so they never meet a Go peer's; SyncConnections spares young streams.
//!
//! Every buffer the peer can grow has a bound (see [`crate::config`]). Replies to the peer's
//! input (Errors for junk Data, refused Connects) are counted while they wait to be sent: a
//! peer that keeps provoking them without reading them loses the session with
//! [`SessionError::ControlQueueOverflow`], because nothing else would stop it and stalling it
//! would only hold the session hostage. Pings and Pongs coalesce to one of each (RFC 6455
//! §5.5.3 lets a Pong answer only the latest Ping), so a Ping flood holds nothing. Unread bytes
//! are bounded per stream (that stream is reset) and across the session: past half the
//! session bound every stream that receives Data is paused, and past the bound the session
//! ends with [`SessionError::RecvBufferLimit`]. Only a peer that ignores Pause gets that far.

mod error;
mod ids;
mod keepalive;
mod schedule;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use error::{OpenError, ProtocolError, SessionError, StreamError};
pub use stream::Origin;

use crate::config::{Role, SessionConfig};
use crate::wire::{self, Body, DecodeError, EOF_TEXT, Message, Target};
use ids::IdAllocator;
use keepalive::{Due, Timers};
use schedule::Scheduler;
use stream::{RecvEnd, SendEnd, Stream};

/// Decides whether the peer may open a stream to a target. Called for every received Connect.
pub type Authorizer = Arc<dyn Fn(&Target) -> bool + Send + Sync>;

/// An authorizer that refuses everything: what remotedialer does when none is set.
pub fn refuse_all() -> Authorizer {
    Arc::new(|_| false)
}

/// A websocket frame the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// One binary message.
    Message(Bytes),
    /// A websocket Ping with an empty payload.
    Ping,
    /// A websocket Pong with an empty payload (Go sends empty Pongs whatever the Ping held).
    Pong,
}

/// Something the application side must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream and the authorizer allowed it: accept it with this id.
    Incoming(i64),
    /// A stream that had nothing to read has data, or has ended.
    Readable(i64),
    /// A stream whose send queue was full has room, or has ended.
    Writable(i64),
    /// A peer replica announced a client session (server sessions, peering).
    ClientAdded(Announcement),
    /// A peer replica announced that a client session left.
    ClientRemoved(Announcement),
}

/// An AddClient/RemoveClient payload, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The client key, byte for byte (Go strings need not be UTF-8).
    pub client_key: Bytes,
    /// The announcing replica's session number.
    pub session_key: i64,
}

impl Announcement {
    /// Parses `clientKey/sessionKey` as Go's `addRemoteClient` does (split at the first `/`,
    /// then `strconv.Atoi` on the rest).
    pub fn parse(payload: &Bytes) -> Result<Self, ProtocolError> {
        let invalid = |reason: String| ProtocolError::InvalidRemoteSession {
            payload: String::from_utf8_lossy(payload).into_owned(),
            reason,
        };
        let Some(slash) = payload.iter().position(|&b| b == b'/') else {
            return Err(invalid("not / separated".into()));
        };
        let number = String::from_utf8_lossy(&payload[slash + 1..]);
        let session_key = number.parse::<i64>().map_err(|e| {
            let why = match e.kind() {
                std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                    "value out of range"
                }
                _ => "invalid syntax",
            };
            invalid(format!("strconv.Atoi: parsing {number:?}: {why}"))
        })?;
        Ok(Self {
            client_key: payload.slice(..slash),
            session_key,
        })
    }

    /// The client key as text (lossy for keys that are not UTF-8).
    pub fn client_key_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.client_key)
    }

    /// The wire payload.
    pub fn to_payload(&self) -> Bytes {
        let mut payload = self.client_key.to_vec();
        payload.extend_from_slice(format!("/{}", self.session_key).as_bytes());
        payload.into()
    }
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing yet; an [`Event::Readable`] follows when there is.
    Blocked,
    /// The stream was closed gracefully and everything has been read.
    Finished,
}

/// What [`Session::read_chunk`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Received bytes, without copying.
    Data(Bytes),
    /// Nothing yet; an [`Event::Readable`] follows when there is.
    Blocked,
    /// The stream was closed gracefully and everything has been read.
    Finished,
}

/// Counters of one session, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Binary messages received.
    pub messages_in: u64,
    /// Frames handed to the driver (messages, pings and pongs).
    pub frames_out: u64,
    /// Data payload bytes received.
    pub data_bytes_in: u64,
    /// Data payload bytes sent.
    pub data_bytes_out: u64,
    /// Streams this side opened.
    pub streams_opened_local: u64,
    /// Streams the peer opened and the authorizer allowed.
    pub streams_opened_remote: u64,
    /// Connects the authorizer refused.
    pub connects_refused: u64,
    /// Messages that broke the protocol (dropped; see [`ProtocolError`]).
    pub protocol_errors: u64,
    /// Messages of types this version does not know (ignored).
    pub unknown_messages: u64,
    /// Streams reset because the peer overran their receive bound.
    pub buffer_limit_resets: u64,
    /// Pause messages sent.
    pub pauses_sent: u64,
    /// Pause messages received.
    pub pauses_received: u64,
    /// Streams closed by a received SyncConnections.
    pub synced_closes: u64,
    /// WindowUpdates sent (credit windows only; always 0 with a Go peer).
    pub window_updates_sent: u64,
    /// WindowUpdates received and applied (credit windows only).
    pub window_updates_received: u64,
}

/// A frame in the control queue.
#[derive(Debug)]
struct Control {
    transmit: Transmit,
    /// Counted against `max_control_queue`: sent in answer to the peer's input.
    reply: bool,
}

impl Control {
    /// What the frame weighs in the queue: its bytes, or a nominal size for Ping and Pong.
    fn cost(&self) -> usize {
        match &self.transmit {
            Transmit::Message(bytes) => bytes.len(),
            Transmit::Ping | Transmit::Pong => PING_COST,
        }
    }
}

/// Queue weight of a Ping or Pong (an empty websocket control frame is 2 bytes on the wire;
/// this counts the bookkeeping too).
const PING_COST: usize = 16;

/// Whether a frame is an answer to the peer's input (counted against `max_control_queue`) or
/// something this side originates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Peer,
    Local,
}

/// One remotedialer session. See the module docs for the call pattern.
pub struct Session {
    config: SessionConfig,
    authorizer: Authorizer,
    streams: HashMap<i64, Stream>,
    ids: IdAllocator,
    scheduler: Scheduler,
    control: VecDeque<Control>,
    /// Bytes of everything in `control`.
    control_bytes: usize,
    /// Bytes of the replies in `control` (bounded by `max_control_queue`).
    reply_bytes: usize,
    /// A Pong (resp. Ping) waits in `control`: another would say nothing new.
    pong_queued: bool,
    ping_queued: bool,
    /// Unread bytes of all streams (bounded by `max_session_recv_buffer`).
    recv_total: usize,
    events: VecDeque<Event>,
    timers: Timers,
    next_message_id: i64,
    /// The highest stream id the peer has allocated, to pad SyncConnections (spec §4.3).
    max_remote_id: i64,
    /// Credit windows: Data bytes still to send before the last interactive message stops
    /// counting as recent (see [`INTERACTIVE_SPELL`]).
    interactive_spell: usize,
    closed: Option<SessionError>,
    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.config.role)
            .field("streams", &self.streams.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// How many ids on each side of the peer's highest a client adds to SyncConnections. A Go
/// server allocates ids 2, 3, 4, ... but writes concurrent Connects out of order, so ids below
/// the highest seen may still be in flight, as may the next ones; a Go receiver closes every
/// stream of its own that the list leaves out (remotedialer#88). Extra ids are harmless to it.
/// 2 x 1024 ids is 16 KiB per sync (once a minute); a stale Go stream further back than the
/// window is still collected.
const SYNC_WINDOW: i64 = 1024;

/// Credit windows: a Data frame of at most this many bytes that empties its stream's queue is
/// an interactive message (a keystroke, a request, an echo), as opposed to a piece of a bulk
/// transfer, which has more queued behind it.
pub const INTERACTIVE_MESSAGE: usize = 4 << 10;
/// Credit windows: an interactive stream counts as active until this many bytes of other Data
/// have gone out after its last message (4 MiB: a few ms of bulk on loopback, many round trips'
/// worth).
pub const INTERACTIVE_SPELL: usize = 4 << 20;
/// Credit windows: the largest Data frame while an interactive stream is active, so that an
/// interactive message waits behind at most this much of a bulk frame.
pub const INTERACTIVE_CHUNK: usize = 8 << 10;
/// Credit windows: the most credit a stream may accumulate (4 GiB); a WindowUpdate past it is
/// a protocol error and is dropped.
pub const MAX_SEND_CREDIT: u64 = 1 << 32;

// === impl Session: construction and state ===

impl Session {
    /// A new session, started at `now`.
    pub fn new(config: SessionConfig, authorizer: Authorizer, now: Instant) -> Self {
        let timers = Timers::new(
            now,
            config.keepalive_interval,
            config.keepalive_timeout,
            config.sync_interval,
        );
        Self {
            ids: IdAllocator::new(config.role),
            config,
            authorizer,
            streams: HashMap::new(),
            scheduler: Scheduler::default(),
            control: VecDeque::new(),
            control_bytes: 0,
            reply_bytes: 0,
            pong_queued: false,
            ping_queued: false,
            recv_total: 0,
            events: VecDeque::new(),
            timers,
            next_message_id: 0,
            max_remote_id: 1,
            interactive_spell: 0,
            closed: None,
            stats: Stats::default(),
        }
    }

    /// Replaces the authorizer for Connects received from now on.
    pub fn set_authorizer(&mut self, authorizer: Authorizer) {
        self.authorizer = authorizer;
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Why the session ended, once it has.
    pub fn closed(&self) -> Option<&SessionError> {
        self.closed.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Streams in the table (open, closing, or closed but still held by the application).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Ids of the streams open on the wire, ascending.
    pub fn open_stream_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.protocol_closed())
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// A stream's target and who opened it.
    pub fn stream_target(&self, id: i64) -> Option<(&Target, Origin)> {
        self.streams.get(&id).map(|s| (&s.target, s.origin))
    }

    /// Unread bytes buffered for a stream.
    pub fn stream_buffered(&self, id: i64) -> usize {
        self.streams.get(&id).map_or(0, |s| s.recv_len)
    }

    /// Unread bytes buffered across all streams (bounded by
    /// [`SessionConfig::max_session_recv_buffer`]).
    pub fn recv_buffered(&self) -> usize {
        self.recv_total
    }

    /// Bytes of control frames waiting to be sent (the driver stops reading while this is
    /// over [`SessionConfig::max_outbound_backlog`]).
    pub fn control_backlog(&self) -> usize {
        self.control_bytes
    }

    /// Whether the control backlog is over [`SessionConfig::max_outbound_backlog`]: the
    /// driver should not read more from the peer until some of it has gone out.
    pub fn outbound_backlogged(&self) -> bool {
        self.control_bytes > self.config.max_outbound_backlog
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.timers.last_heard()
    }

    /// The credit window, when credit windows are on (0 when off).
    fn window(&self) -> u32 {
        self.config.credit_window.unwrap_or(0)
    }

    fn message_id(&mut self) -> i64 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    /// Queues a message this side originates (bounded by the stream table, not counted).
    fn queue_message(&mut self, conn_id: i64, body: Body) {
        self.queue_control(conn_id, body, Cause::Local);
    }

    fn queue_control(&mut self, conn_id: i64, body: Body, cause: Cause) {
        if self.closed.is_some() {
            return;
        }
        let id = self.message_id();
        let bytes = Message::new(id, conn_id, body).to_bytes();
        let len = bytes.len();
        let reply = cause == Cause::Peer;
        if reply {
            let limit = self.config.max_control_queue;
            if self.reply_bytes + len > limit {
                self.close_session(SessionError::ControlQueueOverflow { limit });
                return;
            }
            self.reply_bytes += len;
        }
        self.control_bytes += len;
        self.control.push_back(Control {
            transmit: Transmit::Message(bytes),
            reply,
        });
    }

    /// Queues a Ping (`pong` false) or Pong ahead of everything, unless one is already
    /// waiting: it says all another would.
    fn queue_ping_pong(&mut self, pong: bool) {
        let (queued, transmit) = if pong {
            (&mut self.pong_queued, Transmit::Pong)
        } else {
            (&mut self.ping_queued, Transmit::Ping)
        };
        if *queued || self.closed.is_some() {
            return;
        }
        *queued = true;
        self.control_bytes += PING_COST;
        self.control.push_front(Control {
            transmit,
            reply: false,
        });
    }

    fn queue_error(&mut self, conn_id: i64, text: &str, cause: Cause) {
        let text = wire::cap_error_text(text);
        self.queue_control(
            conn_id,
            Body::Error(Bytes::copy_from_slice(text.as_bytes())),
            cause,
        );
    }

    fn reap(&mut self, id: i64) {
        if self.streams.get(&id).is_some_and(Stream::reapable) {
            self.streams.remove(&id);
        }
    }

    /// Ends a stream in both directions. `send_error` is the Error text to send, if any, and
    /// whose doing it is; the receive side ends with `recv` unless it already ended.
    fn end_stream(
        &mut self,
        id: i64,
        recv: RecvEnd,
        send_error: Option<(&str, Cause)>,
        discard_recv: bool,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.discard_send();
        stream.send_end = SendEnd::Closed;
        if matches!(stream.recv_end, RecvEnd::Open) {
            stream.recv_end = recv;
        }
        if discard_recv {
            self.recv_total -= stream.discard_recv();
        }
        self.events.push_back(Event::Readable(id));
        self.events.push_back(Event::Writable(id));
        if let Some((text, cause)) = send_error {
            self.queue_error(id, text, cause);
        }
        self.reap(id);
    }
}

// === impl Session: input from the websocket ===

impl Session {
    /// Handles one binary websocket message.
    ///
    /// An `Err` is a protocol violation by the peer. The message was dropped (with an Error on
    /// its stream where one is meant) and the session goes on; log and count it.
    pub fn handle_binary(&mut self, now: Instant, bytes: Bytes) -> Result<(), ProtocolError> {
        self.timers.heard(now);
        self.stats.messages_in += 1;
        if self.closed.is_some() {
            return Ok(());
        }
        let message = match Message::decode(bytes.clone()) {
            Ok(message) => message,
            Err(err) => {
                self.stats.protocol_errors += 1;
                if err == DecodeError::ConnectAddress {
                    // The header decoded, so the stream is known: fail only that stream.
                    if let Some(conn_id) = header_conn_id(&bytes) {
                        self.queue_error(conn_id, &err.to_string(), Cause::Peer);
                    }
                }
                return Err(err.into());
            }
        };
        let result = self.handle_message(now, message);
        if result.is_err() {
            self.stats.protocol_errors += 1;
        }
        result
    }

    /// Handles a text websocket message: always a violation (Go ends the session on it); here it
    /// is dropped.
    pub fn handle_text(&mut self, now: Instant) -> ProtocolError {
        self.timers.heard(now);
        self.stats.protocol_errors += 1;
        ProtocolError::WrongMessageType
    }

    /// Handles a websocket Ping: a Pong is queued ahead of Data, unless one is already
    /// waiting (it answers this Ping too).
    pub fn handle_ping(&mut self, now: Instant) {
        self.timers.heard(now);
        self.queue_ping_pong(true);
    }

    /// Handles a websocket Pong.
    pub fn handle_pong(&mut self, now: Instant) {
        self.timers.heard(now);
    }

    /// Handles one decoded message.
    pub fn handle_message(&mut self, now: Instant, message: Message) -> Result<(), ProtocolError> {
        let conn_id = message.conn_id;
        match message.body {
            Body::Data(payload) => return self.recv_data(conn_id, payload),
            Body::Connect(target) => return self.recv_connect(now, conn_id, target),
            Body::Error(text) => self.recv_error(conn_id, &text),
            Body::Pause => self.recv_pause(conn_id, true),
            Body::Resume => self.recv_pause(conn_id, false),
            Body::AddClient(payload) => {
                // Go client sessions ignore AddClient entirely; server sessions parse it.
                if self.config.role == Role::Server {
                    let announcement = Announcement::parse(&payload)?;
                    self.events.push_back(Event::ClientAdded(announcement));
                }
            }
            Body::RemoveClient(payload) => {
                let announcement = Announcement::parse(&payload)?;
                if self.config.role == Role::Server {
                    self.events.push_back(Event::ClientRemoved(announcement));
                }
            }
            Body::SyncConnections(payload) => return self.recv_sync(now, conn_id, &payload),
            // Without credit windows it is a type this side does not speak, as before.
            Body::WindowUpdate(_) if self.config.credit_window.is_none() => {
                self.stats.unknown_messages += 1
            }
            Body::WindowUpdate(increment) => return self.recv_window_update(conn_id, increment),
            Body::Unknown { .. } => self.stats.unknown_messages += 1,
        }
        Ok(())
    }

    fn recv_connect(
        &mut self,
        now: Instant,
        conn_id: i64,
        target: Target,
    ) -> Result<(), ProtocolError> {
        if !(self.authorizer)(&target) {
            self.stats.connects_refused += 1;
            self.queue_error(conn_id, "connect not allowed", Cause::Peer);
            return Err(ProtocolError::ConnectNotAllowed { conn_id });
        }
        if self.streams.contains_key(&conn_id) {
            // Go would silently replace the stream and orphan the old one. Neither side can
            // tell the two apart any more, so end both: ours locally, the new one on the wire.
            self.end_stream(
                conn_id,
                RecvEnd::Failed(StreamError::Replaced),
                Some(("stream id in use", Cause::Peer)),
                false,
            );
            return Ok(());
        }
        if self.streams.len() >= self.config.max_streams {
            self.queue_error(conn_id, "too many streams", Cause::Peer);
            return Ok(());
        }
        self.max_remote_id = self.max_remote_id.max(conn_id);
        let window = self.window();
        self.streams
            .insert(conn_id, Stream::new(Origin::Remote, target, now, window));
        self.stats.streams_opened_remote += 1;
        self.events.push_back(Event::Incoming(conn_id));
        Ok(())
    }

    fn recv_data(&mut self, conn_id: i64, payload: Bytes) -> Result<(), ProtocolError> {
        let len = payload.len();
        self.stats.data_bytes_in += len as u64;
        let limit = self.config.max_stream_recv_buffer;
        let Some(stream) = self.streams.get_mut(&conn_id) else {
            // Go answers so; its receiver ignores Errors for unknown streams, so this is safe.
            let who = match self.config.role {
                Role::Client => "client",
                Role::Server => "server",
            };
            let text = format!("connection not found {who}/0/{conn_id}");
            self.queue_error(conn_id, &text, Cause::Peer);
            return Ok(());
        };
        if !matches!(stream.recv_end, RecvEnd::Open) || !stream.held || len == 0 {
            // Closed here already (the peer's writer raced our Error), or nobody will read it.
            return Ok(());
        }
        if let Some(window) = self.config.credit_window {
            if len as u64 > stream.recv_credit {
                let violation = ProtocolError::WindowExceeded {
                    conn_id,
                    len,
                    credit: stream.recv_credit,
                };
                let error = StreamError::WindowExceeded { window };
                let text = error.to_string();
                let send = Some((text.as_str(), Cause::Peer));
                self.end_stream(conn_id, RecvEnd::Failed(error), send, true);
                return Err(violation);
            }
            stream.recv_credit -= len as u64;
        }
        if stream.recv_len + len > limit {
            self.stats.buffer_limit_resets += 1;
            let error = StreamError::BufferLimit { limit };
            let text = error.to_string();
            let send = Some((text.as_str(), Cause::Peer));
            self.end_stream(conn_id, RecvEnd::Failed(error), send, true);
            return Ok(());
        }
        let session_limit = self.config.max_session_recv_buffer;
        if self.recv_total + len > session_limit {
            self.close_session(SessionError::RecvBufferLimit {
                limit: session_limit,
            });
            return Ok(());
        }
        stream.recv.push_back(payload);
        stream.recv_len += len;
        self.recv_total += len;
        if stream.reader_waiting {
            stream.reader_waiting = false;
            self.events.push_back(Event::Readable(conn_id));
        }
        // Past half the session bound, every stream that gets Data is paused, however little
        // it holds: the unread ones stay paused, the read ones resume on their next read.
        let pressure = self.recv_total > session_limit / 2;
        if (stream.recv_len > self.config.pause_threshold || pressure) && !stream.we_paused_peer {
            stream.we_paused_peer = true;
            self.stats.pauses_sent += 1;
            self.queue_message(conn_id, Body::Pause);
        }
        Ok(())
    }

    fn recv_error(&mut self, conn_id: i64, text: &[u8]) {
        let Some(stream) = self.streams.get(&conn_id) else {
            return; // Duplicate or unknown: Go sends several per close; never answer them.
        };
        if stream.protocol_closed() {
            return;
        }
        let end = if text == EOF_TEXT {
            RecvEnd::Finished
        } else {
            let text = String::from_utf8_lossy(text).into_owned();
            if text == "connect not allowed" {
                RecvEnd::Failed(StreamError::Refused(text))
            } else {
                RecvEnd::Failed(StreamError::Reset(text))
            }
        };
        self.end_stream(conn_id, end, None, false);
    }

    fn recv_pause(&mut self, conn_id: i64, pause: bool) {
        let Some(stream) = self.streams.get_mut(&conn_id) else {
            return;
        };
        stream.peer_paused_us = pause;
        if pause {
            self.stats.pauses_received += 1;
        } else if stream.next_frame_len().is_some() {
            self.scheduler.activate(conn_id);
        }
    }

    fn recv_window_update(&mut self, conn_id: i64, increment: u32) -> Result<(), ProtocolError> {
        let Some(stream) = self.streams.get_mut(&conn_id) else {
            return Ok(()); // A stream that closed meanwhile: nothing to do.
        };
        let credit = stream.send_credit + u64::from(increment);
        if credit > MAX_SEND_CREDIT {
            return Err(ProtocolError::WindowOverflow { conn_id });
        }
        stream.send_credit = credit;
        self.stats.window_updates_received += 1;
        if stream.next_frame_len().is_some() {
            self.scheduler.activate(conn_id);
        }
        Ok(())
    }

    fn recv_sync(
        &mut self,
        now: Instant,
        conn_id: i64,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        if payload.len() % 8 != 0 {
            return Err(ProtocolError::SyncFormat);
        }
        if conn_id != 0 {
            return Ok(()); // Go only acts on session-level syncs.
        }
        // Sorted here rather than trusting the sender: an unsorted list makes Go close listed
        // streams (spec §2.4); this side keeps every listed stream whatever the order.
        let mut listed: Vec<i64> = payload
            .chunks_exact(8)
            .map(|word| i64::from_le_bytes(word.try_into().expect("chunks of 8")))
            .collect();
        listed.sort_unstable();
        let grace = self.config.sync_grace;
        let stale: Vec<i64> = self
            .streams
            .iter()
            .filter(|(id, s)| {
                !s.protocol_closed()
                    && now.saturating_duration_since(s.created) >= grace
                    && listed.binary_search(id).is_err()
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            // Go closes these without sending anything; so does this side.
            self.stats.synced_closes += 1;
            self.end_stream(id, RecvEnd::Failed(StreamError::Synced), None, false);
        }
        Ok(())
    }
}

// === impl Session: timers ===

impl Session {
    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.closed.is_none().then(|| self.timers.next_deadline())
    }

    /// Runs the timers due at `now`: pings, SyncConnections, and the peer's silence deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        let mut due = Vec::new();
        self.timers.poll(now, |d| due.push(d));
        for d in due {
            match d {
                Due::Dead => {
                    let timeout = self.timers.timeout();
                    self.close_session(SessionError::KeepaliveTimeout(timeout));
                }
                Due::Ping => self.queue_ping_pong(false),
                Due::Sync => self.queue_sync(),
            }
        }
    }

    fn queue_sync(&mut self) {
        let mut ids = self.open_stream_ids();
        let low = self.max_remote_id.saturating_sub(SYNC_WINDOW).max(1);
        let high = self.max_remote_id.saturating_add(SYNC_WINDOW);
        ids.extend(low..=high);
        self.queue_message(0, Body::sync_connections(ids));
    }
}

// === impl Session: commands from the application ===

impl Session {
    /// Opens a stream to `target` and returns its id. The Connect goes out ahead of any Data,
    /// and Data may be written at once: the protocol has no acknowledgement, so a refused or
    /// failed dial shows up as an error on the first read.
    pub fn open(&mut self, now: Instant, target: Target) -> Result<i64, OpenError> {
        if let Some(err) = &self.closed {
            return Err(OpenError::Closed(err.clone()));
        }
        if target.proto.is_empty() || target.proto.contains('/') {
            return Err(OpenError::InvalidProto(target.proto));
        }
        let limit = self.config.max_connect_payload;
        if target.payload_len() > limit {
            return Err(OpenError::TargetTooLong {
                len: target.payload_len(),
                limit,
            });
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(OpenError::TooManyStreams(self.config.max_streams));
        }
        let streams = &self.streams;
        let id = self.ids.allocate(|id| streams.contains_key(&id));
        self.queue_message(id, Body::Connect(target.clone()));
        self.streams
            .insert(id, Stream::new(Origin::Local, target, now, self.window()));
        self.stats.streams_opened_local += 1;
        Ok(id)
    }

    fn stream_for_io(&mut self, id: i64) -> Result<&mut Stream, StreamError> {
        match self.streams.get_mut(&id) {
            Some(stream) => Ok(stream),
            None => Err(self
                .closed
                .clone()
                .map_or(StreamError::Unknown(id), StreamError::Tunnel)),
        }
    }

    /// Copies received bytes into `buf`.
    pub fn read(&mut self, id: i64, buf: &mut [u8]) -> Result<ReadOutcome, StreamError> {
        let stream = self.stream_for_io(id)?;
        let mut copied = 0;
        while copied < buf.len() {
            let Some(front) = stream.recv.front_mut() else {
                break;
            };
            let n = front.len().min(buf.len() - copied);
            buf[copied..copied + n].copy_from_slice(&front[..n]);
            copied += n;
            if n == front.len() {
                stream.recv.pop_front();
            } else {
                bytes::Buf::advance(front, n);
            }
        }
        stream.recv_len -= copied;
        self.recv_total -= copied;
        if copied > 0 || buf.is_empty() {
            self.after_read(id, copied);
            return Ok(ReadOutcome::Data(copied));
        }
        self.end_of_data(id).map(|end| match end {
            Some(()) => ReadOutcome::Finished,
            None => ReadOutcome::Blocked,
        })
    }

    /// Takes up to `max` received bytes without copying.
    pub fn read_chunk(&mut self, id: i64, max: usize) -> Result<Chunk, StreamError> {
        let stream = self.stream_for_io(id)?;
        if let Some(front) = stream.recv.front_mut() {
            let chunk = if front.len() <= max {
                stream.recv.pop_front().expect("front exists")
            } else {
                front.split_to(max)
            };
            stream.recv_len -= chunk.len();
            self.recv_total -= chunk.len();
            self.after_read(id, chunk.len());
            return Ok(Chunk::Data(chunk));
        }
        self.end_of_data(id).map(|end| match end {
            Some(()) => Chunk::Finished,
            None => Chunk::Blocked,
        })
    }

    /// With nothing buffered: `Some` at a graceful end, `None` (reader registered) while open.
    fn end_of_data(&mut self, id: i64) -> Result<Option<()>, StreamError> {
        let stream = self.stream_for_io(id)?;
        match &stream.recv_end {
            RecvEnd::Open => {
                stream.reader_waiting = true;
                Ok(None)
            }
            RecvEnd::Finished => Ok(Some(())),
            RecvEnd::Failed(err) => Err(err.clone()),
        }
    }

    fn after_read(&mut self, id: i64, read: usize) {
        let resume = self.config.resume_threshold;
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let open = matches!(stream.recv_end, RecvEnd::Open);
        if stream.we_paused_peer && stream.recv_len < resume && open {
            stream.we_paused_peer = false;
            self.queue_message(id, Body::Resume);
        }
        // Credit goes back in quarters of the window (a WindowUpdate per 64 KiB read at the
        // default): often enough that a sender holding back to a quarter of the window while
        // an interactive stream is active is never left waiting with nothing in flight.
        let window = self.window();
        if window > 0 && open {
            let stream = self.streams.get_mut(&id).expect("looked up above");
            stream.recv_ungranted += read as u64;
            if stream.recv_ungranted >= u64::from(window / 4) {
                let grant = stream.recv_ungranted.min(u64::from(u32::MAX));
                stream.recv_ungranted -= grant;
                stream.recv_credit += grant;
                let grant = u32::try_from(grant).expect("capped at u32::MAX");
                self.stats.window_updates_sent += 1;
                self.queue_message(id, Body::WindowUpdate(grant));
            }
        }
    }

    /// Queues bytes to send. Returns how many were taken; `Ok(0)` for a non-empty `data` means
    /// the stream's send queue is full, and an [`Event::Writable`] follows when it has room.
    pub fn write(&mut self, id: i64, data: &[u8]) -> Result<usize, StreamError> {
        let max_send = self.config.max_stream_send_buffer;
        let chunk = self.config.max_data_chunk;
        let mut counter = self.next_message_id;
        let stream = self.stream_for_io(id)?;
        if stream.send_end != SendEnd::Open {
            return Err(match &stream.recv_end {
                RecvEnd::Failed(err) => err.clone(),
                _ => StreamError::Closed,
            });
        }
        let room = max_send.saturating_sub(stream.send_len);
        if room == 0 {
            stream.writer_waiting = true;
            return Ok(0);
        }
        let mut next_id = || {
            counter = counter.wrapping_add(1);
            counter
        };
        let taken = stream.queue_data(id, data, room, chunk, &mut next_id);
        let sendable = stream.next_frame_len().is_some();
        self.next_message_id = counter;
        if sendable {
            self.scheduler.activate(id);
        }
        Ok(taken)
    }

    /// Room left in a stream's send queue.
    pub fn send_capacity(&self, id: i64) -> usize {
        self.streams.get(&id).map_or(0, |s| {
            if s.send_end == SendEnd::Open {
                self.config
                    .max_stream_send_buffer
                    .saturating_sub(s.send_len)
            } else {
                0
            }
        })
    }

    /// Bytes queued on a stream and not yet handed to the driver.
    pub fn send_queued(&self, id: i64) -> usize {
        self.streams.get(&id).map_or(0, |s| s.send_len)
    }

    /// Closes a stream gracefully: Error `EOF` goes out after everything already written.
    /// Bytes already received stay readable; later ones are dropped (there is no half-close).
    /// Idempotent.
    pub fn close(&mut self, id: i64) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.send_end != SendEnd::Open {
            return;
        }
        if stream.send_len > 0 {
            stream.send_end = SendEnd::Closing;
            return;
        }
        self.finish_close(id);
    }

    fn finish_close(&mut self, id: i64) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.send_end = SendEnd::Closed;
            if matches!(stream.recv_end, RecvEnd::Open) {
                stream.recv_end = RecvEnd::Finished;
                self.events.push_back(Event::Readable(id));
            }
            self.queue_message(id, Body::Error(Bytes::from_static(EOF_TEXT)));
            self.reap(id);
        }
    }

    /// Aborts a stream: queued data is dropped and the peer gets an Error with `reason`.
    pub fn reset(&mut self, id: i64, reason: &str) {
        if self.streams.get(&id).is_some_and(|s| !s.protocol_closed()) {
            let error = StreamError::LocallyReset(reason.to_string());
            let send = self.streams[&id].send_end != SendEnd::Closed;
            let send_error = send.then_some((reason, Cause::Local));
            self.end_stream(id, RecvEnd::Failed(error), send_error, true);
        }
    }

    /// The application let go of a stream: it is closed gracefully if still open, and forgotten
    /// once the wire is done with it.
    pub fn release(&mut self, id: i64) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.held = false;
        self.recv_total -= stream.discard_recv();
        self.close(id);
        self.reap(id);
    }

    /// Ends the session: every stream fails with `error` after its buffered bytes, and nothing
    /// more is sent (on a lost websocket per-stream writes are pointless, spec §4.4).
    pub fn close_session(&mut self, error: SessionError) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(error.clone());
        self.control.clear();
        self.control_bytes = 0;
        self.reply_bytes = 0;
        self.pong_queued = false;
        self.ping_queued = false;
        let ids: Vec<i64> = self.streams.keys().copied().collect();
        for id in ids {
            let stream = self.streams.get_mut(&id).expect("listed");
            stream.discard_send();
            stream.send_end = SendEnd::Closed;
            if matches!(stream.recv_end, RecvEnd::Open) {
                stream.recv_end = RecvEnd::Failed(StreamError::Tunnel(error.clone()));
            }
            self.events.push_back(Event::Readable(id));
            self.events.push_back(Event::Writable(id));
            self.reap(id);
        }
    }
}

// === impl Session: output ===

impl Session {
    /// The next frame to send: Pongs, Pings and control messages first, then Data from the
    /// streams in deficit round-robin turns.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(control) = self.control.pop_front() {
            let cost = control.cost();
            self.control_bytes -= cost;
            if control.reply {
                self.reply_bytes -= cost;
            }
            match control.transmit {
                Transmit::Ping => self.ping_queued = false,
                Transmit::Pong => self.pong_queued = false,
                Transmit::Message(_) => {}
            }
            self.stats.frames_out += 1;
            return Some(control.transmit);
        }
        if self.closed.is_some() {
            return None;
        }
        let window = self.window();
        let interactive = window > 0 && self.interactive_spell > 0;
        let small_first = if window > 0 { INTERACTIVE_MESSAGE } else { 0 };
        let streams = &self.streams;
        let id = self
            .scheduler
            .next(self.config.max_data_chunk, small_first, |id| {
                let stream = streams.get(&id)?;
                let limit = send_limit(stream, window, interactive)?;
                stream.next_frame_len().map(|len| len.min(limit))
            })?;
        let max_send = self.config.max_stream_send_buffer;
        let mut counter = self.next_message_id;
        let stream = self.streams.get_mut(&id).expect("scheduled stream exists");
        let (frame, payload) = if window == 0 {
            stream.pop_frame()
        } else {
            let limit = send_limit(stream, window, interactive).expect("scheduled with credit");
            let mut next_id = || {
                counter = counter.wrapping_add(1);
                counter
            };
            stream.pop_frame_limited(id, limit, &mut next_id)
        }
        .expect("scheduled stream has a frame");
        self.next_message_id = counter;
        if window > 0 {
            stream.send_credit -= payload as u64;
            if payload <= INTERACTIVE_MESSAGE && stream.send_len == 0 {
                self.interactive_spell = INTERACTIVE_SPELL;
            } else {
                self.interactive_spell = self.interactive_spell.saturating_sub(payload);
            }
        }
        self.stats.data_bytes_out += payload as u64;
        self.stats.frames_out += 1;
        if stream.writer_waiting && stream.send_len < max_send {
            stream.writer_waiting = false;
            self.events.push_back(Event::Writable(id));
        }
        if stream.send_len == 0 && stream.send_end == SendEnd::Closing {
            self.finish_close(id);
        }
        Some(Transmit::Message(frame))
    }

    /// Whether [`Session::poll_transmit`] has something now.
    pub fn has_transmit(&self) -> bool {
        !self.control.is_empty() || (self.closed.is_none() && self.scheduler.len() > 0)
    }

    /// The next event for the application side.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Credit windows: the most payload `stream` may send in its next frame, or `None` when it
/// must wait for credit. `window` is 0 when credit windows are off (no limit). While an
/// interactive stream is active, frames are cut to [`INTERACTIVE_CHUNK`] and each stream keeps
/// at most a quarter of the window unread at the peer, so little bulk data queues in the
/// socket buffers ahead of the interactive messages. (A stream's unread bytes at the peer are
/// the window less its credit: the peer grants back exactly what its application reads.)
fn send_limit(stream: &Stream, window: u32, interactive: bool) -> Option<usize> {
    if window == 0 {
        return Some(usize::MAX);
    }
    let mut credit = stream.send_credit;
    let mut limit = usize::MAX;
    if interactive {
        let unread = u64::from(window).saturating_sub(credit);
        credit = credit.min(u64::from(window / 4).saturating_sub(unread));
        limit = INTERACTIVE_CHUNK;
    }
    (credit > 0).then(|| limit.min(usize::try_from(credit).unwrap_or(usize::MAX)))
}

/// The stream id of a message whose header decodes (for failing just that stream).
fn header_conn_id(bytes: &[u8]) -> Option<i64> {
    let (_, used) = wire::varint::get(bytes).ok()?;
    wire::varint::get(&bytes[used..]).ok().map(|(id, _)| id)
}

#[cfg(test)]
mod tests;
