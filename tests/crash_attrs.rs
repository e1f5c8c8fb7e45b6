//! kill -9 in the middle of an attribute change of a key pair (usage flags, validity
//! dates), held at each of its token writes by the fault wrapper: the next start serves the
//! key fully as it was or fully as the change made it, never half of it, and the token says
//! the same (usage read back with pkcs11-tool, the public key's dates with PyKCS11).

mod common;

use std::time::Duration;

use common::fixture::{token_with, Key, EC};
use common::python::public_dates;
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

/// hsmkeyd's metadata records on the token, from pkcs11-tool: (kid, record) per object
/// that keeps its record in its label.
fn records(t: &Token) -> Vec<(String, Value)> {
    t.objects()
        .into_iter()
        .filter(|o| o.class == "Data")
        .filter_map(|o| {
            let rest = o.label.strip_prefix("hsmkeyd-meta:")?;
            let (kid, json) = rest.split_once(' ')?;
            Some((kid.to_string(), serde_json::from_str(json).unwrap()))
        })
        .collect()
}

/// Waits until `kid` has a record and its spare, the newest with no change in progress.
fn settled(t: &Token, kid: &str) -> bool {
    common::wait_until("the key's record to settle", Duration::from_secs(5), || {
        let mine: Vec<Value> = records(t)
            .into_iter()
            .filter(|(k, _)| k == kid)
            .map(|(_, r)| r)
            .collect();
        let newest = mine.iter().max_by_key(|r| r["seq"].as_u64());
        mine.len() == 2
            && newest.is_some_and(|r| r.get("attrs").is_none() && r.get("relabel").is_none())
    })
}

/// What a change's intent entry announced for `field`: (before, after).
fn announced(intent: &Value, field: &str) -> (Value, Value) {
    let changes: Value = serde_json::from_str(intent["HSMKEYD_CHANGES"].as_str().unwrap()).unwrap();
    let c = &changes[field];
    assert!(
        !c.is_null(),
        "the intent entry does not name {field}: {changes}"
    );
    (c["before"].clone(), c["after"].clone())
}

/// A change, from the key as it is before.
type Change = fn(&Value) -> Value;

/// `YYYY-MM-DD` (or null) as PyKCS11 prints a CK_DATE (`-` when empty).
fn ck_date(v: &Value) -> String {
    v.as_str().map_or("-".into(), |d| d.replace('-', ""))
}

#[test]
fn kill_9_at_each_write_of_a_pairs_attribute_change_leaves_it_fully_before_or_after() {
    let t = token_with(&[Key::ec(EC, "ec")]);
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup::faulty(faults.path());
    let d = Daemon::start(&t, &setup);
    // A record (and, from the worker, its spare) exists, so the change's first
    // C_SetAttributeValue is the record with its marker.
    Response::ok(&d.client().patch(EC, &json!({"description": "crash test"})));
    assert!(settled(&t, EC), "{:?}", records(&t));
    assert_eq!(d.stop(), 0);

    // (C_SetAttributeValue calls of the change that go through before the held one,
    // what the change sets.) 0: the record with its marker is held; 1 and 2: one of the
    // objects is held. The record commits the change, and then both objects are written at
    // once (none of these changes is one-way), so at 1 the other object's write may pass
    // or not before the kill, and at 2 it has passed.
    let rounds: [(u32, Change); 7] = [
        (0, |_| json!({"usage": {"sign": false, "verify": false}})),
        (1, |_| json!({"usage": {"sign": false, "verify": false}})),
        (2, |_| json!({"usage": {"sign": true, "verify": true}})),
        (
            0,
            |_| json!({"not_before": "2026-01-01", "not_after": "2031-06-30"}),
        ),
        (
            1,
            |_| json!({"not_before": "2026-01-01", "not_after": "2031-06-30"}),
        ),
        (2, |_| json!({"not_after": "2032-12-31"})),
        // Usage and dates together, the date cleared.
        (2, |k: &Value| {
            let on = !k["attributes"]["sign"].as_bool().unwrap();
            json!({"usage": {"sign": on, "verify": on}, "not_after": null})
        }),
    ];
    for (round, (before_held, change)) in rounds.iter().enumerate() {
        let mut d = Daemon::start(&t, &setup);
        assert!(settled(&t, EC), "round {round}: {:?}", records(&t));
        let key = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
        assert_eq!(key["state"], "ok", "round {round}: {key}");
        let body = change(&key);
        let sets = common::fault_count(faults.path(), "C_SetAttributeValue");
        let hang = faults.path().join("hang_C_SetAttributeValue");
        std::fs::write(&hang, before_held.to_string()).unwrap();
        let client = d.client();
        let pending = {
            let body = body.clone();
            std::thread::spawn(move || client.patch(EC, &body))
        };
        assert!(
            common::wait_until("the write to be held", Duration::from_secs(10), || faults
                .path()
                .join("held_C_SetAttributeValue")
                .exists()),
            "round {round}: {}",
            d.log()
        );
        // The held call is the change's own (no other write came between): at most the
        // record and both objects, the held one included.
        let counted = common::fault_count(faults.path(), "C_SetAttributeValue") - sets;
        let least = u64::from(*before_held) + 1;
        let most = if *before_held == 0 { 1 } else { 3 };
        assert!(
            (least..=most).contains(&counted),
            "round {round}: {counted} C_SetAttributeValue calls, not {least}..={most}"
        );
        d.child.kill().unwrap();
        let _ = d.child.wait();
        std::fs::remove_file(&hang).unwrap();
        let _ = std::fs::remove_file(faults.path().join("held_C_SetAttributeValue"));
        let _ = pending.join();
        let entries = d.audit_entries();
        let intent = entries
            .iter()
            .rfind(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGE_INTENT")
            .unwrap_or_else(|| panic!("round {round}: no intent entry: {entries:?}"))
            .clone();
        drop(d);

        // Held at the record: nothing was committed. Held later: the record with its
        // marker was, and the next start finishes the change.
        let after = *before_held > 0;
        let pick = |field: &str| {
            let (b, a) = announced(&intent, field);
            if after {
                a
            } else {
                b
            }
        };
        let d = Daemon::start(&t, &setup);
        let now = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
        assert_eq!(now["state"], "ok", "round {round}: {now}");
        let objects = t.objects();
        let usage_of = |class: &str| -> Vec<String> {
            objects
                .iter()
                .find(|o| o.id == EC && o.class == class)
                .unwrap_or_else(|| panic!("round {round}: no {class} object: {objects:?}"))
                .usage
                .clone()
        };
        if body.get("usage").is_some() {
            let (sign, verify) = (
                pick("usage")["sign"].clone(),
                pick("usage")["verify"].clone(),
            );
            let token = (
                json!(usage_of("Private").contains(&"sign".to_string())),
                json!(usage_of("Public").contains(&"verify".to_string())),
            );
            assert_eq!(
                token,
                (sign.clone(), verify.clone()),
                "round {round}: token"
            );
            assert_eq!(
                (&now["attributes"]["sign"], &now["attributes"]["verify"]),
                (&sign, &verify),
                "round {round}: index {now}"
            );
        }
        if body.get("not_after").is_some() {
            let (from, to) = if body.get("not_before").is_some() {
                (pick("not_before"), pick("not_after"))
            } else {
                (key["not_before"].clone(), pick("not_after"))
            };
            assert_eq!(
                (&now["not_before"], &now["not_after"]),
                (&from, &to),
                "round {round}: index {now}"
            );
            assert_eq!(
                public_dates(&t, EC),
                vec![(2, ck_date(&from), ck_date(&to))],
                "round {round}: the public key's dates"
            );
        }
        assert_eq!(
            d.log()
                .contains("completed a change interrupted by a crash"),
            after,
            "round {round}: {}",
            d.log()
        );
        // The marker is cleared, and no record is left without its key.
        assert!(settled(&t, EC), "round {round}: {:?}", records(&t));
        let orphans: Vec<_> = t
            .objects()
            .into_iter()
            .filter(|o| o.class == "Data" && o.label.starts_with("hsmkeyd-meta:"))
            .filter(|o| !o.label.starts_with(&format!("hsmkeyd-meta:{EC}")))
            .collect();
        assert!(orphans.is_empty(), "round {round}: {orphans:?}");
        assert_eq!(d.stop(), 0, "round {round}");
    }
}
