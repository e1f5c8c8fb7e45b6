//! The one place requests meet the audit trail: every request gets an id (`X-Request-Id`),
//! and every answer of a changing route, every 401 and every 403 gets exactly one result
//! entry, written before the answer leaves. If that entry cannot be written the answer
//! becomes 503 `audit_unavailable`, except for an update already committed to the token,
//! whose intent entry records it (the answer stays 200 and the failure goes to the log).
//!
//! Nothing here depends on handler discipline. Facts travel typed, in the response:
//! - a changing route declares its [`Event`] where it is registered ([`RouteEvent`], added
//!   by `api::change`), so every answer it gives, errors included, is recorded;
//! - an error carries its [`ApiError`] (code, message, outcome, kind of refusal);
//! - the authentication step adds the [`Caller`];
//! - a handler that learned more (the kid, a minted token's id) returns [`AuditFacts`]
//!   with its result ([`Audited`]); a success body is a [`super::reply::Reply`] this
//!   layer renders, so `audit_id` is added without re-parsing anything.
//!
//! An update writes its own entries from the task it runs in ([`UpdateAudit`]), so they are
//! written even when the client has gone; this layer then only adds `audit_id`.

use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::{ApiError, Refusal};
use super::AppState;
use crate::audit::aggregate::Verdict;
use crate::audit::{caller, unix_peer, Auditor, Changes, Entry, Event, Outcome};
use crate::auth::{Peer, TlsPeer};
use crate::keys::{FieldChange, KeyError, UpdateOutcome};
use crate::sync;

/// Header carrying the request id on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request path copied into an entry.
const MAX_PATH_IN_ENTRY: usize = 256;

/// The request's id: 128 random bits, lowercase hex.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What is known of a request before any handler runs; in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// The request's id.
    pub rid: RequestId,
    /// `HSMKEYD_PEER` of the connection.
    pub(super) peer: Option<String>,
    /// Method and path (`HSMKEYD_REQUEST`).
    pub(super) request: String,
}

/// Who called, as authentication found it. The authentication step adds it to the
/// response's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal.
    pub principal: String,
    /// The `jti` of the bearer token presented, on TLS.
    pub token_id: Option<String>,
}

/// The event a changing route records, declared where the route is registered.
#[derive(Debug, Clone, Copy)]
pub struct RouteEvent(pub Event);

/// What an audited handler learned, returned with its result.
#[derive(Debug, Default, Clone)]
pub struct AuditFacts {
    /// The key concerned, once it parsed.
    pub kid: Option<String>,
    /// A minted token's `jti`.
    pub token_id: Option<String>,
    /// The result entry was written where the work ran (an update's own task), or must
    /// not be (its intent entry was refused): this layer writes none.
    pub recorded: bool,
}

/// A handler's result with what it learned for the audit trail.
pub struct Audited(pub AuditFacts, pub Result<Response, ApiError>);

impl IntoResponse for Audited {
    fn into_response(self) -> Response {
        let Audited(facts, result) = self;
        let mut r = match result {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let _ = r.extensions_mut().insert(facts);
        r
    }
}

/// What one result entry is built from.
struct Record<'a> {
    request: &'a RequestFacts,
    caller: Option<&'a Caller>,
    kid: Option<&'a str>,
    token_id: Option<&'a str>,
    changes: Option<Changes>,
    error: Option<&'a ApiError>,
    /// The status of the answer when it is a success.
    success: u16,
}

/// The one builder of result entries.
fn result_entry(event: Event, r: Record<'_>) -> Entry {
    let status = r.error.map_or(r.success, ApiError::status);
    let code = r.error.map(ApiError::code);
    let reason = r.error.map_or("", ApiError::message);
    let request = &r.request.request;
    // As the Encedo appliance logs them: a failed scope check (and a failed
    // authentication) has result FAILED.
    let outcome = match event {
        Event::AuthFailed | Event::FailedScopeCheck => Outcome::Failed,
        _ => r.error.map_or(Outcome::Ok, ApiError::outcome),
    };
    let principal = r.caller.map(|c| c.principal.as_str());
    let who = caller(principal, r.request.peer.as_deref());
    let token_id = r.token_id.or(r.caller.and_then(|c| c.token_id.as_deref()));
    let key = r.kid.unwrap_or("?");
    let message = match (event, outcome) {
        (Event::AuthFailed, _) => format!("{request} from {who} refused: {reason}"),
        (Event::FailedScopeCheck, _) => format!("{request} by {who} refused: {reason}"),
        (Event::TokenIssued, Outcome::Ok) => {
            format!("token {} issued to {who}: OK", token_id.unwrap_or("?"))
        }
        (Event::TokenIssued, o) => format!(
            "token request by {who} refused ({status} {}): {reason}: {}",
            code.unwrap_or("error"),
            o.name()
        ),
        (Event::AuthSuccessInternal, Outcome::Ok) => format!(
            "login of {who}: token {} issued: OK",
            token_id.unwrap_or("?")
        ),
        (Event::AuthSuccessInternal, o) => format!(
            "login from {who} refused ({status} {}): {reason}: {}",
            code.unwrap_or("error"),
            o.name()
        ),
        (Event::KeyCreated, Outcome::Ok) => format!("key {key}: created by {who}: OK"),
        (Event::KeyDeleted, Outcome::Ok) => format!("key {key}: deleted by {who}: OK"),
        (Event::KeysBatchChanged, o) => format!(
            "batch update by {who} refused ({status} {}): {reason}: {}",
            code.unwrap_or("error"),
            o.name()
        ),
        (Event::KeyCreated | Event::KeyDeleted, o) => format!(
            "key {key}: {} by {who} refused ({status} {}): {reason}: {}",
            if event == Event::KeyCreated {
                "create"
            } else {
                "delete"
            },
            code.unwrap_or("error"),
            o.name()
        ),
        (_, Outcome::Ok) => match r.changes.as_ref().filter(|c| !c.is_empty()) {
            Some(c) => format!("key {key}: {} by {who}: OK", c.words()),
            None => format!("key {key}: update by {who} changed nothing: OK"),
        },
        (_, o) => format!(
            "key {key}: update by {who} refused ({status} {}): {reason}: {}",
            code.unwrap_or("error"),
            o.name()
        ),
    };
    let mut entry = Entry::new(event, outcome, message);
    entry.status = Some(status);
    entry.kid = r.kid.map(str::to_string);
    entry.principal = principal.map(str::to_string);
    entry.peer = r.request.peer.clone();
    entry.token_id = token_id.map(str::to_string);
    entry.request_id = Some(r.request.rid.0.clone());
    entry.error = code.map(str::to_string);
    entry.changes = r.changes;
    entry.request = Some(request.clone());
    entry
}

/// Where a list of changes lies in memory: the hooks of one change get the same list.
fn whereabouts(list: &[FieldChange]) -> (usize, usize) {
    (list.as_ptr() as usize, list.len())
}

/// `HSMKEYD_CHANGES`: field -> {"before", "after"}.
pub fn changes_json(changes: &[FieldChange]) -> Value {
    Value::Object(
        changes
            .iter()
            .map(|c| {
                (
                    c.field.name().to_string(),
                    serde_json::json!({"before": c.before, "after": c.after}),
                )
            })
            .collect(),
    )
}

/// The status a change recorded as `event` answers when it succeeds.
fn success_status(event: Event) -> u16 {
    match event {
        Event::KeyCreated => 201,
        Event::KeyDeleted => 204,
        _ => 200,
    }
}

/// The audit side of one update, carried into the task the update runs in: its intent
/// entry before the first token write, its result entry right after the last (on the same
/// blocking thread, so the answer does not wait for another), or, when the update stopped
/// before writing, at its end.
pub struct UpdateAudit {
    audit: Arc<Auditor>,
    request: RequestFacts,
    caller: Caller,
    kid: String,
    event: Event,
    /// A dry run: checked and answered, nothing written; its one entry says so.
    dry_run: bool,
    /// The planned changes, once the intent entry was written, and where the list they
    /// were rendered from lies (the result hook renders them again unless it gets that
    /// very list).
    planned: Mutex<Option<(Changes, (usize, usize))>>,
    /// Set by the intent hook when journald refused the intent entry.
    intent_refused: OnceLock<()>,
    /// Set by the result hook: whether its entry was written.
    written: OnceLock<bool>,
    /// The status a success answers, when the endpoint's differs from the event's usual one.
    success: OnceLock<u16>,
    /// The batch the update is part of, and whether it sets a key back after the batch
    /// failed ([`UpdateAudit::in_batch`]).
    batch: OnceLock<(String, bool)>,
}

impl UpdateAudit {
    /// The audit side of an update of `kid` by `caller`, recorded as `event`.
    pub fn new(
        audit: Arc<Auditor>,
        request: RequestFacts,
        caller: Caller,
        kid: String,
        event: Event,
        dry_run: bool,
    ) -> Arc<UpdateAudit> {
        Arc::new(UpdateAudit {
            audit,
            request,
            caller,
            kid,
            event,
            dry_run,
            planned: Mutex::new(None),
            intent_refused: OnceLock::new(),
            written: OnceLock::new(),
            success: OnceLock::new(),
            batch: OnceLock::new(),
        })
    }

    /// Records a success as answering `status` (the Encedo create and delete answer 200
    /// where `/v1` answers 201 and 204).
    pub fn answers(&self, status: u16) {
        let _ = self.success.set(status);
    }

    /// Marks the update's entries as part of batch `id` (`HSMKEYD_BATCH_ID`); a `rollback`
    /// sets a key back after the batch failed, and its messages say so.
    pub fn in_batch(&self, id: &str, rollback: bool) {
        let _ = self.batch.set((id.to_string(), rollback));
    }

    /// Adds the batch id, and says so in the message of a rollback.
    fn mark_batch(&self, entry: &mut Entry) {
        if let Some((id, rollback)) = self.batch.get() {
            entry.batch_id = Some(id.clone());
            if *rollback {
                entry.message = format!("rollback of batch {id}: {}", entry.message);
            }
        }
    }

    fn record(&self, changes: Option<Changes>, error: Option<&ApiError>) -> Entry {
        let mut entry = result_entry(
            self.event,
            Record {
                request: &self.request,
                caller: Some(&self.caller),
                kid: Some(&self.kid),
                token_id: None,
                changes,
                error,
                success: if self.dry_run {
                    200
                } else {
                    self.success
                        .get()
                        .copied()
                        .unwrap_or_else(|| success_status(self.event))
                },
            },
        );
        if self.dry_run {
            entry.dry_run = true;
            entry.message = format!("dry run: {}", entry.message);
        }
        self.mark_batch(&mut entry);
        entry
    }

    fn planned(&self) -> Option<Changes> {
        sync::lock(&self.planned).as_ref().map(|(c, _)| c.clone())
    }

    /// The planned changes if `list` is the list they were rendered from, else `list`'s.
    fn rendered(&self, list: &[FieldChange]) -> Changes {
        match sync::lock(&self.planned).as_ref() {
            Some((c, at)) if *at == whereabouts(list) => c.clone(),
            _ => Changes::new(&changes_json(list)),
        }
    }

    /// The hook an update runs before its first token write: the intent entry. An error
    /// stops the update before anything is written.
    pub fn intent_hook(
        self: &Arc<Self>,
    ) -> impl FnOnce(&[FieldChange]) -> Result<(), String> + Send + 'static {
        let this = self.clone();
        move |list| {
            let changes = Changes::new(&changes_json(list));
            let who = caller(Some(&this.caller.principal), this.request.peer.as_deref());
            let what = match this.event {
                Event::KeyCreated => "create".to_string(),
                Event::KeyDeleted => "delete".to_string(),
                _ => format!("change {}", changes.words()),
            };
            let intent = this
                .event
                .intent()
                .unwrap_or(Event::KeyAttributesChangeIntent);
            let mut e = Entry::new(
                intent,
                Outcome::Pending,
                format!("key {}: about to {what} for {who}", this.kid),
            );
            e.kid = Some(this.kid.clone());
            e.principal = Some(this.caller.principal.clone());
            e.peer = this.request.peer.clone();
            e.token_id = this.caller.token_id.clone();
            e.request_id = Some(this.request.rid.0.clone());
            e.changes = Some(changes.clone());
            this.mark_batch(&mut e);
            *sync::lock(&this.planned) = Some((changes, whereabouts(list)));
            this.audit.write(&e).map_err(|err| {
                let _ = this.intent_refused.set(());
                err.to_string()
            })
        }
    }

    /// The hook an update runs right after its token writes: the result entry. `map` is
    /// the endpoint's error mapping, so the entry records the status the client gets.
    pub fn result_hook(
        self: &Arc<Self>,
        map: fn(KeyError) -> ApiError,
    ) -> impl FnOnce(Result<&[FieldChange], &KeyError>) + Send + 'static {
        let this = self.clone();
        move |outcome| {
            let mapped = outcome.err().map(|e| map(e.clone()));
            let changes = match outcome {
                Ok(changes) => Some(this.rendered(changes)),
                Err(_) => this.planned(),
            };
            let written = this.audit.write(&this.record(changes, mapped.as_ref()));
            if let Err(e) = &written {
                tracing::error!(request_id = %this.request.rid.0, error = %e,
                    committed = outcome.is_ok_and(|c| !c.is_empty()),
                    "the result entry of an update was not recorded");
            }
            let _ = this.written.set(written.is_ok());
        }
    }

    /// Ends an update: writes its result entry if the hooks did not, and returns what the
    /// client is to be answered. A change that was committed stays answered 200 if its
    /// entry could not be written (its intent entry records it); anything else becomes
    /// 503 `audit_unavailable`.
    pub async fn finish(
        &self,
        result: Result<UpdateOutcome, ApiError>,
    ) -> Result<UpdateOutcome, ApiError> {
        let committed = result.as_ref().is_ok_and(|o| !o.changes.is_empty());
        if let Some(&written) = self.written.get() {
            return if written || committed {
                result
            } else {
                Err(ApiError::audit_unavailable())
            };
        }
        if self.intent_refused.get().is_some() {
            return result;
        }
        let changes = match &result {
            Ok(o) => Some(Changes::new(&changes_json(&o.changes))),
            Err(_) => self.planned(),
        };
        let entry = self.record(changes, result.as_ref().err());
        match self.audit.write_async(entry).await {
            Ok(()) => result,
            Err(e) => {
                tracing::error!(request_id = %self.request.rid.0, error = %e,
                    "audit entry not recorded; refusing");
                Err(ApiError::audit_unavailable())
            }
        }
    }
}

/// The middleware: request id in, result entry out.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let facts = RequestFacts {
        rid: RequestId(format!("{:032x}", rand::random::<u128>())),
        peer: peer_of(&req),
        request: format!("{} {}", req.method(), truncate(req.uri().path())),
    };
    let _ = req.extensions_mut().insert(facts.clone());

    let mut resp = next.run(req).await;
    let ext = resp.extensions_mut();
    let route = ext.remove::<RouteEvent>();
    let learned = ext.remove::<AuditFacts>().unwrap_or_default();
    let who = ext.remove::<Caller>();
    let error = ext.remove::<ApiError>();
    let event = match error.as_ref().map(ApiError::refusal) {
        _ if learned.recorded => None,
        Some(Refusal::Unauthenticated) => Some(Event::AuthFailed),
        Some(Refusal::Forbidden) => Some(Event::FailedScopeCheck),
        _ => route.map(|r| r.0),
    };
    let rid = &facts.rid;
    if let Some(event) = event {
        let reason = error.as_ref().map_or("", ApiError::message);
        // An unidentified caller's refusals are summed up per peer (see audit::aggregate),
        // except a refused login: each is recorded (the login's throttle bounds them).
        let login = route.is_some_and(|r| r.0 == Event::AuthSuccessInternal);
        let counted = match (&state.audit.refusals, event, &who, &facts.peer) {
            (Some(r), Event::AuthFailed, None, Some(peer)) if !login => {
                r.refused(peer, reason) == Verdict::Counted
            }
            _ => false,
        };
        if !counted {
            let entry = result_entry(
                event,
                Record {
                    request: &facts,
                    caller: who.as_ref(),
                    kid: learned.kid.as_deref(),
                    token_id: learned.token_id.as_deref(),
                    changes: None,
                    error: error.as_ref(),
                    success: resp.status().as_u16(),
                },
            );
            if let Err(e) = state.audit.write_async(entry).await {
                tracing::error!(request_id = %rid.0, error = %e, "audit entry not recorded; refusing");
                let refused = ApiError::audit_unavailable().into_response();
                return with_request_id(refused, rid);
            }
        }
    }
    let audit_id = route.is_some().then_some(rid.0.as_str());
    with_request_id(super::reply::render(resp, error.as_ref(), audit_id), rid)
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
