//! Fair shares under misbehaving clients: request deadlines and minimum body rates, the
//! per-caller connection budgets on both front doors, the shared budget of unauthenticated
//! TLS connections, and one caller's slow bodies against the other front door.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fixture::{minting_access, pair, token_with, Key, EC};
use common::{Daemon, Response, Setup, Token};
use serde_json::json;

/// The audit entries the daemon wrote (stderr-json sink), in order.
/// A daemon whose `[server]` section has these extra lines.
fn with_server(t: &Token, server: &str, tls: bool) -> Daemon {
    let setup = Setup {
        tls_port: tls.then(common::tls::free_port),
        server_extra: server.to_string(),
        ..Setup::with_access(minting_access())
    };
    Daemon::start(t, &setup)
}

/// Sends the head of a PATCH declaring `declared` body bytes, then one byte every `every`,
/// and returns the answer the daemon gives (reading until it closes).
fn trickle(sock: &Path, declared: usize, every: Duration) -> (Response, Duration) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let head = format!(
        "PATCH /v1/keys/{EC} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut sent = 0;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the slow body was never cut off"
        );
        if sent < declared - 1 && s.write_all(b" ").is_ok() {
            sent += 1;
        }
        std::thread::sleep(every);
    }
    (common::parse_response(&buf), start.elapsed())
}

#[test]
fn a_slow_body_is_cut_by_the_minimum_rate_and_the_deadline_even_for_a_known_caller() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let d = with_server(&t, "request_timeout_s = 3\nmin_body_rate = 100\n", false);
    // 1 byte per 50 ms is 20 bytes/s: under the 100 bytes/s minimum.
    let (r, _) = trickle(&d.sock, 1000, Duration::from_millis(50));
    let body = r.assert_error(408, "request_timeout");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("slower than 100 bytes/s"),
        "{body}"
    );
    assert_eq!(r.header("connection"), Some("close"));
    drop(d);

    // Without a rate check, the whole-body deadline still holds.
    let d = with_server(&t, "request_timeout_s = 2\nmin_body_rate = 0\n", false);
    let (r, _) = trickle(&d.sock, 1000, Duration::from_millis(50));
    let body = r.assert_error(408, "request_timeout");
    assert!(
        body["message"].as_str().unwrap().contains("within 2 s"),
        "{body}"
    );
    // Audited as a refused update; the key is untouched.
    let entries = d.audit_entries();
    let results: Vec<_> = entries
        .iter()
        .filter(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED")
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["HSMKEYD_ERROR"], "request_timeout");
    assert_eq!(t.labels_of(EC), pair("start"));
    // A body sent at a normal pace is not affected.
    Response::ok(&d.client().patch(EC, &json!({"label": "fine"})));
}

/// A keep-alive connection that has been served once (so the daemon has counted it), left
/// open. Until the daemon has seen the end of a connection closed just before (such as
/// the readiness probe's), it may still count that one and refuse this one: then this
/// tries again, so that the caller holds connections the daemon answered with 200.
fn kept_alive(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(sock).unwrap();
        s.write_all(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut status = [0u8; 12];
        s.read_exact(&mut status).unwrap();
        match &status {
            b"HTTP/1.1 200" => return s,
            b"HTTP/1.1 503" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => panic!(
                "a held connection was answered {:?}",
                String::from_utf8_lossy(other)
            ),
        }
    }
}

#[test]
fn one_uid_cannot_hold_more_than_its_share_of_the_unix_socket() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let d = with_server(
        &t,
        "max_connections = 8\nmax_connections_per_caller = 3\n",
        false,
    );
    // Three idle keep-alive connections: the uid's whole share.
    let mut held: Vec<UnixStream> = (0..3).map(|_| kept_alive(&d.sock)).collect();
    let r = d.client().get("/v1/keys");
    let body = r.assert_error(503, "too_many_connections");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("uid 0 already holds 3"),
        "{body}"
    );
    assert_eq!(r.header("connection"), Some("close"));
    // The refusal is for this uid only: the share comes back when one closes.
    drop(held.pop());
    assert!(common::wait_until(
        "a slot to come back",
        Duration::from_secs(5),
        || { d.client().get("/v1/keys").status == 200 }
    ));
}

#[test]
fn a_full_unix_socket_answers_503_at_once_instead_of_leaving_callers_waiting() {
    let t = Token::new();
    let d = with_server(
        &t,
        "max_connections = 2\nmax_connections_per_caller = 2\n",
        false,
    );
    let _held: Vec<UnixStream> = (0..2).map(|_| kept_alive(&d.sock)).collect();
    let body = d
        .client()
        .get("/v1/keys")
        .assert_error(503, "too_many_connections");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("all 2 connections"),
        "{body}"
    );
}

#[test]
fn unauthenticated_tls_connections_share_a_small_budget_and_a_short_life() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let d = with_server(
        &t,
        "max_unauthenticated = 8\nunauthenticated_timeout_s = 4\n",
        true,
    );
    let https = d.https();
    let token = d.mint(&["keymgmt:list"], 300);
    let closed = |c: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| {
        let mut buf = [0u8; 16];
        matches!(c.read(&mut buf), Ok(0) | Err(_))
    };
    // Eight connections that never authenticate take the whole shared budget; a ninth
    // makes the oldest of them go.
    let mut idle: Vec<_> = (0..8).map(|_| https.connect().unwrap()).collect();
    let started = Instant::now();
    let mut fourth = https.connect().expect("a new connection is admitted");
    assert!(
        closed(&mut idle[0]),
        "the oldest idle connection was not evicted"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "evicted by the timeout, not to make room"
    );
    // With nothing new arriving, the others are closed after their short life (4 s).
    let fresh = std::iter::once(&mut fourth).chain(idle.iter_mut().skip(1));
    for c in fresh {
        c.get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(closed(c), "an idle connection outlived its time");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "closed before their time ({:?}): not by the timeout",
        started.elapsed()
    );
    // A flood of idle connections does not lock real clients out.
    let flood = {
        let https = https.clone();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for _ in 0..150 {
                if let Ok(c) = https.connect() {
                    open.push(c);
                }
            }
            open.len()
        })
    };
    for _ in 0..20 {
        Response::ok(&https.get("/v1/keys", &token));
    }
    assert!(
        flood.join().unwrap() > 100,
        "the flood itself was refused, not evicted"
    );
    // The Unix socket does not share that budget.
    Response::ok(&d.client().get("/v1/keys"));
}

#[test]
fn one_principal_cannot_hold_more_than_its_share_of_the_tls_listener() {
    let t = Token::new();
    let d = with_server(&t, "max_connections_per_caller = 2\n", true);
    let https = d.https();
    let token = d.mint(&["keymgmt:list"], 300);
    let request =
        format!("GET /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    // Two authenticated keep-alive connections: the principal's share.
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            let mut c = https.connect().unwrap();
            c.write_all(request.as_bytes()).unwrap();
            let mut buf = [0u8; 12];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200");
            c
        })
        .collect();
    let body = https
        .get("/v1/keys", &token)
        .assert_error(503, "too_many_connections");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("principal tester"),
        "{body}"
    );
    drop(held.pop());
    assert!(common::wait_until(
        "the share to come back",
        Duration::from_secs(5),
        || { https.get("/v1/keys", &token).status == 200 }
    ));
}

#[test]
fn slow_bodies_from_one_caller_do_not_stall_the_other_front_door() {
    let t = token_with(&[Key::ec(EC, "start")]);
    let d = with_server(
        &t,
        "request_timeout_s = 20\nmin_body_rate = 0\nmax_connections_per_caller = 32\n",
        true,
    );
    let token = d.mint(&["keymgmt:list", "keymgmt:get"], 300);
    // The minting connection must have given its slot back before the uid's share is
    // filled, or one of the slow connections would be the one refused.
    std::thread::sleep(Duration::from_millis(300));
    let sock = d.sock.clone();
    // The uid's whole share of slow bodies, each held open for up to 20 s.
    let slow: Vec<UnixStream> = (0..32)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(
                format!(
                    "PATCH /v1/keys/{EC} HTTP/1.1\r\nHost: x\r\nContent-Type: \
                     application/json\r\nContent-Length: 1000\r\n\r\n{{"
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    // The HTTPS door answers while they are all still open.
    for _ in 0..20 {
        Response::ok(&d.https().get(&format!("/v1/keys/{EC}"), &token));
    }
    // The greedy uid only exhausted its own share.
    d.client()
        .get("/v1/keys")
        .assert_error(503, "too_many_connections");
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a slow connection was closed before the other door was tested"
        );
    }
}
