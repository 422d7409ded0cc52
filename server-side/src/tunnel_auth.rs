//! The tunnel authorizer chain at `/v3/connect` and `/v3/connect/register` (spec cattle-agent
//! §6.2): the first authorizer that authenticates wins; otherwise the first error is a 400 with
//! its text; otherwise 401 `failed authentication`.
//!
//! 1. **MCM**: `X-API-Tunnel-Token` is a registration token (empty: not authed; unknown: 400
//!    `cluster not found`), `X-API-Tunnel-Params` is base64 JSON with cluster or node params.
//!    The client key is the cluster id for cluster params, `<cluster>:m-<md5_12(hostname)>`
//!    for node params. Nothing is written here: what the params say (the apiserver address,
//!    CA and service-account token; a node on `/register`) is stored by [`record_params`]
//!    once the websocket is up, so a plain request carrying a registration token changes
//!    nothing. A cluster session whose address or CA differs from a live session's is refused.
//! 2. **Steve aggregation**: `Authorization: Bearer stv-cluster-<token>` gives
//!    `stv-cluster-<cluster>`.
//!
//! Before the chain, the failed-authentication rate limit ([`crate::auth_limit`]): a request
//! from an address that has used up its failure budget is refused without any store lookup,
//! unless every credential it presents was accepted before. After the chain, a credential
//! failure (no credential: 401; an unknown registration token: 400 `cluster not found`; an
//! unknown `stv-cluster-` bearer, even beside a valid token) takes a token from the address's
//! bucket. Errors with valid credentials (bad params, unknown node) cost nothing.

use serde::Deserialize;
use tokio::time::Instant;
use tunnel_proto::driver::acceptor::{AuthRequest, ClientKey, Reject};
use tunnel_proto::driver::registry::check_client_key;

use crate::app::{App, stv_key};
use crate::auth_limit::AddrKey;
use crate::http_util::{Credential, auth_limit_gate};
use crate::store::{ClusterAgentReport, DEFAULT_DOCKER_SOCKET, Node, StoreError, now_unix};
use crate::tokens;

/// Header carrying the registration token.
pub const TOKEN_HEADER: &str = "x-api-tunnel-token";
/// Header carrying the base64 JSON params.
pub const PARAMS_HEADER: &str = "x-api-tunnel-params";
/// Prefix of the steve-aggregation bearer token.
pub const STV_BEARER_PREFIX: &str = "stv-cluster-";

/// The decoded `X-API-Tunnel-Params`.
#[derive(Debug, Default, Deserialize)]
pub struct TunnelParams {
    /// Cluster-agent params.
    pub cluster: Option<ClusterParams>,
    /// Node-agent params (≤ 2.11 agents).
    pub node: Option<serde_json::Value>,
}

/// Cluster-agent params (spec §4.2).
#[derive(Debug, Default, Deserialize)]
pub struct ClusterParams {
    /// `KUBERNETES_SERVICE_HOST:PORT`.
    #[serde(default)]
    pub address: String,
    /// The service-account token.
    #[serde(default)]
    pub token: String,
    /// Base64 of the apiserver CA PEM.
    #[serde(default, rename = "caCert")]
    pub ca_cert: String,
}

/// Most nodes one cluster may create per minute through `/v3/connect/register` (a leaked
/// registration token must not fill the store).
pub const MAX_NEW_NODES_PER_MINUTE: usize = 60;
/// Longest `X-API-Tunnel-Params` accepted, in bytes of base64 (Rancher's agents send well
/// under 8 KiB: a CA certificate and a service-account token).
pub const MAX_PARAMS_LEN: usize = 32 << 10;

/// Nodes created per cluster over the last minute.
#[derive(Debug, Default)]
pub struct NodeCreations {
    recent:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Instant>>>,
}

impl NodeCreations {
    /// Takes one of the cluster's [`MAX_NEW_NODES_PER_MINUTE`] creations, if any is left.
    /// Only clusters with a valid registration token have an entry, so the map is bounded by
    /// the number of clusters.
    pub fn try_reserve(&self, cluster_id: &str, now: Instant) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let times = recent.entry(cluster_id.to_owned()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= std::time::Duration::from_secs(60))
        {
            times.pop_front();
        }
        if times.len() >= MAX_NEW_NODES_PER_MINUTE {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// Decodes and validates the params header with Rancher's messages (`readInput`).
pub fn parse_params(header: &str) -> Result<TunnelParams, String> {
    if header.len() > MAX_PARAMS_LEN {
        return Err(format!(
            "params of {} bytes: at most {MAX_PARAMS_LEN} are accepted",
            header.len()
        ));
    }
    let raw = data_encoding::BASE64
        .decode(header.as_bytes())
        .map_err(|e| format!("illegal base64 data at input byte {}", e.position))?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err("unexpected end of JSON input".to_owned());
    }
    let params: TunnelParams = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
    let hostname = params.node.as_ref().map(|n| {
        n.get("requestedHostname")
            .and_then(|h| h.as_str())
            .unwrap_or("")
    });
    if params.node.is_none() && params.cluster.is_none() {
        return Err("missing node or cluster registration info".to_owned());
    }
    if hostname == Some("") {
        return Err("invalid input, hostname empty".to_owned());
    }
    if let Some(c) = &params.cluster {
        if c.address.is_empty() {
            return Err("invalid input, address empty".to_owned());
        }
        if c.token.is_empty() {
            return Err("invalid input, token empty".to_owned());
        }
        if c.ca_cert.is_empty() {
            return Err("invalid input, caCert empty".to_owned());
        }
    }
    Ok(params)
}

/// `https://<address>`, bracketing a bare IPv6 host (`fd00::1:443` cannot be told apart, so
/// only an address that parses as `ip:port` or a bare IPv6 without port is rewritten).
pub fn api_endpoint(address: &str) -> String {
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return format!("https://{sa}");
    }
    if let Ok(ip) = address.parse::<std::net::Ipv6Addr>() {
        return format!("https://[{ip}]:443");
    }
    format!("https://{address}")
}

/// Why an authorizer refused: the credential itself, or something else about a request with
/// a valid one (only the former counts against the address's failure budget).
#[derive(Debug)]
enum Failure {
    /// The registration token is not known (Rancher: 400 `cluster not found`).
    UnknownToken,
    /// Any other error, as a 400 with this text.
    Other(String),
}

impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Self::Other(msg)
    }
}

type Outcome = Result<Option<ClientKey>, Failure>;

fn header<'a>(req: &'a AuthRequest, name: &str) -> &'a str {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn store_error(err: StoreError) -> String {
    tracing::error!(error = %err, "store failed during tunnel authorization");
    "internal error".to_owned()
}

/// The MCM authorizer (`mcmauthorizer.AuthorizeTunnel`).
async fn authorize_mcm(app: &App, req: &AuthRequest) -> Outcome {
    let token = header(req, TOKEN_HEADER);
    if token.is_empty() {
        return Ok(None);
    }
    let cluster_id = app
        .store
        .cluster_for_registration_token(token)
        .await
        .map_err(store_error)?
        .ok_or(Failure::UnknownToken)?;
    let params = parse_params(header(req, PARAMS_HEADER))?;
    if let Some(node) = params.node {
        let register = req.uri.path().ends_with("/register");
        let machine = tokens::machine_name(node_hostname(&node));
        let exists = app
            .store
            .node(&cluster_id, &machine)
            .await
            .map_err(store_error)?
            .is_some();
        if !register && !exists {
            return Err(format!("node.management.cattle.io \"{machine}\" not found").into());
        }
        if register && !exists && !app.node_creations.try_reserve(&cluster_id, Instant::now()) {
            return Err(format!(
                "cluster {cluster_id} registered {MAX_NEW_NODES_PER_MINUTE} new nodes in the last minute: try again later"
            )
            .into());
        }
        // A node is created (on `/register`) only once its tunnel is up: see record_params.
        return Ok(Some(ClientKey::new(format!("{cluster_id}:{machine}"))));
    }
    if let Some(c) = params.cluster {
        // A second session of a cluster must report the same apiserver as the live one: a
        // stolen registration token must not repoint the cluster while its agent is connected.
        if app.has_tunnel(&cluster_id) {
            let stored = app.store.cluster(&cluster_id).await.map_err(store_error)?;
            if let Some(stored) = stored
                && (stored.api_endpoint.as_deref() != Some(&api_endpoint(&c.address))
                    || stored.ca_cert.as_deref() != Some(c.ca_cert.as_str()))
            {
                tracing::warn!(
                    target: "audit",
                    cluster = %cluster_id,
                    remote = %req.remote_addr,
                    live_address = stored.api_endpoint.as_deref().unwrap_or("-"),
                    asked_address = %api_endpoint(&c.address),
                    "refused a cluster agent session: its apiserver address or CA differs from the live session's"
                );
                return Err(format!(
                    "cluster {cluster_id} has a live agent session that reports another apiserver address or CA"
                )
                .into());
            }
        }
        return Ok(Some(ClientKey::new(cluster_id)));
    }
    Err(Failure::Other(
        "missing node or cluster registration info".to_owned(),
    ))
}

fn node_hostname(node: &serde_json::Value) -> &str {
    node.get("requestedHostname")
        .and_then(|h| h.as_str())
        .unwrap_or_default()
}

/// The registration token a tunnel was let in with and its cluster, from its client key and
/// upgrade headers (the chain's first authorizer gives `<cluster>[:<node>]` from
/// `X-API-Tunnel-Token`, the steve one `stv-cluster-<cluster>` from the bearer).
pub fn authority_of(key: &ClientKey, headers: &http::HeaderMap) -> Option<(String, String)> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let k = key.as_str();
    let (token, cluster) = match k.strip_prefix(STV_BEARER_PREFIX) {
        Some(cluster) => (
            get("authorization")
                .strip_prefix("Bearer ")
                .and_then(|t| t.strip_prefix(STV_BEARER_PREFIX))
                .unwrap_or(""),
            cluster,
        ),
        None => (get(TOKEN_HEADER), k.split(':').next().unwrap_or(k)),
    };
    (!token.is_empty()).then(|| (token.to_owned(), cluster.to_owned()))
}

/// Stores what an agent's params say, once its websocket is up (a request that only carries
/// a registration token changes nothing): a cluster agent's apiserver address, CA and
/// service-account token, with an audit line when they change (old -> new address); a node
/// agent's node, created or updated on `/register`.
pub async fn record_params(
    app: &App,
    key: &ClientKey,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(), String> {
    if key.as_str().starts_with(STV_BEARER_PREFIX) {
        return Ok(());
    }
    let raw = headers
        .get(PARAMS_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let params = parse_params(raw)?;
    let (cluster_id, machine) = match key.as_str().split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (key.as_str(), None),
    };
    if let (Some(node), Some(machine)) = (params.node, machine) {
        if !uri.path().ends_with("/register") {
            return Ok(());
        }
        let existing = app
            .store
            .node(cluster_id, machine)
            .await
            .map_err(store_error)?;
        let hostname = node_hostname(&node).to_owned();
        app.store
            .upsert_node(&Node {
                id: machine.to_owned(),
                cluster_id: cluster_id.to_owned(),
                hostname,
                docker_socket: existing.as_ref().map_or_else(
                    || DEFAULT_DOCKER_SOCKET.to_owned(),
                    |n| n.docker_socket.clone(),
                ),
                created_at: existing.as_ref().map_or_else(now_unix, |n| n.created_at),
                params: node,
            })
            .await
            .map_err(store_error)?;
        if existing.is_none() {
            tracing::info!(target: "audit", user = "agent", cluster = %cluster_id, node = %machine, "node registered");
        }
        return Ok(());
    }
    if let Some(c) = params.cluster {
        let report = ClusterAgentReport {
            api_endpoint: api_endpoint(&c.address),
            ca_cert: c.ca_cert,
            sa_token: c.token.trim().to_owned(),
        };
        let old = app.store.cluster(cluster_id).await.map_err(store_error)?;
        if app
            .store
            .set_cluster_agent_report(cluster_id, &report)
            .await
            .map_err(store_error)?
        {
            let old_address = old.as_ref().and_then(|c| c.api_endpoint.clone());
            tracing::info!(
                target: "audit",
                user = "agent",
                cluster = %cluster_id,
                old_address = %old_address.as_deref().unwrap_or("-"),
                new_address = %report.api_endpoint,
                ca_changed = old.as_ref().is_none_or(|c| c.ca_cert.as_deref() != Some(&report.ca_cert)),
                sa_token_changed = old.as_ref().is_none_or(|c| c.sa_token.as_deref() != Some(&report.sa_token)),
                "cluster agent report changed"
            );
        }
    }
    Ok(())
}

/// The registration token of an `Authorization: Bearer stv-cluster-<token>` header, if any.
fn stv_token(req: &AuthRequest) -> &str {
    header(req, "authorization")
        .strip_prefix("Bearer ")
        .and_then(|t| t.strip_prefix(STV_BEARER_PREFIX))
        .unwrap_or("")
}

/// The steve cluster-proxy authorizer.
async fn authorize_stv(app: &App, req: &AuthRequest) -> Outcome {
    let token = stv_token(req);
    if token.is_empty() {
        return Ok(None);
    }
    Ok(app
        .store
        .cluster_for_registration_token(token)
        .await
        .map_err(store_error)?
        .map(|cluster| stv_key(&cluster)))
}

/// Runs the rate limit and the chain on one tunnel request.
///
/// Every credential the request presents is judged on its own: the request skips the limit
/// only when each of them was accepted before, and each unknown one is a failure, even beside
/// a valid one (a guessed `stv-cluster-` bearer does not ride along with a stolen registration
/// token).
pub async fn authorize(app: &App, req: &AuthRequest) -> Result<ClientKey, Reject> {
    let now = Instant::now();
    let addr = AddrKey::of(req.remote_addr.ip());
    // In chain order: what each authorizer checks.
    let credentials = [header(req, TOKEN_HEADER), stv_token(req)];
    let presented = || credentials.into_iter().filter(|c| !c.is_empty());
    let all_known = presented().count() > 0 && presented().all(|c| app.known_good.contains(c));
    if !all_known && let Err(retry_after) = auth_limit_gate(app, addr, now, Credential::Tunnel) {
        return Err(rate_limited(addr, retry_after));
    }
    let result = run_chain(app, req).await;
    let used = result.as_ref().ok().map(|(_, used)| credentials[*used]);
    if let Some(used) = used {
        app.known_good.insert(used, now);
    }
    // The chain stops at the first authorizer that authenticates: judge the others too.
    let mut unknown: Vec<&str> = Vec::new();
    for c in presented().filter(|c| Some(*c) != used) {
        match app.store.cluster_for_registration_token(c).await {
            Ok(None) => unknown.push(c),
            Ok(Some(_)) => {}
            Err(err) => {
                store_error(err);
            }
        }
    }
    let failure = if presented().count() == 0 {
        Some("missing_credentials")
    } else if !unknown.is_empty() || matches!(result, Err(ChainError::Unauthorized)) {
        Some("unknown_token")
    } else {
        None
    };
    if let Some(reason) = failure {
        for c in unknown {
            app.known_good.remove(c);
        }
        app.metrics.agent_auth_failure(reason);
        app.auth_limiter.record_failure(addr, now);
        app.metrics.set_auth_limit_addresses(app.auth_limiter.len());
    }
    result.map(|(key, _)| key).map_err(|e| match e {
        ChainError::Unauthorized => {
            let forwarded = header(req, "x-forwarded-for");
            tracing::info!(remote = %req.remote_addr, forwarded, "tunnel request failed authentication");
            Reject::Unauthorized
        }
        ChainError::UnknownToken => Reject::BadRequest("cluster not found".to_owned()),
        ChainError::BadRequest(msg) => Reject::BadRequest(msg),
    })
}

/// The answer to a request refused by the rate limit: 429 with `Retry-After`.
pub fn rate_limited(addr: AddrKey, retry_after_secs: u64) -> Reject {
    Reject::TooManyRequests {
        retry_after: std::time::Duration::from_secs(retry_after_secs),
        message: format!(
            "too many failed authentications from {addr}: retry after {retry_after_secs}s"
        ),
    }
}

/// How the chain refused a request.
#[derive(Debug)]
enum ChainError {
    /// No authorizer authenticated it and none failed (401).
    Unauthorized,
    /// The first error was an unknown registration token (400 `cluster not found`).
    UnknownToken,
    /// The first error was something else (400 with this text).
    BadRequest(String),
}

/// The chain itself: the first authorizer that authenticates wins (its key and index are
/// returned), else the first error.
async fn run_chain(app: &App, req: &AuthRequest) -> Result<(ClientKey, usize), ChainError> {
    let mut first_error = None;
    for i in 0..2 {
        let outcome = match i {
            0 => authorize_mcm(app, req).await,
            _ => authorize_stv(app, req).await,
        };
        match outcome {
            Ok(Some(key)) => {
                // Refuse before the upgrade what the registry would refuse after it.
                check_client_key(&key).map_err(|e| ChainError::BadRequest(e.to_string()))?;
                return Ok((key, i));
            }
            Ok(None) => {}
            Err(failure) => {
                first_error.get_or_insert(failure);
            }
        }
    }
    Err(match first_error {
        Some(Failure::UnknownToken) => ChainError::UnknownToken,
        Some(Failure::Other(msg)) => ChainError::BadRequest(msg),
        None => ChainError::Unauthorized,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        data_encoding::BASE64.encode(s.as_bytes())
    }

    #[test]
    fn params_messages_match_rancher() {
        let err = |h: &str| parse_params(h).err().unwrap();
        assert_eq!(err(""), "unexpected end of JSON input");
        assert!(err("!!!").starts_with("illegal base64 data at input byte"));
        assert_eq!(err(&b64("{}")), "missing node or cluster registration info");
        assert_eq!(err(&b64(r#"{"node":{}}"#)), "invalid input, hostname empty");
        assert_eq!(
            err(&b64(r#"{"cluster":{}}"#)),
            "invalid input, address empty"
        );
        assert_eq!(
            err(&b64(r#"{"cluster":{"address":"a:1"}}"#)),
            "invalid input, token empty"
        );
        assert_eq!(
            err(&b64(r#"{"cluster":{"address":"a:1","token":"t"}}"#)),
            "invalid input, caCert empty"
        );
        assert!(
            parse_params(&b64(
                r#"{"cluster":{"address":"a:1","token":"t","caCert":"c"}}"#
            ))
            .is_ok()
        );
    }

    fn app(burst: u32) -> (App, String) {
        use crate::store::Store;
        let store = crate::store::SqliteStore::open_in_memory().unwrap();
        let (_, token) = store.create_cluster("c1").unwrap();
        let app = App::new(
            std::sync::Arc::new(store),
            tunnel_proto::driver::registry::Registry::default(),
            crate::app::AppConfig {
                server_url: "https://127.0.0.1:1".to_owned(),
                cacerts: String::new(),
                agent_image: String::new(),
                node_agent_image: String::new(),
                probe_interval: std::time::Duration::from_secs(15),
                auth_limit: crate::auth_limit::AuthLimitConfig {
                    burst,
                    refill_per_sec: 0.001,
                    max_addresses: 16,
                },
                replica: "test".to_owned(),
            },
        );
        (app, token.token)
    }

    fn request(from: &str, headers: &[(&str, &str)]) -> AuthRequest {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        AuthRequest {
            method: http::Method::GET,
            uri: "/v3/connect".parse().unwrap(),
            headers: map,
            remote_addr: format!("{from}:40000").parse().unwrap(),
        }
    }

    fn limited(r: &Result<ClientKey, Reject>) -> bool {
        matches!(r, Err(Reject::TooManyRequests { message, .. }) if message.starts_with("too many failed authentications"))
    }

    #[tokio::test]
    async fn only_credential_failures_take_from_the_budget() {
        let (app, token) = app(2);
        let cluster = b64(r#"{"cluster":{"address":"a:1","token":"t","caCert":"c"}}"#);
        let bad_params = b64(r#"{"cluster":{}}"#);
        let a = "192.0.2.1";
        // A valid token with bad params: Rancher's 400, but not an authentication failure.
        for _ in 0..10 {
            let r = authorize(
                &app,
                &request(a, &[(TOKEN_HEADER, &token), (PARAMS_HEADER, &bad_params)]),
            )
            .await;
            assert_eq!(
                r,
                Err(Reject::BadRequest(
                    "invalid input, address empty".to_owned()
                ))
            );
        }
        // Two failures use the budget of 2; the third request is refused unlooked.
        let r = authorize(&app, &request(a, &[])).await;
        assert_eq!(r, Err(Reject::Unauthorized));
        let r = authorize(
            &app,
            &request(a, &[(TOKEN_HEADER, "nope"), (PARAMS_HEADER, &cluster)]),
        )
        .await;
        assert_eq!(r, Err(Reject::BadRequest("cluster not found".to_owned())));
        assert!(limited(&authorize(&app, &request(a, &[])).await));
        // Another address is not affected.
        assert_eq!(
            authorize(&app, &request("192.0.2.2", &[])).await,
            Err(Reject::Unauthorized)
        );
        // A correct token not yet seen waits too; once accepted (from elsewhere), it skips the
        // limit at this address as well.
        let good = [
            (TOKEN_HEADER, token.as_str()),
            (PARAMS_HEADER, cluster.as_str()),
        ];
        assert!(limited(&authorize(&app, &request(a, &good)).await));
        assert!(authorize(&app, &request("192.0.2.3", &good)).await.is_ok());
        assert!(authorize(&app, &request(a, &good)).await.is_ok());
        // A guessed steve bearer beside a valid registration token (with bad params, so that
        // the chain's first authorizer fails without judging the bearer) costs, from a fresh
        // address with a budget of 2, and the known-good token does not let it skip the limit.
        let b = "192.0.2.9";
        let guess = [
            (TOKEN_HEADER, token.as_str()),
            (PARAMS_HEADER, bad_params.as_str()),
            ("authorization", "Bearer stv-cluster-guess"),
        ];
        assert!(matches!(
            authorize(&app, &request(b, &guess)).await,
            Err(Reject::BadRequest(_))
        ));
        assert!(matches!(
            authorize(&app, &request(b, &guess)).await,
            Err(Reject::BadRequest(_))
        ));
        assert!(limited(&authorize(&app, &request(b, &guess)).await));
        // The known-good token alone still goes through from there.
        assert!(authorize(&app, &request(b, &good)).await.is_ok());
        // The steve bearer is a credential too.
        let stv = format!("Bearer {STV_BEARER_PREFIX}{token}");
        assert!(limited(
            &authorize(
                &app,
                &request(a, &[("authorization", "Bearer stv-cluster-x")])
            )
            .await
        ));
        assert!(
            authorize(&app, &request(a, &[("authorization", &stv)]))
                .await
                .is_ok()
        );
        let m = app.metrics.render(&app.registry, app.upstreams.live());
        assert!(
            m.contains("tunnel_server_agent_auth_failures_total{reason=\"missing_credentials\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("tunnel_server_agent_auth_failures_total{reason=\"unknown_token\"} 3"),
            "{m}"
        );
        assert!(
            m.contains("tunnel_server_agent_auth_rate_limited_total 4"),
            "{m}"
        );
    }

    #[test]
    fn endpoints_are_bracketed() {
        assert_eq!(api_endpoint("10.43.0.1:443"), "https://10.43.0.1:443");
        assert_eq!(api_endpoint("[fd00::1]:443"), "https://[fd00::1]:443");
        assert_eq!(api_endpoint("kubernetes:6443"), "https://kubernetes:6443");
    }
}
