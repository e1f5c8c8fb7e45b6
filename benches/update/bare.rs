//! The server floor of the throughput figures: what any daemon at all would make of the raw
//! label sets once its clients are other threads sending HTTP over a Unix socket. A bare
//! server in this process (a blocking thread per connection, each with its own PKCS#11
//! session: no runtime, no routing beyond the kid in the path, no authentication, no audit,
//! no index) answers each PATCH by setting the label from its JSON body on the key the
//! path names, then a fixed 200; the clients are the very ones the daemon's throughput
//! figures use. What it loses against the raw 2-thread sets is what a request's socket
//! round trip and its thread wake-ups cost on this machine, before any daemon work.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use cryptoki::context::Pkcs11;
use cryptoki::object::ObjectHandle;
use cryptoki::slot::Slot;
use serde_json::Value;

use crate::token::{handles, raw_open, set_label, usage};
use crate::{Ctx, Res};

/// The answer to every PATCH: what the bench's client checks of a daemon's (a 200 whose
/// `changed` is not empty).
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
    content-length: 21\r\n\r\n{\"changed\":[\"label\"]}";

/// What the bare server did for a run of clients.
pub(crate) struct Bare {
    /// PATCHes/s, as the clients count them.
    pub(crate) rate: f64,
    /// CPU its connection threads spent per PATCH they answered, in ms.
    pub(crate) cpu_per_update_ms: f64,
    /// Their thread switches per PATCH.
    pub(crate) switches_per_update: f64,
}

/// What one connection thread did: PATCHes answered, CPU seconds, thread switches.
type Served = (u64, f64, u64);

/// Label PATCHes from one client per kid against the bare server, on the token `pin`
/// opens (no other process may have it open); `dir` takes its socket.
pub(crate) fn bare_throughput(pin: &Path, dir: &Path, kids: &[String], seconds: f64) -> Res<Bare> {
    let (p11, slot, s) = raw_open(pin)?;
    let mut keys = HashMap::new();
    for kid in kids {
        let _ = keys.insert(kid.clone(), handles(&s, kid)?[0]);
    }
    let sock = dir.join("bare.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).ctx("binding the bare server's socket")?;
    let (rate, served) = std::thread::scope(|scope| {
        let server = scope.spawn(|| serve(&listener, kids.len(), &p11, slot, &keys));
        let rate = crate::daemon::throughput(&sock, kids, seconds);
        let served = server.join().expect("bare server thread");
        Ok::<_, String>((rate?, served?))
    })?;
    drop(s);
    p11.finalize().ctx("C_Finalize")?;
    let (n, cpu, switches) = served
        .iter()
        .fold((0, 0.0, 0), |(n, c, s), t| (n + t.0, c + t.1, s + t.2));
    let n = n.max(1) as f64;
    Ok(Bare {
        rate,
        cpu_per_update_ms: cpu * 1000.0 / n,
        switches_per_update: switches as f64 / n,
    })
}

/// Accepts `conns` connections and serves each on a thread of its own until its client
/// closes it; what each thread did.
fn serve(
    listener: &UnixListener,
    conns: usize,
    p11: &Pkcs11,
    slot: Slot,
    keys: &HashMap<String, ObjectHandle>,
) -> Res<Vec<Served>> {
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for _ in 0..conns {
            let (stream, _) = listener.accept().ctx("accept")?;
            threads.push(scope.spawn(move || serve_conn(stream, p11, slot, keys)));
        }
        let done = threads.into_iter().map(|t| t.join().expect("bare conn"));
        done.collect::<Res<Vec<Served>>>()
    })
}

/// One keep-alive connection: each request head names the kid and carries a
/// Content-Length; its body is `{"label": ...}`. Returns what this thread did, once the
/// client has closed.
fn serve_conn(
    mut stream: UnixStream,
    p11: &Pkcs11,
    slot: Slot,
    keys: &HashMap<String, ObjectHandle>,
) -> Res<Served> {
    let session = p11.open_rw_session(slot).ctx("C_OpenSession (bare)")?;
    let (mut buf, mut chunk, mut answered) = (Vec::new(), [0u8; 16 * 1024], 0);
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            let length = length.ok_or(format!("no Content-Length in {head:?}"))?;
            let whole = end + 4 + length;
            if buf.len() < whole {
                break;
            }
            let path = head.split(' ').nth(1).unwrap_or("");
            let kid = path.strip_prefix("/v1/keys/").unwrap_or(path);
            let key = *keys
                .get(kid)
                .ok_or(format!("the bare server has no key {kid}"))?;
            let body: Value = serde_json::from_slice(&buf[end + 4..whole]).ctx("body")?;
            let label = body["label"]
                .as_str()
                .ok_or(format!("no label in {body}"))?;
            set_label(&session, key, label.to_string())?;
            stream.write_all(ANSWER).ctx("answering")?;
            let _ = buf.drain(..whole);
            answered += 1;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                let (cpu, switches) = usage(nix::sys::resource::UsageWho::RUSAGE_THREAD)?;
                return Ok((answered, cpu, switches));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("the bare server's read: {e}")),
        }
    }
}
