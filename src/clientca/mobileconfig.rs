//! iOS/iPadOS configuration profiles (`.mobileconfig`) carrying a client
//! certificate: one `com.apple.security.pkcs12` payload with the PKCS#12 as
//! data and no password, so that the device asks for it at installation.

use anyhow::Context as _;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use plist::{Dictionary, Value};

/// The media type that makes Safari offer to install a profile.
pub const CONTENT_TYPE: &str = "application/x-apple-aspen-config";

/// A random (version 4) UUID, upper case as Apple's tools write them.
fn uuid() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::clientca::hex(&b).to_uppercase();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The profile for `name`'s PKCS#12 file, as XML.
pub fn profile(name: &str, p12: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (outer, inner) = (uuid()?, uuid()?);
    let mut payload = Dictionary::new();
    let put = |d: &mut Dictionary, k: &str, v: Value| {
        d.insert(k.to_string(), v);
    };
    put(
        &mut payload,
        "PayloadType",
        "com.apple.security.pkcs12".into(),
    );
    put(&mut payload, "PayloadVersion", Value::Integer(1u64.into()));
    put(
        &mut payload,
        "PayloadIdentifier",
        format!("org.tcpfwd.client-cert.{inner}").into(),
    );
    put(&mut payload, "PayloadUUID", inner.into());
    put(
        &mut payload,
        "PayloadDisplayName",
        format!("{name} (tcpfwd client certificate)").into(),
    );
    put(
        &mut payload,
        "PayloadCertificateFileName",
        format!("{name}.p12").into(),
    );
    put(&mut payload, "PayloadContent", Value::Data(p12.to_vec()));

    let mut top = Dictionary::new();
    put(
        &mut top,
        "PayloadContent",
        Value::Array(vec![Value::Dictionary(payload)]),
    );
    put(
        &mut top,
        "PayloadDisplayName",
        format!("tcpfwd: {name}").into(),
    );
    put(
        &mut top,
        "PayloadDescription",
        format!("The client certificate '{name}' for the sites that tcpfwd guards. The password is asked for at installation.").into(),
    );
    put(&mut top, "PayloadOrganization", "tcpfwd".into());
    put(
        &mut top,
        "PayloadIdentifier",
        format!("org.tcpfwd.profile.{outer}").into(),
    );
    put(&mut top, "PayloadUUID", outer.into());
    put(&mut top, "PayloadType", "Configuration".into());
    put(&mut top, "PayloadVersion", Value::Integer(1u64.into()));
    let mut out = Vec::new();
    Value::Dictionary(top)
        .to_writer_xml(&mut out)
        .context("writing the .mobileconfig")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_carries_the_pkcs12_and_no_password() {
        let xml = profile("anna-phone", b"\x30\x82p12 bytes").unwrap();
        let v = Value::from_reader_xml(&xml[..]).unwrap();
        let top = v.as_dictionary().unwrap();
        assert_eq!(top["PayloadType"].as_string(), Some("Configuration"));
        let p = top["PayloadContent"].as_array().unwrap()[0]
            .as_dictionary()
            .unwrap();
        assert_eq!(
            p["PayloadType"].as_string(),
            Some("com.apple.security.pkcs12")
        );
        assert_eq!(
            p["PayloadContent"].as_data(),
            Some(&b"\x30\x82p12 bytes"[..])
        );
        assert!(!p.contains_key("Password"));
        assert_ne!(p["PayloadUUID"], top["PayloadUUID"]);
        assert_eq!(top["PayloadUUID"].as_string().unwrap().len(), 36);
    }
}
