//! TLS: the crypto provider and cipher order, and the server configuration.
//! Certificates live in [`certs`], the per-handshake choice in [`resolver`],
//! the rustls-driven client connection in [`conn`], X.509 reading in [`x509`].

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::ServerConfig;

use crate::config::CipherPreference;

pub mod certs;
pub mod client_auth;
pub mod conn;
pub mod resolver;
pub mod x509;

pub use certs::{
    certified_key_from_pem, check_covered, ip_addresses, load_files, load_set, self_signed,
    sha256_fingerprint, CertError, SelfSigned,
};
pub use resolver::{CertResolver, CertSet, TlsRouter, ACME_TLS_ALPN};

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
        crate::net::sys::arm_hwcap2_has_aes()
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

/// The crypto provider's name, for the build-info metric.
pub const PROVIDER_NAME: &str = "aws-lc-rs+ring";

/// Key-exchange groups: the post-quantum hybrid first, then the classical
/// groups for clients that do not offer it (never post-quantum only). As a
/// server rustls takes the first of the client's groups it supports, so the
/// order here is what the ACME client offers.
pub fn kx_groups() -> Vec<&'static dyn SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group as kx;
    vec![kx::X25519MLKEM768, kx::X25519, kx::SECP256R1, kx::SECP384R1]
}

/// The aws-lc-rs provider (key exchange, signatures, randomness) with
/// *ring*'s cipher suites in the server's order of preference and
/// [`kx_groups`].
///
/// The record ciphers are ring's because they are what bulk transfers spend
/// their user-space CPU on: ring 0.17 has AES-GCM for VAES with AVX2 (AMD
/// Zen 3 and later, Intel since Ice Lake), where AWS-LC uses its older
/// AES-NI code unless the CPU has AVX-512; measured on this project's Zen
/// machine, 28% less user CPU per GB (1.45 against 1.65 s/GB in all). On
/// other CPUs (the Pi's ARMv8 crypto extensions, ChaCha20 everywhere) both
/// run the same assembly. A suite carries its own hash and HKDF, so mixing
/// providers is sound.
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
        kx_groups: kx_groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// The server configuration every ordinary handshake uses; with
/// `client_auth`, handshakes need a certificate it accepts.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    alpn: Vec<Vec<u8>>,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
    let with_auth = client_auth.is_some();
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    config.ignore_client_order = true;
    if with_auth {
        // No resumption where a client certificate is required: a resumed
        // session carries the old verification, and would bring a revoked
        // certificate back. Every handshake verifies the chain and the CRL.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        // One resumption ticket per TLS 1.3 handshake instead of two: half the
        // session-cache work; a client needs only one to resume.
        config.send_tls13_tickets = 1;
    }
    Ok(Arc::new(config))
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
    fn post_quantum_first_classical_kept() {
        let groups = provider(false)
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect::<Vec<_>>();
        assert_eq!(
            groups,
            ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]
        );
    }
}
