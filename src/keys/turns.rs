//! The threads HSM work runs on, and the turns that admit it.
//!
//! A fixed set of threads, one per turn (as many as the token has sessions, plus one),
//! started with the store. A caller waits for a turn asynchronously; holding one, its work
//! never waits for a thread: a thread goes back on the idle stack before it gives up the
//! turn it ran under. Work goes to the thread that became idle last, so light load keeps
//! to one or two warm threads (handing each call to the next of nine in turn cost a
//! quarter of the 1-client throughput). Not the runtime's blocking pool: that pool starts a
//! new thread whenever none is idle at the instant of a call, so under 16 clients it grew
//! to three times the turns (29 threads at 9 turns), and each thread that ran the module
//! kept its own malloc arena of the module's allocations, about 0.2 MiB each at 10,000
//! keys.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::KeyError;
use crate::hsm::HsmError;
use crate::sync;

/// How long HSM work waits for its turn before the answer is 503 token_unavailable (the
/// session pool's own checkout limit).
const WAIT: Duration = Duration::from_secs(30);

/// A job gets a call that puts its thread back on the idle stack, made once its work is
/// done and before its answer goes out: the caller's next call then finds this thread.
type Job = Box<dyn FnOnce(&mut dyn FnMut()) + Send>;

/// What a thread is handed: a job and the turn it runs under, or `None` to stop.
type Message = Option<(Job, Turn)>;

/// The idle threads, the one idle longest at the bottom.
type Idle = Mutex<Vec<mpsc::Sender<Message>>>;

/// A turn: while it is held, one job may run on an HSM thread.
pub(super) struct Turn {
    _permit: OwnedSemaphorePermit,
}

/// The HSM threads and their turns.
pub(super) struct Turns {
    permits: Arc<Semaphore>,
    idle: Arc<Idle>,
}

impl Turns {
    /// Starts `n` threads (at least one). They end when the `Turns` is dropped, each after
    /// the job it is running.
    pub(super) fn start(n: usize) -> std::io::Result<Turns> {
        let n = n.max(1);
        let idle: Arc<Idle> = Arc::new(Mutex::new(Vec::with_capacity(n)));
        for _ in 0..n {
            let (tx, rx) = mpsc::channel::<Message>();
            let home = Arc::downgrade(&idle);
            let me = tx.clone();
            let _ = std::thread::Builder::new()
                .name("hsmkeyd-hsm".into())
                .spawn(move || serve(&rx, &me, &home))?;
            sync::lock(&idle).push(tx);
        }
        Ok(Turns {
            permits: Arc::new(Semaphore::new(n)),
            idle,
        })
    }

    /// Waits for a turn (at most [`WAIT`], then `Unavailable`).
    pub(super) async fn acquire(&self) -> Result<Turn, KeyError> {
        let permit = tokio::time::timeout(WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                KeyError::Unavailable(HsmError::unavailable(
                    "the token",
                    format!(
                        "no HSM call could start within {} s: every session is busy or the \
                         token does not answer",
                        WAIT.as_secs()
                    ),
                ))
            })?
            .map_err(|_| KeyError::Internal("the HSM turns were closed".into()))?;
        Ok(Turn { _permit: permit })
    }

    /// A turn if one is free now.
    pub(super) fn try_acquire(&self) -> Option<Turn> {
        self.permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Turn { _permit: permit })
    }

    /// Runs `f` on the HSM thread idle the shortest time, under `turn`, which is held
    /// until `f` returns (even if nobody waits for the answer any more). The receiver gets
    /// `f`'s answer, or an error if `f` panicked.
    pub(super) fn run<T, F>(&self, turn: Turn, f: F) -> oneshot::Receiver<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |idle_again| {
            let answer = f();
            idle_again();
            let _ = tx.send(answer);
        });
        // A thread is idle for every turn not held, and this turn is held: one is there.
        // (Were none, the job would be dropped and its caller answered an error.)
        let thread = sync::lock(&self.idle).pop();
        if let Some(thread) = thread {
            let _ = thread.send(Some((job, turn)));
        }
        rx
    }
}

impl Drop for Turns {
    fn drop(&mut self) {
        for thread in sync::lock(&self.idle).drain(..) {
            let _ = thread.send(None);
        }
    }
}

/// One HSM thread: runs what it is handed, goes back on the idle stack before the answer
/// goes out, and only then gives up the turn.
fn serve(jobs: &mpsc::Receiver<Message>, me: &mpsc::Sender<Message>, home: &Weak<Idle>) {
    while let Ok(Some((job, turn))) = jobs.recv() {
        let mut back = false;
        let mut idle_again = || {
            if !back {
                back = true;
                if let Some(idle) = home.upgrade() {
                    sync::lock(&idle).push(me.clone());
                }
            }
        };
        // A panic is the job's: its answer's sender is dropped with it.
        drop(catch_unwind(AssertUnwindSafe(|| job(&mut idle_again))));
        idle_again();
        drop(turn);
        if home.strong_count() == 0 {
            return;
        }
    }
}

/// What a caller gets when the job did not answer (it panicked).
pub(super) fn panicked() -> KeyError {
    KeyError::Internal("HSM task failed: the work on the HSM thread panicked".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_threads_and_hold_their_turn() {
        let turns = Turns::start(2).unwrap();
        let t = turns.acquire().await.unwrap();
        let name = turns
            .run(t, || std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("hsmkeyd-hsm"));

        // A job that waits holds its turn: one turn is left, then none.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let t = turns.acquire().await.unwrap();
        let held = turns.run(t, move || wait.recv().is_ok());
        let second = turns.acquire().await.unwrap();
        assert!(turns.try_acquire().is_none(), "only two turns");
        drop(second);
        go.send(()).unwrap();
        assert!(held.await.unwrap());
        // Both turns come back once the job is over (its thread gives its turn up just
        // after the answer).
        let a = turns.acquire().await.unwrap();
        let b = turns.acquire().await.unwrap();
        assert!(turns.try_acquire().is_none());
        drop((a, b));
    }

    #[tokio::test]
    async fn work_goes_to_the_thread_idle_the_shortest_time() {
        let turns = Turns::start(4).unwrap();
        let mut threads = Vec::new();
        for _ in 0..5 {
            let t = turns.acquire().await.unwrap();
            threads.push(turns.run(t, || std::thread::current().id()).await.unwrap());
        }
        threads.dedup();
        assert_eq!(
            threads.len(),
            1,
            "one after another, the calls keep to one thread"
        );
    }

    #[tokio::test]
    async fn a_panicking_job_answers_an_error_and_the_thread_serves_on() {
        let turns = Turns::start(1).unwrap();
        let t = turns.acquire().await.unwrap();
        let failed = turns.run(t, || -> u8 { panic!("a job that panics") });
        assert!(failed.await.is_err());
        let t = turns.acquire().await.unwrap();
        assert_eq!(turns.run(t, || 7).await.unwrap(), 7);
    }
}
