//! The CA's directory and tcpfwd's account there: fetched, checked, stored,
//! restored without a second fetch.

use std::time::SystemTime;

use anyhow::{anyhow, bail, Context as _};
use http::{Method, Request};
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, ExternalAccountKey, HttpClient as _, NewAccount,
};

use super::{is_bad_nonce, Manager, ACCOUNT_FILE, BAD_NONCE_RETRIES};

/// What the directory says beyond what instant-acme keeps.
#[derive(Debug, Clone)]
pub(super) struct DirectoryInfo {
    pub(super) terms_of_service: Option<String>,
    /// The `renewalInfo` URL (ARI), if the CA offers it.
    pub(super) renewal_info: Option<String>,
    /// The names in `meta.profiles`; `None` if the CA has no profiles.
    pub(super) profiles: Option<Vec<String>>,
    pub(super) fetched: SystemTime,
    /// The whole document, from which the account is restored (so that
    /// instant-acme does not fetch the directory a second time).
    pub(super) document: serde_json::Value,
}

/// Stored account credentials with the directory document already fetched in
/// place of its URL, so that instant-acme restores the account without
/// fetching the directory again (as for credentials of its versions before
/// 0.4, which held the directory's URLs).
pub(super) fn with_directory(
    stored: &[u8],
    directory: &serde_json::Value,
) -> Result<AccountCredentials, String> {
    let mut creds: serde_json::Value = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
    let fields = creds.as_object_mut().ok_or("not a JSON object")?;
    fields.remove("directory");
    fields.insert("urls".into(), directory.clone());
    serde_json::from_value(creds).map_err(|e| format!("with the directory: {e}"))
}

impl Manager {
    /// A plain GET to the CA: status, headers, body.
    pub(super) async fn get(
        &self,
        url: &str,
    ) -> anyhow::Result<(http::StatusCode, http::HeaderMap, bytes::Bytes)> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(
                http::header::USER_AGENT,
                concat!("tcpfwd/", env!("CARGO_PKG_VERSION")),
            )
            .body(BodyWrapper::default())
            .with_context(|| format!("invalid URL {url}"))?;
        let rsp = self
            .shared
            .http
            .request(req)
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let (status, headers, mut body) = (rsp.parts.status, rsp.parts.headers, rsp.body);
        let body = body
            .into_bytes()
            .await
            .map_err(|e| anyhow!("reading {url}: {e}"))?;
        Ok((status, headers, body))
    }

    /// The directory, fetched afresh for each attempt and when a day old:
    /// checks it is one, logs the terms of service when they change.
    pub(super) async fn directory(&mut self) -> anyhow::Result<DirectoryInfo> {
        if let Some(d) = &self.directory {
            return Ok(d.clone());
        }
        let url = self.shared.cfg.directory.clone();
        let (status, _, body) = self
            .get(&url)
            .await
            .with_context(|| format!("cannot reach the ACME directory {url}"))?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            bail!(
                "the ACME directory {url} answered {status}: {}",
                text.chars().take(400).collect::<String>()
            );
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            anyhow!("{url} is not an ACME directory (not JSON: {e}); check --acme-directory")
        })?;
        for key in ["newNonce", "newAccount", "newOrder"] {
            if !doc[key].is_string() {
                bail!("{url} is not an ACME directory (no {key}); check --acme-directory");
            }
        }
        let info = DirectoryInfo {
            terms_of_service: doc["meta"]["termsOfService"].as_str().map(str::to_owned),
            renewal_info: doc["renewalInfo"].as_str().map(str::to_owned),
            profiles: doc["meta"]["profiles"]
                .as_object()
                .map(|m| m.keys().cloned().collect()),
            fetched: SystemTime::now(),
            document: doc,
        };
        let changed = self
            .logged_directory
            .as_ref()
            .is_none_or(|(tos, ari)| *tos != info.terms_of_service || *ari != info.renewal_info);
        if changed {
            tracing::info!(
                directory = %url,
                terms_of_service = info.terms_of_service.as_deref().unwrap_or("(none given)"),
                renewal_info = info.renewal_info.is_some(),
                "using ACME CA; its terms of service apply to the account tcpfwd uses (agreed by passing --acme-domain or --acme-ip)"
            );
            self.logged_directory =
                Some((info.terms_of_service.clone(), info.renewal_info.clone()));
        }
        self.directory = Some(info.clone());
        Ok(info)
    }

    /// The account: cached, else loaded from the state directory, else created.
    pub(super) async fn account(&mut self) -> anyhow::Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let directory = self.directory().await?;
        let path = self.shared.state.path(ACCOUNT_FILE);
        let stored = self
            .shared
            .state
            .read(ACCOUNT_FILE)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(bytes) = stored {
            let parsed =
                serde_json::from_slice::<AccountCredentials>(&bytes).map_err(|e| e.to_string());
            let loaded = match parsed {
                Ok(_) => {
                    let creds = with_directory(&bytes, &directory.document).map_err(|e| {
                        anyhow!(
                            "cannot restore the ACME account from {}: {e}",
                            path.display()
                        )
                    })?;
                    match instant_acme::Account::builder_with_http(self.shared.http.boxed())
                        .from_credentials(creds)
                        .await
                    {
                        Ok(a) => Ok(a),
                        Err(instant_acme::Error::KeyRejected | instant_acme::Error::Crypto) => {
                            Err("its key is not a usable ECDSA P-256 key".to_string())
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "cannot restore the ACME account at {}",
                                self.shared.cfg.directory
                            )))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match loaded {
                Ok(a) => {
                    tracing::info!(account = a.id(), file = %path.display(), "using the stored ACME account");
                    self.account = Some(a.clone());
                    return Ok(a);
                }
                Err(why) => {
                    let aside = self
                        .shared
                        .state
                        .move_aside(ACCOUNT_FILE, "corrupt")
                        .with_context(|| format!("cannot move {} aside", path.display()))?;
                    tracing::warn!(
                        file = %path.display(),
                        moved_to = %aside.display(),
                        problem = %why,
                        "the stored ACME account is corrupt; moved it aside and creating a new account"
                    );
                }
            }
        }
        self.create_account().await
    }

    pub(super) async fn create_account(&mut self) -> anyhow::Result<Account> {
        let cfg = &self.shared.cfg;
        let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
        let eab = cfg
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key.0));
        let new_account = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, creds) = nonce_retry!(
            "new account",
            instant_acme::Account::builder_with_http(self.shared.http.boxed())
                .create(&new_account, cfg.directory.clone(), eab.as_ref())
                .await
        )
        .with_context(|| format!("cannot create an ACME account at {}", cfg.directory))?;
        let json = serde_json::to_vec_pretty(&creds).context("serializing the account")?;
        let path = self.shared.state.path(ACCOUNT_FILE);
        self.shared
            .state
            .write_blocking(ACCOUNT_FILE, json)
            .await
            .with_context(|| format!("cannot save the new ACME account to {}", path.display()))?;
        tracing::info!(
            account = account.id(),
            contact = ?contact,
            file = %path.display(),
            "created an ACME account"
        );
        self.account = Some(account.clone());
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_account_is_restored_with_the_fetched_directory() {
        let stored = br#"{"id":"https://ca.test/acct/1","key_pkcs8":"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJVWC_QzOTCS5vtsJp2IG-UDc8cdDfeoKtxSZxaznM-mhRANCAAQenCPoGgPFTdPJ7VLLKt56RxPlYT1wNXnHc54PEyBg3LxKaH0-sJkX0mL8LyPEdsfL_Oz4TxHkWLJGrXVtNhfH","directory":"https://ca.test/dir"}"#;
        let doc = serde_json::json!({
            "newNonce": "https://ca.test/nonce",
            "newAccount": "https://ca.test/acct",
            "newOrder": "https://ca.test/order",
            "renewalInfo": "https://ca.test/ari",
            "meta": { "termsOfService": "https://ca.test/tos", "profiles": { "classic": "90 days" } }
        });
        let creds = with_directory(stored, &doc).unwrap();
        // instant-acme takes the URLs from here and fetches nothing.
        let back = serde_json::to_value(&creds).unwrap();
        assert_eq!(back["urls"]["newOrder"], "https://ca.test/order");
        assert_eq!(back["urls"]["meta"]["profiles"]["classic"], "90 days");
        assert!(back["directory"].is_null(), "{back}");
        assert!(with_directory(b"[]", &doc).is_err());
    }
}
