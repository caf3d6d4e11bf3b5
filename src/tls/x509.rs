//! The few fields of an X.509 certificate tcpfwd reads: validity, subject, SAN names, serial and AKI.
//!
//! A strict DER reader for exactly those fields, in place of a general ASN.1
//! parser: definite lengths only (long form up to 4 bytes, minimally encoded),
//! single-byte tags, and no bytes left over inside any structure it walks.
//! It never indexes a slice directly, so no input can make it panic. It does
//! not verify signatures: rustls does that for anything a peer sends.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// Universal tags (X.690 section 8) and the context tags X.509 uses.
const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const NUMERIC_STRING: u8 = 0x12;
const PRINTABLE_STRING: u8 = 0x13;
const T61_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VISIBLE_STRING: u8 = 0x1a;
const UNIVERSAL_STRING: u8 = 0x1c;
const BMP_STRING: u8 = 0x1e;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// `[0] EXPLICIT`: the TBSCertificate's version.
const VERSION: u8 = 0xa0;
/// `[1] IMPLICIT BIT STRING`: issuerUniqueID.
const ISSUER_UID: u8 = 0x81;
/// `[2] IMPLICIT BIT STRING`: subjectUniqueID.
const SUBJECT_UID: u8 = 0x82;
/// `[3] EXPLICIT`: the TBSCertificate's extensions.
const EXTENSIONS: u8 = 0xa3;

/// OID content bytes of the extensions and attributes read here.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
const OID_AKI: &[u8] = &[0x55, 0x1d, 0x23]; // 2.5.29.35

/// Attribute types rendered by name in a subject, as OpenSSL and x509-parser do.
const ATTRIBUTE_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
];

/// Why a certificate could not be read: which field, and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The field being read, in RFC 5280's names.
    pub field: &'static str,
    /// What was wrong with it.
    pub problem: Problem,
}

/// What was wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The input ended inside the field.
    Truncated,
    /// The field's tag was not the one the structure requires.
    UnexpectedTag {
        /// The tag required there.
        expected: u8,
        /// The tag found (`None`: the structure ended).
        found: Option<u8>,
    },
    /// A length DER does not allow (indefinite, over 4 bytes or not minimal).
    BadLength,
    /// A multi-byte tag, which nothing in a certificate uses.
    HighTag,
    /// Bytes after the end of a structure.
    Trailing(usize),
    /// The content is not valid for its type.
    Invalid(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.field)?;
        match &self.problem {
            Problem::Truncated => f.write_str("truncated"),
            Problem::UnexpectedTag {
                expected,
                found: Some(t),
            } => write!(f, "expected tag 0x{expected:02x}, found 0x{t:02x}"),
            Problem::UnexpectedTag {
                expected,
                found: None,
            } => write!(f, "expected tag 0x{expected:02x}, found the end"),
            Problem::BadLength => {
                f.write_str("a length DER does not allow (indefinite, too long or not minimal)")
            }
            Problem::HighTag => f.write_str("a multi-byte tag"),
            Problem::Trailing(n) => write!(f, "{n} unexpected bytes after it"),
            Problem::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {}

fn err(field: &'static str, problem: Problem) -> Error {
    Error { field, problem }
}

/// Reads consecutive DER elements (tag, length, content) from a slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element's tag and content, whatever its tag.
    fn any(&mut self, field: &'static str) -> Result<(u8, &'a [u8]), Error> {
        let (&tag, rest) = self
            .rest
            .split_first()
            .ok_or(err(field, Problem::Truncated))?;
        if tag & 0x1f == 0x1f {
            return Err(err(field, Problem::HighTag));
        }
        let (&first, mut rest) = rest.split_first().ok_or(err(field, Problem::Truncated))?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // 0x80 is the indefinite form; over 4 bytes cannot be a certificate.
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return Err(err(field, Problem::BadLength));
            }
            let bytes = rest.get(..n).ok_or(err(field, Problem::Truncated))?;
            rest = rest.get(n..).ok_or(err(field, Problem::Truncated))?;
            let len = bytes.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
            // DER: the long form only when needed, in as few bytes as possible.
            if len < 0x80 || bytes.first() == Some(&0) {
                return Err(err(field, Problem::BadLength));
            }
            usize::try_from(len).map_err(|_| err(field, Problem::Truncated))?
        };
        let content = rest.get(..len).ok_or(err(field, Problem::Truncated))?;
        self.rest = rest.get(len..).ok_or(err(field, Problem::Truncated))?;
        Ok((tag, content))
    }

    /// The next element's content; its tag must be `tag`.
    fn element(&mut self, tag: u8, field: &'static str) -> Result<&'a [u8], Error> {
        let found = self.peek_tag();
        if found != Some(tag) {
            return Err(err(
                field,
                Problem::UnexpectedTag {
                    expected: tag,
                    found,
                },
            ));
        }
        Ok(self.any(field)?.1)
    }

    /// The next element's content if its tag is `tag`, else nothing is read.
    fn optional(&mut self, tag: u8, field: &'static str) -> Result<Option<&'a [u8]>, Error> {
        if self.peek_tag() == Some(tag) {
            self.element(tag, field).map(Some)
        } else {
            Ok(None)
        }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Fails if anything is left.
    fn finish(self, field: &'static str) -> Result<(), Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(err(field, Problem::Trailing(self.rest.len())))
        }
    }
}

/// The content of the only element in `bytes`, which must have tag `tag`.
fn single<'a>(bytes: &'a [u8], tag: u8, field: &'static str) -> Result<&'a [u8], Error> {
    let mut r = Reader::new(bytes);
    let content = r.element(tag, field)?;
    r.finish(field)?;
    Ok(content)
}

/// The fields of a certificate tcpfwd uses, borrowed from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate<'a> {
    /// The serial number's INTEGER content bytes (with any leading zero), as ARI wants them.
    pub serial: &'a [u8],
    /// Start of validity, seconds since 1970 (negative before it).
    pub not_before: i64,
    /// End of validity, seconds since 1970.
    pub not_after: i64,
    /// The subject Name's content (its RDNs).
    subject: &'a [u8],
    /// The Extensions SEQUENCE's content, checked well-formed; empty if absent.
    extensions: &'a [u8],
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
    /// Any other kind, by its tag.
    Other(u8),
}

/// Reads `der`, one certificate, checking the structure of everything up to
/// and including the extensions list.
pub fn parse(der: &[u8]) -> Result<Certificate<'_>, Error> {
    let cert = single(der, SEQUENCE, "Certificate")?;
    let mut r = Reader::new(cert);
    let tbs = r.element(SEQUENCE, "tbsCertificate")?;
    r.element(SEQUENCE, "signatureAlgorithm")?;
    r.element(BIT_STRING, "signatureValue")?;
    r.finish("Certificate")?;

    let mut r = Reader::new(tbs);
    if let Some(v) = r.optional(VERSION, "version")? {
        match single(v, INTEGER, "version")? {
            [0..=2] => {}
            _ => return Err(err("version", Problem::Invalid("not v1, v2 or v3"))),
        }
    }
    let serial = r.element(INTEGER, "serialNumber")?;
    if serial.is_empty() {
        return Err(err("serialNumber", Problem::Invalid("empty")));
    }
    r.element(SEQUENCE, "signature")?;
    r.element(SEQUENCE, "issuer")?;
    let validity = r.element(SEQUENCE, "validity")?;
    let subject = r.element(SEQUENCE, "subject")?;
    r.element(SEQUENCE, "subjectPublicKeyInfo")?;
    r.optional(ISSUER_UID, "issuerUniqueID")?;
    r.optional(SUBJECT_UID, "subjectUniqueID")?;
    let extensions = match r.optional(EXTENSIONS, "extensions")? {
        Some(e) => single(e, SEQUENCE, "extensions")?,
        None => &[],
    };
    r.finish("tbsCertificate")?;

    let mut v = Reader::new(validity);
    let not_before = time(&mut v, "notBefore")?;
    let not_after = time(&mut v, "notAfter")?;
    v.finish("validity")?;

    check_extensions(extensions)?;
    Ok(Certificate {
        serial,
        not_before,
        not_after,
        subject,
        extensions,
    })
}

/// The next Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE,
/// extnValue OCTET STRING } in a list: its OID's content and the extension.
fn next_extension<'a>(r: &mut Reader<'a>) -> Result<(&'a [u8], Extension<'a>), Error> {
    let ext = r.element(SEQUENCE, "extension")?;
    let mut e = Reader::new(ext);
    let id = e.element(OID, "extnID")?;
    check_oid(id, "extnID")?;
    let critical = match e.optional(BOOLEAN, "critical")? {
        None => false,
        Some([0x00]) => false,
        Some([0xff]) => true,
        Some(_) => return Err(err("critical", Problem::Invalid("not a DER BOOLEAN"))),
    };
    let value = e.element(OCTET_STRING, "extnValue")?;
    e.finish("extension")?;
    Ok((id, Extension { critical, value }))
}

/// Every extension well-formed, none twice (RFC 5280 section 4.2).
fn check_extensions(list: &[u8]) -> Result<(), Error> {
    let mut r = Reader::new(list);
    let mut seen: Vec<&[u8]> = Vec::new();
    while !r.is_empty() {
        let (id, _) = next_extension(&mut r)?;
        if seen.contains(&id) {
            return Err(err(
                "extensions",
                Problem::Invalid("an extension appears twice"),
            ));
        }
        seen.push(id);
    }
    Ok(())
}

impl<'a> Certificate<'a> {
    /// The extension with OID content bytes `oid`, if present.
    pub fn extension(&self, oid: &[u8]) -> Result<Option<Extension<'a>>, Error> {
        let mut r = Reader::new(self.extensions);
        while !r.is_empty() {
            let (id, ext) = next_extension(&mut r)?;
            if id == oid {
                return Ok(Some(ext));
            }
        }
        Ok(None)
    }

    /// The subjectAltName entries, in order; empty without the extension.
    pub fn subject_alt_names(&self) -> Result<Vec<GeneralName<'a>>, Error> {
        let Some(ext) = self.extension(OID_SAN)? else {
            return Ok(Vec::new());
        };
        let mut r = Reader::new(single(ext.value, SEQUENCE, "subjectAltName")?);
        let mut names = Vec::new();
        while !r.is_empty() {
            let (tag, value) = r.any("GeneralName")?;
            names.push(match tag {
                0x81 => GeneralName::Email(ia5(value, "rfc822Name")?),
                0x82 => GeneralName::Dns(ia5(value, "dNSName")?),
                0x86 => GeneralName::Uri(ia5(value, "uniformResourceIdentifier")?),
                0x87 => GeneralName::Ip(match value.len() {
                    4 => {
                        let mut a = [0u8; 4];
                        a.copy_from_slice(value);
                        IpAddr::V4(Ipv4Addr::from(a))
                    }
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(value);
                        IpAddr::V6(Ipv6Addr::from(a))
                    }
                    _ => return Err(err("iPAddress", Problem::Invalid("not 4 or 16 bytes"))),
                }),
                0xa0 | 0xa3 | 0xa4 | 0xa5 | 0x88 => GeneralName::Other(tag),
                _ => {
                    return Err(err(
                        "GeneralName",
                        Problem::Invalid("an unknown kind of name"),
                    ))
                }
            });
        }
        Ok(names)
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
        let Some(ext) = self.extension(OID_AKI)? else {
            return Ok(None);
        };
        // SEQUENCE { keyIdentifier [0] IMPLICIT OCTET STRING OPTIONAL,
        //   authorityCertIssuer [1] IMPLICIT GeneralNames OPTIONAL,
        //   authorityCertSerialNumber [2] IMPLICIT INTEGER OPTIONAL }
        let mut r = Reader::new(single(ext.value, SEQUENCE, "authorityKeyIdentifier")?);
        let key_id = r.optional(0x80, "keyIdentifier")?;
        r.optional(0xa1, "authorityCertIssuer")?;
        r.optional(0x82, "authorityCertSerialNumber")?;
        r.finish("authorityKeyIdentifier")?;
        Ok(key_id)
    }

    /// The subject as "CN=cams.example.org, O=Example": RDNs joined by ", ",
    /// attributes within one by " + ", unnamed types by dotted OID.
    pub fn subject(&self) -> Result<String, Error> {
        render_name(self.subject)
    }

    /// The subject's last commonName (the most specific), unescaped.
    pub fn common_name(&self) -> Result<Option<String>, Error> {
        let mut cn = None;
        let mut r = Reader::new(self.subject);
        while !r.is_empty() {
            let mut s = Reader::new(r.element(SET, "RelativeDistinguishedName")?);
            while !s.is_empty() {
                let mut a = Reader::new(s.element(SEQUENCE, "AttributeTypeAndValue")?);
                let oid = a.element(OID, "AttributeType")?;
                let (tag, value) = a.any("AttributeValue")?;
                a.finish("AttributeTypeAndValue")?;
                if oid == [0x55, 0x04, 0x03] {
                    cn = Some(attribute_text(tag, value)?);
                }
            }
        }
        Ok(cn)
    }
}

/// An IA5String's text (ASCII).
fn ia5<'a>(value: &'a [u8], field: &'static str) -> Result<&'a str, Error> {
    if !value.is_ascii() {
        return Err(err(field, Problem::Invalid("not ASCII")));
    }
    std::str::from_utf8(value).map_err(|_| err(field, Problem::Invalid("not ASCII")))
}

/// Renders a Name's content (a SEQUENCE OF RelativeDistinguishedName).
fn render_name(rdns: &[u8]) -> Result<String, Error> {
    let mut out = String::new();
    let mut r = Reader::new(rdns);
    while !r.is_empty() {
        let set = r.element(SET, "RelativeDistinguishedName")?;
        if set.is_empty() {
            return Err(err("RelativeDistinguishedName", Problem::Invalid("empty")));
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        let mut s = Reader::new(set);
        let mut first = true;
        while !s.is_empty() {
            let atv = s.element(SEQUENCE, "AttributeTypeAndValue")?;
            let mut a = Reader::new(atv);
            let oid = a.element(OID, "AttributeType")?;
            let (tag, value) = a.any("AttributeValue")?;
            a.finish("AttributeTypeAndValue")?;
            if !first {
                out.push_str(" + ");
            }
            first = false;
            match ATTRIBUTE_NAMES.iter().find(|(o, _)| *o == oid) {
                Some((_, name)) => out.push_str(name),
                None => out.push_str(&dotted_oid(oid, "AttributeType")?),
            }
            out.push('=');
            push_escaped(&mut out, &attribute_text(tag, value)?);
        }
    }
    Ok(out)
}

/// An attribute value as text; a value that is not a string as `#` and its hex (RFC 4514).
fn attribute_text(tag: u8, value: &[u8]) -> Result<String, Error> {
    const FIELD: &str = "AttributeValue";
    let bad = |why| err(FIELD, Problem::Invalid(why));
    match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING | NUMERIC_STRING | VISIBLE_STRING
        | T61_STRING => std::str::from_utf8(value)
            .map(str::to_owned)
            .map_err(|_| bad("not UTF-8")),
        BMP_STRING => {
            if value.len() % 2 != 0 {
                return Err(bad("a BMPString of odd length"));
            }
            let units = value
                .chunks_exact(2)
                .map(|c| c.iter().fold(0u16, |acc, &b| (acc << 8) | u16::from(b)));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map_err(|_| bad("not UTF-16"))
        }
        UNIVERSAL_STRING => {
            if value.len() % 4 != 0 {
                return Err(bad("a UniversalString whose length is not a multiple of 4"));
            }
            value
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
                        .ok_or(bad("not UTF-32"))
                })
                .collect()
        }
        _ => {
            let mut hex = format!("#{tag:02x}");
            push_length_hex(&mut hex, value.len());
            for b in value {
                hex.push_str(&format!("{b:02x}"));
            }
            Ok(hex)
        }
    }
}

/// Appends the DER length of `len` in hex, for [`attribute_text`]'s `#` form.
fn push_length_hex(out: &mut String, len: usize) {
    let bytes = len.to_be_bytes();
    let significant: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
    if len < 0x80 {
        out.push_str(&format!("{len:02x}"));
    } else {
        out.push_str(&format!("{:02x}", 0x80 | significant.len()));
        for b in significant {
            out.push_str(&format!("{b:02x}"));
        }
    }
}

/// Appends `text` with control characters escaped, so a name stays on one line.
fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// An OID's content must be non-empty sub-identifiers in minimal base-128.
fn check_oid(oid: &[u8], field: &'static str) -> Result<(), Error> {
    dotted_oid(oid, field).map(|_| ())
}

/// "2.5.4.3" for an OID's content bytes.
fn dotted_oid(oid: &[u8], field: &'static str) -> Result<String, Error> {
    let bad = |why| err(field, Problem::Invalid(why));
    if oid.is_empty() {
        return Err(bad("an empty OID"));
    }
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    let mut started = false;
    for &b in oid {
        if !started && b == 0x80 {
            return Err(bad("an OID sub-identifier with a leading zero"));
        }
        started = true;
        value = value
            .checked_mul(128)
            .map(|v| v | u64::from(b & 0x7f))
            .ok_or(bad("an OID sub-identifier too large"))?;
        if b & 0x80 == 0 {
            arcs.push(value);
            value = 0;
            started = false;
        }
    }
    if started {
        return Err(bad("an OID that ends inside a sub-identifier"));
    }
    let mut out = String::new();
    for (i, arc) in arcs.iter().enumerate() {
        if i == 0 {
            let (a, b) = match arc {
                0..=39 => (0, *arc),
                40..=79 => (1, arc - 40),
                _ => (2, arc - 80),
            };
            out.push_str(&format!("{a}.{b}"));
        } else {
            out.push_str(&format!(".{arc}"));
        }
    }
    Ok(out)
}

/// A Time ::= CHOICE { UTCTime, GeneralizedTime } as seconds since 1970, in
/// RFC 5280's forms: YYMMDDHHMMSSZ (YY >= 50 is 19YY) or YYYYMMDDHHMMSSZ.
fn time(r: &mut Reader<'_>, field: &'static str) -> Result<i64, Error> {
    let (tag, value) = r.any(field)?;
    let bad = |why| err(field, Problem::Invalid(why));
    let (year, rest) = match tag {
        UTC_TIME => {
            let (yy, rest) = value.split_at_checked(2).ok_or(bad("too short"))?;
            let yy = digits(yy).ok_or(bad("not digits"))?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, rest)
        }
        GENERALIZED_TIME => {
            let (yyyy, rest) = value.split_at_checked(4).ok_or(bad("too short"))?;
            (digits(yyyy).ok_or(bad("not digits"))?, rest)
        }
        _ => return Err(bad("neither UTCTime nor GeneralizedTime")),
    };
    let [mo0, mo1, d0, d1, h0, h1, mi0, mi1, s0, s1, b'Z'] = *rest else {
        return Err(bad("not in the form YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ"));
    };
    let two = |a, b| digits(&[a, b]).ok_or(bad("not digits"));
    let (month, day) = (two(mo0, mo1)?, two(d0, d1)?);
    let (hour, minute, second) = (two(h0, h1)?, two(mi0, mi1)?, two(s0, s1)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("no such time of day"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// The value of up to four ASCII digits.
fn digits(d: &[u8]) -> Option<i64> {
    d.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use rustls_pki_types::{pem::PemObject, CertificateDer};

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
             1.2.840.113549.1.9.1=me@example.org"
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
            assert_eq!(parse(&longer).unwrap_err().problem, Problem::Trailing(1));
            for i in 0..der.len() {
                for flip in [0xff, 0x80, 0x01, 0x20] {
                    let mut bad = der.clone();
                    bad[i] ^= flip;
                    let _ = read_all(&bad);
                }
            }
        }
    }

    /// A certificate made of `tbs` (the TBSCertificate content), for hand-made cases.
    fn wrap(tbs: &[u8]) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
            }
            v.extend(content);
            v
        }
        let mut cert = tlv(SEQUENCE, tbs);
        cert.extend(tlv(SEQUENCE, &[]));
        cert.extend(tlv(BIT_STRING, &[0]));
        tlv(SEQUENCE, &cert)
    }

    /// serial, signature, issuer, validity (2 UTCTimes), subject, SPKI.
    fn tbs(validity: &[u8], extensions: &[u8]) -> Vec<u8> {
        let mut t = vec![0x02, 0x01, 0x07, 0x30, 0x00, 0x30, 0x00];
        t.push(0x30);
        t.push(validity.len() as u8);
        t.extend(validity);
        t.extend([0x30, 0x00, 0x30, 0x00]);
        t.extend(extensions);
        t
    }

    const VALIDITY: &[u8] = b"\x17\x0d500101000000Z\x17\x0d491231235959Z";

    #[test]
    fn minimal_hand_made_certificate_reads() {
        let der = wrap(&tbs(VALIDITY, &[]));
        let c = parse(&der).unwrap();
        assert_eq!(c.serial, [7]);
        assert_eq!(c.not_before, -631_152_000); // 1950-01-01: YY 50 is 1950.
        assert_eq!(c.not_after, 2_524_607_999); // 2049-12-31T23:59:59.
        assert_eq!(c.subject().unwrap(), "");
        assert_eq!(c.subject_alt_names().unwrap(), []);
    }

    #[test]
    fn lengths_must_be_definite_short_and_minimal() {
        let good = wrap(&tbs(VALIDITY, &[]));
        let mut indefinite = good.clone();
        indefinite[1] = 0x80;
        let mut five = good.clone();
        five[1] = 0x85;
        for bad in [indefinite, five] {
            assert_eq!(parse(&bad).unwrap_err().problem, Problem::BadLength);
        }
        // 0x81 0x05 where 0x05 would do.
        let mut long = good.clone();
        let inner_len = good[1];
        long.splice(1..2, [0x81, inner_len]);
        assert_eq!(parse(&long).unwrap_err().problem, Problem::BadLength);
        // A high tag number where any tag may come (elsewhere it is simply the wrong tag).
        let mut high = Reader::new(&[0x1f, 0x81, 0x00, 0x00]);
        assert_eq!(high.any("t").unwrap_err().problem, Problem::HighTag);
        let e = parse(&good[..good.len() - 1]).unwrap_err();
        assert_eq!(e.to_string(), "Certificate: truncated");
    }

    #[test]
    fn times_follow_rfc_5280() {
        let t = |v: &[u8]| time(&mut Reader::new(v), "notAfter");
        assert_eq!(t(b"\x18\x0f20500101000000Z").unwrap(), 2_524_608_000);
        assert_eq!(t(b"\x18\x0f99991231235959Z").unwrap(), 253_402_300_799);
        assert_eq!(t(b"\x17\x0d000229000000Z").unwrap(), 951_782_400); // 2000 is leap.
        for (bad, why) in [
            (&b"\x17\x0d010229000000Z"[..], "no such date"),
            (b"\x17\x0d011301000000Z", "no such date"),
            (b"\x17\x0d010100000000Z", "no such date"),
            (b"\x17\x0d010101240000Z", "no such time of day"),
            (b"\x17\x0d010101005960Z", "no such time of day"),
            (
                b"\x17\x0b0101010000Z",
                "not in the form YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ",
            ),
            (
                b"\x17\x0d010101000000+",
                "not in the form YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ",
            ),
            (
                b"\x18\x1120500101000000.5Z",
                "not in the form YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ",
            ),
            (b"\x17\x0d0101010000-0Z", "not digits"),
            (b"\x17\x01Z", "too short"),
            (
                b"\x04\x0d010101000000Z",
                "neither UTCTime nor GeneralizedTime",
            ),
        ] {
            assert_eq!(
                t(bad).unwrap_err().problem,
                Problem::Invalid(why),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_render_like_x509_parser() {
        // { CN=a + O=b }, { serialNumber=é as a BMPString }, { CN=42 as an INTEGER }, { CN=x\n }.
        let rdn1: &[u8] = &[
            0x31, 0x14, //
            0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'a', //
            0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x13, 0x01, b'b',
        ];
        let rdn2: &[u8] = &[
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x05, 0x1e, 0x02, 0x00, 0xe9,
        ];
        let rdn3: &[u8] = &[
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x02, 0x01, 0x2a,
        ];
        let rdn4: &[u8] = &[
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x02, b'x', b'\n',
        ];
        let all = [rdn1, rdn2, rdn3, rdn4].concat();
        assert_eq!(
            render_name(&all).unwrap(),
            "CN=a + O=b, 2.5.4.5=é, CN=#02012a, CN=x\\n"
        );
        // An empty RDN, and an attribute with something after its value.
        assert!(render_name(&[0x31, 0x00]).is_err());
        let trailing: &[u8] = &[
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'a', 0x00,
        ];
        assert_eq!(
            render_name(trailing).unwrap_err().problem,
            Problem::Trailing(1)
        );
    }

    #[test]
    fn oids_are_minimal_base_128() {
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01], "t").unwrap(),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(dotted_oid(&[0x88, 0x37, 0x03], "t").unwrap(), "2.999.3");
        assert!(dotted_oid(&[], "t").is_err());
        assert!(dotted_oid(&[0x55, 0x80, 0x01], "t").is_err());
        assert!(dotted_oid(&[0x55, 0x86], "t").is_err());
        assert!(dotted_oid(&[0xff; 12], "t").is_err());
    }

    #[test]
    fn extensions_are_checked() {
        // SAN { dNSName "a" } and AKI { keyIdentifier 01 02 }.
        let san: &[u8] = &[
            0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x05, 0x30, 0x03, 0x82, 0x01, b'a',
        ];
        let aki: &[u8] = &[
            0x30, 0x0d, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x06, 0x30, 0x04, 0x80, 0x02, 0x01,
            0x02,
        ];
        let with = |exts: &[&[u8]]| {
            let list = exts.concat();
            let mut e = vec![0xa3, list.len() as u8 + 2, 0x30, list.len() as u8];
            e.extend(list);
            wrap(&tbs(VALIDITY, &e))
        };
        let c = with(&[san, aki]);
        let c = parse(&c).unwrap();
        assert_eq!(c.dns_names().unwrap(), ["a"]);
        assert_eq!(c.authority_key_id().unwrap(), Some(&[1u8, 2][..]));
        let twice = parse(&with(&[san, san])).unwrap_err();
        assert_eq!(twice.to_string(), "extensions: an extension appears twice");
        // critical written out as FALSE (not DER, but common) is read; 0x01 is no DER BOOLEAN.
        let critical = |b: u8| {
            let mut e = san.to_vec();
            e.splice(7..7, [0x01, 0x01, b]);
            e[1] += 3;
            parse(&with(&[&e])).map(|c| c.dns_names())
        };
        assert_eq!(critical(0x00).unwrap().unwrap(), ["a"]);
        assert_eq!(
            critical(0x01).unwrap_err().to_string(),
            "critical: not a DER BOOLEAN"
        );
        // A SAN with bytes after its GeneralNames; an IP address of 5 bytes.
        let trailing: &[u8] = &[
            0x30, 0x0d, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x06, 0x30, 0x03, 0x82, 0x01, b'a',
            0x00,
        ];
        let c = with(&[trailing]);
        let e = parse(&c).unwrap().subject_alt_names().unwrap_err();
        assert_eq!(e.problem, Problem::Trailing(1));
        let ip5: &[u8] = &[
            0x30, 0x10, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x09, 0x30, 0x07, 0x87, 0x05, 1, 2, 3,
            4, 5,
        ];
        let c = with(&[ip5]);
        let e = parse(&c).unwrap().subject_alt_names().unwrap_err();
        assert_eq!(e.to_string(), "iPAddress: not 4 or 16 bytes");
    }
}
