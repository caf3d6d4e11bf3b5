//! Client certificates from the family CA, end to end with the real binary:
//! `client-cert new` files that openssl's PKCS#12 reader opens, `openssl
//! s_client` and `curl` with no certificate, another CA's, an expired, a
//! revoked and a good one; a revocation closing an open connection; and no
//! session resumption on a client-auth route.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{backends, free_port, msg, Pki, Tcpfwd, TempDir, BIN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// `tcpfwd client-cert ARGS --state-dir STATE`; returns (success, stdout+stderr).
fn client_cert(state: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("client-cert")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issues NAME into `dir`; returns (p12 path, password).
fn issue(state: &Path, dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, String) {
    let mut args = vec!["new", name, "--out-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, out) = client_cert(state, &args);
    assert!(ok, "{out}");
    let pw = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Password: "))
        .unwrap_or_else(|| panic!("no password in: {out}"))
        .to_string();
    (dir.join(format!("{name}.p12")), pw)
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The p12 as one PEM file with the certificate and the key, for curl and s_client.
fn p12_to_pem(p12: &Path, pw: &str) -> PathBuf {
    let pem = p12.with_extension("pem");
    let (ok, out) = openssl(&[
        "pkcs12",
        "-in",
        p12.to_str().unwrap(),
        "-passin",
        &format!("pass:{pw}"),
        "-nodes",
        "-out",
        pem.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    pem
}

/// A certificate for `name` signed by the family CA in `state`, already
/// expired (the CLI cannot make one); returns the PEM file (cert + key).
fn expired_from_family(state: &Path, dir: &Path) -> PathBuf {
    let ca_dir = state.join("family-ca");
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "old-phone");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let path = dir.join("expired.pem");
    std::fs::write(&path, cert.pem() + &key.serialize_pem()).unwrap();
    path
}

/// A client certificate from an unrelated CA (the test PKI's).
fn other_ca_cert(pki: &Pki, dir: &Path) -> PathBuf {
    let (cert, key) = pki.leaf("stranger", &["stranger.test"]);
    let path = dir.join("stranger.pem");
    let text = std::fs::read_to_string(cert).unwrap() + &std::fs::read_to_string(key).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn curl(port: u16, cert: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-k", "--max-time", "10"]);
    if let Some(c) = cert {
        cmd.arg("--cert").arg(c);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `openssl s_client` sending `GET /`; returns its output.
fn s_client(port: u16, cert: Option<&Path>, extra: &[&str]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    if let Some(c) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(c);
    }
    let mut child = cmd
        .args(extra)
        .arg("-ign_eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

#[test]
fn new_writes_pkcs12_that_openssl_reads_legacy_and_modern() {
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-p12");
    let state = tmp.join("state");
    let (legacy, pw) = issue(&state, tmp.path(), "anna-phone", &["--days", "30"]);
    let (ok, out) = openssl(&[
        "pkcs12",
        "-info",
        "-legacy",
        "-in",
        legacy.to_str().unwrap(),
        "-passin",
        &format!("pass:{pw}"),
        "-nokeys",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("MAC: sha1"), "{out}");
    assert!(
        out.contains("Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC"),
        "{out}"
    );
    assert!(out.contains("subject=CN = anna-phone"), "{out}");
    let (ok, out) = openssl(&[
        "pkcs12",
        "-info",
        "-legacy",
        "-in",
        legacy.to_str().unwrap(),
        "-passin",
        "pass:wrong",
        "-nokeys",
    ]);
    assert!(!ok, "a wrong password must fail: {out}");

    let (modern, pw2) = issue(&state, tmp.path(), "laptop", &["--modern"]);
    assert_ne!(pw, pw2);
    let (ok, out) = openssl(&[
        "pkcs12",
        "-info",
        "-in",
        modern.to_str().unwrap(),
        "-passin",
        &format!("pass:{pw2}"),
        "-nokeys",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("AES-256-CBC"), "{out}");

    // Private files; the password is stored nowhere.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&legacy), 0o600);
    assert_eq!(mode(&state.join("family-ca")), 0o700);
    assert_eq!(mode(&state.join("family-ca/ca-key.pem")), 0o600);
    for f in std::fs::read_dir(state.join("family-ca")).unwrap() {
        let text = std::fs::read(f.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains(&pw));
    }

    // The certificate: clientAuth, backdated an hour.
    let pem = p12_to_pem(&legacy, &pw);
    let (_, text) = openssl(&["x509", "-in", pem.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("TLS Web Client Authentication"), "{text}");

    let (ok, list) = client_cert(&state, &["list"]);
    assert!(ok, "{list}");
    assert!(
        list.contains("anna-phone") && list.contains("valid"),
        "{list}"
    );
    let (ok, out) = client_cert(&state, &["revoke", "anna-phone"]);
    assert!(ok, "{out}");
    let (_, list) = client_cert(&state, &["list"]);
    let line = list.lines().find(|l| l.starts_with("anna-phone")).unwrap();
    assert!(line.ends_with("revoked"), "{list}");
    let (ok, out) = client_cert(&state, &["revoke", "nobody"]);
    assert!(!ok && out.contains("no certificate named"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_good_family_certificate_reaches_the_backend() {
    common::require_tool("openssl");
    common::require_tool("curl");
    let tmp = TempDir::new("ccert-who");
    let state = tmp.join("state");
    let (good, pw) = issue(&state, tmp.path(), "good", &[]);
    let good = p12_to_pem(&good, &pw);
    let (revoked, pw) = issue(&state, tmp.path(), "lost-phone", &[]);
    let revoked = p12_to_pem(&revoked, &pw);
    assert!(client_cert(&state, &["revoke", "lost-phone"]).0);
    let expired = expired_from_family(&state, tmp.path());
    let pki = Pki::new();
    let stranger = other_ca_cert(&pki, tmp.path());

    let (backend, hits) = backends::fixed_reply("127.0.0.1:0", REPLY).await;
    let port = free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{port}:{backend}"),
        "--client-auth",
        "family",
        "--state-dir",
        state.to_str().unwrap(),
    ]);

    let cases: [(&str, Option<&Path>, &str); 4] = [
        ("none", None, "peer sent no certificates"),
        ("another CA's", Some(&stranger), "UnknownIssuer"),
        ("expired", Some(&expired), "certificate expired"),
        ("revoked", Some(&revoked), "Revoked"),
    ];
    for (what, cert, why) in cases {
        let (ok, out) = tokio::task::block_in_place(|| curl(port, cert));
        assert!(!ok, "curl with {what} certificate got through: {out}");
        let out = tokio::task::block_in_place(|| s_client(port, cert, &[]));
        assert!(!out.contains("hello"), "s_client with {what}: {out}");
        let logged = fwd
            .wait_for_async(
                move |e| {
                    msg(e) == "connection closed"
                        && e["reason"] == "client certificate rejected"
                        && e["detail"].as_str().unwrap_or("").contains(why)
                },
                2,
                T,
            )
            .await;
        assert_eq!(logged[0]["client_cn"], "");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );

    let (ok, out) = tokio::task::block_in_place(|| curl(port, Some(&good)));
    assert!(ok && out.contains("hello"), "{out}");
    let out = tokio::task::block_in_place(|| s_client(port, Some(&good), &[]));
    assert!(out.contains("hello"), "{out}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let ok = fwd
        .wait_for_async(
            |e| msg(e) == "connection closed" && e["client_cn"] == "good",
            2,
            T,
        )
        .await;
    assert_eq!(ok[0]["client_serial"].as_str().unwrap().len(), 32);

    // No resumption on a client-auth route: TLS 1.3 gets no ticket, TLS 1.2
    // no session ID to come back with.
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = tmp.join(&format!("sess{version}"));
        let out = tokio::task::block_in_place(|| {
            s_client(
                port,
                Some(&good),
                &[version, "-sess_out", sess.to_str().unwrap()],
            )
        });
        assert!(out.contains("hello"), "{out}");
        assert!(
            !out.contains("New Session Ticket arrived"),
            "{version}: a session ticket was sent: {out}"
        );
        if sess.exists() {
            let again = tokio::task::block_in_place(|| {
                s_client(
                    port,
                    Some(&good),
                    &[version, "-sess_in", sess.to_str().unwrap()],
                )
            });
            assert!(
                !again.contains("Reused,"),
                "{version}: a session was resumed: {again}"
            );
            assert!(again.contains("New,"), "{again}");
        }
    }
    drop(fwd);
}

#[test]
fn new_refuses_a_name_in_use_in_one_line_and_replace_revokes_the_old_one() {
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-replace");
    let state = tmp.join("state");
    issue(&state, tmp.path(), "anna-phone", &[]);
    let serials = |state: &Path| -> Vec<(String, String)> {
        let (ok, list) = client_cert(state, &["list"]);
        assert!(ok, "{list}");
        list.lines()
            .filter(|l| l.starts_with("anna-phone "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].to_string(), f[3..].join(" "))
            })
            .collect()
    };
    let old = serials(&state)[0].0.clone();

    // The name has a valid certificate: one line, what to do, nothing issued.
    let second = tmp.join("second");
    std::fs::create_dir(&second).unwrap();
    let (ok, out) = client_cert(
        &state,
        &["new", "anna-phone", "--out-dir", second.to_str().unwrap()],
    );
    assert!(!ok);
    assert_eq!(
        out,
        format!("tcpfwd: error: 'anna-phone' already has a valid certificate (serial {old}); revoke it first (`tcpfwd client-cert revoke anna-phone`), give --replace to revoke it and issue the new one in one step, or choose another name\n")
    );
    assert!(!second.join("anna-phone.p12").exists());
    assert_eq!(serials(&state).len(), 1);

    // --replace: the old one revoked and in the re-signed CRL, the new one valid.
    let (ok, out) = client_cert(
        &state,
        &[
            "new",
            "anna-phone",
            "--replace",
            "--out-dir",
            second.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "Revoked the previous certificate of 'anna-phone' (serial {old})"
        )),
        "{out}"
    );
    let pw = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Password: "))
        .unwrap();
    p12_to_pem(&second.join("anna-phone.p12"), pw);
    let now = serials(&state);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], (old.clone(), "revoked".to_string()));
    assert_eq!(now[1].1, "valid");
    let crl = state.join("family-ca").join("crl.pem");
    let (ok, text) = openssl(&["crl", "-in", crl.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Serial Number: {}", old.to_uppercase())),
        "{text}"
    );
    assert!(!text.contains(&now[1].0.to_uppercase()), "{text}");
}

/// A rustls client presenting the certificate and key in `pem`.
fn client_with_cert(pem: &Path) -> Arc<rustls::ClientConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pem)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pem).unwrap();
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(certs, key)
        .unwrap(),
    )
}

async fn echo_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");
}

/// Revokes `name` and waits until the CRL poll (every 2 s, no signal) has
/// closed `open`, made with its certificate; returns the "connection closed"
/// events saying so.
async fn revoke_and_see_closed<S: tokio::io::AsyncRead + Unpin>(
    fwd: &Tcpfwd,
    state: &Path,
    name: &str,
    open: &mut S,
) -> Vec<serde_json::Value> {
    let (ok, out) = tokio::task::block_in_place(|| client_cert(state, &["revoke", name]));
    assert!(ok, "{out}");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(T, open.read_to_end(&mut sink)).await;
    assert!(
        read.is_ok(),
        "the revoked certificate's connection is still open"
    );
    fwd.wait_for_async(
        |e| msg(e) == "connection closed" && e["reason"] == "client certificate revoked",
        1,
        T,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_closes_the_open_connections_made_with_the_certificate() {
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-revoke");
    let state = tmp.join("state");
    let (lost, pw) = issue(&state, tmp.path(), "lost-phone", &[]);
    let lost = p12_to_pem(&lost, &pw);
    let (kept, pw) = issue(&state, tmp.path(), "kept-phone", &[]);
    let kept = p12_to_pem(&kept, &pw);
    let backend = backends::echo().await;
    let port = free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{port}:{backend}"),
        "--client-auth",
        "family",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    // A client-auth route from the start: its CRL is watched from the start.
    fwd.wait_for_async(|e| msg(e) == WATCHING, 1, T).await;
    let addr = fwd.addr(0);
    let mut a = common::tls_connect(client_with_cert(&lost), addr, "localhost")
        .await
        .unwrap();
    let mut b = common::tls_connect(client_with_cert(&kept), addr, "localhost")
        .await
        .unwrap();
    echo_once(&mut a).await;
    echo_once(&mut b).await;

    let closed = revoke_and_see_closed(&fwd, &state, "lost-phone", &mut a).await;
    assert_eq!(closed[0]["client_cn"], "lost-phone");
    // The other one goes on.
    echo_once(&mut b).await;
    // And a new handshake with the revoked certificate fails.
    let again = common::tls_connect(client_with_cert(&lost), addr, "localhost").await;
    let refused = match again {
        Err(_) => true,
        Ok(mut s) => {
            // TLS 1.3: the client's Finished is sent before the server's verdict.
            let _ = s.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            !matches!(
                tokio::time::timeout(T, s.read_exact(&mut buf)).await,
                Ok(Ok(_))
            )
        }
    };
    assert!(
        refused,
        "a new handshake with the revoked certificate got through"
    );
    fwd.wait_for_async(
        |e| msg(e) == "connection closed" && e["detail"].as_str().unwrap_or("").contains("Revoked"),
        1,
        T,
    )
    .await;
    drop(fwd);
}

const WATCHING: &str = "watching the CRL files of the client-auth routes for revocations";
const STOPPED: &str = "no client-auth route with a CRL any more; stopped watching CRL files";

/// Writes a configuration file with one frontend on `port` to `backend`,
/// with the family CA's client authentication or without; renamed into place.
fn write_config(path: &Path, state: &Path, port: u16, backend: &str, client_auth: bool) {
    let auth = if client_auth {
        "client_auth = \"family\"\n"
    } else {
        ""
    };
    let text = format!(
        "state_dir = \"{}\"\n{auth}[[frontend]]\nlisten = \"127.0.0.1:{port}\"\n  [[frontend.route]]\n  backend = \"{backend}\"\n",
        state.display()
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crl_is_watched_only_while_a_route_has_client_auth() {
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-watch");
    let state = tmp.join("state");
    let (lost, pw) = issue(&state, tmp.path(), "lost-phone", &[]);
    let lost = p12_to_pem(&lost, &pw);
    let backend = backends::echo().await.to_string();
    let port = free_port();
    let file = tmp.join("tcpfwd.toml");
    write_config(&file, &state, port, &backend, false);
    let mut cmd = Tcpfwd::command();
    cmd.arg("--config").arg(&file);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for_async(|e| msg(e) == "ready", 1, T).await;
    let reloaded = |e: &serde_json::Value| {
        msg(e) == "configuration reloaded; new connections get it"
            || msg(e).starts_with("reload failed")
    };

    // No client authentication: nothing is watched. The first reload's line
    // comes after anything the start logged, so the log up to it tells.
    write_config(&file, &state, port, &backend, true);
    fwd.signal(libc::SIGHUP);
    let ev = fwd.wait_for_async(reloaded, 1, T).await;
    assert_eq!(
        msg(&ev[0]),
        "configuration reloaded; new connections get it"
    );
    let events = fwd.events();
    let at = events.iter().position(reloaded).unwrap();
    assert!(
        !events[..at].iter().any(|e| msg(e) == WATCHING),
        "the CRL was watched without a client-auth route:\n{}",
        fwd.stderr()
    );

    // The reload added client authentication: the family CA's CRL is watched
    // from now on, so a revocation closes the open connection without a signal.
    let w = fwd
        .wait_for_async(|e| msg(e) == WATCHING, 1, T)
        .await
        .remove(0);
    assert!(
        w["crl"].as_str().unwrap().ends_with("family-ca/crl.pem"),
        "{w}"
    );
    assert_eq!(w["every_seconds"], 2);
    let addr = fwd.addr(0);
    let mut a = common::tls_connect(client_with_cert(&lost), addr, "localhost")
        .await
        .unwrap();
    echo_once(&mut a).await;
    revoke_and_see_closed(&fwd, &state, "lost-phone", &mut a).await;

    // A reload that removes the last client-auth route stops the poll.
    write_config(&file, &state, port, &backend, false);
    fwd.signal(libc::SIGHUP);
    let ev = fwd.wait_for_async(reloaded, 2, T).await;
    assert_eq!(
        msg(&ev[1]),
        "configuration reloaded; new connections get it"
    );
    fwd.wait_for_async(|e| msg(e) == STOPPED, 1, T).await;
    assert_eq!(
        fwd.events().iter().filter(|e| msg(e) == WATCHING).count(),
        1
    );
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_family_client_auth_makes_the_family_ca() {
    let tmp = TempDir::new("ccert-reload-ca");
    let state = tmp.join("state");
    let backend = backends::echo().await.to_string();
    let file = tmp.join("tcpfwd.toml");
    let port = free_port();
    write_config(&file, &state, port, &backend, false);
    let mut cmd = Tcpfwd::command();
    cmd.arg("--config").arg(&file);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for_async(|e| msg(e) == "ready", 1, T).await;
    let ca = state.join("family-ca");
    assert!(!ca.exists(), "a family CA without a route that needs it");
    // No `client-cert new` yet: the reload makes the CA, as a start would.
    write_config(&file, &state, port, &backend, true);
    fwd.signal(libc::SIGHUP);
    let ev = fwd
        .wait_for_async(
            |e| {
                msg(e) == "configuration reloaded; new connections get it"
                    || msg(e).starts_with("reload failed")
            },
            1,
            T,
        )
        .await;
    assert_eq!(
        msg(&ev[0]),
        "configuration reloaded; new connections get it",
        "{}",
        fwd.stderr()
    );
    fwd.wait_for_async(|e| msg(e).starts_with("family CA created"), 1, T)
        .await;
    assert!(ca.join("ca.pem").exists() && ca.join("crl.pem").exists());
    fwd.wait_for_async(|e| msg(e) == WATCHING, 1, T).await;
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_carries_the_client_cn_and_verified() {
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-ppv2");
    let state = tmp.join("state");
    let (p12, pw) = issue(&state, tmp.path(), "anna-phone", &[]);
    let pem = p12_to_pem(&p12, &pw);
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let backend = backends::one_connection(|mut s| async move {
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.unwrap_or(0);
        buf.truncate(n);
        let _ = tx.send(buf);
    })
    .await;
    let port = free_port();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:{port}:{backend}"),
        "--client-auth",
        "family",
        "--proxy-protocol",
        "v2",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let mut c = common::tls_connect(client_with_cert(&pem), fwd.addr(0), "localhost")
        .await
        .unwrap();
    c.write_all(b"x").await.unwrap();
    let header = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    let parsed = ppp::v2::Header::try_from(&header[..]).expect("a PROXY v2 header");
    let ssl = parsed
        .tlvs()
        .filter_map(Result::ok)
        .find(|t| t.kind == 0x20)
        .expect("a PP2_TYPE_SSL TLV");
    // client: PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, verify: 0 (verified).
    assert_eq!(ssl.value[0] & 0x03, 0x03, "{:?}", ssl.value);
    assert_eq!(&ssl.value[1..5], &[0, 0, 0, 0]);
    let text = String::from_utf8_lossy(&ssl.value);
    assert!(text.contains("anna-phone"), "{text}");
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_warned_about_in_the_log_status_and_list() {
    use common::systemd::{field, NotifySocket};
    common::require_tool("openssl");
    let tmp = TempDir::new("ccert-expiry");
    let state = tmp.join("state");
    let (ok, out) = client_cert(
        &state,
        &[
            "new",
            "short-phone",
            "--days",
            "10",
            "--out-dir",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("valid for 30 days or less"), "{out}");
    issue(&state, tmp.path(), "long-phone", &[]);
    let (ok, list) = client_cert(&state, &["list"]);
    assert!(ok, "{list}");
    let line = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in {list}"))
            .to_string()
    };
    assert!(
        line("short-phone").ends_with("valid, expires in 10 days"),
        "{list}"
    );
    assert!(line("long-phone").ends_with("  valid"), "{list}");

    let backend = backends::echo().await;
    let notify = NotifySocket::new();
    let mut cmd = Tcpfwd::command();
    cmd.args([
        "--map",
        &format!("127.0.0.1:0:{backend}"),
        "--client-auth",
        "family",
        "--state-dir",
        state.to_str().unwrap(),
    ])
    .env("NOTIFY_SOCKET", notify.env_value());
    let fwd = Tcpfwd::spawn(cmd);
    let warned = |e: &serde_json::Value| {
        msg(e).starts_with("a client certificate from the family CA expires within 30 days")
    };
    let w = fwd.wait_for_async(warned, 1, T).await.remove(0);
    assert_eq!(w["level"], "WARN");
    assert_eq!(w["name"], "short-phone");
    assert_eq!(w["serial"].as_str().unwrap().len(), 32);
    assert_eq!(w["days_left"], 10);
    assert!(w["expires"].as_str().unwrap().starts_with("20"), "{w}");
    let warning = "WARNING: 1 client certificate expires within 30 days (short-phone)";
    let ready = notify
        .wait_for_async(|m| m.starts_with("READY=1"), 1, T)
        .await;
    let status = field(&ready[0], "STATUS").unwrap();
    assert!(status.contains(warning), "{status}");
    assert!(!status.contains("long-phone"), "{status}");

    // Again after a reload.
    fwd.signal(libc::SIGHUP);
    fwd.wait_for_async(warned, 2, T).await;
    let ready = notify
        .wait_for_async(|m| m.starts_with("READY=1"), 2, T)
        .await;
    assert!(field(&ready[1], "STATUS").unwrap().contains(warning));

    // Revoked, it is no longer about to expire: STATUS= says so without a reload.
    assert!(client_cert(&state, &["revoke", "short-phone"]).0);
    notify
        .wait_for_async(
            |m| m.starts_with("STATUS=Serving") && !m.contains("client certificate"),
            1,
            T,
        )
        .await;
    assert_eq!(fwd.events().iter().filter(|e| warned(e)).count(), 2);
    drop(fwd);
}

/// A `client-cert` command left running (one serving a link), its output
/// collected as it comes; killed by PID on drop.
struct Running {
    child: std::process::Child,
    out: Arc<std::sync::Mutex<String>>,
    err: Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn start(state: Option<&Path>, args: &[&str]) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.arg("client-cert").args(args);
        if let Some(s) = state {
            cmd.arg("--state-dir").arg(s);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(std::sync::Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut b = b.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Running { child, out, err }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// The rest of the stdout line that starts with `prefix`, once printed.
    fn wait_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(rest) = self
                .stdout()
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
            {
                return rest.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line {prefix:?} in:\n{}\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The readers may lag behind the exit.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running:\n{}\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl -k URL`, saving the body to `body` and the headers to `body.headers`;
/// returns (HTTP status, or 0 when there was no answer; the headers, lower case).
fn curl_get(url: &str, body: &Path) -> (u16, String) {
    let headers = body.with_extension("headers");
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "-w", "%{http_code}", "-o"])
        .arg(body)
        .arg("-D")
        .arg(&headers)
        .arg(url)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let headers = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (code, headers)
}

/// The PKCS#12 data of the first payload of a .mobileconfig, read by python3's plistlib.
fn plist_pkcs12(profile: &Path) -> (Vec<u8>, String) {
    let script = "import plistlib,sys\n\
        p = plistlib.load(open(sys.argv[1], 'rb'))\n\
        c = p['PayloadContent'][0]\n\
        assert p['PayloadType'] == 'Configuration', p\n\
        assert c['PayloadType'] == 'com.apple.security.pkcs12', c\n\
        assert 'Password' not in c, c\n\
        sys.stderr.write(p['PayloadDisplayName'] + '|' + p['PayloadIdentifier'] + '|' + c['PayloadUUID'])\n\
        sys.stdout.buffer.write(c['PayloadContent'])\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(profile)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (out.stdout, err)
}

/// The SHA-256 fingerprint of the certificate served at `addr`, as openssl prints it.
fn served_sha256(addr: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn new_serve_offers_a_one_time_link_with_its_qr_code_and_an_ios_profile() {
    common::require_tool("openssl");
    common::require_tool("curl");
    common::require_tool("python3");
    let tmp = TempDir::new("ccert-serve");
    let state = tmp.join("state");
    let dir = tmp.path().to_str().unwrap();
    let mut new = Running::start(
        Some(&state),
        &[
            "new",
            "anna-phone",
            "--out-dir",
            dir,
            "--mobileconfig",
            "--serve",
            "127.0.0.1:0",
        ],
    );
    let p12_url = new.wait_line("Download link for anna-phone.p12: ");
    let profile_url = new.wait_line("Download link for anna-phone.mobileconfig: ");
    let pw = new.wait_line("Password: ");
    let out = new.stdout();
    // The QR codes: half blocks, and the links printed with them.
    assert!(
        out.contains('\u{2580}') && out.contains('\u{2584}'),
        "{out}"
    );
    assert!(out.contains(&p12_url) && out.contains(&profile_url));
    let addr = p12_url
        .strip_prefix("https://")
        .and_then(|r| r.split_once('/'))
        .unwrap()
        .0
        .to_string();
    let (_, token) = p12_url.rsplit_once('/').unwrap();
    assert!(token.len() >= 22, "a token of 128 bits at least: {token}");
    assert_ne!(p12_url, profile_url);
    // The fingerprint printed is the served certificate's.
    let fp = served_sha256(&addr);
    assert!(out.contains(&format!("SHA-256 {fp}")), "{fp} not in {out}");

    // A wrong token: 404, logged, and nothing used up.
    let wrong = tmp.join("wrong");
    let (code, _) = curl_get(&format!("https://{addr}/AAAAAAAAAAAAAAAAAAAAAA"), &wrong);
    assert_eq!(code, 404);
    let deadline = std::time::Instant::now() + T;
    while !new.stderr().contains("asked for a wrong link") {
        assert!(std::time::Instant::now() < deadline, "{}", new.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "a wrong token ended it"
    );

    // The download: the file's very bytes, as a PKCS#12 that opens with the password.
    let got = tmp.join("got.p12");
    let (code, headers) = curl_get(&p12_url, &got);
    assert_eq!(code, 200, "{headers}");
    assert!(
        headers.contains("content-type: application/x-pkcs12"),
        "{headers}"
    );
    assert!(
        headers.contains("content-disposition: attachment; filename=\"anna-phone.p12\""),
        "{headers}"
    );
    let written = std::fs::read(tmp.join("anna-phone.p12")).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), written);
    let (ok, info) = openssl(&[
        "pkcs12",
        "-info",
        "-legacy",
        "-in",
        got.to_str().unwrap(),
        "-passin",
        &format!("pass:{pw}"),
        "-nokeys",
    ]);
    assert!(ok && info.contains("subject=CN = anna-phone"), "{info}");
    // Done after one download: exit 0, and the links are gone.
    assert!(new.wait_exit().success(), "{}", new.stderr());
    assert!(new
        .stdout()
        .contains("anna-phone.p12 was downloaded by 127.0.0.1:"));
    let (code, _) = curl_get(&p12_url, &tmp.join("again"));
    assert_ne!(code, 200, "a second download");
    let (code, _) = curl_get(&profile_url, &tmp.join("again"));
    assert_ne!(code, 200, "the other link after the download");

    // The profile `new` wrote: a real plist, the PKCS#12 in it, no password.
    let profile = tmp.join("anna-phone.mobileconfig");
    let (data, names) = plist_pkcs12(&profile);
    assert_eq!(data, written);
    assert!(names.starts_with("tcpfwd: anna-phone|"), "{names}");
    assert!(!String::from_utf8_lossy(&std::fs::read(&profile).unwrap()).contains(&pw));

    // `serve` offers the existing file again; this time the profile is taken.
    let mut serve = Running::start(
        None,
        &[
            "serve",
            "anna-phone",
            "127.0.0.1:0",
            "--out-dir",
            dir,
            "--mobileconfig",
        ],
    );
    let url = serve.wait_line("Download link for anna-phone.mobileconfig: ");
    let got = tmp.join("got.mobileconfig");
    let (code, headers) = curl_get(&url, &got);
    assert_eq!(code, 200, "{headers}");
    assert!(
        headers.contains("content-type: application/x-apple-aspen-config"),
        "{headers}"
    );
    assert!(
        headers.contains("filename=\"anna-phone.mobileconfig\""),
        "{headers}"
    );
    let (data, served_names) = plist_pkcs12(&got);
    assert_eq!(data, written);
    assert_ne!(served_names, names, "fresh identifiers for each profile");
    assert!(serve.wait_exit().success(), "{}", serve.stderr());

    // Unused, the link expires: non-zero, one line saying so.
    let mut unused = Running::start(
        None,
        &[
            "serve",
            "anna-phone",
            "127.0.0.1:0",
            "--out-dir",
            dir,
            "--serve-for",
            "1s",
        ],
    );
    unused.wait_line("Download link for anna-phone.p12: ");
    let status = unused.wait_exit();
    assert!(!status.success());
    let err = unused.stderr();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("the download link expired unused after 1 second"),
        "{err}"
    );
}
