//! Memory back after a flood: glibc keeps freed heap for reuse, so a scan's
//! connections would leave the process at its high-water mark for good;
//! `malloc_trim` gives it back once the connection count has fallen.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How often the connection count is looked at (and so the most often the
/// heap is trimmed).
pub const EVERY: Duration = Duration::from_secs(10);

/// A peak below this many connections is not worth a trim.
const WORTH_IT: usize = 64;

/// Trims once the open connections are below a quarter of the peak.
const FALL: usize = 4;

/// Gives the free heap of every arena back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks;
    // it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's) return memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

/// The highest connection count since the last look; the accept loops raise it.
#[derive(Debug, Default)]
pub struct HighWater(AtomicUsize);

impl HighWater {
    /// Notes `open` connections (a relaxed load on the usual path).
    pub fn note(&self, open: usize) {
        if open > self.0.load(Ordering::Relaxed) {
            self.0.fetch_max(open, Ordering::Relaxed);
        }
    }
}

/// Whether to trim now, given the peak since the last trim and the count now.
fn should_trim(peak: usize, open: usize) -> bool {
    peak >= WORTH_IT && open <= peak / FALL
}

/// Every [`EVERY`], trims the heap when the connection count (`open()`)
/// has fallen below a quarter of its peak since the last trim.
pub async fn after_floods(high: std::sync::Arc<HighWater>, open: impl Fn() -> usize) {
    let mut peak = 0;
    loop {
        tokio::time::sleep(EVERY).await;
        let now = open();
        peak = peak.max(high.0.swap(now, Ordering::Relaxed)).max(now);
        if should_trim(peak, now) {
            let _ = tokio::task::spawn_blocking(trim).await;
            tracing::debug!(
                peak,
                open = now,
                "heap trimmed after the connection count fell"
            );
            peak = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_fall_from_a_real_peak() {
        assert!(!should_trim(10, 0), "too small to matter");
        assert!(should_trim(5000, 0));
        assert!(should_trim(5000, 1250));
        assert!(!should_trim(5000, 1251));
        trim();
        let h = HighWater::default();
        h.note(3);
        h.note(2);
        assert_eq!(h.0.load(Ordering::Relaxed), 3);
    }
}
