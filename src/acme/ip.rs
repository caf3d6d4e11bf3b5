//! IP address identifiers (RFC 8738): the reverse-DNS name a TLS-ALPN-01
//! validation of an address carries as its server name.

use std::net::IpAddr;

/// `7.113.0.203.in-addr.arpa` for 203.0.113.7; 32 nibbles then `ip6.arpa` for IPv6
/// (RFC 8738 section 6, after RFC 1035 and RFC 3596).
pub fn reverse_dns_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_dns_name("203.0.113.7".parse().unwrap()),
            "7.113.0.203.in-addr.arpa"
        );
        assert_eq!(
            reverse_dns_name("127.0.0.1".parse().unwrap()),
            "1.0.0.127.in-addr.arpa"
        );
        // RFC 3596 section 2.5's example.
        assert_eq!(
            reverse_dns_name("4321:0:1:2:3:4:567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa"
        );
        assert_eq!(
            reverse_dns_name("::1".parse().unwrap()),
            format!("1.{}ip6.arpa", "0.".repeat(31))
        );
    }
}
