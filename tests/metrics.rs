//! The metrics endpoint as a real Prometheus (Debian's `prometheus`) scrapes
//! it: the counters move as the connections this test makes say they should,
//! and `promtool check metrics` accepts the text.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::backends;
use common::{free_port, msg, require_tool, tls_connect, Pki, Tcpfwd, TempDir};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

/// A plain HTTP/1.0 GET; returns (status line, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback with its storage in a temporary
/// directory, stopped by PID on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        require_tool("prometheus");
        let dir = TempDir::new("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: tcpfwd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The query API's answer to an instant query.
    fn query(&self, query: &str) -> Option<Value> {
        let (_, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(query)),
        )
        .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// The instant query's one value, if it has exactly one series.
    fn value(&self, query: &str) -> Option<f64> {
        let (_, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(query)),
        )
        .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        match &result[..] {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until `query` gives `want` (scrapes come every second).
    fn wait_value(&self, query: &str, want: f64) {
        let deadline = Instant::now() + T;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(query);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{query}: wanted {want}, Prometheus says {last:?}; its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_what_the_connections_did() {
    require_tool("promtool");
    let pki = Pki::new();
    let echo = backends::echo().await;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let fwd = Tcpfwd::start(&[
        "--map",
        &format!("127.0.0.1:0:{echo}"),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--metrics",
        &metrics_addr.to_string(),
    ]);
    fwd.wait_for(|e| msg(e) == "serving metrics at /metrics", 1, T);

    // Three good connections, each echoing 1000 bytes and closed by the client.
    const GOOD: usize = 3;
    const LEN: usize = 1000;
    for _ in 0..GOOD {
        let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        s.write_all(&[7u8; LEN]).await.unwrap();
        let mut back = vec![0u8; LEN];
        s.read_exact(&mut back).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    // Two that are not TLS at all.
    const NOT_TLS: usize = 2;
    for _ in 0..NOT_TLS {
        let mut s = tokio::net::TcpStream::connect(fwd.addr(0)).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    fwd.wait_for_async(|e| msg(e) == "connection closed", GOOD + NOT_TLS, T)
        .await;
    // A reload that re-reads the certificate files.
    fwd.signal(libc::SIGHUP);
    fwd.wait_for_async(
        |e| msg(e) == "certificate reloaded; new handshakes get it",
        1,
        T,
    )
    .await;

    // The text itself, through promtool's linter.
    let (status, text) = http_get(metrics_addr, "/metrics").unwrap();
    assert!(status.contains("200"), "{status}\n{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = http_get(metrics_addr, "/other").unwrap();
    assert!(status.contains("404"), "{status}");

    // And as Prometheus stored it.
    let prom = Prometheus::start(metrics_addr);
    let good = GOOD as f64;
    let bad = NOT_TLS as f64;
    prom.wait_value("up{job=\"tcpfwd\"}", 1.0);
    prom.wait_value("sum(tcpfwd_connections_accepted_total)", good + bad);
    prom.wait_value("tcpfwd_connections_opened_total{route=\"default\"}", good);
    prom.wait_value(
        "tcpfwd_connections_closed_total{route=\"default\",reason=\"client closed\"}",
        good,
    );
    prom.wait_value(
        "tcpfwd_connections_closed_total{route=\"\",reason=\"handshake failed\"}",
        bad,
    );
    prom.wait_value("sum(tcpfwd_connections_closed_total)", good + bad);
    prom.wait_value("sum(tcpfwd_connections_open)", 0.0);
    prom.wait_value(
        "tcpfwd_received_bytes_total{route=\"default\"}",
        (GOOD * LEN) as f64,
    );
    prom.wait_value(
        "tcpfwd_sent_bytes_total{route=\"default\"}",
        (GOOD * LEN) as f64,
    );
    prom.wait_value(
        "tcpfwd_tls_handshake_failures_total{route=\"\",kind=\"not_tls\"}",
        bad,
    );
    prom.wait_value("sum(tcpfwd_tls_handshake_failures_total)", bad);
    prom.wait_value(
        "tcpfwd_tls_handshake_duration_seconds_count{route=\"default\"}",
        good,
    );
    prom.wait_value("tcpfwd_reloads_total", 1.0);
    prom.wait_value("tcpfwd_reload_failures_total", 0.0);
    prom.wait_value(
        &format!(
            "count(tcpfwd_build_info{{version=\"{}\",tls_provider=\"aws-lc-rs+ring\"}})",
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    // Every query of the example dashboard is valid, and finds something.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/monitoring/tcpfwd-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*");
            let answer = prom.query(&expr);
            let status = answer.as_ref().map(|a| a["status"].clone());
            assert_eq!(
                status,
                Some(Value::from("success")),
                "dashboard query {expr}: {answer:?}"
            );
            exprs += 1;
        }
    }
    assert!(exprs >= 9, "{exprs} dashboard queries");
    // Every metric the rules and the dashboard name is one tcpfwd exposes.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/monitoring/tcpfwd-alerts.yml"
    ))
    .unwrap();
    for source in [rules, dashboard.to_string()] {
        for (i, _) in source.match_indices("tcpfwd_") {
            let name: String = source[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The ACME times exist only with ACME (tests/acme.rs reads them).
            if !name.starts_with("tcpfwd_acme_") {
                assert!(text.contains(&name), "{name} is not in the scraped text");
            }
        }
    }
    // The test certificate is valid for a long time yet.
    prom.wait_value(
        "count(tcpfwd_certificate_not_after_seconds{subject=~\".*tcpfwd test leaf.*\"} > time())",
        1.0,
    );
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// Bytes that are not TLS from `from`, then waits for tcpfwd to close (or
/// refuse) the connection.
async fn not_tls_from(from: &str, to: SocketAddr) {
    if let Ok(mut s) = connect_from(from, to).await {
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_policy_refusals_by_why() {
    let pki = Pki::new();
    let dir = TempDir::new("metrics-policy");
    let echo = backends::echo().await;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // 127.0.0.3 is denied at accept; the NAS route admits 127.0.0.2 alone.
    let file = dir.join("tcpfwd.toml");
    std::fs::write(
        &file,
        format!(
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
        ),
    )
    .unwrap();
    let (nas_cert, nas_key) = pki.leaf("nas", &["nas.example.test"]);
    let fwd = Tcpfwd::start(&[
        "--config",
        file.to_str().unwrap(),
        "--cert",
        pki.cert.to_str().unwrap(),
        "--key",
        pki.key.to_str().unwrap(),
        "--cert",
        nas_cert.to_str().unwrap(),
        "--key",
        nas_key.to_str().unwrap(),
        "--metrics",
        &metrics_addr.to_string(),
        "--per-source-connections",
        "2",
        "--per-source-rate",
        "5",
        // Not this test's subject: the flood's bytes that are not TLS.
        "--ban-after",
        "1000",
        "--handshake-timeout",
        "60s",
    ]);
    let to = fwd.addr(0);
    let cfg = pki.client_config();
    // Denied at accept, by the frontend's list.
    not_tls_from("127.0.0.3", to).await;
    // Denied after the ClientHello, by the route's list.
    let tcp = connect_from("127.0.0.1", to).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("nas.example.test").unwrap();
    let refused = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await;
    assert!(refused.is_err(), "the NAS route must refuse 127.0.0.1");
    // A flood from 127.0.0.2: six silent connections held, two admitted
    // (and two of its five a minute spent), four over the concurrent limit.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(connect_from("127.0.0.2", to).await.unwrap());
    }
    let prom = Prometheus::start(metrics_addr);
    let refused_by = |route: &str, reason: &str| {
        format!(
            "tcpfwd_connections_refused_by_policy_total{{route=\"{route}\",reason=\"{reason}\"}}"
        )
    };
    prom.wait_value(&refused_by("", "per_source_connections"), 4.0);
    drop(held);
    fwd.wait_for_async(
        |e| {
            msg(e) == "connection closed"
                && e["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.2:"))
        },
        2,
        T,
    )
    .await;
    // Then eight one after the other: three left of the five a minute, the
    // rest over the rate (four or more, should a token come back meanwhile).
    for _ in 0..8 {
        not_tls_from("127.0.0.2", to).await;
    }
    prom.wait_value(&refused_by("", "denied"), 1.0);
    prom.wait_value(&refused_by("nas.example.test", "denied"), 1.0);
    prom.wait_value(
        &format!("count({} >= 4 <= 5)", refused_by("", "per_source_rate")),
        1.0,
    );
    for (route, reason) in [
        ("", "banned"),
        ("", "not_admitted"),
        ("nas.example.test", "per_source_connections"),
        ("default", "denied"),
    ] {
        prom.wait_value(&refused_by(route, reason), 0.0);
    }
    // Refused at accept: never accepted. Refused by the route: accepted,
    // then closed as `refused`, and no longer open.
    prom.wait_value(
        "tcpfwd_connections_closed_total{route=\"\",reason=\"refused\"}",
        1.0,
    );
    prom.wait_value("sum(tcpfwd_connections_open)", 0.0);
    prom.wait_value(
        "sum(tcpfwd_connections_accepted_total) - sum(tcpfwd_connections_closed_total)",
        0.0,
    );
}

#[test]
fn alert_rules_pass_promtool() {
    require_tool("promtool");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/monitoring");
    for args in [
        ["check", "rules", "tcpfwd-alerts.yml"],
        ["test", "rules", "tcpfwd-alerts.test.yml"],
    ] {
        let out = Command::new("timeout")
            .arg("60")
            .arg("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
