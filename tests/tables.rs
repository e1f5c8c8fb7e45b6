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

/// The PKCS#11 module's allocations go to the daemon's allocator (jemalloc, linked with
/// unprefixed names so that SoftHSM's `malloc` and `operator new` find it first), not to
/// glibc's: SoftHSM keeps every object of the token in memory, and under glibc they filled
/// the brk heap (`[heap]` in smaps; jemalloc maps its own) and each thread that worked
/// kept a cache of them. With 600 keys the module holds megabytes; the brk heap stays
/// nearly empty.
#[test]
fn the_modules_allocations_go_to_the_daemons_allocator() {
    const KEYS: u32 = 600;
    let t = Token::new();
    let _ = t.devtoken(&["bulk", "--count", &KEYS.to_string(), "--id-prefix", "ee"]);
    let d = Daemon::start(&t, &Setup::default());
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["keys"], KEYS, "{s}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", d.child.id()))
        .expect("the daemon's smaps");
    // Resident KiB of the mappings whose header line ends in `name`.
    let resident = |name: &str| -> u64 {
        let mut total = 0;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let header = range.is_some_and(|(a, b)| {
                [a, b]
                    .iter()
                    .all(|x| !x.is_empty() && x.chars().all(|c| c.is_ascii_hexdigit()))
            });
            if header {
                inside = line.trim_end().ends_with(name);
            } else if let (true, Some(v)) = (inside, line.strip_prefix("Rss:")) {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
        total
    };
    let heap = resident("[heap]");
    let rss = s["memory"]["rss_bytes"].as_u64().unwrap_or(0) / 1024;
    eprintln!("brk heap {heap} KiB of {rss} KiB resident");
    // Under glibc's malloc this token put about 6 MiB there.
    assert!(
        heap < 1024,
        "{heap} KiB resident in the brk heap: the module allocates with glibc's malloc"
    );
    assert!(
        rss > 8 * 1024,
        "the module's objects are resident: {rss} KiB"
    );
}
