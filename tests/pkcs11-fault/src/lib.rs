//! Fault-injecting PKCS#11 module for hsmkeyd's fault tests.
//!
//! This cdylib is itself a PKCS#11 module: it exports `C_GetFunctionList`,
//! loads the real module named by `HSMKEYD_FAULT_MODULE` (for example
//! SoftHSM2) and hands out a copy of the real function list in which a few
//! entries are replaced by wrappers. The wrappers let a test, while the
//! daemon is running, make the "HSM" fail a write, hang, reject a login or
//! drop a session, and count how often the daemon calls certain functions.
//!
//! Everything is driven by files in the directory named by
//! `HSMKEYD_FAULT_DIR`, re-read on every call; without that variable the
//! module is a pure pass-through. See `README.md` next to `Cargo.toml` for
//! the exact file names and their meaning (the tests rely on them).
//!
//! Only the PKCS#11 2.x entry point `C_GetFunctionList` is exported, not
//! `C_GetInterface`, so callers always use the 2.x function list.

#![deny(missing_docs)]

use std::fs;
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use cryptoki_sys::{
    CKA_LABEL, CKR_ARGUMENTS_BAD, CKR_ATTRIBUTE_VALUE_INVALID, CKR_DEVICE_ERROR, CKR_GENERAL_ERROR,
    CKR_OK, CKR_SESSION_HANDLE_INVALID, CK_ATTRIBUTE_PTR, CK_FUNCTION_LIST,
    CK_FUNCTION_LIST_PTR_PTR, CK_MECHANISM_PTR, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE_PTR, CK_RV,
    CK_SESSION_HANDLE,
    CK_SESSION_INFO_PTR, CK_ULONG, CK_USER_TYPE, CK_UTF8CHAR_PTR, CK_VERSION,
};

/// Environment variable: absolute path of the real PKCS#11 module to wrap.
const ENV_MODULE: &str = "HSMKEYD_FAULT_MODULE";
/// Environment variable: the control directory. Unset means pass-through.
const ENV_DIR: &str = "HSMKEYD_FAULT_DIR";

/// Control file: decimal N; C_SetAttributeValue fails once after N successes.
const FILE_SETATTR_FAIL_AFTER: &str = "setattr_fail_after";
const FILE_SETATTR_FAIL_FROM: &str = "setattr_fail_from";
/// Control file: decimal N; C_CreateObject fails once after N successes.
const FILE_CREATE_FAIL_AFTER: &str = "create_fail_after";
/// Control file: while it exists, selected calls block before forwarding.
const FILE_HANG: &str = "hang";
/// Control files `hang_<Function>` (C_CreateObject, C_SetAttributeValue, C_DestroyObject,
/// C_GenerateKeyPair, which is held after the pair is made):
/// decimal N (empty = 0); N calls pass, then one call is held while the file exists.
const FILE_HANG_PREFIX: &str = "hang_";
/// Marker `held_<Function>`: present while a call is held by its `hang_<Function>` file.
const FILE_HELD_PREFIX: &str = "held_";
/// Control file: decimal N; a CKA_LABEL longer than N bytes in C_CreateObject or
/// C_SetAttributeValue gets CKR_ATTRIBUTE_VALUE_INVALID, as tokens that cap labels answer.
const FILE_MAX_LABEL_LEN: &str = "max_label_len";
/// Control file: hex CKR value that C_Login returns without forwarding.
const FILE_FAIL_LOGIN_WITH: &str = "fail_login_with";
/// Control file: next C_GetAttributeValue/C_SetAttributeValue loses its session.
const FILE_SESSION_INVALID_ONCE: &str = "session_invalid_once";

/// How often a hung call re-checks whether the `hang` file is still there.
const HANG_POLL: Duration = Duration::from_millis(20);

/// The loaded real module and the function list handed out to callers.
struct Wrapper {
    /// Keeps the real module mapped for as long as the process lives (this
    /// value sits in a `static` and is never dropped).
    _module: cryptoki_sys::Pkcs11,
    /// Copy of the real module's function list; wrappers forward through it.
    real: CK_FUNCTION_LIST,
    /// The list returned by our `C_GetFunctionList`: `real` with overrides.
    list: CK_FUNCTION_LIST,
    /// Control directory from `HSMKEYD_FAULT_DIR`, read once at load time.
    dir: Option<PathBuf>,
}

/// Loaded once, on the first `C_GetFunctionList` call, for the whole process.
/// A load failure is remembered too, so every later call reports it.
static WRAPPER: OnceLock<Result<Wrapper, String>> = OnceLock::new();

/// Serializes the read-modify-write of `setattr_fail_after`.
static SETATTR_LOCK: Mutex<()> = Mutex::new(());

/// Serializes the read-modify-write of `create_fail_after`.
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// Serializes the read-modify-write of the `hang_<Function>` files.
static HOLD_LOCK: Mutex<()> = Mutex::new(());

/// Serializes writing the `count_*` files, so the file last written always
/// holds the latest counter value.
static COUNT_FILE_LOCK: Mutex<()> = Mutex::new(());

/// In-process call counters, indexed by [`Counted`].
static COUNTERS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Functions whose calls are counted into `count_<FunctionName>` files.
#[derive(Clone, Copy)]
enum Counted {
    /// `C_FindObjectsInit`
    FindObjectsInit = 0,
    /// `C_SetAttributeValue`
    SetAttributeValue = 1,
    /// `C_CreateObject`
    CreateObject = 2,
    /// `C_Login`
    Login = 3,
    /// `C_GetSessionInfo`
    GetSessionInfo = 4,
    /// `C_DestroyObject`
    DestroyObject = 5,
}

impl Counted {
    /// Name of the counter file in the control directory.
    fn file_name(self) -> &'static str {
        match self {
            Counted::FindObjectsInit => "count_C_FindObjectsInit",
            Counted::SetAttributeValue => "count_C_SetAttributeValue",
            Counted::CreateObject => "count_C_CreateObject",
            Counted::Login => "count_C_Login",
            Counted::GetSessionInfo => "count_C_GetSessionInfo",
            Counted::DestroyObject => "count_C_DestroyObject",
        }
    }
}

/// Prints one diagnostic line to stderr. Never panics (unlike `eprintln!`).
fn warn(msg: &str) {
    let _ = writeln!(io::stderr(), "hsmkeyd-pkcs11-fault: {msg}");
}

/// Locks a mutex, ignoring poisoning (the guarded data is `()`).
fn lock(m: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `contents` to `dir/name` via a temporary file and a rename, so a
/// concurrent reader sees either the old or the new file, never a partial one.
fn write_atomically(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, dir.join(name))
}

/// Reads a control file; `None` if it does not exist (or cannot be read,
/// which is reported on stderr and then treated like absence).
fn read_control(dir: &Path, name: &str) -> Option<String> {
    match fs::read_to_string(dir.join(name)) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            warn(&format!("cannot read {name}: {e}; ignoring it"));
            None
        }
    }
}

/// Parses a CKR value written in hex, with or without a `0x` prefix.
fn parse_ckr_hex(text: &str) -> Option<CK_RV> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    CK_RV::from_str_radix(digits, 16).ok()
}

impl Wrapper {
    /// Counts a call and, with a control directory, publishes the new value.
    fn count(&self, which: Counted) {
        COUNTERS[which as usize].fetch_add(1, Ordering::SeqCst);
        let Some(dir) = &self.dir else { return };
        let _guard = lock(&COUNT_FILE_LOCK);
        // Read the counter under the lock: whichever thread writes last
        // writes the latest value.
        let value = COUNTERS[which as usize].load(Ordering::SeqCst);
        if let Err(e) = write_atomically(dir, which.file_name(), &value.to_string()) {
            warn(&format!("cannot write {}: {e}", which.file_name()));
        }
    }

    /// Blocks while the `hang` file exists.
    fn wait_while_hung(&self) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(FILE_HANG);
        while path.exists() {
            thread::sleep(HANG_POLL);
        }
    }

    /// Applies `hang_<function>`: lets N calls pass (decrementing the file), then holds
    /// this call, with `held_<function>` present, until the file is removed.
    fn hold(&self, function: &str) {
        let Some(dir) = &self.dir else { return };
        let name = format!("{FILE_HANG_PREFIX}{function}");
        {
            let _guard = lock(&HOLD_LOCK);
            let Some(text) = read_control(dir, &name) else {
                return;
            };
            let n: u64 = if text.trim().is_empty() {
                0
            } else {
                match text.trim().parse() {
                    Ok(n) => n,
                    Err(_) => {
                        warn(&format!(
                            "{name} does not hold a decimal integer; ignoring it"
                        ));
                        return;
                    }
                }
            };
            if n > 0 {
                if let Err(e) = write_atomically(dir, &name, &(n - 1).to_string()) {
                    warn(&format!("cannot rewrite {name}: {e}"));
                }
                return;
            }
        }
        let held = format!("{FILE_HELD_PREFIX}{function}");
        if let Err(e) = write_atomically(dir, &held, "") {
            warn(&format!("cannot write {held}: {e}"));
        }
        let path = dir.join(&name);
        while path.exists() {
            thread::sleep(HANG_POLL);
        }
        let _ = fs::remove_file(dir.join(&held));
    }

    /// Applies `max_label_len` to a template: true if it sets a label over the limit.
    ///
    /// # Safety
    /// `template` must point at `count` valid CK_ATTRIBUTEs (or be NULL with count 0).
    unsafe fn label_too_long(&self, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> bool {
        let Some(dir) = &self.dir else { return false };
        let Some(text) = read_control(dir, FILE_MAX_LABEL_LEN) else {
            return false;
        };
        let Ok(max) = text.trim().parse::<CK_ULONG>() else {
            warn(&format!(
                "{FILE_MAX_LABEL_LEN} does not hold a decimal integer; ignoring it"
            ));
            return false;
        };
        if template.is_null() {
            return false;
        }
        // SAFETY: the caller's template, valid for `count` entries per PKCS#11.
        let attrs = unsafe { std::slice::from_raw_parts(template, count as usize) };
        attrs
            .iter()
            .any(|a| a.type_ == CKA_LABEL && a.ulValueLen > max)
    }

    /// Applies `setattr_fail_after`; returns true if this call must fail.
    fn setattr_must_fail(&self) -> bool {
        self.fail_after(FILE_SETATTR_FAIL_AFTER, &SETATTR_LOCK)
    }

    /// Applies `setattr_fail_from`: like `setattr_fail_after`, but once N reaches 0 the
    /// file stays and every later call fails too, until the test removes it.
    fn setattr_fails_from(&self) -> bool {
        let Some(dir) = &self.dir else { return false };
        let _guard = lock(&SETATTR_LOCK);
        let Some(text) = read_control(dir, FILE_SETATTR_FAIL_FROM) else {
            return false;
        };
        match text.trim().parse::<u64>() {
            Ok(0) => true,
            Ok(n) => {
                if let Err(e) = write_atomically(dir, FILE_SETATTR_FAIL_FROM, &(n - 1).to_string())
                {
                    warn(&format!("cannot rewrite {FILE_SETATTR_FAIL_FROM}: {e}"));
                }
                false
            }
            Err(_) => {
                warn(&format!(
                    "{FILE_SETATTR_FAIL_FROM} does not hold a decimal integer; ignoring it"
                ));
                false
            }
        }
    }

    /// Applies `create_fail_after`; returns true if this call must fail.
    fn create_must_fail(&self) -> bool {
        self.fail_after(FILE_CREATE_FAIL_AFTER, &CREATE_LOCK)
    }

    /// A "fail after N" control file: N > 0 is decremented (the call goes
    /// through), N = 0 deletes the file and makes this call fail. Absent or
    /// unparsable means no fault. `guard` serializes the read-modify-write.
    fn fail_after(&self, name: &str, guard: &'static Mutex<()>) -> bool {
        let Some(dir) = &self.dir else { return false };
        let _guard = lock(guard);
        let Some(text) = read_control(dir, name) else {
            return false;
        };
        let n: u64 = match text.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                warn(&format!(
                    "{name} does not hold a decimal integer; ignoring it"
                ));
                return false;
            }
        };
        if n > 0 {
            if let Err(e) = write_atomically(dir, name, &(n - 1).to_string()) {
                warn(&format!("cannot rewrite {name}: {e}"));
            }
            false
        } else {
            if let Err(e) = fs::remove_file(dir.join(name)) {
                warn(&format!("cannot delete {name}: {e}"));
            }
            true
        }
    }

    /// Applies `fail_login_with`; returns the CKR value to fail with, if any.
    fn forced_login_failure(&self) -> Option<CK_RV> {
        let dir = self.dir.as_ref()?;
        let text = read_control(dir, FILE_FAIL_LOGIN_WITH)?;
        let rv = parse_ckr_hex(&text);
        if rv.is_none() {
            warn(&format!(
                "{FILE_FAIL_LOGIN_WITH} does not hold a hex CKR value like 0xa0; ignoring it"
            ));
        }
        rv
    }

    /// Applies `session_invalid_once`: if the file exists, this call claims
    /// it (deleting it), closes `session` in the real module and returns
    /// CKR_SESSION_HANDLE_INVALID.
    fn drop_session_once(&self, session: CK_SESSION_HANDLE) -> Option<CK_RV> {
        let dir = self.dir.as_ref()?;
        // unlink is atomic: when several threads race, exactly one of them
        // succeeds in deleting the file and so injects the fault.
        match fs::remove_file(dir.join(FILE_SESSION_INVALID_ONCE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn(&format!("cannot delete {FILE_SESSION_INVALID_ONCE}: {e}"));
                return None;
            }
        }
        if let Some(close) = self.real.C_CloseSession {
            // SAFETY: `close` is the real module's C_CloseSession, taken from
            // its own function list; it takes a handle by value, and an
            // invalid handle only yields an error code, which we ignore.
            let _ = unsafe { close(session) };
        }
        Some(CKR_SESSION_HANDLE_INVALID)
    }
}

/// Runs `f` with the loaded wrapper, turning a panic (or a missing wrapper,
/// which cannot happen for functions reached through our list) into
/// CKR_GENERAL_ERROR so that no panic unwinds across the FFI boundary.
fn guarded(f: impl FnOnce(&Wrapper) -> CK_RV) -> CK_RV {
    // AssertUnwindSafe: after a panic we only return an error code; the
    // shared state is atomics, `()` mutexes and files, none left half-updated
    // in a way that breaks memory safety.
    catch_unwind(AssertUnwindSafe(|| match WRAPPER.get() {
        Some(Ok(w)) => f(w),
        _ => CKR_GENERAL_ERROR,
    }))
    .unwrap_or(CKR_GENERAL_ERROR)
}

/// The tail every wrapper shares: calls the real module's `$f` with the arguments unchanged,
/// or answers CKR_GENERAL_ERROR (from the enclosing closure) when the module lacks it.
macro_rules! forward {
    ($w:ident . $f:ident ( $($arg:expr),* )) => {{
        let Some(real) = $w.real.$f else {
            return CKR_GENERAL_ERROR;
        };
        // SAFETY: arguments forwarded unchanged to the real module.
        unsafe { real($($arg),*) }
    }};
}

/// Wrapper for `C_Login`: counted; fails on demand via `fail_login_with`.
unsafe extern "C" fn wrap_login(
    session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    pin: CK_UTF8CHAR_PTR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::Login);
        if let Some(rv) = w.forced_login_failure() {
            return rv;
        }
        forward!(w.C_Login(session, user_type, pin, pin_len))
    })
}

/// Wrapper for `C_GetSessionInfo`: counted; blocks while `hang` exists.
unsafe extern "C" fn wrap_get_session_info(
    session: CK_SESSION_HANDLE,
    info: CK_SESSION_INFO_PTR,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::GetSessionInfo);
        w.wait_while_hung();
        forward!(w.C_GetSessionInfo(session, info))
    })
}

/// Wrapper for `C_CreateObject`: counted; fails on demand via
/// `create_fail_after`.
unsafe extern "C" fn wrap_create_object(
    session: CK_SESSION_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    object: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::CreateObject);
        w.hold("C_CreateObject");
        // SAFETY: the template comes from the caller, as PKCS#11 requires it valid.
        if unsafe { w.label_too_long(template, count) } {
            return CKR_ATTRIBUTE_VALUE_INVALID;
        }
        if w.create_must_fail() {
            return CKR_DEVICE_ERROR;
        }
        forward!(w.C_CreateObject(session, template, count, object))
    })
}

/// Wrapper for `C_GetAttributeValue`: blocks while `hang` exists; honours
/// `session_invalid_once`.
unsafe extern "C" fn wrap_get_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    guarded(|w| {
        w.wait_while_hung();
        if let Some(rv) = w.drop_session_once(session) {
            return rv;
        }
        forward!(w.C_GetAttributeValue(session, object, template, count))
    })
}

/// Wrapper for `C_SetAttributeValue`: counted; blocks while `hang` exists;
/// honours `session_invalid_once`, then `setattr_fail_after` and `setattr_fail_from`.
unsafe extern "C" fn wrap_set_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::SetAttributeValue);
        w.wait_while_hung();
        w.hold("C_SetAttributeValue");
        if let Some(rv) = w.drop_session_once(session) {
            return rv;
        }
        // SAFETY: the template comes from the caller, as PKCS#11 requires it valid.
        if unsafe { w.label_too_long(template, count) } {
            return CKR_ATTRIBUTE_VALUE_INVALID;
        }
        if w.setattr_must_fail() || w.setattr_fails_from() {
            return CKR_DEVICE_ERROR;
        }
        forward!(w.C_SetAttributeValue(session, object, template, count))
    })
}

/// Wrapper for `C_DestroyObject`: counted; held by `hang_C_DestroyObject`.
unsafe extern "C" fn wrap_destroy_object(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::DestroyObject);
        w.hold("C_DestroyObject");
        forward!(w.C_DestroyObject(session, object))
    })
}

/// Wrapper for `C_GenerateKeyPair`: held by `hang_C_GenerateKeyPair` after it has made the
/// pair, so a test can kill the caller between generation and what follows.
unsafe extern "C" fn wrap_generate_key_pair(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    public_template: CK_ATTRIBUTE_PTR,
    public_count: CK_ULONG,
    private_template: CK_ATTRIBUTE_PTR,
    private_count: CK_ULONG,
    public_key: CK_OBJECT_HANDLE_PTR,
    private_key: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    guarded(|w| {
        let rv = forward!(w.C_GenerateKeyPair(
            session,
            mechanism,
            public_template,
            public_count,
            private_template,
            private_count,
            public_key,
            private_key
        ));
        w.hold("C_GenerateKeyPair");
        rv
    })
}

/// Wrapper for `C_FindObjectsInit`: counted; blocks while `hang` exists.
unsafe extern "C" fn wrap_find_objects_init(
    session: CK_SESSION_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    guarded(|w| {
        w.count(Counted::FindObjectsInit);
        w.wait_while_hung();
        forward!(w.C_FindObjectsInit(session, template, count))
    })
}

/// Loads the real module and builds the wrapped function list.
fn load() -> Result<Wrapper, String> {
    let path = std::env::var_os(ENV_MODULE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{ENV_MODULE} is not set"))?;
    if !path.is_absolute() {
        return Err(format!(
            "{ENV_MODULE} must be an absolute path, got {}",
            path.display()
        ));
    }
    // SAFETY: dlopen runs the library's initialisers; the library is the
    // PKCS#11 module the test explicitly named, which is what we are for.
    let module = unsafe { cryptoki_sys::Pkcs11::new(&path) }
        .map_err(|e| format!("cannot load {ENV_MODULE}={}: {e}", path.display()))?;
    let get_list = *module.C_GetFunctionList.as_ref().map_err(|e| {
        format!(
            "{ENV_MODULE}={} has no C_GetFunctionList: {e}",
            path.display()
        )
    })?;
    // Wrapping ourselves would re-enter this initialisation and deadlock.
    let ours: unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV = C_GetFunctionList;
    if std::ptr::fn_addr_eq(get_list, ours) {
        return Err(format!(
            "{ENV_MODULE}={} is this fault module itself",
            path.display()
        ));
    }
    let mut real_ptr: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList only writes one pointer through its argument,
    // which points at a live local.
    let rv = unsafe { get_list(&mut real_ptr) };
    if rv != CKR_OK || real_ptr.is_null() {
        return Err(format!(
            "C_GetFunctionList of {} failed with 0x{rv:x}",
            path.display()
        ));
    }
    // SAFETY: on CKR_OK the module returned a pointer to its own function
    // list (at least a full 2.x CK_FUNCTION_LIST), valid while it is loaded;
    // we copy it out by value.
    let real: CK_FUNCTION_LIST = unsafe { *real_ptr };

    let mut list = real;
    list.C_GetFunctionList = Some(C_GetFunctionList);
    // Our copy has the 2.x layout only; never claim to be a 3.x list.
    if list.version.major >= 3 {
        list.version = CK_VERSION {
            major: 2,
            minor: 40,
        };
    }
    // Wrap only what the real module implements; a NULL entry stays NULL.
    macro_rules! wrap {
        ($field:ident => $wrapper:ident) => {
            if real.$field.is_some() {
                list.$field = Some($wrapper);
            }
        };
    }
    wrap!(C_Login => wrap_login);
    wrap!(C_GetSessionInfo => wrap_get_session_info);
    wrap!(C_CreateObject => wrap_create_object);
    wrap!(C_GetAttributeValue => wrap_get_attribute_value);
    wrap!(C_SetAttributeValue => wrap_set_attribute_value);
    wrap!(C_FindObjectsInit => wrap_find_objects_init);
    wrap!(C_DestroyObject => wrap_destroy_object);
    wrap!(C_GenerateKeyPair => wrap_generate_key_pair);

    let dir = std::env::var_os(ENV_DIR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    Ok(Wrapper {
        _module: module,
        real,
        list,
        dir,
    })
}

/// PKCS#11 entry point: returns the real module's function list with the
/// fault-injecting wrappers patched in.
///
/// The first call loads the module named by `HSMKEYD_FAULT_MODULE`; every
/// call returns the same process-lifetime list. If the variable is unset or
/// the module cannot be loaded, returns CKR_GENERAL_ERROR and prints the
/// reason on one stderr line.
///
/// # Safety
///
/// `pp_function_list` must be NULL (yielding CKR_ARGUMENTS_BAD) or valid for
/// writing one pointer. The returned list must be treated as read-only, as
/// the PKCS#11 specification requires.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(pp_function_list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    catch_unwind(|| {
        if pp_function_list.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        match WRAPPER.get_or_init(load) {
            Ok(w) => {
                // SAFETY: the caller guarantees the pointer is writable. The
                // list lives in a static for the rest of the process; PKCS#11
                // callers never write through it, so handing out a `*mut` to
                // shared data is fine.
                unsafe { *pp_function_list = &w.list as *const CK_FUNCTION_LIST as *mut _ };
                CKR_OK
            }
            Err(msg) => {
                warn(msg);
                CKR_GENERAL_ERROR
            }
        }
    })
    .unwrap_or(CKR_GENERAL_ERROR)
}

#[cfg(test)]
mod tests {
    use super::parse_ckr_hex;

    #[test]
    fn parses_hex_ckr_values() {
        assert_eq!(parse_ckr_hex("0xa0\n"), Some(0xa0));
        assert_eq!(parse_ckr_hex("0XA0"), Some(0xa0));
        assert_eq!(parse_ckr_hex("a0"), Some(0xa0));
        assert_eq!(parse_ckr_hex("0x"), None);
        assert_eq!(parse_ckr_hex("pin"), None);
    }
}
