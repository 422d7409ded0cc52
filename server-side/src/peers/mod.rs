//! Several replicas on the Kubernetes store: a user request that reaches a replica without the
//! tunnel it needs is forwarded, in one hop, to the replica that holds it.
//!
//! ```text
//!   kubectl ──▶ replica B: authenticate (bearer), authorise (grant) ──no tunnel here──┐
//!                                                                                     │ presence: c-x held by
//!                                                                                     │ replica A at 10.0.0.7:8444
//!   replica A's peer listener (mutual TLS, the server's CA) ◀──────────────────────────┘
//!     X-Tunnel-Server-Forwarded-By: replica-b, X-Tunnel-Server-Forwarded-User: u-…
//!     └─▶ the usual proxy (user re-read from A's store, grant re-checked) ──tunnel──▶ agent
//! ```
//!
//! - **Who owns a tunnel**: each replica writes the ends it holds to the store
//!   ([`crate::presence`]) with its name and its peer address; the others see it through the
//!   store's watch within milliseconds ([`crate::store::Store::presence`]).
//! - **Trust**: the first replica authenticates the user's bearer token and checks the grant,
//!   as for a local request, then forwards without the bearer, naming the user by id. The owner
//!   believes that name only on its peer listener, where every connection presents a client
//!   certificate issued by the server's CA (in the state Secret, which only replicas can read).
//!   It still looks the user up and checks the grant in its own store, so a user deleted or a
//!   grant withdrawn in the meantime is refused there too; a revoked token cuts the request on
//!   the first replica, which holds the user's connection ([`crate::live`]). Forwarding the
//!   bearer instead would make the owner repeat work the first replica did, and would let a
//!   replica that is not the user's authority see every user's credentials.
//! - **One hop, never a loop**: a request that came in on the peer listener is never forwarded
//!   again; if the owner does not hold the tunnel either (the presence it was chosen by is out
//!   of date), it answers 503 saying so.
//! - **Upgrades** (exec, attach, port-forward: SPDY or websocket; Docker's `tcp` hijack) go
//!   through the hop like any request: the peer connection becomes the upgraded stream and
//!   both replicas splice ([`crate::proxy`]).
//!
//! Only the Kubernetes store has peers: with SQLite there is one replica and nothing here runs.

mod listener;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnel_proto::driver::acceptor::{ClientKey, ResponseBody};

pub use self::listener::serve;
pub use self::tls::PeerTls;

use crate::app::SharedApp;
use crate::http_util::{store_failure, text};
use crate::proxy::pool::Sender;
use crate::proxy::{Audit, Rewrite};
use crate::store::{TunnelEnd, User};

/// Header naming the replica that forwarded a request (on the peer listener only).
pub const FORWARDED_BY: &str = "x-tunnel-server-forwarded-by";
/// Header naming, by id, the user the forwarding replica authenticated (on the peer listener
/// only).
pub const FORWARDED_USER: &str = "x-tunnel-server-forwarded-user";
/// Prefix of the headers above: removed from every client's request before it goes anywhere.
pub const HEADER_PREFIX: &str = "x-tunnel-server-";

/// How long connecting to a peer (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle connection to a peer is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per peer.
const MAX_IDLE_PER_PEER: usize = 16;

/// `--peer-listen` / `--peer-address`.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where the peer listener binds (`0.0.0.0:8444`).
    pub listen: String,
    /// `host:port` the other replicas reach it at; `None`: `$POD_IP` and the bound port, else
    /// the bound address when it is a specific one.
    pub address: Option<String>,
}

/// Why peering could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer address could not be worked out.
    #[error(
        "no --peer-address: the peer listener is on {0}, which other replicas cannot dial, and $POD_IP is not set"
    )]
    NoAddress(SocketAddr),
    /// `--peer-address` is not `host:port`.
    #[error("invalid --peer-address {0:?}: expected host:port")]
    BadAddress(String),
    /// The certificate could not be issued or the TLS set-up failed.
    #[error("peer TLS: {0}")]
    Tls(String),
    /// The CA could not be read or created.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// The address other replicas reach this one's peer listener at.
pub fn advertised_address(config: &PeerConfig, bound: SocketAddr) -> Result<String, PeerError> {
    if let Some(address) = &config.address {
        return host_of(address)
            .map(|_| address.clone())
            .ok_or_else(|| PeerError::BadAddress(address.clone()));
    }
    if let Ok(ip) = std::env::var("POD_IP")
        && let Ok(ip) = ip.trim().parse::<std::net::IpAddr>()
    {
        return Ok(SocketAddr::new(ip, bound.port()).to_string());
    }
    if bound.ip().is_unspecified() {
        return Err(PeerError::NoAddress(bound));
    }
    Ok(bound.to_string())
}

/// The host of `host:port` (brackets of an IPv6 literal removed).
fn host_of(address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_owned())
}

/// What the peer listener attaches to a forwarded request (never set from a client's
/// headers on the public listener).
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The replica that forwarded it (its header, on a connection with a CA-issued
    /// certificate).
    pub by: String,
    /// The user it authenticated.
    pub user_id: String,
}

/// This replica's side of peering: its identity and its connections to the others.
pub struct Peers {
    replica: String,
    address: String,
    client_tls: Arc<rustls::ClientConfig>,
    idle: Mutex<HashMap<String, Vec<(Sender, Instant)>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("replica", &self.replica)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Where a request for a tunnel goes.
pub enum Route {
    /// This replica serves it (it holds the tunnel, or nobody does and the usual 503 follows).
    Local,
    /// To the replica that holds the tunnel.
    Owner {
        /// Its name.
        replica: String,
        /// Its peer address.
        address: String,
    },
    /// Answered here: a forwarded request for a tunnel this replica does not hold.
    Refused(Response<ResponseBody>),
}

impl Peers {
    /// Peering as `replica`, reachable at `address`, dialing with `tls`.
    pub fn new(replica: String, address: String, tls: &PeerTls) -> Self {
        Self {
            replica,
            address,
            client_tls: tls.client.clone(),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// This replica's peer address, as recorded in the presence of its tunnels.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Where a request for `key`'s tunnel goes. `forwarded`: the request came from a peer.
    pub async fn route(
        &self,
        app: &SharedApp,
        key: &ClientKey,
        forwarded: Option<&Forwarded>,
    ) -> Route {
        if app.registry.has_session(key) {
            return Route::Local;
        }
        if let Some(fwd) = forwarded {
            return Route::Refused(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "replica {} forwarded this request for the tunnel of {key} to replica {}, \
                     which does not hold it either (the tunnel moved or closed since); a \
                     forwarded request is not forwarded again: retry",
                    fwd.by, self.replica
                ),
            ));
        }
        let Some(end) = TunnelEnd::of_client_key(key.as_str()) else {
            return Route::Local;
        };
        match app.store.presence(&end).await {
            Ok(Some(p)) if p.connected && p.replica != self.replica => match p.peer {
                Some(address) => Route::Owner {
                    replica: p.replica,
                    address,
                },
                None => Route::Refused(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the tunnel of {key} is held by replica {}, which has no peer listener \
                         (--peer-listen) to forward the request to",
                        p.replica
                    ),
                )),
            },
            Ok(_) => Route::Local,
            Err(err) => Route::Refused(store_failure(&err)),
        }
    }

    /// Forwards `req` (already authenticated as `user` and authorised) to the replica
    /// `owner` at `address`, and relays its answer (the body streamed, an upgrade spliced).
    pub async fn forward(
        &self,
        app: &SharedApp,
        req: Request<Incoming>,
        audit: Audit,
        user: &User,
        owner: &str,
        address: &str,
    ) -> Response<ResponseBody> {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
        let header = |v: &str| HeaderValue::from_str(v).ok();
        let (Some(by), Some(user_id)) = (header(&self.replica), header(&user.id)) else {
            return audit.respond(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "replica or user name is not a valid header value",
            ));
        };
        let rewrite = Rewrite {
            path_and_query,
            host: address.to_owned(),
            set_headers: vec![
                (HeaderName::from_static(FORWARDED_BY), by),
                (HeaderName::from_static(FORWARDED_USER), user_id),
            ],
        };
        let (prepared, audit) = match crate::proxy::prepare(req, rewrite, audit) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let unreachable = |err: String| {
            text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "replica {owner}, which holds the tunnel, cannot be reached at {address}: {err}"
                ),
            )
        };
        let upgrade = prepared.upgrade;
        let mut req = Err(prepared.req);
        // A pooled connection first (not for an upgrade: the connection becomes the stream).
        while let Err(pending) = req {
            let Some(mut sender) = (!upgrade).then(|| self.checkout(address)).flatten() else {
                req = Err(pending);
                break;
            };
            req = match sender.try_send_request(pending).await {
                Ok(resp) => {
                    self.checkin(address, sender);
                    Ok(resp)
                }
                Err(mut err) => match err.take_message() {
                    Some(pending) => Err(pending),
                    None => {
                        let err = crate::proxy::error_chain(&err.into_error());
                        return audit.respond(unreachable(err));
                    }
                },
            };
        }
        let resp = match req {
            Ok(resp) => resp,
            Err(pending) => {
                let mut sender = match self.connect(address).await {
                    Ok(s) => s,
                    Err(err) => return audit.respond(unreachable(err)),
                };
                match sender.send_request(pending).await {
                    Ok(resp) => {
                        if !upgrade {
                            self.checkin(address, sender);
                        }
                        resp
                    }
                    Err(err) => {
                        return audit.respond(unreachable(crate::proxy::error_chain(&err)));
                    }
                }
            }
        };
        app.metrics.dial("forwarded");
        crate::proxy::relay(resp, prepared.client_upgrade, prepared.slot, audit)
    }

    /// A fresh connection to the peer at `address`: TCP, mutual TLS, the HTTP/1.1 handshake.
    async fn connect(&self, address: &str) -> Result<Sender, String> {
        let host = host_of(address).ok_or_else(|| "not host:port".to_owned())?;
        let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.client_tls.clone());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = TcpStream::connect(address).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(name, tcp).await
        })
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        crate::proxy::handshake(tls).await.map_err(|resp| {
            format!(
                "HTTP handshake failed ({})",
                resp.status().canonical_reason().unwrap_or("error")
            )
        })
    }

    fn checkout(&self, address: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(address)?;
        let now = Instant::now();
        let mut found = None;
        let mut keep = Vec::with_capacity(list.len());
        while let Some((sender, since)) = list.pop() {
            if sender.is_closed() || now.saturating_duration_since(since) > IDLE_TIMEOUT {
                continue;
            }
            if found.is_none() && sender.is_ready() {
                found = Some(sender);
            } else {
                keep.push((sender, since));
            }
        }
        keep.reverse();
        *list = keep;
        found
    }

    fn checkin(&self, address: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(address.to_owned()).or_default();
        list.push((sender, Instant::now()));
        if list.len() > MAX_IDLE_PER_PEER {
            list.remove(0);
        }
    }
}

/// The user a forwarded request acts for, re-read from this replica's store: 401 if it no
/// longer exists.
pub async fn forwarded_user(
    app: &SharedApp,
    fwd: &Forwarded,
) -> Result<User, Response<ResponseBody>> {
    match app.store.user(&fwd.user_id).await {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(text(
            StatusCode::UNAUTHORIZED,
            format!(
                "user {} (forwarded by replica {}) does not exist",
                fwd.user_id, fwd.by
            ),
        )),
        Err(err) => Err(store_failure(&err)),
    }
}

/// For the proxies: `Ok` with the request and its audit back when this replica serves a
/// request for `key` (it holds the tunnel, nobody does, or there is no peering); otherwise the
/// response to it, from the owner it was forwarded to or the refusal.
pub async fn forward_unless_local(
    app: &SharedApp,
    req: Request<Incoming>,
    audit: Audit,
    user: &User,
    key: &ClientKey,
) -> Result<(Request<Incoming>, Audit), Response<ResponseBody>> {
    let Some(peers) = &app.peers else {
        return Ok((req, audit));
    };
    match peers
        .route(app, key, req.extensions().get::<Forwarded>())
        .await
    {
        Route::Local => Ok((req, audit)),
        Route::Owner { replica, address } => Err(peers
            .forward(app, req, audit, user, &replica, &address)
            .await),
        Route::Refused(resp) => Err(audit.respond(resp)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address() {
        let bound: SocketAddr = "127.0.0.1:8444".parse().unwrap();
        let given = PeerConfig {
            listen: "127.0.0.1:0".into(),
            address: Some("peer.example:9000".into()),
        };
        assert_eq!(
            advertised_address(&given, bound).unwrap(),
            "peer.example:9000"
        );
        let bad = PeerConfig {
            address: Some("no-port".into()),
            ..given.clone()
        };
        assert!(matches!(
            advertised_address(&bad, bound),
            Err(PeerError::BadAddress(_))
        ));
        let none = PeerConfig {
            address: None,
            ..given
        };
        if std::env::var_os("POD_IP").is_none() {
            assert_eq!(advertised_address(&none, bound).unwrap(), "127.0.0.1:8444");
            let any: SocketAddr = "0.0.0.0:8444".parse().unwrap();
            assert!(matches!(
                advertised_address(&none, any),
                Err(PeerError::NoAddress(_))
            ));
        }
        assert_eq!(host_of("[::1]:8444").as_deref(), Some("::1"));
        assert_eq!(host_of(":8444"), None);
    }
}
