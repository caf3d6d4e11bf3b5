//! The HTTPS client for the ACME CA: hyper's HTTP/1.1 client connection over
//! tokio-rustls (aws-lc-rs), one connection per request under one deadline,
//! remembering the last failed request for the log.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::{Full, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use super::{error_chain, REQUEST_TIMEOUT, REQUEST_TIMEOUT_ENV, RETRY_AFTER_CAP};
use crate::net::connect;
use crate::tls::CertError;

/// Longest the name lookup and TCP connection to the CA may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest response head (status line and headers) accepted; hyper's read
/// buffer, which must hold the whole head, is capped at this.
const MAX_HEAD: usize = 64 * 1024;
/// Longest response body accepted: ACME answers are small JSON documents and
/// certificate chains of a few KiB.
const MAX_BODY: usize = 1024 * 1024;

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
    /// The deadline of one request, from connect to the body's last byte:
    /// [`REQUEST_TIMEOUT`], or [`REQUEST_TIMEOUT_ENV`] in tests.
    deadline: Duration,
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
            deadline: request_deadline()?,
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

/// [`REQUEST_TIMEOUT`], unless the tests' [`REQUEST_TIMEOUT_ENV`] names
/// another number of seconds.
fn request_deadline() -> anyhow::Result<Duration> {
    let Some(v) = std::env::var_os(REQUEST_TIMEOUT_ENV) else {
        return Ok(REQUEST_TIMEOUT);
    };
    v.to_str()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("{REQUEST_TIMEOUT_ENV}={v:?} is not a number of seconds above 0"))
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
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(bare.to_string())
        .map_err(|e| format!("{bare:?} cannot be a TLS server name ({e})"))?;
    // The body is in memory already: collecting it cannot fail (Infallible).
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };

    // Happy eyeballs, as for backends: an IPv6 route that drops packets costs
    // 250 ms, not the whole timeout.
    let (tcp, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect::connect_host(bare, port))
        .await
        .map_err(|_| format!("cannot connect to {bare}:{port} within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {bare}:{port}: {}", error_chain(&e)))?;
    exchange(stream, origin_form(parts)?, body).await
}

/// The request as hyper's connection sends it: the target in origin form
/// (`/path?query`), `Host` from the URL, and `Connection: close`, since each
/// request has its own connection.
fn origin_form(mut parts: http::request::Parts) -> Result<http::request::Parts, String> {
    let uri = &parts.uri;
    let host = uri.host().ok_or("the URL has no host")?;
    let host = match uri.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let target = target
        .parse()
        .map_err(|e| format!("invalid request target {target:?} ({e})"))?;
    parts.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(&host).map_err(|e| format!("invalid host {host:?} ({e})"))?,
    );
    parts.headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    parts.uri = target;
    Ok(parts)
}

/// One HTTP/1.1 request and its whole response over `io`, by hyper: chunked
/// or length-framed bodies; a body framed by the end of the connection is
/// complete only with TLS close_notify (tokio-rustls reports a bare TCP close
/// as an error). The head is capped at [`MAX_HEAD`], the body at [`MAX_BODY`].
async fn exchange<IO>(
    io: IO,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<(http::response::Parts, Bytes), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("starting HTTP/1.1: {}", error_chain(&e)))?;
    let request = Request::from_parts(parts, Full::new(body));
    let response = async {
        let rsp = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no response: {}", error_chain(&e)))?;
        let (parts, body) = rsp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the response body is over {MAX_BODY} bytes")
                } else {
                    format!("reading the response body: {}", error_chain(&*e))
                }
            })?
            .to_bytes();
        Ok((parts, body))
    };
    // The connection is driven here, not in a task of its own, so that the
    // caller's deadline ends it too. It may finish before the body is read
    // (the body is buffered for us); its errors reach the response as well.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(response);
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut response => return r,
            c = &mut conn, if !conn_done => {
                conn_done = true;
                if let Err(e) = c {
                    tracing::debug!(error = %error_chain(&e), "the connection to the ACME CA ended with an error");
                }
            }
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
        let deadline = self.deadline;
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
            // One deadline for connect, TLS, head and body.
            let (parts, body) = match tokio::time::timeout(deadline, fut).await {
                Err(_) => {
                    record(None, None);
                    return Err(instant_acme::Error::Other(
                        format!(
                            "{method} {url}: no complete answer within {deadline:?} (the deadline of one request to the CA)"
                        )
                        .into(),
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

    /// `exchange` against a server that reads the request and answers `rsp`
    /// (then closes); returns the result and the request's bytes as sent.
    async fn against(
        req: http::Request<()>,
        body: &'static [u8],
        rsp: Vec<u8>,
    ) -> (Result<(http::response::Parts, Bytes), String>, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // The request is small: its head and body arrive before the answer.
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") || !seen.ends_with(body) {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = server.write_all(&rsp).await;
            let _ = server.shutdown().await;
            String::from_utf8_lossy(&seen).into_owned()
        });
        let (parts, ()) = req.into_parts();
        let result = exchange(
            client,
            origin_form(parts).unwrap(),
            Bytes::from_static(body),
        )
        .await;
        (result, srv.await.unwrap())
    }

    fn get(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).unwrap()
    }

    #[tokio::test]
    async fn the_request_is_in_origin_form_with_host_and_connection_close() {
        let req = http::Request::post("https://ca.example.org:14000/acme/new-order?x=1")
            .header("content-type", "application/jose+json")
            .header("connection", "keep-alive")
            .body(())
            .unwrap();
        let rsp = b"HTTP/1.1 201 Created\r\nReplay-Nonce: abc\r\nLink: <a>;rel=\"up\"\r\n\
                    Link: <b>;rel=\"up\"\r\nContent-Length: 5\r\n\r\nhello";
        let (result, sent) = against(req, b"{}", rsp.to_vec()).await;
        let (parts, body) = result.unwrap();
        assert!(
            sent.starts_with("POST /acme/new-order?x=1 HTTP/1.1\r\n"),
            "{sent}"
        );
        let sent = sent.to_ascii_lowercase();
        for line in [
            "host: ca.example.org:14000\r\n",
            "connection: close\r\n",
            "content-length: 2\r\n",
            "content-type: application/jose+json\r\n",
        ] {
            assert!(sent.contains(line), "{line:?} in {sent}");
        }
        assert!(sent.ends_with("\r\n\r\n{}"), "{sent}");
        assert_eq!(parts.status, StatusCode::CREATED);
        assert_eq!(parts.headers["replay-nonce"], "abc");
        assert_eq!(parts.headers.get_all("link").iter().count(), 2);
        assert_eq!(&body[..], b"hello");
    }

    #[tokio::test]
    async fn chunked_answers_with_extensions_and_trailers_are_read() {
        let rsp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n7 ; ext=\"quoted;\"\r\n, world\r\n\
            0\r\nExpires: never\r\n\r\n";
        let (result, sent) = against(get("https://ca.example.org/dir"), b"", rsp.to_vec()).await;
        assert!(sent.starts_with("GET /dir HTTP/1.1\r\n"), "{sent}");
        assert_eq!(&result.unwrap().1[..], b"hello, world");
    }

    #[tokio::test]
    async fn oversized_and_cut_short_answers_are_errors() {
        let uri = "https://ca.example.org/";
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        )
        .into_bytes()
        .into_iter()
        .chain(std::iter::repeat_n(b'x', MAX_BODY + 1))
        .collect();
        let err = against(get(uri), b"", big).await.0.unwrap_err();
        assert!(err.contains("body is over"), "{err}");

        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            MAX_BODY + 1,
            "x".repeat(MAX_BODY + 1)
        );
        let err = against(get(uri), b"", chunked.into_bytes())
            .await
            .0
            .unwrap_err();
        assert!(err.contains("body is over"), "{err}");

        let huge_head = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let err = against(get(uri), b"", huge_head.into_bytes())
            .await
            .0
            .unwrap_err();
        assert!(err.contains("no response"), "{err}");

        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec();
        let err = against(get(uri), b"", short).await.0.unwrap_err();
        assert!(err.contains("reading the response body"), "{err}");

        let err = against(get(uri), b"", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec())
            .await
            .0
            .unwrap_err();
        assert!(err.contains("no response"), "{err}");
        let err = against(get(uri), b"", Vec::new()).await.0.unwrap_err();
        assert!(err.contains("no response"), "{err}");
    }
}
