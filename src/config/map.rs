//! The `--map` form and its parts: listening addresses, server names and
//! backends, each parsed once with errors that quote the text.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use super::printable as p;

/// One `--map`: where to listen, which server names it serves, and where to
/// forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// The listening side.
    pub listen: Listen,
    /// Server names (SNI) this map's route answers, lower case; empty for the
    /// frontend's default route (the plain `PORT:HOST:PORT` form).
    pub names: Vec<String>,
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
for example 443:dvr.lan:80 or [::1]:8443:127.0.0.1:8080, and for a route by \
server name LISTEN_PORT:NAMES=BACKEND_HOST:BACKEND_PORT, like 443:nas.example.org=nas.lan:5000";

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
        "invalid map '{}': {why}; the form is {MAP_FORM}",
        p(spec)
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

/// A port in decimal digits only (`u16`'s parser also takes a leading `+`).
fn port_number(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_port(spec: &str, what: &str, text: &str, allow_zero: bool) -> Result<u16, MapError> {
    if text.is_empty() {
        return Err(map_err(spec, format!("{what} is missing")));
    }
    let port = port_number(text).ok_or_else(|| {
        map_err(
            spec,
            format!("{what} '{}' is not a port number (1-65535)", p(text)),
        )
    })?;
    if port == 0 && !allow_zero {
        return Err(map_err(spec, format!("{what} must not be 0")));
    }
    Ok(port)
}

/// `[ADDR6]` (the caller checked the brackets); the error is the reason alone.
fn parse_bracketed_v6(what: &str, text: &str) -> Result<Ipv6Addr, String> {
    text.get(1..text.len().saturating_sub(1))
        .and_then(|inner| inner.parse().ok())
        .ok_or_else(|| format!("{what} '{}' is not an IPv6 address", p(text)))
}

fn parse_listen_addr(spec: &str, text: &str) -> Result<IpAddr, MapError> {
    if text.starts_with('[') && text.ends_with(']') {
        return parse_bracketed_v6("listen address", text)
            .map(IpAddr::V6)
            .map_err(|why| map_err(spec, why));
    }
    text.parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| {
            map_err(
                spec,
                format!(
                    "listen address '{}' is not an IPv4 address or a bracketed IPv6 address",
                    p(text)
                ),
            )
        })
}

pub(crate) fn valid_hostname(name: &str) -> bool {
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

/// A backend's host; the error is the reason alone, for the caller's form.
fn parse_backend_host(text: &str) -> Result<BackendHost, String> {
    if text.is_empty() {
        return Err("backend host is missing".into());
    }
    if text.starts_with('[') && text.ends_with(']') {
        return parse_bracketed_v6("backend address", text).map(|a| BackendHost::Ip(IpAddr::V6(a)));
    }
    if let Ok(v4) = text.parse::<std::net::Ipv4Addr>() {
        return Ok(BackendHost::Ip(IpAddr::V4(v4)));
    }
    // A name that looks like a dotted quad but did not parse is a typo, not a name.
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("backend '{}' is not a valid IPv4 address", p(text)));
    }
    if !valid_hostname(text.trim_end_matches('.')) {
        return Err(format!(
            "backend host '{}' is not a valid host name or address",
            p(text)
        ));
    }
    Ok(BackendHost::Name(text.to_owned()))
}

/// Checks a route's server name: a DNS name, or `*.` and a DNS name (one
/// level of wildcard). Returns it in lower case without a final dot.
pub fn parse_route_name(text: &str) -> Result<String, String> {
    let name = text.trim_end_matches('.').to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    if name.is_empty() {
        return Err("route name is missing".into());
    }
    if bare.contains('*') || !valid_hostname(bare) || bare.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "route name '{}' is not a DNS name (like nas.example.org) or a one-level wildcard (like *.example.org)",
            p(text)
        ));
    }
    Ok(name)
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
        let (names, host) = match rest[1].split_once('=') {
            None => (Vec::new(), rest[1]),
            Some((names, host)) => {
                let names = names
                    .split(',')
                    .map(|n| parse_route_name(n).map_err(|why| map_err(spec, why)))
                    .collect::<Result<Vec<_>, _>>()?;
                (names, host)
            }
        };
        let host = parse_backend_host(host).map_err(|why| map_err(spec, why))?;
        let backend_port = parse_port(spec, "backend port", rest[2], false)?;
        Ok(MapSpec {
            listen: Listen { addr, port },
            names,
            backend: Backend {
                host,
                port: backend_port,
            },
        })
    }
}

/// Parses a listening address alone: `PORT`, `ADDR:PORT` or `[ADDR6]:PORT`.
pub fn parse_listen(text: &str) -> Result<Listen, String> {
    let form = "write PORT, IPV4:PORT or [IPV6]:PORT, like 443 or 127.0.0.1:8443";
    let bad = |why: String| format!("invalid listen address '{}': {why}{form}", p(text));
    let fields = split_fields(text).map_err(|_| bad(String::new()))?;
    let (addr, port) = match fields[..] {
        [port] => (None, port),
        [addr, port] => (
            Some(
                parse_listen_addr(text, addr)
                    .map_err(|_| bad(format!("'{}' is not an IP address; ", p(addr))))?,
            ),
            port,
        ),
        _ => return Err(bad(String::new())),
    };
    let port =
        port_number(port).ok_or_else(|| bad(format!("'{}' is not a port number; ", p(port))))?;
    Ok(Listen { addr, port })
}

/// The form of a reference to a route, for messages.
pub const ROUTE_REF_FORM: &str = "name a route as LISTEN (the default route of the frontend listening there) or LISTEN:NAME (its route for that server name), like \"443\" or \"443:dvr.example.org\"";

/// Parses a reference to a route: `LISTEN` or `LISTEN:NAME` (LISTEN as in
/// [`parse_listen`]); the name comes back checked, in lower case.
pub fn parse_route_ref(text: &str) -> Result<(Listen, Option<String>), String> {
    if let Ok(listen) = parse_listen(text) {
        return Ok((listen, None));
    }
    let bad = || format!("'{text}' is not a route: {ROUTE_REF_FORM}");
    let fields = split_fields(text).map_err(|_| bad())?;
    let Some((name, listen)) = fields.split_last() else {
        return Err(bad());
    };
    let listen = parse_listen(&listen.join(":")).map_err(|_| bad())?;
    let name =
        parse_route_name(name).map_err(|why| format!("'{text}': {why}; {ROUTE_REF_FORM}"))?;
    Ok((listen, Some(name)))
}

/// Parses a backend alone: `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
pub fn parse_backend(text: &str) -> Result<Backend, String> {
    let form = "write HOST:PORT, like dvr.lan:80, 10.0.0.7:80 or [fd00::7]:80";
    let bad = |why: String| format!("invalid backend '{}': {why}{form}", p(text));
    let fields = split_fields(text).map_err(|_| bad(String::new()))?;
    let [host, port] = fields[..] else {
        return Err(bad(String::new()));
    };
    let host = parse_backend_host(host).map_err(|why| bad(format!("{why}; ")))?;
    let port = match port_number(port) {
        Some(n) if n > 0 => n,
        _ => {
            return Err(bad(format!(
                "'{}' is not a port number (1-65535); ",
                p(port)
            )))
        }
    };
    Ok(Backend { host, port })
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
        if self.names.is_empty() {
            write!(f, "{}:{}", self.listen, self.backend)
        } else {
            write!(
                f,
                "{}:{}={}",
                self.listen,
                self.names.join(","),
                self.backend
            )
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

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

    /// Found by tests/fuzz_parsers.rs: a leading '+' passed as a port
    /// (u16's parser takes it), and control characters were quoted raw, so
    /// the error broke over lines.
    #[test]
    fn signed_ports_and_control_characters() {
        let e = "+443:dvr:80".parse::<MapSpec>().unwrap_err().to_string();
        assert!(e.contains("listen port '+443' is not a port number"), "{e}");
        assert!(parse_listen("+443").is_err());
        assert!(parse_backend("dvr:+80").is_err());
        let e = "443:a\nb:80".parse::<MapSpec>().unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("invalid map '443:a\\nb:80'"), "{e}");
        assert!(e.contains("backend host 'a\\nb'"), "{e}");
        // A bracketed host with "': " in it: the reason is the host's own,
        // not a piece of another message cut at that text.
        let e = parse_backend("[a': b]:80").unwrap_err();
        assert!(
            e.starts_with(
                "invalid backend '[a': b]:80': backend address '[a': b]' is not an IPv6 address;"
            ),
            "{e}"
        );
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
    fn sni_routes_in_the_short_form() {
        let m = map("443:nas.example.org=nas.lan:5000");
        assert_eq!(m.names, ["nas.example.org"]);
        assert_eq!(m.backend.host, BackendHost::Name("nas.lan".into()));
        assert_eq!(m.to_string(), "443:nas.example.org=nas.lan:5000");
        let m = map("127.0.0.1:443:*.Example.org,a.example.net=[::1]:80");
        assert_eq!(m.names, ["*.example.org", "a.example.net"]);
        assert_eq!(m.listen.addr, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        for (bad, why) in [
            ("443:=nas:80", "route name is missing"),
            ("443:a..b=nas:80", "route name 'a..b'"),
            ("443:*=nas:80", "route name '*'"),
            ("443:a.*.org=nas:80", "route name 'a.*.org'"),
            ("443:a.org=:80", "backend host is missing"),
        ] {
            let err = bad.parse::<MapSpec>().unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn route_references() {
        let r = |s: &str| parse_route_ref(s).map(|(l, n)| (l.to_string(), n));
        assert_eq!(r("443"), Ok(("443".into(), None)));
        assert_eq!(r("127.0.0.1:443"), Ok(("127.0.0.1:443".into(), None)));
        assert_eq!(
            r("443:DVR.example.org"),
            Ok(("443".into(), Some("dvr.example.org".into())))
        );
        assert_eq!(
            r("[::1]:443:dvr.example.org"),
            Ok(("[::1]:443".into(), Some("dvr.example.org".into())))
        );
        for bad in ["", "dvr", "x:dvr.example.org", "443:a..b", "[::1:443"] {
            let e = r(bad).unwrap_err();
            assert!(e.contains("LISTEN:NAME") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn listen_and_backend_alone() {
        assert_eq!(
            parse_listen("443").unwrap(),
            Listen {
                addr: None,
                port: 443
            }
        );
        assert_eq!(
            parse_listen("[::1]:8443").unwrap().to_string(),
            "[::1]:8443"
        );
        assert!(parse_listen("x").unwrap_err().contains("'x'"));
        assert_eq!(
            parse_backend("dvr.lan:80").unwrap().to_string(),
            "dvr.lan:80"
        );
        assert!(parse_backend("dvr.lan").unwrap_err().contains("HOST:PORT"));
    }
}
