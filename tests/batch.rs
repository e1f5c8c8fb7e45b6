//! `POST /v1/keys/batch` against real SoftHSM tokens, read back with pkcs11-tool: each
//! selector, a batch with one bad key changing nothing, a token failure part-way rolled
//! back, a dry run, the shared batch id in a real journal, a crash during a batch, and the
//! selection errors.

mod common;

use std::time::{Duration, Instant};

use common::fixture::{
    access, keys_access, token_with, Key, Principal, AES, AES_KEY, DUP, DUP_KEYS, EC, EC_KEY,
    NO_KEY, OTHER, OTHER_KEY,
};
use common::journal::Journal;
use common::{Client, Daemon, Response, Setup, Token};
use serde_json::{json, Value};

const APP1: &str = "a001";
const APP2: &str = "a002";
const APP3: &str = "a003";
const APP_KEYS: [Key; 3] = [
    Key::aes(APP1, "app-1"),
    Key::aes(APP2, "app-2"),
    Key::ec(APP3, "app-3"),
];

fn batch(c: &Client, query: &str, body: &Value) -> Response {
    c.send(
        "POST",
        &format!("/v1/keys/batch{query}"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The newest metadata record of `kid` (the JSON in its data objects' labels), read with
/// pkcs11-tool; `None` if the key has none.
fn record(t: &Token, kid: &str) -> Option<Value> {
    let prefix = format!("hsmkeyd-meta:{kid} ");
    t.objects()
        .iter()
        .filter(|o| o.class == "Data")
        .filter_map(|o| o.label.strip_prefix(&prefix))
        .map(|json| serde_json::from_str::<Value>(json).unwrap())
        .max_by_key(|r| r["seq"].as_u64())
}

/// Every object with every attribute pkcs11-tool shows, in a stable order (the token lists
/// objects in no particular one), but the audit trail's high-water marks (which advance
/// with the entries a dry run writes too).
fn snapshot(t: &Token) -> Vec<String> {
    let text = t.objects_text();
    let mut objects: Vec<String> = Vec::new();
    for line in text.lines() {
        match objects.last_mut() {
            Some(o) if line.starts_with(' ') => {
                o.push('\n');
                o.push_str(line);
            }
            _ => objects.push(line.to_string()),
        }
    }
    objects.retain(|o| !o.contains("'hsmkeyd-audit-mark"));
    objects.sort();
    objects
}

/// Asserts the token holds what `before` recorded, naming only what differs.
#[track_caller]
fn assert_unchanged(t: &Token, before: &[String], what: &str) {
    let now = snapshot(t);
    let gone: Vec<_> = before.iter().filter(|o| !now.contains(o)).collect();
    let new: Vec<_> = now.iter().filter(|o| !before.contains(o)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{what}: objects gone or changed: {gone:#?}; objects new or changed: {new:#?}"
    );
}

/// The description and roles the token holds for `kid` (null and [] without a record).
fn meta(t: &Token, kid: &str) -> (Value, Value) {
    match record(t, kid) {
        Some(r) => (r["description"].clone(), r["roles"].clone()),
        None => (Value::Null, json!([])),
    }
}

/// Waits until the background worker has nothing left to write (its spares and
/// `updated_at`), so a snapshot of the token is stable.
fn quiet(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.get("/v1/status").ok();
        let b = &s["cleanup_backlog"];
        if b["objects"] == 0 && b["records"] == 0 {
            std::thread::sleep(Duration::from_millis(400));
            return;
        }
        assert!(Instant::now() < deadline, "the worker never settled: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kids_of(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|k| match k {
            Value::String(s) => s.clone(),
            other => other["kid"].as_str().unwrap().to_string(),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn each_selector_changes_exactly_the_keys_it_names() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();

    // By kid.
    let r = batch(
        &c,
        "",
        &json!({"select": {"kids": [AES, EC]}, "patch": {"description": "by kid"},
                "if_match": {AES: "*"}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [AES, EC]);
    assert_eq!(r["keys"][0]["changed"], json!(["description"]));
    assert_eq!(r["keys"][0]["key"]["description"], "by kid");
    assert!(r["batch_id"].as_str().is_some_and(|b| b.len() == 32), "{r}");
    assert_eq!(r["audit_id"].as_str().map(str::len), Some(32), "{r}");

    // By label prefix: roles for the three app keys only.
    let r = batch(
        &c,
        "",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"roles": ["ops"]}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);

    // By role: the keys carrying "ops" are the app keys.
    let r = batch(
        &c,
        "",
        &json!({"select": {"role": "ops"}, "patch": {"description": "ops key", "roles": null}}),
    )
    .ok();
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);

    for kid in [AES, EC] {
        assert_eq!(meta(&t, kid), (json!("by kid"), json!([])), "{kid}");
    }
    for kid in [APP1, APP2, APP3] {
        assert_eq!(meta(&t, kid), (json!("ops key"), json!([])), "{kid}");
    }
    assert_eq!(meta(&t, OTHER), (Value::Null, json!([])));
    // Labels are not a batch's business: every object keeps its own.
    assert_eq!(t.labels_of(APP3), common::fixture::pair("app-3"));
    assert_eq!(
        t.labels_of(AES),
        [("Secret".to_string(), "aes-key".to_string())]
    );
}

#[test]
fn a_batch_with_one_bad_key_changes_nothing() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(DUP_KEYS);
    let t = token_with(&keys);
    let setup = Setup::with_access(keys_access());
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    // OTHER is given a role the caller does not hold (it holds "ops" only).
    c.patch(
        OTHER,
        &json!({"description": "theirs", "roles": ["payments"]}),
    )
    .ok();
    let etag = c.get(&format!("/v1/keys/{EC}")).ok()["etag"]
        .as_str()
        .unwrap()
        .to_string();
    quiet(&c);
    let before = snapshot(&t);
    let patch = json!({"description": "must not land", "roles": ["ops"]});

    let cases = [
        (
            "a role the caller does not hold",
            json!({"select": {"kids": [AES, OTHER, EC]}, "patch": patch}),
            OTHER,
            "missing_role",
            403,
        ),
        (
            "a stale etag",
            json!({"select": {"kids": [AES, EC]}, "patch": patch,
                   "if_match": {EC: "0123456789abcdef"}}),
            EC,
            "precondition_failed",
            412,
        ),
        (
            "an inconsistent key",
            json!({"select": {"kids": [AES, DUP, EC]}, "patch": patch,
                   "if_match": {EC: etag}}),
            DUP,
            "inconsistent_key_state",
            409,
        ),
        (
            "a key that does not exist",
            json!({"select": {"kids": [AES, NO_KEY]}, "patch": patch}),
            NO_KEY,
            "key_not_found",
            404,
        ),
    ];
    for (what, body, bad, code, status) in cases {
        let e = batch(&c, "", &body).assert_error_for(what, 409, "batch_refused");
        let failures = e["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1, "{what}: {e}");
        assert_eq!(failures[0]["kid"], bad, "{what}: {e}");
        assert_eq!(failures[0]["error"], code, "{what}: {e}");
        assert_eq!(failures[0]["status"], status, "{what}: {e}");
        assert!(failures[0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(e["batch_id"].is_string(), "{what}: {e}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_unchanged(&t, &before, "a refused batch");
    // No key was written, so no intent entry was either.
    let intents = d
        .audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGE_INTENT")
        .filter(|e| e.get("HSMKEYD_BATCH_ID").is_some())
        .count();
    assert_eq!(intents, 0);
    drop(d);

    // Scope per key: a caller that may update AES only.
    let narrow = access(
        &["ops", "payments"],
        &[Principal::me("narrow")
            .scopes(&["keymgmt:get", &format!("keymgmt:upd:{AES}")])
            .roles(&["ops"])],
    );
    let d = Daemon::start(&t, &Setup::with_access(narrow));
    let before = snapshot(&t);
    let e = batch(
        &d.client(),
        "",
        &json!({"select": {"kids": [AES, EC]}, "patch": {"description": "x"}}),
    )
    .assert_error(409, "batch_refused");
    assert_eq!(e["failures"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e["failures"][0]["kid"], EC, "{e}");
    assert_eq!(e["failures"][0]["error"], "missing_scope", "{e}");
    // A key it may not update is refused for its scope, whether or not it exists.
    let e = batch(
        &d.client(),
        "",
        &json!({"select": {"kids": [AES, NO_KEY]}, "patch": {"description": "x"}}),
    )
    .assert_error(409, "batch_refused");
    assert_eq!(e["failures"][0]["kid"], NO_KEY, "{e}");
    assert_eq!(e["failures"][0]["error"], "missing_scope", "{e}");
    assert_unchanged(&t, &before, "a batch refused for scope");
}

#[test]
fn a_token_failure_part_way_sets_back_the_keys_already_changed() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &t,
        &Setup::with_access(keys_access()).with_faults(faults.path()),
    );
    let c = d.client();
    // Every key gets a record first, so the batch's writes are in place
    // (C_SetAttributeValue on each record's spare).
    let all = [AES, OTHER, EC, APP1, APP2, APP3];
    batch(
        &c,
        "",
        &json!({"select": {"kids": all}, "patch": {"description": "before"}}),
    )
    .ok();
    quiet(&c);
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
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &t,
        &Setup::with_access(keys_access()).with_faults(faults.path()),
    );
    let c = d.client();
    let all = [AES, OTHER, EC, APP1, APP2, APP3];
    batch(
        &c,
        "",
        &json!({"select": {"kids": all}, "patch": {"description": "before"}}),
    )
    .ok();
    quiet(&c);

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
fn a_dry_run_checks_every_key_writes_nothing_and_records_dry_run_entries() {
    let mut keys = vec![AES_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();
    let before = snapshot(&t);
    let r = batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"description": "maybe"}}),
    )
    .ok();
    assert_eq!(r["dry_run"], true);
    assert_eq!(kids_of(&r["keys"]), [APP1, APP2, APP3]);
    for k in r["keys"].as_array().unwrap() {
        assert_eq!(k["key"]["description"], "maybe", "{k}");
        assert_eq!(
            k["changes"]["description"],
            json!({"before": null, "after": "maybe"}),
            "{k}"
        );
    }
    // A dry run checks too: a stale etag refuses it.
    batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"kids": [APP1]}, "patch": {"description": "maybe"},
                "if_match": {APP1: "00"}}),
    )
    .assert_error(409, "batch_refused");
    std::thread::sleep(Duration::from_millis(500));
    assert_unchanged(&t, &before, "a dry run");
    assert_eq!(
        c.get(&format!("/v1/keys/{APP1}")).ok()["description"],
        Value::Null
    );

    let id = r["batch_id"].as_str().unwrap();
    let entries: Vec<_> = d
        .audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_BATCH_ID"] == id)
        .collect();
    assert_eq!(entries.len(), 4, "three keys and the batch: {entries:#?}");
    for e in &entries {
        assert_eq!(e["HSMKEYD_DRY_RUN"], "1", "{e}");
        assert_ne!(e["HSMKEYD_EVENT"], "KEY_ATTRIBUTES_CHANGE_INTENT", "{e}");
        assert!(
            e["MESSAGE"].as_str().unwrap().starts_with("dry run: "),
            "{e}"
        );
    }
}

#[test]
fn every_entry_of_a_batch_carries_its_batch_id_in_the_journal() {
    let j = Journal::start();
    let mut keys = vec![AES_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let setup = Setup {
        audit: "sink = \"journald\"\n".to_string(),
        namespace: Some(j.pid()),
        ..Setup::with_access(keys_access())
    };
    let d = Daemon::start(&t, &setup);
    let r = batch(
        &d.client(),
        "",
        &json!({"select": {"label_prefix": "app-"}, "patch": {"description": "journaled"}}),
    )
    .ok();
    let id = r["batch_id"].as_str().unwrap().to_string();
    let rid = r["audit_id"].as_str().unwrap().to_string();
    let entries = j.wait_for("the batch's entries", |es| {
        es.iter()
            .any(|e| e["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED" && e["HSMKEYD_BATCH_ID"] == id)
    });
    let ours: Vec<&Value> = entries
        .iter()
        .filter(|e| e["HSMKEYD_BATCH_ID"] == id.as_str())
        .collect();
    let count = |event: &str| ours.iter().filter(|e| e["HSMKEYD_EVENT"] == event).count();
    assert_eq!(count("KEY_ATTRIBUTES_CHANGE_INTENT"), 3, "{ours:#?}");
    assert_eq!(count("KEY_ATTRIBUTES_CHANGED"), 3, "{ours:#?}");
    assert_eq!(count("KEYS_BATCH_CHANGED"), 1, "{ours:#?}");
    assert_eq!(ours.len(), 7, "{ours:#?}");
    for e in &ours {
        assert_eq!(e["HSMKEYD_REQUEST_ID"], rid.as_str(), "{e:#}");
        assert_eq!(e["HSMKEYD_PRINCIPAL"], "tester", "{e:#}");
    }
    let mut kids: Vec<_> = ours
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .map(|e| e["HSMKEYD_KID"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    assert_eq!(kids, [APP1, APP2, APP3]);
    let summary = ours
        .iter()
        .find(|e| e["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED")
        .unwrap();
    assert_eq!(summary["HSMKEYD_RESULT"], "OK");
    assert_eq!(summary["HSMKEYD_STATUS"], "200");
    // No entry of another request carries the id.
    assert!(entries
        .iter()
        .filter(|e| e["HSMKEYD_REQUEST_ID"] != rid.as_str())
        .all(|e| e.get("HSMKEYD_BATCH_ID").is_none()));
}

/// Waits until the fault wrapper holds a call of `function`.
fn wait_held(faults: &std::path::Path, function: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !faults.join(format!("held_{function}")).exists() {
        assert!(Instant::now() < deadline, "{function} was never held");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_crash_during_a_batch_leaves_each_key_wholly_before_or_after() {
    let mut keys = vec![AES_KEY, OTHER_KEY, EC_KEY];
    keys.extend(APP_KEYS);
    let t = token_with(&keys);
    let all = [AES, OTHER, EC, APP1, APP2, APP3];
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

#[test]
fn selection_errors_are_400_and_name_the_field() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    t.devtoken(&[
        "bulk",
        "--count",
        "1001",
        "--id-prefix",
        "b1",
        "--label-prefix",
        "bulk-",
    ]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();
    let before = snapshot(&t);
    let p = json!({"description": "x"});
    let many: Vec<String> = (0..1001).map(|i| format!("b1{i:08x}")).collect();
    let cases = [
        (json!({"select": {}, "patch": p}), "empty_select", "select"),
        (
            json!({"select": {"kids": [AES], "role": "ops"}, "patch": p}),
            "ambiguous_select",
            "select",
        ),
        (
            json!({"select": {"kids": []}, "patch": p}),
            "empty_select",
            "select.kids",
        ),
        (
            json!({"select": {"kids": many}, "patch": p}),
            "too_many_keys",
            "select.kids",
        ),
        (
            json!({"select": {"label_prefix": "bulk-"}, "patch": p}),
            "too_many_keys",
            "select",
        ),
        (
            json!({"select": {"label_prefix": "nobody-"}, "patch": p}),
            "no_keys_selected",
            "select",
        ),
        (
            json!({"select": {"role": "nobody"}, "patch": p}),
            "no_keys_selected",
            "select",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"label": "same-for-all"}}),
            "label_not_batchable",
            "patch.label",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"colour": "red"}}),
            "unknown_field",
            "patch.colour",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {}}),
            "empty_patch",
            "patch",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"description": 7}}),
            "invalid_description",
            "patch.description",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "extra": 1}),
            "unknown_field",
            "extra",
        ),
        (
            json!({"select": {"kin": [AES]}, "patch": p}),
            "unknown_field",
            "select.kin",
        ),
        (json!({"patch": p}), "missing_select", "select"),
        (
            json!({"select": {"kids": ["xyz"]}, "patch": p}),
            "invalid_kid",
            "select.kids",
        ),
        (
            json!({"select": {"kids": [AES, AES]}, "patch": p}),
            "duplicate_kid",
            "select.kids",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "if_match": {EC: "00"}}),
            "if_match_outside_selection",
            "if_match",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": {"roles": ["undefined-role"]}}),
            "unknown_role",
            "patch.roles",
        ),
        (
            json!({"select": {"kids": [AES]}, "patch": p, "if_match": {AES: null}}),
            "invalid_if_match",
            "if_match",
        ),
    ];
    for (body, code, field) in cases {
        let e = batch(&c, "", &body).assert_error_for(&body.to_string(), 400, code);
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    // The largest batch passes its checks (a dry run, to keep the test quick).
    let most: Vec<String> = many[..1000].to_vec();
    let r = batch(
        &c,
        "?dry_run=true",
        &json!({"select": {"kids": most}, "patch": p}),
    )
    .ok();
    assert_eq!(r["keys"].as_array().unwrap().len(), 1000);
    assert_unchanged(&t, &before, "refused and dry-run batches");
}
