//! The HTTPS client for the ACME CA: HTTP/1.1 over rustls (ring), one
//! connection per request, remembering the last failed request for the log.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;
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
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::http1::{encode_request, ResponseReader};
use super::{error_chain, REQUEST_TIMEOUT};
use crate::tls::CertError;

/// Longest the name lookup and TCP connection to the CA may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one address of the CA gets before the next is tried as well (RFC 8305's value).
const NEXT_ADDRESS_DELAY: Duration = Duration::from_millis(250);

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

    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect(host, port))
        .await
        .map_err(|_| format!("cannot connect to {host}:{port} within {CONNECT_TIMEOUT:?}"))??;
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

/// One connection attempt: the address and how it went.
type Attempt = Pin<Box<dyn Future<Output = (SocketAddr, std::io::Result<TcpStream>)> + Send>>;

/// A TCP connection to the first address of `host` that accepts one, in the
/// resolver's order. Like hyper before it (happy eyeballs, RFC 8305), the next
/// address is tried as soon as one fails or has not answered within
/// [`NEXT_ADDRESS_DELAY`], so an IPv6 route that drops packets does not use
/// up the whole timeout. The attempts are polled here, not spawned.
async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .peekable();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut last = format!("{host} has no address");
    loop {
        if let Some(addr) = addrs.next() {
            attempts.push(Box::pin(
                async move { (addr, TcpStream::connect(addr).await) },
            ));
        }
        if attempts.is_empty() {
            return Err(last);
        }
        let more = addrs.peek().is_some();
        let mut head_start = pin!(tokio::time::sleep(NEXT_ADDRESS_DELAY));
        let finished = poll_fn(|cx| {
            for i in 0..attempts.len() {
                if let Poll::Ready(done) = attempts[i].as_mut().poll(cx) {
                    // It has finished: never poll it again.
                    drop(attempts.swap_remove(i));
                    return Poll::Ready(Some(done));
                }
            }
            if more && head_start.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match finished {
            Some((_, Ok(tcp))) => return Ok(tcp),
            Some((addr, Err(e))) => last = format!("cannot connect to {addr}: {e}"),
            // The head start is over: the next address joins in.
            None => {}
        }
    }
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
