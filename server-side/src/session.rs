//! Browser sessions of the web console ([`crate::console`]): a user signs in once with an API
//! token and the browser then holds only a session cookie, never the token itself.
//!
//! Why the server keeps the token: every request the console makes goes to the same REST API,
//! Kubernetes proxy and Docker proxy that the CLI and kubectl use (`/v1`, `/k8s`, `/docker`).
//! [`Sessions::authorize`] turns the session cookie back into `Authorization: Bearer <token>`
//! before those handlers run, so authentication, admin checks, grants, impersonation, the
//! failed-authentication limit and auditing stay in one place, and a revoked or expired token
//! stops its sessions at the next request.
//!
//! The cookie is `HttpOnly` (scripts cannot read it), `Secure` (HTTPS only) and
//! `SameSite=Strict` (no cross-site request carries it). On top of that every mutation (any
//! method but GET, HEAD and OPTIONS) must carry the session's CSRF token in
//! [`CSRF_HEADER`] (the synchronizer-token pattern): the console reads it from the sign-in
//! answer, a cross-site page cannot. Both are compared in constant time. A connection upgrade
//! (websocket, SPDY: `exec`, `attach`, `port-forward`) counts as a mutation whatever its
//! method: a browser's WebSocket cannot set headers, so a page of another origin of the same
//! site (which SameSite does not stop) cannot open one on the user's session. The console's
//! own websockets (a pod's shell) offer the token as one more subprotocol,
//! [`CSRF_PROTOCOL_PREFIX`]`<token>` in `Sec-WebSocket-Protocol` (the one header a browser lets
//! a page set, and one another origin's page cannot fill with the token either, as Kubernetes
//! does for bearer tokens); [`Sessions::authorize`] takes it out of the list before the
//! request goes on and checks it exactly as the header.
//!
//! Bounds: at most [`SessionLimits::max_sessions`] live sessions (expired ones are dropped
//! first; when all are live the oldest goes), each living [`SessionLimits::ttl`] from sign-in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::header::{AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderMap, HeaderValue, Method};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// Name of the session cookie.
pub const COOKIE_NAME: &str = "tunnel_session";

/// Header that carries the CSRF token on mutations.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Prefix of the `Sec-WebSocket-Protocol` entry by which a browser's websocket, which cannot
/// set [`CSRF_HEADER`], sends the CSRF token (a token is URL-safe base64, all valid
/// protocol-name characters).
pub const CSRF_PROTOCOL_PREFIX: &str = "csrf.tunnel-server.";

/// Bytes of randomness in a session id and in a CSRF token (256 bits).
const SECRET_BYTES: usize = 32;

/// Bounds on sessions.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// How long a session lives from sign-in. Default 8 hours: a working day, after which the
    /// user signs in again with the token.
    pub ttl: Duration,
    /// Live sessions kept at most. Default 10 000 (each is about 200 bytes).
    pub max_sessions: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(8 * 3600),
            max_sessions: 10_000,
        }
    }
}

/// Why a request with a session cookie is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The cookie names no live session (signed out, expired, or the server restarted).
    #[error("no such session (signed out or expired): sign in again")]
    Unknown,
    /// A mutation without the session's CSRF token.
    #[error("missing {CSRF_HEADER} header on a state-changing request")]
    MissingCsrf,
    /// A mutation with another token than the session's.
    #[error("the {CSRF_HEADER} header does not match the session")]
    BadCsrf,
}

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The API token the user signed in with; the requests are made with it.
    api_token: String,
    /// What mutations must send in [`CSRF_HEADER`].
    pub csrf: String,
    created: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither secret goes to a log.
        f.debug_struct("Session")
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// The live sessions, by session id (the cookie's value).
#[derive(Debug, Default)]
pub struct Sessions {
    limits: SessionLimits,
    map: Mutex<HashMap<String, Session>>,
}

/// 256 random bits, URL-safe base64 without padding (43 characters).
fn secret() -> String {
    let mut buf = [0u8; SECRET_BYTES];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the operating system's random source failed");
    data_encoding::BASE64URL_NOPAD.encode(&buf)
}

/// Whether a request with this method changes state and so needs the CSRF token.
pub fn is_mutation(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The value of our cookie in a request's `Cookie` headers, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

impl Sessions {
    /// Sessions with these bounds.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for a token the caller has authenticated; returns its id and CSRF
    /// token.
    pub fn create(&self, api_token: &str, now: Instant) -> (String, String) {
        let id = secret();
        let session = Session {
            api_token: api_token.to_owned(),
            csrf: secret(),
            created: now,
        };
        let csrf = session.csrf.clone();
        let mut map = self.lock();
        if map.len() >= self.limits.max_sessions {
            let ttl = self.limits.ttl;
            map.retain(|_, s| now.duration_since(s.created) < ttl);
        }
        if map.len() >= self.limits.max_sessions
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), session);
        (id, csrf)
    }

    /// The live session of an id.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.lock();
        let session = map.get(id)?;
        if now.duration_since(session.created) >= self.limits.ttl {
            map.remove(id);
            return None;
        }
        Some(session.clone())
    }

    /// Ends a session; whether it existed.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    /// Live sessions (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For a request to the API or the proxies: when it carries no `Authorization` but our
    /// cookie, checks the session (and on a mutation its CSRF token) and sets
    /// `Authorization: Bearer` to the session's token, so the handlers authenticate and
    /// authorise it exactly as a CLI request. A request with its own `Authorization` (the CLI,
    /// kubectl) or without the cookie is left alone.
    pub fn authorize(
        &self,
        method: &Method,
        headers: &mut HeaderMap,
        now: Instant,
    ) -> Result<(), SessionError> {
        if headers.contains_key(AUTHORIZATION) {
            return Ok(());
        }
        let Some(id) = session_cookie(headers) else {
            return Ok(());
        };
        let session = self.get(id, now).ok_or(SessionError::Unknown)?;
        if headers.contains_key(UPGRADE) && !headers.contains_key(CSRF_HEADER) {
            csrf_from_protocols(headers);
        }
        if is_mutation(method) || headers.contains_key(UPGRADE) {
            check_csrf(&session, headers)?;
        }
        let bearer = HeaderValue::from_str(&format!("Bearer {}", session.api_token))
            .map_err(|_| SessionError::Unknown)?;
        headers.insert(AUTHORIZATION, bearer);
        Ok(())
    }

    /// The `Set-Cookie` value that stores a session id.
    pub fn set_cookie(&self, id: &str) -> String {
        format!(
            "{COOKIE_NAME}={id}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
            self.limits.ttl.as_secs()
        )
    }
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// Moves a [`CSRF_PROTOCOL_PREFIX`] entry of `Sec-WebSocket-Protocol` into [`CSRF_HEADER`] and
/// takes it out of the list (the upstream never sees it, and never picks it as the protocol);
/// the header goes when nothing else is left in it. Several such entries: none is taken, so
/// the check fails as without a token.
fn csrf_from_protocols(headers: &mut HeaderMap) {
    let offered: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let (tokens, rest): (Vec<&String>, Vec<&String>) = offered
        .iter()
        .partition(|p| p.starts_with(CSRF_PROTOCOL_PREFIX));
    if tokens.is_empty() {
        return;
    }
    headers.remove(SEC_WEBSOCKET_PROTOCOL);
    if !rest.is_empty() {
        let joined = rest
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    if let [token] = tokens.as_slice()
        && let Ok(v) = HeaderValue::from_str(&token[CSRF_PROTOCOL_PREFIX.len()..])
    {
        headers.insert(CSRF_HEADER, v);
    }
}

/// Checks a request's [`CSRF_HEADER`] against its session's token, in constant time.
pub fn check_csrf(session: &Session, headers: &HeaderMap) -> Result<(), SessionError> {
    let sent = headers
        .get(CSRF_HEADER)
        .ok_or(SessionError::MissingCsrf)?
        .as_bytes();
    if bool::from(sent.ct_eq(session.csrf.as_bytes())) {
        Ok(())
    } else {
        Err(SessionError::BadCsrf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE_NAME}={id}; other=1")).unwrap(),
        );
        h
    }

    #[test]
    fn a_read_with_the_cookie_gets_the_sessions_bearer() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, _) = sessions.create("api-token-1", now);
        let mut h = with_cookie(&id);
        sessions.authorize(&Method::GET, &mut h, now).unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer api-token-1");
    }

    #[test]
    fn a_mutation_needs_the_sessions_csrf_token() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, csrf) = sessions.create("t", now);

        let mut h = with_cookie(&id);
        assert_eq!(
            sessions.authorize(&Method::POST, &mut h, now),
            Err(SessionError::MissingCsrf)
        );
        assert!(!h.contains_key(AUTHORIZATION));

        let (_, other_csrf) = sessions.create("t2", now);
        let mut h = with_cookie(&id);
        h.insert(CSRF_HEADER, HeaderValue::from_str(&other_csrf).unwrap());
        assert_eq!(
            sessions.authorize(&Method::DELETE, &mut h, now),
            Err(SessionError::BadCsrf)
        );
        assert!(!h.contains_key(AUTHORIZATION));

        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let mut h = with_cookie(&id);
            h.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
            sessions.authorize(&method, &mut h, now).unwrap();
            assert_eq!(h[AUTHORIZATION], "Bearer t", "{method}");
        }
    }

    #[test]
    fn an_upgrade_needs_the_csrf_token_even_as_a_get() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, csrf) = sessions.create("t", now);
        let mut h = with_cookie(&id);
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::MissingCsrf)
        );
        h.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        sessions.authorize(&Method::GET, &mut h, now).unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn a_websocket_may_offer_the_csrf_token_as_a_subprotocol_which_is_then_removed() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, csrf) = sessions.create("t", now);
        let (_, other_csrf) = sessions.create("t2", now);
        let ws = |protocols: &str| {
            let mut h = with_cookie(&id);
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(
                SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(protocols).unwrap(),
            );
            h
        };

        let mut h = ws(&format!(
            "v5.channel.k8s.io, {CSRF_PROTOCOL_PREFIX}{csrf}, v4.channel.k8s.io"
        ));
        sessions.authorize(&Method::GET, &mut h, now).unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer t");
        assert_eq!(
            h[SEC_WEBSOCKET_PROTOCOL],
            "v5.channel.k8s.io, v4.channel.k8s.io"
        );

        let mut h = ws(&format!(
            "v5.channel.k8s.io, {CSRF_PROTOCOL_PREFIX}{other_csrf}"
        ));
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::BadCsrf)
        );
        assert!(!h.contains_key(AUTHORIZATION));

        let mut h = ws(CSRF_PROTOCOL_PREFIX);
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::BadCsrf)
        );

        let mut h = ws(&format!(
            "{CSRF_PROTOCOL_PREFIX}{csrf}, {CSRF_PROTOCOL_PREFIX}{other_csrf}"
        ));
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::MissingCsrf)
        );

        let mut h = ws("v5.channel.k8s.io");
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::MissingCsrf)
        );

        // The token as the only entry: the header goes entirely.
        let mut h = ws(&format!("{CSRF_PROTOCOL_PREFIX}{csrf}"));
        sessions.authorize(&Method::GET, &mut h, now).unwrap();
        assert!(!h.contains_key(SEC_WEBSOCKET_PROTOCOL));

        // Without an upgrade the protocol list is not a place for the token.
        let mut h = with_cookie(&id);
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&format!("{CSRF_PROTOCOL_PREFIX}{csrf}")).unwrap(),
        );
        assert_eq!(
            sessions.authorize(&Method::POST, &mut h, now),
            Err(SessionError::MissingCsrf)
        );
    }

    #[test]
    fn an_unknown_expired_or_removed_session_is_refused() {
        let limits = SessionLimits {
            ttl: Duration::from_secs(60),
            ..SessionLimits::default()
        };
        let sessions = Sessions::new(limits);
        let now = Instant::now();
        let mut h = with_cookie("no-such-session");
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now),
            Err(SessionError::Unknown)
        );

        let (id, _) = sessions.create("t", now);
        assert!(sessions.get(&id, now + Duration::from_secs(59)).is_some());
        let mut h = with_cookie(&id);
        assert_eq!(
            sessions.authorize(&Method::GET, &mut h, now + Duration::from_secs(60)),
            Err(SessionError::Unknown)
        );
        assert!(sessions.is_empty(), "the expired session was dropped");

        let (id, _) = sessions.create("t", now);
        assert!(sessions.remove(&id));
        assert!(sessions.get(&id, now).is_none());
    }

    #[test]
    fn requests_with_their_own_authorization_or_no_cookie_are_left_alone() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, _) = sessions.create("session-token", now);
        let mut h = with_cookie(&id);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer cli-token"));
        sessions.authorize(&Method::POST, &mut h, now).unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer cli-token");

        let mut h = HeaderMap::new();
        sessions.authorize(&Method::POST, &mut h, now).unwrap();
        assert!(!h.contains_key(AUTHORIZATION));
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let sessions = Sessions::new(SessionLimits {
            ttl: Duration::from_secs(3600),
            max_sessions: 3,
        });
        let t0 = Instant::now();
        let ids: Vec<String> = (0..5)
            .map(|i| sessions.create("t", t0 + Duration::from_secs(i)).0)
            .collect();
        assert_eq!(sessions.len(), 3);
        let now = t0 + Duration::from_secs(10);
        assert!(sessions.get(&ids[0], now).is_none());
        assert!(sessions.get(&ids[1], now).is_none());
        assert!(ids[2..].iter().all(|id| sessions.get(id, now).is_some()));
    }

    #[test]
    fn ids_and_csrf_tokens_are_long_and_distinct() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (a, ca) = sessions.create("t", now);
        let (b, cb) = sessions.create("t", now);
        assert_eq!(a.len(), 43);
        assert_eq!(ca.len(), 43);
        assert!(a != b && ca != cb && a != ca);
    }

    #[test]
    fn the_cookie_is_http_only_secure_and_same_site_strict() {
        let sessions = Sessions::default();
        let c = sessions.set_cookie("abc");
        assert!(c.starts_with("tunnel_session=abc; Path=/;"));
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Max-Age=28800"] {
            assert!(c.split("; ").any(|a| a == attr), "{c} lacks {attr}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_an_empty_one_is_none() {
        assert_eq!(session_cookie(&with_cookie("x1")), Some("x1"));
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("tunnel_session="));
        assert_eq!(session_cookie(&h), None);
        h.insert(COOKIE, HeaderValue::from_static("tunnel_sessionx=1"));
        assert_eq!(session_cookie(&h), None);
    }
}
