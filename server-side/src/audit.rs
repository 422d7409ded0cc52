//! Audit lines of admin mutations, on the `/v1` API and in the CLI: one line each (tracing target
//! `audit`, like the proxied requests' lines in [`crate::proxy`]) saying who did what, to which
//! object, and how it ended; the log line's timestamp says when.
//!
//! ```text
//! INFO audit: admin mutation user=root via="api" verb="create" object="cluster" id="c-x2k9b (prod)" outcome="ok" detail="201"
//! INFO audit: admin mutation user=cli:alice via="cli" verb="revoke" object="api-token" id="token-b4kxq" outcome="ok" detail="-"
//! ```
//!
//! Registration tokens are secrets (agents send them verbatim), so they appear shortened.

/// What a mutation did and to what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// `create`, `delete`, `update`, `revoke`.
    pub verb: &'static str,
    /// `cluster`, `registration-token`, `node`, `user`, `api-token`, `grant`.
    pub object: &'static str,
    /// The object: its id, name, or both.
    pub id: String,
}

impl Mutation {
    /// A mutation of `object` `id`.
    pub fn new(verb: &'static str, object: &'static str, id: impl Into<String>) -> Self {
        Self {
            verb,
            object,
            id: id.into(),
        }
    }
}

/// How a mutation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused: not found, conflict, bad input, not allowed.
    Refused,
    /// Failed on our side (store error, busy).
    Failed,
}

impl Outcome {
    /// The outcome of an HTTP answer.
    pub fn of_status(status: http::StatusCode) -> Self {
        if status.is_success() {
            Self::Ok
        } else if status.is_client_error() {
            Self::Refused
        } else {
            Self::Failed
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// Logs one mutation: `who` (a user name, or `cli:<os user>`), `via` (`api`, `cli`), and a
/// detail (the HTTP status, or the CLI's error).
pub fn log(who: &str, via: &'static str, m: &Mutation, outcome: Outcome, detail: &str) {
    tracing::info!(
        target: "audit",
        user = %who,
        via,
        verb = m.verb,
        object = m.object,
        id = m.id.as_str(),
        outcome = outcome.as_str(),
        detail,
        "admin mutation"
    );
}

/// Who runs the CLI: `cli:` and the OS user (`$USER`, else `uid=N`).
pub fn cli_user() -> String {
    let name = std::env::var("USER").ok().filter(|u| !u.is_empty());
    let name = name.unwrap_or_else(|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata("/proc/self") {
                return format!("uid={}", m.uid());
            }
        }
        "unknown".to_owned()
    });
    format!("cli:{name}")
}

/// A secret shortened for a log line: its first 5 characters.
pub fn redact(secret: &str) -> String {
    let head: String = secret.chars().take(5).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_shortened_and_outcomes_follow_the_status() {
        assert_eq!(redact("bcdfghjklmn"), "bcdfg…");
        assert_eq!(redact("ab"), "ab…");
        assert_eq!(Outcome::of_status(http::StatusCode::CREATED), Outcome::Ok);
        assert_eq!(
            Outcome::of_status(http::StatusCode::NOT_FOUND),
            Outcome::Refused
        );
        assert_eq!(
            Outcome::of_status(http::StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Failed
        );
        assert!(cli_user().starts_with("cli:"));
    }
}
