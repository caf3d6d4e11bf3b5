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

/// What we know about a certificate we serve.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// DNS names in its subjectAltName.
    pub names: Vec<String>,
    /// IP addresses in its subjectAltName.
    pub ips: Vec<std::net::IpAddr>,
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
        let ips = tls::ip_addresses(leaf.as_ref())?;
        Ok(CertInfo {
            names,
            ips,
            not_before: to_time(cert.not_before),
            not_after: to_time(cert.not_after),
            sha256: tls::sha256_fingerprint(leaf),
            leaf: leaf.clone().into_owned(),
        })
    }

    /// The configured names and addresses this certificate lacks.
    fn missing(&self, cfg: &AcmeConfig) -> Vec<String> {
        let names = cfg.domains.iter().filter(|w| !self.names.contains(w));
        let ips = cfg.ips.iter().filter(|ip| !self.ips.contains(ip));
        names.cloned().chain(ips.map(|ip| ip.to_string())).collect()
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
fn lifetime_rule(not_before: SystemTime, not_after: SystemTime) -> &'static str {
    match not_after.duration_since(not_before) {
        Ok(l) if l < SHORT_LIFETIME => "half the lifetime left (a short-lived certificate)",
        _ => "a third of the lifetime left",
    }
}

/// Whether IP addresses are asked of Let's Encrypt without its shortlived
/// profile, the only one on which it issues them.
fn ip_needs_shortlived(cfg: &AcmeConfig) -> bool {
    let lets_encrypt = [
        crate::config::LETS_ENCRYPT,
        crate::config::LETS_ENCRYPT_STAGING,
    ];
    !cfg.ips.is_empty()
        && cfg.profile.as_deref() != Some("shortlived")
        && lets_encrypt.contains(&cfg.directory.as_str())
}

/// Every identifier of the configuration, DNS names then IP addresses.
fn identifiers(cfg: &AcmeConfig) -> Vec<Identifier> {
    let names = cfg.domains.iter().cloned().map(Identifier::Dns);
    names
        .chain(cfg.ips.iter().copied().map(Identifier::Ip))
        .collect()
}

/// The identifiers as text, as a hold and the log name them.
fn identifier_names(cfg: &AcmeConfig) -> Vec<String> {
    let ips = cfg.ips.iter().map(|ip| ip.to_string());
    cfg.domains.iter().cloned().chain(ips).collect()
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
    /// The `renewalInfo` URL (ARI), if the CA offers it.
    renewal_info: Option<String>,
    /// The names in `meta.profiles`; `None` if the CA has no profiles.
    profiles: Option<Vec<String>>,
    fetched: SystemTime,
    /// The whole document, from which the account is restored (so that
    /// instant-acme does not fetch the directory a second time).
    document: serde_json::Value,
}

/// Stored account credentials with the directory document already fetched in
/// place of its URL, so that instant-acme restores the account without
/// fetching the directory again (as for credentials of its versions before
/// 0.4, which held the directory's URLs).
fn with_directory(
    stored: &[u8],
    directory: &serde_json::Value,
) -> Result<AccountCredentials, String> {
    let mut creds: serde_json::Value = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
    let fields = creds.as_object_mut().ok_or("not a JSON object")?;
    fields.remove("directory");
    fields.insert("urls".into(), directory.clone());
    serde_json::from_value(creds).map_err(|e| format!("with the directory: {e}"))
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

/// A stored certificate and key that can be served.
pub struct Stored {
    /// The pair, for the resolver.
    pub key: CertifiedKey,
    /// What the renewal schedule needs.
    pub info: CertInfo,
    /// The file it was read from, for the log.
    pub file: std::path::PathBuf,
}

/// Why the stored certificate cannot be used.
#[derive(Debug)]
pub struct Unusable {
    /// The file at fault.
    pub file: std::path::PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.problem)
    }
}

impl std::error::Error for Unusable {}

/// The stored pair for this configuration's CA, read without the lock (a
/// SIGHUP reload in the process that holds it): `Ok(None)` if none is stored.
pub fn stored_pair(
    cfg: &AcmeConfig,
    provider: &CryptoProvider,
) -> Result<Option<Stored>, Unusable> {
    let dir = cfg
        .state_dir
        .join(crate::acme::state::ca_dir_name(&cfg.directory));
    load_stored(&dir, provider)
}

/// Reads `bytes` (chain and key, in any order, as PEM) into a servable pair.
fn parse_pair(bytes: &[u8], provider: &CryptoProvider) -> Result<(CertifiedKey, CertInfo), String> {
    let ck = tls::certified_key_from_pem(bytes, bytes, provider)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| format!("no leaf certificate ({e})"))?;
    let info = CertInfo::from_leaf(leaf)?;
    Ok((ck, info))
}

/// The stored certificate and key in `dir`: [`PAIR_FILE`], else the older
/// `cert.pem` + `key.pem`. `Ok(None)` if there is none.
fn load_stored(
    dir: &std::path::Path,
    provider: &CryptoProvider,
) -> Result<Option<Stored>, Unusable> {
    let read = |name: &str| -> Result<Option<Vec<u8>>, Unusable> {
        match std::fs::read(dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Unusable {
                file: dir.join(name),
                problem: format!("cannot read it: {e}"),
            }),
        }
    };
    if let Some(pair) = read(PAIR_FILE)? {
        let file = dir.join(PAIR_FILE);
        return match parse_pair(&pair, provider) {
            Ok((key, info)) => Ok(Some(Stored { key, info, file })),
            Err(problem) => Err(Unusable { file, problem }),
        };
    }
    let (cert, key) = match (read(CERT_FILE)?, read(KEY_FILE)?) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(Unusable {
                file: dir.join(KEY_FILE),
                problem: format!("{KEY_FILE} is missing"),
            })
        }
        (None, Some(_)) => {
            return Err(Unusable {
                file: dir.join(CERT_FILE),
                problem: format!("{CERT_FILE} is missing"),
            })
        }
        (Some(c), Some(k)) => (c, k),
    };
    let file = dir.join(CERT_FILE);
    let unusable = |problem| Unusable {
        file: dir.join(CERT_FILE),
        problem,
    };
    let ck = tls::certified_key_from_pem(&cert, &key, provider).map_err(unusable)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| unusable(format!("no leaf certificate ({e})")))?;
    let info = CertInfo::from_leaf(leaf).map_err(unusable)?;
    Ok(Some(Stored {
        key: ck,
        info,
        file,
    }))
}

/// After a crash between storing what the CA issued and promoting it: a
/// usable [`ISSUED_FILE`] becomes the pair, an unusable one is moved aside.
fn recover_issued(state: &StateDir, provider: &CryptoProvider) {
    let Ok(Some(bytes)) = state.read(ISSUED_FILE) else {
        return;
    };
    let result = match parse_pair(&bytes, provider) {
        Ok(_) => state.rename(ISSUED_FILE, PAIR_FILE).map(|()| None),
        Err(why) => state
            .move_aside(ISSUED_FILE, "unusable")
            .map(|p| Some((p, why))),
    };
    match result {
        Ok(None) => tracing::info!(
            file = %state.path(PAIR_FILE).display(),
            "kept the certificate the CA issued before tcpfwd last stopped"
        ),
        Ok(Some((aside, why))) => tracing::error!(
            moved_to = %aside.display(),
            problem = %why,
            "the certificate the CA issued before tcpfwd last stopped cannot be used"
        ),
        Err(e) => tracing::error!(
            file = %state.path(ISSUED_FILE).display(),
            "cannot keep the certificate the CA issued before tcpfwd last stopped: {e}"
        ),
    }
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

/// The configured profile is not among those the directory lists.
#[derive(Debug)]
struct ProfileNotOffered {
    profile: String,
    offered: Option<Vec<String>>,
}

impl ProfileNotOffered {
    fn offered(&self) -> String {
        match &self.offered {
            Some(p) if !p.is_empty() => p.join(", "),
            _ => "none: it does not support profiles".into(),
        }
    }
}

impl std::fmt::Display for ProfileNotOffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the CA does not offer the ACME profile '{}' (it offers {}); check --acme-profile",
            self.profile,
            self.offered()
        )
    }
}

impl std::error::Error for ProfileNotOffered {}

/// A local problem with what the CA issued: never a reason to order again soon.
#[derive(Debug)]
struct UnusableIssued(String);

impl std::fmt::Display for UnusableIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnusableIssued {}

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

/// Seconds since the Unix epoch (0 before it), for the metrics.
fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What to do after a look at the schedule.
enum Next {
    Sleep(Duration),
    Order(String),
}

/// The wait after a failed attempt: the backoff's, or what the CA asked
/// (`told`), with a floor of [`REFUSED_FLOOR`] after a refusal unless the CA
/// named a time still ahead (a date already past names none).
fn failure_wait(
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
fn near_expiry(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let margin = EXPIRY_WARNING.min(lifetime / 3);
    match not_after.checked_sub(margin) {
        Some(from) => now >= from,
        None => true,
    }
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

    /// A plain GET to the CA: status, headers, body.
    async fn get(
        &self,
        url: &str,
    ) -> anyhow::Result<(http::StatusCode, http::HeaderMap, bytes::Bytes)> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(
                http::header::USER_AGENT,
                concat!("tcpfwd/", env!("CARGO_PKG_VERSION")),
            )
            .body(BodyWrapper::default())
            .with_context(|| format!("invalid URL {url}"))?;
        let rsp = self
            .shared
            .http
            .request(req)
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let (status, headers, mut body) = (rsp.parts.status, rsp.parts.headers, rsp.body);
        let body = body
            .into_bytes()
            .await
            .map_err(|e| anyhow!("reading {url}: {e}"))?;
        Ok((status, headers, body))
    }

    /// The directory, fetched afresh for each attempt and when a day old:
    /// checks it is one, logs the terms of service when they change.
    async fn directory(&mut self) -> anyhow::Result<DirectoryInfo> {
        if let Some(d) = &self.directory {
            return Ok(d.clone());
        }
        let url = self.shared.cfg.directory.clone();
        let (status, _, body) = self
            .get(&url)
            .await
            .with_context(|| format!("cannot reach the ACME directory {url}"))?;
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
            renewal_info: doc["renewalInfo"].as_str().map(str::to_owned),
            profiles: doc["meta"]["profiles"]
                .as_object()
                .map(|m| m.keys().cloned().collect()),
            fetched: SystemTime::now(),
            document: doc,
        };
        let changed = self
            .logged_directory
            .as_ref()
            .is_none_or(|(tos, ari)| *tos != info.terms_of_service || *ari != info.renewal_info);
        if changed {
            tracing::info!(
                directory = %url,
                terms_of_service = info.terms_of_service.as_deref().unwrap_or("(none given)"),
                renewal_info = info.renewal_info.is_some(),
                "using ACME CA; its terms of service apply to the account tcpfwd uses (agreed by passing --acme-domain or --acme-ip)"
            );
            self.logged_directory =
                Some((info.terms_of_service.clone(), info.renewal_info.clone()));
        }
        self.directory = Some(info.clone());
        Ok(info)
    }

    /// The account: cached, else loaded from the state directory, else created.
    async fn account(&mut self) -> anyhow::Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let directory = self.directory().await?;
        let path = self.shared.state.path(ACCOUNT_FILE);
        let stored = self
            .shared
            .state
            .read(ACCOUNT_FILE)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(bytes) = stored {
            let parsed =
                serde_json::from_slice::<AccountCredentials>(&bytes).map_err(|e| e.to_string());
            let loaded = match parsed {
                Ok(_) => {
                    let creds = with_directory(&bytes, &directory.document).map_err(|e| {
                        anyhow!(
                            "cannot restore the ACME account from {}: {e}",
                            path.display()
                        )
                    })?;
                    match instant_acme::Account::builder_with_http(self.shared.http.boxed())
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
                                self.shared.cfg.directory
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
                        .shared
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
        let cfg = &self.shared.cfg;
        let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
        let eab = cfg
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key.0));
        let new_account = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, creds) = nonce_retry!(
            "new account",
            instant_acme::Account::builder_with_http(self.shared.http.boxed())
                .create(&new_account, cfg.directory.clone(), eab.as_ref())
                .await
        )
        .with_context(|| format!("cannot create an ACME account at {}", cfg.directory))?;
        let json = serde_json::to_vec_pretty(&creds).context("serializing the account")?;
        let path = self.shared.state.path(ACCOUNT_FILE);
        self.shared
            .state
            .write_blocking(ACCOUNT_FILE, json)
            .await
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
        let cfg = self.shared.cfg.clone();
        // Checked before the account and the order: a profile the CA does not
        // list would only be refused.
        if let Some(p) = &cfg.profile {
            if !dir.profiles.as_ref().is_some_and(|l| l.contains(p)) {
                return Err(ProfileNotOffered {
                    profile: p.clone(),
                    offered: dir.profiles.clone(),
                }
                .into());
            }
        }
        let account = self.account().await?;
        let ids = identifiers(&cfg);
        let current = self.shared.current.borrow().clone();
        let replaces = match (&current, &dir.renewal_info) {
            (Some(cur), Some(_)) => ari_identifier(&cur.leaf).ok(),
            _ => None,
        };
        let renewal = current.is_some();
        tracing::info!(
            names = ?identifier_names(&cfg),
            directory = %cfg.directory,
            profile = cfg.profile.as_deref(),
            reason,
            "ordering a certificate"
        );
        // Every order, the plain one after a refused replacement too, asks
        // for the profile: a renewal must not fall back to the CA's default.
        let new_order = |replaces: Option<CertificateIdentifier<'static>>| {
            let mut o = NewOrder::new(&ids);
            if let Some(p) = cfg.profile.as_deref() {
                o = o.profile(p);
            }
            if let Some(r) = replaces {
                o = o.replaces(r);
            }
            o
        };
        let first = nonce_retry!(
            "new order",
            account.new_order(&new_order(replaces.clone())).await
        );
        let mut order = match first {
            Err(instant_acme::Error::Api(p)) if replaces.is_some() && p.status != Some(429) => {
                tracing::debug!(problem = %p, "the CA refused the order as a replacement; ordering plainly");
                nonce_retry!("new order", account.new_order(&new_order(None)).await)
            }
            other => other,
        }
        .map_err(anyhow::Error::new);
        if let Err(e) = &order {
            if is_problem(e, "accountDoesNotExist") {
                let aside = self
                    .shared
                    .state
                    .move_aside_blocking(ACCOUNT_FILE, "unknown-to-ca")
                    .await?;
                tracing::warn!(
                    moved_to = %aside.display(),
                    "the CA does not know the stored ACME account; moved it aside and creating a new one"
                );
                self.account = None;
                let account = self.account().await?;
                order = nonce_retry!("new order", account.new_order(&new_order(None)).await)
                    .map_err(anyhow::Error::new);
            }
        }
        let mut order = order.context("the CA refused the new order")?;

        let mut challenges = Challenges {
            router: self.router.clone(),
            names: Vec::new(),
        };
        let provider = self.shared.provider.clone();
        // An authorization whose fetch was refused for its nonce is fetched
        // again on the next pass; those answered already are skipped.
        let mut answered: Vec<String> = Vec::new();
        for pass in 0..=BAD_NONCE_RETRIES {
            let mut again = false;
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = match authz {
                    Err(e) if pass < BAD_NONCE_RETRIES && is_bad_nonce(&e) => {
                        again = true;
                        continue;
                    }
                    other => other.context("fetching an authorization")?,
                };
                let ident = authz.identifier();
                let name = ident.to_string();
                // An IP address is validated under its reverse-DNS name (RFC 8738 section 6).
                let sni = match ident.identifier {
                    Identifier::Ip(addr) => ip::reverse_dns_name(*addr),
                    _ => name.clone(),
                };
                if answered.contains(&name) {
                    continue;
                }
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
                self.router.add_challenge(&sni, cert, provider.clone())?;
                challenges.names.push(sni.clone());
                tracing::info!(name = %name, server_name = %sni, "answering the tls-alpn-01 challenge");
                nonce_retry!("challenge ready", challenge.set_ready().await)
                    .with_context(|| format!("telling the CA the challenge for {name} is ready"))?;
                answered.push(name);
            }
            if !again {
                break;
            }
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(Duration::from_secs(180));
        let ready = nonce_retry!("order poll", order.poll_ready(&policy).await);
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

        let key_pem =
            nonce_retry!("finalize", order.finalize().await).context("finalizing the order")?;
        let chain_pem = nonce_retry!("certificate", order.poll_certificate(&policy).await)
            .context("downloading the certificate")?;
        // Stored before it is read: whatever goes wrong below is ours, and
        // the CA's certificate must not be lost (nor ordered again) for it.
        let mut issued = chain_pem.into_bytes();
        if !issued.ends_with(b"\n") {
            issued.push(b'\n');
        }
        issued.extend_from_slice(key_pem.as_bytes());
        let state = &self.shared.state;
        let stored = state.write_blocking(ISSUED_FILE, issued.clone()).await;
        if let Err(e) = &stored {
            tracing::error!(
                file = %state.path(ISSUED_FILE).display(),
                "cannot store the certificate the CA issued ({e}); serving it if it is usable, but a restart will order another"
            );
        }
        let (ck, info) = match parse_pair(&issued, &provider) {
            Ok(pair) => pair,
            Err(why) => {
                let kept = match stored {
                    Ok(()) => match state.move_aside_blocking(ISSUED_FILE, "unusable").await {
                        Ok(p) => format!("; what the CA sent is kept in {}", p.display()),
                        Err(e) => format!("; cannot move {ISSUED_FILE} aside: {e}"),
                    },
                    Err(_) => String::new(),
                };
                return Err(UnusableIssued(format!(
                    "the certificate the CA issued cannot be used: {why}{kept}"
                ))
                .into());
            }
        };
        self.resolver.set(ck);
        self.shared.current.send_replace(Some(info.clone()));
        (self.on_status)(None);
        if stored.is_ok() {
            if let Err(e) = state
                .promote_blocking(ISSUED_FILE, PAIR_FILE, &[CERT_FILE, KEY_FILE])
                .await
            {
                tracing::error!(
                    dir = %state.path("").display(),
                    "cannot store the new certificate as {PAIR_FILE} ({e}); serving it, and it is kept in {ISSUED_FILE} for the next start"
                );
            }
        }
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        tracing::info!(
            names = ?info.names,
            ips = ?info.ips,
            expires = %fmt_time(info.not_after),
            lifetime = %fmt_duration(lifetime),
            sha256 = %info.sha256,
            cert = %state.path(PAIR_FILE).display(),
            "{}",
            if renewal {
                "certificate renewed; new connections get it, open ones keep theirs"
            } else {
                "certificate issued; new connections get it"
            }
        );
        self.ari_for = Some(info.sha256.clone());
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
    fn a_pair_file_holds_chain_and_key_and_is_read_back() {
        let p = tls::provider(false);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pair = format!("{}{}", cert.pem(), key.serialize_pem());
        let (_, info) = parse_pair(pair.as_bytes(), &p).unwrap();
        assert_eq!(info.names, ["a.test"]);
        let err = parse_pair(cert.pem().as_bytes(), &p).err().unwrap();
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn a_stored_account_is_restored_with_the_fetched_directory() {
        let stored = br#"{"id":"https://ca.test/acct/1","key_pkcs8":"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJVWC_QzOTCS5vtsJp2IG-UDc8cdDfeoKtxSZxaznM-mhRANCAAQenCPoGgPFTdPJ7VLLKt56RxPlYT1wNXnHc54PEyBg3LxKaH0-sJkX0mL8LyPEdsfL_Oz4TxHkWLJGrXVtNhfH","directory":"https://ca.test/dir"}"#;
        let doc = serde_json::json!({
            "newNonce": "https://ca.test/nonce",
            "newAccount": "https://ca.test/acct",
            "newOrder": "https://ca.test/order",
            "renewalInfo": "https://ca.test/ari",
            "meta": { "termsOfService": "https://ca.test/tos", "profiles": { "classic": "90 days" } }
        });
        let creds = with_directory(stored, &doc).unwrap();
        // instant-acme takes the URLs from here and fetches nothing.
        let back = serde_json::to_value(&creds).unwrap();
        assert_eq!(back["urls"]["newOrder"], "https://ca.test/order");
        assert_eq!(back["urls"]["meta"]["profiles"]["classic"], "90 days");
        assert!(back["directory"].is_null(), "{back}");
        assert!(with_directory(b"[]", &doc).is_err());
    }

    #[test]
    fn ip_addresses_at_lets_encrypt_want_the_shortlived_profile() {
        let mut cfg = AcmeConfig {
            domains: vec!["a.example.org".into()],
            ips: vec![],
            profile: None,
            contact: None,
            directory: crate::config::LETS_ENCRYPT.into(),
            ca_root: None,
            eab: None,
            state_dir: "/tmp/x".into(),
        };
        assert!(!ip_needs_shortlived(&cfg));
        cfg.ips = vec!["203.0.113.7".parse().unwrap()];
        assert!(ip_needs_shortlived(&cfg));
        cfg.profile = Some("classic".into());
        assert!(ip_needs_shortlived(&cfg));
        cfg.profile = Some("shortlived".into());
        assert!(!ip_needs_shortlived(&cfg));
        cfg.profile = None;
        cfg.directory = "https://ca.example/dir".into();
        assert!(!ip_needs_shortlived(&cfg));
        assert_eq!(identifier_names(&cfg), ["a.example.org", "203.0.113.7"]);
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
            err.starts_with("the certificate cannot be parsed (certificate: "),
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
