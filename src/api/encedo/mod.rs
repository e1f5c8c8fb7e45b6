//! The Encedo HEM-compatible key endpoints, so scripts written for the appliance work
//! against hsmkeyd unchanged. Same domain calls, permission checks and audit trail as `/v1`;
//! only the shapes differ:
//!
//! - `POST /api/keymgmt/update` `{"kid", "label", "descr"}` (scope `keymgmt:upd` or
//!   `keymgmt:upd:<kid>`): `label` is required, 1..=32 printable ASCII characters; `descr`
//!   is the base64 of the description, and leaving it out clears the description (the
//!   appliance rewrites the whole record). The body needs a Content-Length (411) and is at
//!   most 7,300 bytes (413). An unknown kid is 406, as on the appliance.
//! - `GET /api/keymgmt/list/{offset}/{limit}` and `GET /api/keymgmt/list/{offset}` (limit
//!   [`DEFAULT_LIMIT`]) (scope `keymgmt:list`).
//! - `GET /api/keymgmt/get/{kid}` (scope `keymgmt:get` or `keymgmt:use:<kid>`): type,
//!   public key, last update.
//! - `POST /api/keymgmt/create` `{"label", "type", "descr"?}` (scope `keymgmt:gen`):
//!   generates a key of one of the appliance's types ([`new_key_spec`]), answers `{"kid"}`.
//! - `DELETE /api/keymgmt/delete/{kid}` (scope `keymgmt:del`, `keys.allow_delete`, honours
//!   `If-Match`): answers `{}`.
//! - `POST /api/keymgmt/search` `{"descr", "offset"?, "limit"?}` (scope `keymgmt:search` or
//!   `keymgmt:list`): the keys whose description contains the pattern (`descr` is its
//!   base64; a leading `^` asks for descriptions that start with it), paged as a listing;
//!   404 when none matches. A read with a body: no audit entry, as for the other reads.
//! - `GET /api/system/version` and `GET /api/system/status`, without authentication (the
//!   appliance's clients check them before logging in): what hsmkeyd is, and that it runs.
//! - `GET /api/auth/token` and `POST /api/auth/token`, without authentication: the
//!   appliance's login, a challenge and its answer for a one-scope bearer token (`login.rs`).
//!
//! Listed and read keys have the appliance's shapes: `type` is its attribute string
//! ([`type_string`]), `updated` is always a number (0 if hsmkeyd never wrote the key),
//! `descr` is left out when the key has none. `created` is left out: the token keeps no
//! creation time, and a create through hsmkeyd records its time as `updated`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::audited::{AuditFacts, Audited};
use super::error::ApiError;
use super::reply::reply;
use super::{body, AppState, UpdateRequest};
use crate::auth::Principal;
use crate::keys::model::{Curve, Description, KeyClass, KeyType, KeyView, Kid, Label};
use crate::keys::KeyPatch;
use crate::values::Scope;

mod keys;
mod login;
mod search;

pub use keys::new_key_spec;
#[cfg(test)]
pub(in crate::api) use keys::CREATE_FIELDS;
pub(in crate::api) use keys::{create, delete};
pub use login::{challenge, token as login, LoginService, LOGIN_PATH};
pub use search::search;
#[cfg(test)]
pub(in crate::api) use search::SEARCH_FIELDS;

/// Where the appliance says what it is.
pub const VERSION_PATH: &str = "/api/system/version";
/// Where the appliance says it is up.
pub const STATUS_PATH: &str = "/api/system/status";

/// The appliance's request body limit.
pub const MAX_BODY: usize = 7300;
/// The page size of `/api/keymgmt/list/{offset}`, the appliance's default.
pub const DEFAULT_LIMIT: usize = 15;
/// The appliance's label limit, in characters (printable ASCII only).
pub const MAX_LABEL_CHARS: usize = 32;

/// `POST /api/keymgmt/update`.
pub(super) async fn update(u: UpdateRequest, headers: HeaderMap, body: Body) -> Audited {
    let mut facts = AuditFacts::default();
    let result = update_inner(&u, &mut facts, &headers, body).await;
    Audited(facts, result)
}

async fn update_inner(
    u: &UpdateRequest,
    facts: &mut AuditFacts,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Without any update scope the body is not worth reading.
    if !u.principal.may_update_some() {
        return Err(ApiError::missing_scope(&Scope::KeysUpdate.to_string()));
    }
    if !headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ApiError::length_required());
    }
    let fields = body::json_object_within(headers, body, MAX_BODY).await?;
    let (kid, patch) = update_body(fields)?;
    facts.kid = Some(kid.to_string());
    super::require_update(&u.principal, &kid)?;
    let _ = super::update_key(u, facts, &kid, patch, false, ApiError::encedo).await?;
    // The appliance answers 200 with an empty object; the audit layer adds `audit_id`.
    Ok(reply(json!({})))
}

/// The fields of `POST /api/keymgmt/update`, and only these (the OpenAPI schema
/// `EncedoUpdate` has exactly these; `api::openapi` tests tie them).
pub(in crate::api) const UPDATE_FIELDS: [&str; 3] = ["kid", "label", "descr"];

/// 400 `unknown_field` for a field an Encedo body does not take.
fn unknown_field(name: &str, what: &str, fields: &[&str]) -> ApiError {
    ApiError::bad_field(
        "unknown_field",
        name,
        format!(
            "unknown field {name:?}; {what} accepts {}",
            fields.join(", ")
        ),
    )
}

/// Validates `{"kid", "label", "descr"}`.
fn update_body(fields: Map<String, Value>) -> Result<(Kid, KeyPatch), ApiError> {
    let (mut kid, mut label, mut descr) = (None, None, None);
    for (name, value) in fields {
        if !UPDATE_FIELDS.contains(&name.as_str()) {
            return Err(unknown_field(&name, "an update", &UPDATE_FIELDS));
        }
        match name.as_str() {
            "kid" => match value {
                Value::String(s) => kid = Some(body::kid(&s)?),
                _ => {
                    return Err(ApiError::bad_field(
                        "invalid_kid",
                        "kid",
                        "kid must be a hex string",
                    ))
                }
            },
            "label" => match value {
                Value::String(s) => label = Some(encedo_label(&s)?),
                _ => {
                    return Err(ApiError::bad_field(
                        "invalid_label",
                        "label",
                        "label must be a string",
                    ))
                }
            },
            "descr" => match value {
                Value::Null => {}
                Value::String(s) => descr = Some(description(&s)?),
                _ => {
                    return Err(ApiError::bad_field(
                        "invalid_descr",
                        "descr",
                        "descr must be a base64 string",
                    ))
                }
            },
            other => return Err(unknown_field(other, "an update", &UPDATE_FIELDS)),
        }
    }
    let kid = kid.ok_or_else(|| ApiError::bad_field("missing_kid", "kid", "kid is required"))?;
    let label =
        label.ok_or_else(|| ApiError::bad_field("missing_label", "label", "label is required"))?;
    Ok((
        kid,
        KeyPatch {
            label: Some(label),
            description: Some(descr),
            ..KeyPatch::default()
        },
    ))
}

/// 1..=32 printable ASCII characters, as the appliance enforces.
fn encedo_label(s: &str) -> Result<Label, ApiError> {
    let bad = |m: String| ApiError::bad_field("invalid_label", "label", m);
    if s.is_empty() || s.len() > MAX_LABEL_CHARS {
        return Err(bad(format!(
            "label must be 1..={MAX_LABEL_CHARS} characters; it is {}",
            s.chars().count()
        )));
    }
    if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(bad("label must be printable ASCII (0x20..0x7e)".into()));
    }
    Label::parse(s).map_err(|e| bad(e.into()))
}

/// Standard base64 (padded) of a UTF-8 description within the description limit.
fn description(b64: &str) -> Result<Description, ApiError> {
    let bytes = STANDARD.decode(b64).map_err(|e| {
        ApiError::bad_field(
            "invalid_descr",
            "descr",
            format!("descr is not standard base64: {e}"),
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ApiError::bad_field(
            "invalid_descr",
            "descr",
            "descr does not decode to UTF-8 text",
        )
    })?;
    Description::parse(&text).map_err(|e| ApiError::bad_field("invalid_descr", "descr", e))
}

/// `GET /api/keymgmt/list/{offset}/{limit}`.
pub async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((offset, limit)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    list_page(&state, &p, &offset, body::page_limit(&limit)?)
}

/// `GET /api/keymgmt/list/{offset}`: a page of [`DEFAULT_LIMIT`] keys.
pub async fn list_default(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(offset): Path<String>,
) -> Result<Response, ApiError> {
    list_page(&state, &p, &offset, DEFAULT_LIMIT)
}

fn list_page(
    state: &AppState,
    p: &Principal,
    offset: &str,
    limit: usize,
) -> Result<Response, ApiError> {
    super::require(p, Scope::KeysList)?;
    let offset = offset.parse::<usize>().map_err(|_| {
        ApiError::bad_field(
            "invalid_offset",
            "offset",
            "offset must be a non-negative integer",
        )
    })?;
    let (total, keys) = state.keys.slice(offset, limit).map_err(ApiError::encedo)?;
    let list: Vec<Value> = keys.iter().map(entry).collect();
    Ok(Json(json!({"total": total, "listed": list.len(), "list": list})).into_response())
}

/// One key of a listing: kid, label, type, updated, and descr when it has one.
fn entry(k: &KeyView) -> Value {
    let mut v = json!({
        "kid": k.kid,
        "label": k.label,
        "type": type_string(k),
        "updated": updated(k),
    });
    if let Some(d) = k.description.as_deref().filter(|d| !d.is_empty()) {
        v["descr"] = Value::String(STANDARD.encode(d));
    }
    v
}

/// `GET /api/keymgmt/get/{kid}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(kid): Path<String>,
) -> Result<Response, ApiError> {
    let kid = body::kid(&kid)?;
    if !p.may_use(&kid) {
        return Err(ApiError::missing_scope(&format!(
            "{} or {}",
            Scope::KeysGet,
            Scope::KeysUseOne(kid.clone())
        )));
    }
    let (view, public) = state
        .keys
        .get_with_public(&kid)
        .await
        .map_err(ApiError::encedo)?;
    let mut out = json!({"type": type_string(&view), "updated": updated(&view)});
    if let Some(pk) = public {
        out["pubkey"] = Value::String(STANDARD.encode(pk));
    }
    Ok(Json(out).into_response())
}

/// `GET /api/system/version`: hardware, bootloader and firmware version and the firmware
/// signature, as hsmkeyd fills them: there is no hardware or bootloader of its own, so
/// `hwv` and `blv` name hsmkeyd, `fwv` is its version, `fws` its name and version.
pub async fn version() -> Response {
    let v = env!("CARGO_PKG_VERSION");
    Json(json!({
        "hwv": "hsmkeyd-pkcs11",
        "blv": "hsmkeyd",
        "fwv": v,
        "fws": format!("hsmkeyd {v}"),
    }))
    .into_response()
}

/// `GET /api/system/status`: `fls_state` 0 (no flash fault: hsmkeyd has no flash), the
/// current time (ISO 8601, UTC, seconds) and the seconds since the daemon started.
pub async fn status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    let ts = now
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(Json(json!({
        "fls_state": 0,
        "ts": ts,
        "uptime": state.started.elapsed().as_secs(),
    }))
    .into_response())
}

/// The appliance's names for key types: `AES256`, `SECP256R1`, `ED25519`, `RSA2048`, ...
pub fn type_name(k: &KeyView) -> String {
    let bits = k.bits.map(|b| b.to_string()).unwrap_or_default();
    match (&k.key_type, &k.curve) {
        (KeyType::Aes, _) => format!("AES{bits}"),
        (KeyType::Rsa, _) => format!("RSA{bits}"),
        (KeyType::GenericSecret, _) => match k.bits {
            Some(b @ (256 | 384 | 512)) => format!("SHA2-{b}"),
            _ => "GENERIC_SECRET".into(),
        },
        (KeyType::Ec, Some(Curve::P256)) => "SECP256R1".into(),
        (KeyType::Ec, Some(Curve::P384)) => "SECP384R1".into(),
        (KeyType::Ec, Some(Curve::P521)) => "SECP521R1".into(),
        (KeyType::Ec, Some(curve)) => curve.name().to_ascii_uppercase(),
        (KeyType::Edwards(Curve::X25519) | KeyType::Montgomery(Curve::X25519), _) => {
            "CURVE25519".into()
        }
        (KeyType::Edwards(Curve::X448) | KeyType::Montgomery(Curve::X448), _) => "CURVE448".into(),
        (other, _) => other.name().to_ascii_uppercase().replace('-', "_"),
    }
}

/// The appliance's attribute string: flags, then the algorithm ([`type_name`]) last.
/// `PKEY`: the key has a private half; `ECDH`: an EC or Montgomery key that may derive;
/// `ExDSA`: an EC or Edwards key that may sign.
pub fn type_string(k: &KeyView) -> String {
    let private = matches!(k.class, KeyClass::KeyPair | KeyClass::PrivateOnly);
    let (ec, edwards, montgomery) = (
        k.key_type == KeyType::Ec,
        matches!(k.key_type, KeyType::Edwards(_)),
        matches!(k.key_type, KeyType::Montgomery(_)),
    );
    let mut parts = Vec::new();
    if private {
        parts.push("PKEY".to_string());
    }
    if k.attributes.derive && (ec || montgomery) {
        parts.push("ECDH".to_string());
    }
    if k.attributes.sign && (ec || edwards) {
        parts.push("ExDSA".to_string());
    }
    parts.push(type_name(k));
    parts.join(",")
}

/// `updated`: seconds since the epoch of the last change through hsmkeyd (a create
/// included), else 0, as the appliance always sends a number.
fn updated(k: &KeyView) -> i64 {
    k.updated_at.map_or(0, |t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn type_names_follow_the_appliance() {
        let name = |key_type, curve, bits| {
            let mut v = KeyView::example(key_type, curve);
            v.bits = bits;
            type_name(&v)
        };
        for (k, c, bits, want) in [
            (KeyType::Aes, None, Some(256), "AES256"),
            (KeyType::Rsa, None, Some(2048), "RSA2048"),
            (KeyType::GenericSecret, None, Some(256), "SHA2-256"),
            (KeyType::GenericSecret, None, Some(512), "SHA2-512"),
            (KeyType::GenericSecret, None, Some(128), "GENERIC_SECRET"),
            (KeyType::Ec, Some(Curve::P256), None, "SECP256R1"),
            (KeyType::Ec, Some(Curve::P384), None, "SECP384R1"),
            (KeyType::Ec, Some(Curve::P521), None, "SECP521R1"),
            (KeyType::Ec, Some(Curve::Secp256k1), None, "SECP256K1"),
            (
                KeyType::Ec,
                Some(Curve::BrainpoolP256r1),
                None,
                "BRAINPOOLP256R1",
            ),
            (KeyType::Edwards(Curve::Ed25519), None, None, "ED25519"),
            (KeyType::Montgomery(Curve::X25519), None, None, "CURVE25519"),
            (KeyType::Montgomery(Curve::X448), None, None, "CURVE448"),
            (
                KeyType::Other("sha256-hmac".into()),
                None,
                None,
                "SHA256_HMAC",
            ),
            (KeyType::Unknown, None, None, "UNKNOWN"),
        ] {
            assert_eq!(name(k, c, bits), want);
        }
    }

    #[test]
    fn type_strings_put_the_flags_before_the_algorithm() {
        let with = |key_type, curve, class, sign, derive| {
            let mut v = KeyView::example(key_type, curve);
            v.class = class;
            v.attributes.sign = sign;
            v.attributes.derive = derive;
            v.bits = Some(256);
            type_string(&v)
        };
        let p256 = Some(Curve::P256);
        for (k, c, class, sign, derive, want) in [
            (
                KeyType::Ec,
                p256.clone(),
                KeyClass::KeyPair,
                true,
                true,
                "PKEY,ECDH,ExDSA,SECP256R1",
            ),
            (
                KeyType::Ec,
                p256.clone(),
                KeyClass::KeyPair,
                true,
                false,
                "PKEY,ExDSA,SECP256R1",
            ),
            (
                KeyType::Ec,
                p256.clone(),
                KeyClass::PrivateOnly,
                false,
                true,
                "PKEY,ECDH,SECP256R1",
            ),
            (
                KeyType::Ec,
                p256,
                KeyClass::PublicOnly,
                false,
                false,
                "SECP256R1",
            ),
            (
                KeyType::Edwards(Curve::Ed25519),
                None,
                KeyClass::KeyPair,
                true,
                false,
                "PKEY,ExDSA,ED25519",
            ),
            (
                KeyType::Montgomery(Curve::X25519),
                None,
                KeyClass::KeyPair,
                false,
                true,
                "PKEY,ECDH,CURVE25519",
            ),
            (
                KeyType::Rsa,
                None,
                KeyClass::KeyPair,
                true,
                false,
                "PKEY,RSA256",
            ),
            (KeyType::Aes, None, KeyClass::Secret, true, true, "AES256"),
        ] {
            assert_eq!(with(k, c, class, sign, derive), want);
        }
    }

    #[test]
    fn update_body_follows_the_appliance() {
        let (kid, p) = update_body(fields(
            json!({"kid": "0A0B", "label": "x", "descr": "aMOpbGxv"}),
        ))
        .unwrap();
        assert_eq!(kid.as_str(), "0a0b");
        assert_eq!(p.description.unwrap().unwrap().as_str(), "héllo");
        let (_, p) = update_body(fields(json!({"kid": "0a0b", "label": "x"}))).unwrap();
        assert_eq!(p.description, Some(None), "no descr clears the description");
        for (body, code) in [
            (json!({"kid": "0a0b"}), "missing_label"),
            (json!({"label": "x"}), "missing_kid"),
            (json!({"kid": "0a0b", "label": ""}), "invalid_label"),
            (
                json!({"kid": "0a0b", "label": "a".repeat(33)}),
                "invalid_label",
            ),
            (
                json!({"kid": "0a0b", "label": "tab\there"}),
                "invalid_label",
            ),
            (json!({"kid": "0a0b", "label": "é"}), "invalid_label"),
            (
                json!({"kid": "0a0b", "label": "x", "descr": "!!"}),
                "invalid_descr",
            ),
            (
                json!({"kid": "0a0b", "label": "x", "descr": "//79"}),
                "invalid_descr",
            ),
            (
                json!({"kid": "0a0b", "label": "x", "descr": 5}),
                "invalid_descr",
            ),
            (
                json!({"kid": "0a0b", "label": "x", "desc": ""}),
                "unknown_field",
            ),
            (json!({"kid": "xyz", "label": "x"}), "invalid_kid"),
        ] {
            assert_eq!(
                update_body(fields(body.clone())).unwrap_err().code(),
                code,
                "{body}"
            );
        }
        assert!(update_body(fields(json!({"kid": "0a0b", "label": "a".repeat(32)}))).is_ok());
    }
}
