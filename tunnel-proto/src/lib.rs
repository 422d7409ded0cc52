//! tunnel-proto: Rancher's remotedialer reverse-tunnel protocol, byte for byte, in Rust.
//!
//! An agent behind NAT dials a websocket out to the management server and keeps it open; the
//! server then opens multiplexed streams through it ("dial tcp/10.43.0.1:443 for me"), each of
//! which behaves like a TCP connection. Either side may open streams.
//!
//! ```text
//!   application ── Stream (AsyncRead + AsyncWrite) ──┐
//!                                                    ▼
//!   driver:   one task per websocket ── Session (mux, sans-IO) ── wire (codec)
//!                 ▲            │
//!    websocket ───┘            └──► websocket (control first, then fair Data turns)
//! ```
//!
//! - [`wire`]: bytes of one websocket message to [`wire::Message`] and back. Nothing else.
//! - [`mux`]: the session state machine: stream ids, flow control (Pause/Resume and hard
//!   bounds), close semantics, keepalive and SyncConnections timers, fair scheduling. No I/O.
//! - [`driver`]: the tokio side: one task per websocket, streams as `AsyncRead + AsyncWrite`,
//!   the client connector (TLS, CA pinning, proxies, reconnect) and the server acceptor.
//!
//! The wire behaviour follows `spec/remotedialer-wire.md`. Where both ends are this project's
//! and both said so in the websocket upgrade ([`driver::capability`]), the sessions add
//! per-stream credit windows (a WindowUpdate message, type 32) and interactive-first
//! scheduling ([`SessionConfig::credit_window`]); a Go peer never asks, so it always gets the
//! plain protocol, byte for byte.

pub mod config;
pub mod driver;
pub mod mux;
pub mod wire;

pub use config::{Role, SessionConfig};
