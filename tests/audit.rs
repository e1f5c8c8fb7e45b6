//! The audit trail in a real systemd-journald (one per test, in its own mount namespace):
//! every change and every refusal gives one entry with the right fields, nothing secret
//! reaches the journal, and updates are refused while journald cannot take entries.

mod common;

use std::collections::BTreeMap;

use common::fixture::{
    access, pair, token_with, Principal, AES, AES_KEY, EC, EC_KEY, LOCKED, LOCKED_KEY, NO_KEY,
    OTHER, OTHER_KEY,
};
use common::journal::Journal;
use common::{Daemon, Response, Setup, Token};
use hsmkeyd::audit::Event;
use serde_json::{json, Value};

fn token() -> Token {
    token_with(&[AES_KEY, EC_KEY, LOCKED_KEY, OTHER_KEY])
}

/// The test's uid may list, read and update every key except `OTHER` (scope narrowed per
/// key; `NO_KEY` names no key).
fn narrowed() -> String {
    let upd: Vec<String> = [AES, EC, LOCKED, NO_KEY]
        .iter()
        .map(|kid| format!("keymgmt:upd:{kid}"))
        .collect();
    let mut scopes = vec!["keymgmt:list", "keymgmt:get"];
    scopes.extend(upd.iter().map(String::as_str));
    access(
        &["ops"],
        &[Principal::me("auditee").scopes(&scopes).roles(&["ops"])],
    )
}

/// Nobody the tests run as is a principal.
fn strangers_only() -> String {
    access(
        &[],
        &[Principal::named("someone-else")
            .uids(&[4242])
            .scopes(&["keymgmt:list"])],
    )
}

fn in_journal(j: &Journal, access: String) -> Setup {
    Setup {
        audit: "sink = \"journald\"\n".to_string(),
        namespace: Some(j.pid()),
        ..Setup::with_access(access)
    }
}

fn by_request(entries: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in entries {
        if let Some(r) = e["HSMKEYD_REQUEST_ID"].as_str() {
            m.entry(r.to_string()).or_default().push(e.clone());
        }
    }
    m
}

fn rid(r: &Response) -> String {
    r.header("x-request-id")
        .unwrap_or_else(|| panic!("no X-Request-Id on {}", r.status))
        .to_string()
}

fn of_event(entries: &[Value], event: Event) -> Vec<&Value> {
    entries
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == event.name())
        .collect()
}

#[track_caller]
fn assert_common(e: &Value, event: Event, result: &str, priority: &str) {
    assert_eq!(e["HSMKEYD_EVENT"], event.name(), "{e:#}");
    assert_eq!(e["MESSAGE_ID"], event.message_id(), "{e:#}");
    assert_eq!(e["HSMKEYD_RESULT"], result, "{e:#}");
    assert_eq!(e["PRIORITY"], priority, "{e:#}");
    assert_eq!(e["SYSLOG_IDENTIFIER"], "hsmkeyd", "{e:#}");
    assert!(
        e["MESSAGE"].as_str().is_some_and(|m| !m.is_empty()),
        "{e:#}"
    );
}

#[test]
fn every_event_type_is_recorded_with_its_fields() {
    let j = Journal::start();
    let t = token();
    let d = Daemon::start(&t, &in_journal(&j, narrowed()));
    let c = d.client();
    let peer = format!("uid=0 gid=0 pid={}", std::process::id());

    // A change: intent then result, before/after right, ids tied together.
    let r = c.patch(EC, &json!({"label": "ec-new", "description": "signs"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let ok_id = rid(&r);
    assert_eq!(
        r.json()["audit_id"],
        ok_id.as_str(),
        "audit_id equals X-Request-Id"
    );

    let bad = c.patch(AES, &json!({"label": ""}));
    assert_eq!(bad.status, 400);
    let locked = c.patch(LOCKED, &json!({"label": "x"}));
    assert_eq!(locked.status, 406);
    let scope = c.patch(OTHER, &json!({"label": "x"}));
    assert_eq!(scope.status, 403);
    // The Encedo-compatible update writes the same entries.
    let encedo = |body: Value| {
        c.send(
            "POST",
            "/api/keymgmt/update",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let enc_ok = encedo(json!({"kid": AES, "label": "aes-encedo", "descr": "ZW5j"}));
    assert_eq!(enc_ok.status, 200, "{:?}", enc_ok.json());
    let enc_gone = encedo(json!({"kid": NO_KEY, "label": "x"}));
    assert_eq!(enc_gone.status, 406);
    for r in [&bad, &locked, &scope, &enc_ok, &enc_gone] {
        assert_eq!(r.json()["audit_id"], rid(r).as_str());
    }
    // A read that succeeds is not audited, but still carries a request id.
    let read = c.get(&format!("/v1/keys/{EC}"));
    assert_eq!(read.status, 200);
    let read_id = rid(&read);

    let entries = j.wait_for("the last refusal", |e| {
        let by = by_request(e);
        by.contains_key(&rid(&scope)) && by.contains_key(&rid(&enc_gone))
    });
    let by = by_request(&entries);

    let ok = &by[&ok_id];
    assert_eq!(ok.len(), 2, "intent and result: {ok:#?}");
    assert_common(&ok[0], Event::KeyAttributesChangeIntent, "PENDING", "5");
    assert_common(&ok[1], Event::KeyAttributesChanged, "OK", "5");
    let changes: Value = serde_json::from_str(ok[1]["HSMKEYD_CHANGES"].as_str().unwrap()).unwrap();
    assert_eq!(
        changes,
        json!({"label": {"before": "ec-key", "after": "ec-new"},
               "description": {"before": null, "after": "signs"}})
    );
    assert_eq!(ok[0]["HSMKEYD_CHANGES"], ok[1]["HSMKEYD_CHANGES"]);
    for e in ok {
        assert_eq!(e["HSMKEYD_KID"], EC);
        assert_eq!(e["HSMKEYD_PRINCIPAL"], "auditee");
        assert_eq!(e["HSMKEYD_PEER"], peer.as_str());
    }
    assert_eq!(ok[1]["HSMKEYD_STATUS"], "200");
    let msg = ok[1]["MESSAGE"].as_str().unwrap();
    assert!(
        msg.contains("label \"ec-key\" -> \"ec-new\"")
            && msg.contains("auditee (uid 0)")
            && msg.ends_with("OK"),
        "{msg}"
    );

    let e = &by[&rid(&enc_ok)];
    assert_eq!(e.len(), 2, "intent and result: {e:#?}");
    assert_common(&e[0], Event::KeyAttributesChangeIntent, "PENDING", "5");
    assert_common(&e[1], Event::KeyAttributesChanged, "OK", "5");
    assert_eq!(e[1]["HSMKEYD_REQUEST"], "POST /api/keymgmt/update");
    let changes: Value = serde_json::from_str(e[1]["HSMKEYD_CHANGES"].as_str().unwrap()).unwrap();
    assert_eq!(
        changes,
        json!({"label": {"before": "aes-key", "after": "aes-encedo"},
               "description": {"before": null, "after": "enc"}})
    );
    let e = &by[&rid(&enc_gone)];
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_common(&e[0], Event::KeyAttributesChanged, "FAILED", "3");
    assert_eq!(e[0]["HSMKEYD_STATUS"], "406");
    assert_eq!(e[0]["HSMKEYD_ERROR"], "key_not_found");
    assert_eq!(e[0]["HSMKEYD_KID"], NO_KEY);

    let e = &by[&rid(&bad)];
    assert_eq!(e.len(), 1, "a refused update has no intent entry: {e:#?}");
    assert_common(&e[0], Event::KeyAttributesChanged, "ERROR", "4");
    assert_eq!(e[0]["HSMKEYD_STATUS"], "400");
    assert_eq!(e[0]["HSMKEYD_ERROR"], "invalid_label");
    assert_eq!(e[0]["HSMKEYD_KID"], AES);

    let e = &by[&rid(&locked)];
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_common(&e[0], Event::KeyAttributesChanged, "FAILED", "3");
    assert_eq!(e[0]["HSMKEYD_STATUS"], "406");
    assert_eq!(e[0]["HSMKEYD_ERROR"], "key_not_modifiable");

    let e = &by[&rid(&scope)];
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_common(&e[0], Event::FailedScopeCheck, "FAILED", "4");
    assert_eq!(e[0]["HSMKEYD_STATUS"], "403");
    assert_eq!(e[0]["HSMKEYD_PRINCIPAL"], "auditee");
    assert_eq!(e[0]["HSMKEYD_REQUEST"], format!("PATCH /v1/keys/{OTHER}"));

    assert!(
        !by.contains_key(&read_id),
        "a successful read is not audited"
    );
    let login = of_event(&entries, Event::HsmLogin);
    assert_eq!(login.len(), 1);
    assert_common(login[0], Event::HsmLogin, "OK", "5");
    assert_eq!(of_event(&entries, Event::DaemonStarted).len(), 1);

    // A caller that maps to no principal: AUTH_FAILED, from a second daemon.
    let t2 = token();
    // One window for the whole test, however slow the machine.
    let mut strangers_setup = in_journal(&j, strangers_only());
    strangers_setup.audit.push_str("refusal_window_s = 3600\n");
    let d2 = Daemon::start(&t2, &strangers_setup);
    let r = d2.client().get("/v1/keys");
    assert_eq!(r.status, 401);
    let id = rid(&r);
    let entries = j.wait_for("the 401", |e| by_request(e).contains_key(&id));
    let e = &by_request(&entries)[&id];
    assert_eq!(e.len(), 1);
    assert_common(&e[0], Event::AuthFailed, "FAILED", "4");
    assert_eq!(e[0]["HSMKEYD_STATUS"], "401");
    assert_eq!(e[0]["HSMKEYD_PEER"], peer.as_str());
    assert!(e[0].get("HSMKEYD_PRINCIPAL").is_none());

    assert_eq!(d.stop(), 0);
    assert_eq!(d2.stop(), 0);
    let entries = j.wait_for("both stops", |e| {
        of_event(e, Event::DaemonStopped).len() == 2
    });
    assert_common(
        of_event(&entries, Event::DaemonStopped)[0],
        Event::DaemonStopped,
        "OK",
        "5",
    );
}

#[test]
fn a_failed_login_is_recorded() {
    let j = Journal::start();
    let t = token();
    std::fs::write(&t.pin_file, "wrong-pin-000\n").unwrap();
    let e = Daemon::try_start(&t, &in_journal(&j, narrowed()))
        .err()
        .expect("must not start");
    assert!(e.contains("CKR_PIN_INCORRECT"), "{e}");
    let entries = j.wait_for("HSM_LOGIN", |e| !of_event(e, Event::HsmLogin).is_empty());
    let login = of_event(&entries, Event::HsmLogin);
    assert_common(login[0], Event::HsmLogin, "FAILED", "3");
    assert!(login[0]["MESSAGE"]
        .as_str()
        .unwrap()
        .contains("CKR_PIN_INCORRECT"));
    let export = String::from_utf8_lossy(&j.export()).into_owned();
    assert!(
        !export.contains("wrong-pin-000"),
        "the PIN reached the journal"
    );
}

#[test]
fn a_thousand_mixed_requests_give_exactly_one_result_entry_each() {
    let j = Journal::start();
    let t = token();
    let d = Daemon::start(&t, &in_journal(&j, narrowed()));
    let t2 = token();
    // One window for the whole test, however slow the machine.
    let mut strangers_setup = in_journal(&j, strangers_only());
    strangers_setup.audit.push_str("refusal_window_s = 3600\n");
    let d2 = Daemon::start(&t2, &strangers_setup);
    let (c, c2) = (d.client(), d2.client());

    let mut expected: Vec<(String, u16, Event)> = Vec::new();
    let mut unaudited = Vec::new();
    let mut strangers = 0u64;
    for i in 0..1000 {
        let r = match i % 7 {
            0 => c.patch(AES, &json!({"label": format!("aes-{i}")})),
            1 => c.patch(AES, &json!({"label": "\u{7}"})),
            2 => c.patch(OTHER, &json!({"label": "nope"})),
            3 => c.patch(NO_KEY, &json!({"label": "ghost"})),
            4 => c.patch(LOCKED, &json!({"description": "x"})),
            5 => c2.patch(AES, &json!({"label": "stranger"})),
            _ => c.get(&format!("/v1/keys/{EC}")),
        };
        let want = [200, 400, 403, 404, 406, 401, 200][i % 7];
        assert_eq!(r.status, want, "request {i}: {:?}", r.json());
        let event = match want {
            401 => Event::AuthFailed,
            403 => Event::FailedScopeCheck,
            _ => Event::KeyAttributesChanged,
        };
        if i % 7 == 6 {
            unaudited.push(rid(&r));
        } else if want == 401 && strangers > 0 {
            // An unidentified caller's refusals after its first are summed up per peer.
            strangers += 1;
            unaudited.push(rid(&r));
        } else {
            if want == 401 {
                strangers = 1;
            }
            expected.push((rid(&r), want, event));
        }
    }
    let results = |e: &[Value]| {
        e.iter()
            .filter(|x| x["HSMKEYD_EVENT"] != Event::KeyAttributesChangeIntent.name())
            .filter(|x| x.get("HSMKEYD_REQUEST_ID").is_some())
            .count()
    };
    let entries = j.wait_for("every result entry", |e| results(e) >= expected.len());
    let by = by_request(&entries);
    for (id, status, event) in &expected {
        let got: Vec<_> = by
            .get(id)
            .map(|v| {
                v.iter()
                    .filter(|x| x["HSMKEYD_EVENT"] != Event::KeyAttributesChangeIntent.name())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            got.len(),
            1,
            "request {id} ({status}) has {} result entries",
            got.len()
        );
        assert_eq!(got[0]["HSMKEYD_EVENT"], event.name());
        assert_eq!(got[0]["HSMKEYD_STATUS"], status.to_string());
    }
    assert_eq!(results(&entries), expected.len(), "no extra result entries");
    for id in unaudited {
        assert!(!by.contains_key(&id));
    }
    // Each successful change also has its intent entry.
    let intents = of_event(&entries, Event::KeyAttributesChangeIntent).len();
    assert_eq!(
        intents,
        expected.iter().filter(|(_, s, _)| *s == 200).count()
    );
    // The stranger's other refusals: one summary per window, counting all of them, by
    // the time the daemon has stopped.
    assert_eq!(d2.stop(), 0);
    let summaries = |e: &[Value]| -> Vec<Value> {
        e.iter()
            .filter(|x| x["HSMKEYD_EVENT"] == Event::AuthFailed.name())
            .filter(|x| x.get("HSMKEYD_COUNT").is_some())
            .cloned()
            .collect()
    };
    let entries = j.wait_for("the refusal summaries", |e| {
        summaries(e)
            .iter()
            .map(|x| x["HSMKEYD_COUNT"].as_str().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
            >= strangers - 1
    });
    let summed: u64 = summaries(&entries)
        .iter()
        .map(|x| {
            assert_eq!(x["HSMKEYD_PEER"], "uid=0 gid=0", "{x}");
            assert_eq!(x["HSMKEYD_RESULT"], "FAILED");
            assert!(x["HSMKEYD_FIRST"].is_string() && x["HSMKEYD_LAST"].is_string());
            x["HSMKEYD_COUNT"].as_str().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(
        summed,
        strangers - 1,
        "every refusal is counted exactly once"
    );
    assert!(
        strangers > 100,
        "the test sent {strangers} refused requests"
    );
}

#[test]
fn updates_are_refused_while_journald_is_down_and_work_again_after() {
    let mut j = Journal::start();
    let t = token();
    let d = Daemon::start(&t, &in_journal(&j, narrowed()));
    let c = d.client();
    assert_eq!(c.patch(EC, &json!({"label": "before-outage"})).status, 200);

    j.stop_journald();
    let r = c.patch(
        EC,
        &json!({"label": "during-outage", "description": "lost?"}),
    );
    r.assert_error(503, "audit_unavailable");
    assert!(r.header("x-request-id").is_some());
    // Refusals that cannot be recorded are refused as unavailable too.
    c.patch(OTHER, &json!({"label": "x"}))
        .assert_error(503, "audit_unavailable");
    c.patch(AES, &json!({"label": ""}))
        .assert_error(503, "audit_unavailable");
    // The token, read without the daemon, holds the state from before the outage.
    assert_eq!(t.labels_of(EC), pair("before-outage"));
    let key = c.get(&format!("/v1/keys/{EC}")).json();
    assert_eq!(key["label"], "before-outage");
    assert_eq!(key["description"], Value::Null);

    j.start_journald();
    let r = c.patch(EC, &json!({"label": "after-outage"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let id = rid(&r);
    j.wait_for("the update after the outage", |e| {
        by_request(e).get(&id).is_some_and(|v| v.len() == 2)
    });
    assert_eq!(t.labels_of(EC)[0].1, "after-outage");
}

#[test]
fn no_pin_or_credential_reaches_the_journal() {
    let j = Journal::start();
    let t = token();
    let pin = std::fs::read_to_string(&t.pin_file)
        .unwrap()
        .trim()
        .to_string();
    let d = Daemon::start(&t, &in_journal(&j, narrowed()));
    let c = d.client();
    let bearer = "Bearer eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXRva2Vu.c2ln";
    let body = json!({"label": "leak-check"}).to_string();
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", bearer),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{OTHER}"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", bearer),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 403);
    let id = rid(&r);
    assert_eq!(d.stop(), 0);
    j.wait_for("the refusal", |e| by_request(e).contains_key(&id));
    let export = String::from_utf8_lossy(&j.export()).into_owned();
    assert!(
        export.contains("leak-check"),
        "the export holds the entries"
    );
    for secret in [
        pin.as_str(),
        "c2VjcmV0LXRva2Vu",
        "eyJhbGciOiJFUzI1NiJ9",
        "test-so-pin",
    ] {
        assert!(!export.contains(secret), "{secret:?} reached the journal");
    }
}

#[test]
fn without_journald_the_daemon_refuses_to_start_unless_told_stderr_json() {
    let j = Journal::without_journald();
    let t = token();
    let e = Daemon::try_start(&t, &in_journal(&j, narrowed()))
        .err()
        .expect("must not start without journald");
    assert!(
        e.contains("journald does not answer at /run/systemd/journal/socket")
            && e.contains("audit.sink = \"stderr-json\""),
        "{e}"
    );

    // The development sink: the same entries as JSON lines on stderr.
    let setup = Setup {
        namespace: Some(j.pid()),
        access: narrowed(),
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    let r = d.client().patch(AES, &json!({"label": "dev-sink"}));
    assert_eq!(r.status, 200);
    let id = rid(&r);
    let lines: Vec<Value> = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["HSMKEYD_REQUEST_ID"] == id.as_str())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "intent and result as JSON lines: {}",
        d.log()
    );
    assert_common(&lines[1], Event::KeyAttributesChanged, "OK", "5");
    assert_eq!(lines[1]["HSMKEYD_KID"], AES);
    assert_eq!(d.stop(), 0);
}

#[test]
fn the_catalog_explains_every_message_id() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("usr/lib/systemd/catalog");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/hsmkeyd.catalog"),
        dir.join("hsmkeyd.catalog"),
    )
    .unwrap();
    let journalctl = |args: &[&str]| {
        let out = common::run_ok(
            std::process::Command::new("journalctl")
                .arg(format!("--root={}", root.path().display()))
                .args(args),
            &format!("journalctl {args:?}"),
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, err) = journalctl(&["--update-catalog"]);
    assert!(err.trim().is_empty(), "catalog warnings: {err}");
    let (list, _) = journalctl(&["--list-catalog"]);
    for e in Event::ALL {
        assert!(
            list.lines().any(|l| l.starts_with(e.message_id())),
            "{} ({}) has no catalog entry:\n{list}",
            e.name(),
            e.message_id()
        );
    }
    assert_eq!(
        list.lines().count(),
        Event::ALL.len(),
        "no stale entries:\n{list}"
    );
}

#[test]
fn token_requests_and_reloads_reach_the_journal() {
    let j = Journal::start();
    let t = token();
    let minter = access(
        &[],
        &[Principal::me("minter").scopes(&["keymgmt:list", "auth:token"])],
    );
    let d = Daemon::start(&t, &in_journal(&j, minter));
    let c = d.client();
    let mint = |body: serde_json::Value| {
        c.send(
            "POST",
            "/v1/auth/token",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let ok = mint(json!({"scopes": ["keymgmt:list"], "ttl_s": 60}));
    assert_eq!(ok.status, 200);
    let token = ok.json()["token"].as_str().unwrap().to_string();
    let bad = mint(json!({"scopes": ["keymgmt:list"], "ttl_s": 999_999}));
    assert_eq!(bad.status, 400);
    let denied = mint(json!({"scopes": ["keymgmt:upd"]}));
    assert_eq!(denied.status, 403);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let entries = j.wait_for("the reload", |e| {
        !of_event(e, Event::ConfigReloaded).is_empty() && by_request(e).contains_key(&rid(&denied))
    });
    let by = by_request(&entries);

    let e = &by[&rid(&ok)];
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_common(&e[0], Event::TokenIssued, "OK", "5");
    let jti = {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice::<Value>(&bytes).unwrap()["jti"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(e[0]["HSMKEYD_TOKEN_ID"], jti.as_str());
    assert_eq!(e[0]["HSMKEYD_PRINCIPAL"], "minter");
    let e = &by[&rid(&bad)];
    assert_common(&e[0], Event::TokenIssued, "ERROR", "4");
    assert_eq!(e[0]["HSMKEYD_ERROR"], "invalid_ttl");
    let e = &by[&rid(&denied)];
    assert_common(&e[0], Event::FailedScopeCheck, "FAILED", "4");
    let reload = of_event(&entries, Event::ConfigReloaded);
    assert_common(reload[0], Event::ConfigReloaded, "OK", "5");
    // The token itself never reaches the journal.
    let export = String::from_utf8_lossy(&j.export()).into_owned();
    assert!(!export.contains(&token));
    assert!(!export.contains(token.split('.').nth(2).unwrap()));
}
