//! Pebble (a test ACME CA) and pebble-challtestsrv (its DNS) on loopback, from Debian's `pebble` package.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A loopback port nothing listens on right now (for the few places that need a fixed port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        if let Some(v) = validity {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let config = dir.join("pebble-config.json");
        std::fs::write(&config, cfg.to_string()).unwrap();

        let mut cmd = Command::new("pebble-challtestsrv");
        cmd.args([
            "-management",
            &lo(free_port()).to_string(),
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
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&self.config)
            .arg("-dnsserver")
            .arg(self.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0");
        let mut p = Proc::spawn(cmd);
        p.wait_output("ACME directory available", Duration::from_secs(20));
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

    /// How many new orders Pebble has received.
    pub fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
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
