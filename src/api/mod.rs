//! The HTTP API: routes, request shapes and responses. Handlers parse and check the request,
//! call the key domain, and return its results; [`error`] is the one place that maps errors
//! to status codes.
//!
//! Routes (both front doors serve the same router):
//! - `GET /v1/keys` (scope `keymgmt:list`): paged listing with `limit`, `cursor`, `label`,
//!   `label_prefix`.
//! - `GET /v1/keys/{kid}` (scope `keymgmt:get`): one key, with an `ETag`.
//! - `POST /v1/keys` (scope `keymgmt:gen`), `DELETE /v1/keys/{kid}` (scope `keymgmt:del`),
//!   `GET /v1/keys/{kid}/public` and `GET /v1/jwks` (scope `keymgmt:get`): the life cycle
//!   and public halves (`lifecycle.rs`).
//! - `PATCH /v1/keys/{kid}` (scope `keymgmt:upd` or `keymgmt:upd:<kid>`): label,
//!   description, roles; honours `If-Match`.
//! - `GET|PATCH|DELETE /v1/keys/by-label/{label}`: the same, for the key with that label
//!   (`by_label.rs`).
//! - `GET /v1/audit/key` (any principal): the audit-signing key that signs the audit
//!   trail's checkpoints (PEM, fingerprint), for `hsmkeyctl audit verify`.
//! - `GET /v1/status` (scope `keymgmt:list`): the token, key count, objects the scan could
//!   not read, the background worker's backlog.
//! - `POST /api/keymgmt/update`, `POST /api/keymgmt/create`,
//!   `DELETE /api/keymgmt/delete/{kid}`, `POST /api/keymgmt/search` (a read),
//!   `GET /api/keymgmt/list/{offset}[/{limit}]`,
//!   `GET /api/keymgmt/get/{kid}`, `GET /api/system/version`, `GET /api/system/status`
//!   (the last two without authentication): the Encedo HEM-compatible endpoints
//!   ([`encedo`]).
//!
//! May call: `auth`, `keys`. Called by: `front`.

pub mod audited;
pub mod body;
mod by_label;
pub mod deadline;
pub mod encedo;
pub mod error;
mod lifecycle;
mod tokens;

use std::sync::{Arc, RwLock};

use axum::extract::{Path, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::audit::{Auditor, Event};
use crate::auth::authenticate::{AuthError, Authenticator, BearerTokens, Credentials};
use crate::auth::jwt::TokenService;
use crate::auth::{ConnectionSlot, Peer, Principal, Principals, TlsPeer};
use crate::keys::model::{KeyView, Kid, RoleName};
use crate::keys::{Actor, FieldChange, KeyError, KeyPatch, KeyStore, UpdateOutcome};
use crate::sync;
use crate::values::Scope;
use audited::{AuditFacts, Audited, Caller, RequestFacts, RouteEvent, UpdateAudit};
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
    /// When the daemon started serving.
    pub started: std::time::Instant,
    /// The last reload: when (RFC 3339) and whether it was applied.
    pub last_reload: Arc<std::sync::Mutex<Option<LastReload>>>,
}

/// A reload, as `GET /v1/status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// When it happened (RFC 3339).
    pub at: String,
    /// Whether it was applied.
    pub applied: bool,
}

/// The parts of the configuration a reload replaces. Requests take a snapshot when they
/// start, so one in flight finishes on the configuration it began with.
pub struct Live {
    /// The principals of the Unix socket, by peer credentials.
    principals: Principals,
    /// Bearer tokens on TLS: verification (and minting).
    bearer: BearerTokens,
    /// `keys.allow_delete`.
    allow_delete: bool,
}

impl Live {
    /// The principals, the token service, the role names of the configuration (roles in
    /// tokens are limited to these), and whether keys may be deleted.
    pub fn new(
        principals: Principals,
        tokens: Arc<TokenService>,
        roles: Vec<RoleName>,
        allow_delete: bool,
    ) -> Live {
        Live {
            principals,
            bearer: BearerTokens { tokens, roles },
            allow_delete,
        }
    }

    /// The token service.
    pub fn tokens(&self) -> &Arc<TokenService> {
        &self.bearer.tokens
    }

    /// How callers of this transport are identified.
    fn authenticator(&self, tls: bool) -> &dyn Authenticator {
        if tls {
            &self.bearer
        } else {
            &self.principals
        }
    }
}

impl AppState {
    /// The current configuration snapshot.
    pub fn live(&self) -> Arc<Live> {
        sync::read(&self.live).clone()
    }
}

/// One route as registered: method, path, and the audit event of a changing route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    /// `GET`, `POST`, `PATCH`, ...
    pub method: &'static str,
    /// The path pattern, e.g. `/v1/keys/{kid}`.
    pub path: &'static str,
    /// What its answers are recorded as; `None` for reads (successful reads are not audited).
    pub event: Option<Event>,
}

struct Route {
    info: RouteInfo,
    handler: MethodRouter<AppState>,
}

/// A route that only reads: GET only, so it cannot change anything unaudited.
fn read<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Route {
    Route {
        info: RouteInfo {
            method: "GET",
            path,
            event: None,
        },
        handler: get(h),
    }
}

/// A POST that only reads (the Encedo search sends its query as a body). Like a [`read`]
/// route it has no audit event: successful reads are not audited, refusals are (401/403).
/// Its handler gets no [`UpdateRequest`], so it cannot reach [`run_change`]; the route
/// table test lists each such route by name.
fn read_posted<H: Handler<T, AppState>, T: 'static>(path: &'static str, h: H) -> Route {
    Route {
        info: RouteInfo {
            method: "POST",
            path,
            event: None,
        },
        handler: on(MethodFilter::POST, h),
    }
}

/// A route that changes something. Its audit event is part of its registration: every
/// answer it gives (errors included) carries the event, and the audit layer records it.
fn change<H: Handler<T, AppState>, T: 'static>(
    method: MethodFilter,
    name: &'static str,
    path: &'static str,
    event: Event,
    h: H,
) -> Route {
    let handler = on(method, h).layer(middleware::from_fn(
        move |mut req: Request, next: Next| async move {
            let _ = req.extensions_mut().insert(RouteEvent(event));
            let mut resp = next.run(req).await;
            let _ = resp.extensions_mut().insert(RouteEvent(event));
            resp
        },
    ));
    Route {
        info: RouteInfo {
            method: name,
            path,
            event: Some(event),
        },
        handler,
    }
}

/// Every route, in one table: the router is built from it, and tests walk it.
fn table() -> Vec<Route> {
    vec![
        read("/v1/keys", list_keys),
        change(
            MethodFilter::POST,
            "POST",
            "/v1/keys",
            Event::KeyCreated,
            lifecycle::create,
        ),
        read("/v1/keys/{kid}", get_key),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/v1/keys/{kid}",
            Event::KeyDeleted,
            lifecycle::delete,
        ),
        read("/v1/keys/{kid}/public", lifecycle::public_key),
        read("/v1/keys/by-label/{label}", by_label::get),
        read("/v1/jwks", lifecycle::jwks),
        change(
            MethodFilter::PATCH,
            "PATCH",
            "/v1/keys/by-label/{label}",
            Event::KeyAttributesChanged,
            by_label::patch,
        ),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/v1/keys/by-label/{label}",
            Event::KeyDeleted,
            by_label::delete,
        ),
        change(
            MethodFilter::PATCH,
            "PATCH",
            "/v1/keys/{kid}",
            Event::KeyAttributesChanged,
            patch_key,
        ),
        change(
            MethodFilter::POST,
            "POST",
            "/v1/auth/token",
            Event::TokenIssued,
            tokens::mint,
        ),
        read(tokens::JWKS_PATH, tokens::jwks),
        read("/v1/status", status),
        read("/v1/audit/key", audit_key),
        change(
            MethodFilter::POST,
            "POST",
            "/api/keymgmt/update",
            Event::KeyAttributesChanged,
            encedo::update,
        ),
        change(
            MethodFilter::POST,
            "POST",
            "/api/keymgmt/create",
            Event::KeyCreated,
            encedo::create,
        ),
        change(
            MethodFilter::DELETE,
            "DELETE",
            "/api/keymgmt/delete/{kid}",
            Event::KeyDeleted,
            encedo::delete,
        ),
        read_posted("/api/keymgmt/search", encedo::search),
        read("/api/keymgmt/list/{offset}/{limit}", encedo::list),
        read("/api/keymgmt/list/{offset}", encedo::list_default),
        read("/api/keymgmt/get/{kid}", encedo::get),
        read(encedo::VERSION_PATH, encedo::version),
        read(encedo::STATUS_PATH, encedo::status),
    ]
}

/// The routes the router serves.
pub fn routes() -> Vec<RouteInfo> {
    table().into_iter().map(|r| r.info).collect()
}

/// Builds the router. The listener must put the connection's [`Peer`] into each request's
/// extensions.
pub fn router(state: AppState) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |r, route| {
            r.route(route.info.path, route.handler)
        })
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

/// The GET routes served without authentication: the JWK set, and the Encedo version and
/// status that the appliance's clients read before they log in.
pub const PUBLIC_PATHS: [&str; 3] = [tokens::JWKS_PATH, encedo::VERSION_PATH, encedo::STATUS_PATH];

/// Resolves the caller before any handler runs, with the authenticator of the request's
/// transport: peer credentials on the Unix socket, bearer token on TLS. Unknown callers
/// get 401 whatever the path; only [`PUBLIC_PATHS`] are served to anyone. The answer carries the
/// [`Caller`] for the audit layer.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Requests name a path (origin form); `GET http://host/path` is a proxy's form.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return ApiError::bad_request(
            "absolute_uri",
            "request targets must be a path such as /v1/keys, not an absolute URI",
        )
        .into_response();
    }
    if req.method() == Method::GET && PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let live = state.live();
    let tls = req.extensions().get::<TlsPeer>().is_some();
    let credentials = Credentials {
        peer: req.extensions().get::<Peer>().copied(),
        bearer: if tls { bearer(req.headers()) } else { None },
    };
    let principal = match live.authenticator(tls).authenticate(&credentials) {
        Ok(p) => p,
        Err(e) => {
            if let AuthError::UnknownPeer(peer) = &e {
                tracing::warn!(%peer, "refused a caller that maps to no principal");
            }
            return ApiError::from(e).into_response();
        }
    };
    let caller = Caller {
        principal: principal.name.clone(),
        token_id: principal.token_id.clone(),
    };
    let mut resp = match admit(&req, &principal.name) {
        Err(e) => e.into_response(),
        Ok(()) => {
            let _ = req.extensions_mut().insert(principal);
            next.run(req).await
        }
    };
    let _ = resp.extensions_mut().insert(caller);
    resp
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

/// What an updating handler hands [`update_key`]: the request, its caller and its route's
/// event. An extractor, so every updating route gets it the same way.
struct UpdateRequest {
    state: AppState,
    principal: Arc<Principal>,
    request: RequestFacts,
    event: Event,
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
type IntentHook = Box<dyn FnOnce(&[FieldChange]) -> Result<(), String> + Send>;
/// The audit hook a change runs right after its token writes.
type ResultHook = Box<dyn FnOnce(Result<&[FieldChange], &KeyError>) + Send>;

/// The one way a handler changes keys. Once the request has passed its checks the change
/// runs as its own task, not in the connection's future: token writes, rollback, the index
/// refresh and the audit entries all happen even if the client disconnects, and the key's
/// lock is held until the token work is over. `op` is the domain call, given the store,
/// the caller as an [`Actor`] and the two audit hooks; `map` turns domain errors into the
/// answer of the calling endpoint. The change records its own result entry, so `facts`
/// says so.
async fn run_change<Op, Fut>(
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
async fn run_change_answering<Op, Fut>(
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
    let task = u.state.tasks.spawn(async move {
        let intent: IntentHook = Box::new(record.intent_hook());
        let result: ResultHook = Box::new(record.result_hook(map));
        let result = op(keys, actor, intent, result).await.map_err(map);
        record.finish(result).await
    });
    task.await
        .map_err(|e| ApiError::internal(&format!("update task failed: {e}")))?
}

/// An update of one key's attributes through [`run_change`].
async fn update_key(
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
fn dry_run_reply(outcome: &UpdateOutcome) -> Response {
    let changed: Vec<&str> = outcome.changes.iter().map(|c| c.field.name()).collect();
    audited::reply(json!({
        "dry_run": true,
        "key": outcome.key,
        "changed": changed,
        "changes": audited::changes_json(&outcome.changes),
    }))
}

fn with_etag(view: &KeyView, mut r: Response) -> Response {
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
    let token = keys.hsm().token();
    let (in_use, open, max) = keys.hsm().sessions();
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "state": if keys.is_lost() { "token_unavailable" } else { "serving" },
        "token": token.to_string(),
        "token_label": token.label,
        "token_serial": token.serial,
        "token_slot": token.slot_id,
        "keys": keys.len(),
        "uptime_s": state.started.elapsed().as_secs(),
        "sessions": {"in_use": in_use, "open": open, "max": max},
        "audit": {"healthy": state.audit.healthy()},
        "last_reload": *sync::lock(&state.last_reload),
        "unreadable_objects": keys.unreadable(),
        "cleanup_backlog": {"objects": backlog.objects, "records": backlog.records},
    }))
    .into_response())
}

/// The public half of the audit-signing key. Any principal may read it: it is public, and
/// verifying the trail must not need a key-management scope.
async fn audit_key(State(state): State<AppState>) -> Result<Response, ApiError> {
    use crate::audit::chain;
    let point = state
        .audit
        .public_key()
        .ok_or_else(|| ApiError::internal("the audit chain is not anchored"))?;
    Ok(Json(json!({
        "label": crate::audit::AUDIT_KEY_LABEL,
        "algorithm": "ECDSA P-256 SHA-256",
        "fingerprint": chain::fingerprint(point),
        "public_key_pem": chain::public_key_pem(point),
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
    Ok(with_etag(&view, Json(body).into_response()))
}

async fn patch_key(
    u: UpdateRequest,
    Path(kid): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = patch_inner(&u, &mut facts, &kid, uri.query(), &headers, body).await;
    Audited(facts, result)
}

async fn patch_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let kid = body::kid(kid)?;
    facts.kid = Some(kid.to_string());
    let dry_run = body::dry_run(query)?;
    require_update(&u.principal, &kid)?;
    let mut patch = body::key_patch(body::json_object(headers, body).await?)?;
    patch.if_match = if_match(headers)?;
    let outcome = update_key(u, facts, &kid, patch, dry_run, ApiError::from).await?;
    if dry_run {
        return Ok(with_etag(&outcome.key, dry_run_reply(&outcome)));
    }
    let changed: Vec<&str> = outcome.changes.iter().map(|c| c.field.name()).collect();
    let body = audited::reply(json!({ "key": outcome.key, "changed": changed }));
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
