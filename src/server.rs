//! The server: accept loops, the connection cap, and the drain at shutdown.
//!
//! An accept loop only accepts and spawns; everything slow happens in the
//! connection's own task, so a slow client can never stall accepts.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::forward::{self, Context};
use crate::listener::Listener;

/// Limits that apply to the whole server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, over all maps.
    pub max_connections: usize,
    /// How long open connections may finish after the shutdown signal.
    pub shutdown_timeout: Duration,
}

/// Accepts on every listener until `shutdown` resolves, then drains.
pub async fn run(
    listeners: Vec<Listener>,
    ctx: Arc<Context>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_accept_tx, stop_accept) = watch::channel(false);
    let (force_close_tx, force_close) = watch::channel(false);
    let mut accepting = JoinSet::new();
    for l in listeners {
        accepting.spawn(accept_loop(
            l,
            ctx.clone(),
            slots.clone(),
            stop_accept.clone(),
            force_close.clone(),
        ));
    }

    shutdown.await;
    let _ = stop_accept_tx.send(true);
    // The listeners close as their loops end: no new connection after this.
    while accepting.join_next().await.is_some() {}

    let max = limits.max_connections as u32;
    let open = limits.max_connections - slots.available_permits();
    if open > 0 {
        tracing::info!(
            open,
            timeout_s = limits.shutdown_timeout.as_secs_f64(),
            "shutting down: waiting for open connections to finish"
        );
    } else {
        tracing::info!("shutting down: no open connections");
    }
    let drained = tokio::time::timeout(limits.shutdown_timeout, slots.acquire_many(max)).await;
    if drained.is_err() {
        let left = limits.max_connections - slots.available_permits();
        tracing::warn!(
            left,
            "shutdown timeout reached: closing the connections still open"
        );
        let _ = force_close_tx.send(true);
        // Give them a moment to write their log line.
        let _ = tokio::time::timeout(Duration::from_secs(2), slots.acquire_many(max)).await;
    }
    tracing::info!("stopped");
}

/// Whether an accept error concerns only the one connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

async fn accept_loop(
    l: Listener,
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    force_close: watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    let mut refused: u64 = 0;
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            r = l.socket.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::ZERO;
                // Show IPv4 clients of a dual-stack socket as plain IPv4.
                (
                    tcp,
                    std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                )
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the pending connection stays queued,
                // so retrying at once would spin. Back off, up to a second.
                if backoff.is_zero() {
                    tracing::warn!(listen = %l.local_addr, map = %l.map, "accept failed: {e}; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let map = l.map.clone();
                let ctx = ctx.clone();
                let force_close = force_close.clone();
                tokio::spawn(async move {
                    forward::serve(tcp, peer, map, ctx, force_close).await;
                    drop(permit);
                });
            }
            Err(_) => {
                drop(tcp);
                refused += 1;
                if refused_logged.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        %peer, map = %l.map, refused,
                        "connection refused: --max-connections reached"
                    );
                    refused = 0;
                    refused_logged = Instant::now();
                }
            }
        }
    }
}
