//! The appliance's key life cycle: `POST /api/keymgmt/create` with its type strings, and
//! `DELETE /api/keymgmt/delete/<kid>`, through the same domain calls, audit and crash
//! safety as `/v1`.

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::super::audited::{AuditFacts, Audited};
use super::super::error::ApiError;
use super::super::reply::reply;
use super::super::{body, UpdateRequest};
use super::{description, encedo_label, unknown_field, MAX_BODY};
use crate::keys::model::Curve;
use crate::keys::{KeySpec, NewKeyRequest, Usage};
use crate::values::Scope;

/// `POST /api/keymgmt/create`.
pub(in crate::api) async fn create(u: UpdateRequest, headers: HeaderMap, body: Body) -> Audited {
    let mut facts = AuditFacts::default();
    let result = create_inner(&u, &mut facts, &headers, body).await;
    Audited(facts, result)
}

async fn create_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    super::super::require(&u.principal, Scope::KeysGenerate)?;
    if !headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ApiError::length_required());
    }
    let fields = body::json_object_within(headers, body, MAX_BODY).await?;
    let req = create_body(fields)?;
    let kid = req.kid.clone().unwrap_or_else(NewKeyRequest::random_kid);
    facts.kid = Some(kid.to_string());
    let req = NewKeyRequest {
        kid: Some(kid.clone()),
        ..req
    };
    let _ = super::super::run_change_answering(
        u,
        facts,
        &kid,
        false,
        Some(200),
        ApiError::encedo,
        move |keys, actor, i, r| async move { keys.create(req, &actor, false, i, r).await },
    )
    .await?;
    Ok(reply(json!({ "kid": kid })))
}

/// The fields of `POST /api/keymgmt/create`, and only these (`mode`, which the appliance
/// has, is refused with its own error). The OpenAPI schema `EncedoCreate` has exactly
/// these; `api::openapi` tests tie them.
pub(in crate::api) const CREATE_FIELDS: [&str; 3] = ["label", "type", "descr"];

/// Validates `{"label", "type", "descr"?}`.
fn create_body(fields: Map<String, Value>) -> Result<NewKeyRequest, ApiError> {
    let (mut label, mut spec, mut descr) = (None, None, None);
    for (name, value) in fields {
        if name != "mode" && !CREATE_FIELDS.contains(&name.as_str()) {
            return Err(unknown_field(&name, "a create", &CREATE_FIELDS));
        }
        match (name.as_str(), value) {
            ("label", Value::String(s)) => label = Some(encedo_label(&s)?),
            ("label", _) => {
                return Err(ApiError::bad_field(
                    "invalid_label",
                    "label",
                    "label must be a string",
                ))
            }
            ("type", Value::String(s)) => spec = Some(new_key_spec(&s)?),
            ("type", _) => {
                return Err(ApiError::bad_field(
                    "invalid_type",
                    "type",
                    "type must be a string such as AES256 or SECP256R1",
                ))
            }
            ("descr", Value::Null) => {}
            ("descr", Value::String(s)) => descr = Some(description(&s)?),
            ("descr", _) => {
                return Err(ApiError::bad_field(
                    "invalid_descr",
                    "descr",
                    "descr must be a base64 string",
                ))
            }
            ("mode", _) => {
                return Err(ApiError::bad_field(
                    "unsupported_mode",
                    "mode",
                    "hsmkeyd does not restrict keys by mode; leave mode out (EC keys may \
                     both derive and sign)",
                ))
            }
            (other, _) => return Err(unknown_field(other, "a create", &CREATE_FIELDS)),
        }
    }
    let label =
        label.ok_or_else(|| ApiError::bad_field("missing_label", "label", "label is required"))?;
    if label.as_str() == crate::keys::SIGNING_KEY_LABEL {
        return Err(ApiError::bad_field(
            "invalid_label",
            "label",
            "this label is reserved for hsmkeyd's token-signing key",
        ));
    }
    let (spec, usage) =
        spec.ok_or_else(|| ApiError::bad_field("missing_type", "type", "type is required"))?;
    Ok(NewKeyRequest {
        kid: None,
        spec,
        label,
        description: descr,
        roles: Vec::new(),
        usage,
        not_before: None,
        not_after: None,
    })
}

/// The appliance's key types hsmkeyd can generate, and the usage each gets: AES keys
/// encrypt and wrap, EC keys sign and derive (`ExDSA` and `ECDH`), Ed25519 keys sign,
/// `SHA2-*` are HMAC secrets of the hash's size.
pub fn new_key_spec(kind: &str) -> Result<(KeySpec, Usage), ApiError> {
    let aes = Usage {
        encrypt: true,
        decrypt: true,
        wrap: true,
        unwrap: true,
        ..Usage::default()
    };
    let signing = Usage {
        sign: true,
        verify: true,
        ..Usage::default()
    };
    let ec = Usage {
        derive: true,
        ..signing
    };
    Ok(match kind {
        "AES128" => (KeySpec::Aes(16), aes),
        "AES192" => (KeySpec::Aes(24), aes),
        "AES256" => (KeySpec::Aes(32), aes),
        "SECP256R1" => (KeySpec::Ec(Curve::P256), ec),
        "SECP384R1" => (KeySpec::Ec(Curve::P384), ec),
        "SECP521R1" => (KeySpec::Ec(Curve::P521), ec),
        "ED25519" => (KeySpec::Ed25519, signing),
        "SHA2-256" => (KeySpec::GenericSecret(32), signing),
        "SHA2-384" => (KeySpec::GenericSecret(48), signing),
        "SHA2-512" => (KeySpec::GenericSecret(64), signing),
        "CURVE25519" | "CURVE448" | "ED448" => {
            return Err(ApiError::bad_field(
                "unsupported_type",
                "type",
                format!(
                    "type {kind} cannot be generated: hsmkeyd's token (SoftHSM2 2.6) has no \
                     Montgomery or Ed448 key generation; for key agreement use SECP256R1"
                ),
            ))
        }
        other => {
            return Err(ApiError::bad_field(
                "invalid_type",
                "type",
                format!(
                    "type {other:?} is unknown or cannot be generated; choose AES128, AES192, \
                     AES256, SECP256R1, SECP384R1, SECP521R1, ED25519, SHA2-256, SHA2-384 \
                     or SHA2-512"
                ),
            ))
        }
    })
}

/// `DELETE /api/keymgmt/delete/{kid}`.
pub(in crate::api) async fn delete(
    u: UpdateRequest,
    Path(kid): Path<String>,
    headers: HeaderMap,
) -> Audited {
    let mut facts = AuditFacts::default();
    let result = delete_inner(&u, &mut facts, &kid, &headers).await;
    Audited(facts, result)
}

async fn delete_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    kid: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let kid = body::kid(kid)?;
    facts.kid = Some(kid.to_string());
    let _ = super::super::lifecycle::delete_key(
        u,
        facts,
        &kid,
        headers,
        false,
        Some(200),
        ApiError::encedo,
    )
    .await?;
    Ok(reply(json!({})))
}
