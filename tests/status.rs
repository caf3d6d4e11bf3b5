//! `tcpfwd status` against a running instance, over its control socket: what
//! a user sees (text and `--json`), that another user is refused, that with
//! no instance the answer is one line, and that the socket is cleaned up at
//! shutdown and taken over after a crash.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{backends, msg, run_to_exit, tls_connect, Pki, Tcpfwd, TempDir, BIN};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// `tcpfwd status ARGS...` as this user: (exit code, stdout, stderr).
fn status(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("status")
        .args(args)
        .env_remove("TCPFWD_CONFIG")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run tcpfwd status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory anyone may enter, so that only the socket's own mode decides.
fn open_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// tcpfwd forwarding to `echo` with the test certificate, not yet started.
fn command(pki: &Pki, echo: std::net::SocketAddr) -> Command {
    let mut cmd = Tcpfwd::command();
    cmd.arg("--map")
        .arg(format!("127.0.0.1:0:{echo}"))
        .arg("--cert")
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key);
    cmd
}

/// `command` with the control socket at `control` (and `extra`), started.
fn start(pki: &Pki, echo: std::net::SocketAddr, control: &Path, extra: &[&str]) -> Tcpfwd {
    let mut cmd = command(pki, echo);
    cmd.arg("--control").arg(control).args(extra);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "ready", 1, T);
    fwd
}

/// `tcpfwd status ARGS...` with `$RUNTIME_DIRECTORY` set to `dir`, as
/// under systemd, so that its default socket is `dir/control`.
fn status_in_runtime_dir(dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| {
        Command::new(BIN)
            .arg("status")
            .args(args)
            .env("RUNTIME_DIRECTORY", dir)
            .env_remove("TCPFWD_CONFIG")
            .output()
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_routes_connections_certificate_reload_and_bans() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let dir = open_dir("status");
    let control = dir.join("control");
    let path = control.to_str().unwrap();
    // One failed handshake bans a source for five minutes.
    let fwd = start(
        &pki,
        echo,
        &control,
        &["--ban-after", "1", "--ban-time", "5m"],
    );
    let to = fwd.addr(0);

    // The socket: 0600, owned by tcpfwd's user (root here).
    let meta = std::fs::symlink_metadata(&control).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());

    // Two connections held open on the route, one echo each.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tls_connect(pki.client_config(), to, "localhost")
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    // A scanner from 127.0.0.2: not TLS, so banned.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    fwd.wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;

    let (code, out, err) = tokio::task::block_in_place(|| status(&["--control", path]));
    assert_eq!(code, 0, "{out}{err}");
    let pid = fwd.pid();
    for want in [
        format!("tcpfwd {}, pid {pid}, up ", env!("CARGO_PKG_VERSION")),
        format!("  127.0.0.1:0 on {to}"),
        format!("    default -> {echo}: 2 open, 2 since start"),
        "certificates:".to_string(),
        "  localhost (CN=tcpfwd test leaf): expires ".to_string(),
        " days left".to_string(),
        "acme: off".to_string(),
        "last reload: none since start".to_string(),
        "banned sources: 1\n  127.0.0.2 for ".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} not in:\n{out}");
    }

    // A reload, then the JSON document.
    fwd.signal(libc::SIGHUP);
    fwd.wait_for_async(
        |e| msg(e) == "certificate reloaded; new handshakes get it",
        1,
        T,
    )
    .await;
    let (code, out, err) = tokio::task::block_in_place(|| status(&["--control", path]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(" ago), ok\n"), "{out}");
    assert!(out.contains("last reload: "), "{out}");
    let (code, out, err) = tokio::task::block_in_place(|| status(&["--control", path, "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["protocol"], 1);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["pid"], pid);
    let route = &v["frontends"][0]["routes"][0];
    assert_eq!(route["name"], "default");
    assert_eq!(route["open"], 2);
    assert_eq!(route["opened"], 2);
    assert_eq!(v["frontends"][0]["addresses"][0], to.to_string());
    let cert = &v["certificates"][0];
    assert!(cert["days_left"].as_i64().unwrap() > 300, "{cert}");
    assert_eq!(cert["names"][0], "localhost");
    assert!(v["acme"].is_null());
    assert_eq!(v["last_reload"]["ok"], true);
    assert_eq!(v["banned"]["total"], 1);
    assert_eq!(v["banned"]["top"][0]["source"], "127.0.0.2");
    let left = v["banned"]["top"][0]["seconds_left"].as_u64().unwrap();
    assert!((250..=300).contains(&left), "{left}");

    // Asking never stalls connections: they keep flowing.
    for s in &mut held {
        s.write_all(b"pong").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
    }
    drop(held);

    // Another user: refused, in one line.
    let out = tokio::task::block_in_place(|| {
        common::as_nobody()
            .args(["status", "--control", path])
            .output()
            .expect("run tcpfwd status as nobody")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!("tcpfwd: error: permission denied on control socket {path}: run tcpfwd status as root or as the user tcpfwd runs as\n")
    );
    assert!(out.stdout.is_empty());

    // A clean stop removes the socket.
    let mut fwd = fwd;
    fwd.signal(libc::SIGTERM);
    assert!(fwd.wait_exit(T).is_some_and(|s| s.success()));
    assert!(!control.exists(), "the control socket outlived tcpfwd");
}

/// What `tcpfwd status` says when there is no socket at `path`.
fn no_socket(path: &str) -> String {
    format!(
        "tcpfwd: error: no control socket at {path}: no tcpfwd is running with it (under systemd it is $RUNTIME_DIRECTORY/control while the service runs; a tcpfwd started by hand has one only with --control PATH: give tcpfwd status the same --control PATH)\n"
    )
}

#[test]
fn no_instance_is_one_line() {
    let dir = open_dir("status-none");
    let control = dir.join("control");
    let path = control.to_str().unwrap();
    let want = no_socket(path);
    let (code, out, err) = status(&["--control", path]);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", want.as_str()));
    // A socket nobody listens on any more (a crash's leftover) is told apart.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let (code, _, err) = status(&["--control", path]);
    let stale = format!(
        "tcpfwd: error: nothing answers on control socket {path} (left by a tcpfwd that has stopped): start tcpfwd, or pass the running one's --control PATH to tcpfwd status\n"
    );
    assert_eq!((code, err.as_str()), (1, stale.as_str()));
    std::fs::remove_file(&control).unwrap();
    // And the control path from a configuration file.
    let file = dir.join("tcpfwd.toml");
    std::fs::write(
        &file,
        format!("control = \"{path}\"\n[[frontend]]\nlisten = \"127.0.0.1:0\"\n  [[frontend.route]]\n  backend = \"127.0.0.1:9\"\n"),
    )
    .unwrap();
    let (code, _, err) = status(&["--config", file.to_str().unwrap()]);
    assert_eq!((code, err.as_str()), (1, want.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_socket_is_in_the_runtime_directory() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let dir = open_dir("status-runtime");
    let mut cmd = command(&pki, echo);
    cmd.env("RUNTIME_DIRECTORY", dir.path());
    let fwd = Tcpfwd::spawn(cmd);
    let ready = fwd.wait_for(|e| msg(e) == "control socket open for tcpfwd status", 1, T);
    assert_eq!(ready[0]["path"], dir.join("control").to_str().unwrap());
    fwd.wait_for(|e| msg(e) == "ready", 1, T);
    // `tcpfwd status` finds it there too, with no option.
    let out = status_in_runtime_dir(dir.path(), &["--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], fwd.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_by_hand_there_is_none_unless_asked() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let mut cmd = command(&pki, echo);
    cmd.env_remove("RUNTIME_DIRECTORY");
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "ready", 1, T);
    assert!(
        !fwd.events()
            .iter()
            .any(|e| msg(e).contains("control socket")),
        "{}",
        fwd.stderr()
    );
    // `tcpfwd status` with no option then finds no socket in its default
    // place (here $RUNTIME_DIRECTORY, an empty directory) and says what to do.
    let dir = open_dir("status-by-hand");
    let out = status_in_runtime_dir(dir.path(), &[]);
    let want = no_socket(dir.join("control").to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), want);
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_leftover_is_replaced_and_a_live_one_is_not() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let dir = open_dir("status-stale");
    let control = dir.join("control");
    let path = control.to_str().unwrap();
    let mut first = start(&pki, echo, &control, &[]);
    // A second instance on the same socket: refused at start, in one line.
    let (code, out) = tokio::task::block_in_place(|| {
        run_to_exit(&["--map", &format!("127.0.0.1:0:{echo}"), "--control", path])
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "another tcpfwd answers on control socket {path}: stop it, or give this one another --control"
        )),
        "{out}"
    );
    // A crash leaves the socket behind; the next start takes it over.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(control.exists());
    let second = start(&pki, echo, &control, &[]);
    second.wait_for(
        |e| msg(e) == "removed a stale control socket (left by a crash?)",
        1,
        T,
    );
    let (code, out, err) = tokio::task::block_in_place(|| status(&["--control", path, "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pid"], second.pid());
}
