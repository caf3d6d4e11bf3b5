//! Shared helpers for the integration tests: start the real binary and read its
//! JSON log, a throw-away PKI, TLS clients, plain backends on loopback, and
//! real readers of the PROXY protocol (nginx, HAProxy).
#![allow(dead_code)]

pub mod backends;
pub mod proxy_readers;
pub mod systemd;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tcpfwd");

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tcpfwd-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a leaf for localhost, 127.0.0.1 and ::1, written as PEM files.
pub struct Pki {
    pub dir: TempDir,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tcpfwd test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        let mut pki = Pki {
            ca_der: ca_cert.der().clone(),
            ca_pem,
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca,
            dir,
            ca_params,
            ca_key,
        };
        let (cert, key) = pki.leaf("leaf", &["localhost", "127.0.0.1", "::1"]);
        pki.cert = cert;
        pki.key = key;
        pki
    }

    /// Issues another leaf signed by the CA; returns (chain file, key file).
    pub fn leaf(&self, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("tcpfwd test {tag}"));
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.join(&format!("{tag}-cert.pem"));
        let key_path = self.dir.join(&format!("{tag}-key.pem"));
        std::fs::write(&cert_path, cert.pem() + &self.ca_pem).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A client configuration that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// Connects over TLS to `addr`, checking the certificate for `name`.
pub async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
}

/// The log of a running tcpfwd, one JSON object per line.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<Value>>,
    changed: Condvar,
    raw: Mutex<Vec<String>>,
}

/// A running tcpfwd, killed by PID on drop.
pub struct Tcpfwd {
    pub child: Child,
    log: Arc<Log>,
}

impl Tcpfwd {
    /// A command for the binary with JSON logs; add arguments, then `spawn`.
    pub fn command() -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-format", "json", "--log-level", "debug"]);
        cmd.env_remove("RUST_LOG");
        cmd
    }

    /// Starts `BIN args...` and waits until it is ready (every frontend listens).
    pub fn start(args: &[&str]) -> Tcpfwd {
        let mut cmd = Self::command();
        cmd.args(args);
        let t = Self::spawn(cmd);
        t.wait_for(|e| msg(e) == "ready", 1, Duration::from_secs(20));
        t
    }

    /// Starts a prepared command without waiting for anything.
    pub fn spawn(mut cmd: Command) -> Tcpfwd {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start tcpfwd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TCPFWD_TEST_ECHO").is_some() {
                    eprintln!("tcpfwd> {line}");
                }
                l.raw.lock().unwrap().push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    l.events.lock().unwrap().push(v);
                }
                l.changed.notify_all();
            }
        });
        Tcpfwd { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// All events so far.
    pub fn events(&self) -> Vec<Value> {
        self.log.events.lock().unwrap().clone()
    }

    /// All raw stderr lines so far.
    pub fn stderr(&self) -> String {
        self.log.raw.lock().unwrap().join("\n")
    }

    /// Waits until `n` events match; returns them. Panics with the log on timeout.
    pub fn wait_for(
        &self,
        pred: impl Fn(&Value) -> bool,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut events = self.log.events.lock().unwrap();
        loop {
            let found: Vec<Value> = events.iter().filter(|e| pred(e)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(events);
                panic!(
                    "timed out waiting for {n} matching log events; log so far:\n{}",
                    self.stderr()
                );
            }
            events = self
                .log
                .changed
                .wait_timeout(events, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Async-friendly `wait_for`.
    pub async fn wait_for_async(
        &self,
        pred: impl Fn(&Value) -> bool + Send + 'static,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        tokio::task::block_in_place(|| self.wait_for(pred, n, within))
    }

    /// The addresses the maps listen on, in the order of the `--map` arguments.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.events()
            .iter()
            .filter(|e| msg(e) == "listening")
            .map(|e| e["listen"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    /// The loopback address of map `i` (IPv4 unless the map listens on an IPv6 address).
    pub fn addr(&self, i: usize) -> SocketAddr {
        let a = self.listen_addrs()[i];
        if a.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
        } else {
            a
        }
    }

    /// The "connection closed" events so far.
    pub fn closed(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| msg(e) == "connection closed")
            .collect()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for exit up to `within`; None if still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Tcpfwd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message of a JSON log event.
pub fn msg(e: &Value) -> &str {
    e["message"].as_str().unwrap_or("")
}

/// Runs the binary to completion with `args`; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tcpfwd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data` as hex.
pub fn sha256(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A loopback port, free on TCP and UDP right now, for a program that must be told a fixed
/// port (Pebble, challtestsrv, `systemd-socket-activate`, a closed backend).
///
/// A port from `bind(":0")` is a poor choice: it comes from the kernel's ephemeral range, so
/// between our check and the program's own bind any outgoing connection on the machine can be
/// given it (CI once failed on exactly that). These ports are taken below the ephemeral range,
/// where the kernel never hands out ports by itself, and a process-wide counter, started at an
/// offset drawn from the PID, keeps the tests of one run from choosing the same one twice.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.min(65_536));
    assert!(
        high > low + 1_000,
        "the ephemeral port range starts at {ephemeral_low}; tests need 10000-11000 below it"
    );
    let span = high - low;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        let on = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(on).is_ok() && std::net::UdpSocket::bind(on).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {low} and {high}");
}

/// The binary as the user nobody (through util-linux's setpriv, with no
/// groups or capabilities), so that permission checks bite even when the
/// tests run as root; add its arguments, then run it.
pub fn as_nobody() -> Command {
    require_tool("setpriv");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        BIN,
    ]);
    cmd
}

/// Whether this host can use ::1.
pub fn has_ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Checks that a command-line tool is installed; panics with the fix otherwise.
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: run scripts/test, which installs what the tests need"
    );
}

/// The value of the sample `series` (a name, with its labels if it has any,
/// as written in the text) on tcpfwd's metrics endpoint at `addr`, if present.
pub fn scrape_value(addr: SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
