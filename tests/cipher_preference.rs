//! The server's cipher order rules, and follows the CPU: a client offering
//! AES-GCM first (as browsers do) gets ChaCha20-Poly1305 when tcpfwd prefers it.
//! Checked with a real `openssl s_client`, over TLS 1.3 and TLS 1.2.

mod common;

use std::process::{Command, Stdio};

use common::{backends, msg, require_tool, Pki, Tcpfwd};
use serde_json::Value;

/// Both AEAD families, AES first: the order a browser on a PC sends.
const TLS13_OFFER: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
const TLS12_OFFER: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305";

/// The suite `openssl s_client` negotiates with `addr`, offering AES first.
fn negotiated(addr: std::net::SocketAddr, pki: &Pki, tls13: bool) -> String {
    require_tool("openssl");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
    ])
    .arg("-CAfile")
    .arg(&pki.ca)
    .arg("-verify_return_error");
    if tls13 {
        cmd.args(["-tls1_3", "-ciphersuites", TLS13_OFFER]);
    } else {
        cmd.args(["-tls1_2", "-cipher", TLS12_OFFER]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    // "New, TLSv1.3, Cipher is TLS_CHACHA20_POLY1305_SHA256"
    let line = text
        .lines()
        .find(|l| l.starts_with("New, "))
        .unwrap_or_else(|| {
            panic!(
                "no handshake; s_client said:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "certificate not verified:\n{text}"
    );
    line.rsplit(' ').next().unwrap().to_string()
}

/// Starts tcpfwd with `--cipher-preference pref` in front of an echo backend.
async fn start(pki: &Pki, pref: &str) -> (Tcpfwd, Value) {
    let backend = backends::echo().await;
    let map = format!("127.0.0.1:0:{backend}");
    let t = Tcpfwd::start(&[
        "--map",
        &map,
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--cipher-preference",
        pref,
    ]);
    let choice = t
        .events()
        .into_iter()
        .find(|e| msg(e) == "cipher preference")
        .unwrap_or_else(|| panic!("no 'cipher preference' log line:\n{}", t.stderr()));
    (t, choice)
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_preferences_override_the_client_order() {
    let pki = Pki::new();
    for (pref, tls13, tls12) in [
        (
            "aes",
            "TLS_AES_128_GCM_SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        (
            "chacha",
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ] {
        let (t, choice) = start(&pki, pref).await;
        let addr = t.addr(0);
        assert_eq!(
            negotiated(addr, &pki, true),
            tls13,
            "--cipher-preference {pref}, TLS 1.3"
        );
        assert_eq!(
            negotiated(addr, &pki, false),
            tls12,
            "--cipher-preference {pref}, TLS 1.2"
        );
        let want = if pref == "aes" {
            "AES_GCM"
        } else {
            "CHACHA20_POLY1305"
        };
        assert_eq!(choice["preferred"], want, "{choice}");
    }
}

/// Whether /proc/cpuinfo lists AES instructions, read independently of tcpfwd.
fn cpuinfo_has_aes() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    info.lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .any(|l| l.split_whitespace().any(|w| w == "aes"))
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_follows_the_cpu() {
    let pki = Pki::new();
    let (t, choice) = start(&pki, "auto").await;
    let aes = cpuinfo_has_aes();
    assert_eq!(
        choice["aes_hardware"], aes,
        "detection disagrees with /proc/cpuinfo: {choice}"
    );
    let (tls13, tls12) = if aes {
        ("TLS_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256")
    } else {
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        )
    };
    assert_eq!(negotiated(t.addr(0), &pki, true), tls13);
    assert_eq!(negotiated(t.addr(0), &pki, false), tls12);
}
