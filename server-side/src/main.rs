//! `tunnel-server`: the management server and its admin CLI.
//!
//! ```text
//! tunnel-server [--data-dir DIR] serve [--listen ADDR] [--server-url URL] [--tls-cert F --tls-key F [--cacerts F]] [--insecure-http] [--auth-failure-burst N] [--auth-failure-refill R] [--auth-failure-max-addresses N]
//! tunnel-server [--data-dir DIR] cluster add NAME | cluster list | cluster rm CLUSTER
//! tunnel-server [--data-dir DIR] cluster token CLUSTER [--new | --revoke TOKEN]
//! tunnel-server [--data-dir DIR] user add NAME [--admin] [--group G]... | user list
//! tunnel-server [--data-dir DIR] token add USER [--ttl 24h] | token list [--user USER] | token revoke ID
//! tunnel-server [--data-dir DIR] grant USER CLUSTER
//! tunnel-server [--data-dir DIR] kubeconfig CLUSTER --user USER [--ttl 30d]
//! ```
//!
//! The admin commands work on the store directly (the server may be running: SQLite handles
//! the concurrency). Each one that changes something logs an audit line (target `audit`, on
//! stderr) naming `cli:<OS user>`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use server_side::audit::{self, Mutation, Outcome};
use server_side::server::{self, ServeConfig, Server, TlsSource};
use server_side::store::Store;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tunnel-server",
    version,
    about = "Management server for reverse-tunnel cattle agents"
)]
struct Cli {
    /// Data directory: the SQLite store and ca.pem.
    #[arg(
        long,
        global = true,
        env = "TUNNEL_SERVER_DATA_DIR",
        default_value = "/var/lib/tunnel-server"
    )]
    data_dir: PathBuf,
    /// Where the state is kept: `sqlite` (a file in the data directory) or `kubernetes`
    /// (custom resources in an apiserver: several replicas can share it).
    #[arg(
        long,
        global = true,
        env = "TUNNEL_SERVER_STORE",
        default_value = "sqlite"
    )]
    store: StoreKind,
    /// With --store kubernetes: a kubeconfig (default: in-cluster, else $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, global = true, env = "TUNNEL_SERVER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// With --store kubernetes: the namespace of the objects (default: the kubeconfig
    /// context's, in a pod its own).
    #[arg(long, global = true, env = "TUNNEL_SERVER_NAMESPACE")]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// A store backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// One SQLite file in the data directory.
    Sqlite,
    /// Custom resources in a Kubernetes apiserver.
    Kubernetes,
}

impl Cli {
    /// Opens the store the flags name (outside any runtime: the Kubernetes store runs its own).
    fn open_store(&self) -> anyhow::Result<std::sync::Arc<dyn Store>> {
        Ok(match self.store {
            StoreKind::Sqlite => std::sync::Arc::new(server::open_store(&self.data_dir)?),
            StoreKind::Kubernetes => {
                std::sync::Arc::new(server_side::store::KubeStore::open(&self.kube_config())?)
            }
        })
    }

    fn kube_config(&self) -> server_side::store::KubeStoreConfig {
        server_side::store::KubeStoreConfig {
            kubeconfig: self.kubeconfig.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Print the CustomResourceDefinitions of the Kubernetes store (YAML for kubectl apply).
    Crds,
    /// Copy every record from one store to another, keeping ids, timestamps and tokens.
    Migrate(server_side::migrate::MigrateArgs),
    /// Manage clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Manage users.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Grant a user access to a cluster (its Kubernetes API and its nodes' Docker APIs).
    Grant {
        /// User name or id.
        user: String,
        /// Cluster name or id.
        cluster: String,
    },
    /// Print a kubeconfig for a cluster through this server, with a new API token of the user
    /// that expires after 30 days unless --ttl says otherwise.
    Kubeconfig {
        /// Cluster name or id.
        cluster: String,
        /// User name or id.
        #[arg(long)]
        user: String,
        /// Lifetime of the kubeconfig's token: 90m, 24h, 30d, ...; 0 or never: no expiry.
        #[arg(long, default_value = server_side::kubeconfig::DEFAULT_TOKEN_TTL)]
        ttl: String,
        /// Server URL (default: the one the server last started with).
        #[arg(long)]
        server_url: Option<String>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: String,
    /// Public URL agents and users reach the server at (default https://<listen address>).
    #[arg(long)]
    server_url: Option<String>,
    /// Serving certificate chain (PEM); with --tls-key replaces the generated certificate.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate agents should pin (with --tls-cert); omit for a publicly trusted one.
    #[arg(long, requires = "tls_cert")]
    cacerts: Option<PathBuf>,
    /// Serve plain HTTP. For tests only.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// Cluster agent image in import manifests.
    #[arg(long, default_value = server::DEFAULT_AGENT_IMAGE)]
    agent_image: String,
    /// Node agent image in import manifests.
    #[arg(long, default_value = server::DEFAULT_NODE_AGENT_IMAGE)]
    node_agent_image: String,
    /// Seconds between Connected probes of each cluster.
    #[arg(long, default_value_t = 15.0)]
    probe_interval: f64,
    /// Seconds to wait for requests and tunnels on shutdown.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
    /// Failed agent authentications (/v3/connect) one address may make in a row before its
    /// requests are refused without any lookup; 0 turns the limit off.
    #[arg(long, default_value_t = server_side::auth_limit::DEFAULT_BURST)]
    auth_failure_burst: u32,
    /// Failed authentications per second an address regains.
    #[arg(long, default_value_t = server_side::auth_limit::DEFAULT_REFILL_PER_SEC)]
    auth_failure_refill: f64,
    /// Most addresses the failed-authentication limit tracks at once.
    #[arg(long, default_value_t = server_side::auth_limit::DEFAULT_MAX_ADDRESSES)]
    auth_failure_max_addresses: usize,
    /// Also serve GET /metrics without authentication, as plain HTTP, on this address (for
    /// Prometheus on a private network); on the main listener /metrics needs an admin token.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Most connections open at once (tunnels included); more are closed when accepted.
    #[arg(long, default_value_t = tunnel_proto::driver::acceptor::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most connections open at once from one address (IPv6: its /64).
    #[arg(long, default_value_t = tunnel_proto::driver::acceptor::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    max_connections_per_peer: usize,
    /// Seconds a client may take to send a request's headers (slow clients are cut).
    #[arg(long, default_value_t = 30.0)]
    header_read_timeout: f64,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create a cluster; prints the import command.
    Add {
        /// Unique name.
        name: String,
        /// Server URL (default: the one the server last started with).
        #[arg(long)]
        server_url: Option<String>,
    },
    /// List clusters.
    List,
    /// Show a cluster's registration tokens and import commands; add or delete one (rotation:
    /// `--new`, re-import with the new command, then `--revoke` the old token).
    Token {
        /// Cluster name or id.
        cluster: String,
        /// Add a token and print its import command.
        #[arg(long, conflicts_with = "revoke")]
        new: bool,
        /// Delete this token; agents still using it get 400 `cluster not found`.
        #[arg(long)]
        revoke: Option<String>,
        /// Server URL (default: the one the server last started with).
        #[arg(long)]
        server_url: Option<String>,
    },
    /// Delete a cluster (name or id) and everything that belongs to it.
    Rm {
        /// Cluster name or id.
        cluster: String,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user; prints its API token once.
    Add {
        /// Unique name (the Impersonate-User downstream).
        name: String,
        /// May use the /v1 API and reach every cluster.
        #[arg(long)]
        admin: bool,
        /// Group (Impersonate-Group); repeat for several.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List users.
    List,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create another API token for a user; prints it once.
    #[command(visible_alias = "create")]
    Add {
        /// User name or id.
        user: String,
        /// Lifetime: 90m, 24h, 30d, ...; 0 or never (the default): no expiry.
        #[arg(long, default_value = "never")]
        ttl: String,
        /// Free text shown by `token list`.
        #[arg(long, default_value = "created with the CLI")]
        description: String,
    },
    /// List API tokens with their expiry and last use (a running server records uses every
    /// few seconds).
    List {
        /// Only this user's (name or id).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke an API token (token-xxxxx).
    Revoke {
        /// Token id.
        id: String,
    },
}

fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("static filter"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let store = match &cli.command {
        Command::Crds => {
            print!("{}", server_side::store::kube::crd::crds_yaml());
            return Ok(());
        }
        Command::Migrate(args) => return Ok(server_side::migrate::run(args, &cli.kube_config())?),
        _ => cli.open_store()?,
    };
    match cli.command {
        Command::Serve(args) => serve(cli.data_dir, store, args),
        other => admin(store.as_ref(), other),
    }
}

fn serve(
    data_dir: PathBuf,
    store: std::sync::Arc<dyn Store>,
    args: ServeArgs,
) -> anyhow::Result<()> {
    let mut config = ServeConfig::new(args.listen, data_dir);
    config.store = server::StoreBackend::Opened(store);
    config.server_url = args.server_url;
    config.tls = match (args.tls_cert, args.tls_key, args.insecure_http) {
        (_, _, true) => TlsSource::InsecureHttp,
        (Some(cert), Some(key), false) => TlsSource::Files {
            cert,
            key,
            cacerts: args.cacerts,
        },
        _ => TlsSource::Generated,
    };
    config.agent_image = args.agent_image;
    config.node_agent_image = args.node_agent_image;
    config.probe_interval = secs(args.probe_interval, "--probe-interval")?;
    config.shutdown_grace = secs(args.shutdown_grace, "--shutdown-grace")?;
    config.auth_limit = server_side::auth_limit::AuthLimitConfig {
        burst: args.auth_failure_burst,
        refill_per_sec: args.auth_failure_refill,
        max_addresses: args.auth_failure_max_addresses,
    };

    config.metrics_listen = args.metrics_listen;
    config.max_connections = args.max_connections;
    config.max_connections_per_peer = args.max_connections_per_peer;
    config.header_read_timeout = secs(args.header_read_timeout, "--header-read-timeout")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config).await?;
        let url = server.app().config.server_url.clone();
        tracing::info!(addr = %server.local_addr(), %url, "tunnel-server listening");
        // A line for scripts and tests that start the server on port 0.
        println!("listening on {} ({url})", server.local_addr());
        if let Some(addr) = server.metrics_addr() {
            println!("metrics on {addr}");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        server.run(shutdown).await;
        tracing::info!("tunnel-server stopped");
        Ok(())
    })
}

fn secs(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// First SIGTERM or SIGINT: graceful shutdown. A second one: exit at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

/// What an admin command changes, as its audit line names it (before it runs).
fn mutation_of(command: &Command) -> Option<Mutation> {
    Some(match command {
        Command::Serve(_)
        | Command::Crds
        | Command::Migrate(_)
        | Command::Cluster(ClusterCmd::List)
        | Command::User(UserCmd::List)
        | Command::Token(TokenCmd::List { .. }) => return None,
        Command::Cluster(ClusterCmd::Token {
            cluster,
            new,
            revoke,
            ..
        }) => match (new, revoke) {
            (_, Some(token)) => Mutation::new(
                "delete",
                "registration-token",
                format!("{cluster} {}", audit::redact(token)),
            ),
            (true, None) => Mutation::new("create", "registration-token", cluster.clone()),
            (false, None) => return None,
        },
        Command::Cluster(ClusterCmd::Add { name, .. }) => {
            Mutation::new("create", "cluster", name.clone())
        }
        Command::Cluster(ClusterCmd::Rm { cluster }) => {
            Mutation::new("delete", "cluster", cluster.clone())
        }
        Command::User(UserCmd::Add { name, .. }) => Mutation::new("create", "user", name.clone()),
        Command::Token(TokenCmd::Add { user, .. }) => {
            Mutation::new("create", "api-token", format!("for {user}"))
        }
        Command::Token(TokenCmd::Revoke { id }) => Mutation::new("revoke", "api-token", id.clone()),
        Command::Grant { user, cluster } => {
            Mutation::new("create", "grant", format!("{user} {cluster}"))
        }
        Command::Kubeconfig { cluster, user, .. } => Mutation::new(
            "create",
            "api-token",
            format!("for {user} (kubeconfig of {cluster})"),
        ),
    })
}

/// Runs an admin command and logs its audit line.
fn admin(store: &dyn Store, command: Command) -> anyhow::Result<()> {
    let mutation = mutation_of(&command);
    let mut target = mutation.as_ref().map(|m| m.id.clone()).unwrap_or_default();
    let result = run_admin(store, command, &mut target);
    if let Some(mut m) = mutation {
        m.id = target;
        let (outcome, detail) = match &result {
            Ok(()) => (Outcome::Ok, "-".to_owned()),
            Err(err) => (Outcome::Failed, format!("{err:#}")),
        };
        audit::log(&audit::cli_user(), "cli", &m, outcome, &detail);
    }
    result
}

/// Unix seconds `ttl` from now, or `None` for no expiry.
fn expiry(ttl: &str) -> anyhow::Result<Option<i64>> {
    let ttl = server_side::tokens::parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    Ok(ttl.map(|d| now_unix() + d.as_secs() as i64))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-12-07T16:34:10Z` (UTC) of Unix seconds.
fn utc(ts: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let (days, secs) = (ts.div_euclid(86_400), ts.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn run_admin(store: &dyn Store, command: Command, target: &mut String) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::Crds | Command::Migrate(_) => {
            unreachable!("handled by main")
        }
        Command::Cluster(ClusterCmd::Add { name, server_url }) => {
            let url = server_url_of(store, server_url)?;
            let (cluster, token) = store.create_cluster(&name)?;
            *target = format!("{} ({})", cluster.id, cluster.name);
            println!("cluster {} created as {}", cluster.name, cluster.id);
            println!("import it by running, in the cluster:");
            println!(
                "  {}",
                server_side::import::import_command(&url, &token.token, &cluster.id)
            );
        }
        Command::Cluster(ClusterCmd::List) => {
            println!("{:<10} {:<24} API ENDPOINT", "ID", "NAME");
            for c in store.clusters()? {
                println!(
                    "{:<10} {:<24} {}",
                    c.id,
                    c.name,
                    c.api_endpoint.as_deref().unwrap_or("-")
                );
            }
        }
        Command::Cluster(ClusterCmd::Rm { cluster }) => {
            let c = store
                .cluster_by_id_or_name(&cluster)?
                .with_context(|| format!("cluster {cluster} not found"))?;
            *target = format!("{} ({})", c.id, c.name);
            store.delete_cluster(&c.id)?;
            println!("cluster {} ({}) deleted", c.name, c.id);
        }
        Command::Cluster(ClusterCmd::Token {
            cluster,
            new,
            revoke,
            server_url,
        }) => {
            let c = store
                .cluster_by_id_or_name(&cluster)?
                .with_context(|| format!("cluster {cluster} not found"))?;
            if let Some(token) = revoke {
                if !store.delete_registration_token(&c.id, &token)? {
                    bail!("cluster {} has no such registration token", c.name);
                }
                println!("registration token revoked");
                return Ok(());
            }
            let url = server_url_of(store, server_url)?;
            if new {
                let t = store.create_registration_token(&c.id)?;
                *target = format!("{} {}", c.id, audit::redact(&t.token));
                println!(
                    "{}",
                    server_side::import::import_command(&url, &t.token, &c.id)
                );
                return Ok(());
            }
            for t in store.registration_tokens(&c.id)? {
                println!(
                    "{}",
                    server_side::import::import_command(&url, &t.token, &c.id)
                );
            }
        }
        Command::User(UserCmd::Add {
            name,
            admin,
            groups,
        }) => {
            let user = store.create_user(&name, &groups, admin)?;
            *target = format!("{} ({})", user.id, user.name);
            let (_, value) = store.create_api_token(&user.id, "created with the user", None)?;
            println!("user {} created as {}", user.name, user.id);
            println!("API token (shown once): {value}");
        }
        Command::User(UserCmd::List) => {
            println!("{:<12} {:<24} {:<6} GROUPS", "ID", "NAME", "ADMIN");
            for u in store.users()? {
                println!(
                    "{:<12} {:<24} {:<6} {}",
                    u.id,
                    u.name,
                    u.admin,
                    u.groups.join(",")
                );
            }
        }
        Command::Token(TokenCmd::Add {
            user,
            ttl,
            description,
        }) => {
            let expires_at = expiry(&ttl)?;
            let u = store
                .user_by_id_or_name(&user)?
                .with_context(|| format!("user {user} not found"))?;
            let (t, value) = store.create_api_token(&u.id, &description, expires_at)?;
            *target = format!("{} for {}", t.id, u.name);
            if let Some(at) = expires_at {
                eprintln!("token {} expires at {}", t.id, utc(at));
            }
            println!("{value}");
        }
        Command::Token(TokenCmd::List { user }) => {
            let user_id = match user {
                Some(user) => Some(
                    store
                        .user_by_id_or_name(&user)?
                        .with_context(|| format!("user {user} not found"))?
                        .id,
                ),
                None => None,
            };
            let names: std::collections::HashMap<String, String> =
                store.users()?.into_iter().map(|u| (u.id, u.name)).collect();
            let now = now_unix();
            println!(
                "{:<12} {:<16} {:<20} {:<20} {:<20} {:<8} DESCRIPTION",
                "ID", "USER", "CREATED", "EXPIRES", "LAST USED", "STATE"
            );
            for t in store.api_tokens(user_id.as_deref())? {
                let state = if t.revoked {
                    "revoked"
                } else if t.expired(now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<12} {:<16} {:<20} {:<20} {:<20} {:<8} {}",
                    t.id,
                    names.get(&t.user_id).unwrap_or(&t.user_id),
                    utc(t.created_at),
                    t.expires_at.map_or_else(|| "never".to_owned(), utc),
                    t.last_used_at.map_or_else(|| "never".to_owned(), utc),
                    state,
                    t.description
                );
            }
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            if !store.revoke_api_token(&id)? {
                bail!("token {id} not found");
            }
            println!("token {id} revoked");
        }
        Command::Grant { user, cluster } => {
            let u = store
                .user_by_id_or_name(&user)?
                .with_context(|| format!("user {user} not found"))?;
            let c = store
                .cluster_by_id_or_name(&cluster)?
                .with_context(|| format!("cluster {cluster} not found"))?;
            *target = format!("{} {}", u.id, c.id);
            store.grant(&u.id, &c.id)?;
            println!(
                "user {} may now reach cluster {} ({})",
                u.name, c.name, c.id
            );
        }
        Command::Kubeconfig {
            cluster,
            user,
            server_url,
            ttl,
        } => {
            let expires_at = expiry(&ttl)?;
            let url = server_url_of(store, server_url)?;
            let u = store
                .user_by_id_or_name(&user)?
                .with_context(|| format!("user {user} not found"))?;
            let c = store
                .cluster_by_id_or_name(&cluster)?
                .with_context(|| format!("cluster {cluster} not found"))?;
            let (t, token) =
                store.create_api_token(&u.id, &format!("kubeconfig for {}", c.name), expires_at)?;
            *target = format!("{} for {} (kubeconfig of {})", t.id, u.name, c.id);
            match expires_at {
                Some(at) => eprintln!("the kubeconfig's token {} expires at {}", t.id, utc(at)),
                None => eprintln!("the kubeconfig's token {} never expires", t.id),
            }
            let cacerts = store.setting("cacerts")?.unwrap_or_default();
            print!(
                "{}",
                server_side::kubeconfig::render(&url, &c.id, &c.name, &u.name, &token, &cacerts)
            );
        }
    }
    Ok(())
}

fn server_url_of(store: &dyn Store, flag: Option<String>) -> anyhow::Result<String> {
    match flag.or(store.setting("server-url")?) {
        Some(url) => Ok(url.trim_end_matches('/').to_owned()),
        None => bail!("no server URL known yet: pass --server-url or start the server once"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_661_250), "2026-12-07T16:34:10Z");
    }
}
