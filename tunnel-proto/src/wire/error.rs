//! Decode errors: what a Go receiver's `newServerMessage` fails with, as values.

use thiserror::Error;

/// Why a binary websocket message is not a remotedialer message.
///
/// Each variant's text is the exact error a Go receiver reports for the same input, so logs on
/// both sides can be compared. Every one of these ends the session on a Go peer (spec §2.6).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended before a header varint began (an empty message, or a missing field).
    #[error("EOF")]
    Eof,
    /// The message ended inside a header varint.
    #[error("unexpected EOF")]
    UnexpectedEof,
    /// A header varint ran past ten bytes, or its tenth byte was above `0x01`.
    #[error("binary: varint overflows a 64-bit integer")]
    VarintOverflow,
    /// A Connect payload had no `/` within its first [`super::CONNECT_PAYLOAD_CAP`] bytes.
    #[error("failed to parse connect address")]
    ConnectAddress,
    /// A WindowUpdate (this project's extension, never from a Go peer) whose payload is not one
    /// varint from 1 to `u32::MAX`.
    #[error("malformed window update")]
    WindowIncrement,
}
