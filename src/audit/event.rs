//! The events an audit entry records: their `HSMKEYD_EVENT` names and fixed MESSAGE_IDs
//! (explained in `systemd/hsmkeyd.catalog`).

/// What an entry records. The names are the Encedo appliance's log event names where one
/// exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An update of a key's attributes was answered (OK, ERROR or FAILED).
    KeyAttributesChanged,
    /// An update is about to write to the token: written before the first write.
    KeyAttributesChangeIntent,
    /// A request to create a key was answered (OK, ERROR or FAILED).
    KeyCreated,
    /// A key is about to be generated: written before the first token write.
    KeyCreateIntent,
    /// A request to delete a key was answered (OK, ERROR or FAILED).
    KeyDeleted,
    /// A key is about to be destroyed: written before the first token write.
    KeyDeleteIntent,
    /// A request to mint a bearer token was answered (OK, ERROR or FAILED).
    TokenIssued,
    /// An Encedo login (`POST /api/auth/token`) issued a token (OK) or was malformed
    /// (ERROR); its refusals are [`Event::AuthFailed`] and [`Event::FailedScopeCheck`].
    AuthSuccessInternal,
    /// A known caller lacked the scope or role an operation needs (403).
    FailedScopeCheck,
    /// A caller could not be identified (401).
    AuthFailed,
    /// The daemon logged in to the token, or failed to.
    HsmLogin,
    /// The daemon is serving.
    DaemonStarted,
    /// A reload (SIGHUP) was applied (OK) or refused (FAILED, the old configuration stays).
    ConfigReloaded,
    /// The daemon stopped serving.
    DaemonStopped,
    /// The chain head, signed by the audit-signing key in the HSM.
    AuditCheckpoint,
    /// A batch update was answered (OK, ERROR or FAILED); each key's own entries carry the
    /// same `HSMKEYD_BATCH_ID`.
    KeysBatchChanged,
    /// The token went away under the daemon (FAILED), or another token is in its place
    /// (FAILED); key operations answer 503.
    TokenLost,
    /// The token came back and is served again without a restart (OK).
    TokenReturned,
}

impl Event {
    /// Every event, for the catalog check.
    pub const ALL: [Event; 18] = [
        Event::KeyAttributesChanged,
        Event::KeyAttributesChangeIntent,
        Event::KeyCreated,
        Event::KeyCreateIntent,
        Event::KeyDeleted,
        Event::KeyDeleteIntent,
        Event::TokenIssued,
        Event::AuthSuccessInternal,
        Event::FailedScopeCheck,
        Event::AuthFailed,
        Event::HsmLogin,
        Event::DaemonStarted,
        Event::ConfigReloaded,
        Event::DaemonStopped,
        Event::AuditCheckpoint,
        Event::KeysBatchChanged,
        Event::TokenLost,
        Event::TokenReturned,
    ];

    /// `HSMKEYD_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Event::KeyAttributesChanged => "KEY_ATTRIBUTES_CHANGED",
            Event::KeyAttributesChangeIntent => "KEY_ATTRIBUTES_CHANGE_INTENT",
            Event::KeyCreated => "KEY_CREATED",
            Event::KeyCreateIntent => "KEY_CREATE_INTENT",
            Event::KeyDeleted => "KEY_DELETED",
            Event::KeyDeleteIntent => "KEY_DELETE_INTENT",
            Event::TokenIssued => "TOKEN_ISSUED",
            Event::AuthSuccessInternal => "AUTH_SUCCESS_INTERNAL",
            Event::FailedScopeCheck => "FAILED_SCOPE_CHECK",
            Event::AuthFailed => "AUTH_FAILED",
            Event::HsmLogin => "HSM_LOGIN",
            Event::DaemonStarted => "DAEMON_STARTED",
            Event::ConfigReloaded => "CONFIG_RELOADED",
            Event::DaemonStopped => "DAEMON_STOPPED",
            Event::AuditCheckpoint => "AUDIT_CHECKPOINT",
            Event::KeysBatchChanged => "KEYS_BATCH_CHANGED",
            Event::TokenLost => "TOKEN_LOST",
            Event::TokenReturned => "TOKEN_RETURNED",
        }
    }

    /// The intent entry written before the token writes of a change recorded as `self`.
    pub fn intent(self) -> Option<Event> {
        match self {
            Event::KeyAttributesChanged => Some(Event::KeyAttributesChangeIntent),
            Event::KeyCreated => Some(Event::KeyCreateIntent),
            Event::KeyDeleted => Some(Event::KeyDeleteIntent),
            _ => None,
        }
    }

    /// `MESSAGE_ID`: fixed per event, never reused; `systemd/hsmkeyd.catalog` explains each.
    pub fn message_id(self) -> &'static str {
        match self {
            Event::KeyAttributesChanged => "f9bf139de14e405dba1878ce1516ee29",
            Event::KeyAttributesChangeIntent => "305f1301f3e743879cee23f22a200e04",
            Event::KeyCreated => "767cf75e666b431a94fbd42e1fe9adf3",
            Event::KeyCreateIntent => "56fdb14f9fa0462482fe5f0f5183f2b1",
            Event::KeyDeleted => "dbd2faf0830247cc8455704c833c7a1b",
            Event::KeyDeleteIntent => "8f3256d2508340329b5a8a5f5ac891f3",
            Event::TokenIssued => "3ddb88d0796940469831b8d9018ec3ed",
            Event::AuthSuccessInternal => "148f92c523db4563be63338ab71d89f9",
            Event::FailedScopeCheck => "a0c40bcc976346d3926164df90487c42",
            Event::AuthFailed => "97b9ffb830b142acbfcfcb9a55c3b00f",
            Event::HsmLogin => "da56916af73041a8b023081743995c61",
            Event::DaemonStarted => "a692b43d60d64dcbaaca6bb3e7973a66",
            Event::ConfigReloaded => "0a58dde6720542fc988bd5a9ba6ada33",
            Event::DaemonStopped => "d67dc6e9f1ff4de9b79a79e3f5a18642",
            Event::AuditCheckpoint => "b6817b9092514d7fb0d5c9256024351a",
            Event::KeysBatchChanged => "0df4529f6493fef21caaa9f7ca14cd5c",
            Event::TokenLost => "9098fd463bcb4c238f7d672811554a46",
            Event::TokenReturned => "085d745518ac47759288bd9c62c5f3d1",
        }
    }
}
