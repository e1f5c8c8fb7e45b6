//! Misbehaving clients against a real SoftHSM token: a client that disconnects in the middle
//! of an update never leaves a half-made change or a missing audit entry; slow and greedy
//! connections cannot stall other callers. Token state is read back with pkcs11-tool.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use std::time::{Duration, Instant};

use common::fixture::{pair, token_with, Key, EC};
use common::{Daemon, Response, Setup, Token};
use serde_json::{json, Value};

/// Every intent entry has exactly one result entry with the same request id, and every
/// result entry of an update that wrote to the token has its intent entry.
fn assert_intents_have_results(entries: &[Value]) {
    let of = |event: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| e["HSMKEYD_EVENT"] == event)
            .collect()
    };
    let results = of("KEY_ATTRIBUTES_CHANGED");
    for intent in of("KEY_ATTRIBUTES_CHANGE_INTENT") {
        let rid = &intent["HSMKEYD_REQUEST_ID"];
        let matching: Vec<_> = results
            .iter()
            .filter(|r| &r["HSMKEYD_REQUEST_ID"] == rid)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "intent {intent} needs exactly one result entry, got {matching:?}"
        );
    }
}

/// The result entry of the update that set the label to `label`.
fn result_for_label<'a>(entries: &'a [Value], label: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .filter(|e| {
            e["HSMKEYD_CHANGES"]
                .as_str()
                .and_then(|c| serde_json::from_str::<Value>(c).ok())
                .is_some_and(|c| c["label"]["after"] == label)
        })
        .collect()
}

fn raw_patch(kid: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "PATCH /v1/keys/{kid} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The newest record of `kid` (kept in its objects' labels here), from pkcs11-tool.
fn newest_record(t: &Token, kid: &str) -> Value {
    let prefix = format!("hsmkeyd-meta:{kid} ");
    t.objects()
        .iter()
        .filter_map(|o| o.label.strip_prefix(&prefix))
        .map(|json| serde_json::from_str::<Value>(json).unwrap())
        .max_by_key(|r| r["seq"].as_u64())
        .unwrap_or_else(|| panic!("{kid} has no record in a label"))
}

/// Number of hsmkeyd metadata objects of `kid`, from pkcs11-tool.
fn meta_count(t: &Token, kid: &str) -> usize {
    let label = format!("hsmkeyd-meta:{kid}");
    t.objects()
        .iter()
        .filter(|o| {
            o.class == "Data" && (o.label == label || o.label.starts_with(&format!("{label} ")))
        })
        .count()
}

#[test]
fn an_update_whose_client_disconnects_during_any_token_write_still_completes_and_is_audited() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let c = d.client();
    // A record exists, so the writes that replace one are on the path too.
    Response::ok(&c.patch(EC, &json!({"description": "first"})));

    // Each token write an update of label + description makes, held in turn.
    let holds = [
        ("C_CreateObject", 0),
        ("C_DestroyObject", 0),
        ("C_SetAttributeValue", 0),
        ("C_SetAttributeValue", 1),
        ("C_CreateObject", 1),
        ("C_DestroyObject", 1),
    ];
    let mut held_label_writes = 0;
    for (round, (function, n)) in holds.iter().enumerate() {
        // The worker is idle (record and spare written) before anything is held.
        assert!(common::wait_until(
            "the key to settle",
            Duration::from_secs(5),
            || { meta_count(&t, EC) == 2 && newest_record(&t, EC).get("relabel").is_none() }
        ));
        let hang = faults.path().join(format!("hang_{function}"));
        let held = faults.path().join(format!("held_{function}"));
        std::fs::write(&hang, n.to_string()).unwrap();
        let label = format!("cut-{round}");
        let descr = format!("round {round}");
        let mut s = UnixStream::connect(&d.sock).unwrap();
        s.write_all(&raw_patch(
            EC,
            &json!({"label": label, "description": descr}),
        ))
        .unwrap();
        if !common::wait_until(
            &format!("{function} #{n} to be held"),
            Duration::from_secs(5),
            || held.exists(),
        ) {
            // This write is not on the update's path: the update finished without it.
            std::fs::remove_file(&hang).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            continue;
        }
        if *function == "C_SetAttributeValue" {
            held_label_writes += 1;
        }
        // The client goes away while the write is held.
        let _ = s.shutdown(std::net::Shutdown::Both);
        drop(s);
        // A second update of the same key must wait for the first one's token work.
        let roles = if round % 2 == 0 { "ops" } else { "payments" };
        let second = {
            let c = c.clone();
            std::thread::spawn(move || c.patch(EC, &json!({"roles": [roles]})))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !second.is_finished(),
            "round {round}: an update of the same key was answered while the first one's \
             {function} was still held"
        );
        std::fs::remove_file(&hang).unwrap();
        let r = second.join().unwrap();
        let body = r.ok();
        assert_eq!(body["key"]["label"], label.as_str(), "round {round}");

        // token == index == audit.
        assert_eq!(t.labels_of(EC), pair(&label), "round {round}: token labels");
        let key = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
        assert_eq!(key["label"], label.as_str(), "round {round}: {key}");
        assert_eq!(key["description"], descr.as_str(), "round {round}: {key}");
        assert_eq!(key["roles"], json!([roles]), "round {round}: {key}");
        assert_eq!(key["state"], "ok", "round {round}: {key}");
        // The record and its spare, nothing superseded left, no relabel in progress.
        assert!(
            common::wait_until("the key to settle", Duration::from_secs(5), || {
                meta_count(&t, EC) == 2 && newest_record(&t, EC).get("relabel").is_none()
            }),
            "round {round}: {} metadata objects left",
            meta_count(&t, EC)
        );
        let rec = &newest_record(&t, EC);
        assert_eq!(rec["description"], descr.as_str(), "round {round}: {rec}");
        let entries = d.audit_entries();
        assert_intents_have_results(&entries);
        let results = result_for_label(&entries, &label);
        assert_eq!(results.len(), 1, "round {round}: {results:?}");
        assert_eq!(results[0]["HSMKEYD_RESULT"], "OK", "round {round}");
        assert_eq!(results[0]["HSMKEYD_STATUS"], "200", "round {round}");
    }
    assert_eq!(
        held_label_writes, 2,
        "both label writes of the pair must have been held"
    );
    assert!(
        !d.log().contains("could not restore a label"),
        "{}",
        d.log()
    );
    // A restart reads the same state back from the token.
    let last = format!("cut-{}", holds.len() - 1);
    assert_eq!(d.stop(), 0);
    let d = Daemon::start(&t, &Setup::default());
    let key = Response::ok(&d.client().get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["label"], last.as_str());
    assert_eq!(key["state"], "ok");
}

#[test]
fn a_client_that_closes_mid_body_changes_nothing_and_is_audited_as_aborted() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let creates = common::fault_count(faults.path(), "C_CreateObject");
    let sets = common::fault_count(faults.path(), "C_SetAttributeValue");

    let full = raw_patch(EC, &json!({"label": "never"}));
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(&full[..full.len() - 5]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _ = s.shutdown(std::net::Shutdown::Both);
    drop(s);

    assert!(
        common::wait_until(
            "the aborted request's entry",
            Duration::from_secs(5),
            || {
                d.audit_entries()
                    .iter()
                    .any(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
            }
        ),
        "{}",
        d.log()
    );
    let entries = d.audit_entries();
    let result: Vec<_> = entries
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .collect();
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(
        result[0]["HSMKEYD_ERROR"], "body_incomplete",
        "{}",
        result[0]
    );
    assert_eq!(result[0]["HSMKEYD_RESULT"], "ERROR");
    assert!(
        !entries
            .iter()
            .any(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGE_INTENT"),
        "no intent entry for a body that never arrived"
    );
    assert_eq!(
        common::fault_count(faults.path(), "C_CreateObject"),
        creates
    );
    assert_eq!(
        common::fault_count(faults.path(), "C_SetAttributeValue"),
        sets
    );
    assert_eq!(t.labels_of(EC), pair("start"));
}

#[test]
fn a_pair_with_differing_labels_reads_inconsistent_until_a_label_update_repairs_it() {
    let t = token_with(&[Key::ec(EC, "priv-half").flags(&["--public-label", "pub-half"])]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let key = Response::ok(&c.get(&format!("/v1/keys/{EC}")));
    assert_eq!(key["state"], "inconsistent", "{key}");
    assert!(
        key["reason"]
            .as_str()
            .is_some_and(|r| r.contains("different labels")),
        "{key}"
    );
    // Other updates are refused: they would hide the problem.
    c.patch(EC, &json!({"description": "x"}))
        .assert_error(409, "inconsistent_key_state");
    // A label update sets both objects alike and the key is whole again.
    let body = Response::ok(&c.patch(EC, &json!({"label": "whole"})));
    assert_eq!(body["key"]["state"], "ok", "{body}");
    assert_eq!(t.labels_of(EC), pair("whole"));
}

/// The loop's attribute change: two usage flags turned `on` or off; on a pair one flag of
/// each object, with the end date that says which (so a pair whose flags and date
/// disagree, or whose objects disagree, is half-made). A secret key gets no date: SoftHSM
/// 2.6 cannot read the dates of private objects back after a restart.
fn attribute_change(kid: &str, on: bool) -> Value {
    if kid.starts_with('e') {
        json!({"usage": {"sign": on, "verify": on}, "not_after": end_date(on)})
    } else {
        json!({"usage": {"encrypt": on, "decrypt": on}})
    }
}

fn end_date(on: bool) -> &'static str {
    if on {
        "2031-01-01"
    } else {
        "2032-01-01"
    }
}

/// A key after a kill: its usage flags are those of one [`attribute_change`] (or
/// pkcs11-tool's defaults, with no end date), in the index and on each object as pkcs11-tool
/// reads them.
fn assert_attributes_agree(key: &Value, objects: &[common::P11Object], round: usize) {
    let kid = key["kid"].as_str().unwrap();
    let (flags, classes) = if kid.starts_with('e') {
        (["sign", "verify"], ["Private", "Public"])
    } else {
        (["encrypt", "decrypt"], ["Secret", "Secret"])
    };
    let index: Vec<bool> = flags
        .iter()
        .map(|f| key["attributes"][f].as_bool().unwrap())
        .collect();
    let mut token = Vec::new();
    for (f, class) in flags.iter().zip(classes) {
        let Some(o) = objects.iter().find(|o| o.id == kid && o.class == class) else {
            // The kill cost the token this object (see the loop): the index must not
            // claim the whole pair either.
            assert_ne!(
                key["class"], "key-pair",
                "round {round}: {kid} has no {class} object: {key}\n{objects:?}"
            );
            eprintln!("round {round}: the token lost the {class} object of {kid} to the kill");
            return;
        };
        token.push(o.usage.iter().any(|u| u == f));
    }
    assert_eq!(index, token, "round {round}: {kid}: index {key}");
    assert_eq!(
        index[0], index[1],
        "round {round}: {kid} is half-made: {key}"
    );
    if !kid.starts_with('e') {
        return;
    }
    let expected = match key["not_after"].as_str() {
        // As pkcs11-tool made the pair: it signs and verifies.
        None => true,
        Some(d) => d == end_date(true),
    };
    assert_eq!(
        index[0], expected,
        "round {round}: {kid}: flags and date disagree: {key}"
    );
}

/// Kills the daemon with SIGKILL at random moments of a stream of updates (pairs and
/// secret keys; label + description together, roles, label alone, usage flags (with an
/// end date on pairs)), through the fault wrapper, every other round on a token that caps
/// labels (so records go to new objects and the worker has objects to destroy). After
/// every kill the token must hold each key fully before or fully after one update, and the
/// daemon must start and serve exactly that.
#[test]
fn kill_9_at_random_moments_never_leaves_a_half_made_update() {
    let t = Token::new();
    let kids = ["e001", "e002", "e003", "a001", "a002", "a003"];
    for kid in &kids {
        let kind = if kid.starts_with('e') {
            "ec-p256"
        } else {
            "aes256"
        };
        t.gen(kind, kid, "init", &[]);
    }
    let faults = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill -9 loop seed {seed}");
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut announced = String::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut remade = std::collections::BTreeSet::new();
    let mut dates_seen = std::collections::BTreeSet::new();
    for round in 0..20 {
        let cap = faults.path().join("max_label_len");
        if round % 2 == 1 {
            std::fs::write(&cap, "32").unwrap();
        } else {
            let _ = std::fs::remove_file(&cap);
        }
        let mut d = Daemon::start(&t, &Setup::faulty(faults.path()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let (c, stop) = (d.client(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        n += 1;
                        let kid = kids[((n * 7 + w * 3) % 6) as usize];
                        let tag = format!("r{round}w{w}n{n}");
                        let body = match n % 4 {
                            0 => json!({"roles": [if n % 2 == 0 { "ops" } else { "payments" }]}),
                            3 => attribute_change(kid, n % 8 == 3),
                            _ => json!({"label": tag, "description": tag}),
                        };
                        let _ = std::panic::catch_unwind(|| c.patch(kid, &body));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + next(400)));
        let _ = d.child.kill();
        let _ = d.child.wait();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in writers {
            let _ = w.join();
        }
        announced.push_str(&d.log());
        drop(d);

        // The token, read independently: each key's objects agree.
        let objects = t.objects();
        for kid in &kids {
            let labels: std::collections::BTreeSet<_> = objects
                .iter()
                .filter(|o| &o.id == kid && o.class != "Data")
                .map(|o| o.label.clone())
                .collect();
            // A pair may show two labels only until the next start rolls it forward.
            assert!(labels.len() <= 2, "round {round}: {kid}: {labels:?}");
        }
        // The daemon starts and serves a state that one update (or none) made.
        let d = Daemon::start(&t, &Setup::faulty(faults.path()));
        let mut lost = Vec::new();
        for kid in &kids {
            let r = d.client().get(&format!("/v1/keys/{kid}"));
            if r.status == 404 && t.labels_of(kid).is_empty() {
                // SoftHSM2's file store rewrites an object's file in place: a SIGKILL in the
                // middle of any write to it (ours included) can lose the object. The token
                // no longer has the key, and neither does the index: consistent.
                eprintln!("round {round}: the token lost key {kid} to the kill");
                lost.push(*kid);
                continue;
            }
            assert_eq!(
                r.status,
                200,
                "round {round}: {kid}: {:?}\ntoken: {:?}\ndaemon: {}",
                String::from_utf8_lossy(&r.body),
                t.objects(),
                d.log()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let key = r.json();
            assert_eq!(key["state"], "ok", "round {round}: {key}");
            let label = key["label"].as_str().unwrap();
            let labels: Vec<_> = t.labels_of(kid).into_iter().map(|(_, l)| l).collect();
            assert!(
                labels.iter().all(|l| l == label),
                "round {round}: {kid}: token {labels:?}, index {label}"
            );
            assert_attributes_agree(&key, &t.objects(), round);
            if let Some(d) = key["not_after"].as_str() {
                let _ = dates_seen.insert(d.to_string());
            }
            let _ = seen.insert(label.to_string());
            if label == "init" {
                // A key re-made after a loss keeps the record of the lost one.
                assert!(
                    key["description"].is_null() || remade.contains(kid),
                    "round {round}: {key}"
                );
            } else {
                // Label and description were always written together.
                assert_eq!(
                    key["description"].as_str(),
                    Some(label),
                    "round {round}: {kid} is half-made: {key}"
                );
                assert!(
                    announced.contains(&format!("\\\"after\\\":\\\"{label}\\\"")),
                    "round {round}: {kid} has {label:?}, which no intent entry announced"
                );
            }
        }
        assert_eq!(d.stop(), 0, "round {round}");
        for kid in lost {
            let kind = if kid.starts_with('e') {
                "ec-p256"
            } else {
                "aes256"
            };
            t.gen(kind, kid, "init", &[]);
            let _ = remade.insert(kid);
        }
    }
    assert!(
        seen.len() > 20,
        "the updates hardly ever landed, so the loop proved little: {seen:?}"
    );
    assert_eq!(
        dates_seen.len(),
        2,
        "both attribute changes must have landed somewhere: {dates_seen:?}"
    );
}

/// A token that stops answering must not hold the daemon: SIGTERM still ends it within the
/// drain timeout plus a short grace, with its stop recorded in the audit trail.
#[test]
fn a_wedged_token_does_not_block_shutdown() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    // Every label write hangs from now on.
    std::fs::write(faults.path().join("hang_C_SetAttributeValue"), "0").unwrap();
    let c = d.client();
    let stuck = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| c.patch(EC, &json!({"label": "never"})));
    });
    assert!(common::wait_until(
        "the write to hang",
        Duration::from_secs(5),
        || faults.path().join("held_C_SetAttributeValue").exists()
    ));
    let log = d.stderr.clone();
    let started = Instant::now();
    // drain_timeout_s is 5 in the test config.
    let code = d.stop();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "shutdown took {took:?} with a wedged token"
    );
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("\"HSMKEYD_EVENT\":\"DAEMON_STOPPED\""),
        "the stop was not recorded: {text}"
    );
    std::fs::remove_file(faults.path().join("hang_C_SetAttributeValue")).unwrap();
    let _ = stuck.join();
}

/// A token that stops answering holds at most its sessions' worth of threads: the audit
/// trail still gets the threads it writes with, so refusals are still answered (and
/// recorded) while HSM calls hang.
#[test]
fn a_wedged_token_does_not_starve_the_audit_trail() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup {
        fault_dir: Some(faults.path().to_path_buf()),
        pkcs11_extra: "max_sessions = 2\n".to_string(),
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    // Every attribute read hangs: each Encedo get of the public key waits on the token.
    std::fs::write(faults.path().join("hang"), "").unwrap();
    let sock = d.sock.clone();
    // Far more waiting reads than the blocking threads the daemon keeps for HSM work
    // (max_sessions + 1) plus those it keeps for the audit trail (64).
    let stuck: Vec<UnixStream> = (0..100)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(
                format!("GET /api/keymgmt/get/{EC} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A refusal needs an audit entry before it is answered.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "PATCH /v1/keys/{EC} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
             application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let r = common::parse_response(&buf);
    r.assert_error(400, "empty_patch");
    assert!(
        d.audit_entries()
            .iter()
            .any(|e| e["HSMKEYD_ERROR"] == "empty_patch"),
        "the refusal was not recorded"
    );
    std::fs::remove_file(faults.path().join("hang")).unwrap();
    drop(stuck);
}

/// The daemon's once-a-second token probe may hang with the token; signals must still be
/// handled (a reload here) while it does.
#[test]
fn a_hung_token_probe_does_not_keep_the_daemon_from_its_signals() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    std::fs::write(faults.path().join("hang"), "").unwrap();
    // Long enough for a probe to be stuck in the hung token.
    std::thread::sleep(Duration::from_millis(2500));
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloaded = common::wait_until("the reload", Duration::from_secs(5), || {
        d.audit_entries()
            .iter()
            .any(|e| e["HSMKEYD_EVENT"] == "CONFIG_RELOADED")
    });
    std::fs::remove_file(faults.path().join("hang")).unwrap();
    assert!(
        reloaded,
        "SIGHUP was not handled while the token hung: {}",
        d.log()
    );
}
