//! Random identifiers and secrets, and the hashes the store keeps instead of API tokens.
//!
//! Registration tokens follow wrangler's `randomtoken`: 54 characters from Rancher's alphabet
//! (no vowels, no look-alikes), so a token a real Rancher would issue looks like ours and the
//! other way round. Cluster ids are `c-` plus five characters of the same alphabet, as Rancher's.

use md5::{Digest, Md5};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

/// Rancher's token alphabet (wrangler `randomtoken`).
pub const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Length of a registration token.
pub const REGISTRATION_TOKEN_LEN: usize = 54;

/// `len` characters drawn uniformly from [`ALPHABET`] with the OS's random source.
pub fn random_string(len: usize) -> String {
    // Rejection sampling: 243 = 9 * 27 is the largest multiple of 27 under 256, so every
    // accepted byte maps to a character with equal probability.
    const LIMIT: u8 = 243;
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf)
            .expect("the operating system's random source failed");
        for &b in &buf {
            if b < LIMIT && out.len() < len {
                out.push(ALPHABET[(b % 27) as usize] as char);
            }
        }
    }
    out
}

/// A new registration token (54 characters).
pub fn registration_token() -> String {
    random_string(REGISTRATION_TOKEN_LEN)
}

/// A new cluster id, `c-xxxxx`.
pub fn cluster_id() -> String {
    format!("c-{}", random_string(5))
}

/// A new user id, `u-xxxxxxxx`.
pub fn user_id() -> String {
    format!("u-{}", random_string(8))
}

/// A new API token id, `token-xxxxx`.
pub fn api_token_id() -> String {
    format!("token-{}", random_string(5))
}

/// A new API token secret (54 characters).
pub fn api_token_secret() -> String {
    random_string(REGISTRATION_TOKEN_LEN)
}

/// SHA-256 of a secret, as stored for API tokens.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn verify_secret(secret: &str, stored: &[u8]) -> bool {
    let hash = hash_secret(secret);
    stored.len() == hash.len() && bool::from(hash.ct_eq(stored))
}

/// Constant-time equality of two strings (for registration tokens, compared verbatim).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The machine name Rancher derives from a node's requested hostname: `m-` and the first 12
/// hex digits of its MD5 (spec cattle-agent §6.2).
pub fn machine_name(hostname: &str) -> String {
    let digest = Md5::digest(hostname.as_bytes());
    let hex = data_encoding::HEXLOWER.encode(&digest);
    format!("m-{}", &hex[..12])
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Whether `id` is a valid object id in a path: non-empty, at most 63 bytes, only `[a-z0-9-]`.
/// Anything else (dots, slashes, percent-escapes, upper case) is refused before any lookup.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An API token lifetime as the CLI takes it: a whole number and a unit, `s`, `m`, `h` or `d`
/// (`90m`, `24h`, `30d`); `0` or `never`: no expiry (`Ok(None)`). At most about 100 years.
pub fn parse_ttl(s: &str) -> Result<Option<std::time::Duration>, String> {
    let s = s.trim();
    if s == "0" || s.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let bad = || format!("invalid lifetime {s:?}: expected e.g. 90m, 24h, 30d, or 0 for never");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n
        .checked_mul(unit_secs)
        .filter(|&secs| secs > 0 && secs <= 100 * 366 * 86_400)
        .ok_or_else(|| {
            format!("lifetime {s:?} must be between 1s and 100 years, or 0 for never")
        })?;
    Ok(Some(std::time::Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse() {
        let secs = |s: &str| parse_ttl(s).map(|d| d.map(|d| d.as_secs()));
        assert_eq!(secs("24h"), Ok(Some(86_400)));
        assert_eq!(secs("30d"), Ok(Some(30 * 86_400)));
        assert_eq!(secs("90m"), Ok(Some(5_400)));
        assert_eq!(secs("45s"), Ok(Some(45)));
        assert_eq!(secs("0"), Ok(None));
        assert_eq!(secs("never"), Ok(None));
        for bad in ["", "h", "24", "1.5h", "-1h", "24H", "0h", "99999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_use_the_alphabet() {
        let t = registration_token();
        assert_eq!(t.len(), 54);
        assert!(t.bytes().all(|b| ALPHABET.contains(&b)));
        assert!(cluster_id().starts_with("c-"));
        assert_eq!(cluster_id().len(), 7);
        assert_ne!(registration_token(), registration_token());
    }

    #[test]
    fn machine_name_is_md5_prefix() {
        // md5("node1") = 164546f60261c7e4be0c5f5f9aaeec86 (python3 hashlib).
        assert_eq!(machine_name("node1"), "m-164546f60261");
    }

    #[test]
    fn secrets_verify_in_constant_time() {
        let h = hash_secret("s3cret");
        assert!(verify_secret("s3cret", &h));
        assert!(!verify_secret("s3creT", &h));
        assert!(!verify_secret("s3cret", &h[..31]));
    }

    #[test]
    fn ids_are_restricted() {
        assert!(valid_id("c-abc12"));
        for bad in ["", "C-ABC", "c-a/b", "..", "c-%2e", "c_a", "c-a.b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
