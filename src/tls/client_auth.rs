//! Client certificates: the verifier a client-auth route's handshakes use
//! (its CA and CRLs, read from disk at every table build) and the CRL check
//! that closes open connections after a revocation.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::ClientAuth;
use crate::tls::CertError;

/// The verifier for `auth`: a certificate from its CA, not listed by its CRL.
pub fn verifier(
    auth: &ClientAuth,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
    let ca_file = match auth {
        ClientAuth::Family { dir } => dir.join(crate::clientca::CA_CERT),
        ClientAuth::Ca { ca, .. } => ca.clone(),
    };
    let mut roots = RootCertStore::empty();
    let certs = read_certs(&ca_file)?;
    for c in certs {
        roots.add(c).map_err(|e| {
            CertError(format!(
                "client CA {}: not a usable CA certificate: {e}",
                ca_file.display()
            ))
        })?;
    }
    let crls = crls(auth)?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // The family CA signs leaves only; a brought CA's CRL is its leaves'.
        .only_check_end_entity_revocation();
    builder
        .build()
        .map_err(|e| CertError(format!("client CA {}: {e}", ca_file.display())))
}

/// The CRLs configured for `auth` (the family CA always has one).
pub fn crls(auth: &ClientAuth) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    match auth.crl_file() {
        None => Ok(Vec::new()),
        Some(path) => read_crls(&path),
    }
}

/// Whether any of `crls` lists `serial` (a certificate's serial number, as
/// the INTEGER's content bytes).
pub fn is_revoked(crls: &[CertificateRevocationListDer<'_>], serial: &[u8]) -> bool {
    crls.iter().any(
        |crl| match webpki::BorrowedCertRevocationList::from_der(crl.as_ref()) {
            Ok(l) => matches!(
                webpki::CertRevocationList::from(l).find_serial(serial),
                Ok(Some(_))
            ),
            Err(_) => false,
        },
    )
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = std::fs::read(path).map_err(|e| {
        CertError(format!(
            "cannot read the client CA {}: {e}{}",
            path.display(),
            hint(path)
        ))
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError(format!("client CA {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(CertError(format!(
            "client CA {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let bytes = std::fs::read(path).map_err(|e| {
        CertError(format!(
            "cannot read the CRL {}: {e}{}",
            path.display(),
            hint(path)
        ))
    })?;
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError(format!("CRL {}: bad PEM: {e}", path.display())))?;
    let crls = if pem.is_empty() {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        pem
    };
    for c in &crls {
        webpki::BorrowedCertRevocationList::from_der(c.as_ref())
            .map_err(|e| CertError(format!("CRL {}: not a CRL: {e:?}", path.display())))?;
    }
    Ok(crls)
}

fn hint(path: &Path) -> &'static str {
    let family = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == crate::clientca::DIR_NAME);
    if family {
        "; the family CA is made by `tcpfwd client-cert new NAME` or by tcpfwd's start"
    } else {
        ""
    }
}
