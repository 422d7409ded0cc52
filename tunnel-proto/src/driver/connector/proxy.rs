//! Outbound HTTP proxies: `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, and HTTP `CONNECT`.
//!
//! Agents in locked-down clusters reach the management server only through a corporate proxy,
//! configured the way every Go program reads it. Go agents dial the websocket through gorilla,
//! which takes the proxy from `net/http.ProxyFromEnvironment` and always tunnels with
//! `CONNECT`, for `ws://` as well as `wss://`. This module follows Go's
//! `golang.org/x/net/http/httpproxy` rules, so one set of agent environment variables behaves the
//! same for a Go and a Rust agent:
//!
//! * each variable is read upper case first, then lower case; an empty value counts as unset, so
//!   `HTTPS_PROXY=""` lets `https_proxy` through (Go's `getEnvAny`);
//! * `HTTPS_PROXY` applies to `wss://`, `HTTP_PROXY` to `ws://`;
//! * a proxy value without `scheme://` is taken as `http://`; only `http://` proxies are
//!   supported here (Go also knows `https://` and `socks5://`; we refuse them with a typed error
//!   rather than silently connecting directly);
//! * `NO_PROXY` is a comma list of `*`, IPs, CIDRs, `ip:port`, domains (`example.com` matches
//!   itself and its subdomains; `.example.com` and `*.example.com` only subdomains), each
//!   optionally with `:port`; case-insensitive;
//! * like Go, `localhost` and loopback IPs are never proxied. Unlike Go this can be turned off
//!   ([`ProxyConfig::set_bypass_loopback`]) because tests can only run proxies on loopback;
//! * Go's CGI guard (ignore `HTTP_PROXY` when `REQUEST_METHOD` is set) is reproduced.
//!
//! Environment reading goes through [`EnvSource`] so tests pass a `HashMap` instead of mutating
//! the process environment.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::ConnectError;
use super::http1;

/// `HTTP_PROXY`: proxy for `ws://` URLs.
pub const ENV_HTTP_PROXY: &str = "HTTP_PROXY";
/// `HTTPS_PROXY`: proxy for `wss://` URLs.
pub const ENV_HTTPS_PROXY: &str = "HTTPS_PROXY";
/// `NO_PROXY`: hosts reached directly.
pub const ENV_NO_PROXY: &str = "NO_PROXY";
/// `REQUEST_METHOD`: when set, the process is a CGI script and `HTTP_PROXY` may have come from a
/// request header ("httpoxy"), so it is ignored, as Go does.
pub const ENV_REQUEST_METHOD: &str = "REQUEST_METHOD";

/// A source of environment variables.
pub trait EnvSource {
    /// The value of `name`, or `None` if unset.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: BuildHasher> EnvSource for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl<S: BuildHasher> EnvSource for HashMap<&str, &str, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

/// Go's `getEnvAny(UPPER, lower)`: the first non-empty of the two.
fn env_any(env: &impl EnvSource, upper: &str) -> Option<String> {
    env.var(upper)
        .filter(|v| !v.is_empty())
        .or_else(|| env.var(&upper.to_ascii_lowercase()))
        .filter(|v| !v.is_empty())
}

/// Why a proxy setting could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyConfigError {
    /// The value does not parse as `http://[user[:pass]@]host[:port]`.
    #[error("invalid proxy URL {url:?}: {reason}")]
    InvalidUrl {
        /// The value, with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than `http`.
    #[error("unsupported proxy scheme {scheme:?} in {url:?}: only http:// proxies are supported")]
    UnsupportedScheme {
        /// The scheme found.
        scheme: String,
        /// The value, with any password replaced by `***`.
        url: String,
    },
}

// === impl ProxyUrl ===

/// An `http://` proxy, with optional basic-auth credentials from its URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
}

impl ProxyUrl {
    /// Parses `[http://][user[:pass]@]host[:port][/]`, percent-decoding user and password.
    /// The port defaults to 80.
    pub fn parse(raw: &str) -> Result<Self, ProxyConfigError> {
        let raw = raw.trim();
        let redacted = redact(raw);
        let invalid = |reason: &str| ProxyConfigError::InvalidUrl {
            url: redacted.clone(),
            reason: reason.to_owned(),
        };
        let rest = match raw.split_once("://") {
            Some((scheme, rest)) => {
                if !scheme.eq_ignore_ascii_case("http") {
                    return Err(ProxyConfigError::UnsupportedScheme {
                        scheme: scheme.to_owned(),
                        url: redacted,
                    });
                }
                rest
            }
            None => raw,
        };
        // Drop a path (Go ignores it for proxies); the authority ends at the first '/'.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                Some((
                    percent_decode(user).ok_or_else(|| invalid("bad percent-encoding"))?,
                    percent_decode(pass).ok_or_else(|| invalid("bad percent-encoding"))?,
                ))
            }
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| invalid("bad host:port"))?;
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port: port.unwrap_or(80),
            credentials,
        })
    }

    /// The proxy's host name or IP (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the URL carried a user name (and so a `Proxy-Authorization` header is sent).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `host:port` with IPv6 bracketed, for dialing and messages.
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl fmt::Display for ProxyUrl {
    /// `http://host:port`, never the credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Replaces the password of a URL-ish string by `***` for messages.
fn redact(raw: &str) -> String {
    let (prefix, rest) = match raw.find("://") {
        Some(i) => raw.split_at(i + 3),
        None => ("", raw),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{prefix}{user}:***{}", &rest[at..])
        }
        None => raw.to_owned(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`. Returns `None` for a malformed port.
/// A bare IPv6 address without brackets is returned whole as the host.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(p.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: an IPv6 literal without a port.
        Some((host, _)) if host.contains(':') => Some((s, None)),
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// `host:port`, bracketing IPv6 literals.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// === impl NoProxy ===

/// A parsed `NO_PROXY` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    entries: Vec<NoProxyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxyEntry {
    Cidr {
        net: IpAddr,
        prefix: u8,
    },
    Ip {
        ip: IpAddr,
        port: Option<u16>,
    },
    // `suffix` starts with '.'; `match_host` also matches the bare domain (entry had no dot).
    Domain {
        suffix: String,
        port: Option<u16>,
        match_host: bool,
    },
}

impl NoProxy {
    /// Parses a comma list the way Go's `httpproxy` does. Malformed entries are skipped, as in
    /// Go.
    pub fn parse(list: &str) -> Self {
        let mut out = Self::default();
        for raw in list.split(',') {
            let entry = raw.trim().to_ascii_lowercase();
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                return Self {
                    all: true,
                    entries: Vec::new(),
                };
            }
            if let Some((net, prefix)) = parse_cidr(&entry) {
                out.entries.push(NoProxyEntry::Cidr { net, prefix });
                continue;
            }
            // `ip:port`, `[v6]:port`, `domain:port`, or no port at all.
            let (host, port) = match split_host_port(&entry) {
                Some((h, p)) => (h.to_owned(), p),
                None => continue,
            };
            if host.is_empty() {
                continue;
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                out.entries.push(NoProxyEntry::Ip { ip, port });
                continue;
            }
            let host = host
                .strip_prefix("*.")
                .map_or(host.clone(), |h| format!(".{h}"));
            let (suffix, match_host) = match host.strip_prefix('.') {
                Some(_) => (host, false),
                None => (format!(".{host}"), true),
            };
            out.entries.push(NoProxyEntry::Domain {
                suffix,
                port,
                match_host,
            });
        }
        out
    }

    /// Whether `host` (a name or an IP literal, IPv6 without brackets) on `port` bypasses the
    /// proxy.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim().to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|entry| match (entry, ip) {
            (NoProxyEntry::Cidr { net, prefix }, Some(ip)) => cidr_contains(*net, *prefix, ip),
            (NoProxyEntry::Ip { ip: want, port: p }, Some(ip)) => {
                *want == ip && p.is_none_or(|p| p == port)
            }
            (
                NoProxyEntry::Domain {
                    suffix,
                    port: p,
                    match_host,
                },
                None,
            ) => {
                (host.ends_with(suffix.as_str()) || (*match_host && host == &suffix[1..]))
                    && p.is_none_or(|p| p == port)
            }
            _ => false,
        })
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

fn cidr_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    // Go's net.IPNet.Contains treats an IPv4-mapped IPv6 address as IPv4.
    let canon = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    };
    match (canon(net), canon(ip)) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

// === impl ProxyConfig ===

/// Which proxy, if any, the connector goes through.
///
/// Default: no proxy at all (not the environment; call [`ProxyConfig::from_env`] for that, so a
/// library never picks up a proxy the application did not ask for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    http: Option<ProxyUrl>,
    https: Option<ProxyUrl>,
    no_proxy: NoProxy,
    bypass_loopback: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self::none()
    }
}

impl ProxyConfig {
    /// No proxy: every connection is direct.
    pub fn none() -> Self {
        Self {
            http: None,
            https: None,
            no_proxy: NoProxy::default(),
            bypass_loopback: true,
        }
    }

    /// Reads `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY` (upper case first, then lower case, as Go)
    /// from `env`. An unparsable proxy value is an error rather than a silent direct
    /// connection.
    pub fn from_env(env: &impl EnvSource) -> Result<Self, ProxyConfigError> {
        let cgi = env.var(ENV_REQUEST_METHOD).is_some_and(|v| !v.is_empty());
        let http = match env_any(env, ENV_HTTP_PROXY) {
            Some(_) if cgi => {
                tracing::warn!("ignoring HTTP_PROXY in a CGI environment (httpoxy)");
                None
            }
            Some(v) => Some(ProxyUrl::parse(&v)?),
            None => None,
        };
        let https = env_any(env, ENV_HTTPS_PROXY)
            .map(|v| ProxyUrl::parse(&v))
            .transpose()?;
        let no_proxy = NoProxy::parse(&env_any(env, ENV_NO_PROXY).unwrap_or_default());
        Ok(Self {
            http,
            https,
            no_proxy,
            bypass_loopback: true,
        })
    }

    /// Proxy for `ws://`. Default: none.
    pub fn set_http_proxy(&mut self, proxy: Option<ProxyUrl>) -> &mut Self {
        self.http = proxy;
        self
    }

    /// Proxy for `wss://`. Default: none.
    pub fn set_https_proxy(&mut self, proxy: Option<ProxyUrl>) -> &mut Self {
        self.https = proxy;
        self
    }

    /// Hosts reached directly. Default: empty.
    pub fn set_no_proxy(&mut self, no_proxy: NoProxy) -> &mut Self {
        self.no_proxy = no_proxy;
        self
    }

    /// Whether `localhost` and loopback IPs always bypass the proxy. Default `true`, as in Go;
    /// `false` is for tests whose proxy and server both live on loopback.
    pub fn set_bypass_loopback(&mut self, bypass: bool) -> &mut Self {
        self.bypass_loopback = bypass;
        self
    }

    /// The proxy to use for a `ws(s)://host:port` URL (`tls` = `wss`), or `None` to go direct.
    pub fn proxy_for(&self, tls: bool, host: &str, port: u16) -> Option<&ProxyUrl> {
        let proxy = if tls { &self.https } else { &self.http }.as_ref()?;
        if self.bypass_loopback {
            let lower = host.to_ascii_lowercase();
            let loopback = lower == "localhost"
                || lower
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || is_mapped_loopback(ip));
            if loopback {
                return None;
            }
        }
        if self.no_proxy.matches(host, port) {
            return None;
        }
        Some(proxy)
    }
}

fn is_mapped_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
}

// === CONNECT ===

/// Asks `proxy` (already connected as `io`) to open a tunnel to `target` (`host:port`, IPv6
/// bracketed), sending `Proxy-Authorization: Basic …` when the proxy URL carried credentials.
///
/// On success `io` is the tunnel: nothing after the proxy's `200` head has been read, and a
/// proxy that sends bytes after it is refused ([`ConnectError::ProxyProtocol`]), since only the
/// target may speak next. A non-200 answer is [`ConnectError::ProxyRefused`] with up to
/// `max_body` bytes of its body (tinyproxy and squid explain a 403 or 407 there); a broken
/// conversation is [`ConnectError::ProxyIo`].
///
/// The caller bounds the whole exchange (the connector with its handshake timeout);
/// `deadline` is that same instant, used to stop reading a refusal's body early rather than
/// lose its status. Most callers want [`dial_tcp`](super::dial_tcp), which also picks the proxy.
pub async fn connect_tunnel<S>(
    io: &mut S,
    proxy: &ProxyUrl,
    target: &str,
    max_body: usize,
    deadline: Instant,
) -> Result<(), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = &proxy.credentials {
        let token = data_encoding::BASE64.encode(format!("{user}:{pass}").as_bytes());
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    let proxy_io = |source| ConnectError::ProxyIo {
        proxy: proxy.to_string(),
        source,
    };
    io.write_all(req.as_bytes()).await.map_err(proxy_io)?;
    io.flush().await.map_err(proxy_io)?;
    let head = http1::read_head(io).await.map_err(proxy_io)?;
    if head.status == 200 {
        if !head.leftover.is_empty() {
            // The proxy spoke before the server could; nothing sane can follow.
            return Err(ConnectError::ProxyProtocol {
                proxy: proxy.to_string(),
                reason: "unexpected data after the CONNECT response".to_owned(),
            });
        }
        return Ok(());
    }
    // A CONNECT refusal's body is informative (tinyproxy and squid explain 403/407 there).
    let body = http1::read_body(io, &head, max_body, Some(deadline)).await;
    Err(ConnectError::ProxyRefused {
        proxy: proxy.to_string(),
        status: head.status,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn upper_case_wins_and_empty_is_unset() {
        let cfg = ProxyConfig::from_env(&env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("HTTP_PROXY", ""),
            ("http_proxy", "lower-http:3"),
        ]))
        .unwrap();
        assert_eq!(
            cfg.proxy_for(true, "a.example", 443).unwrap().host(),
            "upper"
        );
        let http = cfg.proxy_for(false, "a.example", 80).unwrap();
        assert_eq!((http.host(), http.port()), ("lower-http", 3));
    }

    #[test]
    fn cgi_ignores_http_proxy() {
        let cfg = ProxyConfig::from_env(&env(&[
            ("HTTP_PROXY", "http://p:1"),
            ("REQUEST_METHOD", "GET"),
        ]))
        .unwrap();
        assert_eq!(cfg.proxy_for(false, "a.example", 80), None);
    }

    #[test]
    fn proxy_url_forms() {
        let p = ProxyUrl::parse("http://us%40er:p%3Ass@proxy.corp:3128/").unwrap();
        assert_eq!(p.host(), "proxy.corp");
        assert_eq!(p.port(), 3128);
        assert_eq!(p.credentials, Some(("us@er".to_owned(), "p:ss".to_owned())));
        assert_eq!(p.to_string(), "http://proxy.corp:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        let p = ProxyUrl::parse("[::1]:8080").unwrap();
        assert_eq!((p.host(), p.port()), ("::1", 8080));
        assert_eq!(p.authority(), "[::1]:8080");
        assert_eq!(ProxyUrl::parse("proxy").unwrap().port(), 80);
        assert!(matches!(
            ProxyUrl::parse("socks5://u:secret@p:1"),
            Err(ProxyConfigError::UnsupportedScheme { url, .. }) if !url.contains("secret")
        ));
        assert!(ProxyUrl::parse("http://p:notaport").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let np = NoProxy::parse(
            " Example.com, .sub.org,*.star.net, 10.0.0.0/8, 192.168.1.1, 172.16.0.5:8443, \
             [fd00::1]:443, fd00::/16, internal:9000, ,",
        );
        // domain: itself and subdomains
        assert!(np.matches("example.com", 443));
        assert!(np.matches("api.EXAMPLE.com", 443));
        assert!(!np.matches("notexample.com", 443));
        // leading dot and *.: subdomains only
        assert!(np.matches("a.sub.org", 1));
        assert!(!np.matches("sub.org", 1));
        assert!(np.matches("a.star.net", 1));
        assert!(!np.matches("star.net", 1));
        // CIDR and IPs
        assert!(np.matches("10.1.2.3", 1));
        assert!(!np.matches("11.1.2.3", 1));
        assert!(np.matches("192.168.1.1", 5));
        assert!(np.matches("172.16.0.5", 8443));
        assert!(!np.matches("172.16.0.5", 443));
        assert!(np.matches("fd00::1", 443));
        assert!(np.matches("fd00::abcd", 1));
        // host:port
        assert!(np.matches("internal", 9000));
        assert!(!np.matches("internal", 9001));
        // an IP is not matched by a domain rule and vice versa
        assert!(!NoProxy::parse("1.2.3.4").matches("host.1.2.3.4", 1));
        assert!(NoProxy::parse("*").matches("anything", 1));
        assert!(!NoProxy::parse("").matches("anything", 1));
    }

    #[test]
    fn loopback_bypass_is_default_and_switchable() {
        let mut cfg = ProxyConfig::none();
        cfg.set_https_proxy(Some(ProxyUrl::parse("p:1").unwrap()));
        assert_eq!(cfg.proxy_for(true, "127.0.0.1", 443), None);
        assert_eq!(cfg.proxy_for(true, "LOCALHOST", 443), None);
        assert_eq!(cfg.proxy_for(true, "::1", 443), None);
        assert!(cfg.proxy_for(true, "example.com", 443).is_some());
        assert_eq!(cfg.proxy_for(false, "example.com", 80), None);
        cfg.set_bypass_loopback(false);
        assert!(cfg.proxy_for(true, "127.0.0.1", 443).is_some());
        cfg.set_no_proxy(NoProxy::parse("127.0.0.0/8"));
        assert_eq!(cfg.proxy_for(true, "127.0.0.1", 443), None);
    }

    /// A proxy on the far end of a pipe: reads one request head, answers `reply`, returns the
    /// head.
    async fn scripted_proxy(mut io: tokio::io::DuplexStream, reply: &'static [u8]) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = io.read(&mut buf).await.expect("read");
            assert!(n > 0, "client closed early");
            head.extend_from_slice(&buf[..n]);
        }
        io.write_all(reply).await.expect("write");
        String::from_utf8(head).expect("utf-8 head")
    }

    #[tokio::test]
    async fn connect_sends_credentials_and_keeps_the_refusal() {
        let proxy = ProxyUrl::parse("http://us%40er:p%3Ass@proxy:3128").unwrap();
        let (mut client, far) = tokio::io::duplex(4096);
        let far = tokio::spawn(scripted_proxy(
            far,
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 6\r\n\r\ndenied",
        ));
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let err = connect_tunnel(&mut client, &proxy, "[fd00::1]:443", 1024, deadline)
            .await
            .unwrap_err();
        let head = far.await.unwrap();
        assert!(
            head.starts_with("CONNECT [fd00::1]:443 HTTP/1.1\r\nHost: [fd00::1]:443\r\n"),
            "{head}"
        );
        let token = data_encoding::BASE64.encode(b"us@er:p:ss");
        assert!(
            head.contains(&format!("Proxy-Authorization: Basic {token}\r\n")),
            "{head}"
        );
        assert!(
            matches!(&err, ConnectError::ProxyRefused { status: 407, body, proxy }
                if body == "denied" && proxy == "http://proxy:3128"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn connect_accepts_a_clean_200_only() {
        let proxy = ProxyUrl::parse("proxy:3128").unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (mut client, far) = tokio::io::duplex(4096);
        let far = tokio::spawn(scripted_proxy(
            far,
            b"HTTP/1.1 200 Connection established\r\n\r\n",
        ));
        connect_tunnel(&mut client, &proxy, "a.example:443", 1024, deadline)
            .await
            .expect("tunnel");
        assert!(!far.await.unwrap().contains("Proxy-Authorization"));

        let (mut client, far) = tokio::io::duplex(4096);
        let _far = tokio::spawn(scripted_proxy(far, b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 oops"));
        let err = connect_tunnel(&mut client, &proxy, "a.example:443", 1024, deadline)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::ProxyProtocol { .. }), "{err:?}");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("http://u:pw@h:1/x"), "http://u:***@h:1/x");
        assert_eq!(redact("u:pw@h:1"), "u:***@h:1");
        assert_eq!(redact("http://h:1"), "http://h:1");
    }
}
