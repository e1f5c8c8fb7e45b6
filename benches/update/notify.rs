//! The daemon's NOTIFY_SOCKET: a thread reads every datagram for the whole daemon run, so
//! the start can wait for READY=1, and the `STATUS=` lines give the background worker's lag.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Ctx, Res};

/// How long the reader blocks before it looks at its stop flag again.
const POLL: Duration = Duration::from_millis(50);
/// How long [`Notify::catch_up_ms`] waits for a status line without a backlog.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);
/// How long a status line may stay away before a clean one is taken as still current.
const QUIET: Duration = Duration::from_secs(2);

/// One datagram from the daemon, and when it arrived.
struct Datagram {
    at: Instant,
    text: String,
}

impl Datagram {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// Everything the reader has heard, in arrival order.
#[derive(Default)]
pub(crate) struct Heard {
    datagrams: Vec<Datagram>,
    /// Why the reader stopped early, if it did.
    error: Option<String>,
}

impl Heard {
    /// The largest backlog (objects, records) in any status line, each on its own.
    pub(crate) fn backlog_max(&self) -> Res<(u64, u64)> {
        let mut max = (0, 0);
        for status in self.datagrams.iter().filter_map(Datagram::status) {
            if let Some((objects, records)) = backlog(status)? {
                max = (max.0.max(objects), max.1.max(records));
            }
        }
        Ok(max)
    }

    /// The wait for [`Notify::catch_up_ms`], given what has arrived by `now`.
    fn caught_up(&self, end: Instant, now: Instant) -> Res<Option<f64>> {
        let before = self.datagrams.iter().filter(|d| d.at < end);
        let last_before = before.filter_map(Datagram::status).next_back();
        // STOPPING=1 comes with a status line of its own, which says nothing of the worker.
        let after = self
            .datagrams
            .iter()
            .filter(|d| d.at >= end && !d.has("STOPPING=1"));
        let mut after = after
            .filter_map(|d| d.status().map(|s| (d.at, s)))
            .peekable();
        let quiet = after.peek().is_none();
        for (at, status) in after {
            if backlog(status)?.is_none() {
                return Ok(Some((at - end).as_secs_f64() * 1000.0));
            }
        }
        // A daemon that sends its status only when it changes stays silent when all was
        // already done.
        let clean_before = match last_before {
            Some(s) => backlog(s)?.is_none(),
            None => false,
        };
        Ok((quiet && clean_before && now >= end + QUIET).then_some(0.0))
    }
}

/// `cleanup backlog N objects, M records` in a status line: `Some((N, M))`; `None` without.
fn backlog(status: &str) -> Res<Option<(u64, u64)>> {
    let Some((_, rest)) = status.split_once("cleanup backlog") else {
        return Ok(None);
    };
    let counts = rest
        .trim_start()
        .split_once(" objects, ")
        .and_then(|(n, rest)| {
            let (m, _) = rest.split_once(" records")?;
            Some((n.parse().ok()?, m.parse().ok()?))
        });
    let bad = || format!("cannot read the backlog in STATUS={status}");
    counts.map(Some).ok_or_else(bad)
}

type Shared = Arc<(Mutex<Heard>, Condvar)>;

/// The reading thread and what it has heard so far.
pub(crate) struct Notify {
    heard: Shared,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Notify {
    /// Binds the datagram socket at `path` and starts reading it.
    pub(crate) fn bind(path: &Path) -> Res<Notify> {
        let sock = UnixDatagram::bind(path).ctx("binding NOTIFY_SOCKET")?;
        sock.set_read_timeout(Some(POLL)).ctx("timeout")?;
        let heard = Shared::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (heard.clone(), stop.clone());
        let reader = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || read(&sock, &h, &s))
            .ctx("spawning the NOTIFY_SOCKET reader")?;
        let reader = Some(reader);
        Ok(Notify {
            heard,
            stop,
            reader,
        })
    }

    /// Waits until `found` says yes or `deadline` passes (`None`); fails if the reader did.
    fn wait<T>(
        &self,
        deadline: Instant,
        found: impl Fn(&Heard) -> Res<Option<T>>,
    ) -> Res<Option<T>> {
        let (lock, arrived) = &*self.heard;
        let mut heard = lock.lock().expect("notify lock");
        loop {
            if let Some(t) = found(&heard)? {
                return Ok(Some(t));
            }
            if let Some(e) = &heard.error {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(POLL);
            heard = arrived.wait_timeout(heard, wait).expect("notify lock").0;
        }
    }

    /// When READY=1 arrived, waiting at most [`POLL`] for it.
    pub(crate) fn ready(&self) -> Res<Option<Instant>> {
        let ready = |h: &Heard| Ok(h.datagrams.iter().find(|d| d.has("READY=1")).map(|d| d.at));
        self.wait(Instant::now() + POLL, ready)
    }

    /// When the first READY=1 heard at or after `since` arrived (a reload's), waiting at
    /// most `limit` for it.
    pub(crate) fn ready_since(&self, since: Instant, limit: Duration) -> Res<Option<Instant>> {
        let ready = |h: &Heard| {
            let mut after = h.datagrams.iter().filter(|d| d.at >= since);
            Ok(after.find(|d| d.has("READY=1")).map(|d| d.at))
        };
        self.wait(Instant::now() + limit, ready)
    }

    /// Milliseconds from `end` until a status line without a backlog arrives; -1 when none
    /// does within 10 s; 0 when the last one before `end` had none and nothing has followed
    /// for 2 s (see [`Heard::caught_up`]).
    pub(crate) fn catch_up_ms(&self, end: Instant) -> Res<f64> {
        let found = |h: &Heard| h.caught_up(end, Instant::now());
        Ok(self.wait(end + CATCH_UP_LIMIT, found)?.unwrap_or(-1.0))
    }

    /// Stops the reader (once the datagrams still queued are read); everything it heard.
    pub(crate) fn finish(&mut self) -> Res<Heard> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            reader
                .join()
                .map_err(|_| "the NOTIFY_SOCKET reader panicked")?;
        }
        let heard = std::mem::take(&mut *self.heard.0.lock().expect("notify lock"));
        match heard.error {
            Some(e) => Err(e),
            None => Ok(heard),
        }
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The reader: every datagram until `stop` and a [`POLL`] without any.
fn read(sock: &UnixDatagram, heard: &Shared, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let (lock, arrived) = &**heard;
    loop {
        let got = sock.recv(&mut buf);
        let text = match got {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                lock.lock().expect("notify lock").error = Some(format!("NOTIFY_SOCKET: {e}"));
                arrived.notify_all();
                return;
            }
        };
        let at = Instant::now();
        lock.lock()
            .expect("notify lock")
            .datagrams
            .push(Datagram { at, text });
        arrived.notify_all();
    }
}
