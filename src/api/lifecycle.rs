//! The key life cycle on `/v1`: `POST /v1/keys` (scope `keymgmt:gen`) generates a key in
//! the token, `DELETE /v1/keys/{kid}` (scope `keymgmt:del`, `keys.allow_delete`) destroys
//! one, `GET /v1/keys/{kid}/public` (scope `keymgmt:get`) answers an asymmetric key's
//! public half as PEM or, with `Accept: application/jwk+json`, as a JWK.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use super::audited::{AuditFacts, Audited};
use super::error::ApiError;
use super::reply::reply_with;
use super::{body, require, run_change, AppState, UpdateRequest};
use crate::auth::Principal;
use crate::keys::model::{Curve, Description, Kid, Label, RoleName};
use crate::keys::UsageFlag;
use crate::keys::{public, KeySpec, NewKeyRequest, Usage};
use crate::values::Scope;

/// Longest kid a create may name, in bytes.
pub(super) const MAX_NEW_KID_BYTES: usize = 32;

/// `POST /v1/keys`.
pub(super) async fn create(u: UpdateRequest, uri: Uri, headers: HeaderMap, body: Body) -> Audited {
    let mut facts = AuditFacts::default();
    let result = create_inner(&u, &mut facts, uri.query(), &headers, body).await;
    Audited(facts, result)
}

async fn create_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let dry_run = body::dry_run(query)?;
    require(&u.principal, Scope::KeysGenerate)?;
    let req = new_key(body::json_object(headers, body).await?)?;
    let kid = req.kid.clone().unwrap_or_else(NewKeyRequest::random_kid);
    facts.kid = Some(kid.to_string());
    let req = NewKeyRequest {
        kid: Some(kid.clone()),
        ..req
    };
    let outcome = run_change(
        u,
        facts,
        &kid,
        dry_run,
        ApiError::from,
        move |keys, actor, i, r| async move { keys.create(req, &actor, dry_run, i, r).await },
    )
    .await?;
    if dry_run {
        return Ok(super::dry_run_reply(&outcome));
    }
    let mut r = reply_with(StatusCode::CREATED, json!({ "key": outcome.key }));
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/keys/{kid}")) {
        let _ = r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// `DELETE /v1/keys/{kid}`.
pub(super) async fn delete(
    u: UpdateRequest,
    Path(kid): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = delete_inner(&u, &mut facts, &kid, uri.query(), &headers).await;
    Audited(facts, result)
}

pub(super) async fn delete_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let kid = body::kid(kid)?;
    facts.kid = Some(kid.to_string());
    let dry_run = body::dry_run(query)?;
    let outcome = delete_key(u, facts, &kid, headers, dry_run, None, ApiError::from).await?;
    if dry_run {
        return Ok(super::dry_run_reply(&outcome));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The one delete of both front ends (`/v1` and the Encedo endpoint): the scope, the
/// `keys.allow_delete` switch, `If-Match`, then the domain delete through
/// `run_change_answering` (`success`: the status the endpoint answers, when not the
/// event's usual 204; `map`: its error mapping).
pub(super) async fn delete_key(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &Kid,
    headers: &HeaderMap,
    dry_run: bool,
    success: Option<u16>,
    map: fn(crate::keys::KeyError) -> ApiError,
) -> Result<crate::keys::UpdateOutcome, ApiError> {
    require(&u.principal, Scope::KeysDelete)?;
    if !u.state.live().allow_delete {
        return Err(ApiError::delete_disabled());
    }
    let if_match = super::if_match(headers)?;
    let target = kid.clone();
    super::run_change_answering(
        u,
        facts,
        kid,
        dry_run,
        success,
        map,
        move |keys, actor, i, r| async move {
            keys.delete(&target, if_match.as_deref(), &actor, dry_run, i, r)
                .await
        },
    )
    .await
}

/// `GET /v1/keys/{kid}/public`.
pub(super) async fn public_key(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(kid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysGet)?;
    let kid = body::kid(&kid)?;
    let (view, public) = state.keys.get_with_public(&kid).await?;
    let none = || ApiError::no_public_key(kid.as_str());
    let public = public.ok_or_else(none)?;
    let wants_jwk = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/jwk+json"));
    let (content_type, bytes) = if wants_jwk {
        let jwk = public::jwk(&view, &public).ok_or_else(none)?;
        ("application/jwk+json", jwk.to_string().into_bytes())
    } else {
        let pem = public::pem(&view, &public).ok_or_else(none)?;
        ("application/x-pem-file", pem.into_bytes())
    };
    let mut r = (StatusCode::OK, bytes).into_response();
    let _ = r
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(r)
}

/// `GET /v1/jwks?label_prefix=...&role=...`: the public keys of the asymmetric keys that
/// match, as a JWK set (secret keys have none and are left out).
pub(super) async fn jwks(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    require(&p, Scope::KeysGet)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("bad query string: {e}")))?;
    let (mut prefix, mut role) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "label_prefix" if prefix.is_none() => prefix = Some(v),
            "role" if role.is_none() => {
                role = Some(RoleName::parse(&v).map_err(|e| ApiError::bad_field("invalid_role", "role", e))?)
            }
            other => {
                return Err(ApiError::bad_field(
                    "invalid_query",
                    "query",
                    format!("query parameter {other:?} is unknown or given twice; a JWK set takes label_prefix and role"),
                ))
            }
        }
    }
    let (kids, more) =
        state
            .keys
            .select(prefix.as_deref(), role.as_ref(), crate::keys::MAX_PAGE)?;
    if more {
        return Err(ApiError::bad_request(
            "too_many_keys",
            format!(
                "more than {} keys match; narrow the selection with label_prefix or role",
                crate::keys::MAX_PAGE
            ),
        ));
    }
    let mut keys = Vec::new();
    for kid in kids {
        if let (view, Some(public)) = state.keys.get_with_public(&kid).await? {
            keys.extend(public::jwk(&view, &public));
        }
    }
    let mut r = (StatusCode::OK, json!({ "keys": keys }).to_string()).into_response();
    let _ = r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    Ok(r)
}

/// The fields a create body (`POST /v1/keys`) accepts; the OpenAPI schema `NewKey` has
/// exactly these (`api::openapi` tests tie them).
pub(super) const NEW_KEY_FIELDS: [&str; 10] = [
    "type",
    "bits",
    "curve",
    "label",
    "description",
    "roles",
    "usage",
    "not_before",
    "not_after",
    "kid",
];

/// The usage flags a `usage` object may name, in the API's order.
pub(super) const USAGE_FLAGS: [&str; 7] = UsageFlag::ALL_NAMES;

/// Validates a create body: `type`, `bits`/`curve`, `label`, `description`, `roles`,
/// `usage`, `not_before`, `not_after`, `kid`.
pub(super) fn new_key(mut f: Map<String, Value>) -> Result<NewKeyRequest, ApiError> {
    if let Some(other) = f.keys().find(|k| !NEW_KEY_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_field(
            "unknown_field",
            other,
            format!(
                "unknown field {other:?}; a new key takes {}",
                NEW_KEY_FIELDS.join(", ")
            ),
        ));
    }
    let text =
        |f: &mut Map<String, Value>, name: &'static str| -> Result<Option<String>, ApiError> {
            match f.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(ApiError::bad_field(
                    "invalid_field",
                    name,
                    format!("{name} must be a string"),
                )),
            }
        };
    let kind = text(&mut f, "type")?
        .ok_or_else(|| ApiError::bad_field("missing_type", "type", "type is required"))?;
    let bits = match f.remove("bits") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .ok_or_else(|| {
                    ApiError::bad_field("invalid_bits", "bits", "bits must be an integer")
                })?,
        ),
    };
    let curve = text(&mut f, "curve")?;
    let spec = spec(&kind, bits, curve.as_deref())?;
    let label = text(&mut f, "label")?
        .ok_or_else(|| ApiError::bad_field("missing_label", "label", "label is required"))?;
    let label =
        Label::parse(&label).map_err(|e| ApiError::bad_field("invalid_label", "label", e))?;
    if crate::keys::is_reserved_label(label.as_str().as_bytes()) {
        return Err(ApiError::bad_field(
            "invalid_label",
            "label",
            "this label is reserved for hsmkeyd's own keys",
        ));
    }
    let description = text(&mut f, "description")?
        .map(|d| Description::parse(&d))
        .transpose()
        .map_err(|e| ApiError::bad_field("invalid_description", "description", e))?;
    let roles = match f.remove("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => RoleName::parse(&s)
                    .map_err(|e| ApiError::bad_field("invalid_roles", "roles", e)),
                _ => Err(ApiError::bad_field(
                    "invalid_roles",
                    "roles",
                    "roles are strings",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_field(
                "invalid_roles",
                "roles",
                "roles must be an array of role names",
            ))
        }
    };
    let kid = text(&mut f, "kid")?
        .map(|k| {
            let kid = body::kid(&k)?;
            if kid.id_bytes().len() > MAX_NEW_KID_BYTES {
                return Err(ApiError::bad_field(
                    "invalid_kid",
                    "kid",
                    format!("a new key's kid is 1..={MAX_NEW_KID_BYTES} bytes of hex"),
                ));
            }
            Ok::<Kid, ApiError>(kid)
        })
        .transpose()?;
    let usage = usage(&spec, f.remove("usage"))?;
    let not_before = f
        .remove("not_before")
        .map(|v| body::date("not_before", v))
        .transpose()?
        .flatten();
    let not_after = f
        .remove("not_after")
        .map(|v| body::date("not_after", v))
        .transpose()?
        .flatten();
    crate::keys::check_validity(not_before, not_after, "not_after")?;
    Ok(NewKeyRequest {
        kid,
        spec,
        label,
        description,
        roles,
        usage,
        not_before,
        not_after,
    })
}

/// The key type and size a create asks for.
fn spec(kind: &str, bits: Option<u32>, curve: Option<&str>) -> Result<KeySpec, ApiError> {
    let bad_bits = |allowed: &str| {
        ApiError::bad_field(
            "invalid_bits",
            "bits",
            format!("a {kind} key has {allowed} bits"),
        )
    };
    let no_curve = |c: Option<&str>| match c {
        Some(_) => Err(ApiError::bad_field(
            "invalid_curve",
            "curve",
            format!("a {kind} key has no curve"),
        )),
        None => Ok(()),
    };
    match kind {
        "aes" => {
            no_curve(curve)?;
            match bits.unwrap_or(256) {
                b @ (128 | 192 | 256) => Ok(KeySpec::Aes(b / 8)),
                _ => Err(bad_bits("128, 192 or 256")),
            }
        }
        "generic-secret" => {
            no_curve(curve)?;
            match bits.unwrap_or(256) {
                b if (256..=512).contains(&b) && b % 8 == 0 => Ok(KeySpec::GenericSecret(b / 8)),
                _ => Err(bad_bits("256..=512 (a multiple of 8)")),
            }
        }
        "rsa" => {
            no_curve(curve)?;
            match bits.unwrap_or(2048) {
                b @ (2048 | 3072 | 4096) => Ok(KeySpec::Rsa(b)),
                _ => Err(bad_bits("2048, 3072 or 4096")),
            }
        }
        "ec" => {
            if bits.is_some() {
                return Err(bad_bits("no bits setting: name a curve, and it has"));
            }
            match curve.unwrap_or("P-256") {
                "P-256" => Ok(KeySpec::Ec(Curve::P256)),
                "P-384" => Ok(KeySpec::Ec(Curve::P384)),
                "P-521" => Ok(KeySpec::Ec(Curve::P521)),
                other => Err(ApiError::bad_field(
                    "invalid_curve",
                    "curve",
                    format!("curve {other:?} is not offered; choose P-256, P-384 or P-521"),
                )),
            }
        }
        "ed25519" => {
            no_curve(curve)?;
            match bits {
                Some(_) => Err(bad_bits("no bits setting:")),
                None => Ok(KeySpec::Ed25519),
            }
        }
        other => Err(ApiError::bad_field(
            "invalid_type",
            "type",
            format!(
                "type {other:?} cannot be generated; choose aes, generic-secret, ec, ed25519 \
                 or rsa"
            ),
        )),
    }
}

/// The names of the usage flags a key of this type may have (the others must be false or
/// left out), from the one table ([`crate::keys::usage_allowed`]), for the OpenAPI schema.
pub(super) fn usage_allowed(spec: &KeySpec) -> Vec<&'static str> {
    crate::keys::usage_allowed(&spec.algorithm())
        .unwrap_or(&[])
        .iter()
        .map(|f| f.name())
        .collect()
}

/// The usage flags: the defaults of the key type, changed by the flags given; a flag that
/// makes no sense for the type (the one table, [`crate::keys::usage_allowed`]) is refused.
fn usage(spec: &KeySpec, given: Option<Value>) -> Result<Usage, ApiError> {
    let mut u = Usage::defaults(spec);
    let flags = match given {
        None | Some(Value::Null) => return Ok(u),
        Some(v) => body::usage_flags(v)?,
    };
    let allowed = crate::keys::usage_allowed(&spec.algorithm()).unwrap_or_default();
    for (flag, on) in flags {
        if on && !allowed.contains(&flag) {
            return Err(ApiError::bad_field(
                "invalid_usage",
                flag.field(),
                format!(
                    "usage.{} makes no sense for this key type; it allows {}",
                    flag.name(),
                    allowed
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        u.set(flag, on);
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<NewKeyRequest, ApiError> {
        new_key(v.as_object().unwrap().clone())
    }

    #[test]
    fn create_bodies_are_checked_field_by_field() {
        let ok = parse(json!({"type": "ec", "label": "k"})).unwrap();
        assert_eq!(ok.spec, KeySpec::Ec(Curve::P256));
        assert!(ok.usage.sign && ok.usage.verify && !ok.usage.decrypt);
        let aes =
            parse(json!({"type": "aes", "bits": 128, "label": "k", "usage": {"wrap": false}}))
                .unwrap();
        assert_eq!(aes.spec, KeySpec::Aes(16));
        assert!(aes.usage.encrypt && !aes.usage.wrap);
        for (body, code, field) in [
            (json!({"label": "k"}), "missing_type", "type"),
            (json!({"type": "des", "label": "k"}), "invalid_type", "type"),
            (
                json!({"type": "aes", "bits": 100, "label": "k"}),
                "invalid_bits",
                "bits",
            ),
            (
                json!({"type": "rsa", "bits": 1024, "label": "k"}),
                "invalid_bits",
                "bits",
            ),
            (
                json!({"type": "ec", "curve": "P-192", "label": "k"}),
                "invalid_curve",
                "curve",
            ),
            (
                json!({"type": "aes", "curve": "P-256", "label": "k"}),
                "invalid_curve",
                "curve",
            ),
            (json!({"type": "ec"}), "missing_label", "label"),
            (json!({"type": "ec", "label": ""}), "invalid_label", "label"),
            (
                json!({"type": "ec", "label": "hsmkeyd-jwt-signing"}),
                "invalid_label",
                "label",
            ),
            (
                json!({"type": "ec", "label": "k", "usage": {"decrypt": true}}),
                "invalid_usage",
                "usage.decrypt",
            ),
            (
                json!({"type": "ed25519", "label": "k", "usage": {"derive": true}}),
                "invalid_usage",
                "usage.derive",
            ),
            (
                json!({"type": "ec", "label": "k", "usage": {"sing": true}}),
                "invalid_usage",
                "usage",
            ),
            (
                json!({"type": "ec", "label": "k", "not_after": "2026-02-30"}),
                "invalid_date",
                "not_after",
            ),
            (
                json!({"type": "ec", "label": "k", "not_before": "2027-01-01",
                       "not_after": "2026-01-01"}),
                "invalid_validity",
                "not_after",
            ),
            (
                json!({"type": "ec", "label": "k", "kid": "abc"}),
                "invalid_kid",
                "kid",
            ),
            (
                json!({"type": "ec", "label": "k", "kid": "00".repeat(33)}),
                "invalid_kid",
                "kid",
            ),
            (
                json!({"type": "ec", "label": "k", "colour": "red"}),
                "unknown_field",
                "colour",
            ),
            (
                json!({"type": "ec", "label": "k", "roles": "ops"}),
                "invalid_roles",
                "roles",
            ),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.code(), e.field()), (code, Some(field)), "{body}");
        }
    }
}
