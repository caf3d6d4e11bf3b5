//! Socket activation: take the listening sockets systemd passed (`LISTEN_FDS`)
//! and give each to its `--map`, by local address and port or by name.
//!
//! Matching rules (the README says the same):
//! - A socket whose name (`FileDescriptorName=`, `LISTEN_FDNAMES`) is a port
//!   number serves the map that listens on that port, whatever address and port
//!   the socket itself has. Any other name (systemd's default is the unit's
//!   name, like `tcpfwd.socket`) is ignored.
//! - Otherwise a socket serves the map whose port equals the socket's port and
//!   whose listen address is either absent or equal to the socket's address.
//! - Every socket must find a map and every map at least one socket; a map may
//!   take several (say `0.0.0.0:443` and `[::]:443` with `BindIPv6Only=ipv6-only`).
#![allow(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};

use crate::config::Listen;
use crate::net::listener::{self, Listener};
use crate::proxy::routes::FrontendHandle;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// A start-up error about the passed sockets; the message says what to change.
#[derive(Debug)]
pub struct ActivationError(pub String);

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ActivationError {}

/// A listening TCP socket received from systemd.
#[derive(Debug)]
pub struct Passed {
    /// The descriptor number it arrived as, for messages.
    pub fd: RawFd,
    /// Its `FileDescriptorName=`, if systemd gave names.
    pub name: Option<String>,
    /// Where it listens.
    pub local: SocketAddr,
    /// The socket itself.
    pub socket: Socket,
}

impl Passed {
    fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("{} (fd {}, name '{n}')", self.local, self.fd),
            None => format!("{} (fd {})", self.local, self.fd),
        }
    }
}

/// What the `LISTEN_*` variables say, checked but not yet acted on.
#[derive(Debug, PartialEq, Eq)]
struct Announced {
    count: usize,
    names: Vec<Option<String>>,
}

/// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. `None`: no sockets for us.
fn parse_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Option<Announced>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    match pid.trim().parse::<u32>() {
        Ok(p) if p == me => {}
        // Meant for another process (we were started by the one they were for).
        _ => return Ok(None),
    }
    let count: usize = fds.trim().parse().map_err(|_| {
        ActivationError(format!(
            "LISTEN_FDS='{fds}' is not a number; it is set by systemd for socket activation, unset it to bind the ports directly"
        ))
    })?;
    if count == 0 {
        return Ok(None);
    }
    if count > 4096 {
        return Err(ActivationError(format!(
            "LISTEN_FDS={count} is more sockets than tcpfwd can have maps; check the .socket unit"
        )));
    }
    let names = match names {
        None => vec![None; count],
        Some(list) => {
            let names: Vec<Option<String>> = list
                .split(':')
                .map(|n| (!n.is_empty()).then(|| n.to_string()))
                .collect();
            if names.len() != count {
                return Err(ActivationError(format!(
                    "LISTEN_FDNAMES='{list}' names {} sockets but LISTEN_FDS={count}; check FileDescriptorName= in the .socket units",
                    names.len()
                )));
            }
            names
        }
    };
    Ok(Some(Announced { count, names }))
}

/// Takes ownership of passed descriptor `fd` after checking that it is open.
fn own_fd(fd: RawFd) -> Result<OwnedFd, ActivationError> {
    // SAFETY: fcntl with F_GETFD only queries flags of a descriptor number.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(ActivationError(format!(
            "systemd announced a socket as fd {fd} (LISTEN_FDS), but that descriptor is not open"
        )));
    }
    // SAFETY: as above; keeps the socket from leaking into anything we exec.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open, and systemd's protocol hands descriptors
    // 3..3+LISTEN_FDS to this process; nothing else in tcpfwd refers to them,
    // and `take_from_env` runs once (it clears the variables), so this is the
    // only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that a passed socket is a listening TCP socket; returns its address.
fn check(fd: RawFd, name: &Option<String>, socket: &Socket) -> Result<SocketAddr, ActivationError> {
    let what = match name {
        Some(n) => format!("fd {fd} (name '{n}')"),
        None => format!("fd {fd}"),
    };
    let bad = |why: String| ActivationError(format!("the socket systemd passed as {what} {why}"));
    let domain = socket
        .domain()
        .map_err(|e| bad(format!("is not a socket ({e})")))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(bad(
            "is not an IP socket: tcpfwd takes only ListenStream=[ADDRESS:]PORT sockets".into(),
        ));
    }
    let ty = socket.r#type().map_err(|e| bad(e.to_string()))?;
    if ty != Type::STREAM {
        return Err(bad(
            "is not a stream (TCP) socket: use ListenStream=, not ListenDatagram=".into(),
        ));
    }
    if !socket.is_listener().map_err(|e| bad(e.to_string()))? {
        return Err(bad(
            "is not listening (with Accept=yes systemd passes connections): set Accept=no, the default, in the .socket unit".into(),
        ));
    }
    let local = socket
        .local_addr()
        .map_err(|e| bad(e.to_string()))?
        .as_socket()
        .ok_or_else(|| bad("has no IP address".into()))?;
    Ok(local)
}

/// Takes the sockets systemd passed, if any were meant for this process, and
/// clears `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` so that no child
/// inherits them.
///
/// Call once, before any thread starts (environment changes are not thread-safe).
pub fn take_from_env() -> Result<Option<Vec<Passed>>, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let announced = parse_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let Some(announced) = announced? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(announced.count);
    for (i, name) in announced.names.into_iter().enumerate() {
        let fd = FIRST_FD + i as RawFd;
        let socket = Socket::from(own_fd(fd)?);
        let local = check(fd, &name, &socket)?;
        out.push(Passed {
            fd,
            name,
            local,
            socket,
        });
    }
    Ok(Some(out))
}

/// The port a socket name stands for, if it is one.
fn name_port(name: &Option<String>) -> Option<u16> {
    let n = name.as_deref()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<u16>().ok().filter(|p| *p != 0)
}

/// A frontend as socket matching sees it: its address, and how messages name it.
#[derive(Debug, Clone)]
struct Wanted {
    listen: Listen,
    text: String,
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn maps_list(maps: &[Wanted]) -> String {
    maps.iter()
        .map(|m| format!("'{m}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// For each passed socket (name, local address), the index of its map.
fn assign(
    maps: &[Wanted],
    sockets: &[(RawFd, Option<String>, SocketAddr)],
) -> Result<Vec<usize>, ActivationError> {
    let mut chosen = Vec::with_capacity(sockets.len());
    for (fd, name, local) in sockets {
        let shown = match name {
            Some(n) => format!("{local} (fd {fd}, name '{n}')"),
            None => format!("{local} (fd {fd})"),
        };
        let idx = if let Some(port) = name_port(name) {
            let fits: Vec<usize> = (0..maps.len())
                .filter(|&i| maps[i].listen.port == port)
                .collect();
            match fits[..] {
                [i] => i,
                [] => {
                    return Err(ActivationError(format!(
                        "systemd passed the socket {shown}, named for port {port}, but no --map listens on port {port} (maps: {}); rename it with FileDescriptorName= or add the map",
                        maps_list(maps)
                    )))
                }
                _ => {
                    return Err(ActivationError(format!(
                        "systemd passed the socket {shown}, named for port {port}, but several maps listen on port {port}; give the .socket no FileDescriptorName= so that addresses decide"
                    )))
                }
            }
        } else {
            let ip = local.ip().to_canonical();
            let fits = (0..maps.len()).find(|&i| {
                let l = &maps[i].listen;
                l.port == local.port() && l.addr.is_none_or(|a| a.to_canonical() == ip)
            });
            match fits {
                Some(i) => i,
                None => {
                    return Err(ActivationError(format!(
                        "systemd passed the socket {shown}, but no --map listens there (maps: {}); add a --map for port {}, remove that ListenStream= from the .socket unit, or name the socket after a map's port with FileDescriptorName=",
                        maps_list(maps),
                        local.port()
                    )))
                }
            }
        };
        chosen.push(idx);
    }
    if let Some(orphan) = (0..maps.len()).find(|i| !chosen.contains(i)) {
        let passed = sockets
            .iter()
            .zip(&chosen)
            .map(|((fd, name, a), &i)| match name {
                Some(n) => format!("{a} (fd {fd}, name '{n}') for '{}'", maps[i]),
                None => format!("{a} (fd {fd}) for '{}'", maps[i]),
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ActivationError(format!(
            "--map '{}' has no socket from systemd (it passed {passed}); add ListenStream={} to the .socket unit, or drop the map",
            maps[orphan], maps[orphan].listen
        )));
    }
    Ok(chosen)
}

/// Gives every passed socket to its frontend; errors if any socket or frontend is left over.
pub fn listeners(
    frontends: &[Arc<FrontendHandle>],
    passed: Vec<Passed>,
) -> anyhow::Result<Vec<Listener>> {
    let maps: Vec<Wanted> = frontends
        .iter()
        .map(|f| Wanted {
            listen: f.listen,
            text: f.table().describe.clone(),
        })
        .collect();
    let facts: Vec<_> = passed
        .iter()
        .map(|p| (p.fd, p.name.clone(), p.local))
        .collect();
    let chosen = assign(&maps, &facts)?;
    let mut out = Vec::with_capacity(passed.len());
    for (p, idx) in passed.into_iter().zip(chosen) {
        let map = &maps[idx];
        tracing::info!(socket = %p.describe(), map = %map, "using the socket passed by systemd");
        let std_listener: std::net::TcpListener = p.socket.into();
        // from_std sets the socket non-blocking before tokio takes it.
        out.push(
            listener::from_std(frontends[idx].clone(), std_listener).map_err(|e| {
                ActivationError(format!(
                    "cannot use the socket from systemd for map '{map}': {e}"
                ))
            })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(specs: &[&str]) -> Vec<Wanted> {
        specs
            .iter()
            .map(|s| {
                let m: crate::config::MapSpec = s.parse().unwrap();
                Wanted {
                    listen: m.listen,
                    text: m.to_string(),
                }
            })
            .collect()
    }

    fn sock(fd: RawFd, name: Option<&str>, addr: &str) -> (RawFd, Option<String>, SocketAddr) {
        (fd, name.map(String::from), addr.parse().unwrap())
    }

    #[test]
    fn env_is_for_us_only_with_our_pid() {
        assert_eq!(parse_env(None, Some("2"), None, 7).unwrap(), None);
        assert_eq!(parse_env(Some("8"), Some("2"), None, 7).unwrap(), None);
        assert_eq!(parse_env(Some("7"), Some("0"), None, 7).unwrap(), None);
        let a = parse_env(Some("7"), Some("2"), None, 7).unwrap().unwrap();
        assert_eq!(a.count, 2);
        assert_eq!(a.names, vec![None, None]);
        let a = parse_env(Some("7"), Some("2"), Some("web:"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(a.names, vec![Some("web".into()), None]);
    }

    #[test]
    fn env_errors_quote_the_value() {
        let e = parse_env(Some("7"), Some("x"), None, 7).unwrap_err().0;
        assert!(e.contains("LISTEN_FDS='x'"), "{e}");
        let e = parse_env(Some("7"), Some("2"), Some("a"), 7).unwrap_err().0;
        assert!(e.contains("LISTEN_FDNAMES='a'"), "{e}");
    }

    #[test]
    fn address_matching() {
        let m = maps(&["443:dvr:80", "127.0.0.1:7682:dvr:7681"]);
        let got = assign(
            &m,
            &[
                sock(3, None, "[::]:443"),
                sock(4, Some("tcpfwd.socket"), "127.0.0.1:7682"),
                sock(5, None, "0.0.0.0:443"),
            ],
        )
        .unwrap();
        assert_eq!(got, vec![0, 1, 0]);
        // A wildcard socket does not fit a map that asked for one address.
        let e = assign(&m, &[sock(3, None, "[::]:443"), sock(4, None, "[::]:7682")])
            .unwrap_err()
            .0;
        assert!(e.contains("[::]:7682 (fd 4)"), "{e}");
        assert!(e.contains("no --map listens there"), "{e}");
    }

    #[test]
    fn name_matching_by_port() {
        let m = maps(&["443:a:80", "7682:b:81"]);
        let got = assign(
            &m,
            &[
                sock(3, Some("7682"), "127.0.0.1:9001"),
                sock(4, Some("443"), "127.0.0.1:9000"),
            ],
        )
        .unwrap();
        assert_eq!(got, vec![1, 0]);
        // The README's example: a second unit adds port 8443 to the map for 443.
        let got = assign(
            &m,
            &[
                sock(3, Some("tcpfwd.socket"), "[::]:443"),
                sock(4, Some("tcpfwd.socket"), "[::]:7682"),
                sock(5, Some("443"), "[::]:8443"),
            ],
        )
        .unwrap();
        assert_eq!(got, vec![0, 1, 0]);
        let e = assign(&m, &[sock(3, Some("444"), "127.0.0.1:443")])
            .unwrap_err()
            .0;
        assert!(e.contains("no --map listens on port 444"), "{e}");
        let m = maps(&["127.0.0.1:443:a:80", "[::1]:443:b:81"]);
        let e = assign(&m, &[sock(3, Some("443"), "127.0.0.1:443")])
            .unwrap_err()
            .0;
        assert!(e.contains("several maps"), "{e}");
    }

    #[test]
    fn only_listening_tcp_sockets_are_taken() {
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        let e = check(3, &None, &udp).unwrap_err().0;
        assert!(e.contains("fd 3 is not a stream (TCP) socket"), "{e}");
        let unix = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        let e = check(4, &Some("x".into()), &unix).unwrap_err().0;
        assert!(e.contains("fd 4 (name 'x') is not an IP socket"), "{e}");
        let tcp = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        tcp.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let e = check(5, &None, &tcp).unwrap_err().0;
        assert!(e.contains("set Accept=no"), "{e}");
        tcp.listen(1).unwrap();
        let local = check(5, &None, &tcp).unwrap();
        assert_eq!(local.ip(), std::net::Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn map_without_socket_is_an_error() {
        let m = maps(&["443:dvr:80", "7682:dvr:7681"]);
        let e = assign(&m, &[sock(3, None, "[::]:443")]).unwrap_err().0;
        assert!(e.contains("--map '7682:dvr:7681' has no socket"), "{e}");
        assert!(e.contains("ListenStream=7682"), "{e}");
    }
}
