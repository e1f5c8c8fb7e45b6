//! The one place requests meet the audit trail: every request gets an id (`X-Request-Id`),
//! and every key update, every 401 and every 403 gets exactly one result entry, written
//! before the answer leaves. If that entry cannot be written the answer becomes 503
//! `audit_unavailable`, except for an update already committed to the token, whose intent
//! entry records it (the answer stays 200 and the failure goes to the log).
//!
//! Handlers tell this layer what they learned through the request's [`AuditNote`]. An
//! update writes its own result entry ([`finish_update`]) from the task it runs in, so the
//! entry is written even when the client has gone; this layer then only adds `audit_id`.

use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::audit::aggregate::Verdict;
use crate::audit::{caller, describe_changes, unix_peer, Auditor, Entry, Event, Outcome};
use crate::auth::{Peer, TlsPeer};
use crate::keys::{FieldChange, KeyError, UpdateOutcome};

/// Header carrying the request id on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Audited answers are JSON of a few KiB at most; anything larger is not ours to rewrite.
const MAX_AUDITED_BODY: usize = 1 << 20;
/// Longest request path copied into an entry.
const MAX_PATH_IN_ENTRY: usize = 256;

/// The request's id: 128 random bits, lowercase hex.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The mutating operations that are audited whatever their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    KeyUpdate,
    TokenMint,
}

/// What the handlers learned about a request, for its audit entry.
#[derive(Debug, Default, Clone)]
pub struct Note {
    principal: Option<String>,
    token_id: Option<String>,
    action: Option<Action>,
    kid: Option<String>,
    changes: Option<Value>,
    committed: bool,
    intent_failed: bool,
    /// The result entry was written (by an update task), so this layer writes none.
    recorded: bool,
    /// Writing that result entry failed.
    record_failed: bool,
    /// `HSMKEYD_PEER` of the connection.
    peer: Option<String>,
    /// Method and path (`HSMKEYD_REQUEST`).
    request: String,
}

/// Shared between this layer and the handlers of one request.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Note>>);

impl AuditNote {
    fn with<T>(&self, f: impl FnOnce(&mut Note) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller was identified as this principal (by this token, on TLS).
    pub fn principal(&self, name: &str, token_id: Option<&str>) {
        self.with(|n| {
            n.principal = Some(name.to_string());
            n.token_id = token_id.map(str::to_string);
        });
    }

    /// This request is an update of a key's attributes (`kid` once it parsed).
    pub fn update(&self, kid: Option<&str>) {
        self.with(|n| {
            n.action = Some(Action::KeyUpdate);
            n.kid = kid.map(str::to_string);
        });
    }

    /// This request asks for a bearer token.
    pub fn mint(&self) {
        self.with(|n| n.action = Some(Action::TokenMint));
    }

    /// A token with this `jti` is about to be handed out (if its entry is written).
    pub fn minted(&self, jti: &str) {
        self.with(|n| n.token_id = Some(jti.to_string()));
    }

    /// The update wrote these changes to the token.
    pub fn committed(&self, changes: &[FieldChange]) {
        self.with(|n| {
            n.changes = Some(changes_json(changes));
            n.committed = !changes.is_empty();
        });
    }
}

/// The answer a result entry describes.
struct Answer<'a> {
    status: u16,
    error: Option<&'a str>,
    reason: &'a str,
}

impl<'a> Answer<'a> {
    /// 200, or the status and code of `error`.
    fn of(error: Option<&'a ApiError>) -> Answer<'a> {
        match error {
            None => Answer {
                status: 200,
                error: None,
                reason: "",
            },
            Some(e) => Answer {
                status: e.status.as_u16(),
                error: Some(e.code),
                reason: &e.message,
            },
        }
    }
}

/// The result event of a request with this note and status, if it gets one.
fn event_of(n: &Note, status: u16) -> Option<Event> {
    if n.intent_failed || n.recorded {
        None
    } else if status == 401 {
        Some(Event::AuthFailed)
    } else if status == 403 {
        Some(Event::FailedScopeCheck)
    } else {
        match n.action {
            Some(Action::KeyUpdate) => Some(Event::KeyAttributesChanged),
            Some(Action::TokenMint) => Some(Event::TokenIssued),
            None => None,
        }
    }
}

/// The one builder of result entries, from what the request learned and how it was answered.
fn result_entry(n: &Note, rid: &RequestId, event: Event, a: &Answer<'_>) -> Entry {
    let (status, reason, request) = (a.status, a.reason, &n.request);
    let error = a.error;
    // As the Encedo appliance logs them: a failed scope check (and a failed
    // authentication) has result FAILED.
    let outcome = match event {
        Event::AuthFailed | Event::FailedScopeCheck => Outcome::Failed,
        _ => Outcome::of_status(status),
    };
    let who = caller(n.principal.as_deref(), n.peer.as_deref());
    let key = n.kid.as_deref().unwrap_or("?");
    let message = match (event, outcome) {
        (Event::AuthFailed, _) => format!("{request} from {who} refused: {reason}"),
        (Event::FailedScopeCheck, _) => format!("{request} by {who} refused: {reason}"),
        (Event::TokenIssued, Outcome::Ok) => format!(
            "token {} issued to {who}: OK",
            n.token_id.as_deref().unwrap_or("?")
        ),
        (Event::TokenIssued, o) => format!(
            "token request by {who} refused ({status} {}): {reason}: {}",
            error.unwrap_or("error"),
            o.name()
        ),
        (_, Outcome::Ok) => match n
            .changes
            .as_ref()
            .filter(|c| c.as_object().is_some_and(|o| !o.is_empty()))
        {
            Some(c) => format!("key {key}: {} by {who}: OK", describe_changes(c)),
            None => format!("key {key}: update by {who} changed nothing: OK"),
        },
        (_, o) => format!(
            "key {key}: update by {who} refused ({status} {}): {reason}: {}",
            error.unwrap_or("error"),
            o.name()
        ),
    };
    let mut entry = Entry::new(event, outcome, message);
    entry.status = Some(status);
    entry.kid = n.kid.clone();
    entry.principal = n.principal.clone();
    entry.peer = n.peer.clone();
    entry.token_id = n.token_id.clone();
    entry.request_id = Some(rid.0.clone());
    entry.error = error.map(str::to_string);
    entry.changes = n.changes.clone();
    entry.request = Some(request.clone());
    entry
}

/// Ends an update: writes its result entry and returns what the client is to be answered.
/// Runs inside the update's own task, so a client that goes away cannot stop it. A change
/// that was committed stays answered 200 if the entry cannot be written (its intent entry
/// records it); anything else becomes 503 `audit_unavailable`.
pub async fn finish_update(
    audit: &Arc<Auditor>,
    note: &AuditNote,
    rid: &RequestId,
    result: Result<UpdateOutcome, ApiError>,
) -> Result<UpdateOutcome, ApiError> {
    if let Ok(o) = &result {
        note.committed(&o.changes);
    }
    let n = note.with(|n| {
        let snapshot = n.clone();
        n.recorded = true;
        snapshot
    });
    if n.recorded {
        // Written by the result hook, next to the token writes; a committed change keeps
        // its 200 (its intent entry records it), anything else is refused.
        if n.record_failed && !n.committed {
            return Err(ApiError::audit_unavailable());
        }
        return result;
    }
    let answer = Answer::of(result.as_ref().err());
    let Some(event) = event_of(&n, answer.status) else {
        return result;
    };
    let entry = result_entry(&n, rid, event, &answer);
    match audit.write_async(entry).await {
        Ok(()) => result,
        Err(e) if n.committed => {
            tracing::error!(request_id = %rid.0, error = %e,
                "the result entry of a committed update was not recorded; its intent entry \
                 records the change");
            result
        }
        Err(e) => {
            tracing::error!(request_id = %rid.0, error = %e, "audit entry not recorded; refusing");
            Err(ApiError::audit_unavailable())
        }
    }
}

/// `HSMKEYD_CHANGES`: field -> {"before", "after"}.
pub fn changes_json(changes: &[FieldChange]) -> Value {
    Value::Object(
        changes
            .iter()
            .map(|c| {
                (
                    c.field.to_string(),
                    serde_json::json!({"before": c.before, "after": c.after}),
                )
            })
            .collect(),
    )
}

/// The hook an update runs before its first token write: the intent entry.
pub fn intent_hook(
    audit: Arc<Auditor>,
    note: AuditNote,
    rid: RequestId,
) -> impl FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static {
    move |changes| {
        let (principal, kid, token_id, peer) = note.with(|n| {
            (
                n.principal.clone(),
                n.kid.clone(),
                n.token_id.clone(),
                n.peer.clone(),
            )
        });
        let changes = changes_json(changes);
        let mut e = Entry::new(
            Event::KeyAttributesChangeIntent,
            Outcome::Pending,
            format!(
                "key {}: about to change {} for {}",
                kid.as_deref().unwrap_or("?"),
                describe_changes(&changes),
                caller(principal.as_deref(), peer.as_deref())
            ),
        );
        e.kid = kid;
        e.principal = principal;
        e.peer = peer;
        e.token_id = token_id;
        e.request_id = Some(rid.0);
        e.changes = Some(changes.clone());
        note.with(|n| n.changes = Some(changes));
        audit.write(&e).map_err(|err| {
            note.with(|n| n.intent_failed = true);
            err.to_string()
        })
    }
}

/// The hook an update runs right after its token writes, on the same blocking thread: the
/// result entry, written there so the answer does not wait for another thread. `map` is the
/// endpoint's error mapping, so the entry records the status the client gets.
pub fn result_hook(
    audit: Arc<Auditor>,
    note: AuditNote,
    rid: RequestId,
    map: fn(KeyError) -> ApiError,
) -> impl FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static {
    move |outcome| {
        if let Ok(changes) = outcome {
            note.committed(changes);
        }
        let n = note.with(|n| n.clone());
        let mapped = outcome.err().map(|e| map(e.clone()));
        let answer = Answer::of(mapped.as_ref());
        let Some(event) = event_of(&n, answer.status) else {
            return;
        };
        let written = audit.write(&result_entry(&n, &rid, event, &answer));
        if let Err(e) = &written {
            tracing::error!(request_id = %rid.0, error = %e, committed = n.committed,
                "the result entry of an update was not recorded");
        }
        note.with(|n| {
            n.recorded = true;
            n.record_failed = written.is_err();
        });
    }
}

/// The middleware: request id in, result entry out.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let rid = RequestId(format!("{:032x}", rand::random::<u128>()));
    let note = AuditNote::default();
    note.with(|n| {
        n.peer = peer_of(&req);
        n.request = format!("{} {}", req.method(), truncate(req.uri().path()));
    });
    let _ = req.extensions_mut().insert(rid.clone());
    let _ = req.extensions_mut().insert(note.clone());

    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let n = note.with(std::mem::take);
    let event = event_of(&n, status);
    if event.is_none() && !(n.recorded && n.action.is_some()) {
        return with_request_id(resp, &rid);
    }

    let (parts, body) = resp.into_parts();
    let bytes = to_bytes(body, MAX_AUDITED_BODY).await.unwrap_or_default();
    let mut json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let Some(event) = event {
        let error = json["error"].as_str().map(str::to_string);
        let reason = json["message"].as_str().unwrap_or("").to_string();
        // An unidentified caller's refusals are summed up per peer (see audit::aggregate).
        let counted = match (&state.audit.refusals, event, &n.principal, &n.peer) {
            (Some(r), Event::AuthFailed, None, Some(peer)) => {
                r.refused(peer, &reason) == Verdict::Counted
            }
            _ => false,
        };
        if counted {
            let resp = Response::from_parts(parts, Body::from(bytes));
            return with_request_id(resp, &rid);
        }
        let answer = Answer {
            status,
            error: error.as_deref(),
            reason: &reason,
        };
        let entry = result_entry(&n, &rid, event, &answer);
        if let Err(e) = state.audit.write_async(entry).await {
            if n.committed {
                tracing::error!(request_id = %rid.0, error = %e,
                    "the result entry of a committed update was not recorded; its intent entry \
                     records the change");
            } else {
                tracing::error!(request_id = %rid.0, error = %e, "audit entry not recorded; refusing");
                return with_request_id(ApiError::audit_unavailable().into_response(), &rid);
            }
        }
    }
    let body = match json.as_object_mut().filter(|_| n.action.is_some()) {
        Some(obj) => {
            let _ = obj.insert("audit_id".into(), Value::String(rid.0.clone()));
            Body::from(serde_json::to_vec(&json).unwrap_or_else(|_| bytes.to_vec()))
        }
        None => Body::from(bytes),
    };
    let mut resp = Response::from_parts(parts, body);
    let _ = resp
        .headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    with_request_id(resp, &rid)
}

/// `HSMKEYD_PEER` of the request's connection.
pub fn peer_of<B>(req: &axum::http::Request<B>) -> Option<String> {
    if let Some(p) = req.extensions().get::<Peer>() {
        return Some(unix_peer(p));
    }
    req.extensions()
        .get::<TlsPeer>()
        .map(|t| t.addr.to_string())
}

fn with_request_id(mut resp: Response, rid: &RequestId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&rid.0) {
        let _ = resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

fn truncate(path: &str) -> &str {
    match path.char_indices().nth(MAX_PATH_IN_ENTRY) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}
