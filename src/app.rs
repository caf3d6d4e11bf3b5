//! Start-up in order: limits, TLS, listeners, then the server until the stop signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;

use rustls::crypto::CryptoProvider;

use crate::config::{CertSource, Config};
use crate::net::activation::{self, Passed};
use crate::net::listener::{self, Listener};
use crate::net::server::{Limits, Server};
use crate::net::sys;
use crate::proxy::forward::Context;
use crate::service::notify::Notifier;
use crate::service::reload::{Hangups, Reloader, Reloads, Status};
use crate::tls;

/// Everything built from the configuration before the first accept.
pub struct Prepared {
    /// Listening sockets, one per map.
    pub listeners: Vec<Listener>,
    /// Shared per-connection context.
    pub ctx: Arc<Context>,
    /// The provider the certificates were built with, for reloads.
    pub provider: Arc<CryptoProvider>,
    /// Serves the certificate in force; reloads swap it.
    pub resolver: Arc<tls::CertResolver>,
    /// The ACME task, started once the listeners are up (`run_with` starts it).
    pub acme: Option<crate::acme::Task>,
}

/// How often `STATUS=` is sent again, so that "expires in N days" stays true.
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(3600);

/// What the service manager handed over, taken in `main` before threads start.
#[derive(Default)]
pub struct FromSystemd {
    /// Sockets from socket activation; `None` means bind the maps ourselves.
    pub sockets: Option<Vec<Passed>>,
    /// sd_notify target (does nothing when not under systemd).
    pub notifier: Arc<Notifier>,
}

/// Loads certificates and opens the listeners; errors here end start-up.
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    prepare_with(config, None)
}

/// `prepare`, taking the listeners from `sockets` (socket activation) when given.
pub fn prepare_with(config: &Config, sockets: Option<Vec<Passed>>) -> anyhow::Result<Prepared> {
    match sys::raise_nofile_limit() {
        Ok((old, new)) if new > old => {
            tracing::debug!(old, new, "raised the open-files limit")
        }
        Ok((_, cur)) if (cur as usize) < config.max_connections * 2 + 32 => tracing::warn!(
            limit = cur,
            max_connections = config.max_connections,
            "the open-files limit is below two per connection; raise LimitNOFILE or lower --max-connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }

    let chacha = tls::prefer_chacha(config.cipher_preference);
    tracing::info!(
        aes_hardware = tls::cpu_has_aes(),
        preferred = if chacha {
            "CHACHA20_POLY1305"
        } else {
            "AES_GCM"
        },
        "cipher preference"
    );
    let provider = Arc::new(tls::provider(chacha));
    // Also the process default, for any client TLS (ACME) built later.
    let _ = provider.as_ref().clone().install_default();

    let mut acme_task = None;
    let key = match &config.cert {
        CertSource::Files { cert, key } => {
            let ck = tls::load_files(cert, key, &provider)?;
            tracing::info!(
                cert = %cert.display(),
                sha256 = %ck.end_entity_cert().map(|c| tls::sha256_fingerprint(c)).unwrap_or_default(),
                "certificate loaded"
            );
            ck
        }
        CertSource::SelfSigned { extra_names } => {
            let ss = tls::self_signed(extra_names, &provider)?;
            tracing::info!(
                names = ?ss.names,
                sha256 = %ss.fingerprint,
                "serving a self-signed certificate made at start (use --cert/--key for a real one)"
            );
            ss.key
        }
        CertSource::Acme(acme) => {
            let (key, task) = crate::acme::prepare(acme, &provider)?;
            acme_task = Some(task);
            key
        }
    };
    let resolver = tls::CertResolver::new(key);
    let server_config =
        tls::server_config(provider.clone(), resolver.clone(), config.alpn.clone())?;
    let ctx = Arc::new(Context {
        tls: tls::TlsRouter::new(server_config),
        timeouts: config.timeouts,
    });

    let listeners = match sockets {
        Some(passed) => activation::listeners(&config.maps, passed)
            .context("taking the sockets passed by systemd")?,
        None => listener::bind_all(&config.maps).context("opening the listeners")?,
    };
    for l in &listeners {
        tracing::info!(map = %l.map, listen = %l.local_addr, backend = %l.map.backend, "listening");
    }
    Ok(Prepared {
        listeners,
        ctx,
        provider,
        resolver,
        acme: acme_task,
    })
}

/// Runs until `shutdown` resolves and open connections have drained.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(config, FromSystemd::default(), shutdown).await
}

/// `run` with what systemd handed over: its sockets, sd_notify, SIGHUP reloads.
pub async fn run_with(
    config: Config,
    systemd: FromSystemd,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let hangups = Hangups::install().context("installing the SIGHUP handler")?;
    let prepared = prepare_with(&config, systemd.sockets)?;
    let limits = Limits {
        max_connections: config.max_connections,
        shutdown_timeout: config.shutdown_timeout,
        workers: config.workers,
    };
    let notifier = systemd.notifier;
    let status = Status::new(
        notifier.clone(),
        prepared.resolver.clone(),
        matches!(config.cert, CertSource::SelfSigned { .. }),
        prepared
            .listeners
            .iter()
            .map(|l| format!("{} -> {}", l.local_addr, l.map.backend))
            .collect(),
    );
    // The listeners are up, so the CA's validation can reach them.
    if let Some(task) = prepared.acme {
        let status = status.clone();
        task.spawn(
            prepared.resolver.clone(),
            prepared.ctx.tls.clone(),
            Box::new(move || status.send()),
        );
    }
    let reloads = Reloads {
        hangups,
        reloader: Reloader {
            source: config.cert.clone(),
            provider: prepared.provider,
            resolver: prepared.resolver,
        },
        notifier: notifier.clone(),
        status: status.clone(),
    };
    let server = Server::start(prepared.listeners, prepared.ctx, limits)
        .context("starting the worker threads")?;
    tracing::info!(status = %status.line(), workers = config.workers, "ready");
    status.ready();
    let reloading = tokio::spawn(reloads.run());
    let watchdog = tokio::spawn(notifier.clone().run_watchdog());
    let refresh = tokio::spawn(status.refresh_every(STATUS_REFRESH));
    let shutdown = async {
        shutdown.await;
        // No reload (and so no READY=1) or status once stopping has begun.
        reloading.abort();
        refresh.abort();
        notifier.stopping("Stopping: finishing open connections");
    };
    server.run_until(shutdown).await;
    watchdog.abort();
    Ok(())
}
