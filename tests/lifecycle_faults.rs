//! The key life cycle when things go wrong or are only tried: crashes (kill -9) during
//! create and delete, and dry runs, read back with pkcs11-tool.

mod common;

use common::fixture::{keys_access, token_with, AES, AES_KEY, EC, EC_KEY};
use common::{wait_held, Daemon, Setup};
use serde_json::{json, Value};

#[test]
fn a_crash_during_create_or_delete_leaves_no_half_made_key_and_no_orphan_metadata() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup::with_access(keys_access()).with_faults(faults.path());

    // 1. Killed right after the token made a pair, before its record was finished: the
    //    next start keeps the complete key, with its roles.
    let mut d = Daemon::start(&t, &setup);
    std::fs::write(faults.path().join("hang_C_GenerateKeyPair"), "0").unwrap();
    let client = d.client();
    let pending = std::thread::spawn(move || {
        client.send(
            "POST",
            "/v1/keys",
            &[("Content-Type", "application/json")],
            json!({"type": "ec", "label": "crash-made", "kid": "c1", "roles": ["ops"]})
                .to_string()
                .as_bytes(),
        )
    });
    wait_held(faults.path(), "C_GenerateKeyPair");
    d.child.kill().unwrap();
    let _ = d.child.wait();
    std::fs::remove_file(faults.path().join("hang_C_GenerateKeyPair")).unwrap();
    let _ = pending.join();
    drop(d);
    let d = Daemon::start(&t, &setup);
    let kept = d.client().get("/v1/keys/c1").ok();
    assert_eq!(kept["state"], "ok");
    assert_eq!(kept["roles"], json!(["ops"]));
    assert_eq!(kept["class"], "key-pair");

    // 2. Killed in the middle of a delete (one object destroyed, the next held): the
    //    next start finishes it.
    std::fs::write(faults.path().join("hang_C_DestroyObject"), "1").unwrap();
    let client = d.client();
    let pending =
        std::thread::spawn(move || client.send("DELETE", &format!("/v1/keys/{EC}"), &[], b""));
    wait_held(faults.path(), "C_DestroyObject");
    let mut d = d;
    d.child.kill().unwrap();
    let _ = d.child.wait();
    std::fs::remove_file(faults.path().join("hang_C_DestroyObject")).unwrap();
    let _ = pending.join();
    drop(d);
    let d = Daemon::start(&t, &setup);
    d.client()
        .get(&format!("/v1/keys/{EC}"))
        .assert_error(404, "key_not_found");
    let left: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.id == EC || o.label.starts_with(&format!("hsmkeyd-meta:{EC}")))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(d);

    // 3. A create interrupted with only the private key made (as a crash inside the
    //    token's generation can leave it): the next start removes the key and its record.
    t.gen("ec-p256", "c2", "half-made", &["--private-only"]);
    let record = json!({"kid": "c2", "seq": 1, "description": null, "roles": ["ops"],
                        "updated_at": null, "lifecycle": {"creating": {"pair": true}}});
    let value = t.path().join("c2.json");
    std::fs::write(&value, record.to_string()).unwrap();
    let _ = t.devtoken(&[
        "raw-data",
        "--label",
        &format!("hsmkeyd-meta:c2 {record}"),
        "--application",
        "hsmkeyd.meta.v2",
        "--value-file",
        value.to_str().unwrap(),
    ]);
    assert_eq!(t.objects().iter().filter(|o| o.id == "c2").count(), 1);
    let d = Daemon::start(&t, &setup);
    d.client()
        .get("/v1/keys/c2")
        .assert_error(404, "key_not_found");
    let left: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.id == "c2" || o.label.starts_with("hsmkeyd-meta:c2"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(d.client().get("/v1/keys/c1").status, 200);
}

#[test]
fn a_dry_run_checks_everything_answers_what_would_happen_and_writes_nothing() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let c = d.client();
    let before = t.objects_text();
    let patch = |q: &str, body: Value| {
        c.send(
            "PATCH",
            &format!("/v1/keys/{EC}{q}"),
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let r = patch(
        "?dry_run=true",
        json!({"label": "would-be", "description": "maybe"}),
    );
    let v = r.ok();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["key"]["label"], "would-be");
    assert_eq!(v["key"]["description"], "maybe");
    assert_eq!(v["changed"], json!(["label", "description"]));
    assert_eq!(v["changes"]["label"]["before"], "ec-key");
    assert_eq!(v["changes"]["label"]["after"], "would-be");
    let rid = r.header("x-request-id").unwrap().to_string();
    // Every check still runs: a stale If-Match, a bad value, an unknown key.
    c.send(
        "PATCH",
        &format!("/v1/keys/{EC}?dry_run=true"),
        &[
            ("Content-Type", "application/json"),
            ("If-Match", "\"stale\""),
        ],
        br#"{"label": "x"}"#,
    )
    .assert_error(412, "precondition_failed");
    patch("?dry_run=true", json!({"label": ""})).assert_error(400, "invalid_label");
    patch("?dry_run=maybe", json!({"label": "x"})).assert_error(400, "invalid_dry_run");
    patch("?colour=red", json!({"label": "x"})).assert_error(400, "invalid_query");

    let made = create_q(
        &d,
        "?dry_run=true",
        json!({"type": "rsa", "label": "not-made", "kid": "d1"}),
    );
    let made = made.ok();
    assert_eq!(made["dry_run"], true);
    assert_eq!(made["key"]["type"], "rsa");
    assert_eq!(made["key"]["bits"], 2048);
    assert_eq!(made["key"]["kid"], "d1");
    create_q(
        &d,
        "?dry_run=true",
        json!({"type": "aes", "label": "x", "kid": AES}),
    )
    .assert_error(409, "kid_taken");

    let gone = c.send("DELETE", &format!("/v1/keys/{AES}?dry_run=true"), &[], b"");
    let gone = gone.ok();
    assert_eq!(gone["dry_run"], true);
    assert_eq!(gone["key"]["label"], "aes-key");

    // Nothing reached the token: every object and attribute pkcs11-tool shows is the same.
    assert_eq!(t.objects_text(), before);
    assert_eq!(c.get(&format!("/v1/keys/{EC}")).ok()["label"], "ec-key");
    // One entry per dry run, marked, and no intent entry.
    let entries: Vec<Value> = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["HSMKEYD_REQUEST_ID"] == rid.as_str())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["HSMKEYD_DRY_RUN"], "1");
    assert_eq!(entries[0]["HSMKEYD_RESULT"], "OK");
    assert!(entries[0]["MESSAGE"]
        .as_str()
        .unwrap()
        .starts_with("dry run: "));
    assert!(
        !d.log().contains("_INTENT"),
        "a dry run wrote an intent entry"
    );
}

fn create_q(d: &Daemon, query: &str, body: Value) -> common::Response {
    d.client().send(
        "POST",
        &format!("/v1/keys{query}"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}
