//! The hash chain over the audit trail, and what a third party needs to check it (the
//! encoding is specified in README.md, "Verifying the audit trail").
//!
//! Every entry carries `HSMKEYD_SEQ` and `HSMKEYD_CHAIN` = SHA-256(previous chain value ||
//! [`encode`] of the entry). Sequence numbers come from a range reserved in the token
//! ([`Mark`], written ahead by [`RESERVE`]), so the request path never writes the token and
//! a crash skips numbers but never repeats one. The first entry of a run carries
//! `HSMKEYD_CHAIN_LINK` = `<seq> <chain>` of the checkpoint it continues (`0` and zeros on a
//! fresh token). Checkpoints sign the chain head with the audit-signing key in the HSM,
//! off the request path (`daemon` drives them).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditError;

/// `HSMKEYD_SEQ`.
pub const SEQ: &str = "HSMKEYD_SEQ";
/// `HSMKEYD_CHAIN`: lowercase hex of the entry's chain value; not itself encoded.
pub const CHAIN: &str = "HSMKEYD_CHAIN";
/// `HSMKEYD_CHAIN_LINK`: on a run's first entry, `<seq> <chain hex>` of the checkpoint it
/// continues.
pub const LINK: &str = "HSMKEYD_CHAIN_LINK";
/// `HSMKEYD_SIGNATURE`: a checkpoint's signature; not encoded (it signs the chain).
pub const SIGNATURE: &str = "HSMKEYD_SIGNATURE";

/// The chain value before the first entry ever.
pub const GENESIS: [u8; 32] = [0; 32];

/// How far ahead of the last used sequence number the token's mark is written. A crash
/// skips at most this many numbers; the mark is rewritten at every checkpoint, so with
/// the default 100 entries per checkpoint the reservation never runs dry while the token
/// answers.
pub const RESERVE: u64 = 10_000;

/// The canonical encoding of an entry's fields for the chain: every field whose name starts
/// with `HSMKEYD_` (except `HSMKEYD_CHAIN` and `HSMKEYD_SIGNATURE`), `MESSAGE_ID` and
/// `MESSAGE`, sorted by name (bytewise); each as the name's length (u64 big-endian), the
/// name, the value's length (u64 big-endian), the value.
pub fn encode<'a>(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in Covered::new(fields).0 {
        put_field(&mut |b| out.extend_from_slice(b), k, v);
    }
    out
}

/// One field of the encoding, piece by piece into `out`.
fn put_field(out: &mut impl FnMut(&[u8]), name: &str, value: &[u8]) {
    out(&(name.len() as u64).to_be_bytes());
    out(name.as_bytes());
    out(&(value.len() as u64).to_be_bytes());
    out(value);
}

/// The fields of an entry that [`encode`] covers, sorted by name: prepared before the
/// chain's lock is taken, so that [`Chain::stamp`] only adds the sequence number (and the
/// link) and hashes.
pub(super) struct Covered<'a>(Vec<(&'a str, &'a [u8])>);

impl<'a> Covered<'a> {
    pub(super) fn new(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Covered<'a> {
        let mut chosen: Vec<(&str, &[u8])> =
            fields.into_iter().filter(|(k, _)| covered(k)).collect();
        chosen.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Covered(chosen)
    }
}

/// The chain fields [`Chain::stamp`] gives an entry.
#[derive(Debug)]
pub(super) struct Stamp {
    /// `HSMKEYD_SEQ`.
    seq: String,
    /// `HSMKEYD_CHAIN_LINK`, on a run's first entry.
    link: Option<String>,
    /// `HSMKEYD_CHAIN`, hex.
    chain_hex: String,
    /// The chain value.
    pub(super) chain: [u8; 32],
}

impl Stamp {
    /// The fields to write with the entry.
    pub(super) fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [(SEQ, self.seq.as_str()), (CHAIN, self.chain_hex.as_str())]
            .into_iter()
            .chain(self.link.as_deref().map(|l| (LINK, l)))
    }
}

/// Whether a field is part of the encoding.
pub fn covered(name: &str) -> bool {
    (name.starts_with("HSMKEYD_") && name != CHAIN && name != SIGNATURE)
        || name == "MESSAGE_ID"
        || name == "MESSAGE"
}

/// SHA-256(previous || encoding).
pub fn next_link(previous: &[u8; 32], encoding: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(previous);
    h.update(encoding);
    h.finalize().into()
}

/// What a checkpoint signs: `hsmkeyd-audit-checkpoint v1 <seq> <chain hex>` (ASCII).
pub fn checkpoint_message(seq: u64, head: &[u8; 32]) -> Vec<u8> {
    format!("hsmkeyd-audit-checkpoint v1 {seq} {}", hex::encode(head)).into_bytes()
}

/// DER SubjectPublicKeyInfo of an uncompressed P-256 point (id-ecPublicKey, prime256v1).
pub fn spki_der(point: &[u8]) -> Vec<u8> {
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// The key's fingerprint: lowercase hex SHA-256 of its DER SubjectPublicKeyInfo (as
/// `openssl pkey -pubin -outform DER | sha256sum` prints it).
pub fn fingerprint(point: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der(point)))
}

/// The public key as PEM (`-----BEGIN PUBLIC KEY-----`).
pub fn public_key_pem(point: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki_der(point));
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The high-water mark kept in the token: the first sequence number a next run may use,
/// and the checkpoint it continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// No entry of this or any earlier run has a sequence number at or above this.
    pub next: u64,
    /// Sequence number and chain value of the last checkpoint entry written (`None` before
    /// the first).
    pub checkpoint: Option<(u64, [u8; 32])>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkRecord {
    next: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint_chain: Option<String>,
}

impl Mark {
    /// A fresh token's mark.
    pub const FRESH: Mark = Mark {
        next: 1,
        checkpoint: None,
    };

    /// The record a mark object holds (JSON).
    pub fn to_record(&self) -> Vec<u8> {
        let record = MarkRecord {
            next: self.next,
            checkpoint_seq: self.checkpoint.map(|c| c.0),
            checkpoint_chain: self.checkpoint.map(|c| hex::encode(c.1)),
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// Reads a mark object's record; `None` when it is not a whole record (a torn write).
    pub fn from_record(record: &[u8]) -> Option<Mark> {
        let r: MarkRecord = serde_json::from_slice(record).ok()?;
        let checkpoint = match (r.checkpoint_seq, r.checkpoint_chain) {
            (Some(s), Some(c)) => Some((s, hex::decode(c).ok()?.try_into().ok()?)),
            (None, None) => None,
            _ => return None,
        };
        (r.next >= 1).then_some(Mark {
            next: r.next,
            checkpoint,
        })
    }

    /// The higher of the records the mark objects hold (slot order), and the slot of the
    /// other one (the next write goes there). An error when objects exist but none holds a
    /// whole record: starting anyway could repeat sequence numbers.
    pub fn pick(records: &[Vec<u8>]) -> Result<(Mark, usize), AuditError> {
        let marks: Vec<Option<Mark>> = records.iter().map(|l| Mark::from_record(l)).collect();
        let best = marks
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.map(|m| (i, m)))
            .max_by_key(|(_, m)| m.next);
        match best {
            Some((i, m)) => Ok((m, if records.len() > 1 { 1 - i } else { 0 })),
            None => Err(AuditError(
                "the token's audit high-water mark objects (hsmkeyd.audit.v1) hold no readable \
                 record; hsmkeyd will not guess sequence numbers. Restore the token from a \
                 backup, or remove both objects to start a new chain (which `hsmkeyctl audit \
                 verify` will show as a new chain)"
                    .into(),
            )),
        }
    }
}

/// The chain's state in the running daemon.
#[derive(Debug)]
pub(super) struct Chain {
    /// The next entry's sequence number.
    pub(super) next_seq: u64,
    /// Sequence numbers below this are reserved in the token.
    pub(super) limit: u64,
    /// Chain value of the last entry written.
    pub(super) prev: [u8; 32],
    /// `HSMKEYD_CHAIN_LINK` for the run's first entry, until it is written.
    pub(super) link: Option<String>,
    /// The last entry written that is not a checkpoint.
    pub(super) last_plain: Option<(u64, [u8; 32])>,
    /// The highest sequence number a checkpoint has signed.
    pub(super) signed: u64,
    /// Entries written since the last checkpoint's head.
    pub(super) unsigned: u64,
}

impl Chain {
    /// A run continuing from `mark`; nothing may be written before [`Chain::reserve`].
    pub(super) fn start(mark: Mark) -> Chain {
        let (link_seq, link_chain) = mark.checkpoint.unwrap_or((0, GENESIS));
        Chain {
            next_seq: mark.next,
            limit: mark.next,
            prev: link_chain,
            link: Some(format!("{link_seq} {}", hex::encode(link_chain))),
            last_plain: None,
            signed: 0,
            unsigned: 0,
        }
    }

    /// The chain fields of the next entry, whose other fields are `covered`: its chain
    /// value is SHA-256(previous || [`encode`] of all of them), hashed as the encoding is
    /// produced.
    pub(super) fn stamp(&self, covered: &Covered<'_>) -> Result<Stamp, AuditError> {
        if self.next_seq >= self.limit {
            return Err(AuditError(format!(
                "audit sequence number {} is beyond the range reserved in the token (below \
                 {}): the token has not taken a new high-water mark",
                self.next_seq, self.limit
            )));
        }
        let seq = self.next_seq.to_string();
        let mut ours: Vec<(&str, &[u8])> = vec![(SEQ, seq.as_bytes())];
        if let Some(l) = &self.link {
            ours.push((LINK, l.as_bytes()));
        }
        ours.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut h = Sha256::new();
        h.update(self.prev);
        let mut feed = |b: &[u8]| h.update(b);
        let (mut theirs, mut ours) = (covered.0.iter().peekable(), ours.into_iter().peekable());
        loop {
            let next = match (theirs.peek(), ours.peek()) {
                (Some(a), Some(b)) if a.0.as_bytes() <= b.0.as_bytes() => theirs.next().copied(),
                (Some(_), Some(_)) | (None, Some(_)) => ours.next(),
                (Some(_), None) => theirs.next().copied(),
                (None, None) => break,
            };
            if let Some((k, v)) = next {
                put_field(&mut feed, k, v);
            }
        }
        let chain: [u8; 32] = h.finalize().into();
        Ok(Stamp {
            seq,
            link: self.link.clone(),
            chain_hex: hex::encode(chain),
            chain,
        })
    }

    /// The entry [`Chain::stamp`]ed is recorded.
    pub(super) fn advance(&mut self, link: [u8; 32], checkpoint: bool) -> (u64, [u8; 32]) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.prev = link;
        self.link = None;
        if !checkpoint {
            self.last_plain = Some((seq, link));
            self.unsigned += 1;
        }
        (seq, link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_sorted_length_prefixed_and_leaves_out_chain_and_signature() {
        let enc = encode([
            ("MESSAGE", b"m".as_slice()),
            ("HSMKEYD_SEQ", b"7"),
            ("PRIORITY", b"5"),
            ("HSMKEYD_CHAIN", b"ff"),
            ("HSMKEYD_SIGNATURE", b"00"),
            ("MESSAGE_ID", b"ab"),
            ("SYSLOG_IDENTIFIER", b"hsmkeyd"),
        ]);
        let mut want = Vec::new();
        for (k, v) in [("HSMKEYD_SEQ", "7"), ("MESSAGE", "m"), ("MESSAGE_ID", "ab")] {
            want.extend_from_slice(&(k.len() as u64).to_be_bytes());
            want.extend_from_slice(k.as_bytes());
            want.extend_from_slice(&(v.len() as u64).to_be_bytes());
            want.extend_from_slice(v.as_bytes());
        }
        assert_eq!(enc, want);
    }

    #[test]
    fn a_mark_survives_its_label_and_the_higher_of_two_wins() {
        let m = Mark {
            next: 20_001,
            checkpoint: Some((123, [7; 32])),
        };
        assert_eq!(Mark::from_record(&m.to_record()), Some(m));
        let torn = b"{\"next\":3".to_vec();
        assert_eq!(Mark::pick(&[torn.clone(), m.to_record()]).unwrap(), (m, 0));
        assert_eq!(
            Mark::pick(&[Mark::FRESH.to_record(), m.to_record()]).unwrap(),
            (m, 0)
        );
        assert!(Mark::pick(&[torn.clone(), torn]).is_err());
    }

    #[test]
    fn writing_beyond_the_reservation_is_refused() {
        let mut c = Chain::start(Mark::FRESH);
        let f = [("HSMKEYD_EVENT", b"X".as_slice())];
        assert!(c.stamp(&Covered::new(f)).is_err());
        c.limit = 2;
        let stamp = c.stamp(&Covered::new(f)).unwrap();
        assert!(stamp
            .fields()
            .any(|(k, v)| k == LINK && v.starts_with("0 0000")));
        let _ = c.advance(stamp.chain, false);
        assert!(c.stamp(&Covered::new([])).is_err());
    }

    #[test]
    fn a_stamp_chains_the_encoding_of_every_field_its_own_included() {
        let mut c = Chain::start(Mark {
            next: 41,
            checkpoint: Some((40, [9; 32])),
        });
        c.limit = 100;
        // Names on both sides of HSMKEYD_CHAIN_LINK and HSMKEYD_SEQ, and one not covered.
        let entry = [
            ("MESSAGE", b"m".as_slice()),
            ("HSMKEYD_A", b"a"),
            ("HSMKEYD_KID", b"k"),
            ("HSMKEYD_STATUS", b"200"),
            ("PRIORITY", b"5"),
        ];
        for _ in 0..2 {
            let prev = c.prev;
            let stamp = c.stamp(&Covered::new(entry)).unwrap();
            let all: Vec<(&str, &[u8])> = entry
                .into_iter()
                .chain(stamp.fields().map(|(k, v)| (k, v.as_bytes())))
                .collect();
            assert_eq!(stamp.chain, next_link(&prev, &encode(all)));
            assert!(stamp
                .fields()
                .any(|(k, v)| k == CHAIN && v == hex::encode(stamp.chain)));
            let _ = c.advance(stamp.chain, false);
        }
    }

    #[test]
    fn the_spki_of_a_point_is_91_bytes_of_der() {
        let der = spki_der(&[4; 65]);
        assert_eq!(der.len(), 91);
        assert!(public_key_pem(&[4; 65]).starts_with("-----BEGIN PUBLIC KEY-----\nMFkw"));
    }
}
