//! `tunnel-server`: the management server and its admin CLI.
//!
//! ```text
//! tunnel-server [--data-dir DIR] serve [--listen ADDR] [--server-url URL] [--tls-cert F --tls-key F [--cacerts F]] [--insecure-http] [--auth-failure-burst N] [--auth-failure-refill R] [--auth-failure-max-addresses N] [--peer-listen ADDR [--peer-address HOST:PORT]]
//! tunnel-server login --server URL --token TOKEN [--certificate-authority F | --fetch-ca | --insecure-skip-tls-verify] [--context NAME]
//! tunnel-server context list | context use NAME | context rm NAME
//! tunnel-server [GLOBAL] cluster add NAME | cluster list | cluster rm CLUSTER
//! tunnel-server [GLOBAL] cluster token CLUSTER [--new | --revoke TOKEN]
//! tunnel-server [GLOBAL] user add NAME [--admin] [--group G]... | user list
//! tunnel-server [GLOBAL] token add USER [--ttl 24h] | token list [--user USER] | token revoke ID
//! tunnel-server [GLOBAL] grant USER CLUSTER
//! tunnel-server [GLOBAL] kubeconfig CLUSTER --user USER [--ttl 30d]
//!   GLOBAL: --context NAME (another saved context) | --direct [--data-dir DIR] (the store)
//! ```
//!
//! The admin commands run against the current context's server through its `/v1` API (see
//! `cli/`; the server logs the audit lines, naming the token's user), or, with `--direct` or
//! when no context is current, on the store directly (bootstrap; the server may be running:
//! SQLite handles the concurrency). Then each one that changes something logs an audit line
//! (target `audit`, on stderr) naming `cli:<OS user>`. Both print the same text.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use server_side::audit::{self, Mutation, Outcome};
use server_side::server::{self, ServeConfig, Server, TlsSource};
use server_side::store::Store;
use tokio_util::sync::CancellationToken;

mod cli;

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
    #[command(flatten)]
    target: cli::Target,
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

/// The store the global flags name.
struct StoreChoice {
    kind: StoreKind,
    data_dir: PathBuf,
    kube: server_side::store::KubeStoreConfig,
}

impl StoreChoice {
    fn of(cli: &Cli) -> Self {
        Self {
            kind: cli.store,
            data_dir: cli.data_dir.clone(),
            kube: server_side::store::KubeStoreConfig {
                kubeconfig: cli.kubeconfig.clone(),
                namespace: cli.namespace.clone(),
            },
        }
    }

    /// Opens it (outside any runtime: the Kubernetes store runs its own).
    fn open(&self) -> anyhow::Result<std::sync::Arc<dyn Store>> {
        Ok(match self.kind {
            StoreKind::Sqlite => std::sync::Arc::new(server::open_store(&self.data_dir)?),
            StoreKind::Kubernetes => {
                std::sync::Arc::new(server_side::store::KubeStore::open(&self.kube)?)
            }
        })
    }
}

// Parsed once at start: the size of `Serve`'s arguments costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Check an admin token against a running server and save it as the current context;
    /// admin commands then go through the server's /v1 API.
    Login(cli::LoginArgs),
    /// List, switch or remove the saved contexts.
    #[command(subcommand)]
    Context(cli::ContextCmd),
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
    /// This replica's name, recorded as the holder of its tunnels (default: $POD_NAME, else
    /// the host name).
    #[arg(long, env = "TUNNEL_SERVER_REPLICA")]
    replica_name: Option<String>,
    /// Seconds a client may take to send a request's headers (slow clients are cut).
    #[arg(long, default_value_t = 30.0)]
    header_read_timeout: f64,
    /// With --store kubernetes and several replicas: listen here (mutual TLS with the
    /// server's CA) for requests other replicas forward to this one because it holds the
    /// tunnel, and forward to them the requests for tunnels they hold. Off when not given.
    #[arg(long, env = "TUNNEL_SERVER_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// host:port the other replicas reach the peer listener at (default: $POD_IP and the
    /// peer listener's port, else its address when it is not 0.0.0.0).
    #[arg(long, env = "TUNNEL_SERVER_PEER_ADDRESS", requires = "peer_listen")]
    peer_address: Option<String>,
    /// With --store kubernetes: seconds after which the elected leader marks disconnected a
    /// tunnel whose presence says connected but was not refreshed (its replica crashed; live
    /// tunnels are refreshed every 60 s).
    #[arg(long, default_value_t = server_side::leader::DEFAULT_PRESENCE_TIMEOUT.as_secs_f64())]
    presence_timeout: f64,
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
    let matches = Cli::command().get_matches();
    // A store named on the command line while a context is current is an error, not ignored.
    let store_given = ["data_dir", "store", "kubeconfig", "namespace"]
        .iter()
        .any(|arg| matches.value_source(arg) == Some(ValueSource::CommandLine));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_tracing();
    let choice = StoreChoice::of(&cli);
    match cli.command {
        Command::Crds => {
            print!("{}", server_side::store::kube::crd::crds_yaml());
            Ok(())
        }
        Command::Migrate(args) => Ok(server_side::migrate::run(&args, &choice.kube)?),
        Command::Serve(args) => {
            if args.peer_listen.is_some() && choice.kind != StoreKind::Kubernetes {
                bail!("--peer-listen needs --store kubernetes (with SQLite there is one replica)");
            }
            // On the Kubernetes store the replicas elect a leader for the cluster-wide
            // controllers; with SQLite there is one replica and no election.
            let (store, leases): (std::sync::Arc<dyn Store>, _) = match choice.kind {
                StoreKind::Sqlite => (choice.open()?, None),
                StoreKind::Kubernetes => {
                    let store = server_side::store::KubeStore::open(&choice.kube)?;
                    let leases = store.leases();
                    (std::sync::Arc::new(store), Some(leases))
                }
            };
            serve(choice.data_dir.clone(), store, leases, args)
        }
        Command::Login(args) => cli::login(&cli.target, args),
        Command::Context(cmd) => cli::context_command(cmd),
        other => match cli::remote(&cli.target, store_given)? {
            // The server writes the audit line, naming the token's user.
            Some(remote) => cli::admin::run(&remote, other, &mut String::new()),
            None => admin(choice.open()?, other),
        },
    }
}

fn serve(
    data_dir: PathBuf,
    store: std::sync::Arc<dyn Store>,
    leases: Option<kube::Api<k8s_openapi::api::coordination::v1::Lease>>,
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

    if let Some(replica) = args.replica_name {
        config.replica = replica;
    }
    config.metrics_listen = args.metrics_listen;
    config.max_connections = args.max_connections;
    config.max_connections_per_peer = args.max_connections_per_peer;
    config.header_read_timeout = secs(args.header_read_timeout, "--header-read-timeout")?;
    config.peers = args
        .peer_listen
        .map(|listen| server_side::peers::PeerConfig {
            listen,
            address: args.peer_address,
        });

    let presence_timeout = secs(args.presence_timeout, "--presence-timeout")?;
    config.leader = leases.map(|leases| server_side::leader::LeaderConfig {
        leases,
        identity: config.replica.clone(),
        presence_timeout,
    });

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
        if let Some(addr) = server.peer_addr() {
            println!("peers on {addr}");
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
        | Command::Login(_)
        | Command::Context(_)
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

/// Runs an admin command on the store and logs its audit line.
fn admin(store: std::sync::Arc<dyn Store>, command: Command) -> anyhow::Result<()> {
    let mutation = mutation_of(&command);
    let mut target = mutation.as_ref().map(|m| m.id.clone()).unwrap_or_default();
    let result = cli::admin::run(&cli::admin::Direct(store), command, &mut target);
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
