//! Request parsing: JSON bodies (content type, size, shape) and the listing query. Every
//! failure is an [`ApiError`] naming the field at fault.

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::deadline::BodyStalled;
use super::error::ApiError;
use crate::keys::model::{Description, Kid, Label, RoleName};
use crate::keys::{KeyPatch, ListQuery, UsageFlag, MAX_PAGE};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// Checks the content type is JSON (`application/json` or `application/merge-patch+json`,
/// parameters allowed) and reads at most [`MAX_BODY`] bytes of an object.
pub async fn json_object(
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Map<String, Value>, ApiError> {
    json_object_within(headers, body, MAX_BODY).await
}

/// [`json_object`] with a body limit of `max` bytes.
pub async fn json_object_within(
    headers: &HeaderMap,
    body: axum::body::Body,
    max: usize,
) -> Result<Map<String, Value>, ApiError> {
    const ACCEPTED: &str = "application/json or application/merge-patch+json";
    let ct = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = ct.as_deref().map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    match essence.as_deref() {
        Some("application/json") | Some("application/merge-patch+json") => {}
        _ => return Err(ApiError::unsupported_media_type(ct.as_deref(), ACCEPTED)),
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::too_large(max));
    }
    let bytes = axum::body::to_bytes(body, max)
        .await
        .map_err(|e| read_error(e, max))?;
    let body: Body = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    match body {
        Body::Object(m) => Ok(m),
        Body::Duplicate(name) => Err(ApiError::bad_field(
            "duplicate_field",
            &name,
            format!("field {name:?} is given twice; send each field once"),
        )),
        Body::NotObject => Err(ApiError::bad_request(
            "invalid_json",
            "request body must be a JSON object",
        )),
    }
}

/// A request body as parsed: an object whose fields are unique (serde_json alone keeps the
/// last of two equal keys, so `{"label":"a","label":"b"}` would pass as "b").
enum Body {
    Object(Map<String, Value>),
    Duplicate(String),
    NotObject,
}

impl<'de> serde::Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Body, D::Error> {
        d.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> serde::de::Visitor<'de> for BodyVisitor {
    type Value = Body;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Body, A::Error> {
        let mut m = Map::new();
        let mut duplicate = None;
        while let Some(k) = a.next_key::<String>()? {
            let v: Value = a.next_value()?;
            if m.contains_key(&k) {
                let _ = duplicate.get_or_insert(k);
            } else {
                let _ = m.insert(k, v);
            }
        }
        Ok(duplicate.map_or(Body::Object(m), Body::Duplicate))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Body, A::Error> {
        while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Body::NotObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Body, E> {
        Ok(Body::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Body, E> {
        Ok(Body::NotObject)
    }

    fn visit_unit<E>(self) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
}

/// Why a body read failed: over the limit (413), too slow (408), or cut short by the client
/// (400 `body_incomplete`, which the audit entry records as an aborted request).
fn read_error(e: axum::Error, max: usize) -> ApiError {
    let inner = e.into_inner();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*inner);
    while let Some(c) = cause {
        if let Some(stall) = c.downcast_ref::<BodyStalled>() {
            return ApiError::request_timeout(&stall.to_string());
        }
        if c.is::<http_body_util::LengthLimitError>() {
            return ApiError::too_large(max);
        }
        cause = c.source();
    }
    ApiError::body_incomplete()
}

/// The fields a key update (PATCH) accepts, and only these: a field the parser below
/// handles must be listed here, and the OpenAPI schema `KeyPatch` has exactly these
/// (`api::openapi` tests tie them).
pub const PATCH_FIELDS: &[&str] = &[
    "label",
    "description",
    "roles",
    "usage",
    "sensitive",
    "extractable",
    "not_before",
    "not_after",
];

fn unknown_patch_field(name: &str) -> ApiError {
    ApiError::bad_field(
        "unknown_field",
        name,
        format!(
            "unknown field {name:?}; a key update accepts {}",
            PATCH_FIELDS.join(", ")
        ),
    )
}

/// Turns a PATCH body into a validated [`KeyPatch`].
pub fn key_patch(body: Map<String, Value>) -> Result<KeyPatch, ApiError> {
    let mut patch = KeyPatch::default();
    for (name, value) in body {
        if !PATCH_FIELDS.contains(&name.as_str()) {
            return Err(unknown_patch_field(&name));
        }
        match name.as_str() {
            "label" => {
                let Value::String(s) = value else {
                    return Err(ApiError::bad_field(
                        "invalid_label",
                        "label",
                        "label must be a string",
                    ));
                };
                patch.label = Some(
                    Label::parse(&s)
                        .map_err(|e| ApiError::bad_field("invalid_label", "label", e))?,
                );
            }
            "description" => {
                patch.description = Some(match value {
                    Value::Null => None,
                    Value::String(s) => Some(Description::parse(&s).map_err(|e| {
                        ApiError::bad_field("invalid_description", "description", e)
                    })?),
                    _ => {
                        return Err(ApiError::bad_field(
                            "invalid_description",
                            "description",
                            "description must be a string, or null to clear it",
                        ))
                    }
                });
            }
            "roles" => {
                patch.roles = Some(match value {
                    Value::Null => None,
                    Value::Array(items) => Some(roles(items)?),
                    _ => {
                        return Err(ApiError::bad_field(
                            "invalid_roles",
                            "roles",
                            "roles must be an array of role names, or null to clear them",
                        ))
                    }
                });
            }
            "usage" => patch.usage = usage_flags(value)?,
            "sensitive" => patch.sensitive = Some(flag("sensitive", value)?),
            "extractable" => patch.extractable = Some(flag("extractable", value)?),
            "not_before" => patch.not_before = Some(date("not_before", value)?),
            "not_after" => patch.not_after = Some(date("not_after", value)?),
            other => return Err(unknown_patch_field(other)),
        }
    }
    if patch.is_empty() {
        return Err(ApiError::bad_request(
            "empty_patch",
            format!(
                "the update names no field; send at least one of {}",
                PATCH_FIELDS.join(", ")
            ),
        ));
    }
    if let (Some(Some(from)), Some(Some(to))) = (patch.not_before, patch.not_after) {
        crate::keys::check_validity(Some(from), Some(to), "not_after")?;
    }
    Ok(patch)
}

/// `true` or `false`.
fn flag(name: &'static str, value: Value) -> Result<bool, ApiError> {
    value.as_bool().ok_or_else(|| {
        ApiError::bad_field(
            "invalid_field",
            name,
            format!("{name} must be true or false"),
        )
    })
}

/// A date `YYYY-MM-DD`, or null (the empty date).
pub fn date(name: &'static str, value: Value) -> Result<Option<time::Date>, ApiError> {
    let bad = |why: String| ApiError::bad_field("invalid_date", name, why);
    match value {
        Value::Null => Ok(None),
        Value::String(s) => time::Date::parse(&s, crate::keys::meta::DATE_FORMAT)
            .map(Some)
            .map_err(|e| bad(format!("{name} {s:?} is not a date YYYY-MM-DD ({e})"))),
        _ => Err(bad(format!(
            "{name} must be a date YYYY-MM-DD, or null to clear it"
        ))),
    }
}

/// A `usage` object: `{"sign": true, ...}`, at least one known flag, each a boolean.
/// Whether a flag makes sense for the key's type is for the key domain to say.
pub fn usage_flags(value: Value) -> Result<BTreeMap<UsageFlag, bool>, ApiError> {
    let Value::Object(m) = value else {
        return Err(ApiError::bad_field(
            "invalid_usage",
            "usage",
            "usage is an object of booleans, e.g. {\"sign\": true}",
        ));
    };
    let mut out = BTreeMap::new();
    for (name, v) in m {
        let Some(f) = UsageFlag::parse(&name) else {
            return Err(ApiError::bad_field(
                "invalid_usage",
                "usage",
                format!(
                    "unknown usage flag {name:?}; flags are sign, verify, encrypt, decrypt, \
                     wrap, unwrap and derive"
                ),
            ));
        };
        let Some(on) = v.as_bool() else {
            return Err(ApiError::bad_field(
                "invalid_usage",
                f.field(),
                format!("usage.{name} must be true or false"),
            ));
        };
        let _ = out.insert(f, on);
    }
    if out.is_empty() {
        return Err(ApiError::bad_field(
            "invalid_usage",
            "usage",
            "usage names no flag",
        ));
    }
    Ok(out)
}

fn roles(items: Vec<Value>) -> Result<Vec<RoleName>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::bad_field(
            "invalid_roles",
            "roles",
            "roles must not be empty; send null to clear them",
        ));
    }
    let mut out: Vec<RoleName> = Vec::new();
    for item in items {
        let Value::String(s) = item else {
            return Err(ApiError::bad_field(
                "invalid_roles",
                "roles",
                "every role must be a string",
            ));
        };
        let role =
            RoleName::parse(&s).map_err(|e| ApiError::bad_field("invalid_roles", "roles", e))?;
        if !out.contains(&role) {
            out.push(role);
        }
    }
    Ok(out)
}

/// Parses a kid from the path.
pub fn kid(s: &str) -> Result<Kid, ApiError> {
    Kid::parse(s).map_err(|e| ApiError::bad_field("invalid_kid", "kid", e))
}

/// The opaque cursor of the page after `kid`.
pub fn cursor_of(kid: &Kid) -> String {
    URL_SAFE_NO_PAD.encode(format!("after:{kid}"))
}

/// Parses `limit`, `cursor`, `label`, `label_prefix` and `expires_before`; anything else
/// is refused.
pub fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: DEFAULT_PAGE,
        ..ListQuery::default()
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("bad query string: {e}")))?;
    let mut seen = Vec::new();
    for (k, v) in pairs {
        if seen.contains(&k) {
            return Err(ApiError::bad_field(
                "invalid_query",
                &k,
                format!("query parameter {k} is given twice"),
            ));
        }
        match k.as_str() {
            "limit" => q.limit = page_limit(&v)?,
            "cursor" => {
                let bad = || {
                    ApiError::bad_field(
                        "invalid_cursor",
                        "cursor",
                        "cursor is not one this daemon issued; use next_cursor from a listing",
                    )
                };
                let text = URL_SAFE_NO_PAD.decode(v.as_bytes()).map_err(|_| bad())?;
                let text = String::from_utf8(text).map_err(|_| bad())?;
                let kid = text.strip_prefix("after:").ok_or_else(bad)?;
                q.after = Some(Kid::parse(kid).map_err(|_| bad())?);
            }
            "label" => q.label = Some(v),
            "label_prefix" => q.label_prefix = Some(v),
            "expires_before" => {
                q.expires_before = date("expires_before", Value::String(v))?;
            }
            other => {
                return Err(ApiError::bad_field(
                    "invalid_query",
                    other,
                    format!(
                        "unknown query parameter {other:?}; accepted: limit, cursor, label, \
                         label_prefix, expires_before"
                    ),
                ))
            }
        }
        seen.push(k);
    }
    Ok(q)
}

/// `?dry_run=true|false`, the only query a changing request takes.
pub fn dry_run(raw: Option<&str>) -> Result<bool, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("bad query string: {e}")))?;
    let mut dry = None;
    for (k, v) in pairs {
        match (k.as_str(), v.as_str(), dry) {
            ("dry_run", _, Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    "query parameter dry_run is given twice",
                ))
            }
            ("dry_run", "true", None) => dry = Some(true),
            ("dry_run", "false", None) => dry = Some(false),
            ("dry_run", other, None) => {
                return Err(ApiError::bad_field(
                    "invalid_dry_run",
                    "dry_run",
                    format!("dry_run is true or false, not {other:?}"),
                ))
            }
            (other, _, _) => {
                return Err(ApiError::bad_field(
                    "invalid_query",
                    "query",
                    format!("unknown query parameter {other:?}; this request takes dry_run"),
                ))
            }
        }
    }
    Ok(dry.unwrap_or(false))
}

/// A page size: an integer in 1..=[`MAX_PAGE`] (`limit` of both listings).
pub fn page_limit(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::bad_field(
                "invalid_limit",
                "limit",
                format!("limit must be an integer in 1..={MAX_PAGE}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: Value) -> Result<KeyPatch, ApiError> {
        key_patch(v.as_object().unwrap().clone())
    }

    #[test]
    fn patch_fields_are_validated_and_named() {
        assert_eq!(patch(json!({})).unwrap_err().code(), "empty_patch");
        assert_eq!(
            patch(json!({"lable": "x"})).unwrap_err().field(),
            Some("lable")
        );
        assert_eq!(
            patch(json!({"label": 5})).unwrap_err().code(),
            "invalid_label"
        );
        assert_eq!(
            patch(json!({"label": null})).unwrap_err().code(),
            "invalid_label"
        );
        assert_eq!(
            patch(json!({"roles": []})).unwrap_err().code(),
            "invalid_roles"
        );
        let p = patch(json!({"roles": ["a", "a", "b"], "description": null})).unwrap();
        assert_eq!(p.roles.unwrap().unwrap().len(), 2);
        assert_eq!(p.description, Some(None));
    }

    #[test]
    fn list_query_checks_limit_and_cursor() {
        assert_eq!(list_query(None).unwrap().limit, DEFAULT_PAGE);
        assert!(list_query(Some("limit=0")).is_err());
        assert!(list_query(Some("limit=1001")).is_err());
        assert!(list_query(Some("cursor=zzz")).is_err());
        assert!(list_query(Some("foo=1")).is_err());
        let kid = Kid::parse("0a0b").unwrap();
        let q = list_query(Some(&format!("cursor={}", cursor_of(&kid)))).unwrap();
        assert_eq!(q.after, Some(kid));
    }
}
