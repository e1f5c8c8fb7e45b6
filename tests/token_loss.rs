//! A token that goes away under the daemon and comes back: while it is gone, keys hsmkeyd
//! knew answer 503 `token_unavailable` (never 404), the status says so and the watchdog is
//! not fed; when it is back the daemon re-initializes the module by itself (SoftHSM2 does
//! not see a token directory again within one C_Initialize), rescans it and serves it
//! without a restart, on its own retries or at once on SIGHUP. A copy of the token from
//! before is rescanned, not confused with the old index; another token is not served.
//! (With SoftHSM2 the token's directory is moved away and back.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixture::{token_with, Key, AES, OTHER};
use common::notify::NotifySocket;
use common::{Daemon, Response, Setup, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// A token that comes back is served within this: the retry interval (at most 8 s) plus
/// one re-initialization and scan, with room for a loaded machine.
const BACK_WITHIN: Duration = Duration::from_secs(40);

fn token_dir(t: &Token) -> PathBuf {
    std::fs::read_dir(t.path().join("tokens"))
        .unwrap()
        .next()
        .expect("the token has a directory")
        .unwrap()
        .path()
}

/// Polls GET /v1/keys/{kid} until `want` answers; every answer on the way must be 200 or
/// 503 (a key hsmkeyd knew is never 404).
fn until(d: &Daemon, kid: &str, want: u16, within: Duration) -> Response {
    let deadline = Instant::now() + within;
    loop {
        let r = d.client().get(&format!("/v1/keys/{kid}"));
        assert!(
            r.status == 200 || r.status == 503,
            "a known key answered {}: {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.status == want {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "never answered {want}: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_log(d: &Daemon, text: &str, within: Duration) {
    assert!(
        common::wait_until(text, within, || d.log().contains(text)),
        "the log never said {text:?}: {}",
        d.log()
    );
}

/// Audit entries of one event.
fn events(d: &Daemon, event: &str) -> Vec<Value> {
    d.audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == event)
        .collect()
}

/// Every audit entry's HSMKEYD_SEQ, in the order written.
fn seqs(d: &Daemon) -> Vec<u64> {
    d.audit_entries()
        .iter()
        .map(|e| {
            let s = &e["HSMKEYD_SEQ"];
            s.as_u64()
                .or_else(|| s.as_str().and_then(|s| s.parse().ok()))
                .unwrap_or_else(|| panic!("no HSMKEYD_SEQ in {e}"))
        })
        .collect()
}

fn feeds(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

/// Moves the token's directory away; returns where it went.
fn take_away(dir: &Path, t: &Token) -> PathBuf {
    let away = t.path().join("away");
    std::fs::rename(dir, &away).unwrap();
    away
}

#[test]
fn a_token_that_goes_away_answers_503_and_is_served_again_when_it_is_back() {
    let t = token_with(&[Key::aes(AES, "before"), Key::aes(OTHER, "other")]);
    let notify = NotifySocket::bind(Duration::from_millis(50));
    let setup = Setup {
        env: vec![notify.env(), ("WATCHDOG_USEC".into(), "400000".into())],
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    let mut got = Vec::new();
    notify.receive_until("READY=1", &mut got);
    Response::ok(&d.client().patch(AES, &json!({"label": "one"})));

    let dir = token_dir(&t);
    let away = take_away(&dir, &t);
    until(&d, AES, 503, Duration::from_secs(10)).assert_error(503, "token_unavailable");
    // Everything that needs the keys says so; nothing says "no such key".
    d.client()
        .get("/v1/keys")
        .assert_error(503, "token_unavailable");
    d.client()
        .patch(AES, &json!({"label": "while-away"}))
        .assert_error(503, "token_unavailable");
    d.client()
        .get("/v1/keys/00ff")
        .assert_error(503, "token_unavailable");
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["state"], "token_unavailable", "{s}");
    let _ = notify.collect(Duration::from_millis(500));
    assert_eq!(
        feeds(&notify.collect(Duration::from_secs(1))),
        0,
        "fed the watchdog while the token was gone"
    );
    assert!(
        d.log()
            .contains("the token no longer holds hsmkeyd's token-signing key"),
        "{}",
        d.log()
    );
    assert_eq!(events(&d, "TOKEN_LOST").len(), 1, "{}", d.log());
    // The daemon keeps looking, and finds nothing yet.
    wait_for_log(
        &d,
        "the lost token is not back yet",
        Duration::from_secs(20),
    );

    // Updates keep coming while the token returns: each is answered 200 or 503, never a
    // 500 or a dropped connection, whatever moment of the swap it meets.
    let done = std::sync::atomic::AtomicBool::new(false);
    let statuses = std::thread::scope(|s| {
        let during = s.spawn(|| {
            let mut seen = Vec::new();
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                seen.push(
                    d.client()
                        .patch(OTHER, &json!({"description": format!("during {n}")}))
                        .status,
                );
            }
            seen
        });
        std::fs::rename(&away, &dir).unwrap();
        let r = until(&d, AES, 200, BACK_WITHIN);
        assert_eq!(r.json()["label"], "one");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        during.join().unwrap()
    });
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "answers during the return: {statuses:?}"
    );
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["state"], "serving", "{s}");
    assert!(
        feeds(&notify.collect(Duration::from_secs(1))) >= 2,
        "the watchdog is not fed again"
    );
    // Updates work on the re-initialized module, and reach the token.
    Response::ok(&d.client().patch(AES, &json!({"label": "two"})));
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "two".to_string())]
    );
    assert_eq!(
        t.labels_of(OTHER),
        vec![("Secret".to_string(), "other".to_string())]
    );
    // The audit trail records the return, checkpoints into the token again, and its chain
    // goes on: every entry's number is above the one before.
    let returned = events(&d, "TOKEN_RETURNED");
    assert_eq!(returned.len(), 1, "{}", d.log());
    let seq = |e: &Value| {
        e["HSMKEYD_SEQ"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
    };
    let returned_at = seq(&returned[0]).expect("TOKEN_RETURNED has a number");
    // Signed by the checkpoint the return triggers (reason "token"), or by one due by count
    // that got the chain first: either way a checkpoint after the return, in the token.
    assert!(
        common::wait_until("the checkpoint after the return", BACK_WITHIN, || {
            events(&d, "AUDIT_CHECKPOINT")
                .iter()
                .any(|e| seq(e).is_some_and(|n| n > returned_at))
        }),
        "{}",
        d.log()
    );
    // While the token was gone nothing tried to sign a checkpoint: a refusal every few
    // milliseconds made one due each time, and each failed with an error in the log.
    let failed = d
        .log()
        .matches("an audit checkpoint was not written")
        .count();
    assert!(
        failed <= 1,
        "{failed} checkpoint attempts failed while the token was lost"
    );
    let seqs = seqs(&d);
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "HSMKEYD_SEQ does not keep increasing: {seqs:?}"
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn sighup_looks_for_a_lost_token_at_once() {
    let t = token_with(&[Key::aes(AES, "before")]);
    let d = Daemon::start(&t, &Setup::default());
    let dir = token_dir(&t);
    let away = take_away(&dir, &t);
    until(&d, AES, 503, Duration::from_secs(10));
    // Let the retries space out (1, 2, 4, 8 s): the next one is seconds away.
    assert!(
        common::wait_until("four retries", Duration::from_secs(30), || {
            d.log().matches("the lost token is not back yet").count() >= 4
        }),
        "{}",
        d.log()
    );
    std::fs::rename(&away, &dir).unwrap();
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).unwrap();
    Response::ok(&until(&d, AES, 200, BACK_WITHIN));
    assert!(
        d.log().contains("trigger=SIGHUP"),
        "the return did not come from the SIGHUP: {}",
        d.log()
    );
    Response::ok(&d.client().patch(AES, &json!({"label": "after-hup"})));
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "after-hup".to_string())]
    );
}

#[test]
fn a_copy_of_the_token_from_before_is_rescanned_not_confused_with_the_old_index() {
    let t = token_with(&[Key::aes(AES, "before"), Key::aes(OTHER, "other")]);
    // A first run gives the token hsmkeyd's own keys; the token as it is then is kept.
    assert_eq!(Daemon::start(&t, &Setup::default()).stop(), 0);
    let dir = token_dir(&t);
    let copy = t.path().join("copy");
    common::run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&dir)
            .arg(&copy),
        "cp -a",
    );
    // Then it moves on: a key made outside hsmkeyd, and a rename.
    let _ = t.gen("aes256", "c0c0", "late", &[]);
    let d = Daemon::start(&t, &Setup::default());
    Response::ok(&d.client().get("/v1/keys/c0c0"));
    Response::ok(&d.client().patch(AES, &json!({"label": "after"})));

    // The token goes, and the copy comes back in its place.
    let _ = take_away(&dir, &t);
    until(&d, AES, 503, Duration::from_secs(10));
    std::fs::rename(&copy, &dir).unwrap();
    let r = until(&d, AES, 200, BACK_WITHIN);
    // What the token holds now, not what the old index said.
    assert_eq!(r.json()["label"], "before", "{}", d.log());
    d.client()
        .get("/v1/keys/c0c0")
        .assert_error(404, "key_not_found");
    // Writes reach the right objects through the new handles.
    Response::ok(&d.client().patch(AES, &json!({"label": "again"})));
    assert_eq!(
        t.labels_of(AES),
        vec![("Secret".to_string(), "again".to_string())]
    );
    assert_eq!(
        t.labels_of(OTHER),
        vec![("Secret".to_string(), "other".to_string())]
    );
}

#[test]
fn another_token_in_its_place_is_not_served() {
    let t = token_with(&[Key::aes(AES, "mine")]);
    let foreign = token_with(&[Key::aes(AES, "theirs"), Key::aes(OTHER, "theirs-too")]);
    let before = foreign.objects_text();
    let d = Daemon::start(&t, &Setup::default());
    let dir = token_dir(&t);
    let away = take_away(&dir, &t);
    until(&d, AES, 503, Duration::from_secs(10));

    // Another token, with the same label, is put where ours was.
    let theirs = token_dir(&foreign);
    let swapped = t.path().join("tokens").join("swapped");
    std::fs::rename(&theirs, &swapped).unwrap();
    wait_for_log(&d, "it is another token and is not served", BACK_WITHIN);
    d.client()
        .get(&format!("/v1/keys/{AES}"))
        .assert_error(503, "token_unavailable");
    d.client()
        .get(&format!("/v1/keys/{OTHER}"))
        .assert_error(503, "token_unavailable");
    let s = Response::ok(&d.client().get("/v1/status"));
    assert_eq!(s["state"], "token_unavailable", "{s}");
    let lost = events(&d, "TOKEN_LOST");
    assert!(
        lost.iter().any(|e| e["MESSAGE"]
            .as_str()
            .unwrap_or("")
            .contains("another token")),
        "{lost:?}"
    );
    // The foreign token was not written to.
    std::fs::rename(&swapped, &theirs).unwrap();
    assert_eq!(foreign.objects_text(), before);

    // Ours comes back: served again.
    std::fs::rename(&away, &dir).unwrap();
    let r = until(&d, AES, 200, BACK_WITHIN);
    assert_eq!(r.json()["label"], "mine");
}
