//! Key exchange with real clients: OpenSSL 3.5 (Debian 13, run from the
//! trixie tree of scripts/trixie-tree) negotiates the post-quantum hybrid
//! X25519MLKEM768, bookworm's OpenSSL 3.0 gets X25519, and a client that
//! offers only P-256 still connects. Each is checked on both sides: what
//! s_client reports and the `kx` field of tcpfwd's per-connection log line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backends, msg, require_tool, Pki, Tcpfwd};

const T: Duration = Duration::from_secs(20);

/// tcpfwd with the test PKI in front of an echo backend.
async fn start(pki: &Pki) -> Tcpfwd {
    let backend = backends::echo().await;
    Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{backend}"),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
    ])
}

/// Runs `openssl s_client` (through `chroot root` when given) against `fwd`,
/// verifying with the CA at `ca` (a path as the client sees it); returns its
/// stdout after checking that the handshake and verification succeeded.
fn s_client(fwd: &Tcpfwd, root: Option<&Path>, ca: &str, groups: Option<&str>) -> String {
    let mut cmd = match root {
        Some(root) => {
            let mut c = Command::new("chroot");
            c.arg(root).arg("openssl");
            c
        }
        None => Command::new("openssl"),
    };
    cmd.args(["s_client", "-connect", &fwd.addr(0).to_string()])
        .args(["-servername", "localhost", "-CAfile", ca])
        .args(["-verify_return_error", "-tls1_3"]);
    if let Some(g) = groups {
        cmd.args(["-groups", g]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("Verify return code: 0 (ok)") && stdout.contains("TLSv1.3"),
        "no verified TLS 1.3 handshake:\n{stdout}\n{stderr}"
    );
    stdout
}

/// The `kx` of tcpfwd's one "connection closed" line.
async fn logged_kx(fwd: &Tcpfwd) -> String {
    let closed = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["tls_version"], "TLSv1.3", "{}", closed[0]);
    closed[0]["kx"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookworm_openssl_gets_x25519() {
    require_tool("openssl");
    let pki = Pki::new();
    let fwd = start(&pki).await;
    let out = s_client(&fwd, None, pki.ca.to_str().unwrap(), None);
    assert!(out.contains("Server Temp Key: X25519"), "{out}");
    assert_eq!(logged_kx(&fwd).await, "X25519");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_only_p256_connects() {
    require_tool("openssl");
    let pki = Pki::new();
    let fwd = start(&pki).await;
    let out = s_client(&fwd, None, pki.ca.to_str().unwrap(), Some("P-256"));
    assert!(out.contains("Server Temp Key: ECDH, prime256v1"), "{out}");
    assert_eq!(logged_kx(&fwd).await, "secp256r1");
}

/// The Debian 13 tree from scripts/trixie-tree (debootstrapped once, then reused).
fn trixie_tree() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/trixie-tree");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/trixie-tree");
    assert!(
        out.status.success(),
        "scripts/trixie-tree failed (it needs root and the Debian archive)"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("trixie-tree printed no path"))
}

/// A copy of the test CA inside `root`, removed on drop.
struct CaInTree(PathBuf, String);

impl CaInTree {
    fn new(root: &Path, pki: &Pki, tag: &str) -> CaInTree {
        let inside = format!("/tmp/tcpfwd-test-ca-{}-{tag}.pem", std::process::id());
        let host = root.join(inside.trim_start_matches('/'));
        std::fs::write(&host, &pki.ca_pem).expect("copy the CA into the trixie tree");
        CaInTree(host, inside)
    }
}

impl Drop for CaInTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_openssl_negotiates_x25519mlkem768() {
    let root = tokio::task::spawn_blocking(trixie_tree).await.unwrap();
    let pki = Pki::new();
    let ca = CaInTree::new(&root, &pki, "pq");
    // OpenSSL 3.5's defaults (X25519MLKEM768 and X25519 key shares), then
    // a client offering the hybrid alone.
    for groups in [None, Some("X25519MLKEM768")] {
        let fwd = start(&pki).await;
        let out = s_client(&fwd, Some(&root), &ca.1, groups);
        assert!(
            out.contains("Negotiated TLS1.3 group: X25519MLKEM768"),
            "-groups {groups:?}:\n{out}"
        );
        assert_eq!(
            logged_kx(&fwd).await,
            "X25519MLKEM768",
            "-groups {groups:?}"
        );
    }
}
