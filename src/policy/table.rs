//! The per-source bookkeeping: a fixed-size, set-associative table of
//! sources with eviction, locked one small set at a time.
//!
//! Memory is fixed at creation whatever the number of sources: a key hashes
//! (with a per-process random seed, so a scanner cannot aim at one set) to a
//! set of [`WAYS`] slots behind its own mutex. A new source in a full set
//! takes the slot that matters least: idle and unbanned first, then banned,
//! then the one with the fewest open connections, oldest first. Worker
//! threads only ever contend on the one set their source hashes to.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Slots per set.
pub const WAYS: usize = 8;

/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// A source (an address masked to its prefix) in one scope: 0 for the
/// process-wide counts, a route's own number for its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Key {
    /// The masked address, IPv4 in its IPv4-mapped IPv6 form.
    pub addr: u128,
    /// 0, or the route whose numbers these are.
    pub scope: u32,
}

impl Key {
    /// `ip` masked to `/v4` (IPv4, and IPv4-mapped IPv6) or `/v6`.
    pub fn source(ip: IpAddr, v4: u8, v6: u8, scope: u32) -> Key {
        let addr = match ip.to_canonical() {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask32(v4);
                u128::from(Ipv4Addr::from(bits).to_ipv6_mapped())
            }
            IpAddr::V6(a) => u128::from(a) & mask128(v6),
        };
        Key { addr, scope }
    }

    /// The source for messages: `203.0.113.7`, or `2001:db8:1:2::/64`.
    pub fn describe(&self, v4: u8, v6: u8) -> String {
        let a = Ipv6Addr::from(self.addr);
        match a.to_ipv4_mapped() {
            Some(v) if v4 >= 32 => v.to_string(),
            Some(v) => format!("{v}/{v4}"),
            None if v6 >= 128 => a.to_string(),
            None => format!("{a}/{v6}"),
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn mask128(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p.min(128))),
    }
}

/// Numbers for one source; a route may have its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// Connections open at once.
    pub connections: u32,
    /// New connections per minute: a bucket of this many, refilled evenly
    /// over a minute, so a burst up to it is fine and a flood is not.
    pub per_minute: u32,
}

/// When failed handshakes get a source refused, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanRules {
    /// Failed handshakes (within ten minutes) that start a cool-off.
    pub after: u32,
    /// The first cool-off; each further offence doubles it.
    pub first: Duration,
    /// The longest cool-off; after this long clean, offences are forgotten.
    pub longest: Duration,
}

/// Why the table refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// In a cool-off after failed handshakes.
    Banned,
    /// As many connections open as the source may have.
    Connections,
    /// More new connections than the source may make per minute.
    Rate,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    used: bool,
    key: Key,
    open: u32,
    tokens: f32,
    /// Milliseconds since the table's epoch, for each of these.
    refilled: u64,
    seen: u64,
    failed: u64,
    banned_until: u64,
    failures: u32,
    offences: u32,
    /// Connections refused since the last summary.
    refused: u32,
}

impl Slot {
    /// How much the slot matters when its set is full (least evicted first).
    fn weight(&self, now: u64) -> (u8, u32, u64) {
        let class = if self.open > 0 {
            2
        } else if self.banned_until > now {
            1
        } else {
            0
        };
        (class, self.open, self.seen)
    }
}

/// The table; see the module's documentation.
pub struct SourceTable {
    sets: Sets<Slot>,
}

/// A fixed number of sets of [`WAYS`] entries, each set behind its own
/// lock, a key's set chosen by a hash with a random seed: the shape of this
/// table and of the admissions table ([`super::admit::Admissions`]).
pub struct Sets<T> {
    sets: Box<[Mutex<[T; WAYS]>]>,
    seed: RandomState,
    epoch: Instant,
}

impl<T: Default + Copy> Sets<T> {
    /// `sets` sets (at least one) of default entries.
    pub fn new(sets: usize) -> Sets<T> {
        Sets {
            sets: (0..sets.max(1))
                .map(|_| Mutex::new([T::default(); WAYS]))
                .collect(),
            seed: RandomState::new(),
            epoch: Instant::now(),
        }
    }
}

impl<T> Sets<T> {
    /// How many entries it can hold.
    pub fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// Bytes it holds, whatever the number of keys.
    pub fn footprint(&self) -> usize {
        std::mem::size_of_val(&*self.sets)
    }

    /// `now` in milliseconds since the table was made.
    pub fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The set `key` belongs to, locked.
    pub fn set(&self, key: &Key) -> MutexGuard<'_, [T; WAYS]> {
        let i = (self.seed.hash_one(key) % self.sets.len() as u64) as usize;
        // A panic while a set is held leaves plain values, still usable.
        self.sets[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every set, for the walks that look at all of them.
    pub fn iter(&self) -> std::slice::Iter<'_, Mutex<[T; WAYS]>> {
        self.sets.iter()
    }
}

impl SourceTable {
    /// A table of `sets` sets of [`WAYS`] slots (at least one set).
    pub fn new(sets: usize) -> SourceTable {
        SourceTable {
            sets: Sets::new(sets),
        }
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

    fn set(&self, key: &Key) -> MutexGuard<'_, [Slot; WAYS]> {
        self.sets.set(key)
    }

    /// Counts a connection from `key` in, or says why not.
    pub fn admit(&self, key: Key, limits: SourceLimits, now: Instant) -> Result<(), Over> {
        let now = self.ms(now);
        let mut set = self.set(&key);
        let slot = find_or_take(&mut set, key, now);
        slot.seen = now;
        let over = if slot.banned_until > now {
            Some(Over::Banned)
        } else if slot.open >= limits.connections {
            Some(Over::Connections)
        } else {
            let cap = limits.per_minute as f32;
            let elapsed = now.saturating_sub(slot.refilled) as f32;
            slot.tokens = (slot.tokens + elapsed * cap / 60_000.0).min(cap);
            slot.refilled = now;
            (slot.tokens < 1.0).then_some(Over::Rate)
        };
        match over {
            Some(why) => {
                slot.refused = slot.refused.saturating_add(1);
                Err(why)
            }
            None => {
                slot.tokens -= 1.0;
                slot.open += 1;
                Ok(())
            }
        }
    }

    /// A connection `admit` counted in has ended.
    pub fn release(&self, key: Key) {
        let mut set = self.set(&key);
        if let Some(s) = set.iter_mut().find(|s| s.used && s.key == key) {
            s.open = s.open.saturating_sub(1);
        }
    }

    /// Whether `key` is in a cool-off (a source the table does not hold is not).
    pub fn in_cool_off(&self, key: Key, now: Instant) -> bool {
        let now = self.ms(now);
        let set = self.set(&key);
        set.iter()
            .any(|s| s.used && s.key == key && s.banned_until > now)
    }

    /// Counts a connection from `key` refused for another reason (the lists).
    pub fn note_refused(&self, key: Key, now: Instant) {
        let now = self.ms(now);
        let mut set = self.set(&key);
        let slot = find_or_take(&mut set, key, now);
        slot.seen = now;
        slot.refused = slot.refused.saturating_add(1);
    }

    /// Counts a failed handshake; the length of the cool-off it started, if any.
    pub fn failed(&self, key: Key, rules: BanRules, now: Instant) -> Option<Duration> {
        let now = self.ms(now);
        let mut set = self.set(&key);
        let slot = find_or_take(&mut set, key, now);
        slot.seen = now;
        let longest = rules.longest.as_millis() as u64;
        if now.saturating_sub(slot.failed) > FAILURE_MEMORY.as_millis() as u64 {
            slot.failures = 0;
        }
        if slot.offences > 0 && now > slot.banned_until.saturating_add(longest) {
            slot.offences = 0;
        }
        slot.failures += 1;
        slot.failed = now;
        if slot.failures < rules.after.max(1) {
            return None;
        }
        slot.failures = 0;
        slot.offences = slot.offences.saturating_add(1);
        let doubled = rules
            .first
            .saturating_mul(1u32 << (slot.offences - 1).min(20));
        let length = doubled.min(rules.longest).max(Duration::from_millis(1));
        slot.banned_until = now + length.as_millis() as u64;
        Some(length)
    }

    /// The `n` sources refused most since the last call, most first; their
    /// counts start again from zero.
    pub fn take_top_refused(&self, n: usize) -> Vec<(Key, u32)> {
        let mut top: Vec<(Key, u32)> = Vec::with_capacity(n + 1);
        for set in self.sets.iter() {
            let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
            for s in set.iter_mut().filter(|s| s.used && s.refused > 0) {
                if top.len() < n || top.last().is_some_and(|(_, c)| *c < s.refused) {
                    let at = top.partition_point(|(_, c)| *c >= s.refused);
                    top.insert(at, (s.key, s.refused));
                    top.truncate(n);
                }
                s.refused = 0;
            }
        }
        top
    }

    /// Sources in a cool-off at `now`: the `n` with the most time left (most
    /// first), and how many there are in all. Each set is locked only while
    /// its slots are read, as for the summary.
    pub fn banned(&self, n: usize, now: Instant) -> (Vec<(Key, Duration)>, usize) {
        let now = self.ms(now);
        let mut top: Vec<(Key, u64)> = Vec::with_capacity(n + 1);
        let mut total = 0;
        for set in self.sets.iter() {
            let set = set.lock().unwrap_or_else(|e| e.into_inner());
            for s in set.iter().filter(|s| s.used && s.banned_until > now) {
                total += 1;
                let left = s.banned_until - now;
                if top.len() < n || top.last().is_some_and(|(_, l)| *l < left) {
                    let at = top.partition_point(|(_, l)| *l >= left);
                    top.insert(at, (s.key, left));
                    top.truncate(n);
                }
            }
        }
        let top = top
            .into_iter()
            .map(|(k, ms)| (k, Duration::from_millis(ms)))
            .collect();
        (top, total)
    }

    /// Sources held now.
    pub fn len(&self) -> usize {
        self.sets
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.iter().filter(|s| s.used).count()
            })
            .sum()
    }

    /// Whether no source is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The slot for `key`, taking the least needed one of the set when it has none.
fn find_or_take(set: &mut [Slot; WAYS], key: Key, now: u64) -> &mut Slot {
    let i = match set.iter().position(|s| s.used && s.key == key) {
        Some(i) => i,
        None => {
            let i = set
                .iter()
                .position(|s| !s.used)
                .unwrap_or_else(|| (0..WAYS).min_by_key(|&i| set[i].weight(now)).unwrap_or(0));
            set[i] = Slot {
                used: true,
                key,
                // A full bucket: the first refill caps it at the limit.
                tokens: f32::INFINITY,
                refilled: now,
                seen: now,
                ..Slot::default()
            };
            i
        }
    };
    &mut set[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SourceLimits = SourceLimits {
        connections: 3,
        per_minute: 5,
    };

    fn key(ip: &str) -> Key {
        Key::source(ip.parse().unwrap(), 32, 64, 0)
    }

    #[test]
    fn keys_mask_to_the_prefix_and_map_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(key("127.0.0.2"), key("::ffff:127.0.0.2"));
        assert_ne!(key("127.0.0.2"), key("127.0.0.1"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(
            Key::source(ip("10.1.2.3"), 24, 64, 0),
            Key::source(ip("10.1.2.99"), 24, 64, 0)
        );
        assert_eq!(key("127.0.0.2").describe(32, 64), "127.0.0.2");
        assert_eq!(key("2001:db8:1:2::1").describe(32, 64), "2001:db8:1:2::/64");
        assert_eq!(
            Key::source(ip("10.1.2.3"), 24, 64, 0).describe(24, 64),
            "10.1.2.0/24"
        );
        assert_eq!(Key::source(ip("::1"), 32, 128, 0).describe(32, 128), "::1");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_and_rate_limits_per_source() {
        let t = SourceTable::new(4);
        let (a, b) = (key("127.0.0.2"), key("127.0.0.1"));
        for _ in 0..3 {
            t.admit(a, LIMITS, Instant::now()).unwrap();
        }
        assert_eq!(t.admit(a, LIMITS, Instant::now()), Err(Over::Connections));
        // Another source is not affected.
        t.admit(b, LIMITS, Instant::now()).unwrap();
        t.release(a);
        t.release(a);
        t.admit(a, LIMITS, Instant::now()).unwrap();
        t.admit(a, LIMITS, Instant::now()).unwrap();
        // Five in the bucket, all used: the sixth within the minute is refused.
        t.release(a);
        t.release(a);
        assert_eq!(t.admit(a, LIMITS, Instant::now()), Err(Over::Rate));
        // The bucket refills at five a minute: one after 12 s.
        tokio::time::advance(Duration::from_secs(13)).await;
        t.admit(a, LIMITS, Instant::now()).unwrap();
        assert_eq!(t.admit(a, LIMITS, Instant::now()), Err(Over::Rate));
        let top = t.take_top_refused(5);
        assert_eq!(top, vec![(a, 3)]);
        assert!(t.take_top_refused(5).is_empty(), "counts start again");
    }

    #[tokio::test(start_paused = true)]
    async fn bans_grow_with_offences_and_end() {
        let t = SourceTable::new(4);
        let a = key("127.0.0.2");
        let rules = BanRules {
            after: 3,
            first: Duration::from_secs(10),
            longest: Duration::from_secs(25),
        };
        let limits = SourceLimits {
            connections: 100,
            per_minute: 1000,
        };
        let mut lengths = Vec::new();
        for _ in 0..4 {
            assert_eq!(t.failed(a, rules, Instant::now()), None);
            assert_eq!(t.failed(a, rules, Instant::now()), None);
            let ban = t.failed(a, rules, Instant::now()).unwrap();
            lengths.push(ban.as_secs());
            assert_eq!(t.admit(a, limits, Instant::now()), Err(Over::Banned));
            tokio::time::advance(ban - Duration::from_millis(1)).await;
            assert_eq!(t.admit(a, limits, Instant::now()), Err(Over::Banned));
            tokio::time::advance(Duration::from_millis(2)).await;
            t.admit(a, limits, Instant::now()).unwrap();
            t.release(a);
        }
        assert_eq!(lengths, [10, 20, 25, 25], "doubling up to the longest");
        // Banned now, then the list of the banned with their time left.
        let b = key("127.0.0.3");
        for _ in 0..3 {
            t.failed(a, rules, Instant::now());
            t.failed(b, rules, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let (top, total) = t.banned(5, Instant::now());
        assert_eq!(total, 2);
        assert_eq!(top[0], (a, Duration::from_secs(24)), "{top:?}");
        assert_eq!(top[1], (b, Duration::from_secs(9)), "{top:?}");
        assert_eq!(t.banned(1, Instant::now()).0.len(), 1);
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(t.banned(5, Instant::now()), (vec![], 0));
        // Clean for longer than the longest cool-off: back to the first length.
        tokio::time::advance(Duration::from_secs(26)).await;
        for _ in 0..2 {
            t.failed(a, rules, Instant::now());
        }
        assert_eq!(
            t.failed(a, rules, Instant::now()),
            Some(Duration::from_secs(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_over_100000_sources() {
        let t = SourceTable::new(64);
        let footprint = t.footprint();
        let limits = SourceLimits {
            connections: 2,
            per_minute: 10,
        };
        // The family's source keeps a connection open throughout.
        let family = key("192.168.1.20");
        t.admit(family, limits, Instant::now()).unwrap();
        for i in 0..100_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let k = Key::source(ip, 32, 64, 0);
            t.admit(k, limits, Instant::now()).unwrap();
            t.release(k);
            if i % 3 == 0 {
                t.note_refused(k, Instant::now());
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(t.len() <= t.capacity(), "{} > {}", t.len(), t.capacity());
        assert_eq!(t.len(), t.capacity(), "every slot in use");
        assert_eq!(t.footprint(), footprint, "no growth");
        // The source with a connection open survived the churn: its count holds.
        t.admit(family, limits, Instant::now()).unwrap();
        assert_eq!(
            t.admit(family, limits, Instant::now()),
            Err(Over::Connections)
        );
        assert!(t.take_top_refused(5).len() == 5);
    }
}
