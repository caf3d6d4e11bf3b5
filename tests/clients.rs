//! Real clients (openssl s_client, curl) and real operating-system conditions:
//! a backend name that changes address, a tiny open-files limit.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::backends;
use common::{msg, tls_connect, Pki, Tcpfwd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn cert_args(pki: &Pki) -> [String; 4] {
    [
        "--cert".into(),
        pki.cert.to_str().unwrap().into(),
        "--key".into(),
        pki.key.to_str().unwrap().into(),
    ]
}

fn start(pki: &Pki, map: &str, extra: &[&str]) -> Tcpfwd {
    let c = cert_args(pki);
    let mut args = vec!["--map", map];
    args.extend(c.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Tcpfwd::start(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_verifies_and_gets_no_alpn() {
    common::require_tool("openssl");
    let pki = Pki::new();
    let (backend, _) = backends::fixed_reply("127.0.0.1:0", b"hello from the backend\n").await;
    let fwd = start(&pki, &format!("127.0.0.1:0:{backend}"), &[]);
    let port = fwd.addr(0).port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
            ])
            .args([
                "-CAfile",
                pki.ca.to_str().unwrap(),
                "-verify_return_error",
                "-ign_eof",
            ])
            .args(["-alpn", "h2,http/1.1"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("hello from the backend"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert!(
        stdout.contains("No ALPN negotiated"),
        "tcpfwd must not promise h2:\n{stdout}"
    );
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    fwd.wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_tls12_works_and_tls11_is_refused() {
    common::require_tool("openssl");
    let pki = Pki::new();
    let (backend, _) = backends::fixed_reply("127.0.0.1:0", b"v12\n").await;
    let fwd = start(&pki, &format!("127.0.0.1:0:{backend}"), &[]);
    let port = fwd.addr(0).port();
    let ca = pki.ca.to_str().unwrap().to_string();
    let run = move |ver: &'static str| {
        let ca = ca.clone();
        move || {
            Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-servername",
                    "localhost",
                ])
                .args(["-CAfile", &ca, "-ign_eof", ver])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    };
    let out = tokio::task::spawn_blocking(run("-tls1_2")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("v12") && stdout.contains("TLSv1.2"),
        "{stdout}"
    );
    let out = tokio::task::spawn_blocking(run("-tls1_1")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("v12"),
        "TLS 1.1 must be refused:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_loads_the_dvr_page_over_http1() {
    common::require_tool("curl");
    let pki = Pki::new();
    let web = backends::dvr_web().await;
    let fwd = start(&pki, &format!("127.0.0.1:0:{web}"), &[]);
    let port = fwd.addr(0).port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                pki.ca.to_str().unwrap(),
            ])
            .args(["-w", "\\nhttp_version=%{http_version}"])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("<h1>Camera 1</h1>"), "{stdout}");
    assert!(stdout.ends_with("http_version=1.1"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_default_logs_its_fingerprint_and_serves_it() {
    common::require_tool("openssl");
    let echo = backends::echo().await;
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{echo}"),
        "--self-signed-name",
        "cams.example.org",
    ]);
    let ev = fwd.wait_for(
        |e| msg(e).starts_with("serving a self-signed certificate"),
        1,
        T,
    );
    let fp = ev[0]["sha256"].as_str().unwrap().to_string();
    let names = ev[0]["names"].as_str().unwrap().to_string();
    assert!(
        names.contains("localhost") && names.contains("cams.example.org"),
        "{names}"
    );
    let port = fwd.addr(0).port();
    let pem = tokio::task::spawn_blocking(move || {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        x509.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        String::from_utf8(x509.wait_with_output().unwrap().stdout).unwrap()
    })
    .await
    .unwrap();
    assert!(
        pem.trim().ends_with(&fp),
        "openssl sees {pem}, log says {fp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_name_is_resolved_for_each_connection() {
    // tcpfwd runs in its own mount namespace with a private /etc/hosts that the
    // test rewrites between connections, as DHCP would move a DVR.
    common::require_tool("unshare");
    let pki = Pki::new();
    let (a, _) = backends::fixed_reply("127.0.0.2:0", b"first").await;
    let (b, _) = backends::fixed_reply(&format!("127.0.0.3:{}", a.port()), b"second").await;
    assert_eq!(a.port(), b.port());
    let hosts = common::TempDir::new("hosts");
    let hosts_file = hosts.join("hosts");
    std::fs::write(&hosts_file, "127.0.0.2 dvr.test\n").unwrap();
    let c = cert_args(&pki);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(&hosts_file)
    .arg(common::BIN)
    .args(["--log-format", "json", "--map"])
    .arg(format!("127.0.0.1:0:dvr.test:{}", a.port()))
    .args(&c);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "listening", 1, T);

    let fetch = || async {
        let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        got
    };
    assert_eq!(fetch().await, "first");
    // Rewrite in place: the bind mount follows the inode, not the name.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&hosts_file)
        .unwrap();
    f.write_all(b"127.0.0.3 dvr.test\n").unwrap();
    drop(f);
    assert_eq!(fetch().await, "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_name_that_does_not_resolve_is_logged_per_connection() {
    let pki = Pki::new();
    // The lookup runs inside the connect timeout: give a slow resolver time
    // to answer, so that the test sees its answer rather than the timeout.
    let fwd = start(
        &pki,
        "127.0.0.1:0:no-such-host.invalid:80",
        &["--connect-timeout", "60s"],
    );
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let ev = fwd
        .wait_for_async(
            |e| msg(e) == "connection closed",
            1,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(ev[0]["reason"], "backend unreachable");
    assert!(
        ev[0]["detail"]
            .as_str()
            .unwrap()
            .contains("cannot resolve no-such-host.invalid"),
        "{}",
        ev[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_under_a_tiny_open_files_limit_does_not_spin() {
    common::require_tool("prlimit");
    let pki = Pki::new();
    let echo = backends::echo().await;
    let c = cert_args(&pki);
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=64:64",
        common::BIN,
        "--log-format",
        "json",
        "--handshake-timeout",
        "1m",
        // Each worker logs its own first failure: fix the count.
        "--threads",
        "2",
    ])
    .args(["--map", &format!("127.0.0.1:0:{echo}")])
    .args(&c);
    let fwd = Tcpfwd::spawn(cmd);
    fwd.wait_for(|e| msg(e) == "listening", 1, T);
    let addr = fwd.addr(0);
    // 100 silent clients: more than 64 descriptors' worth.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    fwd.wait_for_async(|e| msg(e).starts_with("accept failed"), 1, T)
        .await;
    let before = fwd.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = fwd.cpu_time() - before;
    assert!(
        spent < Duration::from_millis(500),
        "spent {spent:?} of CPU in 2 s while out of descriptors"
    );
    let warnings = fwd
        .events()
        .iter()
        .filter(|e| msg(e).starts_with("accept failed"))
        .count();
    assert!(
        warnings <= 3,
        "{warnings} accept warnings: the log is being flooded"
    );
    drop(held);
    // Once descriptors are free again, connections are served.
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tls_connect(pki.client_config(), addr, "localhost"),
        )
        .await
        {
            s.write_all(b"back").await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            ok = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ok.as_ref().map(|b| &b[..]), Some(&b"back"[..]));
}
