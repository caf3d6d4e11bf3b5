//! The configuration file (TOML), read into a [`Layer`]; every error points
//! at FILE:LINE:COLUMN, names the key and quotes the line.
//!
//! The tables deserialise into plain structs (every one `deny_unknown_fields`)
//! whose checked values are `Spanned` strings, then each value is parsed here
//! with its position at hand. `layer::build` does the checks that need both
//! sources (names unique, one default, overlapping listeners).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::layer::{
    AcmeLayer, ClientAuthSpec, FrontendSpec, Layer, RouteRef, RouteSettings, RouteSpec,
    MAX_CONNECTIONS, MAX_THREADS,
};
use super::map::{parse_backend, parse_listen, parse_route_name, parse_route_ref, valid_hostname};
use super::{
    printable, CertPair, CipherPreference, Duration, LogFormat, Origin, ProxyProtocol, Secret,
};
use crate::policy::Cidr;

/// Reads `path` into a layer; the error names the file, line and column.
pub fn load(path: &Path) -> Result<Layer, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; check the path and that tcpfwd's user may read it",
            path.display()
        )
    })?;
    parse(&text, path)
}

/// Parses the text of the file at `path` (relative paths in it are taken
/// from `path`'s directory).
pub fn parse(text: &str, path: &Path) -> Result<Layer, String> {
    let src = Source::new(text, path);
    let doc: TopDoc = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    doc.into_layer(&src)
}

/// The file's text and where it lives, for positions and relative paths.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
    dir: PathBuf,
}

impl<'a> Source<'a> {
    fn new(text: &'a str, path: &'a Path) -> Source<'a> {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Source { text, path, dir }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn origin(&self, span: &Range<usize>) -> Origin {
        let (line, column) = self.position(span.start);
        Origin::File {
            path: self.path.to_path_buf(),
            line,
            column,
        }
    }

    /// `FILE:LINE:COLUMN: message`, then the line with the span underlined.
    /// Control characters in the message (a value's `\n` quoted in it) and
    /// in the line are shown escaped, so the form stays three lines.
    fn error(&self, span: &Range<usize>, message: impl fmt::Display) -> String {
        let (line, column) = self.position(span.start);
        let message = message.to_string();
        let message = printable(&message);
        let raw = self.text.lines().nth(line - 1).unwrap_or("");
        let content: String = raw
            .chars()
            .map(|c| {
                if c.is_control() && c != '\t' {
                    '\u{fffd}'
                } else {
                    c
                }
            })
            .collect();
        let gutter = line.to_string().len();
        let start = column - 1;
        let width = self
            .text
            .get(span.clone())
            .map_or(1, |s| s.lines().next().unwrap_or("").chars().count().max(1));
        let width = width.min(content.chars().count().saturating_sub(start).max(1));
        format!(
            "{}:{line}:{column}: {message}\n {line:>gutter$} | {content}\n {:gutter$} | {}{}",
            self.path.display(),
            "",
            " ".repeat(start),
            "^".repeat(width)
        )
    }

    /// A path from the file, taken from the file's directory when relative.
    fn path_of(&self, p: &Spanned<String>, key: &str) -> Result<PathBuf, String> {
        if p.get_ref().is_empty() {
            return Err(self.error(&p.span(), format!("`{key}` is empty: expected a file path")));
        }
        Ok(self.dir.join(p.get_ref()))
    }

    /// The toml crate's error, in our form: position, key, what is expected.
    fn toml_error(&self, e: &toml::de::Error) -> String {
        let msg = e.message().trim();
        let span = e.span();
        let text = if msg.starts_with("unknown field") {
            unknown_key(msg)
        } else if let Some(rest) = msg.strip_prefix("missing field ") {
            let key = rest.trim_matches('`');
            format!("missing key `{key}`{}", missing_hint(key))
        } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
            let what = readable_expectation(msg);
            match span.as_ref().and_then(|s| self.key_at(s.start)) {
                Some(key) => format!("`{key}`: {what}"),
                None => what,
            }
        } else {
            format!("invalid TOML: {}", msg.replace('\n', "; "))
        };
        match span {
            Some(s) => self.error(&s, text),
            None => format!("{}: {}", self.path.display(), printable(&text)),
        }
    }

    /// The key whose value holds `offset`: the `KEY =` on its line, or on
    /// the nearest line above it (for arrays over several lines).
    fn key_at(&self, offset: usize) -> Option<String> {
        let (line, _) = self.position(offset);
        let lines: Vec<&str> = self.text.lines().take(line).collect();
        for (i, l) in lines.iter().enumerate().rev() {
            let t = l.trim_start();
            if t.starts_with('[') && i + 1 != line {
                return None;
            }
            if let Some((key, _)) = t.split_once('=') {
                let key = key.trim();
                if !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.\"'".contains(c))
                {
                    return Some(key.to_string());
                }
            }
        }
        None
    }
}

/// The keys each table allows, for suggestions and for "belongs in".
const ROUTE_SETTINGS: &[&str] = &[
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "close_timeout",
    "proxy_protocol",
    "alpn",
    "allow",
    "deny",
    "per_source_connections",
    "per_source_rate",
    "ban_after",
    "ban_time",
    "max_ban_time",
    "client_auth",
    "client_ca",
    "client_crl",
    "admit_after",
    "admit_window",
];
const TABLES: &[(&str, &[&str])] = &[
    (
        "the top level",
        &[
            "max_connections",
            "threads",
            "shutdown_timeout",
            "cipher_preference",
            "log_level",
            "log_format",
            "source_prefix_v4",
            "source_prefix_v6",
            "metrics",
            "control",
            "self_signed_names",
            "state_dir",
            "cert",
            "acme",
            "frontend",
        ],
    ),
    ("[[frontend]]", &["listen", "route"]),
    ("[[frontend.route]]", &["sni", "default", "backend"]),
    ("[[cert]]", &["cert", "key"]),
    (
        "[acme]",
        &[
            "domains",
            "email",
            "directory",
            "staging",
            "ca_root",
            "eab_kid",
            "eab_hmac_key",
            "ips",
            "profile",
        ],
    ),
];

/// serde's "unknown field `x`, expected one of `a`, `b`" with the nearest key.
fn unknown_key(msg: &str) -> String {
    let quoted: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    let Some((key, expected)) = quoted.split_first() else {
        return msg.to_string();
    };
    let nearest = expected
        .iter()
        .map(|e| (edit_distance(key, e), *e))
        .min()
        .filter(|(d, e)| *d <= key.len().max(e.len()).div_ceil(3).max(1));
    if let Some((_, near)) = nearest {
        return format!("unknown key `{key}`; did you mean `{near}`?");
    }
    let elsewhere: Vec<&str> = TABLES
        .iter()
        .filter(|(_, keys)| keys.contains(key))
        .map(|(t, _)| *t)
        .chain(
            ROUTE_SETTINGS
                .contains(key)
                .then_some("the top level, [[frontend]] or [[frontend.route]]"),
        )
        .collect();
    if let Some(place) = elsewhere.first() {
        return format!("key `{key}` is not allowed here; it belongs in {place}");
    }
    let valid: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
    format!(
        "unknown key `{key}`; the keys allowed here are {}",
        valid.join(", ")
    )
}

fn missing_hint(key: &str) -> &'static str {
    match key {
        "backend" => {
            ": every [[frontend.route]] needs backend = \"HOST:PORT\", like \"nas.lan:5000\""
        }
        "listen" => {
            ": every [[frontend]] needs listen = \"PORT\", \"IPV4:PORT\" or \"[IPV6]:PORT\""
        }
        "cert" | "key" => ": every [[cert]] needs both cert = \"FILE\" and key = \"FILE\"",
        _ => "",
    }
}

/// serde's type names in words a person reading a TOML file knows.
fn readable_expectation(msg: &str) -> String {
    msg.replace("expected i64", "expected a whole number")
        .replace(
            "expected a sequence",
            "expected an array like [\"a\", \"b\"]",
        )
        .replace("expected a boolean", "expected true or false")
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Declares a table that also takes the route settings (the top level, a
/// frontend and a route); serde cannot `flatten` under `deny_unknown_fields`.
macro_rules! with_route_settings {
    (
        $(#[$meta:meta])*
        struct $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }
    ) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        $(#[$meta])*
        struct $name {
            $($(#[$fmeta])* $field: $ty,)*
            handshake_timeout: Option<Spanned<String>>,
            connect_timeout: Option<Spanned<String>>,
            idle_timeout: Option<Spanned<String>>,
            close_timeout: Option<Spanned<String>>,
            proxy_protocol: Option<Spanned<String>>,
            alpn: Option<Vec<Spanned<String>>>,
            allow: Option<Vec<Spanned<String>>>,
            deny: Option<Vec<Spanned<String>>>,
            per_source_connections: Option<Spanned<i64>>,
            per_source_rate: Option<Spanned<i64>>,
            ban_after: Option<Spanned<i64>>,
            ban_time: Option<Spanned<String>>,
            max_ban_time: Option<Spanned<String>>,
            client_auth: Option<Spanned<String>>,
            client_ca: Option<Spanned<String>>,
            client_crl: Option<Spanned<String>>,
            admit_after: Option<Spanned<String>>,
            admit_window: Option<Spanned<String>>,
        }

        impl $name {
            fn settings(&self, src: &Source) -> Result<RouteSettings, String> {
                Ok(RouteSettings {
                    handshake_timeout: timeout(src, "handshake_timeout", &self.handshake_timeout)?,
                    connect_timeout: timeout(src, "connect_timeout", &self.connect_timeout)?,
                    idle_timeout: self
                        .idle_timeout
                        .as_ref()
                        .map(|v| off_or(v, |v| positive(src, "idle_timeout", v)))
                        .transpose()?,
                    close_timeout: timeout(src, "close_timeout", &self.close_timeout)?,
                    proxy_protocol: self
                        .proxy_protocol
                        .as_ref()
                        .map(|v| {
                            off_or(v, |v| {
                                choice::<ProxyProtocol>(src, "proxy_protocol", v, "\"v1\", \"v2\" or \"off\"")
                            })
                        })
                        .transpose()?,
                    alpn: self.alpn.as_ref().map(|list| alpn(src, list)).transpose()?,
                    allow: self.allow.as_ref().map(|l| cidrs(src, "allow", l)).transpose()?,
                    deny: self.deny.as_ref().map(|l| cidrs(src, "deny", l)).transpose()?,
                    per_source_connections: self
                        .per_source_connections
                        .as_ref()
                        .map(|v| count(src, "per_source_connections", v, i64::from(MAX_CONNECTIONS)))
                        .transpose()?,
                    per_source_rate: self
                        .per_source_rate
                        .as_ref()
                        .map(|v| count(src, "per_source_rate", v, 1_000_000_000))
                        .transpose()?,
                    ban_after: self
                        .ban_after
                        .as_ref()
                        .map(|v| count(src, "ban_after", v, 1_000_000))
                        .transpose()?,
                    ban_time: timeout(src, "ban_time", &self.ban_time)?,
                    max_ban_time: timeout(src, "max_ban_time", &self.max_ban_time)?,
                    client_auth: client_auth(
                        src,
                        self.client_auth.as_ref(),
                        self.client_ca.as_ref(),
                        self.client_crl.as_ref(),
                    )?,
                    admit_after: self
                        .admit_after
                        .as_ref()
                        .map(|v| {
                            if v.get_ref() == "off" {
                                Ok(None)
                            } else {
                                route_ref(src, v).map(Some)
                            }
                        })
                        .transpose()?,
                    admit_window: timeout(src, "admit_window", &self.admit_window)?,
                })
            }
        }
    };
}

with_route_settings! {
    /// The top level: process-wide settings and defaults for every route.
    #[serde(expecting = "a TOML document")]
    struct TopDoc {
        max_connections: Option<Spanned<i64>>,
        threads: Option<Spanned<i64>>,
        shutdown_timeout: Option<Spanned<String>>,
        cipher_preference: Option<Spanned<String>>,
        log_level: Option<Spanned<String>>,
        log_format: Option<Spanned<String>>,
        source_prefix_v4: Option<Spanned<i64>>,
        source_prefix_v6: Option<Spanned<i64>>,
        metrics: Option<Spanned<String>>,
        control: Option<Spanned<String>>,
        self_signed_names: Option<Vec<Spanned<String>>>,
        state_dir: Option<Spanned<String>>,
        cert: Option<Vec<CertDoc>>,
        acme: Option<Spanned<AcmeDoc>>,
        frontend: Option<Vec<Spanned<FrontendDoc>>>,
    }
}

with_route_settings! {
    /// `[[frontend]]`: a listening address, defaults for its routes, the routes.
    #[serde(expecting = "a [[frontend]] table")]
    struct FrontendDoc {
        listen: Spanned<String>,
        route: Option<Vec<Spanned<RouteDoc>>>,
    }
}

with_route_settings! {
    /// `[[frontend.route]]`: which names reach which backend.
    #[serde(expecting = "a [[frontend.route]] table")]
    struct RouteDoc {
        sni: Option<Vec<Spanned<String>>>,
        default: Option<bool>,
        backend: Spanned<String>,
    }
}

/// `[[cert]]`: one PEM chain and its key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[cert]] table with cert and key")]
struct CertDoc {
    cert: Spanned<String>,
    key: Spanned<String>,
}

/// `[acme]`: its presence turns ACME on. No `Debug`: it holds the EAB key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [acme] table")]
struct AcmeDoc {
    domains: Option<Vec<Spanned<String>>>,
    ips: Option<Vec<Spanned<String>>>,
    profile: Option<Spanned<String>>,
    email: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    staging: Option<bool>,
    ca_root: Option<Spanned<String>>,
    eab_kid: Option<String>,
    eab_hmac_key: Option<String>,
}

const DURATION_FORM: &str = "expected a duration like 500ms, 10s, 5m or 1h30m";

fn duration(src: &Source, key: &str, v: &Spanned<String>) -> Result<Duration, String> {
    v.get_ref().parse::<Duration>().map_err(|_| {
        src.error(
            &v.span(),
            format!("`{key}` = \"{}\": {DURATION_FORM}", v.get_ref()),
        )
    })
}

fn positive(src: &Source, key: &str, v: &Spanned<String>) -> Result<Duration, String> {
    let d = duration(src, key, v)?;
    if d.0.is_zero() {
        return Err(src.error(
            &v.span(),
            format!("`{key}` must be more than 0: {DURATION_FORM}"),
        ));
    }
    Ok(d)
}

fn timeout(
    src: &Source,
    key: &str,
    v: &Option<Spanned<String>>,
) -> Result<Option<Duration>, String> {
    v.as_ref().map(|v| positive(src, key, v)).transpose()
}

/// `"off"` turns an inherited setting off; anything else goes to `parse`.
fn off_or<T>(
    v: &Spanned<String>,
    parse: impl FnOnce(&Spanned<String>) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if v.get_ref() == "off" {
        Ok(None)
    } else {
        parse(v).map(Some).map_err(|e| {
            // Say that "off" is allowed too, where the message lists the forms.
            e.replacen(DURATION_FORM, &format!("{DURATION_FORM}, or \"off\""), 1)
        })
    }
}

/// One of an enum's names, by its `FromStr`.
fn choice<T: std::str::FromStr>(
    src: &Source,
    key: &str,
    v: &Spanned<String>,
    expected: &str,
) -> Result<T, String> {
    v.get_ref().parse::<T>().map_err(|_| {
        src.error(
            &v.span(),
            format!("`{key}` = \"{}\": expected {expected}", v.get_ref()),
        )
    })
}

/// `client_auth = "family" | "off"`, `client_ca = FILE` (with `client_crl`).
fn client_auth(
    src: &Source,
    auth: Option<&Spanned<String>>,
    ca: Option<&Spanned<String>>,
    crl: Option<&Spanned<String>>,
) -> Result<Option<Option<ClientAuthSpec>>, String> {
    if let (Some(crl), None) = (crl, ca) {
        return Err(src.error(
            &crl.span(),
            "`client_crl` needs `client_ca` in the same table: the CRL of which CA?",
        ));
    }
    match (auth, ca) {
        (None, None) => Ok(None),
        (Some(a), Some(_)) if a.get_ref() != "ca" => Err(src.error(
            &a.span(),
            "`client_auth` and `client_ca` both choose the CA: keep `client_ca = \"FILE\"` for your own CA, or `client_auth = \"family\"` for tcpfwd's",
        )),
        (_, Some(ca)) => Ok(Some(Some(ClientAuthSpec::Ca {
            ca: src.path_of(ca, "client_ca")?,
            crl: crl.map(|c| src.path_of(c, "client_crl")).transpose()?,
        }))),
        (Some(a), None) => match a.get_ref().as_str() {
            "family" => Ok(Some(Some(ClientAuthSpec::Family))),
            "off" => Ok(Some(None)),
            other => Err(src.error(
                &a.span(),
                format!(
                    "`client_auth` = \"{other}\": expected \"family\" (tcpfwd's own CA; see `tcpfwd client-cert new`) or \"off\"; for your own CA write client_ca = \"FILE\""
                ),
            )),
        },
    }
}

/// `admit_after = "LISTEN"` or `"LISTEN:NAME"`; whether that route exists
/// is checked with every frontend at hand (`layer::build`), with this place.
fn route_ref(src: &Source, v: &Spanned<String>) -> Result<RouteRef, String> {
    let text = v.get_ref();
    let (listen, name) = parse_route_ref(text)
        .map_err(|why| src.error(&v.span(), format!("`admit_after`: {why}, or \"off\"")))?;
    let (line, column) = src.position(v.span().start);
    Ok(RouteRef {
        text: text.clone(),
        listen,
        name,
        said: format!(
            "{}:{line}:{column}: `admit_after` = \"{text}\"",
            src.path.display()
        ),
    })
}

fn alpn(src: &Source, list: &[Spanned<String>]) -> Result<Vec<String>, String> {
    list.iter()
        .map(|p| {
            let len = p.get_ref().len();
            if len == 0 || len > 255 {
                Err(src.error(
                    &p.span(),
                    "`alpn`: expected a protocol name of 1 to 255 bytes, like \"http/1.1\"",
                ))
            } else {
                Ok(p.get_ref().clone())
            }
        })
        .collect()
}

/// An array of CIDR blocks; the error points at the bad one.
fn cidrs(src: &Source, key: &str, list: &[Spanned<String>]) -> Result<Vec<Cidr>, String> {
    list.iter()
        .map(|c| {
            c.get_ref()
                .parse::<Cidr>()
                .map_err(|why| src.error(&c.span(), format!("`{key}`: {why}")))
        })
        .collect()
}

/// A whole number from 1 to `max`, as a u32.
fn count(src: &Source, key: &str, v: &Spanned<i64>, max: i64) -> Result<u32, String> {
    u32::try_from(in_range(src, key, v, max)?)
        .map_err(|_| src.error(&v.span(), format!("`{key}` is out of range")))
}

/// A prefix length from `min` to `max`.
fn prefix(src: &Source, key: &str, v: &Spanned<i64>, min: u8, max: u8) -> Result<u8, String> {
    let n = *v.get_ref();
    u8::try_from(n)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            src.error(
                &v.span(),
                format!("`{key}` = {n} is out of range: expected {min} to {max}"),
            )
        })
}

fn in_range(src: &Source, key: &str, v: &Spanned<i64>, max: i64) -> Result<i64, String> {
    let n = *v.get_ref();
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(src.error(
            &v.span(),
            format!("`{key}` = {n} is out of range: expected 1 to {max}"),
        ))
    }
}

impl TopDoc {
    fn into_layer(self, src: &Source) -> Result<Layer, String> {
        let defaults = self.settings(src)?;
        let max_connections = match &self.max_connections {
            Some(v) => Some(
                u32::try_from(in_range(
                    src,
                    "max_connections",
                    v,
                    i64::from(MAX_CONNECTIONS),
                )?)
                .map_err(|_| src.error(&v.span(), "`max_connections` is out of range"))?,
            ),
            None => None,
        };
        let threads = match &self.threads {
            Some(v) => Some(
                u16::try_from(in_range(src, "threads", v, i64::from(MAX_THREADS))?)
                    .map_err(|_| src.error(&v.span(), "`threads` is out of range"))?,
            ),
            None => None,
        };
        let log_level = match &self.log_level {
            Some(v) => {
                let level = v.get_ref().to_ascii_lowercase();
                if !["error", "warn", "info", "debug", "trace", "off"].contains(&level.as_str()) {
                    return Err(src.error(
                        &v.span(),
                        format!(
                            "`log_level` = \"{}\": expected error, warn, info, debug or trace",
                            v.get_ref()
                        ),
                    ));
                }
                Some(level)
            }
            None => None,
        };
        let mut certs = Vec::new();
        for c in self.cert.iter().flatten() {
            certs.push(CertPair {
                cert: src.path_of(&c.cert, "cert")?,
                key: src.path_of(&c.key, "key")?,
            });
        }
        if let (Some(a), false) = (&self.acme, certs.is_empty()) {
            return Err(src.error(
                &a.span(),
                "[acme] and [[cert]] both say where the certificates come from: keep one",
            ));
        }
        let mut frontends = Vec::new();
        for f in self.frontend.iter().flatten() {
            frontends.push(frontend(src, f)?);
        }
        Ok(Layer {
            frontends,
            defaults,
            certs,
            self_signed_names: self
                .self_signed_names
                .iter()
                .flatten()
                .map(|n| n.get_ref().clone())
                .collect(),
            acme: match &self.acme {
                Some(a) => acme(src, a)?,
                None => AcmeLayer::default(),
            },
            state_dir: self
                .state_dir
                .as_ref()
                .map(|d| src.path_of(d, "state_dir"))
                .transpose()?,
            control: self
                .control
                .as_ref()
                .map(|d| src.path_of(d, "control"))
                .transpose()?,
            cipher_preference: self
                .cipher_preference
                .as_ref()
                .map(|v| {
                    choice::<CipherPreference>(
                        src,
                        "cipher_preference",
                        v,
                        "\"auto\", \"aes\" or \"chacha\"",
                    )
                })
                .transpose()?,
            shutdown_timeout: self
                .shutdown_timeout
                .as_ref()
                .map(|v| duration(src, "shutdown_timeout", v))
                .transpose()?,
            max_connections,
            threads,
            log_level,
            log_format: self
                .log_format
                .as_ref()
                .map(|v| choice::<LogFormat>(src, "log_format", v, "\"text\" or \"json\""))
                .transpose()?,
            source_prefix_v4: self
                .source_prefix_v4
                .as_ref()
                .map(|v| prefix(src, "source_prefix_v4", v, 8, 32))
                .transpose()?,
            source_prefix_v6: self
                .source_prefix_v6
                .as_ref()
                .map(|v| prefix(src, "source_prefix_v6", v, 16, 128))
                .transpose()?,
            refusal_log_interval: None,
            metrics: self
                .metrics
                .as_ref()
                .map(|v| {
                    v.get_ref().parse().map_err(|_| {
                        src.error(
                            &v.span(),
                            "`metrics`: expected ADDR:PORT, such as \"127.0.0.1:9100\" or \"[::1]:9100\"",
                        )
                    })
                })
                .transpose()?,
            file: Some(src.path.to_path_buf()),
        })
    }
}

fn frontend(src: &Source, f: &Spanned<FrontendDoc>) -> Result<FrontendSpec, String> {
    let doc = f.get_ref();
    let listen = parse_listen(doc.listen.get_ref())
        .map_err(|why| src.error(&doc.listen.span(), format!("`listen`: {why}")))?;
    let mut routes = Vec::new();
    for r in doc.route.iter().flatten() {
        routes.push(route(src, r)?);
    }
    Ok(FrontendSpec {
        listen,
        settings: doc.settings(src)?,
        routes,
        origin: src.origin(&f.span()),
    })
}

fn route(src: &Source, r: &Spanned<RouteDoc>) -> Result<RouteSpec, String> {
    let doc = r.get_ref();
    let backend = parse_backend(doc.backend.get_ref())
        .map_err(|why| src.error(&doc.backend.span(), format!("`backend`: {why}")))?;
    let mut names = Vec::new();
    for n in doc.sni.iter().flatten() {
        names.push(
            parse_route_name(n.get_ref())
                .map_err(|why| src.error(&n.span(), format!("`sni`: {why}")))?,
        );
    }
    Ok(RouteSpec {
        names,
        default: doc.default.unwrap_or(false),
        backend,
        settings: doc.settings(src)?,
        origin: src.origin(&r.span()),
    })
}

fn acme(src: &Source, a: &Spanned<AcmeDoc>) -> Result<AcmeLayer, String> {
    let doc = a.get_ref();
    let mut domains = Vec::new();
    for d in doc.domains.iter().flatten() {
        let name = d.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let why = if name.starts_with("*.") {
            Some("TLS-ALPN-01 cannot prove wildcard names; list each name")
        } else if name.parse::<std::net::IpAddr>().is_ok() {
            Some("an IP address; put it in `ips` instead")
        } else if !valid_hostname(&name) || !name.contains('.') {
            Some("expected a fully qualified DNS name like cams.example.org")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(src.error(&d.span(), format!("`domains`: '{}': {why}", d.get_ref())));
        }
        domains.push(name);
    }
    let mut ips = Vec::new();
    for a in doc.ips.iter().flatten() {
        let ip = a.get_ref().parse::<std::net::IpAddr>().map_err(|_| {
            src.error(
                &a.span(),
                format!(
                    "`ips`: '{}': expected an IP address like 203.0.113.7 or 2001:db8::7",
                    a.get_ref()
                ),
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(src.error(
                &a.span(),
                format!("`ips`: '{ip}': expected the address clients connect to (not 0.0.0.0, :: or multicast)"),
            ));
        }
        ips.push(ip);
    }
    if let Some(p) = &doc.profile {
        if super::layer::check_acme_profile(p.get_ref()).is_err() {
            return Err(src.error(
                &p.span(),
                format!(
                    "`profile` = \"{}\": expected a profile name the CA lists, like classic or shortlived",
                    p.get_ref()
                ),
            ));
        }
    }
    if let Some(e) = &doc.email {
        let text = e.get_ref();
        if !text.contains('@') || text.contains(char::is_whitespace) {
            return Err(src.error(
                &e.span(),
                format!("`email` = \"{text}\": expected an address like me@example.org"),
            ));
        }
    }
    if let Some(d) = &doc.directory {
        if !d.get_ref().starts_with("https://") {
            return Err(src.error(
                &d.span(),
                format!(
                    "`directory` = \"{}\": expected an https:// URL",
                    d.get_ref()
                ),
            ));
        }
        if doc.staging == Some(true) {
            return Err(src.error(
                &d.span(),
                "`directory` and `staging = true` both choose the CA: keep one",
            ));
        }
    }
    if doc.eab_kid.is_some() != doc.eab_hmac_key.is_some() {
        return Err(src.error(
            &a.span(),
            "external account binding needs both `eab_kid` and `eab_hmac_key` in [acme]",
        ));
    }
    Ok(AcmeLayer {
        enabled: true,
        domains,
        ips,
        profile: doc.profile.as_ref().map(|p| p.get_ref().clone()),
        email: doc.email.as_ref().map(|e| e.get_ref().clone()),
        directory: doc.directory.as_ref().map(|d| d.get_ref().clone()),
        staging: doc.staging,
        ca_root: doc
            .ca_root
            .as_ref()
            .map(|p| src.path_of(p, "ca_root"))
            .transpose()?,
        eab_kid: doc.eab_kid.clone(),
        eab_hmac_key: doc.eab_hmac_key.clone().map(Secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{layer, Backend, BackendHost, CertSource, Listen};

    const FULL: &str = r#"# top level
max_connections = 512
threads = 2
shutdown_timeout = "20s"
cipher_preference = "chacha"
log_level = "debug"
log_format = "json"
handshake_timeout = "9s"
connect_timeout = "4s"
idle_timeout = "10m"
close_timeout = "50s"
proxy_protocol = "v2"
alpn = ["http/1.1"]
self_signed_names = ["dvr.local"]
state_dir = "state"

[acme]
domains = ["Cams.Example.org."]
email = "me@example.org"
directory = "https://ca.example/dir"
staging = false
ca_root = "root.pem"
eab_kid = "kid"
eab_hmac_key = "c2VjcmV0"
ips = ["203.0.113.7", "2001:db8::7"]
profile = "shortlived"

[[frontend]]
listen = "127.0.0.1:443"
idle_timeout = "1h"
  [[frontend.route]]
  sni = ["nas.example.org", "*.nas.example.org"]
  default = true
  backend = "nas.lan:5000"
  proxy_protocol = "v1"
  handshake_timeout = "1s"
  connect_timeout = "2s"
  idle_timeout = "off"
  close_timeout = "3s"
  alpn = []

[[frontend]]
listen = "[::1]:7682"
"#;

    fn path() -> &'static Path {
        Path::new("/etc/tcpfwd/tcpfwd.toml")
    }

    fn d(s: &str) -> Duration {
        s.parse().unwrap()
    }

    fn at(line: usize, column: usize) -> Origin {
        Origin::File {
            path: path().to_path_buf(),
            line,
            column,
        }
    }

    #[test]
    fn full_example_parses_to_the_layer() {
        let l = parse(FULL, path()).unwrap();
        let expected = Layer {
            frontends: vec![
                FrontendSpec {
                    listen: Listen {
                        addr: Some("127.0.0.1".parse().unwrap()),
                        port: 443,
                    },
                    settings: RouteSettings {
                        idle_timeout: Some(Some(d("1h"))),
                        ..RouteSettings::default()
                    },
                    routes: vec![RouteSpec {
                        names: vec!["nas.example.org".into(), "*.nas.example.org".into()],
                        default: true,
                        backend: Backend {
                            host: BackendHost::Name("nas.lan".into()),
                            port: 5000,
                        },
                        settings: RouteSettings {
                            handshake_timeout: Some(d("1s")),
                            connect_timeout: Some(d("2s")),
                            idle_timeout: Some(None),
                            close_timeout: Some(d("3s")),
                            proxy_protocol: Some(Some(ProxyProtocol::V1)),
                            alpn: Some(vec![]),
                            client_auth: None,
                            ..RouteSettings::default()
                        },
                        origin: at(31, 3),
                    }],
                    origin: at(28, 1),
                },
                FrontendSpec {
                    listen: Listen {
                        addr: Some("::1".parse().unwrap()),
                        port: 7682,
                    },
                    settings: RouteSettings::default(),
                    routes: vec![],
                    origin: at(42, 1),
                },
            ],
            defaults: RouteSettings {
                handshake_timeout: Some(d("9s")),
                connect_timeout: Some(d("4s")),
                idle_timeout: Some(Some(d("10m"))),
                close_timeout: Some(d("50s")),
                proxy_protocol: Some(Some(ProxyProtocol::V2)),
                alpn: Some(vec!["http/1.1".into()]),
                client_auth: None,
                ..RouteSettings::default()
            },
            certs: vec![],
            self_signed_names: vec!["dvr.local".into()],
            acme: AcmeLayer {
                enabled: true,
                domains: vec!["cams.example.org".into()],
                email: Some("me@example.org".into()),
                directory: Some("https://ca.example/dir".into()),
                staging: Some(false),
                ca_root: Some("/etc/tcpfwd/root.pem".into()),
                eab_kid: Some("kid".into()),
                eab_hmac_key: Some(Secret("c2VjcmV0".into())),
                ips: vec![
                    "203.0.113.7".parse().unwrap(),
                    "2001:db8::7".parse().unwrap(),
                ],
                profile: Some("shortlived".into()),
            },
            state_dir: Some("/etc/tcpfwd/state".into()),
            cipher_preference: Some(CipherPreference::Chacha),
            shutdown_timeout: Some(d("20s")),
            max_connections: Some(512),
            threads: Some(2),
            log_level: Some("debug".into()),
            log_format: Some(LogFormat::Json),
            metrics: None,
            file: Some(path().to_path_buf()),
            ..Layer::default()
        };
        assert_eq!(l, expected);
        assert!(!format!("{l:?}").contains("c2VjcmV0"), "secret in Debug");
        // The frontend without routes is refused by the merge, with its place.
        let e = layer::build(Some(l), Layer::default()).unwrap_err();
        assert!(
            e.contains("[::1]:7682 (/etc/tcpfwd/tcpfwd.toml:42:1) has no routes"),
            "{e}"
        );
    }

    #[test]
    fn cert_pairs_with_paths_from_the_files_directory() {
        let l = parse(
            "[[cert]]\ncert = \"/etc/ssl/dvr.pem\"\nkey = \"dvr.key\"\n[[cert]]\ncert = \"nas.pem\"\nkey = \"/k/nas.key\"\n",
            path(),
        )
        .unwrap();
        assert_eq!(
            l.certs,
            [
                CertPair {
                    cert: "/etc/ssl/dvr.pem".into(),
                    key: "/etc/tcpfwd/dvr.key".into(),
                },
                CertPair {
                    cert: "/etc/tcpfwd/nas.pem".into(),
                    key: "/k/nas.key".into(),
                },
            ]
        );
        assert!(!l.acme.enabled);
    }

    #[test]
    fn shipped_example_parses_and_builds() {
        let text = include_str!("../../scripts/tcpfwd.toml");
        let l = parse(text, path()).unwrap();
        assert_eq!(l.frontends.len(), 2);
        assert_eq!(l.frontends[0].routes.len(), 2);
        assert!(l.acme.enabled);
        let c = layer::build(Some(l), Layer::default()).unwrap();
        let CertSource::Acme(a) = &c.cert else {
            panic!("{c:?}")
        };
        assert_eq!(a.domains, ["cams.example.org", "nas.example.org"]);
        let nas = &c.frontends[0].routes[1];
        assert_eq!(nas.label(), "nas.example.org");
        assert_eq!(
            nas.timeouts.idle,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(nas.timeouts.connect, std::time::Duration::from_secs(3));
        assert_eq!(c.frontends[1].routes[0].timeouts.idle, None);
    }

    /// Parses `text`, expects an error at `line:column` containing each of `want`.
    fn fails(text: &str, line: usize, column: usize, want: &[&str]) -> String {
        let e = parse(text, path()).unwrap_err();
        let prefix = format!("/etc/tcpfwd/tcpfwd.toml:{line}:{column}: ");
        assert!(e.starts_with(&prefix), "want {prefix:?} in:\n{e}");
        for w in want {
            assert!(e.contains(w), "want {w:?} in:\n{e}");
        }
        // The offending line is quoted under the message.
        let quoted = text.lines().nth(line - 1).unwrap();
        assert!(e.contains(&format!("{line} | {quoted}")), "{e}");
        e
    }

    #[test]
    fn client_auth_keys_resolve_and_errors_point_at_the_value() {
        use crate::config::ClientAuth;
        let text = r#"state_dir = "/srv/tcpfwd"
client_auth = "family"

[[frontend]]
listen = "443"

[[frontend.route]]
sni = ["dvr.example.org"]
backend = "dvr.lan:80"

[[frontend.route]]
sni = ["nas.example.org"]
backend = "nas.lan:5000"
client_ca = "ca.pem"
client_crl = "crl.pem"

[[frontend.route]]
sni = ["open.example.org"]
backend = "web.lan:80"
client_auth = "off"
"#;
        let layer = parse(text, path()).unwrap();
        let c = layer::build(Some(layer), Layer::default()).unwrap();
        let r = &c.frontends[0].routes;
        assert_eq!(
            r[0].client_auth,
            Some(ClientAuth::Family {
                dir: "/srv/tcpfwd/family-ca".into()
            })
        );
        assert_eq!(
            r[1].client_auth,
            Some(ClientAuth::Ca {
                ca: "/etc/tcpfwd/ca.pem".into(),
                crl: Some("/etc/tcpfwd/crl.pem".into())
            })
        );
        assert_eq!(r[2].client_auth, None);
        fails(
            "client_auth = \"famly\"\n",
            1,
            15,
            &["`client_auth`", "\"family\""],
        );
        fails(
            "[[frontend]]\nlisten = \"443\"\nclient_crl = \"crl.pem\"\n",
            3,
            14,
            &["`client_crl` needs `client_ca`"],
        );
        fails(
            "client_auth = \"family\"\nclient_ca = \"ca.pem\"\n",
            1,
            15,
            &["both choose the CA"],
        );
    }

    #[test]
    fn admit_after_names_a_route_and_a_bad_one_says_where() {
        let text = r#"client_auth = "family"

[[frontend]]
listen = "443"
  [[frontend.route]]
  backend = "dvr.lan:80"

[[frontend]]
listen = "7682"
  [[frontend.route]]
  backend = "dvr.lan:7681"
  admit_after = "443"
  admit_window = "30m"
"#;
        let c = layer::build(Some(parse(text, path()).unwrap()), Layer::default()).unwrap();
        let ws = &c.frontends[1].routes[0];
        assert_eq!(ws.client_auth, None);
        let a = ws.admit_after.as_ref().unwrap();
        assert_eq!(a.window, std::time::Duration::from_secs(1800));
        assert_eq!(Some(a.scope), c.frontends[0].routes[0].admission);
        // A route that is not there: the text, and where it was written.
        let bad = text.replace("admit_after = \"443\"", "admit_after = \"8443\"");
        let e = layer::build(Some(parse(&bad, path()).unwrap()), Layer::default()).unwrap_err();
        assert!(
            e.starts_with("/etc/tcpfwd/tcpfwd.toml:12:17: `admit_after` = \"8443\": no frontend listens on 8443"),
            "{e}"
        );
        // Not a route at all: caught while reading, the line quoted.
        fails(
            &text.replace("admit_after = \"443\"", "admit_after = \"dvr\""),
            12,
            17,
            &["`admit_after`: 'dvr' is not a route", "LISTEN:NAME"],
        );
        fails(
            &text.replace("admit_window = \"30m\"", "admit_window = \"soon\""),
            13,
            18,
            &["`admit_window` = \"soon\""],
        );
    }

    #[test]
    fn metrics_address() {
        let l = parse("metrics = \"[::1]:9100\"\n", path()).unwrap();
        assert_eq!(l.metrics, Some("[::1]:9100".parse().unwrap()));
        fails(
            "metrics = \"localhost\"\n",
            1,
            11,
            &["`metrics`: expected ADDR:PORT"],
        );
    }

    #[test]
    fn syntax_error() {
        fails("threads = 2\nlog_level = info\n", 2, 13, &["invalid TOML"]);
        fails("[[frontend]\n", 1, 12, &["invalid TOML"]);
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let e = fails(
            "idle_timout = \"5s\"\n",
            1,
            1,
            &["unknown key `idle_timout`; did you mean `idle_timeout`?"],
        );
        assert!(e.contains("^^^^^^^^^^^"), "{e}");
        fails(
            "[[frontend]]\nlisten = \"443\"\n  [[frontend.route]]\n  bakend = \"a:1\"\n",
            4,
            3,
            &["unknown key `bakend`; did you mean `backend`?"],
        );
        fails(
            "[acme]\nemial = \"me@example.org\"\n",
            2,
            1,
            &["did you mean `email`?"],
        );
        fails(
            "[[frontend]]\nlisten = \"443\"\nbackend = \"a:1\"\n",
            3,
            1,
            &["key `backend` is not allowed here; it belongs in [[frontend.route]]"],
        );
        fails(
            "colour = \"blue\"\n",
            1,
            1,
            &[
                "unknown key `colour`; the keys allowed here are",
                "`max_connections`",
            ],
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        fails(
            "max_connections = \"many\"\n",
            1,
            19,
            &["`max_connections`: invalid type", "expected a whole number"],
        );
        fails(
            "[[frontend]]\nlisten = 443\n",
            2,
            10,
            &["`listen`: invalid type", "expected a string"],
        );
        fails(
            "[[frontend]]\nlisten = \"1\"\n[[frontend.route]]\nsni = [\n  \"a.org\",\n  3,\n]\nbackend = \"a:1\"\n",
            6,
            3,
            &["`sni`: invalid type"],
        );
        fails(
            "self_signed_names = \"a\"\n",
            1,
            21,
            &["`self_signed_names`", "array"],
        );
        fails(
            "[[frontend]]\nlisten = \"1\"\n[[frontend.route]]\nsni = [\"a.org\"]\n",
            3,
            1,
            &["missing key `backend`", "HOST:PORT"],
        );
        fails(
            "threads = 0\n",
            1,
            11,
            &["`threads` = 0 is out of range: expected 1 to 1024"],
        );
    }

    #[test]
    fn bad_durations() {
        fails(
            "handshake_timeout = \"10\"\n",
            1,
            21,
            &[
                "`handshake_timeout` = \"10\"",
                "expected a duration like 500ms, 10s, 5m or 1h30m",
            ],
        );
        fails(
            "[[frontend]]\nlisten = \"1\"\nidle_timeout = \"forever\"\n",
            3,
            16,
            &["`idle_timeout` = \"forever\"", "1h30m, or \"off\""],
        );
        fails(
            "close_timeout = \"0s\"\n",
            1,
            17,
            &["`close_timeout` must be more than 0"],
        );
    }

    #[test]
    fn bad_listen_backend_and_sni() {
        fails(
            "[[frontend]]\nlisten = \"dvr:443\"\n",
            2,
            10,
            &[
                "`listen`: invalid listen address 'dvr:443'",
                "PORT, IPV4:PORT or [IPV6]:PORT",
            ],
        );
        let route =
            |line: &str| format!("[[frontend]]\nlisten = \"1\"\n[[frontend.route]]\n{line}\n");
        fails(
            &route("backend = \"nas.lan\""),
            4,
            11,
            &["`backend`: invalid backend 'nas.lan'", "HOST:PORT"],
        );
        fails(
            &format!(
                "{}sni = [\"ok.org\", \"a..b\"]\n",
                route("backend = \"a:1\"")
            ),
            5,
            18,
            &["`sni`: route name 'a..b'", "nas.example.org"],
        );
    }

    #[test]
    fn bad_enums() {
        fails(
            "cipher_preference = \"fast\"\n",
            1,
            21,
            &["`cipher_preference` = \"fast\": expected \"auto\", \"aes\" or \"chacha\""],
        );
        fails(
            "proxy_protocol = \"v3\"\n",
            1,
            18,
            &["`proxy_protocol` = \"v3\": expected \"v1\", \"v2\" or \"off\""],
        );
        fails(
            "log_format = \"xml\"\n",
            1,
            14,
            &["`log_format`", "\"text\" or \"json\""],
        );
        fails("log_level = \"loud\"\n", 1, 13, &["`log_level`", "debug"]);
        fails(
            "[acme]\ndirectory = \"http://ca\"\n",
            2,
            13,
            &["`directory`", "https://"],
        );
        fails(
            "[[cert]]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[acme]\n",
            4,
            1,
            &["[acme] and [[cert]]", "keep one"],
        );
        fails(
            "[acme]\ndomains = [\"*.example.org\"]\n",
            2,
            12,
            &["`domains`", "wildcard"],
        );
        fails(
            "[acme]\nips = [\"203.0.113.300\"]\n",
            2,
            8,
            &["`ips`", "203.0.113.300", "expected an IP address"],
        );
        fails(
            "[acme]\nips = [\"0.0.0.0\"]\n",
            2,
            8,
            &["`ips`", "not 0.0.0.0"],
        );
        fails(
            "[acme]\nprofile = \"short lived\"\n",
            2,
            11,
            &["`profile`", "short lived", "a profile name the CA lists"],
        );
    }

    #[test]
    fn source_lists_and_limits() {
        let text = "allow = [\"192.168.1.0/24\", \"2001:db8::/48\"]\nper_source_rate = 30\nban_after = 5\nban_time = \"2m\"\nsource_prefix_v6 = 56\n[[frontend]]\nlisten = \"443\"\ndeny = [\"192.168.1.66\"]\n  [[frontend.route]]\n  sni = [\"nas.example.org\"]\n  backend = \"nas.lan:5000\"\n  allow = [\"::ffff:192.168.1.20\"]\n  per_source_connections = 4\n";
        let l = parse(text, path()).unwrap();
        let c = layer::build(Some(l), Layer::default()).unwrap();
        let f = &c.frontends[0];
        assert_eq!(f.access.allow.len(), 2);
        assert_eq!(f.access.deny[0].to_string(), "192.168.1.66/32");
        let r = &f.routes[0];
        assert_eq!(r.access.allow[0].to_string(), "192.168.1.20/32");
        assert!(
            r.access.deny.is_empty(),
            "the frontend's lists are checked at accept"
        );
        let own = r.source_limits.unwrap();
        assert_eq!((own.connections, own.per_minute), (4, 30));
        assert_eq!(c.sources.limits.per_minute, 30);
        assert_eq!(c.sources.bans.after, 5);
        assert_eq!(c.sources.bans.first, std::time::Duration::from_secs(120));
        assert_eq!(c.sources.prefix_v6, 56);
        fails(
            "[[frontend]]\nlisten = \"443\"\n[[frontend.route]]\nbackend = \"a:1\"\ndeny = [\"10.0.0.0/8\", \"10.0.0.300\"]\n",
            5,
            23,
            &["`deny`: invalid CIDR '10.0.0.300'"],
        );
        fails(
            "allow = [\"10.1.0.0/8\"]\n",
            1,
            10,
            &["did you mean 10.0.0.0/8?"],
        );
        fails("per_source_connections = 0\n", 1, 26, &["out of range"]);
        fails("source_prefix_v4 = 40\n", 1, 20, &["expected 8 to 32"]);
    }

    #[test]
    fn ban_numbers_per_frontend_and_route() {
        let text = "ban_after = 5\n[[frontend]]\nlisten = \"443\"\nban_time = \"10m\"\n  [[frontend.route]]\n  backend = \"dvr.lan:80\"\n  [[frontend.route]]\n  sni = [\"nas.example.org\"]\n  backend = \"nas.lan:5000\"\n  ban_after = 2\n  max_ban_time = \"1d\"\n[[frontend]]\nlisten = \"444\"\n  [[frontend.route]]\n  backend = \"dvr.lan:81\"\n";
        let c = layer::build(Some(parse(text, path()).unwrap()), Layer::default()).unwrap();
        let s = std::time::Duration::from_secs;
        assert_eq!(c.sources.bans.after, 5);
        assert_eq!(c.sources.bans.first, s(60));
        let [dvr, nas] = &c.frontends[0].routes[..] else {
            panic!("{c:?}")
        };
        let dvr = dvr.bans.unwrap();
        assert_eq!((dvr.after, dvr.first, dvr.longest), (5, s(600), s(3600)));
        let nas = nas.bans.unwrap();
        assert_eq!((nas.after, nas.first, nas.longest), (2, s(600), s(86_400)));
        assert_eq!(
            c.frontends[1].routes[0].bans, None,
            "the process-wide numbers"
        );
        fails(
            "[[frontend]]\nlisten = \"443\"\n[[frontend.route]]\nbackend = \"a:1\"\nban_after = 0\n",
            5,
            13,
            &["`ban_after` = 0 is out of range"],
        );
        let e = layer::build(
            Some(
                parse(
                    "[[frontend]]\nlisten = \"443\"\n[[frontend.route]]\nbackend = \"a:1\"\nban_time = \"2h\"\n",
                    path(),
                )
                .unwrap(),
            ),
            Layer::default(),
        )
        .unwrap_err();
        assert!(
            e.contains(
                "max_ban_time (1h) is shorter than ban_time (2h) (/etc/tcpfwd/tcpfwd.toml:3:1)"
            ),
            "{e}"
        );
    }

    #[test]
    fn columns_count_characters_and_unreadable_files_say_so() {
        fails("# é\n[[frontend]]\nlisten = \"é\"\n", 3, 10, &["`listen`"]);
        let e = load(Path::new("/nonexistent/tcpfwd.toml")).unwrap_err();
        assert!(
            e.starts_with("cannot read /nonexistent/tcpfwd.toml: ")
                && e.contains("check the path and that tcpfwd's user may read it"),
            "{e}"
        );
    }
}
