//! Reconnect pacing: capped exponential backoff with jitter, reset after a healthy spell.
//!
//! Rancher's Go agents retry every ~10 s forever, all at the same rhythm, so a server restart
//! brings every agent back in the same second. We spread them out (jitter), back off while the
//! server stays down (exponential, capped), and forget the failures once a connection has proven
//! itself by staying up for a while (reset), like kube-runtime's `DefaultBackoff`.
//!
//! The delays come from `backon` (the `backoff` crate is unmaintained, RUSTSEC-2025-0012, and
//! kube-rs moved to `backon`). `backon`'s jitter adds a random `[0, d)` to a delay `d`, which
//! would push a capped delay past the cap, and leave no jitter at all once the cap clamps. So
//! the builder is fed half the configured values: each delay is `d/2 + rand[0, d/2)`, i.e.
//! "equal jitter" in `[d/2, d)`, where `d` doubles from `min_delay` up to `max_delay`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Reconnect pacing for [`run_forever`](super::run_forever).
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffConfig {
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            factor: 2.0,
            reset_after: Duration::from_secs(60),
        }
    }
}

impl BackoffConfig {
    /// The first delay's upper bound (it is drawn from `[min/2, min)`). Default 1 s.
    pub fn set_min_delay(&mut self, d: Duration) -> &mut Self {
        self.min_delay = d;
        self
    }

    /// The cap: no delay reaches it. Default 30 s, which keeps a fleet's reconnect storm spread
    /// over 15–30 s while a server is down, a little slower than Rancher's fixed 10 s only after
    /// several failures. Raised to at least `min_delay` when used.
    pub fn set_max_delay(&mut self, d: Duration) -> &mut Self {
        self.max_delay = d;
        self
    }

    /// Growth per failure. Default 2. Values below 1 are treated as 1.
    pub fn set_factor(&mut self, factor: f32) -> &mut Self {
        self.factor = factor;
        self
    }

    /// A connection that stayed up this long resets the backoff to `min_delay`. Default 60 s:
    /// long enough that a server accepting and then dropping every session does not get hammered
    /// at `min_delay`.
    pub fn set_reset_after(&mut self, d: Duration) -> &mut Self {
        self.reset_after = d;
        self
    }

    /// See [`set_min_delay`](Self::set_min_delay).
    pub fn min_delay(&self) -> Duration {
        self.min_delay
    }

    /// See [`set_max_delay`](Self::set_max_delay).
    pub fn max_delay(&self) -> Duration {
        self.max_delay.max(self.min_delay)
    }

    /// See [`set_reset_after`](Self::set_reset_after).
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// A fresh, infinite sequence of delays.
    pub(crate) fn delays(&self) -> Delays {
        let max = self.max_delay();
        let inner = ExponentialBuilder::new()
            .with_min_delay(self.min_delay / 2)
            .with_max_delay(max / 2)
            .with_factor(self.factor.max(1.0))
            .with_jitter()
            .without_max_times()
            .build();
        Delays { inner, max }
    }
}

/// An endless iterator of reconnect delays; see the module docs for their distribution.
#[derive(Debug)]
pub(crate) struct Delays {
    inner: <ExponentialBuilder as BackoffBuilder>::Backoff,
    max: Duration,
}

impl Delays {
    /// The next delay; never more than the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_below_cap_and_jitter() {
        let mut cfg = BackoffConfig::default();
        cfg.set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(800));
        let mut d = cfg.delays();
        let first = d.next_delay();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100));
        // 200 ms, 400 ms, then the 800 ms cap: each drawn from [d/2, d).
        for upper in [200, 400] {
            let x = d.next_delay();
            assert!(x >= Duration::from_millis(upper / 2) && x < Duration::from_millis(upper));
        }
        let later: Vec<Duration> = (0..50).map(|_| d.next_delay()).collect();
        assert!(later.iter().all(|x| *x >= Duration::from_millis(400)));
        assert!(later.iter().all(|x| *x <= Duration::from_millis(800)));
        // At the cap there is still spread.
        let distinct: std::collections::BTreeSet<_> = later.iter().collect();
        assert!(distinct.len() > 10, "{later:?}");
    }
}
