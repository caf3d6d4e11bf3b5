//! SIGHUP: re-read the certificate from where it came from; a bad one leaves the old one serving.
//!
//! Open connections keep the certificate they were made with; every handshake
//! after a successful reload gets the new one.

use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::CertSource;
use crate::service::notify::{self, Notifier};
use crate::tls::{self, CertResolver};

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new certificate serves from now on; its SHA-256.
    Replaced(String),
    /// Nothing to re-read; the reason, for the log.
    Nothing(&'static str),
}

/// Re-reads the certificate source into the resolver.
///
/// The hook for every source: a new source (ACME's stored certificate) adds its
/// arm to [`Reloader::reload`].
pub struct Reloader {
    /// Where the certificate comes from.
    pub source: CertSource,
    /// For building the new key.
    pub provider: Arc<CryptoProvider>,
    /// What handshakes are served from.
    pub resolver: Arc<CertResolver>,
}

impl Reloader {
    /// Loads the certificate again and swaps it in. On error the old one stays.
    pub fn reload(&self) -> anyhow::Result<Outcome> {
        match &self.source {
            CertSource::Files { cert, key } => self.swap_in(cert, key),
            CertSource::SelfSigned { .. } => Ok(Outcome::Nothing(
                "the self-signed certificate made at start stays (give --cert/--key to reload from files)",
            )),
            CertSource::Acme(cfg) => {
                // Re-read what the ACME task stored (after a restore from a
                // backup, say). The state dir is already locked by this process.
                let (cert, key) = crate::acme::stored_files(cfg);
                if !cert.exists() {
                    return Ok(Outcome::Nothing(
                        "no ACME certificate stored yet; the placeholder serves until the CA issues one",
                    ));
                }
                self.swap_in(&cert, &key)
            }
        }
    }

    fn swap_in(&self, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Outcome> {
        let ck = tls::load_files(cert, key, &self.provider)?;
        let sha256 = ck
            .end_entity_cert()
            .map(|c| tls::sha256_fingerprint(c))
            .unwrap_or_default();
        self.resolver.set(ck);
        Ok(Outcome::Replaced(sha256))
    }
}

/// The SIGHUP handler, installed at start so that a failure shows before serving
/// (and so that SIGHUP never kills the process).
pub struct Hangups(Signal);

impl Hangups {
    /// Installs the SIGHUP handler.
    pub fn install() -> std::io::Result<Hangups> {
        Ok(Hangups(signal(SignalKind::hangup())?))
    }
}

/// The `STATUS=` line, built from what is served now; cheap to clone.
///
/// Anything that swaps the certificate outside a reload (ACME renewals) calls
/// [`Status::send`] afterwards so that `systemctl status` shows the new one.
#[derive(Clone)]
pub struct Status {
    inner: Arc<StatusInner>,
}

struct StatusInner {
    notifier: Arc<Notifier>,
    resolver: Arc<CertResolver>,
    self_signed: bool,
    maps: Vec<String>,
    /// Why the last reload failed, until one succeeds.
    reload_error: Mutex<Option<String>>,
}

impl Status {
    /// Status for `maps` (as shown) served with the resolver's certificate.
    pub fn new(
        notifier: Arc<Notifier>,
        resolver: Arc<CertResolver>,
        self_signed: bool,
        maps: Vec<String>,
    ) -> Status {
        Status {
            inner: Arc::new(StatusInner {
                notifier,
                resolver,
                self_signed,
                maps,
                reload_error: Mutex::new(None),
            }),
        }
    }

    /// The current line.
    pub fn line(&self) -> String {
        let i = &self.inner;
        let line = notify::status_line(&i.maps, &i.resolver.current(), i.self_signed);
        match &*i.reload_error.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => format!("{line} (last reload failed: {e})"),
            None => line,
        }
    }

    /// Sends the current line as `STATUS=`.
    pub fn send(&self) {
        self.inner.notifier.status(&self.line());
    }

    /// Sends `READY=1` with the current line.
    pub fn ready(&self) {
        self.inner.notifier.ready(&self.line());
    }

    fn set_reload_error(&self, e: Option<String>) {
        *self
            .inner
            .reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Sends the line again every `every`, so that "expires in N days" stays true.
    pub async fn refresh_every(self, every: std::time::Duration) {
        if !self.inner.notifier.enabled() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            self.send();
        }
    }
}

/// Everything the reload loop needs to answer SIGHUP.
pub struct Reloads {
    /// The SIGHUP stream.
    pub hangups: Hangups,
    /// What to re-read.
    pub reloader: Reloader,
    /// Where to report.
    pub notifier: Arc<Notifier>,
    /// The status line to send with READY=1.
    pub status: Status,
}

impl Reloads {
    /// Answers every SIGHUP, forever: RELOADING=1, reload, READY=1 with the new status.
    pub async fn run(mut self) {
        while self.hangups.0.recv().await.is_some() {
            self.notifier.reloading();
            tracing::info!(signal = "SIGHUP", "reload requested");
            match self.reloader.reload() {
                Ok(Outcome::Replaced(sha256)) => {
                    tracing::info!(%sha256, "certificate reloaded; new handshakes get it");
                    self.status.set_reload_error(None);
                }
                Ok(Outcome::Nothing(why)) => tracing::info!("nothing to reload: {why}"),
                Err(e) => {
                    tracing::error!("reload failed, still serving the previous certificate: {e:#}");
                    self.status.set_reload_error(Some(format!("{e:#}")));
                }
            }
            self.status.ready();
        }
    }
}
