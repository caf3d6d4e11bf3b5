//! Outgoing TCP connections, to backends and to the ACME CA: the name resolved
//! anew for each call, then happy eyeballs (RFC 8305) over its addresses.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{sleep, Instant};

use crate::config::BackendHost;

/// How long an attempt has to itself before the next address is tried as
/// well: RFC 8305's recommended Connection Attempt Delay.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Why no connection was made, in one line a user can act on.
///
/// The message already names every cause, so [`std::error::Error::source`]
/// is `None`: a chain printer would only repeat it.
#[derive(Debug)]
pub enum ConnectError {
    /// The name lookup failed.
    Resolve {
        /// The name as given.
        host: String,
        /// What the resolver said.
        error: io::Error,
    },
    /// There was no address to try.
    NoAddress {
        /// The name that resolved to nothing; `None` when the caller gave an
        /// empty list.
        host: Option<String>,
    },
    /// Every address failed; in the order they failed.
    Failed(Vec<(SocketAddr, io::Error)>),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Resolve { host, error } => write!(f, "cannot resolve {host}: {error}"),
            ConnectError::NoAddress { host: Some(host) } => {
                write!(f, "{host} resolved to no address")
            }
            ConnectError::NoAddress { host: None } => f.write_str("no address to connect to"),
            ConnectError::Failed(failures) => {
                for (i, (addr, error)) in failures.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "connect to {addr}: {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Connects to `host`, resolving a name anew on every call (a backend that
/// DHCP moves is followed), and returns the stream and the address it reached.
///
/// There is no overall time limit here: the caller puts its own around it.
pub async fn connect(
    host: &BackendHost,
    port: u16,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let addrs = match host {
        BackendHost::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        BackendHost::Name(name) => {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|error| ConnectError::Resolve {
                    host: name.clone(),
                    error,
                })?
                .collect();
            if addrs.is_empty() {
                return Err(ConnectError::NoAddress {
                    host: Some(name.clone()),
                });
            }
            addrs
        }
    };
    connect_addrs(addrs, ATTEMPT_DELAY).await
}

/// [`connect`] for the host part of a URL: a name or an IP literal (IPv6
/// without its brackets).
pub async fn connect_host(host: &str, port: u16) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => BackendHost::Ip(ip),
        Err(_) => BackendHost::Name(host.to_owned()),
    };
    connect(&host, port).await
}

/// Happy eyeballs over `addrs` (RFC 8305 §5): the families alternate (§4),
/// and each next address is tried `attempt_delay` after the previous attempt
/// started, or as soon as an attempt fails, earlier attempts staying open.
/// The first connection made wins; the other attempts are dropped, which
/// closes their sockets. The attempts are polled here, not spawned.
pub async fn connect_addrs(
    addrs: Vec<SocketAddr>,
    attempt_delay: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut waiting = interleave(addrs).into_iter();
    let mut attempts = Vec::new();
    let mut failures = Vec::new();
    let mut head_start = pin!(sleep(attempt_delay));
    loop {
        // Every pass follows a start, a failure or the end of a head start:
        // each of them lets the next address in.
        if let Some(addr) = waiting.next() {
            attempts.push(Box::pin(attempt(addr)));
            head_start.as_mut().reset(Instant::now() + attempt_delay);
        }
        if attempts.is_empty() {
            return Err(if failures.is_empty() {
                ConnectError::NoAddress { host: None }
            } else {
                ConnectError::Failed(failures)
            });
        }
        let more = waiting.len() > 0;
        let finished = poll_fn(|cx| {
            let done =
                attempts
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, a)| match a.as_mut().poll(cx) {
                        Poll::Ready(result) => Some((i, result)),
                        Poll::Pending => None,
                    });
            if let Some((i, result)) = done {
                // It has finished: it must never be polled again.
                drop(attempts.swap_remove(i));
                return Poll::Ready(Some(result));
            }
            if more && head_start.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match finished {
            Some((addr, Ok(stream))) => return Ok((stream, addr)),
            Some((addr, Err(error))) => failures.push((addr, error)),
            None => {}
        }
    }
}

/// One connection attempt, labelled with its address.
async fn attempt(addr: SocketAddr) -> (SocketAddr, io::Result<TcpStream>) {
    (addr, TcpStream::connect(addr).await)
}

/// Orders addresses by RFC 8305 §4: the first address's family first, then
/// the families alternate, each family keeping the resolver's order.
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let v6_first = first.is_ipv6();
    let (preferred, other): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == v6_first);
    let mut out = Vec::with_capacity(preferred.len() + other.len());
    let (mut preferred, mut other) = (preferred.into_iter(), other.into_iter());
    loop {
        match (preferred.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::time::timeout;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| a(s)).collect()
    }

    /// Far longer than any test may take: what must happen at once cannot
    /// wait for it.
    const FOREVER: Duration = Duration::from_secs(3600);
    /// The bound on each test's wait; only reached when the code is wrong.
    const LIMIT: Duration = Duration::from_secs(20);

    #[test]
    fn families_alternate_starting_with_the_first() {
        let got = interleave(addrs(&[
            "[fd00::1]:80",
            "[fd00::2]:80",
            "[fd00::3]:80",
            "10.0.0.1:80",
            "10.0.0.2:80",
        ]));
        assert_eq!(
            got,
            addrs(&[
                "[fd00::1]:80",
                "10.0.0.1:80",
                "[fd00::2]:80",
                "10.0.0.2:80",
                "[fd00::3]:80",
            ])
        );
        let got = interleave(addrs(&[
            "10.0.0.1:80",
            "10.0.0.2:80",
            "[fd00::1]:80",
            "10.0.0.3:80",
        ]));
        assert_eq!(
            got,
            addrs(&["10.0.0.1:80", "[fd00::1]:80", "10.0.0.2:80", "10.0.0.3:80"])
        );
    }

    #[test]
    fn one_family_and_empty_lists_keep_their_order() {
        let one = addrs(&["10.0.0.2:80", "10.0.0.1:80", "10.0.0.3:80"]);
        assert_eq!(interleave(one.clone()), one);
        assert_eq!(interleave(Vec::new()), Vec::<SocketAddr>::new());
    }

    #[test]
    fn errors_say_what_happened_in_one_line() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = ConnectError::Failed(vec![
            (a("10.0.0.1:80"), refused()),
            (a("[fd00::1]:80"), io::Error::other("no route")),
        ]);
        assert_eq!(
            e.to_string(),
            format!(
                "connect to 10.0.0.1:80: {}; connect to [fd00::1]:80: no route",
                refused()
            )
        );
        let e = ConnectError::Resolve {
            host: "dvr.lan".into(),
            error: io::Error::other("Name or service not known"),
        };
        assert_eq!(
            e.to_string(),
            "cannot resolve dvr.lan: Name or service not known"
        );
        let e = ConnectError::NoAddress {
            host: Some("dvr.lan".into()),
        };
        assert_eq!(e.to_string(), "dvr.lan resolved to no address");
    }

    /// An address that refuses connections: bound, never listening, so no
    /// one else can take the port while the test runs.
    fn refusing() -> (TcpSocket, SocketAddr) {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(a("127.0.0.1:0")).unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr)
    }

    /// An address that never answers: a listener whose accept queue is full
    /// (backlog 0 holds one connection, never accepted) drops every further
    /// SYN, so a connect to it hangs in SYN_SENT.
    async fn black_hole() -> (TcpListener, TcpStream, SocketAddr) {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(a("127.0.0.1:0")).unwrap();
        let l = s.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (l, filler, addr)
    }

    /// Whether a connection is waiting on `l` right now.
    async fn has_pending(l: &TcpListener) -> bool {
        timeout(Duration::ZERO, l.accept()).await.is_ok()
    }

    #[tokio::test]
    async fn a_refused_address_hands_over_to_the_next_at_once() {
        let (_refusing, bad) = refusing();
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let (_, used) = timeout(LIMIT, connect_addrs(vec![bad, good_addr], FOREVER))
            .await
            .expect("a failed attempt must start the next at once")
            .unwrap();
        assert_eq!(used, good_addr);
    }

    #[tokio::test]
    async fn every_failure_is_reported() {
        let (_r1, bad1) = refusing();
        let (_r2, bad2) = refusing();
        let e = timeout(LIMIT, connect_addrs(vec![bad1, bad2], FOREVER))
            .await
            .unwrap()
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("connect to {bad1}: "))
                && text.contains(&format!("; connect to {bad2}: ")),
            "{text}"
        );
        let e = connect_addrs(Vec::new(), FOREVER).await.unwrap_err();
        assert_eq!(e.to_string(), "no address to connect to");
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_stop_the_next() {
        let (_l, _filler, hole) = black_hole().await;
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let (_, used) = timeout(
            LIMIT,
            connect_addrs(vec![hole, good_addr], Duration::from_millis(50)),
        )
        .await
        .expect("the next address must be tried after the delay")
        .unwrap();
        assert_eq!(used, good_addr);
    }

    #[tokio::test]
    async fn an_earlier_attempt_stays_open_and_can_still_win() {
        let (first_listener, _f1, first) = black_hole().await;
        let (_l2, _f2, second) = black_hole().await;
        let race = connect_addrs(vec![first, second], Duration::from_millis(50));
        // Once both attempts are under way, make room on the first: its SYN,
        // sent again after a second, gets through.
        let make_room = async {
            sleep(Duration::from_millis(200)).await;
            drop(first_listener.accept().await.unwrap());
            std::future::pending::<()>().await
        };
        let won = timeout(LIMIT, async {
            tokio::select! {
                won = race => won,
                _ = make_room => unreachable!(),
            }
        })
        .await
        .expect("the first attempt must still be open")
        .unwrap();
        assert_eq!(won.1, first);
    }

    #[tokio::test]
    async fn the_next_address_waits_for_the_delay() {
        let (_l, _filler, hole) = black_hole().await;
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let cut = timeout(
            Duration::from_millis(300),
            connect_addrs(vec![hole, good_addr], FOREVER),
        )
        .await;
        assert!(cut.is_err(), "{cut:?}");
        assert!(
            !has_pending(&good).await,
            "the second address was tried before the first had its head start"
        );
    }

    #[tokio::test]
    async fn hosts_are_names_or_literals() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = good.local_addr().unwrap().port();
        let want = a(&format!("127.0.0.1:{port}"));
        for host in ["127.0.0.1", "localhost"] {
            // localhost may come as ::1 first, where nothing listens: refused,
            // so 127.0.0.1 follows at once.
            let (_, used) = timeout(LIMIT, connect_host(host, port))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(used, want, "{host}");
        }
    }
}
