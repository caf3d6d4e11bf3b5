//! The control socket: `tcpfwd status` asks the running instance over a Unix
//! socket, and gets one JSON document back.
//!
//! The protocol is one request line (`{"protocol":1,"request":"status"}`)
//! and one JSON [`Report`] (or `{"protocol":1,"error":"..."}`), then the
//! server closes. The socket is made 0600, so only its owner (the service's
//! user) and root can connect; each connection's peer credentials are checked
//! too, which also covers the moment between bind and chmod. A report reads
//! what the metrics read (atomics, the tables and certificates in force), so
//! asking never holds up a connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::config::ControlSocket;
use crate::net::server::ServerHandle;
use crate::policy::Gate;
use crate::proxy::routes::FrontendHandle;
use crate::service::metrics::{AcmeMetrics, PolicyReason, POLICY_REASONS};
use crate::tls::{self, CertResolver};

/// The protocol's version; a client refuses an answer with another.
pub const PROTOCOL: u32 = 1;

/// How many banned sources a report lists.
const BANNED_SHOWN: usize = 10;

/// How long one request may take, either side.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a client sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL`].
    pub protocol: u32,
    /// `status`, the only one so far.
    pub request: String,
}

/// What `tcpfwd status` shows: the answer to a `status` request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// [`PROTOCOL`].
    pub protocol: u32,
    /// tcpfwd's version.
    pub version: String,
    /// The process.
    pub pid: u32,
    /// When it started (Unix time).
    pub started: i64,
    /// Seconds since.
    pub uptime_seconds: u64,
    /// Every frontend, in the configuration's order.
    pub frontends: Vec<FrontendReport>,
    /// The certificates in force.
    pub certificates: Vec<CertReport>,
    /// The ACME task's times, with ACME.
    pub acme: Option<AcmeReport>,
    /// The last SIGHUP reload since start, if any.
    pub last_reload: Option<ReloadReport>,
    /// Sources in a cool-off now.
    pub banned: BannedReport,
}

/// One frontend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrontendReport {
    /// As configured (`443`, `127.0.0.1:8443`).
    pub listen: String,
    /// The sockets it accepts on.
    pub addresses: Vec<String>,
    /// Connections still in the TLS handshake (no route yet).
    pub in_handshake: i64,
    /// Refused at accept since start (lists, bans, per-source numbers), by why.
    pub refused: BTreeMap<String, u64>,
    /// Its routes.
    pub routes: Vec<RouteReport>,
}

/// One route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteReport {
    /// Its name in logs and metrics (`default` or its first server name).
    pub name: String,
    /// Where it forwards to.
    pub backend: String,
    /// Connections open on it now.
    pub open: i64,
    /// Connections given this route since start.
    pub opened: u64,
    /// Refused by its own lists or numbers since start.
    pub refused: u64,
}

/// One certificate in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertReport {
    /// Its subject.
    pub subject: String,
    /// Its DNS names.
    pub names: Vec<String>,
    /// When it expires (Unix time).
    pub not_after: i64,
    /// Whole days until then (negative once expired).
    pub days_left: i64,
    /// SHA-256 of the DER, as browsers show it.
    pub sha256: String,
}

/// The ACME task's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AcmeReport {
    /// The names ordered.
    pub domains: Vec<String>,
    /// The end of the last attempt that got a certificate, since start.
    pub last_success: Option<i64>,
    /// The end of the last attempt that failed, since start.
    pub last_failure: Option<i64>,
    /// When the certificate in force is due for renewal.
    pub next_renewal: Option<i64>,
}

/// The last reload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadReport {
    /// When it ended (Unix time).
    pub at: i64,
    /// Whether it swapped in what it read (or found nothing to do).
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
}

/// The banned sources.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BannedReport {
    /// How many sources are in a cool-off.
    pub total: usize,
    /// The ones with the most time left, most first.
    pub top: Vec<BanReport>,
}

/// One banned source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BanReport {
    /// The address or block, as in the refusal summary.
    pub source: String,
    /// Seconds until it is admitted again.
    pub seconds_left: u64,
}

/// What a report is made from: the same shared state the metrics read.
pub struct State {
    started: SystemTime,
    frontends: ArcSwap<Vec<Arc<FrontendHandle>>>,
    server: ServerHandle,
    resolver: Arc<CertResolver>,
    acme: Option<(Vec<String>, AcmeMetrics)>,
    gate: Arc<Gate>,
    last_reload: Mutex<Option<ReloadReport>>,
}

/// Seconds since the Unix epoch (0 before it).
fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl State {
    /// The state of an instance that started now.
    pub fn new(
        frontends: Vec<Arc<FrontendHandle>>,
        server: ServerHandle,
        resolver: Arc<CertResolver>,
        acme: Option<(Vec<String>, AcmeMetrics)>,
        gate: Arc<Gate>,
    ) -> Arc<State> {
        Arc::new(State {
            started: SystemTime::now(),
            frontends: ArcSwap::from_pointee(frontends),
            server,
            resolver,
            acme,
            gate,
            last_reload: Mutex::new(None),
        })
    }

    /// A reload ended: `error` is why it failed, `frontends` what it serves now.
    pub fn reloaded(&self, frontends: &[Arc<FrontendHandle>], error: Option<String>) {
        self.frontends.store(Arc::new(frontends.to_vec()));
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(ReloadReport {
            at: unix(SystemTime::now()),
            ok: error.is_none(),
            error,
        });
    }

    /// The report, as of now.
    pub fn report(&self) -> Report {
        let now = SystemTime::now();
        let frontends = self
            .frontends
            .load()
            .iter()
            .map(|f| {
                let table = f.table();
                let m = &f.metrics;
                let refused = [
                    PolicyReason::Denied,
                    PolicyReason::Banned,
                    PolicyReason::Connections,
                    PolicyReason::Rate,
                    PolicyReason::NotAdmitted,
                ]
                .into_iter()
                .map(|r| (POLICY_REASONS[r as usize].to_string(), m.refused.get(r)))
                .chain([("max_connections".to_string(), m.refused_over_limit.get())])
                .filter(|(_, n)| *n > 0)
                .collect();
                FrontendReport {
                    listen: f.listen.to_string(),
                    addresses: self
                        .server
                        .local_addrs(f.listen)
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    in_handshake: m.unrouted.open.get(),
                    refused,
                    routes: table
                        .routes()
                        .iter()
                        .map(|r| RouteReport {
                            name: r.label.clone(),
                            backend: r.backend.clone(),
                            open: r.metrics.open.get(),
                            opened: r.metrics.opened.get(),
                            refused: r.metrics.refused.total(),
                        })
                        .collect(),
                }
            })
            .collect();
        let certificates = self
            .resolver
            .set_in_force()
            .iter()
            .filter_map(|ck| {
                let der = ck.end_entity_cert().ok()?;
                let cert = tls::x509::parse(der.as_ref()).ok()?;
                Some(CertReport {
                    subject: cert.subject().unwrap_or_default(),
                    names: cert.dns_names().unwrap_or_default(),
                    not_after: cert.not_after,
                    days_left: (cert.not_after - unix(now)).div_euclid(86_400),
                    sha256: tls::sha256_fingerprint(der.as_ref()),
                })
            })
            .collect();
        let acme = self.acme.as_ref().map(|(domains, m)| {
            let set = |v: i64| (v > 0).then_some(v);
            AcmeReport {
                domains: domains.clone(),
                last_success: set(m.last_success.get()),
                last_failure: set(m.last_failure.get()),
                next_renewal: set(m.next_renewal.get()),
            }
        });
        let (top, total) = self.gate.banned(BANNED_SHOWN);
        Report {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started: unix(self.started),
            uptime_seconds: now.duration_since(self.started).map_or(0, |d| d.as_secs()),
            frontends,
            certificates,
            acme,
            last_reload: self
                .last_reload
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            banned: BannedReport {
                total,
                top: top
                    .into_iter()
                    .map(|(source, left)| BanReport {
                        source,
                        // Rounded up: "0 s left" would read as not banned.
                        seconds_left: left.as_secs() + u64::from(left.subsec_nanos() > 0),
                    })
                    .collect(),
            },
        }
    }
}

/// The bound control socket; [`Control::remove`] deletes it at shutdown.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we made: removed only if still ours.
    id: (u64, u64),
}

/// Opens the control socket at `c.path`, replacing a stale one left by a
/// crash. Errors stop start-up when the path was chosen; in systemd's
/// runtime directory a warning says why there is none and the server goes
/// on without it.
pub fn bind(c: &ControlSocket) -> anyhow::Result<Option<Control>> {
    match try_bind(&c.path) {
        Ok(control) => Ok(Some(control)),
        Err(e) if c.explicit => Err(e),
        Err(e) => {
            tracing::warn!(
                "no control socket, so `tcpfwd status` cannot reach this instance: {e:#} (pass --control PATH)"
            );
            Ok(None)
        }
    }
}

fn try_bind(path: &Path) -> anyhow::Result<Control> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "another tcpfwd answers on control socket {}: stop it, or give this one another --control",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).with_context(|| {
                    format!("removing the stale control socket {}", path.display())
                })?;
                tracing::info!(path = %path.display(), "removed a stale control socket (left by a crash?)");
            }
            Err(e) => bail!("control socket {}: {e}", path.display()),
        },
        Ok(_) => bail!(
            "{} exists and is not a socket: remove it, or pass another --control",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("control socket {}: {e}", path.display()),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("opening the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making the control socket {} 0600", path.display()))?;
    let m = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading back the control socket {}", path.display()))?;
    Ok(Control {
        listener,
        path: path.to_path_buf(),
        id: (m.dev(), m.ino()),
    })
}

impl Control {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests until the task is dropped; `remove` the socket then.
    pub async fn serve(&self, state: Arc<State>) {
        // Root and the socket's owner (our own user) may ask.
        let owner = std::fs::symlink_metadata(&self.path).map_or(0, |m| m.uid());
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(TIMEOUT, answer(stream, owner, &state)).await;
            });
        }
    }

    /// Deletes the socket file, unless another instance has put its own there.
    pub fn remove(&self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn error_doc(e: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&serde_json::json!({ "protocol": PROTOCOL, "error": e }))
        .unwrap_or_default();
    v.push(b'\n');
    v
}

async fn answer(mut stream: tokio::net::UnixStream, owner: u32, state: &State) {
    let allowed = stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == owner);
    let doc = if !allowed {
        error_doc("permission denied")
    } else {
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new((&mut stream).take(4096));
        match reader.read_line(&mut line).await {
            Err(e) => error_doc(&format!("reading the request: {e}")),
            Ok(_) => match serde_json::from_str::<Request>(&line) {
                Err(e) => error_doc(&format!("not a request: {e}")),
                Ok(r) if r.protocol != PROTOCOL => error_doc(&format!(
                    "protocol {} asked, this tcpfwd speaks {PROTOCOL}",
                    r.protocol
                )),
                Ok(r) if r.request == "status" => {
                    let mut v = serde_json::to_vec(&state.report()).unwrap_or_default();
                    v.push(b'\n');
                    v
                }
                Ok(r) => error_doc(&format!("unknown request {:?}", r.request)),
            },
        }
    };
    let _ = stream.write_all(&doc).await;
    let _ = stream.shutdown().await;
}

/// Asks the instance at `path` for its report; the error is the one line
/// to show.
pub fn query(path: &Path) -> Result<Report, String> {
    let shown = path.display();
    let denied = || {
        format!("permission denied on control socket {shown}: run tcpfwd status as root or as the user tcpfwd runs as")
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "no control socket at {shown}: no tcpfwd is running with it (under systemd it is $RUNTIME_DIRECTORY/control while the service runs; a tcpfwd started by hand has one only with --control PATH: give tcpfwd status the same --control PATH)"
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "nothing answers on control socket {shown} (left by a tcpfwd that has stopped): start tcpfwd, or pass the running one's --control PATH to tcpfwd status"
        ),
        io::ErrorKind::PermissionDenied => denied(),
        _ => format!("cannot reach control socket {shown}: {e}"),
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!(
                "control socket {shown}: no answer within {}s",
                TIMEOUT.as_secs()
            )
        }
        _ => format!("control socket {shown}: {e}"),
    };
    s.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut req = serde_json::to_vec(&Request {
        protocol: PROTOCOL,
        request: "status".into(),
    })
    .map_err(|e| e.to_string())?;
    req.push(b'\n');
    // A refusal (another user) may close before reading: its answer still counts.
    let _ = s.write_all(&req);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io_err)?;
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| format!("control socket {shown}: not a tcpfwd answer: {e}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(if e == "permission denied" {
            denied()
        } else {
            format!("control socket {shown}: tcpfwd says: {e}")
        });
    }
    let protocol = v.get("protocol").and_then(|p| p.as_u64());
    if protocol != Some(u64::from(PROTOCOL)) {
        return Err(format!(
            "control socket {shown}: the running tcpfwd speaks protocol {protocol:?}, this one {PROTOCOL}: run the status of the same version"
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("control socket {shown}: unexpected answer: {e}"))
}

/// A span of time for people: `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn human(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A Unix time for people, relative to `now`: `2026-12-01T10:00:00Z (3m 2s ago)`.
fn when(t: i64, now: i64) -> String {
    let at = crate::acme::fmt_time(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64));
    if t > now {
        format!("{at} (in {})", human((t - now) as u64))
    } else {
        format!("{at} ({} ago)", human((now - t) as u64))
    }
}

/// The report as `tcpfwd status` prints it.
pub fn render(r: &Report) -> String {
    let now = unix(SystemTime::now());
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "tcpfwd {}, pid {}, up {} (since {})",
        r.version,
        r.pid,
        human(r.uptime_seconds),
        crate::acme::fmt_time(UNIX_EPOCH + Duration::from_secs(r.started.max(0) as u64))
    ));
    line("frontends:".into());
    for f in &r.frontends {
        let mut head = format!("  {} on {}", f.listen, f.addresses.join(", "));
        if f.addresses.is_empty() {
            head = format!("  {} (no socket)", f.listen);
        }
        if f.in_handshake > 0 {
            head.push_str(&format!(", {} in the handshake", f.in_handshake));
        }
        if !f.refused.is_empty() {
            let why: Vec<String> = f.refused.iter().map(|(w, n)| format!("{w}={n}")).collect();
            head.push_str(&format!(", refused at accept: {}", why.join(" ")));
        }
        line(head);
        let width = f.routes.iter().map(|rt| rt.name.len()).max().unwrap_or(0);
        for rt in &f.routes {
            let mut s = format!(
                "    {:width$} -> {}: {} open, {} since start",
                rt.name, rt.backend, rt.open, rt.opened
            );
            if rt.refused > 0 {
                s.push_str(&format!(", {} refused", rt.refused));
            }
            line(s);
        }
    }
    line("certificates:".into());
    for c in &r.certificates {
        let left = if c.days_left < 0 {
            format!("EXPIRED {} days ago", -c.days_left)
        } else {
            format!("{} days left", c.days_left)
        };
        line(format!(
            "  {} ({}): expires {}, {left}",
            c.names.join(", "),
            c.subject,
            crate::acme::fmt_time(UNIX_EPOCH + Duration::from_secs(c.not_after.max(0) as u64)),
        ));
    }
    match &r.acme {
        None => line("acme: off".into()),
        Some(a) => {
            let t = |v: Option<i64>, none: &str| v.map_or(none.to_string(), |t| when(t, now));
            line(format!("acme: {}", a.domains.join(", ")));
            line(format!(
                "  last success: {}",
                t(a.last_success, "none since start")
            ));
            line(format!(
                "  last failure: {}",
                t(a.last_failure, "none since start")
            ));
            line(format!(
                "  next renewal: {}",
                t(a.next_renewal, "not scheduled")
            ));
        }
    }
    match &r.last_reload {
        None => line("last reload: none since start".into()),
        Some(l) => line(format!(
            "last reload: {}, {}",
            when(l.at, now),
            match &l.error {
                None => "ok".to_string(),
                Some(e) => format!("FAILED: {e}"),
            }
        )),
    }
    if r.banned.total == 0 {
        line("banned sources: none".into());
    } else {
        line(format!("banned sources: {}", r.banned.total));
        for b in &r.banned.top {
            line(format!("  {} for {}", b.source, human(b.seconds_left)));
        }
        if r.banned.total > r.banned.top.len() {
            line(format!(
                "  and {} more",
                r.banned.total - r.banned.top.len()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_well() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(61), "1m 1s");
        assert_eq!(human(3 * 3600 + 5 * 60 + 9), "3h 5m");
        assert_eq!(human(2 * 86_400 + 3600), "2d 1h");
    }

    #[test]
    fn no_instance_is_one_clear_line() {
        let e = query(Path::new("/nonexistent/tcpfwd/control")).unwrap_err();
        assert_eq!(
            e,
            "no control socket at /nonexistent/tcpfwd/control: no tcpfwd is running with it (under systemd it is $RUNTIME_DIRECTORY/control while the service runs; a tcpfwd started by hand has one only with --control PATH: give tcpfwd status the same --control PATH)"
        );
    }
}
