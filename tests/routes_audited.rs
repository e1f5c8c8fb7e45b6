//! Every changing route is audited by construction: the test walks the daemon's own route
//! table (`hsmkeyd::api::routes()`), and every route other than GET, called once with a
//! valid and once with an invalid request, must leave exactly one result entry under its
//! declared event, with `audit_id` in the answer. A new route without an example here
//! fails the test, so it cannot be added unchecked.

mod common;

use std::time::{Duration, Instant};

use common::encedo::{ejwt, login_pubkey};
use common::fixture::{access, token_with, Principal, AES_KEY, EC_KEY, LOCKED_KEY, OTHER_KEY};
use common::{Daemon, Setup};
use hsmkeyd::api::routes;
use serde_json::Value;

/// A request for one route: concrete path, a valid body and an invalid one.
struct Example {
    path: &'static str,
    valid: String,
    invalid: &'static str,
    /// Where the invalid request goes, when not to `path`.
    invalid_path: Option<&'static str>,
}

/// The key of the Encedo login's user in this test (`[[encedo.users]] pubkey`).
const LOGIN_SEED: [u8; 32] = [0x5e; 32];

fn example(c: &common::Client, method: &str, pattern: &str) -> Option<Example> {
    let e = match (method, pattern) {
        ("PATCH", "/v1/keys/{kid}") => Example {
            path: "/v1/keys/a1a1",
            valid: r#"{"label": "walked"}"#.into(),
            invalid: r#"{"label": ""}"#,
            invalid_path: None,
        },
        ("POST", "/v1/keys/batch") => Example {
            path: "/v1/keys/batch",
            valid: r#"{"select": {"kids": ["a1a1"]}, "patch": {"description": "walked"}}"#.into(),
            invalid: r#"{"select": {}, "patch": {"description": "walked"}}"#,
            invalid_path: None,
        },
        ("POST", "/v1/keys") => Example {
            path: "/v1/keys",
            valid: r#"{"type": "aes", "label": "walked-new"}"#.into(),
            invalid: r#"{"type": "aes"}"#,
            invalid_path: None,
        },
        ("DELETE", "/v1/keys/{kid}") => Example {
            path: "/v1/keys/b2b2",
            valid: "".into(),
            invalid: "",
            invalid_path: Some("/v1/keys/b2b2b"),
        },
        ("PATCH", "/v1/keys/by-label/{label}") => Example {
            path: "/v1/keys/by-label/ec-key",
            valid: r#"{"label": "walked-by-label"}"#.into(),
            invalid: r#"{"label": "x"}"#,
            invalid_path: Some("/v1/keys/by-label/nobody-has-this"),
        },
        ("DELETE", "/v1/keys/by-label/{label}") => Example {
            path: "/v1/keys/by-label/locked-key",
            valid: "".into(),
            invalid: "",
            invalid_path: Some("/v1/keys/by-label/nobody-has-this"),
        },
        ("POST", "/v1/auth/token") => Example {
            path: "/v1/auth/token",
            valid: r#"{"scopes": ["keymgmt:list"], "ttl_s": 60}"#.into(),
            invalid: r#"{"scopes": []}"#,
            invalid_path: None,
        },
        ("POST", "/api/keymgmt/update") => Example {
            path: "/api/keymgmt/update",
            valid: r#"{"kid": "a1a1", "label": "walked-encedo"}"#.into(),
            invalid: r#"{"kid": "a1a1"}"#,
            invalid_path: None,
        },
        ("POST", "/api/keymgmt/create") => Example {
            path: "/api/keymgmt/create",
            valid: r#"{"label": "walked-encedo-new", "type": "AES256"}"#.into(),
            invalid: r#"{"type": "AES256"}"#,
            invalid_path: None,
        },
        ("DELETE", "/api/keymgmt/delete/{kid}") => Example {
            path: "/api/keymgmt/delete/ec01",
            valid: "".into(),
            invalid: "",
            invalid_path: Some("/api/keymgmt/delete/ec01x"),
        },
        ("POST", "/api/auth/token") => Example {
            path: "/api/auth/token",
            valid: {
                let challenge = c.get("/api/auth/token").ok();
                serde_json::json!({"auth": ejwt(&challenge, LOGIN_SEED, "keymgmt:list")})
                    .to_string()
            },
            invalid: r#"{"auth": "not.an.ejwt"}"#,
            invalid_path: None,
        },
        _ => return None,
    };
    Some(e)
}

/// Routes other than GET that only read, so they have no event and leave no result entry:
/// each is named here, with a request to check that.
const POSTED_READS: [(&str, &str, &str); 1] =
    [("POST", "/api/keymgmt/search", r#"{"descr": "bm9ib2R5"}"#)];

fn entries_of(d: &Daemon, rid: &str) -> Vec<Value> {
    d.log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["HSMKEYD_REQUEST_ID"] == rid)
        .filter(|v| {
            !v["HSMKEYD_EVENT"]
                .as_str()
                .is_some_and(|e| e.ends_with("_INTENT"))
        })
        // A batch's keys have their own entries besides the batch's one (tests/batch.rs).
        .filter(|v| {
            v.get("HSMKEYD_BATCH_ID").is_none() || v["HSMKEYD_EVENT"] == "KEYS_BATCH_CHANGED"
        })
        .collect()
}

#[test]
fn every_changing_route_leaves_exactly_one_result_entry_per_answer() {
    // The test's uid may do everything: update, create, delete, mint tokens.
    let t = token_with(&[AES_KEY, OTHER_KEY, EC_KEY, LOCKED_KEY]);
    let me = Principal::me("tester").scopes(&[
        "keymgmt:list",
        "keymgmt:get",
        "keymgmt:upd",
        "keymgmt:gen",
        "keymgmt:del",
        "auth:token",
    ]);
    let login = format!(
        "[[encedo.users]]\nname = \"walker\"\nscopes = [\"keymgmt:list\"]\npubkey = \"{}\"\n",
        login_pubkey(LOGIN_SEED)
    );
    let d = Daemon::start(
        &t,
        &Setup {
            extra: login,
            ..Setup::with_access(access(&[], &[me]))
        },
    );
    let c = d.client();
    let posted_read = |r: &hsmkeyd::api::RouteInfo| {
        POSTED_READS
            .iter()
            .any(|(m, p, _)| (*m, *p) == (r.method, r.path))
    };
    for r in routes().into_iter().filter(posted_read) {
        assert_eq!(r.event, None, "{} {} reads only", r.method, r.path);
    }
    for (method, path, body) in POSTED_READS {
        let r = c.send(
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let rid = r.header("x-request-id").unwrap().to_string();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            entries_of(&d, &rid).is_empty(),
            "{method} {path} reads: {}",
            r.status
        );
    }
    let changing: Vec<_> = routes()
        .into_iter()
        .filter(|r| r.method != "GET" && !posted_read(r))
        .collect();
    assert!(changing.len() >= 3, "{changing:?}");
    for route in changing {
        let event = route
            .event
            .unwrap_or_else(|| panic!("{} {} has no audit event", route.method, route.path))
            .name();
        let ex = example(&c, route.method, route.path).unwrap_or_else(|| {
            panic!(
                "{} {} has no example in tests/routes_audited.rs: add one",
                route.method, route.path
            )
        });
        let invalid_path = ex.invalid_path.unwrap_or(ex.path);
        for (path, body, result) in [
            (ex.path, ex.valid.as_str(), "OK"),
            (invalid_path, ex.invalid, "ERROR"),
        ] {
            let what = format!("{} {path} {body}", route.method);
            let r = c.send(
                route.method,
                path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            );
            let rid = r
                .header("x-request-id")
                .unwrap_or_else(|| panic!("{what}: no X-Request-Id"))
                .to_string();
            // A 204 has no body; every other answer carries audit_id.
            if r.status != 204 {
                assert_eq!(
                    r.json()["audit_id"],
                    rid.as_str(),
                    "{what}: {}",
                    String::from_utf8_lossy(&r.body)
                );
            }
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
