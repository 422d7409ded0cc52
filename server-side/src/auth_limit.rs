//! Rate limit on failed authentications, per client address.
//!
//! Each address has a token bucket of `burst` tokens refilled at `refill_per_sec`. Only a
//! **failed** authentication takes a token; a request from an address whose bucket holds less
//! than one token is refused before any store lookup, and success costs nothing. So agents
//! behind one NAT address can connect as often as they like; what they share is the failure
//! budget: once someone behind that address has used it up, every request from there is
//! refused until a token has refilled, except requests presenting a credential this server
//! process has already accepted ([`KnownGood`]), which go through to the normal checks.
//!
//! ```text
//!   request ──▶ known-good credential? ──yes──────────────────────┐
//!                    │ no                                          ▼
//!                    └─▶ AuthLimiter::check(addr) ──Refuse──▶ refused (no store lookup)
//!                                │ Allow                           │
//!                                ▼                                 ▼
//!                          authorizer chain (store) ──failed credential──▶ record_failure(addr)
//!                                              └──authenticated──▶ KnownGood::insert
//! ```
//!
//! Addresses are TCP peers: IPv4 as is, IPv6 by its /64 (one host usually holds a whole /64,
//! so counting single IPv6 addresses would give it millions of buckets), IPv4-mapped IPv6 as
//! IPv4. `X-Forwarded-For` is never used: the server terminates TLS itself and has no notion of
//! a trusted proxy, so the header is whatever the client chose to send.
//!
//! Memory is bounded: at most `max_addresses` buckets. A bucket that has refilled completely
//! (and is past its log window) says nothing and is dropped by a sweep, run at most every
//! [`SWEEP_INTERVAL`] and whenever the table is full; if the table is still full, the fullest
//! bucket of a small sample is evicted, which at worst hands that address a fresh budget.
//!
//! Sans-IO: every method takes `now`, so tests drive time by hand.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Default for [`AuthLimitConfig::burst`].
pub const DEFAULT_BURST: u32 = 10;
/// Default for [`AuthLimitConfig::refill_per_sec`].
pub const DEFAULT_REFILL_PER_SEC: f64 = 1.0;
/// Default for [`AuthLimitConfig::max_addresses`].
pub const DEFAULT_MAX_ADDRESSES: usize = 65_536;
/// An address that keeps being refused is logged at most once per this window.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Idle buckets are swept at most this often (and whenever the table is full).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How many buckets are looked at to pick one to evict from a full table.
const EVICTION_SAMPLE: usize = 8;

/// Limiter settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthLimitConfig {
    /// Failed authentications an address may make in a row before it is refused (default 10);
    /// 0 disables the limiter.
    pub burst: u32,
    /// Failures regained per second (default 1): a refused address waits `1 / refill_per_sec`
    /// seconds for its next attempt.
    pub refill_per_sec: f64,
    /// Most addresses tracked at once (default 65 536; about 100 bytes each).
    pub max_addresses: usize,
}

impl Default for AuthLimitConfig {
    fn default() -> Self {
        Self {
            burst: DEFAULT_BURST,
            refill_per_sec: DEFAULT_REFILL_PER_SEC,
            max_addresses: DEFAULT_MAX_ADDRESSES,
        }
    }
}

/// Why an [`AuthLimitConfig`] was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthLimitConfigError {
    /// The refill rate is not a positive, finite number.
    #[error("the refill rate must be a positive number of failures per second, not {0}")]
    Refill(f64),
    /// No room for a single address.
    #[error("the address table must hold at least one address")]
    Table,
}

impl AuthLimitConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), AuthLimitConfigError> {
        if !(self.refill_per_sec.is_finite() && self.refill_per_sec > 0.0) {
            return Err(AuthLimitConfigError::Refill(self.refill_per_sec));
        }
        if self.max_addresses == 0 {
            return Err(AuthLimitConfigError::Table);
        }
        Ok(())
    }
}

/// The address a bucket belongs to: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    /// The key of a peer address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The limiter's answer to [`AuthLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Go on with the authentication.
    Allow,
    /// Refuse without looking anything up.
    Refuse {
        /// When the address has a token again.
        retry_after: Duration,
        /// `Some(n)` when this refusal is the first of a log window: log one line saying `n`
        /// requests were refused since the previous line (this one included).
        log: Option<u64>,
    },
}

impl Verdict {
    /// `retry_after` in whole seconds, rounded up, at least 1 (`Retry-After` takes seconds).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Allow => 0,
            Self::Refuse { retry_after, .. } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
        }
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    logged_at: Option<Instant>,
    refused_since_log: u64,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<AddrKey, Bucket>,
    swept_at: Option<Instant>,
}

/// Per-address token buckets of failed authentications (module docs).
#[derive(Debug)]
pub struct AuthLimiter {
    config: AuthLimitConfig,
    table: Mutex<Table>,
}

impl AuthLimiter {
    /// A limiter with `config` (which should have passed [`AuthLimitConfig::validate`]; a bad
    /// rate is replaced by the default and an empty table by one address).
    pub fn new(mut config: AuthLimitConfig) -> Self {
        if config.validate().is_err() {
            config.refill_per_sec = DEFAULT_REFILL_PER_SEC;
            config.max_addresses = config.max_addresses.max(1);
        }
        Self {
            config,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                swept_at: None,
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AuthLimitConfig {
        &self.config
    }

    fn enabled(&self) -> bool {
        self.config.burst > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings a bucket up to `now`.
    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.config.refill_per_sec)
            .min(f64::from(self.config.burst));
        bucket.updated = now;
    }

    /// Whether a request from `addr` may be authenticated: call before any lookup.
    pub fn check(&self, addr: AddrKey, now: Instant) -> Verdict {
        if !self.enabled() {
            return Verdict::Allow;
        }
        let mut table = self.lock();
        let Some(bucket) = table.buckets.get_mut(&addr) else {
            return Verdict::Allow;
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            return Verdict::Allow;
        }
        let retry_after =
            Duration::from_secs_f64((1.0 - bucket.tokens) / self.config.refill_per_sec);
        bucket.refused_since_log += 1;
        let log = match bucket.logged_at {
            Some(at) if now.saturating_duration_since(at) < LOG_WINDOW => None,
            _ => {
                bucket.logged_at = Some(now);
                Some(std::mem::take(&mut bucket.refused_since_log))
            }
        };
        Verdict::Refuse { retry_after, log }
    }

    /// A request from `addr` failed authentication: takes one token.
    pub fn record_failure(&self, addr: AddrKey, now: Instant) {
        if !self.enabled() {
            return;
        }
        let mut table = self.lock();
        let due = table
            .swept_at
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_INTERVAL);
        if due {
            self.sweep(&mut table, now);
        }
        if !table.buckets.contains_key(&addr) && table.buckets.len() >= self.config.max_addresses {
            self.sweep(&mut table, now);
            if table.buckets.len() >= self.config.max_addresses {
                self.evict_one(&mut table, now);
            }
        }
        let burst = f64::from(self.config.burst);
        let bucket = table.buckets.entry(addr).or_insert(Bucket {
            tokens: burst,
            updated: now,
            logged_at: None,
            refused_since_log: 0,
        });
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Drops the buckets that carry no information: full again and past their log window.
    fn sweep(&self, table: &mut Table, now: Instant) {
        table.swept_at = Some(now);
        let burst = f64::from(self.config.burst);
        let rate = self.config.refill_per_sec;
        table.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            let full = b.tokens + elapsed * rate >= burst;
            let quiet = b
                .logged_at
                .is_none_or(|at| now.saturating_duration_since(at) >= LOG_WINDOW);
            !(full && quiet)
        });
    }

    /// Makes room in a full table: of a few buckets (in the map's arbitrary order), evicts the
    /// one with the most tokens, i.e. the address least in debt.
    fn evict_one(&self, table: &mut Table, now: Instant) {
        let rate = self.config.refill_per_sec;
        let victim = table
            .buckets
            .iter()
            .take(EVICTION_SAMPLE)
            .map(|(k, b)| {
                let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
                (*k, b.tokens + elapsed * rate)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k);
        if let Some(k) = victim {
            table.buckets.remove(&k);
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.lock().buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// === impl KnownGood ===

/// Default for [`KnownGood::new`]'s capacity.
pub const DEFAULT_KNOWN_GOOD: usize = 4096;

/// Digests (SHA-256) of credentials this server process has accepted. A request presenting one
/// skips the limiter (it still goes through every normal check), so an agent that has
/// connected before is not locked out by failures of others behind the same address. A
/// credential that fails is forgotten at once. Bounded: when full, the oldest entry goes.
#[derive(Debug)]
pub struct KnownGood {
    capacity: usize,
    digests: Mutex<HashMap<[u8; 32], Instant>>,
}

impl KnownGood {
    /// Remembers at most `capacity` credentials.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            digests: Mutex::new(HashMap::new()),
        }
    }

    fn digest(credential: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Instant>> {
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `credential` was accepted before (and not failed since).
    pub fn contains(&self, credential: &str) -> bool {
        !credential.is_empty() && self.lock().contains_key(&Self::digest(credential))
    }

    /// `credential` was accepted.
    pub fn insert(&self, credential: &str, now: Instant) {
        if credential.is_empty() || self.capacity == 0 {
            return;
        }
        let digest = Self::digest(credential);
        let mut map = self.lock();
        if !map.contains_key(&digest)
            && map.len() >= self.capacity
            && let Some(oldest) = map.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(digest, now);
    }

    /// `credential` failed: forget it.
    pub fn remove(&self, credential: &str) {
        if !credential.is_empty() {
            self.lock().remove(&Self::digest(credential));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, rate: f64, max: usize) -> AuthLimiter {
        AuthLimiter::new(AuthLimitConfig {
            burst,
            refill_per_sec: rate,
            max_addresses: max,
        })
    }

    fn addr(s: &str) -> AddrKey {
        AddrKey::of(s.parse().unwrap())
    }

    fn refused(v: Verdict) -> bool {
        matches!(v, Verdict::Refuse { .. })
    }

    #[test]
    fn burst_of_failures_then_refused_then_refilled() {
        let l = limiter(10, 1.0, 100);
        let a = addr("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.check(a, t0), Verdict::Allow);
            l.record_failure(a, t0);
        }
        let v = l.check(a, t0);
        assert_eq!(
            v,
            Verdict::Refuse {
                retry_after: Duration::from_secs(1),
                log: Some(1)
            }
        );
        assert_eq!(v.retry_after_secs(), 1);
        // Half a token back: still refused, retry in the other half.
        let v = l.check(a, t0 + Duration::from_millis(500));
        assert!(refused(v));
        assert_eq!(v.retry_after_secs(), 1);
        // A whole token: one more attempt, and only one.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.check(a, t1), Verdict::Allow);
        l.record_failure(a, t1);
        assert!(refused(l.check(a, t1)));
        // Another address is not affected.
        assert_eq!(l.check(addr("192.0.2.2"), t1), Verdict::Allow);
    }

    #[test]
    fn successes_cost_nothing() {
        // check() alone (a success records nothing) never refuses.
        let l = limiter(2, 1.0, 100);
        let a = addr("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.check(a, t0), Verdict::Allow);
        }
        l.record_failure(a, t0);
        assert_eq!(l.check(a, t0), Verdict::Allow);
        l.record_failure(a, t0);
        assert!(refused(l.check(a, t0)));
    }

    #[test]
    fn logs_once_per_window_with_the_count() {
        let l = limiter(1, 0.001, 100);
        let a = addr("192.0.2.1");
        let t0 = Instant::now();
        l.record_failure(a, t0);
        let log = |v: Verdict| match v {
            Verdict::Refuse { log, .. } => log,
            Verdict::Allow => panic!("allowed"),
        };
        assert_eq!(log(l.check(a, t0)), Some(1));
        for i in 1..100 {
            assert_eq!(log(l.check(a, t0 + Duration::from_millis(i))), None);
        }
        assert_eq!(log(l.check(a, t0 + LOG_WINDOW)), Some(100));
        assert_eq!(log(l.check(a, t0 + LOG_WINDOW)), None);
    }

    #[test]
    fn table_is_bounded_and_idle_buckets_go() {
        let l = limiter(3, 1.0, 4);
        let t0 = Instant::now();
        for i in 0..50 {
            l.record_failure(addr(&format!("198.51.100.{i}")), t0);
            assert!(l.len() <= 4);
        }
        // Refilled and quiet: swept at the next failure after the sweep interval.
        let later = t0 + SWEEP_INTERVAL;
        l.record_failure(addr("203.0.113.1"), later);
        assert_eq!(l.len(), 1);
        // A bucket in debt is not what a full table evicts.
        let b = addr("203.0.113.2");
        for _ in 0..3 {
            l.record_failure(b, later);
        }
        for i in 10..20 {
            l.record_failure(addr(&format!("203.0.113.{i}")), later);
            assert!(l.len() <= 4);
        }
        assert!(refused(l.check(b, later + Duration::from_millis(100))));
    }

    #[test]
    fn refused_address_is_kept_through_its_log_window() {
        let l = limiter(1, 1.0, 10);
        let a = addr("192.0.2.9");
        let t0 = Instant::now();
        l.record_failure(a, t0);
        assert!(refused(l.check(a, t0)));
        // Refilled after 1 s, but still inside the log window: a sweep keeps it, so a new
        // flood is not logged again within the window.
        l.record_failure(addr("192.0.2.10"), t0 + SWEEP_INTERVAL);
        assert_eq!(l.len(), 2);
        let t1 = t0 + SWEEP_INTERVAL;
        l.record_failure(a, t1);
        assert!(matches!(l.check(a, t1), Verdict::Refuse { log: None, .. }));
    }

    #[test]
    fn disabled_with_zero_burst() {
        let l = limiter(0, 1.0, 10);
        let a = addr("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..100 {
            l.record_failure(a, t0);
        }
        assert_eq!(l.check(a, t0), Verdict::Allow);
        assert!(l.is_empty());
    }

    #[test]
    fn ipv6_by_slash_64_and_mapped_v4() {
        assert_eq!(addr("2001:db8:1:2:aaaa::1"), addr("2001:db8:1:2:bbbb::2"));
        assert_ne!(addr("2001:db8:1:2::1"), addr("2001:db8:1:3::1"));
        assert_eq!(addr("::ffff:192.0.2.1"), addr("192.0.2.1"));
        assert_eq!(
            addr("2001:db8:1:2:aaaa::1").to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(addr("192.0.2.1").to_string(), "192.0.2.1");
    }

    #[test]
    fn config_is_checked() {
        assert!(AuthLimitConfig::default().validate().is_ok());
        let bad = |rate, max| {
            AuthLimitConfig {
                burst: 1,
                refill_per_sec: rate,
                max_addresses: max,
            }
            .validate()
        };
        assert_eq!(bad(0.0, 1), Err(AuthLimitConfigError::Refill(0.0)));
        assert!(bad(f64::NAN, 1).is_err());
        assert_eq!(bad(1.0, 0), Err(AuthLimitConfigError::Table));
    }

    #[test]
    fn known_good_is_bounded_and_forgets_failures() {
        let k = KnownGood::new(2);
        let t0 = Instant::now();
        k.insert("a", t0);
        k.insert("b", t0 + Duration::from_secs(1));
        assert!(k.contains("a") && k.contains("b"));
        k.insert("c", t0 + Duration::from_secs(2));
        assert!(!k.contains("a") && k.contains("b") && k.contains("c"));
        k.remove("b");
        assert!(!k.contains("b"));
        k.insert("", t0);
        assert!(!k.contains(""));
    }
}
