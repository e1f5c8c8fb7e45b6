//! One operation per route: what it needs (scope), takes (parameters, body) and answers
//! (each success, each error status with the `error` codes it can carry). The shared
//! groups of errors (authentication, JSON bodies, changes) are the functions of [`Doc`].

use std::collections::{BTreeMap, BTreeSet};

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{
    Operation, OperationBuilder, Parameter, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{AllOfBuilder, Schema};
use utoipa::openapi::{Content, Required, Response, ResponseBuilder, SecurityRequirement};
use utoipa::openapi::{ObjectBuilder, RefOr, Type};

use super::schemas::{self, integer, r, string, BEARER, PEER};
use crate::keys::MAX_PAGE;

/// Who may call an operation.
pub enum Access {
    /// Anyone: no authentication.
    Public,
    /// Any authenticated principal, no scope.
    Principal,
    /// A principal holding one of these scopes.
    Scope(&'static [&'static str]),
}

/// An operation being described.
pub struct Doc {
    op: OperationBuilder,
    answers: Vec<(u16, Response)>,
    errors: BTreeMap<u16, BTreeSet<&'static str>>,
}

const JSON: &str = "application/json";

impl Doc {
    /// An operation with its id, summary and access; authenticated ones get the
    /// authentication errors.
    pub fn new(id: &str, summary: &str, access: Access) -> Doc {
        let mut doc = Doc {
            op: OperationBuilder::new()
                .operation_id(Some(id))
                .summary(Some(summary)),
            answers: Vec::new(),
            // Any request: a proxy-style absolute URI is refused.
            errors: BTreeMap::from([(400, BTreeSet::from(["absolute_uri"]))]),
        };
        let scopes: &[&str] = match access {
            Access::Public => return doc,
            Access::Principal => &[],
            Access::Scope(s) => s,
        };
        doc.op = doc
            .op
            .security(SecurityRequirement::new(BEARER, scopes.iter().copied()))
            .security(SecurityRequirement::new(PEER, scopes.iter().copied()));
        if !scopes.is_empty() {
            doc = doc
                .errors(403, &["missing_scope"])
                .describe(&format!("Needs scope {}.", scopes.join(" or ")));
        }
        // 401 for an unknown caller; 503 when the caller is over its connection budget or
        // a refusal's audit entry cannot be written.
        doc.errors(401, &["unauthenticated", "invalid_token"])
            .errors(503, &["too_many_connections", "audit_unavailable"])
    }

    /// Adds a paragraph to the description.
    pub fn describe(mut self, text: &str) -> Doc {
        let old = self.op.build();
        let text = match old.description.as_deref() {
            Some(d) => format!("{d}\n\n{text}"),
            None => text.to_string(),
        };
        self.op = rebuild(old).description(Some(text));
        self
    }

    /// Adds error codes under a status.
    pub fn errors(mut self, status: u16, codes: &[&'static str]) -> Doc {
        self.errors.entry(status).or_default().extend(codes);
        self
    }

    /// A success answer.
    pub fn answers(mut self, status: u16, response: Response) -> Doc {
        self.answers.push((status, response));
        self
    }

    /// A success answer with a JSON body of the component `schema`.
    pub fn json(self, status: u16, what: &str, schema: &str) -> Doc {
        self.answers(status, json_response(what, schema).build())
    }

    /// A parameter.
    pub fn param(mut self, p: Parameter) -> Doc {
        self.op = self.op.parameter(p);
        self
    }

    /// A path parameter `kid` (400 `invalid_kid` when it is not one).
    pub fn kid(self) -> Doc {
        self.param(path("kid", schemas::kid().build().into()))
            .errors(400, &["invalid_kid"])
    }

    /// A key read from the index: 404 for an unknown kid, 503 while the token is lost.
    pub fn key(self) -> Doc {
        self.errors(404, &["key_not_found"])
            .errors(503, &["token_unavailable"])
    }

    /// A path parameter `label` naming one key.
    pub fn by_label(self) -> Doc {
        self.param(path("label", string().min_length(Some(1)).build().into()))
            .errors(404, &["key_not_found"])
            .errors(409, &["label_ambiguous"])
            .errors(503, &["token_unavailable"])
    }

    /// A JSON body of the component `schema` read within `limit` bytes.
    pub fn body(mut self, schema: &str, content_types: &[&str], limit: usize) -> Doc {
        let mut body = RequestBodyBuilder::new().required(Some(Required::True));
        for ct in content_types {
            body = body.content(*ct, Content::new(Some(r(schema))));
        }
        self.op = self.op.request_body(Some(body.build()));
        self.errors(
            400,
            &[
                "invalid_json",
                "duplicate_field",
                "body_incomplete",
                "unknown_field",
            ],
        )
        .errors(408, &["request_timeout"])
        .errors(413, &["body_too_large"])
        .errors(415, &["unsupported_media_type"])
        .describe(&format!("The body is at most {limit} bytes."))
    }

    /// The Encedo endpoints want a Content-Length.
    pub fn length_required(self) -> Doc {
        self.errors(411, &["length_required"])
    }

    /// `?dry_run=true|false`: the answer of a dry run is `DryRun` (200).
    pub fn dry_run(self) -> Doc {
        self.param(
            ParameterBuilder::new()
                .name("dry_run")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some("Check and show the change without making it"))
                .schema(Some(schemas_bool()))
                .build(),
        )
        .errors(400, &["invalid_query", "invalid_dry_run"])
    }

    /// `If-Match: "<etag>"` (or `*`).
    pub fn if_match(self) -> Doc {
        self.param(
            ParameterBuilder::new()
                .name("If-Match")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "The key's ETag (quoted), or *; a key whose etag differs is not changed",
                ))
                .schema(Some(string()))
                .build(),
        )
        .errors(400, &["invalid_if_match"])
        .errors(412, &["precondition_failed"])
    }

    /// A change through `run_change`: role checks, the key's state, the token's answer and
    /// the audit trail.
    pub fn change(self) -> Doc {
        self.errors(403, &["missing_role"])
            .errors(406, &["hsm_refused"])
            .errors(409, &["inconsistent_key_state"])
            .errors(503, &["token_unavailable", "audit_unavailable"])
    }

    /// The operation, with an answer per error status.
    pub fn build(self) -> Operation {
        let mut op = self.op;
        for (status, response) in self.answers {
            op = op.response(status.to_string(), response);
        }
        for (status, codes) in self.errors {
            op = op.response(status.to_string(), error_response(status, &codes));
        }
        op.build()
    }
}

/// `OperationBuilder` has no getter: rebuild it from what it built.
fn rebuild(op: Operation) -> OperationBuilder {
    let mut b = OperationBuilder::new()
        .operation_id(op.operation_id)
        .summary(op.summary)
        .description(op.description)
        .request_body(op.request_body)
        .responses(op.responses);
    for p in op.parameters.into_iter().flatten() {
        b = b.parameter(p);
    }
    for s in op.security.into_iter().flatten() {
        b = b.security(s);
    }
    b
}

fn schemas_bool() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Boolean)
}

/// A required path parameter.
pub fn path(name: &str, schema: RefOr<Schema>) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(schema))
        .build()
}

/// An optional query parameter.
pub fn query(name: &str, description: &str, schema: RefOr<Schema>) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// A page size 1..=[`MAX_PAGE`].
pub fn page_limit() -> RefOr<Schema> {
    integer()
        .minimum(Some(1))
        .maximum(Some(MAX_PAGE))
        .build()
        .into()
}

/// A 2xx answer with a JSON body.
pub fn json_response(what: &str, schema: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(what)
        .content(JSON, Content::new(Some(r(schema))))
}

/// The `ETag` header of an answer that shows one key.
pub fn etag(b: ResponseBuilder) -> ResponseBuilder {
    b.header(
        "ETag",
        HeaderBuilder::new()
            .schema(string())
            .description(Some("The key's etag, quoted; send it back in If-Match"))
            .build(),
    )
}

/// A link to the operation `id` whose `kid` comes from `kid` (a runtime expression),
/// for clients and stateful testing (create -> get -> update -> delete).
pub fn link(b: ResponseBuilder, name: &str, id: &str, kid: &str) -> ResponseBuilder {
    b.link(
        name,
        LinkBuilder::new()
            .operation_id(id)
            .parameter("kid", kid)
            .build(),
    )
}

/// An error answer: the `Error` body, its `error` one of `codes`.
fn error_response(status: u16, codes: &BTreeSet<&str>) -> Response {
    let schema = AllOfBuilder::new()
        .item(r("Error"))
        .item(closed_codes(codes))
        .build();
    let what = match status {
        400 => "The request is wrong (a field, a query parameter, the body); nothing was done",
        401 => "The caller is not identified",
        403 => "The caller may not do this",
        404 => "No such key",
        406 => "The operation failed on this key (the token refused, or cannot do it)",
        408 => "The body did not arrive in time; nothing was done",
        409 => "The key's state conflicts with the request",
        411 => "Content-Length is required",
        412 => "If-Match does not match the key's etag",
        413 => "The body is too large",
        415 => "The body is not JSON",
        503 => "Unavailable for now (token, audit trail, connection budget); retry later",
        _ => "Refused",
    };
    ResponseBuilder::new()
        .description(format!("{what}. error: {}", join(codes)))
        .content(JSON, Content::new(Some(Schema::AllOf(schema))))
        .build()
}

fn closed_codes(codes: &BTreeSet<&str>) -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("error", string().enum_values(Some(codes.iter().copied())))
            .build(),
    )
}

fn join(codes: &BTreeSet<&str>) -> String {
    codes.iter().copied().collect::<Vec<_>>().join(", ")
}
