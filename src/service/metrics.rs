//! Prometheus metrics: the registry, each route's counters resolved once when
//! its table is built, and the plain-HTTP `/metrics` endpoint.
//!
//! The per-connection path only touches atomics it already holds (an `Arc`
//! of its route's [`RouteMetrics`]): no label is built and no map is searched
//! per connection. The certificates' expiry is read from the resolver at
//! scrape time, so it always shows what is in force.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::tls::{self, CertResolver};

/// Every `reason` of the "connection closed" log line, in the order of
/// [`RouteMetrics::closed`]. A reason missing here counts as `other`.
pub const REASONS: &[&str] = &[
    "client closed",
    "backend closed",
    "handshake timeout",
    "handshake failed",
    "client certificate rejected",
    "client certificate revoked",
    "acme challenge answered",
    "unknown server name",
    "backend connect timeout",
    "backend unreachable",
    "idle timeout",
    "close timeout",
    "error",
    "shutdown",
    "refused",
    "other",
];

/// The kinds of TLS handshake failure, in the order of
/// [`RouteMetrics::handshake_failures`].
pub const FAILURE_KINDS: &[&str] = &[
    "timeout",
    "eof",
    "not_tls",
    "alert_received",
    "peer_incompatible",
    "peer_misbehaved",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    frontend: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabels {
    frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    frontend: String,
    reason: String,
}

/// Why the policy refused a connection, in the order of [`POLICY_REASONS`]:
/// the metrics' own list, so that a gate with a new refusal adds its arm to
/// one `From` and nothing here changes shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyReason {
    /// The frontend's or the route's allow/deny lists.
    Denied,
    /// A cool-off after failed handshakes.
    Banned,
    /// Too many connections open from the source.
    Connections,
    /// Too many new connections per minute from the source.
    Rate,
    /// Not (yet) admitted by the route's admission gate.
    NotAdmitted,
}

/// The `reason` label of `tcpfwd_connections_refused_by_policy_total`, the
/// names of the gate's one-a-minute summary.
pub const POLICY_REASONS: &[&str] = &[
    "denied",
    "banned",
    "per_source_connections",
    "per_source_rate",
    "not_admitted",
];

impl From<crate::policy::Refusal> for PolicyReason {
    fn from(r: crate::policy::Refusal) -> PolicyReason {
        use crate::policy::Refusal;
        match r {
            Refusal::Denied | Refusal::RouteDenied => PolicyReason::Denied,
            Refusal::Banned => PolicyReason::Banned,
            Refusal::Connections => PolicyReason::Connections,
            Refusal::Rate => PolicyReason::Rate,
            Refusal::NotAdmitted => PolicyReason::NotAdmitted,
        }
    }
}

/// Counters of policy refusals, one per [`POLICY_REASONS`] entry, resolved
/// once: a refusal is one atomic increment, no label and no allocation.
#[derive(Debug)]
pub struct Refusals([Counter; POLICY_REASONS.len()]);

impl Refusals {
    fn unregistered() -> Refusals {
        Refusals(Default::default())
    }

    /// Counts one connection refused for `why`.
    pub fn inc(&self, why: impl Into<PolicyReason>) {
        self.0[why.into() as usize].inc();
    }

    /// The count for `why` (for tests and `tcpfwd status`).
    pub fn get(&self, why: PolicyReason) -> u64 {
        self.0[why as usize].get()
    }

    /// The count over every reason.
    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    frontend: String,
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    frontend: String,
    route: String,
    kind: String,
}

fn handshake_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// One route's counters (or a frontend's, for connections that got no route),
/// shared by every connection on it.
#[derive(Debug)]
pub struct RouteMetrics {
    /// Connections that were given this route.
    pub opened: Counter,
    /// Connections on this route now.
    pub open: Gauge,
    /// Closed connections, by the index of their reason in [`REASONS`].
    closed: Vec<Counter>,
    /// Bytes from clients to the backend, counted as connections close.
    pub bytes_up: Counter,
    /// Bytes from the backend to clients, counted as connections close.
    pub bytes_down: Counter,
    /// Failed handshakes, by the index of their kind in [`FAILURE_KINDS`].
    handshake_failures: Vec<Counter>,
    /// Seconds from the accept to the end of a successful handshake.
    pub handshake_seconds: Histogram,
    /// Connections the route's lists, numbers or admission refused.
    pub refused: Refusals,
}

impl RouteMetrics {
    /// Counters that no registry exposes (for `tcpfwd check` and tests).
    pub fn unregistered() -> RouteMetrics {
        RouteMetrics {
            opened: Counter::default(),
            open: Gauge::default(),
            closed: REASONS.iter().map(|_| Counter::default()).collect(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            handshake_failures: FAILURE_KINDS.iter().map(|_| Counter::default()).collect(),
            handshake_seconds: handshake_histogram(),
            refused: Refusals::unregistered(),
        }
    }

    /// Counts a connection that ended for `reason` (a [`REASONS`] entry).
    /// A scan of a dozen static strings, the common ones first: no lookup.
    pub fn closed(&self, reason: &str, bytes_up: u64, bytes_down: u64) {
        let i = REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REASONS.len() - 1);
        self.closed[i].inc();
        if bytes_up > 0 {
            self.bytes_up.inc_by(bytes_up);
        }
        if bytes_down > 0 {
            self.bytes_down.inc_by(bytes_down);
        }
    }

    /// Counts a failed handshake; `None` for a timeout.
    pub fn handshake_failed(&self, error: Option<&std::io::Error>) {
        let kind = error.map_or("timeout", failure_kind);
        let i = FAILURE_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(FAILURE_KINDS.len() - 1);
        self.handshake_failures[i].inc();
    }

    /// Records a successful handshake that took `took`.
    pub fn handshake_done(&self, took: Duration) {
        self.handshake_seconds.observe(took.as_secs_f64());
    }
}

/// The kind of a handshake's error, for [`FAILURE_KINDS`].
fn failure_kind(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return "eof";
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidMessage(_)) => "not_tls",
        Some(rustls::Error::AlertReceived(_)) => "alert_received",
        Some(rustls::Error::PeerIncompatible(_)) => "peer_incompatible",
        Some(rustls::Error::PeerMisbehaved(_)) => "peer_misbehaved",
        _ if e.kind() == std::io::ErrorKind::InvalidData => "not_tls",
        _ => "other",
    }
}

/// The ACME task's times, as Unix timestamps (0: not yet).
#[derive(Debug, Clone, Default)]
pub struct AcmeMetrics {
    /// The end of the last attempt that got a certificate.
    pub last_success: Gauge,
    /// The end of the last attempt that failed.
    pub last_failure: Gauge,
    /// When the certificate in force is due for renewal.
    pub next_renewal: Gauge,
}

/// One frontend's counters, resolved with its route table.
#[derive(Debug)]
pub struct FrontendMetrics {
    /// Every accepted connection.
    pub accepted: Counter,
    /// Connections closed at once because `--max-connections` were open.
    pub refused_over_limit: Counter,
    /// Connections the frontend's lists or the source's ban or numbers
    /// refused at accept (`route=""`).
    pub refused: Refusals,
    /// Connections before (or without) a route: `route=""`.
    pub unrouted: RouteMetrics,
}

impl FrontendMetrics {
    /// Counters that no registry exposes.
    pub fn unregistered() -> FrontendMetrics {
        FrontendMetrics {
            accepted: Counter::default(),
            refused_over_limit: Counter::default(),
            refused: Refusals::unregistered(),
            unrouted: RouteMetrics::unregistered(),
        }
    }
}

/// The registry and the families every route's counters come from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted: Family<FrontendLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    refused_by_policy: Family<ClosedLabels, Counter>,
    opened: Family<RouteLabels, Counter>,
    open: Family<RouteLabels, Gauge>,
    closed: Family<ClosedLabels, Counter>,
    bytes_up: Family<RouteLabels, Counter>,
    bytes_down: Family<RouteLabels, Counter>,
    handshake_failures: Family<FailureLabels, Counter>,
    handshake_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Reloads that swapped something in.
    pub reloads: Counter,
    /// Reloads that failed (the previous configuration kept serving).
    pub reload_failures: Counter,
}

impl Metrics {
    /// The metrics of a process serving the certificates of `resolver`,
    /// with the ACME task's times when there is one.
    pub fn new(resolver: Arc<CertResolver>, acme: Option<AcmeMetrics>) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("tcpfwd");
        let m = Metrics {
            accepted: Family::default(),
            refused: Family::default(),
            refused_by_policy: Family::default(),
            opened: Family::default(),
            open: Family::default(),
            closed: Family::default(),
            bytes_up: Family::default(),
            bytes_down: Family::default(),
            handshake_failures: Family::default(),
            handshake_seconds: Family::new_with_constructor(handshake_histogram),
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "Version and TLS provider of this tcpfwd",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("tls_provider", tls::PROVIDER_NAME),
            ]),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted, per frontend",
            m.accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once, before any TLS, by why (over limit: --max-connections open)",
            m.refused.clone(),
        );
        registry.register(
            "connections_refused_by_policy",
            "Connections the allow/deny lists, a ban, the per-source limits or admission refused; route=\"\" at accept",
            m.refused_by_policy.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections given a route (after the ClientHello)",
            m.opened.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open now; route=\"\" while in the handshake or without a route",
            m.open.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed, by the reason of their log line; route=\"\" when none was picked",
            m.closed.clone(),
        );
        registry.register_with_unit(
            "received",
            "Bytes from clients sent on to backends, counted as connections close",
            Unit::Bytes,
            m.bytes_up.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes from backends sent on to clients, counted as connections close",
            Unit::Bytes,
            m.bytes_down.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out, by kind",
            m.handshake_failures.clone(),
        );
        registry.register_with_unit(
            "tls_handshake_duration",
            "Time from the accept to the end of a successful TLS handshake",
            Unit::Seconds,
            m.handshake_seconds.clone(),
        );
        registry.register(
            "reloads",
            "Reloads (SIGHUP) that swapped a new configuration or certificate in",
            m.reloads.clone(),
        );
        registry.register(
            "reload_failures",
            "Reloads that failed; the previous configuration kept serving",
            m.reload_failures.clone(),
        );
        registry.register_collector(Box::new(CertExpiry(resolver)));
        if let Some(acme) = acme {
            let unit = || Unit::Other("timestamp_seconds".into());
            registry.register_with_unit(
                "acme_last_success",
                "When the last ACME order got a certificate (Unix time; 0: not since start)",
                unit(),
                acme.last_success,
            );
            registry.register_with_unit(
                "acme_last_failure",
                "When the last ACME attempt failed (Unix time; 0: not since start)",
                unit(),
                acme.last_failure,
            );
            registry.register_with_unit(
                "acme_next_renewal",
                "When the certificate in force is due for renewal (Unix time; 0: not scheduled)",
                unit(),
                acme.next_renewal,
            );
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// The counters of route `route` on `frontend` (both as labels), the
    /// same ones again after a reload that keeps the route.
    pub fn route(&self, frontend: &str, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            frontend: frontend.to_string(),
            route: route.to_string(),
        };
        RouteMetrics {
            opened: self.opened.get_or_create(&labels).clone(),
            bytes_up: self.bytes_up.get_or_create(&labels).clone(),
            bytes_down: self.bytes_down.get_or_create(&labels).clone(),
            handshake_seconds: self.handshake_seconds.get_or_create(&labels).clone(),
            refused: self.refusals(frontend, route),
            ..self.ending(frontend, route)
        }
    }

    /// The counters of `frontend` for connections without a route.
    pub fn frontend(&self, frontend: &str) -> FrontendMetrics {
        FrontendMetrics {
            accepted: self
                .accepted
                .get_or_create(&FrontendLabels {
                    frontend: frontend.to_string(),
                })
                .clone(),
            refused_over_limit: self
                .refused
                .get_or_create(&RefusedLabels {
                    frontend: frontend.to_string(),
                    reason: "over limit".to_string(),
                })
                .clone(),
            refused: self.refusals(frontend, ""),
            unrouted: self.ending(frontend, ""),
        }
    }

    /// The policy refusal counters of `route` on `frontend` ("": at accept).
    fn refusals(&self, frontend: &str, route: &str) -> Refusals {
        Refusals(std::array::from_fn(|i| {
            self.refused_by_policy
                .get_or_create(&ClosedLabels {
                    frontend: frontend.to_string(),
                    route: route.to_string(),
                    reason: POLICY_REASONS[i].to_string(),
                })
                .clone()
        }))
    }

    /// What applies to any connection, routed or not: the open gauge and the
    /// ends. The others stay out of the registry, rather than show
    /// `route=""` series that are always zero.
    fn ending(&self, frontend: &str, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            frontend: frontend.to_string(),
            route: route.to_string(),
        };
        let closed = REASONS
            .iter()
            .map(|r| {
                self.closed
                    .get_or_create(&ClosedLabels {
                        frontend: frontend.to_string(),
                        route: route.to_string(),
                        reason: r.to_string(),
                    })
                    .clone()
            })
            .collect();
        let handshake_failures = FAILURE_KINDS
            .iter()
            .map(|k| {
                self.handshake_failures
                    .get_or_create(&FailureLabels {
                        frontend: frontend.to_string(),
                        route: route.to_string(),
                        kind: k.to_string(),
                    })
                    .clone()
            })
            .collect();
        RouteMetrics {
            open: self.open.get_or_create(&labels).clone(),
            closed,
            handshake_failures,
            ..RouteMetrics::unregistered()
        }
    }

    /// The Prometheus text format (0.0.4), or OpenMetrics text when `openmetrics`.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

/// `tcpfwd_certificate_not_after_seconds`, read from the resolver at scrape time.
#[derive(Debug)]
struct CertExpiry(Arc<CertResolver>);

impl Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let set = self.0.set_in_force();
        let unit = Unit::Other("seconds".into());
        let mut family = encoder.encode_descriptor(
            "certificate_not_after",
            "When each certificate in force expires (Unix time)",
            Some(&unit),
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ck in set.iter() {
            let Ok(der) = ck.end_entity_cert() else {
                continue;
            };
            let Ok(cert) = tls::x509::parse(der.as_ref()) else {
                continue;
            };
            let subject = cert.subject().unwrap_or_default();
            let names = cert.dns_names().unwrap_or_default().join(",");
            let sha256 = tls::sha256_fingerprint(der.as_ref());
            let labels = [
                ("subject", subject.as_str()),
                ("names", names.as_str()),
                ("sha256", sha256.as_str()),
            ];
            ConstGauge::new(cert.not_after).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Whether an address for the endpoint is only reachable from a local
/// network: loopback, private (RFC 1918, IPv6 unique local) or link-local.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_local(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

/// Opens the endpoint's socket; errors end start-up.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if !is_local(addr.ip()) {
        tracing::warn!(
            %addr,
            "the metrics endpoint is not on a loopback or private address: anyone who reaches it can read the metrics"
        );
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("opening the metrics endpoint on {addr}"))
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: wait, so as not to spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(60), conn).await {
                tracing::debug!("metrics endpoint: connection ended: {e}");
            }
        });
    }
}

fn answer<B>(metrics: &Metrics, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut r = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(http::StatusCode::NOT_FOUND, "tcpfwd serves /metrics only\n");
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return plain(http::StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let openmetrics = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match metrics.encode(openmetrics) {
        Ok(text) => {
            let mut r = http::Response::new(Full::new(Bytes::from(text)));
            let ctype = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ctype),
            );
            r
        }
        Err(_) => plain(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(is_local(a.parse().unwrap()), "{a}");
        }
        for a in ["0.0.0.0", "203.0.113.7", "::", "2001:db8::1"] {
            assert!(!is_local(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn handshake_failure_kinds() {
        use std::io::{Error, ErrorKind};
        let tls = |e: rustls::Error| Error::new(ErrorKind::InvalidData, e);
        assert_eq!(failure_kind(&Error::from(ErrorKind::UnexpectedEof)), "eof");
        assert_eq!(
            failure_kind(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))),
            "alert_received"
        );
        assert_eq!(
            failure_kind(&tls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon
            ))),
            "peer_incompatible"
        );
        assert_eq!(
            failure_kind(&Error::new(ErrorKind::InvalidData, "x")),
            "not_tls"
        );
        assert_eq!(
            failure_kind(&Error::from(ErrorKind::ConnectionReset)),
            "other"
        );
        for k in [
            "eof",
            "alert_received",
            "peer_incompatible",
            "not_tls",
            "other",
        ] {
            assert!(FAILURE_KINDS.contains(&k));
        }
    }

    #[test]
    fn counters_are_shared_and_encoded() {
        let provider = tls::provider(false);
        let ss = tls::self_signed(&["a.example".into()], &provider).unwrap();
        let m = Metrics::new(CertResolver::new(ss.key), Some(AcmeMetrics::default()));
        let r = m.route("443", "a.example");
        let again = m.route("443", "a.example");
        r.opened.inc();
        again.closed("client closed", 10, 20);
        r.closed("no such reason", 0, 0);
        r.handshake_failed(None);
        r.handshake_done(Duration::from_millis(3));
        r.refused.inc(crate::policy::Refusal::RouteDenied);
        m.frontend("443").refused.inc(PolicyReason::NotAdmitted);
        let text = m.encode(false).unwrap();
        for line in [
            "tcpfwd_connections_opened_total{frontend=\"443\",route=\"a.example\"} 1",
            "tcpfwd_connections_closed_total{frontend=\"443\",route=\"a.example\",reason=\"client closed\"} 1",
            "tcpfwd_connections_closed_total{frontend=\"443\",route=\"a.example\",reason=\"other\"} 1",
            "tcpfwd_received_bytes_total{frontend=\"443\",route=\"a.example\"} 10",
            "tcpfwd_tls_handshake_failures_total{frontend=\"443\",route=\"a.example\",kind=\"timeout\"} 1",
            "tcpfwd_tls_handshake_duration_seconds_count{frontend=\"443\",route=\"a.example\"} 1",
            "tcpfwd_connections_refused_by_policy_total{frontend=\"443\",route=\"a.example\",reason=\"denied\"} 1",
            "tcpfwd_connections_refused_by_policy_total{frontend=\"443\",route=\"a.example\",reason=\"banned\"} 0",
            "tcpfwd_connections_refused_by_policy_total{frontend=\"443\",route=\"\",reason=\"not_admitted\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        assert!(
            text.contains("tcpfwd_certificate_not_after_seconds{subject="),
            "{text}"
        );
        assert!(text.contains("tcpfwd_build_info{version="), "{text}");
        assert!(
            text.contains("tcpfwd_acme_next_renewal_timestamp_seconds 0"),
            "{text}"
        );
    }
}
