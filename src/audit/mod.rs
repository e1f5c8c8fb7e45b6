//! The audit trail: one structured entry for every change and every refusal, written to
//! journald (or, in development, as JSON lines on stderr).
//!
//! Owns: the event names and their MESSAGE_IDs (explained in `systemd/hsmkeyd.catalog`),
//! the fields of an entry, and the sinks. Writing is **fail-closed**: [`Auditor::write`]
//! reports every failure, and the callers refuse the request (503 `audit_unavailable`) when
//! an entry cannot be written. A key update is recorded twice: an intent entry before the
//! first token write (no entry, no write) and a result entry before the answer (see
//! ARCHITECTURE.md).
//! Called by: `api` (request entries, from one middleware and the update hook) and `daemon`
//! (start, stop, reload, HSM login). May call: `config`, `auth` (the `Peer` type).

pub mod aggregate;
pub mod chain;
mod event;
mod sink;

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde_json::Value;

use crate::auth::Peer;
use crate::config::AuditSink;
use crate::sync;
use chain::{Chain, Mark};
pub use event::Event;
pub use sink::AuditError;

/// The audit-signing key's label in the token (as `hsm` names it; repeated here because
/// `api` may not call `hsm`, and checked equal by a test).
pub const AUDIT_KEY_LABEL: &str = "hsmkeyd-audit-signing";

/// `HSMKEYD_RESULT`, which also sets the entry's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (notice).
    Ok,
    /// About to be done: the intent entry (notice).
    Pending,
    /// Refused: bad arguments, unknown caller, missing scope (warning).
    Error,
    /// The operation failed: the HSM refused, the key is inconsistent, 5xx (err).
    Failed,
}

impl Outcome {
    /// The value of `HSMKEYD_RESULT`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Pending => "PENDING",
            Outcome::Error => "ERROR",
            Outcome::Failed => "FAILED",
        }
    }

    /// syslog priority: notice, warning or err.
    pub fn priority(self) -> u8 {
        match self {
            Outcome::Ok | Outcome::Pending => 5,
            Outcome::Error => 4,
            Outcome::Failed => 3,
        }
    }
}

/// One audit entry. Fields left `None` are not written.
#[derive(Debug, Clone)]
pub struct Entry {
    /// What happened.
    pub event: Event,
    /// How it ended.
    pub outcome: Outcome,
    /// One human line (`MESSAGE`).
    pub message: String,
    /// HTTP status of the answer.
    pub status: Option<u16>,
    /// The key concerned.
    pub kid: Option<String>,
    /// The principal that called.
    pub principal: Option<String>,
    /// The connection's peer: `uid=… gid=… pid=…` on the Unix socket, the address on TLS.
    pub peer: Option<String>,
    /// The `jti` of the bearer token the caller presented, or of the token minted.
    pub token_id: Option<String>,
    /// The request (`X-Request-Id`, `audit_id`).
    pub request_id: Option<String>,
    /// The error code of a refusal (`HSMKEYD_ERROR`).
    pub error: Option<String>,
    /// field -> {"before", "after"}.
    pub changes: Option<Changes>,
    /// Method and path of the request (`HSMKEYD_REQUEST`).
    pub request: Option<String>,
    /// How many events an aggregated entry stands for (`HSMKEYD_COUNT`).
    pub count: Option<u64>,
    /// First and last of those (`HSMKEYD_FIRST`, `HSMKEYD_LAST`, RFC 3339).
    pub between: Option<(String, String)>,
    /// The request was a dry run: checked and answered, nothing written
    /// (`HSMKEYD_DRY_RUN=1`).
    pub dry_run: bool,
    /// The batch update the entry belongs to (`HSMKEYD_BATCH_ID`): the batch's own entry
    /// and every entry of its keys.
    pub batch_id: Option<String>,
    /// What an `AUDIT_CHECKPOINT` entry signs.
    pub checkpoint: Option<Checkpoint>,
}

/// The signed head of an `AUDIT_CHECKPOINT` entry.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// `HSMKEYD_CHECKPOINT_SEQ`: the entry whose chain value is signed.
    pub seq: u64,
    /// `HSMKEYD_CHECKPOINT_HEAD`: its chain value.
    pub head: [u8; 32],
    /// `HSMKEYD_CHECKPOINT_REASON`: `entries`, `time`, `token` or `stop`.
    pub reason: &'static str,
    /// `HSMKEYD_KEY_FINGERPRINT`: the signing key's ([`chain::fingerprint`]).
    pub fingerprint: String,
    /// `HSMKEYD_SIGNATURE`: ECDSA P-256 over [`chain::checkpoint_message`], r || s, hex.
    pub signature: Vec<u8>,
}

impl Entry {
    /// An entry with only the event, outcome and message set.
    pub fn new(event: Event, outcome: Outcome, message: impl Into<String>) -> Entry {
        Entry {
            event,
            outcome,
            message: message.into(),
            status: None,
            kid: None,
            principal: None,
            peer: None,
            token_id: None,
            request_id: None,
            error: None,
            changes: None,
            request: None,
            count: None,
            between: None,
            dry_run: false,
            batch_id: None,
            checkpoint: None,
        }
    }

    /// syslog priority: refusals of a caller (401, 403) are warnings whatever their result;
    /// otherwise the outcome decides.
    pub fn priority(&self) -> u8 {
        match self.event {
            Event::AuthFailed | Event::FailedScopeCheck => 4,
            _ => self.outcome.priority(),
        }
    }

    /// The journal fields, `MESSAGE` and `PRIORITY` first; values borrowed from the entry
    /// where it holds them as written.
    pub fn fields<'e>(&'e self) -> Vec<(&'static str, Cow<'e, str>)> {
        let priority = match self.priority() {
            3 => "3",
            4 => "4",
            _ => "5",
        };
        let mut f: Vec<(&'static str, Cow<'e, str>)> = Vec::with_capacity(20);
        f.extend([
            ("MESSAGE", Cow::Borrowed(self.message.as_str())),
            ("PRIORITY", Cow::Borrowed(priority)),
            ("MESSAGE_ID", Cow::Borrowed(self.event.message_id())),
            ("SYSLOG_IDENTIFIER", Cow::Borrowed("hsmkeyd")),
            ("HSMKEYD_EVENT", Cow::Borrowed(self.event.name())),
            ("HSMKEYD_RESULT", Cow::Borrowed(self.outcome.name())),
        ]);
        let mut opt = |k: &'static str, v: Option<Cow<'e, str>>| {
            if let Some(v) = v {
                f.push((k, v));
            }
        };
        fn text(v: &Option<String>) -> Option<Cow<'_, str>> {
            v.as_deref().map(Cow::Borrowed)
        }
        opt("HSMKEYD_STATUS", self.status.map(|s| s.to_string().into()));
        opt("HSMKEYD_KID", text(&self.kid));
        opt("HSMKEYD_PRINCIPAL", text(&self.principal));
        opt("HSMKEYD_PEER", text(&self.peer));
        opt("HSMKEYD_TOKEN_ID", text(&self.token_id));
        opt("HSMKEYD_REQUEST_ID", text(&self.request_id));
        opt("HSMKEYD_ERROR", text(&self.error));
        opt(
            "HSMKEYD_CHANGES",
            self.changes.as_ref().map(|c| c.json().into()),
        );
        opt("HSMKEYD_REQUEST", text(&self.request));
        opt("HSMKEYD_COUNT", self.count.map(|c| c.to_string().into()));
        opt(
            "HSMKEYD_FIRST",
            self.between.as_ref().map(|b| b.0.as_str().into()),
        );
        opt(
            "HSMKEYD_LAST",
            self.between.as_ref().map(|b| b.1.as_str().into()),
        );
        opt("HSMKEYD_DRY_RUN", self.dry_run.then_some("1".into()));
        opt("HSMKEYD_BATCH_ID", text(&self.batch_id));
        if let Some(c) = &self.checkpoint {
            f.push(("HSMKEYD_CHECKPOINT_SEQ", c.seq.to_string().into()));
            f.push(("HSMKEYD_CHECKPOINT_HEAD", hex::encode(c.head).into()));
            f.push(("HSMKEYD_CHECKPOINT_REASON", c.reason.into()));
            f.push(("HSMKEYD_KEY_FINGERPRINT", c.fingerprint.as_str().into()));
            f.push((chain::SIGNATURE, hex::encode(&c.signature).into()));
        }
        f
    }
}

/// `HSMKEYD_PEER` of a Unix-socket caller.
pub fn unix_peer(p: &Peer) -> String {
    format!("uid={} gid={} pid={}", p.uid, p.gid, p.pid)
}

/// Describes a caller for `MESSAGE`: `ops (uid 1000)`, `ops (127.0.0.1:41234)`, or the
/// bare peer when unknown.
pub fn caller(principal: Option<&str>, peer: Option<&str>) -> String {
    let short = peer.map(|p| match p.strip_prefix("uid=") {
        Some(rest) => format!("uid {}", rest.split(' ').next().unwrap_or(rest)),
        None => p.to_string(),
    });
    match (principal, short) {
        (Some(n), Some(p)) => format!("{n} ({p})"),
        (Some(n), None) => n.to_string(),
        (None, Some(p)) => p,
        (None, None) => "an unidentified caller".to_string(),
    }
}

/// `HSMKEYD_CHANGES` (field -> {"before", "after"}), rendered once as JSON and as the
/// words `MESSAGE` uses: an update's intent and result entries record the same changes.
#[derive(Debug, Clone)]
pub struct Changes(std::sync::Arc<RenderedChanges>);

#[derive(Debug)]
struct RenderedChanges {
    json: String,
    words: String,
    empty: bool,
}

impl Changes {
    /// `changes`, a JSON object of field -> {"before", "after"}.
    pub fn new(changes: &Value) -> Changes {
        Changes(std::sync::Arc::new(RenderedChanges {
            json: changes.to_string(),
            words: describe_changes(changes),
            empty: changes.as_object().is_none_or(|o| o.is_empty()),
        }))
    }

    /// The value of `HSMKEYD_CHANGES`.
    pub fn json(&self) -> &str {
        &self.0.json
    }

    /// For `MESSAGE`: `label "old" -> "new", roles [] -> ["ops"]`.
    pub fn words(&self) -> &str {
        &self.0.words
    }

    /// Whether no field changed.
    pub fn is_empty(&self) -> bool {
        self.0.empty
    }
}

/// Renders changes for `MESSAGE`: `label "old" -> "new", roles [] -> ["ops"]`.
pub fn describe_changes(changes: &Value) -> String {
    let Some(map) = changes.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(field, c)| format!("{field} {} -> {}", c["before"], c["after"]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The audit trail of the running daemon.
pub struct Auditor {
    sink: sink::Sink,
    /// Refusals of unidentified callers, aggregated per peer (`None`: every one is an entry).
    pub refusals: Option<aggregate::Refusals>,
    /// Whether the last write succeeded (for the status endpoint).
    healthy: std::sync::atomic::AtomicBool,
    /// The hash chain, from [`Auditor::anchor`] on. Held across the write of each entry,
    /// so the journal receives entries in chain order.
    chain: Mutex<Option<Chain>>,
    /// The audit-signing key's public point, for `GET /v1/audit/key`.
    key: OnceLock<Vec<u8>>,
    /// Entries per checkpoint.
    every: std::sync::atomic::AtomicU64,
    /// Woken when a checkpoint is due by count (or the reservation runs low).
    due: tokio::sync::Notify,
    /// What chaining has cost on the writers' path: entries chained, and the time spent
    /// waiting for the chain and stamping entries (the sink's write not included).
    chain_cost: (AtomicU64, AtomicU64),
}

/// A chain head to sign: the last entry that is not a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Its `HSMKEYD_SEQ`.
    pub seq: u64,
    /// Its `HSMKEYD_CHAIN`.
    pub chain: [u8; 32],
}

impl fmt::Debug for Auditor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auditor").field("sink", &self.sink).finish()
    }
}

impl Auditor {
    /// Opens the configured sink. For journald, fails with a message saying what to do
    /// when journald does not answer: the daemon must not run without its audit trail.
    /// `window` aggregates the refusals of unidentified callers per peer
    /// ([`aggregate`]); zero gives every refusal its own entry.
    pub fn open(sink: AuditSink, window: std::time::Duration) -> Result<Auditor, AuditError> {
        Ok(Auditor {
            sink: sink::Sink::open(sink)?,
            refusals: (!window.is_zero()).then(|| aggregate::Refusals::new(window)),
            healthy: std::sync::atomic::AtomicBool::new(true),
            chain: Mutex::new(None),
            key: OnceLock::new(),
            every: std::sync::atomic::AtomicU64::new(u64::MAX),
            due: tokio::sync::Notify::new(),
            chain_cost: (AtomicU64::new(0), AtomicU64::new(0)),
        })
    }

    /// Starts the chain where the token's `mark` says, with the audit-signing key's public
    /// point and a checkpoint due every `every` entries. Entries written before (a failed
    /// HSM login: the token could not be read) carry no chain fields. Nothing is written
    /// until the caller has stored [`Auditor::reservation`] in the token and passed it to
    /// [`Auditor::reserved`].
    pub fn anchor(&self, mark: Mark, key_point: Vec<u8>, every: u64) {
        let _ = self.key.set(key_point);
        self.every
            .store(every.max(1), std::sync::atomic::Ordering::Relaxed);
        *sync::lock(&self.chain) = Some(Chain::start(mark));
    }

    /// The audit-signing key's public point (uncompressed SEC1), once anchored.
    pub fn public_key(&self) -> Option<&[u8]> {
        self.key.get().map(Vec::as_slice)
    }

    /// The mark to store in the token next: numbers reserved [`chain::RESERVE`] ahead of
    /// the next one, continuing from `checkpoint` (or from the checkpoint the run began
    /// with).
    pub fn reservation(&self, checkpoint: Option<(u64, [u8; 32])>, start: Mark) -> Mark {
        let next = sync::lock(&self.chain)
            .as_ref()
            .map_or(start.next, |c| c.next_seq);
        Mark {
            next: next + chain::RESERVE,
            checkpoint: checkpoint.or(start.checkpoint),
        }
    }

    /// `mark` is in the token: sequence numbers below its `next` may be used.
    pub fn reserved(&self, mark: Mark) {
        if let Some(c) = sync::lock(&self.chain).as_mut() {
            c.limit = c.limit.max(mark.next);
        }
    }

    /// The head a checkpoint should sign now, if entries were written since the last one.
    pub fn head(&self) -> Option<Head> {
        let g = sync::lock(&self.chain);
        let c = g.as_ref()?;
        c.last_plain
            .filter(|(seq, _)| *seq > c.signed)
            .map(|(seq, chain)| Head { seq, chain })
    }

    /// Waits until a checkpoint is due by count.
    pub async fn checkpoint_due(&self) {
        self.due.notified().await;
    }

    /// Writes the `AUDIT_CHECKPOINT` entry for `head` with its signature; returns the
    /// checkpoint entry's own sequence number and chain value (the next run links to it).
    pub fn write_checkpoint(
        &self,
        head: Head,
        signature: Vec<u8>,
        reason: &'static str,
    ) -> Result<(u64, [u8; 32]), AuditError> {
        let fingerprint = self
            .public_key()
            .map(chain::fingerprint)
            .unwrap_or_default();
        let mut e = Entry::new(
            Event::AuditCheckpoint,
            Outcome::Ok,
            format!(
                "audit checkpoint: entries up to {} signed ({reason})",
                head.seq
            ),
        );
        e.checkpoint = Some(Checkpoint {
            seq: head.seq,
            head: head.chain,
            reason,
            fingerprint,
            signature,
        });
        let written = self.write_chained(&e)?;
        let Some(at) = written else {
            return Err(AuditError("the audit chain is not anchored".into()));
        };
        if let Some(c) = sync::lock(&self.chain).as_mut() {
            if head.seq > c.signed {
                // Entries written while the head was being signed stay unsigned.
                c.unsigned = c.last_plain.map_or(0, |(s, _)| s - head.seq);
                c.signed = head.seq;
            }
        }
        Ok(at)
    }

    /// Writes the summaries of the aggregation windows that have closed (all when `all`).
    pub async fn flush_refusals(self: &std::sync::Arc<Self>, all: bool) {
        let due = self
            .refusals
            .as_ref()
            .map(|r| r.due(all))
            .unwrap_or_default();
        for e in due {
            if let Err(err) = self.write_async(e).await {
                tracing::error!(error = %err, "an aggregated refusal summary was not recorded");
            }
        }
    }

    /// Writes one entry; an error means it was **not** recorded. Blocks briefly (one
    /// datagram); async callers use [`Auditor::write_async`].
    pub fn write(&self, entry: &Entry) -> Result<(), AuditError> {
        let written = self.write_chained(entry).map(|_| ());
        self.healthy
            .store(written.is_ok(), std::sync::atomic::Ordering::Relaxed);
        written
    }

    /// Entries chained so far and the nanoseconds chaining them cost their writers (lock
    /// wait, stamping and advancing; not the sink's write), for `GET /v1/status` and the
    /// benchmark's measure of what the chain adds to an update.
    pub fn chain_cost(&self) -> (u64, u64) {
        (
            self.chain_cost.0.load(Ordering::Relaxed),
            self.chain_cost.1.load(Ordering::Relaxed),
        )
    }

    /// Whether the last entry was taken by the sink.
    pub fn healthy(&self) -> bool {
        self.healthy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes one entry, chained once anchored; returns its sequence number and chain
    /// value. The chain advances only when the sink took the entry. Everything but the
    /// chain fields is encoded before the chain's lock is taken: held across the sink's
    /// write, it is what concurrent writers wait for.
    fn write_chained(&self, entry: &Entry) -> Result<Option<(u64, [u8; 32])>, AuditError> {
        let fields = entry.fields();
        let began = Instant::now();
        let covered = chain::Covered::new(fields.iter().map(|(k, v)| (*k, v.as_bytes())));
        let sorted = began.elapsed();
        let encoded = self.sink.encode(&fields)?;
        let waited = Instant::now();
        let mut g = sync::lock(&self.chain);
        let Some(c) = g.as_mut() else {
            return self.sink.write(entry, &fields, encoded, []).map(|()| None);
        };
        let stamp = c.stamp(&covered)?;
        let stamped = waited.elapsed();
        self.sink.write(entry, &fields, encoded, stamp.fields())?;
        let sent = Instant::now();
        let at = c.advance(stamp.chain, entry.event == Event::AuditCheckpoint);
        let spent = sorted + stamped + sent.elapsed();
        let _ = self.chain_cost.0.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .chain_cost
            .1
            .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        let every = self.every.load(std::sync::atomic::Ordering::Relaxed);
        if c.unsigned >= every || c.limit - c.next_seq < chain::RESERVE / 2 {
            self.due.notify_one();
        }
        Ok(Some(at))
    }

    /// [`Auditor::write`] off the reactor: inline on a connection's own thread, else on a
    /// blocking thread ([`crate::blocking::run`]).
    pub async fn write_async(self: &std::sync::Arc<Self>, entry: Entry) -> Result<(), AuditError> {
        let me = self.clone();
        crate::blocking::run(move || me.write(&entry))
            .await
            .map_err(|e| AuditError(format!("audit task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let mut seen = std::collections::BTreeSet::new();
        for e in Event::ALL {
            let id = e.message_id();
            assert_eq!(id.len(), 32, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(seen.insert(id), "{id} used twice");
        }
    }

    #[test]
    fn fields_carry_every_set_value_and_skip_unset_ones() {
        let mut e = Entry::new(Event::KeyAttributesChanged, Outcome::Ok, "m");
        e.kid = Some("0a".into());
        e.peer = Some(unix_peer(&Peer {
            uid: 1,
            gid: 2,
            pid: 3,
        }));
        e.changes = Some(Changes::new(
            &serde_json::json!({"label": {"before": "a", "after": "b"}}),
        ));
        let f: std::collections::BTreeMap<_, _> = e.fields().into_iter().collect();
        assert_eq!(f["PRIORITY"], "5");
        assert_eq!(f["HSMKEYD_PEER"], "uid=1 gid=2 pid=3");
        assert_eq!(
            caller(Some("ops"), Some("uid=1 gid=2 pid=3")),
            "ops (uid 1)"
        );
        assert_eq!(caller(None, Some("127.0.0.1:9")), "127.0.0.1:9");
        assert_eq!(f["HSMKEYD_KID"], "0a");
        assert!(!f.contains_key("HSMKEYD_PRINCIPAL"));
        assert_eq!(e.changes.as_ref().unwrap().words(), "label \"a\" -> \"b\"");
        assert_eq!(
            f["HSMKEYD_CHANGES"],
            r#"{"label":{"after":"b","before":"a"}}"#
        );
    }
}
