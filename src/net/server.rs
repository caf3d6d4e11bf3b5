//! The server: accept loops on every worker thread, the connection cap, and
//! the drain at shutdown.
//!
//! Each worker is a thread with its own single-threaded event loop (the main
//! thread is the first) and an accept loop on every listening socket (a `dup`
//! of it). A connection stays on the thread that accepted it: no work stealing
//! and no wake-ups across threads on the per-connection path, as in nginx's
//! worker processes. An accept loop only accepts and spawns; everything slow
//! happens in the connection's own task, so a slow client never stalls accepts.
//!
//! A [`ServerHandle`] adds and removes listening sockets while the server runs
//! (reloads that add or remove frontends): an added socket gets an accept loop
//! on every worker, a removed one has all its loops stopped and is closed,
//! while the connections it accepted go on to their end.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::config::Listen;
use crate::net::listener::Listener;
use crate::policy::trim::{self, HighWater};
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
    /// The most connections open since the trimmer last looked.
    high_water: Arc<HighWater>,
    /// `--max-connections`, to count open connections from `slots`.
    max_connections: usize,
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
    handle: ServerHandle,
    /// Gives the heap back after floods (`trim::after_floods`).
    trimmer: tokio::task::JoinHandle<()>,
}

/// Adds and removes listening sockets while the server runs; cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    /// Every worker's event loop, the calling thread's first.
    workers: Vec<tokio::runtime::Handle>,
    shared: Shared,
    /// Lets added loops hold an `accepting` sender without keeping
    /// `run_until` from seeing the last one go: once every loop has ended at
    /// shutdown, nothing can be added.
    accepting: mpsc::WeakSender<()>,
    /// The sockets accepting now, by the frontend they serve.
    open: Mutex<Vec<Open>>,
}

/// One listening socket's accept loops (one per worker).
struct Open {
    listen: Listen,
    local_addr: std::net::SocketAddr,
    /// Set (or dropped) to stop exactly these loops.
    stop: watch::Sender<bool>,
    /// `recv` gives None once every loop has closed its copy of the socket.
    closed: mpsc::Receiver<()>,
}

/// Resolves once every copy of the removed sockets is closed.
pub struct Closing {
    /// The listening addresses that were removed.
    pub addrs: Vec<std::net::SocketAddr>,
    closed: Vec<mpsc::Receiver<()>>,
}

impl Closing {
    /// Waits until the ports are free: no worker accepts on them any more.
    pub async fn wait(mut self) {
        for c in &mut self.closed {
            let _ = c.recv().await;
        }
    }
}

/// The stop signals of one socket's accept loops.
#[derive(Clone)]
struct LoopSignals {
    /// The server's `accepting` counter (see `Server::accepting`).
    accepting: mpsc::Sender<()>,
    /// This socket's own stop (a removal).
    removed: watch::Receiver<bool>,
    /// Dropped when this socket's loop ends (for `Closing`).
    closed: mpsc::Sender<()>,
}

impl ServerHandle {
    /// Starts accepting on `listener` on every worker. Errors leave nothing
    /// started (the socket closes when `listener` is dropped).
    pub fn add(&self, listener: Listener) -> io::Result<()> {
        let inner = &self.inner;
        let gone = || io::Error::other("the server is shutting down");
        if *inner.shared.stop_accept.borrow() {
            return Err(gone());
        }
        let accepting = inner.accepting.upgrade().ok_or_else(gone)?;
        // One dup per worker, each registered with that worker's event loop,
        // all made before any loop starts so that a failure starts none.
        let mut dups = Vec::with_capacity(inner.workers.len());
        for rt in &inner.workers {
            let _in_worker = rt.enter();
            dups.push(listener.try_clone()?);
        }
        let (stop, removed) = watch::channel(false);
        let (closed_tx, closed) = mpsc::channel(1);
        let signals = LoopSignals {
            accepting,
            removed,
            closed: closed_tx,
        };
        let listen = listener.frontend.listen;
        let local_addr = listener.local_addr;
        drop(listener);
        for (rt, l) in inner.workers.iter().zip(dups) {
            rt.spawn(accept_loop(l, inner.shared.clone(), signals.clone()));
        }
        lock(&inner.open).push(Open {
            listen,
            local_addr,
            stop,
            closed,
        });
        Ok(())
    }

    /// Stops accepting on every socket of the frontend at `listen`, on every
    /// worker, and closes them; their open connections go on to their end.
    /// `None` when no socket serves that frontend.
    pub fn remove(&self, listen: Listen) -> Option<Closing> {
        let mut open = lock(&self.inner.open);
        let (gone, kept): (Vec<Open>, Vec<Open>) = open.drain(..).partition(|o| o.listen == listen);
        *open = kept;
        drop(open);
        if gone.is_empty() {
            return None;
        }
        let mut closing = Closing {
            addrs: Vec::with_capacity(gone.len()),
            closed: Vec::with_capacity(gone.len()),
        };
        for o in gone {
            let _ = o.stop.send(true);
            closing.addrs.push(o.local_addr);
            closing.closed.push(o.closed);
        }
        Some(closing)
    }

    /// The listening addresses of the frontend at `listen`.
    pub fn local_addrs(&self, listen: Listen) -> Vec<std::net::SocketAddr> {
        lock(&self.inner.open)
            .iter()
            .filter(|o| o.listen == listen)
            .map(|o| o.local_addr)
            .collect()
    }
}

/// The list of open sockets; a panic while it was held leaves it consistent
/// (every change is a single push or replace), so poisoning is ignored.
fn lock(m: &Mutex<Vec<Open>>) -> std::sync::MutexGuard<'_, Vec<Open>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let high_water = Arc::new(HighWater::default());
        let shared = Shared {
            ctx,
            slots: slots.clone(),
            stop_accept,
            force_close,
            high_water: high_water.clone(),
            max_connections: limits.max_connections,
        };

        let mut threads = Vec::new();
        // The calling thread is worker 0: its event loop is the one we are on.
        let here = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let mut workers = vec![here];
        for i in 1..limits.workers.max(1) {
            match start_worker(i, &finished) {
                Ok((t, rt)) => {
                    threads.push(t);
                    workers.push(rt);
                }
                Err(e) => {
                    // Let the workers already started end, then give up.
                    let _ = stop_tx.send(true);
                    let _ = finished_tx.send(true);
                    return Err(e);
                }
            }
        }
        let handle = ServerHandle {
            inner: Arc::new(HandleInner {
                workers,
                shared,
                accepting: accepting_tx.downgrade(),
                open: Mutex::new(Vec::new()),
            }),
        };
        for l in listeners {
            if let Err(e) = handle.add(l) {
                let _ = stop_tx.send(true);
                let _ = finished_tx.send(true);
                return Err(e);
            }
        }
        // From here on only the accept loops hold `accepting` senders.
        drop(accepting_tx);
        let trimmer = {
            let (slots, max) = (slots.clone(), limits.max_connections);
            tokio::spawn(trim::after_floods(high_water, move || {
                max.saturating_sub(slots.available_permits())
            }))
        };
        Ok(Server {
            limits,
            slots,
            stop_accept: stop_tx,
            force_close: force_tx,
            finished: finished_tx,
            accepting,
            threads,
            handle,
            trimmer,
        })
    }

    /// Adds and removes listeners while the server runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.trimmer.abort();
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

/// Starts worker `i`: a thread with its own event loop, which runs the accept
/// loops `ServerHandle::add` spawns on it (and their connections) until the
/// drain is over.
fn start_worker(
    i: usize,
    finished: &watch::Receiver<bool>,
) -> io::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let mut finished = finished.clone();
    let thread = std::thread::Builder::new()
        .name(format!("tcpfwd-worker-{i}"))
        .spawn(move || {
            rt.block_on(async move {
                // This thread's accept loops and connections run only while
                // its event loop does: keep it going until the drain is over.
                let _ = finished.wait_for(|f| *f).await;
            });
        })?;
    Ok((thread, handle))
}

/// Resolves at shutdown or at the removal of the loop's socket (or once
/// either's sender is gone, which means the same).
async fn stopped(stop: &mut watch::Receiver<bool>, removed: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = removed.wait_for(|r| *r) => {}
    }
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

/// Accepts on one listener until shutdown or its removal, then closes it and
/// drops its signals' senders.
async fn accept_loop(l: Listener, shared: Shared, signals: LoopSignals) {
    let Shared {
        ctx,
        slots,
        stop_accept: mut stop,
        force_close,
        high_water,
        max_connections,
    } = shared;
    let LoopSignals {
        accepting,
        mut removed,
        closed,
    } = signals;

    let mut backoff = Duration::ZERO;
    let mut refused: u64 = 0;
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            r = l.socket.accept() => r,
            _ = stopped(&mut stop, &mut removed) => break,
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
                    _ = stopped(&mut stop, &mut removed) => break,
                }
                continue;
            }
        };
        // The frontend's lists, the source's ban and numbers: a refused
        // connection is closed before any byte is read, and only counted.
        let pass = match ctx.gate.admit(peer.ip(), &l.frontend.table().access) {
            Ok(pass) => pass,
            Err(why) => {
                l.frontend.metrics.refused.inc(why);
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                high_water.note(max_connections.saturating_sub(slots.available_permits()));
                let frontend = l.frontend.clone();
                let ctx = ctx.clone();
                let force_close = force_close.clone();
                tokio::spawn(async move {
                    forward::serve(tcp, peer, frontend, ctx, force_close).await;
                    drop(pass);
                    drop(permit);
                });
            }
            Err(_) => {
                drop(tcp);
                l.frontend.metrics.refused_over_limit.inc();
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
    drop(closed);
    drop(accepting);
}
