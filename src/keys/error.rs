//! Errors of the key domain. `api::error` is the one place that turns them into HTTP.

use crate::hsm::HsmError;

use super::model::Kid;

/// Why a key operation did not happen. Nothing was changed in any of these cases.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// A request value is wrong.
    #[error("{message}")]
    Invalid {
        /// Machine-readable code, e.g. `invalid_label`.
        code: &'static str,
        /// The field at fault, when there is one.
        field: Option<&'static str>,
        /// One clear sentence.
        message: String,
    },
    /// No key has this id.
    #[error("no key with id {0}")]
    NotFound(Kid),
    /// The key carries roles and the caller holds none of them.
    #[error("key {kid} may only be updated by a principal holding one of the roles: {roles}")]
    MissingRole {
        /// The key.
        kid: Kid,
        /// Its roles, comma-separated.
        roles: String,
    },
    /// CKA_MODIFIABLE is false on the key's objects.
    #[error("key {0} is not modifiable (CKA_MODIFIABLE is false); the token refuses changes")]
    NotModifiable(Kid),
    /// No key carries this label.
    #[error("no key has the label {0:?}")]
    NoSuchLabel(String),
    /// Several keys carry this label, so it names none of them.
    #[error("the label {label:?} is carried by several keys ({kids}); address one by its kid")]
    LabelAmbiguous {
        /// The label.
        label: String,
        /// The keys carrying it, comma-separated.
        kids: String,
    },
    /// With `keys.unique_labels`, another key has (or is being given) this label.
    #[error("the label {label:?} is taken (key {kid}); labels are unique on this host")]
    LabelTaken {
        /// The label.
        label: String,
        /// The key that has it.
        kid: Kid,
    },
    /// A key with this id exists already (a create that names its kid).
    #[error("a key with id {0} exists already")]
    KidTaken(Kid),
    /// CKA_DESTROYABLE is false on one of the key's objects.
    #[error("key {0} cannot be deleted: CKA_DESTROYABLE is false on its objects")]
    NotDestroyable(Kid),
    /// The token refused the write.
    #[error("the token refused the update of key {kid}: {source}")]
    HsmRefused {
        /// The key.
        kid: Kid,
        /// The PKCS#11 failure.
        source: HsmError,
    },
    /// The key's objects disagree; it can be read but not updated.
    #[error("key {kid} is in an inconsistent state: {reason}")]
    Inconsistent {
        /// The key.
        kid: Kid,
        /// What disagrees.
        reason: String,
    },
    /// `If-Match` named another version of the key.
    #[error("key {kid} has changed: its current etag is {current}")]
    PreconditionFailed {
        /// The key.
        kid: Kid,
        /// The current etag.
        current: String,
    },
    /// The token cannot be reached or answered with a device error.
    #[error("the token is unavailable: {0}")]
    Unavailable(HsmError),
    /// The caller's pre-write hook (the audit intent entry) failed, so nothing was written.
    #[error("the update could not be recorded before writing: {0}")]
    NotRecorded(String),
    /// A bug or an unexpected module answer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KeyError {
    /// A 400-class error on one field.
    pub fn invalid(code: &'static str, field: &'static str, message: impl Into<String>) -> Self {
        KeyError::Invalid {
            code,
            field: Some(field),
            message: message.into(),
        }
    }
}
