//! Source addresses and limits on the real binary, with loopback sources
//! (127.0.0.1, 127.0.0.2, 127.0.0.3, ::1): allow/deny per frontend and per
//! route (by SNI), IPv6 and IPv4-mapped addresses, a flood from one source
//! while another is served, bans after failed handshakes that end, and the
//! summary that replaces the refused connections' log lines.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::{backends, msg, Pki, Tcpfwd, TempDir};

const T: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection to `to` from the address `from` (bound before connecting).
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A TLS handshake from `from` with `sni`, then one echo round trip.
async fn echo_from(
    cfg: &Arc<rustls::ClientConfig>,
    from: IpAddr,
    to: SocketAddr,
    sni: &str,
) -> Result<(), String> {
    let run = async {
        let tcp = connect_from(from, to).await.map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(cfg.clone());
        let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let mut s = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        if &b != b"ping" {
            return Err(format!("echo gave {b:?}"));
        }
        Ok(())
    };
    tokio::time::timeout(T, run)
        .await
        .map_err(|_| "no answer in time".to_string())?
}

/// Expects the connection to be refused without a TLS alert.
async fn refused(cfg: &Arc<rustls::ClientConfig>, from: IpAddr, to: SocketAddr, sni: &str) {
    let e = echo_from(cfg, from, to, sni)
        .await
        .expect_err(&format!("{from} with {sni} must be refused"));
    assert!(
        !e.contains("alert") && !e.contains("no answer"),
        "{from} with {sni}: closed without an alert, at once: {e}"
    );
}

/// The sum of `field` over the refusal summaries so far.
fn summed(fwd: &Tcpfwd, field: &str) -> u64 {
    fwd.events()
        .iter()
        .filter(|e| msg(e) == "refused connections")
        .map(|e| e[field].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until the summaries add up to at least `n` for `field`.
fn wait_summed(fwd: &Tcpfwd, field: &'static str, n: u64) {
    let deadline = std::time::Instant::now() + T;
    while summed(fwd, field) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "summaries never reached {field} = {n}:\n{}",
            fwd.stderr()
        );
        // Wake on the next event rather than on a clock.
        let seen = fwd.events().len();
        fwd.wait_for(|_| true, seen + 1, T);
    }
}

fn summaries(fwd: &Tcpfwd) -> Vec<Value> {
    fwd.events()
        .into_iter()
        .filter(|e| msg(e) == "refused connections")
        .collect()
}

fn closed_from(fwd: &Tcpfwd, peer_ip: &str) -> usize {
    fwd.closed()
        .iter()
        .filter(|e| {
            e["peer"]
                .as_str()
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .is_some_and(|p| p.ip() == ip(peer_ip))
        })
        .count()
}

fn start_with_file(pki: &Pki, dir: &TempDir, toml: &str, extra: &[&str]) -> Tcpfwd {
    let file = dir.join("tcpfwd.toml");
    std::fs::write(&file, toml).unwrap();
    let (nas_cert, nas_key) = pki.leaf("nas", &["nas.example.test"]);
    let mut args = vec![
        "--config".to_string(),
        file.display().to_string(),
        "--cert".into(),
        pki.cert.display().to_string(),
        "--key".into(),
        pki.key.display().to_string(),
        "--cert".into(),
        nas_cert.display().to_string(),
        "--key".into(),
        nas_key.display().to_string(),
        "--refusal-log-interval".into(),
        "1s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tcpfwd::start(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_per_frontend_and_per_route() {
    let ipv6 = common::has_ipv6_loopback();
    let pki = Pki::new();
    let dir = TempDir::new("policy");
    let echo = backends::echo().await;
    // Frontend 1: IPv4 only; 127.0.0.3 denied at accept; the NAS route
    // admits 127.0.0.2 alone (after the ClientHello).
    // Frontend 2 (dual-stack, when the host has IPv6): 127.0.0.2 (written
    // as IPv4-mapped) and ::1 only.
    let mut toml = format!(
        r#"
[[frontend]]
listen = "127.0.0.1:0"
deny = ["127.0.0.3"]
  [[frontend.route]]
  backend = "{echo}"
  [[frontend.route]]
  sni = ["nas.example.test"]
  backend = "{echo}"
  allow = ["127.0.0.2/32"]
"#
    );
    if ipv6 {
        toml.push_str(&format!(
            "[[frontend]]\nlisten = \"0\"\nallow = [\"::ffff:127.0.0.2\", \"::1\"]\n  [[frontend.route]]\n  backend = \"{echo}\"\n"
        ));
    }
    let fwd = start_with_file(&pki, &dir, &toml, &[]);
    let cfg = pki.client_config();
    let v4 = fwd.addr(0);

    echo_from(&cfg, ip("127.0.0.1"), v4, "localhost")
        .await
        .unwrap();
    echo_from(&cfg, ip("127.0.0.2"), v4, "nas.example.test")
        .await
        .unwrap();
    refused(&cfg, ip("127.0.0.3"), v4, "localhost").await;
    refused(&cfg, ip("127.0.0.1"), v4, "nas.example.test").await;
    let mut denied = 1;
    if ipv6 {
        let all = fwd.listen_addrs()[1];
        let on4 = SocketAddr::new(ip("127.0.0.1"), all.port());
        let on6 = SocketAddr::new(ip("::1"), all.port());
        echo_from(&cfg, ip("127.0.0.2"), on4, "localhost")
            .await
            .unwrap();
        echo_from(&cfg, ip("::1"), on6, "localhost").await.unwrap();
        refused(&cfg, ip("127.0.0.1"), on4, "localhost").await;
        denied += 1;
    }
    let (fwd_ref, d) = (&fwd, denied);
    tokio::task::block_in_place(|| {
        wait_summed(fwd_ref, "denied", d);
        wait_summed(fwd_ref, "route_denied", 1);
    });
    let s = summaries(&fwd);
    let tops: String = s
        .iter()
        .filter_map(|e| e["top_sources"].as_str())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(tops.contains("127.0.0.3 (1)"), "{tops}");
    // The served connections have their line; the refused ones none.
    let served = if ipv6 { 4 } else { 2 };
    fwd.wait_for_async(|e| msg(e) == "connection closed", served, T)
        .await;
    assert_eq!(closed_from(&fwd, "127.0.0.3"), 0, "{}", fwd.stderr());
    assert_eq!(closed_from(&fwd, "127.0.0.1"), 1, "{}", fwd.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_source_leaves_another_served() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{echo}"),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--per-source-connections",
        "4",
        "--per-source-rate",
        "30",
        // Not this test's subject: the flood's unfinished handshakes.
        "--ban-after",
        "1000",
        "--handshake-timeout",
        "60s",
        "--refusal-log-interval",
        "1s",
    ]);
    let cfg = pki.client_config();
    let to = fwd.addr(0);
    let (flood, family) = (ip("127.0.0.2"), ip("127.0.0.1"));
    for _ in 0..3 {
        echo_from(&cfg, family, to, "localhost").await.unwrap();
    }
    // 20 silent connections held open: 4 are admitted, 16 closed at once.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from(flood, to).await.unwrap());
    }
    for _ in 0..3 {
        echo_from(&cfg, family, to, "localhost").await.unwrap();
    }
    let fwd_ref = &fwd;
    tokio::task::block_in_place(|| wait_summed(fwd_ref, "per_source_connections", 16));
    drop(held);
    fwd.wait_for_async(
        move |e| {
            msg(e) == "connection closed"
                && e["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.2:"))
        },
        4,
        T,
    )
    .await;
    // Then 40 connections one after the other, each to its end: more than
    // the 30 a minute (4 already spent) that the source may open.
    for i in 0..40 {
        if let Ok(mut s) = connect_from(flood, to).await {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
        if i % 10 == 0 {
            echo_from(&cfg, family, to, "localhost").await.unwrap();
        }
    }
    for _ in 0..3 {
        echo_from(&cfg, family, to, "localhost").await.unwrap();
    }
    tokio::task::block_in_place(|| wait_summed(fwd_ref, "per_source_rate", 10));
    assert!(summed(&fwd, "per_source_connections") >= 16);
    let s = summaries(&fwd);
    assert!(
        s.iter().all(|e| !e["top_sources"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.1 ")),
        "the family's source was never refused: {s:?}"
    );
    assert!(s[0]["top_sources"]
        .as_str()
        .is_some_and(|t| t.starts_with("127.0.0.2 (")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_ban_the_source_until_the_cool_off_ends() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{echo}"),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--ban-after",
        "3",
        "--ban-time",
        "5s",
        "--max-ban-time",
        "10s",
        "--refusal-log-interval",
        "1s",
    ]);
    let cfg = pki.client_config();
    let to = fwd.addr(0);
    let scanner = ip("127.0.0.2");
    for _ in 0..3 {
        let mut s = connect_from(scanner, to).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    fwd.wait_for_async(
        |e| msg(e) == "connection closed" && e["reason"] == "handshake failed",
        3,
        T,
    )
    .await;
    // Banned now: refused at accept, while another source is served.
    refused(&cfg, scanner, to, "localhost").await;
    echo_from(&cfg, ip("127.0.0.1"), to, "localhost")
        .await
        .unwrap();
    // The cool-off ends: served again (retried on a bounded schedule).
    let mut served = false;
    for _ in 0..100 {
        if echo_from(&cfg, scanner, to, "localhost").await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "the ban never ended:\n{}", fwd.stderr());
    let fwd_ref = &fwd;
    tokio::task::block_in_place(|| {
        wait_summed(fwd_ref, "new_bans", 1);
        wait_summed(fwd_ref, "banned", 1);
    });
}

/// Ban numbers per route: a client-auth route with `ban_after = 2` refuses
/// a source after two handshakes without a certificate, while the same
/// source is still served on the open route of the same frontend, another
/// source still reaches the strict route's handshake, and the process-wide
/// ban (20 failures) is far off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stricter_route_bans_sooner_while_the_source_is_served_elsewhere() {
    let pki = Pki::new();
    let dir = TempDir::new("route-bans");
    let echo = backends::echo().await;
    let toml = format!(
        r#"
[[frontend]]
listen = "127.0.0.1:0"
  [[frontend.route]]
  backend = "{echo}"
  [[frontend.route]]
  sni = ["nas.example.test"]
  backend = "{echo}"
  client_ca = "{ca}"
  ban_after = 2
  ban_time = "1h"
  max_ban_time = "2h"
"#,
        ca = pki.ca.display()
    );
    let fwd = start_with_file(&pki, &dir, &toml, &[]);
    let cfg = pki.client_config();
    let to = fwd.addr(0);
    let (stranger, other) = (ip("127.0.0.2"), ip("127.0.0.3"));
    for _ in 0..2 {
        let e = echo_from(&cfg, stranger, to, "nas.example.test")
            .await
            .expect_err("no client certificate");
        assert!(!e.contains("no answer"), "{e}");
    }
    fwd.wait_for_async(
        |e| msg(e) == "connection closed" && e["reason"] == "client certificate rejected",
        2,
        T,
    )
    .await;
    // Refused on the strict route, without an alert, after the ClientHello ...
    refused(&cfg, stranger, to, "nas.example.test").await;
    // ... and served on the open one, from the same address.
    echo_from(&cfg, stranger, to, "localhost").await.unwrap();
    // Another source still gets the strict route's handshake (and its alert).
    let e = echo_from(&cfg, other, to, "nas.example.test")
        .await
        .expect_err("no client certificate");
    assert!(e.contains("alert") || e.contains("certificate"), "{e}");
    let fwd_ref = &fwd;
    tokio::task::block_in_place(|| {
        wait_summed(fwd_ref, "new_bans", 1);
        wait_summed(fwd_ref, "banned", 1);
    });
    let s = summaries(&fwd);
    assert!(
        s.iter().any(|e| e["top_sources"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.2 (")),
        "{s:?}"
    );
}
