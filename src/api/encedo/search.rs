//! `POST /api/keymgmt/search`: keys by description, as the appliance finds them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::super::error::ApiError;
use super::super::{body, AppState};
use super::{entry, unknown_field, DEFAULT_LIMIT, MAX_BODY};
use crate::auth::Principal;
use crate::keys::model::KeyView;
use crate::values::Scope;

/// `POST /api/keymgmt/search`.
pub async fn search(
    State(state): State<AppState>,
    Extension(p): Extension<Arc<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !p.has(&Scope::KeysSearch) && !p.has(&Scope::KeysList) {
        return Err(ApiError::missing_scope(&format!(
            "{} or {}",
            Scope::KeysSearch,
            Scope::KeysList
        )));
    }
    if !headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ApiError::length_required());
    }
    let q = search_body(body::json_object_within(&headers, body, MAX_BODY).await?)?;
    let (_, keys) = state.keys.slice(0, usize::MAX).map_err(ApiError::encedo)?;
    let found: Vec<&KeyView> = keys.iter().filter(|k| q.matches(k)).collect();
    if found.is_empty() {
        return Err(ApiError::no_key_matches());
    }
    let list: Vec<Value> = found
        .iter()
        .skip(q.offset)
        .take(q.limit)
        .map(|k| entry(k))
        .collect();
    Ok(Json(json!({
        "offset": q.offset,
        "total": found.len(),
        "listed": list.len(),
        "list": list,
    }))
    .into_response())
}

/// A search: the decoded pattern, whether it must start the description, and the page.
#[derive(Debug, PartialEq)]
struct Search {
    pattern: Vec<u8>,
    prefix: bool,
    offset: usize,
    limit: usize,
}

impl Search {
    fn matches(&self, k: &KeyView) -> bool {
        let Some(d) = k.description.as_deref().map(str::as_bytes) else {
            return false;
        };
        if self.prefix {
            d.starts_with(&self.pattern)
        } else {
            d.windows(self.pattern.len()).any(|w| w == self.pattern)
        }
    }
}

/// The fields of `POST /api/keymgmt/search`, and only these (the OpenAPI schema
/// `EncedoSearch` has exactly these; `api::openapi` tests tie them).
pub(in crate::api) const SEARCH_FIELDS: [&str; 3] = ["descr", "offset", "limit"];

/// Validates `{"descr", "offset"?, "limit"?}`.
fn search_body(fields: Map<String, Value>) -> Result<Search, ApiError> {
    let number = |code: &'static str, name: &str, v: &Value| {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::bad_field(code, name, format!("{name} must be a non-negative integer"))
            })
    };
    let (mut descr, mut offset, mut limit) = (None, 0, DEFAULT_LIMIT);
    for (name, value) in fields {
        if !SEARCH_FIELDS.contains(&name.as_str()) {
            return Err(unknown_field(&name, "a search", &SEARCH_FIELDS));
        }
        match name.as_str() {
            "descr" => match value {
                Value::String(s) => descr = Some(s),
                _ => {
                    return Err(ApiError::bad_field(
                        "invalid_descr",
                        "descr",
                        "descr must be a base64 string, optionally after ^",
                    ))
                }
            },
            "offset" => offset = number("invalid_offset", "offset", &value)?,
            "limit" => limit = body::page_limit(&value.to_string())?,
            other => return Err(unknown_field(other, "a search", &SEARCH_FIELDS)),
        }
    }
    let descr =
        descr.ok_or_else(|| ApiError::bad_field("missing_descr", "descr", "descr is required"))?;
    let (prefix, b64) = match descr.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, descr.as_str()),
    };
    let pattern = STANDARD.decode(b64).map_err(|e| {
        ApiError::bad_field(
            "invalid_descr",
            "descr",
            format!("descr is not standard base64 (after an optional ^): {e}"),
        )
    })?;
    if pattern.is_empty() {
        return Err(ApiError::bad_field(
            "invalid_descr",
            "descr",
            "descr must not be empty; list the keys to see them all",
        ));
    }
    Ok(Search {
        pattern,
        prefix,
        offset,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::model::KeyType;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn search_bodies_and_matching_follow_the_appliance() {
        let q = |v: Value| search_body(fields(v));
        let s = q(json!({"descr": format!("^{}", STANDARD.encode("pay"))})).unwrap();
        assert_eq!((s.prefix, s.offset, s.limit), (true, 0, DEFAULT_LIMIT));
        let with = |d: Option<&str>| {
            let mut v = KeyView::example(KeyType::Aes, None);
            v.description = d.map(str::to_string);
            v
        };
        assert!(s.matches(&with(Some("payments"))));
        assert!(!s.matches(&with(Some("old payments"))));
        assert!(!s.matches(&with(None)));
        let s = q(json!({"descr": STANDARD.encode("pay"), "offset": 2, "limit": 5})).unwrap();
        assert_eq!((s.prefix, s.offset, s.limit), (false, 2, 5));
        assert!(s.matches(&with(Some("old payments"))));
        assert!(!s.matches(&with(Some("pa"))));
        for (body, code) in [
            (json!({}), "missing_descr"),
            (json!({"descr": ""}), "invalid_descr"),
            (json!({"descr": "^"}), "invalid_descr"),
            (json!({"descr": "!!"}), "invalid_descr"),
            (json!({"descr": 5}), "invalid_descr"),
            (json!({"descr": "cGF5", "limit": 0}), "invalid_limit"),
            (json!({"descr": "cGF5", "limit": 1001}), "invalid_limit"),
            (json!({"descr": "cGF5", "offset": -1}), "invalid_offset"),
            (json!({"descr": "cGF5", "label": "x"}), "unknown_field"),
        ] {
            assert_eq!(q(body.clone()).unwrap_err().code(), code, "{body}");
        }
    }
}
