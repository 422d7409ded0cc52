//! The admin CLI against a running server's `/v1` API, with the real binary: an admin
//! bootstrapped on the store directly, `login` (token checked, context file 0600, CA from a
//! file or fetched on request), then every admin command through REST with the same output as
//! direct mode, audit lines written by the server in the token's user's name, and clear errors
//! for a non-admin token (403), a revoked one (401), a wrong CA, unknown names and conflicts.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::*;

/// The CLI with a context file and no `--data-dir`: `TUNNEL_SERVER_DATA_DIR` is a regular file,
/// so a command that opened the store by mistake would fail.
struct Cli {
    config: PathBuf,
    bogus_data_dir: PathBuf,
}

struct Run {
    ok: bool,
    out: String,
    err: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(BIN)
            .args(args)
            .env("TUNNEL_SERVER_CONFIG", &self.config)
            .env("TUNNEL_SERVER_DATA_DIR", &self.bogus_data_dir)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .env_remove("TUNNEL_SERVER_TOKEN")
            .output()
            .unwrap();
        Run {
            ok: out.status.success(),
            out: String::from_utf8(out.stdout).unwrap(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.ok, "{args:?} failed:\n{}", r.err);
        assert!(
            !r.err.contains("admin mutation"),
            "REST mode wrote an audit line of its own: {}",
            r.err
        );
        r.out
    }

    /// A command that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(!r.ok, "{args:?} succeeded:\n{}", r.out);
        r.err
    }

    /// The same command on the store directly (`--direct --data-dir`).
    fn direct(&self, data_dir: &Path, args: &[&str]) -> String {
        let mut all = vec!["--direct", "--data-dir", data_dir.to_str().unwrap()];
        all.extend_from_slice(args);
        let r = self.run(&all);
        assert!(r.ok, "direct {args:?} failed:\n{}", r.err);
        r.out
    }

    fn file(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.config).unwrap()).unwrap()
    }
}

fn token_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("API token (shown once): "))
        .unwrap_or_else(|| panic!("no token in {out:?}"))
        .to_owned()
}

#[test]
fn admin_commands_run_through_the_api() {
    let dir = TempDir::new("remote-cli");
    let data = dir.path().join("data");
    let server = ServerProc::start(&data);
    let ca_file = data.join("ca.pem");
    let ca = ca_file.to_str().unwrap();
    let bogus = dir.path().join("not-a-dir");
    std::fs::write(&bogus, "").unwrap();
    let cli = Cli {
        config: dir.path().join("home").join("tunnel-server").join("config"),
        bogus_data_dir: bogus,
    };

    // Bootstrap: no context file yet, so the store is opened directly (and audited as cli:).
    let d = data.to_str().unwrap();
    let r = cli.run(&["--data-dir", d, "user", "add", "root", "--admin"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.err.contains("via=\"cli\""), "{}", r.err);
    let root = token_line(&r.out);
    let dev = token_line(&cli.direct(&data, &["user", "add", "dev"]));

    // Login failures write nothing.
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, test_pki("other").0).unwrap();
    let url = server.url.as_str();
    let err = cli.fails(&[
        "login",
        "--server",
        url,
        "--token",
        &root,
        "--certificate-authority",
        other_ca.to_str().unwrap(),
    ]);
    println!("wrong CA: {err}");
    assert!(
        err.contains("TLS handshake with")
            && err.contains("not signed by the context's CA")
            && err.contains("UnknownIssuer"),
        "{err}"
    );
    let err = cli.fails(&["login", "--server", url, "--token", &root]);
    println!("system roots: {err}");
    // (A machine without a system store fails earlier, building the TLS set-up.)
    assert!(
        err.contains("not trusted by the system roots") || err.contains("TLS set-up"),
        "{err}"
    );
    let err = cli.fails(&[
        "login",
        "--server",
        url,
        "--token",
        &dev,
        "--certificate-authority",
        ca,
    ]);
    println!("non-admin login: {err}");
    assert!(
        err.contains("user dev is not an admin: the admin commands need an admin user's token"),
        "{err}"
    );
    let err = cli.fails(&[
        "login",
        "--server",
        url,
        "--token",
        "token-zzzzz:nope",
        "--certificate-authority",
        ca,
    ]);
    assert!(err.contains("the server refused the token"), "{err}");
    assert!(!cli.config.exists());

    // Login: the token is checked, the context saved (0600, CA embedded) and made current.
    let out = cli.ok(&[
        "login",
        "--server",
        url,
        "--token",
        &root,
        "--certificate-authority",
        ca,
        "--context",
        "test",
    ]);
    assert!(
        out.contains("logged in to") && out.contains("as root"),
        "{out}"
    );
    let mode = std::fs::metadata(&cli.config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let file = cli.file();
    assert_eq!(file["currentContext"], "test");
    assert_eq!(file["contexts"][0]["server"], url);
    assert_eq!(file["contexts"][0]["user"], "root");
    assert_eq!(
        file["contexts"][0]["certificateAuthorityData"],
        server.ca_pem().as_str()
    );

    // Every command through the API; lists match direct mode.
    let out = cli.ok(&["cluster", "add", "c1"]);
    assert!(out.starts_with("cluster c1 created as c-"), "{out}");
    let import = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("kubectl apply -f "))
        .unwrap()
        .to_owned();
    assert!(import.starts_with(&format!("{url}/v3/import/")), "{import}");
    let cluster_id = out.split_whitespace().nth(4).unwrap().to_owned();
    let err = cli.fails(&["cluster", "add", "c1"]);
    assert!(err.contains("already exists"), "{err}");
    let list = cli.ok(&["cluster", "list"]);
    assert!(list.contains(&cluster_id), "{list}");
    assert_eq!(list, cli.direct(&data, &["cluster", "list"]));

    let out = cli.ok(&["user", "add", "alice", "--group", "g1", "--group", "g2"]);
    assert!(out.starts_with("user alice created as u-"), "{out}");
    let alice = token_line(&out);
    let list = cli.ok(&["user", "list"]);
    assert!(list.contains("alice") && list.contains("g1,g2"), "{list}");
    assert_eq!(list, cli.direct(&data, &["user", "list"]));

    let r = cli.run(&[
        "token",
        "add",
        "alice",
        "--ttl",
        "24h",
        "--description",
        "ci",
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(r.err.contains("expires at"), "{}", r.err);
    let value = r.out.trim().to_owned();
    assert!(value.starts_with("token-"), "{value}");
    let token_id = value.split(':').next().unwrap().to_owned();
    let list = cli.ok(&["token", "list", "--user", "alice"]);
    assert!(list.contains(&token_id) && list.contains(" ci"), "{list}");
    // alice's tokens are not used meanwhile, so even LAST USED is the same.
    assert_eq!(
        list,
        cli.direct(&data, &["token", "list", "--user", "alice"])
    );
    let err = cli.fails(&["token", "list", "--user", "nobody"]);
    assert!(err.contains("user nobody not found"), "{err}");

    let out = cli.ok(&["grant", "alice", "c1"]);
    assert_eq!(
        out.trim(),
        format!("user alice may now reach cluster c1 ({cluster_id})")
    );
    let err = cli.fails(&["grant", "alice", "nope"]);
    assert!(err.contains("cluster nope not found"), "{err}");

    // Registration tokens: list, add, revoke.
    let tokens = cli.ok(&["cluster", "token", "c1"]);
    assert_eq!(tokens.trim(), format!("kubectl apply -f {import}"));
    assert_eq!(tokens, cli.direct(&data, &["cluster", "token", "c1"]));
    let new = cli.ok(&["cluster", "token", &cluster_id, "--new"]);
    assert!(new.starts_with("kubectl apply -f "), "{new}");
    let old_token = import
        .rsplit('/')
        .next()
        .and_then(|f| f.strip_suffix(".yaml"))
        .and_then(|f| f.rsplit_once('_'))
        .unwrap()
        .0
        .to_owned();
    let out = cli.ok(&["cluster", "token", "c1", "--revoke", &old_token]);
    assert_eq!(out.trim(), "registration token revoked");
    let err = cli.fails(&["cluster", "token", "c1", "--revoke", &old_token]);
    assert!(
        err.contains("cluster c1 has no such registration token"),
        "{err}"
    );
    assert_eq!(cli.ok(&["cluster", "token", "c1"]), new);

    // kubeconfig: the server's URL and CA, a new token of alice's.
    let r = cli.run(&["kubeconfig", "c1", "--user", "alice", "--ttl", "1h"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.err.contains("the kubeconfig's token token-"), "{}", r.err);
    let kubeconfig = r.out;
    assert!(
        kubeconfig.contains(&format!("server: \"{url}/k8s/clusters/{cluster_id}\"")),
        "{kubeconfig}"
    );
    let direct_kc = cli.direct(&data, &["kubeconfig", "c1", "--user", "alice"]);
    let ca_line = |kc: &str| {
        kc.lines()
            .find(|l| l.contains("certificate-authority-data"))
            .map(str::to_owned)
    };
    assert!(ca_line(&kubeconfig).is_some());
    assert_eq!(ca_line(&kubeconfig), ca_line(&direct_kc));
    let list = cli.ok(&["token", "list", "--user", "alice"]);
    assert!(list.contains("kubeconfig for c1"), "{list}");

    // Revoke.
    assert_eq!(
        cli.ok(&["token", "revoke", &token_id]).trim(),
        format!("token {token_id} revoked")
    );
    let err = cli.fails(&["token", "revoke", "token-zzzzz"]);
    assert!(err.contains("token token-zzzzz not found"), "{err}");

    // The server wrote the audit lines, naming the token's user.
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("admin mutation")
            && l.contains("user=root")
            && l.contains("via=\"api\"")
            && l.contains("object=\"cluster\"")
            && l.contains("(c1)")),
        "{log}"
    );

    // --direct still works with a current context; a bare --data-dir is refused.
    assert!(cli.direct(&data, &["user", "list"]).contains("alice"));
    let err = cli.fails(&["--data-dir", d, "user", "list"]);
    assert!(err.contains("add --direct to open the store"), "{err}");

    // Contexts: a second one (CA fetched on request), switch, remove.
    let r = cli.run(&[
        "login",
        "--server",
        url,
        "--token",
        &root,
        "--fetch-ca",
        "--context",
        "tofu",
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(r.err.contains("trusting the CA"), "{}", r.err);
    let file = cli.file();
    assert_eq!(file["currentContext"], "tofu");
    assert_eq!(
        file["contexts"][1]["certificateAuthorityData"]
            .as_str()
            .unwrap()
            .trim(),
        server.ca_pem().trim()
    );
    let list = cli.ok(&["context", "list"]);
    println!("{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with('*') && l.contains("tofu")),
        "{list}"
    );
    assert_eq!(
        cli.ok(&["context", "use", "test"]).trim(),
        "current context: test"
    );
    assert!(
        cli.fails(&["context", "use", "nope"])
            .contains("no context \"nope\"")
    );
    // --context picks another one for one command.
    assert_eq!(
        cli.ok(&["--context", "tofu", "user", "list"]),
        cli.ok(&["user", "list"])
    );
    assert_eq!(
        cli.ok(&["context", "rm", "tofu"]).trim(),
        "context tofu removed"
    );
    assert_eq!(cli.file()["currentContext"], "test");
    // No verification at all, when asked for: said so, and saved so.
    let r = cli.run(&[
        "login",
        "--server",
        url,
        "--token",
        &root,
        "--insecure-skip-tls-verify",
        "--context",
        "insecure",
    ]);
    assert!(r.ok && r.err.contains("will not verify"), "{}", r.err);
    assert_eq!(cli.file()["contexts"][1]["insecureSkipTlsVerify"], true);
    assert!(cli.ok(&["user", "list"]).contains("alice"));
    cli.ok(&["context", "use", "test"]);
    cli.ok(&["context", "rm", "insecure"]);

    // A non-admin's token: a clear 403 on the admin commands (it may list the clusters granted
    // to it: c1). A revoked one: a clear 401.
    let mut file = cli.file();
    file["contexts"][0]["token"] = Value::String(alice.clone());
    std::fs::write(&cli.config, file.to_string()).unwrap();
    let listed = cli.ok(&["cluster", "list"]);
    let rows = listed.lines().filter(|l| l.starts_with("c-")).count();
    assert_eq!(rows, 1, "{listed}");
    assert!(listed.contains(&cluster_id), "{listed}");
    let err = cli.fails(&["user", "list"]);
    println!("non-admin: {err}");
    assert!(
        err.contains("user alice is not an admin: the admin commands need an admin user's token (context \"test\")"),
        "{err}"
    );
    let alice_id = alice.split(':').next().unwrap();
    cli.direct(&data, &["token", "revoke", alice_id]);
    let err = cli.fails(&["user", "list"]);
    println!("revoked: {err}");
    assert!(
        err.contains("the server refused the token of context \"test\""),
        "{err}"
    );

    // A CA that did not sign the server's certificate fails TLS, clearly.
    file["contexts"][0]["token"] = Value::String(root.clone());
    file["contexts"][0]["certificateAuthorityData"] = Value::String(test_pki("x").0);
    std::fs::write(&cli.config, file.to_string()).unwrap();
    let err = cli.fails(&["cluster", "list"]);
    assert!(err.contains("not signed by the context's CA"), "{err}");
    file["contexts"][0]["certificateAuthorityData"] = Value::String(server.ca_pem());
    std::fs::write(&cli.config, file.to_string()).unwrap();

    // rm: name resolved, then deleted; again: not found.
    let out = cli.ok(&["cluster", "rm", "c1"]);
    assert_eq!(out.trim(), format!("cluster c1 ({cluster_id}) deleted"));
    let err = cli.fails(&["cluster", "rm", "c1"]);
    assert!(err.contains("cluster c1 not found"), "{err}");
    assert_eq!(
        cli.ok(&["cluster", "list"]),
        cli.direct(&data, &["cluster", "list"])
    );

    // Removing the current context: back to the store (bootstrap mode).
    let r = cli.run(&["context", "rm", "test"]);
    assert!(
        r.ok && r.err.contains("open the store directly"),
        "{}",
        r.err
    );
    let err = cli.fails(&["user", "list"]);
    assert!(err.contains(cli.bogus_data_dir.to_str().unwrap()), "{err}");
}

/// Without any place for a context file (no `$HOME`, no `$TUNNEL_SERVER_CONFIG`: a service, or
/// `ip netns exec` with a bare environment, as the e2e suite runs it) no context can be
/// current: admin commands open the store, as before contexts existed; `--context` is an error.
#[test]
fn without_a_home_commands_open_the_store() {
    let dir = TempDir::new("remote-cli-nohome");
    let bare = |args: &[&str]| {
        Command::new(BIN)
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap()
    };
    let added = bare(&["user", "add", "root", "--admin"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let listed = String::from_utf8(bare(&["user", "list"]).stdout).unwrap();
    assert!(listed.contains("root"), "{listed}");
    let named = bare(&["--context", "x", "user", "list"]);
    assert!(!named.status.success());
    let err = String::from_utf8_lossy(&named.stderr);
    assert!(err.contains("no place for the context file"), "{err}");
}
