//! The admin commands, written once against [`Admin`]: the store opened directly
//! ([`Direct`]) or a running server's `/v1` API ([`Remote`]). Both print the same text, since
//! the printing is here and the backends only fetch and change.
//!
//! Names or ids: the commands resolve a cluster or user through [`Admin::cluster`] and
//! [`Admin::user`] (the store and `/v1/clusters/{id}`, `/v1/users/{id}` both take either) and
//! then work with its id.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use server_side::audit;
use server_side::store::{ApiToken, Cluster, Store, User};

use super::remote::{Client, RemoteError, segment};
use crate::{ClusterCmd, Command, TokenCmd, UserCmd};

/// What the admin commands read and change.
pub(crate) trait Admin {
    /// The URL for import commands and kubeconfigs: `flag`, else the server's own.
    fn server_url(&self, flag: Option<String>) -> anyhow::Result<String>;
    /// The CA PEM kubeconfigs embed (empty: publicly trusted).
    fn cacerts(&self) -> anyhow::Result<String>;
    /// Every cluster.
    fn clusters(&self) -> anyhow::Result<Vec<Cluster>>;
    /// A cluster by name or id; `cluster X not found` otherwise.
    fn cluster(&self, id_or_name: &str) -> anyhow::Result<Cluster>;
    /// A new cluster and its first registration token.
    fn create_cluster(&self, name: &str) -> anyhow::Result<(Cluster, String)>;
    /// Deletes a cluster by id.
    fn delete_cluster(&self, id: &str) -> anyhow::Result<()>;
    /// A cluster's registration tokens, oldest first.
    fn registration_tokens(&self, cluster_id: &str) -> anyhow::Result<Vec<String>>;
    /// Adds a registration token.
    fn create_registration_token(&self, cluster_id: &str) -> anyhow::Result<String>;
    /// Deletes a registration token; `false` when the cluster has no such token.
    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> anyhow::Result<bool>;
    /// Every user.
    fn users(&self) -> anyhow::Result<Vec<User>>;
    /// A user by name or id; `user X not found` otherwise.
    fn user(&self, id_or_name: &str) -> anyhow::Result<User>;
    /// A new user and the value of its first API token.
    fn create_user(
        &self,
        name: &str,
        groups: &[String],
        admin: bool,
    ) -> anyhow::Result<(User, String)>;
    /// API tokens, of one user (id) or all.
    fn api_tokens(&self, user_id: Option<&str>) -> anyhow::Result<Vec<ApiToken>>;
    /// A new API token (expiring `ttl` from now; `None`: never) and its value.
    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        ttl: Option<Duration>,
    ) -> anyhow::Result<(ApiToken, String)>;
    /// Revokes an API token; `false` when there is no such token.
    fn revoke_api_token(&self, id: &str) -> anyhow::Result<bool>;
    /// Grants a user (id) a cluster (id).
    fn grant(&self, user_id: &str, cluster_id: &str) -> anyhow::Result<()>;
}

/// Runs an admin command; `target` receives the audit line's object (direct mode logs it).
pub(crate) fn run(admin: &dyn Admin, command: Command, target: &mut String) -> anyhow::Result<()> {
    match command {
        Command::Cluster(ClusterCmd::Add { name, server_url }) => {
            let url = admin.server_url(server_url)?;
            let (cluster, token) = admin.create_cluster(&name)?;
            *target = format!("{} ({})", cluster.id, cluster.name);
            println!("cluster {} created as {}", cluster.name, cluster.id);
            println!("import it by running, in the cluster:");
            println!(
                "  {}",
                server_side::import::import_command(&url, &token, &cluster.id)
            );
        }
        Command::Cluster(ClusterCmd::List) => {
            println!("{:<10} {:<24} API ENDPOINT", "ID", "NAME");
            for c in admin.clusters()? {
                println!(
                    "{:<10} {:<24} {}",
                    c.id,
                    c.name,
                    c.api_endpoint.as_deref().unwrap_or("-")
                );
            }
        }
        Command::Cluster(ClusterCmd::Rm { cluster }) => {
            let c = admin.cluster(&cluster)?;
            *target = format!("{} ({})", c.id, c.name);
            admin.delete_cluster(&c.id)?;
            println!("cluster {} ({}) deleted", c.name, c.id);
        }
        Command::Cluster(ClusterCmd::Token {
            cluster,
            new,
            revoke,
            server_url,
        }) => {
            let c = admin.cluster(&cluster)?;
            if let Some(token) = revoke {
                if !admin.delete_registration_token(&c.id, &token)? {
                    bail!("cluster {} has no such registration token", c.name);
                }
                println!("registration token revoked");
                return Ok(());
            }
            let url = admin.server_url(server_url)?;
            if new {
                let token = admin.create_registration_token(&c.id)?;
                *target = format!("{} {}", c.id, audit::redact(&token));
                println!(
                    "{}",
                    server_side::import::import_command(&url, &token, &c.id)
                );
                return Ok(());
            }
            for token in admin.registration_tokens(&c.id)? {
                println!(
                    "{}",
                    server_side::import::import_command(&url, &token, &c.id)
                );
            }
        }
        Command::User(UserCmd::Add {
            name,
            admin: is_admin,
            groups,
        }) => {
            let (user, value) = admin.create_user(&name, &groups, is_admin)?;
            *target = format!("{} ({})", user.id, user.name);
            println!("user {} created as {}", user.name, user.id);
            println!("API token (shown once): {value}");
        }
        Command::User(UserCmd::List) => {
            println!("{:<12} {:<24} {:<6} GROUPS", "ID", "NAME", "ADMIN");
            for u in admin.users()? {
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
            let ttl = parse_ttl(&ttl)?;
            let u = admin.user(&user)?;
            let (t, value) = admin.create_api_token(&u.id, &description, ttl)?;
            *target = format!("{} for {}", t.id, u.name);
            if let Some(at) = t.expires_at {
                eprintln!("token {} expires at {}", t.id, utc(at));
            }
            println!("{value}");
        }
        Command::Token(TokenCmd::List { user }) => {
            let user_id = match user {
                Some(user) => Some(admin.user(&user)?.id),
                None => None,
            };
            let names: HashMap<String, String> =
                admin.users()?.into_iter().map(|u| (u.id, u.name)).collect();
            let now = now_unix();
            println!(
                "{:<12} {:<16} {:<20} {:<20} {:<20} {:<8} DESCRIPTION",
                "ID", "USER", "CREATED", "EXPIRES", "LAST USED", "STATE"
            );
            for t in admin.api_tokens(user_id.as_deref())? {
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
            if !admin.revoke_api_token(&id)? {
                bail!("token {id} not found");
            }
            println!("token {id} revoked");
        }
        Command::Grant { user, cluster } => {
            let u = admin.user(&user)?;
            let c = admin.cluster(&cluster)?;
            *target = format!("{} {}", u.id, c.id);
            admin.grant(&u.id, &c.id)?;
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
            let ttl = parse_ttl(&ttl)?;
            let url = admin.server_url(server_url)?;
            let u = admin.user(&user)?;
            let c = admin.cluster(&cluster)?;
            let (t, token) =
                admin.create_api_token(&u.id, &format!("kubeconfig for {}", c.name), ttl)?;
            *target = format!("{} for {} (kubeconfig of {})", t.id, u.name, c.id);
            match t.expires_at {
                Some(at) => eprintln!("the kubeconfig's token {} expires at {}", t.id, utc(at)),
                None => eprintln!("the kubeconfig's token {} never expires", t.id),
            }
            let cacerts = admin.cacerts()?;
            print!(
                "{}",
                server_side::kubeconfig::render(&url, &c.id, &c.name, &u.name, &token, &cacerts)
            );
        }
        // `serve` and the other non-admin commands never get here (see `main`).
        _ => unreachable!("not an admin command"),
    }
    Ok(())
}

fn parse_ttl(ttl: &str) -> anyhow::Result<Option<Duration>> {
    server_side::tokens::parse_ttl(ttl).map_err(anyhow::Error::msg)
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-12-07T16:34:10Z` (UTC) of Unix seconds.
pub(crate) fn utc(ts: i64) -> String {
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

// === impl Direct ===

/// The store under `--data-dir`, opened by this process.
pub(crate) struct Direct(pub(crate) std::sync::Arc<dyn Store>);

impl Admin for Direct {
    fn server_url(&self, flag: Option<String>) -> anyhow::Result<String> {
        match flag.or(self.0.setting("server-url")?) {
            Some(url) => Ok(url.trim_end_matches('/').to_owned()),
            None => bail!("no server URL known yet: pass --server-url or start the server once"),
        }
    }

    fn cacerts(&self) -> anyhow::Result<String> {
        Ok(self.0.setting("cacerts")?.unwrap_or_default())
    }

    fn clusters(&self) -> anyhow::Result<Vec<Cluster>> {
        Ok(self.0.clusters()?)
    }

    fn cluster(&self, id_or_name: &str) -> anyhow::Result<Cluster> {
        self.0
            .cluster_by_id_or_name(id_or_name)?
            .with_context(|| format!("cluster {id_or_name} not found"))
    }

    fn create_cluster(&self, name: &str) -> anyhow::Result<(Cluster, String)> {
        let (cluster, token) = self.0.create_cluster(name)?;
        Ok((cluster, token.token))
    }

    fn delete_cluster(&self, id: &str) -> anyhow::Result<()> {
        self.0.delete_cluster(id)?;
        Ok(())
    }

    fn registration_tokens(&self, cluster_id: &str) -> anyhow::Result<Vec<String>> {
        let tokens = self.0.registration_tokens(cluster_id)?;
        Ok(tokens.into_iter().map(|t| t.token).collect())
    }

    fn create_registration_token(&self, cluster_id: &str) -> anyhow::Result<String> {
        Ok(self.0.create_registration_token(cluster_id)?.token)
    }

    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> anyhow::Result<bool> {
        Ok(self.0.delete_registration_token(cluster_id, token)?)
    }

    fn users(&self) -> anyhow::Result<Vec<User>> {
        Ok(self.0.users()?)
    }

    fn user(&self, id_or_name: &str) -> anyhow::Result<User> {
        self.0
            .user_by_id_or_name(id_or_name)?
            .with_context(|| format!("user {id_or_name} not found"))
    }

    fn create_user(
        &self,
        name: &str,
        groups: &[String],
        admin: bool,
    ) -> anyhow::Result<(User, String)> {
        let user = self.0.create_user(name, groups, admin)?;
        let (_, value) = self
            .0
            .create_api_token(&user.id, "created with the user", None)?;
        Ok((user, value))
    }

    fn api_tokens(&self, user_id: Option<&str>) -> anyhow::Result<Vec<ApiToken>> {
        Ok(self.0.api_tokens(user_id)?)
    }

    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        ttl: Option<Duration>,
    ) -> anyhow::Result<(ApiToken, String)> {
        let expires_at = ttl.map(|d| now_unix() + d.as_secs() as i64);
        Ok(self.0.create_api_token(user_id, description, expires_at)?)
    }

    fn revoke_api_token(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.0.revoke_api_token(id)?)
    }

    fn grant(&self, user_id: &str, cluster_id: &str) -> anyhow::Result<()> {
        self.0.grant(user_id, cluster_id)?;
        Ok(())
    }
}

// === impl Remote ===

/// A running server's `/v1` API, as the context's admin user (the server writes the audit
/// lines, naming that user).
pub(crate) struct Remote(pub(crate) Client);

#[derive(Deserialize)]
struct Items<T> {
    items: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterCreated {
    cluster: Cluster,
    registration_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterImport {
    registration_token: String,
}

#[derive(Deserialize)]
struct UserCreated {
    user: User,
    value: String,
}

#[derive(Deserialize)]
struct TokenCreated {
    token: ApiToken,
    value: String,
}

/// `Ok(false)` for a 404, the error otherwise.
fn found_or(result: Result<(), RemoteError>) -> anyhow::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The error of a lookup: `what X not found` for a 404.
fn lookup<T>(result: Result<T, RemoteError>, what: &str, name: &str) -> anyhow::Result<T> {
    result.map_err(|e| match e.status() {
        Some(StatusCode::NOT_FOUND) => anyhow::anyhow!("{what} {name} not found"),
        _ => e.into(),
    })
}

impl Remote {
    fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<(), RemoteError> {
        self.0.call(method, path, body).map(drop)
    }
}

impl Admin for Remote {
    fn server_url(&self, flag: Option<String>) -> anyhow::Result<String> {
        if let Some(url) = flag {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        // The URL the server was started with (its import commands use it), which may differ
        // from the one this client reaches it at.
        let doc: Value = self.0.get("/v1/openapi.json")?;
        let url = doc["servers"][0]["url"]
            .as_str()
            .unwrap_or(self.0.server())
            .trim_end_matches('/');
        Ok(url.to_owned())
    }

    fn cacerts(&self) -> anyhow::Result<String> {
        let pem = self.0.call(Method::GET, "/cacerts", None)?;
        Ok(String::from_utf8_lossy(&pem).into_owned())
    }

    fn clusters(&self) -> anyhow::Result<Vec<Cluster>> {
        Ok(self.0.get::<Items<Cluster>>("/v1/clusters")?.items)
    }

    fn cluster(&self, id_or_name: &str) -> anyhow::Result<Cluster> {
        let path = format!("/v1/clusters/{}", segment(id_or_name));
        lookup(self.0.get(&path), "cluster", id_or_name)
    }

    fn create_cluster(&self, name: &str) -> anyhow::Result<(Cluster, String)> {
        let created: ClusterCreated =
            self.0
                .json(Method::POST, "/v1/clusters", Some(json!({ "name": name })))?;
        Ok((created.cluster, created.registration_token))
    }

    fn delete_cluster(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/v1/clusters/{}", segment(id));
        lookup(self.send(Method::DELETE, &path, None), "cluster", id)
    }

    fn registration_tokens(&self, cluster_id: &str) -> anyhow::Result<Vec<String>> {
        let path = format!("/v1/clusters/{}/tokens", segment(cluster_id));
        let list: Items<ClusterImport> = lookup(self.0.get(&path), "cluster", cluster_id)?;
        Ok(list
            .items
            .into_iter()
            .map(|t| t.registration_token)
            .collect())
    }

    fn create_registration_token(&self, cluster_id: &str) -> anyhow::Result<String> {
        let path = format!("/v1/clusters/{}/tokens", segment(cluster_id));
        let created: ClusterImport = lookup(
            self.0.json(Method::POST, &path, None),
            "cluster",
            cluster_id,
        )?;
        Ok(created.registration_token)
    }

    fn delete_registration_token(&self, cluster_id: &str, token: &str) -> anyhow::Result<bool> {
        let path = format!(
            "/v1/clusters/{}/tokens/{}",
            segment(cluster_id),
            segment(token)
        );
        found_or(self.send(Method::DELETE, &path, None))
    }

    fn users(&self) -> anyhow::Result<Vec<User>> {
        Ok(self.0.get::<Items<User>>("/v1/users")?.items)
    }

    fn user(&self, id_or_name: &str) -> anyhow::Result<User> {
        let path = format!("/v1/users/{}", segment(id_or_name));
        lookup(self.0.get(&path), "user", id_or_name)
    }

    fn create_user(
        &self,
        name: &str,
        groups: &[String],
        admin: bool,
    ) -> anyhow::Result<(User, String)> {
        let body = json!({ "name": name, "groups": groups, "admin": admin });
        let created: UserCreated = self.0.json(Method::POST, "/v1/users", Some(body))?;
        Ok((created.user, created.value))
    }

    fn api_tokens(&self, user_id: Option<&str>) -> anyhow::Result<Vec<ApiToken>> {
        let path = match user_id {
            Some(id) => format!("/v1/tokens?user={}", segment(id)),
            None => "/v1/tokens".to_owned(),
        };
        Ok(self.0.get::<Items<ApiToken>>(&path)?.items)
    }

    fn create_api_token(
        &self,
        user_id: &str,
        description: &str,
        ttl: Option<Duration>,
    ) -> anyhow::Result<(ApiToken, String)> {
        let body = json!({
            "userId": user_id,
            "description": description,
            "ttlSeconds": ttl.map_or(0, |d| d.as_secs()),
        });
        let created: TokenCreated = lookup(
            self.0.json(Method::POST, "/v1/tokens", Some(body)),
            "user",
            user_id,
        )?;
        Ok((created.token, created.value))
    }

    fn revoke_api_token(&self, id: &str) -> anyhow::Result<bool> {
        let path = format!("/v1/tokens/{}", segment(id));
        found_or(self.send(Method::DELETE, &path, None))
    }

    fn grant(&self, user_id: &str, cluster_id: &str) -> anyhow::Result<()> {
        let body = json!({ "userId": user_id, "clusterId": cluster_id });
        self.send(Method::POST, "/v1/grants", Some(body))?;
        Ok(())
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
