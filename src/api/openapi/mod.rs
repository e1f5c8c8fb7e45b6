//! The API's OpenAPI 3.1 document, built from the code (utoipa's model): the operations of
//! the route table (`operations.rs`, one per route of [`super::routes`]), the schemas with
//! the parsers' own limits and field lists (`schemas/`), every error code per
//! operation (`ops.rs`). Served at `GET /v1/openapi.json` to any principal, and committed
//! as `docs/openapi.json`; the tests fail when a route, a field or the committed copy
//! drifts from the code.

mod operations;
mod ops;
mod schemas;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, Paths};
use utoipa::openapi::{InfoBuilder, LicenseBuilder, OpenApi, OpenApiBuilder};

pub use operations::OPERATIONS;

/// Where the document is served.
pub const PATH: &str = "/v1/openapi.json";

/// The document.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for (method, path, operation) in OPERATIONS {
        paths.add_path_operation(path, vec![http_method(method)], operation());
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("hsmkeyd")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Key management over a PKCS#11 token: list, read, create, update and \
                     delete keys, without key material ever leaving the token. Two front \
                     doors serve the same API: the Unix socket (callers identified by their \
                     peer credentials) and HTTPS on loopback (bearer JWTs). Every change and \
                     every refusal is audited. Errors are {\"error\", \"message\", \
                     \"field\"?} with the codes each operation lists. /api/* are the Encedo \
                     HEM-compatible endpoints, with the appliance's shapes.",
                ))
                .license(Some(LicenseBuilder::new().name("Apache-2.0").build()))
                .build(),
        )
        .paths(paths)
        .components(Some(schemas::components()))
        .build()
}

/// The document as committed in `docs/openapi.json`: pretty JSON and a final newline.
pub fn json() -> String {
    let mut doc = serde_json::to_value(document()).unwrap_or_default();
    camel_case_links(&mut doc);
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// utoipa 5.5 writes a Link's `operationId` and `requestBody` in snake case, which the
/// OpenAPI schema refuses (`openapi-spec-validator` in `tests/openapi.rs` checks).
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut());
    let responses = operations
        .filter_map(|op| op.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|r| r.values_mut());
    let links = responses
        .filter_map(|r| r.get_mut("links").and_then(|l| l.as_object_mut()))
        .flat_map(|l| l.values_mut())
        .filter_map(|l| l.as_object_mut());
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(v) = link.remove(snake) {
                let _ = link.insert(camel.to_string(), v);
            }
        }
    }
}

fn http_method(m: &str) -> HttpMethod {
    match m {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        "HEAD" => HttpMethod::Head,
        "OPTIONS" => HttpMethod::Options,
        _ => HttpMethod::Trace,
    }
}

/// `GET /v1/openapi.json`: any authenticated principal, no scope.
pub async fn serve() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(json).clone();
    let mut r = body.into_response();
    let _ = r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
