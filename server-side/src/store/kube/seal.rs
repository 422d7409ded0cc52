//! Sealing of the secrets the server must read back in the clear (registration tokens, shown
//! again in import commands; the agent's service-account token, sent downstream): ChaCha20-
//! Poly1305 with a 256-bit key kept in the state Secret, a fresh random nonce per value. So the
//! custom resources can be read (by `kubectl get`, by backups) without giving those away.
//!
//! Format: `v1:` + base64(nonce ‖ ciphertext ‖ tag).

use ring::aead::{CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::{Result, StoreError};

/// The Secret's data key holding the sealing key.
pub(super) const KEY_FIELD: &str = "seal.key";
const PREFIX: &str = "v1:";

/// Seals and opens values with one key.
pub(super) struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A fresh random key.
    pub(super) fn new_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the operating system's random source failed");
        key
    }

    pub(super) fn from_key(key: &[u8]) -> Result<Self> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, key)
            .map_err(|_| StoreError::Corrupt(format!("{KEY_FIELD} is not a 32-byte key")))?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    pub(super) fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the operating system's random source failed");
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut data,
            )
            .expect("sealing cannot fail for inputs under 256 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{PREFIX}{}", data_encoding::BASE64.encode(&out))
    }

    pub(super) fn open(&self, sealed: &str) -> Result<String> {
        let corrupt = || StoreError::Corrupt("a sealed value does not open with the key".into());
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| data_encoding::BASE64.decode(b.as_bytes()).ok())
            .ok_or_else(corrupt)?;
        if raw.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt())?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut rest)
            .map_err(|_| corrupt())?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_round_trip_and_refuse_tampering_and_other_keys() {
        let sealer = Sealer::from_key(&Sealer::new_key()).unwrap();
        let sealed = sealer.seal("a token");
        assert!(!sealed.contains("a token"));
        assert_ne!(sealed, sealer.seal("a token"), "a fresh nonce each time");
        assert_eq!(sealer.open(&sealed).unwrap(), "a token");
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            sealer
                .open(std::str::from_utf8(&tampered).unwrap())
                .is_err()
        );
        let other = Sealer::from_key(&Sealer::new_key()).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(sealer.open("plain").is_err());
        assert!(Sealer::from_key(b"short").is_err());
    }
}
