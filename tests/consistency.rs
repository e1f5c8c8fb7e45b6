//! Consistency of updates against a real SoftHSM token: a failed write leaves the key as it
//! was (labels and metadata), a crash half-way is rolled back at startup, superseded
//! metadata generations are cleaned up, concurrent updates never interleave, and a lost
//! session is recovered. The token is always read back independently with pkcs11-tool.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};

use common::fixture::{pair, token_with, Key, EC, EC2};
use common::{Daemon, Setup, Token};
use serde_json::{json, Value};

fn meta_label(kid: &str) -> String {
    format!("hsmkeyd-meta:{kid}")
}

/// hsmkeyd's metadata objects of `kid`, as pkcs11-tool lists them (the record may follow
/// the label's `hsmkeyd-meta:<kid>` after a space).
fn meta_objects(t: &Token, kid: &str) -> Vec<common::P11Object> {
    let label = meta_label(kid);
    t.objects()
        .into_iter()
        .filter(|o| {
            o.class == "Data" && (o.label == label || o.label.starts_with(&format!("{label} ")))
        })
        .collect()
}

fn meta_count(t: &Token, kid: &str) -> usize {
    meta_objects(t, kid).len()
}

/// The newest record of `kid`, read with pkcs11-tool: from an object's label when it holds
/// one, else from its CKA_VALUE.
fn read_meta(t: &Token, kid: &str) -> Value {
    let label = meta_label(kid);
    let mut records: Vec<Value> = meta_objects(t, kid)
        .iter()
        .map(|o| match o.label.strip_prefix(&format!("{label} ")) {
            Some(json) => serde_json::from_str(json).unwrap(),
            None => t.data_value(&label),
        })
        .collect();
    records.sort_by_key(|r| r["seq"].as_u64());
    records
        .pop()
        .unwrap_or_else(|| panic!("{kid} has no metadata object"))
}

/// Waits (a few seconds at most) until the background worker has settled `kid`: its
/// record and its spare (two objects, see meta.rs), no label change in progress; returns
/// the newest record.
fn settled_meta(t: &Token, kid: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let n = meta_count(t, kid);
        if n == 2 {
            let rec = read_meta(t, kid);
            if rec.get("relabel").is_none() && rec.get("pending").is_none() {
                return rec;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{kid} never settled: {n} metadata objects"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until `kid` has no metadata object left.
fn no_meta_eventually(t: &Token, kid: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while meta_count(t, kid) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{kid} keeps {} metadata objects",
            meta_count(t, kid)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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

#[test]
fn a_failed_label_write_is_rolled_back() {
    let t = token_with(&[Key::ec(EC, "ec-old"), Key::ec(EC2, "ec2-old")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();

    // EC gets a metadata record first, so the rollback has a record to restore.
    common::Response::ok(&c.patch(EC, &json!({"description": "before"})));
    assert_eq!(settled_meta(&t, EC)["description"], "before");

    // The record write (in place) passes, then one object's label write fails (the two
    // run at once; the other one, if it went through, is set back).
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
    let rec = settled_meta(&t, EC);
    assert!(rec.get("relabel").is_none(), "relabel left behind: {rec}");
    assert_eq!(rec["description"], "before");

    // A key without metadata (its record is created, not set), and one object's label
    // write fails: the other is set back and the record made for the update goes.
    std::fs::write(faults.path().join("setattr_fail_after"), "1").unwrap();
    c.patch(EC2, &json!({"label": "ec2-new"}))
        .assert_error(503, "token_unavailable");
    assert_eq!(t.labels_of(EC2), pair("ec2-old"));
    no_meta_eventually(&t, EC2);
    let key = common::Response::ok(&c.get(&format!("/v1/keys/{EC2}")));
    assert_eq!(
        (key["label"].as_str(), key["state"].as_str()),
        (Some("ec2-old"), Some("ok"))
    );

    // The key is not blocked: the same update now goes through.
    let body = common::Response::ok(&c.patch(EC, &json!({"label": "ec-new"})));
    assert_eq!(body["key"]["label"], "ec-new");
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    let rec = settled_meta(&t, EC);
    assert_eq!(rec["description"], "before");
}

#[test]
fn a_pairs_two_label_writes_run_at_once_after_the_record() {
    let t = token_with(&[Key::ec(EC, "ec-old")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    // A record and its spare, so the record write is one C_SetAttributeValue.
    common::Response::ok(&c.patch(EC, &json!({"description": "before"})));
    let _ = settled_meta(&t, EC);

    // The record passes; the next object write is held.
    let sets = common::fault_count(faults.path(), "C_SetAttributeValue");
    let hang = faults.path().join("hang_C_SetAttributeValue");
    std::fs::write(&hang, "1").unwrap();
    let pending = {
        let c = d.client();
        std::thread::spawn(move || c.patch(EC, &json!({"label": "ec-new"})))
    };
    let held = faults.path().join("held_C_SetAttributeValue");
    assert!(
        common::wait_until(
            "an object write to be held",
            std::time::Duration::from_secs(10),
            || { held.exists() }
        ),
        "{}",
        d.log()
    );
    // While one object's write is held, the other's goes through: it does not wait.
    let both = common::wait_until(
        "the other object's write",
        std::time::Duration::from_secs(10),
        || common::fault_count(faults.path(), "C_SetAttributeValue") == sets + 3,
    );
    let counted = common::fault_count(faults.path(), "C_SetAttributeValue") - sets;
    std::fs::remove_file(&hang).unwrap();
    let r = pending.join().unwrap();
    assert!(
        both,
        "{counted} C_SetAttributeValue calls while one object was held: the other object's \
         write waited for it"
    );
    let body = common::Response::ok(&r);
    assert_eq!(body["key"]["label"], "ec-new");
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    assert_eq!(settled_meta(&t, EC)["description"], "before");
}

#[test]
fn a_failed_record_write_changes_nothing_and_stays_so_after_a_restart() {
    let t = token_with(&[Key::ec(EC, "ec-old"), Key::ec(EC2, "ec2-old")]);
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup::faulty(faults.path());
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    common::Response::ok(&c.patch(EC, &json!({"description": "kept"})));
    let seq_before = settled_meta(&t, EC)["seq"].as_u64().unwrap();

    // The record (rewritten in place) is the first write: it fails, nothing else happens.
    let sets = common::fault_count(faults.path(), "C_SetAttributeValue");
    std::fs::write(faults.path().join("setattr_fail_after"), "0").unwrap();
    c.patch(EC, &json!({"label": "ec-new", "description": "lost"}))
        .assert_error(503, "token_unavailable");
    assert!(!faults.path().join("setattr_fail_after").exists());
    assert_eq!(
        common::fault_count(faults.path(), "C_SetAttributeValue"),
        sets + 1,
        "no label may be written when the record could not be"
    );
    assert_eq!(t.labels_of(EC), pair("ec-old"));
    let rec = read_meta(&t, EC);
    assert_eq!(rec["seq"].as_u64(), Some(seq_before));
    assert_eq!(rec["description"], "kept");

    // A key without a record: creating it fails, nothing else happens.
    let sets = common::fault_count(faults.path(), "C_SetAttributeValue");
    std::fs::write(faults.path().join("create_fail_after"), "0").unwrap();
    c.patch(EC2, &json!({"label": "ec2-new"}))
        .assert_error(503, "token_unavailable");
    assert!(!faults.path().join("create_fail_after").exists());
    assert_eq!(
        common::fault_count(faults.path(), "C_SetAttributeValue"),
        sets
    );
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
    assert_eq!(settled_meta(&t, EC)["description"], "kept");
    assert_eq!(meta_count(&t, EC2), 0);
}

#[test]
fn a_label_change_interrupted_by_a_crash_is_rolled_back_at_startup() {
    // The token as a crash between relabelling and committing leaves it: both objects
    // already carry the new label, the only record is the pending one naming the old.
    let t = token_with(&[Key::ec(EC, "new")]);
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
    let rec = settled_meta(&t, EC);
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
    assert_eq!(settled_meta(&t, EC)["description"], "kept");
}

#[test]
fn superseded_metadata_generations_are_removed_at_startup() {
    let t = token_with(&[Key::ec(EC, "ec-key")]);
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
    // Both v1 objects go: the older generation, and the newer once migrated to v2.
    let in_label = format!("{} {{", meta_label(EC));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !meta_objects(&t, EC)
        .iter()
        .any(|o| o.label.starts_with(&in_label))
    {
        assert!(std::time::Instant::now() < deadline, "never migrated");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let rec = settled_meta(&t, EC);
    assert!(rec["seq"].as_u64().unwrap() > 4, "{rec}");
    assert_eq!(rec["description"], "new");
    let objects = meta_objects(&t, EC);
    assert!(
        objects[0]
            .label
            .starts_with(&format!("{} {{", meta_label(EC))),
        "the record now lives in the label (v2): {objects:?}"
    );

    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&t, &Setup::default());
    let key = common::Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["description"], "new");
    assert_eq!(meta_count(&t, EC), 2, "the record and its spare");
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
    let t = token_with(&[Key::ec(EC, "start")]);
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
    let rec = settled_meta(&t, EC);
    assert!(rec.get("relabel").is_none(), "relabel left behind: {rec}");
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
        let rec = settled_meta(&t, kid);
        assert_eq!(
            rec["updated_at"], key["updated_at"],
            "{kid}: the token's record must catch up with the index"
        );
    }
}

/// The fault closes the session in use; with SoftHSM, closing a token's last session also
/// logs it out and forgets every object handle the process held, so this also checks that
/// the daemon does not rely on handles that outlived the session loss.
#[test]
fn a_lost_session_is_recovered_transparently() {
    let t = token_with(&[Key::ec(EC, "ec-old"), Key::ec(EC2, "ec2-old")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let logins = common::fault_count(faults.path(), "C_Login");
    std::fs::write(faults.path().join("session_invalid_once"), "").unwrap();

    let body = common::Response::ok(&d.client().patch(EC, &json!({"label": "ec-new"})));
    assert_eq!(body["key"]["label"], "ec-new");
    assert!(
        !faults.path().join("session_invalid_once").exists(),
        "the session was never dropped"
    );
    assert!(
        common::fault_count(faults.path(), "C_Login") > logins,
        "the fresh session must be logged in"
    );
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    settled_meta(&t, EC);
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
