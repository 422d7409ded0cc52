//! `/docker/nodes/<node-id>/…`: the Docker API of a connected node.
//!
//! `<node-id>` is `<cluster-id>:<machine>`, or a bare machine name for the oldest node of that
//! name ([`crate::store::resolve_node`]: a later registration cannot shadow it).
//!
//! The docker CLI keeps the path of `DOCKER_HOST` (`tcp://server:port/docker/nodes/m-xxx`) as a
//! prefix of every request and sends the `HttpHeaders` of its `config.json`, which carry the
//! user's `Authorization: Bearer …`. The user must hold a grant on the node's cluster. The
//! request goes as plain HTTP/1.1 through the node agent's tunnel to its Docker socket
//! (`unix` `/var/run/docker.sock` unless the node says otherwise), with the prefix and the
//! user's credentials removed. `docker exec -it`/`attach` ask for `Connection: Upgrade,
//! Upgrade: tcp`; dockerd answers `101 UPGRADED` and both connections are spliced.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tunnel_proto::driver::acceptor::{ClientKey, ResponseBody};

use super::pool::current_session;
use super::{Audit, ProxyError, Rewrite, Upstream, dial_label, forward, handshake};
use crate::app::SharedApp;
use crate::http_util::{store_failure, text};

/// Serves one request for node `node_id`; `rest` is the path after the prefix.
pub async fn handle(
    app: SharedApp,
    req: Request<Incoming>,
    node_id: &str,
    rest: &str,
) -> Response<ResponseBody> {
    let (mut audit, user) = match Audit::authenticate(&app, &req, "docker", node_id).await {
        Ok(started) => started,
        Err(resp) => return resp,
    };
    let node = match app.store.resolve_node(node_id).await {
        Ok(Some(node)) => node,
        Ok(None) => {
            return audit.respond(text(
                StatusCode::NOT_FOUND,
                format!("node {node_id} not found"),
            ));
        }
        Err(err) => return audit.respond(store_failure(&err)),
    };
    audit.reaches_cluster(&node.cluster_id);
    match app.store.is_granted(&user.id, &node.cluster_id).await {
        Ok(true) => {}
        Ok(false) if user.admin => {}
        Ok(false) => {
            return audit.respond(text(
                StatusCode::FORBIDDEN,
                format!(
                    "user {} has no access to cluster {} of node {node_id}",
                    user.name, node.cluster_id
                ),
            ));
        }
        Err(err) => return audit.respond(store_failure(&err)),
    }
    let key = ClientKey::new(node.client_key());
    let (req, audit) = match crate::peers::forward_unless_local(&app, req, audit, &user, &key).await
    {
        Ok(local) => local,
        Err(resp) => return resp,
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let rewrite = Rewrite {
        path_and_query,
        host: "docker".to_owned(),
        set_headers: Vec::new(),
    };
    let upstream = Upstream {
        target: format!("docker/{}/{}", node.client_key(), node.docker_socket),
        client_key: key.clone(),
        what: format!("dockerd of {node_id} at unix {}", node.docker_socket),
        connect: || async {
            let session = current_session(&app.registry, &key);
            match app.registry.open(&key, "unix", &node.docker_socket) {
                Ok(stream) => {
                    app.metrics.dial("ok");
                    Ok((handshake(stream).await?, session))
                }
                Err(err) => {
                    app.metrics.dial(dial_label(&err));
                    let who = format!("node agent of {node_id}");
                    Err(ProxyError::from_dial(err, &who).into_response())
                }
            }
        },
    };
    forward(&app, req, rewrite, audit, upstream).await
}
