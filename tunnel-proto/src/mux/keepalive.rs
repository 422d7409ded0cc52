//! The timers of a session: pings to send, the peer's silence deadline, and SyncConnections.
//!
//! Go refreshes its deadlines only on Pings and Pongs (spec §1.4). This side counts anything
//! received as a sign of life, which is never stricter than Go and spares a busy tunnel from
//! dying because a Pong queued behind bulk data.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Timers {
    interval: Option<Duration>,
    timeout: Duration,
    sync_interval: Option<Duration>,
    last_heard: Instant,
    next_ping: Option<Instant>,
    next_sync: Option<Instant>,
}

/// What a timer asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Due {
    Ping,
    Sync,
    Dead,
}

impl Timers {
    pub(crate) fn new(
        now: Instant,
        interval: Option<Duration>,
        timeout: Duration,
        sync_interval: Option<Duration>,
    ) -> Self {
        Self {
            interval,
            timeout,
            sync_interval,
            last_heard: now,
            next_ping: interval.map(|i| now + i),
            next_sync: sync_interval.map(|i| now + i),
        }
    }

    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    pub(crate) fn last_heard(&self) -> Instant {
        self.last_heard
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The earliest instant at which [`Timers::poll`] has something to say.
    pub(crate) fn next_deadline(&self) -> Instant {
        let dead = self.last_heard + self.timeout;
        [self.next_ping, self.next_sync]
            .into_iter()
            .flatten()
            .fold(dead, Instant::min)
    }

    /// Everything due at `now`, re-arming the periodic timers.
    pub(crate) fn poll(&mut self, now: Instant, mut due: impl FnMut(Due)) {
        if now >= self.last_heard + self.timeout {
            due(Due::Dead);
            return;
        }
        if let (Some(at), Some(interval)) = (self.next_ping, self.interval)
            && now >= at
        {
            self.next_ping = Some(now + interval);
            due(Due::Ping);
        }
        if let (Some(at), Some(interval)) = (self.next_sync, self.sync_interval)
            && now >= at
        {
            self.next_sync = Some(now + interval);
            due(Due::Sync);
        }
    }
}
