//! Property-based fuzzing of every parser tcpfwd owns, on the stable
//! toolchain (proptest): `--map` specs and their parts, CIDRs, durations, the
//! config file (arbitrary text and generated documents mixing valid and
//! invalid keys), the hand-written DER reader, and the PROXY header writer
//! (read back by `ppp`).
//!
//! Properties: no input makes a parser panic; a rejection is one line (the
//! config file's: `FILE:LINE:COLUMN: message` and the quoted line with its
//! caret) that quotes the input; a generated valid input parses to the value
//! it was made from, and `Display` reads back where there is one.
//!
//! Case counts keep the whole file well under a minute in a debug build on
//! two cores; `PROPTEST_CASES=N` runs N cases of every property instead, for
//! a longer hunt. A failure prints the smallest input proptest found: add it
//! as a regression case beside the parser's own unit tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use tcpfwd::config::layer::{self, Layer};
use tcpfwd::config::map::{parse_backend, parse_listen, parse_route_name};
use tcpfwd::config::{file, printable, Backend, BackendHost, Duration, Listen, MapSpec};
use tcpfwd::policy::Cidr;

/// `n` cases, unless `PROPTEST_CASES` says otherwise; no regression files
/// (a found case belongs in a unit test, with a name saying what it shows).
fn cases(n: u32) -> ProptestConfig {
    let mut c = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = n;
    }
    c
}

/// Text of any kind, weighted toward the characters the grammars use.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        3 => "[0-9a-fA-Z:\\[\\]=,.*_/+ -]{0,40}",
        1 => "[0-9a-z:\\[\\]=,.\\n\\t\\r\\x1b\\u{7f}\\u{85}é]{0,24}",
    ]
}

/// A rejection is one line without control characters, quoting `input`.
fn one_line_quoting(input: &str, err: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !err.chars().any(char::is_control),
        "not one clean line: {:?}",
        err
    );
    let quoted = format!("'{}'", printable(input));
    prop_assert!(err.contains(&quoted), "{:?} does not quote {}", err, quoted);
    Ok(())
}

// ------------------------------------------------------------ --map specs

fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z]([a-zA-Z0-9_-]{0,8}[a-zA-Z0-9])?"
}

fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        ipv4().prop_map(|a| a.to_ipv6_mapped()),
        Just(Ipv6Addr::LOCALHOST),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![ipv4().prop_map(IpAddr::V4), ipv6().prop_map(IpAddr::V6)]
}

fn listen() -> impl Strategy<Value = Listen> {
    (proptest::option::of(ip()), any::<u16>()).prop_map(|(addr, port)| Listen { addr, port })
}

fn backend() -> impl Strategy<Value = Backend> {
    let host = prop_oneof![
        (host_name(), any::<bool>())
            .prop_map(|(n, dot)| { BackendHost::Name(if dot { format!("{n}.") } else { n }) }),
        ip().prop_map(BackendHost::Ip),
    ];
    (host, 1..=u16::MAX).prop_map(|(host, port)| Backend { host, port })
}

/// A route name as someone might write it, and the form it is kept in.
fn route_name() -> impl Strategy<Value = (String, String)> {
    (host_name(), any::<bool>(), any::<bool>()).prop_map(|(n, wild, dot)| {
        let text = format!(
            "{}{n}{}",
            if wild { "*." } else { "" },
            if dot { "." } else { "" }
        );
        let kept = format!("{}{}", if wild { "*." } else { "" }, n.to_ascii_lowercase());
        (text, kept)
    })
}

fn listen_text(l: &Listen) -> String {
    match l.addr {
        None => l.port.to_string(),
        Some(IpAddr::V4(a)) => format!("{a}:{}", l.port),
        Some(IpAddr::V6(a)) => format!("[{a}]:{}", l.port),
    }
}

fn backend_text(b: &Backend) -> String {
    match &b.host {
        BackendHost::Name(n) => format!("{n}:{}", b.port),
        BackendHost::Ip(IpAddr::V4(a)) => format!("{a}:{}", b.port),
        BackendHost::Ip(IpAddr::V6(a)) => format!("[{a}]:{}", b.port),
    }
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn map_specs_never_panic_and_errors_quote_the_spec(text in any_text()) {
        if let Err(e) = text.parse::<MapSpec>() {
            one_line_quoting(&text, &e.to_string())?;
        }
    }

    #[test]
    fn map_parts_never_panic_and_errors_quote_the_text(text in any_text()) {
        if let Err(e) = parse_listen(&text) {
            one_line_quoting(&text, &e)?;
        }
        if let Err(e) = parse_backend(&text) {
            one_line_quoting(&text, &e)?;
            // The reason is one of the backend's own, not a piece of another message.
            prop_assert!(
                e.ends_with("write HOST:PORT, like dvr.lan:80, 10.0.0.7:80 or [fd00::7]:80"),
                "{}", e
            );
        }
        if let Err(e) = parse_route_name(&text) {
            prop_assert!(!e.chars().any(char::is_control), "{:?}", e);
            prop_assert!(
                e == "route name is missing" || e.contains(&format!("'{}'", printable(&text))),
                "{}", e
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn generated_maps_parse_to_their_parts_and_read_back(
        listen in listen(),
        names in prop::collection::vec(route_name(), 0..4),
        backend in backend(),
    ) {
        let text = if names.is_empty() {
            format!("{}:{}", listen_text(&listen), backend_text(&backend))
        } else {
            let written: Vec<&str> = names.iter().map(|(t, _)| t.as_str()).collect();
            format!("{}:{}={}", listen_text(&listen), written.join(","), backend_text(&backend))
        };
        let want = MapSpec {
            listen,
            names: names.iter().map(|(_, k)| k.clone()).collect(),
            backend: backend.clone(),
        };
        let got = text.parse::<MapSpec>();
        prop_assert_eq!(got.as_ref(), Ok(&want), "{}", text);
        prop_assert_eq!(want.to_string().parse::<MapSpec>(), Ok(want.clone()));
        prop_assert_eq!(parse_listen(&listen_text(&listen)), Ok(listen));
        prop_assert_eq!(parse_listen(&listen.to_string()), Ok(listen));
        prop_assert_eq!(parse_backend(&backend_text(&backend)), Ok(backend.clone()));
        prop_assert_eq!(parse_backend(&backend.to_string()), Ok(backend));
        for (written, kept) in &names {
            prop_assert_eq!(parse_route_name(written), Ok(kept.clone()));
        }
    }

    #[test]
    fn ports_out_of_range_or_signed_are_refused(
        backend in backend(),
        port in prop_oneof![
            (65_536u64..10_000_000).prop_map(|p| p.to_string()),
            (0u16..=u16::MAX).prop_map(|p| format!("+{p}")),
            (0u16..=u16::MAX).prop_map(|p| format!("-{p}")),
        ],
    ) {
        let text = format!("{port}:{}", backend_text(&backend));
        let e = text.parse::<MapSpec>().unwrap_err().to_string();
        one_line_quoting(&text, &e)?;
        prop_assert!(e.contains(&format!("listen port '{port}'")), "{}", e);
        let e = parse_listen(&port).unwrap_err();
        one_line_quoting(&port, &e)?;
    }
}

// ------------------------------------------------------------ CIDRs and durations

/// What `Cidr` keeps for `net`: IPv4-mapped blocks of /96 or more as IPv4.
fn canonical_text(addr: IpAddr, prefix: u8) -> String {
    match addr {
        IpAddr::V6(a) if prefix >= 96 => match a.to_ipv4_mapped() {
            Some(v4) => format!("{v4}/{}", prefix - 96),
            None => format!("{a}/{prefix}"),
        },
        a => format!("{a}/{prefix}"),
    }
}

fn block() -> impl Strategy<Value = (IpAddr, u8)> {
    ip().prop_flat_map(|ip| {
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        (Just(ip), 0..=max)
    })
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn cidrs_never_panic_and_errors_quote_the_text(text in any_text()) {
        if let Err(e) = text.parse::<Cidr>() {
            one_line_quoting(&text, &e)?;
        }
    }

    #[test]
    fn durations_never_panic_and_errors_quote_the_text(text in any_text()) {
        if let Err(e) = text.parse::<Duration>() {
            one_line_quoting(&text, &e)?;
        }
    }

    #[test]
    fn generated_blocks_parse_contain_their_address_and_read_back((addr, prefix) in block()) {
        let net = ipnet::IpNet::new(addr, prefix).unwrap();
        let base = net.trunc();
        let text = base.to_string();
        let c: Cidr = text.parse().map_err(TestCaseError::fail)?;
        prop_assert_eq!(c.to_string(), canonical_text(base.addr(), prefix));
        // An IPv4-mapped address is an IPv4 client: in the IPv6 blocks that
        // hold the mapped range only from /96 on (written so, they are the
        // IPv4 block they mean); `::/0` is every IPv6 client, as `0.0.0.0/0`
        // is every IPv4 one.
        let mapped = matches!(addr, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
        prop_assert_eq!(c.contains(addr), !mapped || prefix >= 96, "{} in {}", addr, c);
        prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
        // A bare address is its own block.
        let own: Cidr = addr.to_string().parse().map_err(TestCaseError::fail)?;
        prop_assert!(own.contains(addr));
        if net != base {
            // Host bits set: refused, with a suggestion that parses.
            let e = net.to_string().parse::<Cidr>().unwrap_err();
            one_line_quoting(&net.to_string(), &e)?;
            let hint = e.rsplit("did you mean ").next().unwrap().trim_end_matches('?');
            prop_assert!(hint.parse::<Cidr>().is_ok(), "{}", e);
        }
    }

    #[test]
    fn generated_durations_parse_to_their_sum(
        parts in prop::collection::vec(
            (prop_oneof![4 => 0u64..100_000, 1 => any::<u64>()], 0usize..5),
            1..5,
        ),
        pad in any::<bool>(),
    ) {
        const UNITS: [(&str, u64); 5] =
            [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];
        let mut text: String = parts.iter().map(|&(n, u)| format!("{n}{}", UNITS[u].0)).collect();
        if pad {
            text = format!(" {text}\t");
        }
        let want = parts.iter().try_fold(0u64, |total, &(n, u)| {
            n.checked_mul(UNITS[u].1).and_then(|ms| total.checked_add(ms))
        });
        match (text.parse::<Duration>(), want) {
            (Ok(d), Some(ms)) => {
                prop_assert_eq!(d.0, std::time::Duration::from_millis(ms));
            }
            (Err(e), None) => one_line_quoting(&text, &e)?,
            (got, want) => prop_assert!(false, "{:?}: {:?}, want {:?} ms", text, got, want),
        }
    }

    #[test]
    fn durations_read_back(ms in prop_oneof![0u64..10_000_000, any::<u64>()]) {
        let d = Duration(std::time::Duration::from_millis(ms));
        prop_assert_eq!(d.to_string().parse::<Duration>(), Ok(d), "{}", d);
    }
}

// ------------------------------------------------------------ the config file

const PATH: &str = "/etc/tcpfwd/fuzz.toml";

/// The file's error form: one line without a position, or
/// `FILE:LINE:COLUMN: message`, ` LINE | the line`, `   | ^^^`. Returns the line.
fn file_error_shape(text: &str, e: &str) -> Result<Option<usize>, TestCaseError> {
    let lines: Vec<&str> = e.split('\n').collect();
    prop_assert!(lines[0].starts_with(&format!("{PATH}:")), "{:?}", e);
    prop_assert!(!lines[0].chars().any(char::is_control), "{:?}", e);
    if lines.len() == 1 {
        return Ok(None);
    }
    prop_assert_eq!(lines.len(), 3, "{:?}", e);
    let pos = &lines[0][PATH.len() + 1..];
    let mut nums = pos.splitn(3, ':');
    let line: usize = nums
        .next()
        .unwrap()
        .parse()
        .map_err(|_| TestCaseError::fail(e.to_string()))?;
    let column: usize = nums
        .next()
        .unwrap()
        .parse()
        .map_err(|_| TestCaseError::fail(e.to_string()))?;
    prop_assert!(line >= 1 && column >= 1, "{:?}", e);
    prop_assert!(line <= text.split('\n').count(), "{:?}", e);
    let gutter = line.to_string().len();
    let quoted = lines[1]
        .strip_prefix(&format!(" {line} | "))
        .ok_or_else(|| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        !quoted.chars().any(|c| c.is_control() && c != '\t'),
        "{:?}",
        e
    );
    let original = text.lines().nth(line - 1).unwrap_or("");
    prop_assert_eq!(quoted.chars().count(), original.chars().count(), "{:?}", e);
    let caret = lines[2]
        .strip_prefix(&format!(" {:gutter$} | ", ""))
        .ok_or_else(|| TestCaseError::fail(e.to_string()))?;
    prop_assert!(caret.trim_start_matches(' ').starts_with('^'), "{:?}", e);
    prop_assert!(
        caret.trim_start_matches(' ').chars().all(|c| c == '^'),
        "{:?}",
        e
    );
    Ok(Some(line))
}

/// Parses and, when that works, merges: neither may panic, and each error
/// keeps its form (the merge's is one line).
fn parse_and_build(text: &str) -> Result<Result<Layer, String>, TestCaseError> {
    let parsed = file::parse(text, Path::new(PATH));
    match &parsed {
        Err(e) => {
            file_error_shape(text, e)?;
        }
        Ok(l) => {
            if let Err(e) = layer::build(Some(l.clone()), Layer::default()) {
                prop_assert!(!e.chars().any(char::is_control), "{:?}", e);
            }
        }
    }
    Ok(parsed)
}

/// A TOML basic string holding `s` exactly.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..100_000).prop_map(|n| format!("{n}ms")),
        (1u64..100_000).prop_map(|n| format!("{n}s")),
        (1u64..1_000, 0u64..60).prop_map(|(h, m)| format!("{h}h{m}m")),
    ]
}

fn bad_duration() -> impl Strategy<Value = String> {
    any_text().prop_filter("a duration", |s| s.parse::<Duration>().is_err())
}

fn cidr_text() -> impl Strategy<Value = String> {
    block().prop_map(|(a, p)| ipnet::IpNet::new(a, p).unwrap().trunc().to_string())
}

/// Route settings, each valid: key and value as written.
fn setting() -> impl Strategy<Value = (&'static str, String)> {
    prop_oneof![
        duration_text().prop_map(|d| ("handshake_timeout", toml_str(&d))),
        duration_text().prop_map(|d| ("connect_timeout", toml_str(&d))),
        duration_text().prop_map(|d| ("close_timeout", toml_str(&d))),
        prop_oneof![duration_text(), Just("off".to_string())]
            .prop_map(|d| ("idle_timeout", toml_str(&d))),
        prop_oneof![Just("v1"), Just("v2"), Just("off")]
            .prop_map(|v| ("proxy_protocol", toml_str(v))),
        prop::collection::vec("[ -~]{1,20}", 0..3).prop_map(|l| ("alpn", toml_list(&l))),
        prop::collection::vec(cidr_text(), 0..3).prop_map(|l| ("allow", toml_list(&l))),
        prop::collection::vec(cidr_text(), 0..3).prop_map(|l| ("deny", toml_list(&l))),
        (1i64..=1_000_000).prop_map(|n| ("per_source_connections", n.to_string())),
        (1i64..=1_000_000_000).prop_map(|n| ("per_source_rate", n.to_string())),
        (1i64..=1_000_000).prop_map(|n| ("ban_after", n.to_string())),
        (1u64..=3600).prop_map(|n| ("ban_time", toml_str(&format!("{n}s")))),
        (3600u64..=100_000).prop_map(|n| ("max_ban_time", toml_str(&format!("{n}s")))),
        prop_oneof![Just("family"), Just("off")].prop_map(|v| ("client_auth", toml_str(v))),
    ]
}

/// Top-level-only keys, each valid.
fn top_setting() -> impl Strategy<Value = (&'static str, String)> {
    prop_oneof![
        3 => setting(),
        1 => (1i64..=1_000_000).prop_map(|n| ("max_connections", n.to_string())),
        1 => (1i64..=1024).prop_map(|n| ("threads", n.to_string())),
        1 => duration_text().prop_map(|d| ("shutdown_timeout", toml_str(&d))),
        1 => prop_oneof![Just("auto"), Just("aes"), Just("chacha")]
            .prop_map(|v| ("cipher_preference", toml_str(v))),
        1 => prop_oneof![Just("error"), Just("warn"), Just("INFO"), Just("debug"), Just("off")]
            .prop_map(|v| ("log_level", toml_str(v))),
        1 => prop_oneof![Just("text"), Just("json")].prop_map(|v| ("log_format", toml_str(v))),
        1 => (8i64..=32).prop_map(|n| ("source_prefix_v4", n.to_string())),
        1 => (16i64..=128).prop_map(|n| ("source_prefix_v6", n.to_string())),
    ]
}

/// Settings without a key twice (the first of each is kept).
fn unique(items: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    let mut seen = Vec::new();
    items
        .into_iter()
        .filter(|(k, _)| {
            let new = !seen.contains(k);
            seen.push(*k);
            new
        })
        .collect()
}

#[derive(Debug, Clone)]
struct RouteGen {
    names: Vec<String>,
    backend: Backend,
    settings: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone)]
struct FrontendGen {
    settings: Vec<(&'static str, String)>,
    routes: Vec<RouteGen>,
}

fn route_gen() -> impl Strategy<Value = RouteGen> {
    (
        prop::collection::vec(route_name(), 0..3),
        backend(),
        prop::collection::vec(setting(), 0..4),
    )
        .prop_map(|(names, backend, settings)| RouteGen {
            names: names.into_iter().map(|(t, _)| t).collect(),
            backend,
            settings: unique(settings),
        })
}

fn frontend_gen() -> impl Strategy<Value = FrontendGen> {
    (
        prop::collection::vec(setting(), 0..3),
        prop::collection::vec(route_gen(), 1..4),
    )
        .prop_map(|(settings, routes)| FrontendGen {
            settings: unique(settings),
            routes,
        })
}

/// One mistake to put in a table: the line, and what its error must name.
#[derive(Debug, Clone)]
enum Mistake {
    UnknownKey(String),
    BadDuration(String),
    WrongType(&'static str),
    OutOfRange(&'static str, i64),
    BadCidr(String),
    BadBackend(String),
    BadListen(String),
}

fn mistake() -> impl Strategy<Value = Mistake> {
    prop_oneof![
        "[a-z][a-z_]{2,16}"
            .prop_filter("a known key", |k| !KNOWN.contains(&k.as_str()))
            .prop_map(Mistake::UnknownKey),
        bad_duration().prop_map(Mistake::BadDuration),
        prop_oneof![
            Just("per_source_connections"),
            Just("ban_after"),
            Just("threads")
        ]
        .prop_map(Mistake::WrongType),
        (
            prop_oneof![Just("per_source_connections"), Just("per_source_rate")],
            prop_oneof![Just(0i64), Just(-1), Just(i64::MAX), Just(i64::MIN)]
        )
            .prop_map(|(k, n)| Mistake::OutOfRange(k, n)),
        any_text()
            .prop_filter("a CIDR", |s| s.parse::<Cidr>().is_err())
            .prop_map(Mistake::BadCidr),
        any_text()
            .prop_filter("a backend", |s| parse_backend(s).is_err())
            .prop_map(Mistake::BadBackend),
        any_text()
            .prop_filter("a listen address", |s| parse_listen(s).is_err())
            .prop_map(Mistake::BadListen),
    ]
}

const KNOWN: &[&str] = &[
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
    "client_auth",
    "client_ca",
    "client_crl",
    "ban_after",
    "ban_time",
    "max_ban_time",
    "max_connections",
    "threads",
    "shutdown_timeout",
    "cipher_preference",
    "log_level",
    "log_format",
    "source_prefix_v4",
    "source_prefix_v6",
    "metrics",
    "self_signed_names",
    "state_dir",
    "cert",
    "acme",
    "frontend",
    "listen",
    "route",
    "sni",
    "default",
    "backend",
    "key",
];

impl Mistake {
    /// The line to write, the key its error names, and (for a value that
    /// replaces a required one) which key it replaces.
    fn line(&self) -> (String, String, Option<&'static str>) {
        match self {
            Mistake::UnknownKey(k) => (format!("{k} = 1"), k.clone(), None),
            Mistake::BadDuration(v) => (
                format!("connect_timeout = {}", toml_str(v)),
                "connect_timeout".into(),
                None,
            ),
            Mistake::WrongType(k) => (format!("{k} = \"many\""), (*k).into(), None),
            Mistake::OutOfRange(k, n) => (format!("{k} = {n}"), (*k).into(), None),
            Mistake::BadCidr(v) => (format!("deny = [{}]", toml_str(v)), "deny".into(), None),
            Mistake::BadBackend(v) => (
                format!("backend = {}", toml_str(v)),
                "backend".into(),
                Some("backend"),
            ),
            Mistake::BadListen(v) => (
                format!("listen = {}", toml_str(v)),
                "listen".into(),
                Some("listen"),
            ),
        }
    }
}

/// The document's lines; the mistake (if any) goes into table `at` (0 the
/// top level, then the frontends and their routes in order), and the
/// result says on which line it went.
fn document(
    top: &[(&'static str, String)],
    frontends: &[FrontendGen],
    mistake: Option<(&Mistake, usize)>,
) -> (String, Option<usize>) {
    let mut lines: Vec<String> = vec!["# generated".into()];
    let mut table = 0;
    let mut at_line = None;
    let mut put = |lines: &mut Vec<String>, table: usize, said: &[(&'static str, String)]| {
        let mistake = mistake.filter(|(_, t)| *t == table).map(|(m, _)| m.line());
        for (k, v) in said {
            // The mistake's key, if the table already has it, is the mistake.
            if mistake.as_ref().is_none_or(|(_, key, _)| key != k) {
                lines.push(format!("{k} = {v}"));
            }
        }
        if let Some((line, _, _)) = mistake {
            lines.push(line);
            at_line = Some(lines.len());
        }
    };
    put(&mut lines, table, top);
    for (i, f) in frontends.iter().enumerate() {
        table += 1;
        lines.push("[[frontend]]".into());
        let mut own = vec![("listen", toml_str(&format!("127.0.0.1:{}", 20_000 + i)))];
        own.extend(f.settings.iter().cloned());
        put(&mut lines, table, &own);
        for (j, r) in f.routes.iter().enumerate() {
            table += 1;
            lines.push("  [[frontend.route]]".into());
            let mut own = vec![("backend", toml_str(&backend_text(&r.backend)))];
            // Names unique on the frontend: each made unique by the route's number.
            let names: Vec<String> = r
                .names
                .iter()
                .map(|n| match n.strip_prefix("*.") {
                    Some(rest) => format!("*.r{j}x{rest}"),
                    None => format!("r{j}x{n}"),
                })
                .collect();
            if !names.is_empty() {
                own.push(("sni", toml_list(&names)));
            }
            own.extend(r.settings.iter().cloned());
            put(&mut lines, table, &own);
        }
    }
    (lines.join("\n") + "\n", at_line)
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn files_never_panic_and_errors_keep_their_form(text in prop_oneof![
        any_text(),
        "([a-z_]{1,12} = (\"[^\"\\n]{0,12}\"|[0-9]{1,4}|\\[\\]|true)\\n|\\[\\[frontend\\]\\]\\n|\\[\\[frontend.route\\]\\]\\n|\\[[a-z]{1,6}\\]\\n){0,8}",
    ]) {
        let _ = parse_and_build(&text)?;
    }
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn generated_files_parse_to_what_they_say(
        top in prop::collection::vec(top_setting(), 0..6),
        frontends in prop::collection::vec(frontend_gen(), 1..3),
    ) {
        let top = unique(top);
        let (text, _) = document(&top, &frontends, None);
        let l = match parse_and_build(&text)? {
            Ok(l) => l,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
        };
        prop_assert_eq!(l.frontends.len(), frontends.len());
        for (i, (got, f)) in l.frontends.iter().zip(&frontends).enumerate() {
            prop_assert_eq!(got.listen, parse_listen(&format!("127.0.0.1:{}", 20_000 + i)).unwrap());
            prop_assert_eq!(got.routes.len(), f.routes.len());
            for (r, want) in got.routes.iter().zip(&f.routes) {
                prop_assert_eq!(&r.backend, &want.backend);
                prop_assert_eq!(r.names.len(), want.names.len());
                for (k, v) in &want.settings {
                    if *k == "per_source_connections" {
                        prop_assert_eq!(r.settings.per_source_connections, v.parse().ok());
                    }
                    if *k == "ban_after" {
                        prop_assert_eq!(r.settings.ban_after, v.parse().ok());
                    }
                    if *k == "connect_timeout" {
                        let d: Duration = v.trim_matches('"').parse().unwrap();
                        prop_assert_eq!(r.settings.connect_timeout, Some(d));
                    }
                }
            }
        }
        for (k, v) in &top {
            match *k {
                "max_connections" => prop_assert_eq!(l.max_connections, v.parse().ok()),
                "threads" => prop_assert_eq!(l.threads, v.parse().ok()),
                "per_source_rate" => prop_assert_eq!(l.defaults.per_source_rate, v.parse().ok()),
                _ => {}
            }
        }
        // A valid file with a route on every frontend merges, unless two
        // routes of a frontend are both its default (no names).
        let defaults = |f: &FrontendGen| f.routes.iter().filter(|r| r.names.is_empty()).count();
        if frontends.iter().all(|f| defaults(f) <= 1) {
            let built = layer::build(Some(l), Layer::default());
            prop_assert!(built.is_ok(), "{:?}\n{}", built.err(), text);
        }
    }

    #[test]
    fn one_mistake_is_found_on_its_line_and_named(
        top in prop::collection::vec(top_setting(), 0..4),
        frontends in prop::collection::vec(frontend_gen(), 1..3),
        mistake in mistake(),
        at in any::<prop::sample::Index>(),
    ) {
        let top = unique(top);
        // Tables: the top level, each frontend, each route. A mistake that
        // replaces a required key goes only where that key belongs.
        let mut tables = vec![("top", 0)];
        let mut n = 0;
        for f in &frontends {
            n += 1;
            tables.push(("frontend", n));
            for _ in &f.routes {
                n += 1;
                tables.push(("route", n));
            }
        }
        let (_, _, replaces) = mistake.line();
        let fits: Vec<usize> = tables
            .iter()
            .filter(|(kind, _)| match replaces {
                Some("backend") => *kind == "route",
                Some("listen") => *kind == "frontend",
                _ => true,
            })
            .map(|(_, t)| *t)
            .collect();
        let table = fits[at.index(fits.len())];
        let (text, line) = document(&top, &frontends, Some((&mistake, table)));
        let line = line.unwrap();
        let e = match parse_and_build(&text)? {
            Err(e) => e,
            Ok(_) => return Err(TestCaseError::fail(format!("accepted {mistake:?}:\n{text}"))),
        };
        let (_, key, _) = mistake.line();
        prop_assert_eq!(file_error_shape(&text, &e)?, Some(line), "{}\n{}", e, text);
        let first = e.lines().next().unwrap();
        prop_assert!(first.contains(&format!("`{key}`")), "{}\n{}", e, text);
    }
}

/// Found by `one_mistake_is_found_on_its_line_and_named`: a value with a
/// newline (`"a\nb"` in TOML) was quoted raw, and the message broke the
/// three-line form.
#[test]
fn a_value_with_a_newline_keeps_the_error_on_its_line() {
    let text = "[[frontend]]\nlisten = \"443\"\n  [[frontend.route]]\n  backend = \"a\\nb:80\"\n";
    let e = file::parse(text, Path::new(PATH)).unwrap_err();
    assert_eq!(e.lines().count(), 3, "{e}");
    assert!(
        e.starts_with(&format!(
            "{PATH}:4:13: `backend`: invalid backend 'a\\nb:80'"
        )),
        "{e}"
    );
}

// ------------------------------------------------------------ the DER reader

/// What the tests read of a certificate, through the reader's public face
/// only: retarget this one function to test another X.509 reader.
#[derive(Debug, PartialEq)]
struct CertFacts {
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
    dns_names: Vec<String>,
    subject: String,
    common_name: Option<String>,
    has_aki: bool,
}

fn read_cert(der: &[u8]) -> Result<CertFacts, String> {
    let c = tcpfwd::tls::x509::parse(der).map_err(|e| e.to_string())?;
    let e = |e: tcpfwd::tls::x509::Error| e.to_string();
    c.subject_alt_names().map_err(e)?;
    Ok(CertFacts {
        serial: c.serial.to_vec(),
        not_before: c.not_before,
        not_after: c.not_after,
        dns_names: c.dns_names().map_err(e)?,
        subject: c.subject().map_err(e)?,
        common_name: c.common_name().map_err(e)?,
        has_aki: c.authority_key_id().map_err(e)?.is_some(),
    })
}

/// Certificates to mutate: a leaf with many kinds of SAN, signed by a CA
/// (so it has an AKI), and the CA itself.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Fuzz CA");
        ca.distinguished_name
            .push(rcgen::DnType::OrganizationName, "tcpfwd, \"tests\"");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let mut leaf = rcgen::CertificateParams::new(vec![
            "cams.example.org".into(),
            "*.Nas.example.org".into(),
        ])
        .unwrap();
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress("192.0.2.7".parse().unwrap()));
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress("2001:db8::7".parse().unwrap()));
        leaf.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "me@example.org".try_into().unwrap(),
        ));
        leaf.subject_alt_names.push(rcgen::SanType::URI(
            "https://example.org/".try_into().unwrap(),
        ));
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "cams.example.org");
        leaf.use_authority_key_identifier_extension = true;
        leaf.serial_number = Some(rcgen::SerialNumber::from_slice(&[
            0x80, 1, 2, 3, 4, 5, 6, 7,
        ]));
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        vec![leaf_cert.der().to_vec(), ca_cert.der().to_vec()]
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(0u8),
                Just(0x80),
                Just(0x81),
                Just(0x84),
                Just(0xff),
                any::<u8>()
            ]
        )
            .prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, bit)| Edit::Flip(i, bit)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..6)
        )
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Edit::Remove(i, n)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(der: &mut Vec<u8>, e: &Edit) {
    if der.is_empty() {
        return;
    }
    match e {
        Edit::Set(i, b) => {
            let i = i.index(der.len());
            der[i] = *b;
        }
        Edit::Flip(i, bit) => {
            let i = i.index(der.len());
            der[i] ^= 1 << bit;
        }
        Edit::Insert(i, bytes) => {
            let i = i.index(der.len() + 1);
            der.splice(i..i, bytes.iter().copied());
        }
        Edit::Remove(i, n) => {
            let i = i.index(der.len());
            let end = (i + n).min(der.len());
            der.drain(i..end);
        }
        Edit::Truncate(i) => {
            let i = i.index(der.len());
            der.truncate(i);
        }
    }
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn der_reader_never_panics_on_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        // A SEQUENCE header first, so the walk goes deeper.
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|mut b| {
            let len = b.len().min(255) as u8;
            b.splice(0..0, [0x30, 0x81, len]);
            b
        }),
    ]) {
        let _ = read_cert(&bytes);
    }

    #[test]
    fn der_reader_never_panics_on_mutated_certificates(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let mut der = seeds[seed.index(seeds.len())].clone();
        for e in &edits {
            apply(&mut der, e);
        }
        let _ = read_cert(&der);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn der_reader_reads_what_rcgen_wrote(
        names in prop::collection::vec(host_name(), 0..4),
        serial in prop::collection::vec(any::<u8>(), 1..20).prop_map(|mut s| {
            s[0] = s[0].clamp(1, 0x7f);
            s
        }),
        not_before in 0i64..4_000_000_000,
        days in 1i64..40_000,
        cn in "[a-zA-Z0-9 .-]{1,30}",
    ) {
        let mut p = rcgen::CertificateParams::new(names.clone()).unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        p.not_after = p.not_before + time::Duration::days(days);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn.clone());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let got = read_cert(cert.der()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(got.serial, serial);
        prop_assert_eq!(got.not_before, not_before);
        prop_assert_eq!(got.not_after, not_before + days * 86_400);
        prop_assert_eq!(
            got.dns_names,
            names.iter().map(|n| n.to_ascii_lowercase()).collect::<Vec<_>>()
        );
        prop_assert_eq!(got.common_name.as_deref(), Some(cn.as_str()));
        prop_assert!(!got.has_aki);
    }
}

#[test]
fn der_reader_reads_the_seeds() {
    let leaf = read_cert(&seeds()[0]).unwrap();
    assert_eq!(leaf.dns_names, ["cams.example.org", "*.nas.example.org"]);
    assert_eq!(leaf.common_name.as_deref(), Some("cams.example.org"));
    assert!(leaf.has_aki);
    let ca = read_cert(&seeds()[1]).unwrap();
    assert_eq!(ca.common_name.as_deref(), Some("Fuzz CA"));
}

// ------------------------------------------------------------ the PROXY header

fn socket() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn tls_info() -> impl Strategy<Value = tcpfwd::proxy::header::TlsInfo> {
    let text = || proptest::option::of(prop_oneof!["[ -~]{0,20}", ".{250,260}"]);
    (
        text(),
        proptest::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        text(),
        text(),
        any::<bool>(),
        text(),
    )
        .prop_map(
            |(sni, alpn, version, cipher, client_cert_verified, client_cn)| {
                tcpfwd::proxy::header::TlsInfo {
                    sni,
                    alpn,
                    version,
                    cipher,
                    client_cert_verified,
                    client_cn,
                }
            },
        )
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn proxy_headers_read_back_with_one_family(
        client in socket(),
        local in socket(),
        tls in tls_info(),
    ) {
        use tcpfwd::config::ProxyProtocol;
        use tcpfwd::proxy::header::encode;
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
            IpAddr::V6(_) => a,
        };
        let (c, l) = (canonical(client), canonical(local));
        let want = if c.is_ipv4() == l.is_ipv4() { (c, l) } else { (v6(c), v6(l)) };

        let h = encode(ProxyProtocol::V1, client, local, &tls);
        let text = std::str::from_utf8(&h).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let parsed = ppp::v1::Header::try_from(text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.addresses, ppp::v1::Addresses::from(want));

        let h = encode(ProxyProtocol::V2, client, local, &tls);
        let parsed = ppp::v2::Header::try_from(h.as_slice())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.addresses, ppp::v2::Addresses::from(want));
        prop_assert_eq!(parsed.len(), h.len());
        let authority: Vec<Vec<u8>> = parsed
            .tlvs()
            .filter_map(Result::ok)
            .filter(|t| t.kind == 0x02)
            .map(|t| t.value.to_vec())
            .collect();
        let want_sni: Vec<Vec<u8>> =
            tls.sni.iter().filter(|s| s.len() <= 255).map(|s| s.as_bytes().to_vec()).collect();
        prop_assert_eq!(authority, want_sni);
    }
}
