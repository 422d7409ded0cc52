//! Errors of the session core, by reach: a [`ProtocolError`] is one bad message from the peer
//! (at most its stream suffers), a [`StreamError`] ends one stream, a [`SessionError`] ends the
//! whole tunnel. This is h2's split between a stream reset and a connection GOAWAY.

use thiserror::Error;

use crate::wire::DecodeError;

/// A message from the peer that breaks the protocol.
///
/// A Go receiver ends the whole session on each of these (spec §2.6). This core does better:
/// the websocket still delimits messages, so it drops the one message, answers an Error on the
/// affected stream where there is one, and carries on. The value is returned so the driver can
/// log and count it. The texts are Go's, for comparison with a Go peer's logs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The message does not decode (Go stage `newServerMessage`).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A text websocket message (Go stage `Serve`).
    #[error("wrong websocket message type")]
    WrongMessageType,
    /// A Connect the authorizer refused (Go stage `clientConnect`).
    #[error("connect not allowed")]
    ConnectNotAllowed {
        /// The stream the peer tried to open.
        conn_id: i64,
    },
    /// A malformed AddClient (server sessions) or RemoveClient (any session).
    #[error("invalid remote Session {payload}: {reason}")]
    InvalidRemoteSession {
        /// The payload as received, lossily as text.
        payload: String,
        /// Go's reason text.
        reason: String,
    },
    /// A SyncConnections payload whose length is not a multiple of 8.
    #[error("decoding sync connections payload: incorrect data format")]
    SyncFormat,
    /// Credit windows (negotiated): the peer sent more Data on a stream than it had credit
    /// for. That stream is reset; the tunnel carries on.
    #[error("stream {conn_id}: {len} bytes of Data with {credit} bytes of credit")]
    WindowExceeded {
        /// The stream.
        conn_id: i64,
        /// The Data payload received.
        len: usize,
        /// The credit the peer had left.
        credit: u64,
    },
    /// Credit windows (negotiated): a WindowUpdate would take a stream's credit past
    /// [`crate::mux::MAX_SEND_CREDIT`]. The update is dropped.
    #[error("stream {conn_id}: window update past the credit limit")]
    WindowOverflow {
        /// The stream.
        conn_id: i64,
    },
}

/// Why one stream ended with something other than a graceful close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer closed the stream with this error text (a dial error, `i/o timeout`, ...).
    #[error("stream reset by peer: {0}")]
    Reset(String),
    /// The peer refused the stream's target.
    #[error("connect refused by peer: {0}")]
    Refused(String),
    /// This side reset the stream.
    #[error("stream reset locally: {0}")]
    LocallyReset(String),
    /// The peer overran the stream's receive bound; the stream was reset, the tunnel lives on.
    #[error("stream receive buffer limit of {limit} bytes exceeded")]
    BufferLimit {
        /// The configured bound.
        limit: usize,
    },
    /// The peer sent more Data than its credit window allowed (credit windows only).
    #[error("stream credit window of {window} bytes exceeded")]
    WindowExceeded {
        /// The negotiated window.
        window: u32,
    },
    /// The peer closed the stream silently through SyncConnections.
    #[error("stream closed by the peer's connection sync")]
    Synced,
    /// The peer opened a new stream with the same id.
    #[error("stream replaced by a new Connect with the same id")]
    Replaced,
    /// The whole tunnel ended.
    #[error("tunnel closed: {0}")]
    Tunnel(SessionError),
    /// Writing to a stream that is already closed.
    #[error("stream is closed")]
    Closed,
    /// No such stream.
    #[error("unknown stream {0}")]
    Unknown(i64),
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// `proto/address` is longer than a Go receiver reads.
    #[error("connect target is {len} bytes; the limit is {limit}")]
    TargetTooLong {
        /// Its length.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The proto is empty or holds a `/`, so the receiver would split it wrongly.
    #[error("invalid connect proto {0:?}")]
    InvalidProto(String),
    /// Too many streams are open.
    #[error("stream limit of {0} reached")]
    TooManyStreams(usize),
    /// The tunnel has ended.
    #[error("tunnel closed: {0}")]
    Closed(SessionError),
}

/// Why a whole session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Nothing was heard from the peer within the keepalive timeout.
    #[error("keepalive timeout: nothing heard from the peer for {0:?}")]
    KeepaliveTimeout(std::time::Duration),
    /// The websocket closed or failed.
    #[error("websocket closed: {0}")]
    Transport(String),
    /// The application closed the session.
    #[error("session closed locally")]
    Local,
    /// The peer kept sending input that needs an answer (Data for unknown streams, refused
    /// Connects) without reading the answers, past [`SessionConfig::max_control_queue`].
    ///
    /// [`SessionConfig::max_control_queue`]: crate::SessionConfig::max_control_queue
    #[error(
        "control queue overflow: over {limit} bytes of replies queued for a peer that does not read them"
    )]
    ControlQueueOverflow {
        /// The configured bound.
        limit: usize,
    },
    /// The unread bytes of all streams together went past
    /// [`SessionConfig::max_session_recv_buffer`]: the peer ignored Pause.
    ///
    /// [`SessionConfig::max_session_recv_buffer`]: crate::SessionConfig::max_session_recv_buffer
    #[error("session receive buffer limit of {limit} bytes exceeded across streams")]
    RecvBufferLimit {
        /// The configured bound.
        limit: usize,
    },
    /// A registry dropped this session because its client key opened more sessions than the
    /// registry's per-key cap.
    #[error("session evicted: its client key went over the cap of {limit} sessions")]
    Evicted {
        /// The cap.
        limit: usize,
    },
}
