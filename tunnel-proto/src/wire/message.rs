//! One remotedialer message: header varints, the legacy deadline where the type has one, then
//! the payload (spec §2).
//!
//! Decoding works on a [`Bytes`] and slices payloads out of it without copying. Size caps are
//! applied the way Go applies them on receive (excess bytes are dropped, not rejected), so a
//! decoded message never holds more than the input, and at most a few hundred bytes more than
//! a borrowed view of it (the Connect target strings).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use super::varint;

/// The value every sender since 2020 writes into the legacy deadline field (ms).
pub const LEGACY_DEADLINE: i64 = 15_000;
/// How much of a Connect payload a receiver reads (266 since remotedialer v0.5.0; 100 before).
pub const CONNECT_PAYLOAD_CAP: usize = 266;
/// The Connect payload size every Go version reads in full: keep sent targets within it.
pub const CONNECT_PAYLOAD_SAFE: usize = 100;
/// How much of an Error text a Go receiver reads.
pub const ERROR_TEXT_CAP: usize = 100;
/// How much of an AddClient/RemoveClient payload a Go receiver reads.
pub const CLIENT_PAYLOAD_CAP: usize = 100;
/// The longest header: id and connID (ten bytes each), the type, and the deadline.
pub const MAX_HEADER_LEN: usize = 24;
/// The exact Error text that marks a graceful close.
pub const EOF_TEXT: &[u8] = b"EOF";

/// The message types of spec §2.3, by wire number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Stream bytes.
    Data = 1,
    /// Open a stream to `proto/address`.
    Connect = 2,
    /// Close a stream; the text `EOF` is a graceful close.
    Error = 3,
    /// Peering: a client key and session joined.
    AddClient = 4,
    /// Peering: a client key and session left.
    RemoveClient = 5,
    /// Ask the peer to stop sending Data on a stream.
    Pause = 6,
    /// Let the peer send Data on a stream again.
    Resume = 7,
    /// The client's list of live stream ids (stale-stream cleanup).
    SyncConnections = 8,
    /// Credit for more Data on a stream. Not remotedialer's: sent only when both ends said
    /// so in the websocket upgrade ([`crate::driver::capability`]). Far from Go's numbers, so a
    /// future Go type cannot meet it; a Go peer would ignore it as unknown anyway.
    WindowUpdate = 32,
}

impl MessageType {
    /// The type for a wire number, compared as a full int64 (2^32+1 is not Data).
    pub fn from_number(number: i64) -> Option<Self> {
        Some(match number {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Error,
            4 => Self::AddClient,
            5 => Self::RemoveClient,
            6 => Self::Pause,
            7 => Self::Resume,
            8 => Self::SyncConnections,
            32 => Self::WindowUpdate,
            _ => return None,
        })
    }

    /// Whether the legacy deadline varint follows the header (Data and Connect only).
    pub fn has_deadline(self) -> bool {
        matches!(self, Self::Data | Self::Connect)
    }
}

/// What a Connect asks for: `proto/address`, split at the first `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `tcp`, `unix`, `npipe`, or a peering `key::proto`.
    pub proto: String,
    /// Host and port, or a socket path.
    pub address: String,
}

impl Target {
    /// A target from its two parts.
    pub fn new(proto: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            proto: proto.into(),
            address: address.into(),
        }
    }

    /// The wire payload, `proto/address`.
    pub fn payload_len(&self) -> usize {
        self.proto.len() + 1 + self.address.len()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.proto, self.address)
    }
}

/// A message's type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Stream bytes (may be empty).
    Data(Bytes),
    /// Open a stream.
    Connect(Target),
    /// Close a stream with this text (at most [`ERROR_TEXT_CAP`] bytes once received).
    Error(Bytes),
    /// `clientKey/sessionKey`, as received (parsed by the session, where Go parses it).
    AddClient(Bytes),
    /// `clientKey/sessionKey`, as received.
    RemoveClient(Bytes),
    /// Stop sending Data on this stream.
    Pause,
    /// Resume sending Data on this stream.
    Resume,
    /// 8-byte little-endian ids, as received (checked by the session, where Go checks it).
    SyncConnections(Bytes),
    /// This many more Data payload bytes may be sent on the stream (one zig-zag varint,
    /// at least 1). Only between two ends that negotiated credit windows.
    WindowUpdate(u32),
    /// A type this version does not know; every Go version ignores these.
    Unknown {
        /// The wire type number.
        type_number: i64,
        /// Everything after the header.
        payload: Bytes,
    },
}

impl Body {
    /// The wire type number.
    pub fn type_number(&self) -> i64 {
        match self {
            Body::Data(_) => MessageType::Data as i64,
            Body::Connect(_) => MessageType::Connect as i64,
            Body::Error(_) => MessageType::Error as i64,
            Body::AddClient(_) => MessageType::AddClient as i64,
            Body::RemoveClient(_) => MessageType::RemoveClient as i64,
            Body::Pause => MessageType::Pause as i64,
            Body::Resume => MessageType::Resume as i64,
            Body::SyncConnections(_) => MessageType::SyncConnections as i64,
            Body::WindowUpdate(_) => MessageType::WindowUpdate as i64,
            Body::Unknown { type_number, .. } => *type_number,
        }
    }

    /// A SyncConnections body listing `ids`, sorted ascending as signed values.
    pub fn sync_connections(ids: impl IntoIterator<Item = i64>) -> Body {
        let mut ids: Vec<i64> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut payload = BytesMut::with_capacity(ids.len() * 8);
        for id in ids {
            payload.put_i64_le(id);
        }
        Body::SyncConnections(payload.freeze())
    }
}

/// One remotedialer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id: informational only, never used by a receiver.
    pub id: i64,
    /// Stream id, 0 for session-level messages.
    pub conn_id: i64,
    /// The legacy deadline as received (Data and Connect only). Encoding always writes
    /// [`LEGACY_DEADLINE`] for those types, whatever this holds.
    pub deadline: Option<i64>,
    /// Type and payload.
    pub body: Body,
}

impl Message {
    /// A message to send; the deadline is filled in on encoding.
    pub fn new(id: i64, conn_id: i64, body: Body) -> Self {
        Self {
            id,
            conn_id,
            deadline: None,
            body,
        }
    }

    /// How many bytes [`Message::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        header_len(self.id, self.conn_id, self.body.type_number()) + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match &self.body {
            Body::Data(b)
            | Body::Error(b)
            | Body::AddClient(b)
            | Body::RemoveClient(b)
            | Body::SyncConnections(b) => b.len(),
            Body::Unknown { payload, .. } => payload.len(),
            Body::Connect(target) => target.payload_len(),
            Body::WindowUpdate(increment) => varint::encoded_len(i64::from(*increment)),
            Body::Pause | Body::Resume => 0,
        }
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        put_header(out, self.id, self.conn_id, self.body.type_number());
        match &self.body {
            Body::Data(b)
            | Body::Error(b)
            | Body::AddClient(b)
            | Body::RemoveClient(b)
            | Body::SyncConnections(b) => out.put_slice(b),
            Body::Unknown { payload, .. } => out.put_slice(payload),
            Body::Connect(target) => {
                out.put_slice(target.proto.as_bytes());
                out.put_u8(b'/');
                out.put_slice(target.address.as_bytes());
            }
            Body::WindowUpdate(increment) => varint::put(out, i64::from(*increment)),
            Body::Pause | Body::Resume => {}
        }
    }

    /// The wire form as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Decodes one binary websocket message.
    pub fn decode(input: Bytes) -> Result<Message, DecodeError> {
        let (id, mut at) = varint::get(&input)?;
        let (conn_id, used) = varint::get(&input[at..])?;
        at += used;
        let (type_number, used) = varint::get(&input[at..])?;
        at += used;
        let kind = MessageType::from_number(type_number);
        let deadline = match kind {
            Some(kind) if kind.has_deadline() => {
                let (deadline, used) = varint::get(&input[at..])?;
                at += used;
                Some(deadline)
            }
            _ => None,
        };
        let payload = input.slice(at..);
        let capped = |cap: usize| payload.slice(..payload.len().min(cap));
        let body = match kind {
            None => Body::Unknown {
                type_number,
                payload,
            },
            Some(MessageType::Data) => Body::Data(payload),
            Some(MessageType::Connect) => {
                Body::Connect(parse_target(&capped(CONNECT_PAYLOAD_CAP))?)
            }
            Some(MessageType::Error) => Body::Error(capped(ERROR_TEXT_CAP)),
            Some(MessageType::AddClient) => Body::AddClient(capped(CLIENT_PAYLOAD_CAP)),
            Some(MessageType::RemoveClient) => Body::RemoveClient(capped(CLIENT_PAYLOAD_CAP)),
            Some(MessageType::Pause) => Body::Pause,
            Some(MessageType::Resume) => Body::Resume,
            Some(MessageType::SyncConnections) => Body::SyncConnections(payload),
            Some(MessageType::WindowUpdate) => Body::WindowUpdate(parse_increment(&payload)?),
        };
        Ok(Message {
            id,
            conn_id,
            deadline,
            body,
        })
    }
}

fn parse_target(payload: &[u8]) -> Result<Target, DecodeError> {
    let slash = payload
        .iter()
        .position(|&b| b == b'/')
        .ok_or(DecodeError::ConnectAddress)?;
    Ok(Target {
        proto: String::from_utf8_lossy(&payload[..slash]).into_owned(),
        address: String::from_utf8_lossy(&payload[slash + 1..]).into_owned(),
    })
}

/// A WindowUpdate payload: exactly one varint, from 1 to `u32::MAX`.
fn parse_increment(payload: &[u8]) -> Result<u32, DecodeError> {
    let (value, used) = varint::get(payload).map_err(|_| DecodeError::WindowIncrement)?;
    if used != payload.len() {
        return Err(DecodeError::WindowIncrement);
    }
    u32::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or(DecodeError::WindowIncrement)
}

/// Length of the header (with the deadline, for types that carry one).
pub fn header_len(id: i64, conn_id: i64, type_number: i64) -> usize {
    let deadline = match MessageType::from_number(type_number) {
        Some(kind) if kind.has_deadline() => varint::encoded_len(LEGACY_DEADLINE),
        _ => 0,
    };
    varint::encoded_len(id)
        + varint::encoded_len(conn_id)
        + varint::encoded_len(type_number)
        + deadline
}

/// Writes a header, with [`LEGACY_DEADLINE`] for Data and Connect. Used by the session to build
/// Data frames in place, with the payload appended after it.
pub fn put_header(out: &mut impl BufMut, id: i64, conn_id: i64, type_number: i64) {
    varint::put(out, id);
    varint::put(out, conn_id);
    varint::put(out, type_number);
    if MessageType::from_number(type_number).is_some_and(MessageType::has_deadline) {
        varint::put(out, LEGACY_DEADLINE);
    }
}

/// Cuts an error text to what a Go receiver reads, at a UTF-8 boundary.
pub fn cap_error_text(text: &str) -> &str {
    if text.len() <= ERROR_TEXT_CAP {
        return text;
    }
    let mut end = ERROR_TEXT_CAP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(payload: &'static [u8]) -> Message {
        Message::new(1003, 2, Body::Data(Bytes::from_static(payload)))
    }

    #[test]
    fn spec_worked_example_data() {
        assert_eq!(
            data(b"hi").to_bytes().as_ref(),
            [0xd6, 0x0f, 0x04, 0x02, 0xb0, 0xea, 0x01, 0x68, 0x69]
        );
    }

    #[test]
    fn decode_keeps_payload_zero_copy() {
        let wire = data(b"hello").to_bytes();
        let decoded = Message::decode(wire.clone()).unwrap();
        let Body::Data(payload) = &decoded.body else {
            panic!("not data")
        };
        assert_eq!(payload.as_ptr(), wire[wire.len() - 5..].as_ptr());
    }

    #[test]
    fn window_update_payload_is_one_positive_varint() {
        let wire = Message::new(1, -2, Body::WindowUpdate(65536)).to_bytes();
        // id 1, conn -2, type 32, then 65536 zig-zagged (131072 = 0x80 0x80 0x08).
        assert_eq!(wire.as_ref(), [0x02, 0x03, 0x40, 0x80, 0x80, 0x08]);
        assert_eq!(
            Message::decode(wire).unwrap().body,
            Body::WindowUpdate(65536)
        );
        for bad in [
            &[0x02, 0x03, 0x40][..],                                 // no increment
            &[0x02, 0x03, 0x40, 0x00],                               // zero
            &[0x02, 0x03, 0x40, 0x01],                               // negative
            &[0x02, 0x03, 0x40, 0x02, 0x00],                         // trailing byte
            &[0x02, 0x03, 0x40, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // over u32
        ] {
            assert_eq!(
                Message::decode(Bytes::copy_from_slice(bad)),
                Err(DecodeError::WindowIncrement),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn error_text_capped_at_char_boundary() {
        let text = "é".repeat(60);
        assert_eq!(cap_error_text(&text).len(), 100);
        let text = format!("a{}", "é".repeat(60));
        assert_eq!(cap_error_text(&text).len(), 99);
    }

    fn arb_body() -> impl proptest::strategy::Strategy<Value = Body> {
        use proptest::prelude::*;
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            bytes().prop_map(Body::Data),
            ("[a-z:]{0,8}", "[a-z0-9./:]{0,40}")
                .prop_map(|(p, a)| Body::Connect(Target::new(p, a))),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(|b| Body::Error(b.into())),
            Just(Body::Pause),
            Just(Body::Resume),
            proptest::collection::vec(any::<i64>(), 0..8).prop_map(Body::sync_connections),
            (1u32..).prop_map(Body::WindowUpdate),
            (9i64.., bytes())
                .prop_filter("a known type", |(n, _)| MessageType::from_number(*n)
                    .is_none())
                .prop_map(|(type_number, payload)| Body::Unknown {
                    type_number,
                    payload
                }),
        ]
    }

    proptest::proptest! {
        #[test]
        fn encode_decode_identity(id: i64, conn_id: i64, body in arb_body()) {
            let message = Message::new(id, conn_id, body);
            let wire = message.to_bytes();
            proptest::prop_assert_eq!(wire.len(), message.encoded_len());
            let mut decoded = Message::decode(wire).unwrap();
            decoded.deadline = None;
            proptest::prop_assert_eq!(decoded, message);
        }

        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = Message::decode(Bytes::from(bytes));
        }
    }
}
