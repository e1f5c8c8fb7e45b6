//! Where blocking work (token calls, audit writes) runs.
//!
//! A connection may be served on a thread of its own (by the listeners, up to
//! `server.connection_threads` of each), so its blocking work runs right there: the thread
//! has nothing else to do while the token answers, and the request costs no hand-off to a
//! pool thread and back (two thread wake-ups, which under four clients cost more than the
//! token call). Everywhere else (connections past that bound, the background worker,
//! checkpoints) the work goes to the runtime's blocking pool, so that no serving thread
//! ever waits on the token.
//! A leaf: no imports from the crate.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// What a connection's own thread knows about itself.
struct Own {
    /// The daemon's main runtime, for the work that must still go to its pool (the extra
    /// writes of a multi-object update).
    main: Handle,
    /// The tasks spawned on this thread's runtime ([`spawn`]), which the thread finishes
    /// before it ends: an update outlives its client.
    tasks: TaskTracker,
}

thread_local! {
    static OWN: RefCell<Option<Own>> = const { RefCell::new(None) };
}

/// Marks the calling thread as one connection's own: blocking work runs inline on it, and
/// [`pool`] answers `main`.
pub fn own_this_thread(main: Handle) {
    let tasks = TaskTracker::new();
    OWN.with(|o| *o.borrow_mut() = Some(Own { main, tasks }));
}

/// Whether the calling thread is one connection's own.
pub fn on_own_thread() -> bool {
    OWN.with(|o| o.borrow().is_some())
}

/// The runtime whose blocking pool takes extra work: the main one, also from a
/// connection's own thread; `None` outside any runtime.
pub fn pool() -> Option<Handle> {
    OWN.with(|o| o.borrow().as_ref().map(|own| own.main.clone()))
        .or_else(|| Handle::try_current().ok())
}

/// Spawns `task` on the current runtime, tracked by `tracker`; on a connection's own
/// thread also by the thread, which does not end (and so does not drop its runtime and the
/// task with it) before the task is over.
pub fn spawn<F>(tracker: &TaskTracker, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = tracker.track_future(task);
    match OWN.with(|o| o.borrow().as_ref().map(|own| own.tasks.clone())) {
        Some(mine) => tokio::spawn(mine.track_future(task)),
        None => tokio::spawn(task),
    }
}

/// Spawns `task` on the main runtime, also from a connection's own thread, tracked by
/// `tracker`: for work that makes several token calls at once (a batch), which a
/// connection's thread, running each call inline, would make one after another.
pub fn spawn_pooled<F>(tracker: &TaskTracker, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = tracker.track_future(task);
    match pool() {
        Some(main) => main.spawn(task),
        None => tokio::spawn(task),
    }
}

/// Completes when every task [`spawn`] started on this connection's own thread is over
/// (at once on any other thread).
pub async fn own_tasks_done() {
    let mine = OWN.with(|o| o.borrow().as_ref().map(|own| own.tasks.clone()));
    if let Some(mine) = mine {
        let _ = mine.close();
        mine.wait().await;
    }
}

/// Runs `f` inline on a connection's own thread, else on the blocking pool. A panic in `f`
/// is an `Err` with its message either way, never the caller's panic.
pub async fn run<T, F>(f: F) -> Result<T, String>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if on_own_thread() {
        return std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&p));
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn work_runs_inline_only_on_an_own_thread() {
        let caller = std::thread::current().id();
        let elsewhere = run(move || std::thread::current().id() != caller)
            .await
            .unwrap();
        assert!(elsewhere, "off an own thread the work goes to the pool");
        let main = Handle::current();
        let answers = std::thread::spawn(move || {
            own_this_thread(main.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let me = std::thread::current().id();
            let inline = rt.block_on(run(move || std::thread::current().id() == me));
            let panicked = rt.block_on(run(|| -> u8 { panic!("boom") }));
            let pooled = pool().is_some_and(|h| h.id() == main.id());
            // A task whose spawner went away still runs to its end before the thread's
            // tasks are done.
            let (tracker, finished) = (
                TaskTracker::new(),
                std::sync::Arc::new(AtomicBool::new(false)),
            );
            let flag = finished.clone();
            rt.block_on(async {
                drop(spawn(&tracker, async move {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    flag.store(true, Ordering::SeqCst);
                }));
                own_tasks_done().await;
            });
            (
                inline,
                panicked,
                pooled && finished.load(Ordering::SeqCst) && tracker.is_empty(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(answers.0, Ok(true));
        assert_eq!(answers.1, Err("panicked: boom".to_owned()));
        assert!(
            answers.2,
            "pool() is the main runtime on an own thread, and its tasks finish before it ends"
        );
    }
}
