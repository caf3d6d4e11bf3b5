//! SIGHUP: re-read the certificate from where it came from; a bad one leaves the old one serving.
//!
//! Open connections keep the certificate they were made with; every handshake
//! after a successful reload gets the new one.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::CertSource;
use crate::notify::{self, Notifier};
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
            CertSource::Files { cert, key } => {
                let ck = tls::load_files(cert, key, &self.provider)?;
                let sha256 = ck
                    .end_entity_cert()
                    .map(|c| tls::sha256_fingerprint(c))
                    .unwrap_or_default();
                self.resolver.set(ck);
                Ok(Outcome::Replaced(sha256))
            }
            CertSource::SelfSigned { .. } => Ok(Outcome::Nothing(
                "the self-signed certificate made at start stays (give --cert/--key to reload from files)",
            )),
        }
    }

    /// Whether the certificate in force is the self-signed default.
    pub fn self_signed(&self) -> bool {
        matches!(self.source, CertSource::SelfSigned { .. })
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

/// Everything the reload loop needs to answer SIGHUP and update `STATUS=`.
pub struct Reloads {
    /// The SIGHUP stream.
    pub hangups: Hangups,
    /// What to re-read.
    pub reloader: Reloader,
    /// Where to report.
    pub notifier: Arc<Notifier>,
    /// The maps served, as shown in `STATUS=`.
    pub maps: Vec<String>,
}

impl Reloads {
    /// The current status line.
    pub fn status(&self) -> String {
        notify::status_line(
            &self.maps,
            &self.reloader.resolver.current(),
            self.reloader.self_signed(),
        )
    }

    /// Answers every SIGHUP, forever: RELOADING=1, reload, READY=1 with the new status.
    pub async fn run(mut self) {
        while self.hangups.0.recv().await.is_some() {
            self.notifier.reloading();
            tracing::info!(signal = "SIGHUP", "reload requested");
            let status = match self.reloader.reload() {
                Ok(Outcome::Replaced(sha256)) => {
                    tracing::info!(%sha256, "certificate reloaded; new handshakes get it");
                    self.status()
                }
                Ok(Outcome::Nothing(why)) => {
                    tracing::info!("nothing to reload: {why}");
                    self.status()
                }
                Err(e) => {
                    tracing::error!("reload failed, still serving the previous certificate: {e:#}");
                    format!("{} (last reload failed: {e:#})", self.status())
                }
            };
            self.notifier.ready(&status);
        }
    }
}
