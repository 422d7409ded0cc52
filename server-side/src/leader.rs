//! Leader election among the replicas on the Kubernetes store, and the controllers only the
//! leader runs.
//!
//! Why: some work is cluster-wide, not per tunnel. A replica that crashes (kill -9, a lost
//! node) never marks its tunnels disconnected, so their presence says `Connected` forever;
//! someone must notice that their last-seen time stopped moving. Done by every replica it
//! would be N times the writes and N writers racing; done by one, it needs that one to be
//! chosen and replaced when it dies.
//!
//! How: a `coordination.k8s.io/v1` Lease ([`LEASE_NAME`]) in the store's namespace, as
//! client-go's leader election does it (kube-runtime has none). Every [`RENEW_EVERY`] each
//! replica reads the Lease:
//!
//! - held by itself: it renews it (a new `renewTime`);
//! - free (no holder) or expired: it takes it;
//! - held by another and not expired: it waits.
//!
//! "Expired" is judged on this replica's own clock, as client-go does: the holder's Lease has
//! expired when its `resourceVersion` has not moved for `leaseDurationSeconds` since this
//! replica first saw it, so clock skew between replicas does not matter. Every write
//! (`replace` with the `resourceVersion` read, or `create`) is conditional: when two replicas
//! try at once the apiserver takes one and answers 409 Conflict to the other, so two never
//! both win. The leader stops acting (cancels its controllers) as soon as a renewal fails or
//! is refused, and in any case once its last successful renewal is older than the Lease
//! duration less one renewal period, which is before any other replica can see it expired.
//!
//! The controllers ([`sweep_stale_presence`]): ends (cluster agents, node agents) whose
//! presence says connected but whose last-seen time is older than the presence timeout are
//! marked disconnected. Closing the tunnels of a deleted cluster or a revoked token needs no
//! leader: every replica watches the store and [`crate::live`] cuts what it holds.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

use crate::app::SharedApp;
use crate::store::{TunnelEnd, now_unix};

/// The Lease's name in the store's namespace.
pub const LEASE_NAME: &str = "tunnel-server-controllers";
/// How long a Lease holds without renewal. A dead leader is replaced after at most about
/// this plus two renewal periods (one before another replica sees its last renewal, one
/// before it looks again after expiry): 12 s, within the 15 s the replicas promise.
pub const LEASE_DURATION: Duration = Duration::from_secs(8);
/// How often each replica reads (and the leader renews) the Lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// Default presence timeout: three missed presence heartbeats.
pub const DEFAULT_PRESENCE_TIMEOUT: Duration =
    Duration::from_secs(3 * crate::presence::HEARTBEAT.as_secs());
/// How often the leader looks for stale presence (reads come from the store's cache).
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Why a round of the election failed (the replica then does not lead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaderError {
    /// The apiserver refused or failed the request.
    #[error("lease {LEASE_NAME}: {0}")]
    Kube(#[from] kube::Error),
}

/// What the election needs: the Lease API of the store's namespace and this replica's name.
#[derive(Clone)]
pub struct LeaderConfig {
    /// Leases in the store's namespace.
    pub leases: Api<Lease>,
    /// This replica's identity in the Lease (its replica name).
    pub identity: String,
    /// Ends whose presence is older than this are marked disconnected by the leader.
    pub presence_timeout: Duration,
}

impl std::fmt::Debug for LeaderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderConfig")
            .field("identity", &self.identity)
            .field("presence_timeout", &self.presence_timeout)
            .finish_non_exhaustive()
    }
}

/// What to do with a Lease as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Another holds it and it has not expired.
    Wait,
}

/// Judges Leases by this replica's clock: remembers when each `resourceVersion` was first
/// seen.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(String, Instant)>,
}

impl Observer {
    /// The step for a Lease at `version` held by `holder` for `duration`, seen at `now`.
    pub fn step(
        &mut self,
        version: &str,
        holder: Option<&str>,
        duration: Duration,
        me: &str,
        now: Instant,
    ) -> Step {
        let first_seen = match &self.seen {
            Some((v, at)) if v == version => *at,
            _ => {
                self.seen = Some((version.to_owned(), now));
                now
            }
        };
        match holder.filter(|h| !h.is_empty()) {
            None => Step::Take,
            Some(h) if h == me => Step::Renew,
            Some(_) if now.duration_since(first_seen) >= duration => Step::Take,
            Some(_) => Step::Wait,
        }
    }
}

/// The Lease spec after `step` by `me` at `now`.
fn next_spec(previous: Option<&LeaseSpec>, step: Step, me: &str, now: MicroTime) -> LeaseSpec {
    let mut spec = previous.cloned().unwrap_or_default();
    if step == Step::Take || previous.is_none() {
        let changed_hands = spec.holder_identity.as_deref() != Some(me) && previous.is_some();
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(now.clone());
        if changed_hands {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(now);
    spec
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// A 409 (someone else wrote first) or 422/404 race: not an error, just not ours.
fn lost_race(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

/// One round: reads the Lease and renews or takes it if due. `Ok(true)`: this replica holds
/// it until at least [`LEASE_DURATION`] after the request was sent.
pub async fn round(config: &LeaderConfig, observer: &mut Observer) -> Result<bool, LeaderError> {
    let me = config.identity.as_str();
    let Some(lease) = config.leases.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(next_spec(None, Step::Take, me, micro_now())),
        };
        return match config.leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(err) if lost_race(&err) => Ok(false),
            Err(err) => Err(err.into()),
        };
    };
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    let duration = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .map_or(LEASE_DURATION, |s| {
            Duration::from_secs(u64::try_from(s).unwrap_or(0))
        });
    let step = observer.step(&version, holder, duration, me, Instant::now());
    if step == Step::Wait {
        return Ok(false);
    }
    let mut next = lease.clone();
    next.spec = Some(next_spec(lease.spec.as_ref(), step, me, micro_now()));
    // `next.metadata.resource_version` is the version read: the replace is conditional.
    match config
        .leases
        .replace(LEASE_NAME, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(true),
        Err(err) if lost_race(&err) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Takes part in the election until `shutdown`; while leading, runs the controllers.
pub async fn run(app: SharedApp, config: LeaderConfig, shutdown: CancellationToken) {
    let mut observer = Observer::default();
    let mut leading: Option<(CancellationToken, Instant)> = None;
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The leader must stop before anyone else can judge its Lease expired.
    let valid_for = LEASE_DURATION.saturating_sub(RENEW_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let outcome = tokio::time::timeout(RENEW_EVERY, round(&config, &mut observer)).await;
        let refused = matches!(outcome, Ok(Ok(false)));
        let holds = match outcome {
            Ok(Ok(holds)) => holds,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "leader election round failed");
                false
            }
            Err(_) => {
                tracing::warn!("leader election round timed out");
                false
            }
        };
        leading = match (leading.take(), holds) {
            (Some((controllers, _)), true) => Some((controllers, sent)),
            (None, true) => {
                tracing::info!(identity = %config.identity, "leading: running the controllers");
                let controllers = shutdown.child_token();
                tokio::spawn(controllers_loop(
                    app.clone(),
                    config.presence_timeout,
                    controllers.clone(),
                ));
                Some((controllers, sent))
            }
            // Refused (another holds it): stop at once. After a failed request: only once
            // the last renewal is about to lapse for the others.
            (Some((controllers, renewed)), false) => {
                if refused || renewed.elapsed() >= valid_for {
                    tracing::warn!(identity = %config.identity, "no longer leading");
                    controllers.cancel();
                    None
                } else {
                    Some((controllers, renewed))
                }
            }
            (None, false) => None,
        };
    }
    if let Some((controllers, _)) = leading {
        controllers.cancel();
        // Give the Lease up so that another replica takes over at once, not after it expires.
        let _ = tokio::time::timeout(RENEW_EVERY, release(&config)).await;
    }
}

/// Clears the holder if it is still us (conditional on the version read).
async fn release(config: &LeaderConfig) -> Result<(), LeaderError> {
    let Some(mut lease) = config.leases.get_opt(LEASE_NAME).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    match config
        .leases
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(()),
        Err(err) if lost_race(&err) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// The leader's controllers, until `stop`.
async fn controllers_loop(app: SharedApp, presence_timeout: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Checked again before each write: leadership can end during a sweep.
        sweep_stale_presence(&app, presence_timeout, &stop).await;
    }
}

/// Whether a presence last seen at `last_seen` is stale at `now`.
pub fn is_stale(last_seen: i64, now: i64, timeout: Duration) -> bool {
    now.saturating_sub(last_seen) > i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)
}

/// Marks disconnected the ends whose presence says connected but whose last-seen time is
/// older than `timeout` (the replica holding them is gone). Returns how many were marked.
pub async fn sweep_stale_presence(
    app: &SharedApp,
    timeout: Duration,
    stop: &CancellationToken,
) -> usize {
    let store = &app.store;
    let mut ends: Vec<TunnelEnd> = Vec::new();
    match store.clusters().await {
        Ok(clusters) => ends.extend(clusters.into_iter().map(|c| TunnelEnd {
            cluster_id: c.id,
            node_id: None,
        })),
        Err(err) => tracing::warn!(error = %err, "stale presence: cannot list clusters"),
    }
    match store.nodes(None).await {
        Ok(nodes) => ends.extend(nodes.into_iter().map(|n| TunnelEnd {
            cluster_id: n.cluster_id,
            node_id: Some(n.id),
        })),
        Err(err) => tracing::warn!(error = %err, "stale presence: cannot list nodes"),
    }
    let mut marked = 0;
    for end in ends {
        if stop.is_cancelled() {
            break;
        }
        let Ok(Some(p)) = store.presence(&end).await else {
            continue;
        };
        if !p.connected || !is_stale(p.last_seen, now_unix(), timeout) {
            continue;
        }
        // As its owner would: in the owner's name, so that a replica which took the tunnel
        // over since (another name) is never overwritten; `since` is when it was last seen.
        let peer = p.peer.clone().unwrap_or_default();
        match store
            .record_presence(&end, false, &p.replica, &peer, p.last_seen)
            .await
        {
            Ok(_) => {
                marked += 1;
                tracing::info!(cluster = %end.cluster_id, node = ?end.node_id, replica = %p.replica, last_seen = p.last_seen, "stale presence marked disconnected");
            }
            Err(err) => {
                tracing::warn!(cluster = %end.cluster_id, error = %err, "stale presence not marked")
            }
        }
    }
    marked
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = LEASE_DURATION;

    #[test]
    fn a_free_lease_is_taken_and_our_own_renewed() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert_eq!(o.step("1", None, D, "a", t0), Step::Take);
        assert_eq!(o.step("1", Some(""), D, "a", t0), Step::Take);
        assert_eq!(o.step("2", Some("a"), D, "a", t0), Step::Renew);
    }

    #[test]
    fn another_holder_expires_only_after_its_version_stood_still_for_the_duration() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert_eq!(o.step("1", Some("b"), D, "a", t0), Step::Wait);
        assert_eq!(o.step("1", Some("b"), D, "a", t0 + D / 2), Step::Wait);
        // b renewed: the clock starts again from when we saw the new version.
        assert_eq!(
            o.step("2", Some("b"), D, "a", t0 + D - Duration::from_millis(1)),
            Step::Wait
        );
        assert_eq!(o.step("2", Some("b"), D, "a", t0 + D + D / 2), Step::Wait);
        assert_eq!(o.step("2", Some("b"), D, "a", t0 + 2 * D), Step::Take);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let t1 = MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t2 = MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_002).unwrap());
        let first = next_spec(None, Step::Take, "a", t1.clone());
        assert_eq!(first.holder_identity.as_deref(), Some("a"));
        assert_eq!(first.lease_transitions, None);
        let renewed = next_spec(Some(&first), Step::Renew, "a", t2.clone());
        assert_eq!(renewed.acquire_time, Some(t1));
        assert_eq!(renewed.renew_time, Some(t2.clone()));
        let taken = next_spec(Some(&renewed), Step::Take, "b", t2.clone());
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(t2));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.lease_duration_seconds, Some(8));
    }

    #[test]
    fn staleness_is_strictly_older_than_the_timeout() {
        let t = Duration::from_secs(180);
        assert!(!is_stale(1_000, 1_180, t));
        assert!(is_stale(1_000, 1_181, t));
        assert!(!is_stale(2_000, 1_000, t), "a clock behind is not stale");
    }
}
