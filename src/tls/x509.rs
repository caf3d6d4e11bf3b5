//! The few fields of an X.509 certificate tcpfwd reads (validity, subject, SAN names, serial
//! and AKI), read with the x509-parser crate.
//!
//! A small view over [`x509_parser`] so that callers see plain values: times
//! as Unix seconds, names as strings, the serial as ARI wants it. It does not
//! verify signatures: rustls does that for anything a peer sends.

use std::fmt;
use std::net::IpAddr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName as ParsedName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

/// Why a certificate could not be read, as x509-parser words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err(what: &str, e: impl fmt::Display) -> Error {
    Error(format!("{what}: {e}"))
}

/// The fields of a certificate tcpfwd uses, borrowed from its DER.
#[derive(Debug, Clone)]
pub struct Certificate<'a> {
    /// The serial number's INTEGER content bytes (with any leading zero), as ARI wants them.
    pub serial: &'a [u8],
    /// Start of validity, seconds since 1970 (negative before it).
    pub not_before: i64,
    /// End of validity, seconds since 1970.
    pub not_after: i64,
    cert: X509Certificate<'a>,
}

/// An extension: whether it is critical, and its extnValue's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension<'a> {
    /// Whether a reader that does not understand it must reject the certificate.
    pub critical: bool,
    /// The content of the extnValue OCTET STRING (itself DER).
    pub value: &'a [u8],
}

/// One entry of a subjectAltName.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneralName<'a> {
    /// dNSName, as written (not lower-cased).
    Dns(&'a str),
    /// iPAddress.
    Ip(IpAddr),
    /// rfc822Name.
    Email(&'a str),
    /// uniformResourceIdentifier.
    Uri(&'a str),
    /// Any other kind (directoryName, otherName, ...).
    Other,
}

/// Reads `der`, one certificate and nothing after it; an extension that
/// appears twice is an error (RFC 5280 section 4.2).
pub fn parse(der: &[u8]) -> Result<Certificate<'_>, Error> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| err("certificate", e))?;
    if !rest.is_empty() {
        return Err(Error(format!(
            "certificate: {} unexpected bytes after it",
            rest.len()
        )));
    }
    cert.extensions_map().map_err(|e| err("extensions", e))?;
    Ok(Certificate {
        serial: cert.tbs_certificate.raw_serial(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        cert,
    })
}

impl<'a> Certificate<'a> {
    /// The extension with OID content bytes `oid` (e.g. `55 1d 11` for 2.5.29.17), if present.
    pub fn extension(&self, oid: &[u8]) -> Result<Option<Extension<'a>>, Error> {
        Ok(self
            .cert
            .extensions()
            .iter()
            .find(|e| e.oid.as_bytes() == oid)
            .map(|e| Extension {
                critical: e.critical,
                value: e.value,
            }))
    }

    /// The subjectAltName entries, in order; empty without the extension.
    pub fn subject_alt_names(&self) -> Result<Vec<GeneralName<'a>>, Error> {
        let Some(san) = self
            .cert
            .subject_alternative_name()
            .map_err(|e| err("subjectAltName", e))?
        else {
            return Ok(Vec::new());
        };
        san.value
            .general_names
            .iter()
            .map(|n| {
                Ok(match *n {
                    ParsedName::DNSName(d) => GeneralName::Dns(d),
                    ParsedName::RFC822Name(e) => GeneralName::Email(e),
                    ParsedName::URI(u) => GeneralName::Uri(u),
                    ParsedName::IPAddress(b) => GeneralName::Ip(ip_address(b)?),
                    ParsedName::Invalid(tag, _) => {
                        return Err(Error(format!(
                            "subjectAltName: an invalid name (tag {})",
                            tag.0
                        )))
                    }
                    _ => GeneralName::Other,
                })
            })
            .collect()
    }

    /// The DNS names in the subjectAltName, lower-cased.
    pub fn dns_names(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .subject_alt_names()?
            .into_iter()
            .filter_map(|n| match n {
                GeneralName::Dns(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect())
    }

    /// The keyIdentifier of the Authority Key Identifier extension (its content bytes), if any.
    pub fn authority_key_id(&self) -> Result<Option<&'a [u8]>, Error> {
        let ext = self
            .cert
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .map_err(|e| err("authorityKeyIdentifier", e))?;
        match ext.map(|e| e.parsed_extension()) {
            None => Ok(None),
            Some(ParsedExtension::AuthorityKeyIdentifier(aki)) => {
                Ok(aki.key_identifier.as_ref().map(|k| k.0))
            }
            Some(ParsedExtension::ParseError { error }) => {
                Err(err("authorityKeyIdentifier", error))
            }
            Some(_) => Err(Error("authorityKeyIdentifier: unreadable".to_string())),
        }
    }

    /// The subject as "CN=cams.example.org, O=Example" (RFC 4514 style, as x509-parser
    /// renders it), with control characters escaped so it stays on one line.
    pub fn subject(&self) -> Result<String, Error> {
        let text = x509_parser::x509::X509Name::to_string_with_registry(
            self.cert.subject(),
            x509_parser::objects::oid_registry(),
        )
        .map_err(|e| err("subject", e))?;
        Ok(text.chars().flat_map(escape_control).collect())
    }

    /// The subject's last commonName (the most specific).
    pub fn common_name(&self) -> Result<Option<String>, Error> {
        self.cert
            .subject()
            .iter_common_name()
            .last()
            .map(|cn| cn.as_str().map(str::to_owned))
            .transpose()
            .map_err(|e| err("commonName", e))
    }
}

/// An iPAddress entry's 4 or 16 bytes.
fn ip_address(b: &[u8]) -> Result<IpAddr, Error> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(b)
        .map(IpAddr::from)
        .map_err(|_| Error("iPAddress: not 4 or 16 bytes".to_string()))
}

/// A character, or its escape if it is a control character.
fn escape_control(c: char) -> Vec<char> {
    if c.is_control() {
        c.escape_default().collect()
    } else {
        vec![c]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    use std::net::Ipv4Addr;

    /// Made by OpenSSL 3.0 (`openssl x509 -req -set_serial 0x80abcdef0123456789
    /// -days 90` under a CA with an EC key), read by it as: serial 00:80:ab:cd:ef:
    /// 01:23:45:67:89, AKI keyid 0E:84:9F:5B:A2:D3:3F:37:DE:B6:C8:AC:40:D9:CF:F3:
    /// 6B:D6:D6:05, notBefore Nov 25 13:25:04 2026 GMT (1795613104), notAfter Feb
    /// 23 13:25:04 2027 GMT (1803389104), and the subject and SANs tested below.
    pub(crate) const OPENSSL_LEAF: &str = "-----BEGIN CERTIFICATE-----
MIICSzCCAfCgAwIBAgIKAICrze8BI0VniTAKBggqhkjOPQQDAjAZMRcwFQYDVQQD
DA50Y3Bmd2QgdGVzdCBDQTAeFw0yNjExMjUxMzI1MDRaFw0yNzAyMjMxMzI1MDRa
MIGOMQswCQYDVQQGEwJERTEPMA0GA1UECAwGQmVybGluMQ8wDQYDVQQHDAZCZXJs
aW4xFTATBgNVBAoMDEV4YW1wbGUgQ2FtczEMMAoGA1UECwwDT3BzMRkwFwYDVQQD
DBBjYW1zLmV4YW1wbGUub3JnMR0wGwYJKoZIhvcNAQkBFg5tZUBleGFtcGxlLm9y
ZzBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABA1lB6x675rPC9Thnqa1gbpmk83i
5FWHzh73d6tFLsT9R1AmDaCsbk7zIq3wkTHOash8qqx7v7V6m1NfEuCDmByjgakw
gaYwVgYDVR0RBE8wTYIQQ2Ftcy5FeGFtcGxlLm9yZ4INKi5leGFtcGxlLm9yZ4cE
fwAAAYEObWVAZXhhbXBsZS5vcmeGFGh0dHBzOi8vZXhhbXBsZS5vcmcvMB8GA1Ud
IwQYMBaAFA6En1ui0z833rbIrEDZz/Nr1tYFMB0GA1UdDgQWBBQxu6u7hcU2tFYr
ktsJEp9xebpcFDAMBgNVHRMBAf8EAjAAMAoGCCqGSM49BAMCA0kAMEYCIQCAZ8rx
Bqnx7noRi7p4xvdHIY8m6YsCvjwaUdA/kkzFVAIhALiEZsJTGdBpmfNhe02xH3a2
avfnlaaKrb7H6mQXn6qR
-----END CERTIFICATE-----
";

    pub(crate) fn openssl_leaf() -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(OPENSSL_LEAF.as_bytes()).unwrap()
    }

    /// Everything the reader offers, so a corrupted input exercises all of it.
    fn read_all(der: &[u8]) -> Result<(), Error> {
        let c = parse(der)?;
        c.subject()?;
        c.subject_alt_names()?;
        c.dns_names()?;
        c.authority_key_id()?;
        Ok(())
    }

    #[test]
    fn reads_an_openssl_certificate() {
        let der = openssl_leaf();
        let c = parse(&der).unwrap();
        assert_eq!(
            c.serial,
            [0x00, 0x80, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89]
        );
        assert_eq!(c.not_before, 1_795_613_104);
        assert_eq!(c.not_after, 1_803_389_104);
        assert_eq!(
            c.subject().unwrap(),
            "C=DE, ST=Berlin, L=Berlin, O=Example Cams, OU=Ops, CN=cams.example.org, \
             Email=me@example.org"
        );
        assert_eq!(
            c.subject_alt_names().unwrap(),
            [
                GeneralName::Dns("Cams.Example.org"),
                GeneralName::Dns("*.example.org"),
                GeneralName::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                GeneralName::Email("me@example.org"),
                GeneralName::Uri("https://example.org/"),
            ]
        );
        assert_eq!(
            c.dns_names().unwrap(),
            ["cams.example.org", "*.example.org"]
        );
        assert_eq!(
            c.authority_key_id().unwrap().unwrap(),
            [
                0x0e, 0x84, 0x9f, 0x5b, 0xa2, 0xd3, 0x3f, 0x37, 0xde, 0xb6, 0xc8, 0xac, 0x40, 0xd9,
                0xcf, 0xf3, 0x6b, 0xd6, 0xd6, 0x05
            ]
        );
        // basicConstraints, critical.
        let bc = c.extension(&[0x55, 0x1d, 0x13]).unwrap().unwrap();
        assert!(bc.critical);
        assert_eq!(bc.value, [0x30, 0x00]);
        let ski = c.extension(&[0x55, 0x1d, 0x0e]).unwrap().unwrap();
        assert!(!ski.critical);
        assert_eq!(c.extension(&[0x55, 0x1d, 0x1f]).unwrap(), None);
    }

    /// An rcgen CA with a fixed key identifier and a leaf it signs.
    fn rcgen_leaf(params: rcgen::CertificateParams) -> Vec<u8> {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::PreSpecified((1..=20).collect());
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        params.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn reads_an_rcgen_certificate_field_by_field() {
        let mut p = rcgen::CertificateParams::new(vec![
            "Cams.Example.org".to_string(),
            "::1".to_string(),
            "dvr.example.org".to_string(),
        ])
        .unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x9f, 0x01, 0x02]));
        p.use_authority_key_identifier_extension = true;
        // 1999 is a UTCTime "99...", 2050 and later a GeneralizedTime.
        p.not_before = time::OffsetDateTime::from_unix_timestamp(946_684_799).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(2_524_608_000).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "tcpfwd test");
        let der = rcgen_leaf(p);
        // The times really are one of each kind.
        let find = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"\x17\x0d991231235959Z"));
        assert!(find(b"\x18\x0f20500101000000Z"));

        let c = parse(&der).unwrap();
        // A positive INTEGER whose first byte has the high bit set gets a leading zero.
        assert_eq!(c.serial, [0x00, 0x9f, 0x01, 0x02]);
        assert_eq!(c.not_before, 946_684_799);
        assert_eq!(c.not_after, 2_524_608_000);
        assert_eq!(c.subject().unwrap(), "O=Example, CN=tcpfwd test");
        assert_eq!(
            c.subject_alt_names().unwrap(),
            [
                GeneralName::Dns("Cams.Example.org"),
                GeneralName::Ip("::1".parse().unwrap()),
                GeneralName::Dns("dvr.example.org"),
            ]
        );
        assert_eq!(
            c.dns_names().unwrap(),
            ["cams.example.org", "dvr.example.org"]
        );
        let aki: Vec<u8> = (1..=20).collect();
        assert_eq!(c.authority_key_id().unwrap(), Some(&aki[..]));
    }

    #[test]
    fn a_self_signed_certificate_has_no_aki_or_san_when_none_was_asked_for() {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let c = parse(&der).unwrap();
        assert_eq!(c.authority_key_id().unwrap(), None);
        assert_eq!(c.subject_alt_names().unwrap(), []);
        assert_eq!(c.subject().unwrap(), "CN=rcgen self signed cert");
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_reading_never_a_panic() {
        let mut p = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        p.use_authority_key_identifier_extension = true;
        for der in [openssl_leaf().to_vec(), rcgen_leaf(p)] {
            read_all(&der).unwrap();
            for len in 0..der.len() {
                assert!(parse(&der[..len]).is_err(), "prefix of {len} bytes");
            }
            let mut longer = der.clone();
            longer.push(0);
            assert_eq!(
                parse(&longer).unwrap_err().to_string(),
                "certificate: 1 unexpected bytes after it"
            );
            for i in 0..der.len() {
                for flip in [0xff, 0x80, 0x01, 0x20] {
                    let mut bad = der.clone();
                    bad[i] ^= flip;
                    let _ = read_all(&bad);
                }
            }
        }
    }

    /// A self-signed certificate for `a.test` with `extra` as raw extensions
    /// (OID 2.5.29.`arc`, content, critical), for hand-made cases.
    fn with_extensions(extra: &[(u64, &[u8], bool)]) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        for &(arc, content, critical) in extra {
            let mut e =
                rcgen::CustomExtension::from_oid_content(&[2, 5, 29, arc], content.to_vec());
            e.set_criticality(critical);
            p.custom_extensions.push(e);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn utc_times_from_1950_to_2049() {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(-631_152_000).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(2_524_607_999).unwrap();
        let der = rcgen_leaf(p);
        let find = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"\x17\x0d500101000000Z"));
        assert!(find(b"\x17\x0d491231235959Z"));
        let c = parse(&der).unwrap();
        assert_eq!(c.not_before, -631_152_000); // 1950-01-01: YY 50 is 1950.
        assert_eq!(c.not_after, 2_524_607_999); // 2049-12-31T23:59:59.
    }

    #[test]
    fn extensions_are_checked() {
        // A second SAN { dNSName "a" }: refused, as RFC 5280 section 4.2 says.
        let san: &[u8] = &[0x30, 0x03, 0x82, 0x01, b'a'];
        let twice = parse(&with_extensions(&[(17, san, false)])).unwrap_err();
        assert!(twice.to_string().starts_with("extensions: "), "{twice}");
        // An extension read by OID, critical or not.
        let der = with_extensions(&[(99, &[0x05, 0x00], true)]);
        let c = parse(&der).unwrap();
        let ext = c.extension(&[0x55, 0x1d, 0x63]).unwrap().unwrap();
        assert!(ext.critical);
        assert_eq!(ext.value, [0x05, 0x00]);
        assert_eq!(c.dns_names().unwrap(), ["a.test"]);
    }

    #[test]
    fn a_bad_subject_alt_name_is_an_error() {
        // Only the hand-made SAN: rcgen writes none without names.
        let only = |content: &[u8]| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                content.to_vec(),
            )];
            let key = rcgen::KeyPair::generate().unwrap();
            p.self_signed(&key).unwrap().der().to_vec()
        };
        // An IP address of 5 bytes.
        let der = only(&[0x30, 0x07, 0x87, 0x05, 1, 2, 3, 4, 5]);
        let e = parse(&der).unwrap().subject_alt_names().unwrap_err();
        assert_eq!(e.to_string(), "iPAddress: not 4 or 16 bytes");
        // A SAN that is not a SEQUENCE of names.
        let der = only(&[0x04, 0x00]);
        let e = parse(&der).and_then(|c| c.subject_alt_names()).unwrap_err();
        assert!(e.to_string().starts_with("subjectAltName: "), "{e}");
    }
}
