//! What systemd does around a service, for the tests: a notify socket that
//! records sd_notify messages, `systemd-socket-activate` command lines, free
//! ports for it, and the listening sockets a process holds.

use std::collections::BTreeSet;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{require_tool, TempDir, BIN};

#[derive(Default)]
struct Inbox {
    messages: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    value: String,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    _dir: Option<TempDir>,
}

impl NotifySocket {
    /// A socket at a path in a fresh temporary directory.
    pub fn new() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Self::serve(sock, path.to_str().unwrap().to_string(), Some(dir))
    }

    /// A socket in the abstract namespace (`@name`), as systemd may use for user services.
    pub fn new_abstract() -> NotifySocket {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "tcpfwd-test-notify-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Self::serve(sock, format!("@{name}"), None)
    }

    fn serve(sock: UnixDatagram, value: String, dir: Option<TempDir>) -> NotifySocket {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let inbox = Arc::new(Inbox::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (inbox.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if std::env::var_os("TCPFWD_TEST_ECHO").is_some() {
                        eprintln!("notify> {text:?}");
                    }
                    i.messages.lock().unwrap().push(text);
                    i.changed.notify_all();
                }
            }
        });
        NotifySocket {
            value,
            inbox,
            stop,
            _dir: dir,
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn env_value(&self) -> &str {
        &self.value
    }

    /// Every datagram so far, in order.
    pub fn messages(&self) -> Vec<String> {
        self.inbox.messages.lock().unwrap().clone()
    }

    /// Waits until `n` datagrams match; returns them. Panics with all messages on timeout.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut msgs = self.inbox.messages.lock().unwrap();
        loop {
            let found: Vec<String> = msgs.iter().filter(|m| pred(m)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("timed out waiting for {n} matching notify messages; got {msgs:#?}");
            }
            msgs = self
                .inbox
                .changed
                .wait_timeout(msgs, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Async-friendly `wait_for`.
    pub async fn wait_for_async(
        &self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        within: Duration,
    ) -> Vec<String> {
        tokio::task::block_in_place(|| self.wait_for(pred, n, within))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The `KEY=value` fields of one notify datagram.
pub fn fields(msg: &str) -> Vec<(&str, &str)> {
    msg.lines().filter_map(|l| l.split_once('=')).collect()
}

/// The value of `key` in one notify datagram.
pub fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    fields(msg)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `n` distinct loopback ports, free right now (`systemd-socket-activate` refuses port 0).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| super::free_port()).collect()
}

/// `systemd-socket-activate -l 127.0.0.1:PORT... [--fdname=...] [-E env...] tcpfwd --log-format json ...`.
///
/// It binds the ports, then execs tcpfwd (same PID) at the first connection.
pub fn socket_activate(
    ports: &[u16],
    fdnames: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Command {
    let listens: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    socket_activate_on(&listens, fdnames, env, args)
}

/// `socket_activate` on any addresses, like `[::1]:8443`.
pub fn socket_activate_on(
    listens: &[String],
    fdnames: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Command {
    require_tool("systemd-socket-activate");
    let mut cmd = Command::new("systemd-socket-activate");
    for l in listens {
        cmd.arg(format!("--listen={l}"));
    }
    if let Some(names) = fdnames {
        cmd.arg(format!("--fdname={names}"));
    }
    for (k, v) in env {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.arg(BIN)
        .args(["--log-format", "json", "--log-level", "debug"])
        .args(args);
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Inodes of the TCP sockets in LISTEN state that process `pid` holds open.
pub fn listening_inodes(pid: i32) -> BTreeSet<u64> {
    let mut listening = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st (field 3) 0A is LISTEN; field 9 is the inode.
            if f.len() > 9 && f[3] == "0A" {
                listening.insert(f[9].parse::<u64>().unwrap());
            }
        }
    }
    let mut held = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return held;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(inode) = t
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            if listening.contains(&inode) {
                held.insert(inode);
            }
        }
    }
    held
}

/// Polls until process `pid` holds `n` listening TCP sockets; returns their inodes.
pub fn wait_listening(pid: i32, n: usize, within: Duration) -> BTreeSet<u64> {
    let deadline = Instant::now() + within;
    loop {
        let held = listening_inodes(pid);
        if held.len() >= n {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} holds {} listening sockets, expected {n}",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the process's stderr holds `needle` (its reader thread may lag
/// behind the exit); returns all of stderr. Panics with it on timeout.
pub fn wait_stderr(fwd: &super::Tcpfwd, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let err = fwd.stderr();
        if err.contains(needle) {
            return err;
        }
        assert!(
            Instant::now() < deadline,
            "stderr never said {needle:?}:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
