//! Where entries go: journald's native protocol, or JSON lines on stderr for development.
//! Both report every failure to the caller; nothing is dropped silently.

use std::borrow::Cow;
use std::io::Write;
use std::os::unix::net::UnixDatagram;

use libsystemd::logging::{journal_send, Priority};

use super::Entry;
use crate::config::AuditSink;

/// journald's socket for structured entries.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// An entry that was not recorded, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuditError(pub String);

#[derive(Debug)]
pub(super) enum Sink {
    Journald,
    StderrJson,
}

impl Sink {
    pub(super) fn open(kind: AuditSink) -> Result<Sink, AuditError> {
        match kind {
            AuditSink::StderrJson => Ok(Sink::StderrJson),
            AuditSink::Journald => {
                // Connecting a datagram socket checks that journald listens, without
                // writing an entry.
                let probe = UnixDatagram::unbound()
                    .map_err(|e| AuditError(format!("cannot create a socket: {e}")))?;
                probe.connect(JOURNAL_SOCKET).map_err(|e| {
                    AuditError(format!(
                        "journald does not answer at {JOURNAL_SOCKET} ({e}); hsmkeyd does not \
                         run without its audit trail. Start systemd-journald, or for \
                         development only set audit.sink = \"stderr-json\""
                    ))
                })?;
                Ok(Sink::Journald)
            }
        }
    }

    /// Writes `fields` (the entry's, with the chain's added).
    /// What can be encoded of an entry before its chain fields are known: for
    /// `stderr-json` the JSON line up to them; journald's payload is built by the write.
    pub(super) fn encode(
        &self,
        fields: &[(&'static str, Cow<'_, str>)],
    ) -> Result<Option<Vec<u8>>, AuditError> {
        match self {
            Sink::Journald => Ok(None),
            Sink::StderrJson => {
                let mut line = Vec::with_capacity(1024);
                line.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    json_member(&mut line, i > 0, k, v)?;
                }
                Ok(Some(line))
            }
        }
    }

    /// Writes the entry: its `fields`, as far as [`Sink::encode`] made them `encoded`, and
    /// then `chain` (the fields the hash chain adds).
    pub(super) fn write<'a>(
        &self,
        entry: &Entry,
        fields: &'a [(&'static str, Cow<'a, str>)],
        encoded: Option<Vec<u8>>,
        chain: impl IntoIterator<Item = (&'static str, &'a str)>,
    ) -> Result<(), AuditError> {
        match self {
            Sink::Journald => {
                let priority = match entry.priority() {
                    3 => Priority::Error,
                    4 => Priority::Warning,
                    _ => Priority::Notice,
                };
                let rest = fields
                    .iter()
                    .filter(|(k, _)| *k != "MESSAGE" && *k != "PRIORITY")
                    .map(|(k, v)| (*k, v.as_ref()))
                    .chain(chain);
                journal_send(priority, &entry.message, rest)
                    .map_err(|e| AuditError(format!("journald did not take the entry: {e}")))
            }
            Sink::StderrJson => {
                let mut line = match encoded {
                    Some(line) => line,
                    None => self.encode(fields)?.unwrap_or_default(),
                };
                for (k, v) in chain {
                    let comma = line.len() > 1;
                    json_member(&mut line, comma, k, v)?;
                }
                line.extend_from_slice(b"}\n");
                let mut err = std::io::stderr().lock();
                err.write_all(&line)
                    .and_then(|()| err.flush())
                    .map_err(|e| AuditError(format!("cannot write the entry to stderr: {e}")))
            }
        }
    }
}

/// `"name":"value"` (JSON-escaped), after a comma unless it is the first member.
fn json_member(line: &mut Vec<u8>, comma: bool, name: &str, value: &str) -> Result<(), AuditError> {
    if comma {
        line.push(b',');
    }
    let bad = |e: serde_json::Error| AuditError(format!("cannot encode the entry: {e}"));
    serde_json::to_writer(&mut *line, name).map_err(bad)?;
    line.push(b':');
    serde_json::to_writer(&mut *line, value).map_err(bad)
}
