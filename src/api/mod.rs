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
//! - `POST /v1/keys/batch` (the same scopes, per key): one patch for up to 1,000 keys,
//!   all checked before any is written (`batch.rs`).
//! - `GET|PATCH|DELETE /v1/keys/by-label/{label}`: the same, for the key with that label
//!   (`by_label.rs`).
//! - `GET /v1/audit/key` (any principal): the audit-signing key that signs the audit
//!   trail's checkpoints (PEM, fingerprint), for `hsmkeyctl audit verify`.
//! - `GET /v1/openapi.json` (any principal): the API's OpenAPI document ([`openapi`]).
//! - `GET /v1/status` (scope `keymgmt:list`): the token, key count, objects the scan could
//!   not read, the background worker's backlog.
//! - `POST /api/keymgmt/update`, `POST /api/keymgmt/create`,
//!   `DELETE /api/keymgmt/delete/{kid}`, `POST /api/keymgmt/search` (a read),
//!   `GET /api/keymgmt/list/{offset}[/{limit}]`,
//!   `GET /api/keymgmt/get/{kid}`, `GET /api/system/version`, `GET /api/system/status`
//!   (the last two without authentication), `GET|POST /api/auth/token` (the login, without
//!   authentication): the Encedo HEM-compatible endpoints ([`encedo`]).
//!
//! May call: `auth`, `keys`. Called by: `front`.

pub mod audited;
mod batch;
pub mod body;
mod by_label;
mod change;
pub mod deadline;
pub mod encedo;
pub mod error;
mod lifecycle;
pub mod openapi;
pub mod reply;
mod routes;
mod tokens;

use std::sync::{Arc, RwLock};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::audit::Auditor;
use crate::auth::authenticate::{AuthError, Authenticator, BearerTokens, Credentials};
use crate::auth::jwt::TokenService;
use crate::auth::{ConnectionSlot, Peer, Principal, Principals, TlsPeer};
use crate::keys::model::{KeyView, Kid, RoleName};
use crate::keys::KeyStore;
use crate::sync;
use crate::values::Scope;
use audited::{AuditFacts, Audited, Caller};
use change::{dry_run_reply, run_change, run_change_answering, update_key, UpdateRequest};
use error::ApiError;
pub use routes::{router, routes, RouteInfo};

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
    /// The Encedo login, when `[[encedo.users]]` are configured.
    pub encedo_login: Option<Arc<encedo::LoginService>>,
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

/// The GET routes served without authentication: the JWK set, the Encedo version and
/// status that the appliance's clients read before they log in, and its login challenge.
pub const PUBLIC_PATHS: [&str; 4] = [
    tokens::JWKS_PATH,
    encedo::VERSION_PATH,
    encedo::STATUS_PATH,
    encedo::LOGIN_PATH,
];

/// The POST routes served without authentication: the answer to an Encedo login challenge,
/// which authenticates itself.
pub const PUBLIC_POSTS: [&str; 1] = [encedo::LOGIN_PATH];

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
    let public = match *req.method() {
        Method::GET => PUBLIC_PATHS.contains(&req.uri().path()),
        Method::POST => PUBLIC_POSTS.contains(&req.uri().path()),
        _ => false,
    };
    if public {
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
    let (chained, chain_ns) = state.audit.chain_cost();
    let (key_locks, label_claims) = keys.tables();
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
        "audit": {
            "healthy": state.audit.healthy(),
            "chained_entries": chained,
            "chain_us": chain_ns / 1000,
        },
        "last_reload": *sync::lock(&state.last_reload),
        "unreadable_objects": keys.unreadable(),
        "cleanup_backlog": {"objects": backlog.objects, "records": backlog.records},
        "tables": {"key_locks": key_locks, "label_claims": label_claims},
        "memory": {
            "heap_bytes": crate::memory::heap_bytes(),
            "rss_bytes": crate::memory::rss_bytes(),
        },
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
    Ok(with_etag(&view, Json(&view).into_response()))
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
    let body = reply::reply_sorted(&Updated {
        changed: outcome.changes.iter().map(|c| c.field.name()).collect(),
        key: &outcome.key,
    })?;
    Ok(with_etag(&outcome.key, body))
}

/// The answer to a PATCH: its names in byte order (see [`reply::reply_sorted`]).
#[derive(serde::Serialize)]
struct Updated<'a> {
    /// The fields that changed.
    changed: Vec<&'static str>,
    /// The key as it is now.
    key: &'a KeyView,
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
