//! Start-up checks before the first dial (spec §3), and the TLS trust they settle on.
//!
//! ```text
//!  GET <server>/ping (insecure, redirects followed) ── not 2xx ──▶ exit 1
//!        │
//!  CATTLE_CA_CHECKSUM set? ── yes ─▶ GET <server>/v3/settings/cacerts (insecure), take .value
//!        │                            empty ▶ exit 1 · not x509 ▶ exit 1
//!        │                            sha256(value + "\n") != checksum ▶ exit 1
//!        │                            GET <tunnel server>/ trusting only that CA
//!        │                              ok ▶ trust: the pinned CA only
//!        │                              failed ▶ STRICT_VERIFY: exit 1; else fall through
//!        no
//!        │  STRICT_VERIFY ▶ exit 1 (no CA to be strict with)
//!  GET <tunnel server>/ with the system store: a certificate error ▶ exit 1 with a hint;
//!  any other error (timeout, refused) is only logged, as Rancher's agent does.
//!  trust: system store, plus the checksum-verified CA if there is one
//! ```
//!
//! `run.sh` does the first two steps with curl; the agent binary does the rest (§3.2). Each
//! GET is bounded by 5 s and, like curl and Go, goes through the environment's proxy.

use std::time::Duration;

use http::StatusCode;
use tunnel_proto::driver::connector::{Trust, ca_checksum, client_config};

use crate::config::{CommonConfig, ServerUrl};
use crate::http::{HttpClient, HttpError, pem_has_certificate};

/// Bound on each pre-flight request (Rancher's agent uses 5 s).
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most redirects followed for `/ping` (`curl -L` follows up to 50).
const MAX_REDIRECTS: usize = 10;

/// What the pre-flight settled.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// How the tunnels verify the server.
    pub trust: Trust,
    /// The CA PEM fetched and verified against `CATTLE_CA_CHECKSUM`, if any.
    pub ca_pem: Option<String>,
    /// Whether that CA alone verified the server (`CATTLE_CACERTS_VALID` of `stv-aggregation`).
    pub cacerts_valid: bool,
}

/// Why the agent must not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    /// `/ping` could not be fetched.
    #[error("{url} is not accessible ({source})")]
    Ping {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: HttpError,
    },
    /// `/ping` answered with a status other than 2xx.
    #[error("{url} is not accessible (HTTP {status})")]
    PingStatus {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// `/v3/settings/cacerts` could not be fetched.
    #[error("fetching {url}: {source}")]
    Cacerts {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: HttpError,
    },
    /// `/v3/settings/cacerts` is not JSON with a string `value`.
    #[error("{url}: HTTP {status}, not a setting with a string `value` ({reason})")]
    CacertsBody {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The JSON error.
        reason: String,
    },
    /// The server has no CA configured although a checksum was given.
    #[error(
        "the value of {url} is empty: there is no CA certificate configured on the server, \
         but CATTLE_CA_CHECKSUM is set"
    )]
    NoCa {
        /// The URL.
        url: String,
    },
    /// The served CA is not a certificate.
    #[error("the value of {url} is not a valid x509 certificate PEM")]
    NotX509 {
        /// The URL.
        url: String,
    },
    /// The served CA does not hash to the checksum.
    #[error(
        "Configured cacerts checksum ({actual}) does not match given --ca-checksum ({expected})"
    )]
    Mismatch {
        /// `CATTLE_CA_CHECKSUM`.
        expected: String,
        /// sha256 of the served CA plus a newline.
        actual: String,
    },
    /// Strict mode without a CA to be strict with.
    #[error(
        "STRICT_VERIFY is true but CATTLE_CA_CHECKSUM is not set, so there is no pinned CA to \
         verify the server with"
    )]
    StrictWithoutCa,
    /// Strict mode and the pinned CA does not verify the server.
    #[error("STRICT_VERIFY is true and the CA from the server does not verify {url}: {source}")]
    StrictFailed {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: HttpError,
    },
    /// The system store does not trust the server.
    #[error(
        "{url}: {source}. The server's certificate chain is not trusted by the system store: \
         check for a missing intermediate, an expired certificate or a name mismatch, or set \
         CATTLE_CA_CHECKSUM to pin the server's CA"
    )]
    Untrusted {
        /// The URL.
        url: String,
        /// The certificate error.
        #[source]
        source: HttpError,
    },
    /// An HTTP client could not be built.
    #[error("building the pre-flight HTTP client: {0}")]
    Client(#[source] HttpError),
}

/// Runs the checks: `/ping` and the CA checksum against `CATTLE_SERVER`, the TLS verification
/// against `tunnel_server` (the server the tunnel dials, usually the same).
pub async fn run(
    common: &CommonConfig,
    tunnel_server: &ServerUrl,
) -> Result<Preflight, PreflightError> {
    let insecure = client(common, &Trust::InsecureSkipVerify)?;
    let root = common.server.root();

    // 1. /ping must answer 2xx, redirects followed.
    let ping = format!("{root}/ping");
    let status = get_following(&insecure, &ping)
        .await
        .map_err(|source| PreflightError::Ping {
            url: ping.clone(),
            source,
        })?;
    if !status.is_success() {
        return Err(PreflightError::PingStatus {
            url: ping,
            status: status.as_u16(),
        });
    }
    tracing::info!(url = %ping, "server is reachable");

    // 2. The CA checksum.
    let ca_pem = match &common.ca_checksum {
        None => None,
        Some(expected) => Some(fetch_ca(&insecure, &root, expected).await?),
    };

    // 3. Which trust verifies the server the tunnel goes to.
    let tunnel_root = tunnel_server.root();
    if tunnel_server.scheme != "https" {
        tracing::warn!(url = %tunnel_root, "the server URL is not https; the tunnel uses wss all the same");
    }
    if let Some(pem) = &ca_pem {
        let pinned = client(
            common,
            &Trust::CaBundle {
                pem: pem.as_bytes().to_vec(),
                with_system_roots: false,
            },
        )?;
        match pinned.get(&tunnel_https(tunnel_server)).await {
            Ok(_) => {
                tracing::info!(url = %tunnel_root, "the CA from the server verifies it; trusting only that CA");
                return Ok(Preflight {
                    trust: Trust::PinnedCa {
                        checksum: ca_checksum(pem),
                        ca_pem: pem.clone(),
                        with_system_roots: false,
                    },
                    ca_pem,
                    cacerts_valid: true,
                });
            }
            Err(source) if common.strict_verify => {
                return Err(PreflightError::StrictFailed {
                    url: tunnel_root,
                    source,
                });
            }
            Err(error) => {
                tracing::warn!(url = %tunnel_root, %error, "the CA from the server does not verify it; falling back to the system store");
            }
        }
    } else if common.strict_verify {
        return Err(PreflightError::StrictWithoutCa);
    }

    match client(common, &Trust::SystemRoots) {
        Ok(system) => match system.get(&tunnel_https(tunnel_server)).await {
            Ok(_) => tracing::info!(url = %tunnel_root, "the system store verifies the server"),
            Err(source) if source.is_certificate_error() => {
                return Err(PreflightError::Untrusted {
                    url: tunnel_root,
                    source,
                });
            }
            // Rancher's agent ignores everything but x509 errors here (timeouts, refusals).
            Err(error) => {
                tracing::warn!(url = %tunnel_root, %error, "could not check the server's certificate; continuing")
            }
        },
        Err(error) => {
            tracing::warn!(%error, "the system trust store is unusable; skipping the system-store check");
        }
    }
    let trust = match &ca_pem {
        // As Go's agent: the system pool plus the verified CA. The connector refuses an empty
        // system store, so on a machine without one only the CA is trusted.
        Some(pem) => Trust::PinnedCa {
            checksum: ca_checksum(pem),
            ca_pem: pem.clone(),
            with_system_roots: client_config(&Trust::SystemRoots).is_ok(),
        },
        None => Trust::SystemRoots,
    };
    Ok(Preflight {
        trust,
        ca_pem,
        cacerts_valid: false,
    })
}

fn tunnel_https(server: &ServerUrl) -> String {
    format!("https://{}/", server.authority())
}

fn client(common: &CommonConfig, trust: &Trust) -> Result<HttpClient, PreflightError> {
    HttpClient::new(trust, common.proxy.clone(), PREFLIGHT_TIMEOUT).map_err(PreflightError::Client)
}

/// GETs `url`, following redirects; returns the final status.
async fn get_following(client: &HttpClient, url: &str) -> Result<StatusCode, HttpError> {
    let mut url = url.to_owned();
    for _ in 0..MAX_REDIRECTS {
        let resp = client.get(&url).await?;
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok());
        match location {
            Some(loc) if resp.status().is_redirection() => {
                url = resolve(&url, loc);
                tracing::debug!(%url, "following redirect");
            }
            _ => return Ok(resp.status()),
        }
    }
    Err(HttpError::Http(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    if location.starts_with('/') {
        format!("{}{location}", &base[..root_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= root_end)
            .unwrap_or(root_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

async fn fetch_ca(
    insecure: &HttpClient,
    root: &str,
    expected: &str,
) -> Result<String, PreflightError> {
    let url = format!("{root}/v3/settings/cacerts");
    let resp = insecure
        .get(&url)
        .await
        .map_err(|source| PreflightError::Cacerts {
            url: url.clone(),
            source,
        })?;
    let status = resp.status().as_u16();
    #[derive(serde::Deserialize)]
    struct Setting {
        value: Option<String>,
    }
    let setting: Setting =
        serde_json::from_slice(resp.body()).map_err(|e| PreflightError::CacertsBody {
            url: url.clone(),
            status,
            reason: e.to_string(),
        })?;
    let value = setting.value.unwrap_or_default();
    if value.is_empty() {
        return Err(PreflightError::NoCa { url });
    }
    if !pem_has_certificate(value.as_bytes()) {
        return Err(PreflightError::NotX509 { url });
    }
    // jq -r prints the value plus one newline; that is what run.sh hashes.
    let actual = ca_checksum(&value);
    if actual != expected {
        return Err(PreflightError::Mismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    tracing::info!(checksum = %actual, "the server's CA matches CATTLE_CA_CHECKSUM");
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn redirects_resolve() {
        assert_eq!(resolve("https://a/ping", "https://b/x"), "https://b/x");
        assert_eq!(resolve("https://a:1/ping", "/pong"), "https://a:1/pong");
        assert_eq!(resolve("https://a/v/ping", "pong"), "https://a/v/pong");
        assert_eq!(resolve("https://a", "pong"), "https://a/pong");
    }
}
