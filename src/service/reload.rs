//! SIGHUP: re-read the configuration file and the certificates; whatever
//! does not load leaves the running configuration serving.
//!
//! A reload builds new route tables and certificates off to the side and then
//! swaps them in: open connections keep the route and certificate they were
//! made with, every connection after the swap gets the new ones.
//!
//! Frontends are matched by their listening address: a kept one gets its new
//! table, an added one is bound before anything is swapped (so a port in use
//! fails the whole reload), and a removed one stops accepting after the swap
//! while its open connections go on to their end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::app::{self, Served};
use crate::config::layer::{self, Layer};
use crate::config::{file, CertSource, ClientAuth, Config};
use crate::net::listener::{self, Listener};
use crate::net::server::ServerHandle;
use crate::proxy::revoke::Revocations;
use crate::proxy::routes::{FrontendHandle, RouteTable};
use crate::service::notify::{self, Notifier};
use crate::tls::{self, CertResolver, CertSet};

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// New certificates (the first one's SHA-256) and, with a file, new routes.
    Replaced {
        /// SHA-256 of the first certificate, when certificates were re-read.
        sha256: Option<String>,
        /// Whether the file was read again.
        config: bool,
    },
    /// Nothing to re-read; the reason, for the log.
    Nothing(&'static str),
}

/// Re-reads the configuration and certificates into what connections read.
pub struct Reloader {
    /// What the command line said, merged again with the file.
    pub cli: Layer,
    /// What is served now.
    pub served: Served,
    /// Where added frontends start accepting and removed ones stop.
    pub server: ServerHandle,
    /// Whether the sockets came from systemd: then tcpfwd binds nothing itself,
    /// and a frontend added by a reload has no socket.
    pub activated: bool,
    /// The ACME renewal task's idea of the current certificate, told of a re-read one.
    pub acme_current: Option<crate::acme::Current>,
    /// The re-read ACME certificate's details, from `certificates` to the swap.
    pub acme_info: Mutex<Option<crate::acme::CertInfo>>,
    /// Connections made with client certificates, closed when revoked.
    pub revocations: Arc<Revocations>,
    /// The CRL files of client-auth routes as last seen (`crl_stamps`).
    pub crl_seen: HashMap<PathBuf, Option<Stamp>>,
}

/// How often the CRL files of client-auth routes are looked at.
pub const CRL_POLL: Duration = Duration::from_secs(2);

/// What tells that a file changed: an atomic replace changes the inode,
/// an edit in place the size or the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// The client-certificate settings of the routes, once each.
fn client_auths(config: &Config) -> Vec<ClientAuth> {
    let mut out: Vec<ClientAuth> = Vec::new();
    for (_, r) in config.routes() {
        if let Some(a) = &r.client_auth {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
    }
    out
}

/// The CRL files of `config`'s client-auth routes as they are now.
pub fn crl_stamps(config: &Config) -> HashMap<PathBuf, Option<Stamp>> {
    client_auths(config)
        .iter()
        .filter_map(ClientAuth::crl_file)
        .map(|p| {
            let s = stamp(&p);
            (p, s)
        })
        .collect()
}

/// How often family-CA client certificates near their end are warned about
/// again (besides at start and at every reload).
const CLIENT_CERT_CHECK: Duration = Duration::from_secs(86_400);

/// How long a removed frontend's sockets may take to close on every worker.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Reloader {
    /// Loads everything again and swaps it in. On error nothing changes.
    pub async fn reload(&mut self) -> anyhow::Result<Outcome> {
        let new = match &self.served.config.file {
            Some(path) => {
                let layer = file::load(path).map_err(anyhow::Error::msg)?;
                layer::build(Some(layer), self.cli.clone()).map_err(anyhow::Error::msg)?
            }
            None => self.served.config.clone(),
        };
        self.apply(new).await
    }

    /// Makes `new` the configuration in force (certificates re-read, frontends
    /// added and removed). On error nothing changes.
    pub async fn apply(&mut self, new: Config) -> anyhow::Result<Outcome> {
        let from_file = new.file.is_some();
        self.check_unchanged(&new)?;
        if new.metrics != self.served.config.metrics {
            tracing::warn!(
                "the metrics address changed; the endpoint stays where it is until a restart"
            );
        }
        if new.control.as_ref().map(|c| &c.path)
            != self.served.config.control.as_ref().map(|c| &c.path)
        {
            tracing::warn!(
                "the control socket's path changed; it stays where it is until a restart"
            );
        }
        let certs = self.certificates(&new)?;
        if !from_file && certs.is_none() {
            return Ok(Outcome::Nothing(
                "the self-signed certificate made at start stays (give --cert/--key to reload from files)",
            ));
        }
        if matches!(new.cert, CertSource::Acme(_)) && certs.is_none() && !from_file {
            return Ok(Outcome::Nothing(
                "no ACME certificate stored yet; the placeholder serves until the CA issues one",
            ));
        }
        // A family CA the new routes need is made now (with its empty CRL),
        // as at start: client_auth = "family" may come with this reload.
        for dir in app::family_dirs(&new) {
            crate::clientca::ensure(&dir)?;
        }
        // Build everything, and bind the added frontends, before swapping
        // anything in.
        let resolver = &self.served.resolver;
        let tables = app::route_tables(
            &new,
            &self.served.provider,
            resolver,
            Some(&self.served.metrics),
        )?;
        let plan = self.plan(&new, tables)?;
        let sha256 = certs.as_ref().map(|set| {
            set.first()
                .end_entity_cert()
                .map(|c| tls::sha256_fingerprint(c))
                .unwrap_or_default()
        });
        // The added sockets accept first: the one step that can still fail
        // (a dup per worker) and be undone. Until the swap just below, their
        // handshakes get the certificates in force, which is harmless: these
        // ports refused every connection a moment ago.
        let mut started: Vec<(crate::config::Listen, String, Vec<std::net::SocketAddr>)> =
            Vec::new();
        for l in plan.added {
            let (listen, addr) = (l.frontend.listen, l.local_addr);
            let describe = l.frontend.table().describe.clone();
            if let Err(e) = self.server.add(l) {
                for (listen, _, _) in &started {
                    if let Some(c) = self.server.remove(*listen) {
                        let _ = tokio::time::timeout(CLOSE_WAIT, c.wait()).await;
                    }
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "starting to accept on {addr} for frontend {listen}"
                )));
            }
            started.push((listen, describe, vec![addr]));
        }

        if let Some(set) = certs {
            resolver.set_all(set);
            // The renewal task schedules on the re-read certificate from now on.
            let info = self
                .acme_info
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let (Some(current), Some(info)) = (&self.acme_current, info) {
                current.send_replace(Some(info));
            }
        }
        for (handle, table) in plan.kept {
            handle.store(table);
        }
        self.served.frontends = plan.frontends;
        self.served.gate.set_policy(new.sources);
        self.served.config = new;

        for (listen, describe, addrs) in &started {
            for addr in addrs {
                tracing::info!(%listen, %addr, map = %describe, "frontend added; listening");
            }
        }
        for handle in plan.removed {
            let listen = handle.listen;
            let Some(closing) = self.server.remove(listen) else {
                continue;
            };
            let addrs = closing.addrs.clone();
            if tokio::time::timeout(CLOSE_WAIT, closing.wait())
                .await
                .is_err()
            {
                tracing::warn!(%listen, "a worker has not closed the removed frontend's socket yet");
            }
            for addr in addrs {
                tracing::info!(
                    %listen, %addr, map = %handle.table().describe,
                    "frontend removed; no new connections, open ones go on to their end"
                );
            }
            if self.activated {
                tracing::warn!(
                    %listen,
                    "systemd still holds the socket for the removed frontend {listen}: remove its ListenStream= from the .socket unit and restart the socket, or connections there wait unanswered"
                );
            }
        }
        Ok(Outcome::Replaced {
            sha256,
            config: from_file,
        })
    }

    /// Looks at the CRL files of the client-auth routes; if one changed (or
    /// `force`, on SIGHUP), builds the route tables again, so that new
    /// handshakes get the new CRL, and closes the open connections whose
    /// certificate it lists. Returns whether anything was re-read.
    pub fn check_crls(&mut self, force: bool) -> anyhow::Result<bool> {
        let now = crl_stamps(&self.served.config);
        if now.is_empty() || (!force && now == self.crl_seen) {
            self.crl_seen = now;
            return Ok(false);
        }
        let tables = app::route_tables(
            &self.served.config,
            &self.served.provider,
            &self.served.resolver,
            Some(&self.served.metrics),
        )
        .context("the CRL changed but does not load; new handshakes still get the previous one")?;
        for (handle, table) in self.served.frontends.iter().zip(tables) {
            handle.store(table);
        }
        self.crl_seen = now;
        for auth in client_auths(&self.served.config) {
            let crls = tls::client_auth::crls(&auth)?;
            // The admissions its certificates made on `admit_after` routes
            // go first, so that no new connection is admitted by them...
            let scopes: Vec<u32> = self
                .served
                .config
                .routes()
                .filter(|(_, r)| r.client_auth.as_ref() == Some(&auth))
                .filter_map(|(_, r)| r.admission)
                .collect();
            let admissions_removed = if scopes.is_empty() {
                0
            } else {
                self.served.gate.revoke_admissions(&scopes, |serial| {
                    tls::client_auth::is_revoked(&crls, serial)
                })
            };
            // ...then the open connections, those admitted by them included.
            let closed = self.revocations.close_revoked(&auth, &crls);
            tracing::info!(
                client_auth = %auth,
                crl = %auth.crl_file().map(|p| p.display().to_string()).unwrap_or_default(),
                closed,
                admissions_removed,
                "CRL loaded; new handshakes get it, open connections with revoked certificates are closed"
            );
        }
        Ok(true)
    }

    /// Matches the new frontends with the running ones by listening address,
    /// and binds the added ones.
    fn plan(&self, new: &Config, tables: Vec<RouteTable>) -> anyhow::Result<Plan> {
        let old = &self.served.frontends;
        let mut plan = Plan {
            frontends: Vec::with_capacity(new.frontends.len()),
            kept: Vec::new(),
            added: Vec::new(),
            removed: old
                .iter()
                .filter(|h| !new.frontends.iter().any(|f| f.listen == h.listen))
                .cloned()
                .collect(),
        };
        for (f, table) in new.frontends.iter().zip(tables) {
            if let Some(h) = old.iter().find(|h| h.listen == f.listen) {
                plan.frontends.push(h.clone());
                plan.kept.push((h.clone(), table));
                continue;
            }
            if self.activated {
                bail!(
                    "frontend {} has no socket from systemd; add ListenStream={} to the .socket unit and restart the socket, or remove it from the file",
                    f.listen,
                    f.listen
                );
            }
            let handle = FrontendHandle::new(f.listen, table);
            let describe = handle.table().describe.clone();
            let socket = listener::bind(&f.listen, &describe).map_err(|e| {
                let also_removed = plan.removed.iter().any(|h| h.listen.port == f.listen.port);
                let e = anyhow::Error::new(e);
                if also_removed && f.listen.port != 0 {
                    e.context(format!(
                        "adding frontend {}: a frontend on the same port is being removed, and its socket is open until the reload is done; change the address in two reloads (remove, then add) or restart",
                        f.listen
                    ))
                } else {
                    e.context(format!("adding frontend {}", f.listen))
                }
            })?;
            plan.added.push(
                listener::from_std(handle.clone(), socket)
                    .with_context(|| format!("adding frontend {}", f.listen))?,
            );
            plan.frontends.push(handle);
        }
        Ok(plan)
    }

    /// What a reload cannot change while tcpfwd runs (for now).
    fn check_unchanged(&self, new: &Config) -> anyhow::Result<()> {
        let old = &self.served.config;
        let kind = |c: &CertSource| std::mem::discriminant(c);
        if kind(&old.cert) != kind(&new.cert) {
            bail!(
                "the certificate source changed (files, self-signed or ACME); that needs a restart"
            );
        }
        if let (CertSource::Acme(a), CertSource::Acme(b)) = (&old.cert, &new.cert) {
            if a != b {
                bail!("the ACME settings or names changed; that needs a restart");
            }
        }
        Ok(())
    }

    /// The certificates to serve after the reload; `None` keeps those in force.
    fn certificates(&self, new: &Config) -> anyhow::Result<Option<CertSet>> {
        let provider = &self.served.provider;
        match &new.cert {
            CertSource::Files(pairs) => {
                let set = tls::load_set(pairs, provider)?;
                tls::check_covered(new, &set)?;
                Ok(Some(set))
            }
            CertSource::SelfSigned { extra_names } => {
                let old = &self.served.config;
                let names = |c: &Config, extra: &[String]| app::self_signed_names(c, extra);
                let CertSource::SelfSigned {
                    extra_names: old_extra,
                } = &old.cert
                else {
                    return Ok(None);
                };
                if names(old, old_extra) == names(new, extra_names) {
                    return Ok(None);
                }
                let ss = tls::self_signed(&names(new, extra_names), provider)?;
                tracing::info!(
                    names = ?ss.names, sha256 = %ss.fingerprint,
                    "new self-signed certificate for the routes' names"
                );
                Ok(Some(CertSet::single(ss.key)))
            }
            CertSource::Acme(cfg) => {
                // Re-read what the ACME task stored (after a restore from a
                // backup, say). The state dir is already locked by this process.
                let stored = crate::acme::stored_pair(cfg, provider)
                    .context("re-reading the stored ACME certificate")?;
                let Some(stored) = stored else {
                    return Ok(None);
                };
                *self.acme_info.lock().unwrap_or_else(|e| e.into_inner()) = Some(stored.info);
                let ck = stored.key;
                Ok(Some(CertSet::single(ck)))
            }
        }
    }
}

/// What a reload does to the frontends, worked out (and bound) before the swap.
struct Plan {
    /// The frontends after the reload, in the new configuration's order.
    frontends: Vec<Arc<FrontendHandle>>,
    /// Running frontends and their new tables.
    kept: Vec<(Arc<FrontendHandle>, RouteTable)>,
    /// New frontends, bound, not yet accepting.
    added: Vec<Listener>,
    /// Running frontends the new configuration does not have.
    removed: Vec<Arc<FrontendHandle>>,
}

/// The SIGHUP handler, installed at start so that a failure shows before serving
/// (and so that SIGHUP never kills the process).
pub struct Hangups(Signal);

impl Hangups {
    /// Installs the SIGHUP handler.
    pub fn install() -> std::io::Result<Hangups> {
        Ok(Hangups(signal(SignalKind::hangup())?))
    }
}

/// The `STATUS=` line, built from what is served now; cheap to clone.
///
/// Anything that swaps the certificate outside a reload (ACME renewals) calls
/// [`Status::send`] afterwards so that `systemctl status` shows the new one.
#[derive(Clone)]
pub struct Status {
    inner: Arc<StatusInner>,
}

struct StatusInner {
    notifier: Arc<Notifier>,
    resolver: Arc<CertResolver>,
    self_signed: bool,
    maps: Mutex<Vec<String>>,
    /// Why the last reload failed, until one succeeds.
    reload_error: Mutex<Option<String>>,
    /// The ACME task's warning (a certificate near expiry, unrenewed).
    acme_warning: Mutex<Option<String>>,
    /// Family-CA client certificates near their end.
    client_certs: Mutex<Option<String>>,
}

impl Status {
    /// Status for `maps` (as shown) served with the resolver's certificate.
    pub fn new(
        notifier: Arc<Notifier>,
        resolver: Arc<CertResolver>,
        self_signed: bool,
        maps: Vec<String>,
    ) -> Status {
        Status {
            inner: Arc::new(StatusInner {
                notifier,
                resolver,
                self_signed,
                maps: Mutex::new(maps),
                reload_error: Mutex::new(None),
                acme_warning: Mutex::new(None),
                client_certs: Mutex::new(None),
            }),
        }
    }

    /// The current line.
    pub fn line(&self) -> String {
        let i = &self.inner;
        let maps = i.maps.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let line = notify::status_line(&maps, &i.resolver.current(), i.self_signed);
        let line = match &*i.acme_warning.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(w) => format!("{line} (WARNING: {w})"),
            None => line,
        };
        let line = match &*i.client_certs.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(w) => format!("{line} (WARNING: {w})"),
            None => line,
        };
        match &*i.reload_error.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => format!("{line} (last reload failed: {e})"),
            None => line,
        }
    }

    /// Sets or clears the ACME task's warning.
    pub fn set_acme_warning(&self, w: Option<String>) {
        *self
            .inner
            .acme_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = w;
    }

    /// Looks again for family-CA client certificates near their end (`log`:
    /// warn about each in the log too) and keeps the count for the line.
    pub fn check_client_certs(&self, config: &Config, log: bool) {
        let dirs = app::family_dirs(config);
        *self
            .inner
            .client_certs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = crate::clientca::expiry_warning(&dirs, log);
    }

    /// Sends the current line as `STATUS=`.
    pub fn send(&self) {
        self.inner.notifier.status(&self.line());
    }

    /// Sends `READY=1` with the current line.
    pub fn ready(&self) {
        self.inner.notifier.ready(&self.line());
    }

    fn set_maps(&self, maps: Vec<String>) {
        *self.inner.maps.lock().unwrap_or_else(|e| e.into_inner()) = maps;
    }

    fn set_reload_error(&self, e: Option<String>) {
        *self
            .inner
            .reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Sends the line again every `every`, so that "expires in N days" stays true.
    pub async fn refresh_every(self, every: std::time::Duration) {
        if !self.inner.notifier.enabled() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            self.send();
        }
    }
}

/// Everything the reload loop needs to answer SIGHUP.
pub struct Reloads {
    /// The SIGHUP stream.
    pub hangups: Hangups,
    /// What to re-read.
    pub reloader: Reloader,
    /// Where to report.
    pub notifier: Arc<Notifier>,
    /// The status line to send with READY=1.
    pub status: Status,
    /// What `tcpfwd status` shows: told of each reload.
    pub report: Arc<crate::service::control::State>,
}

impl Reloads {
    /// Answers every SIGHUP, forever: RELOADING=1, reload, READY=1 with the new status.
    pub async fn run(mut self) {
        // The CRL poll runs only while some client-auth route has a CRL: a
        // tcpfwd without client certificates never wakes up for it.
        let mut poll = CrlPoll::default();
        poll.update(&self.reloader.crl_seen);
        let start = tokio::time::Instant::now();
        let mut daily = tokio::time::interval_at(start + CLIENT_CERT_CHECK, CLIENT_CERT_CHECK);
        daily.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hangup = tokio::select! {
                h = self.hangups.0.recv() => h,
                _ = poll.tick() => {
                    match self.reloader.check_crls(false) {
                        // A revocation may have taken a certificate off the list.
                        Ok(true) => {
                            self.status.check_client_certs(&self.reloader.served.config, false);
                            self.status.send();
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!("{e:#}"),
                    }
                    continue;
                }
                _ = daily.tick() => {
                    self.status.check_client_certs(&self.reloader.served.config, true);
                    self.status.send();
                    continue;
                }
            };
            if hangup.is_none() {
                break;
            }
            self.notifier.reloading();
            tracing::info!(signal = "SIGHUP", "reload requested");
            let outcome = self.reloader.reload().await;
            // Recorded before the log says it: whoever reads the log and
            // then asks `tcpfwd status` sees this reload.
            self.report.reloaded(
                &self.reloader.served.frontends,
                outcome.as_ref().err().map(|e| format!("{e:#}")),
            );
            match outcome {
                Ok(Outcome::Replaced { sha256, config }) => {
                    if config {
                        let served = &self.reloader.served;
                        let routes: usize =
                            served.config.frontends.iter().map(|f| f.routes.len()).sum();
                        tracing::info!(
                            file = %served.config.file.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                            frontends = served.config.frontends.len(),
                            routes,
                            "configuration reloaded; new connections get it"
                        );
                        self.status
                            .set_maps(served.status_maps(&self.reloader.server));
                    }
                    if let Some(sha256) = sha256 {
                        tracing::info!(%sha256, "certificate reloaded; new handshakes get it");
                    }
                    self.status.set_reload_error(None);
                    self.reloader.served.metrics.reloads.inc();
                }
                Ok(Outcome::Nothing(why)) => tracing::info!("nothing to reload: {why}"),
                Err(e) => {
                    tracing::error!("reload failed, still serving the previous configuration and certificate: {e:#}");
                    self.status.set_reload_error(Some(format!("{e:#}")));
                    self.reloader.served.metrics.reload_failures.inc();
                }
            }
            if let Err(e) = self.reloader.check_crls(true) {
                tracing::error!("{e:#}");
            }
            // A reload may have added the first client-auth route or removed the last.
            poll.update(&self.reloader.crl_seen);
            self.status
                .check_client_certs(&self.reloader.served.config, true);
            self.status.ready();
        }
    }
}

/// The timer of the CRL poll, there only while there are CRL files to watch.
#[derive(Default)]
struct CrlPoll(Option<tokio::time::Interval>);

impl CrlPoll {
    /// Starts or stops the poll for the CRL files `seen` (those of the
    /// configuration in force), saying so in the log when that changes.
    fn update(&mut self, seen: &HashMap<PathBuf, Option<Stamp>>) {
        match (&self.0, seen.is_empty()) {
            (None, false) => {
                let start = tokio::time::Instant::now() + CRL_POLL;
                let mut poll = tokio::time::interval_at(start, CRL_POLL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                self.0 = Some(poll);
                let mut files: Vec<String> = seen.keys().map(|p| p.display().to_string()).collect();
                files.sort();
                tracing::info!(
                    crl = %files.join(","),
                    every_seconds = CRL_POLL.as_secs(),
                    "watching the CRL files of the client-auth routes for revocations"
                );
            }
            (Some(_), true) => {
                self.0 = None;
                tracing::info!(
                    "no client-auth route with a CRL any more; stopped watching CRL files"
                );
            }
            _ => {}
        }
    }

    /// The next tick; never, while there is nothing to watch.
    async fn tick(&mut self) {
        match &mut self.0 {
            Some(poll) => {
                poll.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}
