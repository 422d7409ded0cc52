//! The docker CLI in a real terminal through the server: `docker exec -it`, `docker attach` and
//! `docker logs -f` against a private real dockerd (harness: `support/docker.rs`). The CLI
//! runs in a tmux pane (a real pseudo-terminal whose size the test sets), keys are typed with
//! `tmux send-keys` and the screen is read with `tmux capture-pane`.
//!
//! * `exec -it … sh`: `tty` prints `/dev/pts/N`; `stty size` shows the pane's size, and the new
//!   one after the pane is resized (the CLI's `POST /exec/<id>/resize` is a request of its own);
//!   Ctrl-C interrupts a `sleep` (status 130); `exit 3` makes the CLI exit 3.
//! * `attach` to a container started with `-it`: a typed line is echoed and run; Ctrl-P Ctrl-Q
//!   detaches and the container keeps running.
//! * `logs -f` of a container printing a line every 0.2 s: lines arrive as they are written
//!   (the largest gap between two is printed and bounded); killing the CLI ends the stream
//!   through the tunnel (`tunnel_server_streams` falls back).
//!
//! Needs root, `docker.io`, `busybox-static` and `tmux` (scripts/install-test-deps.sh); FAILS
//! without them.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::time::timeout;

use support::docker::{DockerEnv, DockerNode, IMAGE, docker_command, require_tool};
use support::*;

/// Every wait on the screen is bounded by this.
const SCREEN_WAIT: Duration = Duration::from_secs(20);

/// One tmux server on its own socket with one session running a command in a pane of a given
/// size; killed on drop. The pane stays after the command ends (the wrapper prints the exit
/// status and sleeps), so its last screen can still be read.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, name: &str, cols: u16, rows: u16, env: &DockerEnv, command: &str) -> Self {
        require_tool("tmux", "tmux");
        let socket = dir.join(format!("tmux-{name}.sock"));
        let wrapped = format!("{command}; echo \"[cli exited $?]\"; sleep 600");
        let mut cmd = Command::new("tmux");
        cmd.arg("-S")
            .arg(&socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", &cols.to_string(), "-y", &rows.to_string()])
            .arg(wrapped)
            .env_remove("TMUX")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env("TERM", "xterm");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { socket }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
    }

    /// Sends tmux key names (`Enter`, `C-c`, `C-p`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// Types a line and Enter.
    fn line(&self, text: &str) {
        self.type_text(text);
        self.keys(&["Enter"]);
    }

    /// The pane's history and screen, lines joined where they wrapped.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-t", "t", "-S", "-1000"])
    }

    fn resize(&self, cols: u16, rows: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
    }

    /// Polls the screen until `found` returns something (bounded by [`SCREEN_WAIT`]).
    async fn wait_for<T>(&self, what: &str, mut found: impl FnMut(&str) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if let Some(v) = found(&screen) {
                return v;
            }
            assert!(
                started.elapsed() < SCREEN_WAIT,
                "no {what} on the screen within {SCREEN_WAIT:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the screen shows `text` `count` times.
    async fn wait_count(&self, text: &str, count: usize) -> String {
        self.wait_for(&format!("{count}× {text:?}"), |s| {
            (s.matches(text).count() >= count).then(|| s.to_owned())
        })
        .await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn streams(node: &DockerNode) -> u64 {
    let m = node.server.metrics().await;
    metric(&m, "tunnel_server_streams")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cli_in_a_terminal_through_a_node_tunnel() {
    let dir = TempDir::new("dockertty");
    timeout(Duration::from_secs(240), async {
        let node = DockerNode::start(dir.path(), "docker-tty-host").await;
        let (ok, out, err) = node
            .docker(
                &[
                    "version",
                    "--format",
                    "{{.Client.Version}} / {{.Server.Version}}",
                ],
                None,
            )
            .await;
        assert!(ok, "docker version: {err}\n{}", node.server.log());
        println!("docker CLI / dockerd: {}", out.trim());

        exec_it(&node, dir.path()).await;
        attach(&node, dir.path()).await;
        logs_follow(&node).await;
    })
    .await
    .expect("test exceeded its bound");
}

/// `docker exec -it <c> sh`.
async fn exec_it(node: &DockerNode, dir: &Path) {
    let (ok, id, err) = node
        .docker(
            &["run", "-d", "--network", "none", IMAGE, "sleep", "600"],
            None,
        )
        .await;
    assert!(ok, "docker run: {err}");
    let id = id.trim().to_owned();
    let term = Tmux::start(
        dir,
        "exec",
        120,
        40,
        &node.env,
        &format!("docker exec -it {id} sh"),
    );
    term.wait_count("# ", 1).await;

    term.line("tty");
    let pts = term
        .wait_for("a /dev/pts/N line", |s| {
            s.lines()
                .map(str::trim)
                .find(|l| l.starts_with("/dev/pts/"))
                .map(str::to_owned)
        })
        .await;
    println!("tty: {pts}");
    assert!(pts["/dev/pts/".len()..].parse::<u32>().is_ok(), "{pts}");

    // The CLI sends the terminal's size with POST /exec/<id>/resize once the exec runs.
    term.line("stty size");
    term.wait_for("stty size 40 120", |s| s.contains("\n40 120").then_some(()))
        .await;
    println!("stty size at 120x40: 40 120");
    term.resize(100, 30);
    // The CLI sees SIGWINCH and sends another resize; poll until the shell sees it.
    let started = Instant::now();
    loop {
        term.line("stty size");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if term.screen().contains("\n30 100") {
            break;
        }
        assert!(
            started.elapsed() < SCREEN_WAIT,
            "the resize did not reach the exec:\n{}",
            term.screen()
        );
    }
    println!(
        "stty size after resizing the pane to 100x30: 30 100 (in {:?})",
        started.elapsed()
    );
    let resizes = node.server.log().matches("/resize").count();
    println!("resize requests in the audit log: {resizes}");
    assert!(resizes >= 2, "{}", node.server.log());

    // Ctrl-C interrupts a foreground sleep; the shell carries on.
    term.line("sleep 30");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    term.keys(&["C-c"]);
    term.line("echo status=$?");
    term.wait_count("status=130", 1).await;
    println!(
        "Ctrl-C ended `sleep 30` after {:?} (status 130)",
        sent.elapsed()
    );
    assert!(sent.elapsed() < Duration::from_secs(10));

    term.line("exit 3");
    let screen = term.wait_count("[cli exited ", 1).await;
    let status = screen
        .split("[cli exited ")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    println!("docker exec -it after `exit 3`: exit status {status}");
    assert_eq!(status, "3", "{screen}");
    drop(term);
    let (ok, _, err) = node.docker(&["rm", "-f", &id], None).await;
    assert!(ok, "docker rm: {err}");
}

/// `docker attach` to a container started with `-it`, then Ctrl-P Ctrl-Q.
async fn attach(node: &DockerNode, dir: &Path) {
    let (ok, id, err) = node
        .docker(&["run", "-dit", "--network", "none", IMAGE, "sh"], None)
        .await;
    assert!(ok, "docker run -dit: {err}");
    let id = id.trim().to_owned();
    let term = Tmux::start(
        dir,
        "attach",
        100,
        30,
        &node.env,
        &format!("docker attach {id}"),
    );
    // Nothing is printed on attach (the prompt was written before); type until the shell
    // answers, since the CLI may still be setting up the stream.
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        term.line(&format!("echo attached-$((6*{n}))"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if term.screen().contains(&format!("attached-{}", 6 * n)) {
            break;
        }
        assert!(
            started.elapsed() < SCREEN_WAIT,
            "no answer through attach:\n{}",
            term.screen()
        );
    }
    let screen = term.screen();
    println!(
        "attach: typed `echo attached-$((6*{n}))`, screen:\n{}",
        screen.trim_end()
    );
    // Echoed by the container's terminal after its prompt, then run.
    assert!(
        screen.contains(&format!("# echo attached-$((6*{n}))")),
        "{screen}"
    );

    term.keys(&["C-p", "C-q"]);
    let screen = term.wait_count("[cli exited ", 1).await;
    // What the CLI does on a direct socket too: dockerd ends the attach, the CLI says so and
    // exits 1.
    assert!(
        screen.contains("read escape sequence\n[cli exited 1]"),
        "{screen}"
    );
    println!(
        "after Ctrl-P Ctrl-Q: {:?}",
        screen.trim_end().lines().rev().take(3).collect::<Vec<_>>()
    );
    let (ok, running, err) = node
        .docker(&["inspect", "-f", "{{.State.Running}}", &id], None)
        .await;
    assert!(ok, "docker inspect: {err}");
    println!("container running after the detach: {}", running.trim());
    assert_eq!(running.trim(), "true");
    drop(term);
    let (ok, _, err) = node.docker(&["rm", "-f", &id], None).await;
    assert!(ok, "docker rm: {err}");
}

/// `docker logs -f` of a container printing a line every 0.2 s.
async fn logs_follow(node: &DockerNode) {
    let script = "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.2; done";
    let (ok, id, err) = node
        .docker(
            &["run", "-d", "--network", "none", IMAGE, "sh", "-c", script],
            None,
        )
        .await;
    assert!(ok, "docker run: {err}");
    let id = id.trim().to_owned();
    let before = streams(node).await;
    let mut child = docker_command(&node.env, &["logs", "-f", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    // The first lines come at once (the backlog); then each as it is written.
    let mut arrivals = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        match timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(a)) => arrivals.push(a),
            Ok(None) => panic!("docker logs -f ended early: {:?}", child.wait_with_output()),
            Err(_) => panic!("no line within 5 s; got {arrivals:?}"),
        }
    }
    let during = streams(node).await;
    let live: Vec<_> = arrivals
        .iter()
        .filter(|(at, _)| at.duration_since(started) > Duration::from_millis(500))
        .collect();
    let largest = live
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0))
        .max()
        .unwrap();
    println!(
        "logs -f: {} lines in 4 s ({} after the backlog), last {:?}, largest gap between lines {largest:?}",
        arrivals.len(),
        live.len(),
        arrivals.last().unwrap().1
    );
    assert!(live.len() >= 10, "{arrivals:?}");
    assert!(
        largest < Duration::from_secs(1),
        "lines were held back: largest gap {largest:?}"
    );
    for w in live.windows(2) {
        let n = |l: &str| {
            l.strip_prefix("line-")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap()
        };
        assert_eq!(n(&w[1].1), n(&w[0].1) + 1, "lines out of order or lost");
    }

    // Kill the CLI: the server must close the request's stream through the tunnel.
    child.kill().unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    let after = eventually(
        Duration::from_secs(10),
        "the logs stream to close",
        || async {
            let n = streams(node).await;
            (n < during).then_some(n)
        },
    )
    .await;
    println!(
        "tunnel_server_streams: {before} before, {during} while following, {after} {:?} after the CLI was killed",
        killed.elapsed()
    );
    assert!(after <= before, "{after} > {before}");
    let (ok, _, err) = node.docker(&["rm", "-f", &id], None).await;
    assert!(ok, "docker rm: {err}");
}
