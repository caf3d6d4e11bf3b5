//! TLS: the crypto provider and cipher order, certificate loading, the
//! self-signed default, and the resolver that hands each handshake the
//! certificate currently in force.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::cli::CipherPreference;

/// A certificate or key that cannot be used; the message names the file and the fix.
#[derive(Debug)]
pub struct CertError(pub String);

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertError {}

/// True when the CPU has AES instructions, so AES-GCM beats ChaCha20-Poly1305.
pub fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(target_arch = "arm")]
    {
        crate::sys::arm_hwcap2_has_aes()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    {
        false
    }
}

/// Resolves `auto` against the CPU: true means ChaCha20-Poly1305 goes first.
pub fn prefer_chacha(pref: CipherPreference) -> bool {
    match pref {
        CipherPreference::Aes => false,
        CipherPreference::Chacha => true,
        CipherPreference::Auto => !cpu_has_aes(),
    }
}

/// The ring provider with its cipher suites in the server's order of preference.
///
/// TLS 1.3 suites come before TLS 1.2 ones; within each version AES-128-GCM
/// (or ChaCha20-Poly1305, when preferred) leads.
pub fn provider(chacha_first: bool) -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    let aes = [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384];
    let chacha = [cs::TLS13_CHACHA20_POLY1305_SHA256];
    let aes12 = [
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let chacha12 = [
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let mut suites = Vec::new();
    if chacha_first {
        suites.extend(chacha);
        suites.extend(aes);
        suites.extend(chacha12);
        suites.extend(aes12);
    } else {
        suites.extend(aes);
        suites.extend(chacha);
        suites.extend(aes12);
        suites.extend(chacha12);
    }
    CryptoProvider {
        cipher_suites: suites,
        ..rustls::crypto::ring::default_provider()
    }
}

/// Builds a certificate and key from PEM text, checking that they belong together.
pub fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not valid PEM ({e})"))?;
    if chain.is_empty() {
        return Err(
            "the certificate file holds no certificate (no '-----BEGIN CERTIFICATE-----' block)"
                .into(),
        );
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => "the key file holds no private key (expected a PKCS#8, PKCS#1 RSA or SEC1 EC 'PRIVATE KEY' block)".to_string(),
        e => format!("the key file is not valid PEM ({e})"),
    })?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the certificate (the first certificate in the chain must be the one the key belongs to)".to_string()
        }
        e => format!("the certificate or key cannot be used: {e}"),
    })?;
    Ok(ck)
}

/// Loads `--cert` and `--key`, with errors that name the file and the fix.
pub fn load_files(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path).map_err(|e| {
            CertError(format!(
                "cannot read the {what} file {}: {e}; check the path and that tcpfwd's user may read it",
                path.display()
            ))
        })
    };
    let cert_pem = read(cert, "certificate")?;
    let key_pem = read(key, "key")?;
    certified_key_from_pem(&cert_pem, &key_pem, provider).map_err(|why| {
        CertError(format!(
            "cannot use --cert {} with --key {}: {why}",
            cert.display(),
            key.display()
        ))
    })
}

/// A self-signed certificate made in memory, with its fingerprint.
pub struct SelfSigned {
    /// What the resolver serves.
    pub key: CertifiedKey,
    /// The names on it.
    pub names: Vec<String>,
    /// SHA-256 of the certificate, as colon-separated hex.
    pub fingerprint: String,
}

/// Makes an ECDSA P-256 self-signed certificate for localhost, the host name and `extra`.
pub fn self_signed(extra: &[String], provider: &CryptoProvider) -> anyhow::Result<SelfSigned> {
    let mut names = vec!["localhost".to_string()];
    if let Some(host) = crate::sys::hostname() {
        names.push(host);
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let fail = |e: rcgen::Error| {
        anyhow::anyhow!("cannot make the self-signed certificate for {names:?}: {e}")
    };
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(fail)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("tcpfwd self-signed ({})", names[0]),
    );
    let signing_key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&signing_key).map_err(fail)?;
    let der = cert.der().clone();
    let fingerprint = sha256_fingerprint(&der);
    let key = PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let key = CertifiedKey::from_der(vec![der], key, provider)
        .map_err(|e| anyhow::anyhow!("cannot load the self-signed certificate: {e}"))?;
    Ok(SelfSigned {
        key,
        names,
        fingerprint,
    })
}

/// SHA-256 of a DER certificate as `AB:CD:...`, the form browsers show.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

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

/// The server configuration every ordinary handshake uses.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    alpn: Vec<Vec<u8>>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_order_follows_preference() {
        let names = |chacha| {
            provider(chacha)
                .cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(false)[0], "TLS13_AES_128_GCM_SHA256");
        assert_eq!(names(true)[0], "TLS13_CHACHA20_POLY1305_SHA256");
        assert_eq!(names(true).len(), names(false).len());
    }

    #[test]
    fn self_signed_roundtrips_through_pem_and_detects_mismatch() {
        let p = provider(false);
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let ok = certified_key_from_pem(
            a.cert.pem().as_bytes(),
            a.signing_key.serialize_pem().as_bytes(),
            &p,
        );
        assert!(ok.is_ok());
        let err = certified_key_from_pem(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
            &p,
        )
        .unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err =
            certified_key_from_pem(b"", a.signing_key.serialize_pem().as_bytes(), &p).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err = certified_key_from_pem(a.cert.pem().as_bytes(), b"", &p).unwrap_err();
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn fingerprint_format() {
        let f = sha256_fingerprint(b"x");
        assert_eq!(f.len(), 32 * 3 - 1);
        assert!(f.starts_with("2D:71:16:42"));
    }
}
