//! One connection, start to end: TLS handshake, backend connect, splice, and
//! the single log event that says how it went.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use crate::config::{MapSpec, Timeouts};
use crate::net::connect;
use crate::proxy::splice::{self, Counted, Expired, Side, Stats};
use crate::tls::conn;
use crate::tls::TlsRouter;

/// What every connection shares: TLS and the limits.
pub struct Context {
    /// Picks the TLS configuration for each ClientHello.
    pub tls: Arc<TlsRouter>,
    /// Per-connection time limits.
    pub timeouts: Timeouts,
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

/// Serves one accepted connection until it ends, then logs it once.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    map: Arc<MapSpec>,
    ctx: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let stats = Stats::new();
    let mut sni = None;
    let mut backend_addr = None;
    let end = tokio::select! {
        end = run(tcp, &map, &ctx, &stats, &mut sni, &mut backend_addr) => end,
        _ = stop.wait_for(|s| *s) => End::Shutdown,
    };
    let (up, down) = stats.bytes();
    let ms = started.elapsed().as_millis() as u64;
    let detail = end.detail().or_else(|| stats.error_text());
    let no_close_notify = stats.client_skipped_close_notify();
    let reason = end.reason();
    let sni = sni.as_deref().unwrap_or("");
    let backend_addr = backend_addr.map(|a| a.to_string()).unwrap_or_default();
    let backend_addr = backend_addr.as_str();
    match &end {
        // Scanners make handshake failures routine on the internet: info, not warn.
        End::Closed(_)
        | End::Expired(_)
        | End::AcmeChallenge
        | End::HandshakeFailed(_)
        | End::HandshakeTimeout => tracing::info!(
            %peer, map = %map, sni, bytes_up = up, bytes_down = down, duration_ms = ms,
            backend_addr, reason, client_close_notify = !no_close_notify, detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
        _ => tracing::warn!(
            %peer, map = %map, sni, bytes_up = up, bytes_down = down, duration_ms = ms,
            backend_addr, reason, client_close_notify = !no_close_notify, detail = detail.as_deref().unwrap_or(""),
            "connection closed"
        ),
    }
}

async fn run(
    tcp: TcpStream,
    map: &MapSpec,
    ctx: &Context,
    stats: &Arc<Stats>,
    sni: &mut Option<String>,
    backend_addr: &mut Option<SocketAddr>,
) -> End {
    // The handshake and the backend connect are boxed, and so is the TLS
    // connection: their state (several KiB in rustls) is on the heap only
    // while it exists, instead of sizing every connection's task for the
    // largest state it ever passes through (7.5 KiB unboxed, measured).
    let handshake = Box::pin(async {
        let hello = conn::read_hello(tcp).await?;
        let client_hello = hello.client_hello();
        *sni = client_hello.server_name().map(str::to_owned);
        let (config, challenge) = ctx.tls.config_for(&client_hello);
        let stream = Box::new(hello.handshake(config).await?);
        Ok::<_, io::Error>((stream, challenge))
    });
    let mut client = match timeout(ctx.timeouts.handshake, handshake).await {
        Err(_) => return End::HandshakeTimeout,
        Ok(Err(e)) => return End::HandshakeFailed(e),
        Ok(Ok((stream, true))) => {
            let mut stream = stream;
            let _ = timeout(
                Duration::from_secs(2),
                tokio::io::AsyncWriteExt::shutdown(&mut stream),
            )
            .await;
            return End::AcmeChallenge;
        }
        Ok(Ok((stream, false))) => stream,
    };
    let connecting = Box::pin(connect::connect(&map.backend.host, map.backend.port));
    let end = match timeout(ctx.timeouts.connect, connecting).await {
        Err(_) => End::ConnectTimeout,
        Ok(Err(e)) => End::BackendUnreachable(e.to_string()),
        Ok(Ok((b, addr))) => {
            *backend_addr = Some(addr);
            tune(SockRef::from(&b));
            let mut client_side = Counted::new(&mut *client, Side::Client, stats.clone());
            let mut backend_side = Counted::new(b, Side::Backend, stats.clone());
            let copy = splice::copy_both_ways(&mut client_side, &mut backend_side);
            tokio::select! {
                res = copy => match res {
                    Ok(_) => End::Closed(stats.first_closed().unwrap_or(Side::Client)),
                    Err(e) => End::Failed(stats.error_text().unwrap_or_else(|| e.to_string())),
                },
                why = splice::watchdog(stats, ctx.timeouts.idle, ctx.timeouts.close) => End::Expired(why),
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
