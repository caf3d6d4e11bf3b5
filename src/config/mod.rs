//! Validated configuration: `--map` specs, durations, and the `Config` the server runs on.
//!
//! Everything here is parsed once, at the edge; the rest of the program never
//! sees a string it has to interpret again.

pub mod cli;

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::config::cli::{CipherPreference, Cli};

/// One `--map`: where to listen and where to forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// The listening side.
    pub listen: Listen,
    /// The plain-TCP backend.
    pub backend: Backend,
}

/// Where a map listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// `None` means every address, IPv4 and IPv6.
    pub addr: Option<IpAddr>,
    /// 0 asks the kernel for a free port (handy for tests and trials).
    pub port: u16,
}

/// The host part of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendHost {
    /// A DNS name, resolved anew for every connection.
    Name(String),
    /// A literal address.
    Ip(IpAddr),
}

/// Where a map forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Name or address.
    pub host: BackendHost,
    /// TCP port, never 0.
    pub port: u16,
}

const MAP_FORM: &str = "[LISTEN_ADDR:]LISTEN_PORT:BACKEND_HOST:BACKEND_PORT, \
for example 443:dvr.lan:80 or [::1]:8443:127.0.0.1:8080";

/// Why a `--map` was rejected. The message quotes the text and shows the form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError(String);

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MapError {}

fn map_err(spec: &str, why: impl fmt::Display) -> MapError {
    MapError(format!(
        "invalid map '{spec}': {why}; the form is {MAP_FORM}"
    ))
}

/// Splits on ':' outside square brackets, keeping the brackets in the parts.
fn split_fields(spec: &str) -> Result<Vec<&str>, MapError> {
    let mut parts = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in spec.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(map_err(spec, "nested '['")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(map_err(spec, "']' without '['")),
            ':' if depth == 0 => {
                parts.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(map_err(spec, "'[' without ']'"));
    }
    parts.push(&spec[start..]);
    Ok(parts)
}

fn parse_port(spec: &str, what: &str, text: &str, allow_zero: bool) -> Result<u16, MapError> {
    if text.is_empty() {
        return Err(map_err(spec, format!("{what} is missing")));
    }
    let port: u16 = text.parse().map_err(|_| {
        map_err(
            spec,
            format!("{what} '{text}' is not a port number (1-65535)"),
        )
    })?;
    if port == 0 && !allow_zero {
        return Err(map_err(spec, format!("{what} must not be 0")));
    }
    Ok(port)
}

fn parse_bracketed_v6(spec: &str, what: &str, text: &str) -> Result<Ipv6Addr, MapError> {
    let inner = &text[1..text.len() - 1];
    inner
        .parse()
        .map_err(|_| map_err(spec, format!("{what} '{text}' is not an IPv6 address")))
}

fn parse_listen_addr(spec: &str, text: &str) -> Result<IpAddr, MapError> {
    if text.starts_with('[') && text.ends_with(']') {
        return Ok(IpAddr::V6(parse_bracketed_v6(
            spec,
            "listen address",
            text,
        )?));
    }
    text.parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| {
            map_err(
                spec,
                format!(
                    "listen address '{text}' is not an IPv4 address or a bracketed IPv6 address"
                ),
            )
        })
}

fn valid_hostname(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_backend_host(spec: &str, text: &str) -> Result<BackendHost, MapError> {
    if text.is_empty() {
        return Err(map_err(spec, "backend host is missing"));
    }
    if text.starts_with('[') && text.ends_with(']') {
        return Ok(BackendHost::Ip(IpAddr::V6(parse_bracketed_v6(
            spec,
            "backend address",
            text,
        )?)));
    }
    if let Ok(v4) = text.parse::<std::net::Ipv4Addr>() {
        return Ok(BackendHost::Ip(IpAddr::V4(v4)));
    }
    // A name that looks like a dotted quad but did not parse is a typo, not a name.
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(map_err(
            spec,
            format!("backend '{text}' is not a valid IPv4 address"),
        ));
    }
    if !valid_hostname(text.trim_end_matches('.')) {
        return Err(map_err(
            spec,
            format!("backend host '{text}' is not a valid host name or address"),
        ));
    }
    Ok(BackendHost::Name(text.to_owned()))
}

impl FromStr for MapSpec {
    type Err = MapError;

    fn from_str(spec: &str) -> Result<Self, MapError> {
        let fields = split_fields(spec)?;
        let (addr, rest) = match fields.len() {
            3 => (None, &fields[..]),
            4 => (Some(parse_listen_addr(spec, fields[0])?), &fields[1..]),
            n if n > 4 && !spec.contains('[') => {
                return Err(map_err(
                    spec,
                    "too many ':' (write IPv6 addresses in brackets, like [::1])",
                ))
            }
            n => {
                return Err(map_err(
                    spec,
                    format!("expected 3 or 4 fields separated by ':', found {n}"),
                ))
            }
        };
        let port = parse_port(spec, "listen port", rest[0], true)?;
        let host = parse_backend_host(spec, rest[1])?;
        let backend_port = parse_port(spec, "backend port", rest[2], false)?;
        Ok(MapSpec {
            listen: Listen { addr, port },
            backend: Backend {
                host,
                port: backend_port,
            },
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, "{}", self.port),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            BackendHost::Name(n) => write!(f, "{n}:{}", self.port),
            BackendHost::Ip(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            BackendHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl fmt::Display for MapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.listen, self.backend)
    }
}

impl Listen {
    /// True if both would claim the same port on some address.
    pub fn overlaps(&self, other: &Listen) -> bool {
        if self.port == 0 || self.port != other.port {
            return false;
        }
        match (self.addr, other.addr) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => a == b,
        }
    }

    /// The socket address to bind: `[::]` stands for every address.
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.addr.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            self.port,
        )
    }
}

/// A span of time as written on the command line: `500ms`, `10s`, `5m`, `1h30m`, `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid duration '{text}': write a number and a unit, like 500ms, 10s, 5m, 1h30m or 2d")
        };
        let s = text.trim();
        if s.is_empty() {
            return Err(bad());
        }
        if s == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total_ms = n
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(bad)?;
        }
        Ok(Duration(std::time::Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Where the server certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files given with `--cert`/`--key`.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// An in-memory self-signed certificate for these names.
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

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// At least one, no two on the same address and port.
    pub maps: Vec<MapSpec>,
    /// Certificate source.
    pub cert: CertSource,
    /// ALPN protocols to advertise; empty means none.
    pub alpn: Vec<Vec<u8>>,
    /// AEAD preference.
    pub cipher_preference: CipherPreference,
    /// Per-connection time limits.
    pub timeouts: Timeouts,
    /// Drain deadline at shutdown.
    pub shutdown_timeout: std::time::Duration,
    /// Connection cap over all maps.
    pub max_connections: usize,
    /// Threads that accept and serve connections, each with its own event loop.
    pub workers: usize,
}

impl Config {
    /// Checks what clap cannot: rules that span several arguments.
    pub fn from_cli(cli: &Cli) -> Result<Config, String> {
        for (i, a) in cli.maps.iter().enumerate() {
            if let Some(b) = cli.maps[..i].iter().find(|b| b.listen.overlaps(&a.listen)) {
                return Err(format!(
                    "maps '{b}' and '{a}' both listen on port {}; give each map its own port or address",
                    a.listen.port
                ));
            }
        }
        let cert = match (&cli.cert, &cli.key) {
            _ if !cli.acme_domains.is_empty() => CertSource::Acme(AcmeConfig::from_cli(cli)?),
            (Some(cert), Some(key)) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CertSource::SelfSigned {
                extra_names: cli.self_signed_names.clone(),
            },
        };
        let mut alpn = Vec::new();
        for p in &cli.alpn {
            if p.is_empty() || p.len() > 255 {
                return Err(format!(
                    "invalid --alpn '{p}': a protocol name is 1 to 255 bytes, like http/1.1"
                ));
            }
            alpn.push(p.as_bytes().to_vec());
        }
        let positive = |name: &str, d: Duration| {
            if d.0.is_zero() {
                Err(format!("--{name} must be more than 0"))
            } else {
                Ok(d.0)
            }
        };
        Ok(Config {
            maps: cli.maps.clone(),
            cert,
            alpn,
            cipher_preference: cli.cipher_preference,
            timeouts: Timeouts {
                handshake: positive("handshake-timeout", cli.handshake_timeout)?,
                connect: positive("connect-timeout", cli.connect_timeout)?,
                idle: match cli.idle_timeout {
                    None => None,
                    Some(d) => Some(positive("idle-timeout", d)?),
                },
                close: positive("close-timeout", cli.close_timeout)?,
            },
            shutdown_timeout: cli.shutdown_timeout.0,
            max_connections: cli.max_connections as usize,
            workers: match cli.threads {
                Some(n) => usize::from(n),
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
        })
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

/// What ACME needs: the names, the CA, the account details and where to keep state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// DNS names, lower case, no duplicates; all on one certificate.
    pub domains: Vec<String>,
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

impl AcmeConfig {
    fn from_cli(cli: &Cli) -> Result<AcmeConfig, String> {
        let mut domains: Vec<String> = Vec::new();
        for d in &cli.acme_domains {
            let name = d.trim_end_matches('.').to_ascii_lowercase();
            if name.starts_with("*.") {
                return Err(format!(
                    "invalid --acme-domain '{d}': TLS-ALPN-01 cannot prove wildcard names; list each name"
                ));
            }
            if name.parse::<IpAddr>().is_ok() {
                return Err(format!(
                    "invalid --acme-domain '{d}': an IP address; give the DNS name that points here"
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
        let contact = match &cli.acme_email {
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
        let directory = match (&cli.acme_directory, cli.acme_staging) {
            (Some(url), _) => {
                if !url.starts_with("https://") {
                    return Err(format!(
                        "invalid --acme-directory '{url}': ACME directories are https:// URLs"
                    ));
                }
                url.clone()
            }
            (None, true) => LETS_ENCRYPT_STAGING.to_string(),
            (None, false) => LETS_ENCRYPT.to_string(),
        };
        let eab = match (&cli.acme_eab_kid, &cli.acme_eab_hmac_key) {
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
            _ => None,
        };
        let state_dir = match &cli.state_dir {
            Some(d) => d.clone(),
            None => std::env::var_os("STATE_DIRECTORY")
                .and_then(|v| {
                    // systemd lists several directories separated by ':'; the first is ours.
                    v.to_str()
                        .and_then(|s| s.split(':').next())
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                })
                .unwrap_or_else(|| PathBuf::from("/var/lib/tcpfwd")),
        };
        Ok(AcmeConfig {
            domains,
            contact,
            directory,
            ca_root: cli.acme_ca_root.clone(),
            eab,
            state_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn map(s: &str) -> MapSpec {
        s.parse().unwrap()
    }

    #[test]
    fn three_fields_listen_everywhere() {
        let m = map("443:dvr.lan:80");
        assert_eq!(
            m.listen,
            Listen {
                addr: None,
                port: 443
            }
        );
        assert_eq!(m.backend.host, BackendHost::Name("dvr.lan".into()));
        assert_eq!(m.backend.port, 80);
        assert_eq!(m.to_string(), "443:dvr.lan:80");
    }

    #[test]
    fn addresses_v4_and_bracketed_v6() {
        let m = map("127.0.0.1:8443:10.0.0.7:80");
        assert_eq!(m.listen.addr, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(m.backend.host, BackendHost::Ip("10.0.0.7".parse().unwrap()));
        let m = map("[::1]:8443:[fd00::7]:7681");
        assert_eq!(m.listen.addr, Some("::1".parse().unwrap()));
        assert_eq!(m.backend.host, BackendHost::Ip("fd00::7".parse().unwrap()));
        assert_eq!(m.to_string(), "[::1]:8443:[fd00::7]:7681");
    }

    #[test]
    fn rejections_quote_the_text_and_show_the_form() {
        for (bad, why) in [
            ("443:dvr", "expected 3 or 4 fields"),
            ("x:dvr:80", "listen port 'x'"),
            ("443:dvr:0", "backend port must not be 0"),
            ("443:dvr:70000", "backend port '70000'"),
            ("::1:443:dvr:80", "too many ':'"),
            ("[::1:443:dvr:80", "'[' without ']'"),
            ("[zz]:443:dvr:80", "listen address '[zz]'"),
            ("dvr:443:dvr:80", "listen address 'dvr'"),
            ("443:bad_host!:80", "backend host 'bad_host!'"),
            ("443:10.0.0.300:80", "not a valid IPv4"),
            ("443::80", "backend host is missing"),
        ] {
            let err = bad.parse::<MapSpec>().unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
            assert!(
                err.contains("LISTEN_PORT:BACKEND_HOST:BACKEND_PORT"),
                "{err}"
            );
        }
    }

    #[test]
    fn overlap_rules() {
        let any = map("443:a:80").listen;
        let lo = map("127.0.0.1:443:a:80").listen;
        let lo6 = map("[::1]:443:a:80").listen;
        let other = map("444:a:80").listen;
        assert!(any.overlaps(&lo));
        assert!(!lo.overlaps(&lo6));
        assert!(!any.overlaps(&other));
        let zero = map("0:a:80").listen;
        assert!(!zero.overlaps(&zero));
    }

    #[test]
    fn acme_names_are_checked_and_the_secret_hidden() {
        use clap::Parser;
        let cfg = |extra: &[&str]| {
            let mut args = vec!["tcpfwd", "--map", "443:a:80"];
            args.extend_from_slice(extra);
            Config::from_cli(&Cli::try_parse_from(args).unwrap())
        };
        let c = cfg(&[
            "--acme-domain",
            "Cams.Example.org.",
            "--acme-domain",
            "cams.example.org",
            "--acme-staging",
            "--acme-eab-kid",
            "k",
            "--acme-eab-hmac-key",
            "c2VrcmV0LWtleQ",
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap();
        let CertSource::Acme(a) = &c.cert else {
            panic!("{c:?}")
        };
        assert_eq!(a.domains, ["cams.example.org"]);
        assert_eq!(a.directory, LETS_ENCRYPT_STAGING);
        assert_eq!(a.eab.as_ref().unwrap().hmac_key.0, b"sekret-key");
        assert!(!format!("{c:?}").contains("sekret"));
        for (bad, why) in [
            ("*.example.org", "wildcard"),
            ("10.0.0.1", "IP address"),
            ("dvr", "fully qualified"),
            ("a..b", "fully qualified"),
        ] {
            let e = cfg(&["--acme-domain", bad]).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")) && e.contains(why), "{e}");
        }
        let e = cfg(&["--acme-domain", "a.org", "--acme-directory", "http://x/dir"]).unwrap_err();
        assert!(e.contains("https://"), "{e}");
    }

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<Duration>().map(|d| d.0.as_millis());
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("10s"), Ok(10_000));
        assert_eq!(d("5m"), Ok(300_000));
        assert_eq!(d("1h30m"), Ok(5_400_000));
        assert_eq!(d("2d"), Ok(172_800_000));
        assert_eq!(d("0"), Ok(0));
        for bad in ["", "10", "s", "10x", "1.5s", "-1s", "99999999999999999999d"] {
            let e = d(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }
}
