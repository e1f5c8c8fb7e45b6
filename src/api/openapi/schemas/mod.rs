//! The document's component schemas: request bodies (with the parsers' limits, taken from
//! the same constants), the answers, and the error body. A schema that is not the
//! handler's own type is tied to it by a test in `tests.rs` (its property names against
//! the parser's field list, or against the serialized value).

mod batch;
mod hem;
mod keys;

#[cfg(test)]
pub(crate) use hem::ENCEDO_TYPES;
#[cfg(test)]
pub(crate) use keys::{KEY_ATTRIBUTES, KEY_REQUIRED};

use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, Components, ComponentsBuilder, ObjectBuilder, OneOfBuilder,
    Ref, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{KnownFormat, RefOr};

use super::super::encedo::{self, MAX_LABEL_CHARS};
use super::super::lifecycle::{usage_allowed, NEW_KEY_FIELDS, USAGE_FLAGS};
use super::super::tokens::MintRequest;
use crate::keys::{KeySpec, MAX_BATCH, MAX_PAGE};
use crate::values::{MAX_DESCRIPTION_CHARS, MAX_ID_BYTES, MAX_LABEL_BYTES, MAX_ROLE_BYTES};

/// The security scheme of bearer JWTs (the HTTPS port).
pub const BEARER: &str = "bearer";
/// The security scheme of peer credentials (the Unix socket).
pub const PEER: &str = "peerCredentials";

/// A reference to the component schema `name`.
pub fn r(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

pub(super) fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

pub(super) fn integer() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Integer)
}

fn boolean() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Boolean)
}

/// A date, `YYYY-MM-DD`.
pub(super) fn date() -> ObjectBuilder {
    string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)))
}

/// A date or null.
fn date_or_null(d: &str) -> RefOr<Schema> {
    s(date()
        .schema_type(or_null(Type::String))
        .description(Some(d.to_string())))
}

fn or_null(t: Type) -> SchemaType {
    [t, Type::Null].into_iter().collect()
}

fn array(items: RefOr<Schema>) -> ArrayBuilder {
    ArrayBuilder::new().items(items)
}

/// An object with these properties and nothing else; `required` lists the ones always
/// there.
pub(super) fn closed(props: Vec<(&str, RefOr<Schema>)>, required: &[&str]) -> Schema {
    let mut o = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    for (name, schema) in props {
        o = o.property(name, schema);
    }
    for name in required {
        o = o.required(*name);
    }
    Schema::Object(o.build())
}

fn s(b: ObjectBuilder) -> RefOr<Schema> {
    RefOr::T(Schema::Object(b.build()))
}

fn a(b: ArrayBuilder) -> RefOr<Schema> {
    RefOr::T(Schema::Array(b.build()))
}

/// `^([0-9a-fA-F]{2}){1,128}$`: hex of a CKA_ID of 1..=[`MAX_ID_BYTES`] bytes.
pub(super) fn kid() -> ObjectBuilder {
    string()
        .pattern(Some(format!("^([0-9a-fA-F]{{2}}){{1,{MAX_ID_BYTES}}}$")))
        .description(Some("A key id: the hex of the CKA_ID its objects share"))
}

/// Standard padded base64.
fn base64() -> ObjectBuilder {
    string()
        .pattern(Some(
            "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
        ))
        .content_encoding("base64")
}

/// A label as requests give it.
fn label() -> ObjectBuilder {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_BYTES))
        // C0 and C1 control characters. Unicode format characters (category Cf) are refused
        // too, which a pattern portable across regex dialects cannot say.
        .pattern(Some("^[^\\u0000-\\u001f\\u007f-\\u009f]+$"))
        .description(Some(format!(
            "1..={MAX_LABEL_BYTES} bytes of UTF-8 (maxLength counts characters; the daemon \
             counts bytes), no control or invisible format characters; the labels of \
             hsmkeyd's own signing keys are reserved"
        )))
}

fn description() -> ObjectBuilder {
    string()
        .max_length(Some(MAX_DESCRIPTION_CHARS))
        .pattern(Some("^[^\\u0000-\\u0008\\u000b-\\u001f\\u007f-\\u009f]*$"))
        .description(Some(format!(
            "0..={MAX_DESCRIPTION_CHARS} characters, no control characters but newline and tab"
        )))
}

fn role() -> ObjectBuilder {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_ROLE_BYTES))
        .pattern(Some(format!("^[A-Za-z0-9_.:-]{{1,{MAX_ROLE_BYTES}}}$")))
        .description(Some(
            "A role name defined in the configuration (keys.roles)",
        ))
}

fn audit_id() -> RefOr<Schema> {
    s(string().description(Some(
        "The request id of the audit entries of this answer (HSMKEYD_REQUEST_ID)",
    )))
}

/// The error body every refusal has.
fn error() -> Schema {
    closed(
        vec![
            (
                "error",
                s(string().description(Some("Machine-readable code"))),
            ),
            (
                "message",
                s(string().description(Some("One sentence for people"))),
            ),
            (
                "field",
                s(string().description(Some("The request field at fault"))),
            ),
            ("audit_id", audit_id()),
            // A batch's refusal or failure (`POST /v1/keys/batch`) says more.
            (
                "batch_id",
                s(string().description(Some("HSMKEYD_BATCH_ID"))),
            ),
            (
                "failures",
                a(array(r("BatchKeyError")).description(Some(
                    "The keys that failed their checks (batch_refused) or their write \
                     (batch_failed)",
                ))),
            ),
            (
                "rolled_back",
                a(array(s(kid())).description(Some("Keys set back after a failure"))),
            ),
            (
                "not_rolled_back",
                a(array(r("BatchKeyError")).description(Some(
                    "Keys that could not be set back and stay changed or blocked",
                ))),
            ),
            (
                "not_started",
                a(array(s(kid())).description(Some("Keys the batch never wrote"))),
            ),
        ],
        &["error", "message"],
    )
}

/// A change's answer: the key, what changed.
fn updated() -> Schema {
    closed(
        vec![
            ("key", r("Key")),
            ("changed", a(array(s(string())))),
            ("audit_id", audit_id()),
        ],
        &["key", "changed"],
    )
}

/// The answer of `?dry_run=true`.
fn dry_run() -> Schema {
    // Any JSON value: a label, a description, roles, a whole key, or null.
    let any = || s(ObjectBuilder::new().schema_type(SchemaType::AnyValue));
    let change = closed(
        vec![("before", any()), ("after", any())],
        &["before", "after"],
    );
    closed(
        vec![
            ("dry_run", s(boolean().enum_values(Some([true])))),
            ("key", r("Key")),
            ("changed", a(array(s(string())))),
            (
                "changes",
                s(ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(change))),
            ),
            ("audit_id", audit_id()),
        ],
        &["dry_run", "key", "changed", "changes"],
    )
}

fn jwk() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("kty", string().enum_values(Some(["EC", "OKP", "RSA"])))
            .property("kid", string())
            .required("kty")
            .description(Some("A public key as a JWK (RFC 7517)"))
            .build(),
    )
}

fn status() -> Schema {
    let n = || s(integer().minimum(Some(0)));
    closed(
        vec![
            ("version", s(string())),
            (
                "state",
                s(string().enum_values(Some(["serving", "token_unavailable"]))),
            ),
            ("token", s(string())),
            ("token_label", s(string())),
            ("token_serial", s(string())),
            ("token_slot", n()),
            ("keys", n()),
            ("uptime_s", n()),
            (
                "sessions",
                RefOr::T(closed(
                    vec![("in_use", n()), ("open", n()), ("max", n())],
                    &["in_use", "open", "max"],
                )),
            ),
            (
                "audit",
                RefOr::T(closed(
                    vec![
                        (
                            "healthy",
                            s(boolean().description(Some("The last entry was taken"))),
                        ),
                        (
                            "chained_entries",
                            s(integer()
                                .minimum(Some(0))
                                .description(Some("Entries hash-chained since start"))),
                        ),
                        (
                            "chain_us",
                            s(integer().minimum(Some(0)).description(Some(
                                "What chaining them cost their writers, in microseconds",
                            ))),
                        ),
                    ],
                    &["healthy", "chained_entries", "chain_us"],
                )),
            ),
            (
                "last_reload",
                s(ObjectBuilder::new()
                    .schema_type(or_null(Type::Object))
                    .property("at", string())
                    .property("applied", boolean())),
            ),
            ("unreadable_objects", n()),
            (
                "cleanup_backlog",
                RefOr::T(closed(
                    vec![("objects", n()), ("records", n())],
                    &["objects", "records"],
                )),
            ),
            (
                "tables",
                RefOr::T(closed(
                    vec![("key_locks", n()), ("label_claims", n())],
                    &["key_locks", "label_claims"],
                )),
            ),
            (
                "memory",
                RefOr::T(closed(
                    vec![
                        (
                            "heap_bytes",
                            s(ObjectBuilder::new()
                                .schema_type(or_null(Type::Integer))
                                .minimum(Some(0))
                                .description(Some(
                                    "Bytes hsmkeyd's own code holds (not the PKCS#11 \
                                     module's); null when not counted",
                                ))),
                        ),
                        (
                            "rss_bytes",
                            s(ObjectBuilder::new()
                                .schema_type(or_null(Type::Integer))
                                .minimum(Some(0))
                                .description(Some("The process's resident set, in bytes"))),
                        ),
                    ],
                    &["heap_bytes", "rss_bytes"],
                )),
            ),
        ],
        &STATUS_FIELDS,
    )
}

/// The fields of `GET /v1/status`, all always there.
pub(super) const STATUS_FIELDS: [&str; 15] = [
    "version",
    "state",
    "token",
    "token_label",
    "token_serial",
    "token_slot",
    "keys",
    "uptime_s",
    "sessions",
    "audit",
    "last_reload",
    "unreadable_objects",
    "cleanup_backlog",
    "tables",
    "memory",
];

/// Every component: schemas and the two security schemes.
pub fn components() -> Components {
    let b = ComponentsBuilder::new()
        .schema("Error", error())
        .schema("Key", keys::key())
        .schema(
            "KeyPage",
            closed(
                vec![
                    ("keys", a(array(r("Key")))),
                    (
                        "next_cursor",
                        s(ObjectBuilder::new().schema_type(or_null(Type::String))),
                    ),
                    ("total", s(integer().minimum(Some(0)))),
                ],
                &["keys", "next_cursor", "total"],
            ),
        )
        .schema("NewKey", keys::new_key())
        .schema(
            "Created",
            closed(vec![("key", r("Key")), ("audit_id", audit_id())], &["key"]),
        )
        .schema("KeyPatch", keys::key_patch())
        .schema("Updated", updated())
        .schema("DryRun", dry_run())
        .schema(
            "Token",
            closed(
                vec![
                    ("token", s(string())),
                    (
                        "expires_at",
                        s(string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))),
                    ),
                    ("scopes", a(array(s(string())))),
                    ("audit_id", audit_id()),
                ],
                &["token", "expires_at", "scopes"],
            ),
        )
        .schema("Jwk", jwk())
        .schema(
            "JwkSet",
            closed(vec![("keys", a(array(r("Jwk"))))], &["keys"]),
        )
        .schema("Status", status())
        .schema(
            "AuditKey",
            closed(
                vec![
                    ("label", s(string())),
                    ("algorithm", s(string())),
                    ("fingerprint", s(string())),
                    ("public_key_pem", s(string())),
                ],
                &["label", "algorithm", "fingerprint", "public_key_pem"],
            ),
        )
        .schema(
            "OpenApi",
            Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("openapi", string())
                    .required("openapi")
                    .build(),
            ),
        );
    hem::add(batch::add(b))
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The HTTPS port: a JWT minted by POST /v1/auth/token over the Unix \
                         socket (ES256, verified with GET /v1/auth/jwks) or issued by a \
                         configured [[issuers]] entry. The scopes an operation needs are \
                         listed in its security requirement.",
                    ))
                    .build(),
            ),
        )
        .security_scheme(
            PEER,
            SecurityScheme::MutualTls {
                description: Some(
                    "The Unix socket (/run/hsmkeyd/api.sock): not TLS. The caller is \
                     identified by the kernel's peer credentials of the connection \
                     (SO_PEERCRED uid, then gid), mapped to a principal of the \
                     configuration ([[principals]]) with its scopes and roles. Like mutual \
                     TLS, the identity comes from the transport and no header carries it, \
                     which is why the scheme is declared with this type."
                        .into(),
                ),
                extensions: None,
            },
        )
        .build()
}

/// The name a derived schema registers under (for tests).
#[cfg(test)]
pub(super) fn token_request_name() -> String {
    <MintRequest as utoipa::ToSchema>::name().into_owned()
}
