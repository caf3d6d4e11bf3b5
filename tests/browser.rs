//! The founding case in a real browser: headless Chromium loads the DVR page
//! through one map and plays its WebSocket video through the other, over a
//! post-quantum key exchange (X25519MLKEM768); and linked admission, the page
//! with a family certificate admitting its WebSocket port.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{backends, msg, Tcpfwd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_the_dvr_page_and_plays_the_video() {
    common::require_tool("chromium");
    common::require_tool("node");
    let root = env!("CARGO_MANIFEST_DIR");
    let playwright = format!("{root}/target/browser/node_modules/playwright-core");
    assert!(
        std::path::Path::new(&playwright).exists(),
        "{playwright} is missing: run scripts/test, which installs it"
    );
    let web = backends::dvr_web().await;
    let video = backends::dvr_video(300, 4000).await;
    // The zero-setup default: the in-memory self-signed certificate.
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{web}"),
        "--map",
        &format!("127.0.0.1:0:{video}"),
    ]);
    let url = format!(
        "https://localhost:{}/?ws={}",
        fwd.addr(0).port(),
        fwd.addr(1).port()
    );
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(format!("{root}/tests/browser/dvr.cjs"))
            .arg(&url)
            .env("TCPFWD_PLAYWRIGHT", &playwright)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("status=200"), "{stdout}");
    assert!(stdout.contains("title=DVR"), "{stdout}");
    assert!(stdout.contains("frames=300 bad=0"), "{stdout}\n{stderr}");
    // The browser's connections went through both maps (each waited for by
    // its map: Chromium may open and close spare connections to the page's,
    // which end before a handshake and so have no TLS version).
    for (name, backend) in [("page", web.to_string()), ("video", video.to_string())] {
        let closed = fwd.wait_for(
            move |e| {
                msg(e) == "connection closed"
                    && e["map"].as_str().is_some_and(|m| m.ends_with(&backend))
                    && e["tls_version"] != ""
            },
            1,
            Duration::from_secs(30),
        );
        assert!(!closed.is_empty(), "no connection through the {name} map");
        // Chromium sends an X25519MLKEM768 key share; tcpfwd prefers it.
        for e in &closed {
            assert_eq!(e["kx"], "X25519MLKEM768", "{name} map: {e}");
            assert_eq!(e["tls_version"], "TLSv1.3", "{name} map: {e}");
        }
    }
}

/// `curl` to the WebSocket port from `from`, without a certificate: true
/// when a TLS handshake completed (any HTTP answer), false when refused.
fn curl_handshakes(from: &str, port: u16) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "--interface", from])
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    // 35: the TLS connection failed (closed during the handshake).
    out.status.code() != Some(35)
}

/// Linked admission in the real browser. What this proves, given how
/// Playwright presents client certificates (a SOCKS proxy inside Playwright,
/// see tests/browser/admit.cjs): the page's connection to the page port is
/// made by Playwright's proxy with the family certificate, from 127.0.0.1;
/// the WebSocket's connection to the admitting port is Chromium's own TLS
/// (tunnelled unchanged, so its key exchange is Chromium's X25519MLKEM768),
/// with no certificate, from the same 127.0.0.1, as a phone's page and
/// WebSocket come from the phone's one address. It does not show Chromium
/// declining to send a certificate on a WebSocket (Chromium never holds one
/// here); it shows that the admitting port lets the page's WebSocket in on
/// the strength of the page's verified handshake, and that after a
/// revocation a new WebSocket from the same page fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_a_family_certificate_gets_its_websocket_admitted() {
    common::require_tool("chromium");
    common::require_tool("node");
    common::require_tool("curl");
    let root = env!("CARGO_MANIFEST_DIR");
    let playwright = format!("{root}/target/browser/node_modules/playwright-core");
    assert!(
        std::path::Path::new(&playwright).exists(),
        "{playwright} is missing: run scripts/test, which installs it"
    );
    let tmp = common::TempDir::new("browser-admit");
    let state = tmp.join("state");
    // The modern PKCS#12: Node's OpenSSL 3 reads it without the legacy provider.
    let out = Command::new(common::BIN)
        .args(["client-cert", "new", "anna-phone", "--modern", "--out-dir"])
        .arg(tmp.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let password = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Password: "))
        .expect("a password")
        .to_string();
    let pfx = tmp.join("anna-phone.p12");

    let web = backends::dvr_web().await;
    let video = backends::dvr_video(300, 4000).await;
    let page = common::free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{page}:{web}"),
        "--map",
        &format!("127.0.0.1:0:{video}"),
        "--client-auth",
        "family",
        "--admit-after",
        &format!("127.0.0.1:{page}"),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let ws = fwd.addr(1).port();
    // Everything below waits on processes: off the runtime's workers, which
    // serve the backends.
    tokio::task::block_in_place(|| drive(&fwd, &state, &pfx, &password, page, ws, web, video));
}

#[allow(clippy::too_many_arguments)]
fn drive(
    fwd: &Tcpfwd,
    state: &std::path::Path,
    pfx: &std::path::Path,
    password: &str,
    page: u16,
    ws: u16,
    web: std::net::SocketAddr,
    video: std::net::SocketAddr,
) {
    use std::io::{BufRead, BufReader, Write};
    let root = env!("CARGO_MANIFEST_DIR");
    let playwright = format!("{root}/target/browser/node_modules/playwright-core");
    // Before the browser passes the page port, not even 127.0.0.1 gets in.
    assert!(!curl_handshakes("127.0.0.1", ws));

    let url = format!("https://127.0.0.1:{page}/?ws={ws}");
    let mut child = Command::new("node")
        .arg(format!("{root}/tests/browser/admit.cjs"))
        .args([&url, pfx.to_str().unwrap(), password])
        .env("TCPFWD_PLAYWRIGHT", &playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let next_line = |lines: &mut Vec<String>| -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).ok()?;
        lines.push(line.clone());
        Some(line)
    };
    while let Some(line) = next_line(&mut lines) {
        if line == "phase1-done" {
            break;
        }
    }
    let stderr_of = |child: &mut std::process::Child| {
        let _ = child.kill();
        let mut s = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    };
    if lines.last().map(String::as_str) != Some("phase1-done") {
        let err = stderr_of(&mut child);
        panic!("the page did not play: {lines:?}\n{err}");
    }
    assert!(lines.contains(&"status=200".to_string()), "{lines:?}");
    assert!(lines.contains(&"title=DVR".to_string()), "{lines:?}");
    assert!(lines.contains(&"frames=300 bad=0".to_string()), "{lines:?}");
    // The page's connection carried the certificate; the video's none, and
    // was Chromium's own TLS; both from Playwright's 127.0.0.1.
    let page_backend = web.to_string();
    let paged = fwd.wait_for(
        move |e| {
            msg(e) == "connection closed"
                && e["map"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(&page_backend))
                && e["client_cn"] == "anna-phone"
        },
        1,
        Duration::from_secs(30),
    );
    assert_eq!(paged[0]["peer_ip"], "127.0.0.1");
    let video_backend = video.to_string();
    let played = fwd.wait_for(
        move |e| {
            msg(e) == "connection closed"
                && e["map"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(&video_backend))
                && e["tls_version"] != ""
        },
        1,
        Duration::from_secs(30),
    );
    assert_eq!(played[0]["peer_ip"], "127.0.0.1");
    assert_eq!(played[0]["client_cn"], "");
    assert_eq!(played[0]["kx"], "X25519MLKEM768", "{}", played[0]);
    // A fresh source that did not pass the page port is refused.
    assert!(!curl_handshakes("127.0.0.3", ws));

    // Revoke; once the CRL is loaded, the page's next WebSocket fails.
    let out = Command::new(common::BIN)
        .args(["client-cert", "revoke", "anna-phone", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    fwd.wait_for(
        |e| msg(e).starts_with("CRL loaded") && e["admissions_removed"] == 1,
        1,
        Duration::from_secs(30),
    );
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    drop(stdin);
    let second = loop {
        match next_line(&mut lines) {
            Some(l) if l.starts_with("second: ") => break l,
            Some(_) => continue,
            None => {
                let err = stderr_of(&mut child);
                panic!("no second WebSocket result: {lines:?}\n{err}");
            }
        }
    };
    assert!(
        second.starts_with("second: opened=false frames=0 error=true"),
        "{second}"
    );
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{lines:?}\n{}", stderr_of(&mut child));
    assert!(!curl_handshakes("127.0.0.1", ws));
}
