//! tcpfwd's family CA: client certificates for a household's phones and
//! laptops (PKCS#12 files they can install), the list of what was issued,
//! and the CRL a running tcpfwd watches.
//!
//! Layout: `<state-dir>/family-ca/` (0700) holds `ca.pem`, `ca-key.pem`,
//! `crl.pem`, `issued.json` (all 0600, written atomically) and `lock`. The
//! private keys of the client certificates and their passwords are never
//! stored.
//!
//! [`download`] serves a new certificate once over a one-time LAN link (with
//! a QR code); [`mobileconfig`] wraps it in an iOS configuration profile.

pub mod download;
pub mod mobileconfig;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::acme::state::write_atomic;

/// The family CA's sub-directory of the state directory.
pub const DIR_NAME: &str = "family-ca";
/// The CA certificate (PEM).
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (PEM, PKCS#8).
pub const CA_KEY: &str = "ca-key.pem";
/// The CRL (PEM), re-signed at every revocation.
pub const CRL_FILE: &str = "crl.pem";
/// What was issued (JSON).
pub const ISSUED: &str = "issued.json";

/// How long a CRL says it is good for. tcpfwd does not enforce it (a CRL
/// is only re-signed when something is revoked), but other readers may.
const CRL_VALIDITY_DAYS: i64 = 3650;
/// How long the CA itself is valid.
const CA_VALIDITY_DAYS: i64 = 36500;
/// Not-before this far back, for phones whose clock is behind.
const BACKDATE: time::Duration = time::Duration::hours(1);
/// A certificate this close to its end is warned about (log, `STATUS=`, `list`).
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Whole days left until `not_after`, counting a started day: a certificate
/// made with `--days 10` shows 10 days, not 9, in the second after it was made.
fn days_left(not_after: i64, now: i64) -> i64 {
    (not_after - now + 86_399).div_euclid(86_400)
}

/// One issued certificate, as `issued.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedCert {
    /// The name given to `client-cert new` (also the subject CN).
    pub name: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity, seconds since 1970.
    pub not_before: i64,
    /// End of validity, seconds since 1970.
    pub not_after: i64,
    /// When it was revoked, seconds since 1970.
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

impl IssuedCert {
    /// "valid", "revoked" or "expired" at `now` (seconds since 1970).
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if now > self.not_after {
            "expired"
        } else {
            "valid"
        }
    }

    /// Whether it is valid at `now` but ends within [`EXPIRY_WARNING_DAYS`].
    pub fn expires_soon(&self, now: i64) -> bool {
        self.status(now) == "valid" && self.not_after - now <= EXPIRY_WARNING_DAYS * 86_400
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Issued {
    /// The number of the last CRL signed.
    crl_number: u64,
    certs: Vec<IssuedCert>,
}

/// The family CA, open and locked against a second `client-cert` command.
pub struct FamilyCa {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
    issued: Issued,
    /// The owner of the state directory, when it differs from ours and we are
    /// root: the files are handed to it (a service with `DynamicUser=`).
    owner: Option<(u32, u32)>,
    _lock: File,
}

/// A freshly issued certificate with its key, to be packed for the device.
pub struct NewCert {
    /// What `issued.json` now lists.
    pub info: IssuedCert,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// Its private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The name's earlier certificates revoked in the same step (`--replace`).
    pub replaced: Vec<IssuedCert>,
}

impl FamilyCa {
    /// Opens the CA in `dir` (`<state-dir>/family-ca`), creating it (an
    /// ECDSA P-256 CA and an empty CRL) if it does not exist yet.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<FamilyCa> {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| {
                format!(
                    "cannot create the state directory {}; create it or choose another with --state-dir",
                    parent.display()
                )
            })?;
        let owner = foreign_owner(parent)?;
        if !dir.exists() {
            DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Whatever made it, the CA's directory is private.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
        chown_to(dir, owner)?;
        let lock = lock(dir, owner)?;
        let key_path = dir.join(CA_KEY);
        if !key_path.exists() {
            let mut ca = create(dir, owner, lock)?;
            ca.write_crl()?;
            ca.save()?;
            return Ok(ca);
        }
        load(dir, owner, lock)
    }

    /// Opens an existing CA; the error says how to make one.
    pub fn open(dir: &Path) -> anyhow::Result<FamilyCa> {
        if !dir.join(CA_KEY).exists() {
            bail!(
                "there is no family CA in {} yet: `tcpfwd client-cert new NAME` creates it (give the same --state-dir as the service)",
                dir.display()
            );
        }
        FamilyCa::open_or_create(dir)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every certificate issued, oldest first.
    pub fn issued(&self) -> &[IssuedCert] {
        &self.issued.certs
    }

    /// Issues a client certificate for `name`, valid `days` from an hour ago.
    /// With `replace`, the name's unrevoked certificates are revoked in the
    /// same step (one CRL re-signed, then the list saved); without, a valid
    /// one is an error.
    pub fn issue(&mut self, name: &str, days: u32, replace: bool) -> anyhow::Result<NewCert> {
        check_name(name)?;
        let now = OffsetDateTime::now_utc();
        if let Some(c) = self
            .issued
            .certs
            .iter()
            .find(|c| c.name == name && c.status(now.unix_timestamp()) == "valid")
        {
            if !replace {
                bail!(
                    "'{name}' already has a valid certificate (serial {}); revoke it first (`tcpfwd client-cert revoke {name}`), give --replace to revoke it and issue the new one in one step, or choose another name",
                    c.serial
                );
            }
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the client key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .context("client certificate parameters")?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "tcpfwd family");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(i64::from(days));
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("reading the family CA certificate")?;
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the client certificate")?;
        let info = IssuedCert {
            name: name.to_owned(),
            serial: hex(&serial),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
            revoked_at: None,
        };
        let mut replaced = Vec::new();
        if replace {
            for c in self.issued.certs.iter_mut() {
                if c.name == name && c.revoked_at.is_none() {
                    c.revoked_at = Some(now.unix_timestamp());
                    replaced.push(c.clone());
                }
            }
        }
        self.issued.certs.push(info.clone());
        if !replaced.is_empty() {
            // As in `revoke`: the CRL first, so that a failure records nothing.
            self.write_crl()?;
        }
        self.save()?;
        Ok(NewCert {
            info,
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            replaced,
        })
    }

    /// Revokes every unrevoked certificate of `name` and re-signs the CRL;
    /// returns what was revoked.
    pub fn revoke(&mut self, name: &str) -> anyhow::Result<Vec<IssuedCert>> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut revoked = Vec::new();
        for c in self.issued.certs.iter_mut() {
            if c.name == name && c.revoked_at.is_none() {
                c.revoked_at = Some(now);
                revoked.push(c.clone());
            }
        }
        if revoked.is_empty() {
            let known = self.issued.certs.iter().any(|c| c.name == name);
            if known {
                bail!("'{name}' is already revoked");
            }
            bail!("no certificate named '{name}'; `tcpfwd client-cert list` shows the names");
        }
        // The CRL first: if it cannot be written, nothing is recorded as revoked.
        self.write_crl()?;
        self.save()?;
        Ok(revoked)
    }

    /// Signs a CRL listing every revoked certificate and replaces `crl.pem`.
    fn write_crl(&mut self) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc();
        self.issued.crl_number += 1;
        let mut revoked_certs = Vec::new();
        for c in &self.issued.certs {
            let Some(at) = c.revoked_at else { continue };
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(
                    &unhex(&c.serial).with_context(|| {
                        format!("{ISSUED}: the serial of '{}' is not hex", c.name)
                    })?,
                ),
                revocation_time: OffsetDateTime::from_unix_timestamp(at)
                    .context("revocation time out of range")?,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(CRL_VALIDITY_DAYS),
            crl_number: SerialNumber::from(self.issued.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("reading the family CA certificate")?;
        let crl = params.signed_by(&issuer).context("signing the CRL")?;
        let pem = crl.pem().context("encoding the CRL")?;
        self.write(CRL_FILE, pem.as_bytes())
    }

    fn save(&self) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(&self.issued).context("encoding issued.json")?;
        self.write(ISSUED, &json)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.dir, name, bytes)
            .with_context(|| format!("cannot write {}", self.dir.join(name).display()))?;
        chown_to(&self.dir.join(name), self.owner)
    }
}

/// The certificates of the family CA in `dir` that are valid now but end
/// within [`EXPIRY_WARNING_DAYS`], soonest first. Read without the lock (the
/// list is replaced atomically); no CA yet means none.
pub fn expiring(dir: &Path, now: i64) -> anyhow::Result<Vec<IssuedCert>> {
    let path = dir.join(ISSUED);
    let issued: Issued = match fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut soon: Vec<IssuedCert> = issued
        .certs
        .into_iter()
        .filter(|c| c.expires_soon(now))
        .collect();
    soon.sort_by_key(|c| c.not_after);
    Ok(soon)
}

/// Looks for family-CA certificates near their end in `dirs`; with `log`,
/// warns once per certificate. Returns the `STATUS=` text when there are
/// any ("1 client certificate expires within 30 days (anna-phone)").
pub fn expiry_warning(dirs: &[PathBuf], log: bool) -> Option<String> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut names = Vec::new();
    for dir in dirs {
        let soon = match expiring(dir, now) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot check the family CA's certificates for expiry: {e:#}");
                continue;
            }
        };
        for c in soon {
            if log {
                tracing::warn!(
                    name = %c.name,
                    serial = %c.serial,
                    expires = %date(c.not_after),
                    days_left = days_left(c.not_after, now),
                    "a client certificate from the family CA expires within {EXPIRY_WARNING_DAYS} days; issue the device a new one (`tcpfwd client-cert new` under another name), install it, then revoke this one"
                );
            }
            names.push(c.name);
        }
    }
    match names.len() {
        0 => None,
        1 => Some(format!(
            "1 client certificate expires within {EXPIRY_WARNING_DAYS} days ({})",
            names[0]
        )),
        n => Some(format!(
            "{n} client certificates expire within {EXPIRY_WARNING_DAYS} days ({})",
            names.join(", ")
        )),
    }
}

/// `t` (seconds since 1970) as a date, 2027-03-01.
fn date(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .map(|t| t.date().to_string())
        .unwrap_or_default()
}

/// Makes the CA (if missing) so that a server start can load it and its CRL.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    if dir.join(CA_KEY).exists() && dir.join(CRL_FILE).exists() {
        return Ok(());
    }
    let ca = FamilyCa::open_or_create(dir)?;
    tracing::info!(dir = %ca.dir().display(), "family CA created; issue client certificates with `tcpfwd client-cert new NAME`");
    Ok(())
}

fn create(dir: &Path, owner: Option<(u32, u32)>, lock: File) -> anyhow::Result<FamilyCa> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).context("CA certificate parameters")?;
    let host = crate::net::sys::hostname().unwrap_or_else(|| "tcpfwd".into());
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("tcpfwd family CA ({host})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let cert = params
        .self_signed(&key)
        .context("signing the family CA certificate")?;
    let ca = FamilyCa {
        dir: dir.to_path_buf(),
        cert_pem: cert.pem(),
        key,
        issued: Issued::default(),
        owner,
        _lock: lock,
    };
    // The key first: a CA certificate without its key would be a dead end.
    ca.write(CA_KEY, ca.key.serialize_pem().as_bytes())?;
    ca.write(CA_CERT, ca.cert_pem.as_bytes())?;
    Ok(ca)
}

fn load(dir: &Path, owner: Option<(u32, u32)>, lock: File) -> anyhow::Result<FamilyCa> {
    let read = |name: &str| {
        let p = dir.join(name);
        fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let key = KeyPair::from_pem(&read(CA_KEY)?)
        .with_context(|| format!("{}: not a PEM private key", dir.join(CA_KEY).display()))?;
    let cert_pem = read(CA_CERT)?;
    let issued = match fs::read(dir.join(ISSUED)) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is damaged", dir.join(ISSUED).display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Issued::default(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", dir.join(ISSUED).display()))
        }
    };
    let mut ca = FamilyCa {
        dir: dir.to_path_buf(),
        cert_pem,
        key,
        issued,
        owner,
        _lock: lock,
    };
    if !dir.join(CRL_FILE).exists() {
        ca.write_crl()?;
        ca.save()?;
    }
    Ok(ca)
}

/// Takes `dir/lock`, so that two `client-cert` commands do not overwrite
/// each other's CRL or list. The server never takes it.
fn lock(dir: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<File> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    chown_to(&path, owner)?;
    for _ in 0..50 {
        if crate::net::sys::try_lock_exclusive(&file)
            .with_context(|| format!("cannot lock {}", path.display()))?
        {
            return Ok(file);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "{} is held by another `tcpfwd client-cert` command; try again when it is done",
        path.display()
    )
}

/// The state directory's owner, if we are root and it belongs to someone
/// else (the service's user): the CA's files are then handed to that user,
/// so that the service can read them and nobody else can.
fn foreign_owner(state_dir: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    let meta =
        fs::metadata(state_dir).with_context(|| format!("cannot read {}", state_dir.display()))?;
    let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if me == 0 && meta.uid() != 0 {
        Ok(Some((meta.uid(), meta.gid())))
    } else {
        Ok(None)
    }
}

fn chown_to(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to uid {uid}", path.display()))?;
    }
    Ok(())
}

/// Names become file names and subject CNs: keep them plain.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!(
            "invalid name '{name}': use 1 to 64 letters, digits, '.', '-' or '_', like anna-phone"
        );
    }
    Ok(())
}

/// 16 random bytes, positive and minimally encoded as a DER INTEGER.
fn random_serial() -> anyhow::Result<[u8; 16]> {
    let mut s = [0u8; 16];
    SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    s[0] = (s[0] & 0x7f) | 0x10;
    Ok(s)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A password for a PKCS#12 file: 20 characters from an alphabet without
/// look-alikes (100 bits), in groups of five for typing on a phone.
pub fn password() -> anyhow::Result<String> {
    const ALPHABET: &[u8; 32] = b"abcdefghjkmnpqrstuvwxyz23456789A";
    let mut bytes = [0u8; 20];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    let mut out = String::with_capacity(23);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 5 == 0 {
            out.push('-');
        }
        out.push(char::from(ALPHABET[usize::from(b & 31)]));
    }
    Ok(out)
}

/// Which PKCS#12 protection to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum P12Format {
    /// Key and certificate under PBE-SHA1-3DES, SHA-1 MAC: what Android
    /// 12-13 and iOS/macOS up to 17/14 can open.
    Legacy,
    /// PBES2 (PBKDF2-SHA256, AES-256-CBC) and an HMAC-SHA256 MAC.
    Modern,
}

/// Packs a certificate and its key as PKCS#12 under `password` (never empty).
/// The CA is not included: a device that installed it would trust it for
/// web sites too.
pub fn pkcs12(
    name: &str,
    cert_der: &[u8],
    key_der: &[u8],
    password: &str,
    format: P12Format,
) -> anyhow::Result<Vec<u8>> {
    use p12_keystore::{
        Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey,
        PrivateKeyChain,
    };
    if password.is_empty() {
        bail!("a PKCS#12 password must not be empty (iOS and macOS treat empty ones differently)");
    }
    let cert = Certificate::from_der(cert_der).context("PKCS#12: reading the certificate")?;
    let key = PrivateKey::from_der(key_der).context("PKCS#12: reading the key")?;
    let local_key_id =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der);
    let chain = PrivateKeyChain::new(local_key_id.as_ref(), key, [cert]);
    let mut store = KeyStore::new();
    store.add_entry(name, KeyStoreEntry::PrivateKeyChain(chain));
    let writer = store.writer(password);
    let writer = match format {
        P12Format::Legacy => writer
            .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
            .encryption_iterations(2048)
            .mac_algorithm(MacAlgorithm::HmacSha1)
            .mac_iterations(2048),
        P12Format::Modern => writer
            .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
            .encryption_iterations(10_000)
            .mac_algorithm(MacAlgorithm::HmacSha256)
            .mac_iterations(10_000),
    };
    writer.write().context("PKCS#12: encoding")
}

/// What `client-cert new` and `serve` do besides NAME.p12.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery {
    /// Also NAME.mobileconfig (written by `new`, offered by `serve`).
    pub mobileconfig: bool,
    /// A one-time download link: where, and for how long.
    pub serve: Option<(crate::clientca::download::ServeAddr, std::time::Duration)>,
}

/// Writes a new private file (0600, never over an existing one).
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `tcpfwd client-cert new`: issues NAME's certificate, writes `NAME.p12`
/// (and with `delivery.mobileconfig` `NAME.mobileconfig`) into `out_dir`,
/// prints the password (once) and the install steps, and with
/// `delivery.serve` offers the file(s) as a one-time download link.
pub fn cmd_new(
    state_dir: &Path,
    name: &str,
    days: u32,
    format: P12Format,
    out_dir: &Path,
    delivery: Delivery,
    replace: bool,
) -> anyhow::Result<()> {
    check_name(name)?;
    let out = out_dir.join(format!("{name}.p12"));
    let profile_out = out_dir.join(format!("{name}.mobileconfig"));
    for f in [&out]
        .into_iter()
        .chain(delivery.mobileconfig.then_some(&profile_out))
    {
        if f.exists() {
            bail!(
                "{} exists already; move it away or give --out-dir",
                f.display()
            );
        }
    }
    // Bound before anything is issued, so that a taken port costs nothing.
    let listener = match delivery.serve {
        Some((at, _)) => Some(crate::clientca::download::Links::bind(at)?),
        None => None,
    };
    let mut ca = FamilyCa::open_or_create(&state_dir.join(DIR_NAME))?;
    let new = ca.issue(name, days, replace)?;
    let password = password()?;
    let p12 = pkcs12(name, &new.cert_der, &new.key_der, &password, format)?;
    // It holds a private key.
    write_new(&out, &p12)?;
    let profile = if delivery.mobileconfig {
        let xml = crate::clientca::mobileconfig::profile(name, &p12)?;
        write_new(&profile_out, &xml)?;
        Some(xml)
    } else {
        None
    };
    println!(
        "Issued a client certificate for '{name}' (serial {}, valid until {}).",
        new.info.serial,
        date(new.info.not_after)
    );
    println!(
        "Wrote {} ({} PKCS#12).",
        out.display(),
        match format {
            P12Format::Legacy => "legacy 3DES/SHA-1",
            P12Format::Modern => "modern AES-256",
        }
    );
    for c in &new.replaced {
        println!(
            "Revoked the previous certificate of '{name}' (serial {}): the CRL {} is re-signed, a running tcpfwd refuses it within a few seconds and closes the connections made with it.",
            c.serial,
            ca.dir().join(CRL_FILE).display()
        );
    }
    if profile.is_some() {
        println!(
            "Wrote {} (an iOS/iPadOS profile with the same certificate; it asks for the same password).",
            profile_out.display()
        );
    }
    if i64::from(days) <= EXPIRY_WARNING_DAYS {
        println!(
            "It is valid for {EXPIRY_WARNING_DAYS} days or less: a running tcpfwd warns about it from the start."
        );
    }
    println!();
    println!("  Password: {password}");
    println!();
    println!("The password is shown only now and is not stored anywhere: write it down");
    println!("for the installation, then delete {name}.p12 once it is installed.");
    println!("{INSTALL_STEPS}");
    if let (Some(listener), Some((_, valid))) = (listener, delivery.serve) {
        serve_files(name, listener, p12, profile, valid, out_dir)?;
    }
    Ok(())
}

/// `tcpfwd client-cert serve`: offers `out_dir/NAME.p12` (and a profile made
/// from it) as a one-time download link.
pub fn cmd_serve(name: &str, out_dir: &Path, delivery: Delivery) -> anyhow::Result<()> {
    check_name(name)?;
    let Some((at, valid)) = delivery.serve else {
        bail!("nowhere to serve: give a port");
    };
    let path = out_dir.join(format!("{name}.p12"));
    let p12 = fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; give --out-dir where `client-cert new` wrote it, or issue a new one",
            path.display()
        )
    })?;
    let profile = if delivery.mobileconfig {
        Some(crate::clientca::mobileconfig::profile(name, &p12)?)
    } else {
        None
    };
    let listener = crate::clientca::download::Links::bind(at)?;
    println!(
        "Serving {} (its password is the one `client-cert new` printed).",
        path.display()
    );
    serve_files(name, listener, p12, profile, valid, out_dir)
}

/// Serves the PKCS#12 (and the profile) until one is downloaded.
fn serve_files(
    name: &str,
    listener: std::net::TcpListener,
    p12: Vec<u8>,
    profile: Option<Vec<u8>>,
    valid: std::time::Duration,
    out_dir: &Path,
) -> anyhow::Result<()> {
    use crate::clientca::download::{Links, Offer};
    let mut offers = vec![Offer {
        file_name: format!("{name}.p12"),
        content_type: "application/x-pkcs12",
        body: p12.into(),
        label: "Android, desktops, or any device",
    }];
    if let Some(xml) = profile {
        offers.push(Offer {
            file_name: format!("{name}.mobileconfig"),
            content_type: crate::clientca::mobileconfig::CONTENT_TYPE,
            body: xml.into(),
            label: "iPhone and iPad (open in Safari)",
        });
    }
    let links = Links::new(listener, offers)?;
    links.print(valid)?;
    match links.serve(valid) {
        Ok(d) => {
            println!("{} was downloaded by {}; the link is closed.", d.file_name, d.peer);
            Ok(())
        }
        Err(e) => bail!(
            "{e:#}; {name}.p12 is still in {}: `tcpfwd client-cert serve {name} PORT` makes a new link",
            out_dir.display()
        ),
    }
}

/// Per-platform steps, printed after `client-cert new` (and in the README).
pub const INSTALL_STEPS: &str = "
Install it on the device (send the .p12 by a private way: AirDrop, a USB cable,
a message to yourself, or --serve PORT: a one-time link on the home network):
  iPhone/iPad: open the file (or the .mobileconfig of --mobileconfig) in
    Safari or from Files, then Settings > General >
    VPN & Device Management (Profile Downloaded) > Install, and type the
    password. Only Safari uses it: Chrome and Firefox on iOS cannot present
    installed certificates.
  Android: Settings > Security (and privacy) > More security settings >
    Encryption & credentials > Install a certificate > VPN & app user
    certificate, pick the file, type the password. Chrome uses it; when a
    page asks, choose the certificate.
  Firefox (desktop or Android): its own store: Settings > Privacy & Security >
    Certificates > View Certificates > Your Certificates > Import.
  Chrome and Edge on Windows, macOS or Linux, and Safari on macOS: the
    system's store: double-click the file (macOS Keychain Access, Windows
    certificate import) or, on Linux, Chrome's Settings > Privacy and security
    > Security > Manage certificates > Your certificates > Import.
The browser asks which certificate to send the first time it visits the page.";

/// `tcpfwd client-cert list`.
pub fn cmd_list(state_dir: &Path) -> anyhow::Result<()> {
    let ca = FamilyCa::open(&state_dir.join(DIR_NAME))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let width = ca
        .issued()
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:width$}  {:32}  {:10}  STATUS",
        "NAME", "SERIAL", "EXPIRES"
    );
    for c in ca.issued() {
        let status = if c.expires_soon(now) {
            format!("valid, expires in {} days", days_left(c.not_after, now))
        } else {
            c.status(now).to_string()
        };
        println!(
            "{:width$}  {:32}  {:10}  {status}",
            c.name,
            c.serial,
            date(c.not_after),
        );
    }
    Ok(())
}

/// `tcpfwd client-cert revoke`.
pub fn cmd_revoke(state_dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut ca = FamilyCa::open(&state_dir.join(DIR_NAME))?;
    for c in ca.revoke(name)? {
        println!("Revoked '{}' (serial {}).", c.name, c.serial);
    }
    println!(
        "The CRL {} is re-signed: a running tcpfwd refuses the certificate within a few seconds (or at once on SIGHUP) and closes the connections made with it.",
        ca.dir().join(CRL_FILE).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcpfwd-ca-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn issue_list_revoke_and_the_crl() {
        let root = tempdir("flow");
        let dir = root.join(DIR_NAME);
        let mut ca = FamilyCa::open_or_create(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert!(dir.join(CRL_FILE).exists());
        let a = ca.issue("anna-phone", 30, false).unwrap();
        assert!(a.replaced.is_empty());
        assert!(
            ca.issue("anna-phone", 30, false).is_err(),
            "one valid cert per name"
        );
        assert!(ca.issue("../x", 30, false).is_err());
        let parsed = crate::tls::x509::parse(&a.cert_der).unwrap();
        assert_eq!(hex(parsed.serial), a.info.serial);
        assert!(parsed.subject().unwrap().contains("CN=anna-phone"));
        assert!(a.info.not_before < OffsetDateTime::now_utc().unix_timestamp() - 3000);
        drop(ca);
        let mut ca = FamilyCa::open(&dir).unwrap();
        assert_eq!(ca.issued().len(), 1);
        let crl_before = fs::read(dir.join(CRL_FILE)).unwrap();
        let r = ca.revoke("anna-phone").unwrap();
        assert_eq!(r[0].serial, a.info.serial);
        assert!(ca.revoke("anna-phone").is_err());
        assert!(ca.revoke("nobody").is_err());
        assert_ne!(fs::read(dir.join(CRL_FILE)).unwrap(), crl_before);
        assert_eq!(ca.issued()[0].status(0), "revoked");
        // A new one under the same name after the revocation.
        let b = ca.issue("anna-phone", 1, false).unwrap();
        // Replaced: the old one revoked and in the re-signed CRL, in one step.
        let crl_before = fs::read(dir.join(CRL_FILE)).unwrap();
        let c = ca.issue("anna-phone", 1, true).unwrap();
        assert_eq!(c.replaced.len(), 1);
        assert_eq!(c.replaced[0].serial, b.info.serial);
        assert_ne!(fs::read(dir.join(CRL_FILE)).unwrap(), crl_before);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let status: Vec<&str> = ca.issued().iter().map(|i| i.status(now)).collect();
        assert_eq!(status, ["revoked", "revoked", "valid"]);
        let p12 = pkcs12(
            "anna-phone",
            &a.cert_der,
            &a.key_der,
            "pw",
            P12Format::Legacy,
        )
        .unwrap();
        assert!(p12.len() > 200);
        assert!(pkcs12("x", &a.cert_der, &a.key_der, "", P12Format::Modern).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn passwords_are_grouped_and_differ() {
        let a = password().unwrap();
        assert_eq!(a.len(), 23);
        assert_eq!(a.matches('-').count(), 3);
        assert_ne!(a, password().unwrap());
    }
}
