//! `GET|PATCH|DELETE /v1/keys/by-label/{label}`: a key addressed by its label, as callers
//! used to name-addressed key stores expect. The label must name one key: 404 when none
//! has it, 409 `label_ambiguous` when several do. Then each is the kid route exactly.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::Extension;

use super::audited::{AuditFacts, Audited};
use super::error::ApiError;
use super::{lifecycle, require, AppState, UpdateRequest};
use crate::auth::Principal;
use crate::values::Scope;

/// `GET /v1/keys/by-label/{label}`.
pub(super) async fn get(
    State(state): State<AppState>,
    p: Extension<Arc<Principal>>,
    Path(label): Path<String>,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysGet)?;
    let kid = state.keys.kid_by_label(&label)?;
    super::get_key(State(state), p, Path(kid.to_string())).await
}

/// `PATCH /v1/keys/by-label/{label}`.
pub(super) async fn patch(
    u: UpdateRequest,
    Path(label): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = match u.state.keys.kid_by_label(&label) {
        Ok(kid) => {
            super::patch_inner(&u, &mut facts, kid.as_str(), uri.query(), &headers, body).await
        }
        Err(e) => Err(e.into()),
    };
    Audited(facts, result)
}

/// `DELETE /v1/keys/by-label/{label}`.
pub(super) async fn delete(
    u: UpdateRequest,
    Path(label): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = match u.state.keys.kid_by_label(&label) {
        Ok(kid) => {
            lifecycle::delete_inner(&u, &mut facts, kid.as_str(), uri.query(), &headers).await
        }
        Err(e) => Err(e.into()),
    };
    Audited(facts, result)
}
