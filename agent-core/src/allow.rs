//! Which Connects an agent serves (spec §5), enforced as the tunnel's authorizer, so nothing is
//! dialed before the check.
//!
//! Rancher's agents allow `tcp` to any address, `unix` only to `/var/run/docker.sock` and
//! `npipe` only to `//./pipe/docker_engine`. In Go a refused Connect kills the whole session
//! (wire spec §2.6); tunnel-proto answers it with an Error on that stream only and the tunnel
//! carries on. Each refusal is logged and counted here. After SIGTERM every new Connect is
//! refused the same way, so open streams can finish while nothing new starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tunnel_proto::mux::Authorizer;
use tunnel_proto::wire::Target;

use crate::metrics::{Metrics, TunnelMetrics};

/// The Docker socket path Rancher dials.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The Docker named pipe Rancher dials on Windows nodes.
pub const DOCKER_NPIPE: &str = "//./pipe/docker_engine";

/// What the server may ask an agent to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowList {
    /// Rancher's list: `tcp` anywhere, `unix` to the Docker socket, `npipe` to the Docker pipe.
    /// `docker_socket` is the local path dialed for `unix`; Connects may name it or
    /// [`DOCKER_SOCKET`] (what Rancher always sends), both are dialed at `docker_socket`.
    Rancher {
        /// The local Docker socket.
        docker_socket: PathBuf,
    },
    /// Everything (the steve tunnel, whose streams never reach a real socket).
    All,
}

impl AllowList {
    /// Rancher's list with the standard socket path (the cluster agent).
    pub fn rancher() -> Self {
        Self::Rancher {
            docker_socket: PathBuf::from(DOCKER_SOCKET),
        }
    }

    /// Rancher's list with the Docker socket at `path` (the node agent).
    pub fn rancher_with_socket(path: impl Into<PathBuf>) -> Self {
        Self::Rancher {
            docker_socket: path.into(),
        }
    }

    /// `Ok` if allowed, else why not.
    pub fn check(&self, target: &Target) -> Result<(), &'static str> {
        match self {
            Self::All => Ok(()),
            Self::Rancher { .. } => match target.proto.as_str() {
                "tcp" => Ok(()),
                "unix" if self.unix_path(&target.address).is_some() => Ok(()),
                "unix" => Err("unix sockets other than the Docker socket are not allowed"),
                "npipe" if target.address == DOCKER_NPIPE => Ok(()),
                "npipe" => Err("named pipes other than the Docker pipe are not allowed"),
                _ => Err("protocol not allowed"),
            },
        }
    }

    /// The local path to dial for an allowed `unix` Connect to `address`.
    pub fn unix_path(&self, address: &str) -> Option<&Path> {
        match self {
            Self::All => None,
            Self::Rancher { docker_socket } => (address == DOCKER_SOCKET
                || Path::new(address) == docker_socket)
                .then_some(docker_socket.as_path()),
        }
    }
}

/// The tunnel authorizer for `list`: refuses what the list refuses, and everything once the
/// agent is draining; logs and counts every decision.
pub fn authorizer(
    list: AllowList,
    metrics: Arc<Metrics>,
    tunnel: Arc<TunnelMetrics>,
) -> Authorizer {
    Arc::new(move |target: &Target| {
        let verdict = if metrics.is_draining() {
            Err("the agent is shutting down")
        } else {
            list.check(target)
        };
        match verdict {
            Ok(()) => {
                tunnel.dial_allowed(&target.proto);
                tracing::debug!(tunnel = tunnel.name(), %target, "connect allowed");
                true
            }
            Err(reason) => {
                tunnel.dial_refused(&target.proto);
                tracing::warn!(tunnel = tunnel.name(), %target, reason, "connect refused");
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rancher_list() {
        let l = AllowList::rancher();
        assert!(l.check(&Target::new("tcp", "10.43.0.1:443")).is_ok());
        assert!(
            l.check(&Target::new("unix", "/var/run/docker.sock"))
                .is_ok()
        );
        assert!(
            l.check(&Target::new("unix", "/run/containerd.sock"))
                .is_err()
        );
        assert!(
            l.check(&Target::new("npipe", "//./pipe/docker_engine"))
                .is_ok()
        );
        assert!(l.check(&Target::new("npipe", "//./pipe/other")).is_err());
        assert!(l.check(&Target::new("udp", "1.1.1.1:53")).is_err());
    }

    #[test]
    fn configured_socket() {
        let l = AllowList::rancher_with_socket("/tmp/d/docker.sock");
        assert!(l.check(&Target::new("unix", "/tmp/d/docker.sock")).is_ok());
        assert_eq!(
            l.unix_path("/var/run/docker.sock"),
            Some(Path::new("/tmp/d/docker.sock"))
        );
        assert!(l.check(&Target::new("unix", "/tmp/d/other.sock")).is_err());
    }

    #[test]
    fn refusals_are_counted_and_draining_refuses_all() {
        let m = Arc::new(Metrics::default());
        let t = m.tunnel("main");
        let auth = authorizer(AllowList::rancher(), m.clone(), t.clone());
        assert!(auth(&Target::new("tcp", "1.2.3.4:5")));
        assert!(!auth(&Target::new("unix", "/etc/shadow")));
        assert_eq!(t.refused("unix"), 1);
        m.set_draining();
        assert!(!auth(&Target::new("tcp", "1.2.3.4:5")));
        assert_eq!(t.refused("tcp"), 1);
    }
}
