//! Batch updates when the token fails or the daemon dies: a write failing part-way is
//! rolled back, a rollback failing too is reported key by key, and a kill -9 during a batch
//! leaves every key wholly before or after. Read back with pkcs11-tool.

mod common;

use std::time::Duration;

use common::batch::{batch, kids_of, meta, quiet, record, APP1, APP2, APP3, APP_KEYS};
use common::fixture::{keys_access, token_with, Key, AES, AES_KEY, EC, EC_KEY, OTHER, OTHER_KEY};
use common::{wait_held, Daemon, Setup, Token};
use serde_json::{json, Value};

/// The six keys most of these tests batch over: two AES keys, an EC pair and the three
/// application keys.
const SIX: [&str; 6] = [AES, OTHER, EC, APP1, APP2, APP3];

fn six_keys() -> Vec<Key> {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    keys
}

/// A token with `keys` and a daemon on it whose module goes through the fault wrapper,
/// controlled from the returned directory.
fn faulty_daemon(keys: &[Key]) -> (Token, tempfile::TempDir, Daemon) {
    let t = token_with(keys);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &t,
        &Setup::with_access(keys_access()).with_faults(faults.path()),
    );
    (t, faults, d)
}

/// Gives each of `kids` a record (description "before") and waits for the worker, so that
/// later batch writes to them are in place (C_SetAttributeValue on each record's spare).
fn records_first(c: &common::Client, kids: &[&str]) {
    batch(
        c,
        "",
        &json!({"select": {"kids": kids}, "patch": {"description": "before"}}),
    )
    .ok();
    quiet(c);
}

#[test]
fn a_token_failure_part_way_sets_back_the_keys_already_changed() {
    let (t, faults, d) = faulty_daemon(&six_keys());
    let c = d.client();
    let all = SIX;
    records_first(&c, &all);
    let before: Vec<_> = all.iter().map(|k| meta(&t, k)).collect();
    let labels: Vec<_> = all.iter().map(|k| t.labels_of(k)).collect();

    // Two writes pass, the third fails.
    std::fs::write(faults.path().join("setattr_fail_after"), "2").unwrap();
    let r = batch(
        &c,
        "",
        &json!({"select": {"kids": all}, "patch": {"description": "after", "roles": ["ops"]}}),
    );
    assert!(r.status >= 400, "{:?}", r.json());
    let e = r.json();
    assert_eq!(e["error"], "batch_failed", "{e}");
    assert_eq!(e["failures"].as_array().unwrap().len(), 1, "{e}");
    // Writes run in parallel: at least the two before the failure had landed.
    let rolled_back = kids_of(&e["rolled_back"]);
    assert!(rolled_back.len() >= 2, "{e}");
    assert_eq!(e["not_rolled_back"], json!([]), "{e}");
    let mut named = rolled_back.clone();
    named.extend(kids_of(&e["not_started"]));
    named.push(e["failures"][0]["kid"].as_str().unwrap().to_string());
    named.sort();
    let mut every: Vec<String> = all.map(String::from).to_vec();
    every.sort();
    assert_eq!(named, every, "{e}");
    assert!(e["message"].as_str().unwrap().contains("set back"), "{e}");
    assert!(!faults.path().join("setattr_fail_after").exists());

    // The token holds every key as before the batch.
    let after: Vec<_> = all.iter().map(|k| meta(&t, k)).collect();
    assert_eq!(after, before);
    assert_eq!(
        all.iter().map(|k| t.labels_of(k)).collect::<Vec<_>>(),
        labels
    );
    for kid in all {
        let k = c.get(&format!("/v1/keys/{kid}")).ok();
        assert_eq!(
            (k["description"].clone(), k["state"].clone()),
            (json!("before"), json!("ok"))
        );
    }
    // Each rolled-back key has its rollback recorded, with the batch id.
    let batch_id = e["batch_id"].as_str().unwrap();
    let entries = d.audit_entries();
    for kid in &rolled_back {
        let rollback: Vec<_> = entries
            .iter()
            .filter(|x| x["HSMKEYD_KID"] == kid.as_str() && x["HSMKEYD_BATCH_ID"] == batch_id)
            .filter(|x| {
                x["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("rollback of batch"))
            })
            .collect();
        assert_eq!(
            rollback.len(),
            2,
            "intent and result of {kid}'s rollback: {rollback:#?}"
        );
    }
    let summary: Vec<_> = entries
        .iter()
        .filter(|x| x["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED" && x["HSMKEYD_BATCH_ID"] == batch_id)
        .collect();
    assert_eq!(summary.len(), 1, "{summary:#?}");
    assert_eq!(summary[0]["HSMKEYD_RESULT"], "FAILED");
    assert_eq!(summary[0]["HSMKEYD_STATUS"], r.status.to_string());
}

#[test]
fn a_batch_whose_rollback_fails_too_names_the_keys_left_changed() {
    let (t, faults, d) = faulty_daemon(&six_keys());
    let c = d.client();
    let all = SIX;
    records_first(&c, &all);

    // Two writes pass; from then on the token refuses every write, rollbacks included.
    std::fs::write(faults.path().join("setattr_fail_from"), "2").unwrap();
    let r = batch(
        &c,
        "",
        &json!({"select": {"kids": all}, "patch": {"description": "after"}}),
    );
    std::fs::remove_file(faults.path().join("setattr_fail_from")).unwrap();
    let e = r.json();
    assert_eq!(e["error"], "batch_failed", "{e}");
    assert_eq!(e["rolled_back"], json!([]), "{e}");
    let left = kids_of(&e["not_rolled_back"]);
    assert_eq!(left.len(), 2, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("could not be"),
        "{e}"
    );
    // The answer is the truth: exactly the keys it names hold the batch's value.
    for kid in all {
        let expected = if left.contains(&kid.to_string()) {
            "after"
        } else {
            "before"
        };
        assert_eq!(meta(&t, kid).0, expected, "{kid}: {e}");
    }
}

#[test]
fn a_crash_during_a_batch_leaves_each_key_wholly_before_or_after() {
    let t = token_with(&six_keys());
    let all = SIX;
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup::with_access(keys_access()).with_faults(faults.path());
    let mut d = Daemon::start(&t, &setup);
    // Hold the third record write (each of these keys has no record yet: C_CreateObject).
    std::fs::write(faults.path().join("hang_C_CreateObject"), "2").unwrap();
    let client = d.client();
    let pending = std::thread::spawn(move || {
        batch(
            &client,
            "",
            &json!({"select": {"kids": all}, "patch": {"description": "new", "roles": ["ops"]}}),
        )
    });
    wait_held(faults.path(), "C_CreateObject");
    // The two writes let through have landed; every later one is held.
    let landed = || all.iter().filter(|k| record(&t, k).is_some()).count();
    assert!(common::wait_until(
        "two records written",
        Duration::from_secs(10),
        || landed() == 2
    ));
    d.child.kill().unwrap();
    let _ = d.child.wait();
    std::fs::remove_file(faults.path().join("hang_C_CreateObject")).unwrap();
    let _ = pending.join();
    drop(d);

    let d = Daemon::start(&t, &setup);
    let c = d.client();
    let (mut old, mut new) = (0, 0);
    for kid in all {
        let k = c.get(&format!("/v1/keys/{kid}")).ok();
        assert_eq!(k["state"], "ok", "{k}");
        match (
            meta(&t, kid),
            (k["description"].clone(), k["roles"].clone()),
        ) {
            ((Value::Null, r), (Value::Null, r2)) if r == json!([]) && r2 == json!([]) => old += 1,
            ((dsc, r), api) if dsc == "new" && r == json!(["ops"]) => {
                assert_eq!(api, (dsc, r), "{kid}");
                new += 1;
            }
            (token, api) => panic!("{kid} is half-changed: token {token:?}, API {api:?}"),
        }
    }
    assert_eq!(old + new, all.len());
    assert_eq!(
        (old, new),
        (4, 2),
        "the two writes before the held one stay, no other"
    );
    // No metadata object without its key.
    let objects = t.objects();
    for o in objects.iter().filter(|o| o.class == "Data") {
        let Some(rest) = o.label.strip_prefix("hsmkeyd-meta:") else {
            continue;
        };
        let kid = rest.split(' ').next().unwrap();
        assert!(
            objects.iter().any(|k| k.class != "Data" && k.id == kid),
            "orphan metadata {:?}",
            o.label
        );
    }
}

/// A batch's writes run at once (up to the token's sessions) also when it arrives on a
/// Unix connection that has a thread of its own: while every label write is held, more
/// than one has started.
#[test]
fn a_batch_on_a_connection_thread_writes_its_keys_at_once() {
    let keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    let (t, faults, d) = faulty_daemon(&keys);
    let c = d.client();
    let all = [AES, OTHER, EC];
    // Records first, so the batch below writes them in place (C_SetAttributeValue).
    records_first(&c, &all);
    let started = common::fault_count(faults.path(), "C_SetAttributeValue");
    let hang = faults.path().join("hang");
    std::fs::write(&hang, "").unwrap();
    let running = {
        let c = c.clone();
        std::thread::spawn(move || {
            batch(
                &c,
                "",
                &json!({"select": {"kids": all}, "patch": {"description": "after"}}),
            )
        })
    };
    let at_once = common::wait_until("two writes in flight", Duration::from_secs(3), || {
        common::fault_count(faults.path(), "C_SetAttributeValue") >= started + 2
    });
    let in_flight = common::fault_count(faults.path(), "C_SetAttributeValue") - started;
    std::fs::remove_file(&hang).unwrap();
    let r = running.join().unwrap();
    assert!(
        at_once,
        "only {in_flight} write(s) started while every write was held"
    );
    r.ok();
    quiet(&c);
    for kid in all {
        assert_eq!(meta(&t, kid).0, json!("after"), "{kid}");
    }
}
