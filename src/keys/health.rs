//! Token loss and return. A token can vanish under the daemon (a device error, an empty
//! slot, SoftHSM2's files removed: SoftHSM then simply finds no objects). hsmkeyd's own
//! token-signing pair is the signal: hsmkeyd creates it and never deletes it, so a scan
//! that no longer finds it means the token being served is gone or was replaced. Then the
//! index is kept as it was but not served: every key operation answers 503
//! `token_unavailable` (never 404 for keys hsmkeyd knew), the watchdog stops being fed,
//! and the store looks again every [`RETRY`] (and on SIGHUP) until the pair is back, when
//! the index is rebuilt from the token.
//!
//! While the token is there, one cheap probe a second (CKA_LABEL of the signing key, by
//! handle) notices when it stops answering.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{KeyError, KeyStore};
use crate::hsm::{HsmError, HsmErrorKind, ObjectRef};
use crate::sync;

/// How often a lost token is looked for again (each look is a full scan).
pub const RETRY: Duration = Duration::from_secs(5);

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

    /// Names the token-signing key's private object, once the daemon has it (it may have
    /// just been created): its presence is what tells the token is still the same.
    pub fn watch_signing_key(&self, private: ObjectRef) {
        *sync::lock(&self.probe) = Some(private);
    }

    pub(super) fn ensure_token(&self) -> Result<(), KeyError> {
        if self.is_lost() {
            Err(token_gone())
        } else {
            Ok(())
        }
    }

    /// One health check, from the daemon's status tick: probe the token while it is there,
    /// look for it again (at most every 5 s, or at once when `now`) while it is gone.
    pub async fn check_token(&self, now: bool) {
        if self.is_lost() {
            {
                let mut last = sync::lock(&self.last_look);
                if !now && last.elapsed() < RETRY {
                    return;
                }
                *last = Instant::now();
            }
            let _ = self.rescan("looking for the lost token").await;
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
            let _ = self.rescan("the token-signing key stopped answering").await;
        }
    }

    /// After a scan: `Err` (the index is not replaced) when the signing key we knew is not
    /// in it; otherwise notes a return and the key's handle.
    pub(super) fn judge_scan(&self, signing_private: Option<ObjectRef>) -> Result<(), KeyError> {
        let knew = sync::lock(&self.probe).is_some();
        match signing_private {
            None if knew => {
                if !self.lost.swap(true, Ordering::SeqCst) {
                    *sync::lock(&self.last_look) = Instant::now();
                    tracing::error!(
                        "the token no longer holds hsmkeyd's token-signing key: it is gone or \
                         was replaced; key operations answer 503 until it is back"
                    );
                }
                Err(token_gone())
            }
            found => {
                if let Some(p) = found {
                    self.watch_signing_key(p);
                }
                if self.lost.swap(false, Ordering::SeqCst) {
                    tracing::warn!("the token is back; serving its keys again");
                }
                Ok(())
            }
        }
    }
}
