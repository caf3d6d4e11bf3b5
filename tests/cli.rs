//! What a user sees for each usual first-run mistake: one clear line, the right
//! exit code, never a panic.

mod common;

use common::{run_to_exit, Pki, TempDir};

fn assert_clean_failure(code: i32, out: &str, want_code: i32, want: &[&str]) {
    assert_eq!(code, want_code, "exit code; output:\n{out}");
    for w in want {
        assert!(out.contains(w), "expected {w:?} in:\n{out}");
    }
    assert!(!out.contains("panicked"), "panic in:\n{out}");
    assert!(!out.contains("RUST_BACKTRACE"), "backtrace hint in:\n{out}");
}

#[test]
fn version_and_help() {
    let (code, out) = run_to_exit(&["--version"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("tcpfwd {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    let (code, out) = run_to_exit(&["--help"]);
    assert_eq!(code, 0);
    for want in [
        "--map 443:dvr.lan:80 --map 7682:dvr.lan:7681",
        "--cert",
        "--max-connections",
        "--client-auth family --admit-after 443",
        "--admit-window",
        "EXIT STATUS",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
}

#[test]
fn no_map_is_a_usage_error() {
    let (code, out) = run_to_exit(&[]);
    assert_clean_failure(code, &out, 2, &["--map"]);
}

#[test]
fn bad_maps_quote_the_text() {
    for (map, why) in [
        ("443:dvr", "expected 3 or 4 fields"),
        ("443:dvr:http", "backend port 'http'"),
        ("::1:443:dvr:80", "write IPv6 addresses in brackets"),
        ("localhost:443:dvr:80", "listen address 'localhost'"),
    ] {
        let (code, out) = run_to_exit(&["--map", map]);
        assert_clean_failure(
            code,
            &out,
            2,
            &[
                &format!("'{map}'"),
                why,
                "LISTEN_PORT:BACKEND_HOST:BACKEND_PORT",
            ],
        );
    }
}

#[test]
fn a_pasted_newline_in_a_map_stays_on_the_error_line() {
    let (code, out) = run_to_exit(&["--map", "443:dvr\n:80"]);
    assert_clean_failure(
        code,
        &out,
        2,
        &["invalid value '443:dvr\\n:80' for '--map <MAP>'"],
    );
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.contains("LISTEN_PORT:BACKEND_HOST:BACKEND_PORT"),
        "{out}"
    );
}

#[test]
fn two_maps_on_one_port() {
    let (code, out) = run_to_exit(&["--map", "8443:a:80", "--map", "127.0.0.1:8443:b:80"]);
    assert_clean_failure(
        code,
        &out,
        2,
        &[
            "8443:a:80",
            "127.0.0.1:8443:b:80",
            "both listen on port 8443",
        ],
    );
}

#[test]
fn bad_durations_and_levels() {
    let (code, out) = run_to_exit(&["--map", "0:a:80", "--handshake-timeout", "10"]);
    assert_clean_failure(code, &out, 2, &["'10'", "10s"]);
    let (code, out) = run_to_exit(&["--map", "0:a:80", "--close-timeout", "0"]);
    assert_clean_failure(code, &out, 2, &["--close-timeout must be more than 0"]);
    let (code, out) = run_to_exit(&["--map", "0:a:80", "--log-level", "loud"]);
    assert_clean_failure(code, &out, 2, &["--log-level 'loud'"]);
}

#[test]
fn cert_without_key() {
    let pki = Pki::new();
    let cert = pki.cert.to_str().unwrap();
    let (code, out) = run_to_exit(&["--map", "0:a:80", "--cert", cert]);
    assert_clean_failure(code, &out, 2, &["--key"]);
}

#[test]
fn missing_and_bad_certificate_files() {
    let pki = Pki::new();
    let dir = TempDir::new("badcert");
    let cert = pki.cert.to_str().unwrap();
    let key = pki.key.to_str().unwrap();
    let missing = dir.join("nope.pem");
    let missing = missing.to_str().unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let (_, other_key) = pki.leaf("other", &["other.test"]);
    let other_key = other_key.to_str().unwrap();

    let cases: [(&str, &str, &[&str]); 5] = [
        (
            missing,
            key,
            &[
                "cannot read the certificate file",
                "nope.pem",
                "No such file",
            ],
        ),
        (cert, missing, &["cannot read the key file", "nope.pem"]),
        (empty, key, &["holds no certificate"]),
        (cert, empty, &["holds no private key"]),
        (cert, other_key, &["does not match the certificate"]),
    ];
    for (c, k, want) in cases {
        let (code, out) = run_to_exit(&["--map", "127.0.0.1:0:a:80", "--cert", c, "--key", k]);
        assert_clean_failure(code, &out, 2, want);
        assert_eq!(
            out.trim().lines().filter(|l| l.contains("error")).count(),
            1,
            "{out}"
        );
    }
}

/// Runs the binary as nobody, so permission checks bite even when tests run as root.
fn run_as_nobody(args: &[&str]) -> (i32, String) {
    let out = common::as_nobody()
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tcpfwd as nobody");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unreadable_key_file_as_unprivileged_user() {
    let pki = Pki::new();
    // The test PKI lives in a directory nobody may enter? Make the key alone unreadable.
    std::fs::set_permissions(
        pki.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        &pki.cert,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(
        &pki.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (code, out) = run_as_nobody(&[
        "--map",
        "127.0.0.1:0:a:80",
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
    ]);
    assert_clean_failure(
        code,
        &out,
        2,
        &[
            "cannot read the key file",
            "Permission denied",
            "tcpfwd's user may read it",
        ],
    );
}

#[test]
fn privileged_port_as_unprivileged_user() {
    // Port 1 on loopback: below 1024 and almost surely free.
    let (code, out) = run_as_nobody(&["--map", "127.0.0.1:1:a:80"]);
    assert_clean_failure(
        code,
        &out,
        1,
        &[
            "127.0.0.1:1",
            "Permission denied",
            "socket activation",
            "CAP_NET_BIND_SERVICE",
        ],
    );
}

#[test]
fn port_in_use() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let map = format!("127.0.0.1:{port}:a:80");
    let (code, out) = run_to_exit(&["--map", &map]);
    assert_clean_failure(
        code,
        &out,
        1,
        &[
            &format!("127.0.0.1:{port}"),
            "in use",
            "choose another port",
        ],
    );
}
