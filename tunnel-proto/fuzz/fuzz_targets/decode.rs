//! Any bytes into the decoder: it never panics, its output is bounded by the input (a Connect
//! target that is not UTF-8 is decoded lossily, at most three bytes per input byte of the
//! 266-byte window), and whatever decodes re-encodes to bytes that decode to the same message
//! (Go's canonical form: deadline 15000 on Data and Connect).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tunnel_proto::wire::{Body, CONNECT_PAYLOAD_CAP, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(mut message) = Message::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert!(message.encoded_len() <= data.len() + 3 + 2 * CONNECT_PAYLOAD_CAP);
    let grown_connect = matches!(&message.body, Body::Connect(t) if t.payload_len() > CONNECT_PAYLOAD_CAP);
    let again = match Message::decode(message.to_bytes()) {
        Ok(again) => again,
        // Only a lossily grown Connect can push its `/` out of the window a receiver reads.
        Err(_) => return assert!(grown_connect, "our own encoding of {message:?} does not decode"),
    };
    message.deadline = match message.body {
        Body::Data(_) | Body::Connect(_) => Some(15_000),
        _ => None,
    };
    if let (Body::Connect(a), Body::Connect(b)) = (&message.body, &again.body) {
        assert_eq!(a.proto, b.proto);
        // A lossily grown address cut at the window can end inside a character, which the
        // second decode turns into U+FFFD: what precedes it must be a prefix.
        let kept = if grown_connect { b.address.trim_end_matches('\u{FFFD}') } else { &b.address };
        assert!(a.address.starts_with(kept), "{a:?} vs {b:?}");
        return;
    }
    assert_eq!(again, message);
});
