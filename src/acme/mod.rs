//! ACME: get a certificate over TLS-ALPN-01 on tcpfwd's own port, keep it in the state directory, renew it.
//!
//! The task only writes into the resolver (the certificate in force), the
//! router (challenge certificates while a name is being validated) and the
//! state directory; connections never wait on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use http::{Method, Request};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, CertificateIdentifier,
    ChallengeType, ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, Der, PrivateKeyDer};

use crate::acme::state::StateDir;
use crate::config::AcmeConfig;
use crate::tls::x509;
use crate::tls::{self, CertResolver, TlsRouter};

pub mod state;

mod client;
mod http1;

use self::client::{Failure, Http};

/// Files in the CA's state sub-directory.
const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// Longest a single HTTP request to the CA may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
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

/// What we know about a certificate we serve.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// DNS names in its subjectAltName.
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the leaf, as browsers show it.
    pub sha256: String,
    /// The leaf, for ARI's certificate identifier.
    pub leaf: CertificateDer<'static>,
}

impl CertInfo {
    /// Reads names and validity from the leaf certificate.
    pub fn from_leaf(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let unreadable = |e: x509::Error| format!("the certificate cannot be parsed ({e})");
        let cert = x509::parse(leaf.as_ref()).map_err(unreadable)?;
        let to_time = |secs: i64| match u64::try_from(secs) {
            Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => UNIX_EPOCH,
        };
        let names = cert.dns_names().map_err(unreadable)?;
        Ok(CertInfo {
            names,
            not_before: to_time(cert.not_before),
            not_after: to_time(cert.not_after),
            sha256: tls::sha256_fingerprint(leaf),
            leaf: leaf.clone().into_owned(),
        })
    }

    /// The configured names this certificate lacks.
    fn missing<'a>(&self, wanted: &'a [String]) -> Vec<&'a str> {
        wanted
            .iter()
            .filter(|w| !self.names.contains(w))
            .map(String::as_str)
            .collect()
    }
}

/// The certificate's ARI identifier (RFC 9773 section 4.1): its Authority Key
/// Identifier's keyIdentifier and its serial number's content bytes.
pub fn ari_identifier(leaf: &CertificateDer<'_>) -> Result<CertificateIdentifier<'static>, String> {
    let unreadable = |e: x509::Error| format!("the certificate cannot be parsed ({e})");
    let cert = x509::parse(leaf.as_ref()).map_err(unreadable)?;
    let aki = cert.authority_key_id().map_err(unreadable)?.ok_or(
        "the certificate has no Authority Key Identifier, which ARI needs to name it".to_string(),
    )?;
    Ok(CertificateIdentifier::new(
        Der::from_slice(aki),
        Der::from_slice(cert.serial),
    ))
}

/// When to renew: a random point in the CA's ARI window when it gave a usable
/// one, otherwise when a third of the lifetime remains (day 60 of 90, day 30
/// of 45, day 4 of 6). `random` is in [0, 1). A time in the past means now.
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
    not_after - lifetime / 3
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
fn random() -> f64 {
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
fn when(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => format!("{} (in {})", fmt_time(t), fmt_duration(d)),
        Err(e) => format!("{} ({} ago)", fmt_time(t), fmt_duration(e.duration())),
    }
}

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

/// What the directory says beyond what instant-acme keeps.
#[derive(Debug, Clone)]
struct DirectoryInfo {
    terms_of_service: Option<String>,
    renewal_info: bool,
}

/// The initial certificate and the task that will look after it.
pub struct Task {
    cfg: AcmeConfig,
    state: StateDir,
    http: Http,
    provider: Arc<CryptoProvider>,
    current: Option<CertInfo>,
    /// Why the first order is made, when there is no usable certificate.
    order_reason: Option<String>,
}

/// Locks the state directory, loads a stored certificate if it is usable, and
/// returns what to serve now (the stored certificate or a placeholder).
pub fn prepare(
    cfg: &AcmeConfig,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<(CertifiedKey, Task)> {
    let state = StateDir::open(&cfg.state_dir, &cfg.directory)?;
    let http = Http::new(cfg.ca_root.as_deref(), provider)?;
    let cert_path = state.path(CERT_FILE);
    let stored = load_stored(&state, provider);
    let (key, current, order_reason) = match stored {
        Ok(Some((ck, info))) => {
            tracing::info!(
                cert = %cert_path.display(),
                names = ?info.names,
                expires = %fmt_time(info.not_after),
                sha256 = %info.sha256,
                "serving the stored certificate"
            );
            if info.not_after <= SystemTime::now() {
                tracing::warn!(
                    cert = %cert_path.display(),
                    expired = %when(info.not_after),
                    "the stored certificate has expired; serving it until a new one arrives"
                );
            }
            (ck, Some(info), None)
        }
        other => {
            let reason = match other {
                Ok(_) => "no certificate stored yet".to_string(),
                Err(why) => {
                    tracing::warn!(
                        cert = %cert_path.display(),
                        key = %state.path(KEY_FILE).display(),
                        problem = %why,
                        "the stored certificate cannot be used; ordering a new one with the stored account"
                    );
                    format!("stored certificate unusable: {why}")
                }
            };
            let ss = tls::self_signed(&cfg.domains, provider)?;
            tracing::info!(
                names = ?ss.names,
                sha256 = %ss.fingerprint,
                "serving a self-signed placeholder until the CA issues a certificate"
            );
            (ss.key, None, Some(reason))
        }
    };
    Ok((
        key,
        Task {
            cfg: cfg.clone(),
            state,
            http,
            provider: provider.clone(),
            current,
            order_reason,
        },
    ))
}

/// Paths of the stored certificate chain and key for this configuration's CA.
pub fn stored_files(cfg: &AcmeConfig) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = cfg
        .state_dir
        .join(crate::acme::state::ca_dir_name(&cfg.directory));
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// The stored certificate and key: `Ok(None)` if there is none, `Err(why)` if unusable.
fn load_stored(
    state: &StateDir,
    provider: &CryptoProvider,
) -> Result<Option<(CertifiedKey, CertInfo)>, String> {
    let cert = state
        .read(CERT_FILE)
        .map_err(|e| format!("cannot read {CERT_FILE}: {e}"))?;
    let key = state
        .read(KEY_FILE)
        .map_err(|e| format!("cannot read {KEY_FILE}: {e}"))?;
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(format!("{KEY_FILE} is missing")),
        (None, Some(_)) => return Err(format!("{CERT_FILE} is missing")),
        (Some(c), Some(k)) => (c, k),
    };
    let ck = tls::certified_key_from_pem(&cert, &key, provider)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| format!("no leaf certificate ({e})"))?;
    let info = CertInfo::from_leaf(leaf)?;
    Ok(Some((ck, info)))
}

/// Makes the TLS-ALPN-01 certificate for `name`: self-signed, with the critical
/// acmeIdentifier extension holding SHA-256 of the key authorization (RFC 8737).
fn challenge_cert(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .with_context(|| format!("challenge certificate for {name}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().context("challenge key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the challenge certificate")?;
    // Not CertifiedKey::from_der: its consistency check parses the certificate
    // with webpki, which rejects the critical acmeIdentifier extension.
    let signing_key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(|e| anyhow!("loading the challenge key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

/// Removes the challenge certificates when an attempt ends, however it ends.
struct Challenges {
    router: Arc<TlsRouter>,
    names: Vec<String>,
}

impl Drop for Challenges {
    fn drop(&mut self) {
        for n in &self.names {
            self.router.remove_challenge(n);
        }
    }
}

/// The CA could not validate the names: worth a slower retry, since CAs
/// limit failed validations (Let's Encrypt: 5 per name per hour).
#[derive(Debug)]
struct ValidationFailed(String);

impl std::fmt::Display for ValidationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValidationFailed {}

/// Whether the CA answered and said no (a problem document other than
/// badNonce, or a failed validation), as opposed to not answering at all.
fn refused_by_ca(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ValidationFailed>()
            || matches!(
                c.downcast_ref::<instant_acme::Error>(),
                Some(instant_acme::Error::Api(p))
                    if !p.r#type.as_deref().unwrap_or("").ends_with(":badNonce")
            )
    })
}

/// Whether an ACME error is this problem type (`urn:ietf:params:acme:error:<kind>`).
fn is_problem(e: &anyhow::Error, kind: &str) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<instant_acme::Error>()
            .and_then(|e| match e {
                instant_acme::Error::Api(p) => p.r#type.as_deref(),
                _ => None,
            })
            .or_else(|| {
                c.downcast_ref::<instant_acme::Problem>()
                    .and_then(|p| p.r#type.as_deref())
            })
            .is_some_and(|t| t.ends_with(&format!(":{kind}")))
    })
}

/// The running task's state.
struct Manager {
    task: Task,
    resolver: Arc<CertResolver>,
    router: Arc<TlsRouter>,
    on_swap: OnSwap,
    directory: Option<DirectoryInfo>,
    account: Option<Account>,
    /// The ARI window we last chose a time in, and that time.
    ari_choice: Option<((SystemTime, SystemTime), SystemTime)>,
    /// When to ask the CA for renewal information again.
    ari_next_check: SystemTime,
    /// The renewal time last logged, so the schedule is logged when it changes.
    logged_renewal: Option<SystemTime>,
}

/// Called after each certificate swap (to refresh the systemd status line).
pub type OnSwap = Box<dyn Fn() + Send + Sync>;

impl Task {
    /// Starts the background task that orders and renews the certificate.
    pub fn spawn(self, resolver: Arc<CertResolver>, router: Arc<TlsRouter>, on_swap: OnSwap) {
        let m = Manager {
            task: self,
            resolver,
            router,
            on_swap,
            directory: None,
            account: None,
            ari_choice: None,
            ari_next_check: UNIX_EPOCH,
            logged_renewal: None,
        };
        tokio::spawn(m.run());
    }
}

/// What to do after a look at the schedule.
enum Next {
    Sleep(Duration),
    Order(String),
}

impl Manager {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            let reason = match self.schedule().await {
                Next::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Next::Order(reason) => reason,
            };
            self.task.http.take_failure();
            let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.order(&reason)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "the attempt took longer than {}",
                    fmt_duration(ATTEMPT_TIMEOUT)
                )),
            };
            match result {
                Ok(()) => {
                    backoff.reset();
                    self.task.order_reason = None;
                }
                Err(e) => {
                    let failure = self.task.http.take_failure();
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
                    let mut wait = backoff.next(random(), told);
                    // A CA that says when to come back is obeyed to the second.
                    if told.is_none() && refused_by_ca(&e) {
                        wait = wait.max(REFUSED_FLOOR);
                    }
                    self.log_failure(&e, failure.as_ref(), told, wait);
                    tokio::time::sleep(wait).await;
                }
            }
        }
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
        match &self.task.current {
            Some(cur) => tracing::warn!(
                directory = %self.task.cfg.directory,
                url = url.as_deref().unwrap_or(""),
                status,
                error = %error,
                retry_after,
                retry_in = %fmt_duration(wait),
                expires = %when(cur.not_after),
                "certificate renewal failed; still serving the current certificate until it expires"
            ),
            None => tracing::warn!(
                directory = %self.task.cfg.directory,
                url = url.as_deref().unwrap_or(""),
                status,
                error = %error,
                retry_after,
                retry_in = %fmt_duration(wait),
                "certificate order failed; still serving the self-signed placeholder"
            ),
        }
    }

    /// Decides whether to order now or how long to sleep first.
    async fn schedule(&mut self) -> Next {
        if let Some(reason) = &self.task.order_reason {
            return Next::Order(reason.clone());
        }
        let Some(cur) = self.task.current.clone() else {
            return Next::Order("no certificate".into());
        };
        let missing = cur.missing(&self.task.cfg.domains);
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
                "a third of the lifetime left",
            ),
        };
        match at.duration_since(now) {
            Err(_) => Next::Order(format!("renewal due by {rule}")),
            Ok(wait) => {
                if self.logged_renewal != Some(at) {
                    self.logged_renewal = Some(at);
                    tracing::info!(
                        renew_at = %fmt_time(at),
                        expires = %fmt_time(cur.not_after),
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

    /// The CA's suggested renewal window for `cur`, if it offers ARI and answers.
    async fn ari_window(&mut self, cur: &CertInfo) -> Option<(SystemTime, SystemTime)> {
        let now = SystemTime::now();
        if now < self.ari_next_check {
            return self.ari_choice.map(|(w, _)| w);
        }
        let result: anyhow::Result<Option<(SystemTime, SystemTime)>> = async {
            if !self.directory().await?.renewal_info {
                return Ok(None);
            }
            let account = self.account().await?;
            let id = ari_identifier(&cur.leaf).map_err(|e| anyhow!(e))?;
            let (info, retry) = account
                .renewal_info(&id)
                .await
                .context("fetching renewal information")?;
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
                    self.ari_next_check = now + Duration::from_secs(86_400);
                }
                w
            }
            Err(e) => {
                let failure = self.task.http.take_failure();
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

    /// Fetches the directory once: checks it is one, logs the terms of service.
    async fn directory(&mut self) -> anyhow::Result<DirectoryInfo> {
        if let Some(d) = &self.directory {
            return Ok(d.clone());
        }
        let url = &self.task.cfg.directory;
        let req = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .header(
                http::header::USER_AGENT,
                concat!("tcpfwd/", env!("CARGO_PKG_VERSION")),
            )
            .body(BodyWrapper::default())
            .with_context(|| format!("invalid ACME directory URL {url}"))?;
        let mut rsp = self
            .task
            .http
            .request(req)
            .await
            .with_context(|| format!("cannot reach the ACME directory {url}"))?;
        let status = rsp.parts.status;
        let body = rsp
            .body
            .into_bytes()
            .await
            .map_err(|e| anyhow!("reading the ACME directory {url}: {e}"))?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            bail!(
                "the ACME directory {url} answered {status}: {}",
                text.chars().take(400).collect::<String>()
            );
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            anyhow!("{url} is not an ACME directory (not JSON: {e}); check --acme-directory")
        })?;
        for key in ["newNonce", "newAccount", "newOrder"] {
            if !doc[key].is_string() {
                bail!("{url} is not an ACME directory (no {key}); check --acme-directory");
            }
        }
        let info = DirectoryInfo {
            terms_of_service: doc["meta"]["termsOfService"].as_str().map(str::to_owned),
            renewal_info: doc["renewalInfo"].is_string(),
        };
        tracing::info!(
            directory = %url,
            terms_of_service = info.terms_of_service.as_deref().unwrap_or("(none given)"),
            renewal_info = info.renewal_info,
            "using ACME CA; its terms of service apply to the account tcpfwd uses (agreed by passing --acme-domain)"
        );
        self.directory = Some(info.clone());
        Ok(info)
    }

    /// The account: cached, else loaded from the state directory, else created.
    async fn account(&mut self) -> anyhow::Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        self.directory().await?;
        let path = self.task.state.path(ACCOUNT_FILE);
        let stored = self
            .task
            .state
            .read(ACCOUNT_FILE)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(bytes) = stored {
            let parsed =
                serde_json::from_slice::<AccountCredentials>(&bytes).map_err(|e| e.to_string());
            let loaded = match parsed {
                Ok(creds) => {
                    match instant_acme::Account::builder_with_http(self.task.http.boxed())
                        .from_credentials(creds)
                        .await
                    {
                        Ok(a) => Ok(a),
                        Err(instant_acme::Error::KeyRejected | instant_acme::Error::Crypto) => {
                            Err("its key is not a usable ECDSA P-256 key".to_string())
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "cannot restore the ACME account at {}",
                                self.task.cfg.directory
                            )))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match loaded {
                Ok(a) => {
                    tracing::info!(account = a.id(), file = %path.display(), "using the stored ACME account");
                    self.account = Some(a.clone());
                    return Ok(a);
                }
                Err(why) => {
                    let aside = self
                        .task
                        .state
                        .move_aside(ACCOUNT_FILE, "corrupt")
                        .with_context(|| format!("cannot move {} aside", path.display()))?;
                    tracing::warn!(
                        file = %path.display(),
                        moved_to = %aside.display(),
                        problem = %why,
                        "the stored ACME account is corrupt; moved it aside and creating a new account"
                    );
                }
            }
        }
        self.create_account().await
    }

    async fn create_account(&mut self) -> anyhow::Result<Account> {
        let cfg = &self.task.cfg;
        let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
        let eab = cfg
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key.0));
        let (account, creds) = instant_acme::Account::builder_with_http(self.task.http.boxed())
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                cfg.directory.clone(),
                eab.as_ref(),
            )
            .await
            .with_context(|| format!("cannot create an ACME account at {}", cfg.directory))?;
        let json = serde_json::to_vec_pretty(&creds).context("serializing the account")?;
        let path = self.task.state.path(ACCOUNT_FILE);
        self.task
            .state
            .write(ACCOUNT_FILE, &json)
            .with_context(|| format!("cannot save the new ACME account to {}", path.display()))?;
        tracing::info!(
            account = account.id(),
            contact = ?contact,
            file = %path.display(),
            "created an ACME account"
        );
        self.account = Some(account.clone());
        Ok(account)
    }

    /// One order, start to finish; on success the new certificate is served and stored.
    async fn order(&mut self, reason: &str) -> anyhow::Result<()> {
        let dir = self.directory().await?;
        let account = self.account().await?;
        let cfg = self.task.cfg.clone();
        let ids: Vec<Identifier> = cfg.domains.iter().cloned().map(Identifier::Dns).collect();
        let replaces = match (&self.task.current, dir.renewal_info) {
            (Some(cur), true) => ari_identifier(&cur.leaf).ok(),
            _ => None,
        };
        let renewal = self.task.current.is_some();
        tracing::info!(
            names = ?cfg.domains,
            directory = %cfg.directory,
            reason,
            "ordering a certificate"
        );
        let mut new_order = NewOrder::new(&ids);
        if let Some(r) = replaces.clone() {
            new_order = new_order.replaces(r);
        }
        let first = account.new_order(&new_order).await;
        let mut order = match first {
            Err(instant_acme::Error::Api(p)) if replaces.is_some() && p.status != Some(429) => {
                tracing::debug!(problem = %p, "the CA refused the order as a replacement; ordering plainly");
                account.new_order(&NewOrder::new(&ids)).await
            }
            other => other,
        }
        .map_err(anyhow::Error::new);
        if let Err(e) = &order {
            if is_problem(e, "accountDoesNotExist") {
                let aside = self.task.state.move_aside(ACCOUNT_FILE, "unknown-to-ca")?;
                tracing::warn!(
                    moved_to = %aside.display(),
                    "the CA does not know the stored ACME account; moved it aside and creating a new one"
                );
                self.account = None;
                let account = self.account().await?;
                order = account
                    .new_order(&NewOrder::new(&ids))
                    .await
                    .map_err(anyhow::Error::new);
            }
        }
        let mut order = order.context("the CA refused the new order")?;

        let mut challenges = Challenges {
            router: self.router.clone(),
            names: Vec::new(),
        };
        let provider = self.task.provider.clone();
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.context("fetching an authorization")?;
            let name = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("the CA reports the authorization for {name} as {other:?}"),
            }
            let offered: Vec<String> = authz
                .challenges
                .iter()
                .map(|c| format!("{:?}", c.r#type))
                .collect();
            let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| {
                anyhow!(
                    "the CA offers no tls-alpn-01 challenge for {name} (it offers {}); tcpfwd answers only tls-alpn-01",
                    offered.join(", ")
                )
            })?;
            let digest = challenge.key_authorization().digest();
            let cert = challenge_cert(&name, digest.as_ref(), &provider)?;
            self.router.add_challenge(&name, cert, provider.clone())?;
            challenges.names.push(name.clone());
            tracing::info!(name = %name, "answering the tls-alpn-01 challenge");
            challenge
                .set_ready()
                .await
                .with_context(|| format!("telling the CA the challenge for {name} is ready"))?;
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(Duration::from_secs(180));
        let ready = order.poll_ready(&policy).await;
        if !matches!(ready, Ok(OrderStatus::Ready)) {
            let mut why = Vec::new();
            let mut authzs = order.authorizations();
            while let Some(Ok(mut authz)) = authzs.next().await {
                if let Ok(st) = authz.refresh().await {
                    for c in &st.challenges {
                        if let Some(err) = &c.error {
                            why.push(format!("{}: {err}", st.identifier()));
                        }
                    }
                }
            }
            let status = match ready {
                Ok(s) => format!("{s:?}"),
                Err(e) => error_chain(&e),
            };
            return Err(ValidationFailed(format!(
                "the CA did not validate the names (order {status}{}{}); check that DNS for each name points here and that port 443 reaches tcpfwd",
                if why.is_empty() { "" } else { "; " },
                why.join("; ")
            ))
            .into());
        }
        drop(challenges);

        let key_pem = order.finalize().await.context("finalizing the order")?;
        let chain_pem = order
            .poll_certificate(&policy)
            .await
            .context("downloading the certificate")?;
        let ck = tls::certified_key_from_pem(chain_pem.as_bytes(), key_pem.as_bytes(), &provider)
            .map_err(|e| anyhow!("the CA's certificate cannot be used: {e}"))?;
        let leaf = ck
            .end_entity_cert()
            .map_err(|e| anyhow!("the CA's certificate has no leaf: {e}"))?;
        let info = CertInfo::from_leaf(leaf).map_err(|e| anyhow!(e))?;
        self.resolver.set(ck);
        (self.on_swap)();
        let saved = self
            .task
            .state
            .write(KEY_FILE, key_pem.as_bytes())
            .and_then(|()| self.task.state.write(CERT_FILE, chain_pem.as_bytes()));
        if let Err(e) = saved {
            tracing::error!(
                dir = %self.task.state.path("").display(),
                "cannot save the new certificate ({e}); serving it, but a restart will order another"
            );
        }
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        tracing::info!(
            names = ?info.names,
            expires = %fmt_time(info.not_after),
            lifetime = %fmt_duration(lifetime),
            sha256 = %info.sha256,
            cert = %self.task.state.path(CERT_FILE).display(),
            "{}",
            if renewal {
                "certificate renewed; new connections get it, open ones keep theirs"
            } else {
                "certificate issued; new connections get it"
            }
        );
        self.task.current = Some(info);
        self.ari_choice = None;
        self.ari_next_check = UNIX_EPOCH;
        Ok(())
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
        assert_eq!(renewal_time(t(0), t(6), None, 0.7), t(4));
        let short = renewal_time(t(0), t(0) + Duration::from_secs(30), None, 0.0);
        assert_eq!(short, t(0) + Duration::from_secs(20));
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
    fn durations_and_times_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(7)), "7s");
        assert_eq!(fmt_duration(Duration::from_millis(7990)), "8s");
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m5s");
        assert_eq!(fmt_duration(Duration::from_secs(3 * 3600 + 60)), "3h1m");
        assert_eq!(fmt_duration(DAY * 59 + Duration::from_secs(7200)), "59d2h");
        assert_eq!(fmt_time(UNIX_EPOCH + DAY), "1970-01-02T00:00:00Z");
    }

    #[test]
    fn stored_certificate_info_and_ari_identifier() {
        let leaf = crate::tls::x509::tests::openssl_leaf();
        let info = CertInfo::from_leaf(&leaf).unwrap();
        assert_eq!(info.names, ["cams.example.org", "*.example.org"]);
        assert_eq!(
            info.not_before,
            UNIX_EPOCH + Duration::from_secs(1_795_613_104)
        );
        assert_eq!(
            info.not_after,
            UNIX_EPOCH + Duration::from_secs(1_803_389_104)
        );
        // base64url of the AKI keyid and of the serial's content bytes (00 80 ab ...),
        // from `openssl x509 -noout -ext authorityKeyIdentifier -serial`; instant-acme's
        // x509-parser feature gave the same before it was dropped.
        let id = ari_identifier(&leaf).unwrap();
        assert_eq!(id.to_string(), "DoSfW6LTPzfetsisQNnP82vW1gU.AICrze8BI0VniQ");

        let self_signed = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let err = ari_identifier(self_signed.cert.der()).unwrap_err();
        assert!(err.contains("no Authority Key Identifier"), "{err}");
        let err = CertInfo::from_leaf(&CertificateDer::from(vec![0x30, 0x00])).unwrap_err();
        assert!(
            err.starts_with("the certificate cannot be parsed (tbsCertificate: "),
            "{err}"
        );
    }

    #[test]
    fn challenge_certificate_carries_the_acme_identifier() {
        let p = tls::provider(false);
        let ck = challenge_cert("cams.example.org", &[7u8; 32], &p).unwrap();
        let leaf = ck.end_entity_cert().unwrap();
        let cert = x509::parse(leaf.as_ref()).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31.
        let ext = cert
            .extension(&[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f])
            .unwrap()
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &[7u8; 32]);
        let info = CertInfo::from_leaf(leaf).unwrap();
        assert_eq!(info.names, ["cams.example.org"]);
    }
}
