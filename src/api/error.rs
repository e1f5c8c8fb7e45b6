//! The one place where errors become HTTP: status code, `error` code and JSON body
//! `{"error": "<code>", "message": "<sentence>", "field": "<name>"}`, the 418 the TLS port
//! writes to clear-text clients included. It is also where an error's audit outcome and
//! its kind of refusal are decided, so the audit layer never reasons about status codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::audit::Outcome;
use crate::auth::authenticate::AuthError;
use crate::auth::encedo::LoginError;
use crate::keys::KeyError;

/// An error response. Made only by the constructors below, so the status and the code
/// always agree.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    /// `WWW-Authenticate` challenge of a 401 on the TLS front door.
    challenge: Option<&'static str>,
    /// Members the body carries beside `error`, `message` and `field` (a batch's
    /// failures).
    details: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

/// What kind of refusal an error is, for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller could not be identified (401).
    Unauthenticated,
    /// A known caller lacks a scope or role (403).
    Forbidden,
    /// Anything else: bad input, a failed operation, an unavailable token.
    Other,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_id: Option<&'a str>,
}

impl ApiError {
    /// Machine-readable code (snake_case).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// One clear sentence. Never holds secrets.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The request field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The HTTP status, as recorded in audit entries (`HSMKEYD_STATUS`).
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// The audit outcome: FAILED when the operation failed (the HSM refused, the key is
    /// inconsistent or not modifiable, 5xx), ERROR when the request was wrong.
    pub fn outcome(&self) -> Outcome {
        match self.status {
            StatusCode::NOT_ACCEPTABLE | StatusCode::CONFLICT => Outcome::Failed,
            s if s.is_server_error() => Outcome::Failed,
            _ => Outcome::Error,
        }
    }

    /// Whether this refuses the caller itself (401, 403) or the request.
    pub fn refusal(&self) -> Refusal {
        match self.status {
            StatusCode::UNAUTHORIZED => Refusal::Unauthenticated,
            StatusCode::FORBIDDEN => Refusal::Forbidden,
            _ => Refusal::Other,
        }
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            challenge: None,
            details: None,
        }
    }

    /// 400 on one field.
    pub fn bad_field(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    /// 400 on the request as a whole.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The same error with its field named inside `prefix` (`description` becomes
    /// `patch.description`), for a value nested in a larger body.
    pub fn within(mut self, prefix: &str) -> ApiError {
        if let Some(f) = &self.field {
            self.field = Some(format!("{prefix}.{f}"));
        }
        self
    }

    /// 409: a batch update in which some keys failed their checks, so nothing was written.
    /// `details` lists them (`failures`) and names the batch.
    pub fn batch_refused(
        failed: usize,
        selected: usize,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> ApiError {
        ApiError {
            details: Some(Box::new(details)),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "batch_refused",
                format!(
                    "{failed} of the {selected} selected keys failed their checks, so no key                      was changed; see failures"
                ),
            )
        }
    }

    /// A batch update whose writes failed part-way: the status `cause` (the first failed
    /// write) has, code `batch_failed`; `details` says which keys were set back.
    pub fn batch_failed(
        cause: &ApiError,
        message: String,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> ApiError {
        ApiError {
            details: Some(Box::new(details)),
            ..ApiError::new(cause.status, "batch_failed", message)
        }
    }

    /// 401 on TLS without a bearer token (RFC 6750: a bare challenge).
    pub fn token_missing() -> ApiError {
        ApiError {
            challenge: Some("Bearer realm=\"hsmkeyd\""),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this request needs an Authorization: Bearer token",
            )
        }
    }

    /// 401 on TLS for a token that is malformed, expired, badly signed or untrusted.
    pub fn invalid_token(message: impl Into<String>) -> ApiError {
        ApiError {
            challenge: Some("Bearer realm=\"hsmkeyd\", error=\"invalid_token\""),
            ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
        }
    }

    /// 403 for a token request over TLS: tokens are minted over the Unix socket only.
    pub fn unix_socket_only() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "unix_socket_only",
            "bearer tokens are minted over the Unix socket only",
        )
    }

    /// 401: the caller is not known.
    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403: the caller lacks a scope.
    pub fn missing_scope(scope: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_scope",
            format!("this operation needs scope {scope}"),
        )
    }

    /// 404 for a path that names no endpoint.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint at {path}"),
        )
    }

    /// 404: an Encedo search that matched no key, as the appliance answers it.
    pub fn no_key_matches() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_key_matches",
            "no key's description matches the pattern",
        )
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 403: `keys.allow_delete` is false.
    pub fn delete_disabled() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "delete_disabled",
            "deleting keys through the API is turned off on this host (keys.allow_delete)",
        )
    }

    /// 406: the key has no public half to show (a secret key, or a private key stored
    /// without its public part).
    pub fn no_public_key(kid: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "no_public_key",
            format!("key {kid} has no public key to show"),
        )
    }

    /// 411: the Encedo endpoints, like the appliance, want a Content-Length.
    pub fn length_required() -> ApiError {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "this endpoint needs a Content-Length header (chunked bodies are not accepted)",
        )
    }

    /// A domain error on an Encedo-compatible endpoint: as the appliance, an unknown key is
    /// 406 (operation failed) rather than 404; everything else maps as on `/v1`.
    pub fn encedo(e: KeyError) -> ApiError {
        match e {
            KeyError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_ACCEPTABLE, "key_not_found", e.to_string())
            }
            other => other.into(),
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is over the {limit}-byte limit"),
        )
    }

    /// 400: the body ended before its declared length (the client closed the connection).
    pub fn body_incomplete() -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "body_incomplete",
            "the request body ended before its declared length; nothing was done",
        )
    }

    /// 408: the body did not arrive within the request deadline or at the minimum rate.
    pub fn request_timeout(why: &str) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("{why}; nothing was done and the connection is closed"),
        )
    }

    /// 503: the caller already holds as many connections as it may.
    pub fn too_many_connections(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            message,
        )
    }

    /// 415.
    pub fn unsupported_media_type(got: Option<&str>, accepted: &str) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            match got {
                Some(g) => format!("content type {g:?} is not accepted; send {accepted}"),
                None => format!("the request has no Content-Type; send {accepted}"),
            },
        )
    }

    /// 503: the token did not answer.
    pub fn token_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "token_unavailable",
            "the token is unavailable; retry later",
        )
    }

    /// 503: the audit trail did not take the entry, so the request was refused.
    pub fn audit_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit trail is unavailable, so nothing was done; retry later",
        )
    }

    /// 500 with a generic message; the detail goes to the log only.
    pub fn internal(detail: &str) -> ApiError {
        tracing::error!(detail, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; the daemon log has the details",
        )
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        let message = e.to_string();
        match e {
            KeyError::Invalid { code, field, .. } => ApiError {
                field: field.map(str::to_string),
                ..ApiError::new(StatusCode::BAD_REQUEST, code, message)
            },
            KeyError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "key_not_found", message),
            KeyError::MissingRole { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "missing_role", message)
            }
            KeyError::NotModifiable(_) => {
                ApiError::new(StatusCode::NOT_ACCEPTABLE, "key_not_modifiable", message)
            }
            KeyError::NoSuchLabel(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "key_not_found", message)
            }
            KeyError::LabelAmbiguous { .. } => {
                ApiError::new(StatusCode::CONFLICT, "label_ambiguous", message)
            }
            KeyError::LabelTaken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "label_taken", message)
            }
            KeyError::KidTaken(_) => ApiError::new(StatusCode::CONFLICT, "kid_taken", message),
            KeyError::NotDestroyable(_) => {
                ApiError::new(StatusCode::NOT_ACCEPTABLE, "key_not_destroyable", message)
            }
            KeyError::HsmRefused { .. } => {
                ApiError::new(StatusCode::NOT_ACCEPTABLE, "hsm_refused", message)
            }
            KeyError::Inconsistent { .. } => {
                ApiError::new(StatusCode::CONFLICT, "inconsistent_key_state", message)
            }
            KeyError::PreconditionFailed { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                message,
            ),
            KeyError::Unavailable(_) => {
                tracing::warn!(error = %message, "token unavailable");
                ApiError::token_unavailable()
            }
            KeyError::NotRecorded(d) => {
                tracing::error!(error = %d, "update refused: its intent entry was not recorded");
                ApiError::audit_unavailable()
            }
            KeyError::Internal(d) => ApiError::internal(&d),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::TokenMissing => ApiError::token_missing(),
            AuthError::InvalidToken(why) => ApiError::invalid_token(why),
            AuthError::NoPeerCredentials => {
                ApiError::unauthenticated("the connection carries no peer credentials")
            }
            AuthError::UnknownPeer(peer) => ApiError::unauthenticated(format!(
                "uid {} / gid {} maps to no principal in the configuration",
                peer.uid, peer.gid
            )),
        }
    }
}

impl From<LoginError> for ApiError {
    /// An Encedo login's refusal: 400 for an answer not of the appliance's form, 401 for
    /// one that does not authenticate, 403 for a scope the user does not hold.
    fn from(e: LoginError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match e {
            LoginError::Malformed(_) => (StatusCode::BAD_REQUEST, "invalid_auth"),
            LoginError::WrongAudience => (StatusCode::UNAUTHORIZED, "wrong_audience"),
            LoginError::UnknownUser => (StatusCode::UNAUTHORIZED, "unknown_user"),
            LoginError::BadSignature => (StatusCode::UNAUTHORIZED, "bad_signature"),
            LoginError::UnknownChallenge => (StatusCode::UNAUTHORIZED, "unknown_challenge"),
            LoginError::ChallengeExpired => (StatusCode::UNAUTHORIZED, "challenge_expired"),
            LoginError::Expired => (StatusCode::UNAUTHORIZED, "auth_expired"),
            LoginError::ScopeNotHeld { .. } => (StatusCode::FORBIDDEN, "missing_scope"),
            LoginError::TooManyChallenges => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_challenges")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl ApiError {
    /// 404: the Encedo login is not configured (no `[[encedo.users]]`).
    pub fn login_disabled() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "login_disabled",
            "the Encedo login is not configured on this host (no [[encedo.users]])",
        )
    }

    /// The JSON body, with the request's `audit_id` when the request was audited.
    pub fn body(&self, audit_id: Option<&str>) -> Vec<u8> {
        let body = Body {
            error: self.code,
            message: &self.message,
            field: self.field.as_deref(),
            audit_id,
        };
        match (&self.details, serde_json::to_value(&body)) {
            (Some(details), Ok(serde_json::Value::Object(mut obj))) => {
                for (k, v) in details.iter() {
                    let _ = obj.entry(k.clone()).or_insert_with(|| v.clone());
                }
                serde_json::to_vec(&obj).unwrap_or_default()
            }
            _ => serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// The whole clear-text answer the TLS port gives a client that spoke HTTP to it:
    /// 418 with a JSON body, `Connection: close` (the caller closes).
    pub fn tls_required_answer(http_version: &str) -> Vec<u8> {
        let e = ApiError::new(
            StatusCode::IM_A_TEAPOT,
            "tls_required",
            "this port speaks HTTPS only: connect with TLS",
        );
        let body = e.body(None);
        let mut answer = format!(
            "{http_version} {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            e.status.as_u16(),
            e.status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        answer
    }
}

impl IntoResponse for ApiError {
    /// The error as an answer. The typed error rides along in the response's extensions,
    /// so the audit layer reads its code and outcome without parsing the body.
    fn into_response(self) -> Response {
        let mut r = (self.status, self.body(None)).into_response();
        let _ = r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(c) = self.challenge {
            let _ = r
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        // A connection whose body was cut, or that is over its caller's budget, is not
        // kept alive.
        if self.status == StatusCode::REQUEST_TIMEOUT || self.code == "too_many_connections" {
            let _ = r
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let _ = r
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        let _ = r.extensions_mut().insert(self);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_and_refusal_follow_the_error() {
        let key = crate::values::Kid::parse("0a").unwrap();
        for e in [
            ApiError::bad_request("x", "y"),
            ApiError::from(KeyError::NotFound(key.clone())),
            ApiError::too_large(1),
            ApiError::request_timeout("slow"),
        ] {
            assert_eq!(e.outcome(), Outcome::Error, "{e:?}");
            assert_eq!(e.refusal(), Refusal::Other, "{e:?}");
        }
        for e in [
            ApiError::encedo(KeyError::NotFound(key)),
            ApiError::token_unavailable(),
            ApiError::audit_unavailable(),
            ApiError::internal("test"),
        ] {
            assert_eq!(e.outcome(), Outcome::Failed, "{e:?}");
        }
        assert_eq!(
            ApiError::token_missing().refusal(),
            Refusal::Unauthenticated
        );
        assert_eq!(ApiError::missing_scope("s").refusal(), Refusal::Forbidden);
    }

    #[test]
    fn the_tls_port_answer_is_a_json_418() {
        let a = String::from_utf8(ApiError::tls_required_answer("HTTP/1.0")).unwrap();
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 418 I'm a teapot\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "tls_required");
    }
}
