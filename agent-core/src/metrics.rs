//! Counters and gauges of the agent, written in the Prometheus text format by hand (a few
//! dozen lines do not need a metrics crate).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cattle_agent_tunnel_up` | gauge | `tunnel` (`main`, `steve`) |
//! | `cattle_agent_tunnel_connect_attempts_total` | counter | `tunnel` |
//! | `cattle_agent_tunnel_connect_failures_total` | counter | `tunnel` |
//! | `cattle_agent_tunnel_reconnects_total` | counter | `tunnel` |
//! | `cattle_agent_tunnel_bytes_total` | counter | `tunnel`, `direction` (`received`, `sent`) |
//! | `cattle_agent_streams_open` | gauge | `tunnel` |
//! | `cattle_agent_streams_total` | counter | `tunnel` |
//! | `cattle_agent_dials_total` | counter | `tunnel`, `proto`, `result` (`allowed`, `refused`) |
//! | `cattle_agent_dial_errors_total` | counter | `tunnel`, `proto` (allowed, but the local dial failed) |
//! | `cattle_agent_streams_closed_idle_on_drain_total` | counter | `tunnel` (closed after SIGTERM for moving no bytes) |
//! | `cattle_agent_draining` | gauge | (1 after SIGTERM) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tunnel_proto::driver::Tunnel;
use tunnel_proto::driver::connector::{ConnectorStats, StatsSnapshot};

/// Proto label values; anything else counts as `other` so a peer cannot blow up the series.
const PROTOS: [&str; 4] = ["tcp", "unix", "npipe", "other"];

fn proto_index(proto: &str) -> usize {
    PROTOS[..3].iter().position(|p| *p == proto).unwrap_or(3)
}

/// Metrics of one tunnel (the main one, or the cluster agent's steve tunnel).
#[derive(Debug)]
pub struct TunnelMetrics {
    name: &'static str,
    up: AtomicBool,
    connector: Mutex<ConnectorCounts>,
    session: Mutex<SessionCounts>,
    streams_open: AtomicI64,
    streams_total: AtomicU64,
    reconnects: AtomicU64,
    allowed: [AtomicU64; 4],
    refused: [AtomicU64; 4],
    dial_errors: [AtomicU64; 4],
    closed_idle_on_drain: AtomicU64,
}

#[derive(Debug, Default)]
struct ConnectorCounts {
    /// Totals of connectors replaced (the URL changes after `/register`).
    base: StatsSnapshot,
    current: Option<Arc<ConnectorStats>>,
}

#[derive(Debug, Default)]
struct SessionCounts {
    /// Data bytes of sessions that have ended.
    base_in: u64,
    base_out: u64,
    current: Option<Tunnel>,
}

impl TunnelMetrics {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            up: AtomicBool::new(false),
            connector: Mutex::default(),
            session: Mutex::default(),
            streams_open: AtomicI64::new(0),
            streams_total: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            allowed: Default::default(),
            refused: Default::default(),
            dial_errors: Default::default(),
            closed_idle_on_drain: AtomicU64::new(0),
        }
    }

    /// The tunnel's label.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether a session is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Starts counting a connector's stats (folding a previous connector's into the totals).
    pub fn set_connector(&self, stats: Arc<ConnectorStats>) {
        let mut c = lock(&self.connector);
        if let Some(old) = c.current.take() {
            let s = old.snapshot();
            c.base.attempts += s.attempts;
            c.base.connected += s.connected;
            c.base.failures += s.failures;
        }
        c.current = Some(stats);
    }

    /// A session came up.
    pub fn session_started(&self, tunnel: &Tunnel) {
        lock(&self.session).current = Some(tunnel.clone());
        self.up.store(true, Ordering::Relaxed);
    }

    /// The session ended; its byte counts move into the totals.
    pub fn session_ended(&self) {
        let mut s = lock(&self.session);
        if let Some(t) = s.current.take() {
            let stats = t.stats();
            s.base_in += stats.data_bytes_in;
            s.base_out += stats.data_bytes_out;
        }
        self.up.store(false, Ordering::Relaxed);
    }

    /// Counts an established session that ended while the agent goes on (it will dial again).
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a Connect the allow-list let through.
    pub fn dial_allowed(&self, proto: &str) {
        self.allowed[proto_index(proto)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a Connect the allow-list (or draining) refused.
    pub fn dial_refused(&self, proto: &str) {
        self.refused[proto_index(proto)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an allowed dial that failed locally.
    pub fn dial_error(&self, proto: &str) {
        self.dial_errors[proto_index(proto)].fetch_add(1, Ordering::Relaxed);
    }

    /// Refused Connects of `proto` so far (for tests and logs).
    pub fn refused(&self, proto: &str) -> u64 {
        self.refused[proto_index(proto)].load(Ordering::Relaxed)
    }

    /// Streams being served now.
    pub fn streams_open(&self) -> i64 {
        self.streams_open.load(Ordering::Relaxed)
    }

    /// Counts a stream closed during the drain because it moved no bytes.
    pub fn stream_closed_idle_on_drain(&self) {
        self.closed_idle_on_drain.fetch_add(1, Ordering::Relaxed);
    }

    /// Streams closed during the drain because they moved no bytes.
    pub fn closed_idle_on_drain(&self) -> u64 {
        self.closed_idle_on_drain.load(Ordering::Relaxed)
    }

    /// Marks a stream as open until the guard is dropped.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams_open.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    fn connector_snapshot(&self) -> StatsSnapshot {
        let c = lock(&self.connector);
        let mut s = c.base;
        if let Some(cur) = &c.current {
            let now = cur.snapshot();
            s.attempts += now.attempts;
            s.connected += now.connected;
            s.failures += now.failures;
        }
        s
    }

    fn bytes(&self) -> (u64, u64) {
        let s = lock(&self.session);
        let (mut rx, mut tx) = (s.base_in, s.base_out);
        if let Some(t) = &s.current {
            let stats = t.stats();
            rx += stats.data_bytes_in;
            tx += stats.data_bytes_out;
        }
        (rx, tx)
    }
}

/// Decrements the open-streams gauge when dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<TunnelMetrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// All of the agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    tunnels: Mutex<Vec<Arc<TunnelMetrics>>>,
    draining: AtomicBool,
}

impl Metrics {
    /// The metrics of tunnel `name`, created on first use.
    pub fn tunnel(&self, name: &'static str) -> Arc<TunnelMetrics> {
        let mut tunnels = lock(&self.tunnels);
        if let Some(t) = tunnels.iter().find(|t| t.name == name) {
            return t.clone();
        }
        let t = Arc::new(TunnelMetrics::new(name));
        tunnels.push(t.clone());
        t
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the start of shutdown.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Streams open on every tunnel.
    pub fn streams_open(&self) -> i64 {
        lock(&self.tunnels).iter().map(|t| t.streams_open()).sum()
    }

    /// Streams every tunnel closed during the drain because they moved no bytes.
    pub fn streams_closed_idle_on_drain(&self) -> u64 {
        lock(&self.tunnels)
            .iter()
            .map(|t| t.closed_idle_on_drain())
            .sum()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let tunnels: Vec<Arc<TunnelMetrics>> = lock(&self.tunnels).clone();
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let per = |f: &dyn Fn(&TunnelMetrics) -> u64| -> Vec<(String, u64)> {
            tunnels
                .iter()
                .map(|t| (format!("{{tunnel=\"{}\"}}", t.name), f(t)))
                .collect()
        };
        family(
            "cattle_agent_tunnel_up",
            "gauge",
            "1 while the tunnel's websocket session is up.",
            per(&|t| u64::from(t.is_up())),
        );
        family(
            "cattle_agent_tunnel_connect_attempts_total",
            "counter",
            "Websocket connection attempts.",
            per(&|t| t.connector_snapshot().attempts),
        );
        family(
            "cattle_agent_tunnel_connect_failures_total",
            "counter",
            "Websocket connection attempts that failed.",
            per(&|t| t.connector_snapshot().failures),
        );
        family(
            "cattle_agent_tunnel_reconnects_total",
            "counter",
            "Established sessions that ended and were dialed again.",
            per(&|t| t.reconnects.load(Ordering::Relaxed)),
        );
        let mut bytes = Vec::new();
        for t in &tunnels {
            let (rx, tx) = t.bytes();
            bytes.push((
                format!("{{tunnel=\"{}\",direction=\"received\"}}", t.name),
                rx,
            ));
            bytes.push((format!("{{tunnel=\"{}\",direction=\"sent\"}}", t.name), tx));
        }
        family(
            "cattle_agent_tunnel_bytes_total",
            "counter",
            "Stream payload bytes through the tunnel (received from / sent to the server).",
            bytes,
        );
        family(
            "cattle_agent_streams_open",
            "gauge",
            "Streams being served now.",
            per(&|t| u64::try_from(t.streams_open()).unwrap_or(0)),
        );
        family(
            "cattle_agent_streams_total",
            "counter",
            "Streams served since start.",
            per(&|t| t.streams_total.load(Ordering::Relaxed)),
        );
        family(
            "cattle_agent_streams_closed_idle_on_drain_total",
            "counter",
            "Streams closed after SIGTERM because they had moved no bytes for the idle threshold.",
            per(&|t| t.closed_idle_on_drain()),
        );
        let mut dials = Vec::new();
        let mut errors = Vec::new();
        for t in &tunnels {
            for (i, proto) in PROTOS.iter().enumerate() {
                for (result, arr) in [("allowed", &t.allowed), ("refused", &t.refused)] {
                    dials.push((
                        format!(
                            "{{tunnel=\"{}\",proto=\"{proto}\",result=\"{result}\"}}",
                            t.name
                        ),
                        arr[i].load(Ordering::Relaxed),
                    ));
                }
                errors.push((
                    format!("{{tunnel=\"{}\",proto=\"{proto}\"}}", t.name),
                    t.dial_errors[i].load(Ordering::Relaxed),
                ));
            }
        }
        family(
            "cattle_agent_dials_total",
            "counter",
            "Connect requests from the server, by allow-list decision.",
            dials,
        );
        family(
            "cattle_agent_dial_errors_total",
            "counter",
            "Allowed Connect requests whose local dial failed.",
            errors,
        );
        family(
            "cattle_agent_draining",
            "gauge",
            "1 once shutdown has begun (new streams are refused).",
            vec![(String::new(), u64::from(self.is_draining()))],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        let t = m.tunnel("main");
        t.dial_allowed("tcp");
        t.dial_refused("unix");
        t.dial_refused("weird");
        let g = t.stream_guard();
        t.stream_closed_idle_on_drain();
        let text = m.render();
        assert!(
            text.contains("cattle_agent_tunnel_up{tunnel=\"main\"} 0\n"),
            "{text}"
        );
        assert!(text.contains(
            "cattle_agent_dials_total{tunnel=\"main\",proto=\"tcp\",result=\"allowed\"} 1\n"
        ));
        assert!(text.contains(
            "cattle_agent_dials_total{tunnel=\"main\",proto=\"unix\",result=\"refused\"} 1\n"
        ));
        assert!(text.contains(
            "cattle_agent_dials_total{tunnel=\"main\",proto=\"other\",result=\"refused\"} 1\n"
        ));
        assert!(text.contains("cattle_agent_streams_open{tunnel=\"main\"} 1\n"));
        assert!(
            text.contains("cattle_agent_streams_closed_idle_on_drain_total{tunnel=\"main\"} 1\n")
        );
        assert_eq!(m.streams_closed_idle_on_drain(), 1);
        drop(g);
        assert!(
            m.render()
                .contains("cattle_agent_streams_open{tunnel=\"main\"} 0\n")
        );
        assert!(text.contains("# TYPE cattle_agent_draining gauge\ncattle_agent_draining 0\n"));
    }
}
