//! The audit trail's anchor in the token and its signed checkpoints: at start the chain
//! continues from the token's high-water mark (sequence numbers reserved ahead, so no
//! request writes the token); every `audit.checkpoint_entries` entries, every
//! `audit.checkpoint_interval_s` and at stop the chain head is signed with C_Sign by the
//! `hsmkeyd-audit-signing` key and written as an `AUDIT_CHECKPOINT` entry, and the mark
//! is moved on. All of it runs here, off the request path, through the store's HSM turns.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::chain::{self, Mark};
use crate::audit::Auditor;
use crate::hsm::{AuditMark, Hsm, SigningKey, AUDIT_SIGNING_KEY_LABEL};
use crate::keys::{KeyStore, Reserved};

use super::Fatal;

/// What checkpoints need: the token, the signing key, the mark objects.
pub(super) struct Anchor {
    hsm: Hsm,
    key: SigningKey,
    mark: AuditMark,
    /// The mark the run started from.
    start: Mark,
    /// One checkpoint at a time, so marks reach the token in order.
    one: tokio::sync::Mutex<()>,
}

/// Takes the audit-signing key and the mark objects from the opening scan (creating them
/// when the token has none), starts the chain there, and stores the run's first
/// reservation before any chained entry is written. Startup only.
pub(super) fn anchor(
    hsm: &Hsm,
    found: &Reserved,
    audit: &Auditor,
    every: u64,
) -> Result<Arc<Anchor>, Fatal> {
    let token = hsm.token().to_string();
    let (privs, pubs) = &found.audit_signing;
    let key = hsm
        .signing_key_labelled_among(AUDIT_SIGNING_KEY_LABEL, privs, pubs)
        .map_err(|e| {
            Fatal(format!(
                "the audit-signing key ({AUDIT_SIGNING_KEY_LABEL}) in {token} is unusable: {e}"
            ))
        })?;
    let unreadable = |e: String| Fatal(format!("the audit high-water mark in {token}: {e}"));
    let (mark, labels) = hsm
        .audit_mark_among(&found.audit_marks, &Mark::FRESH.to_record(), |r| {
            Mark::from_record(r).map(|m| m.next)
        })
        .map_err(|e| unreadable(e.to_string()))?;
    let (start, other) = Mark::pick(&labels).map_err(|e| unreadable(e.0))?;
    mark.write_first(other);
    audit.anchor(start, key.public_point().to_vec(), every);
    let first = audit.reservation(None, start);
    hsm.write_audit_mark(&mark, &first.to_record())
        .map_err(|e| unreadable(format!("cannot reserve sequence numbers: {e}")))?;
    audit.reserved(first);
    tracing::info!(
        seq = start.next,
        fingerprint = %chain::fingerprint(key.public_point()),
        "audit chain continues"
    );
    Ok(Arc::new(Anchor {
        hsm: hsm.clone(),
        key,
        mark,
        start,
        one: tokio::sync::Mutex::new(()),
    }))
}

/// Signs the chain head (if anything was written since the last checkpoint), writes the
/// checkpoint entry, and moves the token's mark on to it.
pub(super) async fn checkpoint(
    anchor: &Arc<Anchor>,
    audit: &Arc<Auditor>,
    keys: &KeyStore,
    reason: &'static str,
) -> Result<(), String> {
    let _one = anchor.one.lock().await;
    let Some(head) = audit.head() else {
        return Ok(());
    };
    let message = chain::checkpoint_message(head.seq, &head.chain);
    let a = anchor.clone();
    let signature = keys
        .on_token(move || a.hsm.sign_es256(&a.key, &message))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("C_Sign with {AUDIT_SIGNING_KEY_LABEL}: {e}"))?;
    let au = audit.clone();
    let at = tokio::task::spawn_blocking(move || au.write_checkpoint(head, signature, reason))
        .await
        .map_err(|e| format!("audit task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let mark = audit.reservation(Some(at), anchor.start);
    let a = anchor.clone();
    keys.on_token(move || a.hsm.write_audit_mark(&a.mark, &mark.to_record()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("writing the audit high-water mark: {e}"))?;
    audit.reserved(mark);
    Ok(())
}

/// How often a due checkpoint looks again while the token is lost.
const LOST_RECHECK: Duration = Duration::from_secs(1);

/// Writes checkpoints when one is due by count or by `interval`, until `stop` turns true;
/// none while the token is lost.
pub(super) async fn run(
    anchor: Arc<Anchor>,
    audit: Arc<Auditor>,
    keys: Arc<KeyStore>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let _ = tick.tick().await;
    loop {
        let reason = tokio::select! {
            _ = audit.checkpoint_due() => "entries",
            _ = tick.tick() => "time",
            _ = stop.changed() => return,
        };
        if keys.is_lost() {
            // Nothing can be signed while the token is gone, and every refusal meanwhile
            // makes a checkpoint due: trying each time failed (and logged) thousands of
            // times a second under load. The checkpoint after the token's return (reason
            // "token") signs what was written meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(LOST_RECHECK) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        if let Err(e) = checkpoint(&anchor, &audit, &keys, reason).await {
            tracing::error!(error = %e, "an audit checkpoint was not written; the trail's tail stays unsigned until the next one");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_audit_layer_names_the_audit_signing_key_as_the_token_holds_it() {
        assert_eq!(
            crate::audit::AUDIT_KEY_LABEL,
            crate::hsm::AUDIT_SIGNING_KEY_LABEL
        );
    }
}
