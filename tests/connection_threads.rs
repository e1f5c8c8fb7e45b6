//! The Unix socket's fast lane: up to `server.connection_threads` connections are served
//! on a thread of their own (named `hsmkeyd-conn`), whose token calls run right there; the
//! connections past it, and all of them with 0, are served by the runtime. Either way an
//! update lands on the token. The TLS listener has as many of its own.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::fixture::{pair, token_with, Key, AES, EC, EC2, OTHER};
use common::{Daemon, Setup, Token};
use serde_json::{json, Value};

/// The daemon's threads with this name.
fn threads_named(d: &Daemon, name: &str) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.child.id())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// One request on a keep-alive connection, and its answer: (status, JSON body).
fn exchange(s: &mut UnixStream, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    read_answer(s)
}

/// The next answer on a keep-alive connection: (status, JSON body).
fn read_answer(s: &mut impl Read) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the daemon closed a keep-alive connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .expect("an answer without content-length")
            .parse::<usize>()
            .unwrap();
        if rest.len() >= length {
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            return (status, serde_json::from_str(&rest[..length]).unwrap());
        }
    }
}

/// What [`Token::labels_of`] gives for a secret key labelled `label`.
fn secret(label: &str) -> Vec<(String, String)> {
    vec![("Secret".to_string(), label.to_string())]
}

/// A daemon with this many connection threads, once the connections made before (the
/// harness's readiness probe, and one request here, which comes after it in the accept
/// order) have ended and given their threads back.
fn daemon_with_threads(t: &Token, n: usize) -> Daemon {
    let setup = Setup {
        server_extra: format!("connection_threads = {n}\n"),
        ..Setup::default()
    };
    let d = Daemon::start(t, &setup);
    let mut first = UnixStream::connect(&d.sock).unwrap();
    let (status, body) = exchange(&mut first, "GET", "/v1/status", None);
    assert_eq!(status, 200, "{body}");
    drop(first);
    assert!(common::wait_until(
        "the first connections' threads to end",
        Duration::from_secs(5),
        || threads_named(&d, "hsmkeyd-conn") == 0
    ));
    d
}

fn relabel(s: &mut UnixStream, kid: &str, label: &str) {
    let (status, body) = exchange(
        s,
        "PATCH",
        &format!("/v1/keys/{kid}"),
        Some(&json!({ "label": label })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["label"], label, "{body}");
}

#[test]
fn connections_past_connection_threads_are_served_by_the_runtime_and_all_of_them_update() {
    let t = token_with(&[Key::aes(AES, "a"), Key::aes(OTHER, "o"), Key::ec(EC, "e")]);
    let d = daemon_with_threads(&t, 2);
    let mut conns: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&d.sock).unwrap())
        .collect();
    // A request on each makes sure the daemon has taken every connection in.
    for c in &mut conns {
        let (status, body) = exchange(c, "GET", &format!("/v1/keys/{AES}"), None);
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        threads_named(&d, "hsmkeyd-conn"),
        2,
        "two own threads, not three"
    );
    // The first two on their own threads, the third on the runtime; the pair's two label
    // writes go through the runtime's pool from an own thread.
    relabel(&mut conns[0], AES, "from-lane-0");
    relabel(&mut conns[1], EC, "from-lane-1");
    relabel(&mut conns[2], OTHER, "from-the-runtime");
    assert_eq!(t.labels_of(AES), secret("from-lane-0"));
    assert_eq!(t.labels_of(OTHER), secret("from-the-runtime"));
    assert_eq!(t.labels_of(EC), pair("from-lane-1"));
    // A thread ends with its connection, and frees its lane for the next one.
    drop(conns.remove(0));
    assert!(common::wait_until(
        "the thread to end",
        Duration::from_secs(5),
        || { threads_named(&d, "hsmkeyd-conn") == 1 }
    ));
    let mut next = UnixStream::connect(&d.sock).unwrap();
    relabel(&mut next, AES, "from-a-freed-lane");
    assert_eq!(threads_named(&d, "hsmkeyd-conn"), 2);
    assert_eq!(t.labels_of(AES), secret("from-a-freed-lane"));
}

#[test]
fn with_no_connection_threads_every_connection_is_served_by_the_runtime() {
    let t = token_with(&[Key::aes(AES, "a")]);
    let d = daemon_with_threads(&t, 0);
    let mut c = UnixStream::connect(&d.sock).unwrap();
    relabel(&mut c, AES, "no-lanes");
    assert_eq!(threads_named(&d, "hsmkeyd-conn"), 0);
    assert_eq!(t.labels_of(AES), secret("no-lanes"));
}

/// An update on an own thread whose client leaves while it waits for the key (another
/// update holds it in a token write that hangs) still runs to its end once the key is
/// free, with its result entry, and only then gives its thread back.
#[test]
fn an_update_whose_client_leaves_while_it_waits_still_lands_on_its_own_thread() {
    let t = token_with(&[Key::aes(AES, "a")]);
    let faults = tempfile::tempdir().unwrap();
    let d = Daemon::start(&t, &Setup::faulty(faults.path()));
    let hang = faults.path().join("hang_C_SetAttributeValue");
    std::fs::write(&hang, "0").unwrap();
    let mut first = UnixStream::connect(&d.sock).unwrap();
    let patch = |body: &Value| {
        let body = body.to_string();
        format!(
            "PATCH /v1/keys/{AES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    first
        .write_all(patch(&json!({"label": "first"})).as_bytes())
        .unwrap();
    common::wait_held(faults.path(), "C_SetAttributeValue");
    let threads_before = threads_named(&d, "hsmkeyd-conn");
    let mut second = UnixStream::connect(&d.sock).unwrap();
    second
        .write_all(patch(&json!({"label": "second"})).as_bytes())
        .unwrap();
    assert!(common::wait_until(
        "the second connection's thread",
        Duration::from_secs(5),
        || threads_named(&d, "hsmkeyd-conn") == threads_before + 1
    ));
    // The second update waits for the key; its client goes away meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let _ = second.shutdown(std::net::Shutdown::Both);
    drop(second);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(&hang).unwrap();
    let (status, body) = read_answer(&mut first);
    assert_eq!(status, 200, "{body}");
    assert!(
        common::wait_until("the second update", Duration::from_secs(5), || {
            t.labels_of(AES) == secret("second")
        }),
        "the token says {:?}",
        t.labels_of(AES)
    );
    let results: Vec<Value> = d
        .audit_entries()
        .into_iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .collect();
    let second_result = results.iter().find(|e| {
        e["HSMKEYD_CHANGES"]
            .as_str()
            .is_some_and(|c| c.contains("\"second\""))
    });
    let second_result = second_result.unwrap_or_else(|| panic!("no result entry: {results:?}"));
    assert_eq!(second_result["HSMKEYD_RESULT"], "OK", "{second_result}");
    let key = d.client().get(&format!("/v1/keys/{AES}")).ok();
    assert_eq!(key["label"], "second", "{key}");
    assert!(common::wait_until(
        "the second connection's thread to end",
        Duration::from_secs(5),
        || threads_named(&d, "hsmkeyd-conn") == threads_before
    ));
}

/// A PATCH written in full, then the sending half shut down: the answer, then the end.
fn patch_half_closed(sock: &std::path::Path, kid: &str, label: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    let body = json!({ "label": label }).to_string();
    let head = format!(
        "PATCH /v1/keys/{kid} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_client_that_shuts_down_its_sending_half_still_gets_its_answer_on_both_paths() {
    let t = token_with(&[Key::aes(AES, "aes"), Key::aes(OTHER, "other")]);
    for (threads, kid) in [(4, AES), (0, OTHER)] {
        let d = daemon_with_threads(&t, threads);
        let label = format!("half-closed-{threads}");
        let answer = patch_half_closed(&d.sock, kid, &label);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "with {threads} connection threads: {answer:?}"
        );
        assert!(
            answer.contains(&format!("\"label\":\"{label}\"")),
            "{answer}"
        );
        assert_eq!(t.labels_of(kid), secret(&label));
        let bad = patch_half_closed(&d.sock, kid, "x\u{0}y");
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad:?}");
        assert!(bad.contains("\"error\":\"invalid_label\""), "{bad}");
        assert_eq!(
            t.labels_of(kid),
            secret(&label),
            "a refused label changed the key"
        );
        drop(d);
    }
}

/// A PATCH with a bearer token on a keep-alive TLS connection; its answer.
fn relabel_tls(s: &mut (impl Read + Write), token: &str, kid: &str, label: &str) {
    let body = json!({ "label": label }).to_string();
    let head = format!(
        "PATCH /v1/keys/{kid} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let (status, answer) = read_answer(s);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["key"]["label"], label, "{answer}");
}

#[test]
fn tls_connections_get_threads_of_their_own_up_to_the_bound_and_all_of_them_update() {
    let t = token_with(&[Key::aes(AES, "a"), Key::aes(OTHER, "o"), Key::ec(EC, "e")]);
    for threads in [2, 0] {
        let setup = Setup {
            access: common::fixture::minting_access(),
            server_extra: format!("connection_threads = {threads}\n"),
            ..Setup::default()
        }
        .https();
        let d = Daemon::start(&t, &setup);
        let token = d.mint(&["keymgmt:upd"], 600);
        // The Unix connections of the start and the mint give their threads back.
        assert!(common::wait_until(
            "the Unix connections' threads to end",
            Duration::from_secs(5),
            || threads_named(&d, "hsmkeyd-conn") == 0
        ));
        let mut conns: Vec<_> = (0..3).map(|_| d.https().connect().unwrap()).collect();
        for (i, (c, kid)) in conns.iter_mut().zip([AES, EC, OTHER]).enumerate() {
            relabel_tls(c, &token, kid, &format!("tls-{threads}-{i}"));
        }
        assert_eq!(
            threads_named(&d, "hsmkeyd-conn"),
            threads,
            "with connection_threads = {threads}, three TLS connections"
        );
        assert_eq!(t.labels_of(AES), secret(&format!("tls-{threads}-0")));
        assert_eq!(t.labels_of(EC), pair(&format!("tls-{threads}-1")));
        assert_eq!(t.labels_of(OTHER), secret(&format!("tls-{threads}-2")));
        // A second request on a connection served by a thread of its own, and on the third.
        relabel_tls(&mut conns[0], &token, AES, "tls-again");
        relabel_tls(&mut conns[2], &token, OTHER, "tls-again");
        assert_eq!(t.labels_of(AES), secret("tls-again"));
        assert_eq!(t.labels_of(OTHER), secret("tls-again"));
        drop(conns);
        assert!(common::wait_until(
            "the TLS connections' threads to end",
            Duration::from_secs(5),
            || threads_named(&d, "hsmkeyd-conn") == 0
        ));
    }
}

/// Four connections on threads of their own share one PKCS#11 session
/// (`pkcs11.max_sessions = 1`): each token call waits for the session the one before gives
/// back, and every wait ends when it does, not at the pool's 30 s checkout timeout.
#[test]
fn own_threads_sharing_one_session_each_get_it_as_soon_as_it_is_given_back() {
    let kids = [AES, OTHER, EC, EC2];
    let t = token_with(&[
        Key::aes(AES, "a"),
        Key::aes(OTHER, "o"),
        Key::ec(EC, "e"),
        Key::ec(EC2, "f"),
    ]);
    let setup = Setup {
        pkcs11_extra: "max_sessions = 1\n".to_string(),
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    let rounds = 25;
    std::thread::scope(|scope| {
        for kid in kids {
            let sock = d.sock.clone();
            scope.spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                // A missed wake-up would hold a request for 30 s.
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                for n in 0..rounds {
                    relabel(&mut s, kid, &format!("{kid}-{n}"));
                }
            });
        }
    });
    let last = |kid: &str| format!("{kid}-{}", rounds - 1);
    assert_eq!(t.labels_of(AES), secret(&last(AES)));
    assert_eq!(t.labels_of(OTHER), secret(&last(OTHER)));
    assert_eq!(t.labels_of(EC), pair(&last(EC)));
    assert_eq!(t.labels_of(EC2), pair(&last(EC2)));
}
