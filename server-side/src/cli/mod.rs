//! The admin CLI's two backends and the context file that chooses between them.
//!
//! ```text
//!   tunnel-server login ──verify token (GET /v1/tokens)──▶ context file (0600)
//!                                                              │ current context
//!   tunnel-server cluster|user|token|grant|kubeconfig ─────────┤
//!        --direct, or no context ──▶ admin::Direct ──▶ SQLite store under --data-dir (audit: cli:<OS user>)
//!        otherwise               ──▶ admin::Remote ──▶ https://server/v1/… (audit: the token's user, by the server)
//! ```
//!
//! Opening the store directly stays for bootstrap (the first admin user, before any token
//! exists) and for the server's own machine; everything else can go through the API, from
//! anywhere, whatever store the server uses.

pub(crate) mod admin;
pub(crate) mod context;
pub(crate) mod remote;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use server_side::store::{ApiToken, User};
use tunnel_proto::driver::connector::{Trust, ca_checksum};

use self::admin::Remote;
use self::context::{API_VERSION, Context, ContextFile};
use self::remote::Client;

/// Which backend the admin commands use (global flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct Target {
    /// Admin commands: use this context of the context file instead of the current one
    /// (`login`: the name to save the context under).
    #[arg(long, global = true, conflicts_with = "direct")]
    pub(crate) context: Option<String>,
    /// Admin commands: open the store under --data-dir directly, even when a context is set.
    #[arg(long, global = true)]
    pub(crate) direct: bool,
}

/// `tunnel-server login`.
#[derive(clap::Args, Debug)]
pub(crate) struct LoginArgs {
    /// Server URL, https://host[:port].
    #[arg(long)]
    server: String,
    /// An admin user's API token, token-xxxxx:secret.
    #[arg(long, env = "TUNNEL_SERVER_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM file of the CA that signed the server's certificate (embedded in the context);
    /// default: the system roots.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["insecure_skip_tls_verify", "fetch_ca"])]
    certificate_authority: Option<PathBuf>,
    /// Fetch the CA from the server's /cacerts, unverified, and trust it from now on (trust on
    /// first use: compare the printed checksum with the server's out of band).
    #[arg(long, conflicts_with = "insecure_skip_tls_verify")]
    fetch_ca: bool,
    /// Do not verify the server's certificate at all. For tests only.
    #[arg(long)]
    insecure_skip_tls_verify: bool,
}

/// `tunnel-server context …`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ContextCmd {
    /// List the contexts; `*` marks the current one.
    List,
    /// Make a context the current one.
    Use {
        /// Context name.
        name: String,
    },
    /// Remove a context (when it was the current one, admin commands open the store again).
    Rm {
        /// Context name.
        name: String,
    },
}

/// The admin backend for a command: a client of the chosen context's server, or `None` to
/// open the store (with `--direct`, or when there is no context file or no current context).
/// `data_dir_given`: `--data-dir` was on the command line, which only a direct command uses.
pub(crate) fn remote(target: &Target, data_dir_given: bool) -> anyhow::Result<Option<Remote>> {
    if target.direct {
        return Ok(None);
    }
    let path = match (context::env_path(), &target.context) {
        (Ok(path), _) => path,
        // No home and no config path (a service, `ip netns exec` with a bare environment): no
        // context can be current, so the command opens the store, as before contexts.
        (Err(context::ContextError::NoPath), None) => return Ok(None),
        (Err(err), _) => return Err(err.into()),
    };
    let file = ContextFile::load(&path)?;
    let name = match (&target.context, &file) {
        (Some(name), None) => bail!(
            "no context file at {}: log in first with `tunnel-server login --context {name} …`",
            path.display()
        ),
        (Some(name), Some(_)) => name.clone(),
        (
            None,
            Some(ContextFile {
                current_context: Some(name),
                ..
            }),
        ) => name.clone(),
        (None, _) => return Ok(None),
    };
    let file = file.expect("matched above");
    let context = file
        .get(&name)
        .ok_or_else(|| context::ContextError::NoSuchContext {
            name: name.clone(),
            path: path.clone(),
        })?;
    if data_dir_given {
        bail!(
            "--data-dir names a store, but the command would go to context {name:?} ({}): add --direct to open the store",
            context.server
        );
    }
    Ok(Some(Remote(Client::new(context)?)))
}

#[derive(Deserialize)]
struct Items<T> {
    items: Vec<T>,
}

/// `tunnel-server login`: checks the token against the server, then saves the context and
/// makes it current.
pub(crate) fn login(target: &Target, args: LoginArgs) -> anyhow::Result<()> {
    let path = context::env_path()?;
    let server = args.server.trim_end_matches('/').to_owned();
    let name = match &target.context {
        Some(name) => name.clone(),
        None => default_name(&server),
    };
    let (trust, ca) = if args.insecure_skip_tls_verify {
        eprintln!("warning: context {name:?} will not verify the server's certificate");
        (Trust::InsecureSkipVerify, None)
    } else if let Some(file) = &args.certificate_authority {
        let pem =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        (ca_trust(&pem), Some(pem))
    } else if args.fetch_ca {
        let unverified = Client::with_trust(&name, &server, None, Trust::InsecureSkipVerify)?;
        let pem = unverified.call(http::Method::GET, "/cacerts", None)?;
        let pem = String::from_utf8_lossy(&pem).trim().to_owned();
        if pem.is_empty() {
            bail!(
                "{server} sends no CA (/cacerts is empty): its certificate should be publicly trusted, so log in without --fetch-ca"
            );
        }
        eprintln!(
            "trusting the CA {server} sent, checksum {} (its import manifests' CATTLE_CA_CHECKSUM): compare it with the server's",
            ca_checksum(&pem)
        );
        (ca_trust(&pem), Some(pem))
    } else {
        (Trust::SystemRoots, None)
    };
    let client = Client::with_trust(&name, &server, Some(args.token.clone()), trust)?;
    // An admin route: proves the token, and that its user may run the admin commands.
    let tokens: Items<ApiToken> = client.get("/v1/tokens")?;
    let users: Items<User> = client.get("/v1/users")?;
    let token_id = args.token.split(':').next().unwrap_or_default();
    let user = tokens
        .items
        .iter()
        .find(|t| t.id == token_id)
        .and_then(|t| users.items.iter().find(|u| u.id == t.user_id))
        .map(|u| u.name.clone());

    let mut file = ContextFile::load(&path)?.unwrap_or_default();
    file.api_version = API_VERSION.to_owned();
    file.upsert(Context {
        name: name.clone(),
        server: server.clone(),
        user: user.clone(),
        token: args.token,
        certificate_authority_data: ca,
        insecure_skip_tls_verify: args.insecure_skip_tls_verify,
    });
    file.use_context(&name, &path)?;
    file.save(&path)?;
    println!(
        "logged in to {server} as {}; context {name:?} is current ({})",
        user.as_deref().unwrap_or("an admin"),
        path.display()
    );
    Ok(())
}

fn ca_trust(pem: &str) -> Trust {
    Trust::CaBundle {
        pem: pem.as_bytes().to_vec(),
        with_system_roots: false,
    }
}

/// A context's default name: the server's `host[:port]`.
fn default_name(server: &str) -> String {
    let rest = server.split_once("://").map_or(server, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// `tunnel-server context …`.
pub(crate) fn context_command(command: ContextCmd) -> anyhow::Result<()> {
    let path = context::env_path()?;
    let file = ContextFile::load(&path)?;
    match command {
        ContextCmd::List => {
            let file = file.unwrap_or_default();
            println!("{:<8} {:<24} {:<40} USER", "CURRENT", "NAME", "SERVER");
            for c in &file.contexts {
                let current = if file.current_context.as_deref() == Some(c.name.as_str()) {
                    "*"
                } else {
                    ""
                };
                println!(
                    "{current:<8} {:<24} {:<40} {}",
                    c.name,
                    c.server,
                    c.user.as_deref().unwrap_or("-")
                );
            }
        }
        ContextCmd::Use { name } => {
            let mut file = file.unwrap_or_default();
            file.use_context(&name, &path)?;
            file.save(&path)?;
            println!("current context: {name}");
        }
        ContextCmd::Rm { name } => {
            let mut file = file.unwrap_or_default();
            let was_current = file.remove(&name, &path)?;
            file.save(&path)?;
            println!("context {name} removed");
            if was_current {
                eprintln!(
                    "it was the current context: admin commands now open the store directly until `tunnel-server context use NAME`"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_host_and_port() {
        assert_eq!(
            default_name("https://mgmt.example:8443"),
            "mgmt.example:8443"
        );
        assert_eq!(default_name("https://h/prefix"), "h");
    }
}
