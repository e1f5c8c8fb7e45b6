//! Errors of the HSM layer: the CKR_ value and the PKCS#11 function, sorted into the few
//! kinds the key domain needs to decide what to answer.

use std::fmt;

use cryptoki::error::{Error as CkError, RvError};

/// What an HSM failure means to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmErrorKind {
    /// The token refuses to change this object or attribute
    /// (CKR_ATTRIBUTE_READ_ONLY, CKR_ACTION_PROHIBITED).
    ReadOnly,
    /// The object no longer exists (CKR_OBJECT_HANDLE_INVALID): the index is stale.
    ObjectGone,
    /// The token or module cannot serve now (device errors, token removed, sessions lost
    /// even after a retry, login failures).
    Unavailable,
    /// The token refused the request's values (template or attribute errors).
    Refused,
    /// Anything else.
    Internal,
}

/// The CKR_ values hsmkeyd decides on, named as PKCS#11 names them (`PinIncorrect` is
/// CKR_PIN_INCORRECT); every other value is [`Ckr::Other`], kept by name for messages.
/// Mapped from cryptoki's `RvError` here only.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each variant is the CKR_ value of its name
pub enum Ckr {
    ActionProhibited,
    ArgumentsBad,
    AttributeReadOnly,
    AttributeTypeInvalid,
    AttributeValueInvalid,
    CryptokiNotInitialized,
    DataLenRange,
    DeviceError,
    DeviceMemory,
    DeviceRemoved,
    FunctionFailed,
    GeneralError,
    HostMemory,
    ObjectHandleInvalid,
    PinExpired,
    PinIncorrect,
    PinLocked,
    SessionClosed,
    SessionCount,
    SessionHandleInvalid,
    TemplateIncomplete,
    TemplateInconsistent,
    TokenNotPresent,
    TokenNotRecognized,
    UserAlreadyLoggedIn,
    UserNotLoggedIn,
    /// Any other value, by its CKR_ name (`CKR_VENDOR_DEFINED(0x...)` for vendor codes).
    /// Never one of the values above.
    Other(String),
}

impl Ckr {
    pub(crate) fn of(rv: RvError) -> Ckr {
        use RvError as R;
        match rv {
            R::ActionProhibited => Ckr::ActionProhibited,
            R::ArgumentsBad => Ckr::ArgumentsBad,
            R::AttributeReadOnly => Ckr::AttributeReadOnly,
            R::AttributeTypeInvalid => Ckr::AttributeTypeInvalid,
            R::AttributeValueInvalid => Ckr::AttributeValueInvalid,
            R::CryptokiNotInitialized => Ckr::CryptokiNotInitialized,
            R::DataLenRange => Ckr::DataLenRange,
            R::DeviceError => Ckr::DeviceError,
            R::DeviceMemory => Ckr::DeviceMemory,
            R::DeviceRemoved => Ckr::DeviceRemoved,
            R::FunctionFailed => Ckr::FunctionFailed,
            R::GeneralError => Ckr::GeneralError,
            R::HostMemory => Ckr::HostMemory,
            R::ObjectHandleInvalid => Ckr::ObjectHandleInvalid,
            R::PinExpired => Ckr::PinExpired,
            R::PinIncorrect => Ckr::PinIncorrect,
            R::PinLocked => Ckr::PinLocked,
            R::SessionClosed => Ckr::SessionClosed,
            R::SessionCount => Ckr::SessionCount,
            R::SessionHandleInvalid => Ckr::SessionHandleInvalid,
            R::TemplateIncomplete => Ckr::TemplateIncomplete,
            R::TemplateInconsistent => Ckr::TemplateInconsistent,
            R::TokenNotPresent => Ckr::TokenNotPresent,
            R::TokenNotRecognized => Ckr::TokenNotRecognized,
            R::UserAlreadyLoggedIn => Ckr::UserAlreadyLoggedIn,
            R::UserNotLoggedIn => Ckr::UserNotLoggedIn,
            R::VendorDefined(code) => Ckr::Other(format!("CKR_VENDOR_DEFINED({code:#x})")),
            other => Ckr::Other(ckr_name(&format!("{other:?}"))),
        }
    }

    /// What a failure with this value means to the caller.
    pub fn kind(&self) -> HsmErrorKind {
        use Ckr::*;
        match self {
            AttributeReadOnly | ActionProhibited => HsmErrorKind::ReadOnly,
            ObjectHandleInvalid => HsmErrorKind::ObjectGone,
            AttributeValueInvalid
            | AttributeTypeInvalid
            | TemplateIncomplete
            | TemplateInconsistent
            | DataLenRange
            | ArgumentsBad => HsmErrorKind::Refused,
            DeviceError
            | DeviceMemory
            | DeviceRemoved
            | TokenNotPresent
            | TokenNotRecognized
            | SessionHandleInvalid
            | SessionClosed
            | SessionCount
            | UserNotLoggedIn
            | PinIncorrect
            | PinLocked
            | PinExpired
            | CryptokiNotInitialized
            | FunctionFailed
            | GeneralError
            | HostMemory => HsmErrorKind::Unavailable,
            UserAlreadyLoggedIn | Other(_) => HsmErrorKind::Internal,
        }
    }
}

impl fmt::Display for Ckr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ckr::Other(name) => f.write_str(name),
            named => f.write_str(&ckr_name(&format!("{named:?}"))),
        }
    }
}

/// What went wrong: a CKR_ value, or a description for failures that are not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// The module returned this value.
    Ckr(Ckr),
    /// Not a PKCS#11 return value (module loading, a pool timeout, an unexpected answer).
    Text(String),
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Ckr(c) => c.fmt(f),
            Code::Text(t) => f.write_str(t),
        }
    }
}

/// A failed PKCS#11 call.
#[derive(Debug, Clone)]
pub struct HsmError {
    /// How to treat it.
    pub kind: HsmErrorKind,
    /// The PKCS#11 function, e.g. `C_SetAttributeValue`.
    pub function: String,
    /// The CKR_ value, e.g. CKR_ATTRIBUTE_READ_ONLY, or a description for non-CKR errors;
    /// shown by its CKR_ name.
    pub code: Code,
}

impl fmt::Display for HsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.function, self.code)
    }
}

impl std::error::Error for HsmError {}

impl HsmError {
    /// An error that did not come from a PKCS#11 return value.
    pub fn internal(function: &str, text: impl Into<String>) -> HsmError {
        HsmError::text(HsmErrorKind::Internal, function, text)
    }

    /// The token cannot serve, for a reason that is not a PKCS#11 return value.
    pub fn unavailable(function: &str, text: impl Into<String>) -> HsmError {
        HsmError::text(HsmErrorKind::Unavailable, function, text)
    }

    fn text(kind: HsmErrorKind, function: &str, text: impl Into<String>) -> HsmError {
        HsmError {
            kind,
            function: function.to_string(),
            code: Code::Text(text.into()),
        }
    }

    pub(crate) fn from_ck(e: &CkError) -> HsmError {
        match e {
            CkError::Pkcs11(rv, function) => {
                let ckr = Ckr::of(*rv);
                HsmError {
                    kind: ckr.kind(),
                    function: function_name(&function.to_string()),
                    code: Code::Ckr(ckr),
                }
            }
            CkError::LibraryLoading(le) => HsmError::unavailable("module loading", le.to_string()),
            other => HsmError::internal("cryptoki", other.to_string()),
        }
    }

    /// The CKR_ value this error carries, if it came from one.
    pub fn ckr(&self) -> Option<&Ckr> {
        match &self.code {
            Code::Ckr(c) => Some(c),
            Code::Text(_) => None,
        }
    }
}

/// `Function::SetAttributeValue` -> `C_SetAttributeValue`.
fn function_name(debug: &str) -> String {
    format!("C_{}", debug.trim_start_matches("Function::"))
}

/// The CKR_ name of a return value from its camel-case name: `PinIncorrect` ->
/// `CKR_PIN_INCORRECT`.
fn ckr_name(camel: &str) -> String {
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names_follow_the_standard() {
        let name = |rv| Ckr::of(rv).to_string();
        assert_eq!(name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(name(RvError::AttributeReadOnly), "CKR_ATTRIBUTE_READ_ONLY");
        assert_eq!(
            name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        // Values hsmkeyd does not act on keep their names too.
        assert_eq!(
            Ckr::of(RvError::KeyHandleInvalid),
            Ckr::Other("CKR_KEY_HANDLE_INVALID".into())
        );
        assert_eq!(
            name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
        assert_eq!(function_name("Function::Login"), "C_Login");
    }

    #[test]
    fn every_named_value_maps_from_its_rv_and_keeps_its_name() {
        // A variant whose name differs from cryptoki's would fall into `Other` and lose
        // its kind: each named one must come back as itself.
        for (rv, ckr) in [
            (RvError::ActionProhibited, Ckr::ActionProhibited),
            (RvError::ArgumentsBad, Ckr::ArgumentsBad),
            (RvError::AttributeReadOnly, Ckr::AttributeReadOnly),
            (RvError::AttributeTypeInvalid, Ckr::AttributeTypeInvalid),
            (RvError::AttributeValueInvalid, Ckr::AttributeValueInvalid),
            (RvError::CryptokiNotInitialized, Ckr::CryptokiNotInitialized),
            (RvError::DataLenRange, Ckr::DataLenRange),
            (RvError::DeviceError, Ckr::DeviceError),
            (RvError::DeviceMemory, Ckr::DeviceMemory),
            (RvError::DeviceRemoved, Ckr::DeviceRemoved),
            (RvError::FunctionFailed, Ckr::FunctionFailed),
            (RvError::GeneralError, Ckr::GeneralError),
            (RvError::HostMemory, Ckr::HostMemory),
            (RvError::ObjectHandleInvalid, Ckr::ObjectHandleInvalid),
            (RvError::PinExpired, Ckr::PinExpired),
            (RvError::PinIncorrect, Ckr::PinIncorrect),
            (RvError::PinLocked, Ckr::PinLocked),
            (RvError::SessionClosed, Ckr::SessionClosed),
            (RvError::SessionCount, Ckr::SessionCount),
            (RvError::SessionHandleInvalid, Ckr::SessionHandleInvalid),
            (RvError::TemplateIncomplete, Ckr::TemplateIncomplete),
            (RvError::TemplateInconsistent, Ckr::TemplateInconsistent),
            (RvError::TokenNotPresent, Ckr::TokenNotPresent),
            (RvError::TokenNotRecognized, Ckr::TokenNotRecognized),
            (RvError::UserAlreadyLoggedIn, Ckr::UserAlreadyLoggedIn),
            (RvError::UserNotLoggedIn, Ckr::UserNotLoggedIn),
        ] {
            assert_eq!(Ckr::of(rv), ckr);
            assert_eq!(
                ckr.to_string(),
                Ckr::Other(ckr_name(&format!("{rv:?}"))).to_string()
            );
        }
        assert_eq!(Ckr::PinLocked.kind(), HsmErrorKind::Unavailable);
        assert_eq!(Ckr::AttributeReadOnly.kind(), HsmErrorKind::ReadOnly);
        assert_eq!(Ckr::Other("CKR_X".into()).kind(), HsmErrorKind::Internal);
    }
}
