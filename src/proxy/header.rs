//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text or v2
//! binary with TLVs) that tells a backend who the client really is.
//!
//! The bytes come from the `ppp` crate's v1 `Addresses` and v2 `Builder`;
//! this module only decides what goes in: one address family for both ends,
//! and the TLS facts as TLVs.

use std::net::SocketAddr;

use ppp::v2::{self, Builder, Command, Protocol, Type, TypeLengthValue, WriteToHeader, Writer};

pub use crate::config::ProxyProtocol;

/// What the client's TLS handshake settled, for the v2 TLVs (v1 has no room).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// The SNI the client sent: `PP2_TYPE_AUTHORITY`.
    pub sni: Option<String>,
    /// The negotiated ALPN protocol: `PP2_TYPE_ALPN`.
    pub alpn: Option<Vec<u8>>,
    /// As OpenSSL names it (`TLSv1.3`), which is what receivers expect from
    /// HAProxy: `PP2_SUBTYPE_SSL_VERSION`.
    pub version: Option<String>,
    /// The IANA name of the cipher suite (`TLS_AES_128_GCM_SHA256`):
    /// `PP2_SUBTYPE_SSL_CIPHER`.
    pub cipher: Option<String>,
    /// The client presented a certificate and it verified: sets
    /// `PP2_CLIENT_CERT_CONN`/`_SESS` and a zero `verify` field.
    pub client_cert_verified: bool,
    /// The Common Name of the client certificate's subject: `PP2_SUBTYPE_SSL_CN`.
    pub client_cn: Option<String>,
}

/// `pp2_tlv_ssl.client` bits.
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// `pp2_tlv_ssl.verify` when no verified certificate was presented: the spec
/// only asks for non-zero; 1 is OpenSSL's `X509_V_ERR_UNSPECIFIED`.
const VERIFY_NONE: u32 = 1;

/// The longest value a TLV gets. No legitimate value comes close (DNS names
/// end at 253 bytes, an ALPN id at 255, a certificate's CN at 64); one that is
/// longer is left out rather than cut, since a cut name is a different name.
/// It also bounds the whole header at 16 + 1334 bytes: far below v2's 64 KiB
/// limit, and one segment on any Ethernet path (with real values it is 100 to
/// 150 bytes, within the 536 the spec hopes for).
const MAX_TLV_VALUE: usize = 255;

/// The header to send the backend before any byte of the client's: `client`
/// is the client's address, `local` the address it connected to (the accepted
/// socket's local address). `tls` only shows in v2.
///
/// Both addresses are first made canonical (an IPv4-mapped IPv6 address
/// becomes IPv4). If they still differ in family, the IPv4 one is mapped into
/// IPv6, as HAProxy's own sender does, since the spec wants one family.
pub fn encode(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    tls: &TlsInfo,
) -> Vec<u8> {
    let (client, local) = one_family(client, local);
    match version {
        ProxyProtocol::V1 => ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => encode_v2(client, local, tls),
    }
}

fn encode_v2(client: SocketAddr, local: SocketAddr, tls: &TlsInfo) -> Vec<u8> {
    let mut tlvs = Writer::default();
    // HAProxy's order: ALPN, AUTHORITY, then SSL.
    if let Some(alpn) = &tls.alpn {
        tlv(&mut tlvs, Type::ALPN, alpn);
    }
    if let Some(sni) = &tls.sni {
        tlv(&mut tlvs, Type::Authority, sni.as_bytes());
    }
    // Every connection tcpfwd forwards came in over TLS: the SSL TLV is always there.
    let (client_bits, verify) = if tls.client_cert_verified {
        // rustls keeps the client's chain in a resumed session, so a verified
        // certificate counts for the connection and for the session alike.
        (
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
            0,
        )
    } else {
        (PP2_CLIENT_SSL, VERIFY_NONE)
    };
    let mut ssl = Writer::from(vec![client_bits]);
    write(&mut ssl, verify);
    if let Some(v) = &tls.version {
        tlv(&mut ssl, Type::SSLVersion, v.as_bytes());
    }
    if let Some(c) = &tls.cipher {
        tlv(&mut ssl, Type::SSLCipher, c.as_bytes());
    }
    if let Some(cn) = &tls.client_cn {
        tlv(&mut ssl, Type::SSLCommonName, cn.as_bytes());
    }
    // At most 5 + 3 * (3 + MAX_TLV_VALUE) bytes, so not capped like a leaf value.
    write(&mut tlvs, TypeLengthValue::new(Type::SSL, &ssl.finish()));

    let tlvs = tlvs.finish();
    Builder::with_addresses(
        v2::Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, local),
    )
    .write_payload(tlvs.as_slice())
    .and_then(Builder::build)
    // The builder fails only when the payload passes 64 KiB, and ours is at
    // most 1334 bytes: 36 of addresses, two TLVs of at most 3 + 255, the SSL
    // one of at most 3 + 5 + 3 * 258.
    .expect("a PROXY v2 payload of at most 1334 bytes fits its 16-bit length")
}

/// Appends a TLV, or nothing when the value is longer than [`MAX_TLV_VALUE`].
fn tlv(out: &mut Writer, kind: Type, value: &[u8]) {
    if value.len() <= MAX_TLV_VALUE {
        write(out, TypeLengthValue::new(kind, value));
    }
}

/// Appends to a header under construction.
fn write(out: &mut Writer, part: impl WriteToHeader) {
    // ppp's Writer refuses bytes only once it holds more than 64 KiB; a
    // header here has at most 1350 (see `encode_v2`).
    let _ = part.write_to(out);
}

/// Both addresses in one family: IPv4 when both are IPv4 once unmapped, else IPv6.
fn one_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (a, b),
        _ => (to_v6(a), to_v6(b)),
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Addresses, Header, TypeLengthValues};
    use std::net::{IpAddr, Ipv6Addr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn full_tls() -> TlsInfo {
        TlsInfo {
            sni: Some("cams.example.org".into()),
            alpn: Some(b"h2".to_vec()),
            version: Some("TLSv1.3".into()),
            cipher: Some("TLS_AES_128_GCM_SHA256".into()),
            client_cert_verified: true,
            client_cn: Some("camera-7".into()),
        }
    }

    /// The TLVs of a v2 header as (type, value), and the SSL TLV's sub-TLVs.
    fn tlvs(header: &Header<'_>) -> Vec<(u8, Vec<u8>)> {
        header
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect()
    }

    fn sub_tlvs(ssl: &[u8]) -> Vec<(u8, Vec<u8>)> {
        TypeLengthValues::from(&ssl[5..])
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect()
    }

    #[test]
    fn version_parses_and_displays() {
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            assert_eq!(v.to_string().parse::<ProxyProtocol>(), Ok(v));
        }
        for bad in ["v3", "V1", "", "1"] {
            let e = bad.parse::<ProxyProtocol>().unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
            assert!(e.contains("\"v1\" or \"v2\""), "{e}");
        }
    }

    #[test]
    fn v1_ipv4_bytes() {
        let h = encode(
            ProxyProtocol::V1,
            sa("203.0.113.7:4242"),
            sa("198.51.100.1:443"),
            &full_tls(),
        );
        assert_eq!(h, b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n");
    }

    #[test]
    fn v1_ipv6_bytes() {
        let h = encode(
            ProxyProtocol::V1,
            sa("[2001:db8::7]:4242"),
            sa("[2001:db8::1]:443"),
            &TlsInfo::default(),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n");
    }

    #[test]
    fn a_mapped_local_address_is_ipv4() {
        // A dual-stack listener reports its local address IPv4-mapped.
        let local = sa("[::ffff:198.51.100.1]:443");
        let h = encode(
            ProxyProtocol::V1,
            sa("203.0.113.7:4242"),
            local,
            &TlsInfo::default(),
        );
        assert_eq!(h, b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n");
        let h = encode(
            ProxyProtocol::V2,
            sa("203.0.113.7:4242"),
            local,
            &TlsInfo::default(),
        );
        let header = Header::try_from(h.as_slice()).unwrap();
        assert_eq!(
            header.addresses,
            Addresses::from((sa("203.0.113.7:4242"), sa("198.51.100.1:443")))
        );
    }

    #[test]
    fn mixed_families_map_ipv4_into_ipv6() {
        let h = encode(
            ProxyProtocol::V1,
            sa("203.0.113.7:4242"),
            sa("[2001:db8::1]:443"),
            &TlsInfo::default(),
        );
        assert_eq!(h, b"PROXY TCP6 ::ffff:203.0.113.7 2001:db8::1 4242 443\r\n");
        let h = encode(
            ProxyProtocol::V2,
            sa("203.0.113.7:4242"),
            sa("[2001:db8::1]:443"),
            &TlsInfo::default(),
        );
        let header = Header::try_from(h.as_slice()).unwrap();
        assert_eq!(
            header.addresses,
            Addresses::from((sa("[::ffff:203.0.113.7]:4242"), sa("[2001:db8::1]:443")))
        );
    }

    #[test]
    fn v2_carries_every_tlv() {
        let h = encode(
            ProxyProtocol::V2,
            sa("[2001:db8::7]:4242"),
            sa("[2001:db8::1]:443"),
            &full_tls(),
        );
        let header = Header::try_from(h.as_slice()).unwrap();
        assert_eq!(header.len(), h.len(), "nothing after the header");
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(header.protocol, Protocol::Stream);
        assert_eq!(
            header.addresses,
            Addresses::from((sa("[2001:db8::7]:4242"), sa("[2001:db8::1]:443")))
        );
        let tlvs = tlvs(&header);
        let kinds: Vec<u8> = tlvs.iter().map(|t| t.0).collect();
        assert_eq!(
            kinds,
            [Type::ALPN as u8, Type::Authority as u8, Type::SSL as u8]
        );
        assert_eq!(tlvs[0].1, b"h2");
        assert_eq!(tlvs[1].1, b"cams.example.org");
        let ssl = &tlvs[2].1;
        assert_eq!(ssl[0], 0x07, "PP2_CLIENT_SSL | CERT_CONN | CERT_SESS");
        assert_eq!(ssl[1..5], [0, 0, 0, 0], "verified");
        assert_eq!(
            sub_tlvs(ssl),
            [
                (Type::SSLVersion as u8, b"TLSv1.3".to_vec()),
                (Type::SSLCipher as u8, b"TLS_AES_128_GCM_SHA256".to_vec()),
                (Type::SSLCommonName as u8, b"camera-7".to_vec()),
            ]
        );
    }

    #[test]
    fn v2_ipv4_bytes_without_client_certificate() {
        let tls = TlsInfo {
            version: Some("TLSv1.2".into()),
            ..TlsInfo::default()
        };
        let h = encode(
            ProxyProtocol::V2,
            sa("203.0.113.7:4242"),
            sa("198.51.100.1:443"),
            &tls,
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x1e".to_vec();
        want.extend([203, 0, 113, 7, 198, 51, 100, 1, 0x10, 0x92, 0x01, 0xbb]);
        // SSL: client = PP2_CLIENT_SSL, verify = 1, then SSL_VERSION.
        want.extend(b"\x20\x00\x0f\x01\x00\x00\x00\x01\x21\x00\x07TLSv1.2");
        assert_eq!(h, want);
    }

    #[test]
    fn an_overlong_value_is_left_out_not_cut() {
        let tls = TlsInfo {
            sni: Some("a".repeat(MAX_TLV_VALUE + 1)),
            client_cn: Some("c".repeat(MAX_TLV_VALUE + 1)),
            cipher: Some("x".repeat(MAX_TLV_VALUE)),
            ..full_tls()
        };
        let h = encode(
            ProxyProtocol::V2,
            sa("203.0.113.7:4242"),
            sa("198.51.100.1:443"),
            &tls,
        );
        let header = Header::try_from(h.as_slice()).unwrap();
        let tlvs = tlvs(&header);
        assert!(tlvs.iter().all(|t| t.0 != Type::Authority as u8));
        let ssl = &tlvs.iter().find(|t| t.0 == Type::SSL as u8).unwrap().1;
        let subs: Vec<u8> = sub_tlvs(ssl).iter().map(|t| t.0).collect();
        assert_eq!(subs, [Type::SSLVersion as u8, Type::SSLCipher as u8]);
    }

    #[test]
    fn the_largest_header_is_1350_bytes() {
        let long = "x".repeat(MAX_TLV_VALUE);
        let tls = TlsInfo {
            sni: Some(long.clone()),
            alpn: Some(long.clone().into_bytes()),
            version: Some(long.clone()),
            cipher: Some(long.clone()),
            client_cert_verified: true,
            client_cn: Some(long),
        };
        let h = encode(
            ProxyProtocol::V2,
            sa("[2001:db8::7]:4242"),
            sa("[2001:db8::1]:443"),
            &tls,
        );
        assert_eq!(h.len(), 1350);
        let header = Header::try_from(h.as_slice()).unwrap();
        assert_eq!(tlvs(&header).len(), 3);
    }

    /// Every pair of address kinds, both versions: the header parses back to
    /// one family and the same endpoints.
    #[test]
    fn every_address_pair_round_trips() {
        let addrs = [
            sa("203.0.113.7:4242"),
            sa("0.0.0.0:0"),
            sa("255.255.255.255:65535"),
            sa("[::ffff:192.0.2.9]:1"),
            sa("[2001:db8::7]:4242"),
            sa("[::1]:443"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ];
        let v6 = |a: SocketAddr| match a.ip().to_canonical() {
            IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
            IpAddr::V6(_) => a,
        };
        for &client in &addrs {
            for &local in &addrs {
                let (c, l) = (canonical(client), canonical(local));
                let want = if c.is_ipv4() && l.is_ipv4() {
                    (c, l)
                } else {
                    (v6(c), v6(l))
                };
                let h = encode(ProxyProtocol::V1, client, local, &full_tls());
                let text = std::str::from_utf8(&h).unwrap();
                let parsed = ppp::v1::Header::try_from(text).unwrap();
                assert_eq!(parsed.addresses, ppp::v1::Addresses::from(want), "{text}");
                assert_eq!(parsed.header.len(), h.len(), "{text}");
                assert!(h.len() <= 107, "{text}");

                let h = encode(ProxyProtocol::V2, client, local, &full_tls());
                let parsed = Header::try_from(h.as_slice()).unwrap();
                assert_eq!(parsed.addresses, Addresses::from(want), "{client} {local}");
                assert_eq!(parsed.len(), h.len());
                assert!(h.len() <= 536, "one minimal TCP segment");
            }
        }
        assert!(
            Ipv6Addr::LOCALHOST.to_ipv4_mapped().is_none(),
            "::1 stays IPv6"
        );
    }
}
