//! What the batch tests (`tests/batch.rs`, `tests/batch_faults.rs`) share: the request,
//! the keys they batch over, and reading the token back with pkcs11-tool.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::fixture::Key;
use super::{Client, Response, Token};

pub const APP1: &str = "a001";
pub const APP2: &str = "a002";
pub const APP3: &str = "a003";
pub const APP_KEYS: [Key; 3] = [
    Key::aes(APP1, "app-1"),
    Key::aes(APP2, "app-2"),
    Key::ec(APP3, "app-3"),
];

/// `POST /v1/keys/batch{query}` with this body.
pub fn batch(c: &Client, query: &str, body: &Value) -> Response {
    c.send(
        "POST",
        &format!("/v1/keys/batch{query}"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The newest metadata record of `kid` (the JSON in its data objects' labels), read with
/// pkcs11-tool; `None` if the key has none.
pub fn record(t: &Token, kid: &str) -> Option<Value> {
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
pub fn snapshot(t: &Token) -> Vec<String> {
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
pub fn assert_unchanged(t: &Token, before: &[String], what: &str) {
    let now = snapshot(t);
    let gone: Vec<_> = before.iter().filter(|o| !now.contains(o)).collect();
    let new: Vec<_> = now.iter().filter(|o| !before.contains(o)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{what}: objects gone or changed: {gone:#?}; objects new or changed: {new:#?}"
    );
}

/// The description and roles the token holds for `kid` (null and [] without a record).
pub fn meta(t: &Token, kid: &str) -> (Value, Value) {
    match record(t, kid) {
        Some(r) => (r["description"].clone(), r["roles"].clone()),
        None => (Value::Null, json!([])),
    }
}

/// Waits until the background worker has nothing left to write (its spares and
/// `updated_at`), so a snapshot of the token is stable.
pub fn quiet(c: &Client) {
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

/// The kids of a list of keys or of kids, sorted.
pub fn kids_of(list: &Value) -> Vec<String> {
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
