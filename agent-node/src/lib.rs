//! `cattle-node-agent`: the per-node agent of Rancher ≤ 2.11 (spec `cattle-agent.md` §4.3).
//!
//! It dials `wss://<server>/v3/connect[/register]` with the node's identity in
//! `X-API-Tunnel-Params` and serves what the server opens: `tcp` anywhere, and `unix` to the
//! node's Docker socket (Rancher always asks for `/var/run/docker.sock`; that name and the
//! configured path both reach the configured socket).
//!
//! ```text
//!  CATTLE_NODE_NAME / hostname, CATTLE_ADDRESS, CATTLE_INTERNAL_ADDRESS, CATTLE_ROLE,
//!  CATTLE_NODE_LABEL, CATTLE_NODE_TAINTS, GET /info on the Docker socket
//!        ──▶ {"node":{"controlPlane":…,"customConfig":{…},"dockerInfo":{…},"etcd":…,
//!                     "requestedHostname":…,"worker":…}}
//! ```
//!
//! Not done: executing RKE plans from `/v3/connect/config` (the agent never asks for one),
//! cloud-metadata address keywords (`awslocal`, `ipify`, …), the kubelet allow-list entries.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use agent_core::config::CommonArgs;
use agent_core::env::{ConfigError, ConfigErrors, Strings};
use agent_core::{CommonConfig, Credentials, CredentialsPrecedence};
use serde_json::{Value, json};

/// `CATTLE_NODE_NAME`: the node's name (`requestedHostname`).
pub const ENV_NODE_NAME: &str = "CATTLE_NODE_NAME";
/// `CATTLE_ADDRESS`: the node's address.
pub const ENV_ADDRESS: &str = "CATTLE_ADDRESS";
/// `CATTLE_INTERNAL_ADDRESS`: the node's internal address.
pub const ENV_INTERNAL_ADDRESS: &str = "CATTLE_INTERNAL_ADDRESS";
/// `CATTLE_ROLE`: comma list of `etcd`, `controlplane`, `worker`.
pub const ENV_ROLE: &str = "CATTLE_ROLE";
/// `CATTLE_NODE_LABEL`: `k=v,…`.
pub const ENV_NODE_LABEL: &str = "CATTLE_NODE_LABEL";
/// `CATTLE_NODE_TAINTS`: `key=value:Effect,…`.
pub const ENV_NODE_TAINTS: &str = "CATTLE_NODE_TAINTS";
/// `CATTLE_DOCKER_SOCKET`: the Docker socket's path (this project's).
pub const ENV_DOCKER_SOCKET: &str = "CATTLE_DOCKER_SOCKET";

/// Command line of `cattle-node-agent`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cattle-node-agent",
    version,
    about = "Rancher-compatible node agent: keeps a reverse tunnel to the management server and \
             serves the node's Docker socket through it",
    long_about = "Rancher-compatible node agent: keeps a reverse tunnel to the management \
                  server (wss://<server>/v3/connect) and serves the streams the server opens \
                  through it: tcp to any address, unix only to the node's Docker socket. Every \
                  flag can also be given as the environment variable shown with it."
)]
pub struct Args {
    /// Settings shared with the cluster agent.
    #[command(flatten)]
    pub common: CommonArgs,

    /// The node's name, sent as requestedHostname. Default: the short host name.
    #[arg(long, env = ENV_NODE_NAME, value_name = "NAME")]
    pub node_name: Option<String>,

    /// The node's address: an IP, a host name, or an interface name (its first IPv4 address).
    /// Default: the source address of the route to 8.8.8.8.
    #[arg(long, env = ENV_ADDRESS, value_name = "ADDRESS")]
    pub address: Option<String>,

    /// The node's internal address, resolved like --address. Default: empty.
    #[arg(long, env = ENV_INTERNAL_ADDRESS, value_name = "ADDRESS")]
    pub internal_address: Option<String>,

    /// Comma list of roles: etcd, controlplane, worker. Sets the etcd/controlPlane/worker
    /// params. Default: none.
    #[arg(long, env = ENV_ROLE, value_name = "ROLES")]
    pub role: Option<String>,

    /// Node labels, key=value,...
    #[arg(long, env = ENV_NODE_LABEL, value_name = "LABELS")]
    pub node_label: Option<String>,

    /// Node taints, key=value:Effect,... (Effect: NoSchedule, PreferNoSchedule, NoExecute).
    #[arg(long, env = ENV_NODE_TAINTS, value_name = "TAINTS")]
    pub node_taints: Option<String>,

    /// The node's Docker socket, served for unix Connects to /var/run/docker.sock or to this
    /// path, and asked for GET /info (the dockerInfo param). Default /var/run/docker.sock.
    #[arg(long, env = ENV_DOCKER_SOCKET, value_name = "PATH")]
    pub docker_socket: Option<String>,
}

impl Args {
    /// The parsed flags as variable-keyed strings.
    pub fn to_strings(&self) -> HashMap<&'static str, String> {
        self.common.strings_with([
            (ENV_NODE_NAME, &self.node_name),
            (ENV_ADDRESS, &self.address),
            (ENV_INTERNAL_ADDRESS, &self.internal_address),
            (ENV_ROLE, &self.role),
            (ENV_NODE_LABEL, &self.node_label),
            (ENV_NODE_TAINTS, &self.node_taints),
            (ENV_DOCKER_SOCKET, &self.docker_socket),
        ])
    }
}

/// A node role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `etcd`.
    Etcd,
    /// `controlplane`.
    ControlPlane,
    /// `worker`.
    Worker,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::ControlPlane => "controlplane",
            Self::Worker => "worker",
        }
    }
}

/// The node's identity, as reported in the params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `requestedHostname`.
    pub name: String,
    /// `customConfig.address`.
    pub address: String,
    /// `customConfig.internalAddress`.
    pub internal_address: String,
    /// Roles in the order given, without duplicates.
    pub roles: Vec<Role>,
    /// `customConfig.label`.
    pub labels: BTreeMap<String, String>,
    /// `customConfig.taints`, as given (`key=value:Effect`).
    pub taints: Vec<String>,
}

/// Everything the node agent runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Shared settings.
    pub common: CommonConfig,
    /// Where the tunnel goes and its token.
    pub credentials: Credentials,
    /// Who this node is.
    pub identity: NodeIdentity,
    /// The Docker socket.
    pub docker_socket: PathBuf,
}

/// Where system facts come from, so tests do not depend on the machine.
pub trait Host {
    /// The host name.
    fn hostname(&self) -> Option<String>;
    /// The first IPv4 address of interface `name`, if it is an interface.
    fn interface_ipv4(&self, name: &str) -> Option<IpAddr>;
    /// The source address of the route to 8.8.8.8.
    fn default_route_source(&self) -> Option<IpAddr>;
}

/// The real machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn hostname(&self) -> Option<String> {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    fn interface_ipv4(&self, name: &str) -> Option<IpAddr> {
        if name.contains('/') || !std::path::Path::new("/sys/class/net").join(name).exists() {
            return None;
        }
        // `ip -o -4 addr show dev NAME`: "2: eth0    inet 10.0.0.5/24 brd … scope global eth0".
        let out = std::process::Command::new("ip")
            .args(["-o", "-4", "addr", "show", "dev", name])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "inet")?;
        words.next()?.split('/').next()?.parse().ok()
    }

    fn default_route_source(&self) -> Option<IpAddr> {
        // A connected UDP socket sends nothing; it only picks the route and its source.
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        sock.connect("8.8.8.8:53").ok()?;
        Some(sock.local_addr().ok()?.ip())
    }
}

/// Address keywords `run.sh` resolves through cloud metadata services; not supported here.
const CLOUD_KEYWORDS: [&str; 11] = [
    "awslocal",
    "awspublic",
    "doprivate",
    "dopublic",
    "azprivate",
    "azpublic",
    "gceinternal",
    "gceexternal",
    "packetlocal",
    "packetpublic",
    "ipify",
];

fn resolve_address(host: &impl Host, name: &str, raw: &str) -> Result<String, ConfigError> {
    let raw = raw.trim();
    if CLOUD_KEYWORDS.contains(&raw) {
        return Err(ConfigError::invalid(
            name,
            raw,
            "cloud metadata address lookups are not supported; give the address itself",
        ));
    }
    if raw.parse::<IpAddr>().is_ok() {
        return Ok(raw.to_owned());
    }
    if let Some(ip) = host.interface_ipv4(raw) {
        return Ok(ip.to_string());
    }
    // A host name, used as given (as run.sh does with anything it does not recognise).
    Ok(raw.to_owned())
}

impl NodeConfig {
    /// Parses and checks every setting, reporting all problems at once.
    pub fn from_strings(strings: &impl Strings, host: &impl Host) -> Result<Self, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let loaded = agent_core::config::load(strings, CredentialsPrecedence::EnvFirst)
            .map_err(|e| errs.extend(e))
            .ok();

        let name = strings
            .get_nonempty(ENV_NODE_NAME)
            .or_else(|| {
                host.hostname()
                    .map(|h| h.split('.').next().unwrap_or_default().to_owned())
            })
            .filter(|n| !n.is_empty());
        if name.is_none() {
            errs.push(ConfigError::missing(
                ENV_NODE_NAME,
                "the host name could not be read either",
            ));
        }
        let address = match strings.get_nonempty(ENV_ADDRESS) {
            Some(raw) => errs.take(resolve_address(host, ENV_ADDRESS, &raw)),
            None => {
                let detected = host.default_route_source().map(|ip| ip.to_string());
                if detected.is_none() {
                    errs.push(ConfigError::missing(
                        ENV_ADDRESS,
                        "there is no route to 8.8.8.8 to detect it from; set it (--address)",
                    ));
                }
                detected
            }
        };
        let internal_address = match strings.get_nonempty(ENV_INTERNAL_ADDRESS) {
            Some(raw) => errs.take(resolve_address(host, ENV_INTERNAL_ADDRESS, &raw)),
            None => Some(String::new()),
        };
        let roles = errs.take(parse_roles(strings.get(ENV_ROLE).as_deref().unwrap_or("")));
        let labels = errs.take(parse_labels(
            strings.get(ENV_NODE_LABEL).as_deref().unwrap_or(""),
        ));
        let taints = errs.take(parse_taints(
            strings.get(ENV_NODE_TAINTS).as_deref().unwrap_or(""),
        ));
        let docker_socket = PathBuf::from(
            strings
                .get_nonempty(ENV_DOCKER_SOCKET)
                .unwrap_or_else(|| agent_core::allow::DOCKER_SOCKET.to_owned()),
        );
        if !docker_socket.is_absolute() {
            errs.push(ConfigError::invalid(
                ENV_DOCKER_SOCKET,
                docker_socket.display().to_string(),
                "must be an absolute path",
            ));
        }
        match (
            loaded,
            name,
            address,
            internal_address,
            roles,
            labels,
            taints,
        ) {
            (
                Some((common, credentials)),
                Some(name),
                Some(address),
                Some(internal_address),
                Some(roles),
                Some(labels),
                Some(taints),
            ) if errs.is_empty() => Ok(Self {
                common,
                credentials,
                identity: NodeIdentity {
                    name,
                    address,
                    internal_address,
                    roles,
                    labels,
                    taints,
                },
                docker_socket,
            }),
            _ => Err(errs),
        }
    }
}

fn list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_roles(raw: &str) -> Result<Vec<Role>, ConfigError> {
    let mut roles = Vec::new();
    for r in list(raw) {
        let role = match r.to_ascii_lowercase().as_str() {
            "etcd" => Role::Etcd,
            "controlplane" => Role::ControlPlane,
            "worker" => Role::Worker,
            _ => {
                return Err(ConfigError::invalid(
                    ENV_ROLE,
                    raw,
                    format!("unknown role {r:?} (roles: etcd, controlplane, worker)"),
                ));
            }
        };
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

fn parse_labels(raw: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for item in list(raw) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ConfigError::invalid(
                ENV_NODE_LABEL,
                raw,
                format!("{item:?} is not key=value"),
            ));
        };
        if k.is_empty() {
            return Err(ConfigError::invalid(ENV_NODE_LABEL, raw, "empty label key"));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

fn parse_taints(raw: &str) -> Result<Vec<String>, ConfigError> {
    let mut taints = Vec::new();
    for item in list(raw) {
        let effect = item.rsplit_once(':').map(|(_, e)| e);
        if !matches!(
            effect,
            Some("NoSchedule" | "PreferNoSchedule" | "NoExecute")
        ) || item.starts_with([':', '='])
        {
            return Err(ConfigError::invalid(
                ENV_NODE_TAINTS,
                raw,
                format!(
                    "{item:?} is not key=value:Effect (Effect: NoSchedule, PreferNoSchedule, NoExecute)"
                ),
            ));
        }
        taints.push(item.to_owned());
    }
    Ok(taints)
}

/// The node params of spec §4.3. `docker_info` is omitted when `None` (Docker unreachable).
pub fn node_params(identity: &NodeIdentity, docker_info: Option<Value>) -> Value {
    let has = |r: Role| identity.roles.contains(&r);
    let roles = if identity.roles.is_empty() {
        Value::Null
    } else {
        json!(
            identity
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
        )
    };
    let taints = if identity.taints.is_empty() {
        Value::Null
    } else {
        json!(identity.taints)
    };
    let mut node = json!({
        "controlPlane": has(Role::ControlPlane),
        "customConfig": {
            "address": identity.address,
            "internalAddress": identity.internal_address,
            "label": identity.labels,
            "roles": roles,
            "taints": taints,
        },
        "etcd": has(Role::Etcd),
        "requestedHostname": identity.name,
        "worker": has(Role::Worker),
    });
    if let (Some(info), Some(obj)) = (docker_info, node.as_object_mut()) {
        obj.insert("dockerInfo".to_owned(), info);
    }
    json!({ "node": node })
}

/// `GET /info` on the Docker socket, or `None` (logged) if it cannot be had within 5 s.
pub async fn docker_info(socket: &std::path::Path) -> Option<Value> {
    let req = http::Request::get("/info").body(bytes::Bytes::new()).ok()?;
    match agent_core::http::unix_request(socket, req, Duration::from_secs(5)).await {
        Ok(resp) if resp.status().is_success() => match serde_json::from_slice(resp.body()) {
            Ok(v) => Some(v),
            Err(error) => {
                tracing::warn!(socket = %socket.display(), %error, "Docker /info is not JSON; no dockerInfo");
                None
            }
        },
        Ok(resp) => {
            tracing::warn!(socket = %socket.display(), status = %resp.status(), "Docker /info failed; no dockerInfo");
            None
        }
        Err(error) => {
            tracing::warn!(socket = %socket.display(), %error, "Docker is not reachable; no dockerInfo");
            None
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT and the drain are over. Errors are start-up failures
/// (pre-flight, health endpoint); the caller exits non-zero with them.
pub async fn run(config: NodeConfig) -> Result<(), String> {
    use agent_core::allow::AllowList;
    use agent_core::runtime::{Runtime, log_connecting, main_tunnel};

    let common = &config.common;
    let Some((rt, preflight)) = Runtime::start(common, &config.credentials.server)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let info = docker_info(&config.docker_socket).await;
    let params = node_params(&config.identity, info);
    log_connecting(
        common,
        &config.credentials,
        format_args!("node={}", config.identity.name),
    );
    let spec = main_tunnel(
        common,
        &config.credentials,
        &params,
        preflight.trust,
        AllowList::rancher_with_socket(&config.docker_socket),
        None,
    )
    .map_err(|e| e.to_string())?;
    rt.spawn_tunnel(spec);
    rt.run_until_signal().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_core::env::{ENV_SERVER, ENV_TOKEN};

    struct FakeHost;
    impl Host for FakeHost {
        fn hostname(&self) -> Option<String> {
            Some("node-1.example.com".to_owned())
        }
        fn interface_ipv4(&self, name: &str) -> Option<IpAddr> {
            (name == "eth0").then(|| "10.0.0.5".parse().unwrap())
        }
        fn default_route_source(&self) -> Option<IpAddr> {
            Some("192.168.1.10".parse().unwrap())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn defaults_from_the_host() {
        let e = env(&[(ENV_SERVER, "https://r"), (ENV_TOKEN, "t")]);
        let c = NodeConfig::from_strings(&e, &FakeHost).unwrap();
        assert_eq!(c.identity.name, "node-1");
        assert_eq!(c.identity.address, "192.168.1.10");
        assert_eq!(c.identity.internal_address, "");
        assert_eq!(c.docker_socket, PathBuf::from("/var/run/docker.sock"));
        let p = node_params(&c.identity, None);
        assert_eq!(
            agent_core::params::go_json(&p),
            r#"{"node":{"controlPlane":false,"customConfig":{"address":"192.168.1.10","internalAddress":"","label":{},"roles":null,"taints":null},"etcd":false,"requestedHostname":"node-1","worker":false}}"#
        );
    }

    #[test]
    fn roles_labels_taints_and_docker_info() {
        let e = env(&[
            (ENV_SERVER, "https://r"),
            (ENV_TOKEN, "t"),
            (ENV_NODE_NAME, "n1"),
            (ENV_ADDRESS, "eth0"),
            (ENV_INTERNAL_ADDRESS, "172.16.0.2"),
            (ENV_ROLE, "worker,etcd"),
            (ENV_NODE_LABEL, "a=1,b=2"),
            (ENV_NODE_TAINTS, "k=v:NoSchedule"),
        ]);
        let c = NodeConfig::from_strings(&e, &FakeHost).unwrap();
        let p = node_params(
            &c.identity,
            Some(json!({"ServerVersion": "20.10.24", "ID": "x"})),
        );
        assert_eq!(
            agent_core::params::go_json(&p),
            r#"{"node":{"controlPlane":false,"customConfig":{"address":"10.0.0.5","internalAddress":"172.16.0.2","label":{"a":"1","b":"2"},"roles":["worker","etcd"],"taints":["k=v:NoSchedule"]},"dockerInfo":{"ID":"x","ServerVersion":"20.10.24"},"etcd":true,"requestedHostname":"n1","worker":true}}"#
        );
    }

    #[test]
    fn every_bad_node_variable_is_reported() {
        let e = env(&[
            (ENV_ADDRESS, "awspublic"),
            (ENV_ROLE, "worker,boss"),
            (ENV_NODE_LABEL, "novalue"),
            (ENV_NODE_TAINTS, "k=v:Sometimes"),
            (ENV_DOCKER_SOCKET, "relative.sock"),
        ]);
        let errs = NodeConfig::from_strings(&e, &FakeHost).unwrap_err();
        for name in [
            ENV_SERVER,
            ENV_TOKEN,
            ENV_ADDRESS,
            ENV_ROLE,
            ENV_NODE_LABEL,
            ENV_NODE_TAINTS,
            ENV_DOCKER_SOCKET,
        ] {
            assert!(errs.names(name), "{name} missing from:\n{errs}");
        }
    }
}
