//! The client's side of a connection: rustls driven directly over the accepted
//! `TcpStream`, so that tcpfwd decides when bytes reach the wire.
//!
//! Encrypted output is queued in rustls and leaves in as few segments as the
//! traffic allows: the TLS 1.3 session ticket waits for the first data to the
//! client instead of costing a packet of its own, data read in one go leaves in
//! one `writev`, and the last data, the `close_notify` and the FIN leave in a
//! single segment (a send marked `MSG_MORE`, then `shutdown`). On loopback each
//! packet saved is several microseconds of kernel time per connection.

use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Accepted, Acceptor, ClientHello};
use rustls::{CipherSuite, ProtocolVersion, ServerConfig, ServerConnection};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::header::TlsInfo;

/// Holds a short send back so that a following FIN joins its segment.
#[cfg(any(target_os = "linux", target_os = "android"))]
const MSG_MORE: libc::c_int = libc::MSG_MORE;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const MSG_MORE: libc::c_int = 0;

/// No SIGPIPE for a send to a reset peer (Rust ignores SIGPIPE anyway).
#[cfg(any(target_os = "linux", target_os = "android"))]
const MSG_NOSIGNAL: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const MSG_NOSIGNAL: libc::c_int = 0;

/// A connection whose ClientHello has been read, before a configuration is chosen.
pub struct Hello {
    accepted: Accepted,
    tcp: TcpStream,
}

/// Reads the ClientHello.
pub async fn read_hello(mut tcp: TcpStream) -> io::Result<Hello> {
    let mut acceptor = Acceptor::default();
    std::future::poll_fn(|cx| loop {
        let n = match acceptor.read_tls(&mut ReadAdapter { tcp: &mut tcp, cx }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        match acceptor.accept() {
            Ok(Some(accepted)) => return Poll::Ready(Ok(accepted)),
            Ok(None) if n == 0 => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the ClientHello",
                )))
            }
            Ok(None) => {}
            Err((e, mut alert)) => {
                let _ = alert.write(&mut WriteAdapter { tcp: &mut tcp, cx });
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    })
    .await
    .map(|accepted| Hello { accepted, tcp })
}

impl Hello {
    /// What the client asked for (SNI, ALPN), to choose the configuration.
    pub fn client_hello(&self) -> ClientHello<'_> {
        self.accepted.client_hello()
    }

    /// Refuses the connection with a fatal `unrecognized_name` alert (no
    /// route serves the name asked for) and closes it.
    pub async fn refuse_unrecognized_name(self) {
        // A plaintext alert record: type 21, TLS 1.2 record version, length 2,
        // level fatal (2), description unrecognized_name (112). rustls has no
        // call to send an arbitrary alert before a configuration is chosen.
        const ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
        let Hello { mut tcp, .. } = self;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &ALERT).await;
        let _ = SockRef::from(&tcp).shutdown(std::net::Shutdown::Write);
    }

    /// Completes the handshake with `config`.
    pub async fn handshake(self, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
        let Hello { accepted, mut tcp } = self;
        let conn = match accepted.into_connection(config) {
            Ok(conn) => conn,
            Err((e, mut alert)) => {
                let _ = std::future::poll_fn(|cx| {
                    Poll::Ready(alert.write(&mut WriteAdapter { tcp: &mut tcp, cx }))
                })
                .await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        let mut tls = TlsConn {
            tcp,
            conn,
            fin_sent: false,
        };
        std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }
}

/// What a connection's verified client certificate says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's commonName.
    pub common_name: Option<String>,
    /// The serial as the certificate encodes it (for CRL look-ups).
    pub serial: Vec<u8>,
    /// The serial in lower-case hex, without a leading 00, for logs.
    pub serial_hex: String,
}

/// An established TLS connection with a client.
pub struct TlsConn {
    tcp: TcpStream,
    conn: ServerConnection,
    /// `shutdown(SHUT_WR)` has been called on the socket.
    fin_sent: bool,
}

impl TlsConn {
    /// The negotiated session, for what the log line reports.
    pub fn session(&self) -> &ServerConnection {
        &self.conn
    }

    /// The address the client connected to (a `getsockname`, so only on demand).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    /// What the handshake settled, for the PROXY v2 header a backend may get.
    pub fn tls_info(&self) -> TlsInfo {
        TlsInfo {
            sni: self.conn.server_name().map(str::to_owned),
            alpn: self.conn.alpn_protocol().map(<[u8]>::to_vec),
            version: self
                .conn
                .protocol_version()
                .and_then(version_name)
                .map(str::to_owned),
            cipher: self
                .conn
                .negotiated_cipher_suite()
                .and_then(|s| iana_name(s.suite())),
            // rustls only keeps a client chain that its verifier accepted.
            client_cert_verified: self.conn.peer_certificates().is_some(),
            client_cn: self.client_cert().and_then(|c| c.common_name),
        }
    }

    /// The verified client certificate's subject CN and serial, if the
    /// route asked for one (rustls keeps only a chain its verifier accepted).
    pub fn client_cert(&self) -> Option<ClientCert> {
        let leaf = self.conn.peer_certificates()?.first()?;
        let parsed = crate::tls::x509::parse(leaf.as_ref()).ok()?;
        let serial = parsed.serial;
        // The INTEGER's content may lead with a 0 that keeps it positive.
        let trimmed = match serial {
            [0, rest @ ..] if !rest.is_empty() => rest,
            s => s,
        };
        Some(ClientCert {
            common_name: parsed.common_name().ok().flatten(),
            serial: serial.to_vec(),
            serial_hex: crate::clientca::hex(trimmed),
        })
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.is_handshaking() {
            ready!(self.poll_drain(cx, 0))?;
            if ready!(self.poll_read_tls(cx))? == 0 && self.conn.is_handshaking() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the TLS handshake",
                )));
            }
        }
        // In TLS 1.3 all that can be queued now is the session ticket, which
        // the client does not wait for: it leaves with the first data. Before
        // 1.3 the server's Finished may be queued, and the client waits for it.
        if self.conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            ready!(self.poll_drain(cx, 0))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into rustls and processes it. `Ok(0)` is the
    /// end of the TCP stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = match self.conn.read_tls(&mut ReadAdapter {
            tcp: &mut self.tcp,
            cx,
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert that says why; send it if the socket takes it now.
            let _ = self.poll_write_tls(cx, 0);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(n))
    }

    /// Writes everything queued.
    fn poll_drain(&mut self, cx: &mut Context<'_>, flags: libc::c_int) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            ready!(self.poll_write_tls(cx, flags))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes queued TLS records with one `writev` (or `sendmsg` with `flags`).
    fn poll_write_tls(&mut self, cx: &mut Context<'_>, flags: libc::c_int) -> Poll<io::Result<()>> {
        let res = if flags == 0 {
            self.conn.write_tls(&mut WriteAdapter {
                tcp: &mut self.tcp,
                cx,
            })
        } else {
            self.conn.write_tls(&mut SendAdapter {
                tcp: &self.tcp,
                cx,
                flags,
            })
        };
        match res {
            Ok(0) if self.conn.wants_write() => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for TlsConn {
    /// Plaintext from the client. The end of its stream is `Ok` with nothing
    /// read after a `close_notify`, `UnexpectedEof` after a bare FIN.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.conn.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            ready!(this.poll_read_tls(cx))?;
        }
    }
}

impl AsyncWrite for TlsConn {
    /// Encrypts into rustls's queue; the socket write happens at the next
    /// flush or shutdown, or here when the queue is full.
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // rustls takes less, or nothing, when its queue is at its limit.
            let n = this.conn.writer().write(buf)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if !this.conn.wants_write() {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            ready!(this.poll_write_tls(cx, 0))?;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.poll_drain(cx, 0)
    }

    /// Sends what is queued, then `close_notify`, then the FIN, all in one
    /// segment when they fit.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.conn.send_close_notify();
        ready!(this.poll_drain(cx, MSG_MORE))?;
        if !this.fin_sent {
            this.fin_sent = true;
            match SockRef::from(&this.tcp).shutdown(std::net::Shutdown::Write) {
                // The peer already reset the connection: nothing left to close.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A protocol version as OpenSSL prints it (`TLSv1.3`), which is what
/// PROXY protocol receivers know from HAProxy.
pub fn version_name(version: ProtocolVersion) -> Option<&'static str> {
    match version {
        ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        _ => None,
    }
}

/// A cipher suite's IANA name. rustls names TLS 1.2 suites as IANA does and
/// TLS 1.3 ones with a `TLS13_` prefix where IANA writes `TLS_`.
pub fn iana_name(suite: CipherSuite) -> Option<String> {
    let name = suite.as_str()?;
    Some(match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name.to_owned(),
    })
}

/// `io::Read` over the socket for rustls, in the current task's context.
struct ReadAdapter<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for ReadAdapter<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *self.tcp).poll_read(self.cx, &mut rb) {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// `io::Write` over the socket for rustls, in the current task's context.
struct WriteAdapter<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Write for WriteAdapter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let tcp = Pin::new(&mut *self.tcp);
        // One record (a keep-alive response) goes out with `send`: `writev`
        // passes through the VFS layer first (iovec import, checks, fsnotify),
        // about 3% of tcpfwd's CPU per keep-alive request here (perf).
        let res = match bufs {
            [one] => tcp.poll_write(self.cx, one),
            _ => tcp.poll_write_vectored(self.cx, bufs),
        };
        match res {
            Poll::Ready(res) => res,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Like `WriteAdapter`, with `sendmsg` flags.
struct SendAdapter<'a, 'b> {
    tcp: &'a TcpStream,
    cx: &'a mut Context<'b>,
    flags: libc::c_int,
}

impl Write for SendAdapter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match self.tcp.poll_write_ready(self.cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
            }
            let flags = self.flags | MSG_NOSIGNAL;
            match self.tcp.try_io(Interest::WRITABLE, || {
                SockRef::from(self.tcp).send_vectored_with_flags(bufs, flags)
            }) {
                // Readiness was stale and is now cleared: wait for the next event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return res,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{provider, server_config, CertResolver};
    use rustls::pki_types::ServerName;

    #[test]
    fn names_are_openssl_versions_and_iana_suites() {
        assert_eq!(version_name(ProtocolVersion::TLSv1_3), Some("TLSv1.3"));
        assert_eq!(version_name(ProtocolVersion::TLSv1_2), Some("TLSv1.2"));
        assert_eq!(version_name(ProtocolVersion::TLSv1_0), None);
        let name = |s| iana_name(s).unwrap();
        assert_eq!(
            name(CipherSuite::TLS13_AES_128_GCM_SHA256),
            "TLS_AES_128_GCM_SHA256"
        );
        assert_eq!(
            name(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
            "TLS_CHACHA20_POLY1305_SHA256"
        );
        assert_eq!(
            name(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
        );
        assert_eq!(iana_name(CipherSuite::Unknown(0xfefe)), None);
    }

    /// A real handshake over loopback: what the client asked for is what
    /// `tls_info` reports.
    #[tokio::test]
    async fn tls_info_reports_the_handshake() {
        let provider = Arc::new(provider(false));
        let cert = crate::tls::self_signed(&[], &provider).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.key.cert[0].clone()).unwrap();
        let server = server_config(
            provider.clone(),
            CertResolver::new(cert.key),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            None,
        )
        .unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .unwrap();
            // Wait for the server to close, so the handshake is not cut short.
            let mut buf = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = read_hello(tcp)
            .await
            .unwrap()
            .handshake(server)
            .await
            .unwrap();
        assert_eq!(
            conn.tls_info(),
            TlsInfo {
                sni: Some("localhost".into()),
                alpn: Some(b"h2".to_vec()),
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS_AES_128_GCM_SHA256".into()),
                client_cert_verified: false,
                client_cn: None,
            }
        );
        tokio::io::AsyncWriteExt::shutdown(&mut conn).await.unwrap();
        client.await.unwrap();
    }
}
