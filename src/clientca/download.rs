//! One-time download links on the LAN for `client-cert new --serve` and
//! `client-cert serve`: HTTPS with a throw-away self-signed certificate, a
//! random 128-bit token as the path, one download or the time limit,
//! whichever comes first, and the link printed as a terminal QR code.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

/// The longest (and default) life of a link.
pub const MAX_VALID: Duration = Duration::from_secs(600);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 16;
/// Wrong requests shown one by one; after that only their count.
const WRONG_SHOWN: u32 = 20;

/// Where to listen: a port on the machine's LAN address, or an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeAddr {
    /// This port, on the address of the default route's interface.
    Port(u16),
    /// This address and port.
    Addr(SocketAddr),
}

impl FromStr for ServeAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(p) = s.parse::<u16>() {
            return Ok(ServeAddr::Port(p));
        }
        s.parse::<SocketAddr>().map(ServeAddr::Addr).map_err(|_| {
            format!("invalid '{s}': give a port (8443) or an address and port (192.168.1.20:8443, [fd00::2]:8443)")
        })
    }
}

/// One file behind a link.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The name the browser saves it under.
    pub file_name: String,
    /// Its media type (what makes a phone offer to install it).
    pub content_type: &'static str,
    /// The bytes.
    pub body: Bytes,
    /// Who it is for, printed above the link ("Android and desktops").
    pub label: &'static str,
}

/// The IPv4 address of the default route's interface: the source address
/// the kernel picks toward the default gateway. (`connect` on a UDP socket
/// sends nothing; it only looks up the route.)
pub fn lan_address() -> anyhow::Result<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .context("cannot read /proc/net/route to find the LAN address")?;
    let gateway = default_gateway(&routes).context(
        "no default route with a gateway, so no LAN address to offer; give --serve ADDR:PORT",
    )?;
    let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect((gateway, 9)).map(|()| s))
        .and_then(|s| s.local_addr())
        .with_context(|| {
            format!("cannot find the address toward the gateway {gateway}; give --serve ADDR:PORT")
        })?;
    Ok(sock.ip())
}

/// The gateway of the default route with the lowest metric in the text of
/// `/proc/net/route` (addresses in host byte order, as hex).
fn default_gateway(routes: &str) -> Option<Ipv4Addr> {
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw, flags, metric, mask) =
                (f.get(1)?, f.get(2)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up_gateway = u32::from_str_radix(flags, 16).ok()? & 0x3 == 0x3;
            if *dest != "00000000" || *mask != "00000000" || !up_gateway {
                return None;
            }
            let gw = u32::from_str_radix(gw, 16).ok()?;
            Some((metric.parse::<u32>().ok()?, Ipv4Addr::from(gw.swap_bytes())))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gw)| gw)
}

/// A token of 128 random bits, URL-safe base64.
fn token() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// The link as a QR code in Unicode half blocks. On a terminal (`colours`)
/// it is drawn black on white with ANSI colours, so that it reads the right
/// way round on light and dark themes alike; otherwise (a pipe, a file) light
/// on dark, a terminal's usual colours.
pub fn qr_text(url: &str, colours: bool) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(url.as_bytes()).context("making the QR code")?;
    let mut render = code.render::<Dense1x2>();
    let render = render.quiet_zone(true);
    if !colours {
        return Ok(render
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build());
    }
    let text = render
        .dark_color(Dense1x2::Dark)
        .light_color(Dense1x2::Light)
        .build();
    // Black glyphs on a white background, line by line (a colour left on at
    // a line's end would paint the rest of the terminal's row).
    Ok(text
        .lines()
        .map(|l| format!("\x1b[30;47m{l}\x1b[0m"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// A listener with its certificate and links, ready to print and serve.
pub struct Links {
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    fingerprint: String,
    links: Vec<(String, Offer)>,
    addr: SocketAddr,
}

impl Links {
    /// Opens the link's socket on `at` (a port alone: on the LAN address).
    pub fn bind(at: ServeAddr) -> anyhow::Result<std::net::TcpListener> {
        let addr = match at {
            ServeAddr::Addr(a) => a,
            ServeAddr::Port(p) => SocketAddr::new(lan_address()?, p),
        };
        std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on {addr} for the download link; choose another port or address")
        })
    }

    /// Makes a certificate for the socket's address and a token per offer.
    pub fn new(listener: std::net::TcpListener, offers: Vec<Offer>) -> anyhow::Result<Links> {
        let addr = listener
            .local_addr()
            .context("reading the download link's address")?;
        let key = rcgen::KeyPair::generate().context("generating the link's TLS key")?;
        let mut params = rcgen::CertificateParams::new(vec![addr.ip().to_string()])
            .context("the link's certificate")?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tcpfwd one-time download");
        let cert = params
            .self_signed(&key)
            .context("signing the link's certificate")?;
        let fingerprint = crate::tls::sha256_fingerprint(cert.der());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS configuration for the link")?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .context("TLS configuration for the link")?;
        let links = offers
            .into_iter()
            .map(|o| Ok((token()?, o)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Links {
            listener,
            tls: Arc::new(tls),
            fingerprint,
            links,
            addr,
        })
    }

    /// `https://ADDR:PORT/TOKEN` of each offer, in order.
    pub fn urls(&self) -> Vec<String> {
        let host = match self.addr {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        self.links
            .iter()
            .map(|(t, _)| format!("https://{host}/{t}"))
            .collect()
    }

    /// Prints the links, their QR codes and the certificate's fingerprint.
    pub fn print(&self, valid: Duration) -> anyhow::Result<()> {
        let colours = std::io::IsTerminal::is_terminal(&std::io::stdout());
        println!();
        for ((_, offer), url) in self.links.iter().zip(self.urls()) {
            println!("{} ({}):", offer.label, offer.file_name);
            println!("{}", qr_text(&url, colours)?);
            println!("Download link for {}: {url}", offer.file_name);
            println!();
        }
        println!(
            "The page's certificate is self-signed (the browser warns; go on only if it shows\nSHA-256 {}).",
            self.fingerprint
        );
        println!(
            "Each link works once, for {}, on this network only; the first download ends it.",
            describe(valid)
        );
        Ok(())
    }

    /// Serves until one file was downloaded (`Ok`, with who took it) or
    /// `valid` passed (an error saying so).
    pub fn serve(self, valid: Duration) -> anyhow::Result<Downloaded> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(self.run(valid))
    }

    async fn run(self, valid: Duration) -> anyhow::Result<Downloaded> {
        self.listener
            .set_nonblocking(true)
            .context("the download link's socket")?;
        let listener =
            TcpListener::from_std(self.listener).context("the download link's socket")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls);
        let shared = Arc::new(Shared {
            links: self.links,
            taken: AtomicBool::new(false),
            wrong: AtomicU32::new(0),
            downloaded: Mutex::new(None),
        });
        let (done_tx, mut done_rx) = mpsc::channel::<Result<(), String>>(1);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let deadline = tokio::time::sleep(valid);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                done = done_rx.recv() => {
                    let who = shared.downloaded.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let Some(who) = who else { continue };
                    return match done {
                        Some(Ok(())) => Ok(who),
                        Some(Err(e)) => bail!(
                            "the download of {} by {} broke off ({e}); the link is used up, make a new one",
                            who.file_name, who.peer
                        ),
                        None => Ok(who),
                    };
                }
                () = &mut deadline, if !shared.taken.load(Ordering::SeqCst) => {
                    bail!("the download link expired unused after {}", describe(valid));
                }
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            eprintln!("download link: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (acceptor, shared, done) = (acceptor.clone(), shared.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        connection(tcp, peer, acceptor, shared, done).await;
                    });
                }
            }
        }
    }
}

/// Who downloaded what.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The file.
    pub file_name: String,
    /// From where.
    pub peer: SocketAddr,
}

struct Shared {
    links: Vec<(String, Offer)>,
    /// Set by the first good request: every link is used up from then on.
    taken: AtomicBool,
    wrong: AtomicU32,
    downloaded: Mutex<Option<Downloaded>>,
}

/// "10 minutes", "90 seconds".
fn describe(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s % 60 == 0 {
        let m = s / 60;
        format!("{m} minute{}", if m == 1 { "" } else { "s" })
    } else {
        format!("{s} second{}", if s == 1 { "" } else { "s" })
    }
}

/// One connection: the TLS handshake, then HTTP/1.1 by hyper, one request.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    done: mpsc::Sender<Result<(), String>>,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        // Browsers try and drop connections freely; nothing to report.
        _ => return,
    };
    let served_here = Arc::new(AtomicBool::new(false));
    let flag = served_here.clone();
    let sh = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let response = answer(&sh, &req, peer, &flag);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    let result = match tokio::time::timeout(Duration::from_secs(120), conn).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    if served_here.load(Ordering::SeqCst) {
        let _ = done.send(result).await;
    }
}

/// The answer to one request. A token that is not one of ours gets 404 and
/// changes nothing (128 random bits are not guessed); a good one is served
/// once, and from then on every link is used up.
fn answer<B>(
    shared: &Shared,
    req: &http::Request<B>,
    peer: SocketAddr,
    served_here: &AtomicBool,
) -> http::Response<Full<Bytes>> {
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut r = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    let path = req.uri().path().trim_start_matches('/');
    let found = shared.links.iter().find(|(t, _)| {
        // In constant time, so that answer times tell nothing about a token.
        aws_lc_rs::constant_time::verify_slices_are_equal(t.as_bytes(), path.as_bytes()).is_ok()
    });
    let Some((_, offer)) = found else {
        if !matches!(path, "favicon.ico" | "robots.txt") {
            let n = shared.wrong.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= WRONG_SHOWN {
                eprintln!(
                    "download link: {peer} asked for a wrong link (404; {n} wrong so far){}",
                    if n == WRONG_SHOWN {
                        "; further ones are not shown"
                    } else {
                        ""
                    }
                );
            }
        }
        return plain(http::StatusCode::NOT_FOUND, "not found\n");
    };
    if req.method() != http::Method::GET {
        return plain(http::StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    if shared.taken.swap(true, Ordering::SeqCst) {
        eprintln!("download link: {peer} asked for a link that is used up (410)");
        return plain(http::StatusCode::GONE, "this link was used already\n");
    }
    served_here.store(true, Ordering::SeqCst);
    *shared.downloaded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Downloaded {
        file_name: offer.file_name.clone(),
        peer,
    });
    let mut r = http::Response::new(Full::new(offer.body.clone()));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(offer.content_type),
    );
    // File names are checked to be plain (clientca::check_name).
    if let Ok(v) =
        http::HeaderValue::from_str(&format!("attachment; filename=\"{}\"", offer.file_name))
    {
        h.insert(http::header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(text), Some(Ipv4Addr::new(192, 0, 2, 1)));
        let none = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_gateway(none), None);
    }

    #[test]
    fn serve_addresses_and_tokens() {
        assert_eq!("8443".parse(), Ok(ServeAddr::Port(8443)));
        assert_eq!(
            "192.168.1.2:8443".parse(),
            Ok(ServeAddr::Addr("192.168.1.2:8443".parse().unwrap()))
        );
        assert!("nope".parse::<ServeAddr>().is_err());
        let (a, b) = (token().unwrap(), token().unwrap());
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert_eq!(describe(MAX_VALID), "10 minutes");
        assert_eq!(describe(Duration::from_secs(1)), "1 second");
        let qr = qr_text("https://192.168.1.2:8443/abc", false).unwrap();
        assert!(qr.contains('\u{2580}') || qr.contains('\u{2584}'), "{qr}");
        assert!(!qr.contains('\x1b'), "{qr}");
        // On a terminal: the same code drawn the other way round, black on white.
        let on_tty = qr_text("https://192.168.1.2:8443/abc", true).unwrap();
        let lines: Vec<&str> = on_tty.lines().collect();
        assert_eq!(lines.len(), qr.lines().count());
        let last = lines.len() - 1;
        for (i, (l, plain)) in lines.iter().zip(qr.lines()).enumerate() {
            let inner = l
                .strip_prefix("\x1b[30;47m")
                .and_then(|l| l.strip_suffix("\x1b[0m"))
                .unwrap_or_else(|| panic!("not black on white: {l:?}"));
            assert_eq!(inner.chars().count(), plain.chars().count());
            // Every module is the complement of the plain one (the last
            // line's lower halves are padding when the height is odd).
            for (a, b) in inner.chars().zip(plain.chars()) {
                let dark = |c| match c {
                    ' ' => [false, false],
                    '\u{2580}' => [true, false],
                    '\u{2584}' => [false, true],
                    _ => [true, true],
                };
                let halves = if i == last { 1 } else { 2 };
                for h in 0..halves {
                    assert_ne!(dark(a)[h], dark(b)[h], "line {i}: {a:?} against {b:?}");
                }
            }
        }
    }
}
