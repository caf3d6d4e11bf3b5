//! What a connection reads to find its route: each frontend's current route
//! table, swapped whole by a reload.
//!
//! A connection loads its frontend's table once, when the ClientHello is in,
//! and keeps the route it picked to the end; a reload stores a new table for
//! the connections after it and never waits for, or disturbs, open ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::ServerConfig;

use crate::config::{ClientAuth, Frontend, Listen, Route, SniName};
use crate::policy::{self, AccessList};
use crate::service::metrics::{FrontendMetrics, Metrics, RouteMetrics};
use crate::tls::{self, CertResolver};

/// A route as connections use it: its settings and its TLS configuration.
#[derive(Debug)]
pub struct ActiveRoute {
    /// The configured route.
    pub route: Route,
    /// Its name in logs (first server name, or `default`).
    pub label: String,
    /// The route in the `--map` form, for logs.
    pub map: String,
    /// Its backend as written, for logs (made once here, not per connection).
    pub backend: String,
    /// The server configuration for its handshakes.
    pub tls: Arc<ServerConfig>,
    /// Tells its per-source counts from other routes' (same across reloads).
    pub scope: u32,
    /// Its counters, labelled once here rather than per connection.
    pub metrics: Arc<RouteMetrics>,
}

/// One frontend's routes, indexed by server name.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<ActiveRoute>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    default: Option<usize>,
    /// The longest handshake timeout of its routes: the limit for reading the
    /// ClientHello, before the route (and its own limit) is known.
    pub hello_timeout: Duration,
    /// The frontend for messages: its only route's map, or its address and names.
    pub describe: String,
    /// The frontend's allow/deny lists, checked right after accept.
    pub access: AccessList,
    /// The frontend's counters, for connections before or without a route.
    pub metrics: Arc<FrontendMetrics>,
}

impl RouteTable {
    /// The route for a ClientHello's server name: exact, then wildcard, then
    /// the default. `None`: refuse the connection.
    pub fn pick(&self, sni: Option<&str>) -> Option<&Arc<ActiveRoute>> {
        let idx = match sni {
            None => self.default,
            Some(name) => {
                // Browsers send lower case: copy only a name that is not.
                let name = name.trim_end_matches('.');
                let lower;
                let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower = name.to_ascii_lowercase();
                    lower.as_str()
                } else {
                    name
                };
                self.exact
                    .get(name)
                    .or_else(|| {
                        let (_, parent) = name.split_once('.')?;
                        self.wildcard.get(parent)
                    })
                    .copied()
                    .or(self.default)
            }
        };
        idx.map(|i| &self.routes[i])
    }

    /// Every route, in configured order.
    pub fn routes(&self) -> &[Arc<ActiveRoute>] {
        &self.routes
    }
}

/// A frontend's identity (its address) and its current table.
#[derive(Debug)]
pub struct FrontendHandle {
    /// Where it listens; fixed for its life.
    pub listen: Listen,
    /// Its counters (labelled by `listen`, so every table of it has the same).
    pub metrics: Arc<FrontendMetrics>,
    table: ArcSwap<RouteTable>,
}

impl FrontendHandle {
    /// A handle serving `table`.
    pub fn new(listen: Listen, table: RouteTable) -> Arc<FrontendHandle> {
        Arc::new(FrontendHandle {
            listen,
            metrics: table.metrics.clone(),
            table: ArcSwap::from_pointee(table),
        })
    }

    /// The table in force now.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Makes `table` the one new connections read.
    pub fn store(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }
}

/// Builds route tables, sharing one server configuration between routes
/// that advertise the same ALPN protocols and ask for the same client
/// certificates.
pub struct TableBuilder {
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    configs: Vec<ConfigKey>,
    /// `tcpfwd check`: a family CA not made yet is no error (the start makes it).
    check_only: bool,
    metrics: Option<Arc<Metrics>>,
}

type ConfigKey = (Vec<Vec<u8>>, Option<ClientAuth>, Arc<ServerConfig>);

impl TableBuilder {
    /// Route configurations will serve certificates from `resolver`.
    pub fn new(provider: Arc<CryptoProvider>, resolver: Arc<CertResolver>) -> TableBuilder {
        TableBuilder {
            provider,
            resolver,
            configs: Vec::new(),
            check_only: false,
            metrics: None,
        }
    }

    /// Routes will count into `metrics` (without, into counters nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> TableBuilder {
        self.metrics = Some(metrics);
        self
    }

    /// For `tcpfwd check`: a family CA that does not exist yet is skipped.
    pub fn check_only(mut self) -> TableBuilder {
        self.check_only = true;
        self
    }

    fn server_config(
        &mut self,
        alpn: &[Vec<u8>],
        auth: &Option<ClientAuth>,
    ) -> anyhow::Result<Arc<ServerConfig>> {
        if let Some((_, _, c)) = self.configs.iter().find(|(a, c, _)| a == alpn && c == auth) {
            return Ok(c.clone());
        }
        let verifier = match auth {
            Some(ClientAuth::Family { dir })
                if self.check_only && !dir.join(crate::clientca::CA_CERT).exists() =>
            {
                None
            }
            Some(a) => Some(tls::client_auth::verifier(a, &self.provider)?),
            None => None,
        };
        let c = tls::server_config(
            self.provider.clone(),
            self.resolver.clone(),
            alpn.to_vec(),
            verifier,
        )?;
        self.configs.push((alpn.to_vec(), auth.clone(), c.clone()));
        Ok(c)
    }

    /// The table for `frontend` (whose routes the configuration checked).
    pub fn table(&mut self, frontend: &Frontend) -> anyhow::Result<RouteTable> {
        let frontend_label = frontend.listen.to_string();
        let mut t = RouteTable {
            routes: Vec::with_capacity(frontend.routes.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: None,
            hello_timeout: Duration::ZERO,
            describe: describe(frontend),
            access: frontend.access.clone(),
            metrics: Arc::new(match &self.metrics {
                Some(m) => m.frontend(&frontend_label),
                None => FrontendMetrics::unregistered(),
            }),
        };
        for (i, r) in frontend.routes.iter().enumerate() {
            for n in &r.names {
                match n {
                    SniName::Exact(name) => t.exact.insert(name.clone(), i),
                    SniName::Wildcard(suffix) => t.wildcard.insert(suffix.clone(), i),
                };
            }
            if r.default {
                t.default = Some(i);
            }
            t.hello_timeout = t.hello_timeout.max(r.timeouts.handshake);
            let label = r.label();
            let metrics = Arc::new(match &self.metrics {
                Some(m) => m.route(&frontend_label, &label),
                None => RouteMetrics::unregistered(),
            });
            let map = r.map_text(&frontend.listen);
            t.routes.push(Arc::new(ActiveRoute {
                metrics,
                label,
                scope: policy::route_scope(&map),
                map,
                backend: r.backend.to_string(),
                tls: self.server_config(&r.alpn, &r.client_auth)?,
                route: r.clone(),
            }));
        }
        Ok(t)
    }
}

/// How a frontend is named in messages: the `--map` text when it has one
/// route, else its address and route names.
pub fn describe(frontend: &Frontend) -> String {
    match &frontend.routes[..] {
        [only] => only.map_text(&frontend.listen),
        routes => format!(
            "{} ({})",
            frontend.listen,
            routes
                .iter()
                .map(Route::label)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::layer::{build, FrontendSpec, Layer, RouteSettings, RouteSpec};
    use crate::config::{MapSpec, Origin};

    fn frontend(maps: &[&str]) -> Frontend {
        let routes = maps
            .iter()
            .map(|m| {
                let spec: MapSpec = m.parse().unwrap();
                RouteSpec {
                    names: spec.names,
                    default: false,
                    backend: spec.backend,
                    settings: RouteSettings::default(),
                    origin: Origin::Map(m.to_string()),
                }
            })
            .collect();
        let layer = Layer {
            frontends: vec![FrontendSpec {
                listen: maps[0].parse::<MapSpec>().unwrap().listen,
                settings: RouteSettings::default(),
                routes,
                origin: Origin::Map(maps[0].into()),
            }],
            ..Layer::default()
        };
        build(None, layer).unwrap().frontends.remove(0)
    }

    fn table(f: &Frontend) -> RouteTable {
        let provider = Arc::new(tls::provider(false));
        let ss = tls::self_signed(&[], &provider).unwrap();
        TableBuilder::new(provider, CertResolver::new(ss.key))
            .table(f)
            .unwrap()
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let f = frontend(&[
            "443:dvr.lan:80",
            "443:nas.example.org=nas.lan:5000",
            "443:*.example.org=web.lan:80",
        ]);
        let t = table(&f);
        let pick = |sni| t.pick(sni).map(|r| r.label.clone());
        assert_eq!(
            pick(Some("NAS.example.org.")).as_deref(),
            Some("nas.example.org")
        );
        assert_eq!(
            pick(Some("cams.example.org")).as_deref(),
            Some("*.example.org")
        );
        assert_eq!(pick(Some("a.b.example.org")).as_deref(), Some("default"));
        assert_eq!(pick(Some("example.org")).as_deref(), Some("default"));
        assert_eq!(pick(None).as_deref(), Some("default"));
        assert_eq!(t.describe, "443 (default, nas.example.org, *.example.org)");
    }

    #[test]
    fn without_a_default_unknown_names_are_refused() {
        let f = frontend(&["443:nas.example.org=nas.lan:5000"]);
        let t = table(&f);
        assert!(t.pick(Some("nas.example.org")).is_some());
        assert!(t.pick(Some("other.example.org")).is_none());
        assert!(t.pick(None).is_none());
        assert_eq!(t.describe, "443:nas.example.org=nas.lan:5000");
    }
}
