//! The wire format: bytes of one binary websocket message <-> [`Message`], and nothing else.
//!
//! The layout is remotedialer's (spec §2): zig-zag varints `id`, `connID`, `type`, a legacy
//! deadline varint for Data and Connect only, then the payload, which is the rest of the
//! websocket message. There is no length field: websocket framing delimits messages.

mod error;
mod message;
pub mod varint;

pub use error::DecodeError;
pub use message::{
    Body, CLIENT_PAYLOAD_CAP, CONNECT_PAYLOAD_CAP, CONNECT_PAYLOAD_SAFE, EOF_TEXT, ERROR_TEXT_CAP,
    LEGACY_DEADLINE, MAX_HEADER_LEN, Message, MessageType, Target, cap_error_text, header_len,
    put_header,
};
