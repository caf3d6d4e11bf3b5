//! ACME against a real CA: Pebble on loopback, the real binary, openssl s_client.

mod common;
#[path = "common/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    backends, msg, pattern, require_tool, run_to_exit, scrape_value, sha256, tls_connect, Tcpfwd,
    TempDir,
};
use pebble::{
    accept_anything_config, fingerprint, free_port, Pebble, RateLimitedCa, Script, StandInCa,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

fn renewed(e: &Value) -> bool {
    msg(e).starts_with("certificate renewed")
}

fn has(fwd: &Tcpfwd, pred: impl Fn(&Value) -> bool) -> bool {
    fwd.events().iter().any(pred)
}

/// Echoes `data` through map `i` with a client that accepts any certificate;
/// returns the fingerprint of the certificate it was shown.
async fn echo_through(fwd: &Tcpfwd, i: usize, data: &[u8]) -> String {
    let mut tls = tls_connect(accept_anything_config(), fwd.addr(i), NAMES[0])
        .await
        .unwrap();
    let fp = fingerprint(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    tls.write_all(data).await.unwrap();
    tls.flush().await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(20), tls.read_exact(&mut back))
        .await
        .expect("no echo within 20s")
        .unwrap();
    assert_eq!(back, data);
    fp
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

/// Writes a self-signed certificate made from `params` where tcpfwd keeps the
/// stand-in CA's certificate (CA at 127.0.0.1:`port`, directory path `/dir`).
fn store_self_signed(state: &TempDir, port: u16, params: &rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = state.join(&format!("127.0.0.1_{port}_dir"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

/// tcpfwd's arguments for both NAMES against a stand-in CA.
fn stand_in_args(
    directory: &str,
    pki: &common::Pki,
    state: &TempDir,
    backend: std::net::SocketAddr,
) -> Vec<String> {
    [
        "--map",
        &format!("127.0.0.1:0:{backend}"),
        "--acme-domain",
        NAMES[0],
        "--acme-domain",
        NAMES[1],
        "--acme-directory",
        directory,
        "--acme-ca-root",
        pki.ca.to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_issuance_on_two_maps_then_restart_reuses_it() {
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start();
    let tmp = TempDir::new("acme-state");
    // Not there yet: tcpfwd creates it, 0700.
    let state = tmp.join("state");
    let args = tcpfwd_args(&pebble, &state, backend);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut with_metrics = args.clone();
    let control = tmp.join("control");
    with_metrics.extend([
        "--metrics".to_string(),
        metrics.to_string(),
        "--control".to_string(),
        control.display().to_string(),
    ]);

    let fwd = start(&with_metrics);
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
    // The metrics say when it succeeded and when it renews.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let success = scrape_value(metrics, "tcpfwd_acme_last_success_timestamp_seconds");
        let renewal = scrape_value(metrics, "tcpfwd_acme_next_renewal_timestamp_seconds");
        if success.is_some_and(|t| t >= now - 120.0) && renewal.is_some_and(|t| t > now) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ACME metrics: last success {success:?}, next renewal {renewal:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // So does `tcpfwd status`, with the issued certificate in force.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(common::BIN)
            .args(["status", "--json", "--control", control.to_str().unwrap()])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let acme = &status["acme"];
    assert_eq!(acme["domains"], serde_json::json!(NAMES), "{status}");
    assert!(
        acme["last_success"]
            .as_f64()
            .is_some_and(|t| t >= now - 120.0),
        "{acme}"
    );
    assert!(
        acme["next_renewal"].as_f64().is_some_and(|t| t > now),
        "{acme}"
    );
    assert!(acme["last_failure"].is_null(), "{acme}");
    assert_eq!(
        status["certificates"][0]["sha256"], ev["sha256"],
        "{status}"
    );
    // The CA orders the names as it likes.
    let mut names: Vec<&str> = status["certificates"][0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, NAMES);

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
    let ca = ca_dir(&state, &pebble);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&ca), 0o700);
    // The chain and its key in one file, so that they change together.
    for f in ["account.json", "pair.pem"] {
        assert_eq!(mode(&ca.join(f)), 0o600, "{f}");
    }
    for f in ["cert.pem", "key.pem", "issued.pem"] {
        assert!(!ca.join(f).exists(), "{f}");
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

    // SIGHUP re-reads the stored certificate, and still orders nothing.
    fwd.signal(libc::SIGHUP);
    let reloaded = fwd.wait_for(
        |e| msg(e) == "certificate reloaded; new handshakes get it",
        1,
        Duration::from_secs(20),
    );
    assert_eq!(reloaded[0]["sha256"], fp.as_str());
    assert_eq!(served_fingerprint(fwd.addr(0).port(), NAMES[1]), fp);
    assert_eq!(pebble.orders(), orders);
}

/// `tcpfwd client-cert new NAME` in `state`; returns the certificate and its
/// key as one PEM file.
fn family_cert(state: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let out = Command::new(common::BIN)
        .args(["client-cert", "new", name, "--out-dir"])
        .arg(dir)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pw = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Password: "))
        .unwrap();
    let pem = dir.join(format!("{name}.pem"));
    let ok = Command::new("openssl")
        .args(["pkcs12", "-nodes", "-passin", &format!("pass:{pw}"), "-in"])
        .arg(dir.join(format!("{name}.p12")))
        .arg("-out")
        .arg(&pem)
        .status()
        .unwrap();
    assert!(ok.success());
    pem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_on_routes_that_require_client_certificates() {
    require_tool("openssl");
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start();
    let tmp = TempDir::new("acme-client-auth");
    let state = tmp.join("state");
    let pem = family_cert(&state, tmp.path(), "anna-phone");
    let mut args = tcpfwd_args(&pebble, &state, backend);
    args.extend(["--client-auth".to_string(), "family".to_string()]);
    let fwd = start(&args);
    // Pebble's TLS-ALPN-01 validation (an acme-tls/1 ClientHello with no
    // client certificate) got the challenge certificate on the validation port.
    let ev = fwd.wait_for(issued, 1, ISSUE).remove(0);
    let fp = ev["sha256"].as_str().unwrap().to_string();
    fwd.wait_for(
        |e| msg(e) == "connection closed" && e["reason"] == "acme challenge answered",
        1,
        Duration::from_secs(20),
    );

    for i in 0..2 {
        // No certificate: refused before the backend.
        let refused = match tls_connect(accept_anything_config(), fwd.addr(i), NAMES[0]).await {
            Err(_) => true,
            Ok(mut s) => {
                // TLS 1.3: the client's Finished goes out before the server's verdict.
                let _ = s.write_all(b"ping").await;
                let mut buf = [0u8; 4];
                !matches!(
                    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf)).await,
                    Ok(Ok(_))
                )
            }
        };
        assert!(
            refused,
            "map {i}: a connection without a client certificate got through"
        );
        // With the family's certificate: served, with Pebble's certificate.
        let mut tls = tls_connect(
            pebble::accept_anything_with_client_cert(&pem),
            fwd.addr(i),
            NAMES[1],
        )
        .await
        .unwrap();
        assert_eq!(
            fingerprint(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref()),
            fp
        );
        tls.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(20), tls.read_exact(&mut back))
            .await
            .expect("an echo within 20s")
            .unwrap();
        assert_eq!(&back, b"ping");
    }
    let rejected = fwd.wait_for(
        |e| msg(e) == "connection closed" && e["reason"] == "client certificate rejected",
        2,
        Duration::from_secs(20),
    );
    assert!(rejected[0]["detail"]
        .as_str()
        .unwrap_or("")
        .contains("peer sent no certificates"));
    fwd.wait_for(
        |e| msg(e) == "connection closed" && e["client_cn"] == "anna-phone",
        1,
        Duration::from_secs(20),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_of_a_short_lived_certificate_keeps_an_open_transfer_going() {
    let backend = backends::echo().await;
    // 15-second certificates: short-lived, so renewal is due with half the
    // lifetime left, 7.5 seconds after issuance.
    let mut pebble = Pebble::new(free_port(), Some(15));
    pebble.start();
    let state = TempDir::new("acme-renew");
    let fwd = start(&tcpfwd_args(&pebble, state.path(), backend));
    let first = fwd.wait_for(issued, 1, ISSUE).remove(0);
    let first_fp = first["sha256"].as_str().unwrap().to_string();
    let sched = fwd
        .wait_for(|e| msg(e) == "renewal scheduled", 1, ISSUE)
        .remove(0);
    assert_eq!(
        sched["rule"],
        "half the lifetime left (a short-lived certificate)"
    );

    // A transfer that begins before the renewal and goes on after it.
    let tls = tls_connect(accept_anything_config(), fwd.addr(1), NAMES[0])
        .await
        .unwrap();
    let shown = fingerprint(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    assert_eq!(shown, first_fp);
    let data = pattern(7, 64 * 1024 * 1024);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(64 * 1024 * 1024);
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < 64 * 1024 * 1024 {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "the transfer was cut after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let mut sent = 0;
    let mut after_renewal = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // 64 KiB every 20 ms until well after the renewal; then the rest at full speed.
    while sent < data.len() {
        let chunk = &data[sent..(sent + 64 * 1024).min(data.len())];
        wr.write_all(chunk).await.unwrap();
        wr.flush().await.unwrap();
        sent += chunk.len();
        if has(&fwd, renewed) {
            after_renewal += 1;
        }
        if after_renewal < 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "no renewal seen:\n{}",
                fwd.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // TLS may hold the last records until flushed.
    wr.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the echo did not complete within 60s")
        .unwrap();
    assert_eq!(
        sha256(&got),
        sha256(&data),
        "the transfer is not byte-exact"
    );
    wr.shutdown().await.unwrap();

    let renewal = fwd.wait_for(renewed, 1, ISSUE).remove(0);
    let new_fp = renewal["sha256"].as_str().unwrap().to_string();
    assert_ne!(new_fp, first_fp);
    let order = fwd
        .events()
        .into_iter()
        .filter(|e| msg(e) == "ordering a certificate")
        .nth(1)
        .expect("a second order");
    assert!(
        order["reason"]
            .as_str()
            .unwrap()
            .contains("half the lifetime left"),
        "{order}"
    );
    // New connections get the new certificate; the stored one is the new one too.
    let fresh = echo_through(&fwd, 0, b"after renewal").await;
    assert!(fresh != first_fp, "still the old certificate");
    let stored = std::fs::read_to_string(ca_dir(state.path(), &pebble).join("pair.pem")).unwrap();
    assert!(stored.contains("BEGIN CERTIFICATE") && stored.contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_at_start_serves_the_placeholder_until_the_ca_comes_up() {
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    let state = TempDir::new("acme-down");
    let fwd = start(&tcpfwd_args(&pebble, state.path(), backend));
    let placeholder = fwd
        .events()
        .into_iter()
        .find(|e| msg(e).starts_with("serving a self-signed placeholder"))
        .expect("placeholder");
    let failed = fwd
        .wait_for(|e| msg(e).starts_with("certificate order failed"), 1, ISSUE)
        .remove(0);
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains(&pebble.directory_url()), "{failed}");
    assert!(failed["retry_in"].is_string(), "{failed}");
    // Forwarding works meanwhile, on the placeholder.
    let shown = echo_through(&fwd, 1, b"hello while the CA is down").await;
    assert_eq!(shown, placeholder["sha256"].as_str().unwrap());

    pebble.start();
    let ev = fwd.wait_for(issued, 1, ISSUE).remove(0);
    let shown = echo_through(&fwd, 0, b"hello with a real certificate").await;
    assert_eq!(shown, ev["sha256"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_certificate_and_corrupt_account_are_recovered() {
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start();
    let state = TempDir::new("acme-corrupt");
    let args = tcpfwd_args(&pebble, state.path(), backend);
    let ca = ca_dir(state.path(), &pebble);
    let fwd = start(&args);
    fwd.wait_for(issued, 1, ISSUE);
    drop(fwd);
    let account = std::fs::read(ca.join("account.json")).unwrap();

    // A half-written certificate: re-ordered with the stored account.
    let cert = std::fs::read(ca.join("pair.pem")).unwrap();
    std::fs::write(ca.join("pair.pem"), &cert[..cert.len() / 2]).unwrap();
    let fwd = start(&args);
    let warn = fwd
        .events()
        .into_iter()
        .find(|e| msg(e).starts_with("the stored certificate cannot be used"))
        .expect("corrupt certificate reported");
    assert_eq!(warn["level"], "WARN");
    assert!(
        warn["cert"].as_str().unwrap().ends_with("pair.pem"),
        "{warn}"
    );
    fwd.wait_for(issued, 1, ISSUE);
    assert!(has(&fwd, |e| msg(e) == "using the stored ACME account"));
    assert!(!has(&fwd, |e| msg(e) == "created an ACME account"));
    assert_eq!(std::fs::read(ca.join("account.json")).unwrap(), account);
    drop(fwd);

    // A corrupt account (and no certificate, so that one is needed): moved aside, new account.
    std::fs::write(ca.join("account.json"), &account[..account.len() / 2]).unwrap();
    std::fs::remove_file(ca.join("pair.pem")).unwrap();
    let fwd = start(&args);
    let warn = fwd
        .wait_for(
            |e| msg(e).starts_with("the stored ACME account is corrupt"),
            1,
            ISSUE,
        )
        .remove(0);
    assert_eq!(warn["level"], "WARN");
    let aside = std::path::PathBuf::from(warn["moved_to"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        &account[..account.len() / 2]
    );
    fwd.wait_for(|e| msg(e) == "created an ACME account", 1, ISSUE);
    fwd.wait_for(issued, 1, ISSUE);
    let new_account = std::fs::read(ca.join("account.json")).unwrap();
    assert_ne!(new_account, account);
    assert_eq!(mode(&ca.join("account.json")), 0o600);
    assert_eq!(mode(&ca.join("pair.pem")), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_renewal_waits_as_told_and_says_when_the_certificate_expires() {
    const RETRY_AFTER: u64 = 8;
    let pki = common::Pki::new();
    let ca = RateLimitedCa::start(&pki, RETRY_AFTER).await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-ratelimit");

    // A stored certificate four hours long with one hour left: renewal is due now.
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec()).unwrap();
    params.not_before = now - time::Duration::hours(3);
    params.not_after = now + time::Duration::hours(1);
    store_self_signed(&state, ca.addr.port(), &params);
    let args = stand_in_args(&ca.directory_url(), &pki, &state, backend);
    let fwd = start(&args);
    assert!(has(&fwd, |e| msg(e) == "serving the stored certificate"));
    let failed = fwd
        .wait_for(
            |e| msg(e).starts_with("certificate renewal failed"),
            1,
            ISSUE,
        )
        .remove(0);
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["status"], 429);
    assert!(
        failed["url"].as_str().unwrap().ends_with("/order"),
        "{failed}"
    );
    assert!(
        failed["error"].as_str().unwrap().contains("rateLimited"),
        "{failed}"
    );
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("too many certificates"),
        "{failed}"
    );
    let expires = failed["expires"].as_str().unwrap();
    let not_after = params.not_after.replace_nanosecond(0).unwrap();
    let rfc3339 = not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(expires.starts_with(&rfc3339), "{expires} vs {rfc3339}");
    let retry_in = failed["retry_in"].as_str().unwrap();
    // Counted from the CA's answer to the log line: a stalled machine may
    // have used a second of it.
    assert!(["8s", "7s"].contains(&retry_in), "{failed}");
    assert!(
        ["8s", "7s"].contains(&failed["retry_after"].as_str().unwrap_or("")),
        "{failed}"
    );

    // The second order comes no sooner than the CA asked.
    fwd.wait_for(
        |e| msg(e).starts_with("certificate renewal failed"),
        2,
        ISSUE,
    );
    let orders = ca.orders.lock().unwrap().clone();
    assert!(orders.len() >= 2);
    let gap = orders[1] - orders[0];
    assert!(
        gap >= Duration::from_secs(RETRY_AFTER - 1),
        "waited only {gap:?}"
    );
    // Forwarding goes on, on the stored certificate.
    echo_through(&fwd, 0, b"still forwarding").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_follows_the_ca_renewal_window_when_offered() {
    let pki = common::Pki::new();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let now = time::OffsetDateTime::now_utc();
    // The CA asks for renewal now (a window that has begun), although by the
    // lifetime rule this 90-day certificate, one day old, has two months to go.
    let window = (
        fmt(now - time::Duration::hours(2)),
        fmt(now - time::Duration::hours(1)),
    );
    let ca = RateLimitedCa::start_with_ari(&pki, 3600, Some(window)).await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-ari");
    let mut params = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec()).unwrap();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(89);
    params.use_authority_key_identifier_extension = true;
    store_self_signed(&state, ca.addr.port(), &params);
    let args = stand_in_args(&ca.directory_url(), &pki, &state, backend);
    let fwd = start(&args);
    let order = fwd
        .wait_for(|e| msg(e) == "ordering a certificate", 1, ISSUE)
        .remove(0);
    assert!(
        order["reason"].as_str().unwrap().contains("(ARI)"),
        "{order}"
    );
    let asked = ca.renewal_info.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    // The certificate identifier is base64url(AKI) "." base64url(serial).
    let id = asked[0].trim_start_matches("/renewal-info/");
    assert_eq!(id.split('.').count(), 2, "{id}");
    // Rate-limited for an hour, as told: no second order during this test.
    fwd.wait_for(
        |e| msg(e).starts_with("certificate renewal failed"),
        1,
        ISSUE,
    );
    assert_eq!(ca.orders.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_account_is_logged_and_external_account_binding_works() {
    const KID: &str = "kid-1";
    const HMAC: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let backend = backends::echo().await;
    let mut pebble = Pebble::with_config(
        free_port(),
        serde_json::json!({
            "externalAccountBindingRequired": true,
            "externalAccountMACKeys": { KID: HMAC },
        }),
    );
    pebble.start();
    let state = TempDir::new("acme-eab");
    let mut args = tcpfwd_args(&pebble, state.path(), backend);

    // Without a binding the CA refuses the account: the log names the URL and the CA's problem.
    let fwd = start(&args);
    let failed = fwd
        .wait_for(|e| msg(e).starts_with("certificate order failed"), 1, ISSUE)
        .remove(0);
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("cannot create an ACME account at"),
        "{failed}"
    );
    assert!(error.contains(&pebble.directory_url()), "{failed}");
    assert!(error.contains("externalAccountRequired"), "{failed}");
    assert!(
        failed["url"].as_str().unwrap().contains("POST https://"),
        "{failed}"
    );
    // Forwarding goes on meanwhile.
    echo_through(&fwd, 1, b"forwarding while refused").await;
    drop(fwd);

    args.extend(["--acme-eab-kid", KID].map(String::from));
    let mut cmd = Tcpfwd::command();
    cmd.args(&args).env("TCPFWD_ACME_EAB_HMAC_KEY", HMAC);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "created an ACME account", 1, ISSUE);
    fwd.wait_for(issued, 1, ISSUE);
    assert!(!fwd.stderr().contains(HMAC), "the HMAC key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_directory_url_is_named_with_what_the_server_answered() {
    let pki = common::Pki::new();
    let ca = RateLimitedCa::start(&pki, 1).await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-wrongdir");
    let wrong = format!("https://{}/directory-typo", ca.addr);
    let args: Vec<String> = [
        "--map",
        &format!("127.0.0.1:0:{backend}"),
        "--acme-domain",
        NAMES[0],
        "--acme-directory",
        &wrong,
        "--acme-ca-root",
        pki.ca.to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let fwd = start(&args);
    let failed = fwd
        .wait_for(|e| msg(e).starts_with("certificate order failed"), 1, ISSUE)
        .remove(0);
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("the ACME directory {wrong} answered 404")),
        "{failed}"
    );
    assert_eq!(failed["status"], 404, "{failed}");
    echo_through(&fwd, 0, b"still forwarding").await;
}

/// A stored certificate for NAMES, four hours long with one left: renewal
/// (and the expiry watch) is due at once.
fn due_now() -> rcgen::CertificateParams {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec()).unwrap();
    params.not_before = now - time::Duration::hours(3);
    params.not_after = now + time::Duration::hours(1);
    params
}

/// A stored certificate for NAMES, one day into 90: nothing is due.
fn fresh() -> rcgen::CertificateParams {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec()).unwrap();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(89);
    params.use_authority_key_identifier_extension = true;
    params
}

/// tcpfwd against a scripted stand-in CA, with `stored` in its state directory.
async fn against(
    script: Script,
    stored: Option<&rcgen::CertificateParams>,
    env: &[(&str, &str)],
) -> (StandInCa, Tcpfwd, TempDir, common::Pki) {
    let pki = common::Pki::new();
    let ca = StandInCa::scripted(&pki, script).await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-stand-in");
    if let Some(params) = stored {
        store_self_signed(&state, ca.addr.port(), params);
    }
    let mut cmd = Tcpfwd::command();
    cmd.args(stand_in_args(&ca.directory_url(), &pki, &state, backend));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "ready", 1, Duration::from_secs(20));
    (ca, fwd, state, pki)
}

fn alive(fwd: &mut Tcpfwd) -> bool {
    fwd.child.try_wait().unwrap().is_none()
}

fn renewal_failed(e: &Value) -> bool {
    msg(e).starts_with("certificate renewal failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_that_cannot_be_used_is_kept_and_never_ordered_again_soon() {
    let (ca, mut fwd, state, _pki) = against(Script::default(), Some(&due_now()), &[]).await;
    let stored_fp = fwd
        .events()
        .into_iter()
        .find(|e| msg(e) == "serving the stored certificate")
        .expect("stored certificate served")["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let err = fwd
        .wait_for(
            |e| msg(e).starts_with("the CA issued a certificate that tcpfwd cannot use"),
            1,
            ISSUE,
        )
        .remove(0);
    assert_eq!(err["level"], "ERROR", "{err}");
    assert_eq!(err["retry_in"], "6h0m", "{err}");
    let error = err["error"].as_str().unwrap();
    assert!(error.contains("kept in"), "{err}");
    // What the CA sent is kept, moved aside.
    let dir = state.join(&format!("127.0.0.1_{}_dir", ca.addr.port()));
    let kept = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("issued.pem.unusable-")
        });
    assert!(kept, "the issued certificate was not kept");
    assert!(!dir.join("pair.pem").exists());
    // One order, one finalize; the process lives and serves the old certificate.
    assert_eq!(ca.order_count(), 1);
    assert_eq!(*ca.finalized.lock().unwrap(), 1);
    assert!(alive(&mut fwd));
    assert_eq!(echo_through(&fwd, 0, b"still forwarding").await, stored_fp);
    assert_eq!(ca.order_count(), 1);
    assert!(!has(&fwd, renewal_failed), "{}", fwd.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_capped_at_a_day_and_the_task_lives() {
    let script = Script {
        refuse_orders: Some(u64::MAX.to_string()),
        ..Script::default()
    };
    let (ca, mut fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    let failed = fwd.wait_for(renewal_failed, 1, ISSUE).remove(0);
    assert_eq!(failed["retry_after"], "1d0h", "{failed}");
    assert_eq!(failed["retry_in"], "1d0h", "{failed}");
    assert!(alive(&mut fwd));
    echo_through(&fwd, 0, b"still forwarding").await;
    assert_eq!(ca.order_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acme_task_is_restarted_when_it_ends() {
    let script = Script {
        refuse_orders: Some("3600".into()),
        ..Script::default()
    };
    let env = [("TCPFWD_TEST_ACME_PANIC", "1")];
    let (ca, mut fwd, _state, _pki) = against(script, Some(&due_now()), &env).await;
    let ended = fwd
        .wait_for(
            |e| msg(e).starts_with("the ACME task ended unexpectedly"),
            1,
            ISSUE,
        )
        .remove(0);
    assert_eq!(ended["level"], "ERROR");
    assert!(
        ended["error"].as_str().unwrap().contains("panicked"),
        "{ended}"
    );
    // Restarted: it goes on to order (and is refused).
    fwd.wait_for(renewal_failed, 1, ISSUE);
    assert_eq!(ca.order_count(), 1);
    assert!(alive(&mut fwd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_retry_after_of_an_attempt_is_kept() {
    let script = Script {
        poll_fails: Some(30),
        ..Script::default()
    };
    let (ca, fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    let failed = fwd.wait_for(renewal_failed, 1, ISSUE).remove(0);
    // The order poll's 503 said 30 s; the authorization read after it succeeded.
    let retry_after = failed["retry_after"].as_str().unwrap_or("");
    assert!(["30s", "29s"].contains(&retry_after), "{failed}");
    let retry_in = failed["retry_in"].as_str().unwrap();
    assert!(["30s", "29s"].contains(&retry_in), "{failed}");
    assert_eq!(ca.order_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_in_the_past_keeps_the_one_minute_floor() {
    let script = Script {
        refuse_orders: Some("Fri, 31 Dec 1999 23:59:59 GMT".into()),
        ..Script::default()
    };
    let (ca, fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    let failed = fwd.wait_for(renewal_failed, 1, ISSUE).remove(0);
    assert_eq!(failed["retry_in"], "1m0s", "{failed}");
    assert_eq!(ca.order_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_framed_by_the_connection_end_needs_close_notify() {
    let script = Script {
        directory_no_close_notify: true,
        ..Script::default()
    };
    let (ca, mut fwd, _state, _pki) = against(script, None, &[]).await;
    let failed = fwd
        .wait_for(|e| msg(e).starts_with("certificate order failed"), 1, ISSUE)
        .remove(0);
    assert!(
        failed["error"].as_str().unwrap().contains("close_notify"),
        "{failed}"
    );
    assert_eq!(ca.order_count(), 0);
    assert!(alive(&mut fwd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_read_again_for_each_attempt() {
    let script = Script {
        refuse_orders: Some("1".into()),
        change_directory: true,
        ..Script::default()
    };
    let (ca, fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    fwd.wait_for(renewal_failed, 2, ISSUE);
    let paths = ca.order_paths.lock().unwrap().clone();
    assert_eq!(paths[..2], ["/order", "/order2"], "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_renewal_information_creates_no_account() {
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let now = time::OffsetDateTime::now_utc();
    let window = (
        fmt(now + time::Duration::days(50)),
        fmt(now + time::Duration::days(51)),
    );
    let script = Script {
        refuse_orders: Some("3600".into()),
        ari: Some(window),
        ..Script::default()
    };
    let (ca, fwd, _state, _pki) = against(script, Some(&fresh()), &[]).await;
    let sched = fwd
        .wait_for(|e| msg(e) == "renewal scheduled", 1, ISSUE)
        .remove(0);
    assert_eq!(sched["rule"], "the CA's renewal window (ARI)", "{sched}");
    assert_eq!(ca.renewal_info.lock().unwrap().len(), 1);
    assert_eq!(*ca.accounts.lock().unwrap(), 0, "ARI created an account");
    assert!(!has(&fwd, |e| msg(e) == "created an ACME account"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_tells_the_renewal_task_about_the_re_read_certificate() {
    let script = Script {
        refuse_orders: Some("3600".into()),
        ..Script::default()
    };
    let (ca, fwd, state, _pki) = against(script, Some(&fresh()), &[]).await;
    fwd.wait_for(|e| msg(e) == "renewal scheduled", 1, ISSUE);
    assert_eq!(ca.order_count(), 0);
    // A certificate restored from a backup, due for renewal now.
    store_self_signed(&state, ca.addr.port(), &due_now());
    fwd.signal(libc::SIGHUP);
    fwd.wait_for(
        |e| msg(e) == "certificate reloaded; new handshakes get it",
        1,
        ISSUE,
    );
    let order = fwd
        .wait_for(|e| msg(e) == "ordering a certificate", 1, ISSUE)
        .remove(0);
    assert!(
        order["reason"].as_str().unwrap().contains("renewal due"),
        "{order}"
    );
    fwd.wait_for(renewal_failed, 1, ISSUE);
    assert_eq!(ca.order_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_expiry_with_renewal_failing_is_an_error_once_a_day() {
    let script = Script {
        refuse_orders: Some("1".into()),
        ..Script::default()
    };
    let (_ca, fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    fwd.wait_for(renewal_failed, 3, ISSUE);
    let errors: Vec<Value> = fwd
        .events()
        .into_iter()
        .filter(|e| msg(e).starts_with("the certificate expires soon and renewal keeps failing"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", fwd.stderr());
    assert_eq!(errors[0]["level"], "ERROR");
    assert!(
        errors[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("rateLimited"),
        "{}",
        errors[0]
    );
    assert!(errors[0]["expires"].as_str().unwrap().contains("(in "));
}

/// The leaf's SHA-256 if `path` holds a chain and the key that belongs to
/// its leaf; `None` if it does not exist. Panics on a mismatched or broken pair.
fn pair_leaf(path: &Path) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: not PEM ({e})", path.display()));
    assert!(!chain.is_empty(), "{}: no certificate", path.display());
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&bytes)
        .unwrap_or_else(|e| panic!("{}: no key ({e})", path.display()));
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let leaf = fingerprint(chain[0].as_ref());
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .unwrap_or_else(|e| panic!("{}: key and certificate do not match ({e})", path.display()));
    Some(leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_moment_leaves_a_matching_pair_and_no_pile_of_orders() {
    const ROUNDS: usize = 50;
    const VALIDITY: u64 = 15;
    let backend = backends::echo().await;
    // 15-second certificates: renewal is due 7.5 s after issuance, so the
    // rounds (each killed within 2.5 s) kill first issuances, starts on a
    // stored pair well before its renewal time, and renewals. (With 9 s, a
    // pair was "well before" for under a second after issuance, and whether
    // any round saw one depended on the machine's speed.)
    let mut pebble = Pebble::new(free_port(), Some(VALIDITY));
    pebble.start();
    let state = TempDir::new("acme-kill9");
    let args = tcpfwd_args(&pebble, state.path(), backend);
    let ca = ca_dir(state.path(), &pebble);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut had_pair = false;
    let mut ordering_starts = 0;
    let mut kept_without_order = 0;
    for round in 0..ROUNDS {
        let before = pair_leaf(&ca.join("pair.pem"));
        if had_pair {
            assert!(before.is_some(), "round {round}: the stored pair was lost");
        }
        let mut fwd = start(&args);
        let started = std::time::SystemTime::now();
        if let Some(leaf) = &before {
            // A good stored pair is served at once, before "ready".
            let served = fwd
                .events()
                .into_iter()
                .find(|e| msg(e) == "serving the stored certificate")
                .unwrap_or_else(|| panic!("round {round}: not served:\n{}", fwd.stderr()));
            assert_eq!(served["sha256"], leaf.as_str(), "round {round}");
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 2500);
        tokio::time::sleep(delay).await;
        fwd.child.kill().unwrap();
        fwd.child.wait().unwrap();
        let events = fwd.events();
        let orders = events
            .iter()
            .filter(|e| msg(e) == "ordering a certificate")
            .count();
        assert!(orders <= 1, "round {round}: {orders} orders in one run");
        if orders == 1 {
            ordering_starts += 1;
        }
        // A stored pair well before its renewal time is served with no order.
        if before.is_some() {
            let expires = events
                .iter()
                .find(|e| msg(e) == "serving the stored certificate")
                .and_then(|e| e["expires"].as_str())
                .and_then(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .expect("expiry logged");
            let renew_at = std::time::SystemTime::from(expires)
                // Short-lived: renewal with half the lifetime left.
                - Duration::from_secs_f64(VALIDITY as f64 / 2.0)
                // Margin for the one-second resolution of the logged expiry.
                - Duration::from_secs(2);
            if started + delay < renew_at {
                assert_eq!(
                    orders,
                    0,
                    "round {round}: ordered with a good pair:\n{}",
                    fwd.stderr()
                );
                kept_without_order += 1;
            }
        }
        // Whatever the moment, the files form a matching pair (or none yet).
        let after = pair_leaf(&ca.join("pair.pem"));
        pair_leaf(&ca.join("issued.pem"));
        assert!(!ca.join("cert.pem").exists() && !ca.join("key.pem").exists());
        had_pair |= after.is_some();
    }
    // Orders never pile up: at most one per run, only in runs that needed one.
    assert!(
        pebble.orders() <= ordering_starts,
        "{} orders, {ordering_starts} runs ordered",
        pebble.orders()
    );
    assert!(
        had_pair,
        "no certificate was ever stored in {ROUNDS} rounds"
    );
    assert!(
        kept_without_order > 0,
        "no round started on a good stored pair"
    );
    // And a last, uninterrupted run serves what is stored or gets a new one.
    let fwd = start(&args);
    fwd.wait_for(
        |e| msg(e) == "renewal scheduled" || issued(e) || renewed(e),
        1,
        ISSUE,
    );
    let leaf = pair_leaf(&ca.join("pair.pem")).expect("a stored pair");
    let shown = echo_through(&fwd, 1, b"after the power cuts").await;
    assert_eq!(shown, leaf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_an_hour_ahead_is_obeyed_and_chunked_answers_are_read() {
    let in_an_hour =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    let script = Script {
        refuse_orders: Some(in_an_hour),
        chunked: true,
        ..Script::default()
    };
    let (ca, mut fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
    let failed = fwd.wait_for(renewal_failed, 1, ISSUE).remove(0);
    let retry_in = failed["retry_in"].as_str().unwrap();
    assert!(["1h0m", "59m59s", "59m58s"].contains(&retry_in), "{failed}");
    // The problem document came chunked, and was read.
    assert!(
        failed["error"].as_str().unwrap().contains("rateLimited"),
        "{failed}"
    );
    assert_eq!(ca.order_count(), 1);
    assert!(alive(&mut fwd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_acme_refusal_waits_at_least_a_minute_and_keeps_serving() {
    for (status, kind) in [
        ("400 Bad Request", "malformed"),
        ("403 Forbidden", "unauthorized"),
        ("400 Bad Request", "rejectedIdentifier"),
        ("403 Forbidden", "userActionRequired"),
        ("500 Internal Server Error", "serverInternal"),
        ("400 Bad Request", "caa"),
    ] {
        let script = Script {
            refusal: Some((status.into(), kind.into())),
            ..Script::default()
        };
        let (ca, mut fwd, _state, _pki) = against(script, Some(&due_now()), &[]).await;
        let failed = fwd.wait_for(renewal_failed, 1, ISSUE).remove(0);
        assert_eq!(failed["retry_in"], "1m0s", "{kind}: {failed}");
        assert!(
            failed["error"].as_str().unwrap().contains(kind),
            "{kind}: {failed}"
        );
        assert_eq!(ca.order_count(), 1, "{kind}");
        assert!(alive(&mut fwd), "{kind}");
        echo_through(&fwd, 0, b"still forwarding").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_stalls_past_the_request_deadline_fails_the_attempt_and_is_retried() {
    let script = Script {
        stall: true,
        ..Script::default()
    };
    // The hidden test hook: a 2 s deadline instead of 60 s.
    let env = [("TCPFWD_TEST_ACME_REQUEST_TIMEOUT", "2")];
    let (ca, mut fwd, _state, _pki) = against(script, Some(&due_now()), &env).await;
    let failed = fwd.wait_for(renewal_failed, 2, ISSUE);
    let dir = ca.directory_url();
    for f in &failed {
        let error = f["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("GET {dir}: no complete answer within 2s")),
            "{f}"
        );
        assert_eq!(f["url"], format!("GET {dir}"), "{f}");
    }
    // Retried by the backoff (2.5-5 s, then 5-10 s): not refused, so no minute's floor.
    let first = failed[0]["retry_in"].as_str().unwrap();
    assert!(
        first.ends_with('s') && !first.contains('m'),
        "{}",
        failed[0]
    );
    // The process lives and forwards.
    assert_eq!(ca.order_count(), 0);
    assert!(alive(&mut fwd));
    echo_through(&fwd, 0, b"still forwarding").await;
}

/// Writes an ACME account for the stand-in CA at 127.0.0.1:`port` where
/// tcpfwd keeps it, as instant-acme stores one (ECDSA P-256 key, PKCS#8).
fn store_account(state: &TempDir, port: u16) {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let creds = serde_json::json!({
        "id": format!("{base}/account/1"),
        "key_pkcs8": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.serialize_der()),
        "directory": format!("{base}/dir"),
    });
    let dir = state.join(&format!("127.0.0.1_{port}_dir"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("account.json"), creds.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_fetches_the_directory_once() {
    let pki = common::Pki::new();
    let ca = StandInCa::scripted(
        &pki,
        Script {
            refuse_orders: Some("1".into()),
            ..Script::default()
        },
    )
    .await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-stand-in");
    store_self_signed(&state, ca.addr.port(), &due_now());
    store_account(&state, ca.addr.port());
    let mut cmd = Tcpfwd::command();
    cmd.args(stand_in_args(&ca.directory_url(), &pki, &state, backend));
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "ready", 1, Duration::from_secs(20));
    fwd.wait_for(renewal_failed, 2, ISSUE);
    // The next attempt is at least 5 s away: the counts are settled. The
    // first look for renewal information (none offered) read the directory
    // that the first attempt then used.
    assert_eq!(ca.order_count(), 2);
    assert!(has(&fwd, |e| msg(e) == "using the stored ACME account"));
    assert_eq!(*ca.accounts.lock().unwrap(), 0);
    assert_eq!(
        *ca.directories.lock().unwrap(),
        2,
        "the directory was fetched more than once per attempt"
    );
}

/// The CA's state sub-directory for a stand-in CA.
fn stand_in_dir(state: &TempDir, ca: &StandInCa) -> std::path::PathBuf {
    state.join(&format!("127.0.0.1_{}_dir", ca.addr.port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_after_an_unusable_certificate_survives_a_restart_and_lifts_when_the_names_change()
{
    let (ca, fwd, state, pki) = against(Script::default(), Some(&due_now()), &[]).await;
    fwd.wait_for(
        |e| msg(e).starts_with("the CA issued a certificate that tcpfwd cannot use"),
        1,
        ISSUE,
    );
    let hold = stand_in_dir(&state, &ca).join("hold.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !hold.exists() {
        assert!(std::time::Instant::now() < deadline, "no hold stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mode(&hold), 0o600);
    let stored: Value = serde_json::from_slice(&std::fs::read(&hold).unwrap()).unwrap();
    assert_eq!(stored["names"], serde_json::json!(NAMES), "{stored}");
    drop(fwd);
    assert_eq!(ca.order_count(), 1);

    // Restarted: the hold is said at ERROR with when it ends, and no order is placed.
    let backend = backends::echo().await;
    let args = stand_in_args(&ca.directory_url(), &pki, &state, backend);
    let fwd = start(&args);
    let held = fwd
        .wait_for(
            |e| msg(e).starts_with("a certificate the CA issued before could not be used"),
            1,
            ISSUE,
        )
        .remove(0);
    assert_eq!(held["level"], "ERROR", "{held}");
    assert!(
        held["retry_at"].as_str().unwrap().contains("(in 5h59m)")
            || held["retry_at"].as_str().unwrap().contains("(in 6h0m)"),
        "{held}"
    );
    assert!(
        held["problem"].as_str().unwrap().contains("cannot be used"),
        "{held}"
    );
    // A fixed interval in which the old code ordered at once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !has(&fwd, |e| msg(e) == "ordering a certificate"),
        "{}",
        fwd.stderr()
    );
    assert_eq!(ca.order_count(), 1);
    echo_through(&fwd, 0, b"still forwarding").await;
    drop(fwd);

    // Another set of names is another certificate: the hold is lifted.
    let mut more = args.clone();
    more.extend(["--acme-domain", "nvr.example.org"].map(String::from));
    let fwd = start(&more);
    fwd.wait_for(
        |e| msg(e).starts_with("the names changed since a certificate from the CA proved unusable"),
        1,
        ISSUE,
    );
    fwd.wait_for(|e| msg(e) == "ordering a certificate", 1, ISSUE);
    let deadline = std::time::Instant::now() + ISSUE;
    while ca.order_count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no second order");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_rejecting_half_the_nonces_still_issues_with_one_order() {
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start_with_env(&[("PEBBLE_WFE_NONCEREJECT", "50")]);
    assert!(
        pebble
            .log()
            .contains("Configured to reject 50% of good nonces"),
        "{}",
        pebble.log()
    );
    let state = TempDir::new("acme-nonce");
    let fwd = start(&tcpfwd_args(&pebble, state.path(), backend));
    fwd.wait_for(issued, 1, ISSUE);
    assert_eq!(pebble.orders(), 1, "{}", fwd.stderr());
    // Requests refused three times in a row (past instant-acme's own retries) and repeated by tcpfwd.
    let repeated = fwd
        .events()
        .iter()
        .filter(|e| msg(e) == "the CA rejected the nonce again; repeating the request")
        .count();
    eprintln!("requests repeated by tcpfwd after badNonce: {repeated}");
    assert!(
        !has(&fwd, |e| msg(e).starts_with("certificate order failed")),
        "{}",
        fwd.stderr()
    );
    echo_through(&fwd, 1, b"through the issued certificate").await;
}

/// The most orders the backoff schedule allows in `interval` from the first:
/// waits of 5 s doubling (each at least half its step), at least `told`
/// when the CA gave a Retry-After, at least a minute after a refusal without one.
fn max_orders(interval: Duration, told: Option<Duration>) -> usize {
    let mut at = Duration::ZERO;
    let mut orders = 0;
    for k in 0..20u32 {
        if at > interval {
            break;
        }
        orders += 1;
        let step = (Duration::from_secs(5) * 2u32.pow(k)).min(Duration::from_secs(3600));
        let wait = match told {
            Some(t) => (step / 2).max(t),
            None => (step / 2).max(Duration::from_secs(60)),
        };
        at += wait;
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_against_a_refusing_ca_stay_within_the_backoff_schedule_over_20_s() {
    const INTERVAL: Duration = Duration::from_secs(20);
    let limited = Script {
        refuse_orders: Some("1".into()),
        ..Script::default()
    };
    let internal = Script {
        refusal: Some(("500 Internal Server Error".into(), "serverInternal".into())),
        ..Script::default()
    };
    let stored = due_now();
    let (a, b) = tokio::join!(
        against(limited, Some(&stored), &[]),
        against(internal, Some(&stored), &[])
    );
    let (limited, mut fwd_a, _sa, _pa) = a;
    let (internal, mut fwd_b, _sb, _pb) = b;
    fwd_a.wait_for(renewal_failed, 1, ISSUE);
    fwd_b.wait_for(renewal_failed, 1, ISSUE);
    let first = |ca: &StandInCa| ca.orders.lock().unwrap()[0];
    let until = first(&limited).max(first(&internal)) + INTERVAL;
    tokio::time::sleep_until(until.into()).await;
    let within = |ca: &StandInCa| {
        let orders = ca.orders.lock().unwrap().clone();
        orders
            .iter()
            .filter(|t| **t <= orders[0] + INTERVAL)
            .count()
    };
    // rateLimited, Retry-After 1 s: 2.5 s, 5 s, 10 s at the least: 4 orders.
    let allowed = max_orders(INTERVAL, Some(Duration::from_secs(1)));
    assert_eq!(allowed, 4);
    let n = within(&limited);
    assert!(
        (1..=allowed).contains(&n),
        "rateLimited: {n} orders in {INTERVAL:?}"
    );
    // serverInternal without Retry-After: a minute at the least: 1 order.
    assert_eq!(max_orders(INTERVAL, None), 1);
    assert_eq!(within(&internal), 1, "serverInternal");
    assert!(alive(&mut fwd_a) && alive(&mut fwd_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acme_profile_is_sent_with_every_order_the_replacement_and_the_plain_one() {
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let now = time::OffsetDateTime::now_utc();
    let script = Script {
        // A replacement refused (not 429): tcpfwd orders again plainly.
        refusal: Some(("400 Bad Request".into(), "malformed".into())),
        ari: Some((
            fmt(now - time::Duration::hours(2)),
            fmt(now - time::Duration::hours(1)),
        )),
        profiles: Some(vec!["classic".into(), "shortlived".into()]),
        ..Script::default()
    };
    let pki = common::Pki::new();
    let ca = StandInCa::scripted(&pki, script).await;
    let backend = backends::echo().await;
    let state = TempDir::new("acme-profile");
    store_self_signed(&state, ca.addr.port(), &fresh());
    let mut args = stand_in_args(&ca.directory_url(), &pki, &state, backend);
    args.extend(["--acme-profile", "shortlived"].map(String::from));
    let fwd = start(&args);
    let order = fwd
        .wait_for(|e| msg(e) == "ordering a certificate", 1, ISSUE)
        .remove(0);
    assert_eq!(order["profile"], "shortlived", "{order}");
    fwd.wait_for(renewal_failed, 1, ISSUE);
    let payloads = ca.order_payloads.lock().unwrap().clone();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    assert!(payloads[0]["replaces"].is_string(), "{payloads:?}");
    assert!(payloads[1].get("replaces").is_none(), "{payloads:?}");
    for p in &payloads {
        assert_eq!(p["profile"], "shortlived", "{payloads:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acme_profile_the_ca_does_not_offer_is_an_error_naming_those_it_does() {
    for (offered, says) in [
        (
            Some(vec!["classic".to_string(), "tlsserver".to_string()]),
            "classic, tlsserver",
        ),
        (None, "none: it does not support profiles"),
    ] {
        let script = Script {
            refuse_orders: Some("3600".into()),
            profiles: offered.clone(),
            ..Script::default()
        };
        let pki = common::Pki::new();
        let ca = StandInCa::scripted(&pki, script).await;
        let backend = backends::echo().await;
        let state = TempDir::new("acme-profile-unknown");
        let mut args = stand_in_args(&ca.directory_url(), &pki, &state, backend);
        args.extend(["--acme-profile", "shortlived"].map(String::from));
        let mut fwd = start(&args);
        let err = fwd
            .wait_for(
                |e| msg(e).starts_with("the CA does not offer the ACME profile asked for"),
                1,
                ISSUE,
            )
            .remove(0);
        assert_eq!(err["level"], "ERROR", "{err}");
        assert_eq!(err["profile"], "shortlived", "{err}");
        assert_eq!(err["offered"], says, "{err}");
        assert_eq!(err["retry_in"], "1m0s", "{err}");
        assert_eq!(ca.order_count(), 0, "{offered:?}");
        assert_eq!(*ca.accounts.lock().unwrap(), 0, "{offered:?}");
        assert!(alive(&mut fwd));
        echo_through(&fwd, 0, b"forwarding on the placeholder").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_address_certificate_from_pebble_is_served_to_clients_without_sni() {
    require_tool("openssl");
    let backend = backends::echo().await;
    let mut pebble = Pebble::new(free_port(), None);
    pebble.start();
    let state = TempDir::new("acme-ip");
    let port = pebble.tls_port;
    let args: Vec<String> = [
        "--map",
        &format!("127.0.0.1:{port}:{backend}"),
        "--map",
        &format!("[::1]:{port}:{backend}"),
        "--map",
        &format!("127.0.0.1:0:{backend}"),
        "--acme-ip",
        "127.0.0.1",
        "--acme-ip",
        "::1",
        "--acme-directory",
        &pebble.directory_url(),
        "--acme-ca-root",
        pebble.ca_root().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let fwd = start(&args);
    let answering: Vec<String> = fwd
        .wait_for(
            |e| msg(e) == "answering the tls-alpn-01 challenge",
            2,
            ISSUE,
        )
        .iter()
        .map(|e| e["server_name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        answering.contains(&"1.0.0.127.in-addr.arpa".to_string()),
        "{answering:?}"
    );
    assert!(
        answering.contains(&format!("1.{}ip6.arpa", "0.".repeat(31))),
        "{answering:?}"
    );
    let ev = fwd.wait_for(issued, 1, ISSUE).remove(0);
    assert_eq!(pebble.orders(), 1);

    // openssl without -servername sends no SNI to an address: it gets the
    // issued certificate, which verifies for the address.
    let root = pebble.dir.join("root.pem");
    std::fs::write(&root, pebble.root_pem().await).unwrap();
    let served = fwd.addr(2).port();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{served} -noservername -verify_ip 127.0.0.1 \
             -CAfile {} -verify_return_error </dev/null 2>&1",
            root.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{served} -noservername </dev/null 2>/dev/null \
             | openssl x509 -noout -ext subjectAltName -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(text.contains("IP Address:0:0:0:0:0:0:0:1"), "{text}");
    assert!(text.contains(ev["sha256"].as_str().unwrap()), "{text}");
    // And over IPv6, by address.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect '[::1]:{port}' -noservername -verify_ip ::1 \
             -CAfile {} -verify_return_error </dev/null 2>&1",
            root.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    drop(fwd);

    // Restarted: the stored certificate covers both addresses, no new order.
    let fwd = start(&args);
    fwd.wait_for(|e| msg(e) == "renewal scheduled", 1, ISSUE);
    assert!(
        !has(&fwd, |e| msg(e) == "ordering a certificate"),
        "{}",
        fwd.stderr()
    );
    assert_eq!(pebble.orders(), 1);
}
