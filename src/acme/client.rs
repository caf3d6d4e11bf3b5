//! The HTTPS client for the ACME CA: HTTP/1.1 over rustls (aws-lc-rs), one
//! connection per request, remembering the last failed request for the log.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;

use super::http1::{encode_request, ResponseReader};
use super::{error_chain, REQUEST_TIMEOUT, RETRY_AFTER_CAP};
use crate::net::connect;
use crate::tls::CertError;

/// Longest the name lookup and TCP connection to the CA may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The last request to the CA that failed, for the log line and `Retry-After`.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) method: Method,
    pub(super) url: String,
    pub(super) status: Option<StatusCode>,
    /// When the CA asked to be asked again: the first `Retry-After` of the
    /// attempt, kept even when later requests succeed or fail without one.
    pub(super) retry_after: Option<SystemTime>,
}

/// The HTTPS client for the CA, remembering the last failure.
///
/// ACME makes a handful of requests per renewal, so each gets its own
/// connection (`Connection: close`): no pool, no HTTP/2.
#[derive(Clone)]
pub(super) struct Http {
    tls: TlsConnector,
    failure: Arc<Mutex<Option<Failure>>>,
}

/// `Retry-After` (seconds or an HTTP date) as a wait from now, at most
/// [`RETRY_AFTER_CAP`]; a date in the past is zero. `None` if unreadable.
fn parse_retry_after(value: &http::HeaderValue) -> Option<Duration> {
    let v = value.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

impl Http {
    /// Trusts the roots in `ca_root` (a PEM file) if given, else the system's.
    pub(super) fn new(
        ca_root: Option<&Path>,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Http> {
        let roots = match ca_root {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    CertError(format!(
                        "cannot read --acme-ca-root {}: {e}; check the path",
                        path.display()
                    ))
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(&pem) {
                    let der = der.map_err(|e| {
                        CertError(format!(
                            "--acme-ca-root {} is not valid PEM ({e})",
                            path.display()
                        ))
                    })?;
                    roots.add(der).map_err(|e| {
                        CertError(format!(
                            "--acme-ca-root {} holds a certificate that cannot be a root ({e})",
                            path.display()
                        ))
                    })?;
                }
                if roots.is_empty() {
                    return Err(CertError(format!(
                        "--acme-ca-root {} holds no certificate (no '-----BEGIN CERTIFICATE-----' block)",
                        path.display()
                    ))
                    .into());
                }
                roots
            }
            None => system_roots()?,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS client configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Http {
            tls: TlsConnector::from(Arc::new(config)),
            failure: Arc::new(Mutex::new(None)),
        })
    }

    pub(super) fn take_failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(super) fn boxed(&self) -> Box<dyn HttpClient> {
        Box::new(self.clone())
    }
}

/// The system's trusted roots (what rustls-native-certs finds: SSL_CERT_FILE,
/// SSL_CERT_DIR or the distribution's bundle), as rustls-platform-verifier
/// does on Linux. Certificates that cannot be loaded are logged and skipped,
/// as long as some can.
fn system_roots() -> anyhow::Result<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot load some of the system's root certificates; skipping them");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::warn!(
            ignored,
            "skipping system root certificates that cannot be parsed"
        );
    }
    if added == 0 {
        bail!("no usable root certificates found on this system to check the ACME CA's certificate; install the ca-certificates package or pass --acme-ca-root");
    }
    tracing::debug!(
        roots = added,
        "loaded the system's root certificates for the ACME CA"
    );
    Ok(roots)
}

/// Sends `req` over a new TLS connection and reads the whole response.
async fn send(
    tls: TlsConnector,
    req: Request<BodyWrapper<Bytes>>,
) -> Result<(http::response::Parts, Bytes), String> {
    let (parts, body) = req.into_parts();
    let uri = &parts.uri;
    if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
        return Err("only https:// URLs are supported for the ACME CA".to_string());
    }
    let host = uri.host().ok_or("the URL has no host")?;
    // An IPv6 literal is in brackets in the URL, not in the lookup or SNI.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    // The body is in memory already: collecting it cannot fail (Infallible).
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let request = encode_request(&parts, &body)?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} cannot be a TLS server name ({e})"))?;

    // Happy eyeballs, as for backends: an IPv6 route that drops packets costs
    // 250 ms, not the whole timeout.
    let (tcp, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect::connect_host(host, port))
        .await
        .map_err(|_| format!("cannot connect to {host}:{port} within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}:{port}: {}", error_chain(&e)))?;
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("sending the request: {}", error_chain(&e)))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("sending the request: {}", error_chain(&e)))?;

    let mut reader = ResponseReader::new(&parts.method);
    let mut buf = vec![0u8; 16 * 1024];
    // Whether the server ended with TLS close_notify (a clean end) rather
    // than a bare TCP close, which an attacker on the path can forge.
    let mut close_notify = true;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            // The server closed without close_notify. Many do after
            // `Connection: close`; finish() accepts that only for a
            // response framed by its length or chunks.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                close_notify = false;
                0
            }
            Err(e) => return Err(format!("reading the response: {}", error_chain(&e))),
        };
        if n == 0 || reader.feed(&buf[..n])? {
            break;
        }
    }
    reader.finish(close_notify)
}

impl HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let method = req.method().clone();
        let url = req.uri().to_string();
        let fut = send(self.tls.clone(), req);
        let slot = self.failure.clone();
        Box::pin(async move {
            let record = |status, retry_after: Option<SystemTime>| {
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                let first = slot.as_ref().and_then(|f| f.retry_after);
                *slot = Some(Failure {
                    method: method.clone(),
                    url: url.clone(),
                    status,
                    retry_after: first.or(retry_after),
                });
            };
            let (parts, body) = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Err(_) => {
                    record(None, None);
                    return Err(instant_acme::Error::Other(
                        format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}").into(),
                    ));
                }
                Ok(Err(e)) => {
                    record(None, None);
                    return Err(instant_acme::Error::Other(
                        format!("{method} {url}: {e}").into(),
                    ));
                }
                Ok(Ok(rsp)) => rsp,
            };
            let status = parts.status;
            let mut parts = parts;
            // Capped here, in seconds, so that neither we nor instant-acme
            // (which adds it to the clock unchecked) sees an absurd value.
            let wait = parts
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(parse_retry_after);
            match wait {
                Some(w) => {
                    parts.headers.insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from(w.as_secs()),
                    );
                }
                None => {
                    parts.headers.remove(http::header::RETRY_AFTER);
                }
            }
            if status.is_client_error() || status.is_server_error() {
                let at = wait.and_then(|w| SystemTime::now().checked_add(w));
                record(Some(status), at);
            } else {
                // A success after a failure: the failure is over, unless
                // the CA said when to come back (that still holds).
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                if slot.as_ref().is_some_and(|f| f.retry_after.is_none()) {
                    *slot = None;
                }
            }
            Ok(BytesResponse {
                parts,
                body: Box::new(body),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_and_a_past_date_is_zero() {
        let v = |s: &str| parse_retry_after(&http::HeaderValue::from_str(s).unwrap());
        assert_eq!(v("8"), Some(Duration::from_secs(8)));
        // u64::MAX seconds would overflow SystemTime: capped, no panic.
        assert_eq!(v("18446744073709551615"), Some(RETRY_AFTER_CAP));
        assert_eq!(v("Fri, 31 Dec 1999 23:59:59 GMT"), Some(Duration::ZERO));
        assert_eq!(v("Fri, 31 Dec 9999 23:59:59 GMT"), Some(RETRY_AFTER_CAP));
        let in_an_hour = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let hour = v(&in_an_hour).unwrap();
        assert!(hour <= Duration::from_secs(3600) && hour >= Duration::from_secs(3590));
        assert_eq!(v("soon"), None);
    }
}
