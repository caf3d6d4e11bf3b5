//! When to renew and how long to wait: the lifetime rule, ARI windows, backoff
//! with jitter, the expiry watch, and how times read in the log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    BACKOFF_BASE, BACKOFF_CAP, EXPIRY_WARNING, REFUSED_FLOOR, RETRY_AFTER_CAP, SHORT_LIFETIME,
};

/// When to renew: a random point in the CA's ARI window when it gave a usable
/// one, otherwise when a third of the lifetime remains (day 60 of 90, day 30
/// of 45), or half of it for one shorter than [`SHORT_LIFETIME`] (day 3 of 6).
/// `random` is in [0, 1). A time in the past means now.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    ari_window: Option<(SystemTime, SystemTime)>,
    random: f64,
) -> SystemTime {
    if let Some((start, end)) = ari_window {
        if let Ok(width) = end.duration_since(start) {
            return start + width.mul_f64(random.clamp(0.0, 1.0));
        }
        // An inverted window is invalid (RFC 9773 section 4.2): use the lifetime rule.
    }
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    if lifetime < SHORT_LIFETIME {
        not_after - lifetime / 2
    } else {
        not_after - lifetime / 3
    }
}

/// The lifetime rule [`renewal_time`] applies, for the log.
pub(super) fn lifetime_rule(not_before: SystemTime, not_after: SystemTime) -> &'static str {
    match not_after.duration_since(not_before) {
        Ok(l) if l < SHORT_LIFETIME => "half the lifetime left (a short-lived certificate)",
        _ => "a third of the lifetime left",
    }
}

/// Exponential backoff with jitter, capped near an hour, that honours `Retry-After`.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait before the next attempt after one more failure. `random` is in
    /// [0, 1) and picks a point in the upper half of the exponential step.
    pub fn next(&mut self, random: f64, retry_after: Option<Duration>) -> Duration {
        let step = BACKOFF_BASE
            .saturating_mul(1u32 << self.failures.min(20))
            .min(BACKOFF_CAP);
        self.failures = self.failures.saturating_add(1);
        let jittered = step.mul_f64(0.5 + random.clamp(0.0, 1.0) / 2.0);
        match retry_after {
            Some(told) => jittered.max(told.min(RETRY_AFTER_CAP)),
            None => jittered,
        }
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A uniformly random number in [0, 1).
pub(super) fn random() -> f64 {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    // SystemRandom fails only without an OS random source; 0.5 is a fine jitter then.
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A time as RFC 3339 in UTC, to the second.
pub fn fmt_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

/// A duration as `2d3h`, `4m5s` or `7s`.
pub fn fmt_duration(d: Duration) -> String {
    // Rounded, so that "Retry-After: 8" read a moment later still shows as 8s.
    let s = (d + Duration::from_millis(500)).as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) if s == 0 || d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) => format!("{mins}m{secs}s"),
        (0, _, _) => format!("{hours}h{mins}m"),
        _ => format!("{days}d{hours}h"),
    }
}

/// "at T (in D)" or "at T (D ago)".
pub(super) fn when(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => format!("{} (in {})", fmt_time(t), fmt_duration(d)),
        Err(e) => format!("{} ({} ago)", fmt_time(t), fmt_duration(e.duration())),
    }
}

/// Seconds since the Unix epoch (0 before it), for the metrics.
pub(super) fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The wait after a failed attempt: the backoff's, or what the CA asked
/// (`told`), with a floor of [`REFUSED_FLOOR`] after a refusal unless the CA
/// named a time still ahead (a date already past names none).
pub(super) fn failure_wait(
    backoff: &mut Backoff,
    random: f64,
    told: Option<Duration>,
    refused: bool,
) -> Duration {
    let told = told.filter(|t| !t.is_zero());
    let wait = backoff.next(random, told);
    // A CA that says when to come back is obeyed to the second.
    if told.is_none() && refused {
        wait.max(REFUSED_FLOOR)
    } else {
        wait
    }
}

/// Whether a certificate from `not_before` to `not_after` is near enough its
/// expiry at `now` for the expiry watch: within 7 days, or within a third of
/// its lifetime for a short-lived one.
pub(super) fn near_expiry(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let margin = EXPIRY_WARNING.min(lifetime / 3);
    match not_after.checked_sub(margin) {
        Some(from) => now >= from,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(days: u64) -> SystemTime {
        UNIX_EPOCH + DAY * 20_000 + DAY * days as u32
    }

    #[test]
    fn lifetime_rule_renews_with_a_third_left() {
        assert_eq!(renewal_time(t(0), t(90), None, 0.7), t(60));
        assert_eq!(renewal_time(t(0), t(45), None, 0.7), t(30));
        // Short-lived (under 10 days, Let's Encrypt's 6-day profile): half left.
        assert_eq!(renewal_time(t(0), t(6), None, 0.7), t(3));
        assert_eq!(renewal_time(t(0), t(10), None, 0.7), t(0) + DAY * 20 / 3);
        let short = renewal_time(t(0), t(0) + Duration::from_secs(30), None, 0.0);
        assert_eq!(short, t(0) + Duration::from_secs(15));
        assert_eq!(
            lifetime_rule(t(0), t(6)),
            "half the lifetime left (a short-lived certificate)"
        );
        assert_eq!(lifetime_rule(t(0), t(90)), "a third of the lifetime left");
    }

    #[test]
    fn ari_window_wins_and_is_sampled_uniformly() {
        let w = Some((t(50), t(52)));
        assert_eq!(renewal_time(t(0), t(90), w, 0.0), t(50));
        assert_eq!(renewal_time(t(0), t(90), w, 0.5), t(51));
        assert!(renewal_time(t(0), t(90), w, 0.999) < t(52));
        // A window in the past (a revocation notice) means now: the caller sees a past time.
        assert_eq!(renewal_time(t(0), t(90), Some((t(1), t(1))), 0.3), t(1));
        // An inverted window is ignored.
        assert_eq!(renewal_time(t(0), t(90), Some((t(52), t(50))), 0.3), t(60));
    }

    #[test]
    fn backoff_doubles_with_jitter_caps_and_honours_retry_after() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next(1.0, None)).collect();
        assert_eq!(waits[0], Duration::from_secs(5));
        assert_eq!(waits[1], Duration::from_secs(10));
        assert_eq!(waits[11], BACKOFF_CAP);
        let mut b = Backoff::default();
        assert_eq!(b.next(0.0, None), Duration::from_millis(2500));
        assert_eq!(
            b.next(0.0, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        assert_eq!(b.next(0.0, Some(DAY * 30)), RETRY_AFTER_CAP);
        b.reset();
        assert_eq!(b.next(1.0, None), Duration::from_secs(5));
    }

    #[test]
    fn a_refusal_waits_a_minute_unless_the_ca_named_a_time_ahead() {
        let mut b = Backoff::default();
        // Retry-After as a date in the past reads as zero: the floor holds.
        let zero = Some(Duration::ZERO);
        assert_eq!(failure_wait(&mut b, 0.0, zero, true), REFUSED_FLOOR);
        assert_eq!(failure_wait(&mut b, 0.0, None, true), REFUSED_FLOOR);
        let eight = Some(Duration::from_secs(8));
        let mut b = Backoff::default();
        assert_eq!(
            failure_wait(&mut b, 0.0, eight, true),
            Duration::from_secs(8)
        );
        let mut b = Backoff::default();
        assert_eq!(
            failure_wait(&mut b, 0.0, zero, false),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn expiry_watch_starts_a_week_or_a_third_of_the_lifetime_before() {
        assert!(!near_expiry(t(0), t(90), t(82)));
        assert!(near_expiry(t(0), t(90), t(83)));
        assert!(near_expiry(t(0), t(90), t(100)));
        // Six days: the last two.
        assert!(!near_expiry(t(0), t(6), t(3)));
        assert!(near_expiry(t(0), t(6), t(4)));
    }

    #[test]
    fn durations_and_times_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(7)), "7s");
        assert_eq!(fmt_duration(Duration::from_millis(7990)), "8s");
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m5s");
        assert_eq!(fmt_duration(Duration::from_secs(3 * 3600 + 60)), "3h1m");
        assert_eq!(fmt_duration(DAY * 59 + Duration::from_secs(7200)), "59d2h");
        assert_eq!(fmt_time(UNIX_EPOCH + DAY), "1970-01-02T00:00:00Z");
    }
}
