//! agent-core: what `cattle-cluster-agent` and `cattle-node-agent` share.
//!
//! Both agents dial out to the management server over a TLS websocket, keep it open, and serve
//! the streams the server opens through it (tunnel-proto does the protocol). Around that sits
//! what Rancher's agents do (spec `cattle-agent.md`):
//!
//! ```text
//!  flags/env ──▶ config (CommonConfig, every bad variable reported at once)
//!                  │
//!                  ▼
//!  preflight: GET /ping; CATTLE_CA_CHECKSUM ▶ /v3/settings/cacerts, sha256(value+"\n");
//!             STRICT_VERIFY ──▶ Trust (pinned CA, system store)
//!                  │
//!                  ▼
//!  runtime: TunnelSpec { url: wss://host/v3/connect[/register],
//!                        headers: X-API-Tunnel-Token + X-API-Tunnel-Params (params),
//!                        authorizer: allow-list (refusals logged + counted),
//!                        handler: dial tcp/unix locally and splice, activity tracked }
//!           connect loop (tunnel-proto run_forever) ──▶ sessions ──▶ streams
//!                  │
//!  health: /healthz /readyz /metrics    signal: SIGTERM ▶ drain (idle streams closed after 2 s,
//!                                               busy ones ≤ grace) ▶ exit 0
//! ```
//!
//! **Reconnect pacing differs from Rancher's on purpose**: the Go agents retry every ~10 s,
//! fixed, with no jitter, so a server restart brings a whole fleet back in the same second.
//! These agents use tunnel-proto's capped exponential backoff with equal jitter (default: delay
//! drawn from `[d/2, d)`, `d` doubling from 1 s to 30 s, reset after a minute connected;
//! `--backoff-min`/`--backoff-max`).
//!
//! **Refused Connects**: a Go agent's refusal kills the whole session (wire spec §2.6);
//! tunnel-proto answers with an Error on that stream only, so a server asking for something
//! outside the allow-list costs that stream, not the tunnel.

pub mod allow;
pub mod config;
pub mod env;
pub mod health;
pub mod http;
pub mod metrics;
pub mod params;
pub mod preflight;
pub mod runtime;
pub mod signal;
pub mod splice;

pub use config::{CommonArgs, CommonConfig, Credentials, CredentialsPrecedence, ServerUrl};
pub use env::{ConfigError, ConfigErrors, Strings};

/// Runs an agent binary's body on a two-thread runtime and turns its outcome into the exit
/// code; errors go to the log and, under the binary's name, to stderr.
pub fn run_to_exit<E: std::fmt::Display>(
    binary: &str,
    body: impl std::future::Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{binary}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the stderr log subscriber at `level`.
pub fn init_logging(level: config::LogLevel) {
    let max = match level {
        config::LogLevel::Info => tracing::Level::INFO,
        config::LogLevel::Debug => tracing::Level::DEBUG,
        config::LogLevel::Trace => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
