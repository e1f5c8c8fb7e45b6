//! The HTTP API: routes, request shapes and responses. Handlers parse and check the request,
//! call the key domain, and return its results; [`error`] is the one place that maps errors
//! to status codes.
//!
//! Routes (both front doors serve the same router):
//! - `GET /v1/keys` (scope `keymgmt:list`): paged listing with `limit`, `cursor`, `label`,
//!   `label_prefix`.
//! - `GET /v1/keys/{kid}` (scope `keymgmt:get`): one key, with an `ETag`.
//! - `PATCH /v1/keys/{kid}` (scope `keymgmt:upd` or `keymgmt:upd:<kid>`): label,
//!   description, roles; honours `If-Match`.
//! - `GET /v1/status` (scope `keymgmt:list`): the token, key count, objects the scan could
//!   not read, the background worker's backlog.
//! - `POST /api/keymgmt/update`, `GET /api/keymgmt/list/{offset}/{limit}`,
//!   `GET /api/keymgmt/get/{kid}`: the Encedo HEM-compatible endpoints ([`encedo`]).
//!
//! May call: `auth`, `keys`. Called by: `front`.

pub mod audited;
pub mod body;
pub mod deadline;
pub mod encedo;
pub mod error;
mod tokens;

use std::sync::{Arc, RwLock};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::audit::Auditor;
use crate::auth::jwt::TokenService;
use crate::auth::scope::Scope;
use crate::auth::{ConnectionSlot, Peer, Principal, Principals, TlsPeer};
use crate::keys::model::{KeyView, Kid, RoleName};
use crate::keys::{Actor, KeyError, KeyPatch, KeyStore, UpdateOutcome};
use audited::{AuditNote, RequestId};
use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The key store.
    pub keys: Arc<KeyStore>,
    /// The audit trail.
    pub audit: Arc<Auditor>,
    /// What a reload replaces, swapped as one.
    pub live: Arc<RwLock<Arc<Live>>>,
    /// Work that must finish whatever the client does (updates); shutdown waits for it.
    pub tasks: TaskTracker,
    /// Deadline and minimum rate of request bodies.
    pub body_limits: deadline::BodyLimits,
}

/// The parts of the configuration a reload replaces. Requests take a snapshot when they
/// start, so one in flight finishes on the configuration it began with.
pub struct Live {
    /// The principals of the Unix socket.
    pub principals: Principals,
    /// Bearer tokens: minting and verification.
    pub tokens: Arc<TokenService>,
    /// Role names of the configuration (roles in tokens are limited to these).
    pub roles: Vec<RoleName>,
}

impl AppState {
    /// The current configuration snapshot.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Builds the router. The listener must put the connection's [`Peer`] into each request's
/// extensions.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/keys", get(list_keys))
        .route("/v1/keys/{kid}", get(get_key).patch(patch_key))
        .route("/v1/auth/token", post(tokens::mint))
        .route("/v1/auth/jwks", get(tokens::jwks))
        .route("/v1/status", get(status))
        .route("/api/keymgmt/update", post(encedo::update))
        .route("/api/keymgmt/list/{offset}/{limit}", get(encedo::list))
        .route("/api/keymgmt/get/{kid}", get(encedo::get))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            deadline::layer,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audited::layer,
        ))
        .with_state(state)
}

/// Resolves the caller before any handler runs: by peer credentials on the Unix socket,
/// by bearer token on TLS. Unknown callers get 401 whatever the path; only the JWK set is
/// public.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Requests name a path (origin form); `GET http://host/path` is a proxy's form.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return ApiError::bad_request(
            "absolute_uri",
            "request targets must be a path such as /v1/keys, not an absolute URI",
        )
        .into_response();
    }
    if req.method() == Method::GET && req.uri().path() == tokens::JWKS_PATH {
        return next.run(req).await;
    }
    let live = state.live();
    if req.extensions().get::<TlsPeer>().is_some() {
        let principal = match bearer(req.headers()) {
            None => return ApiError::token_missing().into_response(),
            Some(token) => match live.tokens.verify(token, &live.roles) {
                Ok(p) => Arc::new(p),
                Err(e) => return ApiError::invalid_token(e.to_string()).into_response(),
            },
        };
        if let Some(note) = req.extensions().get::<AuditNote>() {
            note.principal(&principal.name, principal.token_id.as_deref());
        }
        if let Err(e) = admit(&req, &principal.name) {
            return e.into_response();
        }
        let _ = req.extensions_mut().insert(principal);
        return next.run(req).await;
    }
    let Some(peer) = req.extensions().get::<Peer>().copied() else {
        return ApiError::unauthenticated("the connection carries no peer credentials")
            .into_response();
    };
    match live.principals.resolve(&peer) {
        Some(p) => {
            if let Some(note) = req.extensions().get::<AuditNote>() {
                note.principal(&p.name, None);
            }
            if let Err(e) = admit(&req, &p.name) {
                return e.into_response();
            }
            let _ = req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => {
            tracing::warn!(%peer, "refused a caller that maps to no principal");
            ApiError::unauthenticated(format!(
                "uid {} / gid {} maps to no principal in the configuration",
                peer.uid, peer.gid
            ))
            .into_response()
        }
    }
}

/// Counts the request's connection against its caller's connection budget.
fn admit(req: &Request, principal: &str) -> Result<(), ApiError> {
    match req.extensions().get::<ConnectionSlot>() {
        Some(slot) => slot.0.admit(principal).map_err(|why| {
            tracing::warn!(principal, reason = %why, "refused a connection over its caller's budget");
            ApiError::too_many_connections(why)
        }),
        None => Ok(()),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn require(p: &Principal, scope: Scope) -> Result<(), ApiError> {
    if p.has(&scope) {
        Ok(())
    } else {
        Err(ApiError::missing_scope(&scope.to_string()))
    }
}

/// 403 unless the principal may update this key (`keymgmt:upd` or `keymgmt:upd:<kid>`).
fn require_update(p: &Principal, kid: &Kid) -> Result<(), ApiError> {
    if p.may_update(kid) {
        Ok(())
    } else {
        Err(ApiError::missing_scope(&format!(
            "{} or {}",
            Scope::KeysUpdate,
            Scope::KeysUpdateOne(kid.clone())
        )))
    }
}

/// The one way a handler updates a key. Once the request has passed its checks the update
/// runs as its own task, not in the connection's future: token writes, rollback, the index
/// refresh and the result entry all happen even if the client disconnects, and the key's
/// lock is held until the token work is over. `map` turns domain errors into the answer of
/// the calling endpoint.
async fn update_key(
    state: &AppState,
    p: &Principal,
    note: &AuditNote,
    rid: RequestId,
    kid: &Kid,
    patch: KeyPatch,
    map: fn(KeyError) -> ApiError,
) -> Result<UpdateOutcome, ApiError> {
    let actor = Actor {
        roles: p.roles.clone(),
    };
    let (keys, audit, note, kid) = (
        state.keys.clone(),
        state.audit.clone(),
        note.clone(),
        kid.clone(),
    );
    let task = state.tasks.spawn(async move {
        let intent = audited::intent_hook(audit.clone(), note.clone(), rid.clone());
        let result = audited::result_hook(audit.clone(), note.clone(), rid.clone(), map);
        let result = keys
            .update(&kid, patch, &actor, intent, result)
            .await
            .map_err(map);
        audited::finish_update(&audit, &note, &rid, result).await
    });
    task.await
        .map_err(|e| ApiError::internal(&format!("update task failed: {e}")))?
}

fn with_etag(view: &KeyView, body: serde_json::Value) -> Response {
    let mut r = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", view.etag)) {
        let _ = r.headers_mut().insert(header::ETAG, v);
    }
    r
}

async fn list_keys(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysList)?;
    let q = body::list_query(uri.query())?;
    let page = state.keys.list(&q)?;
    Ok(Json(json!({
        "keys": page.keys,
        "next_cursor": page.next_after.as_ref().map(body::cursor_of),
        "total": page.total,
    }))
    .into_response())
}

async fn status(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysList)?;
    let keys = &state.keys;
    let backlog = keys.backlog();
    Ok(Json(json!({
        "state": if keys.is_lost() { "token_unavailable" } else { "serving" },
        "token": keys.hsm().token().to_string(),
        "keys": keys.len(),
        "unreadable_objects": keys.unreadable(),
        "cleanup_backlog": {"objects": backlog.objects, "records": backlog.records},
    }))
    .into_response())
}

async fn get_key(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(kid): Path<String>,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysGet)?;
    let kid = body::kid(&kid)?;
    let view = state.keys.get(&kid).await?;
    let body = serde_json::to_value(&view).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(with_etag(&view, body))
}

#[allow(clippy::too_many_arguments)]
async fn patch_key(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Extension(note): Extension<AuditNote>,
    Extension(rid): Extension<RequestId>,
    Path(kid): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let body = request.into_body();
    note.update(None);
    let kid = body::kid(&kid)?;
    note.update(Some(kid.as_str()));
    require_update(&p, &kid)?;
    let mut patch = body::key_patch(body::json_object(&headers, body).await?)?;
    patch.if_match = if_match(&headers)?;
    let outcome = update_key(&state, &p, &note, rid, &kid, patch, ApiError::from).await?;
    let changed: Vec<&str> = outcome.changes.iter().map(|c| c.field).collect();
    let body = json!({ "key": outcome.key, "changed": changed });
    Ok(with_etag(&outcome.key, body))
}

/// `If-Match: "<etag>"` (or `*`, which any existing key matches).
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let tag = s.trim_start_matches("W/");
    match tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(t) if !t.contains('"') => Ok(Some(t.to_string())),
        _ => Err(ApiError::bad_field(
            "invalid_if_match",
            "If-Match",
            "If-Match must be one quoted etag, as returned in the ETag header",
        )),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}
