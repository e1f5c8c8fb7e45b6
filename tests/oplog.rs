//! The daemon's operational log (not the audit trail) in a real systemd-journald: when
//! stderr is the journal (`JOURNAL_STREAM` names stderr's stream socket, as systemd sets it
//! for `StandardError=journal`), it goes through tracing-journald as structured entries
//! (identifier `hsmkeyd-log`, the event's fields as `F_<NAME>`, TARGET, PRIORITY as syslog
//! means it) and nothing is written
//! as flat text; when `JOURNAL_STREAM` names something else, it stays text on stderr.

mod common;

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture::{demo_token, EC};
use common::journal::Journal;
use common::{write_config, Daemon, Setup, Token};
use serde_json::{json, Value};

fn in_journal(j: &Journal) -> Setup {
    Setup {
        audit: "sink = \"journald\"\n".to_string(),
        namespace: Some(j.pid()),
        ..Setup::default()
    }
}

/// The daemon inside the journal's namespace with stdout and stderr connected to journald's
/// stream socket by `systemd-cat` (identifier `hsmkeyd-stderr`); `journal_stream` is the
/// shell expression `JOURNAL_STREAM` is set to before the daemon is exec'ed.
fn start_on_journal_stream(j: &Journal, t: &Token, journal_stream: &str) -> Daemon {
    let config = write_config(t, &in_journal(j));
    let mut cmd = Command::new("nsenter");
    let _ = cmd
        .args(["-t", &j.pid().to_string(), "-m", "--"])
        .args(["systemd-cat", "-t", "hsmkeyd-stderr", "sh", "-c"])
        .arg(format!(
            "JOURNAL_STREAM={journal_stream} exec \"$0\" --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_hsmkeyd"))
        .arg(&config)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("JOURNAL_STREAM");
    let stderr = t.path().join("systemd-cat.log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn systemd-cat");
    let d = Daemon {
        child,
        sock: t.path().join("api.sock"),
        stderr,
        https: None,
    };
    // Serving, as the daemon says in whichever form its log takes.
    wait_for(j, "the daemon serving", |j| {
        ["hsmkeyd-log", "hsmkeyd-stderr"].iter().any(|id| {
            j.entries_of(id)
                .iter()
                .any(|e| message(e).contains("serving"))
        }) && UnixStream::connect(&d.sock).is_ok()
    });
    d
}

/// Polls until `pred` holds (journald reads its sockets asynchronously).
fn wait_for(j: &Journal, what: &str, pred: impl Fn(&Journal) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred(j) {
        assert!(
            Instant::now() < deadline,
            "never saw {what}; on the stream: {:#?}; log: {:#?}",
            j.entries_of("hsmkeyd-stderr"),
            j.entries_of("hsmkeyd-log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_entries(j: &Journal, identifier: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    wait_for(j, identifier, |j| pred(&j.entries_of(identifier)));
    j.entries_of(identifier)
}

fn message(e: &Value) -> &str {
    e["MESSAGE"].as_str().unwrap_or_default()
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn with_stderr_on_the_journal_the_log_is_structured_entries() {
    let j = Journal::start();
    let t = demo_token();
    // What systemd puts in JOURNAL_STREAM: device and inode of stderr's stream socket.
    let d = start_on_journal_stream(&j, &t, "$(stat -L -c %d:%i /proc/self/fd/2)");
    let r = d.client().patch(EC, &json!({"description": "logged"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(d.stop(), 0);

    let log = wait_for_entries(&j, "hsmkeyd-log", |e| {
        e.iter().any(|e| message(e) == "stopped")
    });
    let built = log
        .iter()
        .find(|e| message(e) == "key index built")
        .unwrap_or_else(|| panic!("no 'key index built' entry in {log:#?}"));
    // The event's own field, its target and level, as journal fields.
    assert!(
        built["F_KEYS"]
            .as_str()
            .is_some_and(|k| k.parse::<u32>().is_ok()),
        "{built:#?}"
    );
    assert_eq!(built["PRIORITY"], "6", "info is PRIORITY 6: {built:#?}");
    assert!(
        built["TARGET"]
            .as_str()
            .is_some_and(|t| t.starts_with("hsmkeyd::daemon")),
        "{built:#?}"
    );
    let logged_in = log
        .iter()
        .find(|e| message(e) == "logged in")
        .unwrap_or_else(|| panic!("no 'logged in' entry in {log:#?}"));
    assert!(logged_in["F_TOKEN"].is_string(), "{logged_in:#?}");

    // Nothing went out as flat text on the stream, and the audit trail kept its own sink.
    let text = j.entries_of("hsmkeyd-stderr");
    assert!(
        !text.iter().any(|e| message(e).contains("key index built")),
        "the log was also written as text: {text:#?}"
    );
    let audit = j.entries();
    assert!(
        audit
            .iter()
            .any(|e| e["HSMKEYD_EVENT"] == "KEY_ATTRIBUTES_CHANGED"),
        "the audit entries are under their own identifier: {audit:#?}"
    );
    assert!(
        !log.iter().any(|e| e.get("HSMKEYD_EVENT").is_some()),
        "no audit entry went through the log: {log:#?}"
    );
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_journal_stream_that_is_not_stderr_keeps_the_log_as_text() {
    let j = Journal::start();
    let t = demo_token();
    // A JOURNAL_STREAM inherited from elsewhere (another stream's inode) must not be trusted.
    let d = start_on_journal_stream(&j, &t, "1:1");
    assert_eq!(d.stop(), 0);

    let text = wait_for_entries(&j, "hsmkeyd-stderr", |e| {
        e.iter().any(|e| message(e).contains("stopped"))
    });
    assert!(
        text.iter().any(|e| message(e).contains("key index built")),
        "{text:#?}"
    );
    assert!(
        j.entries_of("hsmkeyd-log").is_empty(),
        "structured entries although stderr is not the journal"
    );
}
