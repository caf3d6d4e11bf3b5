//! Plain-TCP backends on loopback: echo, a DVR-like web UI and WebSocket video
//! server, a silent server, and an address where nothing listens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn listen(addr: &str) -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Echoes everything; when the client half-closes, finishes sending and half-closes too.
pub async fn echo() -> SocketAddr {
    echo_on("127.0.0.1:0").await
}

/// `echo` on a chosen address.
pub async fn echo_on(addr: &str) -> SocketAddr {
    let (l, a) = listen(addr).await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// Answers every connection with `reply` and closes, counting connections.
pub async fn fixed_reply(addr: &str, reply: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let (l, a) = listen(addr).await;
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    (a, n)
}

/// Accepts and never says anything; keeps every connection open until the peer leaves.
pub async fn silent() -> SocketAddr {
    let (l, a) = listen("127.0.0.1:0").await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                // Hold our half open until the peer resets or the test ends.
                std::future::pending::<()>().await;
                drop(s);
            });
        }
    });
    a
}

/// An address where nothing listens.
pub fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::free_port()))
}

/// The DVR's web page; it opens the video WebSocket on the port given in the URL.
pub const DVR_PAGE: &str = "<!doctype html><html><head><title>DVR</title></head>\
<body><h1>Camera 1</h1><canvas id=v></canvas><pre id=log></pre>\
<script>\
const port = location.protocol === 'https:' ? 7682 : 7681;\
const p = new URLSearchParams(location.search).get('ws') || port;\
const ws = new WebSocket('wss://' + location.hostname + ':' + p + '/stream');\
ws.binaryType = 'arraybuffer'; let n = 0, bad = 0;\
ws.onmessage = e => { const b = new Uint8Array(e.data); \
for (let i = 0; i < b.length; i++) if (b[i] !== ((n + i) & 255)) bad++; n++; };\
ws.onclose = () => { document.getElementById('log').textContent = 'frames=' + n + ' bad=' + bad; };\
</script></body></html>";

/// A plain HTTP/1.1 server with the DVR page at `/`, keep-alive, like the DVR's web UI.
pub async fn dvr_web() -> SocketAddr {
    let (l, a) = listen("127.0.0.1:0").await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_http(s));
        }
    });
    a
}

async fn serve_http(s: TcpStream) {
    let mut r = BufReader::new(s);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        let (status, body) = if path == "/" || path.starts_with("/?") {
            ("200 OK", DVR_PAGE.to_string())
        } else {
            ("404 Not Found", "not found\n".to_string())
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Frame `n` of the video stream: `len` bytes counting up from `n`.
pub fn video_frame(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((n + i) & 255) as u8).collect()
}

/// A WebSocket server that, after the upgrade, sends `frames` binary frames of
/// `len` bytes (see `video_frame`) and then a close frame.
pub async fn dvr_video(frames: usize, len: usize) -> SocketAddr {
    let (l, a) = listen("127.0.0.1:0").await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut key = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some((name, value)) = h.split_once(':') {
                        if name.trim().eq_ignore_ascii_case("sec-websocket-key") {
                            key = Some(value.trim().to_string());
                        }
                    }
                    if h == "\r\n" {
                        break;
                    }
                }
                let Some(key) = key else { return };
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    ws_accept(&key)
                );
                let s = r.get_mut();
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                for n in 0..frames {
                    if s.write_all(&ws_frame(0x2, &video_frame(n, len)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = s.write_all(&ws_frame(0x8, &1000u16.to_be_bytes())).await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    r.read_to_end(&mut sink),
                )
                .await;
            });
        }
    });
    a
}

/// An unmasked (server) WebSocket frame.
pub fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Reads one server frame: (opcode, payload).
pub async fn ws_read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((h[0] & 0x0f, payload))
}

/// Sec-WebSocket-Accept for a client key (RFC 6455).
pub fn ws_accept(key: &str) -> String {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(d.as_ref())
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A backend that serves its first connection with `serve`.
pub async fn one_connection<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (l, a) = listen("127.0.0.1:0").await;
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        serve(s).await;
    });
    a
}
