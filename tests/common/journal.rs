//! A real systemd-journald for one test, in a private mount namespace: tmpfs on
//! /run/systemd, /run/log and /var/log/journal, so the daemon started inside the namespace
//! writes to this journald only and `journalctl` reads exactly its entries back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// A mount namespace holding its own journald.
pub struct Journal {
    holder: Child,
    journald: Option<Child>,
}

impl Journal {
    /// A namespace with journald running.
    pub fn start() -> Journal {
        let mut j = Journal::without_journald();
        j.start_journald();
        j
    }

    /// A namespace with the journal directories mounted but no journald listening.
    pub fn without_journald() -> Journal {
        let holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn unshare (util-linux)");
        let j = Journal {
            holder,
            journald: None,
        };
        // Wait until the holder has its own mount namespace.
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", j.pid()))
            .map(|l| l == ours)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "unshare never made a namespace");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = super::run_ok(
            j.command("sh").args([
                "-c",
                "set -e; for d in /run/systemd /run/log /var/log/journal; do \
                 mkdir -p $d; mount -t tmpfs tmpfs $d; done",
            ]),
            "mounting the journal tmpfs",
        );
        j
    }

    /// Pid whose mount namespace this is.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        let _ = c.args(["-t", &self.pid().to_string(), "-m", "--", program]);
        c
    }

    /// Starts journald and waits until its socket takes entries.
    pub fn start_journald(&mut self) {
        assert!(self.journald.is_none(), "journald already runs");
        let child = self
            .command(JOURNALD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn systemd-journald");
        self.journald = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // systemd-cat writes through the journal socket: success means journald reads.
            let ok = self
                .command("sh")
                .args(["-c", "echo journal-probe | systemd-cat -t journal-probe"])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok && self.count("SYSLOG_IDENTIFIER=journal-probe") > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "journald never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops journald; its socket file stays, so writers get ECONNREFUSED.
    pub fn stop_journald(&mut self) {
        if let Some(mut c) = self.journald.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn count(&self, matcher: &str) -> usize {
        let out = self
            .command("journalctl")
            .args(["-o", "json", "--no-pager", "-q", matcher])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Every entry hsmkeyd wrote (`SYSLOG_IDENTIFIER=hsmkeyd`), oldest first.
    pub fn entries(&self) -> Vec<Value> {
        self.entries_of("hsmkeyd")
    }

    /// Every entry with this `SYSLOG_IDENTIFIER`, oldest first.
    pub fn entries_of(&self, identifier: &str) -> Vec<Value> {
        let out = self
            .command("journalctl")
            .args(["-o", "json", "--no-pager", "-q"])
            .arg(format!("SYSLOG_IDENTIFIER={identifier}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("journalctl json line"))
            .collect()
    }

    /// Waits (journald reads its socket asynchronously) until `pred` holds for the entries,
    /// and returns them.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let e = self.entries();
            if pred(&e) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "journal never showed {what}; it has {} hsmkeyd entries: {e:#?}",
                e.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The raw journal export (every field of every entry), to search for leaks.
    pub fn export(&self) -> Vec<u8> {
        self.command("journalctl")
            .args(["-o", "export", "--no-pager", "-q"])
            .output()
            .unwrap()
            .stdout
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop_journald();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
