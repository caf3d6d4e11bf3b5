//! Telling the service manager how we are (sd_notify): READY, STATUS, RELOADING, STOPPING, WATCHDOG.
//!
//! Written here rather than taken from a crate so that an abstract
//! `NOTIFY_SOCKET` (`@name`, which systemd may use for user services) works too.
//! Without `NOTIFY_SOCKET` every call does nothing.
#![allow(unsafe_code)]

use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::sign::CertifiedKey;

use crate::tls::x509::GeneralName;

/// Where notifications go, read once from the environment at start.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, UnixAddr)>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
    /// Set after a failed send, so that a gone socket does not warn at every watchdog tick.
    failing: AtomicBool,
}

/// Parses `NOTIFY_SOCKET`: an absolute path, or `@name` for the abstract namespace.
fn notify_addr(value: &str) -> Result<UnixAddr, String> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        UnixAddr::from_abstract_name(name.as_bytes()).map_err(|e| e.to_string())
    } else if value.starts_with('/') {
        UnixAddr::from_pathname(value).map_err(|e| e.to_string())
    } else {
        Err("only an absolute path or an abstract '@name' is supported".into())
    }
}

/// The ping interval from `WATCHDOG_USEC` and `WATCHDOG_PID`, as sd_watchdog_enabled(3) reads them.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    // Never zero: a zero period would panic the timer.
    Some(Duration::from_micros((usec / 2).max(1)))
}

/// CLOCK_MONOTONIC in microseconds, the clock `MONOTONIC_USEC=` is read against.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    #[allow(clippy::unnecessary_cast)] // time_t and c_long are 32-bit on armv7
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    usec
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A value that
    /// cannot be used is logged and notifications stay off.
    pub fn from_env() -> Notifier {
        let target = match std::env::var("NOTIFY_SOCKET") {
            Err(_) => None,
            Ok(value) => match notify_addr(&value)
                .and_then(|addr| Ok((UnixDatagram::unbound().map_err(|e| e.to_string())?, addr)))
            {
                Ok((sock, addr)) => {
                    // Never let a stuck service manager stall a worker thread.
                    let _ = sock.set_nonblocking(true);
                    tracing::debug!(notify_socket = %value, "notifying the service manager");
                    Some((sock, addr))
                }
                Err(why) => {
                    tracing::warn!(notify_socket = %value, "cannot use NOTIFY_SOCKET ({why}); not notifying the service manager");
                    None
                }
            },
        };
        let watchdog = target.as_ref().and_then(|_| {
            watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            )
        });
        Notifier {
            target,
            watchdog,
            failing: AtomicBool::new(false),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`, if the service manager asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, lines: &[String]) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        let msg = lines.join("\n");
        match sock.send_to_addr(msg.as_bytes(), addr) {
            Ok(_) => self.failing.store(false, Ordering::Relaxed),
            Err(e) if self.failing.swap(true, Ordering::Relaxed) => {
                tracing::debug!(state = %msg.replace('\n', " "), "cannot notify the service manager: {e}")
            }
            Err(e) => tracing::warn!(
                state = %msg.replace('\n', " "),
                "cannot notify the service manager: {e}"
            ),
        }
    }

    /// Every listener is up (`READY=1`), with the status line.
    pub fn ready(&self, status: &str) {
        self.send(&["READY=1".into(), status_field(status)]);
    }

    /// A new status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[status_field(status)]);
    }

    /// A reload starts; `ready` ends it.
    pub fn reloading(&self) {
        self.send(&[
            "RELOADING=1".into(),
            format!("MONOTONIC_USEC={}", monotonic_usec()),
            status_field("Reloading the certificate"),
        ]);
    }

    /// Shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&["STOPPING=1".into(), status_field(status)]);
    }

    /// Sends `WATCHDOG=1` at the interval systemd asked for, forever.
    pub async fn run_watchdog(self: std::sync::Arc<Self>) {
        let Some(every) = self.watchdog else {
            return;
        };
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "systemd watchdog on"
        );
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.send(&["WATCHDOG=1".into()]);
        }
    }
}

/// `STATUS=` with the text on one line (a newline would end the field).
fn status_field(status: &str) -> String {
    format!("STATUS={}", status.replace(['\n', '\r'], " "))
}

/// Days since 1970-01-01 as (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// "CN=cams.example.org, expires 2027-01-05 (in 41 days)" for the leaf
/// certificate; `by_names` shows its DNS names instead of its subject.
pub fn describe_cert(key: &CertifiedKey, by_names: bool, now_unix: i64) -> String {
    let Some(der) = key.end_entity_cert().ok() else {
        return "no certificate".into();
    };
    let Ok(cert) = crate::tls::x509::parse(der.as_ref()) else {
        return "an unreadable certificate".into();
    };
    let subject = cert.subject().unwrap_or_default();
    let names = cert
        .subject_alt_names()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| match n {
            GeneralName::Dns(d) => Some(d.to_string()),
            GeneralName::Ip(ip) => Some(ip.to_string()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ");
    let subject = if (by_names || subject.is_empty()) && !names.is_empty() {
        format!("for {names}")
    } else {
        subject
    };
    let not_after = cert.not_after;
    let (y, m, d) = civil_from_days(not_after.div_euclid(86_400));
    let left = not_after - now_unix;
    let when = if left < 0 {
        format!("EXPIRED {} days ago", (-left) / 86_400)
    } else {
        format!("in {} days", left / 86_400)
    };
    format!("{subject}, expires {y:04}-{m:02}-{d:02} ({when})")
}

/// The line `systemctl status` shows: what is served and with which certificate.
pub fn status_line(maps: &[String], cert: &CertifiedKey, self_signed: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format!(
        "Serving {}; {}certificate {}",
        maps.join(", "),
        if self_signed { "self-signed " } else { "" },
        describe_cert(cert, self_signed, now)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    #[test]
    fn notify_socket_forms() {
        let a = notify_addr("@sd-notify-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"sd-notify-test"[..]));
        let p = notify_addr("/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(notify_addr("vsock:2:1234").is_err());
    }

    #[test]
    fn watchdog_rules() {
        assert_eq!(
            watchdog_interval(Some("4000000"), None, 9),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("4000000"), Some("9"), 9),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("4000000"), Some("8"), 9), None);
        assert_eq!(watchdog_interval(Some("0"), None, 9), None);
        assert_eq!(
            watchdog_interval(Some("1"), None, 9),
            Some(Duration::from_micros(1))
        );
        assert_eq!(watchdog_interval(Some("x"), None, 9), None);
        assert_eq!(watchdog_interval(None, Some("9"), 9), None);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    /// `der` with some key: describe_cert reads only the certificate.
    fn certified(der: Vec<u8>) -> CertifiedKey {
        let key = rcgen::KeyPair::generate().unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).unwrap();
        CertifiedKey::new(vec![der.into()], key)
    }

    #[test]
    fn certificates_are_described_by_subject_or_names() {
        let leaf = certified(crate::tls::x509::tests::openssl_leaf().to_vec());
        let not_after = 1_803_389_104;
        assert_eq!(
            describe_cert(&leaf, false, not_after - 41 * 86_400),
            "C=DE, ST=Berlin, L=Berlin, O=Example Cams, OU=Ops, CN=cams.example.org, \
             Email=me@example.org, expires 2027-02-23 (in 41 days)"
        );
        assert_eq!(
            describe_cert(&leaf, true, not_after + 3 * 86_400),
            "for Cams.Example.org *.example.org 127.0.0.1, expires 2027-02-23 (EXPIRED 3 days ago)"
        );
        assert_eq!(
            describe_cert(&certified(vec![0x30, 0x00]), false, 0),
            "an unreadable certificate"
        );
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("tcpfwd-notify-test-{}", std::process::id());
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
            ..Notifier::default()
        };
        n.ready("a\nb");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=a b");
        n.reloading();
        let len = rx.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }
}
