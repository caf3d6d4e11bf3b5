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
use crate::proxy::routes::{ActiveRoute, FrontendHandle};
use crate::proxy::splice::{self, Counted, Expired, Side, Stats};
use crate::tls::conn;
use crate::tls::TlsRouter;

/// What every connection shares, whatever its frontend.
pub struct Context {
    /// Answers ACME's TLS-ALPN-01 validations before any route is chosen.
    pub challenges: Arc<TlsRouter>,
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
}

/// How a connection ended, for its log event.
#[derive(Debug)]
enum End {
    /// Both directions finished; this side closed first.
    Closed(Side),
    HandshakeTimeout,
    HandshakeFailed(io::Error),
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
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Closed(Side::Client) => "client closed",
            End::Closed(Side::Backend) => "backend closed",
            End::HandshakeTimeout => "handshake timeout",
            End::HandshakeFailed(_) => "handshake failed",
            End::AcmeChallenge => "acme challenge answered",
            End::NoRoute => "unknown server name",
            End::ConnectTimeout => "backend connect timeout",
            End::BackendUnreachable(_) => "backend unreachable",
            End::Expired(Expired::Idle) => "idle timeout",
            End::Expired(Expired::Close) => "close timeout",
            End::Failed(_) => "error",
            End::Shutdown => "shutdown",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            End::HandshakeFailed(e) => Some(e.to_string()),
            End::BackendUnreachable(e) | End::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }
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
    let (map, route, backend) = match &seen.route {
        Some(r) => (r.map.clone(), r.label.as_str(), r.route.backend.to_string()),
        None => (
            seen.frontend
                .take()
                .unwrap_or_else(|| frontend.table().describe.clone()),
            "",
            String::new(),
        ),
    };
    let tls_version = seen.tls_version.and_then(conn::version_name).unwrap_or("");
    let cipher = seen.cipher.and_then(conn::iana_name).unwrap_or_default();
    let cipher = cipher.as_str();
    let kx = seen.kx.map(|g| format!("{g:?}")).unwrap_or_default();
    let kx = kx.as_str();
    let backend_addr = seen.backend_addr.map(|a| a.to_string()).unwrap_or_default();
    let backend_addr = backend_addr.as_str();
    match &end {
        // Scanners make handshake failures routine on the internet: info, not warn.
        End::Closed(_)
        | End::Expired(_)
        | End::AcmeChallenge
        | End::NoRoute
        | End::HandshakeFailed(_)
        | End::HandshakeTimeout => tracing::info!(
            %peer, peer_ip = %peer.ip(), map, route, sni, backend, backend_addr, bytes_up = up, bytes_down = down, duration_ms = ms,
            reason, client_close_notify = !no_close_notify, tls_version, cipher, kx,
            detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
        _ => tracing::warn!(
            %peer, peer_ip = %peer.ip(), map, route, sni, backend, backend_addr, bytes_up = up, bytes_down = down, duration_ms = ms,
            reason, client_close_notify = !no_close_notify, tls_version, cipher, kx,
            detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
    }
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
    let end = match timeout(timeouts.connect, connect).await {
        Err(_) => End::ConnectTimeout,
        Ok(Err(e)) => End::BackendUnreachable(e),
        Ok(Ok(b)) => {
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
        End::ConnectTimeout | End::BackendUnreachable(_) | End::Expired(_)
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
            End::AcmeChallenge,
            End::NoRoute,
            End::ConnectTimeout,
            End::BackendUnreachable(String::new()),
            End::Expired(Expired::Idle),
            End::Expired(Expired::Close),
            End::Failed(String::new()),
            End::Shutdown,
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
