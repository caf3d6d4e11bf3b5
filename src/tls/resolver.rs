//! Per-handshake choices: the certificate in force, and the configuration for
//! each ClientHello (ordinary, or an ACME TLS-ALPN-01 validation).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

/// Serves whatever certificate was last set; ACME and reloads swap it.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(CertResolver {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Makes `key` the certificate for every handshake from now on.
    pub fn set(&self, key: CertifiedKey) {
        let key = Arc::new(key);
        // A poisoned lock only means a writer panicked mid-swap of an Arc,
        // which cannot leave it half-written: keep going with the value.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }

    /// The certificate in force.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Chooses the configuration for each ClientHello: the normal one, or, for an
/// ACME validation of a name with a pending challenge, that challenge's.
#[derive(Debug)]
pub struct TlsRouter {
    normal: Arc<ServerConfig>,
    /// Challenge configurations by lower-case name; written by ACME only.
    challenges: RwLock<HashMap<String, Arc<ServerConfig>>>,
}

impl TlsRouter {
    /// A router that serves `normal` until a challenge is added.
    pub fn new(normal: Arc<ServerConfig>) -> Arc<Self> {
        Arc::new(TlsRouter {
            normal,
            challenges: RwLock::new(HashMap::new()),
        })
    }

    /// The configuration for this ClientHello, and whether it is an ACME validation.
    pub fn config_for(&self, hello: &ClientHello<'_>) -> (Arc<ServerConfig>, bool) {
        let offers_acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if offers_acme {
            if let Some(name) = hello.server_name() {
                let map = self.challenges.read().unwrap_or_else(|e| e.into_inner());
                if let Some(cfg) = map.get(&name.to_ascii_lowercase()) {
                    return (cfg.clone(), true);
                }
            }
        }
        (self.normal.clone(), false)
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
