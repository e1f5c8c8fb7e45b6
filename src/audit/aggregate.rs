//! Refusals of callers nobody could identify (401 with no principal), aggregated per peer:
//! the first refusal of a peer in a window gets its own entry at once, the rest of that
//! window are counted, and one summary entry (`HSMKEYD_COUNT`, `HSMKEYD_FIRST`,
//! `HSMKEYD_LAST`) records them when the window closes. A flood of bad requests therefore
//! costs a bounded amount of journal, while every refusal of an *identified* caller (403,
//! or a 401 of a known principal) stays an entry of its own.
//!
//! A peer is the uid and gid on the Unix socket (not the pid), the address without its port
//! on TLS.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{Entry, Event, Outcome};
use crate::sync;

/// Most peers tracked at once; past that, refusals of new peers get entries of their own
/// (the journal's own rate limit is the last line of defence).
const MAX_PEERS: usize = 4096;

/// The windows of the peers refused lately.
pub struct Refusals {
    window: Duration,
    peers: Mutex<Peers>,
}

#[derive(Default)]
struct Peers {
    open: HashMap<String, Window>,
    /// Windows that closed before the next summary pass.
    closed: Vec<(String, Window)>,
}

struct Window {
    opened: Instant,
    counted: u64,
    first: Option<SystemTime>,
    last: SystemTime,
    reason: String,
}

/// What a caller does with a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write its entry now.
    Record,
    /// Counted for the peer's summary: no entry now.
    Counted,
}

impl Refusals {
    /// Windows of `window` per peer.
    pub fn new(window: Duration) -> Refusals {
        Refusals {
            window,
            peers: Mutex::new(Peers::default()),
        }
    }

    /// The peer part of `HSMKEYD_PEER`: uid and gid on the Unix socket, the address
    /// without its port on TLS.
    pub fn peer_key(peer: &str) -> String {
        if let Some(rest) = peer.strip_prefix("uid=") {
            let mut parts = rest.split(' ');
            let uid = parts.next().unwrap_or_default();
            let gid = parts.next().unwrap_or_default();
            return format!("uid={uid} {gid}");
        }
        match peer.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().to_string(),
            Err(_) => peer.to_string(),
        }
    }

    /// Decides about one refusal of an unidentified caller at `peer`.
    pub fn refused(&self, peer: &str, reason: &str) -> Verdict {
        let key = Refusals::peer_key(peer);
        let mut peers = sync::lock(&self.peers);
        let now = SystemTime::now();
        if let Some(w) = peers.open.get_mut(&key) {
            if w.opened.elapsed() < self.window {
                w.counted += 1;
                let _ = w.first.get_or_insert(now);
                w.last = now;
                w.reason = reason.to_string();
                return Verdict::Counted;
            }
            // The window is over: keep it for its summary, and open the next.
            if let Some(old) = peers.open.remove(&key) {
                peers.closed.push((key.clone(), old));
            }
        }
        if peers.open.len() >= MAX_PEERS {
            return Verdict::Record;
        }
        let _ = peers.open.insert(
            key,
            Window {
                opened: Instant::now(),
                counted: 0,
                first: None,
                last: now,
                reason: String::new(),
            },
        );
        Verdict::Record
    }

    /// Summary entries of the windows that have closed (all of them when `all`), which are
    /// forgotten. A window that counted nothing needs no summary.
    pub fn due(&self, all: bool) -> Vec<Entry> {
        let mut peers = sync::lock(&self.peers);
        let expired: Vec<String> = peers
            .open
            .iter()
            .filter(|(_, w)| all || w.opened.elapsed() >= self.window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut windows = std::mem::take(&mut peers.closed);
        for key in expired {
            if let Some(w) = peers.open.remove(&key) {
                windows.push((key, w));
            }
        }
        drop(peers);
        windows
            .into_iter()
            .filter(|(_, w)| w.counted > 0)
            .map(|(key, w)| self.summary(key, w))
            .collect()
    }

    fn summary(&self, key: String, w: Window) -> Entry {
        let mut e = Entry::new(
            Event::AuthFailed,
            Outcome::Failed,
            format!(
                "{} more requests from {key} refused within {} s (aggregated): {}",
                w.counted,
                self.window.as_secs_f64(),
                w.reason
            ),
        );
        e.peer = Some(key);
        e.status = Some(401);
        e.count = Some(w.counted);
        e.between = Some((rfc3339(w.first.unwrap_or(w.last)), rfc3339(w.last)));
        e
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_one_entry_per_window_and_a_summary_of_the_rest() {
        let r = Refusals::new(Duration::from_millis(200));
        assert_eq!(r.refused("127.0.0.1:4000", "no token"), Verdict::Record);
        for port in 4001..4011 {
            assert_eq!(
                r.refused(&format!("127.0.0.1:{port}"), "bad"),
                Verdict::Counted
            );
        }
        // Another peer is not affected.
        assert_eq!(r.refused("uid=7 gid=7 pid=1", "who"), Verdict::Record);
        assert_eq!(r.refused("uid=7 gid=7 pid=2", "who"), Verdict::Counted);
        assert!(r.due(false).is_empty(), "no window has closed yet");
        std::thread::sleep(Duration::from_millis(250));
        let mut due = r.due(false);
        due.sort_by_key(|e| e.peer.clone());
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].peer.as_deref(), Some("127.0.0.1"));
        assert_eq!(due[0].count, Some(10));
        assert_eq!(due[1].peer.as_deref(), Some("uid=7 gid=7"));
        assert_eq!(due[1].count, Some(1));
        // A new window begins with an entry again.
        assert_eq!(r.refused("127.0.0.1:5000", "no token"), Verdict::Record);
    }
}
