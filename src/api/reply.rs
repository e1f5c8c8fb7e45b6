//! Success bodies: a handler answers with a [`Reply`], which the audit layer renders into
//! the body once it knows the request's `audit_id` ([`render`]), from a `serde_json::Value`
//! or, for a body whose names serialize in byte order, straight from the handler's value.

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;

/// A JSON success body, rendered by the audit layer ([`super::audited::layer`]) (which adds `audit_id` on changing routes).
#[derive(Debug, Clone)]
pub struct Reply(ReplyBody);

#[derive(Debug, Clone)]
enum ReplyBody {
    /// A value; `audit_id` is inserted into it.
    Value(Value),
    /// A JSON object already written, its names in byte order and each after `audit_id`
    /// ([`reply_sorted`]): `audit_id` goes first, where a `Value`'s sorted map puts it.
    Sorted(Vec<u8>),
}

/// A 200 answer with this JSON body.
pub fn reply(body: Value) -> Response {
    reply_with(axum::http::StatusCode::OK, body)
}

/// An answer with this status and JSON body.
pub fn reply_with(status: axum::http::StatusCode, body: Value) -> Response {
    json_answer(status, ReplyBody::Value(body))
}

/// A 200 answer with `body` written straight, without a `Value` in between: for a body
/// that serializes as a JSON object with its names in byte order, each sorting after
/// `audit_id` (such as `{"changed", "key"}` with a `KeyView`), so that the answer has the
/// bytes [`reply`] would give it.
pub fn reply_sorted(body: &impl serde::Serialize) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(json_answer(
        axum::http::StatusCode::OK,
        ReplyBody::Sorted(bytes),
    ))
}

fn json_answer(status: axum::http::StatusCode, body: ReplyBody) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    let _ = r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let _ = r.extensions_mut().insert(Reply(body));
    r
}

/// Writes a [`Reply`] into the body, and `audit_id` into the JSON body of an audited answer.
pub(super) fn render(
    mut resp: Response,
    error: Option<&ApiError>,
    audit_id: Option<&str>,
) -> Response {
    let body = match (resp.extensions_mut().remove::<Reply>(), error) {
        (Some(Reply(ReplyBody::Value(mut value))), _) => {
            if let (Some(obj), Some(id)) = (value.as_object_mut(), audit_id) {
                let _ = obj.insert("audit_id".into(), Value::String(id.to_string()));
            }
            serde_json::to_vec(&value).unwrap_or_default()
        }
        (Some(Reply(ReplyBody::Sorted(object))), _) => match audit_id {
            Some(id) => audit_id_first(&object, id),
            None => object,
        },
        (None, Some(e)) if audit_id.is_some() => e.body(audit_id),
        _ => return resp,
    };
    let _ = resp.headers_mut().remove(header::CONTENT_LENGTH);
    *resp.body_mut() = Body::from(body);
    resp
}

/// `{"audit_id":"<id>", ...}`: `object` (a JSON object) with `audit_id` as its first name.
fn audit_id_first(object: &[u8], id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(object.len() + id.len() + 16);
    out.extend_from_slice(b"{\"audit_id\":");
    // A string always serializes.
    let _ = serde_json::to_writer(&mut out, id);
    match object.get(1..) {
        Some(b"}") | None => out.push(b'}'),
        Some(rest) => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::model::{Curve, KeyState, KeyType, KeyView};
    use axum::response::Response;

    fn rendered(r: Response, audit_id: Option<&str>) -> Vec<u8> {
        let mut r = render(r, None, audit_id);
        let body = std::mem::take(r.body_mut());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(axum::body::to_bytes(body, usize::MAX))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_sorted_reply_has_the_bytes_of_the_same_value() {
        #[derive(serde::Serialize)]
        struct Updated<'a> {
            changed: Vec<&'a str>,
            key: &'a KeyView,
        }
        let mut odd = KeyView::example(KeyType::Ec, Some(Curve::P256));
        odd.bits = Some(256);
        odd.description = Some("d \"q\"".into());
        odd.state = KeyState::Inconsistent("two labels".into());
        odd.not_after = Some(time::macros::date!(2030 - 01 - 02));
        odd.updated_at = Some(time::macros::datetime!(2026-12-06 21:00 UTC));
        for key in [KeyView::example(KeyType::Aes, None), odd] {
            for changed in [vec![], vec!["label", "roles"]] {
                let body = Updated {
                    changed: changed.clone(),
                    key: &key,
                };
                let value = serde_json::to_value(&body).unwrap();
                for id in [None, Some("0123abcd")] {
                    let fast = rendered(reply_sorted(&body).unwrap(), id);
                    let slow = rendered(reply(value.clone()), id);
                    assert_eq!(
                        String::from_utf8(fast).unwrap(),
                        String::from_utf8(slow).unwrap()
                    );
                }
            }
        }
        assert_eq!(audit_id_first(b"{}", "x"), b"{\"audit_id\":\"x\"}");
    }
}
