//! One connection, start to end: TLS handshake, backend connect, splice, and
//! the single log event that says how it went.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use crate::net::connect;
use crate::policy::{Gate, Pass};
use crate::proxy::revoke::Revocations;
use crate::proxy::routes::{ActiveRoute, FrontendHandle};
use crate::proxy::splice::{self, Counted, Expired, Side, Stats};
use crate::tls::conn;
use crate::tls::TlsRouter;

/// What every connection shares, whatever its frontend.
pub struct Context {
    /// Answers ACME's TLS-ALPN-01 validations before any route is chosen.
    pub challenges: Arc<TlsRouter>,
    /// Source lists, limits and bans.
    pub gate: Arc<Gate>,
    /// Connections made with client certificates, for revocations to close.
    pub revocations: Arc<Revocations>,
}

/// What a connection learnt on its way, for its log line.
#[derive(Default)]
struct Seen {
    sni: Option<String>,
    route: Option<Arc<ActiveRoute>>,
    /// The frontend as described, when no route was picked.
    frontend: Option<String>,
    /// What the handshake settled; Copy values, named only for the log line.
    tls_version: Option<rustls::ProtocolVersion>,
    cipher: Option<rustls::CipherSuite>,
    kx: Option<rustls::NamedGroup>,
    /// The address the backend was reached at.
    backend_addr: Option<SocketAddr>,
    /// The route's own per-source count of this connection, if it has one.
    route_pass: Option<Pass>,
    /// The verified client certificate, on client-auth routes.
    client_cert: Option<conn::ClientCert>,
    /// On an `admit_after` route: the serial of the certificate that
    /// admitted the source (verified on the route named).
    admitted_by: Option<crate::policy::Serial>,
}

impl Seen {
    /// The picked route's own ban numbers and scope, when it has them.
    fn route_bans(&self) -> Option<(crate::policy::BanRules, u32)> {
        let r = self.route.as_ref()?;
        r.route.bans.map(|b| (b, r.scope))
    }
}

/// How a connection ended, for its log event.
#[derive(Debug)]
enum End {
    /// Both directions finished; this side closed first.
    Closed(Side),
    HandshakeTimeout,
    HandshakeFailed(io::Error),
    /// The handshake failed on the client certificate (none, or one the
    /// route's CA and CRL do not accept).
    ClientCertRejected(io::Error),
    /// The client certificate was revoked while the connection was open.
    Revoked,
    /// The connection only answered an ACME TLS-ALPN-01 validation.
    AcmeChallenge,
    /// No route for the server name, and no default route.
    NoRoute,
    ConnectTimeout,
    BackendUnreachable(String),
    Expired(Expired),
    /// An I/O error on one side ended the splice.
    Failed(String),
    /// The shutdown deadline passed.
    Shutdown,
    /// The route's lists or numbers refused the source (the gate counts
    /// why; no log line).
    Refused,
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Closed(Side::Client) => "client closed",
            End::Closed(Side::Backend) => "backend closed",
            End::HandshakeTimeout => "handshake timeout",
            End::HandshakeFailed(_) => "handshake failed",
            End::ClientCertRejected(_) => "client certificate rejected",
            End::Revoked => "client certificate revoked",
            End::AcmeChallenge => "acme challenge answered",
            End::NoRoute => "unknown server name",
            End::ConnectTimeout => "backend connect timeout",
            End::BackendUnreachable(_) => "backend unreachable",
            End::Expired(Expired::Idle) => "idle timeout",
            End::Expired(Expired::Close) => "close timeout",
            End::Failed(_) => "error",
            End::Shutdown => "shutdown",
            End::Refused => "refused",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            End::HandshakeFailed(e) | End::ClientCertRejected(e) => Some(e.to_string()),
            End::BackendUnreachable(e) | End::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// Whether a failed handshake failed on the client's certificate.
fn client_cert_error(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_))
    )
}

/// Sets TCP_NODELAY and keepalive, so that peers that vanished behind NAT are
/// noticed. Accepted sockets inherit both from their listener (see
/// `listener::tune`), so only backend sockets need this.
pub fn tune(socket: SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    let _ = socket.set_tcp_keepalive(&ka);
}

/// Writes the PROXY header a route's backend reads before any client byte.
async fn send_proxy_header(
    backend: &mut TcpStream,
    version: crate::config::ProxyProtocol,
    peer: SocketAddr,
    client: &conn::TlsConn,
) -> Result<(), String> {
    let local = client
        .local_addr()
        .map_err(|e| format!("PROXY header: cannot read the local address: {e}"))?;
    let header = crate::proxy::header::encode(version, peer, local, &client.tls_info());
    tokio::io::AsyncWriteExt::write_all(backend, &header)
        .await
        .map_err(|e| format!("sending the PROXY header: {e}"))
}

/// Serves one accepted connection until it ends, then logs it once.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    frontend: Arc<FrontendHandle>,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let stats = Stats::new();
    let mut seen = Seen::default();
    let counters = &frontend.metrics;
    counters.accepted.inc();
    counters.unrouted.open.inc();
    let end = tokio::select! {
        end = run(tcp, peer, &frontend, &ctx, &stats, &mut seen) => end,
        _ = stop.wait_for(|s| *s) => End::Shutdown,
    };
    match &end {
        // Hostile traffic costs little: no line of its own; the gate's
        // summary and the route's refusal counters count it. It never got
        // its route, so it leaves the frontend's counters.
        End::Refused => {
            counters.unrouted.open.dec();
            counters.unrouted.closed(End::Refused.reason(), 0, 0);
            return;
        }
        // Bytes that are not a handshake we take count toward a ban. A
        // connection closed or left silent is not counted: browsers open
        // spare connections and drop them unused, and the per-source
        // numbers already bound what silent ones hold.
        // A client certificate refused (missing, expired, another CA's,
        // revoked) counts too: on a client-auth route that is what a
        // stranger's attempts look like.
        End::HandshakeFailed(e) if !is_hang_up(e) => {
            ctx.gate.handshake_failed(peer.ip(), seen.route_bans())
        }
        End::ClientCertRejected(_) | End::NoRoute => {
            ctx.gate.handshake_failed(peer.ip(), seen.route_bans())
        }
        _ => {}
    }
    let (up, down) = stats.bytes();
    let ms = started.elapsed().as_millis() as u64;
    let detail = end.detail().or_else(|| stats.error_text());
    let no_close_notify = stats.client_skipped_close_notify();
    let reason = end.reason();
    let route_counters = seen
        .route
        .as_ref()
        .map_or(&counters.unrouted, |r| &*r.metrics);
    route_counters.open.dec();
    route_counters.closed(reason, up, down);
    match &end {
        End::HandshakeTimeout => route_counters.handshake_failed(None),
        End::HandshakeFailed(e) => route_counters.handshake_failed(Some(e)),
        _ => {}
    }
    let sni = seen.sni.as_deref().unwrap_or("");
    // Borrowed from the route, which made them once; only a connection
    // without a route names its frontend anew.
    let unrouted;
    let (map, route, backend) = match &seen.route {
        Some(r) => (r.map.as_str(), r.label.as_str(), r.backend.as_str()),
        None => {
            unrouted = seen
                .frontend
                .take()
                .unwrap_or_else(|| frontend.table().describe.clone());
            (unrouted.as_str(), "", "")
        }
    };
    let tls_version = seen.tls_version.and_then(conn::version_name).unwrap_or("");
    let cipher = seen.cipher.and_then(conn::iana_name).unwrap_or_default();
    let cipher = cipher.as_str();
    let kx = seen.kx.map(|g| format!("{g:?}")).unwrap_or_default();
    let kx = kx.as_str();
    let backend_addr = seen.backend_addr.map(|a| a.to_string()).unwrap_or_default();
    let backend_addr = backend_addr.as_str();
    let (client_cn, client_serial) = match &seen.client_cert {
        Some(c) => (
            c.common_name.as_deref().unwrap_or(""),
            c.serial_hex.as_str(),
        ),
        None => ("", ""),
    };
    match &end {
        // Scanners make handshake failures routine on the internet: info, not warn.
        End::Closed(_)
        | End::Expired(_)
        | End::AcmeChallenge
        | End::NoRoute
        | End::HandshakeFailed(_)
        | End::ClientCertRejected(_)
        | End::Revoked
        | End::HandshakeTimeout => tracing::info!(
            %peer, peer_ip = %peer.ip(), map, route, sni, backend, backend_addr, bytes_up = up, bytes_down = down, duration_ms = ms,
            reason, client_close_notify = !no_close_notify, tls_version, cipher, kx,
            client_cn, client_serial,
            detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
        _ => tracing::warn!(
            %peer, peer_ip = %peer.ip(), map, route, sni, backend, backend_addr, bytes_up = up, bytes_down = down, duration_ms = ms,
            reason, client_close_notify = !no_close_notify, tls_version, cipher, kx,
            client_cn, client_serial,
            detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
    }
}

/// Whether a handshake error is the client going away rather than sending
/// something wrong.
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    frontend: &FrontendHandle,
    ctx: &Context,
    stats: &Arc<Stats>,
    seen: &mut Seen,
) -> End {
    let started = Instant::now();
    // The handshake and the backend connect are boxed, and so is the TLS
    // connection: their state (several KiB in rustls) is on the heap only
    // while it exists, instead of sizing every connection's task for the
    // largest state it ever passes through (7.5 KiB unboxed, measured).
    // All of it in one boxed future: the ClientHello's state (`Hello` holds
    // rustls's `Accepted`) must not size the connection's own task, which
    // lives as long as the connection (4 KiB per idle connection, measured).
    let handshake = Box::pin(async {
        let limit = frontend.table().hello_timeout;
        let hello = match timeout(limit, conn::read_hello(tcp)).await {
            Err(_) => return Err(End::HandshakeTimeout),
            Ok(Err(e)) => return Err(End::HandshakeFailed(e)),
            Ok(Ok(h)) => h,
        };
        // The table as it is now that the ClientHello is in: the connection
        // keeps this route whatever a reload does later.
        let table = frontend.table();
        let (config, route) = {
            let client_hello = hello.client_hello();
            seen.sni = client_hello.server_name().map(str::to_owned);
            match ctx.challenges.challenge_for(&client_hello) {
                Some(config) => (config, None),
                None => match table.pick(seen.sni.as_deref()) {
                    Some(route) => (route.tls.clone(), Some(route.clone())),
                    None => {
                        seen.frontend = Some(table.describe.clone());
                        let _ =
                            timeout(Duration::from_secs(1), hello.refuse_unrecognized_name()).await;
                        return Err(End::NoRoute);
                    }
                },
            }
        };
        if let Some(r) = &route {
            let (access, limits) = (&r.route.access, r.route.source_limits);
            let own_bans = r.route.bans.is_some();
            match ctx
                .gate
                .admit_route(peer.ip(), access, limits, own_bans, r.scope)
            {
                // The ClientHello is dropped unanswered: closed without an alert.
                Err(why) => {
                    r.metrics.refused.inc(why);
                    return Err(End::Refused);
                }
                Ok(pass) => seen.route_pass = pass,
            }
            if let Some(a) = &r.route.admit_after {
                match ctx.gate.admitted(peer.ip(), a.scope, a.window) {
                    Err(why) => {
                        r.metrics.refused.inc(why);
                        return Err(End::Refused);
                    }
                    Ok(serial) => seen.admitted_by = Some(serial),
                }
            }
        }
        seen.route = route.clone();
        if let Some(r) = &route {
            r.metrics.opened.inc();
            r.metrics.open.inc();
            frontend.metrics.unrouted.open.dec();
        }
        // The route's handshake limit counts from the accept, the hello included.
        let limit = route
            .as_ref()
            .map_or(table.hello_timeout, |r| r.route.timeouts.handshake);
        match timeout_at(started + limit, hello.handshake(config)).await {
            Err(_) => Err(End::HandshakeTimeout),
            Ok(Err(e)) if client_cert_error(&e) => Err(End::ClientCertRejected(e)),
            Ok(Err(e)) => Err(End::HandshakeFailed(e)),
            Ok(Ok(stream)) => {
                if let Some(r) = &route {
                    r.metrics.handshake_done(started.elapsed());
                }
                Ok((Box::new(stream), route))
            }
        }
    });
    let (mut client, route) = match handshake.await {
        Err(end) => return end,
        Ok(done) => done,
    };
    let Some(route) = route else {
        let _ = timeout(
            Duration::from_secs(2),
            tokio::io::AsyncWriteExt::shutdown(&mut client),
        )
        .await;
        return End::AcmeChallenge;
    };
    let session = client.session();
    seen.tls_version = session.protocol_version();
    seen.cipher = session.negotiated_cipher_suite().map(|s| s.suite());
    seen.kx = session.negotiated_key_exchange_group().map(|g| g.name());
    // On a client-auth route: registered until the connection ends, so that a
    // revocation can close it.
    // An admitted connection likewise, under the serial that admitted it.
    let registration = match (&route.route.client_auth, client.client_cert()) {
        (Some(auth), Some(cert)) => {
            if let Some(scope) = route.route.admission {
                ctx.gate.verified(peer.ip(), scope, &cert.serial);
            }
            let r = ctx.revocations.register(auth, &cert.serial);
            seen.client_cert = Some(cert);
            Some(r)
        }
        _ => match (&route.route.admit_after, seen.admitted_by.take()) {
            (Some(a), Some(serial)) => Some(ctx.revocations.register(&a.auth, &serial)),
            _ => None,
        },
    };
    let mut revoked = std::pin::pin!(async {
        match &registration {
            Some(r) => r.revoked.notified().await,
            None => std::future::pending().await,
        }
    });
    let timeouts = &route.route.timeouts;
    let connect = Box::pin(async {
        let backend = &route.route.backend;
        let (mut b, addr) = connect::connect(&backend.host, backend.port)
            .await
            .map_err(|e| e.to_string())?;
        seen.backend_addr = Some(addr);
        if let Some(version) = route.route.proxy_protocol {
            send_proxy_header(&mut b, version, peer, &client).await?;
        }
        Ok::<_, String>(b)
    });
    let connected = tokio::select! {
        c = timeout(timeouts.connect, connect) => Some(c),
        _ = &mut revoked => None,
    };
    let end = match connected {
        None => End::Revoked,
        Some(Err(_)) => End::ConnectTimeout,
        Some(Ok(Err(e))) => End::BackendUnreachable(e),
        Some(Ok(Ok(b))) => {
            tune(SockRef::from(&b));
            let mut client_side = Counted::new(&mut *client, Side::Client, stats.clone());
            let mut backend_side = Counted::new(b, Side::Backend, stats.clone());
            let copy = splice::copy_both_ways(&mut client_side, &mut backend_side);
            tokio::select! {
                res = copy => match res {
                    Ok(_) => End::Closed(stats.first_closed().unwrap_or(Side::Client)),
                    Err(e) => End::Failed(stats.error_text().unwrap_or_else(|| e.to_string())),
                },
                why = splice::watchdog(stats, timeouts.idle, timeouts.close) => End::Expired(why),
                _ = &mut revoked => End::Revoked,
            }
        }
    };
    if let End::Failed(_) = end {
        // Data already handed to TLS still goes out (a backend that resets
        // right behind its last response, say), without a close_notify: the
        // client must see that the stream was cut.
        let _ = timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::flush(&mut *client),
        )
        .await;
    }
    if matches!(
        end,
        End::ConnectTimeout | End::BackendUnreachable(_) | End::Expired(_) | End::Revoked
    ) {
        // Tell the client politely that we are done, without waiting long.
        let _ = timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut client),
        )
        .await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let ends = [
            End::Closed(Side::Client),
            End::Closed(Side::Backend),
            End::HandshakeTimeout,
            End::HandshakeFailed(io::Error::other("x")),
            End::ClientCertRejected(io::Error::other("x")),
            End::Revoked,
            End::AcmeChallenge,
            End::NoRoute,
            End::ConnectTimeout,
            End::BackendUnreachable(String::new()),
            End::Expired(Expired::Idle),
            End::Expired(Expired::Close),
            End::Failed(String::new()),
            End::Shutdown,
            End::Refused,
        ];
        for e in ends {
            let r = e.reason();
            assert!(
                crate::service::metrics::REASONS[..crate::service::metrics::REASONS.len() - 1]
                    .contains(&r),
                "reason {r:?} is missing from metrics::REASONS"
            );
        }
    }
}
