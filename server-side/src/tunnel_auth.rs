//! The tunnel authorizer chain at `/v3/connect` and `/v3/connect/register` (spec cattle-agent
//! §6.2): the first authorizer that authenticates wins; otherwise the first error is a 400 with
//! its text; otherwise 401 `failed authentication`.
//!
//! 1. **MCM**: `X-API-Tunnel-Token` is a registration token (empty: not authed; unknown: 400
//!    `cluster not found`), `X-API-Tunnel-Params` is base64 JSON with cluster or node params.
//!    Cluster params are stored (`https://<address>`, CA, service-account token) and the
//!    client key is the cluster id; node params give `<cluster>:m-<md5_12(hostname)>`, creating
//!    the node on `/register`.
//! 2. **Steve aggregation**: `Authorization: Bearer stv-cluster-<token>` gives
//!    `stv-cluster-<cluster>`.

use serde::Deserialize;
use tunnel_proto::driver::acceptor::{AuthRequest, ClientKey, Reject};
use tunnel_proto::driver::registry::check_client_key;

use crate::app::{App, stv_key};
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

/// Decodes and validates the params header with Rancher's messages (`readInput`).
pub fn parse_params(header: &str) -> Result<TunnelParams, String> {
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

type Outcome = Result<Option<ClientKey>, String>;

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
fn authorize_mcm(app: &App, req: &AuthRequest) -> Outcome {
    let token = header(req, TOKEN_HEADER);
    if token.is_empty() {
        return Ok(None);
    }
    let cluster_id = app
        .store
        .cluster_for_registration_token(token)
        .map_err(store_error)?
        .ok_or_else(|| "cluster not found".to_owned())?;
    let params = parse_params(header(req, PARAMS_HEADER))?;
    if let Some(node) = params.node {
        let register = req.uri.path().ends_with("/register");
        let hostname = node
            .get("requestedHostname")
            .and_then(|h| h.as_str())
            .unwrap_or_default()
            .to_owned();
        let machine = tokens::machine_name(&hostname);
        let existing = app.store.node(&cluster_id, &machine).map_err(store_error)?;
        match existing {
            None if !register => {
                return Err(format!("node.management.cattle.io \"{machine}\" not found"));
            }
            _ if register => {
                let created_at = existing.as_ref().map_or_else(now_unix, |n| n.created_at);
                let docker_socket = existing.as_ref().map_or_else(
                    || DEFAULT_DOCKER_SOCKET.to_owned(),
                    |n| n.docker_socket.clone(),
                );
                app.store
                    .upsert_node(&Node {
                        id: machine.clone(),
                        cluster_id: cluster_id.clone(),
                        hostname,
                        docker_socket,
                        created_at,
                        params: node,
                    })
                    .map_err(store_error)?;
            }
            _ => {}
        }
        return Ok(Some(ClientKey::new(format!("{cluster_id}:{machine}"))));
    }
    if let Some(c) = params.cluster {
        let report = ClusterAgentReport {
            api_endpoint: api_endpoint(&c.address),
            ca_cert: c.ca_cert,
            sa_token: c.token.trim().to_owned(),
        };
        if app
            .store
            .set_cluster_agent_report(&cluster_id, &report)
            .map_err(store_error)?
        {
            tracing::info!(cluster = %cluster_id, api_endpoint = %report.api_endpoint, "cluster agent report stored");
        }
        return Ok(Some(ClientKey::new(cluster_id)));
    }
    Err("missing node or cluster registration info".to_owned())
}

/// The steve cluster-proxy authorizer.
fn authorize_stv(app: &App, req: &AuthRequest) -> Outcome {
    let auth = header(req, "authorization");
    let Some(token) = auth
        .strip_prefix("Bearer ")
        .and_then(|t| t.strip_prefix(STV_BEARER_PREFIX))
    else {
        return Ok(None);
    };
    if token.is_empty() {
        return Ok(None);
    }
    Ok(app
        .store
        .cluster_for_registration_token(token)
        .map_err(store_error)?
        .map(|cluster| stv_key(&cluster)))
}

/// Runs the chain on one tunnel request.
pub fn authorize(app: &App, req: &AuthRequest) -> Result<ClientKey, Reject> {
    let mut first_error = None;
    for authorizer in [authorize_mcm, authorize_stv] {
        match authorizer(app, req) {
            Ok(Some(key)) => {
                // Refuse before the upgrade what the registry would refuse after it.
                check_client_key(&key).map_err(|e| Reject::BadRequest(e.to_string()))?;
                return Ok(key);
            }
            Ok(None) => {}
            Err(msg) => {
                first_error.get_or_insert(msg);
            }
        }
    }
    match first_error {
        Some(msg) => Err(Reject::BadRequest(msg)),
        None => {
            let forwarded = header(req, "x-forwarded-for");
            tracing::info!(remote = %req.remote_addr, forwarded, "tunnel request failed authentication");
            Err(Reject::Unauthorized)
        }
    }
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

    #[test]
    fn endpoints_are_bracketed() {
        assert_eq!(api_endpoint("10.43.0.1:443"), "https://10.43.0.1:443");
        assert_eq!(api_endpoint("[fd00::1]:443"), "https://[fd00::1]:443");
        assert_eq!(api_endpoint("kubernetes:6443"), "https://kubernetes:6443");
    }
}
