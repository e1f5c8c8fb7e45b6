//! The tamper-evident audit trail in a real systemd-journald (one per test, in its own mount
//! namespace): entries are hash-chained and HSM-signed checkpoints cover them;
//! `hsmkeyctl audit verify` accepts a clean trail (from the journal, a journal file or
//! directory, an export) and names each kind of tampering with its own exit status; a
//! restart continues the chain; a checkpoint signature verifies with an independent library.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixture::{demo_token, EC};
use common::journal::Journal;
use common::{run_ok, Daemon, Setup, Token};
use serde_json::json;

const CTL: &str = env!("CARGO_BIN_EXE_hsmkeyctl");

/// Checkpoints every five entries, so a short run has several.
fn in_journal(j: &Journal) -> Setup {
    Setup {
        audit: "sink = \"journald\"\ncheckpoint_entries = 5\n".to_string(),
        namespace: Some(j.pid()),
        ..Setup::default()
    }
}

/// Twelve changes and refusals: enough entries for a few checkpoints.
fn busy(d: &Daemon) {
    let c = d.client();
    for i in 0..10 {
        let r = c.patch(EC, &json!({"description": format!("round {i}")}));
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let r = c.patch(EC, &json!({"label": 7}));
    assert_eq!(r.status, 400);
}

/// Saves the audit-signing key the daemon publishes; returns its path.
fn save_key(d: &Daemon, dir: &Path) -> PathBuf {
    let r = d.client().get("/v1/audit/key");
    assert_eq!(r.status, 200);
    let body = r.json();
    let path = dir.join("audit-key.pem");
    std::fs::write(&path, body["public_key_pem"].as_str().unwrap()).unwrap();
    path
}

/// `hsmkeyctl audit verify ARGS` inside the journal's namespace: exit status and stdout.
fn verify(j: &Journal, t: &Token, args: &[&str]) -> (i32, String) {
    let out: Output = j
        .command(CTL)
        .arg("--socket")
        .arg(t.path().join("api.sock"))
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// hsmkeyd's entries as `journalctl -o export` blocks (none of our values holds a newline,
/// so every field is in text form).
fn export_entries(j: &Journal) -> Vec<String> {
    let out = run_ok(
        j.command("journalctl").args([
            "-o",
            "export",
            "--no-pager",
            "-q",
            "SYSLOG_IDENTIFIER=hsmkeyd",
        ]),
        "journalctl -o export",
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n\n")
        .filter(|b| b.contains("HSMKEYD_EVENT="))
        .map(str::to_string)
        .collect()
}

fn field<'a>(entry: &'a str, name: &str) -> Option<&'a str> {
    entry
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

fn set_field(entry: &str, name: &str, value: &str) -> String {
    entry
        .lines()
        .map(
            |l| match l.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                Some(_) => format!("{name}={value}"),
                None => l.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

fn write_export(dir: &Path, name: &str, entries: &[String]) -> PathBuf {
    let path = dir.join(name);
    let mut text = entries.join("\n\n");
    text.push_str("\n\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn is_checkpoint(e: &str) -> bool {
    field(e, "HSMKEYD_EVENT") == Some("AUDIT_CHECKPOINT")
}

/// Index of a plain (non-checkpoint) entry in the middle of the trail.
fn middle_plain(entries: &[String]) -> usize {
    let mid = entries.len() / 2;
    (mid..entries.len())
        .find(|i| !is_checkpoint(&entries[*i]) && !is_checkpoint(&entries[*i + 1]))
        .unwrap()
}

/// A journal file holding `entries` as a journald writes them: the user fields of each are
/// sent again through the native protocol to a fresh journald (what
/// systemd-journal-remote would do with the export, without needing it installed), whose
/// file is then copied to `dir`.
fn rewrite_as_journal_file(entries: &[String], dir: &Path) -> PathBuf {
    let j = Journal::start();
    let socket = format!("/proc/{}/root/run/systemd/journal/socket", j.pid());
    let sock = UnixDatagram::unbound().unwrap();
    for e in entries {
        let mut datagram = Vec::new();
        for l in e.lines().filter(|l| !l.starts_with('_')) {
            datagram.extend_from_slice(l.as_bytes());
            datagram.push(b'\n');
        }
        let _ = sock.send_to(&datagram, &socket).unwrap();
    }
    let _ = j.wait_for("the rewritten entries", |got| {
        got.iter()
            .filter(|e| e["HSMKEYD_EVENT"].is_string())
            .count()
            == entries.len()
    });
    let out = run_ok(
        j.command("sh").args([
            "-c",
            "journalctl --sync; find /run/log/journal /var/log/journal -name '*.journal' | head -1",
        ]),
        "finding the journal file",
    );
    let inside = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!inside.is_empty(), "journald wrote no file");
    let file = dir.join("rewritten.journal");
    let _ = run_ok(
        j.command("cp").arg(&inside).arg(&file),
        "copying the journal file",
    );
    file
}

/// A daemon run with checkpoints, stopped cleanly; the key it published.
fn recorded_run(j: &Journal, t: &Token, dir: &Path) -> PathBuf {
    let d = Daemon::start(t, &in_journal(j));
    busy(&d);
    let key = save_key(&d, dir);
    // The daemon answers the key itself while it runs.
    let (status, text) = verify(j, t, &[]);
    assert!(status == 0 || status == 12, "{text}");
    assert_eq!(d.stop(), 0);
    let _ = j.wait_for("the stop checkpoint", |e| {
        e.last()
            .is_some_and(|l| l["HSMKEYD_CHECKPOINT_REASON"] == "stop")
    });
    key
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_clean_run_verifies_from_the_journal_a_file_a_directory_and_an_export() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    let key = recorded_run(&j, &t, dir.path());
    let key = key.to_str().unwrap();

    let (status, text) = verify(&j, &t, &["--key", key]);
    assert_eq!(status, 0, "{text}");
    assert!(text.starts_with("OK: "), "{text}");
    assert!(text.contains("in 1 run(s)"), "{text}");
    let entries = export_entries(&j);
    let checkpoints = entries.iter().filter(|e| is_checkpoint(e)).count();
    assert!(checkpoints >= 3, "{checkpoints} checkpoints");
    assert!(
        text.contains(&format!("{} chained entries", entries.len())),
        "{text}"
    );
    assert!(
        text.contains(&format!("{checkpoints} checkpoint(s) verified")),
        "{text}"
    );

    // Every entry is chained; sequence numbers follow each other; the last one is the
    // stop checkpoint, signing DAEMON_STOPPED just before it.
    let seqs: Vec<u64> = entries
        .iter()
        .map(|e| field(e, "HSMKEYD_SEQ").unwrap().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let last = entries.last().unwrap();
    assert_eq!(field(last, "HSMKEYD_CHECKPOINT_REASON"), Some("stop"));
    assert_eq!(
        field(last, "HSMKEYD_CHECKPOINT_SEQ"),
        field(&entries[entries.len() - 2], "HSMKEYD_SEQ")
    );
    assert_eq!(
        field(&entries[entries.len() - 2], "HSMKEYD_EVENT"),
        Some("DAEMON_STOPPED")
    );

    let export = write_export(dir.path(), "clean.export", &entries);
    let (status, text) = verify(
        &j,
        &t,
        &["--key", key, "--export", export.to_str().unwrap()],
    );
    assert_eq!(status, 0, "{text}");

    let out = run_ok(
        j.command("sh").args([
            "-c",
            "journalctl --sync; find /run/log/journal /var/log/journal -name 'system.journal' | head -1",
        ]),
        "finding the journal file",
    );
    let file = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (status, text) = verify(&j, &t, &["--key", key, "--file", &file]);
    assert_eq!(status, 0, "{text}");
    let directory = Path::new(&file)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let (status, text) = verify(&j, &t, &["--key", key, "--directory", &directory]);
    assert_eq!(status, 0, "{text}");
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn deleting_one_entry_from_a_journal_file_is_a_gap() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    let key = recorded_run(&j, &t, dir.path());
    let mut entries = export_entries(&j);
    let at = middle_plain(&entries);
    let gone = field(&entries[at], "HSMKEYD_SEQ").unwrap().to_string();
    let _ = entries.remove(at);
    let file = rewrite_as_journal_file(&entries, dir.path());
    let (status, text) = verify(
        &j,
        &t,
        &[
            "--key",
            key.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(status, 11, "{text}");
    assert!(text.starts_with("gap in HSMKEYD_SEQ"), "{text}");
    assert!(
        text.contains(&format!("1 entries missing ({gone}..{gone})")),
        "{text}"
    );
    // The entries around the gap are shown.
    assert!(text.contains("> seq"), "{text}");
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn changing_reordering_truncating_and_forging_are_each_named() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    let key = recorded_run(&j, &t, dir.path());
    let key = key.to_str().unwrap();
    let entries = export_entries(&j);
    let at = middle_plain(&entries);
    let seq_at = field(&entries[at], "HSMKEYD_SEQ").unwrap().to_string();
    let check = |name: &str, tampered: Vec<String>, status: i32, says: &str| {
        let export = write_export(dir.path(), name, &tampered);
        let (got, text) = verify(
            &j,
            &t,
            &["--key", key, "--export", export.to_str().unwrap()],
        );
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(says), "{name}: wanted {says:?} in\n{text}");
    };

    // One field of one entry changed.
    let mut changed = entries.clone();
    changed[at] = set_field(&changed[at], "HSMKEYD_PRINCIPAL", "somebody-else");
    check(
        "changed",
        changed,
        10,
        &format!("broken link at entry {seq_at}: its fields do not hash"),
    );

    // Two entries swapped.
    let mut swapped = entries.clone();
    swapped.swap(at, at + 1);
    check("reordered", swapped, 10, "entries are out of order");

    // The journal cut after the last checkpoint but one: the stop checkpoint is gone, so
    // the entries it signed are an unsigned tail.
    let last_but_one = entries
        .iter()
        .rposition(|e| is_checkpoint(e) && field(e, "HSMKEYD_CHECKPOINT_REASON") != Some("stop"))
        .unwrap();
    let signed_by_it: u64 = field(&entries[last_but_one], "HSMKEYD_CHECKPOINT_SEQ")
        .unwrap()
        .parse()
        .unwrap();
    let mut truncated = entries.clone();
    truncated.truncate(entries.len() - 1);
    check(
        "truncated",
        truncated,
        12,
        &format!("unsigned tail: entries {}..", signed_by_it + 1),
    );

    // A checkpoint's signature replaced by another (valid) checkpoint signature.
    let cps: Vec<usize> = (0..entries.len())
        .filter(|i| is_checkpoint(&entries[*i]))
        .collect();
    let mut forged = entries.clone();
    let other = field(&entries[cps[0]], "HSMKEYD_SIGNATURE")
        .unwrap()
        .to_string();
    forged[cps[1]] = set_field(&forged[cps[1]], "HSMKEYD_SIGNATURE", &other);
    let cp_seq = field(&entries[cps[1]], "HSMKEYD_SEQ").unwrap();
    check(
        "forged",
        forged,
        13,
        &format!("bad signature: the signature of checkpoint {cp_seq}"),
    );

    // Verifying against another key fails on the fingerprint.
    let other_key = dir.path().join("other.pem");
    let _ = run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out {} 2>/dev/null",
            other_key.display()
        )),
        "making another key",
    );
    let export = write_export(dir.path(), "clean", &entries);
    let (got, text) = verify(
        &j,
        &t,
        &[
            "--key",
            other_key.to_str().unwrap(),
            "--export",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(got, 13, "{text}");
    assert!(text.contains("not by the audit-signing key"), "{text}");
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_restart_continues_the_chain_from_the_last_checkpoint() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    let key = recorded_run(&j, &t, dir.path());
    let first_run = export_entries(&j);
    let stop_cp = first_run.last().unwrap().clone();

    let d = Daemon::start(&t, &in_journal(&j));
    busy(&d);
    assert_eq!(d.stop(), 0);
    let _ = j.wait_for("the second stop checkpoint", |e| {
        e.iter()
            .filter(|e| e["HSMKEYD_CHECKPOINT_REASON"] == "stop")
            .count()
            == 2
    });
    let all = export_entries(&j);
    let second = &all[first_run.len()];
    assert_eq!(
        field(second, "HSMKEYD_CHAIN_LINK"),
        Some(
            format!(
                "{} {}",
                field(&stop_cp, "HSMKEYD_SEQ").unwrap(),
                field(&stop_cp, "HSMKEYD_CHAIN").unwrap()
            )
            .as_str()
        ),
        "the second run's first entry links to the first run's stop checkpoint"
    );
    let seq = |e: &str| field(e, "HSMKEYD_SEQ").unwrap().parse::<u64>().unwrap();
    assert!(
        seq(second) > seq(&stop_cp),
        "sequence numbers never go back"
    );

    let (status, text) = verify(&j, &t, &["--key", key.to_str().unwrap()]);
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("in 2 run(s)"), "{text}");

    // Deleting the first run's tail (its stop checkpoint) is seen by the second run's link.
    let mut cut = all.clone();
    let _ = cut.remove(first_run.len() - 1);
    let export = write_export(dir.path(), "cut", &cut);
    let (status, text) = verify(
        &j,
        &t,
        &[
            "--key",
            key.to_str().unwrap(),
            "--export",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(status, 11, "{text}");
    assert!(text.contains("which is missing"), "{text}");
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_checkpoint_signature_verifies_with_python_cryptography_and_the_fingerprint_with_openssl() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    let key = recorded_run(&j, &t, dir.path());
    let entries = export_entries(&j);
    let cp = entries.iter().find(|e| is_checkpoint(e)).unwrap();

    let script = r#"
import sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
key = serialization.load_pem_public_key(open(sys.argv[1], "rb").read())
seq, head, sig = sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
message = f"hsmkeyd-audit-checkpoint v1 {seq} {head}".encode()
der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
key.verify(der, message, ec.ECDSA(hashes.SHA256()))
print("verified")
"#;
    let py = common::python::python_with(&[("cryptography", "cryptography")]);
    let run = |sig: &str| {
        Command::new(&py)
            .args(["-c", script])
            .arg(&key)
            .arg(field(cp, "HSMKEYD_CHECKPOINT_SEQ").unwrap())
            .arg(field(cp, "HSMKEYD_CHECKPOINT_HEAD").unwrap())
            .arg(sig)
            .output()
            .unwrap()
    };
    let sig = field(cp, "HSMKEYD_SIGNATURE").unwrap();
    let out = run(sig);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and not with one bit changed.
    let mut flipped = sig.to_string();
    let c = if flipped.ends_with('0') { "1" } else { "0" };
    flipped.replace_range(flipped.len() - 1.., c);
    assert!(!run(&flipped).status.success());

    // The fingerprint in the checkpoint is the SHA-256 of the key's DER, as openssl has it.
    let out = run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "openssl pkey -pubin -in {} -outform DER | sha256sum",
            key.display()
        )),
        "openssl pkey",
    );
    let openssl = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        Some(openssl.split_whitespace().next().unwrap()),
        field(cp, "HSMKEYD_KEY_FINGERPRINT")
    );
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_crash_leaves_an_unsigned_tail_the_next_run_links_past_and_the_verifier_names() {
    let j = Journal::start();
    let t = demo_token();
    let dir = tempfile::tempdir().unwrap();
    // First run: checkpoints every five entries, then kill -9 right after twelve more
    // entries, so the last few are chained but no checkpoint signs them.
    let d = Daemon::start(&t, &in_journal(&j));
    let key = save_key(&d, dir.path());
    busy(&d);
    // One refusal (one entry) at a time until one to three plain entries follow the last
    // checkpoint: then no checkpoint is due (every five) and the kill leaves a real tail.
    for round in 0.. {
        assert!(round < 20, "never found a moment between checkpoints");
        let r = d.client().patch(EC, &json!({"label": 7}));
        assert_eq!(r.status, 400);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = export_entries(&j);
        let tail = now.iter().rev().take_while(|e| !is_checkpoint(e)).count();
        if (1..=3).contains(&tail) {
            break;
        }
    }
    // The daemon counts what it chained (and what that cost: the benchmark's figure).
    let st = d.client().get("/v1/status").json();
    let chained = st["audit"]["chained_entries"].as_u64().unwrap();
    let journaled = export_entries(&j)
        .iter()
        .filter(|e| field(e, "HSMKEYD_SEQ").is_some())
        .count() as u64;
    assert!(
        chained > 20 && (chained..=chained + 1).contains(&journaled),
        "status says {chained} chained, the journal has {journaled}: {st}"
    );
    assert!(st["audit"]["chain_us"].as_u64().is_some(), "{st}");
    drop(d); // SIGKILL: no stop checkpoint.
    let crashed = export_entries(&j);
    let last = crashed.last().unwrap();
    assert!(!is_checkpoint(last), "{last}");
    let seq = |e: &str| field(e, "HSMKEYD_SEQ").unwrap().parse::<u64>().unwrap();
    let last_signed = crashed
        .iter()
        .rev()
        .find(|e| is_checkpoint(e))
        .map(|e| {
            field(e, "HSMKEYD_CHECKPOINT_SEQ")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .unwrap();
    let crash_last = seq(last);

    // Second run after the crash: numbers go on past everything the first run used.
    let d = Daemon::start(&t, &in_journal(&j));
    busy(&d);
    assert_eq!(d.stop(), 0);
    let _ = j.wait_for("the stop checkpoint", |e| {
        e.last()
            .is_some_and(|l| l["HSMKEYD_CHECKPOINT_REASON"] == "stop")
    });
    let all = export_entries(&j);
    let second = &all[crashed.len()];
    assert!(
        seq(second) > crash_last,
        "a number of the crashed run was used again: {} after {crash_last}",
        seq(second)
    );

    let (status, text) = verify(&j, &t, &["--key", key.to_str().unwrap()]);
    assert_eq!(status, 12, "{text}");
    assert!(
        text.contains(&format!(
            "unsigned tail: entries {}..{crash_last}",
            last_signed + 1
        )),
        "the crashed run's tail is named: {text}"
    );
    assert!(text.contains("in 2 run(s)"), "{text}");

    // The second run's first entry names the link it continues from: the crashed run's
    // last signed checkpoint (the token's high-water mark), which the verifier checked.
    let link = field(second, "HSMKEYD_CHAIN_LINK").unwrap().to_string();
    let cp = crashed.iter().rev().find(|e| is_checkpoint(e)).unwrap();
    let cp_seq = field(cp, "HSMKEYD_SEQ").unwrap();
    assert_eq!(
        link,
        format!("{cp_seq} {}", field(cp, "HSMKEYD_CHAIN").unwrap()),
        "the run after the crash links to the last checkpoint before it"
    );
    // On its own, the second run verifies, and says where it continues from.
    let export = write_export(dir.path(), "second", &all[crashed.len()..]);
    let (status, text) = verify(
        &j,
        &t,
        &[
            "--key",
            key.to_str().unwrap(),
            "--export",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(status, 0, "{text}");
    assert!(
        text.contains(&format!(
            "continuing from checkpoint {cp_seq}, which is not in it"
        )),
        "{text}"
    );
}
