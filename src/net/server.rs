//! The server: accept loops on every worker thread, the connection cap, and
//! the drain at shutdown.
//!
//! Each worker is a thread with its own single-threaded event loop (the main
//! thread is the first) and an accept loop on every listening socket (a `dup`
//! of it). A connection stays on the thread that accepted it: no work stealing
//! and no wake-ups across threads on the per-connection path, as in nginx's
//! worker processes. An accept loop only accepts and spawns; everything slow
//! happens in the connection's own task, so a slow client never stalls accepts.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::net::listener::Listener;
use crate::proxy::forward::{self, Context};

/// Limits that apply to the whole server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, over all maps and workers.
    pub max_connections: usize,
    /// How long open connections may finish after the shutdown signal.
    pub shutdown_timeout: Duration,
    /// Threads that accept and serve connections (at least one: the caller's).
    pub workers: usize,
}

/// What every accept loop shares, on whichever thread it runs.
#[derive(Clone)]
struct Shared {
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
    /// Set at shutdown: stop accepting.
    stop_accept: watch::Receiver<bool>,
    /// Set when the drain times out: close what is still open.
    force_close: watch::Receiver<bool>,
}

/// Accepting on every worker; `run_until` drains it.
pub struct Server {
    limits: Limits,
    slots: Arc<Semaphore>,
    stop_accept: watch::Sender<bool>,
    force_close: watch::Sender<bool>,
    /// Set once the drain is over: the other workers' event loops may end.
    finished: watch::Sender<bool>,
    /// Closed when every worker's accept loops have ended.
    accepting: mpsc::Receiver<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the other workers' threads and the accept loops of the calling
    /// thread, the first worker (on its runtime). Errors here end start-up.
    pub fn start(
        listeners: Vec<Listener>,
        ctx: Arc<Context>,
        limits: Limits,
    ) -> io::Result<Server> {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let (stop_tx, stop_accept) = watch::channel(false);
        let (force_tx, force_close) = watch::channel(false);
        let (finished_tx, finished) = watch::channel(false);
        // Each accept loop holds a sender; `recv` gives None once all are gone.
        let (accepting_tx, accepting) = mpsc::channel::<()>(1);
        let shared = Shared {
            ctx,
            slots: slots.clone(),
            stop_accept,
            force_close,
        };

        let mut threads = Vec::new();
        for i in 1..limits.workers.max(1) {
            match start_worker(i, &listeners, &shared, &accepting_tx, &finished) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Let the workers already started end, then give up.
                    let _ = stop_tx.send(true);
                    let _ = finished_tx.send(true);
                    return Err(e);
                }
            }
        }
        for l in listeners {
            tokio::spawn(accept_loop(l, shared.clone(), accepting_tx.clone()));
        }
        Ok(Server {
            limits,
            slots,
            stop_accept: stop_tx,
            force_close: force_tx,
            finished: finished_tx,
            accepting,
            threads,
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        let _ = self.stop_accept.send(true);
        // The listeners close as the loops on every worker end: no new
        // connection after this.
        let _ = self.accepting.recv().await;

        let limits = self.limits;
        let slots = &self.slots;
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
            let _ = self.force_close.send(true);
            // Give them a moment to write their log line.
            let _ = tokio::time::timeout(Duration::from_secs(2), slots.acquire_many(max)).await;
        }
        let _ = self.finished.send(true);
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
        tracing::info!("stopped");
    }
}

/// Starts worker `i`: a thread with its own event loop and an accept loop on a
/// `dup` of every listening socket.
fn start_worker(
    i: usize,
    listeners: &[Listener],
    shared: &Shared,
    accepting_tx: &mpsc::Sender<()>,
    finished: &watch::Receiver<bool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dups = {
        // Register the dups with the worker's event loop, not the caller's.
        let _in_worker = rt.enter();
        listeners
            .iter()
            .map(Listener::try_clone)
            .collect::<io::Result<Vec<_>>>()?
    };
    let shared = shared.clone();
    let accepting_tx = accepting_tx.clone();
    let mut finished = finished.clone();
    std::thread::Builder::new()
        .name(format!("tcpfwd-worker-{i}"))
        .spawn(move || {
            rt.block_on(async move {
                let mut loops = JoinSet::new();
                for l in dups {
                    loops.spawn(accept_loop(l, shared.clone(), accepting_tx.clone()));
                }
                drop(accepting_tx);
                while loops.join_next().await.is_some() {}
                // This thread's connections run only while its event loop
                // does: keep it going until the drain is over.
                let _ = finished.wait_for(|f| *f).await;
            });
        })
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

/// Accepts on one listener until shutdown, then closes it and drops `accepting`.
async fn accept_loop(l: Listener, shared: Shared, accepting: mpsc::Sender<()>) {
    let Shared {
        ctx,
        slots,
        stop_accept: mut stop,
        force_close,
    } = shared;
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
                    tracing::warn!(listen = %l.local_addr, "accept failed: {e}; backing off");
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
                let frontend = l.frontend.clone();
                let ctx = ctx.clone();
                let force_close = force_close.clone();
                tokio::spawn(async move {
                    forward::serve(tcp, peer, frontend, ctx, force_close).await;
                    drop(permit);
                });
            }
            Err(_) => {
                drop(tcp);
                refused += 1;
                if refused_logged.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        %peer, listen = %l.local_addr, refused,
                        "connection refused: --max-connections reached"
                    );
                    refused = 0;
                    refused_logged = Instant::now();
                }
            }
        }
    }
    // The socket first, then the sign that this loop is done: once every
    // loop's sender is gone, no copy of any listening socket is open.
    drop(l);
    drop(accepting);
}
