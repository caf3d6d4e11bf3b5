//! Listening sockets: one per frontend, bound here or taken from systemd.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::config::Listen;
use crate::proxy::routes::FrontendHandle;

/// A frontend with its listening socket, ready to accept.
#[derive(Debug)]
pub struct Listener {
    /// What this socket serves.
    pub frontend: Arc<FrontendHandle>,
    /// The socket.
    pub socket: TcpListener,
    /// The address actually bound (port filled in when the map asked for 0).
    pub local_addr: SocketAddr,
}

impl Listener {
    /// Another handle on the same socket (a `dup`), registered with the event
    /// loop of the calling thread, for another worker's accept loop.
    pub fn try_clone(&self) -> io::Result<Listener> {
        let dup = socket2::SockRef::from(&self.socket).try_clone()?;
        Ok(Listener {
            frontend: self.frontend.clone(),
            socket: TcpListener::from_std(dup.into())?,
            local_addr: self.local_addr,
        })
    }
}

/// A port that cannot be listened on; the message says what to do.
#[derive(Debug)]
pub struct BindError(pub String);

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BindError {}

const BACKLOG: i32 = 1024;

fn bind_one(addr: SocketAddr, dual_stack: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn explain(what: &str, addr: SocketAddr, e: &io::Error) -> BindError {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "another program (perhaps another tcpfwd) already listens there: stop it or choose another port".to_string()
        }
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            "ports below 1024 need privileges: use systemd socket activation (see scripts/systemd) or grant CAP_NET_BIND_SERVICE, for example `setcap cap_net_bind_service=+ep $(command -v tcpfwd)`".to_string()
        }
        io::ErrorKind::AddrNotAvailable => {
            "that address is not on any interface of this machine: check LISTEN_ADDR, or leave it out to listen everywhere".to_string()
        }
        _ => "check the map's listen address and port".to_string(),
    };
    BindError(format!(
        "cannot listen on {addr} for map '{what}': {e}; {hint}"
    ))
}

/// Binds a frontend's socket (`what` names it in errors). A frontend without
/// an address gets one dual-stack socket on `[::]`, or `0.0.0.0` where the
/// host has no IPv6.
pub fn bind(listen: &Listen, what: &str) -> Result<std::net::TcpListener, BindError> {
    let addr = listen.bind_addr();
    match bind_one(addr, listen.addr.is_none()) {
        Ok(l) => Ok(l),
        Err(e)
            if listen.addr.is_none()
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
        {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), listen.port);
            tracing::warn!(
                map = what,
                "no IPv6 on this host ({e}); listening on IPv4 only"
            );
            bind_one(v4, false).map_err(|e| explain(what, v4, &e))
        }
        Err(e) => Err(explain(what, addr, &e)),
    }
}

/// Turns a bound (or inherited) non-blocking std socket into a `Listener`.
pub fn from_std(
    frontend: Arc<FrontendHandle>,
    socket: std::net::TcpListener,
) -> io::Result<Listener> {
    socket.set_nonblocking(true)?;
    // Linux copies TCP_NODELAY and the keepalive settings from a listener to
    // every socket it accepts: set once here, not per connection.
    crate::proxy::forward::tune(socket2::SockRef::from(&socket));
    // Accept a connection only once its ClientHello is in: one wake-up per
    // connection instead of one for the handshake's last ACK and another for
    // the hello (measured: 3-4 us less CPU per full handshake). A client that
    // sends nothing is handed over after about a second and then meets the
    // handshake timeout as before.
    if let Err(e) = crate::net::sys::defer_accept(std::os::fd::AsFd::as_fd(&socket), 1) {
        tracing::debug!("TCP_DEFER_ACCEPT not set: {e}");
    }
    let local_addr = socket.local_addr()?;
    Ok(Listener {
        frontend,
        socket: TcpListener::from_std(socket)?,
        local_addr,
    })
}

/// Binds every frontend; the first failure stops start-up.
pub fn bind_all(frontends: &[Arc<FrontendHandle>]) -> anyhow::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(frontends.len());
    for f in frontends {
        let socket = bind(&f.listen, &f.table().describe)?;
        out.push(from_std(f.clone(), socket)?);
    }
    Ok(out)
}
