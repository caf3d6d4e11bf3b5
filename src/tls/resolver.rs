//! Per-handshake choices: the certificate in force, and the configuration for
//! each ClientHello (ordinary, or an ACME TLS-ALPN-01 validation).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

/// Certificates with the names each covers; a handshake gets the one whose
/// names cover its server name, the first when none does.
#[derive(Debug)]
pub struct CertSet {
    certs: Vec<(Arc<CertifiedKey>, Vec<String>)>,
}

impl CertSet {
    /// One certificate for every handshake.
    pub fn single(key: CertifiedKey) -> CertSet {
        CertSet {
            certs: vec![(Arc::new(key), Vec::new())],
        }
    }

    /// Several, each chosen by the DNS names in its leaf (lower case). The
    /// first is also the one for names no certificate covers.
    pub fn by_names(certs: Vec<(CertifiedKey, Vec<String>)>) -> Option<CertSet> {
        if certs.is_empty() {
            return None;
        }
        Some(CertSet {
            certs: certs.into_iter().map(|(k, n)| (Arc::new(k), n)).collect(),
        })
    }

    /// The certificate for a server name. Without one (a client that
    /// connects by IP address sends none), the first with an IP address in
    /// its names, else the first.
    pub fn for_name(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let first = &self.certs[0].0;
        if self.certs.len() == 1 {
            return first;
        }
        let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self
                .certs
                .iter()
                .find(|(_, names)| names.iter().any(|n| n.parse::<std::net::IpAddr>().is_ok()))
                .map_or(first, |(k, _)| k);
        };
        let wildcard = name
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        self.certs
            .iter()
            .find(|(_, names)| names.contains(&name))
            .or_else(|| {
                let w = wildcard.as_ref()?;
                self.certs.iter().find(|(_, names)| names.contains(w))
            })
            .map_or(first, |(k, _)| k)
    }

    /// Whether some certificate names `name` (a route's name: exact, or
    /// `*.suffix` for a wildcard route, which only a wildcard certificate covers).
    pub fn covers(&self, name: &str) -> bool {
        let wildcard = match name.strip_prefix("*.") {
            Some(_) => None,
            None => name
                .split_once('.')
                .map(|(_, parent)| format!("*.{parent}")),
        };
        self.certs.iter().any(|(_, names)| {
            names
                .iter()
                .any(|n| n == name || Some(n) == wildcard.as_ref())
        })
    }

    /// The first certificate (the only one, for ACME and self-signed).
    pub fn first(&self) -> &Arc<CertifiedKey> {
        &self.certs[0].0
    }

    /// Every certificate, the first first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<CertifiedKey>> {
        self.certs.iter().map(|(k, _)| k)
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Never true: a set has at least one certificate.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Serves whatever certificates were last set; ACME and reloads swap them.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertSet>,
}

impl CertResolver {
    /// A resolver serving `key` to every handshake.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Self::with_set(CertSet::single(key))
    }

    /// A resolver serving `set`.
    pub fn with_set(set: CertSet) -> Arc<Self> {
        Arc::new(CertResolver {
            current: ArcSwap::from_pointee(set),
        })
    }

    /// Makes `key` the certificate for every handshake from now on.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(CertSet::single(key)));
    }

    /// Makes `set` the certificates for every handshake from now on.
    pub fn set_all(&self, set: CertSet) {
        self.current.store(Arc::new(set));
    }

    /// The first certificate in force (the only one unless several pairs are given).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load().first().clone()
    }

    /// The certificates in force.
    pub fn set_in_force(&self) -> Arc<CertSet> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().for_name(hello.server_name()).clone())
    }
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Answers ACME's TLS-ALPN-01 validations: a ClientHello whose ALPN list is
/// exactly `acme-tls/1` (RFC 8737 has the CA offer nothing else) for a name
/// with a pending challenge gets that challenge's configuration, on any
/// frontend, before any route is chosen, and so without a client certificate.
/// A ClientHello that offers other protocols too gets its route's
/// configuration, client authentication included.
#[derive(Debug, Default)]
pub struct TlsRouter {
    /// Challenge configurations by lower-case name; written by ACME only.
    challenges: RwLock<HashMap<String, Arc<ServerConfig>>>,
}

impl TlsRouter {
    /// A router with no challenge pending.
    pub fn new() -> Arc<Self> {
        Arc::new(TlsRouter::default())
    }

    /// The challenge configuration for this ClientHello, if it is an ACME
    /// validation of a name with a pending challenge.
    pub fn challenge_for(&self, hello: &ClientHello<'_>) -> Option<Arc<ServerConfig>> {
        let offers_acme = hello.alpn().is_some_and(|mut protos| {
            protos.next() == Some(ACME_TLS_ALPN) && protos.next().is_none()
        });
        if !offers_acme {
            return None;
        }
        // For an IP address, the reverse-DNS name (RFC 8738 section 6).
        let name = hello.server_name()?.trim_end_matches('.');
        let map = self.challenges.read().unwrap_or_else(|e| e.into_inner());
        map.get(&name.to_ascii_lowercase()).cloned()
    }

    /// Answers TLS-ALPN-01 for `name` with `key` (a certificate carrying the acmeIdentifier).
    pub fn add_challenge(
        &self,
        name: &str,
        key: CertifiedKey,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<()> {
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(CertResolver::new(key));
        cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let mut map = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        map.insert(name.to_ascii_lowercase(), Arc::new(cfg));
        Ok(())
    }

    /// Stops answering TLS-ALPN-01 for `name`.
    pub fn remove_challenge(&self, name: &str) {
        let mut map = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&name.to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(names: &[&str]) -> (CertifiedKey, Vec<String>) {
        let provider = crate::tls::provider(false);
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let k = crate::tls::certified_key_from_pem(
            c.cert.pem().as_bytes(),
            c.signing_key.serialize_pem().as_bytes(),
            &provider,
        )
        .unwrap();
        (k, names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn certificates_by_name() {
        let set = CertSet::by_names(vec![
            key(&["dvr.example.org"]),
            key(&["nas.example.org"]),
            key(&["*.example.net"]),
        ])
        .unwrap();
        let with_ip =
            CertSet::by_names(vec![key(&["dvr.example.org"]), key(&["203.0.113.7"])]).unwrap();
        assert!(Arc::ptr_eq(with_ip.for_name(None), &with_ip.certs[1].0));
        assert!(Arc::ptr_eq(
            with_ip.for_name(Some("other.example")),
            &with_ip.certs[0].0
        ));
        let idx = |sni| {
            let k = set.for_name(sni);
            set.certs
                .iter()
                .position(|(c, _)| Arc::ptr_eq(c, k))
                .unwrap()
        };
        assert_eq!(idx(Some("NAS.example.org")), 1);
        assert_eq!(idx(Some("a.example.net")), 2);
        assert_eq!(idx(Some("a.b.example.net")), 0);
        assert_eq!(idx(None), 0);
        assert!(set.covers("nas.example.org"));
        assert!(set.covers("cams.example.net"));
        assert!(set.covers("*.example.net"));
        assert!(!set.covers("*.example.org"));
        assert!(!set.covers("other.example.org"));
    }
}
