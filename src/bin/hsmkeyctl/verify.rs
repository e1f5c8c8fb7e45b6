//! `hsmkeyctl audit verify`: recomputes hsmkeyd's audit hash chain and checks every
//! checkpoint signature, from journal entries in `journalctl -o export` form. Written from
//! the specification in README.md ("Verifying the audit trail"), not from the daemon's
//! code, so it checks the daemon as a third party would.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use super::Failure;

/// Exit status: the chain is broken (an entry changed, reordered or inserted).
pub const EXIT_BROKEN: u8 = 10;
/// Exit status: a gap in `HSMKEYD_SEQ` (entries deleted).
pub const EXIT_GAP: u8 = 11;
/// Exit status: entries after the last checkpoint (an unsigned tail).
pub const EXIT_UNSIGNED: u8 = 12;
/// Exit status: a checkpoint signature does not verify (or names another key).
pub const EXIT_SIGNATURE: u8 = 13;

/// One journal entry: field name → value (bytes; the last value of a repeated field).
pub type Fields = BTreeMap<String, Vec<u8>>;

/// Parses `journalctl -o export` output: `NAME=value` lines, or `NAME`, a little-endian u64
/// length and that many bytes for binary values; a blank line ends an entry.
pub fn parse_export(data: &[u8]) -> Result<Vec<Fields>, String> {
    let mut entries = Vec::new();
    let mut cur = Fields::new();
    let mut i = 0;
    while i < data.len() {
        let end = data[i..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |p| i + p);
        let line = &data[i..end];
        if line.is_empty() {
            if !cur.is_empty() {
                entries.push(std::mem::take(&mut cur));
            }
            i = end + 1;
            continue;
        }
        match line.iter().position(|b| *b == b'=') {
            Some(eq) => {
                let name = String::from_utf8_lossy(&line[..eq]).into_owned();
                let _ = cur.insert(name, line[eq + 1..].to_vec());
                i = end + 1;
            }
            None => {
                let name = String::from_utf8_lossy(line).into_owned();
                let at = end + 1;
                let len_bytes: [u8; 8] = data
                    .get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| format!("export cut inside field {name}"))?;
                let len = u64::from_le_bytes(len_bytes) as usize;
                let value = data
                    .get(at + 8..at + 8 + len)
                    .ok_or_else(|| format!("export cut inside field {name}"))?;
                let _ = cur.insert(name, value.to_vec());
                i = at + 8 + len + 1;
            }
        }
    }
    if !cur.is_empty() {
        entries.push(cur);
    }
    Ok(entries)
}

/// The public key from PEM (SubjectPublicKeyInfo of a P-256 key): the uncompressed point.
pub fn point_of_pem(pem: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("not PEM: {e}"))?;
    if der.len() != 91 || der[26] != 0x04 || !der.starts_with(&[0x30, 0x59, 0x30, 0x13]) {
        return Err("not an uncompressed P-256 public key (SubjectPublicKeyInfo)".into());
    }
    Ok(der[26..].to_vec())
}

/// The key's fingerprint: hex SHA-256 of its DER SubjectPublicKeyInfo.
fn fingerprint(point: &[u8]) -> String {
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    hex::encode(Sha256::digest(der))
}

/// The canonical encoding (README): the `HSMKEYD_*` fields but `HSMKEYD_CHAIN` and
/// `HSMKEYD_SIGNATURE`, plus `MESSAGE_ID` and `MESSAGE`, by name; each name and value
/// preceded by its length as u64 big-endian.
fn encode(e: &Fields) -> Vec<u8> {
    let mut out = Vec::new();
    // A BTreeMap iterates in bytewise name order.
    for (k, v) in e {
        let covered =
            (k.starts_with("HSMKEYD_") && k != "HSMKEYD_CHAIN" && k != "HSMKEYD_SIGNATURE")
                || k == "MESSAGE_ID"
                || k == "MESSAGE";
        if covered {
            out.extend_from_slice(&(k.len() as u64).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u64).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

/// What verification found.
#[derive(Debug)]
pub struct Report {
    /// Exit status (0 when everything verifies).
    pub status: u8,
    /// What to print.
    pub text: String,
}

fn text<'a>(e: &'a Fields, k: &str) -> Option<&'a str> {
    e.get(k).and_then(|v| std::str::from_utf8(v).ok())
}

fn num(e: &Fields, k: &str) -> Option<u64> {
    text(e, k).and_then(|s| s.parse().ok())
}

fn hash(e: &Fields, k: &str) -> Option<[u8; 32]> {
    text(e, k)
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| b.try_into().ok())
}

fn time_of(e: &Fields) -> String {
    num(e, "__REALTIME_TIMESTAMP")
        .and_then(|us| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn line(e: &Fields) -> String {
    format!(
        "seq {:>8}  {}  {:<28} {}",
        text(e, "HSMKEYD_SEQ").unwrap_or("-"),
        time_of(e),
        text(e, "HSMKEYD_EVENT").unwrap_or("-"),
        text(e, "MESSAGE").unwrap_or(""),
    )
}

/// Up to two entries either side of `at`, the one at `at` marked.
fn around(entries: &[&Fields], at: usize) -> String {
    let lo = at.saturating_sub(2);
    let hi = (at + 3).min(entries.len());
    (lo..hi)
        .map(|i| format!("  {} {}", if i == at { ">" } else { " " }, line(entries[i])))
        .collect::<Vec<_>>()
        .join("\n")
}

fn fail(status: u8, what: String, entries: &[&Fields], at: usize) -> Report {
    Report {
        status,
        text: format!("{what}\n{}", around(entries, at)),
    }
}

/// Verifies hsmkeyd's entries (those with `HSMKEYD_EVENT`, in journal order) against the
/// audit-signing key's public point.
pub fn verify(all: &[Fields], key: &[u8]) -> Report {
    let key_fp = fingerprint(key);
    let entries: Vec<&Fields> = all
        .iter()
        .filter(|e| e.contains_key("HSMKEYD_EVENT"))
        .collect();
    let Some(first) = entries.iter().position(|e| e.contains_key("HSMKEYD_SEQ")) else {
        return Report {
            status: EXIT_UNSIGNED,
            text: format!(
                "no chained hsmkeyd entries found ({} entries without HSMKEYD_SEQ)",
                entries.len()
            ),
        };
    };
    let seqs: HashMap<u64, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| num(e, "HSMKEYD_SEQ").map(|s| (s, i)))
        .collect();
    // seq → (chain value, is a checkpoint), as verified so far.
    let mut seen: HashMap<u64, ([u8; 32], bool)> = HashMap::new();
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut runs = 0u64;
    let mut chained = 0u64;
    let mut checkpoints = 0u64;
    let mut unchained = 0u64;
    let mut notes = Vec::new();
    // Per run: highest signed seq, and the last non-checkpoint entry.
    let mut signed: u64 = 0;
    let mut last_plain: Option<(u64, usize)> = None;
    let mut tails: Vec<(u64, u64)> = Vec::new();
    let mut close_run = |signed: u64, last_plain: Option<(u64, usize)>, run_first: u64| {
        if let Some((last, _)) = last_plain {
            if last > signed {
                let from = if signed >= run_first {
                    signed + 1
                } else {
                    run_first
                };
                tails.push((from, last));
            }
        }
    };
    let mut run_first = 0u64;
    for (i, e) in entries.iter().enumerate().skip(first) {
        let Some(seq) = num(e, "HSMKEYD_SEQ") else {
            // The one entry written before the token could be read: a failed login.
            if text(e, "HSMKEYD_EVENT") == Some("HSM_LOGIN")
                && text(e, "HSMKEYD_RESULT") == Some("FAILED")
            {
                unchained += 1;
                continue;
            }
            return fail(
                EXIT_BROKEN,
                "broken chain: an hsmkeyd entry without HSMKEYD_SEQ inside the chain \
                 (inserted?)"
                    .into(),
                &entries,
                i,
            );
        };
        let Some(stored) = hash(e, "HSMKEYD_CHAIN") else {
            return fail(
                EXIT_BROKEN,
                format!("broken chain: entry {seq} has no valid HSMKEYD_CHAIN"),
                &entries,
                i,
            );
        };
        let link = text(e, "HSMKEYD_CHAIN_LINK").map(str::to_string);
        let previous: [u8; 32] = if let Some(link) = link {
            // A run's first entry: it continues from the checkpoint it names.
            let parsed = link.split_once(' ').and_then(|(s, c)| {
                Some((
                    s.parse::<u64>().ok()?,
                    <[u8; 32]>::try_from(hex::decode(c).ok()?).ok()?,
                ))
            });
            let Some((from, from_chain)) = parsed else {
                return fail(
                    EXIT_BROKEN,
                    format!("broken chain: entry {seq} has a malformed HSMKEYD_CHAIN_LINK"),
                    &entries,
                    i,
                );
            };
            if let Some((p, _)) = prev {
                close_run(signed, last_plain, run_first);
                if seq <= p {
                    return fail(
                        EXIT_BROKEN,
                        format!("broken chain: run starting at entry {seq} goes back (after {p})"),
                        &entries,
                        i,
                    );
                }
            }
            match seen.get(&from) {
                Some((c, true)) if *c == from_chain => {}
                Some(_) => {
                    return fail(
                        EXIT_BROKEN,
                        format!(
                            "broken link: the run starting at entry {seq} continues from \
                             checkpoint {from}, which does not match entry {from}"
                        ),
                        &entries,
                        i,
                    )
                }
                None if from == 0 => {
                    if prev.is_some() {
                        return fail(
                            EXIT_BROKEN,
                            format!(
                                "broken chain: entry {seq} starts a new chain in the middle \
                                 of the trail"
                            ),
                            &entries,
                            i,
                        );
                    }
                }
                None if prev.is_none() => notes.push(format!(
                    "the input starts with a run continuing from checkpoint {from}, which \
                     is not in it"
                )),
                None => {
                    return fail(
                        EXIT_GAP,
                        format!(
                            "gap: the run starting at entry {seq} continues from checkpoint \
                             {from}, which is missing (entries deleted)"
                        ),
                        &entries,
                        i,
                    )
                }
            }
            runs += 1;
            run_first = seq;
            signed = 0;
            last_plain = None;
            from_chain
        } else {
            match prev {
                None => {
                    // The input starts inside a run: take this entry's chain on trust.
                    notes.push(format!(
                        "the input starts inside a run, at entry {seq}; earlier entries are \
                         not in it"
                    ));
                    runs += 1;
                    run_first = seq;
                    prev = Some((seq, stored));
                    let _ = seen.insert(seq, (stored, e.contains_key("HSMKEYD_CHECKPOINT_SEQ")));
                    chained += 1;
                    continue;
                }
                Some((p, c)) => {
                    if seq != p + 1 {
                        let missing = p + 1;
                        let later = seqs.get(&missing).is_some_and(|j| *j > i);
                        return if seq <= p || later {
                            fail(
                                EXIT_BROKEN,
                                format!(
                                    "broken chain: entry {seq} follows entry {p}: entries \
                                     are out of order"
                                ),
                                &entries,
                                i,
                            )
                        } else {
                            fail(
                                EXIT_GAP,
                                format!(
                                    "gap in HSMKEYD_SEQ: entry {seq} follows entry {p}; {} \
                                     entries missing ({missing}..{})",
                                    seq - missing,
                                    seq - 1
                                ),
                                &entries,
                                i,
                            )
                        };
                    }
                    c
                }
            }
        };
        let mut h = Sha256::new();
        h.update(previous);
        h.update(encode(e));
        let computed: [u8; 32] = h.finalize().into();
        if computed != stored {
            return fail(
                EXIT_BROKEN,
                format!(
                    "broken link at entry {seq}: its fields do not hash to its HSMKEYD_CHAIN \
                     (changed)"
                ),
                &entries,
                i,
            );
        }
        chained += 1;
        let is_checkpoint = e.contains_key("HSMKEYD_CHECKPOINT_SEQ");
        let _ = seen.insert(seq, (stored, is_checkpoint));
        prev = Some((seq, stored));
        if !is_checkpoint {
            last_plain = Some((seq, i));
            continue;
        }
        // A checkpoint: the head it names, the key, the signature.
        checkpoints += 1;
        let (Some(cs), Some(head)) = (
            num(e, "HSMKEYD_CHECKPOINT_SEQ"),
            hash(e, "HSMKEYD_CHECKPOINT_HEAD"),
        ) else {
            return fail(
                EXIT_SIGNATURE,
                format!("checkpoint {seq} is malformed"),
                &entries,
                i,
            );
        };
        match seen.get(&cs) {
            Some((c, _)) if *c == head => {}
            Some(_) => {
                return fail(
                    EXIT_BROKEN,
                    format!(
                        "broken chain: checkpoint {seq} signs a head that entry {cs} does not have"
                    ),
                    &entries,
                    i,
                )
            }
            None if cs < run_first => {}
            None => {
                return fail(
                    EXIT_GAP,
                    format!("gap: checkpoint {seq} signs entry {cs}, which is missing"),
                    &entries,
                    i,
                )
            }
        }
        let fp = text(e, "HSMKEYD_KEY_FINGERPRINT").unwrap_or("");
        if fp != key_fp {
            return fail(
                EXIT_SIGNATURE,
                format!(
                    "bad signature: checkpoint {seq} was signed by key {fp}, not by the \
                     audit-signing key {key_fp}"
                ),
                &entries,
                i,
            );
        }
        let message = format!("hsmkeyd-audit-checkpoint v1 {cs} {}", hex::encode(head));
        let sig = text(e, "HSMKEYD_SIGNATURE")
            .and_then(|s| hex::decode(s).ok())
            .unwrap_or_default();
        let pk =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key);
        if pk.verify(message.as_bytes(), &sig).is_err() {
            return fail(
                EXIT_SIGNATURE,
                format!(
                    "bad signature: the signature of checkpoint {seq} (over entries up to {cs}) \
                     does not verify with key {key_fp}"
                ),
                &entries,
                i,
            );
        }
        signed = signed.max(cs);
    }
    close_run(signed, last_plain, run_first);
    let chained_entries: Vec<&&Fields> = entries
        .iter()
        .filter(|e| e.contains_key("HSMKEYD_SEQ"))
        .collect();
    let (lo, hi) = (
        chained_entries.first().map_or("-".into(), |e| time_of(e)),
        chained_entries.last().map_or("-".into(), |e| time_of(e)),
    );
    let mut summary = format!(
        "{chained} chained entries in {runs} run(s), {checkpoints} checkpoint(s) verified \
         with key {key_fp}, from {lo} to {hi}"
    );
    if unchained > 0 {
        summary.push_str(&format!(
            "; {unchained} failed HSM login(s) outside the chain (written before the token \
             could be read)"
        ));
    }
    for n in &notes {
        summary.push_str(&format!("\nnote: {n}"));
    }
    if !tails.is_empty() {
        let list = tails
            .iter()
            .map(|(a, b)| format!("{a}..{b}"))
            .collect::<Vec<_>>()
            .join(", ");
        let count: u64 = tails.iter().map(|(a, b)| b - a + 1).sum();
        return Report {
            status: EXIT_UNSIGNED,
            text: format!(
                "unsigned tail: entries {list} ({count} at most) come after the last \
                 checkpoint of their run; they are chained but not signed (truncated, \
                 crashed, or still running)\n{summary}"
            ),
        };
    }
    Report {
        status: 0,
        text: format!("OK: {summary}"),
    }
}

/// Where the entries come from.
pub enum Source<'a> {
    /// This host's journal.
    Host,
    /// Journal files (`journalctl --file`).
    File(&'a std::path::Path),
    /// A journal directory (`journalctl --directory`).
    Directory(&'a std::path::Path),
    /// A `journalctl -o export` dump.
    Export(&'a std::path::Path),
}

/// Reads the entries of `source` in journal order.
pub fn read(source: &Source<'_>) -> Result<Vec<Fields>, Failure> {
    let data = match source {
        Source::Export(p) => std::fs::read(p)
            .map_err(|e| Failure::Unavailable(format!("--export {}: {e}", p.display())))?,
        _ => {
            let mut cmd = std::process::Command::new(
                std::env::var_os("JOURNALCTL").unwrap_or_else(|| "journalctl".into()),
            );
            let _ = cmd.args(["-o", "export", "--no-pager", "-q"]);
            match source {
                Source::File(p) => {
                    let _ = cmd.arg("--file").arg(p);
                }
                Source::Directory(d) => {
                    let _ = cmd.arg("--directory").arg(d);
                }
                _ => {}
            }
            let _ = cmd.arg("SYSLOG_IDENTIFIER=hsmkeyd");
            let out = cmd
                .output()
                .map_err(|e| Failure::Unavailable(format!("cannot run journalctl: {e}")))?;
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr);
                return Err(Failure::Unavailable(format!(
                    "journalctl failed: {}",
                    why.trim()
                )));
            }
            out.stdout
        }
    };
    parse_export(&data).map_err(Failure::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_text_fields_of_an_export_are_read() {
        let mut data = b"A=1\nB\n".to_vec();
        data.extend_from_slice(&3u64.to_le_bytes());
        data.extend_from_slice(b"x\ny\n\nA=2\n\n");
        let e = parse_export(&data).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["B"], b"x\ny");
        assert_eq!(e[1]["A"], b"2");
    }
}
