//! Prometheus text metrics, kept by hand (a few counters do not need a metrics framework).
//!
//! Names follow remotedialer's `session_server_*` where they mean the same thing (spec
//! cattle-agent §8), under the `tunnel_server_` prefix.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tunnel_proto::driver::registry::Registry;

/// The `target` label of a proxied request whose cluster or node does not exist.
pub const UNKNOWN_TARGET: &str = "unknown";
/// The `target` label of requests counted once [`MAX_REQUEST_SERIES`] series exist.
pub const OTHER_TARGET: &str = "other";
/// Most `tunnel_server_proxied_requests_total` series (target × kind × status) kept; further
/// targets are counted under [`OTHER_TARGET`]. Every other family has a fixed label set or one
/// series per connected client key.
pub const MAX_REQUEST_SERIES: usize = 20_000;

/// Server counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_added: AtomicU64,
    sessions_removed: AtomicU64,
    dials: Mutex<BTreeMap<&'static str, u64>>,
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    proxied_bytes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    agent_auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    agent_auth_rate_limited: AtomicU64,
    user_auth_failures: AtomicU64,
    user_auth_rate_limited: AtomicU64,
    auth_limit_addresses: AtomicU64,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K, by: u64) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    *map.entry(key).or_default() += by;
}

impl Metrics {
    /// A tunnel session was registered.
    pub fn session_added(&self) {
        self.sessions_added.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel session left the registry.
    pub fn session_removed(&self) {
        self.sessions_removed.fetch_add(1, Ordering::Relaxed);
    }

    /// A dial through a tunnel ended with `result` (`ok`, `no_session`, `unhealthy`,
    /// `refused`).
    pub fn dial(&self, result: &'static str) {
        bump(&self.dials, result, 1);
    }

    /// A proxied request (`kind` is `k8s` or `docker`, `target` the cluster or node) ended
    /// with `status`, having moved `bytes_in` from the client and `bytes_out` to it.
    pub fn proxied(
        &self,
        kind: &'static str,
        target: &str,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        {
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let mut key = (kind, target.to_owned(), status);
            if !requests.contains_key(&key) && requests.len() >= MAX_REQUEST_SERIES {
                key.1 = OTHER_TARGET.to_owned();
            }
            *requests.entry(key).or_default() += 1;
        }
        bump(&self.proxied_bytes, (kind, "in"), bytes_in);
        bump(&self.proxied_bytes, (kind, "out"), bytes_out);
    }

    /// A tunnel request failed authentication (`reason`: `unknown_token`,
    /// `missing_credentials`).
    pub fn agent_auth_failure(&self, reason: &'static str) {
        bump(&self.agent_auth_failures, reason, 1);
    }

    /// A tunnel request was refused by the failed-authentication rate limit.
    pub fn agent_auth_rate_limited(&self) {
        self.agent_auth_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A user API token (`/k8s`, `/docker`, `/v1`) was not valid.
    pub fn user_auth_failure(&self) {
        self.user_auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A user request was refused by the failed-authentication rate limit.
    pub fn user_auth_rate_limited(&self) {
        self.user_auth_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// The rate limiter tracks `n` addresses.
    pub fn set_auth_limit_addresses(&self, n: usize) {
        self.auth_limit_addresses.store(n as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters plus the registry's live figures.
    pub fn render(&self, registry: &Registry, pooled_upstreams: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tunnel_server_sessions Tunnel sessions registered now."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_sessions gauge");
        let _ = writeln!(out, "tunnel_server_sessions {}", registry.session_count());
        let _ = writeln!(
            out,
            "# HELP tunnel_server_streams Streams open through all tunnels now."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_streams gauge");
        let _ = writeln!(out, "tunnel_server_streams {}", registry.stream_count());
        let _ = writeln!(
            out,
            "# HELP tunnel_server_upstream_pooled_connections Upstream HTTP connections kept for reuse (each holds one stream)."
        );
        let _ = writeln!(
            out,
            "# TYPE tunnel_server_upstream_pooled_connections gauge"
        );
        let _ = writeln!(
            out,
            "tunnel_server_upstream_pooled_connections {pooled_upstreams}"
        );
        let _ = writeln!(
            out,
            "# HELP tunnel_server_sessions_added_total Tunnel sessions registered."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_sessions_added_total counter");
        let _ = writeln!(
            out,
            "tunnel_server_sessions_added_total {}",
            self.sessions_added.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tunnel_server_sessions_removed_total Tunnel sessions ended."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_sessions_removed_total counter");
        let _ = writeln!(
            out,
            "tunnel_server_sessions_removed_total {}",
            self.sessions_removed.load(Ordering::Relaxed)
        );

        let _ = writeln!(
            out,
            "# HELP tunnel_server_tunnel_bytes Data bytes through the live sessions of a client key."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_tunnel_bytes gauge");
        for key in registry.list_clients() {
            let (mut rx, mut tx) = (0, 0);
            for s in registry.sessions(&key) {
                let stats = s.tunnel().stats();
                rx += stats.data_bytes_in;
                tx += stats.data_bytes_out;
            }
            let key = escape(key.as_str());
            let _ = writeln!(
                out,
                "tunnel_server_tunnel_bytes{{client_key=\"{key}\",direction=\"receive\"}} {rx}"
            );
            let _ = writeln!(
                out,
                "tunnel_server_tunnel_bytes{{client_key=\"{key}\",direction=\"transmit\"}} {tx}"
            );
        }

        let _ = writeln!(
            out,
            "# HELP tunnel_server_dials_total Dials through tunnels, by result."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_dials_total counter");
        for (result, n) in self.dials.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "tunnel_server_dials_total{{result=\"{result}\"}} {n}");
        }

        let _ = writeln!(
            out,
            "# HELP tunnel_server_proxied_requests_total Proxied requests by kind, cluster or node, and status."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_proxied_requests_total counter");
        // Copied out, so that proxied requests do not wait while the text is formatted.
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((kind, target, status), n) in &requests {
            let target = escape(target);
            let _ = writeln!(
                out,
                "tunnel_server_proxied_requests_total{{kind=\"{kind}\",target=\"{target}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_server_proxied_bytes_total Bytes of proxied requests (in: from clients, out: to clients)."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_proxied_bytes_total counter");
        for ((kind, dir), n) in self
            .proxied_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "tunnel_server_proxied_bytes_total{{kind=\"{kind}\",direction=\"{dir}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_server_agent_auth_failures_total Tunnel requests (/v3/connect) that failed authentication, by reason."
        );
        let _ = writeln!(
            out,
            "# TYPE tunnel_server_agent_auth_failures_total counter"
        );
        let mut failures = self
            .agent_auth_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Both reasons from the start, so a rate() over them has a baseline.
        for reason in ["missing_credentials", "unknown_token"] {
            failures.entry(reason).or_insert(0);
        }
        for (reason, n) in failures {
            let _ = writeln!(
                out,
                "tunnel_server_agent_auth_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_server_agent_auth_rate_limited_total Tunnel requests refused, before any lookup, because their address failed authentication too often."
        );
        let _ = writeln!(
            out,
            "# TYPE tunnel_server_agent_auth_rate_limited_total counter"
        );
        let _ = writeln!(
            out,
            "tunnel_server_agent_auth_rate_limited_total {}",
            self.agent_auth_rate_limited.load(Ordering::Relaxed)
        );
        for (name, help, value) in [
            (
                "tunnel_server_user_auth_failures_total",
                "User requests (/k8s, /docker, /v1) with an invalid or revoked API token.",
                &self.user_auth_failures,
            ),
            (
                "tunnel_server_user_auth_rate_limited_total",
                "User requests refused, before any lookup, because their address failed authentication too often.",
                &self.user_auth_rate_limited,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_server_auth_limit_addresses Addresses the failed-authentication rate limit tracks now."
        );
        let _ = writeln!(out, "# TYPE tunnel_server_auth_limit_addresses gauge");
        let _ = writeln!(
            out,
            "tunnel_server_auth_limit_addresses {}",
            self.auth_limit_addresses.load(Ordering::Relaxed)
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_series_are_bounded() {
        let metrics = Metrics::default();
        for i in 0..MAX_REQUEST_SERIES + 500 {
            metrics.proxied("k8s", &format!("c-{i}"), 200, 1, 1);
        }
        metrics.proxied("k8s", "c-0", 200, 1, 1);
        let text = metrics.render(&Registry::default(), 0);
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tunnel_server_proxied_requests_total{"))
            .collect();
        assert_eq!(series.len(), MAX_REQUEST_SERIES + 1);
        assert!(series.contains(
            &r#"tunnel_server_proxied_requests_total{kind="k8s",target="other",status="200"} 500"#
        ));
        assert!(series.contains(
            &r#"tunnel_server_proxied_requests_total{kind="k8s",target="c-0",status="200"} 2"#
        ));
    }
}
