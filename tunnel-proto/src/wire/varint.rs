//! Go `encoding/binary` signed varints: zig-zag, then little-endian base-128.
//!
//! remotedialer writes every header field with `binary.PutVarint` and reads it with
//! `binary.ReadVarint`, so the decoder reproduces Go's exact failure modes (spec §2.1): the
//! session core and the tests compare them with what a Go receiver does with the same bytes.

use super::error::DecodeError;

/// The longest varint Go writes or reads: ten bytes carry 64 bits.
pub const MAX_VARINT_LEN: usize = 10;

/// Appends the zig-zag varint encoding of `value` to `out`.
pub fn put(out: &mut impl bytes::BufMut, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.put_u8((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.put_u8(zigzag as u8);
}

/// How many bytes [`put`] writes for `value`.
pub fn encoded_len(value: i64) -> usize {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - (zigzag | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads one varint from the front of `input`, returning the value and the bytes consumed.
///
/// Errors as Go's `binary.ReadVarint` over a message reader: [`DecodeError::Eof`] when `input`
/// is empty, [`DecodeError::UnexpectedEof`] when it ends inside the varint, and
/// [`DecodeError::VarintOverflow`] when the tenth byte still continues or exceeds `0x01`.
/// Non-minimal encodings are accepted, as Go accepts them.
pub fn get(input: &[u8]) -> Result<(i64, usize), DecodeError> {
    let mut unsigned: u64 = 0;
    let mut shift = 0u32;
    for index in 0..MAX_VARINT_LEN {
        let Some(&byte) = input.get(index) else {
            return Err(if index == 0 {
                DecodeError::Eof
            } else {
                DecodeError::UnexpectedEof
            });
        };
        if byte < 0x80 {
            if index == MAX_VARINT_LEN - 1 && byte > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            unsigned |= u64::from(byte) << shift;
            let value = (unsigned >> 1) as i64 ^ -((unsigned & 1) as i64);
            return Ok((value, index + 1));
        }
        unsigned |= u64::from(byte & 0x7f) << shift;
        shift += 7;
    }
    Err(DecodeError::VarintOverflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put(&mut out, value);
        out
    }

    #[test]
    fn spec_examples() {
        assert_eq!(encode(1), [0x02]);
        assert_eq!(encode(2), [0x04]);
        assert_eq!(encode(8), [0x10]);
        assert_eq!(encode(15000), [0xb0, 0xea, 0x01]);
        assert_eq!(encode(-1), [0x01]);
        assert_eq!(encode(i64::MAX).len(), 10);
        assert_eq!(encode(i64::MIN).len(), 10);
    }

    #[test]
    fn go_error_modes() {
        assert_eq!(get(&[]), Err(DecodeError::Eof));
        assert_eq!(get(&[0x80]), Err(DecodeError::UnexpectedEof));
        assert_eq!(get(&[0xff; 10]), Err(DecodeError::VarintOverflow));
        let mut tenth_too_big = [0xff; 10];
        tenth_too_big[9] = 0x02;
        assert_eq!(get(&tenth_too_big), Err(DecodeError::VarintOverflow));
        assert_eq!(get(&[0x80, 0x00]), Ok((0, 2)), "non-minimal accepted");
    }

    proptest::proptest! {
        #[test]
        fn round_trip(value: i64, tail: Vec<u8>) {
            let mut bytes = encode(value);
            proptest::prop_assert_eq!(bytes.len(), encoded_len(value));
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            proptest::prop_assert_eq!(get(&bytes), Ok((value, len)));
        }

        #[test]
        fn never_panics(bytes: Vec<u8>) {
            let _ = get(&bytes);
        }
    }
}
