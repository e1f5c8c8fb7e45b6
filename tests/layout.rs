//! The metadata layout against a real SoftHSM token, through the call-counting fault
//! wrapper: each kind of update makes only the token calls it must (no search, no destroy
//! while the client waits), a token that caps label length gets a slower path that is just
//! as correct, and a label change interrupted after its record is rolled forward.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fixture::{pair, token_with, Key, AES, EC};
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

/// The calls an update makes, read from the wrapper's counters around it.
#[derive(Debug, PartialEq, Eq)]
struct Calls {
    set: u64,
    create: u64,
    destroy: u64,
    find: u64,
}

fn calls(dir: &Path) -> Calls {
    let c = |f| common::fault_count(dir, f);
    Calls {
        set: c("C_SetAttributeValue"),
        create: c("C_CreateObject"),
        destroy: c("C_DestroyObject"),
        find: c("C_FindObjectsInit"),
    }
}

/// Runs `f` and returns the calls it made (read at once after the answer: the worker's
/// writes come [`SETTLE`] later at the earliest).
fn counted(dir: &Path, f: impl FnOnce()) -> Calls {
    let before = calls(dir);
    f();
    let after = calls(dir);
    Calls {
        set: after.set - before.set,
        create: after.create - before.create,
        destroy: after.destroy - before.destroy,
        find: after.find - before.find,
    }
}

/// How long the test lets the worker settle a key.
const SETTLE: Duration = Duration::from_secs(5);

/// hsmkeyd's metadata objects of `kid`: (label, record); None while they cannot be told
/// apart or read: two objects with the bare label (a record in CKA_VALUE and a superseded one
/// the worker has yet to destroy: pkcs11-tool reads by label), or one destroyed between the
/// listing and its read.
fn records(t: &Token, kid: &str) -> Option<Vec<(String, Value)>> {
    let label = format!("hsmkeyd-meta:{kid}");
    let objects: Vec<_> = t
        .objects()
        .into_iter()
        .filter(|o| o.class == "Data")
        .collect();
    if objects.iter().filter(|o| o.label == label).count() > 1 {
        return None;
    }
    objects
        .into_iter()
        .filter_map(|o| {
            if o.label == label {
                Some(t.try_data_value(&label).map(|v| (o.label.clone(), v)))
            } else {
                let json = o.label.strip_prefix(&format!("{label} "))?;
                Some(Some((o.label.clone(), serde_json::from_str(json).unwrap())))
            }
        })
        .collect()
}

/// Waits until `kid` has its record and at most one spare, the newest with no change in
/// progress (`relabel`, `attrs`); returns that one.
fn settled(t: &Token, kid: &str) -> (String, Value) {
    let deadline = Instant::now() + SETTLE;
    let mut seen = Vec::new();
    loop {
        let mut r = records(t, kid).unwrap_or_default();
        r.sort_by_key(|(_, rec)| rec["seq"].as_u64());
        let newest = r.last().map(|(_, rec)| rec.clone()).unwrap_or_default();
        if (1..=2).contains(&r.len())
            && newest.get("relabel").is_none()
            && newest.get("attrs").is_none()
        {
            return r.pop().unwrap();
        }
        if seen.last() != Some(&r) {
            seen.push(r);
        }
        assert!(
            Instant::now() < deadline,
            "{kid} never settled; seen: {seen:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_kind_of_update_makes_only_the_token_calls_it_must() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    let f = faults.path();
    let patch = |kid: &str, body: Value| {
        Response::ok(&c.patch(kid, &body));
    };
    let none = Calls {
        set: 0,
        create: 0,
        destroy: 0,
        find: 0,
    };

    // The label of a secret key: that one write.
    let got = counted(f, || patch(AES, json!({"label": "aes-1"})));
    assert_eq!(got, Calls { set: 1, ..none }, "label of a secret key");
    // Its updated_at reaches the token in the background: a new record for this key.
    let (_, rec) = settled(&t, AES);
    let key = Response::ok(&c.get(&format!("/v1/keys/{AES}")));
    assert_eq!(rec["updated_at"], key["updated_at"], "{rec}");

    // A description, once a record exists: one write in place.
    let got = counted(f, || patch(AES, json!({"description": "d1"})));
    assert_eq!(got, Calls { set: 1, ..none }, "description");
    let got = counted(f, || patch(AES, json!({"roles": ["ops"]})));
    assert_eq!(got, Calls { set: 1, ..none }, "roles");
    // Usage flags and dates of a secret key, with its label: one object, one write.
    let got = counted(f, || {
        patch(
            AES,
            json!({"label": "aes-u", "usage": {"wrap": false}, "not_after": "2030-01-01"}),
        )
    });
    assert_eq!(got, Calls { set: 1, ..none }, "attributes of a secret key");
    // Label and description of a secret key: the record, then the label.
    let got = counted(f, || {
        patch(AES, json!({"label": "aes-2", "description": "d2"}))
    });
    assert_eq!(got, Calls { set: 2, ..none }, "label + description");

    // The label of a pair that has no record yet: the record is created, then two labels.
    let got = counted(f, || patch(EC, json!({"label": "ec-1"})));
    assert_eq!(
        got,
        Calls {
            set: 2,
            create: 1,
            ..none
        },
        "label of a pair, first time"
    );
    settled(&t, EC);
    // And with a record: three writes in place.
    let got = counted(f, || patch(EC, json!({"label": "ec-2"})));
    assert_eq!(got, Calls { set: 3, ..none }, "label of a pair");
    assert_eq!(t.labels_of(EC), pair("ec-2"));
    // A flag that lives on one object of a pair: that object alone.
    settled(&t, EC);
    let got = counted(f, || patch(EC, json!({"usage": {"sign": false}})));
    assert_eq!(
        got,
        Calls { set: 1, ..none },
        "a private-key flag of a pair"
    );
    // Flags on both objects, or a date: the record with its marker, then each object.
    settled(&t, EC);
    let got = counted(f, || {
        patch(EC, json!({"usage": {"sign": true, "verify": false}}))
    });
    assert_eq!(
        got,
        Calls { set: 3, ..none },
        "flags on both objects of a pair"
    );
    settled(&t, EC);
    let got = counted(f, || patch(EC, json!({"not_after": "2031-01-01"})));
    assert_eq!(got, Calls { set: 3, ..none }, "the date of a pair");
    let (label, rec) = settled(&t, EC);
    assert!(
        rec.get("attrs").is_none(),
        "the worker left the marker: {rec}"
    );
    assert!(label.starts_with("hsmkeyd-meta:ec01 {"), "{label}");
    assert_eq!(rec["kid"], EC);
    let (_, rec) = settled(&t, AES);
    assert_eq!(
        (rec["description"].as_str(), rec["roles"].clone()),
        (Some("d2"), json!(["ops"]))
    );
}

#[test]
fn no_update_waits_for_a_destroy() {
    let t = token_with(&[Key::ec(EC, "ec")]);
    let faults = tempfile::tempdir().unwrap();
    // A token that caps labels: every record write makes a new object and leaves the old
    // one for the worker to destroy.
    std::fs::write(faults.path().join("max_label_len"), "32").unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    Response::ok(&c.patch(EC, &json!({"description": "first"})));
    // Every destroy is held: updates must not notice.
    std::fs::write(faults.path().join("hang_C_DestroyObject"), "0").unwrap();
    for i in 0..5 {
        Response::ok(&c.patch(
            EC,
            &json!({"description": format!("d{i}"), "label": format!("l{i}")}),
        ));
    }
    assert!(
        faults.path().join("held_C_DestroyObject").exists(),
        "the worker never tried to destroy a superseded object"
    );
    let key = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (key["label"].as_str(), key["description"].as_str()),
        (Some("l4"), Some("d4"))
    );
    std::fs::remove_file(faults.path().join("hang_C_DestroyObject")).unwrap();
    let (label, rec) = settled(&t, EC);
    assert_eq!(
        label, "hsmkeyd-meta:ec01",
        "the record lives in CKA_VALUE here"
    );
    assert_eq!(rec["description"], "d4");
    assert_eq!(t.labels_of(EC), pair("l4"));
}

#[test]
fn a_token_that_caps_label_length_keeps_records_in_new_objects_correctly() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let faults = tempfile::tempdir().unwrap();
    std::fs::write(faults.path().join("max_label_len"), "32").unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    Response::ok(&c.patch(EC, &json!({"description": "one", "roles": ["ops"]})));
    Response::ok(&c.patch(EC, &json!({"label": "ec-new", "description": "two"})));
    Response::ok(&c.patch(AES, &json!({"label": "aes-new"})));
    // A key label the token refuses is the caller's problem, reported as such.
    let long = "x".repeat(40);
    c.patch(AES, &json!({ "label": long }))
        .assert_error(406, "hsm_refused");
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "aes-new".to_string())]
    );

    let (label, rec) = settled(&t, EC);
    assert_eq!(label, "hsmkeyd-meta:ec01");
    assert_eq!(
        (rec["description"].as_str(), rec["roles"].clone()),
        (Some("two"), json!(["ops"]))
    );
    assert_eq!(t.labels_of(EC), pair("ec-new"));
    let (_, rec) = settled(&t, AES);
    assert!(rec["updated_at"].is_string(), "{rec}");

    // The same token read by a fresh daemon.
    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let key = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (
            key["label"].as_str(),
            key["description"].as_str(),
            key["state"].as_str()
        ),
        (Some("ec-new"), Some("two"), Some("ok"))
    );
}

#[test]
fn a_label_change_interrupted_after_its_record_is_rolled_forward_at_startup() {
    // The token as a crash after the record and the first label leaves it: the private
    // key already carries the new label, the public one the old.
    let t = token_with(&[Key::ec(EC, "new").flags(&["--public-label", "old"])]);
    let record = json!({
        "kid": EC, "seq": 2, "description": "with it", "roles": [],
        "updated_at": "2026-01-02T03:04:05Z", "relabel": hex::encode("new"),
    });
    let value = t.path().join("record.json");
    std::fs::write(&value, record.to_string()).unwrap();
    t.devtoken(&[
        "raw-data",
        "--label",
        &format!("hsmkeyd-meta:{EC} {record}"),
        "--application",
        "hsmkeyd.meta.v2",
        "--value-file",
        value.to_str().unwrap(),
    ]);
    let d = Daemon::start(&t, &Setup::default());
    let key = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (
            key["label"].as_str(),
            key["description"].as_str(),
            key["state"].as_str()
        ),
        (Some("new"), Some("with it"), Some("ok")),
        "{key}"
    );
    assert_eq!(t.labels_of(EC), pair("new"));
    let (_, rec) = settled(&t, EC);
    assert!(rec["seq"].as_u64().unwrap() > 2, "{rec}");
    assert!(
        d.log()
            .contains("completed a change interrupted by a crash"),
        "{}",
        d.log()
    );
}

#[test]
fn status_shows_the_token_the_keys_and_what_the_scan_left_out() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    let d = Daemon::start(&t, &Setup::default());
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["state"], "serving", "{s}");
    assert_eq!(s["keys"], 2, "{s}");
    assert_eq!(s["unreadable_objects"], 0, "{s}");
    assert!(s["token"].as_str().unwrap().contains("hsmkeyd-test"), "{s}");
    assert_eq!(s["cleanup_backlog"]["objects"], 0, "{s}");
    drop(d);

    // An object file the module cannot read (as a crash can leave one) is left out and
    // counted; the keys made of readable objects keep working.
    let tokens = t.path().join("tokens");
    let dir = std::fs::read_dir(&tokens)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let victim = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "object")
                && std::fs::read(p).unwrap().windows(2).any(|w| w == b"ec")
        })
        .or_else(|| {
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "object"))
        })
        .unwrap();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..8]).unwrap();
    let d = Daemon::start(&t, &Setup::default());
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(
        s["unreadable_objects"], 1,
        "a torn object went unnoticed: {s}"
    );
    assert!(
        s["keys"].as_u64().unwrap() >= 1,
        "the readable keys must still be served: {s}"
    );
    assert!(d.log().contains("cannot be read"), "{}", d.log());
}

#[test]
fn an_attribute_change_interrupted_after_its_record_is_rolled_forward_at_startup() {
    // The token as a crash after the record and the private key leaves it: the record
    // commits `derive` off on the private key (done: it never had it) and `verify` off on
    // the public key (not done yet).
    let t = token_with(&[Key::ec(EC, "ec")]);
    let record = json!({
        "kid": EC, "seq": 2, "description": null, "roles": [],
        "updated_at": "2026-01-02T03:04:05Z",
        "attrs": {"private": {"usage": {"derive": false}},
                  "public": {"usage": {"verify": false}}},
    });
    let value = t.path().join("record.json");
    std::fs::write(&value, record.to_string()).unwrap();
    t.devtoken(&[
        "raw-data",
        "--label",
        &format!("hsmkeyd-meta:{EC} {record}"),
        "--application",
        "hsmkeyd.meta.v2",
        "--value-file",
        value.to_str().unwrap(),
    ]);
    let public = |t: &Token| {
        t.objects()
            .into_iter()
            .find(|o| o.id == EC && o.class == "Public")
            .unwrap()
            .usage
    };
    assert!(public(&t).iter().any(|u| u == "verify"));
    let d = Daemon::start(&t, &Setup::default());
    let key = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(
        (key["state"].as_str(), key["attributes"]["verify"].as_bool()),
        (Some("ok"), Some(false)),
        "{key}"
    );
    assert!(
        !public(&t).iter().any(|u| u == "verify"),
        "the public key kept CKA_VERIFY: {:?}",
        public(&t)
    );
    let (_, rec) = settled(&t, EC);
    assert!(rec.get("attrs").is_none(), "the marker stayed: {rec}");
    assert!(
        d.log()
            .contains("completed a change interrupted by a crash"),
        "{}",
        d.log()
    );
}

/// Startup searches the token once: the scan that builds the index also finds hsmkeyd's
/// own objects (both signing pairs, the audit marks, the Encedo device key), on a fresh
/// token (where they are created) and on a restart (where they are found). On SoftHSM2
/// every search reads every object of the token, so each extra one is paid again at
/// 10,000 keys.
#[test]
fn startup_searches_the_token_once() {
    let t = token_with(&[Key::ec(EC, "ec"), Key::aes(AES, "aes")]);
    for run in ["first start", "restart"] {
        let faults = tempfile::tempdir().unwrap();
        let setup = Setup {
            extra: format!(
                "[[encedo.users]]\nname = \"dev\"\nscopes = [\"keymgmt:list\"]\npubkey = \"{}\"\n",
                common::encedo::login_pubkey([7; 32])
            ),
            ..Setup::faulty(faults.path())
        };
        let d = Daemon::start(&t, &setup);
        // Serving and chained: the audit key is published, and a change is audited.
        assert_eq!(d.client().get("/v1/audit/key").status, 200, "{run}");
        Response::ok(&d.client().patch(AES, &json!({"description": run})));
        assert_eq!(
            common::fault_count(faults.path(), "C_FindObjectsInit"),
            1,
            "{run}: {}",
            d.log()
        );
        assert_eq!(d.stop(), 0, "{run}");
    }
    // Nothing was created twice: one pair per reserved label, two audit marks.
    let objects = t.objects();
    for label in ["hsmkeyd-jwt-signing", "hsmkeyd-audit-signing"] {
        assert_eq!(
            objects.iter().filter(|o| o.label == label).count(),
            2,
            "{label}: {objects:?}"
        );
    }
    let marks = objects
        .iter()
        .filter(|o| o.label.starts_with("hsmkeyd-audit-mark"))
        .count();
    assert_eq!(marks, 2, "{objects:?}");
    let device = objects
        .iter()
        .filter(|o| o.label == "hsmkeyd-encedo-device")
        .count();
    assert_eq!(device, 1, "{objects:?}");
}

#[test]
fn a_rescan_keeps_what_the_token_has_not_caught_up_with_yet() {
    let t = token_with(&[Key::aes(AES, "aes"), Key::ec(EC, "ec")]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    // Let the startup scan age past RESCAN_MIN_INTERVAL (2 s), so a miss rescans.
    std::thread::sleep(Duration::from_millis(2300));

    // A secret key's label change writes the label only; its updated_at reaches the
    // token in the background. A pair's leaves its record's relabel marker for the worker
    // to clear. The miss rescans before the worker's settle delay (200 ms) is over.
    let aes = Response::ok(&c.patch(AES, &json!({"label": "aes-renamed"})));
    let ec = Response::ok(&c.patch(EC, &json!({"label": "ec-renamed"})));
    let before = d.log().len();
    c.get("/v1/keys/dead01").assert_error(404, "key_not_found");
    assert!(
        common::wait_until("the rescan", Duration::from_secs(5), || {
            d.log()[before..].contains("index rebuilt")
        }),
        "the miss did not rescan: {}",
        d.log()
    );

    for (kid, answer, label) in [(AES, &aes, "aes-renamed"), (EC, &ec, "ec-renamed")] {
        let key = Response::ok(&c.get(&format!("/v1/keys/{kid}")));
        assert_eq!(key["label"], label);
        assert_eq!(
            key["updated_at"], answer["key"]["updated_at"],
            "the rescan lost {kid}'s updated_at"
        );
    }
    let log = d.log();
    assert!(
        !log.contains("interrupted by a crash"),
        "a rescan took the daemon's own finished change for a crash: {log}"
    );
    // The worker still brings the records to rest: the token's copy catches up.
    for (kid, answer) in [(AES, &aes), (EC, &ec)] {
        let (_, rec) = settled(&t, kid);
        assert_eq!(rec["updated_at"], answer["key"]["updated_at"], "{rec}");
    }
}
