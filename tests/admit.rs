//! Linked admission on the real binary, the founding case on loopback: the
//! page port asks for a family certificate (`curl --cert` from 127.0.0.2),
//! the WebSocket port (`--admit-after`) then admits 127.0.0.2 without one;
//! 127.0.0.3, which did not pass, is refused before any TLS byte; a
//! revocation refuses 127.0.0.2 again and closes its open admitted
//! connection; a short window expires; a bad reference in the file says where.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::{backends, free_port, msg, Pki, Tcpfwd, TempDir, BIN};

const T: Duration = Duration::from_secs(20);

const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `tcpfwd client-cert new NAME` into `dir`, as one PEM file (certificate
/// and key) for curl.
fn issue(state: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = Command::new(BIN)
        .args(["client-cert", "new", name, "--out-dir"])
        .arg(dir)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let pw = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Password: "))
        .unwrap_or_else(|| panic!("no password in: {text}"));
    let pem = dir.join(format!("{name}.pem"));
    let ok = Command::new("openssl")
        .args(["pkcs12", "-nodes", "-passin", &format!("pass:{pw}"), "-in"])
        .arg(dir.join(format!("{name}.p12")))
        .arg("-out")
        .arg(&pem)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkcs12");
    pem
}

fn revoke(state: &Path, name: &str) {
    let out = Command::new(BIN)
        .args(["client-cert", "revoke", name, "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The page over `curl --cert` from `from`; true when the backend answered.
fn curl_page(from: &str, port: u16, cert: &Path) -> bool {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--interface",
            from,
            "--cert",
        ])
        .arg(cert)
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello")
}

/// A TCP connection to `to` from `from` (bound before connecting).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// A TLS connection (no client certificate) from `from`, one echo round trip done.
async fn admitted_from(
    cfg: &Arc<rustls::ClientConfig>,
    from: IpAddr,
    to: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = connect_from(from, to).await;
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = tokio::time::timeout(
        T,
        tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap_or_else(|e| panic!("{from} was not admitted: {e}"));
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&b, b"ping");
    s
}

/// Sends a real ClientHello from `from`; true when the connection was closed
/// without a single byte in answer (no ServerHello, no alert).
async fn refused_silently(from: IpAddr, to: SocketAddr) -> bool {
    let mut tcp = connect_from(from, to).await;
    // Only its first flight is sent: no roots needed.
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    match tokio::time::timeout(T, tcp.read_to_end(&mut answer)).await {
        Ok(Ok(0)) => true,
        Ok(Ok(_)) => false,
        // A reset is a close without an answer too.
        Ok(Err(_)) => answer.is_empty(),
        Err(_) => panic!("{from}: neither answered nor closed"),
    }
}

fn start(
    pki: &Pki,
    state: &Path,
    page: u16,
    page_backend: SocketAddr,
    ws_backend: SocketAddr,
    extra: &[&str],
) -> Tcpfwd {
    let page_map = format!("127.0.0.1:{page}:{page_backend}");
    let ws_map = format!("127.0.0.1:0:{ws_backend}");
    let admit = format!("127.0.0.1:{page}");
    let mut args = vec![
        "--map",
        &page_map,
        "--map",
        &ws_map,
        "--client-auth",
        "family",
        "--admit-after",
        &admit,
        "--state-dir",
        state.to_str().unwrap(),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--refusal-log-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    Tcpfwd::start(&args)
}

/// The sum of `field` over the refusal summaries so far.
fn summed(fwd: &Tcpfwd, field: &str) -> u64 {
    fwd.events()
        .iter()
        .filter(|e| msg(e) == "refused connections")
        .map(|e| e[field].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_port_admits_the_address_that_passed_the_page_port() {
    common::require_tool("openssl");
    common::require_tool("curl");
    let tmp = TempDir::new("admit");
    let state = tmp.join("state");
    let anna = issue(&state, tmp.path(), "anna-phone");
    let pki = Pki::new();
    let (web, _) = backends::fixed_reply("127.0.0.1:0", REPLY).await;
    let echo = backends::echo().await;
    let page = free_port();
    let fwd = start(&pki, &state, page, web, echo, &[]);
    let ws = fwd.addr(1);
    let cfg = pki.client_config();

    // Nobody has passed the page port yet: refused before any TLS byte.
    assert!(refused_silently(ip("127.0.0.2"), ws).await);
    // 127.0.0.2 passes the page port with its family certificate...
    assert!(tokio::task::block_in_place(|| curl_page(
        "127.0.0.2",
        page,
        &anna
    )));
    // ...so its WebSocket port connections, with no certificate, are admitted.
    let mut open = admitted_from(&cfg, ip("127.0.0.2"), ws).await;
    let closed = fwd
        .wait_for_async(
            move |e| {
                msg(e) == "connection closed"
                    && e["client_cn"] == "anna-phone"
                    && e["peer_ip"] == "127.0.0.2"
            },
            1,
            T,
        )
        .await;
    assert!(closed[0]["map"]
        .as_str()
        .unwrap()
        .contains(&web.to_string()));
    // 127.0.0.3 did not pass: refused, and without a log line of its own.
    assert!(refused_silently(ip("127.0.0.3"), ws).await);
    assert!(refused_silently(ip("127.0.0.3"), ws).await);
    let summary = fwd
        .wait_for_async(
            |e| msg(e) == "refused connections" && e["not_admitted"].as_u64() > Some(0),
            1,
            T,
        )
        .await;
    assert!(
        summary[0]["reasons"]
            .as_str()
            .unwrap()
            .contains("not_admitted="),
        "{}",
        summary[0]
    );
    // Wait for the summary that counts all three refusals.
    let deadline = std::time::Instant::now() + T;
    while summed(&fwd, "not_admitted") < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", fwd.stderr());
        let seen = fwd.events().len();
        fwd.wait_for_async(|_| true, seen + 1, T).await;
    }
    assert!(
        !fwd.closed().iter().any(|e| e["peer_ip"] == "127.0.0.3"),
        "a refused connection was logged"
    );

    // Revoking the certificate refuses 127.0.0.2 again at once (the CRL
    // poll) and closes its open admitted connection.
    tokio::task::block_in_place(|| revoke(&state, "anna-phone"));
    let mut sink = Vec::new();
    let read = tokio::time::timeout(T, open.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the admitted connection is still open");
    let loaded = fwd
        .wait_for_async(|e| msg(e) == "CRL loaded; new handshakes get it, open connections with revoked certificates are closed" && e["closed"] == 1, 1, T)
        .await;
    assert_eq!(loaded[0]["admissions_removed"], 1, "{}", loaded[0]);
    let closed = fwd
        .wait_for_async(
            |e| {
                msg(e) == "connection closed"
                    && e["reason"] == "client certificate revoked"
                    && e["peer_ip"] == "127.0.0.2"
            },
            1,
            T,
        )
        .await;
    assert!(closed[0]["map"]
        .as_str()
        .unwrap()
        .contains(&echo.to_string()));
    assert!(refused_silently(ip("127.0.0.2"), ws).await);
    // The revoked certificate cannot pass the page port to be admitted again.
    assert!(!tokio::task::block_in_place(|| curl_page(
        "127.0.0.2",
        page,
        &anna
    )));
    assert!(refused_silently(ip("127.0.0.2"), ws).await);
    // A certificate still good admits again.
    let ben = issue(&state, tmp.path(), "ben-laptop");
    assert!(tokio::task::block_in_place(|| curl_page(
        "127.0.0.2",
        page,
        &ben
    )));
    drop(admitted_from(&cfg, ip("127.0.0.2"), ws).await);
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_ends_with_its_window() {
    common::require_tool("openssl");
    common::require_tool("curl");
    let tmp = TempDir::new("admit-window");
    let state = tmp.join("state");
    let anna = issue(&state, tmp.path(), "anna-phone");
    let pki = Pki::new();
    let (web, _) = backends::fixed_reply("127.0.0.1:0", REPLY).await;
    let echo = backends::echo().await;
    let page = free_port();
    let fwd = start(&pki, &state, page, web, echo, &["--admit-window", "2s"]);
    let ws = fwd.addr(1);
    assert!(tokio::task::block_in_place(|| curl_page(
        "127.0.0.2",
        page,
        &anna
    )));
    drop(admitted_from(&pki.client_config(), ip("127.0.0.2"), ws).await);
    // Two seconds after the handshake the address is refused again (bounded:
    // at most 40 tries, a quarter of a second apart).
    let mut expired = false;
    for _ in 0..40 {
        if refused_silently(ip("127.0.0.2"), ws).await {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(expired, "still admitted ten seconds after a 2s window");
    // A new verified handshake admits it again.
    assert!(tokio::task::block_in_place(|| curl_page(
        "127.0.0.2",
        page,
        &anna
    )));
    drop(admitted_from(&pki.client_config(), ip("127.0.0.2"), ws).await);
    drop(fwd);
}

#[test]
fn a_reference_to_no_route_names_the_file_line_and_column() {
    let tmp = TempDir::new("admit-ref");
    let file = tmp.join("tcpfwd.toml");
    let (page, ws) = (free_port(), free_port());
    let text = format!(
        "state_dir = \"{}\"\nclient_auth = \"family\"\n\n[[frontend]]\nlisten = \"127.0.0.1:{page}\"\n  [[frontend.route]]\n  backend = \"dvr.lan:80\"\n\n[[frontend]]\nlisten = \"127.0.0.1:{ws}\"\n  [[frontend.route]]\n  backend = \"dvr.lan:7681\"\n  admit_after = \"8443\"\n",
        tmp.join("state").display()
    );
    std::fs::write(&file, text).unwrap();
    let (code, out) = common::run_to_exit(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let want = format!(
        "{}:13:17: `admit_after` = \"8443\": no frontend listens on 8443",
        file.display()
    );
    assert!(out.contains(&want), "want {want:?} in:\n{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    // Fixed, `check` shows the link.
    let fixed = std::fs::read_to_string(&file)
        .unwrap()
        .replace("\"8443\"", &format!("\"{page}\""));
    std::fs::write(&file, fixed).unwrap();
    let (code, out) = common::run_to_exit(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("admits sources that passed {page} within 12h")),
        "{out}"
    );
}
