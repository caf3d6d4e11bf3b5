//! Certificates: loading PEM pairs, the self-signed default, fingerprints.

use std::fmt;
use std::path::Path;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertPair, Config};
use crate::tls::CertSet;

/// A certificate or key that cannot be used; the message names the file and the fix.
#[derive(Debug)]
pub struct CertError(pub String);

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertError {}

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
    if let Some(host) = crate::net::sys::hostname() {
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
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads every `--cert`/`--key` pair, each with the DNS names of its leaf.
pub fn load_set(pairs: &[CertPair], provider: &CryptoProvider) -> Result<CertSet, CertError> {
    let mut certs = Vec::with_capacity(pairs.len());
    for p in pairs {
        let ck = load_files(&p.cert, &p.key, provider)?;
        let names = leaf_dns_names(&ck).map_err(|why| {
            CertError(format!(
                "cannot read the names in --cert {}: {why}",
                p.cert.display()
            ))
        })?;
        certs.push((ck, names));
    }
    CertSet::by_names(certs).ok_or_else(|| CertError("no certificate given".into()))
}

/// The DNS names (subjectAltName) of a certificate's leaf, lower case, then
/// its IP addresses as text (so that [`CertSet`] can tell an IP certificate).
pub fn leaf_dns_names(ck: &CertifiedKey) -> Result<Vec<String>, String> {
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| format!("no leaf certificate ({e})"))?;
    let mut names = crate::tls::x509::parse(leaf.as_ref())
        .and_then(|c| c.dns_names())
        .map_err(|e| e.to_string())?;
    names.extend(ip_addresses(leaf.as_ref())?.iter().map(|ip| ip.to_string()));
    Ok(names)
}

/// The IP addresses in a DER certificate's subjectAltName (RFC 8738 certificates).
pub fn ip_addresses(der: &[u8]) -> Result<Vec<std::net::IpAddr>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be parsed ({e})"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's subjectAltName cannot be read ({e})"))?;
    let mut out = Vec::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::IPAddress(bytes) = name {
            if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                out.push(std::net::IpAddr::from(v4));
            } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                out.push(std::net::IpAddr::from(v6));
            } else {
                return Err(format!(
                    "the certificate has an IP address of {} bytes in its subjectAltName",
                    bytes.len()
                ));
            }
        }
    }
    Ok(out)
}

/// Checks that some certificate covers every route's name, so that no
/// route serves a certificate the browser rejects.
pub fn check_covered(config: &Config, set: &CertSet) -> Result<(), CertError> {
    for (frontend, route) in config.routes() {
        for name in &route.names {
            let name = name.to_string();
            if !set.covers(&name) {
                return Err(CertError(format!(
                    "route '{name}' on {} ({}) is covered by no certificate: add a --cert/--key pair (or [[cert]]) whose names include {name}{}",
                    frontend.listen,
                    route.origin,
                    if name.starts_with("*.") { " (a wildcard route needs a wildcard certificate)" } else { "" }
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::provider;

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
    fn ip_addresses_are_read_from_the_subject_alt_name() {
        let c = rcgen::generate_simple_self_signed(vec![
            "a.test".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ])
        .unwrap();
        let ips = ip_addresses(c.cert.der()).unwrap();
        assert_eq!(
            ips,
            [
                "127.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        let p = provider(false);
        let ck = certified_key_from_pem(
            c.cert.pem().as_bytes(),
            c.signing_key.serialize_pem().as_bytes(),
            &p,
        )
        .unwrap();
        assert_eq!(leaf_dns_names(&ck).unwrap(), ["a.test", "127.0.0.1", "::1"]);
    }

    #[test]
    fn fingerprint_format() {
        let f = sha256_fingerprint(b"x");
        assert_eq!(f.len(), 32 * 3 - 1);
        assert!(f.starts_with("2D:71:16:42"));
    }
}
