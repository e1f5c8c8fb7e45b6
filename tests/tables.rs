//! The key store's own per-key tables stay bounded: after updates of many distinct keys,
//! the write-lock map and the label claims are empty again (`GET /v1/status` `tables`),
//! and the worker's backlog drains. (Issue #17 item 8: memory per committed update.)

mod common;

use std::time::Duration;

use common::{Daemon, Response, Setup, Token};
use serde_json::json;

const KEYS: u32 = 120;

fn kid(i: u32) -> String {
    format!("cc{i:08x}")
}

#[test]
fn updates_of_many_keys_leave_no_lock_or_claim_behind() {
    let t = Token::new();
    let _ = t.devtoken(&["bulk", "--count", &KEYS.to_string(), "--id-prefix", "cc"]);
    let d = Daemon::start(&t, &Setup::default());
    std::thread::scope(|s| {
        for part in 0..4 {
            let d = &d;
            let _ = s.spawn(move || {
                for i in (part..KEYS).step_by(4) {
                    Response::ok(
                        &d.client()
                            .patch(&kid(i), &json!({"label": format!("t-{i}")})),
                    );
                    Response::ok(
                        &d.client()
                            .patch(&kid(i), &json!({"description": format!("d-{i}")})),
                    );
                }
            });
        }
    });
    // Once the worker has written the records of the quiet keys, nothing holds a lock:
    // the tables are empty again, not one entry per key ever written.
    let quiet = |s: &serde_json::Value| {
        s["cleanup_backlog"]["objects"] == 0 && s["cleanup_backlog"]["records"] == 0
    };
    assert!(
        common::wait_until("an empty backlog", Duration::from_secs(20), || quiet(
            &Response::ok(&d.client().get("/v1/status"))
        )),
        "{}",
        d.log()
    );
    assert!(
        common::wait_until("empty tables", Duration::from_secs(5), || {
            let s = Response::ok(&d.client().get("/v1/status"));
            quiet(&s) && s["tables"]["key_locks"] == 0 && s["tables"]["label_claims"] == 0
        }),
        "{}",
        Response::ok(&d.client().get("/v1/status"))
    );
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["keys"], KEYS, "{s}");
    // And the updates are in the token.
    assert_eq!(
        t.labels_of(&kid(7)),
        vec![("Secret".to_string(), "t-7".to_string())]
    );
}
