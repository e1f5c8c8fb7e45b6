//! Labels as names: `keys.unique_labels` (409 `label_taken`, atomic under concurrent
//! renames), tokens that already hold duplicates, and `/v1/keys/by-label/{label}`.

mod common;

use std::sync::{Arc, Barrier};

use common::fixture::{keys_access, token_with, AES, AES_KEY, EC, EC_KEY, OTHER, OTHER_KEY};
use common::{Daemon, Setup};
use serde_json::json;

/// Longer than the daemon's least time between two rescans on a miss (2 s).
const PAST_RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2300);

fn unique() -> Setup {
    Setup::with_access(keys_access().replace("[keys]", "[keys]\nunique_labels = true"))
}

#[test]
fn with_unique_labels_a_taken_label_is_refused_for_creates_and_renames() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let d = Daemon::start(&t, &unique());
    let c = d.client();
    let before = t.objects();
    c.patch(EC, &json!({"label": "aes-key"}))
        .assert_error(409, "label_taken");
    c.send(
        "POST",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        br#"{"type": "aes", "label": "ec-key"}"#,
    )
    .assert_error(409, "label_taken");
    assert_eq!(t.objects(), before);
    // Its own label again is not a clash; a free one is fine.
    assert_eq!(c.patch(EC, &json!({"label": "ec-key"})).status, 200);
    assert_eq!(c.patch(EC, &json!({"label": "ec-renamed"})).status, 200);
    // The old name is free again.
    assert_eq!(c.patch(AES, &json!({"label": "ec-key"})).status, 200);
}

#[test]
fn concurrent_renames_to_one_label_let_exactly_one_win() {
    let kids = ["c001", "c002", "c003", "c004", "c005", "c006"];
    let t = token_with(&[]);
    for (i, k) in kids.iter().enumerate() {
        t.gen("aes256", k, &format!("racer-{i}"), &[]);
    }
    let d = Daemon::start(&t, &unique());
    for round in 0..3 {
        let label = format!("winner-{round}");
        let go = Arc::new(Barrier::new(kids.len()));
        let threads: Vec<_> = kids
            .iter()
            .map(|k| {
                let (c, go, k, label) = (d.client(), go.clone(), k.to_string(), label.clone());
                std::thread::spawn(move || {
                    go.wait();
                    (k.clone(), c.patch(&k, &json!({"label": label})).status)
                })
            })
            .collect();
        let results: Vec<(String, u16)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter(|(_, s)| *s == 200).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(
            results.iter().all(|(_, s)| *s == 200 || *s == 409),
            "{results:?}"
        );
        // Independently: exactly one key in the token carries the label.
        let holders: std::collections::BTreeSet<String> = t
            .objects()
            .into_iter()
            .filter(|o| o.label == label)
            .map(|o| o.id)
            .collect();
        assert_eq!(holders.len(), 1, "round {round}: {holders:?}");
        assert!(holders.contains(&winners[0].0));
    }
}

#[test]
fn by_label_addresses_one_key_and_refuses_an_ambiguous_label() {
    let t = token_with(&[AES_KEY, OTHER_KEY]);
    t.gen("aes256", "d001", "shared", &[]);
    t.gen("aes256", "d002", "shared", &[]);
    let d = Daemon::start(&t, &unique());
    let c = d.client();
    assert_eq!(c.get("/v1/keys/by-label/aes-key").ok()["kid"], AES);
    c.get("/v1/keys/by-label/nobody")
        .assert_error(404, "key_not_found");
    // Duplicates already on the token stay readable by kid; by label they are ambiguous.
    c.get("/v1/keys/by-label/shared")
        .assert_error(409, "label_ambiguous");
    let r = c.send(
        "PATCH",
        "/v1/keys/by-label/other-key",
        &[("Content-Type", "application/json")],
        br#"{"description": "by name"}"#,
    );
    assert_eq!(r.ok()["key"]["description"], "by name");
    assert_eq!(
        c.get(&format!("/v1/keys/{OTHER}")).ok()["description"],
        "by name"
    );
    // Labels with spaces and other characters travel percent-encoded.
    assert_eq!(
        c.patch(AES, &json!({"label": "payments key/2"})).status,
        200
    );
    assert_eq!(
        c.get("/v1/keys/by-label/payments%20key%2F2").ok()["kid"],
        AES
    );
    let gone = c.send("DELETE", "/v1/keys/by-label/payments%20key%2F2", &[], b"");
    assert_eq!(gone.status, 204);
    assert!(!t.objects().iter().any(|o| o.id == AES));
}

/// The index keeps the keys by label beside the keys by kid (`keys/index.rs`); whatever
/// changes a key's label there (a rename, a create, a delete, a rescan that finds a key
/// another tool made) must move it in both, or a taken label would be given again or a
/// free one refused.
#[test]
fn labels_are_looked_up_as_every_change_leaves_them() {
    let t = token_with(&[AES_KEY, EC_KEY, OTHER_KEY]);
    let d = Daemon::start(&t, &unique());
    let c = d.client();
    let by_label = |label: &str| c.get(&format!("/v1/keys/by-label/{label}"));
    // Keys another tool made are known once a lookup of a kid rescans the token, and
    // their labels with them; two with one label are both named, in kid order.
    t.gen("ec-p256", "e1e1", "from-outside", &[]);
    t.gen("ec-p256", "e0e0", "from-outside", &[]);
    std::thread::sleep(PAST_RESCAN_INTERVAL);
    assert_eq!(c.get("/v1/keys/e0e0").status, 200);
    let r = by_label("from-outside");
    r.assert_error(409, "label_ambiguous");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("(e0e0, e1e1)"), "{message}");
    c.patch(AES, &json!({"label": "from-outside"}))
        .assert_error(409, "label_taken");
    // Renamed apart, each is found by its own label.
    assert_eq!(c.patch("e0e0", &json!({"label": "outside-0"})).status, 200);
    assert_eq!(by_label("from-outside").ok()["kid"], "e1e1");
    assert_eq!(by_label("outside-0").ok()["kid"], "e0e0");
    // A rename: the new label is found and taken, the old one is free.
    assert_eq!(c.patch(AES, &json!({"label": "renamed"})).status, 200);
    assert_eq!(by_label("renamed").ok()["kid"], AES);
    by_label("aes-key").assert_error(404, "key_not_found");
    c.patch(OTHER, &json!({"label": "renamed"}))
        .assert_error(409, "label_taken");
    assert_eq!(c.patch(OTHER, &json!({"label": "aes-key"})).status, 200);
    assert_eq!(by_label("aes-key").ok()["kid"], OTHER);
    // A create takes its label; a delete frees the label of the key it removes.
    let made = c.send(
        "POST",
        "/v1/keys",
        &[("Content-Type", "application/json")],
        br#"{"type": "aes", "label": "made"}"#,
    );
    assert_eq!(made.status, 201);
    let kid = made.json()["key"]["kid"].as_str().unwrap().to_string();
    assert_eq!(by_label("made").ok()["kid"], kid.as_str());
    c.patch(EC, &json!({"label": "made"}))
        .assert_error(409, "label_taken");
    assert_eq!(
        c.send("DELETE", &format!("/v1/keys/{kid}"), &[], b"")
            .status,
        204
    );
    by_label("made").assert_error(404, "key_not_found");
    assert_eq!(c.patch(EC, &json!({"label": "made"})).status, 200);
    assert_eq!(by_label("made").ok()["kid"], EC);
    // What the first renames left is still found.
    assert_eq!(by_label("renamed").ok()["kid"], AES);
    assert_eq!(by_label("outside-0").ok()["kid"], "e0e0");
}

/// A PATCH refused before its body is needed (no key has the label) is answered only once
/// the body has been read, and the connection stays open: closing it with unread bytes
/// would reset it, and over TCP the reset can destroy the answer (schemathesis saw a TLS
/// EOF from this route).
#[test]
fn a_patch_by_an_unknown_label_reads_the_body_before_it_answers_and_keeps_the_connection() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let t = token_with(&[AES_KEY]);
    let d = Daemon::start(&t, &Setup::default());
    let mut s = std::os::unix::net::UnixStream::connect(&d.sock).unwrap();
    let body = json!({"label": "x"}).to_string();
    let head = format!(
        "PATCH /v1/keys/by-label/nobody-has-it HTTP/1.1\r\nHost: x\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        s.read(&mut buf).is_err(),
        "answered before the body was sent"
    );
    s.write_all(body.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    let r = common::parse_response(&buf[..n]);
    r.assert_error(404, "key_not_found");
    // The same connection answers the next request.
    s.write_all(format!("GET /v1/keys/{AES} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(n > 0, "the connection was closed after the refusal");
    let r = common::parse_response(&buf[..n]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
