//! Helpers for running the Go interop peer (`tests/interop/gopeer`, built on the real
//! `github.com/rancher/remotedialer`) from Rust tests and benchmarks, and the data-transfer
//! protocol both sides of an interop test speak through the tunnel.
//!
//! * [`gopeer`] builds the peer once per process with `tests/interop/build.sh` and panics with
//!   a clear message if that fails (no Go toolchain): interop tests fail, they never skip.
//! * [`GoProcess`] runs one `gopeer` subcommand: stdout announcements (one JSON object per line)
//!   are collected, stderr goes to a log file under `CARGO_TARGET_TMPDIR`, and the process is
//!   SIGKILLed on drop (and, through `setpriv --pdeathsig`, when the thread that started it
//!   ends, so an aborted test leaves nothing behind).
//! * [`session_errors`] finds the log lines by which a Go peer says it ended a session
//!   (`tests/interop/README.md`, "Reading the Go peer's stderr").
//! * The "xfer" protocol ([`xfer_initiate`], [`xfer_respond`]): a 32-byte header, then seeded
//!   pseudo-random bytes each way, each direction checked with SHA-256 at both ends (sender and
//!   receiver both record their digest in a [`Ledger`]); the responder closes once it has read
//!   and written everything, and the initiator then expects a clean EOF (a full close).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

// === building and running gopeer ===

/// Path of the `gopeer` binary, built (or found up to date) by `tests/interop/build.sh` once
/// per process. `GOPEER=/path` skips the build. Panics with the reason if it cannot be built.
pub fn gopeer() -> &'static Path {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(build_gopeer) {
        Ok(path) => path,
        Err(err) => panic!("{err}"),
    }
}

fn build_gopeer() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("GOPEER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("GOPEER={} is not a file", path.display()))
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate is inside the workspace");
    let script = repo.join("tests/interop/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "INTEROP TESTS CANNOT RUN: the Go interop peer could not be built by {} ({}).\n\
             These tests need a Go toolchain (go 1.26+ with GOTOOLCHAIN=auto and access to the Go \
             module proxy, see tests/interop/README.md); they fail rather than skip.\n\
             build.sh stderr:\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if !path.is_file() {
        return Err(format!(
            "build.sh printed {path:?}, which is not a file; stdout: {stdout}"
        ));
    }
    Ok(path)
}

/// Where Go peer logs go: `<target>/tmp/interop_go/`.
pub fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop_go");
    std::fs::create_dir_all(&dir).expect("create log dir");
    dir
}

/// One running `gopeer` process.
pub struct GoProcess {
    /// For messages: `server`, `client`, ...
    pub name: String,
    child: Child,
    /// Its process id (for /proc and signals).
    pub pid: u32,
    /// Its stderr (logrus text lines).
    pub log_path: PathBuf,
    announcements: Arc<(Mutex<Vec<serde_json::Value>>, Notify)>,
}

impl std::fmt::Debug for GoProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gopeer {} (pid {}, log {})",
            self.name,
            self.pid,
            self.log_path.display()
        )
    }
}

impl GoProcess {
    /// Starts `gopeer <args>` (args[0] is the subcommand). Its stdout JSON lines are collected.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_program(gopeer(), args)
    }

    /// Starts `bin <args>`, any program that follows gopeer's stdout/stderr contract (the
    /// benchmark's Rust peers do).
    pub fn spawn_program(bin: &Path, args: &[&str]) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = args[0].to_string();
        let log_path = log_dir().join(format!(
            "{}-{}-{}.log",
            name,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let log = std::fs::File::create(&log_path).expect("create gopeer log");
        // setpriv makes the kernel SIGKILL the peer when the thread that started it ends, so a
        // test that panics or is killed never leaves a peer behind.
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut cmd = if setpriv.exists() {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let announcements: Arc<(Mutex<Vec<serde_json::Value>>, Notify)> = Arc::default();
        let sink = announcements.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::Value::String(line.clone()));
                sink.0.lock().unwrap().push(value);
                sink.1.notify_waiters();
            }
            sink.1.notify_waiters();
        });
        Self {
            name,
            child,
            pid,
            log_path,
            announcements,
        }
    }

    /// Waits (bounded) for the `n`-th (0-based) announcement with `key`, and returns its value.
    pub async fn announcement(&self, key: &str, n: usize, within: Duration) -> serde_json::Value {
        let found = tokio::time::timeout(within, async {
            loop {
                let notified = self.announcements.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(v) = self
                    .announcements
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a.get(key))
                    .nth(n)
                {
                    return v.clone();
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "{self:?}: no announcement #{n} with {key:?} within {within:?}; log:\n{}",
                self.log_tail(40)
            )
        })
    }

    /// How many announcements with `key` have been seen.
    pub fn announcement_count(&self, key: &str) -> usize {
        self.announcements
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.get(key).is_some())
            .count()
    }

    /// The whole stderr log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Session-ending lines in the log so far (see [`session_errors`]).
    pub fn session_errors(&self) -> Vec<String> {
        session_errors(&self.log())
    }

    /// Panics if the Go peer logged that it ended a session (spec §2.6: something we sent was
    /// fatal to it, or it stopped hearing from us).
    pub fn assert_no_session_errors(&self) {
        let errors = self.session_errors();
        assert!(
            errors.is_empty(),
            "{self:?} ended a session or refused something we sent:\n{}",
            errors.join("\n")
        );
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines by which a Go peer reports an ended session or a refused message
/// (`tests/interop/README.md`), plus Go crashes.
pub const SESSION_ERROR_PATTERNS: &[&str] = &[
    "error in remotedialer server", // gopeer server: Serve returned (any reason)
    "Remotedialer proxy error",     // gopeer client: the session ended
    "connect not allowed",          // a Connect the authorizer refused (fatal)
    "refusing",                     // gopeer's own log just before that
    "wrong websocket message type", // a text message
    "invalid remote Session",       // bad AddClient/RemoveClient
    "decoding sync connections",    // bad SyncConnections length
    "failed to parse connect address", // Connect without '/'
    "Error syncing connections",
    "Error writing ping",
    "panic:",
    "fatal error:",
];

/// The lines of `log` that match [`SESSION_ERROR_PATTERNS`].
pub fn session_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| SESSION_ERROR_PATTERNS.iter().any(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// `gopeer server`: a remotedialer Server at /connect plus its forward listener.
pub struct GoServer {
    pub proc: GoProcess,
    /// `ws://127.0.0.1:PORT/connect`.
    pub ws_url: String,
    /// Forward listener: `KEY PROTO ADDRESS\n` opens a server-initiated stream.
    pub forward: SocketAddr,
}

impl GoServer {
    /// Starts a server on `listen` (`127.0.0.1:0` for any port) with extra flags.
    pub async fn start(listen: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "server",
            "--listen",
            listen,
            "--forward-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let proc = GoProcess::spawn(&args);
        let ws_url = proc.announcement("ws", 0, Duration::from_secs(30)).await;
        let forward = proc
            .announcement("forward", 0, Duration::from_secs(5))
            .await;
        Self {
            ws_url: ws_url.as_str().expect("ws is a string").to_owned(),
            forward: forward
                .as_str()
                .expect("forward is a string")
                .parse()
                .expect("forward addr"),
            proc,
        }
    }

    /// `host:port` of the websocket listener.
    pub fn listen_addr(&self) -> String {
        self.ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/connect")
            .to_owned()
    }

    /// Opens a server-initiated stream to `address` on client `key`'s session: a TCP
    /// connection to the forward listener with the header line already sent.
    pub async fn open(&self, key: &str, proto: &str, address: &str) -> std::io::Result<TcpStream> {
        forward_connect(self.forward, &format!("{key} {proto} {address}\n")).await
    }
}

/// `gopeer client`: a remotedialer client (reconnecting every ~1 s) plus its forward listener.
pub struct GoClient {
    pub proc: GoProcess,
    /// Forward listener: `PROTO ADDRESS\n` opens a client-initiated stream.
    pub forward: SocketAddr,
}

impl GoClient {
    /// Starts a client of `url` with client key `id`. Does not wait for the session.
    pub async fn start(url: &str, id: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "client",
            "--url",
            url,
            "--id",
            id,
            "--forward-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let proc = GoProcess::spawn(&args);
        let forward = proc
            .announcement("forward", 0, Duration::from_secs(30))
            .await;
        Self {
            forward: forward
                .as_str()
                .expect("forward is a string")
                .parse()
                .expect("forward addr"),
            proc,
        }
    }

    /// Waits for the `n`-th (0-based) `{"connected":true}`.
    pub async fn connected(&self, n: usize) {
        self.proc
            .announcement("connected", n, Duration::from_secs(20))
            .await;
    }

    /// Sessions that have come up so far.
    pub fn sessions_up(&self) -> usize {
        self.proc.announcement_count("connected")
    }

    /// Opens a client-initiated stream to `address`.
    pub async fn open(&self, proto: &str, address: &str) -> std::io::Result<TcpStream> {
        forward_connect(self.forward, &format!("{proto} {address}\n")).await
    }
}

async fn forward_connect(forward: SocketAddr, header: &str) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(forward).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(header.as_bytes()).await?;
    Ok(tcp)
}

// === /proc readings (Linux) ===

/// Resident set size of `pid` in KiB (VmRSS), and its peak (VmHWM).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// === seeded data and digests ===

/// A seeded pseudo-random byte stream (xorshift64*); any chunking yields the same bytes.
pub struct Gen {
    state: u64,
    carry: [u8; 8],
    carry_at: usize,
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            carry: [0; 8],
            carry_at: 8,
        }
    }

    fn word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    pub fn fill(&mut self, mut buf: &mut [u8]) {
        while self.carry_at < 8 && !buf.is_empty() {
            buf[0] = self.carry[self.carry_at];
            self.carry_at += 1;
            buf = &mut buf[1..];
        }
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.carry = self.word();
            rest.copy_from_slice(&self.carry[..rest.len()]);
            self.carry_at = rest.len();
        }
    }
}

/// Bytes counted and their SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub sha256: String,
}

/// A running SHA-256.
pub struct Hasher {
    ctx: ring::digest::Context,
    bytes: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Self {
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        }
    }
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
        self.bytes += data.len() as u64;
    }
    pub fn finish(self) -> Digest {
        Digest {
            bytes: self.bytes,
            sha256: hex::encode(self.ctx.finish().as_ref()),
        }
    }
}

/// Digests of every transfer direction, recorded by the sender and by the receiver.
#[derive(Default)]
pub struct Ledger {
    sent: Mutex<HashMap<u64, Digest>>,
    received: Mutex<HashMap<u64, Digest>>,
}

impl Ledger {
    pub fn sent(&self, id: u64, d: Digest) {
        self.sent.lock().unwrap().insert(id, d);
    }
    pub fn received(&self, id: u64, d: Digest) {
        self.received.lock().unwrap().insert(id, d);
    }
    /// Checks one direction: both ends recorded `len` bytes with the same SHA-256.
    pub fn check(&self, id: u64, len: u64) -> Result<Digest, String> {
        let sent = self.sent.lock().unwrap().get(&id).cloned();
        let received = self.received.lock().unwrap().get(&id).cloned();
        match (sent, received) {
            (Some(s), Some(r)) if s == r && s.bytes == len => Ok(s),
            (s, r) => Err(format!(
                "transfer {id:#x} ({len} bytes): sent {s:?}, received {r:?}"
            )),
        }
    }
    /// Checks both directions of an xfer exchange with id `id`.
    pub fn check_xfer(&self, id: u64, spec: &Xfer) -> Result<(), String> {
        if spec.up > 0 {
            self.check(up_id(id), spec.up)?;
        }
        if spec.down > 0 {
            self.check(down_id(id), spec.down)?;
        }
        Ok(())
    }
}

pub fn up_id(id: u64) -> u64 {
    id & !(1 << 63)
}
pub fn down_id(id: u64) -> u64 {
    id | (1 << 63)
}

// === the xfer protocol ===

/// Periodic stalls of a reader: after every `every` bytes, sleep `pause` (a slow consumer).
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    pub every: u64,
    pub pause: Duration,
}

/// One exchange: `up` bytes initiator -> responder, `down` bytes back, optionally with a
/// slow responder (its reads stall as `responder_stall` says).
#[derive(Debug, Clone, Copy, Default)]
pub struct Xfer {
    pub up: u64,
    pub down: u64,
    /// The responder reads with stalls: (every MiB, pause ms), 0 for none.
    pub responder_stall_every_mib: u32,
    pub responder_stall_ms: u32,
}

impl Xfer {
    /// The 32-byte header that starts an exchange.
    pub fn header(&self, id: u64) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&id.to_le_bytes());
        h[8..16].copy_from_slice(&self.up.to_le_bytes());
        h[16..24].copy_from_slice(&self.down.to_le_bytes());
        h[24..28].copy_from_slice(&self.responder_stall_every_mib.to_le_bytes());
        h[28..32].copy_from_slice(&self.responder_stall_ms.to_le_bytes());
        h
    }

    fn parse(h: &[u8; 32]) -> (u64, Self) {
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        (
            u64_at(0),
            Self {
                up: u64_at(8),
                down: u64_at(16),
                responder_stall_every_mib: u32_at(24),
                responder_stall_ms: u32_at(28),
            },
        )
    }

    fn responder_stall(&self) -> Option<Stall> {
        (self.responder_stall_every_mib > 0).then(|| Stall {
            every: u64::from(self.responder_stall_every_mib) << 20,
            pause: Duration::from_millis(u64::from(self.responder_stall_ms)),
        })
    }
}

const CHUNK: usize = 64 << 10;

/// Writes `len` bytes of `Gen::new(id)`; records the digest as sent.
pub async fn send_generated<W: AsyncWrite + Unpin>(
    w: &mut W,
    id: u64,
    len: u64,
    ledger: &Ledger,
) -> std::io::Result<()> {
    let mut g = Gen::new(id);
    let mut h = Hasher::default();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        g.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    ledger.sent(id, h.finish());
    Ok(())
}

/// Reads exactly `len` bytes (stalling as told, counting into `counter`); records the digest as
/// received.
pub async fn recv_digest<R: AsyncRead + Unpin>(
    r: &mut R,
    id: u64,
    len: u64,
    stall: Option<Stall>,
    counter: Option<&AtomicU64>,
    ledger: &Ledger,
) -> std::io::Result<()> {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut next_stall = stall.map_or(u64::MAX, |s| s.every);
    while got < len {
        let want = (len - got).min(CHUNK as u64) as usize;
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            ledger.received(id, h.finish());
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("transfer {id:#x}: EOF after {got} of {len} bytes"),
            ));
        }
        h.update(&buf[..n]);
        got += n as u64;
        if let Some(c) = counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let Some(s) = stall
            && got >= next_stall
        {
            next_stall += s.every;
            tokio::time::sleep(s.pause).await;
        }
    }
    ledger.received(id, h.finish());
    Ok(())
}

/// The initiator's side of an exchange: header, `up` bytes out while `down` bytes come back
/// (read with `stall`), then a clean EOF within `eof_within` (the responder's full close).
pub async fn xfer_initiate<S: AsyncRead + AsyncWrite>(
    stream: S,
    id: u64,
    spec: Xfer,
    stall: Option<Stall>,
    counter: Option<&AtomicU64>,
    ledger: &Ledger,
) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    w.write_all(&spec.header(id)).await?;
    let write = async {
        send_generated(&mut w, up_id(id), spec.up, ledger).await?;
        w.flush().await
    };
    let read = recv_digest(&mut r, down_id(id), spec.down, stall, counter, ledger);
    let (wr, rr) = tokio::join!(write, read);
    wr?;
    rr?;
    // No half-close in remotedialer: the responder closes once done, and that must arrive as a
    // clean end of stream here.
    let mut extra = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(30), r.read(&mut extra)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(_)) => Err(std::io::Error::other(format!(
            "transfer {id:#x}: bytes after the expected end"
        ))),
        Ok(Err(e)) => Err(std::io::Error::new(
            e.kind(),
            format!("transfer {id:#x}: error instead of EOF: {e}"),
        )),
        Err(_) => Err(std::io::Error::other(format!(
            "transfer {id:#x}: no close within 30 s after the data"
        ))),
    }
}

/// The responder's side: reads the header, then `up` bytes in (stalling as the header says)
/// while writing `down` bytes out; closes when both are done. Returns the exchange id.
pub async fn xfer_respond<S: AsyncRead + AsyncWrite>(
    stream: S,
    counter: Option<&AtomicU64>,
    ledger: &Ledger,
) -> std::io::Result<u64> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut header = [0u8; 32];
    r.read_exact(&mut header).await?;
    if let Some(c) = counter {
        c.fetch_add(32, Ordering::Relaxed);
    }
    let (id, spec) = Xfer::parse(&header);
    let read = recv_digest(
        &mut r,
        up_id(id),
        spec.up,
        spec.responder_stall(),
        counter,
        ledger,
    );
    let write = async {
        send_generated(&mut w, down_id(id), spec.down, ledger).await?;
        w.flush().await
    };
    let (rr, wr) = tokio::join!(read, write);
    rr?;
    wr?;
    // A full close (remotedialer has no half-close).
    w.shutdown().await?;
    drop(r);
    Ok(id)
}

// === TCP services on loopback ===

/// Binds 127.0.0.1:0 and hands every accepted connection to `serve`.
pub async fn tcp_service<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(serve(socket));
        }
    });
    addr
}

/// Outcomes of a TCP xfer responder service.
#[derive(Default)]
pub struct ServiceLog {
    pub ok: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

/// A TCP service running [`xfer_respond`] on every connection.
pub async fn xfer_service(ledger: Arc<Ledger>) -> (SocketAddr, Arc<ServiceLog>) {
    let log = Arc::new(ServiceLog::default());
    let l = log.clone();
    let addr = tcp_service(move |socket| {
        let ledger = ledger.clone();
        let log = l.clone();
        async move {
            match xfer_respond(socket, None, &ledger).await {
                Ok(_) => {
                    log.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log.errors.lock().unwrap().push(e.to_string()),
            }
        }
    })
    .await;
    (addr, log)
}

/// What an echo service saw on one connection.
#[derive(Debug)]
pub struct EchoEnd {
    pub bytes: u64,
    /// `None`: a clean EOF from the peer; `Some`: the error.
    pub error: Option<String>,
}

/// A TCP echo service that reports how each connection ended.
pub async fn echo_service() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<EchoEnd>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tcp_service(move |mut socket| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 16 << 10];
            let mut bytes = 0u64;
            let error = loop {
                match socket.read(&mut buf).await {
                    Ok(0) => break None,
                    Ok(n) => {
                        bytes += n as u64;
                        if let Err(e) = socket.write_all(&buf[..n]).await {
                            break Some(e.to_string());
                        }
                    }
                    Err(e) => break Some(e.to_string()),
                }
            };
            let _ = tx.send(EchoEnd { bytes, error });
        }
    })
    .await;
    (addr, rx)
}

/// A TCP service that writes `text` and closes at once.
pub async fn say_and_close_service(text: &'static [u8]) -> SocketAddr {
    tcp_service(move |mut socket| async move {
        let _ = socket.write_all(text).await;
        let _ = socket.shutdown().await;
    })
    .await
}

/// A loopback port with nothing listening (connection refused).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One echo round trip of `data` over `s`.
pub async fn echo_round<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    data: &[u8],
) -> std::io::Result<()> {
    s.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).await?;
    if back != data {
        return Err(std::io::Error::other("echo returned different bytes"));
    }
    Ok(())
}
