//! Linked admission: the source addresses that completed a verified
//! client-certificate handshake on a route, so that another route (the
//! DVR's WebSocket port, which browsers give no certificate) admits them.
//!
//! The same design as [`super::table`]: fixed memory, a set-associative
//! table with a per-process random seed, one small mutex per set, so worker
//! threads only contend on the set their source hashes to. A full set drops
//! the entry verified longest ago. Each entry keeps the serial of the
//! certificate that made it, so a revocation removes it at once.

use std::net::IpAddr;
use std::sync::MutexGuard;
use std::time::Duration;

use tokio::time::Instant;

use super::table::{Key, Sets, WAYS};

/// The longest serial kept. RFC 5280 allows 20 octets of content (21 with
/// the leading 0 that keeps it positive); a longer one admits nothing.
pub const MAX_SERIAL: usize = 24;

/// Admissions are per address: an IPv4 address, or an IPv6 /64 (one home's
/// or phone's network, whose privacy addresses change within it). Fixed,
/// not `source_prefix_v4`: a coarser block for the limits must not admit
/// a whole neighbourhood.
const PREFIX_V4: u8 = 32;
const PREFIX_V6: u8 = 64;

/// A certificate serial held by value (up to [`MAX_SERIAL`] octets), so that
/// the admission check hands it to the connection without an allocation.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Serial {
    len: u8,
    bytes: [u8; MAX_SERIAL],
}

impl Serial {
    /// `serial` (a certificate's serial as its INTEGER's content octets), or
    /// `None` when it is longer than [`MAX_SERIAL`].
    pub fn new(serial: &[u8]) -> Option<Serial> {
        let len = u8::try_from(serial.len()).ok()?;
        let mut bytes = [0; MAX_SERIAL];
        bytes.get_mut(..serial.len())?.copy_from_slice(serial);
        Some(Serial { len, bytes })
    }

    /// The octets.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::ops::Deref for Serial {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Serial({:02x?})", self.as_slice())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    used: bool,
    /// The source, in the verifying route's scope.
    key: Key,
    /// Milliseconds since the table's epoch of the last verified handshake.
    verified: u64,
    /// The certificate that verified it.
    serial: Serial,
}

/// The table; see the module's documentation.
pub struct Admissions {
    sets: Sets<Entry>,
}

impl Admissions {
    /// A table of `sets` sets of [`WAYS`] entries (at least one set).
    pub fn new(sets: usize) -> Admissions {
        Admissions {
            sets: Sets::new(sets),
        }
    }

    /// The source `ip` as admissions count it, for the verifying route `scope`.
    pub fn key(ip: IpAddr, scope: u32) -> Key {
        Key::source(ip, PREFIX_V4, PREFIX_V6, scope)
    }

    /// How many sources it can hold.
    pub fn capacity(&self) -> usize {
        self.sets.capacity()
    }

    /// Bytes the table holds, whatever the number of sources.
    pub fn footprint(&self) -> usize {
        self.sets.footprint()
    }

    fn ms(&self, now: Instant) -> u64 {
        self.sets.ms(now)
    }

    fn set(&self, key: &Key) -> MutexGuard<'_, [Entry; WAYS]> {
        self.sets.set(key)
    }

    /// `key` completed a handshake with the certificate `serial`: admitted
    /// from now, tied to that serial. False when the serial is too long to keep.
    pub fn verified(&self, key: Key, serial: &[u8], now: Instant) -> bool {
        let Some(serial) = Serial::new(serial) else {
            return false;
        };
        let now = self.ms(now);
        let mut set = self.set(&key);
        let i = match set.iter().position(|e| e.used && e.key == key) {
            Some(i) => i,
            None => set.iter().position(|e| !e.used).unwrap_or_else(|| {
                // Full: the one verified longest ago goes.
                (0..WAYS).min_by_key(|&i| set[i].verified).unwrap_or(0)
            }),
        };
        set[i] = Entry {
            used: true,
            key,
            verified: now,
            serial,
        };
        true
    }

    /// The serial that admits `key` now, if its last verified handshake is
    /// at most `window` old. Copied out by value: no allocation per connection.
    pub fn admitted(&self, key: Key, window: Duration, now: Instant) -> Option<Serial> {
        let now = self.ms(now);
        let set = self.set(&key);
        let e = set.iter().find(|e| e.used && e.key == key)?;
        (now.saturating_sub(e.verified) <= window.as_millis() as u64).then_some(e.serial)
    }

    /// Removes the entries of the verifying routes `scopes` whose serial
    /// `revoked` says is revoked; returns how many.
    pub fn revoke(&self, scopes: &[u32], revoked: impl Fn(&[u8]) -> bool) -> usize {
        let mut n = 0;
        for set in self.sets.iter() {
            let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
            for e in set.iter_mut() {
                if e.used && scopes.contains(&e.key.scope) && revoked(e.serial.as_slice()) {
                    *e = Entry::default();
                    n += 1;
                }
            }
        }
        n
    }

    /// Sources held now.
    pub fn len(&self) -> usize {
        self.sets
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.iter().filter(|e| e.used).count()
            })
            .sum()
    }

    /// Whether no source is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, scope: u32) -> Key {
        Admissions::key(ip.parse().unwrap(), scope)
    }

    const H: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_verified_source_is_admitted_within_the_window() {
        let t = Admissions::new(4);
        assert_eq!(t.admitted(key("127.0.0.2", 7), H, Instant::now()), None);
        assert!(t.verified(key("127.0.0.2", 7), &[1, 2, 3], Instant::now()));
        assert_eq!(
            t.admitted(key("::ffff:127.0.0.2", 7), H, Instant::now())
                .as_deref(),
            Some(&[1, 2, 3][..])
        );
        // Another address, or the same one verified on another route: no.
        assert_eq!(t.admitted(key("127.0.0.3", 7), H, Instant::now()), None);
        assert_eq!(t.admitted(key("127.0.0.2", 8), H, Instant::now()), None);
        // An IPv6 /64 is one source: a phone's privacy address may change.
        t.verified(key("2001:db8:1:2::1", 7), &[9], Instant::now());
        assert!(t
            .admitted(key("2001:db8:1:2:aaaa::5", 7), H, Instant::now())
            .is_some());
        assert!(t
            .admitted(key("2001:db8:1:3::1", 7), H, Instant::now())
            .is_none());
        // The window counts from the last verified handshake, which refreshes it.
        let w = Duration::from_secs(2);
        tokio::time::advance(Duration::from_millis(1500)).await;
        t.verified(key("127.0.0.2", 7), &[4], Instant::now());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(
            t.admitted(key("127.0.0.2", 7), w, Instant::now())
                .as_deref(),
            Some(&[4][..])
        );
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(t.admitted(key("127.0.0.2", 7), w, Instant::now()), None);
        // Too long a serial is not kept.
        assert!(!t.verified(key("127.0.0.9", 7), &[1; 25], Instant::now()));
        assert_eq!(t.admitted(key("127.0.0.9", 7), H, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_removes_the_serials_entries_only() {
        let t = Admissions::new(4);
        t.verified(key("127.0.0.2", 7), &[0x0a], Instant::now());
        t.verified(key("127.0.0.3", 7), &[0x0b], Instant::now());
        t.verified(key("127.0.0.4", 8), &[0x0a], Instant::now());
        assert_eq!(t.revoke(&[7], |s| s == [0x0a]), 1);
        assert_eq!(t.admitted(key("127.0.0.2", 7), H, Instant::now()), None);
        assert!(t.admitted(key("127.0.0.3", 7), H, Instant::now()).is_some());
        // Scope 8 has another CA: its entry with the same serial stays.
        assert!(t.admitted(key("127.0.0.4", 8), H, Instant::now()).is_some());
        assert_eq!(t.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_and_the_newest_survive() {
        let t = Admissions::new(16);
        let footprint = t.footprint();
        for i in 0..100_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.verified(Admissions::key(ip, 1), &i.to_be_bytes(), Instant::now());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(t.len(), t.capacity());
        assert_eq!(t.footprint(), footprint, "no growth");
        // The last one verified is there; the first went long ago.
        let last = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 99_999));
        assert!(t
            .admitted(Admissions::key(last, 1), H, Instant::now())
            .is_some());
        let first = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(t
            .admitted(Admissions::key(first, 1), H, Instant::now())
            .is_none());
    }
}
