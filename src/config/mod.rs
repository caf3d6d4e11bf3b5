//! The validated configuration: frontends, their routes, certificates, and
//! the process-wide settings the server runs on.
//!
//! Two sources feed it, the command line ([`cli`]) and the file ([`file`]);
//! each produces a [`layer::Layer`] of what it said, and [`layer::build`]
//! merges them into one [`Config`], checked once. The rest of the program
//! never sees a string it has to interpret again. This module imports
//! neither clap nor the file format.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub mod cli;
pub mod duration;
pub mod file;
pub mod layer;
pub mod map;

pub use duration::Duration;
pub use map::{Backend, BackendHost, Listen, MapError, MapSpec};

use crate::policy::{AccessList, BanRules, SourceLimits, SourcePolicy};

/// `text` for quoting in a message: control characters (a newline, a tab,
/// an escape) written as Rust escapes (`\n`, `\u{1b}`), so the message stays
/// one line and a terminal shows what was typed instead of obeying it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// At least one; no two on overlapping addresses and ports.
    pub frontends: Vec<Frontend>,
    /// Where the certificates come from.
    pub cert: CertSource,
    /// AEAD preference.
    pub cipher_preference: CipherPreference,
    /// Drain deadline at shutdown.
    pub shutdown_timeout: std::time::Duration,
    /// Connection cap over all frontends.
    pub max_connections: usize,
    /// Threads that accept and serve connections, each with its own event loop.
    pub workers: usize,
    /// Log level and format.
    pub log: Logging,
    /// Where to serve Prometheus metrics (`/metrics`); none by default.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where `tcpfwd status` reaches this instance: chosen, or in systemd's
    /// runtime directory; none otherwise, so that instances started by hand
    /// (and tests) never meet in one default place.
    pub control: Option<ControlSocket>,
    /// The file this came from, re-read on SIGHUP.
    pub file: Option<PathBuf>,
    /// Per-source limits, bans and the refusal summary, for every connection.
    pub sources: SourcePolicy,
}

/// The control socket's place, and whether the user chose it: a chosen one
/// that cannot be opened stops start-up, systemd's only gives a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSocket {
    /// The Unix socket's path.
    pub path: PathBuf,
    /// Given with `--control` or `control =`.
    pub explicit: bool,
}

/// Where a listening address terminates TLS, and the routes it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// Where to listen.
    pub listen: Listen,
    /// At least one; names unique; at most one default.
    pub routes: Vec<Route>,
    /// Checked right after accept, before any byte is read.
    pub access: AccessList,
}

/// A server name a route answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SniName {
    /// This name exactly (lower case).
    Exact(String),
    /// Any name one label deeper than this suffix: `*.example.org` stores
    /// `example.org` and matches `cams.example.org`, not `a.b.example.org`.
    Wildcard(String),
}

impl SniName {
    /// From a checked route name (`map::parse_route_name`).
    pub fn new(name: &str) -> SniName {
        match name.strip_prefix("*.") {
            Some(suffix) => SniName::Wildcard(suffix.to_owned()),
            None => SniName::Exact(name.to_owned()),
        }
    }
}

impl fmt::Display for SniName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniName::Exact(n) => f.write_str(n),
            SniName::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// One device behind a frontend: which names reach it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Server names; empty only for a default route.
    pub names: Vec<SniName>,
    /// Also serves ClientHellos without SNI or with a name no route has.
    pub default: bool,
    /// The plain-TCP backend.
    pub backend: Backend,
    /// Per-connection time limits.
    pub timeouts: Timeouts,
    /// PROXY protocol header sent to the backend first, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// ALPN protocols to advertise; empty means none.
    pub alpn: Vec<Vec<u8>>,
    /// Checked after the ClientHello, on top of the frontend's lists.
    pub access: AccessList,
    /// Its own per-source numbers, counted after the ClientHello on top of
    /// the process-wide ones; `None` when it has the process-wide ones.
    pub source_limits: Option<SourceLimits>,
    /// Its own ban numbers, for failed handshakes on it, on top of the
    /// process-wide ones: reaching them refuses the source on this route
    /// only (after the ClientHello); `None` when it has the process-wide ones.
    pub bans: Option<BanRules>,
    /// Client certificates the route requires; `None`: anyone may connect.
    pub client_auth: Option<ClientAuth>,
    /// Admits only the sources that passed another route's client
    /// certificates (and asks for none itself).
    pub admit_after: Option<AdmitAfter>,
    /// When another route admits after this one: the number its verified
    /// handshakes are recorded under (the other's `AdmitAfter::scope`).
    pub admission: Option<u32>,
    /// Where the route was said, for messages.
    pub origin: Origin,
}

impl Route {
    /// The route's name in logs: its first server name, or `default`.
    pub fn label(&self) -> String {
        match self.names.first() {
            Some(n) => n.to_string(),
            None => "default".to_string(),
        }
    }

    /// The route in the `--map` form, for logs and status lines.
    pub fn map_text(&self, listen: &Listen) -> String {
        if self.names.is_empty() {
            format!("{listen}:{}", self.backend)
        } else {
            let names: Vec<String> = self.names.iter().map(ToString::to_string).collect();
            format!("{listen}:{}={}", names.join(","), self.backend)
        }
    }
}

/// `admit_after`: a source that completed a verified client-certificate
/// handshake on the route named, within `window`, may connect; everyone
/// else is refused before the handshake. For the pages whose WebSockets
/// go to another port, since browsers send no certificate there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitAfter {
    /// The route named, as written (`443`, `443:dvr.example.org`), for messages.
    pub route: String,
    /// The admissions of that route (its [`Route::admission`]).
    pub scope: u32,
    /// That route's CA: a revocation in its CRL ends the admissions (and
    /// the connections) its certificates made.
    pub auth: ClientAuth,
    /// How long after its last verified handshake a source stays admitted.
    pub window: std::time::Duration,
}

/// The default `admit_window`: a day's evening and the next morning.
pub const ADMIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Which client certificates a route accepts: one of these CAs must have
/// signed it, and no CRL of its may list it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// tcpfwd's own family CA (`tcpfwd client-cert new`), kept in this
    /// directory (`family-ca/` in the state directory) with its CRL.
    Family {
        /// The CA's directory.
        dir: PathBuf,
    },
    /// A CA the user brings.
    Ca {
        /// PEM file with one or more CA certificates.
        ca: PathBuf,
        /// PEM or DER CRL of that CA, re-read when it changes.
        crl: Option<PathBuf>,
    },
}

impl ClientAuth {
    /// The CRL file whose changes must reach the running server, if any.
    pub fn crl_file(&self) -> Option<PathBuf> {
        match self {
            ClientAuth::Family { dir } => Some(dir.join(crate::clientca::CRL_FILE)),
            ClientAuth::Ca { crl, .. } => crl.clone(),
        }
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAuth::Family { .. } => f.write_str("family CA"),
            ClientAuth::Ca { ca, .. } => write!(f, "CA {}", ca.display()),
        }
    }
}

/// Where a frontend or route was configured, so errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A `--map` on the command line, with its text.
    Map(String),
    /// A place in the configuration file.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Map(text) => write!(f, "--map '{text}'"),
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
        }
    }
}

/// Which PROXY protocol header a backend reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text form (`PROXY TCP4 ...`).
    V1,
    /// The binary form, with TLVs for the server name, ALPN and TLS details.
    V2,
}

impl FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(format!(
                "invalid proxy_protocol '{s}': expected \"v1\" or \"v2\""
            )),
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

/// Server-side preference between the two AEAD families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherPreference {
    /// Decide from the CPU's features at start.
    Auto,
    /// AES-GCM first.
    Aes,
    /// ChaCha20-Poly1305 first.
    Chacha,
}

impl FromStr for CipherPreference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CipherPreference::Auto),
            "aes" => Ok(CipherPreference::Aes),
            "chacha" => Ok(CipherPreference::Chacha),
            _ => Err(format!(
                "invalid cipher preference '{s}': use \"auto\", \"aes\" or \"chacha\""
            )),
        }
    }
}

/// How log events are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "invalid log format '{s}': use \"text\" or \"json\""
            )),
        }
    }
}

/// Log settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logging {
    /// A level, or `TARGET=LEVEL` pairs; `RUST_LOG` wins over it.
    pub level: String,
    /// Text or JSON lines, when chosen. Not chosen: the journal's native
    /// fields when standard error is the journal (under systemd), else text.
    pub format: Option<LogFormat>,
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Where the server certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM pairs; each handshake gets the one whose names cover its SNI, the
    /// first when none does.
    Files(Vec<CertPair>),
    /// An in-memory self-signed certificate for localhost, the host name,
    /// every route name and these.
    SelfSigned {
        /// Subject alternative names, besides localhost and the host name.
        extra_names: Vec<String>,
    },
    /// Certificates from an ACME CA, kept in a state directory.
    Acme(AcmeConfig),
}

/// Per-connection time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake: std::time::Duration,
    /// Backend connect.
    pub connect: std::time::Duration,
    /// No data either way; `None` means never.
    pub idle: Option<std::time::Duration>,
    /// No data in the surviving direction after a half-close.
    pub close: std::time::Duration,
}

impl Default for Timeouts {
    /// The documented defaults (`--help` shows the same).
    fn default() -> Self {
        Timeouts {
            handshake: std::time::Duration::from_secs(10),
            connect: std::time::Duration::from_secs(5),
            idle: None,
            close: std::time::Duration::from_secs(60),
        }
    }
}

/// Let's Encrypt's production directory, the default CA.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`--acme-staging`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// External account binding, for CAs that tie ACME accounts to a customer account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eab {
    /// Key identifier as the CA shows it.
    pub kid: String,
    /// The decoded HMAC key; `Debug` shows its length only.
    pub hmac_key: HmacKey,
}

/// The EAB HMAC key bytes, hidden from `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct HmacKey(pub Vec<u8>);

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HmacKey({} bytes)", self.0.len())
    }
}

/// A secret as a source gave it: usable, but never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// What ACME needs: the names, the CA, the account details and where to keep state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// DNS names, lower case, no duplicates; all on one certificate.
    pub domains: Vec<String>,
    /// IP addresses (RFC 8738), on the same certificate, no duplicates.
    pub ips: Vec<std::net::IpAddr>,
    /// The ACME profile to ask for (draft-aaron-acme-profiles), kept for every renewal.
    pub profile: Option<String>,
    /// `mailto:` contact, if given.
    pub contact: Option<String>,
    /// Directory URL of the CA.
    pub directory: String,
    /// Root to trust for the directory's HTTPS instead of the system's.
    pub ca_root: Option<PathBuf>,
    /// External account binding, if the CA needs it.
    pub eab: Option<Eab>,
    /// State directory (account, certificate, key, lock).
    pub state_dir: PathBuf,
}

impl Config {
    /// Every route with its frontend, in order.
    pub fn routes(&self) -> impl Iterator<Item = (&Frontend, &Route)> {
        self.frontends
            .iter()
            .flat_map(|f| f.routes.iter().map(move |r| (f, r)))
    }

    /// Every exact and wildcard server name of every route, once each.
    pub fn route_names(&self) -> Vec<SniName> {
        let mut out: Vec<SniName> = Vec::new();
        for (_, r) in self.routes() {
            for n in &r.names {
                if !out.contains(n) {
                    out.push(n.clone());
                }
            }
        }
        out
    }
}
