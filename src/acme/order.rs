//! One order, start to finish: identifiers, the TLS-ALPN-01 challenge
//! certificates, finalize, and storing what the CA issued before reading it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use instant_acme::{
    AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

use super::schedule::{fmt_duration, fmt_time};
use super::stored::{ari_identifier, parse_pair};
use super::{
    error_chain, ip, is_bad_nonce, Manager, ACCOUNT_FILE, BAD_NONCE_RETRIES, CERT_FILE,
    ISSUED_FILE, KEY_FILE, PAIR_FILE,
};
use crate::config::AcmeConfig;
use crate::tls::TlsRouter;

/// Whether IP addresses are asked of Let's Encrypt without its shortlived
/// profile, the only one on which it issues them.
pub(super) fn ip_needs_shortlived(cfg: &AcmeConfig) -> bool {
    let lets_encrypt = [
        crate::config::LETS_ENCRYPT,
        crate::config::LETS_ENCRYPT_STAGING,
    ];
    !cfg.ips.is_empty()
        && cfg.profile.as_deref() != Some("shortlived")
        && lets_encrypt.contains(&cfg.directory.as_str())
}

/// Every identifier of the configuration, DNS names then IP addresses.
pub(super) fn identifiers(cfg: &AcmeConfig) -> Vec<Identifier> {
    let names = cfg.domains.iter().cloned().map(Identifier::Dns);
    names
        .chain(cfg.ips.iter().copied().map(Identifier::Ip))
        .collect()
}

/// The identifiers as text, as a hold and the log name them.
pub(super) fn identifier_names(cfg: &AcmeConfig) -> Vec<String> {
    let ips = cfg.ips.iter().map(|ip| ip.to_string());
    cfg.domains.iter().cloned().chain(ips).collect()
}

/// Makes the TLS-ALPN-01 certificate for `name`: self-signed, with the critical
/// acmeIdentifier extension holding SHA-256 of the key authorization (RFC 8737).
pub(super) fn challenge_cert(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .with_context(|| format!("challenge certificate for {name}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().context("challenge key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the challenge certificate")?;
    // Not CertifiedKey::from_der: its consistency check parses the certificate
    // with webpki, which rejects the critical acmeIdentifier extension.
    let signing_key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(|e| anyhow!("loading the challenge key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

/// Removes the challenge certificates when an attempt ends, however it ends.
pub(super) struct Challenges {
    router: Arc<TlsRouter>,
    names: Vec<String>,
}

impl Drop for Challenges {
    fn drop(&mut self) {
        for n in &self.names {
            self.router.remove_challenge(n);
        }
    }
}

/// The CA could not validate the names: worth a slower retry, since CAs
/// limit failed validations (Let's Encrypt: 5 per name per hour).
#[derive(Debug)]
pub(super) struct ValidationFailed(String);

impl std::fmt::Display for ValidationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValidationFailed {}

/// Whether the CA answered and said no (a problem document other than
/// badNonce, or a failed validation), as opposed to not answering at all.
pub(super) fn refused_by_ca(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ValidationFailed>()
            || matches!(
                c.downcast_ref::<instant_acme::Error>(),
                Some(instant_acme::Error::Api(p))
                    if !p.r#type.as_deref().unwrap_or("").ends_with(":badNonce")
            )
    })
}

/// Whether an ACME error is this problem type (`urn:ietf:params:acme:error:<kind>`).
pub(super) fn is_problem(e: &anyhow::Error, kind: &str) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<instant_acme::Error>()
            .and_then(|e| match e {
                instant_acme::Error::Api(p) => p.r#type.as_deref(),
                _ => None,
            })
            .or_else(|| {
                c.downcast_ref::<instant_acme::Problem>()
                    .and_then(|p| p.r#type.as_deref())
            })
            .is_some_and(|t| t.ends_with(&format!(":{kind}")))
    })
}

/// The configured profile is not among those the directory lists.
#[derive(Debug)]
pub(super) struct ProfileNotOffered {
    profile: String,
    offered: Option<Vec<String>>,
}

impl ProfileNotOffered {
    pub(super) fn offered(&self) -> String {
        match &self.offered {
            Some(p) if !p.is_empty() => p.join(", "),
            _ => "none: it does not support profiles".into(),
        }
    }
}

impl std::fmt::Display for ProfileNotOffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the CA does not offer the ACME profile '{}' (it offers {}); check --acme-profile",
            self.profile,
            self.offered()
        )
    }
}

impl std::error::Error for ProfileNotOffered {}

/// A local problem with what the CA issued: never a reason to order again soon.
#[derive(Debug)]
pub(super) struct UnusableIssued(String);

impl std::fmt::Display for UnusableIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnusableIssued {}

impl Manager {
    /// One order, start to finish; on success the new certificate is served and stored.
    pub(super) async fn order(&mut self, reason: &str) -> anyhow::Result<()> {
        let dir = self.directory().await?;
        let cfg = self.shared.cfg.clone();
        // Checked before the account and the order: a profile the CA does not
        // list would only be refused.
        if let Some(p) = &cfg.profile {
            if !dir.profiles.as_ref().is_some_and(|l| l.contains(p)) {
                return Err(ProfileNotOffered {
                    profile: p.clone(),
                    offered: dir.profiles.clone(),
                }
                .into());
            }
        }
        let account = self.account().await?;
        let ids = identifiers(&cfg);
        let current = self.shared.current.borrow().clone();
        let replaces = match (&current, &dir.renewal_info) {
            (Some(cur), Some(_)) => ari_identifier(&cur.leaf).ok(),
            _ => None,
        };
        let renewal = current.is_some();
        tracing::info!(
            names = ?identifier_names(&cfg),
            directory = %cfg.directory,
            profile = cfg.profile.as_deref(),
            reason,
            "ordering a certificate"
        );
        // Every order, the plain one after a refused replacement too, asks
        // for the profile: a renewal must not fall back to the CA's default.
        let new_order = |replaces: Option<CertificateIdentifier<'static>>| {
            let mut o = NewOrder::new(&ids);
            if let Some(p) = cfg.profile.as_deref() {
                o = o.profile(p);
            }
            if let Some(r) = replaces {
                o = o.replaces(r);
            }
            o
        };
        let first = nonce_retry!(
            "new order",
            account.new_order(&new_order(replaces.clone())).await
        );
        let mut order = match first {
            Err(instant_acme::Error::Api(p)) if replaces.is_some() && p.status != Some(429) => {
                tracing::debug!(problem = %p, "the CA refused the order as a replacement; ordering plainly");
                nonce_retry!("new order", account.new_order(&new_order(None)).await)
            }
            other => other,
        }
        .map_err(anyhow::Error::new);
        if let Err(e) = &order {
            if is_problem(e, "accountDoesNotExist") {
                let aside = self
                    .shared
                    .state
                    .move_aside_blocking(ACCOUNT_FILE, "unknown-to-ca")
                    .await?;
                tracing::warn!(
                    moved_to = %aside.display(),
                    "the CA does not know the stored ACME account; moved it aside and creating a new one"
                );
                self.account = None;
                let account = self.account().await?;
                order = nonce_retry!("new order", account.new_order(&new_order(None)).await)
                    .map_err(anyhow::Error::new);
            }
        }
        let mut order = order.context("the CA refused the new order")?;

        let mut challenges = Challenges {
            router: self.router.clone(),
            names: Vec::new(),
        };
        let provider = self.shared.provider.clone();
        // An authorization whose fetch was refused for its nonce is fetched
        // again on the next pass; those answered already are skipped.
        let mut answered: Vec<String> = Vec::new();
        for pass in 0..=BAD_NONCE_RETRIES {
            let mut again = false;
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = match authz {
                    Err(e) if pass < BAD_NONCE_RETRIES && is_bad_nonce(&e) => {
                        again = true;
                        continue;
                    }
                    other => other.context("fetching an authorization")?,
                };
                let ident = authz.identifier();
                let name = ident.to_string();
                // An IP address is validated under its reverse-DNS name (RFC 8738 section 6).
                let sni = match ident.identifier {
                    Identifier::Ip(addr) => ip::reverse_dns_name(*addr),
                    _ => name.clone(),
                };
                if answered.contains(&name) {
                    continue;
                }
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => bail!("the CA reports the authorization for {name} as {other:?}"),
                }
                let offered: Vec<String> = authz
                    .challenges
                    .iter()
                    .map(|c| format!("{:?}", c.r#type))
                    .collect();
                let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| {
                    anyhow!(
                        "the CA offers no tls-alpn-01 challenge for {name} (it offers {}); tcpfwd answers only tls-alpn-01",
                        offered.join(", ")
                    )
                })?;
                let digest = challenge.key_authorization().digest();
                let cert = challenge_cert(&name, digest.as_ref(), &provider)?;
                self.router.add_challenge(&sni, cert, provider.clone())?;
                challenges.names.push(sni.clone());
                tracing::info!(name = %name, server_name = %sni, "answering the tls-alpn-01 challenge");
                nonce_retry!("challenge ready", challenge.set_ready().await)
                    .with_context(|| format!("telling the CA the challenge for {name} is ready"))?;
                answered.push(name);
            }
            if !again {
                break;
            }
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(Duration::from_secs(180));
        let ready = nonce_retry!("order poll", order.poll_ready(&policy).await);
        if !matches!(ready, Ok(OrderStatus::Ready)) {
            let mut why = Vec::new();
            let mut authzs = order.authorizations();
            while let Some(Ok(mut authz)) = authzs.next().await {
                if let Ok(st) = authz.refresh().await {
                    for c in &st.challenges {
                        if let Some(err) = &c.error {
                            why.push(format!("{}: {err}", st.identifier()));
                        }
                    }
                }
            }
            let status = match ready {
                Ok(s) => format!("{s:?}"),
                Err(e) => error_chain(&e),
            };
            return Err(ValidationFailed(format!(
                "the CA did not validate the names (order {status}{}{}); check that DNS for each name points here and that port 443 reaches tcpfwd",
                if why.is_empty() { "" } else { "; " },
                why.join("; ")
            ))
            .into());
        }
        drop(challenges);

        let key_pem =
            nonce_retry!("finalize", order.finalize().await).context("finalizing the order")?;
        let chain_pem = nonce_retry!("certificate", order.poll_certificate(&policy).await)
            .context("downloading the certificate")?;
        // Stored before it is read: whatever goes wrong below is ours, and
        // the CA's certificate must not be lost (nor ordered again) for it.
        let mut issued = chain_pem.into_bytes();
        if !issued.ends_with(b"\n") {
            issued.push(b'\n');
        }
        issued.extend_from_slice(key_pem.as_bytes());
        let state = &self.shared.state;
        let stored = state.write_blocking(ISSUED_FILE, issued.clone()).await;
        if let Err(e) = &stored {
            tracing::error!(
                file = %state.path(ISSUED_FILE).display(),
                "cannot store the certificate the CA issued ({e}); serving it if it is usable, but a restart will order another"
            );
        }
        let (ck, info) = match parse_pair(&issued, &provider) {
            Ok(pair) => pair,
            Err(why) => {
                let kept = match stored {
                    Ok(()) => match state.move_aside_blocking(ISSUED_FILE, "unusable").await {
                        Ok(p) => format!("; what the CA sent is kept in {}", p.display()),
                        Err(e) => format!("; cannot move {ISSUED_FILE} aside: {e}"),
                    },
                    Err(_) => String::new(),
                };
                return Err(UnusableIssued(format!(
                    "the certificate the CA issued cannot be used: {why}{kept}"
                ))
                .into());
            }
        };
        self.resolver.set(ck);
        self.shared.current.send_replace(Some(info.clone()));
        (self.on_status)(None);
        if stored.is_ok() {
            if let Err(e) = state
                .promote_blocking(ISSUED_FILE, PAIR_FILE, &[CERT_FILE, KEY_FILE])
                .await
            {
                tracing::error!(
                    dir = %state.path("").display(),
                    "cannot store the new certificate as {PAIR_FILE} ({e}); serving it, and it is kept in {ISSUED_FILE} for the next start"
                );
            }
        }
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        tracing::info!(
            names = ?info.names,
            ips = ?info.ips,
            expires = %fmt_time(info.not_after),
            lifetime = %fmt_duration(lifetime),
            sha256 = %info.sha256,
            cert = %state.path(PAIR_FILE).display(),
            "{}",
            if renewal {
                "certificate renewed; new connections get it, open ones keep theirs"
            } else {
                "certificate issued; new connections get it"
            }
        );
        self.ari_for = Some(info.sha256.clone());
        self.ari_choice = None;
        self.ari_next_check = UNIX_EPOCH;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::CertInfo;
    use crate::tls::{self, x509};

    #[test]
    fn ip_addresses_at_lets_encrypt_want_the_shortlived_profile() {
        let mut cfg = AcmeConfig {
            domains: vec!["a.example.org".into()],
            ips: vec![],
            profile: None,
            contact: None,
            directory: crate::config::LETS_ENCRYPT.into(),
            ca_root: None,
            eab: None,
            state_dir: "/tmp/x".into(),
        };
        assert!(!ip_needs_shortlived(&cfg));
        cfg.ips = vec!["203.0.113.7".parse().unwrap()];
        assert!(ip_needs_shortlived(&cfg));
        cfg.profile = Some("classic".into());
        assert!(ip_needs_shortlived(&cfg));
        cfg.profile = Some("shortlived".into());
        assert!(!ip_needs_shortlived(&cfg));
        cfg.profile = None;
        cfg.directory = "https://ca.example/dir".into();
        assert!(!ip_needs_shortlived(&cfg));
        assert_eq!(identifier_names(&cfg), ["a.example.org", "203.0.113.7"]);
    }

    #[test]
    fn challenge_certificate_carries_the_acme_identifier() {
        let p = tls::provider(false);
        let ck = challenge_cert("cams.example.org", &[7u8; 32], &p).unwrap();
        let leaf = ck.end_entity_cert().unwrap();
        let cert = x509::parse(leaf.as_ref()).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31.
        let ext = cert
            .extension(&[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f])
            .unwrap()
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &[7u8; 32]);
        let info = CertInfo::from_leaf(leaf).unwrap();
        assert_eq!(info.names, ["cams.example.org"]);
    }
}
