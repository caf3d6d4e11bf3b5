//! The HTTPS client for the ACME CA, remembering the last failed request for the log.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::{error_chain, REQUEST_TIMEOUT};
use crate::tls::CertError;

/// The last request to the CA that failed, for the log line and `Retry-After`.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) method: Method,
    pub(super) url: String,
    pub(super) status: Option<StatusCode>,
    pub(super) retry_after: Option<SystemTime>,
}

/// The HTTPS client for the CA: hyper with rustls (ring), remembering the last failure.
#[derive(Clone)]
pub(super) struct Http {
    client: HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
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
    pub(super) fn new(
        ca_root: Option<&Path>,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Http> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_root {
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
                let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| anyhow!("TLS client configuration: {e}"))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => builder
                .with_provider_and_platform_verifier(provider.clone())
                .context("loading the system's root certificates for the ACME CA")?,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(30)));
        let connector = builder
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Http {
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
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

impl HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let method = req.method().clone();
        let url = req.uri().to_string();
        let fut = self.client.request(req);
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
            let rsp = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Err(_) => {
                    record(None, None);
                    return Err(instant_acme::Error::Other(
                        format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}").into(),
                    ));
                }
                Ok(Err(e)) => {
                    record(None, None);
                    return Err(instant_acme::Error::Other(
                        format!("{method} {url}: {}", error_chain(&e)).into(),
                    ));
                }
                Ok(Ok(rsp)) => rsp,
            };
            let status = rsp.status();
            if status.is_client_error() || status.is_server_error() {
                let ra = rsp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(parse_retry_after);
                record(Some(status), ra);
            } else {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}
