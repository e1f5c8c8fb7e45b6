//! Listeners: accept loops, per-connection HTTP, connection limits and draining.
//!
//! Owns: sockets. Puts the caller's identity (a [`crate::auth::Peer`] on the Unix socket,
//! a [`crate::auth::TlsPeer`] on TLS) into every request's extensions and hands requests
//! to the `api` router.
//! May call: `api` (the router), `auth` (the peer types), `config`, `secret`.

pub mod activation;
pub mod limits;
pub mod tls;
pub mod unix;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Longest back-off after failed accepts (EMFILE and friends), doubling from
/// [`ACCEPT_BACKOFF_START`]: long enough not to spin, short enough to recover quickly.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);

/// Exponential back-off between failed accepts; reset by a successful one.
struct Backoff(Option<Duration>);

impl Backoff {
    fn new() -> Backoff {
        Backoff(None)
    }

    /// A successful accept.
    fn reset(&mut self) {
        self.0 = None;
    }

    /// The pause after one more failed accept in a row.
    fn next(&mut self) -> Duration {
        let d = self
            .0
            .map_or(ACCEPT_BACKOFF_START, |d| (d * 2).min(ACCEPT_BACKOFF_MAX));
        self.0 = Some(d);
        d
    }

    /// Sleeps after a failed accept, longer each time in a row.
    async fn wait(&mut self) {
        tokio::time::sleep(self.next()).await;
    }
}

/// A listening socket [`accept_loop`] can drive.
pub(crate) trait Listen {
    /// An accepted connection.
    type Conn;
    /// The address a connection comes from.
    type Addr;
    /// For the log: `the unix socket`, `the TLS listener`.
    const NAME: &'static str;
    /// The next connection.
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Conn, Self::Addr)>> + Send;
}

impl Listen for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    const NAME: &'static str = "the unix socket";
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Conn, Self::Addr)>> + Send {
        self.accept()
    }
}

impl Listen for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    const NAME: &'static str = "the TLS listener";
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Conn, Self::Addr)>> + Send {
        self.accept()
    }
}

/// The one accept loop of both listeners: accepts until shutdown, backs off exponentially
/// while accepting fails (EMFILE and friends), and hands each connection to `handle` with
/// its slot of the listener's connection limit, `None` when the listener is full (the
/// listener decides how to refuse). Open connections are not waited for here: they hold
/// their permits, which the drain waits for.
pub(crate) async fn accept_loop<L: Listen>(
    listener: L,
    conns: &Connections,
    shutdown: &Shutdown,
    mut handle: impl FnMut(L::Conn, L::Addr, Option<tokio::sync::OwnedSemaphorePermit>),
) {
    let mut stop = shutdown.clone();
    let mut backoff = Backoff::new();
    loop {
        let (conn, addr) = tokio::select! {
            r = listener.accept_one() => match r {
                Ok(c) => {
                    backoff.reset();
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on {}", L::NAME);
                    backoff.wait().await;
                    continue;
                }
            },
            _ = stop.wait() => break,
        };
        handle(conn, addr, conns.try_admit());
    }
}

/// Serves HTTP/1.1 on one connection, with `identity` and `slot` in every request's
/// extensions, until the client closes or shutdown asks the connection to finish its
/// current request. Headers must arrive within `header_timeout`.
pub(crate) async fn serve_http<I, T>(
    io: I,
    app: Router,
    identity: T,
    slot: crate::auth::ConnectionSlot,
    header_timeout: Duration,
    mut stop: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
        let _ = req.extensions_mut().insert(identity.clone());
        let _ = req.extensions_mut().insert(slot.clone());
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A client may shut down its sending half once its request is out and wait for the
    // answer (`shutdown(SHUT_WR)`, `curl`-like tools, `nc -N`): it gets it.
    let _ = builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .half_close(true);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A connection a listener can hand to another runtime: taken off the accepting runtime's
/// reactor as a std socket, registered again with the thread's.
pub(crate) trait Movable: Sized + Send {
    /// The std socket.
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
}

impl Movable for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
}

impl Movable for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
}

/// Serves one connection on a thread of its own, with a runtime of its own whose reactor
/// waits on this one socket: a request wakes this thread and no other, and its token call
/// runs right here ([`crate::blocking`]). The caller bounds the number of such threads
/// (`server.connection_threads`, per listener) with `lane`, held until the thread ends:
/// after the connection, once the tasks it spawned (updates that outlive their client) are
/// over. If no thread can be started, the connection is served on the main runtime instead.
pub(crate) fn on_own_thread<C, S, F>(stream: C, lane: tokio::sync::OwnedSemaphorePermit, serve: S)
where
    C: Movable + 'static,
    S: FnOnce(C) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let main = tokio::runtime::Handle::current();
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a connection; closing it");
            return;
        }
    };
    // Handed to the thread through a slot, so that it comes back if the thread never starts.
    let job = Arc::new(std::sync::Mutex::new(Some((stream, serve))));
    let (theirs, pool) = (job.clone(), main.clone());
    let started = std::thread::Builder::new()
        .name("hsmkeyd-conn".into())
        .spawn(move || {
            let _lane = lane;
            let Some((stream, serve)) = crate::sync::lock(&theirs).take() else {
                return;
            };
            let built = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let rt = match built {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a connection's runtime; closing it");
                    return;
                }
            };
            crate::blocking::own_this_thread(pool);
            rt.block_on(async move {
                // A task, not the future block_on polls: a wake-up of block_on's own future
                // writes the runtime's eventfd even from this thread, and the connection is
                // woken at least once a request (by the update task it spawns); a task's
                // wake-up from its own thread only queues it.
                let _ = tokio::spawn(serve_std::<C, S, F>(stream, serve)).await;
                // An update whose client went away still runs to its end here.
                crate::blocking::own_tasks_done().await;
            });
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start a connection thread; serving it on the runtime");
        if let Some((stream, serve)) = crate::sync::lock(&job).take() {
            drop(main.spawn(serve_std::<C, S, F>(stream, serve)));
        }
    }
}

/// Registers a taken-over connection with the current runtime and serves it.
async fn serve_std<C, S, F>(stream: C::Std, serve: S)
where
    C: Movable,
    S: FnOnce(C) -> F,
    F: std::future::Future<Output = ()>,
{
    match C::from_std(stream) {
        Ok(s) => serve(s).await,
        Err(e) => tracing::warn!(error = %e, "cannot register a connection; closing it"),
    }
}

/// Signals listeners and connections to stop. Cloned into every task.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers a [`Shutdown`].
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A new shutdown pair.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Asks every listener and connection to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Completes once shutdown was triggered.
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Open connections of one listener, bounded; draining waits for all of them to end.
#[derive(Clone)]
pub struct Connections {
    slots: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Connections {
        let max = u32::try_from(max)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        Connections {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// A free slot, held for the life of the connection; `None` when all are in use
    /// (the connection is refused rather than left waiting).
    pub fn try_admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The number of slots.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Completes when every connection has ended.
    pub async fn drained(&self) {
        let _ = self.slots.acquire_many(self.max).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(ms, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), ACCEPT_BACKOFF_START);
    }

    /// Fails `fail` times, then hands out connections (numbers) forever.
    struct Flaky {
        fail: usize,
        calls: AtomicUsize,
    }

    impl Listen for Flaky {
        type Conn = usize;
        type Addr = ();
        const NAME: &'static str = "a test listener";
        fn accept_one(
            &self,
        ) -> impl std::future::Future<Output = std::io::Result<(usize, ())>> + Send {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let fail = self.fail;
            async move {
                if n < fail {
                    Err(std::io::Error::other("EMFILE"))
                } else {
                    tokio::task::yield_now().await;
                    Ok((n, ()))
                }
            }
        }
    }

    #[tokio::test]
    async fn the_accept_loop_backs_off_admits_within_the_limit_and_stops() {
        let (trigger, shutdown) = shutdown_pair();
        let conns = Connections::new(2);
        let listener = Flaky {
            fail: 4,
            calls: AtomicUsize::new(0),
        };
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut held = Vec::new();
        accept_loop(listener, &conns, &shutdown, |n, (), permit| {
            seen.push((n, permit.is_some()));
            held.extend(permit);
            if seen.len() == 3 {
                trigger.trigger();
            }
        })
        .await;
        // Four failures in a row: 5 + 10 + 20 + 40 ms of back-off before the first success.
        assert!(
            started.elapsed() >= Duration::from_millis(75),
            "{:?}",
            started.elapsed()
        );
        // Two slots: the third connection finds the listener full.
        assert_eq!(seen, [(4, true), (5, true), (6, false)]);
    }
}
