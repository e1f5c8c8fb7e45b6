//! Token loss and return. A token can vanish under the daemon (a device error, an empty
//! slot, SoftHSM2's files removed: SoftHSM then simply finds no objects). hsmkeyd's own
//! token-signing pair is the signal: hsmkeyd creates it and never deletes it, so a scan
//! that no longer finds it means the token being served is gone or was replaced. Then the
//! index is kept as it was but not served: every key operation answers 503
//! `token_unavailable` (never 404 for keys hsmkeyd knew), and the watchdog stops being fed.
//!
//! While the token is there, one cheap probe a second (CKA_LABEL of the signing key, by
//! handle) notices when it stops answering. While it is gone the store tries to get it
//! back, first after [`RETRY_FIRST`], then at doubling intervals up to [`RETRY_MAX`] (and
//! at once on SIGHUP): with the store's gate held exclusively (no update holds a key) the
//! PKCS#11 module is re-initialized (SoftHSM2 sees a token directory that came back only
//! after a new C_Initialize), the token found again by label or serial and logged in
//! with the PIN held; then one search tells whether it is the token served before (the
//! CKA_ID of its token-signing key, random when hsmkeyd made it). The same token is
//! rescanned into a fresh index and served again; any other token is not served (the
//! daemon stays at 503 and says which token it found). Every loss and return is queued as
//! a [`TokenChange`] for the daemon's audit trail.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{KeyError, KeyStore};
use crate::hsm::{HsmError, HsmErrorKind, ObjectRef, SigningKey, SIGNING_KEY_LABEL};
use crate::sync;

/// The first wait before a lost token is looked for again (each look re-initializes the
/// module).
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two looks: a token that comes back is served within this
/// (plus one scan).
pub const RETRY_MAX: Duration = Duration::from_secs(8);

/// A change of the token's availability, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenChange {
    /// The token went away; key operations answer 503 from now on.
    Lost(String),
    /// The token is back: the module was re-initialized and the index rebuilt.
    Returned(String),
    /// A token is in its place that is not the one served before; it is not served.
    Foreign(String),
}

/// When the lost token is looked for next.
pub(super) struct Recovery {
    last: Instant,
    wait: Duration,
    /// A foreign token was already reported (once per loss).
    foreign_noted: bool,
}

impl Default for Recovery {
    fn default() -> Recovery {
        Recovery {
            last: Instant::now(),
            wait: RETRY_FIRST,
            foreign_noted: false,
        }
    }
}

/// The error every key operation answers while the token is gone.
pub(super) fn token_gone() -> KeyError {
    KeyError::Unavailable(HsmError::unavailable(
        "the token",
        "the token no longer holds hsmkeyd's token-signing key: it is gone or was replaced",
    ))
}

impl KeyStore {
    /// Whether the token is gone (see the module doc).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The flag itself, for the watchdog's check.
    pub fn lost_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.lost.clone()
    }

    /// Names the token-signing key, once the daemon has it (it may have just been
    /// created): its private object is probed, and its CKA_ID tells this token from others.
    pub fn watch_signing_key(&self, key: &SigningKey) {
        *sync::lock(&self.probe) = Some(key.private_ref());
        *sync::lock(&self.identity) = Some(key.id().to_vec());
    }

    /// The changes of the token's availability since the last call, oldest first.
    pub fn token_changes(&self) -> Vec<TokenChange> {
        std::mem::take(&mut *sync::lock(&self.changes))
    }

    pub(super) fn ensure_token(&self) -> Result<(), KeyError> {
        if self.is_lost() {
            Err(token_gone())
        } else {
            Ok(())
        }
    }

    /// One health check, from the daemon's status tick: probe the token while it is there;
    /// while it is gone, try to get it back when the back-off allows (at once when `now`).
    pub async fn check_token(&self, now: bool) {
        if self.is_lost() {
            self.recover(now).await;
            return;
        }
        let Some(probe) = *sync::lock(&self.probe) else {
            return;
        };
        let hsm = self.hsm.clone();
        let answer = self.on_token(move || hsm.read(probe, &[])).await;
        let failed = match &answer {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => matches!(e.kind, HsmErrorKind::ObjectGone | HsmErrorKind::Unavailable),
            // No turn within the wait: the token does not answer.
            Err(KeyError::Unavailable(_)) => true,
            Err(_) => false,
        };
        if failed {
            // A scan that cannot read the token at all (a device error) is a loss too.
            if let Err(KeyError::Unavailable(e)) =
                self.rescan("the token-signing key stopped answering").await
            {
                self.mark_lost(format!("the token does not answer: {e}"));
            }
        }
    }

    /// One attempt to get the lost token back (see the module doc).
    async fn recover(&self, now: bool) {
        {
            let mut r = sync::lock(&self.recovery);
            if !now && r.last.elapsed() < r.wait {
                return;
            }
            r.last = Instant::now();
            r.wait = if now {
                RETRY_FIRST
            } else {
                (r.wait * 2).min(RETRY_MAX)
            };
        }
        // One attempt at a time (the tick and a SIGHUP may meet).
        let Ok(_one) = self.recovering.try_lock() else {
            return;
        };
        // No update holds a key while the module is swapped.
        let _exclusive = self.gate.write().await;
        let hsm = self.hsm.clone();
        let found = self
            .on_token(move || {
                let token = hsm.reinitialize()?;
                hsm.signing_key_ids(SIGNING_KEY_LABEL)
                    .map(|ids| (token, ids))
            })
            .await;
        let (token, ids) = match found {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "the lost token is not back yet");
                return;
            }
            Err(e) => {
                tracing::info!(error = %e, "the lost token is not back yet");
                return;
            }
        };
        let identity = sync::lock(&self.identity).clone();
        if identity.as_ref().is_some_and(|id| !ids.contains(id)) {
            let mut r = sync::lock(&self.recovery);
            if !r.foreign_noted {
                r.foreign_noted = true;
                let what = format!(
                    "{token} is in the slot, but it does not hold the token-signing key of \
                     the token served before ({} such keys): it is another token and is not \
                     served; put the token back, or restart hsmkeyd to serve this one",
                    ids.len()
                );
                tracing::error!("{what}");
                sync::lock(&self.changes).push(TokenChange::Foreign(what));
            }
            return;
        }
        let trigger = if now { "SIGHUP" } else { "retry" };
        tracing::info!(%token, trigger = %trigger, "the token answers again; rebuilding the index");
        if let Err(e) = self.rescan_held("the token is back").await {
            tracing::warn!(error = %e, "the token came back but could not be scanned");
        }
    }

    /// Notes that the token is gone (once per loss).
    fn mark_lost(&self, why: String) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            *sync::lock(&self.recovery) = Recovery::default();
            tracing::error!("{why}; key operations answer 503 until it is back");
            sync::lock(&self.changes).push(TokenChange::Lost(why));
        }
    }

    /// After a scan: `Err` (the index is not replaced) when the signing key we knew is not
    /// among the token-signing private keys found (`signing`: each with its CKA_ID);
    /// otherwise notes a return and the key's handle.
    pub(super) fn judge_scan(&self, signing: &[(ObjectRef, Vec<u8>)]) -> Result<(), KeyError> {
        let identity = sync::lock(&self.identity).clone();
        let found = match &identity {
            Some(id) => signing.iter().find(|(_, i)| i == id),
            None => signing.first(),
        };
        match found {
            None if identity.is_some() => {
                self.mark_lost(
                    "the token no longer holds hsmkeyd's token-signing key: it is gone or \
                     was replaced"
                        .to_string(),
                );
                Err(token_gone())
            }
            found => {
                if let Some((p, _)) = found {
                    *sync::lock(&self.probe) = Some(*p);
                }
                if self.lost.swap(false, Ordering::SeqCst) {
                    let what = format!(
                        "{} is back (index rebuilt); serving its keys again",
                        self.hsm.token()
                    );
                    tracing::warn!("{what}");
                    sync::lock(&self.changes).push(TokenChange::Returned(what));
                }
                Ok(())
            }
        }
    }
}
