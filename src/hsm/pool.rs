//! The session pool, and the one place that recovers lost sessions and logins.
//!
//! Sessions are opened on demand up to a bound and reused. A call that fails with
//! CKR_SESSION_HANDLE_INVALID or CKR_SESSION_CLOSED is retried once on a new session; one
//! that fails with CKR_USER_NOT_LOGGED_IN (or CKR_OBJECT_HANDLE_INVALID while the session
//! shows no login: private objects vanish when the login does) is retried once after
//! logging in again.
//! CKR_USER_ALREADY_LOGGED_IN counts as a successful login.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use super::HsmError;
use crate::secret::SecretString;
use crate::sync;

/// How long a caller waits for a free session before the token counts as unavailable.
/// Calls take milliseconds; a wait this long means the token is wedged.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Pool {
    ctx: Pkcs11,
    slot: Slot,
    /// The user PIN, kept for logging in again after the token forgets the login; replaced
    /// by [`Pool::change_pin`] on reload.
    pin: Arc<RwLock<SecretString>>,
    /// Shared with the module and every pool it had (see `Module::logins`).
    logins: Arc<std::sync::atomic::AtomicU64>,
    max: usize,
    state: Mutex<State>,
    freed: Condvar,
    /// A session that is never handed out. PKCS#11 logs the user out when an
    /// application's last session closes (and SoftHSM2 then renumbers private objects), so
    /// a lost pooled session must never be the last one.
    anchor: Mutex<Option<Session>>,
}

struct State {
    idle: Vec<Session>,
    open: usize,
    /// Callers waiting in [`Pool::checkout`]. A place that frees up wakes one only if there
    /// is one: a condvar's notify is a system call even when nobody waits, and a session
    /// comes back once per token call.
    waiting: usize,
}

impl Pool {
    /// Sessions handed out now, sessions open, and the limit.
    pub(crate) fn usage(&self) -> (usize, usize, usize) {
        let st = self.lock();
        (st.open.saturating_sub(st.idle.len()), st.open, self.max)
    }

    pub(crate) fn new(
        ctx: Pkcs11,
        slot: Slot,
        pin: Arc<RwLock<SecretString>>,
        logins: Arc<std::sync::atomic::AtomicU64>,
        max: usize,
    ) -> Pool {
        Pool {
            ctx,
            slot,
            pin,
            logins,
            max,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
            anchor: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the Vec or counter half-updated.
        sync::lock(&self.state)
    }

    /// Opens the anchor session and logs in; startup uses its error verbatim.
    pub(crate) fn login_first(&self) -> Result<(), HsmError> {
        let s = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| HsmError::from_ck(&e))?;
        self.login(&s)?;
        *sync::lock(&self.anchor) = Some(s);
        Ok(())
    }

    fn login(&self, s: &Session) -> Result<(), HsmError> {
        let pin = sync::read(&self.pin);
        if login_with(s, &pin)? {
            self.bump_logins();
        }
        Ok(())
    }

    /// A new login (after a logout or a lost login) can renumber private objects: tokens
    /// such as SoftHSM2 drop their handles on logout. Callers holding handles compare
    /// [`Pool::logins`] and look objects up again when it moved.
    fn bump_logins(&self) {
        let _ = self
            .logins
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether `pin` is the PIN in use.
    pub(crate) fn pin_is(&self, pin: &SecretString) -> bool {
        use secrecy::ExposeSecret;
        let current = sync::read(&self.pin);
        current.expose_secret() == pin.expose_secret()
    }

    /// Logs out and in again with `pin`; keeps it for later logins if that works. If the
    /// token refuses it, logs in again with the old PIN and returns the refusal.
    pub(crate) fn change_pin(&self, pin: SecretString) -> Result<(), HsmError> {
        let s = self.checkout()?;
        let mut current = sync::write(&self.pin);
        match s.logout() {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
            Err(e) => {
                self.checkin(s);
                return Err(HsmError::from_ck(&e));
            }
        }
        self.bump_logins();
        let result = match login_with(&s, &pin) {
            Ok(_) => {
                *current = pin;
                Ok(())
            }
            Err(e) => {
                if let Err(again) = login_with(&s, &current) {
                    tracing::error!(error = %again, "logging in again with the old PIN failed");
                }
                Err(e)
            }
        };
        drop(current);
        self.checkin(s);
        result
    }

    fn checkout(&self) -> Result<Session, HsmError> {
        let mut st = self.lock();
        loop {
            if let Some(s) = st.idle.pop() {
                return Ok(s);
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return self.open_new();
            }
            st.waiting += 1;
            let (guard, timeout) = self
                .freed
                .wait_timeout(st, CHECKOUT_TIMEOUT)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            st.waiting -= 1;
            if timeout.timed_out() && st.idle.is_empty() && st.open >= self.max {
                return Err(HsmError::unavailable(
                    "session pool",
                    format!(
                        "no PKCS#11 session became free within {}s",
                        CHECKOUT_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
    }

    /// Opens a session for a place already counted in `open` (a new one, or one whose
    /// session was just dropped); gives the place back if that fails.
    fn open_new(&self) -> Result<Session, HsmError> {
        match self.ctx.open_rw_session(self.slot) {
            Ok(s) => Ok(s),
            Err(e) => {
                self.free_place(|st| st.open -= 1);
                Err(HsmError::from_ck(&e))
            }
        }
    }

    fn checkin(&self, s: Session) {
        self.free_place(|st| st.idle.push(s));
    }

    /// Drops a session whose handle is no longer good.
    fn discard(&self, s: Session) {
        drop(s);
        self.free_place(|st| st.open -= 1);
    }

    /// Frees a place in the pool with `f`, and wakes one caller waiting for one, if any.
    fn free_place(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.lock();
        f(&mut st);
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.freed.notify_one();
        }
    }

    pub(crate) fn close_all(&self) {
        let idle = std::mem::take(&mut self.lock().idle);
        for s in idle {
            let _ = s.close();
            self.lock().open -= 1;
        }
        if let Some(a) = sync::lock(&self.anchor).take() {
            let _ = a.close();
        }
    }

    /// Runs `f` on a pooled session, with the one retry described in the module doc.
    pub(crate) fn run<T>(
        &self,
        f: impl Fn(&Session) -> cryptoki::error::Result<T>,
    ) -> Result<T, HsmError> {
        let s = self.checkout()?;
        let first = f(&s);
        let err = match first {
            Ok(v) => {
                self.checkin(s);
                return Ok(v);
            }
            Err(e) => e,
        };
        let s = match err {
            CkError::Pkcs11(RvError::SessionHandleInvalid | RvError::SessionClosed, _) => {
                tracing::warn!(error = %HsmError::from_ck(&err), "PKCS#11 session lost; reopening");
                drop(s);
                let fresh = self.open_new()?;
                if let Err(e) = self.login(&fresh) {
                    self.discard(fresh);
                    return Err(e);
                }
                fresh
            }
            CkError::Pkcs11(RvError::UserNotLoggedIn, _) => {
                tracing::warn!("PKCS#11 login lost; logging in again");
                if let Err(e) = self.login(&s) {
                    self.checkin(s);
                    return Err(e);
                }
                s
            }
            // Private objects are invisible without a login: a handle that turns invalid
            // may only mean the login was lost (the token was logged out under us).
            CkError::Pkcs11(RvError::ObjectHandleInvalid, _) if !logged_in(&s) => {
                tracing::warn!("PKCS#11 login lost (objects invisible); logging in again");
                if let Err(e) = self.login(&s) {
                    self.checkin(s);
                    return Err(e);
                }
                s
            }
            other => {
                self.checkin(s);
                return Err(HsmError::from_ck(&other));
            }
        };
        let second = f(&s);
        match second {
            Ok(v) => {
                self.checkin(s);
                Ok(v)
            }
            Err(e) => {
                let he = HsmError::from_ck(&e);
                if matches!(
                    e,
                    CkError::Pkcs11(RvError::SessionHandleInvalid | RvError::SessionClosed, _)
                ) {
                    self.discard(s);
                } else {
                    self.checkin(s);
                }
                Err(he)
            }
        }
    }
}

/// Whether the session's state shows a user login.
fn logged_in(s: &Session) -> bool {
    use cryptoki::session::SessionState;
    match s.get_session_info() {
        Ok(info) => matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser | SessionState::RwSecurityOfficer
        ),
        // Cannot tell: let the original error stand.
        Err(_) => true,
    }
}

/// Logs in; `true` if this call made a new login (not one already in place).
fn login_with(s: &Session, pin: &SecretString) -> Result<bool, HsmError> {
    match s.login(UserType::User, Some(pin)) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(false),
        Err(e) => Err(HsmError::from_ck(&e)),
    }
}
