//! Fixtures shared by the integration tests of several workspace crates (tunnel-proto's
//! connector tests, agent-core's pre-flight tests): a real tinyproxy on 127.0.0.1, started with
//! an OS-chosen port and an optional `BasicAuth`, and killed on drop.
//!
//! A crate of its own because a `tests/` module cannot be shared across crates otherwise; it
//! depends on nothing but std, so it costs its users nothing. Test-only: no crate depends on it
//! outside `[dev-dependencies]`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real tinyproxy on 127.0.0.1, killed on drop.
pub struct Tinyproxy {
    /// The loopback port it listens on.
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

fn find_tinyproxy() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("tinyproxy"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push("/usr/bin/tinyproxy".into());
    candidates.push("/usr/sbin/tinyproxy".into());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tinyproxy is not installed, and the proxy tests need a real proxy: \
                 run `apt-get install -y tinyproxy` (CI installs it)"
            )
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// An unused loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Tinyproxy {
    /// Starts tinyproxy with `BasicAuth user pass` if `auth` is given, and waits until it
    /// accepts connections.
    pub fn start(auth: Option<(&str, &str)>) -> Self {
        let bin = find_tinyproxy();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "test-support-tinyproxy-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // No ConnectPort line: tinyproxy then allows CONNECT to every port.
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nLogLevel Info\n\
             Allow 127.0.0.1\nDisableViaHeader Yes\n"
        );
        if is_root() {
            // tinyproxy drops root privileges to this user.
            conf.push_str("User nobody\nGroup nogroup\n");
        }
        if let Some((user, pass)) = auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        let conf_path = dir.join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).expect("write tinyproxy.conf");
        let log = std::fs::File::create(dir.join("tinyproxy.log")).expect("log file");
        let log2 = log.try_clone().expect("log file");
        let child = Command::new(&bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut proxy = Self { port, child, dir };
        proxy.wait_ready();
        proxy
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tinyproxy exited early ({status}); log:\n{}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {} in time; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The proxy URL, with credentials if given.
    pub fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// What tinyproxy has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// How many CONNECT tunnels tinyproxy has established so far.
    pub fn tunnels(&self) -> usize {
        self.log().matches("Established connection to host").count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
