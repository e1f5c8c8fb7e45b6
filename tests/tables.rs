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

/// Steady updates, once every key has its record and its spare, leave none of our memory
/// behind (`GET /v1/status` `memory.heap_bytes` counts what hsmkeyd's own code holds, not
/// the PKCS#11 module's `malloc`): issue #17 saw RSS grow with every update, and the bench
/// (`mem_*`) puts what remains with the module.
#[test]
fn steady_updates_leave_none_of_our_memory_behind() {
    const STEADY: u32 = 40;
    let t = Token::new();
    let _ = t.devtoken(&["bulk", "--count", &STEADY.to_string(), "--id-prefix", "dd"]);
    let d = Daemon::start(&t, &Setup::default());
    let kid = |i: u32| format!("dd{i:08x}");
    let pass = |p: u32| {
        for i in 0..STEADY {
            let c = d.client();
            Response::ok(&c.patch(&kid(i), &json!({"label": format!("p{p}-{i}")})));
            Response::ok(&c.patch(&kid(i), &json!({"description": format!("d{p}-{i}")})));
        }
    };
    let settled_heap = || {
        let mut last = None;
        assert!(
            common::wait_until("a quiet worker", Duration::from_secs(20), || {
                let s = Response::ok(&d.client().get("/v1/status"));
                last = s["memory"]["heap_bytes"].as_u64();
                s["cleanup_backlog"]["objects"] == 0 && s["cleanup_backlog"]["records"] == 0
            }),
            "{}",
            d.log()
        );
        last.expect("memory.heap_bytes is counted by the daemon")
    };
    // Two passes give every key its record object and its spare; later writes are in place.
    pass(0);
    pass(1);
    let before = settled_heap();
    for p in 2..7 {
        pass(p);
    }
    let after = settled_heap();
    let updates = u64::from(STEADY) * 2 * 5;
    let grown = after.saturating_sub(before);
    eprintln!("heap {before} -> {after} over {updates} updates");
    // A leak of 40 bytes an update would be 16 KB here.
    assert!(
        grown < 16 * 1024,
        "our heap grew by {grown} bytes over {updates} steady updates ({before} -> {after})"
    );
    let status = Response::ok(&d.client().get("/v1/status"));
    let rss = status["memory"]["rss_bytes"].as_u64().unwrap_or(0);
    assert!(rss > after, "the resident set holds our heap: {status}");
}
