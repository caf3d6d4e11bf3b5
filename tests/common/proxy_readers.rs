//! Real readers of the PROXY protocol on loopback, from Debian's packages:
//! nginx (an http server with `listen ... proxy_protocol`) and HAProxy (http
//! mode, `bind ... accept-proxy`). Each answers a request with what it read
//! from the header, one `key=value` a line, and is killed by PID on drop.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{free_port, require_tool, TempDir};

/// A reader process in its own temporary directory.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
    /// Holds the configuration, the logs and the process's output (`output.log`).
    dir: TempDir,
}

impl Server {
    /// Starts `cmd` with its output in `dir`, and waits until `addr` accepts.
    fn start(name: &'static str, mut cmd: Command, addr: SocketAddr, dir: TempDir) -> Server {
        let out = File::create(dir.join("output.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let mut server = Server {
            name,
            addr,
            child,
            dir,
        };
        // A connection that sends nothing and closes is no request to either
        // reader: it leaves no access-log line.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "{name} exited ({status}) before listening:\n{}",
                    server.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} does not listen on {addr}:\n{}",
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Everything the process printed or logged, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["output.log", "error.log", "access.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(f)) {
                s += &format!("--- {} {f}\n{text}", self.name);
            }
        }
        s
    }

    /// Sends `header`, then a GET for `path` in a second write (as tcpfwd
    /// sends the header, then the client's bytes), and returns what the reader
    /// answered. Panics, with the reader's logs, unless it answered 200.
    async fn ask(&self, header: &[u8], path: &str) -> Seen {
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            s.write_all(header).await?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: reader\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        })
        .await;
        let answer = match answer {
            Ok(Ok(a)) => String::from_utf8_lossy(&a).into_owned(),
            Ok(Err(e)) => panic!("{} on {}: {e}\n{}", self.name, self.addr, self.logs()),
            Err(_) => panic!("{} did not answer within 10 s\n{}", self.name, self.logs()),
        };
        let Some((head, body)) = answer.split_once("\r\n\r\n") else {
            panic!(
                "{} answered {path} with no HTTP response: {answer:?}\n{}",
                self.name,
                self.logs()
            )
        };
        assert!(
            head.starts_with("HTTP/1.1 200 "),
            "{} answered {path} with {head:?}\n{}",
            self.name,
            self.logs()
        );
        Seen(
            body.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// Sends `bytes` and reads until the reader closes; true if it sent a
    /// response. For headers a reader must refuse.
    async fn answers(&self, bytes: &[u8]) -> bool {
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = TcpStream::connect(self.addr).await?;
            s.write_all(bytes).await?;
            let mut answer = Vec::new();
            // A reset after a refused header is an answer of nothing.
            let _ = s.read_to_end(&mut answer).await;
            Ok::<_, std::io::Error>(answer)
        })
        .await;
        match read {
            Ok(Ok(a)) => a.starts_with(b"HTTP/"),
            Ok(Err(e)) => panic!("{} on {}: {e}", self.name, self.addr),
            Err(_) => panic!(
                "{} neither answered nor closed within 10 s\n{}",
                self.name,
                self.logs()
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a reader said it read from a PROXY header.
#[derive(Debug)]
pub struct Seen(pub BTreeMap<String, String>);

impl Seen {
    /// The value of `key`; panics if the reader did not report it at all.
    pub fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("no {key:?} in {:?}", self.0))
    }
}

/// nginx as an http server behind `listen 127.0.0.1:PORT proxy_protocol`.
pub struct Nginx {
    server: Server,
    version: (u32, u32, u32),
}

impl Nginx {
    /// Starts nginx in the foreground (no daemon, no master process) with its
    /// pid, logs and temporary files in a directory of its own.
    pub fn start() -> Nginx {
        require_tool("nginx");
        let version = nginx_version();
        let dir = TempDir::new("nginx");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let d = dir.path().display();
        // Always: the client's and the proxy's address and port. From 1.23.2
        // nginx also has $proxy_protocol_tlv_*, for the v2 TLVs.
        let mut fields = vec![
            ("src", "$proxy_protocol_addr"),
            ("src_port", "$proxy_protocol_port"),
            ("dst", "$proxy_protocol_server_addr"),
            ("dst_port", "$proxy_protocol_server_port"),
        ];
        if version >= (1, 23, 2) {
            fields.extend([
                ("authority", "$proxy_protocol_tlv_authority"),
                ("alpn", "$proxy_protocol_tlv_alpn"),
                ("ssl_version", "$proxy_protocol_tlv_ssl_version"),
                ("ssl_cipher", "$proxy_protocol_tlv_ssl_cipher"),
                ("ssl_cn", "$proxy_protocol_tlv_ssl_cn"),
                ("ssl_verify", "$proxy_protocol_tlv_ssl_verify"),
            ]);
        }
        let body: String = fields.iter().map(|(k, v)| format!("{k}={v}\\n")).collect();
        let log: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format proxied 'path=$request_uri {log}';
    server {{
        listen {addr} proxy_protocol;
        access_log {d}/access.log proxied;
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"#,
            log = log.join(" "),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        Nginx {
            server: Server::start("nginx", cmd, addr, dir),
            version,
        }
    }

    /// Whether this nginx reports the v2 TLVs (`$proxy_protocol_tlv_*`, 1.23.2+).
    /// Where it listens (for the PROXY header first).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn reads_tlvs(&self) -> bool {
        self.version >= (1, 23, 2)
    }

    /// See [`Server::ask`].
    pub async fn ask(&self, header: &[u8], path: &str) -> Seen {
        self.server.ask(header, path).await
    }

    /// See [`Server::answers`].
    pub async fn answers(&self, bytes: &[u8]) -> bool {
        self.server.answers(bytes).await
    }

    /// The access-log line of the request for `path`, as `key=value` pairs;
    /// waits for nginx to write it.
    pub fn logged(&self, path: &str, within: Duration) -> Seen {
        let deadline = Instant::now() + within;
        let want = format!("path={path} ");
        loop {
            let log = read(&self.server.dir.join("access.log"));
            if let Some(line) = log.lines().find(|l| l.starts_with(&want)) {
                return Seen(
                    line.split(' ')
                        .filter_map(|f| f.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx logged no request for {path}\n{}",
                self.server.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// HAProxy in http mode behind `bind 127.0.0.1:PORT accept-proxy`.
pub struct Haproxy {
    server: Server,
}

impl Haproxy {
    /// Starts HAProxy in the foreground (`-db`), one thread, answering every
    /// request itself with `http-request return`.
    pub fn start() -> Haproxy {
        require_tool("haproxy");
        let dir = TempDir::new("haproxy");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // fc_pp_authority (2.2+) is the AUTHORITY TLV; fc_pp_tlv, for the
        // others, is 2.9+ and Debian 12 has 2.6.
        let body = [
            ("src", "%[src]"),
            ("src_port", "%[src_port]"),
            ("dst", "%[dst]"),
            ("dst_port", "%[dst_port]"),
            ("authority", "%[fc_pp_authority]"),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={v}\\n"))
        .collect::<String>();
        let conf = format!(
            r#"global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend proxied
    bind {addr} accept-proxy
    http-request return status 200 content-type text/plain lf-string "{body}"
"#
        );
        let conf_path = dir.join("haproxy.cfg");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&conf_path);
        Haproxy {
            server: Server::start("haproxy", cmd, addr, dir),
        }
    }

    /// See [`Server::ask`].
    /// Where it listens (for the PROXY header first).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub async fn ask(&self, header: &[u8], path: &str) -> Seen {
        self.server.ask(header, path).await
    }

    /// See [`Server::answers`].
    pub async fn answers(&self, bytes: &[u8]) -> bool {
        self.server.answers(bytes).await
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The installed nginx's version, from `nginx -v` ("nginx version: nginx/1.22.1").
fn nginx_version() -> (u32, u32, u32) {
    let out = Command::new("nginx").arg("-v").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let v = text
        .split("nginx/")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("cannot read nginx's version from {text:?}"));
    let mut n = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    )
}
