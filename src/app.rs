//! Start-up in order: limits, TLS, listeners, then the server until the stop signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;

use rustls::crypto::CryptoProvider;

use crate::config::layer::Layer;
use crate::config::{CertSource, Config};
use crate::net::activation::{self, Passed};
use crate::net::listener::{self, Listener};
use crate::net::server::{Limits, Server, ServerHandle};
use crate::net::sys;
use crate::policy::Gate;
use crate::proxy::forward::Context;
use crate::proxy::routes::{FrontendHandle, RouteTable, TableBuilder};
use crate::service::control;
use crate::service::metrics::{self, Metrics};
use crate::service::notify::Notifier;
use crate::service::reload::{Hangups, Reloader, Reloads, Status};
use crate::tls;

/// Everything built from the configuration before the first accept.
pub struct Prepared {
    /// Listening sockets, one per frontend.
    pub listeners: Vec<Listener>,
    /// Shared per-connection context.
    pub ctx: Arc<Context>,
    /// What connections read, and reloads swap.
    pub served: Served,
    /// The ACME task, started once the listeners are up (`run_with` starts it).
    pub acme: Option<crate::acme::Task>,
}

/// What connections read and reloads swap: route tables and certificates.
pub struct Served {
    /// The configuration in force.
    pub config: Config,
    /// The provider the certificates were built with.
    pub provider: Arc<CryptoProvider>,
    /// Serves the certificates in force.
    pub resolver: Arc<tls::CertResolver>,
    /// One per frontend, in the configuration's order.
    pub frontends: Vec<Arc<FrontendHandle>>,
    /// The source lists, limits and bans (its numbers change on reload).
    pub gate: Arc<Gate>,
    /// What the metrics endpoint shows; kept across reloads.
    pub metrics: Arc<Metrics>,
}

impl Served {
    /// The frontends and routes for `STATUS=`: "ADDR -> BACKEND" per route,
    /// ADDR being each socket the server accepts on for that frontend.
    pub fn status_maps(&self, server: &ServerHandle) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.frontends {
            let table = f.table();
            for addr in server.local_addrs(f.listen) {
                for r in table.routes() {
                    match r.route.names.first() {
                        None => out.push(format!("{addr} -> {}", r.route.backend)),
                        Some(_) => out.push(format!("{addr} {} -> {}", r.label, r.route.backend)),
                    }
                }
            }
        }
        out
    }
}

/// The certificates a configuration serves now (files, self-signed, or ACME's
/// stored certificate or placeholder), and the ACME task when there is one.
pub fn certificates(
    config: &Config,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<(tls::CertSet, Option<crate::acme::Task>)> {
    match &config.cert {
        CertSource::Files(pairs) => {
            let set = tls::load_set(pairs, provider)?;
            for p in pairs {
                tracing::info!(cert = %p.cert.display(), "certificate loaded");
            }
            tracing::info!(
                sha256 = %tls::sha256_fingerprint(set.first().end_entity_cert().map(|c| c.as_ref()).unwrap_or_default()),
                certificates = set.len(),
                "certificates loaded"
            );
            tls::check_covered(config, &set)?;
            Ok((set, None))
        }
        CertSource::SelfSigned { extra_names } => {
            let ss = tls::self_signed(&self_signed_names(config, extra_names), provider)?;
            tracing::info!(
                names = ?ss.names,
                sha256 = %ss.fingerprint,
                "serving a self-signed certificate made at start (use --cert/--key for a real one)"
            );
            Ok((tls::CertSet::single(ss.key), None))
        }
        CertSource::Acme(acme) => {
            let (key, task) = crate::acme::prepare(acme, provider)?;
            Ok((tls::CertSet::single(key), Some(task)))
        }
    }
}

/// The self-signed certificate's extra names: the given ones and every route's.
pub fn self_signed_names(config: &Config, extra: &[String]) -> Vec<String> {
    let mut names = extra.to_vec();
    for n in config.route_names() {
        let n = n.to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// The family CA directories the routes use, once each.
pub fn family_dirs(config: &Config) -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    for (_, r) in config.routes() {
        if let Some(crate::config::ClientAuth::Family { dir }) = &r.client_auth {
            if !dirs.contains(dir) {
                dirs.push(dir.clone());
            }
        }
    }
    dirs
}

/// One handle per frontend, serving its table.
fn handles(config: &Config, tables: Vec<RouteTable>) -> Vec<Arc<FrontendHandle>> {
    config
        .frontends
        .iter()
        .zip(tables)
        .map(|(f, t)| FrontendHandle::new(f.listen, t))
        .collect()
}

/// The route tables of every frontend, certificates from `resolver`,
/// counting into `metrics`.
pub fn route_tables(
    config: &Config,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<tls::CertResolver>,
    metrics: Option<&Arc<Metrics>>,
) -> anyhow::Result<Vec<RouteTable>> {
    let mut builder = TableBuilder::new(provider.clone(), resolver.clone());
    if let Some(m) = metrics {
        builder = builder.with_metrics(m.clone());
    }
    config.frontends.iter().map(|f| builder.table(f)).collect()
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
pub fn prepare(config: Config) -> anyhow::Result<Prepared> {
    prepare_with(config, None)
}

/// `prepare`, taking the listeners from `sockets` (socket activation) when given.
pub fn prepare_with(config: Config, sockets: Option<Vec<Passed>>) -> anyhow::Result<Prepared> {
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

    let (certs, acme_task) = certificates(&config, &provider)?;
    // A family CA routes need is made now, with its (empty) CRL.
    for dir in family_dirs(&config) {
        crate::clientca::ensure(&dir)?;
    }
    let resolver = tls::CertResolver::with_set(certs);
    let metrics = Metrics::new(resolver.clone(), acme_task.as_ref().map(|t| t.metrics()));
    let tables = route_tables(&config, &provider, &resolver, Some(&metrics))?;
    let frontends = handles(&config, tables);
    let gate = Gate::new(config.sources);
    tracing::debug!(sources = ?config.sources, "per-source limits");
    let ctx = Arc::new(Context {
        challenges: tls::TlsRouter::new(),
        gate: gate.clone(),
        revocations: crate::proxy::revoke::Revocations::new(),
    });

    let listeners = match sockets {
        Some(passed) => activation::listeners(&frontends, passed)
            .context("taking the sockets passed by systemd")?,
        None => listener::bind_all(&frontends).context("opening the listeners")?,
    };
    for l in &listeners {
        let table = l.frontend.table();
        let backend = match table.routes() {
            [only] => only.route.backend.to_string(),
            _ => String::new(),
        };
        let routes: Vec<&str> = table.routes().iter().map(|r| r.label.as_str()).collect();
        tracing::info!(
            map = %table.describe, listen = %l.local_addr, backend, routes = %routes.join(","),
            "listening"
        );
    }
    Ok(Prepared {
        listeners,
        ctx,
        served: Served {
            config,
            provider,
            resolver,
            frontends,
            gate,
            metrics,
        },
        acme: acme_task,
    })
}

/// Runs until `shutdown` resolves and open connections have drained.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(config, Layer::default(), FromSystemd::default(), shutdown).await
}

/// `run` with what systemd handed over (its sockets, sd_notify) and the
/// command line's layer, merged again with the file on every SIGHUP reload.
pub async fn run_with(
    config: Config,
    cli: Layer,
    systemd: FromSystemd,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let hangups = Hangups::install().context("installing the SIGHUP handler")?;
    let limits = Limits {
        max_connections: config.max_connections,
        shutdown_timeout: config.shutdown_timeout,
        workers: config.workers,
    };
    let workers = config.workers;
    let activated = systemd.sockets.is_some();
    let metrics_addr = config.metrics;
    let prepared = prepare_with(config, systemd.sockets)?;
    // Bound before the server starts, so that a taken port ends start-up.
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let control = match &prepared.served.config.control {
        Some(c) => control::bind(c)?.map(Arc::new),
        None => None,
    };
    let notifier = systemd.notifier;
    let server = Server::start(prepared.listeners, prepared.ctx.clone(), limits)
        .context("starting the worker threads")?;
    let status = Status::new(
        notifier.clone(),
        prepared.served.resolver.clone(),
        matches!(prepared.served.config.cert, CertSource::SelfSigned { .. }),
        prepared.served.status_maps(&server.handle()),
    );
    let report = control::State::new(
        prepared.served.frontends.clone(),
        server.handle(),
        prepared.served.resolver.clone(),
        match (&prepared.served.config.cert, &prepared.acme) {
            (CertSource::Acme(a), Some(task)) => Some((a.domains.clone(), task.metrics())),
            _ => None,
        },
        prepared.served.gate.clone(),
    );
    let control_task = control.clone().map(|c| {
        tracing::info!(path = %c.path().display(), "control socket open for tcpfwd status");
        let report = report.clone();
        tokio::spawn(async move { c.serve(report).await })
    });
    // The listeners are up, so the CA's validation can reach them.
    let acme_current = prepared.acme.as_ref().map(|t| t.current());
    if let Some(task) = prepared.acme {
        let status = status.clone();
        task.spawn(
            prepared.served.resolver.clone(),
            prepared.ctx.challenges.clone(),
            Arc::new(move |warning| {
                status.set_acme_warning(warning);
                status.send();
            }),
        );
    }
    let metrics_task = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "serving metrics at /metrics");
        }
        tokio::spawn(metrics::serve(l, prepared.served.metrics.clone()))
    });
    let reloads = Reloads {
        hangups,
        reloader: Reloader {
            crl_seen: crate::service::reload::crl_stamps(&prepared.served.config),
            cli,
            served: prepared.served,
            server: server.handle(),
            activated,
            acme_current,
            acme_info: Default::default(),
            revocations: prepared.ctx.revocations.clone(),
        },
        notifier: notifier.clone(),
        status: status.clone(),
        report,
    };
    status.check_client_certs(&reloads.reloader.served.config, true);
    tracing::info!(status = %status.line(), workers, "ready");
    status.ready();
    let reloading = tokio::spawn(reloads.run());
    let watchdog = tokio::spawn(notifier.clone().run_watchdog());
    let refresh = tokio::spawn(status.refresh_every(STATUS_REFRESH));
    let summaries = tokio::spawn(prepared.ctx.gate.clone().run_summaries());
    let shutdown = async {
        shutdown.await;
        // No reload (and so no READY=1) or status once stopping has begun.
        reloading.abort();
        refresh.abort();
        notifier.stopping("Stopping: finishing open connections");
    };
    server.run_until(shutdown).await;
    watchdog.abort();
    summaries.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = control_task {
        t.abort();
    }
    if let Some(c) = control {
        c.remove();
    }
    Ok(())
}

/// `tcpfwd check`: what a start would check (the configuration, certificate
/// files and keys, route names covered, the ports free or passed by systemd)
/// without serving. Returns one line per frontend, and a last line.
pub fn check(config: Config, sockets: Option<Vec<Passed>>) -> anyhow::Result<Vec<String>> {
    let provider = Arc::new(tls::provider(tls::prefer_chacha(config.cipher_preference)));
    let (certs, what) = match &config.cert {
        CertSource::Files(pairs) => {
            let set = tls::load_set(pairs, &provider)?;
            tls::check_covered(&config, &set)?;
            (set, format!("{} certificate file pair(s)", pairs.len()))
        }
        CertSource::SelfSigned { extra_names } => {
            let ss = tls::self_signed(&self_signed_names(&config, extra_names), &provider)?;
            (
                tls::CertSet::single(ss.key),
                "a self-signed certificate".to_string(),
            )
        }
        CertSource::Acme(acme) => {
            // No lock and no order: a running tcpfwd may own the state dir.
            let mut names = acme.domains.clone();
            names.extend(acme.ips.iter().map(|ip| ip.to_string()));
            let ss = tls::self_signed(&names, &provider)?;
            (
                tls::CertSet::single(ss.key),
                format!("ACME from {} for {}", acme.directory, names.join(", ")),
            )
        }
    };
    let resolver = tls::CertResolver::with_set(certs);
    let mut builder = TableBuilder::new(provider.clone(), resolver.clone()).check_only();
    let tables: Vec<RouteTable> = config
        .frontends
        .iter()
        .map(|f| builder.table(f))
        .collect::<anyhow::Result<_>>()?;
    let frontends = handles(&config, tables);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the async runtime")?;
    let how = rt.block_on(async {
        match sockets {
            Some(passed) => activation::listeners(&frontends, passed)
                .context("taking the sockets passed by systemd")
                .map(|_| "socket from systemd"),
            // Bound and closed again: the ports are free now.
            None => listener::bind_all(&frontends)
                .context("opening the listeners")
                .map(|_| "port free"),
        }
    })?;
    let mut lines = Vec::new();
    for f in &frontends {
        let table = f.table();
        let routes: Vec<String> = table
            .routes()
            .iter()
            .map(|r| {
                let mut s = format!("{} -> {}", r.label, r.route.backend);
                if let Some(p) = r.route.proxy_protocol {
                    s.push_str(&format!(" (PROXY {p})"));
                }
                if let Some(a) = &r.route.client_auth {
                    s.push_str(&format!(" (client certificates: {a})"));
                }
                if let Some(a) = &r.route.admit_after {
                    s.push_str(&format!(
                        " (admits sources that passed {} within {})",
                        a.route,
                        crate::config::Duration(a.window)
                    ));
                }
                s
            })
            .collect();
        lines.push(format!(
            "frontend {} ({how}): {}",
            f.listen,
            routes.join(", ")
        ));
    }
    lines.push(format!(
        "configuration OK: {} frontend(s), {} route(s), {what}",
        config.frontends.len(),
        config.routes().count()
    ));
    Ok(lines)
}
