//! Consistency of updates against a real SoftHSM token: a failed write leaves the key as it
//! was (labels and metadata), a crash half-way is rolled back at startup, superseded
//! metadata generations are cleaned up, concurrent updates never interleave, and a lost
//! session is recovered. The token is always read back independently with pkcs11-tool.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};

use common::{Daemon, Setup, Token, SOFTHSM, TOKEN_LABEL};
use serde_json::{json, Value};

const EC: &str = "ec01";
const EC2: &str = "ec02";

fn meta_label(kid: &str) -> String {
    format!("hsmkeyd-meta:{kid}")
}

/// hsmkeyd's metadata objects of `kid`, as pkcs11-tool lists them.
fn meta_count(t: &Token, kid: &str) -> usize {
    let label = meta_label(kid);
    t.objects()
        .iter()
        .filter(|o| o.class == "Data" && o.label == label)
        .count()
}

/// The JSON value of the (single) metadata object of `kid`, read with pkcs11-tool.
fn read_meta(t: &Token, kid: &str) -> Value {
    let pin = std::fs::read_to_string(&t.pin_file).unwrap();
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &t.conf)
        .args(["--module", SOFTHSM, "--token-label", TOKEN_LABEL])
        .args(["--login", "--pin", pin.trim()])
        .args([
            "--read-object",
            "--type",
            "data",
            "--label",
            &meta_label(kid),
        ])
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool --read-object: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "metadata of {kid} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Plants a metadata object by hand, as a crashed daemon would have left it.
fn plant_meta(t: &Token, kid: &str, record: &Value) {
    let file = t.path().join(format!("meta-{kid}-{}.json", record["seq"]));
    std::fs::write(&file, record.to_string()).unwrap();
    t.devtoken(&[
        "raw-data",
        "--label",
        &meta_label(kid),
        "--application",
        "hsmkeyd.meta.v1",
        "--value-file",
        file.to_str().unwrap(),
    ]);
}

fn pair(label: &str) -> Vec<(String, String)> {
    vec![
        ("Private".to_string(), label.to_string()),
        ("Public".to_string(), label.to_string()),
    ]
}

fn faulty(dir: &Path) -> Setup {
    Setup {
        fault_dir: Some(dir.to_path_buf()),
        ..Setup::default()
    }
}

fn counter(dir: &Path, name: &str) -> u64 {
    common::fault_count(dir, name)
}

#[test]
fn a_failed_label_write_is_rolled_back() {
    let t = Token::new();
    t.gen("ec-p256", EC, "ec-old", &[]);
    t.gen("ec-p256", EC2, "ec2-old", &[]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &faulty(faults.path()));
    let c = d.client();

    // EC gets a metadata record first, so the rollback has a record to restore.
    common::Response::ok(&c.patch(EC, &json!({"description": "before"})));
    assert_eq!(meta_count(&t, EC), 1);

    // The first C_SetAttributeValue (one object's label) passes, the second fails.
    std::fs::write(faults.path().join("setattr_fail_after"), "1").unwrap();
    let r = c.patch(EC, &json!({"label": "ec-new"}));
    r.assert_error(503, "token_unavailable");
    assert!(
        !faults.path().join("setattr_fail_after").exists(),
        "the fault was never injected"
    );
    assert_eq!(
        t.labels_of(EC),
        pair("ec-old"),
        "both objects must carry the old label again"
    );
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["label"], "ec-old");
    assert_eq!(key["state"], "ok");
    assert_eq!(key["description"], "before");
    assert_eq!(meta_count(&t, EC), 1, "exactly one metadata object");
    let rec = read_meta(&t, EC);
    assert!(rec.get("pending").is_none(), "pending left behind: {rec}");
    assert_eq!(rec["description"], "before");

    // A key without metadata: the pending record is removed, not left behind.
    std::fs::write(faults.path().join("setattr_fail_after"), "1").unwrap();
    c.patch(EC2, &json!({"label": "ec2-new"}))
        .assert_error(503, "token_unavailable");
    assert_eq!(t.labels_of(EC2), pair("ec2-old"));
    assert_eq!(meta_count(&t, EC2), 0, "the pending record must be gone");
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC2}")));
    assert_eq!(
        (key["label"].as_str(), key["state"].as_str()),
        (Some("ec2-old"), Some("ok"))
    );

    // The key is not blocked: the same update now goes through.
    let body = common::Response::ok(&c.patch(EC, &json!({"label": "ec-new"})));
    assert_eq!(body["key"]["label"], "ec-new");
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    assert_eq!(meta_count(&t, EC), 1);
    assert!(read_meta(&t, EC).get("pending").is_none());
}

#[test]
fn a_failed_commit_is_rolled_back_and_stays_so_after_a_restart() {
    let t = Token::new();
    t.gen("ec-p256", EC, "ec-old", &[]);
    t.gen("ec-p256", EC2, "ec2-old", &[]);
    let faults = tempfile::tempdir().unwrap();
    let setup = faulty(faults.path());
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    common::Response::ok(&c.patch(EC, &json!({"description": "kept"})));
    let seq_before = read_meta(&t, EC)["seq"].as_u64().unwrap();

    // The first write (the pending record) fails: nothing at all happens.
    let sets = counter(faults.path(), "C_SetAttributeValue");
    std::fs::write(faults.path().join("create_fail_after"), "0").unwrap();
    c.patch(EC, &json!({"label": "ec-new"}))
        .assert_error(503, "token_unavailable");
    assert!(!faults.path().join("create_fail_after").exists());
    assert_eq!(
        counter(faults.path(), "C_SetAttributeValue"),
        sets,
        "no label may be written when the intent record could not be"
    );
    assert_eq!(t.labels_of(EC), pair("ec-old"));
    assert_eq!(read_meta(&t, EC)["seq"].as_u64(), Some(seq_before));

    // The pending record is written, the labels are changed, the commit fails.
    let creates = counter(faults.path(), "C_CreateObject");
    std::fs::write(faults.path().join("create_fail_after"), "1").unwrap();
    c.patch(EC, &json!({"label": "ec-new"}))
        .assert_error(503, "token_unavailable");
    assert!(
        !faults.path().join("create_fail_after").exists(),
        "the fault was never injected"
    );
    assert!(
        counter(faults.path(), "C_CreateObject") >= creates + 2,
        "the commit was never attempted"
    );
    assert_eq!(t.labels_of(EC), pair("ec-old"));
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["label"], "ec-old");
    assert_eq!(key["state"], "ok");
    assert_eq!(key["description"], "kept");
    assert_eq!(meta_count(&t, EC), 1);
    let rec = read_meta(&t, EC);
    assert!(rec.get("pending").is_none(), "pending left behind: {rec}");
    assert_eq!(rec["description"], "kept");

    // Same on a key that had no record: no metadata object is left.
    std::fs::write(faults.path().join("create_fail_after"), "1").unwrap();
    c.patch(EC2, &json!({"label": "ec2-new"}))
        .assert_error(503, "token_unavailable");
    assert_eq!(t.labels_of(EC2), pair("ec2-old"));
    assert_eq!(meta_count(&t, EC2), 0);

    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["label"], "ec-old");
    assert_eq!(key["state"], "ok");
    assert_eq!(key["description"], "kept");
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC2}")));
    assert_eq!(
        (key["label"].as_str(), key["state"].as_str()),
        (Some("ec2-old"), Some("ok"))
    );
    assert_eq!(t.labels_of(EC), pair("ec-old"));
    assert_eq!(t.labels_of(EC2), pair("ec2-old"));
    assert_eq!(meta_count(&t, EC), 1);
    assert_eq!(meta_count(&t, EC2), 0);
    assert!(read_meta(&t, EC).get("pending").is_none());
}

#[test]
fn a_label_change_interrupted_by_a_crash_is_rolled_back_at_startup() {
    // The token as a crash between relabelling and committing leaves it: both objects
    // already carry the new label, the only record is the pending one naming the old.
    let t = Token::new();
    t.gen("ec-p256", EC, "new", &[]);
    let old_hex = hex::encode("old");
    plant_meta(
        &t,
        EC,
        &json!({
            "kid": EC,
            "seq": 3,
            "description": "kept",
            "roles": ["ops"],
            "updated_at": "2024-01-02T03:04:05Z",
            "pending": {"old_labels": [
                {"kind": "private", "label_hex": old_hex},
                {"kind": "public", "label_hex": old_hex},
            ]},
        }),
    );
    assert_eq!(t.labels_of(EC), pair("new"), "setup");
    assert!(read_meta(&t, EC).get("pending").is_some(), "setup");

    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        key["label"], "old",
        "a half-applied label must never be served"
    );
    assert_eq!(key["state"], "ok");
    assert_eq!(key["description"], "kept");
    assert_eq!(key["roles"], json!(["ops"]));
    assert_eq!(t.labels_of(EC), pair("old"));
    assert_eq!(meta_count(&t, EC), 1);
    let rec = read_meta(&t, EC);
    assert!(rec.get("pending").is_none(), "pending not cleared: {rec}");
    assert!(
        rec["seq"].as_u64().unwrap() > 3,
        "not a new generation: {rec}"
    );
    assert_eq!(rec["description"], "kept");
    assert!(
        d.log().contains("rolled back a label change"),
        "the rollback must be logged: {}",
        d.log()
    );

    // The key is usable again.
    let body = common::Response::ok(&c.patch(EC, &json!({"label": "after"})));
    assert_eq!(body["key"]["label"], "after");
    assert_eq!(t.labels_of(EC), pair("after"));
    assert_eq!(meta_count(&t, EC), 1);
}

#[test]
fn superseded_metadata_generations_are_removed_at_startup() {
    let t = Token::new();
    t.gen("ec-p256", EC, "ec-key", &[]);
    // The newer generation is created first, so object order cannot pick the winner.
    for (seq, description) in [(4, "new"), (3, "old")] {
        plant_meta(
            &t,
            EC,
            &json!({"kid": EC, "seq": seq, "description": description, "roles": [],
                    "updated_at": "2024-01-02T03:04:05Z"}),
        );
    }
    assert_eq!(meta_count(&t, EC), 2, "setup");

    let d = Daemon::start(&t, &Setup::default());
    let key = common::Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["description"], "new");
    assert_eq!(key["state"], "ok");
    assert_eq!(
        meta_count(&t, EC),
        1,
        "the older generation must be destroyed"
    );
    let rec = read_meta(&t, EC);
    assert_eq!(
        (rec["seq"].as_u64(), rec["description"].as_str()),
        (Some(4), Some("new"))
    );

    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&t, &Setup::default());
    let key = common::Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["description"], "new");
    assert_eq!(meta_count(&t, EC), 1);
}

/// Sends every (kid, label) PATCH at once, each on its own connection and thread.
fn patch_all_at_once(
    d: &Daemon,
    requests: Vec<(String, String)>,
) -> Vec<(String, String, common::Response)> {
    let barrier = Arc::new(Barrier::new(requests.len()));
    let threads: Vec<_> = requests
        .into_iter()
        .map(|(kid, label)| {
            let c = d.client();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let _ = barrier.wait();
                let r = c.patch(&kid, &json!({ "label": label }));
                (kid, label, r)
            })
        })
        .collect();
    threads.into_iter().map(|h| h.join().unwrap()).collect()
}

#[track_caller]
fn assert_all_succeeded(results: &[(String, String, common::Response)]) {
    for (kid, label, r) in results {
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("CKR_"),
            "PATCH {kid} -> {label}: a PKCS#11 error leaked: {text}"
        );
        assert_eq!(r.status, 200, "PATCH {kid} -> {label}: {text}");
        // Updates of one key are serialized: each answer shows its own write.
        assert_eq!(
            r.json()["key"]["label"],
            label.as_str(),
            "PATCH {kid}: {text}"
        );
        assert_eq!(r.json()["changed"], json!(["label"]), "PATCH {kid}: {text}");
    }
}

#[test]
fn fifty_concurrent_updates_of_one_key_are_serialized() {
    let t = Token::new();
    t.gen("ec-p256", EC, "start", &[]);
    let d = Daemon::start(&t, &Setup::default());
    let requests: Vec<_> = (0..50)
        .map(|i| (EC.to_string(), format!("concurrent-{i}")))
        .collect();
    let wanted: BTreeSet<String> = requests.iter().map(|(_, l)| l.clone()).collect();
    let results = patch_all_at_once(&d, requests);
    assert_all_succeeded(&results);

    let key = common::Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    let label = key["label"].as_str().unwrap().to_string();
    assert!(
        wanted.contains(&label),
        "final label {label:?} was never requested"
    );
    assert_eq!(key["state"], "ok");
    assert_eq!(t.labels_of(EC), pair(&label), "token and index disagree");
    assert_eq!(meta_count(&t, EC), 1, "exactly one metadata object");
    let rec = read_meta(&t, EC);
    assert!(rec.get("pending").is_none(), "pending left behind: {rec}");
    assert!(
        !d.log().contains("CKR_GENERAL_ERROR"),
        "daemon log: {}",
        d.log()
    );
}

#[test]
fn concurrent_updates_of_different_keys_all_succeed() {
    let t = Token::new();
    let kids: Vec<String> = (0..10).map(|i| format!("e1{i:02x}")).collect();
    for (i, kid) in kids.iter().enumerate() {
        if i % 2 == 0 {
            t.gen("ec-p256", kid, &format!("start-{i}"), &[]);
        } else {
            t.gen("aes256", kid, &format!("start-{i}"), &[]);
        }
    }
    let d = Daemon::start(&t, &Setup::default());
    let mut requests = Vec::new();
    for round in 0..5 {
        for kid in &kids {
            requests.push((kid.clone(), format!("{kid}-label-{round}")));
        }
    }
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (kid, label) in &requests {
        let _ = wanted.entry(kid.clone()).or_default().insert(label.clone());
    }
    let results = patch_all_at_once(&d, requests);
    assert_all_succeeded(&results);

    let c = d.client();
    for (i, kid) in kids.iter().enumerate() {
        let key = common::Response::ok(&c.get(&format!("/v1/keys/{kid}")));
        let label = key["label"].as_str().unwrap().to_string();
        assert!(
            wanted[kid].contains(&label),
            "{kid}: final label {label:?} was never requested"
        );
        assert_eq!(key["state"], "ok");
        let expected = if i % 2 == 0 {
            pair(&label)
        } else {
            vec![("Secret".to_string(), label.clone())]
        };
        assert_eq!(
            t.labels_of(kid),
            expected,
            "{kid}: token and index disagree"
        );
        assert_eq!(meta_count(&t, kid), 1, "{kid}: exactly one metadata object");
    }
}

/// The fault closes the session in use; with SoftHSM, closing a token's last session also
/// logs it out and forgets every object handle the process held, so this also checks that
/// the daemon does not rely on handles that outlived the session loss.
#[test]
fn a_lost_session_is_recovered_transparently() {
    let t = Token::new();
    t.gen("ec-p256", EC, "ec-old", &[]);
    t.gen("ec-p256", EC2, "ec2-old", &[]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &faulty(faults.path()));
    let logins = counter(faults.path(), "C_Login");
    std::fs::write(faults.path().join("session_invalid_once"), "").unwrap();

    let body = common::Response::ok(&d.client().patch(EC, &json!({"label": "ec-new"})));
    assert_eq!(body["key"]["label"], "ec-new");
    assert!(
        !faults.path().join("session_invalid_once").exists(),
        "the session was never dropped"
    );
    assert!(
        counter(faults.path(), "C_Login") > logins,
        "the fresh session must be logged in"
    );
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    assert_eq!(meta_count(&t, EC), 1);
    assert!(read_meta(&t, EC).get("pending").is_none());
    let key = common::Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (key["label"].as_str(), key["state"].as_str()),
        (Some("ec-new"), Some("ok"))
    );

    // And the daemon keeps working afterwards, on this key and on one it never touched
    // since the session was lost.
    common::Response::ok(&d.client().patch(EC, &json!({"label": "ec-again"})));
    assert_eq!(t.labels_of(EC), pair("ec-again"));
    let body = common::Response::ok(&d.client().patch(EC2, &json!({"label": "ec2-new"})));
    assert_eq!(body["key"]["label"], "ec2-new");
    assert_eq!(t.labels_of(EC2), pair("ec2-new"));
}
