//! The Encedo login at start: the device key from the token, the users' public keys (given,
//! or derived from their passphrase files as the appliance's clients derive them).

use std::sync::Arc;

use crate::api::encedo::LoginService;
use crate::auth::encedo::{default_eid, passphrase_public_key, EncedoLogin, LoginUser};
use crate::config::{Config, UserKey};
use crate::hsm::{Hsm, DEVICE_KEY_LABEL};
use crate::keys::Reserved;
use crate::secret;

use super::Fatal;

/// The login of `config`, or `None` when no `[[encedo.users]]` are configured (the
/// endpoints then answer 404 `login_disabled`, and the token gets no device key).
pub(super) fn service(
    config: &Config,
    hsm: &Hsm,
    found: &Reserved,
) -> Result<Option<Arc<LoginService>>, Fatal> {
    let e = &config.encedo;
    if e.users.is_empty() {
        return Ok(None);
    }
    let device = hsm
        .encedo_device_secret(&found.encedo_device)
        .map_err(|err| {
            Fatal(format!(
                "the Encedo device key ({DEVICE_KEY_LABEL}) in {} is unusable: {err}",
                hsm.token()
            ))
        })?;
    let eid = e
        .eid
        .clone()
        .unwrap_or_else(|| default_eid(&hsm.token().serial));
    let label = e.label.clone().unwrap_or_else(|| hsm.token().label.clone());
    let mut users = Vec::new();
    for (i, u) in e.users.iter().enumerate() {
        let public = match &u.key {
            UserKey::Public(k) => *k,
            UserKey::PassphraseFile(path) => {
                let pass = secret::read_private_file(path, "Encedo passphrase").map_err(|err| {
                    Fatal(format!(
                        "config {}: key `encedo.users[{i}].passphrase_file`: {err}",
                        config.source.display()
                    ))
                })?;
                let end = pass
                    .iter()
                    .rposition(|b| *b != b'\n' && *b != b'\r')
                    .map_or(0, |p| p + 1);
                passphrase_public_key(&pass[..end], &eid)
            }
        };
        users.push(LoginUser {
            name: u.name.clone(),
            scopes: u.scopes.clone(),
            roles: u.roles.clone(),
            public,
        });
    }
    tracing::info!(users = users.len(), %eid, "Encedo login ready");
    Ok(Some(Arc::new(LoginService::new(EncedoLogin::new(
        &device,
        eid,
        label,
        e.challenge_ttl,
        users,
    )))))
}
