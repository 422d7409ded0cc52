//! Where configuration strings come from, and how bad ones are reported.
//!
//! As in linkerd2-proxy's `app/src/env.rs`, every setting is read through the small [`Strings`]
//! trait: the binaries pass the process environment merged with their command-line flags,
//! tests pass a `HashMap`, so no test ever mutates the process environment. Parsing never
//! stops at the first bad value: each problem is pushed onto [`ConfigErrors`], and the agent
//! reports them all in one message before exiting non-zero.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

// === names ===

/// Server URL (`https://rancher.example.com`), for the pre-flight GETs; also the tunnel URL
/// when `/cattle-credentials/url` is absent.
pub const ENV_SERVER: &str = "CATTLE_SERVER";
/// Registration token, when `/cattle-credentials/token` is absent (docker-run node agents).
pub const ENV_TOKEN: &str = "CATTLE_TOKEN";
/// Lower-case hex SHA-256 of the server CA PEM plus one newline; empty means no pinning.
pub const ENV_CA_CHECKSUM: &str = "CATTLE_CA_CHECKSUM";
/// Strict CA mode (`agent-tls-mode: strict`).
pub const ENV_STRICT_VERIFY: &str = "STRICT_VERIFY";
/// `true`: always dial `/v3/connect`, never `/register`.
pub const ENV_AGENT_CONNECT: &str = "CATTLE_AGENT_CONNECT";
/// Debug logging.
pub const ENV_DEBUG: &str = "CATTLE_DEBUG";
/// Trace logging (wins over debug).
pub const ENV_TRACE: &str = "CATTLE_TRACE";
/// Directory holding the `url` and `token` files (this project's name; Rancher mounts
/// `/cattle-credentials`).
pub const ENV_CREDENTIALS_DIR: &str = "CATTLE_CREDENTIALS_DIR";
/// Directory of the `connected` marker file (this project's name; Rancher uses its working
/// directory `/var/lib/rancher`).
pub const ENV_STATE_DIR: &str = "CATTLE_AGENT_STATE_DIR";
/// Listen address of the health and metrics endpoint (this project's).
pub const ENV_HEALTH_ADDR: &str = "CATTLE_AGENT_HEALTH_ADDR";
/// How long open streams may finish after SIGTERM (this project's).
pub const ENV_SHUTDOWN_GRACE: &str = "CATTLE_AGENT_SHUTDOWN_GRACE";
/// How long a stream may move no bytes after SIGTERM before it is closed (this project's).
pub const ENV_SHUTDOWN_IDLE: &str = "CATTLE_AGENT_SHUTDOWN_IDLE";
/// First reconnect delay (this project's).
pub const ENV_BACKOFF_MIN: &str = "CATTLE_AGENT_BACKOFF_MIN";
/// Reconnect delay cap (this project's).
pub const ENV_BACKOFF_MAX: &str = "CATTLE_AGENT_BACKOFF_MAX";
/// Proxy for `http://` and `ws://` (Go also reads the lower-case form).
pub const ENV_HTTP_PROXY: &str = "HTTP_PROXY";
/// Proxy for `https://` and `wss://` (Go also reads the lower-case form).
pub const ENV_HTTPS_PROXY: &str = "HTTPS_PROXY";
/// Hosts reached directly (Go also reads the lower-case form).
pub const ENV_NO_PROXY: &str = "NO_PROXY";

// === Strings ===

/// A source of configuration strings keyed by environment-variable name.
pub trait Strings {
    /// The raw value of `key`, or `None` when unset.
    fn get(&self, key: &str) -> Option<String>;

    /// The value of `key`, with an empty value treated as unset (as `run.sh`'s `[ -z ]` does).
    fn get_nonempty(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.is_empty())
    }
}

impl<S: BuildHasher> Strings for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl<S: BuildHasher> Strings for HashMap<&str, &str, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

impl<S: BuildHasher> Strings for HashMap<&str, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl<T: Strings + ?Sized> Strings for &T {
    fn get(&self, key: &str) -> Option<String> {
        (**self).get(key)
    }
}

/// The process environment. Only the binaries' `main` uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Strings for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

/// `first`, then `second` for keys `first` does not set: the parsed flags over the process
/// environment (for the lower-case proxy variables clap does not read).
#[derive(Debug, Clone)]
pub struct Layered<A, B>(pub A, pub B);

impl<A: Strings, B: Strings> Strings for Layered<A, B> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).or_else(|| self.1.get(key))
    }
}

/// Lets tunnel-proto's `ProxyConfig::from_env` read through a [`Strings`].
#[derive(Debug)]
pub struct EnvSourceAdapter<'a, S: ?Sized>(pub &'a S);

impl<S: Strings + ?Sized> tunnel_proto::driver::connector::EnvSource for EnvSourceAdapter<'_, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name)
    }
}

// === errors ===

/// One bad or missing setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting is not set.
    #[error("{name} is not set{hint}")]
    Missing {
        /// The variable (and flag) name.
        name: String,
        /// What to do about it, starting with "; " (or empty).
        hint: String,
    },
    /// A setting has a value that does not parse.
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        /// The variable name.
        name: String,
        /// The value as given (secrets are redacted by the caller).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is unusable for a reason the message states in full.
    #[error("{name}: {reason}")]
    Other {
        /// The variable name(s).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file the configuration points at cannot be used.
    #[error("{what} {path}: {reason}")]
    File {
        /// What the file is for.
        what: String,
        /// Its path.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    /// A missing setting, with a hint.
    pub fn missing(name: impl Into<String>, hint: impl Into<String>) -> Self {
        let hint = hint.into();
        Self::Missing {
            name: name.into(),
            hint: if hint.is_empty() {
                hint
            } else {
                format!("; {hint}")
            },
        }
    }

    /// A value that does not parse.
    pub fn invalid(
        name: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            name: name.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// An unusable file.
    pub fn file(
        what: impl Into<String>,
        path: impl fmt::Display,
        reason: impl fmt::Display,
    ) -> Self {
        Self::File {
            what: what.into(),
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Every configuration problem found, reported together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Records `err`.
    pub fn push(&mut self, err: ConfigError) {
        self.0.push(err);
    }

    /// Takes the value of `result`, recording its error (and returning `None`) if it failed.
    pub fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was recorded, else every recorded error.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }

    /// Appends another set of errors.
    pub fn extend(&mut self, other: ConfigErrors) {
        self.0.extend(other.0);
    }

    /// Whether any error names `name` (for tests).
    pub fn names(&self, name: &str) -> bool {
        self.0.iter().any(|e| match e {
            ConfigError::Missing { name: n, .. }
            | ConfigError::Invalid { name: n, .. }
            | ConfigError::Other { name: n, .. } => n.split('/').any(|part| part == name),
            ConfigError::File { what, .. } => what.contains(name),
        })
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for err in &self.0 {
            write!(f, "\n  - {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === typed parsers ===

/// A boolean: `true/false`, `1/0`, `yes/no`, `on/off` (any case). Unset or empty gives
/// `default`. Go's agent treats anything but `true` as false; a typo here is an error instead,
/// so `STRICT_VERIFY=ture` does not silently turn strict mode off.
pub fn parse_bool(strings: &impl Strings, name: &str, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = strings.get_nonempty(name) else {
        return Ok(default);
    };
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(
            name,
            raw,
            "not a boolean (use true or false)",
        )),
    }
}

/// A duration: `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds. Unset or empty gives
/// `default`.
pub fn parse_duration(
    strings: &impl Strings,
    name: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    let Some(raw) = strings.get_nonempty(name) else {
        return Ok(default);
    };
    parse_duration_str(raw.trim())
        .ok_or_else(|| ConfigError::invalid(name, raw, "not a duration (e.g. 30s, 500ms, 2m)"))
}

fn duration_from_str(s: &str) -> Option<std::time::Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (number, unit) = if split == 0 {
        return None;
    } else {
        s.split_at(split)
    };
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| std::time::Duration::from_secs_f64(secs))
}

/// Parses a duration string as [`parse_duration`] does.
pub fn parse_duration_str(s: &str) -> Option<std::time::Duration> {
    if let Ok(secs) = s.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    duration_from_str(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn booleans() {
        let env: HashMap<&str, &str> = [("A", "TRUE"), ("B", "0"), ("C", ""), ("D", "ture")]
            .into_iter()
            .collect();
        assert_eq!(parse_bool(&env, "A", false), Ok(true));
        assert_eq!(parse_bool(&env, "B", true), Ok(false));
        assert_eq!(parse_bool(&env, "C", true), Ok(true));
        assert_eq!(parse_bool(&env, "missing", false), Ok(false));
        assert!(parse_bool(&env, "D", false).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_str("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration_str("30s"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_duration_str("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration_str("2m"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_duration_str("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_duration_str("s"), None);
        assert_eq!(parse_duration_str("5 parsecs"), None);
    }

    #[test]
    fn errors_are_reported_together() {
        let mut errs = ConfigErrors::default();
        errs.push(ConfigError::missing("CATTLE_SERVER", "set --server"));
        errs.push(ConfigError::invalid(
            "STRICT_VERIFY",
            "ture",
            "not a boolean",
        ));
        let text = errs.to_string();
        assert!(
            text.starts_with("invalid configuration (2 problems):"),
            "{text}"
        );
        assert!(
            text.contains("CATTLE_SERVER is not set; set --server"),
            "{text}"
        );
        assert!(
            text.contains("STRICT_VERIFY=\"ture\": not a boolean"),
            "{text}"
        );
    }
}
