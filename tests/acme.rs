//! ACME against a real CA: Pebble on loopback, the real binary, openssl s_client.

mod common;
#[path = "common/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backends, msg, require_tool, run_to_exit, Tcpfwd, TempDir};
use pebble::{free_port, Pebble};
use serde_json::Value;

const NAMES: [&str; 2] = ["cams.example.org", "dvr.example.org"];
const ISSUE: Duration = Duration::from_secs(90);

/// tcpfwd in front of `backend` on the validation port and on a second, ephemeral one.
fn tcpfwd_args(pebble: &Pebble, state: &Path, backend: std::net::SocketAddr) -> Vec<String> {
    let mut args = vec![
        "--map".to_string(),
        format!("127.0.0.1:{}:{backend}", pebble.tls_port),
        "--map".into(),
        format!("127.0.0.1:0:{backend}"),
        "--acme-directory".into(),
        pebble.directory_url(),
        "--acme-ca-root".into(),
        pebble.ca_root().to_str().unwrap().into(),
        "--acme-email".into(),
        "ops@example.org".into(),
        "--state-dir".into(),
        state.to_str().unwrap().into(),
    ];
    for n in NAMES {
        args.push("--acme-domain".into());
        args.push(n.into());
    }
    args
}

fn start(args: &[String]) -> Tcpfwd {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tcpfwd::start(&args)
}

fn issued(e: &Value) -> bool {
    msg(e).starts_with("certificate issued")
}

/// The CA's sub-directory of the state directory (named after the directory URL).
fn ca_dir(state: &Path, pebble: &Pebble) -> std::path::PathBuf {
    state.join(format!(
        "{}_{}_dir",
        pebble.listen.ip(),
        pebble.listen.port()
    ))
}

/// `openssl s_client` against `port` for `name`, verifying against `root`; returns its output.
fn s_client(port: u16, name: &str, root: &Path) -> String {
    require_tool("openssl");
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", name, "-verify_hostname", name])
        .arg("-CAfile")
        .arg(root)
        .args(["-verify_return_error", "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The SHA-256 fingerprint of the certificate served on `port` for `name`, as tcpfwd logs it.
fn served_fingerprint(port: u16, name: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {name} </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_issuance_on_two_maps_then_restart_reuses_it() {
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start();
    let state = TempDir::new("acme-state");
    let args = tcpfwd_args(&pebble, state.path(), backend);

    let fwd = start(&args);
    // The placeholder is served at once, and the terms of service are named.
    assert!(fwd
        .events()
        .iter()
        .any(|e| msg(e).starts_with("serving a self-signed placeholder")));
    let ev = fwd.wait_for(issued, 1, ISSUE).remove(0);
    let tos = fwd
        .events()
        .into_iter()
        .find(|e| msg(e).starts_with("using ACME CA"))
        .expect("directory logged");
    assert!(
        tos["terms_of_service"]
            .as_str()
            .unwrap()
            .starts_with("data:text/plain"),
        "{tos}"
    );
    for n in NAMES {
        assert!(ev["names"].as_str().unwrap().contains(n), "{ev}");
    }

    let root = pebble.dir.join("root.pem");
    std::fs::write(&root, pebble.root_pem().await).unwrap();
    for i in 0..2 {
        let port = fwd.addr(i).port();
        for name in NAMES {
            let out = s_client(port, name, &root);
            assert!(
                out.contains("Verify return code: 0 (ok)"),
                "map {i} {name}:\n{out}"
            );
        }
    }
    let fp = ev["sha256"].as_str().unwrap().to_string();
    assert_eq!(served_fingerprint(fwd.addr(1).port(), NAMES[0]), fp);

    // State: directory 0700, files 0600.
    let ca = ca_dir(state.path(), &pebble);
    assert_eq!(mode(state.path()), 0o700);
    assert_eq!(mode(&ca), 0o700);
    for f in ["account.json", "cert.pem", "key.pem"] {
        assert_eq!(mode(&ca.join(f)), 0o600, "{f}");
    }

    // A second tcpfwd on the same state directory is refused.
    let mut second = args.clone();
    second[1] = "127.0.0.1:0:127.0.0.1:9".into();
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let (code, err) = run_to_exit(&second);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another tcpfwd"), "{err}");

    // Restart: the stored certificate is served at once, no new order.
    drop(fwd);
    let orders = pebble.orders();
    assert_eq!(orders, 1, "{}", pebble.log());
    let fwd = start(&args);
    let served = fwd
        .events()
        .into_iter()
        .find(|e| msg(e) == "serving the stored certificate")
        .expect("stored certificate served");
    assert_eq!(served["sha256"], fp.as_str());
    assert_eq!(served_fingerprint(fwd.addr(0).port(), NAMES[1]), fp);
    fwd.wait_for(
        |e| msg(e) == "renewal scheduled",
        1,
        Duration::from_secs(20),
    );
    assert!(!fwd
        .events()
        .iter()
        .any(|e| msg(e) == "ordering a certificate"));
    assert_eq!(pebble.orders(), orders);
}
