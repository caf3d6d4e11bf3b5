//! CIDR blocks and the allow/deny lists made of them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use crate::config::printable;

/// An address block, `10.0.0.0/8` or `2001:db8::/32` (a bare address is its
/// own block). IPv4-mapped IPv6 blocks (`::ffff:10.0.0.0/104`) are stored as
/// the IPv4 block they mean, so one list covers both ways a client appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Whether `ip` (IPv4-mapped addresses taken as IPv4) is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let text = s.trim();
        let net = match text.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(format!(
                        "invalid CIDR '{}': expected an address or ADDRESS/PREFIX, like 192.168.1.0/24, 203.0.113.7 or 2001:db8::/48",
                        printable(s)
                    ))
                }
            },
        };
        if net.trunc() != net {
            return Err(format!(
                "invalid CIDR '{}': host bits are set after the /{}; did you mean {}?",
                printable(s),
                net.prefix_len(),
                net.trunc()
            ));
        }
        Ok(Cidr(canonical(net)))
    }
}

/// `::ffff:a.b.c.d/n` (n >= 96) as `a.b.c.d/(n-96)`.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who may connect: a source in `deny` never does; with a non-empty `allow`,
/// only sources in it do. Empty lists admit everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    /// When not empty, only these blocks are admitted.
    pub allow: Vec<Cidr>,
    /// Never admitted, even when also in `allow`.
    pub deny: Vec<Cidr>,
}

impl AccessList {
    /// Whether the lists admit `ip`.
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    /// Whether the lists admit everyone (nothing to check).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(allow: &[&str], deny: &[&str]) -> AccessList {
        AccessList {
            allow: allow.iter().map(|c| c.parse().unwrap()).collect(),
            deny: deny.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn parses_blocks_addresses_and_mapped_forms() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "203.0.113.7".parse::<Cidr>().unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "::ffff:10.0.0.0/104".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "::ffff:127.0.0.2".parse::<Cidr>().unwrap().to_string(),
            "127.0.0.2/32"
        );
        for (bad, why) in [
            ("10.0.0.0/33", "invalid CIDR '10.0.0.0/33'"),
            ("dvr.lan", "expected an address"),
            ("", "invalid CIDR ''"),
            ("10.1.2.3/8", "did you mean 10.0.0.0/8?"),
            ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Found by tests/fuzz_parsers.rs: the text was quoted raw.
    #[test]
    fn control_characters_are_quoted_escaped() {
        let e = "10.0.0.0/8\n\x1b[2J".parse::<Cidr>().unwrap_err();
        assert!(
            e.starts_with("invalid CIDR '10.0.0.0/8\\n\\u{1b}[2J'"),
            "{e}"
        );
    }

    #[test]
    fn deny_wins_and_mapped_addresses_count_as_ipv4() {
        let l = list(&["192.168.1.0/24", "2001:db8::/32"], &["192.168.1.66"]);
        assert!(l.admits(ip("192.168.1.5")));
        assert!(l.admits(ip("::ffff:192.168.1.5")));
        assert!(!l.admits(ip("192.168.1.66")));
        assert!(!l.admits(ip("::ffff:192.168.1.66")));
        assert!(!l.admits(ip("10.0.0.1")));
        assert!(l.admits(ip("2001:db8:1::9")));
        assert!(!l.admits(ip("2001:db9::9")));
        let mapped = list(&["::ffff:10.0.0.0/104"], &[]);
        assert!(mapped.admits(ip("10.9.9.9")));
        let open = AccessList::default();
        assert!(open.is_open() && open.admits(ip("::1")));
        let deny_only = list(&[], &["0.0.0.0/0"]);
        assert!(!deny_only.admits(ip("127.0.0.1")));
        assert!(deny_only.admits(ip("::1")));
    }
}
