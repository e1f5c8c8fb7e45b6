//! Bearer-token endpoints: `POST /v1/auth/token` mints a token over the Unix socket for a
//! principal holding `auth:token` (only scopes it holds itself, lifetime capped by
//! `tokens.max_ttl_s`); `GET /v1/auth/jwks` publishes the verification key on both front
//! doors, unauthenticated.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::audited::{AuditFacts, Audited};
use super::error::ApiError;
use super::reply::reply;
use super::{body, require, AppState};
use crate::auth::{Peer, Principal};
use crate::values::Scope;

/// Path of the JWK set (the one unauthenticated route).
pub const JWKS_PATH: &str = "/v1/auth/jwks";

/// A token request: its type is its OpenAPI schema (`TokenRequest`), so the two agree.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TokenRequest)]
pub(super) struct MintRequest {
    /// The scopes the token carries, each one the caller holds itself (or implies).
    #[schema(min_items = 1, example = json!(["keymgmt:list", "keymgmt:get"]))]
    scopes: Vec<String>,
    /// Lifetime in seconds, 1..=`tokens.max_ttl_s` (the configured cap, by default the cap).
    #[schema(minimum = 1)]
    ttl_s: Option<u64>,
}

/// `POST /v1/auth/token`.
pub async fn mint(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = mint_inner(&state, &p, peer.is_some(), &mut facts, &headers, body).await;
    Audited(facts, result)
}

async fn mint_inner(
    state: &AppState,
    p: &Arc<Principal>,
    on_unix_socket: bool,
    facts: &mut AuditFacts,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !on_unix_socket {
        // Read the body (within the usual limit) before refusing: a connection closed with
        // an unread body is reset, and the client may lose the answer.
        let _ = axum::body::to_bytes(body, body::MAX_BODY).await;
        return Err(ApiError::unix_socket_only());
    }
    require(p, Scope::AuthToken)?;
    let object = body::json_object(headers, body).await?;
    let req: MintRequest = serde_json::from_value(Value::Object(object)).map_err(|e| {
        ApiError::bad_request(
            "invalid_token_request",
            format!("a token request is {{\"scopes\": [...], \"ttl_s\": N}}: {e}"),
        )
    })?;
    if req.scopes.is_empty() {
        return Err(ApiError::bad_field(
            "invalid_scopes",
            "scopes",
            "name at least one scope",
        ));
    }
    let mut scopes = Vec::new();
    for s in &req.scopes {
        let scope =
            Scope::parse(s).map_err(|e| ApiError::bad_field("invalid_scopes", "scopes", e))?;
        let implied = match &scope {
            Scope::KeysUpdateOne(k) => p.may_update(k),
            Scope::KeysUseOne(k) => p.may_use(k),
            _ => false,
        };
        if !p.has(&scope) && !implied {
            return Err(ApiError::missing_scope(&scope.to_string()));
        }
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    let live = state.live();
    let max = live.tokens().max_ttl();
    let ttl = match req.ttl_s {
        None => max,
        Some(t) if t >= 1 && t <= max.as_secs() => Duration::from_secs(t),
        Some(t) => {
            return Err(ApiError::bad_field(
                "invalid_ttl",
                "ttl_s",
                format!("ttl_s {t} is out of range 1..={}", max.as_secs()),
            ))
        }
    };
    let tokens = live.tokens().clone();
    let principal = p.clone();
    let minted = state
        .keys
        .on_token(move || tokens.mint(&principal, &scopes, ttl).map(|m| (m, scopes)))
        .await?;
    let (minted, scopes) = minted.map_err(|e| {
        tracing::warn!(error = %e, "signing a token failed");
        ApiError::token_unavailable()
    })?;
    facts.token_id = Some(minted.jti.clone());
    let expires = time::OffsetDateTime::from(minted.expires_at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Ok(reply(json!({
        "token": minted.token,
        "expires_at": expires,
        "scopes": scopes.iter().map(Scope::to_string).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/auth/jwks`.
pub async fn jwks(State(state): State<AppState>) -> Response {
    Json(state.live().tokens().jwks()).into_response()
}
