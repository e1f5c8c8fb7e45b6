//! The HSM layer: the only module that speaks PKCS#11 (through `cryptoki`).
//!
//! Owns: loading the module, C_Initialize with OS locking, choosing the token, the one login
//! of the process, the session pool, recovery of lost sessions and logins, re-initializing
//! the module for a token that came back ([`Hsm::reinitialize`]), and turning
//! object attributes into the plain types of [`objects`] and [`ec`]. No `cryptoki` type
//! leaves this module: callers see [`Hsm`], [`ObjectRef`], [`ObjectInfo`] (with
//! [`Algorithm`] and [`Curve`]) and [`HsmError`].
//! Every call here blocks; callers run them on blocking threads, never on the reactor.
//! May call: `config`, `secret`.

pub mod attributes;
pub mod audit_mark;
mod device;
pub mod ec;
mod error;
mod generate;
pub mod objects;
mod pool;
pub mod sign;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::slot::Slot;

pub use attributes::{usage_allowed, KeyAttr, UsageFlag};
pub use audit_mark::AuditMark;
pub use device::DEVICE_KEY_LABEL;
pub use ec::Curve;
pub use error::{Ckr, Code, HsmError, HsmErrorKind};
pub use generate::{KeySpec, NewKey, Usage};
pub use objects::{Algorithm, ObjectInfo, ObjectKind, ObjectRef, PublicParts, Scanned};
pub use sign::{is_reserved_label, SigningKey, AUDIT_SIGNING_KEY_LABEL, SIGNING_KEY_LABEL};

use crate::config::{PinSource, Pkcs11Config, TokenSelector};
use crate::secret::SecretString;
use crate::sync;
use pool::Pool;

/// A startup failure, worded for the operator: what failed, the module, the token, the
/// CKR_ value and what to check.
#[derive(Debug)]
pub struct StartupError(pub String);

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartupError {}

/// What the daemon knows of its token, for logs and status lines.
#[derive(Debug, Clone)]
pub struct TokenDescription {
    /// CKA label of the token, trailing spaces removed.
    pub label: String,
    /// Serial number, trailing spaces removed.
    pub serial: String,
    /// Slot id at the time of login (informational only; it changes between boots).
    pub slot_id: u64,
}

impl fmt::Display for TokenDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token \"{}\" (serial {}, slot {})",
            self.label, self.serial, self.slot_id
        )
    }
}

/// The logged-in token. Cheap to clone; every method blocks.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Module>,
}

/// The loaded module and what re-initializing it needs.
struct Module {
    ctx: Pkcs11,
    /// The module's path, for messages.
    path: String,
    selector: TokenSelector,
    max_sessions: usize,
    /// The user PIN (zeroized on drop), shared by every pool this module gets.
    pin: Arc<RwLock<SecretString>>,
    /// Logins made so far, over every pool: it only grows, so handles read before a
    /// re-initialization are seen as stale by everyone holding some.
    logins: Arc<AtomicU64>,
    /// The token as last found (kept while the module is finalized, for messages).
    token: RwLock<TokenDescription>,
    /// The initialized module's session pool; `None` between a C_Finalize and the next
    /// successful C_Initialize and login. Every call holds it shared for its duration, a
    /// re-initialization exclusively, so C_Finalize never runs while a call is in flight.
    live: RwLock<Option<Live>>,
    /// Counts re-initializations: object handles carry the one they belong to.
    epoch: AtomicU64,
}

/// An initialized module with its token found and logged in.
pub(crate) struct Live {
    pub(crate) pool: Pool,
    pub(crate) epoch: u64,
}

impl Live {
    /// The handle of `r`, if it belongs to this initialization of the module: after a
    /// re-initialization the number may name another object.
    pub(crate) fn handle(&self, r: ObjectRef) -> Result<ObjectHandle, HsmError> {
        if r.1 == self.epoch {
            Ok(r.0)
        } else {
            Err(stale())
        }
    }

    /// `h` as an object of this initialization.
    pub(crate) fn object(&self, h: ObjectHandle) -> ObjectRef {
        ObjectRef(h, self.epoch)
    }
}

/// The error for a handle of an earlier initialization of the module.
fn stale() -> HsmError {
    HsmError::unavailable(
        "the token",
        "the PKCS#11 module was re-initialized while this request ran; retry",
    )
}

/// The shared hold on [`Live`] one call keeps.
pub(crate) struct LiveGuard<'a>(RwLockReadGuard<'a, Option<Live>>);

impl std::ops::Deref for LiveGuard<'_> {
    type Target = Live;
    fn deref(&self) -> &Live {
        // Only built over `Some` (see `Hsm::live`).
        self.0.as_ref().expect("a live module")
    }
}

/// How long a re-initialization waits for PKCS#11 calls in flight to end.
const REINIT_WAIT: Duration = Duration::from_secs(10);

impl Hsm {
    /// Loads the module, initializes it, finds the token and logs in.
    /// The module's environment (`module_env`) must already be set by the caller, before
    /// any thread starts.
    pub fn open(cfg: &Pkcs11Config, pin: SecretString) -> Result<Hsm, StartupError> {
        let module = cfg.module.display().to_string();
        if !cfg.module.exists() {
            return Err(StartupError(format!(
                "PKCS#11 module {module} does not exist; check pkcs11.module (for SoftHSM2 on \
                 Debian it is /usr/lib/softhsm/libsofthsm2.so, from the softhsm2 package)"
            )));
        }
        let ctx = Pkcs11::new(&cfg.module).map_err(|e| {
            StartupError(format!(
                "cannot load PKCS#11 module {module}: {e}; check that pkcs11.module is a \
                 PKCS#11 library built for this machine"
            ))
        })?;
        let pin = Arc::new(RwLock::new(pin));
        let logins = Arc::new(AtomicU64::new(0));
        let (token, pool) = initialize(&ctx, &cfg.token, &module, &pin, &logins, cfg.max_sessions)
            .map_err(|e| {
                let hint = match e.ckr() {
                    Some(Ckr::PinIncorrect) => {
                        format!("the PIN from {} is wrong", pin_source(cfg))
                    }
                    Some(Ckr::PinLocked) => {
                        "the user PIN is locked; the security officer must unlock it".to_string()
                    }
                    _ => format!(
                        "check the PIN from {} and the token's state",
                        pin_source(cfg)
                    ),
                };
                match e {
                    Opening::Startup(s) => s,
                    Opening::Login(token, e) => StartupError(format!(
                        "login to {token} in module {module} failed: {e}; {hint}"
                    )),
                }
            })?;
        Ok(Hsm {
            inner: Arc::new(Module {
                ctx,
                path: module,
                selector: cfg.token.clone(),
                max_sessions: cfg.max_sessions,
                pin,
                logins,
                token: RwLock::new(token),
                live: RwLock::new(Some(Live { pool, epoch: 0 })),
                epoch: AtomicU64::new(0),
            }),
        })
    }

    /// The token in use (or last in use, while the module is being re-initialized).
    pub fn token(&self) -> TokenDescription {
        sync::read(&self.inner.token).clone()
    }

    /// The initialized module, held shared for one call; 503-worthy while it is being
    /// re-initialized or after a failed re-initialization.
    pub(crate) fn live(&self) -> Result<LiveGuard<'_>, HsmError> {
        let g = sync::read(&self.inner.live);
        if g.is_none() {
            return Err(HsmError::unavailable(
                "the token",
                "the PKCS#11 module is not initialized: the token was lost and is not back",
            ));
        }
        Ok(LiveGuard(g))
    }

    /// Re-initializes the module under the daemon: waits for the calls in flight (at most
    /// [`REINIT_WAIT`]), closes every session, C_Finalize, C_Initialize, finds the token
    /// again by the configured label or serial and logs in with the PIN held. Some modules
    /// (SoftHSM2) only see a token that came back after this. Every object handle read
    /// before turns stale (calls with one answer `Unavailable`), and the login generation
    /// moves, so holders of handles look them up again. On failure the module stays
    /// finalized and every call answers `Unavailable` until a later attempt succeeds.
    pub fn reinitialize(&self) -> Result<TokenDescription, HsmError> {
        let m = &self.inner;
        let started = std::time::Instant::now();
        let mut live = loop {
            match m.live.try_write() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if started.elapsed() > REINIT_WAIT {
                        return Err(HsmError::unavailable(
                            "C_Finalize",
                            format!(
                                "a PKCS#11 call did not end within {} s; the module is not \
                                 re-initialized under it",
                                REINIT_WAIT.as_secs()
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        if let Some(old) = live.take() {
            old.pool.close_all();
            drop(old);
            if let Err(e) = m.ctx.clone().finalize() {
                tracing::warn!(error = %HsmError::from_ck(&e), "C_Finalize before re-initializing failed");
            }
        }
        let (token, pool) = initialize(
            &m.ctx,
            &m.selector,
            &m.path,
            &m.pin,
            &m.logins,
            m.max_sessions,
        )
        .map_err(|e| match e {
            Opening::Startup(s) => HsmError::unavailable("C_Initialize", s.0),
            Opening::Login(_, e) => e,
        })?;
        let epoch = m.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        *sync::write(&m.token) = token.clone();
        *live = Some(Live { pool, epoch });
        Ok(token)
    }

    /// Logs in again with `pin` if it differs from the PIN in use (a reload after the PIN
    /// changed); on refusal the old login is restored and the error returned.
    pub fn change_pin(&self, pin: SecretString) -> Result<bool, HsmError> {
        let live = self.live()?;
        if live.pool.pin_is(&pin) {
            return Ok(false);
        }
        live.pool.change_pin(pin).map(|()| true)
    }

    /// Counts the logins made so far. When it moves, object handles read before may be
    /// stale (a token may renumber private objects across a logout, and a re-initialized
    /// module numbers them anew): look them up again.
    pub fn login_generation(&self) -> u64 {
        self.inner.logins.load(Ordering::SeqCst)
    }

    /// Proves the token answers: one C_GetSessionInfo on a pooled session.
    pub fn ping(&self) -> Result<(), HsmError> {
        self.live()?.pool.run(|s| s.get_session_info().map(|_| ()))
    }

    /// Closes every session and calls C_Finalize. Other clones of this `Hsm` must be gone.
    pub fn shutdown(self) -> Result<(), HsmError> {
        let inner = Arc::try_unwrap(self.inner).map_err(|_| {
            HsmError::internal("C_Finalize", "the HSM is still in use by another task")
        })?;
        let Module { ctx, live, .. } = inner;
        let Some(live) = live.into_inner().unwrap_or_else(|p| p.into_inner()) else {
            // Finalized by a failed re-initialization already.
            return Ok(());
        };
        live.pool.close_all();
        drop(live);
        ctx.finalize().map_err(|e| HsmError::from_ck(&e))
    }

    /// PKCS#11 sessions in use by HSM work now, open, and the configured limit.
    pub fn sessions(&self) -> (usize, usize, usize) {
        match self.live() {
            Ok(l) => l.pool.usage(),
            Err(_) => (0, 0, self.inner.max_sessions),
        }
    }
}

/// Why initializing failed: before the login (worded for the operator), or the login.
enum Opening {
    Startup(StartupError),
    Login(TokenDescription, HsmError),
}

impl Opening {
    fn ckr(&self) -> Option<&Ckr> {
        match self {
            Opening::Login(_, e) => e.ckr(),
            Opening::Startup(_) => None,
        }
    }
}

/// C_Initialize, the token by `want`, a pool and its first login. On failure the module
/// is finalized again, so a later attempt starts from scratch.
fn initialize(
    ctx: &Pkcs11,
    want: &TokenSelector,
    module: &str,
    pin: &Arc<RwLock<SecretString>>,
    logins: &Arc<AtomicU64>,
    max_sessions: usize,
) -> Result<(TokenDescription, Pool), Opening> {
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| {
            Opening::Startup(StartupError(format!(
                "C_Initialize of PKCS#11 module {module} failed: {}; check the module's \
                 own configuration (for SoftHSM2: SOFTHSM2_CONF in pkcs11.module_env and \
                 the token directory it names)",
                HsmError::from_ck(&e).code
            )))
        })?;
    let found = find_token(ctx, want, module)
        .map_err(Opening::Startup)
        .and_then(|(slot, token)| {
            let pool = Pool::new(ctx.clone(), slot, pin.clone(), logins.clone(), max_sessions);
            // The first session logs in; the login then holds for every session of the
            // process.
            match pool.login_first() {
                Ok(()) => Ok((token, pool)),
                Err(e) => {
                    pool.close_all();
                    Err(Opening::Login(token, e))
                }
            }
        });
    if found.is_err() {
        let _ = ctx.clone().finalize();
    }
    found
}

/// Names where the PIN came from, for messages.
fn pin_source(cfg: &Pkcs11Config) -> String {
    match &cfg.pin {
        PinSource::File(p) => p.display().to_string(),
        PinSource::Credential(c) => format!("credential {c:?}"),
    }
}

fn find_token(
    ctx: &Pkcs11,
    want: &TokenSelector,
    module: &str,
) -> Result<(Slot, TokenDescription), StartupError> {
    let slots = ctx.get_slots_with_token().map_err(|e| {
        StartupError(format!(
            "C_GetSlotList of module {module} failed: {}",
            HsmError::from_ck(&e).code
        ))
    })?;
    let mut found = Vec::new();
    let mut matches = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(CkError::Pkcs11(RvError::TokenNotRecognized | RvError::TokenNotPresent, _)) => {
                continue
            }
            Err(e) => {
                return Err(StartupError(format!(
                    "C_GetTokenInfo for slot {} of module {module} failed: {}",
                    slot.id(),
                    HsmError::from_ck(&e).code
                )))
            }
        };
        // SoftHSM2 and others offer an empty slot for initializing a new token: not a
        // candidate, and listing it would only confuse the message.
        if !info.token_initialized() {
            continue;
        }
        let desc = TokenDescription {
            label: info.label().trim_end().to_string(),
            serial: info.serial_number().trim_end().to_string(),
            slot_id: slot.id(),
        };
        let hit = match want {
            TokenSelector::Label(l) => &desc.label == l,
            TokenSelector::Serial(s) => &desc.serial == s,
        };
        if hit {
            matches.push((slot, desc.clone()));
        }
        found.push(desc.to_string());
    }
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 if found.is_empty() => Err(StartupError(format!(
            "no token with {want} in module {module}: the module reports no initialized token \
             at all; for SoftHSM2 check that SOFTHSM2_CONF (pkcs11.module_env) names the token \
             directory"
        ))),
        0 => Err(StartupError(format!(
            "no token with {want} in module {module}; tokens found: {}; check \
             pkcs11.token_label / pkcs11.token_serial",
            found.join(", ")
        ))),
        _ => Err(StartupError(format!(
            "{} tokens match {want} in module {module} ({}); choose one with \
             pkcs11.token_serial",
            matches.len(),
            matches
                .iter()
                .map(|(_, d)| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
