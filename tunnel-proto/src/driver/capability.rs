//! Protocol extensions two ends of this project agree on in the websocket upgrade.
//!
//! The connector lists what it speaks in the [`HEADER`] of its upgrade request; an acceptor
//! that is configured to speak some of it answers the common part in the same header of its
//! 101 response. An extension is on only when both said it, and then on both ends for the
//! whole session. A Go peer never sends the header, and a Go server never answers it (gorilla
//! ignores unknown request headers), so a Go peer always gets the plain remotedialer protocol,
//! byte for byte (design.md, "Compatibility is a feature").
//!
//! The one extension so far is `credit-windows`: per-stream credit windows, smaller Data frames
//! while an interactive stream is active, and small frames first
//! ([`crate::SessionConfig::credit_window`]).

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{DEFAULT_CREDIT_WINDOW, SessionConfig};

/// The upgrade request and 101 response header that carries the extensions.
pub const HEADER: HeaderName = HeaderName::from_static("x-tunnel-capabilities");

/// The token for per-stream credit windows (version 1 of their wire form: WindowUpdate, type
/// 32, one varint increment).
pub const CREDIT_WINDOWS: &str = "credit-windows/1";

/// A set of extensions: offered, answered, or agreed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Per-stream credit windows.
    pub credit_windows: bool,
}

impl Capabilities {
    /// No extension: the plain protocol.
    pub const NONE: Capabilities = Capabilities {
        credit_windows: false,
    };

    /// Every extension this version speaks.
    pub const ALL: Capabilities = Capabilities {
        credit_windows: true,
    };

    /// Whether no extension is in the set.
    pub fn is_empty(self) -> bool {
        self == Self::NONE
    }

    /// The set named in `headers` (every [`HEADER`] value, comma-separated tokens, case
    /// insensitive). Unknown tokens are ignored: a newer peer may offer more.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut found = Self::NONE;
        for value in headers.get_all(HEADER) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case(CREDIT_WINDOWS) {
                    found.credit_windows = true;
                }
            }
        }
        found
    }

    /// The header value naming this set, or `None` for the empty set (then no header is sent).
    pub fn header_value(self) -> Option<HeaderValue> {
        self.credit_windows
            .then(|| HeaderValue::from_static(CREDIT_WINDOWS))
    }

    /// What both sets hold.
    pub fn intersect(self, other: Capabilities) -> Capabilities {
        Capabilities {
            credit_windows: self.credit_windows && other.credit_windows,
        }
    }

    /// The acceptor's side: what to agree to, given the request's headers and what this
    /// acceptor is willing to speak. Answer it with [`Capabilities::header_value`] in the 101
    /// response, and run the session with [`Capabilities::apply`].
    pub fn answer(request: &HeaderMap, willing: Capabilities) -> Capabilities {
        Self::from_headers(request).intersect(willing)
    }

    /// Turns the agreed extensions on in a session's configuration (and leaves it as it is for
    /// the empty set).
    pub fn apply(self, config: &mut SessionConfig) {
        if self.credit_windows {
            config.credit_window(Some(DEFAULT_CREDIT_WINDOW));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_found_in_any_value_and_case() {
        assert!(Capabilities::from_headers(&headers(&["Credit-Windows/1"])).credit_windows);
        assert!(
            Capabilities::from_headers(&headers(&["future-thing, credit-windows/1"]))
                .credit_windows
        );
        assert!(Capabilities::from_headers(&headers(&["x", "credit-windows/1"])).credit_windows);
        assert!(Capabilities::from_headers(&headers(&["credit-windows/2"])).is_empty());
        assert!(Capabilities::from_headers(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn only_what_both_say_is_agreed() {
        let offer = headers(&[CREDIT_WINDOWS]);
        assert_eq!(
            Capabilities::answer(&offer, Capabilities::ALL),
            Capabilities::ALL
        );
        assert_eq!(
            Capabilities::answer(&offer, Capabilities::NONE),
            Capabilities::NONE
        );
        assert_eq!(
            Capabilities::answer(&HeaderMap::new(), Capabilities::ALL),
            Capabilities::NONE
        );
        assert_eq!(Capabilities::NONE.header_value(), None);
    }

    #[test]
    fn apply_sets_the_window_only_when_agreed() {
        let mut config = SessionConfig::new(crate::Role::Client);
        Capabilities::NONE.apply(&mut config);
        assert_eq!(config.credit_window_size(), None);
        Capabilities::ALL.apply(&mut config);
        assert_eq!(config.credit_window_size(), Some(DEFAULT_CREDIT_WINDOW));
    }
}
