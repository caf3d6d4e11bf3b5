//! The certificate in the state directory: reading the stored pair, what a
//! certificate says (names, validity, ARI identifier), and recovering what the
//! CA issued before a crash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::CertificateIdentifier;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, Der};

use super::state::StateDir;
use super::{CERT_FILE, ISSUED_FILE, KEY_FILE, PAIR_FILE};
use crate::config::AcmeConfig;
use crate::tls::{self, x509};

/// What we know about a certificate we serve.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// DNS names in its subjectAltName.
    pub names: Vec<String>,
    /// IP addresses in its subjectAltName.
    pub ips: Vec<std::net::IpAddr>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the leaf, as browsers show it.
    pub sha256: String,
    /// The leaf, for ARI's certificate identifier.
    pub leaf: CertificateDer<'static>,
}

impl CertInfo {
    /// Reads names and validity from the leaf certificate.
    pub fn from_leaf(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let unreadable = |e: x509::Error| format!("the certificate cannot be parsed ({e})");
        let cert = x509::parse(leaf.as_ref()).map_err(unreadable)?;
        let to_time = |secs: i64| match u64::try_from(secs) {
            Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => UNIX_EPOCH,
        };
        let names = cert.dns_names().map_err(unreadable)?;
        let ips = tls::ip_addresses(leaf.as_ref())?;
        Ok(CertInfo {
            names,
            ips,
            not_before: to_time(cert.not_before),
            not_after: to_time(cert.not_after),
            sha256: tls::sha256_fingerprint(leaf),
            leaf: leaf.clone().into_owned(),
        })
    }

    /// The configured names and addresses this certificate lacks.
    pub(super) fn missing(&self, cfg: &AcmeConfig) -> Vec<String> {
        let names = cfg.domains.iter().filter(|w| !self.names.contains(w));
        let ips = cfg.ips.iter().filter(|ip| !self.ips.contains(ip));
        names.cloned().chain(ips.map(|ip| ip.to_string())).collect()
    }
}

/// The certificate's ARI identifier (RFC 9773 section 4.1): its Authority Key
/// Identifier's keyIdentifier and its serial number's content bytes.
pub fn ari_identifier(leaf: &CertificateDer<'_>) -> Result<CertificateIdentifier<'static>, String> {
    let unreadable = |e: x509::Error| format!("the certificate cannot be parsed ({e})");
    let cert = x509::parse(leaf.as_ref()).map_err(unreadable)?;
    let aki = cert.authority_key_id().map_err(unreadable)?.ok_or(
        "the certificate has no Authority Key Identifier, which ARI needs to name it".to_string(),
    )?;
    Ok(CertificateIdentifier::new(
        Der::from_slice(aki),
        Der::from_slice(cert.serial),
    ))
}

/// A stored certificate and key that can be served.
pub struct Stored {
    /// The pair, for the resolver.
    pub key: CertifiedKey,
    /// What the renewal schedule needs.
    pub info: CertInfo,
    /// The file it was read from, for the log.
    pub file: std::path::PathBuf,
}

/// Why the stored certificate cannot be used.
#[derive(Debug)]
pub struct Unusable {
    /// The file at fault.
    pub file: std::path::PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.problem)
    }
}

impl std::error::Error for Unusable {}

/// The stored pair for this configuration's CA, read without the lock (a
/// SIGHUP reload in the process that holds it): `Ok(None)` if none is stored.
pub fn stored_pair(
    cfg: &AcmeConfig,
    provider: &CryptoProvider,
) -> Result<Option<Stored>, Unusable> {
    let dir = cfg
        .state_dir
        .join(crate::acme::state::ca_dir_name(&cfg.directory));
    load_stored(&dir, provider)
}

/// Reads `bytes` (chain and key, in any order, as PEM) into a servable pair.
pub(super) fn parse_pair(
    bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, CertInfo), String> {
    let ck = tls::certified_key_from_pem(bytes, bytes, provider)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| format!("no leaf certificate ({e})"))?;
    let info = CertInfo::from_leaf(leaf)?;
    Ok((ck, info))
}

/// The stored certificate and key in `dir`: [`PAIR_FILE`], else the older
/// `cert.pem` + `key.pem`. `Ok(None)` if there is none.
pub(super) fn load_stored(
    dir: &std::path::Path,
    provider: &CryptoProvider,
) -> Result<Option<Stored>, Unusable> {
    let read = |name: &str| -> Result<Option<Vec<u8>>, Unusable> {
        match std::fs::read(dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Unusable {
                file: dir.join(name),
                problem: format!("cannot read it: {e}"),
            }),
        }
    };
    if let Some(pair) = read(PAIR_FILE)? {
        let file = dir.join(PAIR_FILE);
        return match parse_pair(&pair, provider) {
            Ok((key, info)) => Ok(Some(Stored { key, info, file })),
            Err(problem) => Err(Unusable { file, problem }),
        };
    }
    let (cert, key) = match (read(CERT_FILE)?, read(KEY_FILE)?) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(Unusable {
                file: dir.join(KEY_FILE),
                problem: format!("{KEY_FILE} is missing"),
            })
        }
        (None, Some(_)) => {
            return Err(Unusable {
                file: dir.join(CERT_FILE),
                problem: format!("{CERT_FILE} is missing"),
            })
        }
        (Some(c), Some(k)) => (c, k),
    };
    let file = dir.join(CERT_FILE);
    let unusable = |problem| Unusable {
        file: dir.join(CERT_FILE),
        problem,
    };
    let ck = tls::certified_key_from_pem(&cert, &key, provider).map_err(unusable)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| unusable(format!("no leaf certificate ({e})")))?;
    let info = CertInfo::from_leaf(leaf).map_err(unusable)?;
    Ok(Some(Stored {
        key: ck,
        info,
        file,
    }))
}

/// After a crash between storing what the CA issued and promoting it: a
/// usable [`ISSUED_FILE`] becomes the pair, an unusable one is moved aside.
pub(super) fn recover_issued(state: &StateDir, provider: &CryptoProvider) {
    let Ok(Some(bytes)) = state.read(ISSUED_FILE) else {
        return;
    };
    let result = match parse_pair(&bytes, provider) {
        Ok(_) => state.rename(ISSUED_FILE, PAIR_FILE).map(|()| None),
        Err(why) => state
            .move_aside(ISSUED_FILE, "unusable")
            .map(|p| Some((p, why))),
    };
    match result {
        Ok(None) => tracing::info!(
            file = %state.path(PAIR_FILE).display(),
            "kept the certificate the CA issued before tcpfwd last stopped"
        ),
        Ok(Some((aside, why))) => tracing::error!(
            moved_to = %aside.display(),
            problem = %why,
            "the certificate the CA issued before tcpfwd last stopped cannot be used"
        ),
        Err(e) => tracing::error!(
            file = %state.path(ISSUED_FILE).display(),
            "cannot keep the certificate the CA issued before tcpfwd last stopped: {e}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_file_holds_chain_and_key_and_is_read_back() {
        let p = tls::provider(false);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pair = format!("{}{}", cert.pem(), key.serialize_pem());
        let (_, info) = parse_pair(pair.as_bytes(), &p).unwrap();
        assert_eq!(info.names, ["a.test"]);
        let err = parse_pair(cert.pem().as_bytes(), &p).err().unwrap();
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn stored_certificate_info_and_ari_identifier() {
        let leaf = crate::tls::x509::tests::openssl_leaf();
        let info = CertInfo::from_leaf(&leaf).unwrap();
        assert_eq!(info.names, ["cams.example.org", "*.example.org"]);
        assert_eq!(
            info.not_before,
            UNIX_EPOCH + Duration::from_secs(1_795_613_104)
        );
        assert_eq!(
            info.not_after,
            UNIX_EPOCH + Duration::from_secs(1_803_389_104)
        );
        // base64url of the AKI keyid and of the serial's content bytes (00 80 ab ...),
        // from `openssl x509 -noout -ext authorityKeyIdentifier -serial`; instant-acme's
        // x509-parser feature gave the same before it was dropped.
        let id = ari_identifier(&leaf).unwrap();
        assert_eq!(id.to_string(), "DoSfW6LTPzfetsisQNnP82vW1gU.AICrze8BI0VniQ");

        let self_signed = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let err = ari_identifier(self_signed.cert.der()).unwrap_err();
        assert!(err.contains("no Authority Key Identifier"), "{err}");
        let err = CertInfo::from_leaf(&CertificateDer::from(vec![0x30, 0x00])).unwrap_err();
        assert!(
            err.starts_with("the certificate cannot be parsed (certificate: "),
            "{err}"
        );
    }
}
