//! The byte splice: a bidirectional copy between the TLS client and the plain
//! backend that holds no buffer while idle, thin adapters that count bytes,
//! note activity and half-close, and a watchdog that enforces the idle and
//! close timeouts.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Largest single read, in a buffer shared by every connection on a thread:
/// two full TLS records, so rustls fills whole records from backend reads.
pub const READ_BUF: usize = 32 * 1024;

/// Which end of the splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The TLS client.
    Client = 1,
    /// The plain backend.
    Backend = 2,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// What both adapters of one connection record, read by the watchdog and the log line.
#[derive(Debug)]
pub struct Stats {
    start: Instant,
    /// Milliseconds from `start` to the last byte read on either side.
    last_activity_ms: AtomicU64,
    /// Bytes written to the backend.
    up: AtomicU64,
    /// Bytes written to the client.
    down: AtomicU64,
    /// Side whose stream ended first (0 = none yet).
    first_eof: AtomicU8,
    /// Set when the client ended its stream with a bare FIN, no close_notify.
    client_no_close_notify: AtomicBool,
    /// The first I/O error and the side it came from.
    error: Mutex<Option<(Side, io::Error)>>,
    /// Wakes the watchdog when a side half-closes.
    half_closed: tokio::sync::Notify,
}

impl Stats {
    /// Fresh counters for a connection starting now.
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats {
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            first_eof: AtomicU8::new(0),
            client_no_close_notify: AtomicBool::new(false),
            error: Mutex::new(None),
            half_closed: tokio::sync::Notify::new(),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_activity_ms.load(Relaxed))
    }

    fn eof(&self, side: Side) {
        self.touch();
        if self
            .first_eof
            .compare_exchange(0, side as u8, Relaxed, Relaxed)
            .is_ok()
        {
            self.half_closed.notify_one();
        }
    }

    fn record_error(&self, side: Side, e: &io::Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((side, io::Error::new(e.kind(), e.to_string())));
        }
    }

    /// Bytes delivered to the backend and to the client.
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.load(Relaxed), self.down.load(Relaxed))
    }

    /// The side that closed first, if any.
    pub fn first_closed(&self) -> Option<Side> {
        match self.first_eof.load(Relaxed) {
            1 => Some(Side::Client),
            2 => Some(Side::Backend),
            _ => None,
        }
    }

    /// Whether the client ended without close_notify.
    pub fn client_skipped_close_notify(&self) -> bool {
        self.client_no_close_notify.load(Relaxed)
    }

    /// The first error seen, as "side: error".
    pub fn error_text(&self) -> Option<String> {
        let slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .map(|(side, e)| format!("{}: {e}", side.name()))
    }
}

/// Wraps one end of the splice, counting what passes through it.
pub struct Counted<S> {
    inner: S,
    side: Side,
    stats: Arc<Stats>,
}

impl<S> Counted<S> {
    /// Wraps `inner` as `side`.
    pub fn new(inner: S, side: Side, stats: Arc<Stats>) -> Self {
        Counted { inner, side, stats }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.stats.touch();
                } else {
                    this.stats.eof(this.side);
                }
                Poll::Ready(Ok(()))
            }
            // rustls reports a FIN without close_notify as UnexpectedEof. For the
            // client that is still the end of its stream: a half-close, so the
            // other direction keeps flowing.
            Poll::Ready(Err(e))
                if this.side == Side::Client && e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                this.stats.client_no_close_notify.store(true, Relaxed);
                this.stats.eof(this.side);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.stats.record_error(this.side, &e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        match &res {
            Poll::Ready(Ok(n)) => {
                let counter = match this.side {
                    Side::Client => &this.stats.down,
                    Side::Backend => &this.stats.up,
                };
                counter.fetch_add(*n as u64, Relaxed);
            }
            Poll::Ready(Err(e)) => this.stats.record_error(this.side, e),
            Poll::Pending => {}
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Err(e)) = &res {
            this.stats.record_error(this.side, e);
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        if let Poll::Ready(Err(e)) = &res {
            // The peer may already be gone; that is not worth more than a note.
            if e.kind() != io::ErrorKind::NotConnected {
                this.stats.record_error(this.side, e);
            }
        }
        res
    }
}

thread_local! {
    /// The read buffer of every connection polled on this thread. A read and the
    /// write of what it got happen in one poll, so no connection keeps it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF].into_boxed_slice());
}

/// One direction of the copy. Data the writer would not take at once is kept
/// in `pending`, which is freed as soon as the reader has nothing more: an
/// idle connection holds no buffer (tokio's `copy_bidirectional` holds two,
/// zeroed, for its whole life).
#[derive(Default)]
struct OneWay {
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
    need_flush: bool,
    read_done: bool,
    /// Bytes passed to the writer; `Some` once the writer has been shut down.
    done: Option<u64>,
    total: u64,
}

impl OneWay {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Some(total) = self.done {
            return Poll::Ready(Ok(total));
        }
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.total += n as u64;
                self.need_flush = true;
            }
            self.pending.clear();
            self.written = 0;
            if self.read_done {
                // Shutdown flushes first; for TLS, what is queued, the
                // close_notify and the FIN then leave together.
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = Some(self.total);
                return Poll::Ready(Ok(self.total));
            }
            let read = SCRATCH.with_borrow_mut(|buf| {
                let mut rb = ReadBuf::new(buf);
                ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
                let data = rb.filled();
                if data.is_empty() {
                    self.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                // Write what the writer takes now; keep only the rest.
                let mut off = 0;
                while off < data.len() {
                    match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => off += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
                self.total += off as u64;
                self.need_flush = true;
                self.pending.extend_from_slice(&data[off..]);
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(res) => res?,
                Poll::Pending => {
                    // Nothing to read: free the buffer, push out what was written.
                    self.pending = Vec::new();
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, shutting
/// down each writer when its reader ends, like `tokio::io::copy_bidirectional`.
/// Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (OneWay::default(), OneWay::default());
    poll_fn(|cx| {
        let there = a_to_b.poll(cx, a, b)?;
        let back = b_to_a.poll(cx, b, a)?;
        match (there, back) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No data either way for the idle timeout.
    Idle,
    /// One side closed and the other sent nothing for the close timeout.
    Close,
}

/// Resolves when the connection has been quiet too long; never otherwise.
pub async fn watchdog(stats: &Stats, idle: Option<Duration>, close: Duration) -> Expired {
    loop {
        let half = stats.first_closed().is_some();
        let (window, why) = match (half, idle) {
            (true, Some(i)) if i < close => (i, Expired::Idle),
            (true, _) => (close, Expired::Close),
            (false, Some(i)) => (i, Expired::Idle),
            (false, None) => {
                stats.half_closed.notified().await;
                continue;
            }
        };
        let deadline = stats.last_activity() + window;
        if Instant::now() >= deadline {
            return why;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stats.half_closed.notified(), if !half => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn close_timeout_restarts_with_every_byte() {
        let stats = Stats::new();
        let (a, mut peer) = tokio::io::duplex(64);
        let mut a = Counted::new(a, Side::Backend, stats.clone());
        stats.eof(Side::Client);
        let dog = watchdog(&stats, None, Duration::from_secs(10));
        tokio::pin!(dog);
        for _ in 0..5 {
            // 8 s of quiet, then a byte: the 10 s window never runs out.
            tokio::select! {
                _ = &mut dog => panic!("expired while data was still moving"),
                _ = tokio::time::sleep(Duration::from_secs(8)) => {}
            }
            peer.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            a.read_exact(&mut b).await.unwrap();
        }
        let t = Instant::now();
        assert_eq!(dog.await, Expired::Close);
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_without_half_close_unless_idle_is_set() {
        let stats = Stats::new();
        let dog = watchdog(&stats, None, Duration::from_secs(1));
        tokio::select! {
            _ = dog => panic!("a connection without idle timeout must never expire"),
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        let t = Instant::now();
        stats.touch();
        assert_eq!(
            watchdog(
                &stats,
                Some(Duration::from_secs(5)),
                Duration::from_secs(60)
            )
            .await,
            Expired::Idle
        );
        assert!(t.elapsed() <= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn copy_both_ways_moves_every_byte_under_backpressure_and_half_closes() {
        // Tiny pipes force partial writes and Pending on both sides.
        let (mut a, a_peer) = tokio::io::duplex(7);
        let (mut b, b_peer) = tokio::io::duplex(5);
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let copy = tokio::spawn(async move { copy_both_ways(&mut a, &mut b).await });
        let (up2, down2) = (up.clone(), down.clone());
        // Each peer sends its data and half-closes while reading everything back.
        async fn peer(stream: tokio::io::DuplexStream, data: Vec<u8>) -> Vec<u8> {
            let (mut rd, mut wr) = tokio::io::split(stream);
            let w = async {
                wr.write_all(&data).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let r = rd.read_to_end(&mut got);
            let (_, n) = tokio::join!(w, r);
            n.unwrap();
            got
        }
        let client = tokio::spawn(peer(a_peer, up2));
        let backend = tokio::spawn(peer(b_peer, down2));
        assert_eq!(backend.await.unwrap(), up);
        assert_eq!(client.await.unwrap(), down);
        let (there, back) = copy.await.unwrap().unwrap();
        assert_eq!((there, back), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn counts_bytes_and_turns_client_unexpected_eof_into_eof() {
        struct Eof;
        impl AsyncRead for Eof {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
            }
        }
        let stats = Stats::new();
        let mut c = Counted::new(Eof, Side::Client, stats.clone());
        let mut buf = Vec::new();
        assert_eq!(c.read_to_end(&mut buf).await.unwrap(), 0);
        assert_eq!(stats.first_closed(), Some(Side::Client));
        assert!(stats.client_skipped_close_notify());
        let mut b = Counted::new(Vec::new(), Side::Backend, stats.clone());
        b.write_all(b"hello").await.unwrap();
        assert_eq!(stats.bytes(), (5, 0));
    }
}
