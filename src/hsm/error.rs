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

/// A failed PKCS#11 call.
#[derive(Debug, Clone)]
pub struct HsmError {
    /// How to treat it.
    pub kind: HsmErrorKind,
    /// The PKCS#11 function, e.g. `C_SetAttributeValue`.
    pub function: String,
    /// The CKR_ name, e.g. `CKR_ATTRIBUTE_READ_ONLY`, or a description for non-CKR errors.
    pub code: String,
}

impl fmt::Display for HsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.function, self.code)
    }
}

impl std::error::Error for HsmError {}

impl HsmError {
    /// An error that did not come from a PKCS#11 return value.
    pub fn internal(function: &str, code: impl Into<String>) -> HsmError {
        HsmError {
            kind: HsmErrorKind::Internal,
            function: function.to_string(),
            code: code.into(),
        }
    }

    pub(crate) fn from_ck(e: &CkError) -> HsmError {
        match e {
            CkError::Pkcs11(rv, function) => HsmError {
                kind: kind_of(*rv),
                function: function_name(&function.to_string()),
                code: ckr_name(*rv),
            },
            CkError::LibraryLoading(le) => HsmError {
                kind: HsmErrorKind::Unavailable,
                function: "module loading".into(),
                code: le.to_string(),
            },
            other => HsmError::internal("cryptoki", other.to_string()),
        }
    }

    /// The CKR_ value this error carries, if it came from one.
    pub fn is_ckr(&self, name: &str) -> bool {
        self.code == name
    }
}

/// `Function::SetAttributeValue` -> `C_SetAttributeValue`.
fn function_name(debug: &str) -> String {
    format!("C_{}", debug.trim_start_matches("Function::"))
}

/// The CKR_ name of a return value: `PinIncorrect` -> `CKR_PIN_INCORRECT`.
pub(crate) fn ckr_name(rv: RvError) -> String {
    if let RvError::VendorDefined(code) = rv {
        return format!("CKR_VENDOR_DEFINED({code:#x})");
    }
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

pub(crate) fn kind_of(rv: RvError) -> HsmErrorKind {
    use RvError::*;
    match rv {
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
        _ => HsmErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names_follow_the_standard() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::AttributeReadOnly),
            "CKR_ATTRIBUTE_READ_ONLY"
        );
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(function_name("Function::Login"), "C_Login");
    }
}
