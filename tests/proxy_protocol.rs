//! PROXY protocol headers from `tcpfwd::proxy::header::encode`, read by real
//! nginx and HAProxy: each must accept the header and report the client's
//! address (and, where the reader can show it, the TLVs) the header carries.
//!
//! Then end to end: tcpfwd with `--proxy-protocol` in front of each reader,
//! which must see the real client's address and port.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::proxy_readers::{Haproxy, Nginx, Seen};
use common::{tls_connect, Pki, Tcpfwd};
use tcpfwd::proxy::header::{encode, ProxyProtocol, TlsInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn tls() -> TlsInfo {
    TlsInfo {
        sni: Some("cams.example.org".into()),
        alpn: Some(b"h2".to_vec()),
        version: Some("TLSv1.3".into()),
        cipher: Some("TLS_AES_128_GCM_SHA256".into()),
        client_cert_verified: true,
        client_cn: Some("camera-7".into()),
    }
}

/// One header to send, and the addresses a reader must then report.
struct Case {
    path: &'static str,
    version: ProxyProtocol,
    client: &'static str,
    local: &'static str,
    /// src, src_port, dst, dst_port as the reader prints them.
    want: [&'static str; 4],
}

const CASES: &[Case] = &[
    Case {
        path: "/v1-ipv4",
        version: ProxyProtocol::V1,
        client: "203.0.113.7:4242",
        local: "198.51.100.1:443",
        want: ["203.0.113.7", "4242", "198.51.100.1", "443"],
    },
    Case {
        path: "/v1-ipv6",
        version: ProxyProtocol::V1,
        client: "[2001:db8::7]:4242",
        local: "[2001:db8::1]:443",
        want: ["2001:db8::7", "4242", "2001:db8::1", "443"],
    },
    Case {
        // IPv4 client on an IPv6 address: one family, the client mapped.
        path: "/v1-mixed",
        version: ProxyProtocol::V1,
        client: "203.0.113.7:4242",
        local: "[2001:db8::1]:443",
        want: ["::ffff:203.0.113.7", "4242", "2001:db8::1", "443"],
    },
    Case {
        path: "/v2-ipv4",
        version: ProxyProtocol::V2,
        client: "203.0.113.7:4242",
        local: "198.51.100.1:443",
        want: ["203.0.113.7", "4242", "198.51.100.1", "443"],
    },
    Case {
        path: "/v2-ipv6",
        version: ProxyProtocol::V2,
        client: "[2001:db8::7]:4242",
        local: "[2001:db8::1]:443",
        want: ["2001:db8::7", "4242", "2001:db8::1", "443"],
    },
    Case {
        // A dual-stack listener's local address comes IPv4-mapped.
        path: "/v2-mapped-local",
        version: ProxyProtocol::V2,
        client: "203.0.113.7:4242",
        local: "[::ffff:198.51.100.1]:443",
        want: ["203.0.113.7", "4242", "198.51.100.1", "443"],
    },
];

fn header(case: &Case) -> Vec<u8> {
    encode(case.version, sa(case.client), sa(case.local), &tls())
}

fn assert_addresses(reader: &str, case: &Case, seen: &Seen) {
    let got = [
        seen.get("src"),
        seen.get("src_port"),
        seen.get("dst"),
        seen.get("dst_port"),
    ];
    assert_eq!(got, case.want, "{reader}, {}: {seen:?}", case.path);
}

#[tokio::test]
async fn nginx_reads_v1_and_v2_headers() {
    let nginx = Nginx::start();
    for case in CASES {
        let seen = nginx.ask(&header(case), case.path).await;
        assert_addresses("nginx", case, &seen);
        // The access log, as a deployment would see it, says the same.
        let logged = nginx.logged(case.path, Duration::from_secs(10));
        assert_eq!(logged.0.get("src"), seen.0.get("src"), "{}", case.path);
        if nginx.reads_tlvs() && case.version == ProxyProtocol::V2 {
            assert_eq!(seen.get("authority"), "cams.example.org");
            assert_eq!(seen.get("alpn"), "h2");
            assert_eq!(seen.get("ssl_version"), "TLSv1.3");
            assert_eq!(seen.get("ssl_cipher"), "TLS_AES_128_GCM_SHA256");
            assert_eq!(seen.get("ssl_cn"), "camera-7");
            assert_eq!(seen.get("ssl_verify"), "0");
        }
    }
    // nginx before 1.23.2 (Debian 12 has 1.22) skips the TLVs unread, but
    // still goes by the header's length: a wrong one fails the cases above.
}

#[tokio::test]
async fn haproxy_reads_v1_and_v2_headers() {
    let haproxy = Haproxy::start();
    for case in CASES {
        let seen = haproxy.ask(&header(case), case.path).await;
        assert_addresses("haproxy", case, &seen);
        let authority = if case.version == ProxyProtocol::V2 {
            "cams.example.org"
        } else {
            ""
        };
        assert_eq!(seen.get("authority"), authority, "{}", case.path);
    }
}

/// The readers do enforce the protocol, so the cases above prove something:
/// no header, a v1 line of an unknown family, or a v2 header too short for
/// its addresses gets no answer.
#[tokio::test]
async fn readers_refuse_a_missing_or_broken_header() {
    let nginx = Nginx::start();
    let haproxy = Haproxy::start();
    let request = b"GET / HTTP/1.1\r\nHost: reader\r\nConnection: close\r\n\r\n".to_vec();
    let v1 = b"PROXY TCP5 203.0.113.7 198.51.100.1 4242 443\r\n".to_vec();
    let mut v2 = encode(
        ProxyProtocol::V2,
        sa("203.0.113.7:4242"),
        sa("198.51.100.1:443"),
        &TlsInfo::default(),
    );
    // IPv4 needs 12 address bytes; say (and send) 4.
    v2.truncate(16 + 4);
    v2[14..16].copy_from_slice(&4u16.to_be_bytes());
    for bytes in [
        request.clone(),
        [v1, request.clone()].concat(),
        [v2, request].concat(),
    ] {
        assert!(!nginx.answers(&bytes).await, "nginx answered {bytes:?}");
        assert!(!haproxy.answers(&bytes).await, "haproxy answered {bytes:?}");
    }
}

/// A GET through tcpfwd; returns the reader's `key=value` lines and the
/// client's own address.
async fn through_tcpfwd(fwd: &Tcpfwd, pki: &Pki, path: &str) -> (Seen, SocketAddr) {
    let mut tls = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let me = tls.get_ref().0.local_addr().unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: reader\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or(("", ""));
    assert!(head.starts_with("HTTP/1.1 200 "), "answer: {answer:?}");
    let seen = Seen(
        body.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    );
    (seen, me)
}

#[tokio::test]
async fn tcpfwd_sends_the_client_address_to_nginx_and_haproxy() {
    let pki = Pki::new();
    let nginx = Nginx::start();
    let haproxy = Haproxy::start();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    for version in ["v1", "v2"] {
        for (name, addr) in [("nginx", nginx.addr()), ("haproxy", haproxy.addr())] {
            let map = format!("127.0.0.1:0:{addr}");
            let fwd = Tcpfwd::start(&[
                "--map",
                &map,
                "--cert",
                cert,
                "--key",
                key,
                "--proxy-protocol",
                version,
            ]);
            let (seen, me) = through_tcpfwd(&fwd, &pki, &format!("/e2e-{version}")).await;
            assert_eq!(seen.get("src"), me.ip().to_string(), "{name} {version}");
            assert_eq!(
                seen.get("src_port"),
                me.port().to_string(),
                "{name} {version}"
            );
            assert_eq!(
                seen.get("dst_port"),
                fwd.addr(0).port().to_string(),
                "{name} {version}"
            );
            if version == "v2" && name == "haproxy" {
                assert_eq!(seen.get("authority"), "localhost", "{name} {version}");
            }
        }
    }
}
