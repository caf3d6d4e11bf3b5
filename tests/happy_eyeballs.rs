//! Happy eyeballs through the real binary: a backend name whose first address
//! drops every packet still connects, by its second address, well inside the
//! connect timeout.
//!
//! The scenario needs a network of its own (an address on lo, a firewall
//! rule) and a private /etc/hosts, so the test runs itself again inside a new
//! user, network and mount namespace (`unshare -rn --mount`) and checks that
//! run's result. Nothing outside the namespace is touched.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::backends;
use common::{msg, tls_connect, Pki, Tcpfwd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Set in the run inside the namespace.
const INSIDE: &str = "TCPFWD_TEST_IN_NAMESPACE";
/// The backend's first address: on lo, with every packet to it dropped.
const BLACK_HOLE: &str = "fd00::7";
const NAME: &str = "dvr.test";
const CONNECTIONS: usize = 5;
const T: Duration = Duration::from_secs(20);

#[test]
fn a_first_address_that_drops_packets_falls_back_to_the_second() {
    const TEST: &str = "a_first_address_that_drops_packets_falls_back_to_the_second";
    if std::env::var_os(INSIDE).is_some() {
        return inside();
    }
    for tool in ["unshare", "ip", "nft", "mount"] {
        common::require_tool(tool);
    }
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .expect("run unshare");
    let report = format!(
        "the run inside the namespace:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // A name that matched nothing would pass too: insist that it ran.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("test result: ok. 1 passed"),
        "{report}"
    );
}

/// Runs `cmd args...`, panicking with its output if it fails.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Puts `text` over `target` for this mount namespace only.
fn bind_file(dir: &common::TempDir, target: &str, text: &str) {
    let file = dir.join(Path::new(target).file_name().unwrap().to_str().unwrap());
    std::fs::write(&file, text).unwrap();
    run("mount", &["--bind", file.to_str().unwrap(), target]);
}

fn inside() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario());
}

async fn scenario() {
    run("ip", &["link", "set", "lo", "up"]);
    run(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{BLACK_HOLE}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    );
    // The same backend listens on both addresses, so that only the dropped
    // packets, not a refusal, keep the first address from answering.
    let v4 = backends::echo_on("127.0.0.1:0").await;
    let port = v4.port();
    let v6 = backends::echo_on(&format!("[{BLACK_HOLE}]:{port}")).await;
    run("nft", &["add", "table", "inet", "he"]);
    run(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "he",
            "out",
            "{ type filter hook output priority 0; }",
        ],
    );
    run(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "he",
            "out",
            "ip6",
            "daddr",
            BLACK_HOLE,
            "tcp",
            "dport",
            &port.to_string(),
            "drop",
        ],
    );

    // The name has both addresses, the black hole listed and sorted first:
    // glibc sorts getaddrinfo's answers (RFC 3484), so gai.conf says how.
    let etc = common::TempDir::new("etc");
    bind_file(
        &etc,
        "/etc/hosts",
        &format!("127.0.0.1 localhost\n{BLACK_HOLE} {NAME}\n127.0.0.1 {NAME}\n"),
    );
    bind_file(
        &etc,
        "/etc/gai.conf",
        "precedence ::1/128 50\nprecedence fd00::/8 45\nprecedence ::/0 40\n\
         precedence ::ffff:0:0/96 10\n",
    );
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((NAME, port))
        .await
        .unwrap()
        .collect();
    assert_eq!(resolved, [v6, v4], "the resolver's answer for {NAME}");

    let pki = Pki::new();
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{NAME}:{port}"),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--connect-timeout",
        "5s",
    ]);
    for i in 0..CONNECTIONS {
        let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        let ping = format!("ping {i}");
        s.write_all(ping.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, ping, "{}", fwd.stderr());
    }
    let closed = fwd
        .wait_for_async(|e| msg(e) == "connection closed", CONNECTIONS, T)
        .await;
    for e in &closed {
        assert_eq!(e["reason"], "client closed", "{e}");
        assert_eq!(e["backend_addr"], v4.to_string(), "{e}");
        // Sanity, not timing: nowhere near the connect timeout.
        assert!(e["duration_ms"].as_u64().unwrap() < 5_000, "{e}");
    }
}
