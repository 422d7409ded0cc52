//! The context file: named servers with their admin token and CA, and the current one, as
//! kubectl's kubeconfig holds clusters.
//!
//! Where it is: `$TUNNEL_SERVER_CONFIG`, else `$XDG_CONFIG_HOME/tunnel-server/config`, else
//! `~/.config/tunnel-server/config`. It is JSON (which YAML readers accept too), written
//! whole to a temporary file of mode 0600 that then replaces it, so a reader never sees half
//! a file and the token is never readable by others, not even for a moment.
//!
//! ```json
//! {
//!   "apiVersion": "tunnel-server/v1",
//!   "currentContext": "prod",
//!   "contexts": [
//!     { "name": "prod", "server": "https://mgmt.example:8443", "user": "root",
//!       "token": "token-xxxxx:secret", "certificateAuthorityData": "-----BEGIN CERTIFICATE-----\n…" }
//!   ]
//! }
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `apiVersion` of the files this program writes.
pub(crate) const API_VERSION: &str = "tunnel-server/v1";

/// Environment variable naming the context file.
pub(crate) const ENV_CONFIG: &str = "TUNNEL_SERVER_CONFIG";

/// Why the context file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContextError {
    /// Neither `$TUNNEL_SERVER_CONFIG`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
    #[error("no place for the context file: set {ENV_CONFIG} or HOME")]
    NoPath,
    /// Reading, writing or renaming failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a context file.
    #[error("{} is not a valid context file", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A context name that the file does not hold.
    #[error("no context {name:?} in {} (see `tunnel-server context list`)", path.display())]
    NoSuchContext {
        /// The name asked for.
        name: String,
        /// The file.
        path: PathBuf,
    },
}

/// One server the CLI can talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Context {
    /// Unique name in the file.
    pub(crate) name: String,
    /// Base URL, `https://host[:port]` (no trailing slash).
    pub(crate) server: String,
    /// The admin user the token belongs to, as the server named it at login (display only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    /// Bearer token, `token-xxxxx:secret`.
    pub(crate) token: String,
    /// PEM of the CA(s) the server's certificate must chain to; absent: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) certificate_authority_data: Option<String>,
    /// Believe any certificate (explicit opt-in at login).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) insecure_skip_tls_verify: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ContextFile {
    /// [`API_VERSION`].
    #[serde(default)]
    pub(crate) api_version: String,
    /// The context admin commands use without `--context`; none: they open the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    /// Every context, in the order they were first added.
    #[serde(default)]
    pub(crate) contexts: Vec<Context>,
}

/// The context file's path from the environment (`get` reads a variable; a map in tests).
pub(crate) fn default_path(get: impl Fn(&str) -> Option<String>) -> Result<PathBuf, ContextError> {
    let set = |name: &str| get(name).filter(|v| !v.is_empty());
    if let Some(path) = set(ENV_CONFIG) {
        return Ok(PathBuf::from(path));
    }
    let base = match (set("XDG_CONFIG_HOME"), set("HOME")) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => Path::new(&home).join(".config"),
        (None, None) => return Err(ContextError::NoPath),
    };
    Ok(base.join("tunnel-server").join("config"))
}

/// [`default_path`] of the process environment.
pub(crate) fn env_path() -> Result<PathBuf, ContextError> {
    default_path(|name| std::env::var(name).ok())
}

impl ContextFile {
    /// Parses a file's text.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, ContextError> {
        serde_json::from_str(text).map_err(|source| ContextError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads `path`; `None` when there is no such file.
    pub(crate) fn load(path: &Path) -> Result<Option<Self>, ContextError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ContextError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the file to `path` (mode 0600, its directory created with mode 0700), replacing
    /// it atomically.
    pub(crate) fn save(&self, path: &Path) -> Result<(), ContextError> {
        let io = |what: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| ContextError::Io {
                what,
                path: p,
                source,
            }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating", dir))?;
        }
        let mut text = serde_json::to_string_pretty(self).expect("a context file serializes");
        text.push('\n');
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "config".to_owned()),
            std::process::id()
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode above only applies to a new file; a stale one keeps its own.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", &tmp)(source));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("replacing", path)(e)
        })
    }

    /// The context named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// Adds `context`, or replaces the one of the same name in place.
    pub(crate) fn upsert(&mut self, context: Context) {
        match self.contexts.iter_mut().find(|c| c.name == context.name) {
            Some(slot) => *slot = context,
            None => self.contexts.push(context),
        }
    }

    /// Makes `name` the current context.
    pub(crate) fn use_context(&mut self, name: &str, path: &Path) -> Result<(), ContextError> {
        if self.get(name).is_none() {
            return Err(no_such(name, path));
        }
        self.current_context = Some(name.to_owned());
        Ok(())
    }

    /// Removes `name`; returns whether it was the current context (which is then unset).
    pub(crate) fn remove(&mut self, name: &str, path: &Path) -> Result<bool, ContextError> {
        let before = self.contexts.len();
        self.contexts.retain(|c| c.name != name);
        if self.contexts.len() == before {
            return Err(no_such(name, path));
        }
        let was_current = self.current_context.as_deref() == Some(name);
        if was_current {
            self.current_context = None;
        }
        Ok(was_current)
    }
}

fn no_such(name: &str, path: &Path) -> ContextError {
    ContextError::NoSuchContext {
        name: name.to_owned(),
        path: path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(name: &str) -> Context {
        Context {
            name: name.to_owned(),
            server: format!("https://{name}.example:8443"),
            user: Some("root".to_owned()),
            token: format!("token-{name}:secret"),
            certificate_authority_data: None,
            insecure_skip_tls_verify: false,
        }
    }

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir()
            .join(format!("tunnel-server-ctx-{tag}-{}", std::process::id()))
            .join("sub")
            .join("config")
    }

    #[test]
    fn path_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            default_path(env(&[
                ("TUNNEL_SERVER_CONFIG", "/x/c"),
                ("XDG_CONFIG_HOME", "/xdg"),
                ("HOME", "/h")
            ]))
            .unwrap(),
            PathBuf::from("/x/c")
        );
        assert_eq!(
            default_path(env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/xdg/tunnel-server/config")
        );
        assert_eq!(
            default_path(env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.config/tunnel-server/config")
        );
        assert!(matches!(default_path(env(&[])), Err(ContextError::NoPath)));
    }

    #[test]
    fn parses_and_rejects() {
        let path = Path::new("/c");
        let text = r#"{"apiVersion":"tunnel-server/v1","currentContext":"a",
            "contexts":[{"name":"a","server":"https://a","token":"t","insecureSkipTlsVerify":true}]}"#;
        let file = ContextFile::parse(text, path).unwrap();
        assert_eq!(file.current_context.as_deref(), Some("a"));
        let a = file.get("a").unwrap();
        assert!(a.insecure_skip_tls_verify);
        assert_eq!(a.certificate_authority_data, None);
        assert_eq!(a.user, None);
        // Empty object: no contexts, no current one.
        assert_eq!(
            ContextFile::parse("{}", path).unwrap(),
            ContextFile::default()
        );
        // A misspelt key is an error, not a silently ignored setting.
        let err = ContextFile::parse(r#"{"curentContext":"a"}"#, path).unwrap_err();
        assert!(
            err.to_string().contains("/c is not a valid context file"),
            "{err}"
        );
        assert!(ContextFile::parse("not json", path).is_err());
    }

    #[test]
    fn writes_mode_0600_and_reads_back() {
        let path = temp_path("write");
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
        assert_eq!(ContextFile::load(&path).unwrap(), None);
        let mut file = ContextFile {
            api_version: API_VERSION.to_owned(),
            ..ContextFile::default()
        };
        let mut a = ctx("a");
        a.certificate_authority_data = Some("-----BEGIN CERTIFICATE-----\nx\n".to_owned());
        file.upsert(a);
        file.use_context("a", &path).unwrap();
        file.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(ContextFile::load(&path).unwrap(), Some(file.clone()));

        // An existing file loosened by hand is tightened on the next write.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        file.upsert(ctx("b"));
        file.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = ContextFile::load(&path).unwrap().unwrap();
        assert_eq!(back.contexts.len(), 2);
        // Nothing left behind but the file.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config"]);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn switches_replaces_and_removes() {
        let path = Path::new("/c");
        let mut file = ContextFile::default();
        file.upsert(ctx("a"));
        file.upsert(ctx("b"));
        file.use_context("b", path).unwrap();
        assert_eq!(file.current_context.as_deref(), Some("b"));
        let err = file.use_context("nope", path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no context \"nope\" in /c (see `tunnel-server context list`)"
        );
        assert_eq!(file.current_context.as_deref(), Some("b"));

        // Same name: replaced where it was.
        let mut b2 = ctx("b");
        b2.token = "token-new:secret".to_owned();
        file.upsert(b2);
        let names: Vec<&str> = file.contexts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(file.get("b").unwrap().token, "token-new:secret");

        assert!(!file.remove("a", path).unwrap());
        assert_eq!(file.current_context.as_deref(), Some("b"));
        assert!(file.remove("b", path).unwrap());
        assert_eq!(file.current_context, None);
        assert!(file.remove("b", path).is_err());
    }
}
