//! Every changing route is audited by construction: the test walks the daemon's own route
//! table (`hsmkeyd::api::routes()`), and every route other than GET, called once with a
//! valid and once with an invalid request, must leave exactly one result entry under its
//! declared event, with `audit_id` in the answer. A new route without an example here
//! fails the test, so it cannot be added unchecked.

mod common;

use std::time::{Duration, Instant};

use common::fixture::{minting_access, token_with, AES_KEY};
use common::{Daemon, Setup};
use hsmkeyd::api::routes;
use serde_json::Value;

/// A request for one route: concrete path, a valid body and an invalid one.
struct Example {
    path: &'static str,
    valid: &'static str,
    invalid: &'static str,
}

fn example(method: &str, pattern: &str) -> Option<Example> {
    let e = match (method, pattern) {
        ("PATCH", "/v1/keys/{kid}") => Example {
            path: "/v1/keys/a1a1",
            valid: r#"{"label": "walked"}"#,
            invalid: r#"{"label": ""}"#,
        },
        ("POST", "/v1/auth/token") => Example {
            path: "/v1/auth/token",
            valid: r#"{"scopes": ["keymgmt:list"], "ttl_s": 60}"#,
            invalid: r#"{"scopes": []}"#,
        },
        ("POST", "/api/keymgmt/update") => Example {
            path: "/api/keymgmt/update",
            valid: r#"{"kid": "a1a1", "label": "walked-encedo"}"#,
            invalid: r#"{"kid": "a1a1"}"#,
        },
        _ => return None,
    };
    Some(e)
}

fn entries_of(d: &Daemon, rid: &str) -> Vec<Value> {
    d.log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["HSMKEYD_REQUEST_ID"] == rid)
        .filter(|v| v["HSMKEYD_EVENT"] != "KEY_ATTRIBUTES_CHANGE_INTENT")
        .collect()
}

#[test]
fn every_changing_route_leaves_exactly_one_result_entry_per_answer() {
    // The test's uid may do everything, minting tokens included.
    let t = token_with(&[AES_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(minting_access()));
    let c = d.client();
    let changing: Vec<_> = routes().into_iter().filter(|r| r.method != "GET").collect();
    assert!(changing.len() >= 3, "{changing:?}");
    for route in changing {
        let event = route
            .event
            .unwrap_or_else(|| panic!("{} {} has no audit event", route.method, route.path))
            .name();
        let ex = example(route.method, route.path).unwrap_or_else(|| {
            panic!(
                "{} {} has no example in tests/routes_audited.rs: add one",
                route.method, route.path
            )
        });
        for (body, result) in [(ex.valid, "OK"), (ex.invalid, "ERROR")] {
            let what = format!("{} {} {body}", route.method, ex.path);
            let r = c.send(
                route.method,
                ex.path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            );
            let rid = r
                .header("x-request-id")
                .unwrap_or_else(|| panic!("{what}: no X-Request-Id"))
                .to_string();
            assert_eq!(
                r.json()["audit_id"],
                rid.as_str(),
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(
                r.status < 300,
                result == "OK",
                "{what}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while entries_of(&d, &rid).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100));
            let found = entries_of(&d, &rid);
            assert_eq!(found.len(), 1, "{what}: {found:#?}");
            assert_eq!(found[0]["HSMKEYD_EVENT"], event, "{what}: {found:#?}");
            assert_eq!(found[0]["HSMKEYD_RESULT"], result, "{what}: {found:#?}");
            assert_eq!(
                found[0]["HSMKEYD_STATUS"],
                r.status.to_string(),
                "{what}: {found:#?}"
            );
        }
    }
}
