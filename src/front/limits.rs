//! Connection budgets, so that no one caller can take every slot of a listener:
//! - each listener has its own pool of `server.max_connections` (TLS clients can never take
//!   the Unix socket's); a connection over it is refused at once;
//! - one caller (a uid on the Unix socket, a bearer-token principal on TLS) holds at most
//!   `server.max_connections_per_caller` of them;
//! - TLS connections that have not yet presented a valid bearer token share
//!   `server.max_unauthenticated` slots and must authenticate within
//!   `server.unauthenticated_timeout_s` of their handshake. When the slots are full, the
//!   oldest unauthenticated connection is closed to make room: a real client authenticates
//!   with its first request, a millisecond after its handshake, so a flood of idle or slow
//!   connections evicts itself and cannot lock real clients out.
//!
//! Over a budget, the connection's next request is answered 503 `too_many_connections`
//! (by `api`, through the [`Admission`] in the request) and the connection closed.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::auth::Admission;
use crate::config::ServerConfig;
use crate::sync;

/// The limits of one listener, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for a request's headers (the body has its own, in `api`).
    pub header_timeout: Duration,
    /// Connections one caller may hold.
    pub per_caller: usize,
    /// TLS connections not yet authenticated.
    pub unauthenticated: usize,
    /// Time a TLS connection may stay unauthenticated.
    pub unauthenticated_timeout: Duration,
    /// Connections of the listener served on a thread of their own.
    pub connection_threads: usize,
}

impl Limits {
    /// The limits `[server]` sets.
    pub fn of(cfg: &ServerConfig) -> Limits {
        Limits {
            header_timeout: cfg.request_timeout,
            per_caller: cfg.max_connections_per_caller,
            unauthenticated: cfg.max_unauthenticated,
            unauthenticated_timeout: cfg.unauthenticated_timeout,
            connection_threads: cfg.connection_threads,
        }
    }
}

/// Open connections per caller.
pub struct CallerSlots<K> {
    max: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// One connection counted against its caller; released on drop.
pub struct CallerPermit<K: Eq + Hash> {
    slots: Arc<CallerSlots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone + Display> CallerSlots<K> {
    /// Room for `max` connections per caller.
    pub fn new(max: usize) -> Arc<CallerSlots<K>> {
        Arc::new(CallerSlots {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more connection of `key`, unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, key: K, who: &str) -> Result<CallerPermit<K>, String> {
        let mut held = sync::lock(&self.held);
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return Err(format!(
                "{who} {key} already holds {} connections, the most one caller may \
                 (server.max_connections_per_caller); reuse one (keep-alive) or close one",
                self.max
            ));
        }
        *n += 1;
        Ok(CallerPermit {
            slots: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash> Drop for CallerPermit<K> {
    fn drop(&mut self) {
        let mut held = sync::lock(&self.slots.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                let _ = held.remove(&self.key);
            }
        }
    }
}

/// A Unix connection's admission, decided at accept from its uid.
pub struct Decided(pub Result<(), String>);

impl Admission for Decided {
    fn admit(&self, _principal: &str) -> Result<(), String> {
        self.0.clone()
    }
}

/// The unauthenticated TLS connections, oldest first.
pub struct Unauthenticated {
    max: usize,
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next: AtomicU64,
}

/// One connection's place among the unauthenticated ones; leaves on drop.
pub struct Ticket {
    id: u64,
    evict: Arc<Notify>,
    pool: Arc<Unauthenticated>,
}

impl Unauthenticated {
    /// Room for `max` unauthenticated connections.
    pub fn new(max: usize) -> Arc<Unauthenticated> {
        Arc::new(Unauthenticated {
            max: max.max(1),
            queue: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
        })
    }

    /// A place for a new connection; when all are taken, the oldest holder is told to go.
    pub fn admit(self: &Arc<Self>) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        let mut q = sync::lock(&self.queue);
        if q.len() >= self.max {
            if let Some((_, oldest)) = q.pop_front() {
                oldest.notify_one();
            }
        }
        q.push_back((id, evict.clone()));
        Ticket {
            id,
            evict,
            pool: self.clone(),
        }
    }

    /// Unauthenticated connections now.
    pub fn len(&self) -> usize {
        sync::lock(&self.queue).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut q = sync::lock(&self.pool.queue);
        q.retain(|(id, _)| *id != self.id);
    }
}

/// A TLS connection's admission: anonymous until its first valid bearer token, then
/// counted against that token's principal.
pub struct TlsAdmission {
    slots: Arc<CallerSlots<String>>,
    state: Mutex<TlsState>,
    authenticated: AtomicBool,
    evict: Arc<Notify>,
}

struct TlsState {
    anonymous: Option<Ticket>,
    caller: Option<CallerPermit<String>>,
}

impl TlsAdmission {
    /// A connection holding a place among the unauthenticated ones.
    pub fn new(anonymous: Ticket, slots: Arc<CallerSlots<String>>) -> TlsAdmission {
        TlsAdmission {
            slots,
            evict: anonymous.evict.clone(),
            state: Mutex::new(TlsState {
                anonymous: Some(anonymous),
                caller: None,
            }),
            authenticated: AtomicBool::new(false),
        }
    }

    /// Whether a request on this connection presented a valid token.
    pub fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    /// Completes when the connection, still unauthenticated, must make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Admission for TlsAdmission {
    fn admit(&self, principal: &str) -> Result<(), String> {
        let mut st = sync::lock(&self.state);
        if st.caller.is_some() {
            return Ok(());
        }
        let permit = self.slots.try_take(principal.to_string(), "principal")?;
        st.caller = Some(permit);
        // The connection leaves the unauthenticated ones.
        st.anonymous = None;
        self.authenticated.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_share_and_no_more_and_gets_it_back() {
        let slots = CallerSlots::<u32>::new(2);
        let a = slots.try_take(7, "uid").unwrap();
        let _b = slots.try_take(7, "uid").unwrap();
        let over = slots.try_take(7, "uid").err().unwrap();
        assert!(over.contains("uid 7 already holds 2"), "{over}");
        // Another caller is not affected.
        let _c = slots.try_take(8, "uid").unwrap();
        drop(a);
        assert!(slots.try_take(7, "uid").is_ok());
    }

    #[test]
    fn a_tls_connection_moves_from_the_shared_budget_to_its_principal() {
        let pool = Unauthenticated::new(1);
        let slots = CallerSlots::<String>::new(1);
        let first = TlsAdmission::new(pool.admit(), slots.clone());
        assert_eq!(pool.len(), 1);
        first.admit("app").unwrap();
        assert!(first.authenticated());
        assert!(
            pool.is_empty(),
            "an authenticated connection leaves the shared budget"
        );
        let second = TlsAdmission::new(pool.admit(), slots.clone());
        let err = second.admit("app").unwrap_err();
        assert!(err.contains("principal app"), "{err}");
        assert!(!second.authenticated());
        second.admit("other").unwrap();
    }

    #[tokio::test]
    async fn a_full_unauthenticated_budget_evicts_its_oldest_holder() {
        let pool = Unauthenticated::new(2);
        let slots = CallerSlots::<String>::new(8);
        let oldest = TlsAdmission::new(pool.admit(), slots.clone());
        let _middle = TlsAdmission::new(pool.admit(), slots.clone());
        let _newest = TlsAdmission::new(pool.admit(), slots.clone());
        assert_eq!(pool.len(), 2);
        // The oldest was told to go; it returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), oldest.evicted())
            .await
            .expect("the oldest connection was not evicted");
    }
}
