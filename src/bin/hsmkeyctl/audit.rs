//! `hsmkeyctl audit`: this host's audit trail, read with `journalctl -o json` and filtered
//! by journal field matches (so journald does the filtering).

use std::process::Command;

use serde_json::{json, Value};

use super::Failure;

/// Filters of `hsmkeyctl audit`.
pub struct Filter<'a> {
    pub kid: Option<&'a str>,
    pub event: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub since: Option<&'a str>,
    pub lines: Option<usize>,
}

/// The matching entries, oldest first, in the stable `--json` shape.
pub fn entries(f: &Filter<'_>) -> Result<Vec<Value>, Failure> {
    let mut cmd =
        Command::new(std::env::var_os("JOURNALCTL").unwrap_or_else(|| "journalctl".into()));
    let _ = cmd.args([
        "-o",
        "json",
        "--no-pager",
        "-q",
        "SYSLOG_IDENTIFIER=hsmkeyd",
    ]);
    if let Some(k) = f.kid {
        let _ = cmd.arg(format!("HSMKEYD_KID={}", k.to_ascii_lowercase()));
    }
    if let Some(e) = f.event {
        let _ = cmd.arg(format!("HSMKEYD_EVENT={}", e.to_ascii_uppercase()));
    }
    if let Some(r) = f.request_id {
        let _ = cmd.arg(format!("HSMKEYD_REQUEST_ID={r}"));
    }
    if let Some(s) = f.since {
        let _ = cmd.args(["--since", s]);
    }
    if let Some(n) = f.lines {
        let _ = cmd.args(["-n", &n.to_string()]);
    }
    let out = cmd
        .output()
        .map_err(|e| Failure::Unavailable(format!("cannot run journalctl: {e}")))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Failure::Usage(format!("journalctl failed: {}", why.trim())));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .map(|e| shape(&e))
                .map_err(|e| {
                    Failure::Unavailable(format!("journalctl wrote a line that is not JSON: {e}"))
                })
        })
        .collect()
}

/// One entry as `--json` shows it.
fn shape(e: &Value) -> Value {
    let text = |k: &str| e[k].as_str().map(str::to_string);
    let micros: i128 = text("__REALTIME_TIMESTAMP")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    json!({
        "time": time,
        "event": text("HSMKEYD_EVENT"),
        "result": text("HSMKEYD_RESULT"),
        "kid": text("HSMKEYD_KID"),
        "principal": text("HSMKEYD_PRINCIPAL"),
        "peer": text("HSMKEYD_PEER"),
        "request_id": text("HSMKEYD_REQUEST_ID"),
        "status": text("HSMKEYD_STATUS").and_then(|s| s.parse::<u16>().ok()),
        "error": text("HSMKEYD_ERROR"),
        "changes": text("HSMKEYD_CHANGES").and_then(|c| serde_json::from_str::<Value>(&c).ok()),
        "message": text("MESSAGE"),
    })
}

/// The entries as a table.
pub fn table(entries: &[Value]) -> String {
    let mut t = super::show::table(&["TIME", "EVENT", "RESULT", "KID", "PRINCIPAL", "MESSAGE"]);
    for e in entries {
        let _ = t.add_row(
            ["time", "event", "result", "kid", "principal", "message"]
                .iter()
                .map(|k| super::show::cell(&e[*k]))
                .collect::<Vec<_>>(),
        );
    }
    t.to_string()
}
