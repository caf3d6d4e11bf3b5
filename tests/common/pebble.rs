//! Pebble (a test ACME CA) and pebble-challtestsrv (its DNS) on loopback, from Debian's `pebble` package.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::common::free_port;
use crate::common::{require_tool, Pki, TempDir};

/// A helper process whose output (stdout and stderr) is collected; killed by PID on drop.
pub struct Proc {
    child: Child,
    out: Arc<(Mutex<String>, Condvar)>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let out = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("TCPFWD_TEST_ECHO").is_some() {
                        eprintln!("pebble> {line}");
                    }
                    let mut s = out.0.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                    out.1.notify_all();
                }
            });
        }
        Proc { child, out }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.out.0.lock().unwrap().clone()
    }

    /// Waits until the output contains `needle`; panics with the output on timeout or exit.
    pub fn wait_output(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            {
                let s = self.out.0.lock().unwrap();
                if s.contains(needle) {
                    return;
                }
                let (s, _) = self
                    .out
                    .1
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap();
                if s.contains(needle) {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "process exited ({status}) before printing {needle:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}:\n{}",
                self.output()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_tcp(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Pebble CA whose TLS-ALPN-01 validations connect to 127.0.0.1:`tls_port`,
/// with challtestsrv answering every name with 127.0.0.1 (and no AAAA).
pub struct Pebble {
    pub dir: TempDir,
    /// The PKI of Pebble's own HTTPS (`--acme-ca-root` is its CA).
    pub pki: Pki,
    pub tls_port: u16,
    pub listen: SocketAddr,
    pub management: SocketAddr,
    config: PathBuf,
    dns: SocketAddr,
    pebble: Option<Proc>,
    _challtestsrv: Proc,
}

impl Pebble {
    /// Writes the configuration and starts the DNS server; `start` starts the CA.
    /// `validity` sets Pebble's certificate lifetime in seconds.
    pub fn new(tls_port: u16, validity: Option<u64>) -> Pebble {
        let mut extra = serde_json::json!({});
        if let Some(v) = validity {
            extra["certificateValidityPeriod"] = v.into();
        }
        Self::with_config(tls_port, extra)
    }

    /// `new` with more keys for Pebble's configuration object (external account binding, ...).
    pub fn with_config(tls_port: u16, extra: serde_json::Value) -> Pebble {
        require_tool("pebble");
        require_tool("pebble-challtestsrv");
        let dir = TempDir::new("pebble");
        let pki = Pki::new();
        let lo = |p| SocketAddr::from(([127, 0, 0, 1], p));
        let listen = lo(free_port());
        let management = lo(free_port());
        let dns = lo(free_port());
        let mut cfg = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": pki.cert,
                "privateKey": pki.key,
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg["pebble"][k] = v.clone();
        }
        let config = dir.join("pebble-config.json");
        std::fs::write(&config, cfg.to_string()).unwrap();

        let chall_management = lo(free_port());
        let mut cmd = Command::new("pebble-challtestsrv");
        cmd.args([
            "-management",
            &chall_management.to_string(),
            "-dns01",
            &dns.to_string(),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        let mut chall = Proc::spawn(cmd);
        chall.wait_output("Starting management server", Duration::from_secs(20));
        // It prints that before its goroutines bind.
        wait_tcp(chall_management, Duration::from_secs(20));
        Pebble {
            dir,
            pki,
            tls_port,
            listen,
            management,
            config,
            dns,
            pebble: None,
            _challtestsrv: chall,
        }
    }

    /// Starts the CA and waits until its directory is served.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// `start` with more environment variables (`PEBBLE_WFE_NONCEREJECT`, ...).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new("pebble");
        cmd.envs(env.iter().copied());
        cmd.arg("-config")
            .arg(&self.config)
            .arg("-dnsserver")
            .arg(self.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0");
        let mut p = Proc::spawn(cmd);
        p.wait_output("ACME directory available", Duration::from_secs(20));
        // Pebble prints that before its listeners are bound.
        wait_tcp(self.listen, Duration::from_secs(20));
        wait_tcp(self.management, Duration::from_secs(20));
        self.pebble = Some(p);
    }

    /// Stops the CA (it forgets everything: accounts, orders, its root).
    pub fn stop(&mut self) {
        self.pebble = None;
    }

    /// Pebble's log so far.
    pub fn log(&self) -> String {
        self.pebble.as_ref().map(Proc::output).unwrap_or_default()
    }

    /// How many orders Pebble has created (a request retried after badNonce counts once).
    pub fn orders(&self) -> usize {
        self.log().matches("Added order ").count()
    }

    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.listen)
    }

    pub fn ca_root(&self) -> &Path {
        &self.pki.ca
    }

    /// The root that issued the certificates, from the management API, as PEM.
    pub async fn root_pem(&self) -> String {
        https_get(&self.pki, self.management, "/roots/0").await
    }
}

/// A minimal HTTPS GET (HTTP/1.0) trusting `pki`'s CA; returns the body.
pub async fn https_get(pki: &Pki, addr: SocketAddr, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_string()
}

/// Accepts any server certificate: for looking at placeholders and certificates from a CA
/// whose root the test does not have yet. Never outside tests.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration that accepts whatever certificate the server shows.
pub fn accept_anything_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth(),
    )
}

/// `accept_anything_config` presenting the client certificate and key in the PEM file `pem`.
pub fn accept_anything_with_client_cert(pem: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_file_iter(pem)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pem).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_client_auth_cert(certs, key)
            .unwrap(),
    )
}

/// SHA-256 of a certificate as `AB:CD:...`, the form tcpfwd logs.
pub fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How a [`StandInCa`] behaves; each field one way to misbehave.
#[derive(Clone, Default)]
pub struct Script {
    /// Answer every new order with 429 rateLimited and this `Retry-After`
    /// (seconds or a date); `None` issues.
    pub refuse_orders: Option<String>,
    /// Offer `renewalInfo` and suggest this window.
    pub ari: AriWindow,
    /// What the certificate URL returns (a PEM chain); `None`: a chain that does not parse.
    pub chain: Option<String>,
    /// Answer polls of the order with 503 and this `Retry-After` (seconds).
    pub poll_fails: Option<u64>,
    /// Send the directory without a length and end the connection without close_notify.
    pub directory_no_close_notify: bool,
    /// Once an order was placed, advertise new-order at `/order2` instead.
    pub change_directory: bool,
    /// Refuse orders with this status line and ACME error type instead of 429 rateLimited.
    pub refusal: Option<(String, String)>,
    /// Send every body chunked.
    pub chunked: bool,
    /// Send the directory's head and half its body, then nothing (for two
    /// minutes, longer than any request deadline), the connection left open.
    pub stall: bool,
    /// List these in the directory's `meta.profiles`.
    pub profiles: Option<Vec<String>>,
}

/// A stand-in ACME CA over HTTPS, scripted to misbehave ([`Script`]); it
/// checks no signatures. Issuing, it marks every authorization valid at once.
pub struct StandInCa {
    pub addr: SocketAddr,
    /// When each new-order request arrived.
    pub orders: Arc<Mutex<Vec<Instant>>>,
    /// The paths of the new-order requests.
    pub order_paths: Arc<Mutex<Vec<String>>>,
    /// The new-order requests' payloads (the JWS payload, decoded).
    pub order_payloads: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The paths of the renewal-information requests.
    pub renewal_info: Arc<Mutex<Vec<String>>>,
    /// How many accounts were created, orders finalized, directories fetched.
    pub accounts: Arc<Mutex<usize>>,
    pub finalized: Arc<Mutex<usize>>,
    pub directories: Arc<Mutex<usize>>,
}

/// The stand-in that refuses every order, as Let's Encrypt does at a rate limit.
pub type RateLimitedCa = StandInCa;

/// A suggested renewal window, RFC 3339 start and end.
pub type AriWindow = Option<(String, String)>;

impl StandInCa {
    pub async fn start(pki: &Pki, retry_after: u64) -> StandInCa {
        Self::start_with_ari(pki, retry_after, None).await
    }

    pub async fn start_with_ari(pki: &Pki, retry_after: u64, ari: AriWindow) -> StandInCa {
        Self::scripted(
            pki,
            Script {
                refuse_orders: Some(retry_after.to_string()),
                ari,
                ..Script::default()
            },
        )
        .await
    }

    pub async fn scripted(pki: &Pki, script: Script) -> StandInCa {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&pki.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let ca = StandInCa {
            addr,
            orders: seen.orders.clone(),
            order_paths: seen.order_paths.clone(),
            order_payloads: seen.order_payloads.clone(),
            renewal_info: seen.renewal_info.clone(),
            accounts: seen.accounts.clone(),
            finalized: seen.finalized.clone(),
            directories: seen.directories.clone(),
        };
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_acme(tls, addr, &script, seen).await;
                    }
                });
            }
        });
        ca
    }

    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.addr)
    }

    pub fn order_count(&self) -> usize {
        self.orders.lock().unwrap().len()
    }
}

/// What the stand-in CA records.
#[derive(Clone, Default)]
struct Seen {
    orders: Arc<Mutex<Vec<Instant>>>,
    order_paths: Arc<Mutex<Vec<String>>>,
    order_payloads: Arc<Mutex<Vec<serde_json::Value>>>,
    renewal_info: Arc<Mutex<Vec<String>>>,
    accounts: Arc<Mutex<usize>>,
    finalized: Arc<Mutex<usize>>,
    directories: Arc<Mutex<usize>>,
    /// Whether the current order was finalized.
    done: Arc<Mutex<bool>>,
}

/// The payload of a flattened JWS (RFC 7515), as JSON; `Null` if there is none.
fn jws_payload(body: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    let jws: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let payload = jws["payload"].as_str().unwrap_or("");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

async fn serve_acme(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
    script: &Script,
    seen: Seen,
) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut stream = tokio::io::BufReader::new(stream);
    let base = format!("https://{addr}");
    let mut nonce = 0u64;
    // Bounded: a client makes a handful of requests per connection.
    for _ in 0..1000 {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            head.push(line);
        }
        let request_line = head.first().cloned().unwrap_or_default();
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let len: usize = head
            .iter()
            .find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        nonce += 1;
        let order = |status: &str| {
            let mut o = serde_json::json!({
                "status": status,
                "identifiers": [{"type": "dns", "value": "cams.example.org"}],
                "authorizations": [format!("{base}/authz/1")],
                "finalize": format!("{base}/finalize/1"),
            });
            if status == "valid" {
                o["certificate"] = format!("{base}/cert/1").into();
            }
            o.to_string()
        };
        let problem = |kind: &str, detail: &str, status: u16| {
            serde_json::json!({
                "type": format!("urn:ietf:params:acme:error:{kind}"),
                "detail": detail,
                "status": status
            })
            .to_string()
        };
        let (status, extra, body) = match (method.as_str(), path.as_str()) {
            ("GET", "/dir") => {
                *seen.directories.lock().unwrap() += 1;
                let ordered = !seen.orders.lock().unwrap().is_empty();
                let new_order = if script.change_directory && ordered {
                    "order2"
                } else {
                    "order"
                };
                let mut dir = serde_json::json!({
                    "newNonce": format!("{base}/nonce"),
                    "newAccount": format!("{base}/account"),
                    "newOrder": format!("{base}/{new_order}"),
                    "meta": { "termsOfService": "https://stand-in.example/terms" }
                });
                if script.ari.is_some() {
                    dir["renewalInfo"] = format!("{base}/renewal-info").into();
                }
                if let Some(profiles) = &script.profiles {
                    let map: serde_json::Map<String, serde_json::Value> = profiles
                        .iter()
                        .map(|p| (p.clone(), format!("the {p} profile").into()))
                        .collect();
                    dir["meta"]["profiles"] = map.into();
                }
                if script.stall {
                    let dir = dir.to_string();
                    let rsp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                        dir.len(),
                        &dir[..dir.len() / 2]
                    );
                    stream.get_mut().write_all(rsp.as_bytes()).await?;
                    stream.get_mut().flush().await?;
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    return Ok(());
                }
                if script.directory_no_close_notify {
                    let rsp =
                        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{dir}");
                    let mut tls = stream.into_inner();
                    tls.write_all(rsp.as_bytes()).await?;
                    tls.flush().await?;
                    // A bare TCP close: no close_notify.
                    let (tcp, _) = tls.into_inner();
                    drop(tcp);
                    return Ok(());
                }
                ("200 OK", String::new(), dir.to_string())
            }
            ("GET", p) if p.starts_with("/renewal-info/") && script.ari.is_some() => {
                seen.renewal_info.lock().unwrap().push(p.to_string());
                let (start, end) = script.ari.clone().unwrap();
                (
                    "200 OK",
                    "Retry-After: 3600\r\n".to_string(),
                    serde_json::json!({ "suggestedWindow": { "start": start, "end": end } })
                        .to_string(),
                )
            }
            ("HEAD", "/nonce") | ("GET", "/nonce") => ("200 OK", String::new(), String::new()),
            ("POST", "/account") => {
                *seen.accounts.lock().unwrap() += 1;
                (
                    "201 Created",
                    format!("Location: {base}/account/1\r\n"),
                    r#"{"status":"valid"}"#.to_string(),
                )
            }
            ("POST", "/order") | ("POST", "/order2") => {
                seen.orders.lock().unwrap().push(Instant::now());
                seen.order_paths.lock().unwrap().push(path.clone());
                seen.order_payloads.lock().unwrap().push(jws_payload(&body));
                match (&script.refuse_orders, &script.refusal) {
                    (_, Some((status, kind))) => (
                        status.as_str(),
                        String::new(),
                        problem(kind, "refused by the stand-in CA", 400),
                    ),
                    (Some(retry_after), None) => (
                        "429 Too Many Requests",
                        format!("Retry-After: {retry_after}\r\n"),
                        problem(
                            "rateLimited",
                            "too many certificates already issued for this exact set of identifiers",
                            429,
                        ),
                    ),
                    (None, None) => {
                        *seen.done.lock().unwrap() = false;
                        (
                            "201 Created",
                            format!("Location: {base}/order/1\r\n"),
                            order("ready"),
                        )
                    }
                }
            }
            ("POST", "/authz/1") => (
                "200 OK",
                String::new(),
                serde_json::json!({
                    "status": "valid",
                    "identifier": {"type": "dns", "value": "cams.example.org"},
                    "challenges": []
                })
                .to_string(),
            ),
            ("POST", "/order/1") => match script.poll_fails {
                Some(secs) => (
                    "503 Service Unavailable",
                    format!("Retry-After: {secs}\r\n"),
                    problem("serverInternal", "the CA is busy; come back later", 503),
                ),
                None => {
                    let done = *seen.done.lock().unwrap();
                    (
                        "200 OK",
                        String::new(),
                        order(if done { "valid" } else { "ready" }),
                    )
                }
            },
            ("POST", "/finalize/1") => {
                *seen.finalized.lock().unwrap() += 1;
                *seen.done.lock().unwrap() = true;
                ("200 OK", String::new(), order("valid"))
            }
            ("POST", "/cert/1") => (
                "200 OK",
                String::new(),
                script.chain.clone().unwrap_or_else(|| {
                    "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n".into()
                }),
            ),
            _ => ("404 Not Found", String::new(), String::new()),
        };
        let content_type = if status.starts_with(['4', '5']) && !body.is_empty() {
            "application/problem+json"
        } else if path == "/cert/1" {
            "application/pem-certificate-chain"
        } else {
            "application/json"
        };
        let body = if method == "HEAD" { "" } else { body.as_str() };
        let response = if script.chunked && !body.is_empty() {
            // In two chunks, with an extension and a trailer, as a proxy might.
            let (a, b) = body.split_at(body.len() / 2);
            format!(
                "HTTP/1.1 {status}\r\nReplay-Nonce: nonce-{nonce}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n{extra}\r\n{:x};x=y\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
                a.len(),
                b.len()
            )
        } else {
            format!(
                "HTTP/1.1 {status}\r\nReplay-Nonce: nonce-{nonce}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
        };
        stream.get_mut().write_all(response.as_bytes()).await?;
        stream.get_mut().flush().await?;
    }
    Ok(())
}
