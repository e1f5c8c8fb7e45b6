//! How handlers change keys: the [`UpdateRequest`] extractor and [`run_change`], which
//! runs the domain call and its audit entries in a task of its own.

use std::sync::Arc;

use axum::response::Response;
use serde_json::json;

use super::audited::{self, AuditFacts, Caller, RequestFacts, RouteEvent, UpdateAudit};
use super::error::ApiError;
use super::AppState;
use crate::audit::Event;
use crate::auth::Principal;
use crate::keys::model::Kid;
use crate::keys::{Actor, FieldChange, KeyError, KeyPatch, KeyStore, UpdateOutcome};

/// What an updating handler hands [`update_key`]: the request, its caller and its route's
/// event. An extractor, so every updating route gets it the same way.
pub(super) struct UpdateRequest {
    pub(super) state: AppState,
    pub(super) principal: Arc<Principal>,
    pub(super) request: RequestFacts,
    pub(super) event: Event,
}

impl axum::extract::FromRequestParts<AppState> for UpdateRequest {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<UpdateRequest, ApiError> {
        let missing = |what: &str| ApiError::internal(&format!("an update without {what}"));
        let ext = &parts.extensions;
        Ok(UpdateRequest {
            state: state.clone(),
            principal: ext
                .get::<Arc<Principal>>()
                .cloned()
                .ok_or_else(|| missing("a principal"))?,
            request: ext
                .get::<RequestFacts>()
                .cloned()
                .ok_or_else(|| missing("request facts"))?,
            event: ext
                .get::<RouteEvent>()
                .map(|e| e.0)
                .ok_or_else(|| missing("a route event"))?,
        })
    }
}

/// The audit hook a change runs before its first token write.
pub(super) type IntentHook = Box<dyn FnOnce(&[FieldChange]) -> Result<(), String> + Send>;
/// The audit hook a change runs right after its token writes.
pub(super) type ResultHook = Box<dyn FnOnce(Result<&[FieldChange], &KeyError>) + Send>;

/// The one way a handler changes keys. Once the request has passed its checks the change
/// runs as its own task, not in the connection's future: token writes, rollback, the index
/// refresh and the audit entries all happen even if the client disconnects, and the key's
/// lock is held until the token work is over. `op` is the domain call, given the store,
/// the caller as an [`Actor`] and the two audit hooks; `map` turns domain errors into the
/// answer of the calling endpoint. The change records its own result entry, so `facts`
/// says so.
pub(super) async fn run_change<Op, Fut>(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &Kid,
    dry_run: bool,
    map: fn(KeyError) -> ApiError,
    op: Op,
) -> Result<UpdateOutcome, ApiError>
where
    Op: FnOnce(Arc<KeyStore>, Actor, IntentHook, ResultHook) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<UpdateOutcome, KeyError>> + Send + 'static,
{
    run_change_answering(u, facts, kid, dry_run, None, map, op).await
}

/// [`run_change`] for an endpoint whose success answers `success` rather than the usual
/// status of its event (the result entry records the status the client gets).
pub(super) async fn run_change_answering<Op, Fut>(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &Kid,
    dry_run: bool,
    success: Option<u16>,
    map: fn(KeyError) -> ApiError,
    op: Op,
) -> Result<UpdateOutcome, ApiError>
where
    Op: FnOnce(Arc<KeyStore>, Actor, IntentHook, ResultHook) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<UpdateOutcome, KeyError>> + Send + 'static,
{
    let actor = Actor {
        roles: u.principal.roles.clone(),
    };
    let record = UpdateAudit::new(
        u.state.audit.clone(),
        u.request.clone(),
        Caller {
            principal: u.principal.name.clone(),
            token_id: u.principal.token_id.clone(),
        },
        kid.to_string(),
        u.event,
        dry_run,
    );
    if let Some(status) = success {
        record.answers(status);
    }
    let keys = u.state.keys.clone();
    facts.recorded = true;
    let task = crate::blocking::spawn(&u.state.tasks, async move {
        let intent: IntentHook = Box::new(record.intent_hook());
        let result: ResultHook = Box::new(record.result_hook(map));
        let result = op(keys, actor, intent, result).await.map_err(map);
        record.finish(result).await
    });
    task.await
        .map_err(|e| ApiError::internal(&format!("update task failed: {e}")))?
}

/// An update of one key's attributes through [`run_change`].
pub(super) async fn update_key(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &Kid,
    patch: KeyPatch,
    dry_run: bool,
    map: fn(KeyError) -> ApiError,
) -> Result<UpdateOutcome, ApiError> {
    let target = kid.clone();
    run_change(
        u,
        facts,
        kid,
        dry_run,
        map,
        move |keys, actor, intent, result| async move {
            keys.update(&target, patch, &actor, dry_run, intent, result)
                .await
        },
    )
    .await
}

/// The answer of a dry run: the key as it would be, and each change with its values.
pub(super) fn dry_run_reply(outcome: &UpdateOutcome) -> Response {
    let changed: Vec<&str> = outcome.changes.iter().map(|c| c.field.name()).collect();
    super::reply::reply(json!({
        "dry_run": true,
        "key": outcome.key,
        "changed": changed,
        "changes": audited::changes_json(&outcome.changes),
    }))
}
