//! Reload on SIGHUP and shutdown on SIGTERM with requests in flight: a changed config takes
//! effect without failing a running request, a broken one is refused while the old one
//! keeps serving, and SIGTERM lets running requests finish before exiting 0.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture::{access, token_with, Principal, AES, AES_KEY};
use common::notify::NotifySocket;
use common::tls::{tls_dir, TlsClient};
use common::{write_config, Daemon, Setup, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

fn token() -> Token {
    token_with(&[AES_KEY])
}

/// The default setup with one principal, the test's uid, holding `scopes`.
fn holding(scopes: &[&str]) -> Setup {
    Setup::with_access(access(&[], &[Principal::me("p").scopes(scopes)]))
}

fn signal(d: &Daemon, s: Signal) {
    kill(Pid::from_raw(d.child.id() as i32), s).unwrap();
}

/// Audit entries (stderr-json) of one event.
fn entries(d: &Daemon, event: &str) -> Vec<Value> {
    d.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["HSMKEYD_EVENT"] == event)
        .collect()
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites the daemon's config file for `setup` (same token, same paths).
fn rewrite(t: &Token, setup: &Setup) {
    let _ = write_config(t, setup);
}

/// Sends SIGHUP and returns the daemon's `n`th reload entry (counting from 0) once it is
/// written.
fn reload(d: &Daemon, n: usize) -> Value {
    signal(d, Signal::SIGHUP);
    wait_for("the reload entry", || {
        entries(d, "CONFIG_RELOADED").len() > n
    });
    entries(d, "CONFIG_RELOADED")[n].clone()
}

#[test]
fn sighup_applies_a_new_principal_and_reports_reloading_then_ready() {
    let t = token();
    let notify = NotifySocket::bind(Duration::from_millis(50));
    let env = vec![notify.env()];
    let before = Setup {
        env: env.clone(),
        ..holding(&["keymgmt:list"])
    };
    let d = Daemon::start(&t, &before);
    let c = d.client();
    c.patch(AES, &json!({"label": "x"}))
        .assert_error(403, "missing_scope");

    rewrite(
        &t,
        &Setup {
            env,
            ..holding(&["keymgmt:list", "keymgmt:upd"])
        },
    );
    notify.drain(); // READY from the start
    let e = reload(&d, 0);
    assert_eq!(e["HSMKEYD_RESULT"], "OK", "{e}");
    let r = c.patch(AES, &json!({"label": "after-reload"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(t.labels_of(AES)[0].1, "after-reload");

    let mut msgs = Vec::new();
    notify.receive_until("READY=1", &mut msgs);
    let reloading = msgs
        .iter()
        .position(|m| m.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 in {msgs:?}"));
    let usec: u64 = msgs[reloading]
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC with RELOADING: {msgs:?}"));
    assert!(usec > 0);
    let ready = msgs.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready > reloading,
        "READY=1 must follow RELOADING=1: {msgs:?}"
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_broken_or_restart_only_config_is_refused_and_the_old_one_keeps_serving() {
    let t = token();
    let d = Daemon::start(&t, &holding(&["keymgmt:list", "keymgmt:upd"]));
    let c = d.client();
    let config = t.path().join("hsmkeyd.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    assert_eq!(c.get("/v1/status").ok()["last_reload"], Value::Null);

    let cases = [
        (
            good.replace("[server]", "[server]\ncolour = \"red\""),
            "colour",
        ),
        (good.replace("mode = \"0660\"", "mode = \"0640\""), "[unix]"),
        (
            good.replace("keymgmt:upd\"", "keymgmt:everything\""),
            "keymgmt:everything",
        ),
        ("this is not toml [".to_string(), "invalid TOML"),
    ];
    for (i, (text, reason)) in cases.iter().enumerate() {
        std::fs::write(&config, text).unwrap();
        let e = reload(&d, i);
        assert_eq!(e["HSMKEYD_RESULT"], "FAILED", "{e}");
        let msg = e["MESSAGE"].as_str().unwrap();
        assert!(
            msg.contains(reason) && msg.contains("old configuration keeps serving"),
            "{reason}: {msg}"
        );
        // Still serving, with the old principal (which may update).
        let r = c.patch(AES, &json!({"label": format!("still-{i}")}));
        assert_eq!(r.status, 200, "{reason}: {:?}", r.json());
    }
    assert!(d.log().contains("reload refused"));
    let last = c.get("/v1/status").ok()["last_reload"].clone();
    assert_eq!(last["applied"], false, "{last}");
    assert!(
        last["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{last}"
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_request_in_flight_during_a_reload_finishes_on_the_old_config() {
    let t = token();
    let faults = tempfile::tempdir().unwrap();
    let setup = holding(&["keymgmt:list", "keymgmt:upd"]).with_faults(faults.path());
    let d = Daemon::start(&t, &setup);
    // The token hangs: the PATCH below stops inside its first HSM write.
    std::fs::write(faults.path().join("hang"), "").unwrap();
    let c = d.client();
    let inflight = std::thread::spawn(move || c.patch(AES, &json!({"label": "in-flight"})));
    std::thread::sleep(Duration::from_millis(300));

    // The new config removes this caller's right to update.
    rewrite(
        &t,
        &Setup {
            access: holding(&["keymgmt:list"]).access,
            ..setup
        },
    );
    assert_eq!(reload(&d, 0)["HSMKEYD_RESULT"], "OK");
    std::fs::remove_file(faults.path().join("hang")).unwrap();

    let r = inflight.join().unwrap();
    assert_eq!(
        r.status,
        200,
        "the request in flight failed: {:?}",
        r.json()
    );
    assert_eq!(t.labels_of(AES)[0].1, "in-flight");
    // New requests see the new config.
    d.client()
        .patch(AES, &json!({"label": "late"}))
        .assert_error(403, "missing_scope");
    assert_eq!(d.stop(), 0);
}

#[test]
fn sighup_rereads_the_tls_certificate() {
    let t = token();
    let d = Daemon::start(&t, &holding(&["keymgmt:list", "auth:token"]).https());
    let tok = d.mint(&["keymgmt:list"], 300);
    let old = d.https();
    assert_eq!(old.get("/v1/keys", &tok).status, 200);
    assert!(old.handshake_ok());
    let old_ca = std::fs::read(tls_dir(t.path()).join("ca.pem")).unwrap();

    // A new CA and certificate at the same paths (rotation), then SIGHUP.
    let config = std::fs::read_to_string(t.path().join("hsmkeyd.toml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hsmkeyd-devcert"))
        .arg("--out")
        .arg(tls_dir(t.path()))
        .arg("--force")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_ne!(
        std::fs::read(tls_dir(t.path()).join("ca.pem")).unwrap(),
        old_ca
    );
    std::fs::write(t.path().join("hsmkeyd.toml"), config).unwrap();
    assert_eq!(reload(&d, 0)["HSMKEYD_RESULT"], "OK");

    let new = TlsClient::new(old.addr, &tls_dir(t.path()).join("ca.pem"));
    assert_eq!(new.get("/v1/keys", &tok).status, 200);
    // A client that trusts only the old CA no longer completes the handshake.
    assert!(!old.handshake_ok(), "the old certificate is still served");
    assert!(new.handshake_ok());
    assert_eq!(d.stop(), 0);
}

/// A reload re-reads the PIN and, when it differs, logs out and in again with it. SoftHSM2
/// keeps a token's PIN data per process from C_Initialize, so a PIN changed by another
/// process is only seen by a new daemon process: here the token refuses the new PIN on
/// reload (the refusal path), and a restart picks it up.
#[test]
fn a_pin_the_token_refuses_on_reload_is_refused_and_the_old_login_stays() {
    let t = token();
    let setup = holding(&["keymgmt:list", "keymgmt:upd", "auth:token"]);
    let d = Daemon::start(&t, &setup);
    let old_pin = std::fs::read_to_string(&t.pin_file).unwrap();
    let old_pin = old_pin.trim().to_string();
    let new_pin = "a-new-user-pin-9876";

    // A wrong PIN in the file: refused; the daemon logs in again with the old PIN (which
    // renumbers SoftHSM's private objects: the index is rebuilt) and keeps serving.
    std::fs::write(&t.pin_file, "not-the-pin\n").unwrap();
    let e = reload(&d, 0);
    assert_eq!(e["HSMKEYD_RESULT"], "FAILED");
    let msg = e["MESSAGE"].as_str().unwrap();
    assert!(
        msg.contains("CKR_PIN_INCORRECT") && msg.contains("old login stays"),
        "{e}"
    );
    let r = d.client().patch(AES, &json!({"label": "one"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(t.labels_of(AES)[0].1, "one");
    // The token-signing key is found again under its new handle: minting still works.
    let _ = d.mint(&["keymgmt:list"], 60);

    // The same PIN again: the reload applies without logging in again.
    std::fs::write(&t.pin_file, format!("{old_pin}\n")).unwrap();
    let e = reload(&d, 1);
    assert_eq!(e["HSMKEYD_RESULT"], "OK", "{e}");
    assert!(!e["MESSAGE"].as_str().unwrap().contains("new PIN"), "{e}");
    let log = d.log();
    assert!(!log.contains(&old_pin), "a PIN reached the log");
    assert_eq!(d.stop(), 0);

    // The PIN changed on the token (by its security officer) and in the file: a new daemon
    // process logs in with it.
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &t.conf)
        .args(["--module", common::SOFTHSM])
        .args(["--token-label", common::TOKEN_LABEL])
        .args([
            "--login",
            "--pin",
            &old_pin,
            "--change-pin",
            "--new-pin",
            new_pin,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    std::fs::write(&t.pin_file, format!("{new_pin}\n")).unwrap();
    let d = Daemon::start(&t, &setup);
    assert_eq!(d.client().patch(AES, &json!({"label": "two"})).status, 200);
    assert!(!d.log().contains(new_pin));
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let t = token();
    let faults = tempfile::tempdir().unwrap();
    let setup = holding(&["keymgmt:list", "keymgmt:upd"]).with_faults(faults.path());
    let mut d = Daemon::start(&t, &setup);
    std::fs::write(faults.path().join("hang"), "").unwrap();
    let c = d.client();
    let inflight = std::thread::spawn(move || c.patch(AES, &json!({"label": "finished"})));
    std::thread::sleep(Duration::from_millis(300));
    signal(&d, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // Draining: the process is still there, and new connections are refused.
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );
    assert!(std::os::unix::net::UnixStream::connect(&d.sock).is_err());
    std::fs::remove_file(faults.path().join("hang")).unwrap();
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(t.labels_of(AES)[0].1, "finished");
    let status = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = d.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "never exited: {}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(status.code(), Some(0), "{}", d.log());
}
