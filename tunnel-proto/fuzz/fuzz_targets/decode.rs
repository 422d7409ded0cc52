//! Any bytes into the decoder: it never panics, and whatever decodes re-encodes to bytes that
//! decode to the same message (Go's canonical form: deadline 15000 on Data and Connect).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tunnel_proto::wire::{Body, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(mut message) = Message::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert!(message.encoded_len() <= data.len() + 3, "decoding never grows beyond the input");
    let wire = message.to_bytes();
    let again = Message::decode(wire).expect("our own encoding decodes");
    message.deadline = match message.body {
        Body::Data(_) | Body::Connect(_) => Some(15_000),
        _ => None,
    };
    // A Connect address may hold a `/` past the 266-byte window once re-encoded; compare the
    // part a receiver reads.
    if let (Body::Connect(a), Body::Connect(b)) = (&message.body, &again.body) {
        assert_eq!(a.proto, b.proto);
        assert!(a.address.starts_with(&b.address) || b.address.starts_with(&a.address));
        return;
    }
    assert_eq!(again, message);
});
