//! Native journal logging: with `JOURNAL_STREAM` naming its standard error and
//! no `--log-format`, tcpfwd sends its events to the journal socket with one
//! field per event field; with `--log-format`, it writes to standard error.
//!
//! The journal is a stand-in: a datagram socket at the journal's path, in a
//! private mount namespace (`unshare -m`, a tmpfs on /run), so the host's
//! journal is neither used nor needed. The test binary runs itself in there.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, TempDir, BIN};

const HELPER_ENV: &str = "TCPFWD_JOURNAL_HELPER";
const SOCKET: &str = "/run/systemd/journal/socket";

#[test]
fn events_go_to_the_journal_with_their_fields() {
    require_tool("unshare");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("timeout")
        .args([
            "60",
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg("mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([
            "--exact",
            "journal_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helper failed:\n{text}");
    assert!(text.contains("1 passed"), "helper did not run:\n{text}");
}

/// One journal entry from the native protocol: `KEY=value\n`, or
/// `KEY\n` + 64-bit little-endian length + value + `\n` for binary values.
fn parse_entry(mut b: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            b = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

/// Does its work only inside the private namespace (the test above starts it
/// there with HELPER_ENV set); elsewhere it returns at once. Not `#[ignore]`d:
/// CI runs every test.
#[test]
fn journal_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let journal = UnixDatagram::bind(SOCKET).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let dir = TempDir::new("journal");
    let stderr_path = dir.join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["--map", "127.0.0.1:0:127.0.0.1:9", "--log-level", "info"])
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut listen = None;
    let mut ready = None;
    let mut connected = false;
    let found = loop {
        if Instant::now() > deadline {
            break None;
        }
        let Ok(n) = journal.recv(&mut buf) else {
            continue;
        };
        if n == 0 {
            // tracing-journald's probe at start; the journal discards it.
            continue;
        }
        let e = parse_entry(&buf[..n]);
        match e.get("MESSAGE").map(String::as_str) {
            Some("listening") => listen = Some(e["LISTEN"].clone()),
            Some("ready") => ready = Some(e.clone()),
            _ => {}
        }
        // Like a user, connect once tcpfwd says it is ready (it logs
        // "listening" first, and a connection may end before "ready").
        if let (Some(addr), Some(_), false) = (&listen, &ready, connected) {
            // Not TLS: the handshake fails, and the connection is logged.
            let mut s = std::net::TcpStream::connect(addr.as_str()).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
            connected = true;
        }
        let done = e.get("MESSAGE").map(String::as_str) == Some("connection closed");
        entries.push(e);
        if done {
            break entries.last().cloned();
        }
    };
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let e = found.unwrap_or_else(|| panic!("no connection closed entry; got {entries:#?}"));
    assert_eq!(e["REASON"], "handshake failed", "{e:#?}");
    assert!(e["PEER"].starts_with("127.0.0.1:"), "{e:#?}");
    assert_eq!(e["PEER_IP"], "127.0.0.1", "{e:#?}");
    assert_eq!(e["PRIORITY"], "5", "{e:#?}");
    assert_eq!(e["SYSLOG_IDENTIFIER"], "tcpfwd", "{e:#?}");
    assert!(e.contains_key("DETAIL"), "{e:#?}");
    let ready = ready.unwrap_or_else(|| panic!("no ready entry in {entries:#?}"));
    assert_eq!(ready["PRIORITY"], "5");
    let written = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        written.is_empty(),
        "standard error should be unused: {written}"
    );

    // An explicit --log-format wins: JSON on standard error, nothing sent.
    // What the first one sent as it stopped is read away first.
    journal
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while journal.recv(&mut buf).is_ok() {}
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["--map", "127.0.0.1:0:127.0.0.1:9", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut written = String::new();
    while Instant::now() < deadline && !written.contains("\"ready\"") {
        std::thread::sleep(Duration::from_millis(50));
        written = std::fs::read_to_string(&stderr_path).unwrap();
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    assert!(written.contains("\"message\":\"ready\""), "{written}");
    assert!(
        journal.recv(&mut buf).is_err(),
        "an explicit --log-format sent to the journal"
    );
}
