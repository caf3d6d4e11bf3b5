//! What one source (the command line or the file) said, and the merge of the
//! two into one checked [`Config`].
//!
//! Precedence, as the README documents it:
//! - Process-wide scalars (`max_connections`, `threads`, timeouts' defaults,
//!   log settings, ACME's CA and contact, ...): the command line, else the
//!   file's top level, else the built-in default.
//! - Route settings: a route's own value, else its frontend's, else the top
//!   level's (where a command-line option replaces the file's value), else
//!   the built-in default. So `--idle-timeout` sets the default for every
//!   route, and a route or frontend in the file that says otherwise keeps
//!   its own value.
//! - Lists add up: the command line's `--map`s are more routes (on the file's
//!   frontend with the same listening address) or more frontends; `--cert`
//!   pairs, `--self-signed-name`s and `--acme-domain`s join the file's.

use std::path::PathBuf;

use super::map::ROUTE_REF_FORM;
use super::map::{parse_route_name, valid_hostname};
use super::{
    AcmeConfig, AdmitAfter, Backend, CertPair, CertSource, CipherPreference, ClientAuth, Config,
    ControlSocket, Duration, Eab, Frontend, HmacKey, Listen, LogFormat, Logging, Origin,
    ProxyProtocol, Route, Secret, SniName, Timeouts, ADMIT_WINDOW, LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING,
};
use crate::policy::{AccessList, BanRules, Cidr, SourceLimits, SourcePolicy};

/// Route settings as a source gave them; `None` means "not said here".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    /// TLS handshake time limit.
    pub handshake_timeout: Option<Duration>,
    /// Backend connect time limit.
    pub connect_timeout: Option<Duration>,
    /// Idle limit; `Some(None)` turns an inherited one off.
    pub idle_timeout: Option<Option<Duration>>,
    /// Half-close limit.
    pub close_timeout: Option<Duration>,
    /// PROXY header; `Some(None)` turns an inherited one off.
    pub proxy_protocol: Option<Option<ProxyProtocol>>,
    /// ALPN protocols to advertise.
    pub alpn: Option<Vec<String>>,
    /// Sources admitted (when not empty); on a route, on top of its frontend's.
    pub allow: Option<Vec<Cidr>>,
    /// Sources refused, even when allowed.
    pub deny: Option<Vec<Cidr>>,
    /// Connections open at once per source.
    pub per_source_connections: Option<u32>,
    /// New connections per minute per source.
    pub per_source_rate: Option<u32>,
    /// Failed handshakes that start a source's cool-off.
    pub ban_after: Option<u32>,
    /// The first cool-off.
    pub ban_time: Option<Duration>,
    /// The longest cool-off.
    pub max_ban_time: Option<Duration>,
    /// Client certificates to require; `Some(None)` turns an inherited
    /// requirement off.
    pub client_auth: Option<Option<ClientAuthSpec>>,
    /// The route whose verified sources this one admits; `Some(None)` turns
    /// an inherited one off.
    pub admit_after: Option<Option<RouteRef>>,
    /// How long a verified handshake admits its source.
    pub admit_window: Option<Duration>,
}

/// A reference to another route (`admit_after`), as a source wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRef {
    /// The text as written.
    pub text: String,
    /// The frontend it names.
    pub listen: Listen,
    /// The server name of the route it names; `None`: the default route.
    pub name: Option<String>,
    /// Where and how it was said, to start messages with: the file's
    /// `FILE:LINE:COLUMN: `admit_after` = "443"`, or `--admit-after '443'`.
    pub said: String,
}

/// A client-certificate requirement as a source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuthSpec {
    /// tcpfwd's family CA, in the state directory.
    Family,
    /// A CA file the user brings, and its CRL if any.
    Ca {
        /// PEM CA certificates.
        ca: PathBuf,
        /// Its CRL.
        crl: Option<PathBuf>,
    },
}

impl RouteSettings {
    /// These settings, with what they leave unsaid taken from `base`.
    pub fn over(&self, base: &RouteSettings) -> RouteSettings {
        RouteSettings {
            handshake_timeout: self.handshake_timeout.or(base.handshake_timeout),
            connect_timeout: self.connect_timeout.or(base.connect_timeout),
            idle_timeout: self.idle_timeout.or(base.idle_timeout),
            close_timeout: self.close_timeout.or(base.close_timeout),
            proxy_protocol: self.proxy_protocol.or(base.proxy_protocol),
            alpn: self.alpn.clone().or_else(|| base.alpn.clone()),
            allow: self.allow.clone().or_else(|| base.allow.clone()),
            deny: self.deny.clone().or_else(|| base.deny.clone()),
            per_source_connections: self.per_source_connections.or(base.per_source_connections),
            per_source_rate: self.per_source_rate.or(base.per_source_rate),
            ban_after: self.ban_after.or(base.ban_after),
            ban_time: self.ban_time.or(base.ban_time),
            max_ban_time: self.max_ban_time.or(base.max_ban_time),
            client_auth: self
                .client_auth
                .clone()
                .or_else(|| base.client_auth.clone()),
            admit_after: self
                .admit_after
                .clone()
                .or_else(|| base.admit_after.clone()),
            admit_window: self.admit_window.or(base.admit_window),
        }
    }
}

/// A route as a source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Server names as written (checked here).
    pub names: Vec<String>,
    /// Said to be the default route (a route without names always is).
    pub default: bool,
    /// Where it forwards to.
    pub backend: Backend,
    /// Its own settings.
    pub settings: RouteSettings,
    /// Where it was said.
    pub origin: Origin,
}

/// A frontend as a source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    /// Where to listen.
    pub listen: Listen,
    /// Defaults for its routes.
    pub settings: RouteSettings,
    /// Its routes.
    pub routes: Vec<RouteSpec>,
    /// Where it was said.
    pub origin: Origin,
}

/// ACME settings as a source gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeLayer {
    /// Whether this source turns ACME on (an `[acme]` table, or `--acme-domain`).
    pub enabled: bool,
    /// Names besides the routes' own.
    pub domains: Vec<String>,
    /// IP addresses for the certificate.
    pub ips: Vec<std::net::IpAddr>,
    /// ACME profile.
    pub profile: Option<String>,
    /// Contact address.
    pub email: Option<String>,
    /// Directory URL.
    pub directory: Option<String>,
    /// Let's Encrypt's staging CA.
    pub staging: Option<bool>,
    /// Root for the directory's HTTPS.
    pub ca_root: Option<PathBuf>,
    /// EAB key identifier.
    pub eab_kid: Option<String>,
    /// EAB HMAC key, base64url.
    pub eab_hmac_key: Option<Secret>,
}

/// Everything one source said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    /// Frontends with their routes (`--map`s are one frontend each).
    pub frontends: Vec<FrontendSpec>,
    /// Defaults for every route.
    pub defaults: RouteSettings,
    /// Certificate pairs.
    pub certs: Vec<CertPair>,
    /// Extra names for the self-signed certificate.
    pub self_signed_names: Vec<String>,
    /// ACME.
    pub acme: AcmeLayer,
    /// ACME state directory.
    pub state_dir: Option<PathBuf>,
    /// AEAD preference.
    pub cipher_preference: Option<CipherPreference>,
    /// Drain deadline.
    pub shutdown_timeout: Option<Duration>,
    /// Connection cap.
    pub max_connections: Option<u32>,
    /// Worker threads.
    pub threads: Option<u16>,
    /// Log level.
    pub log_level: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// IPv4 sources are counted per block of this prefix.
    pub source_prefix_v4: Option<u8>,
    /// IPv6 sources are counted per block of this prefix.
    pub source_prefix_v6: Option<u8>,
    /// How often refused connections are summed up in the log.
    pub refusal_log_interval: Option<Duration>,
    /// Metrics endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// The control socket for `tcpfwd status`.
    pub control: Option<PathBuf>,
    /// The file, for the file's layer.
    pub file: Option<PathBuf>,
}

/// Most connections `max_connections` may allow.
pub const MAX_CONNECTIONS: u32 = 1_000_000;
/// Most worker threads.
pub const MAX_THREADS: u16 = 1024;

/// Merges the file's layer (if any) and the command line's into one checked
/// `Config`. The error is one line that names the setting and where it was.
pub fn build(file: Option<Layer>, cli: Layer) -> Result<Config, String> {
    let file = file.unwrap_or_default();
    let defaults = cli.defaults.over(&file.defaults);
    let max_connections = cli.max_connections.or(file.max_connections).unwrap_or(1024);
    if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
        return Err(format!(
            "max_connections {max_connections} is out of range: use 1 to {MAX_CONNECTIONS}"
        ));
    }
    let sources = sources(&file, &cli, &defaults, max_connections as usize)?;
    let state = state_dir(&file, &cli);

    let mut frontends: Vec<(FrontendSpec, Vec<Route>)> = Vec::new();
    let mut admitting: Vec<Pending> = Vec::new();
    for spec in file.frontends.iter().chain(cli.frontends.iter()) {
        if spec.routes.is_empty() {
            return Err(format!(
                "frontend {} ({}) has no routes; add a [[frontend.route]] with a backend",
                spec.listen, spec.origin
            ));
        }
        // Port 0 asks the kernel for a fresh port: never the same frontend.
        let same = |f: &FrontendSpec| f.listen == spec.listen && spec.listen.port != 0;
        let at = frontends.iter().position(|(f, _)| same(f));
        let (fi, first) = match at {
            Some(i) => (i, frontends[i].1.len()),
            None => (frontends.len(), 0),
        };
        let mut routes = Vec::with_capacity(spec.routes.len());
        for (i, r) in spec.routes.iter().enumerate() {
            let s = r.settings.over(&spec.settings.over(&defaults));
            routes.push(route(r, &s, &sources, &state)?);
            if let Some(Some(reference)) = &s.admit_after {
                admitting.push(Pending {
                    at: (fi, first + i),
                    reference: reference.clone(),
                    window: s.admit_window,
                    own_client_auth: matches!(r.settings.client_auth, Some(Some(_))),
                });
            }
        }
        match at {
            Some(i) => frontends[i].1.extend(routes),
            None => frontends.push((spec.clone(), routes)),
        }
    }
    if frontends.is_empty() {
        return Err(
            "nothing to serve: give at least one --map (like --map 443:dvr.lan:80) or a [[frontend]] in --config"
                .into(),
        );
    }
    for (i, (a, _)) in frontends.iter().enumerate() {
        if let Some((b, _)) = frontends[..i]
            .iter()
            .find(|(b, _)| b.listen.overlaps(&a.listen))
        {
            return Err(format!(
                "maps '{}' and '{}' both listen on port {}; give each its own port or address, or the same address to share one",
                describe(b),
                describe(a),
                a.listen.port
            ));
        }
    }
    let mut frontends: Vec<Frontend> = frontends
        .into_iter()
        .map(|(spec, routes)| {
            let own = spec.settings.over(&defaults);
            check_frontend(spec.listen, routes, access(&own))
        })
        .collect::<Result<_, _>>()?;
    link_admissions(&mut frontends, admitting)?;

    let acme_on = cli.acme.enabled || file.acme.enabled;
    let mut certs = file.certs.clone();
    certs.extend(cli.certs.iter().cloned());
    let mut extra_names = file.self_signed_names.clone();
    extra_names.extend(cli.self_signed_names.iter().cloned());
    let cert = if acme_on {
        if !certs.is_empty() {
            return Err(
                "ACME and certificate files cannot be used together: drop --cert/--key (or [[cert]]) or the ACME settings"
                    .into(),
            );
        }
        CertSource::Acme(acme(&file, &cli, &frontends)?)
    } else if !certs.is_empty() {
        CertSource::Files(certs)
    } else {
        CertSource::SelfSigned { extra_names }
    };

    let workers = match cli.threads.or(file.threads) {
        Some(n) if (1..=MAX_THREADS).contains(&n) => usize::from(n),
        Some(n) => {
            return Err(format!(
                "threads {n} is out of range: use 1 to {MAX_THREADS}"
            ))
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok(Config {
        frontends,
        cert,
        cipher_preference: cli
            .cipher_preference
            .or(file.cipher_preference)
            .unwrap_or(CipherPreference::Auto),
        shutdown_timeout: cli
            .shutdown_timeout
            .or(file.shutdown_timeout)
            .map_or(std::time::Duration::from_secs(30), |d| d.0),
        max_connections: max_connections as usize,
        workers,
        log: Logging {
            level: cli
                .log_level
                .clone()
                .or_else(|| file.log_level.clone())
                .unwrap_or_else(|| "info".into()),
            format: cli.log_format.or(file.log_format),
        },
        metrics: cli.metrics.or(file.metrics),
        control: match cli.control.as_ref().or(file.control.as_ref()) {
            Some(path) => Some(ControlSocket {
                path: path.clone(),
                explicit: true,
            }),
            None => runtime_directory().map(|dir| ControlSocket {
                path: dir.join(CONTROL_NAME),
                explicit: false,
            }),
        },
        file: file.file.clone(),
        sources,
    })
}

/// A source's allow and deny lists, as resolved.
fn access(s: &RouteSettings) -> AccessList {
    AccessList {
        allow: s.allow.clone().unwrap_or_default(),
        deny: s.deny.clone().unwrap_or_default(),
    }
}

/// The process-wide source numbers: the command line's, else the file's top
/// level, else the defaults for `max_connections`.
fn sources(
    file: &Layer,
    cli: &Layer,
    defaults: &RouteSettings,
    max_connections: usize,
) -> Result<SourcePolicy, String> {
    let mut p = SourcePolicy::defaults(max_connections);
    let at_least_one = |name: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err(format!("{name} must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    p.limits = SourceLimits {
        connections: at_least_one(
            "--per-source-connections",
            defaults.per_source_connections,
            p.limits.connections,
        )?,
        per_minute: at_least_one(
            "--per-source-rate",
            defaults.per_source_rate,
            p.limits.per_minute,
        )?,
    };
    let positive = |name: &str, d: Option<Duration>, default: std::time::Duration| match d {
        Some(d) if d.0.is_zero() => Err(format!("{name} must be more than 0")),
        Some(d) => Ok(d.0),
        None => Ok(default),
    };
    p.bans = BanRules {
        after: at_least_one("--ban-after", defaults.ban_after, p.bans.after)?,
        first: positive("--ban-time", defaults.ban_time, p.bans.first)?,
        longest: positive("--max-ban-time", defaults.max_ban_time, p.bans.longest)?,
    };
    if p.bans.longest < p.bans.first {
        return Err(format!(
            "--max-ban-time ({}) is shorter than --ban-time ({}); the cool-off doubles from --ban-time up to --max-ban-time",
            Duration(p.bans.longest),
            Duration(p.bans.first)
        ));
    }
    p.prefix_v4 = match cli.source_prefix_v4.or(file.source_prefix_v4) {
        Some(n @ 8..=32) => n,
        Some(n) => {
            return Err(format!(
                "--source-prefix-v4 {n} is out of range: use 8 to 32"
            ))
        }
        None => p.prefix_v4,
    };
    p.prefix_v6 = match cli.source_prefix_v6.or(file.source_prefix_v6) {
        Some(n @ 16..=128) => n,
        Some(n) => {
            return Err(format!(
                "--source-prefix-v6 {n} is out of range: use 16 to 128"
            ))
        }
        None => p.prefix_v6,
    };
    p.summary_every = positive(
        "--refusal-log-interval",
        cli.refusal_log_interval.or(file.refusal_log_interval),
        p.summary_every,
    )?;
    Ok(p)
}

fn describe(spec: &FrontendSpec) -> String {
    match &spec.origin {
        Origin::Map(text) => text.clone(),
        o => format!("{} ({o})", spec.listen),
    }
}

/// The state directory: the command line's, the file's, `$STATE_DIRECTORY`
/// (the first of systemd's list), else /var/lib/tcpfwd.
fn state_dir(file: &Layer, cli: &Layer) -> PathBuf {
    match cli.state_dir.as_ref().or(file.state_dir.as_ref()) {
        Some(d) => d.clone(),
        None => default_state_dir(),
    }
}

/// The control socket's name in the runtime directory.
const CONTROL_NAME: &str = "control";

/// `$RUNTIME_DIRECTORY`, the first of systemd's list, when systemd gave one.
fn runtime_directory() -> Option<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY").and_then(|v| {
        v.to_str()
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// The control socket `tcpfwd status` asks by default: `control` in
/// `$RUNTIME_DIRECTORY`, else /run/tcpfwd/control (where the shipped unit's
/// `RuntimeDirectory=tcpfwd` puts it).
pub fn default_control_path() -> PathBuf {
    runtime_directory()
        .unwrap_or_else(|| PathBuf::from("/run/tcpfwd"))
        .join(CONTROL_NAME)
}

/// `$STATE_DIRECTORY` (the first of systemd's list), else /var/lib/tcpfwd.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            // systemd lists several directories separated by ':'; the first is ours.
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/tcpfwd"))
}

/// Resolves one route's settings and checks its names.
fn route(
    spec: &RouteSpec,
    s: &RouteSettings,
    sources: &SourcePolicy,
    state_dir: &std::path::Path,
) -> Result<Route, String> {
    let global = sources.limits;
    let at = &spec.origin;
    let positive = |name: &str, d: Option<Duration>, default: std::time::Duration| match d {
        None => Ok(default),
        Some(d) if d.0.is_zero() => Err(format!("{name} must be more than 0 ({at})")),
        Some(d) => Ok(d.0),
    };
    let builtin = Timeouts::default();
    let timeouts = Timeouts {
        handshake: positive(
            "--handshake-timeout",
            s.handshake_timeout,
            builtin.handshake,
        )?,
        connect: positive("--connect-timeout", s.connect_timeout, builtin.connect)?,
        idle: match s.idle_timeout.flatten() {
            None => None,
            Some(d) => Some(positive("--idle-timeout", Some(d), builtin.close)?),
        },
        close: positive("--close-timeout", s.close_timeout, builtin.close)?,
    };
    let mut alpn = Vec::new();
    for p in s.alpn.iter().flatten() {
        if p.is_empty() || p.len() > 255 {
            return Err(format!(
                "invalid --alpn '{p}' ({at}): a protocol name is 1 to 255 bytes, like http/1.1"
            ));
        }
        alpn.push(p.as_bytes().to_vec());
    }
    let mut names = Vec::with_capacity(spec.names.len());
    for n in &spec.names {
        let n = parse_route_name(n).map_err(|why| format!("{why} ({at})"))?;
        let n = SniName::new(&n);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let limits = SourceLimits {
        connections: match s.per_source_connections {
            Some(0) => return Err(format!("per_source_connections must be at least 1 ({at})")),
            Some(n) => n,
            None => global.connections,
        },
        per_minute: match s.per_source_rate {
            Some(0) => return Err(format!("per_source_rate must be at least 1 ({at})")),
            Some(n) => n,
            None => global.per_minute,
        },
    };
    let bans = BanRules {
        after: match s.ban_after {
            Some(0) => return Err(format!("ban_after must be at least 1 ({at})")),
            Some(n) => n,
            None => sources.bans.after,
        },
        first: positive("ban_time", s.ban_time, sources.bans.first)?,
        longest: positive("max_ban_time", s.max_ban_time, sources.bans.longest)?,
    };
    if bans.longest < bans.first {
        return Err(format!(
            "max_ban_time ({}) is shorter than ban_time ({}) ({at}); the cool-off doubles from ban_time up to max_ban_time",
            Duration(bans.longest),
            Duration(bans.first)
        ));
    }
    Ok(Route {
        // The route's own lists: its frontend's are checked at accept.
        access: access(&spec.settings),
        source_limits: (limits != global).then_some(limits),
        bans: (bans != sources.bans).then_some(bans),
        default: spec.default || names.is_empty(),
        names,
        backend: spec.backend.clone(),
        timeouts,
        proxy_protocol: s.proxy_protocol.flatten(),
        alpn,
        client_auth: match s.client_auth.clone().flatten() {
            None => None,
            Some(ClientAuthSpec::Family) => Some(ClientAuth::Family {
                dir: state_dir.join(crate::clientca::DIR_NAME),
            }),
            Some(ClientAuthSpec::Ca { ca, crl }) => Some(ClientAuth::Ca { ca, crl }),
        },
        // Linked once every frontend is known (`link_admissions`).
        admit_after: None,
        admission: None,
        origin: spec.origin.clone(),
    })
}

/// A route with `admit_after`, until the route it names is found.
struct Pending {
    /// Its frontend and its place there.
    at: (usize, usize),
    reference: RouteRef,
    window: Option<Duration>,
    /// Whether its own table (not an inherited setting) asks for client certificates.
    own_client_auth: bool,
}

/// The route `r` names: on the frontend listening there (by port alone
/// when the reference gives no address and one frontend has that port),
/// its route for the name, or its default (or only) route.
fn find_route(frontends: &[Frontend], r: &RouteRef) -> Result<(usize, usize), String> {
    let fi = frontends
        .iter()
        .position(|f| f.listen == r.listen)
        .or_else(|| {
            let by_port: Vec<usize> = (0..frontends.len())
                .filter(|&i| frontends[i].listen.port == r.listen.port)
                .collect();
            match by_port[..] {
                [only] if r.listen.addr.is_none() => Some(only),
                _ => None,
            }
        })
        .ok_or_else(|| {
            let listening: Vec<String> = frontends.iter().map(|f| f.listen.to_string()).collect();
            format!(
                "{}: no frontend listens on {} (they listen on {}); {ROUTE_REF_FORM}",
                r.said,
                r.listen,
                listening.join(", ")
            )
        })?;
    let f = &frontends[fi];
    let ri = match &r.name {
        Some(name) => {
            let want = SniName::new(name);
            f.routes.iter().position(|x| x.names.contains(&want))
        }
        None => match &f.routes[..] {
            [_] => Some(0),
            routes => routes.iter().position(|x| x.default),
        },
    };
    let ri = ri.ok_or_else(|| {
        let names: Vec<String> = f.routes.iter().map(Route::label).collect();
        format!(
            "{}: frontend {} has no route {} (its routes: {}); {ROUTE_REF_FORM}",
            r.said,
            f.listen,
            r.name.as_deref().unwrap_or("by default"),
            names.join(", ")
        )
    })?;
    Ok((fi, ri))
}

/// Resolves every `admit_after` to the route it names, which must ask for
/// client certificates. A route naming itself (a setting every route
/// inherits, like `--admit-after`) is the one that verifies: it keeps its
/// client certificates. Every other one asks for none.
fn link_admissions(frontends: &mut [Frontend], pending: Vec<Pending>) -> Result<(), String> {
    let mut links = Vec::new();
    for p in pending {
        let target = find_route(frontends, &p.reference)?;
        if target != p.at {
            links.push((p, target));
        }
    }
    for (p, (tf, tr)) in &links {
        let verifier = &frontends[*tf].routes[*tr];
        let listen = frontends[*tf].listen;
        let r = &p.reference;
        if links.iter().any(|(q, _)| q.at == (*tf, *tr)) {
            return Err(format!(
                "{}: route {} ({}) itself admits after another route; name the route that checks the client certificates",
                r.said, verifier.map_text(&listen), verifier.origin
            ));
        }
        if verifier.client_auth.is_none() {
            return Err(format!(
                "{}: route {} ({}) asks for no client certificate, so nobody passes it; give it client_auth = \"family\" or client_ca = \"FILE\" (--client-auth family or --client-ca FILE)",
                r.said, verifier.map_text(&listen), verifier.origin
            ));
        }
        if p.own_client_auth {
            let (fi, ri) = p.at;
            let me = &frontends[fi].routes[ri];
            return Err(format!(
                "{}: route {} ({}) also asks for client certificates itself; keep one: client_auth for certificates on this port too (the strict mode, which browsers do not meet on WebSockets), or admit_after",
                r.said, me.map_text(&frontends[fi].listen), me.origin
            ));
        }
        if p.window.is_some_and(|d| d.0.is_zero()) {
            return Err(format!("{}: admit_window must be more than 0", r.said));
        }
    }
    for (p, (tf, tr)) in links {
        let listen = frontends[tf].listen;
        let verifier = &mut frontends[tf].routes[tr];
        let scope = crate::policy::route_scope(&format!("{listen}/{}", verifier.label()));
        verifier.admission = Some(scope);
        let auth = verifier.client_auth.clone();
        let (fi, ri) = p.at;
        let me = &mut frontends[fi].routes[ri];
        // Checked above: the route named asks for client certificates.
        let Some(auth) = auth else { continue };
        me.client_auth = None;
        me.admit_after = Some(AdmitAfter {
            route: p.reference.text.clone(),
            scope,
            auth,
            window: p.window.map_or(ADMIT_WINDOW, |d| d.0),
        });
    }
    Ok(())
}

/// One frontend's routes: names unique, at most one default.
fn check_frontend(
    listen: Listen,
    routes: Vec<Route>,
    access: AccessList,
) -> Result<Frontend, String> {
    for (i, r) in routes.iter().enumerate() {
        for other in &routes[..i] {
            if r.default && other.default {
                return Err(format!(
                    "frontend {listen} has two default routes: {} and {}; give one of them server names, like --map {}:nas.example.org=nas.lan:5000",
                    other.origin, r.origin, listen
                ));
            }
            if let Some(n) = r.names.iter().find(|n| other.names.contains(n)) {
                return Err(format!(
                    "frontend {listen} has two routes for '{n}': {} and {}; each name may lead to one backend",
                    other.origin, r.origin
                ));
            }
        }
    }
    Ok(Frontend {
        listen,
        routes,
        access,
    })
}

/// ACME's settings: the command line's over the file's; names from both and
/// from every route.
fn acme(file: &Layer, cli: &Layer, frontends: &[Frontend]) -> Result<AcmeConfig, String> {
    let mut domains: Vec<String> = Vec::new();
    for d in file.acme.domains.iter().chain(cli.acme.domains.iter()) {
        let name = d.trim_end_matches('.').to_ascii_lowercase();
        if name.starts_with("*.") {
            return Err(format!(
                "invalid --acme-domain '{d}': TLS-ALPN-01 cannot prove wildcard names; list each name"
            ));
        }
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "invalid --acme-domain '{d}': an IP address; give it with --acme-ip instead"
            ));
        }
        if !valid_hostname(&name) || !name.contains('.') {
            return Err(format!(
                "invalid --acme-domain '{d}': not a fully qualified DNS name like cams.example.org"
            ));
        }
        if !domains.contains(&name) {
            domains.push(name);
        }
    }
    for f in frontends {
        for r in &f.routes {
            for n in &r.names {
                match n {
                    SniName::Exact(name) if !name.contains('.') => {
                        return Err(format!(
                            "route '{name}' ({}) cannot get an ACME certificate: not a fully qualified DNS name like cams.example.org",
                            r.origin
                        ))
                    }
                    SniName::Exact(name) => {
                        if !domains.contains(name) {
                            domains.push(name.clone());
                        }
                    }
                    SniName::Wildcard(_) => {
                        return Err(format!(
                            "route '{n}' ({}) cannot get an ACME certificate: TLS-ALPN-01 cannot prove wildcard names; list each name as its own route",
                            r.origin
                        ))
                    }
                }
            }
        }
    }
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for ip in file.acme.ips.iter().chain(cli.acme.ips.iter()) {
        check_acme_ip(*ip)?;
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }
    if domains.is_empty() && ips.is_empty() {
        return Err(
            "ACME has no names to ask for: give --acme-domain or --acme-ip (or domains or ips in [acme]), or routes with server names"
                .into(),
        );
    }
    let profile = cli.acme.profile.as_ref().or(file.acme.profile.as_ref());
    if let Some(p) = profile {
        check_acme_profile(p)?;
    }
    let email = cli.acme.email.as_ref().or(file.acme.email.as_ref());
    let contact = match email {
        None => None,
        Some(e) if e.contains('@') && !e.contains(char::is_whitespace) => {
            Some(format!("mailto:{}", e.trim_start_matches("mailto:")))
        }
        Some(e) => {
            return Err(format!(
                "invalid --acme-email '{e}': write an address like me@example.org"
            ))
        }
    };
    let staging = cli.acme.staging.or(file.acme.staging).unwrap_or(false);
    let directory = match cli.acme.directory.as_ref().or(file.acme.directory.as_ref()) {
        Some(url) => {
            if !url.starts_with("https://") {
                return Err(format!(
                    "invalid --acme-directory '{url}': ACME directories are https:// URLs"
                ));
            }
            url.clone()
        }
        None if staging => LETS_ENCRYPT_STAGING.to_string(),
        None => LETS_ENCRYPT.to_string(),
    };
    let kid = cli.acme.eab_kid.as_ref().or(file.acme.eab_kid.as_ref());
    let key = cli
        .acme
        .eab_hmac_key
        .as_ref()
        .or(file.acme.eab_hmac_key.as_ref());
    let eab = match (kid, key) {
        (Some(kid), Some(key)) => {
            use base64::Engine as _;
            let text = key.0.trim().trim_end_matches('=');
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|_| {
                    "invalid --acme-eab-hmac-key: not base64url; paste the key exactly as the CA shows it".to_string()
                })?;
            Some(Eab {
                kid: kid.clone(),
                hmac_key: HmacKey(bytes),
            })
        }
        (None, None) => None,
        _ => {
            return Err(
                "external account binding needs both the key identifier and the HMAC key (--acme-eab-kid and --acme-eab-hmac-key)"
                    .into(),
            )
        }
    };
    let state_dir = state_dir(file, cli);
    Ok(AcmeConfig {
        domains,
        ips,
        profile: profile.cloned(),
        contact,
        directory,
        ca_root: cli
            .acme
            .ca_root
            .clone()
            .or_else(|| file.acme.ca_root.clone()),
        eab,
        state_dir,
    })
}

/// An address a CA can reach and certify: not unspecified, not multicast.
pub(crate) fn check_acme_ip(ip: std::net::IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!(
            "invalid --acme-ip '{ip}': give the address clients connect to (not 0.0.0.0, :: or a multicast address)"
        ));
    }
    Ok(())
}

/// A profile name as the directory lists it: letters, digits, '-', '_', '.'.
pub(crate) fn check_acme_profile(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 64
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!(
            "invalid --acme-profile '{p}': give a profile name the CA lists, like classic, tlsserver or shortlived"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MapSpec;

    fn map_layer(maps: &[&str]) -> Layer {
        Layer {
            frontends: maps
                .iter()
                .map(|m| {
                    let spec: MapSpec = m.parse().unwrap();
                    FrontendSpec {
                        listen: spec.listen,
                        settings: RouteSettings::default(),
                        routes: vec![RouteSpec {
                            names: spec.names.clone(),
                            default: false,
                            backend: spec.backend.clone(),
                            settings: RouteSettings::default(),
                            origin: Origin::Map(m.to_string()),
                        }],
                        origin: Origin::Map(m.to_string()),
                    }
                })
                .collect(),
            ..Layer::default()
        }
    }

    #[test]
    fn maps_on_one_port_share_a_frontend_by_name() {
        let c = build(
            None,
            map_layer(&[
                "443:dvr.lan:80",
                "443:nas.example.org=nas.lan:5000",
                "7682:dvr.lan:7681",
            ]),
        )
        .unwrap();
        assert_eq!(c.frontends.len(), 2);
        let f = &c.frontends[0];
        assert_eq!(f.routes.len(), 2);
        assert!(f.routes[0].default && f.routes[0].names.is_empty());
        assert!(!f.routes[1].default);
        assert_eq!(f.routes[1].label(), "nas.example.org");
        assert_eq!(
            f.routes[1].map_text(&f.listen),
            "443:nas.example.org=nas.lan:5000"
        );
    }

    #[test]
    fn conflicts_name_both_places() {
        let e = build(None, map_layer(&["443:a:80", "443:b:80"])).unwrap_err();
        assert!(e.contains("two default routes"), "{e}");
        assert!(
            e.contains("--map '443:a:80'") && e.contains("--map '443:b:80'"),
            "{e}"
        );
        let e = build(None, map_layer(&["443:x.org=a:80", "443:X.org.=b:80"])).unwrap_err();
        assert!(e.contains("two routes for 'x.org'"), "{e}");
        let e = build(None, map_layer(&["8443:a:80", "127.0.0.1:8443:b:80"])).unwrap_err();
        assert!(e.contains("both listen on port 8443"), "{e}");
    }

    #[test]
    fn settings_route_over_frontend_over_cli_over_file() {
        let mut file = map_layer(&["443:a:80"]);
        file.defaults.idle_timeout = Some(Some("1h".parse().unwrap()));
        file.defaults.close_timeout = Some("9s".parse().unwrap());
        file.frontends[0].settings.connect_timeout = Some("2s".parse().unwrap());
        file.frontends[0].routes[0].settings.close_timeout = Some("3s".parse().unwrap());
        let mut cli = map_layer(&["444:b:80"]);
        cli.defaults.idle_timeout = Some(Some("5m".parse().unwrap()));
        let c = build(Some(file), cli).unwrap();
        let a = &c.frontends[0].routes[0].timeouts;
        let b = &c.frontends[1].routes[0].timeouts;
        let s = std::time::Duration::from_secs;
        assert_eq!(a.idle, Some(s(300)));
        assert_eq!(a.connect, s(2));
        assert_eq!(a.close, s(3));
        assert_eq!(b.idle, Some(s(300)));
        assert_eq!(b.close, s(9));
        assert_eq!(b.connect, s(5));
    }

    #[test]
    fn source_limits_default_from_max_connections_and_tighten_per_route() {
        let c = build(None, map_layer(&["443:a:80"])).unwrap();
        assert_eq!(c.sources.limits.connections, 64);
        assert_eq!(c.frontends[0].routes[0].source_limits, None);
        let mut cli = map_layer(&["443:a:80", "444:b:80"]);
        cli.max_connections = Some(10);
        cli.frontends[1].routes[0].settings.per_source_rate = Some(5);
        cli.defaults.deny = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        let c = build(None, cli).unwrap();
        assert_eq!(c.sources.limits.connections, 2);
        let own = c.frontends[1].routes[0].source_limits.unwrap();
        assert_eq!((own.connections, own.per_minute), (2, 5));
        for f in &c.frontends {
            assert_eq!(f.access.deny.len(), 1, "--deny is for every --map");
        }
        let mut bad = map_layer(&["443:a:80"]);
        bad.defaults.ban_time = Some("2h".parse().unwrap());
        let e = build(None, bad).unwrap_err();
        assert!(e.contains("--max-ban-time"), "{e}");
    }

    fn reference(text: &str) -> RouteRef {
        let (listen, name) = super::super::map::parse_route_ref(text).unwrap();
        RouteRef {
            text: text.into(),
            listen,
            name,
            said: format!("--admit-after '{text}'"),
        }
    }

    #[test]
    fn admit_after_links_to_the_route_named_which_keeps_its_certificates() {
        let mut cli = map_layer(&[
            "443:dvr.lan:80",
            "443:nas.example.org=nas.lan:5000",
            "7682:dvr.lan:7681",
        ]);
        cli.defaults.client_auth = Some(Some(ClientAuthSpec::Family));
        cli.defaults.admit_after = Some(Some(reference("443")));
        cli.state_dir = Some("/s".into());
        let c = build(None, cli.clone()).unwrap();
        let dvr = &c.frontends[0].routes[0];
        let nas = &c.frontends[0].routes[1];
        let ws = &c.frontends[1].routes[0];
        let family = ClientAuth::Family {
            dir: "/s/family-ca".into(),
        };
        // The route named checks certificates and records who passed.
        assert_eq!(dvr.client_auth.as_ref(), Some(&family));
        assert!(dvr.admit_after.is_none());
        let scope = dvr.admission.unwrap();
        // Every other one asks for none and admits after it.
        for r in [nas, ws] {
            assert_eq!(r.client_auth, None);
            let a = r.admit_after.as_ref().unwrap();
            assert_eq!((a.route.as_str(), a.scope), ("443", scope));
            assert_eq!(a.auth, family);
            assert_eq!(a.window, ADMIT_WINDOW);
            assert_eq!(r.admission, None);
        }
        // By server name, with its own window; the scope does not depend on the backend.
        cli.defaults.admit_after = Some(Some(reference("443:NAS.example.org")));
        cli.defaults.admit_window = Some("2s".parse().unwrap());
        let c = build(None, cli.clone()).unwrap();
        assert!(c.frontends[0].routes[1].admit_after.is_none());
        let ws = c.frontends[1].routes[0].admit_after.as_ref().unwrap();
        assert_eq!(ws.window, std::time::Duration::from_secs(2));
        assert_eq!(Some(ws.scope), c.frontends[0].routes[1].admission);
        assert_ne!(Some(ws.scope), Some(scope));
        // Errors quote the reference and say where it was.
        for (text, want) in [
            ("444", "--admit-after '444': no frontend listens on 444"),
            (
                "443:cams.example.org",
                "frontend 443 has no route cams.example.org",
            ),
        ] {
            cli.defaults.admit_after = Some(Some(reference(text)));
            let e = build(None, cli.clone()).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        cli.defaults.admit_after = Some(Some(reference("443")));
        cli.defaults.admit_window = Some("0".parse().unwrap());
        let e = build(None, cli.clone()).unwrap_err();
        assert!(e.contains("admit_window must be more than 0"), "{e}");
        cli.defaults.admit_window = None;
        cli.defaults.client_auth = None;
        let e = build(None, cli.clone()).unwrap_err();
        assert!(e.contains("asks for no client certificate"), "{e}");
        // Its own table says both: one has to go.
        cli.defaults.client_auth = Some(Some(ClientAuthSpec::Family));
        cli.frontends[2].routes[0].settings.client_auth = Some(Some(ClientAuthSpec::Family));
        let e = build(None, cli).unwrap_err();
        assert!(
            e.contains("also asks for client certificates itself"),
            "{e}"
        );
    }

    #[test]
    fn acme_takes_route_names_and_refuses_wildcards() {
        let mut cli = map_layer(&["443:dvr.lan:80", "443:nas.example.org=nas.lan:5000"]);
        cli.acme.enabled = true;
        cli.acme.domains = vec!["Cams.Example.org.".into()];
        let c = build(None, cli.clone()).unwrap();
        let CertSource::Acme(a) = &c.cert else {
            panic!("{c:?}")
        };
        assert_eq!(a.domains, ["cams.example.org", "nas.example.org"]);
        let mut bad = map_layer(&["443:*.example.org=web:80"]);
        bad.acme.enabled = true;
        let e = build(None, bad).unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
    }
}
