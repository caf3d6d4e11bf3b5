//! The forwarder end to end: real binary, real sockets, real TLS clients.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::backends;
use common::{msg, pattern, sha256, tls_connect, Pki, Tcpfwd};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

fn cert_args(pki: &Pki) -> Vec<String> {
    vec![
        "--cert".into(),
        pki.cert.to_str().unwrap().into(),
        "--key".into(),
        pki.key.to_str().unwrap().into(),
    ]
}

fn start(pki: &Pki, maps: &[String], extra: &[&str]) -> Tcpfwd {
    let mut args: Vec<String> = Vec::new();
    for m in maps {
        args.push("--map".into());
        args.push(m.clone());
    }
    args.extend(cert_args(pki));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tcpfwd::start(&args)
}

fn map_to(backend: SocketAddr) -> String {
    format!("127.0.0.1:0:{backend}")
}

fn reason(e: &Value) -> &str {
    e["reason"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dvr_page_and_websocket_video_through_two_maps() {
    let pki = Pki::new();
    let web = backends::dvr_web().await;
    let video = backends::dvr_video(300, 4000).await;
    let fwd = start(&pki, &[map_to(web), map_to(video)], &[]);
    let cfg = pki.client_config();

    // The page, over TLS, with keep-alive: two requests on one connection.
    let mut page = tls_connect(cfg.clone(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    for _ in 0..2 {
        page.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("</html>") {
            let n = page.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "page connection closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("new WebSocket('wss://'"), "{text}");
    }
    drop(page);

    // The video: a WebSocket upgrade, then every frame checked byte for byte.
    let mut ws = tls_connect(cfg, fwd.addr(1), "localhost").await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    ws.write_all(format!("GET /stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        ws.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    for n in 0..300 {
        let (op, payload) = backends::ws_read_frame(&mut ws).await.unwrap();
        assert_eq!(op, 2, "frame {n} opcode");
        assert_eq!(payload, backends::video_frame(n, 4000), "frame {n} content");
    }
    let (op, _) = backends::ws_read_frame(&mut ws).await.unwrap();
    assert_eq!(op, 8, "close frame after the video");
}

/// Sends `up` while reading everything back, at once; returns what came back.
async fn full_duplex<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(s: S, up: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(s);
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let writer = async {
        w.write_all(up).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let (got, ()) = tokio::join!(reader, writer);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_byte_exact() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    // One thread: the current-thread runtime (other tests use the default).
    let fwd = start(&pki, &[map_to(echo)], &["--threads", "1"]);
    let data = pattern(7, 64 << 20);
    let s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(120), full_duplex(s, &data))
        .await
        .unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha256(&got), sha256(&data));
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(ev[0]["bytes_up"], 64 << 20);
    assert_eq!(ev[0]["bytes_down"], 64 << 20);
    assert_eq!(reason(&ev[0]), "client closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    // All from 127.0.0.1: above the per-source default of 64.
    let fwd = start(
        &pki,
        &[map_to(echo)],
        &["--threads", "1", "--per-source-connections", "200"],
    );
    let addr = fwd.addr(0);
    let cfg = pki.client_config();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let s = tls_connect(cfg, addr, "localhost").await.unwrap();
            let data = pattern(i, 64 * 1024 + i as usize);
            let got = full_duplex(s, &data).await;
            assert_eq!(sha256(&got), sha256(&data), "connection {i}");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
    }
    fwd.wait_for_async(|e| msg(e) == "connection closed", 200, T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first_then_backend_keeps_sending() {
    // The backend answers only after the client has finished sending: the
    // client's close_notify must arrive as a FIN while the reply still flows back.
    let pki = Pki::new();
    let backend = backends::one_connection(move |mut s| async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap(); // ends at the forwarded FIN
        let reply = format!("got {} bytes", req.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let fwd = start(&pki, &[map_to(backend)], &[]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(&[1u8; 5000]).await.unwrap();
    s.shutdown().await.unwrap(); // close_notify + FIN
    let mut got = String::new();
    s.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "got 5000 bytes");
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "client closed");
    assert_eq!(ev[0]["client_close_notify"], true);
    assert_eq!(ev[0]["backend_addr"], backend.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_backend_first_then_client_keeps_sending() {
    // The backend sends a banner and closes its side at once, then reads
    // everything the client sends: its FIN must reach the client as
    // close_notify while the client's data still flows to it.
    let pki = Pki::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let backend = backends::one_connection(move |s| async move {
        let (mut r, mut w) = s.into_split();
        w.write_all(b"banner").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        tx.send(got).unwrap();
    })
    .await;
    let fwd = start(&pki, &[map_to(backend)], &[]);
    let s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let mut banner = Vec::new();
    r.read_to_end(&mut banner).await.unwrap(); // Ok only on a clean close_notify
    assert_eq!(banner, b"banner");
    let data = pattern(3, 1 << 20);
    w.write_all(&data).await.unwrap();
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    assert_eq!(sha256(&got), sha256(&data));
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "backend closed");
    assert_eq!(ev[0]["bytes_up"], 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_without_close_notify_is_a_half_close() {
    let pki = Pki::new();
    let backend = backends::one_connection(move |mut s| async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        // Keep sending after the client's bare FIN.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&[b'x'; 1000]).await.unwrap();
        }
        s.shutdown().await.unwrap();
    })
    .await;
    let fwd = start(&pki, &[map_to(backend)], &[]);
    let tls = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let (tcp, mut conn) = tls.into_inner();
    // Send one record, then FIN the TCP stream without close_notify.
    std::io::Write::write_all(&mut conn.writer(), b"hello").unwrap();
    let mut tcp = tcp;
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    tcp.shutdown().await.unwrap();
    // Everything the backend sends after that still arrives.
    let mut plain = Vec::new();
    let mut buf = vec![0u8; 16384];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        // read_tls takes at most 4 KiB at a time: feed it all.
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            conn.read_tls(&mut rd).unwrap();
            conn.process_new_packets().unwrap();
            let mut chunk = Vec::new();
            let _ = std::io::Read::read_to_end(&mut conn.reader(), &mut chunk);
            plain.extend_from_slice(&chunk);
        }
    }
    assert_eq!(plain.len(), 5000);
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "client closed");
    assert_eq!(ev[0]["client_close_notify"], false);
    assert_eq!(ev[0]["bytes_up"], 5);
    assert_eq!(ev[0]["bytes_down"], 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_logged_and_survived() {
    let pki = Pki::new();
    let fwd = start(&pki, &[map_to(backends::closed_port())], &[]);
    for _ in 0..3 {
        let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "connection to a dead backend must close promptly"
        );
        assert!(buf.is_empty());
    }
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 3, T)
        .await;
    assert_eq!(reason(&ev[0]), "backend unreachable");
    assert!(
        ev[0]["detail"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{}",
        ev[0]
    );
    assert_eq!(ev[0]["level"], "WARN");
    assert_eq!(ev[0]["backend_addr"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_does_not_hold_the_client_forever() {
    let pki = Pki::new();
    let fwd = start(
        &pki,
        &[map_to(backends::silent().await)],
        &["--close-timeout", "1s"],
    );
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the client was left hanging");
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "close timeout");
    assert_eq!(ev[0]["bytes_up"], 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_timeout_is_reset_by_every_byte() {
    // After the client's half-close, the backend trickles a byte every 300 ms
    // for about 4.5 s: with a 2 s close timeout (restarted by every byte, with
    // room for a stalled CI machine) the download must not be cut.
    let pki = Pki::new();
    let backend = backends::one_connection(move |mut s| async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b".").await.unwrap();
        }
        s.shutdown().await.unwrap();
    })
    .await;
    let fwd = start(&pki, &[map_to(backend)], &["--close-timeout", "2s"]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"...............");
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "client closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_only_when_asked() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = start(&pki, &[map_to(echo)], &["--idle-timeout", "3s"]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "idle timeout");
    assert_eq!(ev[0]["bytes_up"], 4);
    assert_eq!(ev[0]["bytes_down"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_client_hello() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = start(&pki, &[map_to(echo)], &[]);
    let mut s = TcpStream::connect(fwd.addr(0)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "handshake failed");
    // Still serving.
    let mut ok = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    ok.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    ok.read_exact(&mut b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_at_the_handshake_timeout() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = start(&pki, &[map_to(echo)], &["--handshake-timeout", "1s"]);
    let mut s = TcpStream::connect(fwd.addr(0)).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "a silent client must be dropped at the handshake timeout"
    );
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "handshake timeout");
    let ms = ev[0]["duration_ms"].as_u64().unwrap();
    assert!((900..5000).contains(&ms), "closed after {ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_new_ones_and_keeps_open_ones() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    // All from 127.0.0.1: above the cap, so that the cap is what refuses.
    let metrics = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let metrics_arg = metrics.to_string();
    let fwd = start(
        &pki,
        &[map_to(echo)],
        &[
            "--max-connections",
            "2",
            "--per-source-connections",
            "3",
            "--metrics",
            &metrics_arg,
        ],
    );
    let cfg = pki.client_config();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tls_connect(cfg.clone(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        s.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(cfg.clone(), fwd.addr(0), "localhost"),
    )
    .await;
    assert!(
        matches!(third, Ok(Err(_))),
        "the third connection must be refused quickly"
    );
    fwd.wait_for_async(|e| msg(e).contains("--max-connections reached"), 1, T)
        .await;
    let series = "tcpfwd_connections_refused_total{frontend=\"127.0.0.1:0\",reason=\"over limit\"}";
    assert_eq!(common::scrape_value(metrics, series), Some(1.0));
    assert_eq!(
        common::scrape_value(
            metrics,
            "tcpfwd_connections_open{frontend=\"127.0.0.1:0\",route=\"default\"}"
        ),
        Some(2.0)
    );
    // The open ones are untouched.
    for s in &mut held {
        s.write_all(b"b").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"b");
    }
    drop(held);
    fwd.wait_for_async(|e| msg(e) == "connection closed", 2, T)
        .await;
    // A slot is released just after its connection's log line: retry briefly.
    let mut s = None;
    for _ in 0..40 {
        match tls_connect(cfg.clone(), fwd.addr(0), "localhost").await {
            Ok(c) => {
                s = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut s = s.expect("a freed slot takes a new connection");
    s.write_all(b"c").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_response_arrives_when_the_backend_resets_right_after_it() {
    // Embedded web servers often end with a reset instead of a FIN: the
    // response and the RST reach tcpfwd together, and the response must
    // still reach the client.
    let pki = Pki::new();
    // A blocking socket on its own thread: the write and the reset leave
    // microseconds apart, before tcpfwd has read the response.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 10];
        s.read_exact(&mut req).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        s.write_all(&[b'r'; 3000]).unwrap();
        drop(s); // RST right behind the data
    });
    let fwd = start(&pki, &[map_to(backend)], &[]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"0123456789").await.unwrap();
    let mut got = vec![0u8; 3000];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got.iter().all(|&b| b == b'r'));
    server.join().unwrap();
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(ev[0]["bytes_down"], 3000, "{}", ev[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counts_of_a_connection_that_ended_in_an_error() {
    // The backend sends 3000 bytes and then resets the connection.
    let pki = Pki::new();
    let backend = backends::one_connection(move |mut s| async move {
        let mut req = [0u8; 10];
        s.read_exact(&mut req).await.unwrap();
        s.write_all(&[b'z'; 3000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.set_zero_linger().unwrap();
        drop(s); // RST
    })
    .await;
    let fwd = start(&pki, &[map_to(backend)], &[]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"0123456789").await.unwrap();
    let mut got = vec![0u8; 3000];
    s.read_exact(&mut got).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap();
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "error", "{}", ev[0]);
    assert!(
        ev[0]["detail"].as_str().unwrap().starts_with("backend:"),
        "{}",
        ev[0]
    );
    assert_eq!(ev[0]["bytes_up"], 10);
    assert_eq!(ev[0]["bytes_down"], 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_without_address_listens_on_ipv4_and_ipv6() {
    assert!(
        common::has_ipv6_loopback(),
        "this host has no IPv6 loopback (::1): the dual-stack test cannot run here"
    );
    let pki = Pki::new();
    let echo = backends::echo().await;
    let fwd = start(&pki, &[format!("0:{echo}")], &[]);
    let port = fwd.listen_addrs()[0].port();
    for (addr, name) in [
        (format!("127.0.0.1:{port}"), "127.0.0.1"),
        (format!("[::1]:{port}"), "::1"),
    ] {
        let mut s = tls_connect(pki.client_config(), addr.parse().unwrap(), name)
            .await
            .unwrap();
        s.write_all(b"dual").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"dual", "via {addr}");
    }
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 2, T)
        .await;
    let peers: Vec<&str> = ev.iter().map(|e| e["peer"].as_str().unwrap()).collect();
    assert!(
        peers.iter().any(|p| p.starts_with("127.0.0.1:")),
        "{peers:?}"
    );
    assert!(peers.iter().any(|p| p.starts_with("[::1]:")), "{peers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_transfer() {
    let pki = Pki::new();
    let data = pattern(11, 4 << 20);
    let sent = data.clone();
    let backend = backends::one_connection(move |mut s| async move {
        // A slow download: 4 MiB over about 2 s.
        for chunk in sent.chunks(256 * 1024) {
            s.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        s.shutdown().await.unwrap();
    })
    .await;
    let mut fwd = start(&pki, &[map_to(backend)], &["--shutdown-timeout", "30s"]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    let mut first = vec![0u8; 1000];
    s.read_exact(&mut first).await.unwrap();
    fwd.signal(libc::SIGTERM);
    fwd.wait_for_async(|e| msg(e).starts_with("shutting down"), 1, T)
        .await;
    // New connections are no longer accepted...
    assert!(
        TcpStream::connect(fwd.addr(0)).await.is_err(),
        "still accepting after SIGTERM"
    );
    // ...but the open transfer completes.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    first.extend_from_slice(&rest);
    assert_eq!(sha256(&first), sha256(&data));
    drop(s);
    let status = tokio::task::block_in_place(|| fwd.wait_exit(T)).expect("exits after draining");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_closes_what_is_left() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let mut fwd = start(&pki, &[map_to(echo)], &["--shutdown-timeout", "1s"]);
    let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    fwd.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| fwd.wait_exit(T)).expect("exits at the deadline");
    assert!(status.success());
    // The log reader may still be behind the exit.
    let ev = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 1, T)
        .await;
    assert_eq!(reason(&ev[0]), "shutdown");
    assert_eq!(ev[0]["bytes_up"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_every_worker_work_and_drain_at_shutdown() {
    let pki = Pki::new();
    let echo = backends::echo().await;
    let mut fwd = start(
        &pki,
        &[map_to(echo)],
        &["--threads", "4", "--shutdown-timeout", "30s"],
    );
    let mut open = Vec::new();
    for i in 0..16u8 {
        let mut s = tls_connect(pki.client_config(), fwd.addr(0), "localhost")
            .await
            .unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
        open.push(s);
    }
    fwd.signal(libc::SIGTERM);
    fwd.wait_for_async(|e| msg(e).starts_with("shutting down"), 1, T)
        .await;
    // Whichever worker accepted it, every connection still works while draining...
    for (i, s) in open.iter_mut().enumerate() {
        s.write_all(&[i as u8 + 100]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i as u8 + 100);
    }
    // ...and once they close, tcpfwd exits without waiting for the timeout.
    drop(open);
    let status = tokio::task::block_in_place(|| fwd.wait_exit(Duration::from_secs(10)))
        .expect("exits once the last connection closed");
    assert!(status.success(), "{status:?}");
    let closed = fwd
        .wait_for_async(|e| msg(e) == "connection closed", 16, T)
        .await;
    assert_eq!(closed.len(), 16);
    assert!(closed.iter().all(|e| reason(e) != "shutdown"), "{closed:?}");
}
