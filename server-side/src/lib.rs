//! tunnel-server: the management server of the reverse-tunnel system.
//!
//! Agents behind NAT dial out to it over TLS websockets (`/v3/connect[/register]`, Rancher's
//! protocol, spec cattle-agent §6); it authenticates them with registration tokens, keeps
//! their sessions in a [`tunnel_proto::driver::registry::Registry`], and proxies users'
//! Kubernetes and Docker API requests through those tunnels.
//!
//! ```text
//!   agent ──wss /v3/connect──▶ Acceptor ──authorizer chain (tunnel_auth)──▶ Registry
//!                                  │
//!   kubectl ──https /k8s/clusters/<id>/…──▶ routes ──▶ proxy::kube ──registry.open(tcp)──▶ TLS ──▶ apiserver
//!   docker  ──https /docker/nodes/<id>/…──▶ routes ──▶ proxy::docker ──registry.open(unix)──▶ dockerd
//!   admin   ──https /v1/…──▶ api ──▶ StoreHandle (blocking pool, bounded) ──▶ Store (SQLite)
//!   browser ──https / (console) ── cookie ──session──▶ Bearer ──▶ the same /v1, /k8s, /docker
//! ```
//!
//! Start with [`server::Server`]; the binary's `main.rs` is the CLI.

// Handlers return a ready `Response` as the `Err` of an early exit; boxing it would only add
// noise at every call site.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod app;
pub mod audit;
pub mod auth_limit;
pub mod console;
pub mod http_util;
pub mod import;
pub mod kubeconfig;
pub mod leader;
pub mod live;
pub mod metrics;
pub mod migrate;
pub mod peers;
pub mod pki;
pub mod presence;
pub mod probe;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;
pub mod tokens;
pub mod tunnel_auth;
