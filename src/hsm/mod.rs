//! The HSM layer: the only module that speaks PKCS#11 (through `cryptoki`).
//!
//! Owns: loading the module, C_Initialize with OS locking, choosing the token, the one login
//! of the process, the session pool, recovery of lost sessions and logins, and turning
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
use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
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
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Pkcs11,
    token: TokenDescription,
    pool: Pool,
}

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
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                StartupError(format!(
                    "C_Initialize of PKCS#11 module {module} failed: {}; check the module's \
                     own configuration (for SoftHSM2: SOFTHSM2_CONF in pkcs11.module_env and \
                     the token directory it names)",
                    HsmError::from_ck(&e).code
                ))
            })?;
        let (slot, token) = find_token(&ctx, &cfg.token, &module)?;
        let pool = Pool::new(ctx.clone(), slot, pin, cfg.max_sessions);
        // The first session logs in; the login then holds for every session of the process.
        pool.login_first().map_err(|e| {
            let hint = match e.ckr() {
                Some(Ckr::PinIncorrect) => format!("the PIN from {} is wrong", pin_source(cfg)),
                Some(Ckr::PinLocked) => {
                    "the user PIN is locked; the security officer must unlock it".to_string()
                }
                _ => format!(
                    "check the PIN from {} and the token's state",
                    pin_source(cfg)
                ),
            };
            StartupError(format!(
                "login to {token} in module {module} failed: {e}; {hint}"
            ))
        })?;
        Ok(Hsm {
            inner: Arc::new(Inner { ctx, token, pool }),
        })
    }

    /// The token in use.
    pub fn token(&self) -> &TokenDescription {
        &self.inner.token
    }

    /// Logs in again with `pin` if it differs from the PIN in use (a reload after the PIN
    /// changed); on refusal the old login is restored and the error returned.
    pub fn change_pin(&self, pin: SecretString) -> Result<bool, HsmError> {
        if self.inner.pool.pin_is(&pin) {
            return Ok(false);
        }
        self.inner.pool.change_pin(pin).map(|()| true)
    }

    /// Counts the logins made so far. When it moves, object handles read before may be
    /// stale (a token may renumber private objects across a logout): look them up again.
    pub fn login_generation(&self) -> u64 {
        self.inner.pool.logins()
    }

    /// Proves the token answers: one C_GetSessionInfo on a pooled session.
    pub fn ping(&self) -> Result<(), HsmError> {
        self.inner.pool.run(|s| s.get_session_info().map(|_| ()))
    }

    /// Closes every session and calls C_Finalize. Other clones of this `Hsm` must be gone.
    pub fn shutdown(self) -> Result<(), HsmError> {
        let inner = Arc::try_unwrap(self.inner).map_err(|_| {
            HsmError::internal("C_Finalize", "the HSM is still in use by another task")
        })?;
        inner.pool.close_all();
        let Inner { ctx, pool, .. } = inner;
        drop(pool);
        ctx.finalize().map_err(|e| HsmError::from_ck(&e))
    }

    /// PKCS#11 sessions in use by HSM work now, open, and the configured limit.
    pub fn sessions(&self) -> (usize, usize, usize) {
        self.pool().usage()
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }
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
