//! The command line as typed by the user: clap's derive struct and its help text.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::config::{Duration, MapSpec};

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

MAPS:
  --map [LISTEN_ADDR:]LISTEN_PORT:BACKEND_HOST:BACKEND_PORT
  Without LISTEN_ADDR tcpfwd listens on every address, IPv4 and IPv6. IPv6
  addresses are written in brackets: --map [::1]:8443:[fd00::7]:80. A backend
  name is resolved again for every new connection, so a backend that changes
  address (DHCP) is followed.

CERTIFICATES:
  --cert/--key load a PEM chain and key (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or
  Ed25519). Without them tcpfwd makes a self-signed certificate in memory for
  localhost, this host's name and every --self-signed-name, and logs its
  SHA-256 fingerprint so that you can check it in your browser.

ACME:
  --acme-domain asks an ACME CA (Let's Encrypt unless --acme-directory or
  --acme-staging says otherwise) for a certificate, proving each name over
  TLS-ALPN-01 on tcpfwd's own TLS port: the CA connects to port 443, so one
  map must listen there and the name's DNS must point here. Using it agrees
  to the CA's terms of service (their address is logged). Until the first
  certificate arrives a self-signed placeholder is served; the certificate
  is kept in --state-dir and renewed in the background.
    tcpfwd --map 443:dvr.lan:80 --acme-domain cams.example.org \\
           --acme-email me@example.org --acme-staging

DURATIONS are written like 500ms, 10s, 5m, 1h30m or 2d.

SIGNALS:
  SIGHUP reloads --cert/--key from disk: new handshakes get the new certificate,
  open connections go on, and a pair that does not load leaves the old one
  serving. SIGTERM or SIGINT stop accepting and give open connections
  --shutdown-timeout to finish.

SYSTEMD:
  Socket activation: tcpfwd takes the sockets systemd passes instead of binding.
  Each goes to the map with its port (and its address, if the map gives one); a
  socket whose FileDescriptorName= is a port number goes to the map listening on
  that port. A socket without a map, or a map without a socket, stops start-up.
  With NOTIFY_SOCKET set it sends READY=1, STATUS= (maps and certificate),
  RELOADING=1 around a SIGHUP reload, STOPPING=1, and WATCHDOG=1 when
  WatchdogSec= is set: use Type=notify, or Type=notify-reload on systemd 253+.

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
    max_term_width = 100
)]
pub struct Cli {
    /// Forward TLS on a listening port to a plain backend port:
    /// [LISTEN_ADDR:]LISTEN_PORT:BACKEND_HOST:BACKEND_PORT (repeatable).
    #[arg(long = "map", value_name = "MAP", required = true)]
    pub maps: Vec<MapSpec>,

    /// PEM file with the certificate chain, leaf first.
    #[arg(long, value_name = "FILE", requires = "key", env = "TCPFWD_CERT")]
    pub cert: Option<PathBuf>,

    /// PEM file with the private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert", env = "TCPFWD_KEY")]
    pub key: Option<PathBuf>,

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
    /// (a Raspberry Pi 4, for example).
    #[arg(long, value_enum, default_value_t = CipherPreference::Auto, value_name = "WHICH")]
    pub cipher_preference: CipherPreference,

    /// Time allowed for the TLS handshake.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// Time allowed to connect to the backend.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Close a connection after this long with no data either way. Off by
    /// default, so that long, quiet streams are never cut.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Once one side has closed its half, close the other direction after this
    /// long with no data moving. Every byte starts the window again.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub close_timeout: Duration,

    /// Time open connections get to finish after SIGTERM or SIGINT.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    /// Most connections open at once, over all maps; more are refused at once.
    #[arg(long, default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Worker threads (default: one per CPU). Each runs its own event loop and
    /// accepts on every listening socket; a connection stays on the thread that
    /// accepted it. With one, everything runs on the main thread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set,
    /// takes precedence: a level, or TARGET=LEVEL pairs such as warn,tcpfwd=debug.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// Get the certificate from an ACME CA (Let's Encrypt by default) for this
    /// DNS name, proven over TLS-ALPN-01 on tcpfwd's own port (repeatable; all
    /// names go on one certificate). Using it means agreeing to the CA's terms
    /// of service, whose address is logged.
    #[arg(
        long = "acme-domain",
        value_name = "NAME",
        conflicts_with_all = ["cert", "key", "self_signed_names"]
    )]
    pub acme_domains: Vec<String>,

    /// Contact address given to the CA (for expiry warnings from the CA).
    #[arg(long, value_name = "EMAIL", requires = "acme_domains")]
    pub acme_email: Option<String>,

    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(
        long,
        value_name = "URL",
        requires = "acme_domains",
        conflicts_with = "acme_staging"
    )]
    pub acme_directory: Option<String>,

    /// Use Let's Encrypt's staging CA: untrusted certificates, generous rate
    /// limits. Try it first.
    #[arg(long, requires = "acme_domains")]
    pub acme_staging: bool,

    /// PEM file with the root certificate to trust for the ACME directory's own
    /// HTTPS, instead of the system's roots (private CAs, Pebble).
    #[arg(long, value_name = "FILE", requires = "acme_domains")]
    pub acme_ca_root: Option<PathBuf>,

    /// Key identifier for external account binding (CAs such as ZeroSSL).
    #[arg(long, value_name = "KID", requires_all = ["acme_domains", "acme_eab_hmac_key"])]
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

    /// Where ACME keeps its account, certificate and key [default:
    /// $STATE_DIRECTORY when systemd sets it, else /var/lib/tcpfwd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// A secret from the command line: usable, but never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
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
        assert!(Cli::try_parse_from(["tcpfwd", "--map", "443:a:80", "--acme-staging"]).is_err());
    }
}
