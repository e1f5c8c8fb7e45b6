//! Connection budgets, so that no one caller can take every slot of a listener:
//! - each listener has its own pool of `server.max_connections` (TLS clients can never take
//!   the Unix socket's); a connection over it is refused at once;
//! - one caller (a uid on the Unix socket, a bearer-token principal on TLS) holds at most
//!   `server.max_connections_per_caller` of them;
//! - TLS connections that have not yet presented a valid bearer token share
//!   `server.max_unauthenticated` slots and must authenticate within
//!   `server.unauthenticated_timeout_s` of their handshake.
//!
//! Over a budget, the connection's next request is answered 503 `too_many_connections`
//! (by `api`, through the [`Admission`] in the request) and the connection closed.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Admission;
use crate::config::ServerConfig;

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
}

impl Limits {
    /// The limits `[server]` sets.
    pub fn of(cfg: &ServerConfig) -> Limits {
        Limits {
            header_timeout: cfg.request_timeout,
            per_caller: cfg.max_connections_per_caller,
            unauthenticated: cfg.max_unauthenticated,
            unauthenticated_timeout: cfg.unauthenticated_timeout,
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
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
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

/// A TLS connection's admission: anonymous until its first valid bearer token, then
/// counted against that token's principal.
pub struct TlsAdmission {
    slots: Arc<CallerSlots<String>>,
    state: Mutex<TlsState>,
    authenticated: AtomicBool,
}

struct TlsState {
    anonymous: Option<OwnedSemaphorePermit>,
    caller: Option<CallerPermit<String>>,
}

impl TlsAdmission {
    /// A connection holding one of the unauthenticated slots.
    pub fn new(anonymous: OwnedSemaphorePermit, slots: Arc<CallerSlots<String>>) -> TlsAdmission {
        TlsAdmission {
            slots,
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
}

impl Admission for TlsAdmission {
    fn admit(&self, principal: &str) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.caller.is_some() {
            return Ok(());
        }
        let permit = self.slots.try_take(principal.to_string(), "principal")?;
        st.caller = Some(permit);
        // The connection leaves the shared unauthenticated budget.
        st.anonymous = None;
        self.authenticated.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The shared budget of unauthenticated TLS connections.
pub fn unauthenticated_pool(n: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(n))
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
        let pool = unauthenticated_pool(1);
        let slots = CallerSlots::<String>::new(1);
        let first = TlsAdmission::new(pool.clone().try_acquire_owned().unwrap(), slots.clone());
        assert!(
            pool.clone().try_acquire_owned().is_err(),
            "the one slot is taken"
        );
        first.admit("app").unwrap();
        assert!(first.authenticated());
        let second = TlsAdmission::new(pool.clone().try_acquire_owned().unwrap(), slots.clone());
        let err = second.admit("app").unwrap_err();
        assert!(err.contains("principal app"), "{err}");
        assert!(!second.authenticated());
        second.admit("other").unwrap();
    }
}
