//! ACME: get a certificate over TLS-ALPN-01 on tcpfwd's own port, keep it in the state directory, renew it.
//!
//! The task only writes into the resolver (the certificate in force), the
//! router (challenge certificates while a name is being validated) and the
//! state directory; connections never wait on it.
//!
//! Here: the task, its supervisor and its loop (when to look, when to order,
//! holds, the expiry watch, ARI). Beside it: `schedule` (renewal times,
//! backoff, how times read), `stored` (the pair in the state directory and
//! what a certificate says), `account` (the directory and the account),
//! `order` (one order, start to finish), `client` (HTTP to the CA), `state`
//! (the locked state directory), `hold` and `ip`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use instant_acme::Account;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

use crate::acme::state::StateDir;
use crate::config::AcmeConfig;
use crate::tls::{self, CertResolver, TlsRouter};

pub mod state;

mod client;
mod hold;
mod ip;

use self::hold::{Hold, HOLD_FILE};

use self::client::{Failure, Http};

/// Files in the CA's state sub-directory.
const ACCOUNT_FILE: &str = "account.json";
/// The certificate chain and its key in one file, so that they change
/// together: a crash at any instant leaves the old pair or the new one.
const PAIR_FILE: &str = "pair.pem";
/// What the CA issued, stored before it is read; renamed to [`PAIR_FILE`]
/// once it proves usable, so an issued certificate is never lost.
const ISSUED_FILE: &str = "issued.pem";
/// The layout before [`PAIR_FILE`], still read (for upgrades), never written.
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// Longest a single HTTP request to the CA may take, from connect to the
/// body's last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Tests only: this many seconds (e.g. `1.5`) instead of [`REQUEST_TIMEOUT`],
/// so that a CA that stalls is seen to time out without a minute's wait.
const REQUEST_TIMEOUT_ENV: &str = "TCPFWD_TEST_ACME_REQUEST_TIMEOUT";
/// Longest one whole attempt (account, order, validation, download) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest sleep between looks at the schedule, so clock jumps and ARI changes are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// First retry delay after a failure; doubles up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay of our own choosing.
const BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// Shortest wait after the CA refused something (see [`refused_by_ca`]):
/// repeating a refused request at once only spends the CA's rate limits.
const REFUSED_FLOOR: Duration = Duration::from_secs(60);
/// Longest `Retry-After` honoured, against a CA that asks for something absurd.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(86_400);
/// Wait after the CA issued a certificate that tcpfwd cannot use: ordering
/// again soon would only spend the CA's limit on duplicate certificates
/// (Let's Encrypt: 5 per exact set of names per week).
const LOCAL_PROBLEM_WAIT: Duration = Duration::from_secs(6 * 3600);
/// How old the directory may get before it is fetched again (new terms of
/// service, a new `renewalInfo` URL); every attempt also fetches it afresh.
const DIRECTORY_MAX_AGE: Duration = Duration::from_secs(86_400);
/// Longest wait before restarting the ACME task after it ended unexpectedly.
const RESTART_CAP: Duration = Duration::from_secs(3600);
/// Expiry watch: an ERROR when renewal keeps failing this close to expiry
/// (or within a third of a short certificate's lifetime), once per this interval.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);
const EXPIRY_REPEAT: Duration = Duration::from_secs(86_400);
/// Certificates shorter than this renew with half their lifetime left, not a
/// third (Let's Encrypt's 6-day shortlived profile: day 3, leaving the expiry
/// watch, which starts with a third left, a day of quiet retries); as Certbot 4.
const SHORT_LIFETIME: Duration = Duration::from_secs(10 * 86_400);
/// How many more times a request the CA rejected with badNonce is repeated,
/// beyond instant-acme's own two retries: a rejected request had no effect,
/// so repeating it never places a second order.
const BAD_NONCE_RETRIES: u32 = 4;

/// Runs `$call` (an instant-acme request) again while the CA answers
/// badNonce, at most [`BAD_NONCE_RETRIES`] more times.
macro_rules! nonce_retry {
    ($step:expr, $call:expr) => {{
        let mut left = BAD_NONCE_RETRIES;
        loop {
            match $call {
                Err(e) if left > 0 && is_bad_nonce(&e) => {
                    left -= 1;
                    tracing::debug!(
                        step = $step,
                        "the CA rejected the nonce again; repeating the request"
                    );
                }
                other => break other,
            }
        }
    }};
}

/// Whether the CA refused a request for its nonce only (RFC 8555 section 6.5).
fn is_bad_nonce(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

mod account;
mod order;
mod schedule;
mod stored;

pub use self::schedule::{fmt_duration, fmt_time, renewal_time, Backoff};
pub use self::stored::{ari_identifier, stored_pair, CertInfo, Stored, Unusable};

use self::account::DirectoryInfo;
use self::order::{
    identifier_names, ip_needs_shortlived, refused_by_ca, ProfileNotOffered, UnusableIssued,
};
use self::schedule::{failure_wait, lifetime_rule, near_expiry, random, unix_seconds, when};
use self::stored::{load_stored, recover_issued};

/// An error and its sources on one line, each source once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The certificate the renewal task looks after. Sent by the task after each
/// issuance and by a SIGHUP reload that re-read the stored pair, so that the
/// schedule always follows the certificate actually served.
pub type Current = tokio::sync::watch::Sender<Option<CertInfo>>;

/// The initial certificate and the task that will look after it.
pub struct Task {
    shared: Shared,
    /// Why the first order is made, when there is no usable certificate.
    order_reason: Option<String>,
}

/// What every incarnation of the ACME task works with (a restarted task
/// starts from here); cheap to clone.
#[derive(Clone)]
struct Shared {
    cfg: AcmeConfig,
    state: Arc<StateDir>,
    http: Http,
    provider: Arc<CryptoProvider>,
    current: Current,
    metrics: crate::service::metrics::AcmeMetrics,
}

/// Locks the state directory, loads a stored certificate if it is usable, and
/// returns what to serve now (the stored certificate or a placeholder).
pub fn prepare(
    cfg: &AcmeConfig,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<(CertifiedKey, Task)> {
    let state = StateDir::open(&cfg.state_dir, &cfg.directory)?;
    let http = Http::new(cfg.ca_root.as_deref(), provider)?;
    if ip_needs_shortlived(cfg) {
        tracing::warn!(
            ips = ?cfg.ips,
            directory = %cfg.directory,
            "Let's Encrypt issues certificates for IP addresses only on its shortlived profile; add --acme-profile shortlived, or the order will be refused"
        );
    }
    recover_issued(&state, provider);
    let stored = load_stored(&state.path(""), provider);
    let (key, current, order_reason) = match stored {
        Ok(Some(s)) => {
            tracing::info!(
                cert = %s.file.display(),
                names = ?s.info.names,
                ips = ?s.info.ips,
                expires = %fmt_time(s.info.not_after),
                sha256 = %s.info.sha256,
                "serving the stored certificate"
            );
            if s.info.not_after <= SystemTime::now() {
                tracing::warn!(
                    cert = %s.file.display(),
                    expired = %when(s.info.not_after),
                    "the stored certificate has expired; serving it until a new one arrives"
                );
            }
            (s.key, Some(s.info), None)
        }
        other => {
            let reason = match other {
                Ok(_) => "no certificate stored yet".to_string(),
                Err(why) => {
                    tracing::warn!(
                        cert = %why.file.display(),
                        problem = %why.problem,
                        "the stored certificate cannot be used; ordering a new one with the stored account"
                    );
                    format!("stored certificate unusable: {}", why.problem)
                }
            };
            let ss = tls::self_signed(&identifier_names(cfg), provider)?;
            tracing::info!(
                names = ?ss.names,
                sha256 = %ss.fingerprint,
                "serving a self-signed placeholder until the CA issues a certificate"
            );
            (ss.key, None, Some(reason))
        }
    };
    let (current, _) = tokio::sync::watch::channel(current);
    Ok((
        key,
        Task {
            shared: Shared {
                cfg: cfg.clone(),
                state: Arc::new(state),
                http,
                provider: provider.clone(),
                current,
                metrics: Default::default(),
            },
            order_reason,
        },
    ))
}

/// The running task's state.
struct Manager {
    shared: Shared,
    resolver: Arc<CertResolver>,
    router: Arc<TlsRouter>,
    on_status: OnStatus,
    /// Why the next order is made, when there is no usable certificate.
    order_reason: Option<String>,
    directory: Option<DirectoryInfo>,
    account: Option<Account>,
    /// The certificate the ARI state below is about (its SHA-256).
    ari_for: Option<String>,
    /// The ARI window we last chose a time in, and that time.
    ari_choice: Option<((SystemTime, SystemTime), SystemTime)>,
    /// When to ask the CA for renewal information again.
    ari_next_check: SystemTime,
    /// The renewal time last logged, so the schedule is logged when it changes.
    logged_renewal: Option<SystemTime>,
    /// When the expiry watch last logged its ERROR.
    expiry_logged: Option<SystemTime>,
    /// The terms of service and ARI URL last logged.
    logged_directory: Option<(Option<String>, Option<String>)>,
    /// No orders until it ends (stored as [`HOLD_FILE`]).
    hold: Option<Hold>,
}

/// Called after each certificate swap, and when the ACME warning for
/// `STATUS=` changes (`Some` while the certificate nears expiry unrenewed).
pub type OnStatus = Arc<dyn Fn(Option<String>) + Send + Sync>;

/// Handed to the supervisor's test hook: the task panics at its first look
/// at the schedule when this variable is set (tests of the supervisor only).
const PANIC_HOOK: &str = "TCPFWD_TEST_ACME_PANIC";

impl Task {
    /// The renewal task's idea of the current certificate, for a reload to update.
    pub fn current(&self) -> Current {
        self.shared.current.clone()
    }

    /// Its times for the metrics endpoint (shared: they move as the task works).
    pub fn metrics(&self) -> crate::service::metrics::AcmeMetrics {
        self.shared.metrics.clone()
    }

    /// Starts the background task that orders and renews the certificate,
    /// under a supervisor: if it ever ends (a panic), it is logged at ERROR
    /// and started again with backoff, so renewals never stop silently.
    pub fn spawn(self, resolver: Arc<CertResolver>, router: Arc<TlsRouter>, on_status: OnStatus) {
        let Task {
            shared,
            order_reason,
        } = self;
        let mut order_reason = Some(order_reason);
        let mut panic_hook = std::env::var_os(PANIC_HOOK).is_some();
        tokio::spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                let m = Manager {
                    shared: shared.clone(),
                    resolver: resolver.clone(),
                    router: router.clone(),
                    on_status: on_status.clone(),
                    order_reason: order_reason.take().flatten(),
                    directory: None,
                    account: None,
                    ari_for: None,
                    ari_choice: None,
                    ari_next_check: UNIX_EPOCH,
                    logged_renewal: None,
                    expiry_logged: None,
                    logged_directory: None,
                    hold: None,
                };
                let started = std::time::Instant::now();
                let hook = std::mem::take(&mut panic_hook);
                let ended = tokio::spawn(m.run(hook)).await;
                let why = match ended {
                    Ok(()) => "it returned".to_string(),
                    Err(e) if e.is_panic() => {
                        let p = e.into_panic();
                        let text = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown".into());
                        format!("it panicked: {text}")
                    }
                    Err(e) => e.to_string(),
                };
                if started.elapsed() > RESTART_CAP {
                    backoff.reset();
                }
                let wait = backoff.next(random(), None).min(RESTART_CAP);
                tracing::error!(
                    error = %why,
                    restart_in = %fmt_duration(wait),
                    "the ACME task ended unexpectedly; restarting it (no renewals until then)"
                );
                tokio::time::sleep(wait).await;
            }
        });
    }
}

/// What to do after a look at the schedule.
enum Next {
    Sleep(Duration),
    Order(String),
}

impl Manager {
    async fn run(mut self, panic_hook: bool) {
        let mut backoff = Backoff::default();
        let mut changes = self.shared.current.subscribe();
        self.load_hold().await;
        loop {
            if panic_hook {
                panic!("{PANIC_HOOK} is set");
            }
            let looked = SystemTime::now();
            let reason = match self.schedule().await {
                Next::Sleep(d) => {
                    // A reload that re-read the stored pair wakes the schedule.
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = changes.changed() => {}
                    }
                    continue;
                }
                Next::Order(reason) => reason,
            };
            self.shared.http.take_failure();
            // Each attempt reads the directory and the account afresh; a
            // directory fetched just now by this look at the schedule (for
            // ARI) is fresh.
            if self.directory.as_ref().is_none_or(|d| d.fetched < looked) {
                self.directory = None;
            }
            self.account = None;
            let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.order(&reason)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "the attempt took longer than {}",
                    fmt_duration(ATTEMPT_TIMEOUT)
                )),
            };
            changes.mark_unchanged();
            let attempt_time = unix_seconds(SystemTime::now());
            match &result {
                Ok(()) => self.shared.metrics.last_success.set(attempt_time),
                Err(_) => self.shared.metrics.last_failure.set(attempt_time),
            };
            match result {
                Ok(()) => {
                    backoff.reset();
                    self.order_reason = None;
                    if self.expiry_logged.take().is_some() {
                        (self.on_status)(None);
                    }
                    self.set_hold(None).await;
                    // What the CA issued lacks a name: ordering again would
                    // get the same, so wait as after an unusable certificate.
                    let lacking = self
                        .shared
                        .current
                        .borrow()
                        .as_ref()
                        .map(|c| c.missing(&self.shared.cfg))
                        .unwrap_or_default();
                    if !lacking.is_empty() {
                        let problem = format!(
                            "the certificate the CA issued does not cover {}",
                            lacking.join(", ")
                        );
                        tracing::error!(
                            error = %problem,
                            retry_in = %fmt_duration(LOCAL_PROBLEM_WAIT),
                            "the CA issued a certificate without some of the names asked for; serving it, and not ordering again for hours"
                        );
                        self.set_hold(Some(problem)).await;
                    }
                }
                Err(e) if e.chain().any(|c| c.is::<UnusableIssued>()) => {
                    self.shared.http.take_failure();
                    tracing::error!(
                        error = %format!("{e:#}"),
                        retry_in = %fmt_duration(LOCAL_PROBLEM_WAIT),
                        "the CA issued a certificate that tcpfwd cannot use; not ordering again for hours, to spare the CA's duplicate-certificate limit"
                    );
                    self.expiry_watch(&format!("{e:#}"));
                    self.set_hold(Some(format!("{e:#}"))).await;
                }
                Err(e) if e.chain().any(|c| c.is::<ProfileNotOffered>()) => {
                    let failure = self.shared.http.take_failure();
                    let told = failure
                        .as_ref()
                        .and_then(|f| f.retry_after)
                        .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
                    let wait = failure_wait(&mut backoff, random(), told, true);
                    let offered = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<ProfileNotOffered>())
                        .map(ProfileNotOffered::offered)
                        .unwrap_or_default();
                    tracing::error!(
                        profile = self.shared.cfg.profile.as_deref().unwrap_or(""),
                        offered,
                        directory = %self.shared.cfg.directory,
                        retry_in = %fmt_duration(wait),
                        "the CA does not offer the ACME profile asked for; no order placed: set --acme-profile (acme.profile) to one it offers, or drop it"
                    );
                    self.expiry_watch(&format!("{e:#}"));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let failure = self.shared.http.take_failure();
                    let mut told = failure
                        .as_ref()
                        .and_then(|f| f.retry_after)
                        .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
                    if let Some(instant_acme::Error::Timeout(Some(at))) = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<instant_acme::Error>())
                    {
                        told = Some(at.saturating_duration_since(std::time::Instant::now()));
                    }
                    let wait = failure_wait(&mut backoff, random(), told, refused_by_ca(&e));
                    self.log_failure(&e, failure.as_ref(), told, wait);
                    self.expiry_watch(&format!("{e:#}"));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Reads the stored hold: one for these names is honoured (and said at
    /// ERROR), one for other names is lifted.
    async fn load_hold(&mut self) {
        let path = self.shared.state.path(HOLD_FILE);
        let bytes = match self.shared.state.read(HOLD_FILE) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the stored hold on orders: {e}; ignoring it");
                return;
            }
        };
        let names = identifier_names(&self.shared.cfg);
        match Hold::from_bytes(&bytes) {
            Ok(h) if !h.is_for(&names) => {
                tracing::info!(
                    file = %path.display(),
                    held_names = ?h.names,
                    names = ?names,
                    "the names changed since a certificate from the CA proved unusable; ordering is allowed again"
                );
                self.set_hold(None).await;
            }
            Ok(h) if h.until() > SystemTime::now() => {
                tracing::error!(
                    problem = %h.problem,
                    retry_at = %when(h.until()),
                    file = %path.display(),
                    "a certificate the CA issued before could not be used; not ordering again until the hold ends (fix the problem, then delete the file to order at once)"
                );
                self.hold = Some(h);
            }
            Ok(_) => self.set_hold(None).await,
            Err(why) => {
                tracing::warn!(file = %path.display(), problem = %why, "ignoring a damaged hold file");
                self.set_hold(None).await;
            }
        }
    }

    /// Stores a hold of [`LOCAL_PROBLEM_WAIT`] for `problem`, or lifts it (`None`).
    async fn set_hold(&mut self, problem: Option<String>) {
        let state = &self.shared.state;
        let result = match problem {
            Some(problem) => {
                let h = Hold::new(
                    LOCAL_PROBLEM_WAIT,
                    identifier_names(&self.shared.cfg),
                    problem,
                );
                let bytes = h.to_bytes();
                self.hold = Some(h);
                state.write_blocking(HOLD_FILE, bytes).await
            }
            None => {
                if self.hold.take().is_none() && !state.path(HOLD_FILE).exists() {
                    return;
                }
                state.remove_blocking(HOLD_FILE).await
            }
        };
        if let Err(e) = result {
            tracing::error!(
                file = %state.path(HOLD_FILE).display(),
                "cannot store the hold on orders: {e}; a restart may order again before it ends"
            );
        }
    }

    /// After a failure: an ERROR once a day (and a `STATUS=` warning) while
    /// the certificate served is near expiry or expired.
    fn expiry_watch(&mut self, last_error: &str) {
        let Some(cur) = self.shared.current.borrow().clone() else {
            return;
        };
        let now = SystemTime::now();
        if !near_expiry(cur.not_before, cur.not_after, now) {
            return;
        }
        let due = self
            .expiry_logged
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() >= EXPIRY_REPEAT);
        if !due {
            return;
        }
        self.expiry_logged = Some(now);
        let expired = cur.not_after <= now;
        tracing::error!(
            expires = %when(cur.not_after),
            names = ?cur.names,
            last_error,
            "{}",
            if expired {
                "the certificate has expired and renewal keeps failing; still serving it and still trying"
            } else {
                "the certificate expires soon and renewal keeps failing; still trying"
            }
        );
        let what = if expired { "expired" } else { "expires" };
        (self.on_status)(Some(format!(
            "certificate {what} {}, renewal failing: {}",
            fmt_time(cur.not_after),
            last_error.chars().take(200).collect::<String>()
        )));
    }

    fn log_failure(
        &self,
        e: &anyhow::Error,
        failure: Option<&Failure>,
        told: Option<Duration>,
        wait: Duration,
    ) {
        let url = failure.map(|f| format!("{} {}", f.method, f.url));
        let status = failure.and_then(|f| f.status).map(|s| s.as_u16());
        let retry_after = told.map(fmt_duration);
        let error = format!("{e:#}");
        match &*self.shared.current.borrow() {
            Some(cur) => tracing::warn!(
                directory = %self.shared.cfg.directory,
                url = url.as_deref().unwrap_or(""),
                status,
                error = %error,
                retry_after,
                retry_in = %fmt_duration(wait),
                expires = %when(cur.not_after),
                "certificate renewal failed; still serving the current certificate until it expires"
            ),
            None => tracing::warn!(
                directory = %self.shared.cfg.directory,
                url = url.as_deref().unwrap_or(""),
                status,
                error = %error,
                retry_after,
                retry_in = %fmt_duration(wait),
                "certificate order failed; still serving the self-signed placeholder"
            ),
        }
    }

    /// Decides whether to order now or how long to sleep first; while a hold
    /// lasts, an order waits for its end.
    async fn schedule(&mut self) -> Next {
        let next = self.schedule_unheld().await;
        let Some(h) = &self.hold else {
            return next;
        };
        match (&next, h.until().duration_since(SystemTime::now())) {
            (Next::Order(_), Ok(left)) => Next::Sleep(left.min(MAX_SLEEP)),
            (Next::Order(_), Err(_)) => {
                self.set_hold(None).await;
                next
            }
            (Next::Sleep(_), _) => next,
        }
    }

    async fn schedule_unheld(&mut self) -> Next {
        let current = self.shared.current.borrow().clone();
        if let Some(cur) = &current {
            // A new certificate (issued, or re-read by a reload): its own ARI state.
            if self.ari_for.as_deref() != Some(cur.sha256.as_str()) {
                if self.ari_for.is_some() {
                    self.order_reason = None;
                }
                self.ari_for = Some(cur.sha256.clone());
                self.ari_choice = None;
                self.ari_next_check = UNIX_EPOCH;
            }
        }
        if let Some(reason) = &self.order_reason {
            return Next::Order(reason.clone());
        }
        let Some(cur) = current else {
            return Next::Order("no certificate".into());
        };
        let missing = cur.missing(&self.shared.cfg);
        if !missing.is_empty() {
            return Next::Order(format!(
                "the current certificate does not cover {}",
                missing.join(", ")
            ));
        }
        let now = SystemTime::now();
        let window = self.ari_window(&cur).await;
        let (at, rule) = match window {
            Some(w) => {
                let at = match self.ari_choice {
                    Some((chosen_for, at)) if chosen_for == w => at,
                    _ => {
                        let at = renewal_time(cur.not_before, cur.not_after, Some(w), random());
                        self.ari_choice = Some((w, at));
                        at
                    }
                };
                (at, "the CA's renewal window (ARI)")
            }
            None => (
                renewal_time(cur.not_before, cur.not_after, None, 0.0),
                lifetime_rule(cur.not_before, cur.not_after),
            ),
        };
        match at.duration_since(now) {
            Err(_) => Next::Order(format!("renewal due by {rule}")),
            Ok(wait) => {
                self.shared.metrics.next_renewal.set(unix_seconds(at));
                if self.logged_renewal != Some(at) {
                    self.logged_renewal = Some(at);
                    tracing::info!(
                        renew_at = %fmt_time(at),
                        expires = %fmt_time(cur.not_after),
                        sha256 = %cur.sha256,
                        rule,
                        "renewal scheduled"
                    );
                }
                let ari_wait = self
                    .ari_next_check
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO);
                let mut sleep = wait.min(MAX_SLEEP);
                if window.is_some() {
                    sleep = sleep.min(ari_wait.max(Duration::from_secs(60)));
                }
                Next::Sleep(sleep)
            }
        }
    }

    /// The CA's suggested renewal window for `cur`, if it offers ARI and
    /// answers. A plain GET (RFC 9773 section 4.2): no account is needed, so
    /// none is loaded or created for it.
    async fn ari_window(&mut self, cur: &CertInfo) -> Option<(SystemTime, SystemTime)> {
        let now = SystemTime::now();
        if now < self.ari_next_check {
            return self.ari_choice.map(|(w, _)| w);
        }
        let result: anyhow::Result<Option<(SystemTime, SystemTime)>> = async {
            if self.directory.as_ref().is_some_and(|d| {
                now.duration_since(d.fetched).unwrap_or_default() >= DIRECTORY_MAX_AGE
            }) {
                self.directory = None;
            }
            let Some(base) = self.directory().await?.renewal_info else {
                return Ok(None);
            };
            let id = ari_identifier(&cur.leaf).map_err(|e| anyhow!(e))?;
            let url = format!("{}/{id}", base.trim_end_matches('/'));
            let (status, headers, body) = self.get(&url).await?;
            if !status.is_success() {
                bail!(
                    "{url} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(400)
                        .collect::<String>()
                );
            }
            let info: instant_acme::RenewalInfo = serde_json::from_slice(&body)
                .with_context(|| format!("{url} is not renewal information"))?;
            // Already capped by the client; absent means the RFC's default of a day... or sooner.
            let retry = headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map_or(Duration::from_secs(6 * 3600), Duration::from_secs);
            self.ari_next_check = SystemTime::now()
                + retry.clamp(Duration::from_secs(60), Duration::from_secs(86_400));
            let w = info.suggested_window;
            Ok(Some((w.start.into(), w.end.into())))
        }
        .await;
        match result {
            Ok(w) => {
                if w.is_none() {
                    // No ARI at this CA: ask again only after the directory may have changed.
                    self.ari_next_check = now + DIRECTORY_MAX_AGE;
                }
                w
            }
            Err(e) => {
                let failure = self.shared.http.take_failure();
                tracing::warn!(
                    url = failure.map(|f| f.url).unwrap_or_default(),
                    error = %format!("{e:#}"),
                    "cannot ask the CA when to renew; using the lifetime rule for now"
                );
                self.ari_next_check = now + Duration::from_secs(3600);
                self.ari_choice.map(|(w, _)| w)
            }
        }
    }
}
