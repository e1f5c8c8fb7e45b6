//! A test-bound NOTIFY_SOCKET: the datagrams the daemon sends its service manager
//! (READY=1, STATUS=, WATCHDOG=1, ...), received by the test.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A bound datagram socket in its own directory.
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub sock: UnixDatagram,
}

impl NotifySocket {
    /// Binds a fresh socket; each receive waits at most `read_timeout`.
    pub fn bind(read_timeout: Duration) -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(read_timeout)).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            sock,
        }
    }

    /// The `NOTIFY_SOCKET` entry for [`super::Setup::env`].
    pub fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".to_string(), self.path.display().to_string())
    }

    fn recv(&self, buf: &mut [u8]) -> Option<String> {
        let n = self.sock.recv(buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Reads and drops what is queued, until one receive times out.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while self.recv(&mut buf).is_some() {}
    }

    /// Receives into `got` until one message has the line `want` (fails after 30 s).
    pub fn receive_until(&self, want: &str, got: &mut Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while !got.iter().any(|m| m.lines().any(|l| l == want)) {
            assert!(Instant::now() < deadline, "no {want} in {got:?}");
            got.extend(self.recv(&mut buf));
        }
    }

    /// Every message received within `d`.
    pub fn collect(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            got.extend(self.recv(&mut buf));
        }
        got
    }
}
