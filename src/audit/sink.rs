//! Where entries go: journald's native protocol, or JSON lines on stderr for development.
//! Both report every failure to the caller; nothing is dropped silently.

use std::collections::BTreeMap;
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
    pub(super) fn write(
        &self,
        entry: &Entry,
        fields: &[(&'static str, String)],
    ) -> Result<(), AuditError> {
        match self {
            Sink::Journald => {
                let priority = match entry.priority() {
                    3 => Priority::Error,
                    4 => Priority::Warning,
                    _ => Priority::Notice,
                };
                // journal_send takes MESSAGE and PRIORITY from its own arguments.
                let rest = fields
                    .iter()
                    .filter(|(k, _)| *k != "MESSAGE" && *k != "PRIORITY")
                    .map(|(k, v)| (*k, v.as_str()));
                journal_send(priority, &entry.message, rest)
                    .map_err(|e| AuditError(format!("journald did not take the entry: {e}")))
            }
            Sink::StderrJson => {
                let map: BTreeMap<&str, &str> =
                    fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut line = serde_json::to_vec(&map)
                    .map_err(|e| AuditError(format!("cannot encode the entry: {e}")))?;
                line.push(b'\n');
                let mut err = std::io::stderr().lock();
                err.write_all(&line)
                    .and_then(|()| err.flush())
                    .map_err(|e| AuditError(format!("cannot write the entry to stderr: {e}")))
            }
        }
    }
}
