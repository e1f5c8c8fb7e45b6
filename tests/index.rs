//! The in-memory index: requests are served without searching the token (counted with the
//! fault wrapper's `count_C_FindObjectsInit`), a miss triggers at most one rescan per
//! RESCAN_MIN_INTERVAL, and keys added by another tool appear after a rescan.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fixture::{token_with, EC_KEY};
use common::{Daemon, Setup, Token};
use serde_json::{json, Value};

/// `RESCAN_MIN_INTERVAL` of `src/keys/mod.rs`, plus a margin.
const PAST_RESCAN_INTERVAL: Duration = Duration::from_millis(2300);

fn finds(dir: &Path) -> u64 {
    common::fault_count(dir, "C_FindObjectsInit")
}

fn bulk_kid(index: u32) -> String {
    format!("b1{index:08x}")
}

#[test]
fn a_thousand_keys_are_served_from_the_index_without_searching_the_token() {
    let t = Token::new();
    t.devtoken(&[
        "bulk",
        "--count",
        "1000",
        "--id-prefix",
        "b1",
        "--label-prefix",
        "bulk-",
    ]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    let at_start = finds(faults.path());
    assert!(
        at_start >= 1,
        "the startup scan must have searched the token"
    );
    let expected: Vec<String> = (0..1000).map(bulk_kid).collect();

    // One page of everything.
    let body = common::Response::ok(&c.get("/v1/keys?limit=1000"));
    assert_eq!(body["total"], 1000);
    assert_eq!(body["next_cursor"], Value::Null);
    let kids: Vec<String> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kids, expected, "every key once, ordered by kid");

    // Pages of 100.
    let pages = c.pages(100, 10);
    let mut seen = Vec::new();
    for body in &pages {
        assert_eq!(body["total"], 1000);
        assert!(body["keys"].as_array().unwrap().len() <= 100);
        seen.extend(common::kids(&body["keys"]).into_iter().map(String::from));
    }
    assert_eq!(pages.len(), 10);
    assert_eq!(seen, expected);

    // Single keys, spread over the token.
    for index in [0u32, 1, 99, 100, 499, 500, 777, 998, 999] {
        let key = common::Response::ok(&c.get(&format!("/v1/keys/{}", bulk_kid(index))));
        assert_eq!(key["label"], format!("bulk-{index}"));
        assert_eq!(key["type"], "aes");
        assert_eq!(key["state"], "ok");
    }

    // Updates read back by handle, not by searching.
    for index in [3u32, 333, 666] {
        let kid = bulk_kid(index);
        let body =
            common::Response::ok(&c.patch(&kid, &json!({"label": format!("renamed-{index}")})));
        assert_eq!(body["key"]["label"], format!("renamed-{index}"));
        assert_eq!(
            t.labels_of(&kid),
            vec![("Secret".to_string(), format!("renamed-{index}"))]
        );
        let key = common::Response::ok(&c.get(&format!("/v1/keys/{kid}")));
        assert_eq!(key["label"], format!("renamed-{index}"));
    }
    let body = common::Response::ok(&c.get("/v1/keys?label_prefix=renamed-&limit=1000"));
    assert_eq!(body["total"], 3, "the index follows the updates: {body}");
    assert_eq!(
        common::Response::ok(&c.get("/v1/keys?limit=1"))["total"],
        1000
    );

    assert_eq!(
        finds(faults.path()),
        at_start,
        "a request searched the token instead of using the index"
    );
}

#[test]
fn misses_rescan_at_most_once_per_interval_and_find_keys_added_meanwhile() {
    let t = token_with(&[EC_KEY]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    // Let the startup scan age past the interval, so the first miss may rescan.
    std::thread::sleep(PAST_RESCAN_INTERVAL);

    let before = finds(faults.path());
    let r = c.get("/v1/keys/dead01");
    let rescanned_at = Instant::now();
    r.assert_error(404, "key_not_found");
    let after_first = finds(faults.path());
    assert_eq!(
        after_first,
        before + 1,
        "the first miss must rescan the token exactly once"
    );

    // Misses right after it are answered from the index.
    for kid in ["dead01", "dead02", "beef", "dead01", "0102030405"] {
        c.get(&format!("/v1/keys/{kid}"))
            .assert_error(404, "key_not_found");
    }
    assert!(
        rescanned_at.elapsed() < Duration::from_millis(1500),
        "the repeated misses took too long to prove the rate limit"
    );
    assert_eq!(
        finds(faults.path()),
        after_first,
        "misses within the interval must not search the token again"
    );

    // Another tool adds a key while the daemon runs.
    t.gen("ec-p256", "ad01", "added-later", &[]);
    std::thread::sleep(PAST_RESCAN_INTERVAL);
    let key = common::Response::ok(&c.get("/v1/keys/ad01"));
    assert_eq!(key["label"], "added-later");
    assert_eq!(key["class"], "key-pair");
    assert_eq!(finds(faults.path()), after_first + 1, "one rescan found it");
    // From now on it is in the index: listed, and found without a search.
    let body = common::Response::ok(&c.get("/v1/keys"));
    let kids: BTreeSet<&str> = common::kids(&body["keys"]).into_iter().collect();
    assert_eq!(kids, BTreeSet::from(["ad01", "ec01"]));
    common::Response::ok(&c.get("/v1/keys/ad01"));
    assert_eq!(finds(faults.path()), after_first + 1);
}
