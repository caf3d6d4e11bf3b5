//! Who reaches a backend at all: allow/deny lists by source address, limits
//! and bans per source, and the summary of what was refused.
//!
//! A connection passes the [`Gate`] twice: right after accept (its
//! frontend's lists, a ban, the process-wide per-source numbers) and after
//! the ClientHello (its route's lists and, when the route has its own, the
//! route's numbers and bans). A refused connection is closed without a TLS alert and
//! without a log line of its own: [`Gate::run_summaries`] logs one line per
//! interval with the counts, the reasons and the top sources.
//!
//! A route with `admit_after` also asks the gate whether the source passed
//! the client certificates of the route it names ([`admit::Admissions`]);
//! a source that did not is refused the same way, as `not_admitted`.

pub mod admit;
pub mod cidr;
pub mod table;
pub mod trim;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

pub use admit::{Admissions, Serial};
pub use cidr::{AccessList, Cidr};
pub use table::{BanRules, Key, Over, SourceLimits, SourceTable};

/// Sets in the per-source table: 512 sets of 8 slots hold 4,096 sources in
/// about 400 KiB (96 bytes a slot), whatever the number seen.
const TABLE_SETS: usize = 512;

/// Sets in the admission table: 128 sets of 8 hold 1,024 admitted sources
/// in 64 KiB, far more than a family's phones and laptops on their networks.
const ADMISSION_SETS: usize = 128;

/// How many sources a summary names.
const TOP_SOURCES: usize = 5;

/// The process-wide numbers for sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Per-source numbers for every connection, counted at accept.
    pub limits: SourceLimits,
    /// Failed handshakes and the cool-offs they lead to.
    pub bans: BanRules,
    /// IPv4 sources are counted per address block of this prefix (32: per address).
    pub prefix_v4: u8,
    /// IPv6 sources per block of this prefix (64: one home's or phone's network).
    pub prefix_v6: u8,
    /// How often the summary of refused connections may be logged.
    pub summary_every: Duration,
}

impl SourcePolicy {
    /// The documented defaults for a server of `max_connections`.
    pub fn defaults(max_connections: usize) -> SourcePolicy {
        SourcePolicy {
            limits: SourceLimits {
                connections: default_per_source(max_connections),
                per_minute: 600,
            },
            bans: BanRules {
                after: 20,
                first: Duration::from_secs(60),
                longest: Duration::from_secs(3600),
            },
            prefix_v4: 32,
            prefix_v6: 64,
            summary_every: Duration::from_secs(60),
        }
    }
}

/// Connections one source may hold by default: a quarter of
/// `max_connections` (at least one), at most 64. So one source never holds
/// every slot (unless `max_connections` is 1), and a household's browsers,
/// each with a few connections, stay far below it.
pub fn default_per_source(max_connections: usize) -> u32 {
    (max_connections / 4).clamp(1, 64) as u32
}

/// Why a connection was refused, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The frontend's allow/deny lists.
    Denied,
    /// The route's allow/deny lists.
    RouteDenied,
    /// A cool-off after failed handshakes.
    Banned,
    /// Too many connections open from the source.
    Connections,
    /// Too many new connections per minute from the source.
    Rate,
    /// An `admit_after` route: the source has not passed the client
    /// certificates of the route named, within its window.
    NotAdmitted,
}

impl Refusal {
    /// Every reason, in the order of the summary's counts.
    pub const ALL: [Refusal; 6] = [
        Refusal::Denied,
        Refusal::RouteDenied,
        Refusal::Banned,
        Refusal::Connections,
        Refusal::Rate,
        Refusal::NotAdmitted,
    ];

    /// The reason as the summary (and metrics) name it.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::RouteDenied => "route_denied",
            Refusal::Banned => "banned",
            Refusal::Connections => "per_source_connections",
            Refusal::Rate => "per_source_rate",
            Refusal::NotAdmitted => "not_admitted",
        }
    }
}

impl From<Over> for Refusal {
    fn from(o: Over) -> Refusal {
        match o {
            Over::Banned => Refusal::Banned,
            Over::Connections => Refusal::Connections,
            Over::Rate => Refusal::Rate,
        }
    }
}

/// The lists, limits and bans every connection passes; one per process.
pub struct Gate {
    table: SourceTable,
    admissions: Admissions,
    policy: ArcSwap<SourcePolicy>,
    counts: [AtomicU64; Refusal::ALL.len()],
    bans: AtomicU64,
}

/// A connection counted in for its source; counted out on drop.
pub struct Pass {
    gate: Arc<Gate>,
    key: Key,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.table.release(self.key);
    }
}

impl Gate {
    /// A gate with `policy` and an empty table.
    pub fn new(policy: SourcePolicy) -> Arc<Gate> {
        Gate::with_table(policy, SourceTable::new(TABLE_SETS))
    }

    fn with_table(policy: SourcePolicy, table: SourceTable) -> Arc<Gate> {
        Arc::new(Gate {
            table,
            admissions: Admissions::new(ADMISSION_SETS),
            policy: ArcSwap::from_pointee(policy),
            counts: Default::default(),
            bans: AtomicU64::new(0),
        })
    }

    /// Makes `policy` the one in force (a reload).
    pub fn set_policy(&self, policy: SourcePolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// The policy in force.
    pub fn policy(&self) -> SourcePolicy {
        **self.policy.load()
    }

    fn key(&self, ip: IpAddr, scope: u32) -> Key {
        let p = self.policy.load();
        Key::source(ip, p.prefix_v4, p.prefix_v6, scope)
    }

    fn refuse(&self, why: Refusal) -> Refusal {
        self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
        why
    }

    /// Right after accept: the frontend's lists, then the source's ban and
    /// process-wide numbers.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, access: &AccessList) -> Result<Pass, Refusal> {
        let key = self.key(ip, 0);
        if !access.admits(ip) {
            self.table.note_refused(key, Instant::now());
            return Err(self.refuse(Refusal::Denied));
        }
        let limits = self.policy.load().limits;
        match self.table.admit(key, limits, Instant::now()) {
            Ok(()) => Ok(Pass {
                gate: self.clone(),
                key,
            }),
            Err(over) => Err(self.refuse(over.into())),
        }
    }

    /// After the ClientHello: the route's lists, then its own numbers and
    /// its own ban when it has them (`scope` tells its counts from other
    /// routes').
    pub fn admit_route(
        self: &Arc<Self>,
        ip: IpAddr,
        access: &AccessList,
        limits: Option<SourceLimits>,
        own_bans: bool,
        scope: u32,
    ) -> Result<Option<Pass>, Refusal> {
        if !access.admits(ip) {
            self.table.note_refused(self.key(ip, 0), Instant::now());
            return Err(self.refuse(Refusal::RouteDenied));
        }
        let key = self.key(ip, scope);
        let Some(limits) = limits else {
            if own_bans && self.table.in_cool_off(key, Instant::now()) {
                self.table.note_refused(self.key(ip, 0), Instant::now());
                return Err(self.refuse(Refusal::Banned));
            }
            return Ok(None);
        };
        match self.table.admit(key, limits, Instant::now()) {
            Ok(()) => Ok(Some(Pass {
                gate: self.clone(),
                key,
            })),
            Err(over) => {
                self.table.note_refused(self.key(ip, 0), Instant::now());
                Err(self.refuse(over.into()))
            }
        }
    }

    /// `ip` completed a verified client-certificate handshake with the
    /// certificate `serial` on the route whose admissions are `scope`.
    pub fn verified(&self, ip: IpAddr, scope: u32, serial: &[u8]) {
        let key = Admissions::key(ip, scope);
        if !self.admissions.verified(key, serial, Instant::now()) {
            tracing::debug!(%ip, "client certificate serial too long to admit by; not admitted");
        }
    }

    /// On an `admit_after` route: the serial of the certificate that
    /// admits `ip` (verified on route `scope` within `window`), or refused.
    pub fn admitted(&self, ip: IpAddr, scope: u32, window: Duration) -> Result<Serial, Refusal> {
        match self
            .admissions
            .admitted(Admissions::key(ip, scope), window, Instant::now())
        {
            Some(serial) => Ok(serial),
            None => {
                self.table.note_refused(self.key(ip, 0), Instant::now());
                Err(self.refuse(Refusal::NotAdmitted))
            }
        }
    }

    /// Forgets the admissions made on routes `scopes` by certificates that
    /// `revoked` says are revoked; returns how many.
    pub fn revoke_admissions(&self, scopes: &[u32], revoked: impl Fn(&[u8]) -> bool) -> usize {
        self.admissions.revoke(scopes, revoked)
    }

    /// A handshake from `ip` failed (or asked for no known name). It counts
    /// toward the process-wide ban and, on a route with its own ban numbers
    /// (`route`: them and the route's scope), toward the source's ban on
    /// that route alone.
    pub fn handshake_failed(&self, ip: IpAddr, route: Option<(BanRules, u32)>) {
        let now = Instant::now();
        let rules = self.policy.load().bans;
        if self.table.failed(self.key(ip, 0), rules, now).is_some() {
            self.bans.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((rules, scope)) = route {
            if self.table.failed(self.key(ip, scope), rules, now).is_some() {
                self.bans.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sources in a cool-off now, for `tcpfwd status`: the `n` with the most
    /// time left (as in messages: `203.0.113.7`, `2001:db8:1:2::/64`) and
    /// how many there are in all.
    pub fn banned(&self, n: usize) -> (Vec<(String, Duration)>, usize) {
        let p = self.policy();
        let (top, total) = self.table.banned(n, Instant::now());
        let top = top
            .into_iter()
            .map(|(k, left)| (k.describe(p.prefix_v4, p.prefix_v6), left))
            .collect();
        (top, total)
    }

    /// Logs a summary of the refusals every `summary_every`, when there were any.
    pub async fn run_summaries(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.policy.load().summary_every).await;
            let since = last.elapsed();
            last = Instant::now();
            self.summary(since);
        }
    }

    /// The counts since the last summary, zeroed; `None` when nothing happened.
    fn take_counts(&self) -> Option<([u64; Refusal::ALL.len()], u64)> {
        let counts = self.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
        let bans = self.bans.swap(0, Ordering::Relaxed);
        (counts.iter().sum::<u64>() > 0 || bans > 0).then_some((counts, bans))
    }

    fn summary(&self, since: Duration) {
        let Some((counts, new_bans)) = self.take_counts() else {
            return;
        };
        let p = self.policy();
        let top: Vec<String> = self
            .table
            .take_top_refused(TOP_SOURCES)
            .iter()
            .map(|(k, n)| format!("{} ({n})", k.describe(p.prefix_v4, p.prefix_v6)))
            .collect();
        let why: Vec<String> = Refusal::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        let c = |r: Refusal| counts[r as usize];
        tracing::warn!(
            refused = counts.iter().sum::<u64>(),
            denied = c(Refusal::Denied),
            route_denied = c(Refusal::RouteDenied),
            banned = c(Refusal::Banned),
            per_source_connections = c(Refusal::Connections),
            per_source_rate = c(Refusal::Rate),
            not_admitted = c(Refusal::NotAdmitted),
            new_bans,
            reasons = %why.join(" "),
            top_sources = %top.join(", "),
            seconds = since.as_secs(),
            "refused connections"
        );
    }
}

/// A route's number for its per-source counts, the same across reloads
/// (FNV-1a of its `--map` text; never 0, which is the process-wide scope).
pub fn route_scope(map_text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in map_text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_never_give_one_source_every_slot() {
        assert_eq!(default_per_source(1), 1);
        assert_eq!(default_per_source(2), 1);
        assert_eq!(default_per_source(8), 2);
        assert_eq!(default_per_source(1024), 64);
        assert_eq!(default_per_source(1_000_000), 64);
        for max in 2..300 {
            assert!((default_per_source(max) as usize) < max, "{max}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gate_counts_refusals_and_passes_release() {
        let mut policy = SourcePolicy::defaults(8);
        policy.bans.after = 2;
        let gate = Gate::with_table(policy, SourceTable::new(8));
        let open = AccessList::default();
        let deny: AccessList = AccessList {
            allow: vec![],
            deny: vec!["127.0.0.3".parse().unwrap()],
        };
        let a = gate.admit(ip("127.0.0.2"), &open).unwrap();
        let b = gate.admit(ip("::ffff:127.0.0.2"), &open).unwrap();
        assert_eq!(
            gate.admit(ip("127.0.0.2"), &open).err(),
            Some(Refusal::Connections)
        );
        drop(a);
        let c = gate.admit(ip("127.0.0.2"), &open).unwrap();
        assert_eq!(
            gate.admit(ip("127.0.0.3"), &deny).err(),
            Some(Refusal::Denied)
        );
        assert_eq!(
            gate.admit_route(ip("127.0.0.3"), &deny, None, false, 7)
                .err(),
            Some(Refusal::RouteDenied)
        );
        let tight = SourceLimits {
            connections: 1,
            per_minute: 100,
        };
        let r = gate
            .admit_route(ip("127.0.0.1"), &open, Some(tight), false, 7)
            .unwrap();
        assert!(r.is_some());
        assert_eq!(
            gate.admit_route(ip("127.0.0.1"), &open, Some(tight), false, 7)
                .err(),
            Some(Refusal::Connections)
        );
        // Another route's counts are its own.
        assert!(gate
            .admit_route(ip("127.0.0.1"), &open, Some(tight), false, 8)
            .unwrap()
            .is_some());
        gate.handshake_failed(ip("::1"), None);
        gate.handshake_failed(ip("::1"), None);
        assert_eq!(gate.admit(ip("::1"), &open).err(), Some(Refusal::Banned));
        assert_eq!(
            gate.admitted(ip("127.0.0.2"), 7, Duration::from_secs(60))
                .err(),
            Some(Refusal::NotAdmitted)
        );
        gate.verified(ip("127.0.0.2"), 7, &[5]);
        assert_eq!(
            gate.admitted(ip("127.0.0.2"), 7, Duration::from_secs(60)),
            Ok(admit::Serial::new(&[5]).unwrap())
        );
        assert_eq!(gate.revoke_admissions(&[7], |s| s == [5]), 1);
        let (counts, bans) = gate.take_counts().unwrap();
        assert_eq!(counts, [1, 1, 1, 2, 0, 1]);
        assert_eq!(bans, 1);
        assert!(gate.take_counts().is_none());
        drop((b, c));
    }

    #[test]
    fn the_admission_check_allocates_nothing() {
        let gate = Gate::new(SourcePolicy::defaults(8));
        let serial = [0x4a; 16];
        gate.verified(ip("127.0.0.2"), 7, &serial);
        let window = Duration::from_secs(60);
        // Once per thread, not per connection: arc-swap's first load on a
        // thread may allocate that thread's bookkeeping.
        let _ = gate.admitted(ip("127.0.0.4"), 7, window);
        let (got, n) = crate::test_alloc::allocations(|| gate.admitted(ip("127.0.0.2"), 7, window));
        assert_eq!(got.as_deref(), Ok(&serial[..]));
        assert_eq!(n, 0, "the admission check of an admitted source allocated");
        // A refused source neither.
        let (got, n) = crate::test_alloc::allocations(|| gate.admitted(ip("127.0.0.3"), 7, window));
        assert_eq!(got, Err(Refusal::NotAdmitted));
        assert_eq!(n, 0, "the admission check of a refused source allocated");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_with_its_own_bans_refuses_the_source_there_alone() {
        let mut policy = SourcePolicy::defaults(64);
        policy.bans.after = 10;
        let gate = Gate::with_table(policy, SourceTable::new(8));
        let open = AccessList::default();
        let strict = BanRules {
            after: 2,
            first: Duration::from_secs(30),
            longest: Duration::from_secs(60),
        };
        let src = ip("127.0.0.2");
        gate.handshake_failed(src, Some((strict, 7)));
        assert!(gate.admit_route(src, &open, None, true, 7).is_ok());
        gate.handshake_failed(src, Some((strict, 7)));
        // Banned on route 7, with or without its own numbers; not on route
        // 8, nor at accept (2 of the 10 process-wide failures).
        assert_eq!(
            gate.admit_route(src, &open, None, true, 7).err(),
            Some(Refusal::Banned)
        );
        let tight = SourceLimits {
            connections: 5,
            per_minute: 100,
        };
        assert_eq!(
            gate.admit_route(src, &open, Some(tight), true, 7).err(),
            Some(Refusal::Banned)
        );
        assert!(gate.admit_route(src, &open, None, true, 8).is_ok());
        let pass = gate.admit(src, &open).unwrap();
        assert!(gate
            .admit_route(ip("127.0.0.3"), &open, None, true, 7)
            .is_ok());
        // The cool-off ends.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(gate.admit_route(src, &open, None, true, 7).is_ok());
        let (counts, bans) = gate.take_counts().unwrap();
        assert_eq!(counts[Refusal::Banned as usize], 2);
        assert_eq!(bans, 1);
        drop(pass);
    }

    #[test]
    fn route_scopes_are_stable_and_not_zero() {
        assert_eq!(route_scope("443:a=b:1"), route_scope("443:a=b:1"));
        assert_ne!(route_scope("443:a=b:1"), route_scope("443:c=b:1"));
        assert_ne!(route_scope(""), 0);
    }
}
