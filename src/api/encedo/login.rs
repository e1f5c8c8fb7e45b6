//! The Encedo HEM login, as the appliance's clients do it:
//!
//! - `GET /api/auth/token` (no authentication): a challenge `{eid, spk, jti, exp, lbl}`.
//!   Not audited (it changes nothing a client could use alone, and an entry per challenge
//!   would let anyone fill the journal); the table of open challenges is bounded instead
//!   (503 `too_many_challenges` when it is full of live ones).
//! - `POST /api/auth/token` `{"auth": "<eJWT>"}` (no authentication): a bearer token for
//!   the eJWT's one scope, hsmkeyd's own signed JWT, valid until the eJWT's `exp` capped by
//!   `tokens.max_ttl_s`: `{"token"}`. Every answer is recorded: AUTH_SUCCESS_INTERNAL (OK,
//!   or ERROR for a malformed answer), AUTH_FAILED (401) or FAILED_SCOPE_CHECK (403).
//!   Like the appliance, each answer takes at least 500 ms, and 1,500 ms once three logins
//!   in a row have failed (until one succeeds); the wait is a timer, so other requests are
//!   served meanwhile.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::MAX_BODY;
use crate::api::audited::{AuditFacts, Audited, Caller};
use crate::api::error::ApiError;
use crate::api::reply::reply;
use crate::api::{body, AppState};
use crate::auth::encedo::EncedoLogin;

/// Where the appliance hands out challenges and takes their answers.
pub const LOGIN_PATH: &str = "/api/auth/token";

/// The shortest answer to a login, as on the appliance.
const MIN_ANSWER: Duration = Duration::from_millis(500);
/// The shortest answer once [`SLOW_AFTER_FAILURES`] logins in a row have failed.
const SLOW_ANSWER: Duration = Duration::from_millis(1500);
/// Failed logins in a row after which answers slow down.
const SLOW_AFTER_FAILURES: u32 = 3;

/// The login and its throttle.
pub struct LoginService {
    login: EncedoLogin,
    /// Logins failed in a row (any caller), reset by a success.
    failures: AtomicU32,
}

impl LoginService {
    /// The service over `login`.
    pub fn new(login: EncedoLogin) -> LoginService {
        LoginService {
            login,
            failures: AtomicU32::new(0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    auth: String,
}

fn service(state: &AppState) -> Result<&Arc<LoginService>, ApiError> {
    state
        .encedo_login
        .as_ref()
        .ok_or_else(ApiError::login_disabled)
}

/// `GET /api/auth/token`.
pub async fn challenge(State(state): State<AppState>) -> Response {
    let answer = service(&state).and_then(|s| {
        s.login.challenge().map_err(|e| {
            tracing::warn!(error = %e, "refused a login challenge");
            ApiError::from(e)
        })
    });
    match answer {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/auth/token`.
pub async fn token(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let mut facts = AuditFacts::default();
    let mut user = None;
    let result = match service(&state) {
        Ok(s) => {
            let s = s.clone();
            let slow = s.failures.load(Ordering::Relaxed) >= SLOW_AFTER_FAILURES;
            let result = token_inner(&state, &s, &mut facts, &mut user, &headers, body).await;
            if result.is_ok() {
                s.failures.store(0, Ordering::Relaxed);
            } else {
                let _ = s.failures.fetch_add(1, Ordering::Relaxed);
            }
            let least = if slow { SLOW_ANSWER } else { MIN_ANSWER };
            tokio::time::sleep_until((started + least).into()).await;
            result
        }
        Err(e) => Err(e),
    };
    let mut resp = Audited(facts, result).into_response();
    if let Some(name) = user {
        let _ = resp.extensions_mut().insert(Caller {
            principal: name,
            token_id: None,
        });
    }
    resp
}

async fn token_inner(
    state: &AppState,
    s: &LoginService,
    facts: &mut AuditFacts,
    user: &mut Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ApiError::length_required());
    }
    let fields: Map<String, Value> = body::json_object_within(headers, body, MAX_BODY).await?;
    let req: LoginBody = serde_json::from_value(Value::Object(fields)).map_err(|e| {
        ApiError::bad_field(
            "invalid_auth",
            "auth",
            format!("a login is {{\"auth\": \"<eJWT>\"}}: {e}"),
        )
    })?;
    let granted = s.login.verify(&req.auth).map_err(|(e, name)| {
        *user = name;
        ApiError::from(e)
    })?;
    *user = Some(granted.principal.name.clone());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let live = state.live();
    let tokens = live.tokens().clone();
    let ttl = Duration::from_secs(granted.until.saturating_sub(now).max(1)).min(tokens.max_ttl());
    let principal = granted.principal;
    let scope = granted.scope;
    let minted = state
        .keys
        .on_token(move || tokens.mint(&principal, &[scope], ttl))
        .await?
        .map_err(|e| {
            tracing::warn!(error = %e, "signing a login token failed");
            ApiError::token_unavailable()
        })?;
    facts.token_id = Some(minted.jti);
    Ok(reply(json!({ "token": minted.token })))
}
