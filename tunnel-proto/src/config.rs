//! Protocol knobs. Every bound the session enforces is a field here, with its default and the
//! trade-off it makes.
//!
//! What a peer can make this side hold, and what bounds it:
//!
//! | buffer | bound | past it |
//! |---|---|---|
//! | one stream's unread bytes | `max_stream_recv_buffer` | that stream is reset |
//! | all streams' unread bytes | `max_session_recv_buffer` | peer paused at half; session ends |
//! | replies queued for the peer | `max_control_queue` | session ends |
//! | control frames queued to send | `max_outbound_backlog` | the driver stops reading |
//! | one stream's unsent bytes | `max_stream_send_buffer` | writes wait |
//! | streams | `max_streams` | Connects refused |
//! | one websocket message | [`crate::driver::websocket_config`] | session ends |

use std::time::Duration;

/// Which end of the websocket this session is. It decides who pings, who sends
/// SyncConnections, how AddClient is treated, and which stream ids this side allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that dialed the websocket (an agent, or the dialing end of a peer link).
    Client,
    /// The side that accepted the websocket (the management server).
    Server,
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub(crate) role: Role,
    pub(crate) keepalive_interval: Option<Duration>,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) sync_interval: Option<Duration>,
    pub(crate) sync_grace: Duration,
    pub(crate) pause_threshold: usize,
    pub(crate) resume_threshold: usize,
    pub(crate) max_stream_recv_buffer: usize,
    pub(crate) max_stream_send_buffer: usize,
    pub(crate) max_data_chunk: usize,
    pub(crate) max_streams: usize,
    pub(crate) max_connect_payload: usize,
    pub(crate) max_control_queue: usize,
    pub(crate) max_outbound_backlog: usize,
    pub(crate) max_session_recv_buffer: usize,
    pub(crate) credit_window: Option<u32>,
}

impl SessionConfig {
    /// Defaults for `role`, matching what a Go peer expects of that role (spec §1.4, §4.3).
    pub fn new(role: Role) -> Self {
        let client = role == Role::Client;
        Self {
            role,
            keepalive_interval: client.then_some(Duration::from_secs(5)),
            keepalive_timeout: Duration::from_secs(60),
            sync_interval: client.then_some(Duration::from_secs(60)),
            sync_grace: Duration::from_secs(60),
            pause_threshold: 1 << 20,
            resume_threshold: 256 << 10,
            max_stream_recv_buffer: 32 << 20,
            max_stream_send_buffer: 256 << 10,
            max_data_chunk: 32 << 10,
            max_streams: 16_384,
            max_connect_payload: crate::wire::CONNECT_PAYLOAD_SAFE,
            max_control_queue: 1 << 20,
            max_outbound_backlog: 8 << 20,
            max_session_recv_buffer: 128 << 20,
            credit_window: None,
        }
    }

    /// The role given at construction.
    pub fn role(&self) -> Role {
        self.role
    }

    /// How often to send a websocket Ping. Default: every 5 s for clients (a Go server drops a
    /// client after 60 s without one), never for servers (Go servers never ping).
    pub fn keepalive_interval(&mut self, interval: Option<Duration>) -> &mut Self {
        self.keepalive_interval = interval;
        self
    }

    /// How long the session lives without hearing from the peer. Default 60 s, Go's
    /// `PingWaitDuration`. Anything received counts, Pings and Pongs included.
    pub fn keepalive_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.keepalive_timeout = timeout;
        self
    }

    /// How often a client sends SyncConnections. Default 60 s for clients, as Go; `None` never.
    pub fn sync_interval(&mut self, interval: Option<Duration>) -> &mut Self {
        self.sync_interval = interval;
        self
    }

    /// How old a stream must be before a received SyncConnections that leaves it out may close
    /// it. Default 60 s (one sync interval): a stream whose Connect was still in flight when the
    /// peer took its snapshot is never killed (the race of remotedialer#88).
    pub fn sync_grace(&mut self, grace: Duration) -> &mut Self {
        self.sync_grace = grace;
        self
    }

    /// Buffered bytes of one stream above which the peer is sent Pause (default 1 MiB), and
    /// below which, after a read, Resume (default 256 KiB). Go uses 2 MiB and 256 KiB; a lower
    /// pause point keeps memory down at no cost in throughput on the links we measured.
    pub fn pause_thresholds(&mut self, pause: usize, resume: usize) -> &mut Self {
        self.pause_threshold = pause.max(1);
        self.resume_threshold = resume.min(self.pause_threshold);
        self
    }

    /// Hard bound on one stream's unread bytes (default 32 MiB). Pause is advisory and Go peers
    /// overshoot it (and send one message per application write, however large), so this sits
    /// well above the pause point; past it the stream is reset and the tunnel carries on.
    pub fn max_stream_recv_buffer(&mut self, bytes: usize) -> &mut Self {
        self.max_stream_recv_buffer = bytes.max(1);
        self
    }

    /// How many bytes one stream may queue for sending before writes wait (default 256 KiB).
    pub fn max_stream_send_buffer(&mut self, bytes: usize) -> &mut Self {
        self.max_stream_send_buffer = bytes.max(1);
        self
    }

    /// Largest Data payload sent, and the scheduler's quantum (default 32 KiB, the size Go's
    /// client pipe uses). Smaller chunks interleave streams more finely; larger ones cost
    /// fewer frames per byte.
    pub fn max_data_chunk(&mut self, bytes: usize) -> &mut Self {
        self.max_data_chunk = bytes.max(1);
        self
    }

    /// Most streams open at once (default 16,384). Connects beyond it get an Error.
    pub fn max_streams(&mut self, streams: usize) -> &mut Self {
        self.max_streams = streams;
        self
    }

    /// Longest `proto/address` this side sends in a Connect. Default 100 bytes, what every Go
    /// version reads; 266 is safe only for peers known to run remotedialer v0.5.0 or later.
    pub fn max_connect_payload(&mut self, bytes: usize) -> &mut Self {
        self.max_connect_payload = bytes.min(crate::wire::CONNECT_PAYLOAD_CAP);
        self
    }

    /// Bytes of replies the session may hold for a peer that is not reading them (default
    /// 1 MiB, about 25,000 Errors). Replies are what the peer's own input makes this side
    /// send and what it could make without end: Errors for Data on unknown streams, for
    /// refused or excess Connects, for overrun streams. A peer that keeps sending such input
    /// while never reading the answers loses the session with
    /// [`SessionError::ControlQueueOverflow`](crate::mux::SessionError::ControlQueueOverflow);
    /// a peer that reads (any Go peer) drains them as fast as it makes them. Frames this side
    /// originates (Connect, close, Pause, Resume, sync) are bounded by the stream count and
    /// never count here. Pings and Pongs coalesce to one each.
    pub fn max_control_queue(&mut self, bytes: usize) -> &mut Self {
        self.max_control_queue = bytes.max(1);
        self
    }

    /// Bytes of control frames queued for sending above which the driver stops reading the
    /// websocket until the peer has taken some (default 8 MiB). This is back-pressure, not
    /// loss: nothing is dropped, the peer's writes wait in its socket.
    ///
    /// Stalling reads is costly with a Go peer (spec §3.2 item 2: its reader goroutine also
    /// writes Pongs, Pauses and Errors, so it stops reading us too while we do not read it),
    /// so the default sits above anything a peer that reads can make queue: the stream table
    /// holds at most one Connect, one close and one Pause/Resume per stream (16,384 streams
    /// with the longest Connect make under 5 MB), and replies end the session at
    /// [`SessionConfig::max_control_queue`] first. It is the backstop that keeps the whole
    /// control queue bounded; set it below `max_control_queue` to stall a junk-flooding peer
    /// instead of cutting it off. Only control frames count: Data has per-stream bounds and
    /// writers that wait, and counting it would let two ends with bulk transfers both ways
    /// stop reading each other at once.
    pub fn max_outbound_backlog(&mut self, bytes: usize) -> &mut Self {
        self.max_outbound_backlog = bytes.max(1);
        self
    }

    /// Bound on the unread bytes of all streams of the session together (default 128 MiB,
    /// four streams at the per-stream bound). Past half of it, any stream that receives Data
    /// is paused whatever its own level, so a peer that honours Pause stays near the half mark
    /// however many streams sit unread. (A Go peer honours it except on a stream where it is
    /// itself reading, whose reads undo our Pause, spec §3.2 item 1b; such a stream still
    /// meets its own bound first.) A peer that goes past the bound anyway loses the session
    /// with
    /// [`SessionError::RecvBufferLimit`](crate::mux::SessionError::RecvBufferLimit).
    pub fn max_session_recv_buffer(&mut self, bytes: usize) -> &mut Self {
        self.max_session_recv_buffer = bytes.max(1);
        self
    }

    /// Per-stream credit windows, in bytes, or `None` for the plain protocol (the default).
    ///
    /// Set it only when both ends agreed in the websocket upgrade
    /// ([`crate::driver::capability`]), and then on both ends: a Go peer, or one of ours that
    /// did not agree, would neither honour the windows nor grant credit. With a window each
    /// stream may have at most that many Data bytes sent and not yet read by the receiving
    /// application; the receiver grants more (a WindowUpdate) as its application reads. So a
    /// bulk stream can no longer fill the websocket's socket buffers (several MiB on loopback)
    /// ahead of an interactive one. While an interactive stream is active (it sends small
    /// messages and waits), bulk Data also goes out in smaller frames, with at most a quarter
    /// of the window in flight per stream, and small frames go first.
    ///
    /// The trade-off: a window below the bandwidth-delay product (plus the receiving
    /// application's scheduling delay) caps a single stream's throughput. The value
    /// [`crate::driver::capability::Capabilities::apply`] sets is
    /// [`DEFAULT_CREDIT_WINDOW`]. Clamped to at least 16 KiB.
    pub fn credit_window(&mut self, window: Option<u32>) -> &mut Self {
        self.credit_window = window.map(|w| w.max(MIN_CREDIT_WINDOW));
        self
    }

    /// The per-stream credit window, when credit windows are on.
    pub fn credit_window_size(&self) -> Option<u32> {
        self.credit_window
    }
}

/// The credit window negotiated sessions use: 256 KiB per stream.
pub const DEFAULT_CREDIT_WINDOW: u32 = 256 << 10;
/// The smallest credit window [`SessionConfig::credit_window`] accepts.
pub const MIN_CREDIT_WINDOW: u32 = 16 << 10;
