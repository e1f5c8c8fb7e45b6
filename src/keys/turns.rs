//! The threads HSM work runs on, and the turns that admit it.
//!
//! A fixed set of threads, one per turn (as many as the token has sessions, plus one),
//! started with the store. A caller waits for a turn asynchronously; holding one, its work
//! never waits for a thread, because there are never more jobs than turns. Not the
//! runtime's blocking pool: that pool starts a new thread whenever none is idle at the
//! instant of a call, so under 16 clients it grew to three times the turns (29 threads at
//! 9 turns), and each thread that ran the module kept its own malloc arena of the module's
//! allocations, about 0.2 MiB each at 10,000 keys.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::KeyError;
use crate::hsm::HsmError;
use crate::sync;

/// How long HSM work waits for its turn before the answer is 503 token_unavailable (the
/// session pool's own checkout limit).
const WAIT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send>;

/// A turn: while it is held, one job may run on an HSM thread.
pub(super) struct Turn {
    _permit: OwnedSemaphorePermit,
}

/// The HSM threads and their turns.
pub(super) struct Turns {
    permits: Arc<Semaphore>,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Turns {
    /// Starts `n` threads (at least one). They end when the `Turns` is dropped, each after
    /// the job it is running.
    pub(super) fn start(n: usize) -> std::io::Result<Turns> {
        let n = n.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..n {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name("hsmkeyd-hsm".into())
                .spawn(move || loop {
                    // Idle threads queue on the lock; the one holding it waits for a job.
                    let job = sync::lock(&rx).recv();
                    match job {
                        // A panic is the job's: its answer's sender is dropped with it.
                        Ok(job) => drop(catch_unwind(AssertUnwindSafe(job))),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Turns {
            permits: Arc::new(Semaphore::new(n)),
            jobs: Mutex::new(tx),
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

    /// Runs `f` on an HSM thread under `turn`, which it holds until `f` returns (even if
    /// nobody waits for the answer any more). The receiver gets `f`'s answer, or an error
    /// if `f` panicked.
    pub(super) fn run<T, F>(&self, turn: Turn, f: F) -> oneshot::Receiver<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _turn = turn;
            let _ = tx.send(f());
        });
        // The threads hold the receiver for as long as `self` lives: sending cannot fail.
        let _ = sync::lock(&self.jobs).send(job);
        rx
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
        let second = turns.try_acquire().expect("a second turn");
        assert!(turns.try_acquire().is_none(), "only two turns");
        drop(second);
        go.send(()).unwrap();
        assert!(held.await.unwrap());
        // Both turns are back once the job is over.
        let (a, b) = (turns.try_acquire(), turns.try_acquire());
        assert!(a.is_some() && b.is_some());
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
