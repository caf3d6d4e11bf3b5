//! `--config FILE` end to end: a file serves, every kind of mistake in one
//! gives FILE:LINE:COLUMN and exit 2, `tcpfwd check` reads it, and the
//! command line combines with it as the README says.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backends, free_port, msg, run_to_exit, tls_connect, Pki, Tcpfwd, TempDir, BIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes `text` as `tcpfwd.toml` in `dir`; returns its path.
fn write(dir: &TempDir, text: &str) -> PathBuf {
    let path = dir.join("tcpfwd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_fails(args: &[&str], want: &[&str]) {
    let (code, out) = run_to_exit(args);
    assert_eq!(code, 2, "exit code; output:\n{out}");
    for w in want {
        assert!(out.contains(w), "expected {w:?} in:\n{out}");
    }
    assert!(!out.contains("panicked"), "panic in:\n{out}");
    assert!(
        !out.contains("Usage:"),
        "a file's error is not a usage error:\n{out}"
    );
}

/// A file with the PKI's pair copied beside it (relative paths), a named
/// route for localhost and a default route, on a fixed loopback port.
fn two_route_file(dir: &TempDir, pki: &Pki, port: u16, named: &str, default: &str) -> PathBuf {
    std::fs::copy(&pki.cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(&pki.key, dir.join("key.pem")).unwrap();
    write(
        dir,
        &format!(
            r#"# everything on one thread, so that events come in order
threads = 1
max_connections = 64
shutdown_timeout = "1s"
cipher_preference = "aes"
log_level = "debug"
log_format = "json"
handshake_timeout = "5s"
connect_timeout = "2s"
idle_timeout = "1h"
close_timeout = "10s"

[[cert]]
cert = "cert.pem"
key = "key.pem"

[[frontend]]
listen = "127.0.0.1:{port}"

  [[frontend.route]]
  sni = ["localhost"]
  backend = "{named}"
  idle_timeout = "1h"

  [[frontend.route]]
  backend = "{default}"
"#
        ),
    )
}

/// Starts tcpfwd on a file (and more arguments), waiting for `frontends` listeners.
fn start(file: &Path, more: &[&str], frontends: usize) -> Tcpfwd {
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", s(file)])
        .args(more)
        .env_remove("RUST_LOG");
    let t = Tcpfwd::spawn(cmd);
    t.wait_for(
        |e| msg(e) == "listening",
        frontends,
        Duration::from_secs(20),
    );
    t
}

async fn round_trip(
    pki: &Pki,
    port: u16,
    name: &str,
    data: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut tls = tls_connect(pki.client_config(), addr, name).await.unwrap();
    tls.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    tls
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_file_starts_and_forwards_by_name() {
    let pki = Pki::new();
    let dir = TempDir::new("cfg-full");
    let (named, _) = backends::fixed_reply("127.0.0.1:0", b"named backend").await;
    let default = backends::echo().await;
    let port = free_port();
    let file = two_route_file(&dir, &pki, port, &named.to_string(), &default.to_string());
    let t = start(&file, &[], 1);

    let addr = ([127, 0, 0, 1], port).into();
    let mut tls = tls_connect(pki.client_config(), addr, "localhost")
        .await
        .unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"named backend");
    drop(tls);
    // No SNI (an IP address): the default route.
    drop(round_trip(&pki, port, "127.0.0.1", b"to the default").await);
    let ev = t.wait_for(
        |e| msg(e) == "connection closed",
        2,
        Duration::from_secs(10),
    );
    let routes: Vec<&str> = ev.iter().map(|e| e["route"].as_str().unwrap()).collect();
    assert!(
        routes.contains(&"localhost") && routes.contains(&"default"),
        "{ev:?}"
    );
}

#[test]
fn each_kind_of_mistake_names_its_place() {
    let dir = TempDir::new("cfg-bad");
    let f = dir.join("tcpfwd.toml");
    let at = |l: usize, c: usize| format!("{}:{l}:{c}: ", f.display());
    let route = "[[frontend]]\nlisten = \"127.0.0.1:0\"\n  [[frontend.route]]\n  backend = \"127.0.0.1:9\"\n";
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            "threads = 1\nlog_level = info\n".into(),
            vec![at(2, 13), "invalid TOML".into(), "2 | log_level = info".into()],
        ),
        (
            format!("idle_timout = \"5s\"\n{route}"),
            vec![
                at(1, 1),
                "unknown key `idle_timout`; did you mean `idle_timeout`?".into(),
            ],
        ),
        (
            format!("{route}  conect_timeout = \"5s\"\n"),
            vec![at(5, 3), "did you mean `connect_timeout`?".into()],
        ),
        (
            format!("{route}  close_timeout = \"10\"\n"),
            vec![
                at(5, 19),
                "`close_timeout` = \"10\"".into(),
                "expected a duration like 500ms, 10s, 5m or 1h30m".into(),
            ],
        ),
        (
            format!("{route}  [[frontend.route]]\n  sni = [\"a.example.org\", \"a..b\"]\n  backend = \"127.0.0.1:9\"\n"),
            vec![at(6, 27), "`sni`: route name 'a..b'".into()],
        ),
        (
            "[[frontend]]\nlisten = \"127.0.0.1:0\"\n  [[frontend.route]]\n  sni = [\"a.example.org\"]\n  backend = \"127.0.0.1:9\"\n  [[frontend.route]]\n  sni = [\"A.example.org\"]\n  backend = \"127.0.0.1:10\"\n"
                .into(),
            vec![
                "two routes for 'a.example.org'".into(),
                format!("{}:3:3", f.display()),
                format!("{}:6:3", f.display()),
            ],
        ),
        (
            format!("{route}[[frontend]]\nlisten = \"127.0.0.1:0\"\n"),
            vec![
                format!("frontend 127.0.0.1:0 ({}:5:1) has no routes", f.display()),
                "[[frontend.route]]".into(),
            ],
        ),
    ];
    for (text, want) in cases {
        write(&dir, &text);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_fails(&["--config", s(&f)], &want);
        assert_fails(&["check", "--config", s(&f)], &want);
    }
    assert_fails(
        &["--config", s(&dir.join("missing.toml"))],
        &["cannot read", "missing.toml", "tcpfwd's user may read it"],
    );
}

#[test]
fn a_route_name_no_certificate_covers() {
    let pki = Pki::new();
    let dir = TempDir::new("cfg-cover");
    let f = write(
        &dir,
        &format!(
            "[[cert]]\ncert = \"{}\"\nkey = \"{}\"\n\n[[frontend]]\nlisten = \"127.0.0.1:0\"\n  [[frontend.route]]\n  sni = [\"nas.example.org\"]\n  backend = \"127.0.0.1:9\"\n",
            s(&pki.cert),
            s(&pki.key)
        ),
    );
    let want = [
        "route 'nas.example.org'",
        &format!("{}:7:3", f.display()),
        "covered by no certificate",
    ];
    assert_fails(&["--config", s(&f)], &want);
    assert_fails(&["check", "--config", s(&f)], &want);
}

#[test]
fn check_prints_one_line_per_frontend() {
    let dir = TempDir::new("cfg-check");
    let (a, b) = (free_port(), free_port());
    let text = format!(
        "[[frontend]]\nlisten = \"127.0.0.1:{a}\"\n  [[frontend.route]]\n  backend = \"127.0.0.1:9\"\n  proxy_protocol = \"v2\"\n  [[frontend.route]]\n  sni = [\"nas.example.org\"]\n  backend = \"nas.lan:5000\"\n\n[[frontend]]\nlisten = \"127.0.0.1:{b}\"\n  [[frontend.route]]\n  backend = \"127.0.0.1:7681\"\n"
    );
    let f = write(&dir, &text);
    let (code, out) = run_to_exit(&["check", "--config", s(&f)]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("frontend ")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains(&format!("127.0.0.1:{a}")), "{out}");
    assert!(
        lines[0].contains("(PROXY v2)") && lines[0].contains("nas.example.org -> nas.lan:5000"),
        "{out}"
    );
    assert!(lines[1].contains(&format!("127.0.0.1:{b}")), "{out}");
    assert!(
        out.contains("configuration OK: 2 frontend(s), 3 route(s)"),
        "{out}"
    );

    // The same file through the environment, as /etc/default/tcpfwd can set it.
    let out = Command::new(BIN)
        .arg("check")
        .env("TCPFWD_CONFIG", &f)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // A port in use fails the check.
    let held = std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
    assert_fails(
        &["check", "--config", s(&f)],
        &[&format!("127.0.0.1:{a}"), "in use"],
    );
    drop(held);
}

#[test]
fn a_map_on_the_files_address_joins_its_frontend() {
    let dir = TempDir::new("cfg-map");
    let port = free_port();
    let f = write(
        &dir,
        &format!(
            "[[frontend]]\nlisten = \"127.0.0.1:{port}\"\n  [[frontend.route]]\n  backend = \"127.0.0.1:9\"\n"
        ),
    );
    let map = format!("127.0.0.1:{port}:nas.example.org=nas.lan:5000");
    let (code, out) = run_to_exit(&["check", "--config", s(&f), "--map", &map]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("frontend ")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("default -> 127.0.0.1:9")
            && lines[0].contains("nas.example.org -> nas.lan:5000"),
        "{out}"
    );
    // A second default route on it is refused, naming both places.
    let (code, out) = run_to_exit(&[
        "check",
        "--config",
        s(&f),
        "--map",
        &format!("127.0.0.1:{port}:127.0.0.1:10"),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("two default routes") && out.contains(&format!("{}:3:3", f.display())),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_on_the_command_line_replaces_the_files_default_only() {
    let pki = Pki::new();
    let dir = TempDir::new("cfg-idle");
    let named = backends::echo().await;
    let default = backends::echo().await;
    let port = free_port();
    // The file: idle 1h at the top level and on the localhost route.
    let file = two_route_file(&dir, &pki, port, &named.to_string(), &default.to_string());
    let t = start(&file, &["--idle-timeout", "300ms"], 1);

    // The route with its own value first, then one that inherits the top level's.
    let mut own = round_trip(&pki, port, "localhost", b"own").await;
    let _inherits = round_trip(&pki, port, "127.0.0.1", b"inherits").await;
    let ev = t.wait_for(
        |e| msg(e) == "connection closed",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(ev[0]["route"], "default", "{ev:?}");
    assert_eq!(ev[0]["reason"], "idle timeout", "{ev:?}");
    // The localhost route, idle for longer than 300ms by now, still serves.
    own.write_all(b"still open").await.unwrap();
    let mut back = [0; 10];
    own.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still open");
    assert_eq!(t.closed().len(), 1, "{:?}", t.closed());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_file_and_a_bad_one_keeps_serving() {
    let pki = Pki::new();
    let dir = TempDir::new("cfg-hup");
    let (first, _) = backends::fixed_reply("127.0.0.1:0", b"first").await;
    let (second, _) = backends::fixed_reply("127.0.0.1:0", b"second").await;
    let port = free_port();
    let named = first.to_string();
    let file = two_route_file(&dir, &pki, port, &named, &first.to_string());
    let t = start(&file, &[], 1);
    let reply = |name: &'static str| {
        let config = pki.client_config();
        async move {
            let addr = ([127, 0, 0, 1], port).into();
            let mut tls = tls_connect(config, addr, name).await.unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            got
        }
    };
    assert_eq!(reply("127.0.0.1").await, b"first");

    two_route_file(&dir, &pki, port, &named, &second.to_string());
    t.signal(libc::SIGHUP);
    t.wait_for_async(
        |e| msg(e) == "configuration reloaded; new connections get it",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reply("127.0.0.1").await, b"second");

    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("threads = 1", "threads = one")).unwrap();
    t.signal(libc::SIGHUP);
    let ev = t
        .wait_for_async(
            |e| msg(e).starts_with("reload failed"),
            1,
            Duration::from_secs(10),
        )
        .await;
    let m = msg(&ev[0]).to_string();
    assert!(m.contains(&format!("{}:2:11", file.display())), "{m}");
    assert_eq!(reply("127.0.0.1").await, b"second");
}
