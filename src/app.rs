//! Start-up in order: limits, TLS, listeners, then the server until the stop signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{CertSource, Config};
use crate::forward::Context;
use crate::listener::{self, Listener};
use crate::server::{self, Limits};
use crate::{sys, tls};

/// Everything built from the configuration before the first accept.
pub struct Prepared {
    /// Listening sockets, one per map.
    pub listeners: Vec<Listener>,
    /// Shared per-connection context.
    pub ctx: Arc<Context>,
}

/// Loads certificates and opens the listeners; errors here end start-up.
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
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

    let listeners = listener::bind_all(&config.maps).context("opening the listeners")?;
    for l in &listeners {
        tracing::info!(map = %l.map, listen = %l.local_addr, backend = %l.map.backend, "listening");
    }
    // Only now: the CA's validation connects to these listeners.
    if let Some(task) = acme_task {
        task.spawn(resolver, ctx.tls.clone());
    }
    Ok(Prepared { listeners, ctx })
}

/// Runs until `shutdown` resolves and open connections have drained.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let prepared = prepare(&config)?;
    let limits = Limits {
        max_connections: config.max_connections,
        shutdown_timeout: config.shutdown_timeout,
    };
    server::run(prepared.listeners, prepared.ctx, limits, shutdown).await;
    Ok(())
}
