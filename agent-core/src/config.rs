//! The settings both agents take (spec `cattle-agent.md` §2–§3), as clap flags mirroring the
//! environment, and their parsed form.
//!
//! The flags exist so `--help` documents every variable; clap's `env` feature fills each flag
//! from its variable. [`CommonArgs::to_strings`] turns the parsed flags back into
//! variable-keyed [`Strings`], and [`CommonConfig::from_strings`] does all the checking, so tests
//! call it with a `HashMap` and never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tunnel_proto::driver::connector::{BackoffConfig, ProxyConfig};

use crate::env::*;

/// Default of `--credentials-dir`: where Rancher mounts the `cattle-credentials-*` Secret.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/cattle-credentials";
/// Default of `--state-dir`: the Go agent's working directory, where `connected` is written.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rancher";
/// Default of `--health-addr`.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9090";
/// Default of `--shutdown-grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default of `--shutdown-idle`: after SIGTERM, a stream of the main tunnel that has moved no
/// bytes for this long is closed rather than given the rest of the grace period.
///
/// The management server pools idle upstream HTTP/1.1 keep-alive connections for up to a
/// minute, each holding a stream open, so without this every drain would last the whole grace.
/// Closing an idle keep-alive connection is safe (HTTP clients retry on a closed idle
/// connection), and an idle interactive session would be cut at the end of the grace anyway.
/// Two seconds is far above the gap between a request and its response bytes on a working
/// connection, and short enough that a drain with only pooled connections ends in about that.
pub const DEFAULT_SHUTDOWN_IDLE: Duration = Duration::from_secs(2);
/// Name of the marker file whose presence makes the agent dial `/v3/connect` without
/// `/register`.
pub const CONNECTED_MARKER: &str = "connected";

/// Flags shared by both agents. Each mirrors an environment variable, which fills it when the
/// flag is not given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Management server URL, e.g. https://rancher.example.com. The pre-flight checks GET
    /// <server>/ping and <server>/v3/settings/cacerts. The tunnel itself goes to the URL in
    /// <credentials-dir>/url when that file exists (as Rancher's cluster agent does), else to
    /// this one. Always required.
    #[arg(long, env = ENV_SERVER, value_name = "URL")]
    pub server: Option<String>,

    /// Registration token sent as X-API-Tunnel-Token, used when <credentials-dir>/token does
    /// not exist (docker-run style agents).
    #[arg(long, env = ENV_TOKEN, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Lower-case hex SHA-256 of the server's CA PEM plus one newline, as in the import
    /// manifest. When set, the agent fetches <server>/v3/settings/cacerts, checks
    /// sha256(value + "\n") against it, and trusts that CA. Empty: no pinning.
    #[arg(long, env = ENV_CA_CHECKSUM, value_name = "SHA256")]
    pub ca_checksum: Option<String>,

    /// Strict CA mode (agent-tls-mode "strict"): start only if the pinned CA (from
    /// --ca-checksum) verifies the server; without a checksum, strict mode refuses to start.
    /// Default false: fall back to the system trust store as Rancher's agents do.
    #[arg(long, env = ENV_STRICT_VERIFY, value_name = "BOOL")]
    pub strict_verify: Option<String>,

    /// Always dial /v3/connect, never /v3/connect/register. Default false: /register is used
    /// until the marker file <state-dir>/connected exists (written on every connect).
    #[arg(long, env = ENV_AGENT_CONNECT, value_name = "BOOL")]
    pub agent_connect: Option<String>,

    /// Directory with the files `url` and `token` (the mounted cattle-credentials Secret).
    /// Default /cattle-credentials.
    #[arg(long, env = ENV_CREDENTIALS_DIR, value_name = "DIR")]
    pub credentials_dir: Option<String>,

    /// Directory of the `connected` marker file. Default /var/lib/rancher.
    #[arg(long, env = ENV_STATE_DIR, value_name = "DIR")]
    pub state_dir: Option<String>,

    /// Listen address of the HTTP health and metrics endpoint (/healthz, /readyz, /metrics).
    /// Default 127.0.0.1:9090; port 0 picks a free port (the address is logged).
    #[arg(long, env = ENV_HEALTH_ADDR, value_name = "ADDR")]
    pub health_addr: Option<String>,

    /// After SIGTERM or SIGINT, how long streams that are still open may run before the agent
    /// exits (new streams are refused at once). Default 30s.
    #[arg(long, env = ENV_SHUTDOWN_GRACE, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// After SIGTERM or SIGINT, streams that have moved no bytes (either way) for this long
    /// are closed, checked every second: idle keep-alive connections the server pools would
    /// otherwise hold the agent for the whole grace. Streams with traffic keep the rest of
    /// --shutdown-grace; set this at or above it to keep idle ones too. Default 2s.
    #[arg(long, env = ENV_SHUTDOWN_IDLE, value_name = "DURATION")]
    pub shutdown_idle: Option<String>,

    /// First reconnect delay; each delay is drawn from [d/2, d) and d doubles up to
    /// --backoff-max. Default 1s. (Rancher's Go agents retry every 10s, without jitter.)
    #[arg(long, env = ENV_BACKOFF_MIN, value_name = "DURATION")]
    pub backoff_min: Option<String>,

    /// Cap of the reconnect delay. Default 30s.
    #[arg(long, env = ENV_BACKOFF_MAX, value_name = "DURATION")]
    pub backoff_max: Option<String>,

    /// Proxy for http:// (HTTP CONNECT). The lower-case http_proxy is read too, as Go does.
    #[arg(long, env = ENV_HTTP_PROXY, value_name = "URL")]
    pub http_proxy: Option<String>,

    /// Proxy for https:// and wss:// (HTTP CONNECT), used by the tunnel, the pre-flight GETs and
    /// the Kubernetes API calls. The lower-case https_proxy is read too.
    #[arg(long, env = ENV_HTTPS_PROXY, value_name = "URL")]
    pub https_proxy: Option<String>,

    /// Comma list of hosts, domains, IPs and CIDRs reached directly. Loopback always is.
    #[arg(long, env = ENV_NO_PROXY, value_name = "LIST")]
    pub no_proxy: Option<String>,

    /// Debug logging (also RANCHER_DEBUG).
    #[arg(long, env = ENV_DEBUG, value_name = "BOOL")]
    pub debug: Option<String>,

    /// Trace logging; wins over --debug (also RANCHER_TRACE).
    #[arg(long, env = ENV_TRACE, value_name = "BOOL")]
    pub trace: Option<String>,
}

impl CommonArgs {
    /// Adds every flag that has a value (from the command line or its variable) to `out`,
    /// keyed by the variable's name.
    pub fn to_strings(&self, out: &mut HashMap<&'static str, String>) {
        let pairs = [
            (ENV_SERVER, &self.server),
            (ENV_TOKEN, &self.token),
            (ENV_CA_CHECKSUM, &self.ca_checksum),
            (ENV_STRICT_VERIFY, &self.strict_verify),
            (ENV_AGENT_CONNECT, &self.agent_connect),
            (ENV_CREDENTIALS_DIR, &self.credentials_dir),
            (ENV_STATE_DIR, &self.state_dir),
            (ENV_HEALTH_ADDR, &self.health_addr),
            (ENV_SHUTDOWN_GRACE, &self.shutdown_grace),
            (ENV_SHUTDOWN_IDLE, &self.shutdown_idle),
            (ENV_BACKOFF_MIN, &self.backoff_min),
            (ENV_BACKOFF_MAX, &self.backoff_max),
            (ENV_HTTP_PROXY, &self.http_proxy),
            (ENV_HTTPS_PROXY, &self.https_proxy),
            (ENV_NO_PROXY, &self.no_proxy),
            (ENV_DEBUG, &self.debug),
            (ENV_TRACE, &self.trace),
        ];
        put_all(out, pairs);
    }

    /// These flags plus an agent's own (`(variable, flag)` pairs) as variable-keyed strings: what
    /// an agent's `Args::to_strings` returns.
    pub fn strings_with<const N: usize>(
        &self,
        agent: [(&'static str, &Option<String>); N],
    ) -> HashMap<&'static str, String> {
        let mut out = HashMap::new();
        self.to_strings(&mut out);
        put_all(&mut out, agent);
        out
    }
}

/// Inserts each value that is set under its variable's name.
fn put_all<'a>(
    out: &mut HashMap<&'static str, String>,
    pairs: impl IntoIterator<Item = (&'static str, &'a Option<String>)>,
) {
    for (name, value) in pairs {
        if let Some(v) = value {
            out.insert(name, v.clone());
        }
    }
}

// === ServerUrl ===

/// The management server's URL, reduced to what the agents use: scheme, host and port. Any path
/// is dropped, as Rancher's agents drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP, IPv6 without brackets.
    pub host: String,
    /// Explicit port, if the URL had one.
    pub port: Option<u16>,
}

impl ServerUrl {
    /// Parses `https://host[:port][/path]`. Only `http` and `https` are accepted.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let uri: http::Uri = raw
            .trim()
            .parse()
            .map_err(|e: http::uri::InvalidUri| format!("not a URL: {e}"))?;
        let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            Some(other) => return Err(format!("scheme {other:?} is not http or https")),
            None => return Err("no scheme; expected https://host[:port]".to_owned()),
        };
        let authority = uri.authority().ok_or("no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported".to_owned());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("no host".to_owned());
        }
        Ok(Self {
            scheme,
            host,
            port: authority.port_u16(),
        })
    }

    /// `host[:port]` with an IPv6 host bracketed.
    pub fn authority(&self) -> String {
        let host = bracket(&self.host);
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }

    /// The port, or the scheme's default.
    pub fn port_or_default(&self) -> u16 {
        self.port
            .unwrap_or(if self.scheme == "https" { 443 } else { 80 })
    }

    /// `scheme://host[:port]`, the root the pre-flight GETs hang off.
    pub fn root(&self) -> String {
        format!("{}://{}", self.scheme, self.authority())
    }

    /// The tunnel URL: always `wss://<host[:port]>/v3/connect`, plus `/register` when asked
    /// (spec §4.1: the scheme is always wss and a path prefix is dropped).
    pub fn tunnel_url(&self, register: bool) -> String {
        let suffix = if register { "/register" } else { "" };
        format!("wss://{}/v3/connect{suffix}", self.authority())
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.root())
    }
}

/// Brackets an IPv6 literal (a host containing `:`), leaves anything else alone.
pub fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

// === CommonConfig ===

/// Log verbosity from `CATTLE_DEBUG`/`CATTLE_TRACE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// The default.
    Info,
    /// `CATTLE_DEBUG`/`RANCHER_DEBUG`.
    Debug,
    /// `CATTLE_TRACE`/`RANCHER_TRACE`.
    Trace,
}

/// The checked settings both agents share.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// `CATTLE_SERVER`, for the pre-flight; the tunnel's server when the credentials file is
    /// absent.
    pub server: ServerUrl,
    /// `CATTLE_TOKEN`, if set.
    pub token: Option<String>,
    /// `CATTLE_CA_CHECKSUM`, normalised to lower case, if set.
    pub ca_checksum: Option<String>,
    /// `STRICT_VERIFY`.
    pub strict_verify: bool,
    /// `CATTLE_AGENT_CONNECT`.
    pub agent_connect: bool,
    /// Where `url` and `token` are read from.
    pub credentials_dir: PathBuf,
    /// Where `connected` is written.
    pub state_dir: PathBuf,
    /// Health and metrics listen address.
    pub health_addr: SocketAddr,
    /// Grace period for open streams after SIGTERM.
    pub shutdown_grace: Duration,
    /// After SIGTERM, streams idle this long are closed ([`DEFAULT_SHUTDOWN_IDLE`]).
    pub shutdown_idle: Duration,
    /// Reconnect pacing.
    pub backoff: BackoffConfig,
    /// Proxies from the environment (Go's rules), with their credentials; the tunnels and
    /// the agent's own HTTP requests both go through them.
    pub proxy: ProxyConfig,
    /// Log level.
    pub log_level: LogLevel,
}

impl CommonConfig {
    /// Parses and checks every shared setting, reporting all problems at once.
    pub fn from_strings(strings: &impl Strings) -> Result<Self, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let server = match strings.get_nonempty(ENV_SERVER) {
            None => {
                errs.push(ConfigError::missing(
                    ENV_SERVER,
                    "set it (or --server) to the management server URL, e.g. https://rancher.example.com",
                ));
                None
            }
            Some(raw) => errs.take(
                ServerUrl::parse(&raw)
                    .map_err(|reason| ConfigError::invalid(ENV_SERVER, raw, reason)),
            ),
        };
        let token = strings.get_nonempty(ENV_TOKEN);
        let ca_checksum = strings
            .get(ENV_CA_CHECKSUM)
            .map(|raw| raw.trim().to_owned())
            .filter(|s| !s.is_empty())
            .and_then(|sum| {
                errs.take(
                    if sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Ok(sum.to_ascii_lowercase())
                    } else {
                        Err(ConfigError::invalid(
                            ENV_CA_CHECKSUM,
                            sum,
                            "not a SHA-256 checksum (64 hex digits)",
                        ))
                    },
                )
            });
        let strict_verify = errs.take(parse_bool(strings, ENV_STRICT_VERIFY, false));
        let agent_connect = errs.take(parse_bool(strings, ENV_AGENT_CONNECT, false));
        let credentials_dir = PathBuf::from(
            strings
                .get_nonempty(ENV_CREDENTIALS_DIR)
                .unwrap_or_else(|| DEFAULT_CREDENTIALS_DIR.to_owned()),
        );
        let state_dir = PathBuf::from(
            strings
                .get_nonempty(ENV_STATE_DIR)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.to_owned()),
        );
        let health_addr = {
            let raw = strings
                .get_nonempty(ENV_HEALTH_ADDR)
                .unwrap_or_else(|| DEFAULT_HEALTH_ADDR.to_owned());
            errs.take(raw.trim().parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid(ENV_HEALTH_ADDR, raw, format!("not an ip:port address: {e}"))
            }))
        };
        let shutdown_grace = errs.take(parse_duration(
            strings,
            ENV_SHUTDOWN_GRACE,
            DEFAULT_SHUTDOWN_GRACE,
        ));
        let shutdown_idle = errs.take(parse_duration(
            strings,
            ENV_SHUTDOWN_IDLE,
            DEFAULT_SHUTDOWN_IDLE,
        ));
        let defaults = BackoffConfig::default();
        let backoff_min = errs.take(parse_duration(
            strings,
            ENV_BACKOFF_MIN,
            defaults.min_delay(),
        ));
        let backoff_max = errs.take(parse_duration(
            strings,
            ENV_BACKOFF_MAX,
            defaults.max_delay(),
        ));
        if let (Some(min), Some(max)) = (backoff_min, backoff_max)
            && (min.is_zero() || max < min)
        {
            errs.push(ConfigError::invalid(
                ENV_BACKOFF_MAX,
                format!("{max:?}"),
                format!("must be at least {ENV_BACKOFF_MIN} ({min:?}), which must be above zero"),
            ));
        }
        let proxy = errs.take(
            ProxyConfig::from_env(&EnvSourceAdapter(strings)).map_err(|e| ConfigError::Other {
                name: "HTTP_PROXY/HTTPS_PROXY".to_owned(),
                reason: e.to_string(),
            }),
        );
        let trace = errs
            .take(parse_bool(strings, ENV_TRACE, false))
            .unwrap_or(false)
            || parse_bool(strings, "RANCHER_TRACE", false).unwrap_or(false);
        let debug = errs
            .take(parse_bool(strings, ENV_DEBUG, false))
            .unwrap_or(false)
            || parse_bool(strings, "RANCHER_DEBUG", false).unwrap_or(false);
        let log_level = if trace {
            LogLevel::Trace
        } else if debug {
            LogLevel::Debug
        } else {
            LogLevel::Info
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let mut backoff = BackoffConfig::default();
        if let (Some(min), Some(max)) = (backoff_min, backoff_max) {
            backoff.set_min_delay(min).set_max_delay(max);
        }
        // Every `None` above pushed an error, so these are all `Some` here.
        match (
            server,
            strict_verify,
            agent_connect,
            health_addr,
            shutdown_grace,
            shutdown_idle,
            proxy,
        ) {
            (
                Some(server),
                Some(strict_verify),
                Some(agent_connect),
                Some(health_addr),
                Some(shutdown_grace),
                Some(shutdown_idle),
                Some(proxy),
            ) => Ok(Self {
                server,
                token,
                ca_checksum,
                strict_verify,
                agent_connect,
                credentials_dir,
                state_dir,
                health_addr,
                shutdown_grace,
                shutdown_idle,
                backoff,
                proxy,
                log_level,
            }),
            _ => Err(errs),
        }
    }

    /// Path of the `connected` marker file.
    pub fn marker_path(&self) -> PathBuf {
        self.state_dir.join(CONNECTED_MARKER)
    }

    /// Whether the next dial should go to `/register`: not when `CATTLE_AGENT_CONNECT=true`,
    /// nor once the marker file exists.
    pub fn register(&self) -> bool {
        !self.agent_connect && !self.marker_path().exists()
    }
}

// === credentials ===

/// Which source wins when both the credentials files and the variables are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsPrecedence {
    /// 2.12+ cluster agent: `<dir>/url` and `<dir>/token` win (the variables are only a
    /// fallback when a file is absent).
    FilesFirst,
    /// ≤ 2.11 node agent: `CATTLE_SERVER`/`CATTLE_TOKEN` win when set.
    EnvFirst,
}

/// Where the tunnel goes and the token it presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The server the tunnel dials.
    pub server: ServerUrl,
    /// The registration token (`X-API-Tunnel-Token`).
    pub token: String,
}

/// Reads `<dir>/url` and `<dir>/token` and merges them with the variables.
///
/// Rancher's agent reads the files verbatim. A trailing newline (as `echo > token` leaves)
/// cannot go into an HTTP header, so trailing whitespace is trimmed here, with a debug log.
pub fn resolve_credentials(
    common: &CommonConfig,
    precedence: CredentialsPrecedence,
) -> Result<Credentials, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let url_path = common.credentials_dir.join("url");
    let token_path = common.credentials_dir.join("token");
    let file_url = errs
        .take(read_optional(&url_path, "credentials url file"))
        .flatten();
    let file_token = errs
        .take(read_optional(&token_path, "credentials token file"))
        .flatten();
    let file_server = file_url.and_then(|raw| {
        errs.take(ServerUrl::parse(&raw).map_err(|reason| {
            ConfigError::file("credentials url file", url_path.display(), reason)
        }))
    });
    let (server, token) = match precedence {
        CredentialsPrecedence::FilesFirst => (
            file_server.unwrap_or_else(|| common.server.clone()),
            file_token.or_else(|| common.token.clone()),
        ),
        CredentialsPrecedence::EnvFirst => (
            // CATTLE_SERVER is required, so it always wins here.
            common.server.clone(),
            common.token.clone().or(file_token),
        ),
    };
    let token = match token {
        Some(t) if !t.is_empty() => Some(t),
        _ => {
            errs.push(ConfigError::missing(
                ENV_TOKEN,
                format!(
                    "no registration token: neither {} nor {ENV_TOKEN} (--token) is set",
                    token_path.display()
                ),
            ));
            None
        }
    };
    if let Some(t) = &token
        && http::HeaderValue::from_str(t).is_err()
    {
        errs.push(ConfigError::invalid(
            "registration token",
            "(redacted)",
            "contains characters that cannot go into an HTTP header",
        ));
    }
    errs.finish(|| Credentials {
        server,
        token: token.unwrap_or_default(),
    })
}

/// Parses the shared settings and resolves the credentials, reporting every problem of both at
/// once. When the shared settings are bad, the token's presence is still checked, so a missing
/// `CATTLE_SERVER` and a missing token show up together.
pub fn load(
    strings: &impl Strings,
    precedence: CredentialsPrecedence,
) -> Result<(CommonConfig, Credentials), ConfigErrors> {
    match CommonConfig::from_strings(strings) {
        Ok(common) => {
            let creds = resolve_credentials(&common, precedence)?;
            Ok((common, creds))
        }
        Err(mut errs) => {
            let dir = PathBuf::from(
                strings
                    .get_nonempty(ENV_CREDENTIALS_DIR)
                    .unwrap_or_else(|| DEFAULT_CREDENTIALS_DIR.to_owned()),
            );
            let token_path = dir.join("token");
            let have_file = matches!(read_optional(&token_path, ""), Ok(Some(t)) if !t.is_empty());
            if !have_file && strings.get_nonempty(ENV_TOKEN).is_none() {
                errs.push(ConfigError::missing(
                    ENV_TOKEN,
                    format!(
                        "no registration token: neither {} nor {ENV_TOKEN} (--token) is set",
                        token_path.display()
                    ),
                ));
            }
            Err(errs)
        }
    }
}

/// Reads a small text file; `Ok(None)` if it does not exist. Trailing whitespace is trimmed.
pub fn read_optional(path: &Path, what: &str) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let trimmed = s.trim_end();
            if trimmed.len() != s.len() {
                tracing::debug!(path = %path.display(), "trimmed trailing whitespace");
            }
            Ok(Some(trimmed.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::file(what, path.display(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn server_urls() {
        let u = ServerUrl::parse("https://rancher.example.com/some/prefix").unwrap();
        assert_eq!(u.root(), "https://rancher.example.com");
        assert_eq!(
            u.tunnel_url(true),
            "wss://rancher.example.com/v3/connect/register"
        );
        let u = ServerUrl::parse("http://[fd00::1]:8443").unwrap();
        assert_eq!(u.host, "fd00::1");
        assert_eq!(u.tunnel_url(false), "wss://[fd00::1]:8443/v3/connect");
        assert!(ServerUrl::parse("rancher.example.com").is_err());
        assert!(ServerUrl::parse("ftp://x").is_err());
    }

    #[test]
    fn every_bad_variable_is_named_at_once() {
        let e = env(&[
            (ENV_CA_CHECKSUM, "abc"),
            (ENV_STRICT_VERIFY, "maybe"),
            (ENV_HEALTH_ADDR, "nowhere"),
            (ENV_SHUTDOWN_GRACE, "forever"),
            (ENV_SHUTDOWN_IDLE, "-1s"),
            (ENV_HTTPS_PROXY, "socks5://p:1080"),
        ]);
        let errs = CommonConfig::from_strings(&e).unwrap_err();
        for name in [
            ENV_SERVER,
            ENV_CA_CHECKSUM,
            ENV_STRICT_VERIFY,
            ENV_HEALTH_ADDR,
            ENV_SHUTDOWN_GRACE,
            ENV_SHUTDOWN_IDLE,
        ] {
            assert!(errs.names(name), "{name} not reported in:\n{errs}");
        }
        assert!(errs.to_string().contains("socks5"), "{errs}");
        assert_eq!(errs.0.len(), 7, "{errs}");
    }

    #[test]
    fn agent_flags_join_the_common_ones() {
        let common = CommonArgs {
            server: Some("https://r.example".to_owned()),
            no_proxy: Some(".svc".to_owned()),
            ..CommonArgs::default()
        };
        let (set, unset) = (Some("node-1".to_owned()), None);
        let strings = common.strings_with([("CATTLE_NODE_NAME", &set), ("CATTLE_ROLE", &unset)]);
        assert_eq!(strings.len(), 3, "{strings:?}");
        assert_eq!(strings[ENV_SERVER], "https://r.example");
        assert_eq!(strings[ENV_NO_PROXY], ".svc");
        assert_eq!(strings["CATTLE_NODE_NAME"], "node-1");
    }

    #[test]
    fn proxy_credentials_come_with_the_proxy() {
        // Upper case empty counts as unset (Go's getEnvAny); the credentials are percent-decoded
        // and ride on the proxy URL that the tunnels and the pre-flight both dial through.
        let e = env(&[
            (ENV_SERVER, "https://r.example"),
            (ENV_HTTPS_PROXY, ""),
            ("https_proxy", "http://us%40er:p%3Ass@proxy:3128"),
            (ENV_HTTP_PROXY, "proxy:3128"),
        ]);
        let c = CommonConfig::from_strings(&e).unwrap();
        let https = c
            .proxy
            .proxy_for(true, "r.example", 443)
            .expect("https proxy");
        assert_eq!((https.host(), https.port()), ("proxy", 3128));
        assert!(https.has_credentials());
        let http = c
            .proxy
            .proxy_for(false, "r.example", 80)
            .expect("http proxy");
        assert!(!http.has_credentials());
    }

    #[test]
    fn defaults() {
        let e = env(&[(ENV_SERVER, "https://r.example")]);
        let c = CommonConfig::from_strings(&e).unwrap();
        assert_eq!(c.health_addr.to_string(), DEFAULT_HEALTH_ADDR);
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(c.shutdown_idle, DEFAULT_SHUTDOWN_IDLE);
        let e = env(&[
            (ENV_SERVER, "https://r.example"),
            (ENV_SHUTDOWN_IDLE, "500ms"),
        ]);
        let c = CommonConfig::from_strings(&e).unwrap();
        assert_eq!(c.shutdown_idle, Duration::from_millis(500));
        assert!(!c.strict_verify && !c.agent_connect);
        assert_eq!(c.credentials_dir, PathBuf::from("/cattle-credentials"));
        assert_eq!(c.marker_path(), PathBuf::from("/var/lib/rancher/connected"));
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.ca_checksum, None);
    }

    #[test]
    fn credentials_files_win_for_the_cluster_agent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("url"), "https://from-file:8443").unwrap();
        std::fs::write(dir.path().join("token"), "file-token\n").unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let mut e: HashMap<&str, String> = HashMap::new();
        e.insert(ENV_SERVER, "https://from-env".into());
        e.insert(ENV_TOKEN, "env-token".into());
        e.insert(ENV_CREDENTIALS_DIR, d);
        let c = CommonConfig::from_strings(&e).unwrap();
        let files = resolve_credentials(&c, CredentialsPrecedence::FilesFirst).unwrap();
        assert_eq!(files.server.authority(), "from-file:8443");
        assert_eq!(files.token, "file-token");
        let envs = resolve_credentials(&c, CredentialsPrecedence::EnvFirst).unwrap();
        assert_eq!(envs.server.authority(), "from-env");
        assert_eq!(envs.token, "env-token");
    }

    #[test]
    fn missing_token_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut e: HashMap<&str, String> = HashMap::new();
        e.insert(ENV_SERVER, "https://x".into());
        e.insert(ENV_CREDENTIALS_DIR, dir.path().to_str().unwrap().into());
        let c = CommonConfig::from_strings(&e).unwrap();
        let errs = resolve_credentials(&c, CredentialsPrecedence::FilesFirst).unwrap_err();
        assert!(errs.names(ENV_TOKEN), "{errs}");
    }
}
