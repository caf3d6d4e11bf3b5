//! The command line as typed by the user: clap's derive struct and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::layer::{
    AcmeLayer, ClientAuthSpec, FrontendSpec, Layer, RouteRef, RouteSettings, RouteSpec,
};
use super::{CertPair, Duration, MapSpec, Origin, ProxyProtocol, Secret};
use crate::policy::Cidr;

const ABOUT: &str = "A small, fast layer-4 TLS-terminating TCP forwarder.";

const LONG_ABOUT: &str = "\
A small, fast layer-4 TLS-terminating TCP forwarder.

tcpfwd terminates TLS on each listening port and splices the decrypted bytes,
unchanged, to a plain TCP port on a backend. It never parses HTTP, so web pages,
WebSockets and long video streams simply work.";

const AFTER_LONG_HELP: &str = "\
EXAMPLES:
  Try it on the built-in self-signed certificate, in front of a local web server:
    tcpfwd --map 8443:127.0.0.1:8080
    curl -k https://localhost:8443/

  A CCTV DVR whose web UI is on port 80 and whose page opens a WebSocket video
  stream on port 7682 when it was loaded over https (7681 over http):
    tcpfwd --map 443:dvr.lan:80 --map 7682:dvr.lan:7681 \\
           --cert /etc/tcpfwd/fullchain.pem --key /etc/tcpfwd/key.pem

  Two devices behind one port, chosen by the name the browser asked for (SNI):
    tcpfwd --map 443:dvr.lan:80 --map 443:nas.example.org=nas.lan:5000

MAPS:
  --map [LISTEN_ADDR:]LISTEN_PORT:[NAMES=]BACKEND_HOST:BACKEND_PORT
  Without LISTEN_ADDR tcpfwd listens on every address, IPv4 and IPv6. IPv6
  addresses are written in brackets: --map [::1]:8443:[fd00::7]:80. A backend
  name is resolved again for every new connection, so a backend that changes
  address (DHCP) is followed. Maps on the same address and port share it:
  NAMES= (comma-separated; *.example.org matches one level) picks the route
  by the server name the client asks for, and the map without NAMES is the
  default for any other name or none. Without a default, other names are
  refused with an unrecognized_name alert.

CONFIG FILE:
  --config FILE reads a TOML file that can say everything the command line
  can, with frontends and per-route settings; the command line adds its maps
  and overrides the file's top-level settings (see the README). Check a file
  without serving with: tcpfwd check --config FILE

CERTIFICATES:
  --cert/--key load a PEM chain and key (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or
  Ed25519). Without them tcpfwd makes a self-signed certificate in memory for
  localhost, this host's name and every --self-signed-name, and logs its
  SHA-256 fingerprint so that you can check it in your browser.

CLIENT CERTIFICATES:
  --client-auth family asks every --map for a certificate from tcpfwd's own
  family CA (make one per device with: tcpfwd client-cert new NAME; revoke a
  lost one with: tcpfwd client-cert revoke NAME). Browsers send none on
  WebSockets, so for a page whose video WebSocket is on another port, name
  the page's map with --admit-after: every other map then asks for none and
  admits only source addresses that passed it within --admit-window (12h),
  refusing the rest before the handshake. Everyone behind the same public
  address (carrier-grade NAT, a cafe's Wi-Fi) is admitted once one family
  device passes; without --admit-after every port needs the certificate.
    tcpfwd --map 443:dvr.lan:80 --map 7682:dvr.lan:7681 \\
           --client-auth family --admit-after 443

ACME:
  --acme-domain asks an ACME CA (Let's Encrypt unless --acme-directory or
  --acme-staging says otherwise) for a certificate, proving each name over
  TLS-ALPN-01 on tcpfwd's own TLS port: the CA connects to port 443, so one
  map must listen there and the name's DNS must point here. Using it agrees
  to the CA's terms of service (their address is logged). Until the first
  certificate arrives a self-signed placeholder is served; the certificate
  is kept in --state-dir and renewed in the background. --acme-ip ADDR
  adds an IP address (for clients that connect by address; Let's Encrypt
  wants --acme-profile shortlived for it), and --acme-profile picks one of
  the profiles the CA's directory lists.
    tcpfwd --map 443:dvr.lan:80 --acme-domain cams.example.org \\
           --acme-email me@example.org --acme-staging

DURATIONS are written like 500ms, 10s, 5m, 1h30m or 2d.

SIGNALS:
  SIGHUP reloads --config and --cert/--key from disk: new connections get the
  new routes and certificates, open connections go on, and a file or pair that
  does not load leaves the old configuration serving. SIGTERM or SIGINT stop accepting and give open connections
  --shutdown-timeout to finish.

SYSTEMD:
  Socket activation: tcpfwd takes the sockets systemd passes instead of binding.
  Each goes to the map with its port (and its address, if the map gives one); a
  socket whose FileDescriptorName= is a port number goes to the map listening on
  that port. A socket without a map, or a map without a socket, stops start-up.
  With NOTIFY_SOCKET set it sends READY=1, STATUS= (maps and certificate),
  RELOADING=1 around a SIGHUP reload, STOPPING=1, and WATCHDOG=1 when
  WatchdogSec= is set: use Type=notify, or Type=notify-reload on systemd 253+.

STATUS:
  tcpfwd status (--json for the document) asks the running instance over its
  control socket: control in $RUNTIME_DIRECTORY when systemd sets it (the
  unit's RuntimeDirectory=tcpfwd: /run/tcpfwd/control, which is also where
  tcpfwd status looks by default), or the --control PATH given to both.
  The socket is mode 0600: only root and tcpfwd's own user may ask.

EXIT STATUS:
  0 after a clean shutdown (SIGTERM or SIGINT), 2 for a bad argument,
  certificate or set of sockets from systemd, 1 for any other start-up failure
  (for example a port in use).";

/// Command-line arguments, parsed by clap.
#[derive(Debug, Parser)]
#[command(
    name = "tcpfwd",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    max_term_width = 100,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Serving options.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration as a start would (files, keys, names, ports)
    /// without serving; prints one line per frontend and exits 0, or 2 with
    /// the problem.
    Check(RunArgs),
    /// Client certificates from tcpfwd's family CA (for routes with
    /// client_auth = "family", or --client-auth family).
    #[command(subcommand)]
    ClientCert(ClientCertCommand),
    /// Show what the running tcpfwd is doing: frontends and routes with their
    /// open connections, certificates and their expiry, ACME, the last
    /// reload and the banned sources. Asks over the control socket, which
    /// only root and tcpfwd's own user may use.
    Status(StatusArgs),
}

/// `tcpfwd status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The running instance's control socket [default: the file's `control`,
    /// else control in $RUNTIME_DIRECTORY when set, else /run/tcpfwd/control].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Read `control` from this configuration file.
    #[arg(long, value_name = "FILE", env = "TCPFWD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the instance's JSON document instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// `tcpfwd client-cert ...`.
#[derive(Debug, Subcommand)]
pub enum ClientCertCommand {
    /// Issue a client certificate NAME.p12 (the family CA is created on
    /// first use); its password is printed once and never stored.
    New(NewCertArgs),
    /// Serve NAME.p12 (written by `new` earlier) once more as a one-time
    /// download link on the LAN, like `new --serve`.
    Serve(ServeCertArgs),
    /// List issued certificates: name, serial, expiry and status (and which
    /// expire within 30 days).
    List(StateArgs),
    /// Revoke NAME's certificate: the CRL is re-signed, a running tcpfwd
    /// refuses it within seconds and closes its open connections.
    Revoke(RevokeArgs),
}

/// Where the family CA lives.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// State directory; the family CA is in its family-ca/ [default:
    /// $STATE_DIRECTORY when systemd sets it, else /var/lib/tcpfwd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `client-cert new`.
#[derive(Debug, Clone, Args)]
pub struct NewCertArgs {
    /// A name for the device or person, like anna-phone (letters, digits,
    /// '.', '-', '_'); also the file name NAME.p12.
    pub name: String,
    /// Days the certificate is valid.
    #[arg(long, value_name = "N", default_value_t = 825,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// AES-256/PBES2 PKCS#12 (desktops, recent phones) instead of the legacy
    /// 3DES/SHA-1 form that Android 12-13 and iOS up to 17 need.
    #[arg(long)]
    pub modern: bool,
    /// Directory to write NAME.p12 to [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Also write NAME.mobileconfig: an iOS/iPadOS profile holding the
    /// PKCS#12 (not its password, which the device asks for).
    #[arg(long)]
    pub mobileconfig: bool,
    /// Then serve the file(s) once over HTTPS on this port of the LAN address
    /// (the default route's interface), or on ADDR:PORT, and print the link
    /// as a QR code; ends after one download or --serve-for.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub serve: Option<ServeAddr>,
    /// How long the download link is valid (at most 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = serve_for, requires = "serve")]
    pub serve_for: std::time::Duration,
    /// If NAME has a valid certificate, revoke it in the same step (the
    /// CRL is re-signed; the device needs the new NAME.p12 to get in again).
    #[arg(long)]
    pub replace: bool,
    /// Where the family CA lives.
    #[command(flatten)]
    pub state: StateArgs,
}

/// `client-cert serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeCertArgs {
    /// The name given to `client-cert new`.
    pub name: String,
    /// The port on the LAN address (the default route's interface), or ADDR:PORT.
    #[arg(value_name = "[ADDR:]PORT")]
    pub at: ServeAddr,
    /// Directory that holds NAME.p12 [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Offer an iOS/iPadOS profile (NAME.mobileconfig) as a second link.
    #[arg(long)]
    pub mobileconfig: bool,
    /// How long the download link is valid (at most 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = serve_for)]
    pub serve_for: std::time::Duration,
}

/// A link's life: a duration of at most ten minutes.
fn serve_for(s: &str) -> Result<std::time::Duration, String> {
    let d = s.parse::<crate::config::duration::Duration>()?.0;
    if d.is_zero() || d > crate::clientca::download::MAX_VALID {
        return Err(format!("'{s}' is not between 1s and 10m"));
    }
    Ok(d)
}

pub use crate::clientca::download::ServeAddr;

/// `client-cert revoke`.
#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    /// The name given to `client-cert new`.
    pub name: String,
    /// Where the family CA lives.
    #[command(flatten)]
    pub state: StateArgs,
}

impl Cli {
    /// Parses the command line, or prints clap's error and exits (status 2
    /// for usage errors). A value with control characters in it (a newline
    /// pasted into `--map`) is quoted escaped, as tcpfwd's own errors quote
    /// it, so the error stays one line.
    pub fn parse_or_exit() -> Cli {
        match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) => exit_with(e),
        }
    }

    /// The options of a start or of `check`.
    pub fn args(&self) -> &RunArgs {
        match &self.command {
            Some(Command::Check(a)) => a,
            Some(Command::ClientCert(_) | Command::Status(_)) | None => &self.run,
        }
    }
}

/// Prints `e` as clap would, with the bad value escaped if it holds control
/// characters, and exits with clap's status.
fn exit_with(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue};
    let raw = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if v.chars().any(char::is_control) => v.clone(),
        _ => e.exit(),
    };
    let text = escaped_value(&e.render().to_string(), &raw);
    eprint!("{text}");
    std::process::exit(e.exit_code())
}

/// clap's rendered `text` with the quoted value `raw` written escaped.
fn escaped_value(text: &str, raw: &str) -> String {
    text.replace(&format!("'{raw}'"), &format!("'{}'", super::printable(raw)))
}

/// The options that say what to serve and how.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Forward TLS on a listening port to a plain backend port:
    /// [LISTEN_ADDR:]LISTEN_PORT:[NAMES=]BACKEND_HOST:BACKEND_PORT (repeatable).
    #[arg(long = "map", value_name = "MAP", required_unless_present = "config")]
    pub maps: Vec<MapSpec>,

    /// TOML configuration file with frontends, routes and settings; re-read on
    /// SIGHUP. The command line adds to it and overrides its top-level settings.
    #[arg(long, value_name = "FILE", env = "TCPFWD_CONFIG")]
    pub config: Option<PathBuf>,

    /// PEM file with a certificate chain, leaf first (repeatable, each with its
    /// --key: a handshake gets the certificate whose names cover its server name).
    #[arg(long, value_name = "FILE", requires = "key", env = "TCPFWD_CERT")]
    pub cert: Vec<PathBuf>,

    /// PEM file with the private key for the --cert in the same position.
    #[arg(long, value_name = "FILE", requires = "cert", env = "TCPFWD_KEY")]
    pub key: Vec<PathBuf>,

    /// Extra DNS name (or IP address) for the self-signed certificate (repeatable).
    #[arg(
        long = "self-signed-name",
        value_name = "NAME",
        conflicts_with = "cert"
    )]
    pub self_signed_names: Vec<String>,

    /// ALPN protocol to advertise (repeatable). None by default: tcpfwd cannot
    /// know what the backend speaks, so it must not promise h2 to a browser.
    #[arg(long = "alpn", value_name = "PROTOCOL")]
    pub alpn: Vec<String>,

    /// Which AEAD the server prefers when the client offers both. `auto` picks
    /// AES-GCM where the CPU accelerates AES and ChaCha20-Poly1305 elsewhere
    /// (a Raspberry Pi 4, for example). [default: auto]
    #[arg(long, value_enum, value_name = "WHICH")]
    pub cipher_preference: Option<CipherPreference>,

    /// Time allowed for the TLS handshake. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<Duration>,

    /// Time allowed to connect to the backend. [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<Duration>,

    /// Close a connection after this long with no data either way. Off by
    /// default, so that long, quiet streams are never cut.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Once one side has closed its half, close the other direction after this
    /// long with no data moving. Every byte starts the window again. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub close_timeout: Option<Duration>,

    /// Send a PROXY protocol header (v1 or v2) to every backend first, so that
    /// it sees the client's address. Off by default.
    #[arg(long, value_name = "VERSION")]
    pub proxy_protocol: Option<ProxyProtocol>,

    /// Time open connections get to finish after SIGTERM or SIGINT. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<Duration>,

    /// Most connections open at once, over all maps; more are refused at once.
    /// [default: 1024]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: Option<u32>,

    /// Worker threads (default: one per CPU). Each runs its own event loop and
    /// accepts on every listening socket; a connection stays on the thread that
    /// accepted it. With one, everything runs on the main thread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set,
    /// takes precedence: a level, or TARGET=LEVEL pairs such as warn,tcpfwd=debug.
    /// [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format. [default: text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP, no
    /// authentication: keep it on loopback or a private network). [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Open a control socket here for `tcpfwd status` (only root and
    /// tcpfwd's own user may use it) [default: control in $RUNTIME_DIRECTORY
    /// when systemd sets it (RuntimeDirectory=), else none].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Get the certificate from an ACME CA (Let's Encrypt by default) for this
    /// DNS name, proven over TLS-ALPN-01 on tcpfwd's own port (repeatable; all
    /// names, and every route's, go on one certificate). Using it means
    /// agreeing to the CA's terms of service, whose address is logged.
    #[arg(
        long = "acme-domain",
        value_name = "NAME",
        conflicts_with_all = ["cert", "key", "self_signed_names"]
    )]
    pub acme_domains: Vec<String>,

    /// Also get the certificate for this IP address (RFC 8738; repeatable), for
    /// a fixed public address without a DNS name: proven over TLS-ALPN-01 at
    /// ADDR port 443, and served to clients that connect by address (they send
    /// no server name). Let's Encrypt issues these only on the shortlived
    /// profile: add --acme-profile shortlived.
    #[arg(
        long = "acme-ip",
        value_name = "ADDR",
        conflicts_with_all = ["cert", "key", "self_signed_names"]
    )]
    pub acme_ips: Vec<std::net::IpAddr>,

    /// ACME profile to ask the CA for, one its directory lists (Let's Encrypt:
    /// classic, tlsserver, shortlived for 6-day certificates); kept for every
    /// renewal. [default: the CA's default]
    #[arg(long, value_name = "NAME")]
    pub acme_profile: Option<String>,

    /// Contact address given to the CA with the account, for the CA to reach
    /// you about the account or its certificates (optional). Let's Encrypt no
    /// longer sends expiry warnings: tcpfwd logs an ERROR itself when the
    /// certificate nears expiry and renewal keeps failing.
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,

    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(long, value_name = "URL", conflicts_with = "acme_staging")]
    pub acme_directory: Option<String>,

    /// Use Let's Encrypt's staging CA: untrusted certificates, generous rate
    /// limits. Try it first.
    #[arg(long)]
    pub acme_staging: bool,

    /// PEM file with the root certificate to trust for the ACME directory's own
    /// HTTPS, instead of the system's roots (private CAs, Pebble).
    #[arg(long, value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,

    /// Key identifier for external account binding (CAs such as ZeroSSL).
    #[arg(long, value_name = "KID", requires = "acme_eab_hmac_key")]
    pub acme_eab_kid: Option<String>,

    /// HMAC key for external account binding, base64url as the CA shows it.
    #[arg(
        long,
        value_name = "KEY",
        requires = "acme_eab_kid",
        env = "TCPFWD_ACME_EAB_HMAC_KEY",
        hide_env_values = true
    )]
    pub acme_eab_hmac_key: Option<Secret>,

    /// Admit only sources in this block, like 192.168.1.0/24, 203.0.113.7 or
    /// 2001:db8::/48 (repeatable; for every --map). Checked right after accept.
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<Cidr>,

    /// Refuse sources in this block, even when --allow admits them
    /// (repeatable; for every --map).
    #[arg(long = "deny", value_name = "CIDR")]
    pub deny: Vec<Cidr>,

    /// Connections one source (an IPv4 address, an IPv6 /64) may have open
    /// at once. [default: a quarter of --max-connections, at most 64]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub per_source_connections: Option<u32>,

    /// New connections one source may open per minute (bursts up to this
    /// many are fine). [default: 600]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub per_source_rate: Option<u32>,

    /// Failed handshakes (within ten minutes) after which a source is refused
    /// for a cool-off. [default: 20]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub ban_after: Option<u32>,

    /// The first cool-off; it doubles with each further offence. [default: 1m]
    #[arg(long, value_name = "DURATION")]
    pub ban_time: Option<Duration>,

    /// The longest cool-off. [default: 1h]
    #[arg(long, value_name = "DURATION")]
    pub max_ban_time: Option<Duration>,

    /// Count IPv4 sources per block of this prefix length. [default: 32]
    #[arg(long, value_name = "BITS", value_parser = clap::value_parser!(u8).range(8..=32))]
    pub source_prefix_v4: Option<u8>,

    /// Count IPv6 sources per block of this prefix length. [default: 64]
    #[arg(long, value_name = "BITS", value_parser = clap::value_parser!(u8).range(16..=128))]
    pub source_prefix_v6: Option<u8>,

    /// How often refused connections are summed up in the log (for tests).
    #[arg(long, value_name = "DURATION", hide = true)]
    pub refusal_log_interval: Option<Duration>,

    /// Where ACME keeps its account, certificate and key, and the family CA
    /// its files [default: $STATE_DIRECTORY when systemd sets it, else
    /// /var/lib/tcpfwd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Require a client certificate signed by the CA in this PEM file on
    /// every --map (a route in --config that says otherwise keeps its own).
    #[arg(long, value_name = "FILE", conflicts_with = "client_auth")]
    pub client_ca: Option<PathBuf>,

    /// CRL (PEM or DER) of the --client-ca, re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "client_ca")]
    pub client_crl: Option<PathBuf>,

    /// `family`: require a client certificate from tcpfwd's own family CA
    /// (`tcpfwd client-cert new NAME`) on every --map; `off`: none.
    #[arg(long, value_enum, value_name = "WHICH")]
    pub client_auth: Option<ClientAuthArg>,

    /// The --map on ROUTE (LISTEN, or LISTEN:NAME for a route by server
    /// name, like 443) checks the client certificates; every other --map asks
    /// for none and admits only source addresses (an IPv4 address, an IPv6
    /// /64) that passed it within --admit-window, refusing the rest before
    /// the handshake. For a page whose WebSockets go to another port:
    /// browsers send no client certificate on WebSockets.
    #[arg(long, value_name = "ROUTE", value_parser = admit_after_arg)]
    pub admit_after: Option<RouteRef>,

    /// How long a verified handshake on the --admit-after route admits its
    /// source; each one starts it again. [default: 12h]
    #[arg(long, value_name = "DURATION", requires = "admit_after")]
    pub admit_window: Option<Duration>,
}

/// `--admit-after ROUTE`, its form checked; the route is found in the merge.
fn admit_after_arg(text: &str) -> Result<RouteRef, String> {
    let (listen, name) = super::map::parse_route_ref(text)?;
    Ok(RouteRef {
        text: text.to_owned(),
        listen,
        name,
        said: format!("--admit-after '{text}'"),
    })
}

/// `--client-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientAuthArg {
    /// tcpfwd's family CA in the state directory.
    Family,
    /// No client certificate asked for.
    Off,
}

impl RunArgs {
    /// What the command line said, as a layer to merge with the file's.
    pub fn to_layer(&self) -> Result<Layer, String> {
        if self.cert.len() != self.key.len() {
            return Err(format!(
                "{} --cert but {} --key: give each certificate its key, in the same order",
                self.cert.len(),
                self.key.len()
            ));
        }
        let acme_only = [
            (self.acme_email.is_some(), "--acme-email"),
            (self.acme_directory.is_some(), "--acme-directory"),
            (self.acme_staging, "--acme-staging"),
            (self.acme_ca_root.is_some(), "--acme-ca-root"),
            (self.acme_eab_kid.is_some(), "--acme-eab-kid"),
            (self.acme_profile.is_some(), "--acme-profile"),
        ];
        if self.acme_domains.is_empty() && self.acme_ips.is_empty() && self.config.is_none() {
            if let Some((_, flag)) = acme_only.iter().find(|(set, _)| *set) {
                return Err(format!(
                    "{flag} needs --acme-domain or --acme-ip (or an [acme] table in --config)"
                ));
            }
        }
        let client_auth = match (&self.client_ca, self.client_auth) {
            (Some(ca), _) => Some(Some(ClientAuthSpec::Ca {
                ca: ca.clone(),
                crl: self.client_crl.clone(),
            })),
            (None, Some(ClientAuthArg::Family)) => Some(Some(ClientAuthSpec::Family)),
            (None, Some(ClientAuthArg::Off)) => Some(None),
            (None, None) => None,
        };
        let frontends = self
            .maps
            .iter()
            .map(|m| {
                let origin = Origin::Map(m.to_string());
                FrontendSpec {
                    listen: m.listen,
                    settings: RouteSettings::default(),
                    routes: vec![RouteSpec {
                        names: m.names.clone(),
                        default: false,
                        backend: m.backend.clone(),
                        settings: RouteSettings::default(),
                        origin: origin.clone(),
                    }],
                    origin,
                }
            })
            .collect();
        Ok(Layer {
            frontends,
            defaults: RouteSettings {
                handshake_timeout: self.handshake_timeout,
                connect_timeout: self.connect_timeout,
                idle_timeout: self.idle_timeout.map(Some),
                close_timeout: self.close_timeout,
                proxy_protocol: self.proxy_protocol.map(Some),
                alpn: (!self.alpn.is_empty()).then(|| self.alpn.clone()),
                allow: (!self.allow.is_empty()).then(|| self.allow.clone()),
                deny: (!self.deny.is_empty()).then(|| self.deny.clone()),
                per_source_connections: self.per_source_connections,
                per_source_rate: self.per_source_rate,
                ban_after: self.ban_after,
                ban_time: self.ban_time,
                max_ban_time: self.max_ban_time,
                client_auth,
                admit_after: self.admit_after.clone().map(Some),
                admit_window: self.admit_window,
            },
            certs: self
                .cert
                .iter()
                .zip(&self.key)
                .map(|(cert, key)| CertPair {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .collect(),
            self_signed_names: self.self_signed_names.clone(),
            acme: AcmeLayer {
                enabled: !self.acme_domains.is_empty() || !self.acme_ips.is_empty(),
                domains: self.acme_domains.clone(),
                ips: self.acme_ips.clone(),
                profile: self.acme_profile.clone(),
                email: self.acme_email.clone(),
                directory: self.acme_directory.clone(),
                staging: self.acme_staging.then_some(true),
                ca_root: self.acme_ca_root.clone(),
                eab_kid: self.acme_eab_kid.clone(),
                eab_hmac_key: self.acme_eab_hmac_key.clone(),
            },
            state_dir: self.state_dir.clone(),
            cipher_preference: self.cipher_preference.map(Into::into),
            shutdown_timeout: self.shutdown_timeout,
            max_connections: self.max_connections,
            threads: self.threads,
            log_level: self.log_level.clone(),
            log_format: self.log_format.map(Into::into),
            source_prefix_v4: self.source_prefix_v4,
            source_prefix_v6: self.source_prefix_v6,
            refusal_log_interval: self.refusal_log_interval,
            metrics: self.metrics,
            control: self.control.clone(),
            file: None,
        })
    }
}

/// How log events are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl From<LogFormat> for super::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => super::LogFormat::Text,
            LogFormat::Json => super::LogFormat::Json,
        }
    }
}

/// Server-side preference between the two AEAD families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CipherPreference {
    /// Decide from the CPU's features at start.
    Auto,
    /// AES-GCM first.
    Aes,
    /// ChaCha20-Poly1305 first.
    Chacha,
}

impl From<CipherPreference> for super::CipherPreference {
    fn from(p: CipherPreference) -> Self {
        match p {
            CipherPreference::Auto => super::CipherPreference::Auto,
            CipherPreference::Aes => super::CipherPreference::Aes,
            CipherPreference::Chacha => super::CipherPreference::Chacha,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn acme_conflicts_with_cert_and_hides_the_eab_key() {
        let err = Cli::try_parse_from([
            "tcpfwd",
            "--map",
            "443:a:80",
            "--cert",
            "c",
            "--key",
            "k",
            "--acme-domain",
            "x.org",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli = Cli::try_parse_from([
            "tcpfwd",
            "--map",
            "443:a:80",
            "--acme-domain",
            "x.org",
            "--acme-eab-kid",
            "kid",
            "--acme-eab-hmac-key",
            "sekrit",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("sekrit"));
        let cli = Cli::try_parse_from(["tcpfwd", "--map", "443:a:80", "--acme-staging"]).unwrap();
        let e = cli.args().to_layer().unwrap_err();
        assert!(e.contains("--acme-staging needs --acme-domain"), "{e}");
    }

    #[test]
    fn client_auth_shorthands_apply_to_every_map() {
        use crate::config::{layer, ClientAuth};
        let build = |extra: &[&str]| {
            let mut args = vec!["tcpfwd", "--map", "443:a:80", "--map", "7682:a:7681"];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(args).unwrap();
            layer::build(None, cli.args().to_layer().unwrap()).unwrap()
        };
        let c = build(&["--client-auth", "family", "--state-dir", "/s"]);
        for (_, r) in c.routes() {
            assert_eq!(
                r.client_auth,
                Some(ClientAuth::Family {
                    dir: "/s/family-ca".into()
                })
            );
        }
        let c = build(&["--client-ca", "ca.pem"]);
        assert!(c.routes().all(|(_, r)| r.client_auth
            == Some(ClientAuth::Ca {
                ca: "ca.pem".into(),
                crl: None
            })));
        assert!(build(&[]).routes().all(|(_, r)| r.client_auth.is_none()));
        // The founding case: certificates on 443, its WebSocket port admitted after it.
        let c = build(&[
            "--client-auth",
            "family",
            "--admit-after",
            "443",
            "--admit-window",
            "1h",
        ]);
        let (page, ws) = (&c.frontends[0].routes[0], &c.frontends[1].routes[0]);
        assert!(page.client_auth.is_some() && page.admit_after.is_none());
        assert!(ws.client_auth.is_none());
        let a = ws.admit_after.as_ref().unwrap();
        assert_eq!(Some(a.scope), page.admission);
        assert_eq!(a.window, std::time::Duration::from_secs(3600));
        let e = Cli::try_parse_from(["tcpfwd", "--map", "443:a:80", "--admit-after", "a..b"])
            .unwrap_err();
        assert!(e.to_string().contains("'a..b' is not a route"), "{e}");
        let e = Cli::try_parse_from(["tcpfwd", "--map", "443:a:80", "--admit-window", "1h"])
            .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let e = Cli::try_parse_from([
            "tcpfwd",
            "--map",
            "443:a:80",
            "--client-ca",
            "ca.pem",
            "--client-auth",
            "family",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli =
            Cli::try_parse_from(["tcpfwd", "client-cert", "new", "anna", "--days", "7"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::ClientCert(ClientCertCommand::New(NewCertArgs {
                days: 7,
                modern: false,
                ..
            })))
        ));
    }

    #[test]
    fn check_takes_the_same_options() {
        let cli = Cli::try_parse_from(["tcpfwd", "check", "--map", "443:a:80"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Check(_))));
        assert_eq!(cli.args().maps.len(), 1);
        assert!(Cli::try_parse_from(["tcpfwd"]).is_err());
        let cli = Cli::try_parse_from(["tcpfwd", "--config", "f.toml"]).unwrap();
        assert!(cli.args().maps.is_empty());
    }

    #[test]
    fn acme_names_are_checked_and_the_secret_hidden() {
        use crate::config::{layer, CertSource, LETS_ENCRYPT_STAGING};
        let cfg = |extra: &[&str]| {
            let mut args = vec!["tcpfwd", "--map", "443:a:80"];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(args).unwrap();
            layer::build(None, cli.args().to_layer()?)
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
        // IP addresses, alone or with names, and a profile.
        let c = cfg(&[
            "--acme-ip",
            "203.0.113.7",
            "--acme-ip",
            "2001:db8::7",
            "--acme-ip",
            "203.0.113.7",
            "--acme-profile",
            "shortlived",
        ])
        .unwrap();
        let CertSource::Acme(a) = &c.cert else {
            panic!("{c:?}")
        };
        assert!(a.domains.is_empty());
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.profile.as_deref(), Some("shortlived"));
        let e = cfg(&["--acme-ip", "0.0.0.0"]).unwrap_err();
        assert!(e.contains("invalid --acme-ip '0.0.0.0'"), "{e}");
        let e = cfg(&["--acme-ip", "203.0.113.7", "--acme-profile", "short lived"]).unwrap_err();
        assert!(e.contains("invalid --acme-profile 'short lived'"), "{e}");
        let cli =
            Cli::try_parse_from(["tcpfwd", "--map", "443:a:80", "--acme-profile", "x"]).unwrap();
        let e = cli.args().to_layer().unwrap_err();
        assert!(
            e.contains("--acme-profile needs --acme-domain or --acme-ip"),
            "{e}"
        );
    }

    #[test]
    fn a_value_with_a_newline_is_quoted_escaped_in_clap_errors() {
        let e = Cli::try_parse_from(["tcpfwd", "--threads", "x\ny"]).unwrap_err();
        let raw = match e.get(clap::error::ContextKind::InvalidValue) {
            Some(clap::error::ContextValue::String(v)) => v.clone(),
            other => panic!("no invalid value in {other:?}"),
        };
        let text = escaped_value(&e.render().to_string(), &raw);
        let first = text.lines().next().unwrap();
        assert!(
            first.contains("invalid value 'x\\ny' for '--threads <N>'"),
            "{text}"
        );
    }
}
