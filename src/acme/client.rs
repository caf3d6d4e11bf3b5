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
use super::{error_chain, REQUEST_TIMEOUT};
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

fn parse_retry_after(value: &http::HeaderValue) -> Option<SystemTime> {
    let v = value.to_str().ok()?.trim();
    match v.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(v).ok(),
    }
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
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            // The server closed without close_notify. Many do after
            // `Connection: close`; a response whose framing is incomplete
            // is still refused by finish().
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(format!("reading the response: {}", error_chain(&e))),
        };
        if n == 0 || reader.feed(&buf[..n])? {
            break;
        }
    }
    reader.finish()
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
            let record = |status, retry_after| {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Failure {
                    method: method.clone(),
                    url: url.clone(),
                    status,
                    retry_after,
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
            if status.is_client_error() || status.is_server_error() {
                let ra = parts
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(parse_retry_after);
                record(Some(status), ra);
            } else {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Ok(BytesResponse {
                parts,
                body: Box::new(body),
            })
        })
    }
}
