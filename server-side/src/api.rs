//! The management API under `/v1/` (JSON): clusters, nodes with live connection state,
//! users, API tokens and grants. Every route but `/v1/openapi.json` needs a bearer token (or
//! the web console's session, [`crate::session`]); every route needs an admin's, except the
//! reads of clusters and nodes ([`Op::open_to_granted_users`]), which show any other user only
//! the clusters granted to them (and answer 404 for the rest, as for a cluster that does not
//! exist). Every mutation leaves an audit line ([`crate::audit`]) naming the user.
//!
//! [`ROUTES`] is the single list of routes: the dispatcher matches requests against it and
//! [`openapi`] documents exactly it.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tunnel_proto::driver::acceptor::{ClientKey, ResponseBody};

use crate::app::{SharedApp, stv_key};
use crate::audit::{self, Mutation, Outcome};
use crate::http_util::{authenticate, json_response, store_failure};
use crate::import::{import_command, import_url};
use crate::store::{Cluster, Node, StoreError, TunnelEnd};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `GET /v1/clusters`
    ListClusters,
    /// `POST /v1/clusters`
    CreateCluster,
    /// `GET /v1/clusters/{id}`
    GetCluster,
    /// `DELETE /v1/clusters/{id}`
    DeleteCluster,
    /// `GET /v1/clusters/{id}/import`
    ClusterImport,
    /// `GET /v1/clusters/{id}/tokens`
    ListClusterTokens,
    /// `POST /v1/clusters/{id}/tokens`
    CreateClusterToken,
    /// `DELETE /v1/clusters/{id}/tokens/{token}`
    DeleteClusterToken,
    /// `GET /v1/nodes`
    ListNodes,
    /// `GET /v1/nodes/{id}`
    GetNode,
    /// `PATCH /v1/nodes/{id}`
    UpdateNode,
    /// `GET /v1/users`
    ListUsers,
    /// `POST /v1/users`
    CreateUser,
    /// `GET /v1/users/{id}`
    GetUser,
    /// `DELETE /v1/users/{id}`
    DeleteUser,
    /// `GET /v1/tokens`
    ListTokens,
    /// `POST /v1/tokens`
    CreateToken,
    /// `DELETE /v1/tokens/{id}`
    RevokeToken,
    /// `GET /v1/grants`
    ListGrants,
    /// `POST /v1/grants`
    CreateGrant,
    /// `DELETE /v1/grants/{userId}/{clusterId}`
    DeleteGrant,
    /// `GET /v1/openapi.json`
    OpenApi,
}

impl Op {
    /// Reads a user who is not an admin may make: they see the clusters granted to them and
    /// those clusters' nodes, nothing else (the web console's cluster pages).
    pub fn open_to_granted_users(self) -> bool {
        matches!(
            self,
            Op::ListClusters | Op::GetCluster | Op::ListNodes | Op::GetNode
        )
    }

    /// What a route changes, for its audit line: (verb, object); `None` for reads.
    pub fn mutation(self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Op::CreateCluster => ("create", "cluster"),
            Op::DeleteCluster => ("delete", "cluster"),
            Op::CreateClusterToken => ("create", "registration-token"),
            Op::DeleteClusterToken => ("delete", "registration-token"),
            Op::UpdateNode => ("update", "node"),
            Op::CreateUser => ("create", "user"),
            Op::DeleteUser => ("delete", "user"),
            Op::CreateToken => ("create", "api-token"),
            Op::RevokeToken => ("revoke", "api-token"),
            Op::CreateGrant => ("create", "grant"),
            Op::DeleteGrant => ("delete", "grant"),
            Op::ListClusters
            | Op::GetCluster
            | Op::ClusterImport
            | Op::ListClusterTokens
            | Op::ListNodes
            | Op::GetNode
            | Op::ListUsers
            | Op::GetUser
            | Op::ListTokens
            | Op::ListGrants
            | Op::OpenApi => return None,
        })
    }
}

/// One route: method, path pattern (`{name}` is one segment), what it does, and its docs.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path pattern.
    pub pattern: &'static str,
    /// Operation.
    pub op: Op,
    /// One line for the OpenAPI document.
    pub summary: &'static str,
    /// Request body schema name, if any.
    pub request: Option<&'static str>,
    /// Success status and response schema (JSON schema, as OpenAPI).
    pub response: (u16, &'static str),
}

/// Every `/v1` route.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        pattern: "/v1/clusters",
        op: Op::ListClusters,
        summary: "List clusters with their connection state",
        request: None,
        response: (200, "ClusterList"),
    },
    Route {
        method: "POST",
        pattern: "/v1/clusters",
        op: Op::CreateCluster,
        summary: "Create a cluster and its registration token; returns the import command",
        request: Some("NewCluster"),
        response: (201, "ClusterCreated"),
    },
    Route {
        method: "GET",
        pattern: "/v1/clusters/{id}",
        op: Op::GetCluster,
        summary: "Get a cluster (by id or name)",
        request: None,
        response: (200, "Cluster"),
    },
    Route {
        method: "DELETE",
        pattern: "/v1/clusters/{id}",
        op: Op::DeleteCluster,
        summary: "Delete a cluster, its tokens, nodes and grants, and close its tunnels",
        request: None,
        response: (204, ""),
    },
    Route {
        method: "GET",
        pattern: "/v1/clusters/{id}/import",
        op: Op::ClusterImport,
        summary: "The cluster's import URL and command",
        request: None,
        response: (200, "ClusterImport"),
    },
    Route {
        method: "GET",
        pattern: "/v1/clusters/{id}/tokens",
        op: Op::ListClusterTokens,
        summary: "The cluster's registration tokens, oldest first, with their import commands",
        request: None,
        response: (200, "ClusterImportList"),
    },
    Route {
        method: "POST",
        pattern: "/v1/clusters/{id}/tokens",
        op: Op::CreateClusterToken,
        summary: "Add a registration token (rotation: add, re-import, then delete the old one)",
        request: None,
        response: (201, "ClusterImport"),
    },
    Route {
        method: "DELETE",
        pattern: "/v1/clusters/{id}/tokens/{token}",
        op: Op::DeleteClusterToken,
        summary: "Delete a registration token; agents still using it get 400 `cluster not found`",
        request: None,
        response: (204, ""),
    },
    Route {
        method: "GET",
        pattern: "/v1/nodes",
        op: Op::ListNodes,
        summary: "List nodes (query `cluster` to filter) with their connection state",
        request: None,
        response: (200, "NodeList"),
    },
    Route {
        method: "GET",
        pattern: "/v1/nodes/{id}",
        op: Op::GetNode,
        summary: "Get a node by machine name",
        request: None,
        response: (200, "Node"),
    },
    Route {
        method: "PATCH",
        pattern: "/v1/nodes/{id}",
        op: Op::UpdateNode,
        summary: "Set the Docker socket path dialed through the node's tunnel",
        request: Some("NodeUpdate"),
        response: (200, "Node"),
    },
    Route {
        method: "GET",
        pattern: "/v1/users",
        op: Op::ListUsers,
        summary: "List users",
        request: None,
        response: (200, "UserList"),
    },
    Route {
        method: "POST",
        pattern: "/v1/users",
        op: Op::CreateUser,
        summary: "Create a user and a first API token (shown once)",
        request: Some("NewUser"),
        response: (201, "UserCreated"),
    },
    Route {
        method: "GET",
        pattern: "/v1/users/{id}",
        op: Op::GetUser,
        summary: "Get a user (by id or name)",
        request: None,
        response: (200, "User"),
    },
    Route {
        method: "DELETE",
        pattern: "/v1/users/{id}",
        op: Op::DeleteUser,
        summary: "Delete a user, their tokens and grants",
        request: None,
        response: (204, ""),
    },
    Route {
        method: "GET",
        pattern: "/v1/tokens",
        op: Op::ListTokens,
        summary: "List API tokens (query `user` to filter); secrets are never shown",
        request: None,
        response: (200, "TokenList"),
    },
    Route {
        method: "POST",
        pattern: "/v1/tokens",
        op: Op::CreateToken,
        summary: "Create an API token for a user (the value is shown once)",
        request: Some("NewToken"),
        response: (201, "TokenCreated"),
    },
    Route {
        method: "DELETE",
        pattern: "/v1/tokens/{id}",
        op: Op::RevokeToken,
        summary: "Revoke an API token",
        request: None,
        response: (204, ""),
    },
    Route {
        method: "GET",
        pattern: "/v1/grants",
        op: Op::ListGrants,
        summary: "List grants",
        request: None,
        response: (200, "GrantList"),
    },
    Route {
        method: "POST",
        pattern: "/v1/grants",
        op: Op::CreateGrant,
        summary: "Grant a user access to a cluster",
        request: Some("NewGrant"),
        response: (201, "Grant"),
    },
    Route {
        method: "DELETE",
        pattern: "/v1/grants/{userId}/{clusterId}",
        op: Op::DeleteGrant,
        summary: "Withdraw a grant",
        request: None,
        response: (204, ""),
    },
    Route {
        method: "GET",
        pattern: "/v1/openapi.json",
        op: Op::OpenApi,
        summary: "This document",
        request: None,
        response: (200, ""),
    },
];

/// Matches a path against a pattern; returns the `{…}` segments in order.
pub fn match_pattern<'a>(pattern: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut params = Vec::new();
    let mut pat = pattern.split('/');
    let mut segs = path.split('/');
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(s)) if p.starts_with('{') => {
                if s.is_empty() {
                    return None;
                }
                params.push(s);
            }
            (Some(p), Some(s)) if p == s => {}
            _ => return None,
        }
    }
}

/// Finds the route of a request: `Ok((op, params))`, or `Err(405)` when the path matches
/// under another method, or `Err(404)`.
pub fn find_route<'a>(method: &Method, path: &'a str) -> Result<(Op, Vec<&'a str>), StatusCode> {
    let mut path_matched = false;
    for route in ROUTES {
        if let Some(params) = match_pattern(route.pattern, path) {
            if route.method == method.as_str() {
                return Ok((route.op, params));
            }
            path_matched = true;
        }
    }
    Err(if path_matched {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        StatusCode::NOT_FOUND
    })
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<ResponseBody> {
    json_response(
        status,
        &json!({ "status": status.as_u16(), "message": message.into() }),
    )
}

fn store_error(err: StoreError) -> Response<ResponseBody> {
    match err {
        StoreError::Conflict(what) => error(StatusCode::CONFLICT, format!("{what} already exists")),
        StoreError::NotFound(what) => error(StatusCode::NOT_FOUND, format!("{what} not found")),
        other => store_failure(&other),
    }
}

/// How long a `/v1` request body may take to arrive (a client that trickles it holds a
/// connection and a task).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
) -> Result<T, Response<ResponseBody>> {
    let collected = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, MAX_BODY).collect())
        .await
        .map_err(|_| {
            error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
        })?;
    let bytes: Bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {MAX_BODY} bytes"),
                )
            } else {
                error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Serves one `/v1` request.
pub async fn handle(app: SharedApp, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    let (op, params) = match find_route(req.method(), &path) {
        Ok(found) => found,
        Err(status) => {
            return error(
                status,
                format!("no such API route: {} {path}", req.method()),
            );
        }
    };
    let params: Vec<String> = params.into_iter().map(str::to_owned).collect();
    if op == Op::OpenApi {
        return json_response(StatusCode::OK, &openapi(&app.config.server_url));
    }
    let user = match authenticate(&app, &req).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    // The object as the request names it; a create replaces it with what it made.
    let mut target = match op {
        Op::DeleteClusterToken => {
            format!("{} {}", p_or(&params, 0), audit::redact(p_or(&params, 1)))
        }
        _ => params.join(" "),
    };
    if !user.admin && !op.open_to_granted_users() {
        let resp = error(
            StatusCode::FORBIDDEN,
            format!("user {} is not an admin", user.name),
        );
        if let Some((verb, object)) = op.mutation() {
            let m = Mutation::new(verb, object, target);
            audit::log(&user.name, "api", &m, Outcome::Refused, "403");
        }
        return resp;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let query_param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let mutation = !matches!(*req.method(), Method::GET | Method::HEAD);
    let body = req.into_body();
    let resp = match dispatch(
        &app,
        op,
        &params,
        body,
        query_param("cluster"),
        query_param("user"),
        Audited {
            who: &user.name,
            viewer: &user,
            target: &mut target,
        },
    )
    .await
    {
        Ok(resp) | Err(resp) => resp,
    };
    if let Some((verb, object)) = op.mutation() {
        let status = resp.status();
        let m = Mutation::new(verb, object, target);
        audit::log(
            &user.name,
            "api",
            &m,
            Outcome::of_status(status),
            status.as_str(),
        );
    }
    if mutation && resp.status().is_success() {
        // A deletion or revocation may take away what live tunnels and streams run on.
        app.live.changed();
    }
    resp
}

fn p_or(params: &[String], i: usize) -> &str {
    params.get(i).map(String::as_str).unwrap_or_default()
}

/// Who is calling, and the audit line's object, which a create fills in.
struct Audited<'a> {
    who: &'a str,
    /// The caller: what an admin-or-granted read may show ([`Op::open_to_granted_users`]).
    viewer: &'a crate::store::User,
    target: &'a mut String,
}

type Handled = Result<Response<ResponseBody>, Response<ResponseBody>>;

fn cluster_view(app: &SharedApp, c: &Cluster) -> Value {
    let probe = app.connectivity(&c.id);
    // Streams open now and Data bytes so far over this replica's sessions of the cluster
    // agent (its main and aggregation tunnels).
    let (mut streams, mut bytes_in, mut bytes_out) = (0, 0, 0);
    for key in [ClientKey::new(c.id.clone()), stv_key(&c.id)] {
        for session in app.registry.sessions(&key) {
            let stats = session.tunnel().stats();
            streams += session.tunnel().stream_count();
            bytes_in += stats.data_bytes_in;
            bytes_out += stats.data_bytes_out;
        }
    }
    json!({
        "streams": streams,
        "bytesIn": bytes_in,
        "bytesOut": bytes_out,
        "id": c.id,
        "name": c.name,
        "createdAt": c.created_at,
        "apiEndpoint": c.api_endpoint,
        "caCert": c.ca_cert,
        "tunnel": app.has_tunnel(&c.id),
        "aggregationTunnel": app.registry.has_session(&stv_key(&c.id)),
        "connected": probe.as_ref().is_some_and(|p| p.connected),
        "connectedMessage": probe.as_ref().and_then(|p| p.message.clone()),
        "checkedAt": probe.map(|p| p.checked_at),
    })
}

fn import_view(app: &SharedApp, cluster_id: &str, token: &str) -> Value {
    let url = &app.config.server_url;
    json!({
        "clusterId": cluster_id,
        "registrationToken": token,
        "importUrl": import_url(url, token, cluster_id),
        "importCommand": import_command(url, token, cluster_id),
        "caChecksum": app.ca_checksum(),
    })
}

fn node_view(app: &SharedApp, n: &Node) -> Value {
    json!({
        "id": n.id,
        "clusterId": n.cluster_id,
        // Unambiguous in /docker/nodes/{ref} and /v1/nodes/{ref}, whatever other clusters hold.
        "ref": n.client_key(),
        "hostname": n.hostname,
        "dockerSocket": n.docker_socket,
        "createdAt": n.created_at,
        "connected": app.registry.has_session(&ClientKey::new(n.client_key())),
        "params": n.params,
    })
}

#[derive(Deserialize)]
struct NewCluster {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeUpdate {
    docker_socket: String,
}

/// Longest Docker socket path: `unix/<path>` must fit the 100-byte Connect payload that
/// remotedialer before v0.4.5 reads (wire spec §1.5), with room for the stream id.
const MAX_SOCKET_PATH: usize = 80;

#[derive(Deserialize)]
struct NewUser {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    admin: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewToken {
    user_id: String,
    #[serde(default)]
    description: String,
    /// Seconds until the token expires; absent or 0: never.
    #[serde(default)]
    ttl_seconds: u64,
}

/// Longest token lifetime the API accepts (about 100 years).
const MAX_TTL_SECONDS: u64 = 100 * 366 * 24 * 3600;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewGrant {
    user_id: String,
    cluster_id: String,
}

/// The ids of the clusters granted to a user.
async fn granted_clusters(
    app: &SharedApp,
    user: &crate::store::User,
) -> Result<std::collections::HashSet<String>, Response<ResponseBody>> {
    Ok(app
        .store
        .grants()
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|g| g.user_id == user.id)
        .map(|g| g.cluster_id)
        .collect())
}

/// For a user who is not an admin, 404 (`what` not found) unless the cluster is granted to
/// them: one they may not see looks like one that does not exist.
async fn visible(
    app: &SharedApp,
    user: &crate::store::User,
    cluster_id: &str,
    what: &str,
) -> Result<(), Response<ResponseBody>> {
    if user.admin
        || app
            .store
            .is_granted(&user.id, cluster_id)
            .await
            .map_err(store_error)?
    {
        Ok(())
    } else {
        Err(error(StatusCode::NOT_FOUND, format!("{what} not found")))
    }
}

fn found<T>(v: Option<T>, what: &str) -> Result<T, Response<ResponseBody>> {
    v.ok_or_else(|| error(StatusCode::NOT_FOUND, format!("{what} not found")))
}

fn valid_name(name: &str) -> Result<(), Response<ResponseBody>> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "names are 1-63 characters of letters, digits, '-', '_', '.', '@'",
        ))
    }
}

async fn dispatch(
    app: &SharedApp,
    op: Op,
    params: &[String],
    body: Incoming,
    cluster_filter: Option<String>,
    user_filter: Option<String>,
    audited: Audited<'_>,
) -> Handled {
    let store = &app.store;
    let p = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
    Ok(match op {
        Op::ListClusters => {
            let mut clusters = store.clusters().await.map_err(store_error)?;
            if !audited.viewer.admin {
                let granted = granted_clusters(app, audited.viewer).await?;
                clusters.retain(|c| granted.contains(&c.id));
            }
            let items: Vec<Value> = clusters.iter().map(|c| cluster_view(app, c)).collect();
            json_response(StatusCode::OK, &json!({ "items": items }))
        }
        Op::CreateCluster => {
            let new: NewCluster = read_json(body).await?;
            valid_name(&new.name)?;
            *audited.target = new.name.clone();
            let (cluster, token) = store.create_cluster(&new.name).await.map_err(store_error)?;
            *audited.target = format!("{} ({})", cluster.id, cluster.name);
            let url = &app.config.server_url;
            json_response(
                StatusCode::CREATED,
                &json!({
                    "cluster": cluster_view(app, &cluster),
                    "registrationToken": token.token,
                    "importUrl": import_url(url, &token.token, &cluster.id),
                    "importCommand": import_command(url, &token.token, &cluster.id),
                }),
            )
        }
        Op::GetCluster => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            visible(app, audited.viewer, &c.id, "cluster").await?;
            let mut view = cluster_view(app, &c);
            let end = TunnelEnd {
                cluster_id: c.id.clone(),
                node_id: None,
            };
            view["presence"] = json!(store.presence(&end).await.map_err(store_error)?);
            json_response(StatusCode::OK, &view)
        }
        Op::DeleteCluster => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            store.delete_cluster(&c.id).await.map_err(store_error)?;
            close_cluster_tunnels(app, &c.id);
            crate::http_util::empty(StatusCode::NO_CONTENT)
        }
        Op::ClusterImport => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            let tokens = store
                .registration_tokens(&c.id)
                .await
                .map_err(store_error)?;
            let token = match tokens.into_iter().next_back() {
                Some(t) => t,
                None => {
                    // A GET that writes: audited like the POST.
                    let created = store.create_registration_token(&c.id).await;
                    let m = Mutation::new("create", "registration-token", c.id.clone());
                    let outcome = if created.is_ok() {
                        Outcome::Ok
                    } else {
                        Outcome::Failed
                    };
                    audit::log(audited.who, "api", &m, outcome, "on import");
                    created.map_err(store_error)?
                }
            };
            json_response(StatusCode::OK, &import_view(app, &c.id, &token.token))
        }
        Op::ListClusterTokens => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            let tokens = store
                .registration_tokens(&c.id)
                .await
                .map_err(store_error)?;
            let items: Vec<Value> = tokens
                .iter()
                .map(|t| import_view(app, &c.id, &t.token))
                .collect();
            json_response(StatusCode::OK, &json!({ "items": items }))
        }
        Op::CreateClusterToken => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            let t = store
                .create_registration_token(&c.id)
                .await
                .map_err(store_error)?;
            *audited.target = format!("{} {}", c.id, audit::redact(&t.token));
            json_response(StatusCode::CREATED, &import_view(app, &c.id, &t.token))
        }
        Op::DeleteClusterToken => {
            let c = found(
                store
                    .cluster_by_id_or_name(p(0))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            if !store
                .delete_registration_token(&c.id, p(1))
                .await
                .map_err(store_error)?
            {
                return Err(error(StatusCode::NOT_FOUND, "registration token not found"));
            }
            crate::http_util::empty(StatusCode::NO_CONTENT)
        }
        Op::ListNodes => {
            let mut nodes = store
                .nodes(cluster_filter.as_deref())
                .await
                .map_err(store_error)?;
            if !audited.viewer.admin {
                let granted = granted_clusters(app, audited.viewer).await?;
                nodes.retain(|n| granted.contains(&n.cluster_id));
            }
            let items: Vec<Value> = nodes.iter().map(|n| node_view(app, n)).collect();
            json_response(StatusCode::OK, &json!({ "items": items }))
        }
        Op::GetNode => {
            let n = found(store.resolve_node(p(0)).await.map_err(store_error)?, "node")?;
            visible(app, audited.viewer, &n.cluster_id, "node").await?;
            let mut view = node_view(app, &n);
            let end = TunnelEnd {
                cluster_id: n.cluster_id.clone(),
                node_id: Some(n.id.clone()),
            };
            view["presence"] = json!(store.presence(&end).await.map_err(store_error)?);
            json_response(StatusCode::OK, &view)
        }
        Op::UpdateNode => {
            let update: NodeUpdate = read_json(body).await?;
            let path = update.docker_socket;
            if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "dockerSocket must be an absolute path of at most {MAX_SOCKET_PATH} bytes"
                    ),
                ));
            }
            let n = found(store.resolve_node(p(0)).await.map_err(store_error)?, "node")?;
            store
                .set_node_docker_socket(&n.cluster_id, &n.id, &path)
                .await
                .map_err(store_error)?;
            let n = found(
                store
                    .node(&n.cluster_id, &n.id)
                    .await
                    .map_err(store_error)?,
                "node",
            )?;
            json_response(StatusCode::OK, &node_view(app, &n))
        }
        Op::ListUsers => {
            let users = store.users().await.map_err(store_error)?;
            json_response(StatusCode::OK, &json!({ "items": users }))
        }
        Op::CreateUser => {
            let new: NewUser = read_json(body).await?;
            valid_name(&new.name)?;
            *audited.target = new.name.clone();
            let user = store
                .create_user(&new.name, &new.groups, new.admin)
                .await
                .map_err(store_error)?;
            *audited.target = format!("{} ({})", user.id, user.name);
            let (token, value) = store
                .create_api_token(&user.id, "created with the user", None)
                .await
                .map_err(store_error)?;
            json_response(
                StatusCode::CREATED,
                &json!({ "user": user, "token": token, "value": value }),
            )
        }
        Op::GetUser => {
            let u = found(
                store.user_by_id_or_name(p(0)).await.map_err(store_error)?,
                "user",
            )?;
            json_response(StatusCode::OK, &u)
        }
        Op::DeleteUser => {
            let u = found(
                store.user_by_id_or_name(p(0)).await.map_err(store_error)?,
                "user",
            )?;
            store.delete_user(&u.id).await.map_err(store_error)?;
            crate::http_util::empty(StatusCode::NO_CONTENT)
        }
        Op::ListTokens => {
            let user_id = match user_filter {
                Some(u) => Some(
                    found(
                        store.user_by_id_or_name(&u).await.map_err(store_error)?,
                        "user",
                    )?
                    .id,
                ),
                None => None,
            };
            let tokens = store
                .api_tokens(user_id.as_deref())
                .await
                .map_err(store_error)?;
            json_response(StatusCode::OK, &json!({ "items": tokens }))
        }
        Op::CreateToken => {
            let new: NewToken = read_json(body).await?;
            *audited.target = format!("for {}", new.user_id);
            if new.ttl_seconds > MAX_TTL_SECONDS {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("ttlSeconds must be at most {MAX_TTL_SECONDS}"),
                ));
            }
            let expires_at =
                (new.ttl_seconds > 0).then(|| crate::store::now_unix() + new.ttl_seconds as i64);
            let u = found(
                store
                    .user_by_id_or_name(&new.user_id)
                    .await
                    .map_err(store_error)?,
                "user",
            )?;
            let (token, value) = store
                .create_api_token(&u.id, &new.description, expires_at)
                .await
                .map_err(store_error)?;
            *audited.target = format!("{} for {}", token.id, u.name);
            json_response(
                StatusCode::CREATED,
                &json!({ "token": token, "value": value }),
            )
        }
        Op::RevokeToken => {
            if !store.revoke_api_token(p(0)).await.map_err(store_error)? {
                return Err(error(StatusCode::NOT_FOUND, "token not found"));
            }
            crate::http_util::empty(StatusCode::NO_CONTENT)
        }
        Op::ListGrants => {
            let grants = store.grants().await.map_err(store_error)?;
            json_response(StatusCode::OK, &json!({ "items": grants }))
        }
        Op::CreateGrant => {
            let new: NewGrant = read_json(body).await?;
            *audited.target = format!("{} {}", new.user_id, new.cluster_id);
            let u = found(
                store
                    .user_by_id_or_name(&new.user_id)
                    .await
                    .map_err(store_error)?,
                "user",
            )?;
            let c = found(
                store
                    .cluster_by_id_or_name(&new.cluster_id)
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            *audited.target = format!("{} {}", u.id, c.id);
            let grant = store.grant(&u.id, &c.id).await.map_err(store_error)?;
            json_response(StatusCode::CREATED, &grant)
        }
        Op::DeleteGrant => {
            let u = found(
                store.user_by_id_or_name(p(0)).await.map_err(store_error)?,
                "user",
            )?;
            let c = found(
                store
                    .cluster_by_id_or_name(p(1))
                    .await
                    .map_err(store_error)?,
                "cluster",
            )?;
            if !store
                .revoke_grant(&u.id, &c.id)
                .await
                .map_err(store_error)?
            {
                return Err(error(StatusCode::NOT_FOUND, "grant not found"));
            }
            crate::http_util::empty(StatusCode::NO_CONTENT)
        }
        Op::OpenApi => json_response(StatusCode::OK, &openapi(&app.config.server_url)),
    })
}

/// Closes every tunnel of a deleted cluster (main, aggregation, nodes).
fn close_cluster_tunnels(app: &SharedApp, cluster_id: &str) {
    app.upstreams.forget(&format!("k8s/{cluster_id}/"));
    app.upstreams.forget(&format!("docker/{cluster_id}:"));
    let node_prefix = format!("{cluster_id}:");
    for key in app.registry.list_clients() {
        let k = key.as_str();
        if k == cluster_id || k.starts_with(&node_prefix) || key == stv_key(cluster_id) {
            app.registry.remove_key(&key);
        }
    }
}

// === OpenAPI ===

fn schemas() -> Value {
    let list = |item: &str| json!({ "type": "object", "required": ["items"], "properties": { "items": { "type": "array", "items": { "$ref": format!("#/components/schemas/{item}") } } } });
    let ts = json!({ "type": "integer", "format": "int64", "description": "Unix seconds" });
    json!({
        "Error": { "type": "object", "properties": { "status": { "type": "integer" }, "message": { "type": "string" } } },
        "Cluster": { "type": "object", "properties": {
            "id": { "type": "string", "example": "c-x2k9b" }, "name": { "type": "string" }, "createdAt": ts,
            "apiEndpoint": { "type": "string", "nullable": true }, "caCert": { "type": "string", "nullable": true, "description": "base64 of the apiserver CA PEM" },
            "tunnel": { "type": "boolean", "description": "the cluster agent's tunnel is registered" },
            "aggregationTunnel": { "type": "boolean", "description": "the stv-cluster tunnel is registered" },
            "connected": { "type": "boolean", "description": "GET /ping through the stv-cluster tunnel answered 200 at the last probe" },
            "connectedMessage": { "type": "string", "nullable": true }, "checkedAt": { "type": "integer", "nullable": true },
            "streams": { "type": "integer", "description": "streams open now over this replica's sessions of the cluster agent" },
            "bytesIn": { "type": "integer", "format": "int64", "description": "Data bytes received over those sessions" },
            "bytesOut": { "type": "integer", "format": "int64", "description": "Data bytes sent over those sessions" },
            "presence": { "$ref": "#/components/schemas/Presence" } } },
        "Presence": { "type": "object", "nullable": true, "description": "the tunnel's live state as the replicas recorded it in the store (GET of one object only)", "properties": {
            "connected": { "type": "boolean" }, "replica": { "type": "string", "description": "the replica that holds (or last held) the tunnel" },
            "peer": { "type": "string", "description": "host:port of that replica's peer listener (Kubernetes store with --peer-listen only)" },
            "lastSeen": ts, "since": { "type": "integer", "format": "int64", "description": "Unix seconds connected last changed" } } },
        "ClusterList": list("Cluster"),
        "NewCluster": { "type": "object", "required": ["name"], "properties": { "name": { "type": "string" } } },
        "ClusterCreated": { "type": "object", "properties": { "cluster": { "$ref": "#/components/schemas/Cluster" }, "registrationToken": { "type": "string" }, "importUrl": { "type": "string" }, "importCommand": { "type": "string" } } },
        "ClusterImportList": list("ClusterImport"),
        "ClusterImport": { "type": "object", "properties": { "clusterId": { "type": "string" }, "registrationToken": { "type": "string" }, "importUrl": { "type": "string" }, "importCommand": { "type": "string" }, "caChecksum": { "type": "string" } } },
        "Node": { "type": "object", "properties": { "id": { "type": "string", "example": "m-164546f60261" }, "clusterId": { "type": "string" }, "hostname": { "type": "string" }, "dockerSocket": { "type": "string" }, "createdAt": ts, "connected": { "type": "boolean" }, "params": { "type": "object" }, "presence": { "$ref": "#/components/schemas/Presence" } } },
        "NodeList": list("Node"),
        "NodeUpdate": { "type": "object", "required": ["dockerSocket"], "additionalProperties": false, "properties": { "dockerSocket": { "type": "string", "description": "absolute path, at most 80 bytes; default /var/run/docker.sock" } } },
        "User": { "type": "object", "properties": { "id": { "type": "string" }, "name": { "type": "string" }, "groups": { "type": "array", "items": { "type": "string" } }, "admin": { "type": "boolean" }, "createdAt": ts } },
        "UserList": list("User"),
        "NewUser": { "type": "object", "required": ["name"], "properties": { "name": { "type": "string" }, "groups": { "type": "array", "items": { "type": "string" } }, "admin": { "type": "boolean" } } },
        "UserCreated": { "type": "object", "properties": { "user": { "$ref": "#/components/schemas/User" }, "token": { "$ref": "#/components/schemas/ApiToken" }, "value": { "type": "string", "description": "bearer token, shown once" } } },
        "ApiToken": { "type": "object", "properties": { "id": { "type": "string" }, "userId": { "type": "string" }, "description": { "type": "string" }, "createdAt": ts, "revoked": { "type": "boolean" },
            "expiresAt": { "type": "integer", "format": "int64", "nullable": true, "description": "Unix seconds after which the token is refused; null: never" },
            "lastUsedAt": { "type": "integer", "format": "int64", "nullable": true, "description": "Unix seconds of the last successful authentication (recorded within a few seconds); null: never" } } },
        "TokenList": list("ApiToken"),
        "NewToken": { "type": "object", "required": ["userId"], "properties": { "userId": { "type": "string", "description": "user id or name" }, "description": { "type": "string" }, "ttlSeconds": { "type": "integer", "format": "int64", "description": "lifetime in seconds; absent or 0: never expires" } } },
        "TokenCreated": { "type": "object", "properties": { "token": { "$ref": "#/components/schemas/ApiToken" }, "value": { "type": "string", "description": "bearer token, shown once" } } },
        "Grant": { "type": "object", "properties": { "userId": { "type": "string" }, "clusterId": { "type": "string" }, "createdAt": ts } },
        "GrantList": list("Grant"),
        "NewGrant": { "type": "object", "required": ["userId", "clusterId"], "properties": { "userId": { "type": "string", "description": "user id or name" }, "clusterId": { "type": "string", "description": "cluster id or name" } } },
    })
}

/// The OpenAPI 3 document of [`ROUTES`].
pub fn openapi(server_url: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let params: Vec<Value> = route
            .pattern
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let (status, schema) = route.response;
        let mut responses = serde_json::Map::new();
        let content = if schema.is_empty() {
            json!({ "description": "success" })
        } else {
            json!({ "description": "success", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
        };
        responses.insert(status.to_string(), content);
        if route.op != Op::OpenApi {
            for (code, what) in [
                ("400", "bad request"),
                ("401", "no or invalid bearer token"),
                ("403", "not an admin"),
                ("404", "not found"),
                (
                    "503",
                    "the store is busy (too many calls waiting); retry after Retry-After",
                ),
            ] {
                responses.insert(code.to_owned(), json!({ "description": what, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }));
            }
        }
        let mut operation = json!({
            "operationId": format!("{:?}", route.op),
            "summary": route.summary,
            "responses": responses,
        });
        if !params.is_empty() {
            operation["parameters"] = Value::Array(params);
        }
        if let Some(req) = route.request {
            operation["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{req}") } } } });
        }
        if route.op == Op::OpenApi {
            operation["security"] = json!([]);
        }
        let entry = paths
            .entry(route.pattern.to_owned())
            .or_insert_with(|| json!({}));
        entry[route.method.to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "tunnel-server management API", "version": env!("CARGO_PKG_VERSION") },
        "servers": [{ "url": server_url }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "an admin user's API token, token-xxxxx:secret" } },
            "schemas": schemas(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_segments() {
        assert_eq!(
            match_pattern("/v1/clusters/{id}", "/v1/clusters/c-1"),
            Some(vec!["c-1"])
        );
        assert_eq!(match_pattern("/v1/clusters/{id}", "/v1/clusters/"), None);
        assert_eq!(
            match_pattern("/v1/clusters/{id}", "/v1/clusters/c-1/x"),
            None
        );
        assert_eq!(
            find_route(&Method::PUT, "/v1/clusters").err(),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            find_route(&Method::GET, "/v1/nope").err(),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            find_route(&Method::DELETE, "/v1/grants/u-1/c-1").unwrap(),
            (Op::DeleteGrant, vec!["u-1", "c-1"])
        );
    }

    #[test]
    fn every_schema_referenced_exists() {
        let doc = openapi("https://x");
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            assert!(schemas.contains_key(&name), "missing schema {name}");
        }
    }
}
