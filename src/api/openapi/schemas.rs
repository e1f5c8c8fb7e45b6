//! The document's component schemas: request bodies (with the parsers' limits, taken from
//! the same constants), the answers, and the error body. A schema that is not the
//! handler's own type is tied to it by a test in `tests.rs` (its property names against
//! the parser's field list, or against the serialized value).

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

/// One key's refusal or failure in a batch.
fn batch_key_error() -> Schema {
    closed(
        vec![
            ("kid", s(kid())),
            (
                "status",
                s(integer().description(Some("What a PATCH of this key alone would answer"))),
            ),
            ("error", s(string())),
            ("message", s(string())),
            ("field", s(string())),
        ],
        &["kid", "error", "message"],
    )
}

/// `POST /v1/keys/batch`: a selection and one patch (PATCH's fields but `label`).
fn key_batch() -> Schema {
    let select = Schema::OneOf(
        OneOfBuilder::new()
            .item(closed(
                vec![(
                    "kids",
                    a(array(s(kid()))
                        .min_items(Some(1))
                        .max_items(Some(MAX_BATCH))),
                )],
                &["kids"],
            ))
            .item(closed(
                vec![("label_prefix", s(string().min_length(Some(1))))],
                &["label_prefix"],
            ))
            .item(closed(vec![("role", s(role()))], &["role"]))
            .description(Some(format!(
                "Exactly one selector; at most {MAX_BATCH} keys"
            )))
            .build(),
    );
    let mut patch = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .min_properties(Some(1))
        .description(Some("PATCH's fields but label"));
    for (name, schema) in patch_properties() {
        if name != "label" {
            patch = patch.property(name, schema);
        }
    }
    let if_match = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::RefOr(s(string()))))
        .description(Some("kid -> etag, for keys of the selection"));
    closed(
        vec![
            ("select", RefOr::T(select)),
            ("patch", RefOr::T(Schema::Object(patch.build()))),
            ("if_match", s(if_match)),
        ],
        &["select", "patch"],
    )
}

/// A batch's answer: each key, what changed (and, for a dry run, before/after).
fn batch_done() -> Schema {
    let any = || s(ObjectBuilder::new().schema_type(SchemaType::AnyValue));
    let key = closed(
        vec![
            ("kid", s(kid())),
            ("changed", a(array(s(string())))),
            ("key", r("Key")),
            ("changes", any()),
        ],
        &["kid", "changed", "key"],
    );
    closed(
        vec![
            ("batch_id", s(string())),
            ("keys", a(array(RefOr::T(key)))),
            ("dry_run", s(boolean().enum_values(Some([true])))),
            ("audit_id", audit_id()),
        ],
        &["batch_id", "keys"],
    )
}

/// The key as every `/v1` endpoint shows it (`keys::model::KeyView`).
fn key() -> Schema {
    let flag = |d: &str| s(boolean().description(Some(d.to_string())));
    let attributes = closed(
        vec![
            (
                "sensitive",
                s(ObjectBuilder::new().schema_type(or_null(Type::Boolean))),
            ),
            (
                "extractable",
                s(ObjectBuilder::new().schema_type(or_null(Type::Boolean))),
            ),
            ("modifiable", flag("CKA_MODIFIABLE of every object")),
            ("sign", flag("CKA_SIGN")),
            ("verify", flag("CKA_VERIFY")),
            ("encrypt", flag("CKA_ENCRYPT")),
            ("decrypt", flag("CKA_DECRYPT")),
            ("wrap", flag("CKA_WRAP")),
            ("unwrap", flag("CKA_UNWRAP")),
            ("derive", flag("CKA_DERIVE")),
        ],
        &KEY_ATTRIBUTES,
    );
    closed(
        vec![
            ("kid", s(kid())),
            (
                "label",
                s(string().description(Some("CKA_LABEL, as the token holds it"))),
            ),
            (
                "description",
                s(ObjectBuilder::new().schema_type(or_null(Type::String))),
            ),
            ("roles", a(array(s(string())))),
            (
                "type",
                s(string().description(Some(
                    "aes, generic-secret, rsa, ec, ed25519, x25519, ..., another PKCS#11 \
                     key type's name, or unknown",
                ))),
            ),
            (
                "curve",
                s(string().description(Some("The named curve of an EC key"))),
            ),
            ("bits", s(integer().minimum(Some(0)))),
            (
                "class",
                s(string().enum_values(Some([
                    "secret",
                    "key-pair",
                    "public-only",
                    "private-only",
                ]))),
            ),
            ("has_certificate", s(boolean())),
            ("attributes", RefOr::T(attributes)),
            (
                "not_before",
                date_or_null("CKA_START_DATE (null: none, or a token that cannot say)"),
            ),
            (
                "not_after",
                date_or_null("CKA_END_DATE (null: none, or a token that cannot say)"),
            ),
            (
                "updated_at",
                s(ObjectBuilder::new()
                    .schema_type(or_null(Type::String))
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))),
            ),
            (
                "state",
                s(string().enum_values(Some(["ok", "inconsistent"]))),
            ),
            (
                "reason",
                s(string().description(Some("Why the key is inconsistent"))),
            ),
            ("etag", s(string())),
        ],
        &KEY_REQUIRED,
    )
}

/// The properties of `Key` that are always there.
pub(super) const KEY_REQUIRED: [&str; 13] = [
    "kid",
    "label",
    "description",
    "roles",
    "type",
    "class",
    "has_certificate",
    "attributes",
    "not_before",
    "not_after",
    "updated_at",
    "state",
    "etag",
];

/// The properties of `Key.attributes`.
pub(super) const KEY_ATTRIBUTES: [&str; 10] = [
    "sensitive",
    "extractable",
    "modifiable",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "wrap",
    "unwrap",
    "derive",
];

/// `POST /v1/keys`: one variant per key type, each with the sizes, curves and usage flags
/// the parser (`lifecycle::new_key`) accepts for it.
fn new_key() -> Schema {
    let variant = |kind: &str, size: Option<RefOr<Schema>>, curve: bool, spec: KeySpec| {
        let mut props: Vec<(&str, RefOr<Schema>)> = vec![
            ("type", s(string().enum_values(Some([kind])))),
            ("label", s(label())),
            (
                "description",
                s(description().schema_type(or_null(Type::String))),
            ),
            (
                "roles",
                a(array(s(role())).schema_type(or_null(Type::Array))),
            ),
            ("usage", RefOr::T(usage(&spec))),
            ("not_before", date_or_null("CKA_START_DATE of every object")),
            (
                "not_after",
                date_or_null("CKA_END_DATE of every object; not before not_before"),
            ),
            (
                "kid",
                s(kid()
                    .schema_type(or_null(Type::String))
                    .max_length(Some(2 * MAX_NEW_KID_BYTES))
                    .description(Some(
                        "The new key's kid; random (16 bytes) when left out or null",
                    ))),
            ),
        ];
        if let Some(size) = size {
            props.push(("bits", size));
        }
        if curve {
            props.push((
                "curve",
                s(string()
                    .enum_values(Some(["P-256", "P-384", "P-521"]))
                    .default(Some("P-256".into()))),
            ));
        }
        closed(props, &["type", "label"])
    };
    let bits = |values: &[u32], default: u32| {
        Some(s(integer()
            .enum_values(Some(values.iter().copied()))
            .default(Some(default.into()))))
    };
    let generic = s(integer()
        .minimum(Some(256))
        .maximum(Some(512))
        .multiple_of(Some(8))
        .default(Some(256.into())));
    Schema::OneOf(
        OneOfBuilder::new()
            .item(variant(
                "aes",
                bits(&[128, 192, 256], 256),
                false,
                KeySpec::Aes(32),
            ))
            .item(variant(
                "generic-secret",
                Some(generic),
                false,
                KeySpec::GenericSecret(32),
            ))
            .item(variant(
                "rsa",
                bits(&[2048, 3072, 4096], 2048),
                false,
                KeySpec::Rsa(2048),
            ))
            .item(variant(
                "ec",
                None,
                true,
                KeySpec::Ec(crate::keys::model::Curve::P256),
            ))
            .item(variant("ed25519", None, false, KeySpec::Ed25519))
            .description(Some(format!(
                "A key to generate. Fields: {}",
                NEW_KEY_FIELDS.join(", ")
            )))
            .build(),
    )
}

/// Longest kid a create may name, in bytes (`lifecycle.rs`).
const MAX_NEW_KID_BYTES: usize = super::super::lifecycle::MAX_NEW_KID_BYTES;

/// The usage flags of a key type: the allowed ones free, the others false only.
fn usage(spec: &KeySpec) -> Schema {
    let allowed = usage_allowed(spec);
    let props = USAGE_FLAGS
        .iter()
        .map(|f| {
            let b = if allowed.contains(f) {
                boolean()
            } else {
                boolean().enum_values(Some([false]))
            };
            (*f, s(b))
        })
        .collect();
    closed(props, &[])
}

/// `PATCH /v1/keys/{kid}`: the fields of `body::PATCH_FIELDS`.
fn key_patch() -> Schema {
    let mut o = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .min_properties(Some(1))
        .description(Some("The fields to change; at least one"));
    for (name, schema) in patch_properties() {
        o = o.property(name, schema);
    }
    Schema::Object(o.build())
}

/// The schema of each field a PATCH takes. A field added to `body::PATCH_FIELDS` gets its
/// schema here (`tests.rs` checks the two lists are the same).
pub(super) fn patch_properties() -> Vec<(&'static str, RefOr<Schema>)> {
    vec![
        ("label", s(label())),
        (
            "description",
            s(description()
                .schema_type(or_null(Type::String))
                .description(Some(format!(
                    "0..={MAX_DESCRIPTION_CHARS} characters; null clears it"
                )))),
        ),
        (
            "roles",
            a(array(s(role()))
                .schema_type(or_null(Type::Array))
                .min_items(Some(1))
                .description(Some(
                    "Roles defined in keys.roles, one the caller holds; null clears them",
                ))),
        ),
        (
            "usage",
            RefOr::T(closed(
                USAGE_FLAGS.iter().map(|f| (*f, s(boolean()))).collect(),
                &[],
            )),
        ),
        (
            "sensitive",
            s(boolean()
                .enum_values(Some([true]))
                .description(Some("CKA_SENSITIVE only goes from false to true"))),
        ),
        (
            "extractable",
            s(boolean()
                .enum_values(Some([false]))
                .description(Some("CKA_EXTRACTABLE only goes from true to false"))),
        ),
        (
            "not_before",
            date_or_null("CKA_START_DATE of the key's objects; null clears it"),
        ),
        (
            "not_after",
            date_or_null(
                "CKA_END_DATE of the key's objects, not before not_before; null clears it",
            ),
        ),
    ]
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
        ],
        &STATUS_FIELDS,
    )
}

/// The fields of `GET /v1/status`, all always there.
pub(super) const STATUS_FIELDS: [&str; 14] = [
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
];

/// The appliance's label: 1..=32 printable ASCII characters.
fn encedo_label() -> ObjectBuilder {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_CHARS))
        .pattern(Some("^[\\x20-\\x7e]+$"))
}

/// The base64 of a description.
fn descr() -> ObjectBuilder {
    base64()
        .max_length(Some(MAX_DESCRIPTION_CHARS * 4 / 3 * 4 + 4))
        .description(Some(format!(
            "Standard base64 of UTF-8 text of 0..={MAX_DESCRIPTION_CHARS} characters"
        )))
}

/// The appliance's key types hsmkeyd generates (`encedo::new_key_spec`).
pub(super) const ENCEDO_TYPES: [&str; 10] = [
    "AES128",
    "AES192",
    "AES256",
    "SECP256R1",
    "SECP384R1",
    "SECP521R1",
    "ED25519",
    "SHA2-256",
    "SHA2-384",
    "SHA2-512",
];

fn encedo_key() -> Schema {
    closed(
        vec![
            ("kid", s(kid())),
            ("label", s(string())),
            ("type", s(string())),
            ("updated", s(integer())),
            ("descr", s(base64())),
        ],
        &["kid", "label", "type", "updated"],
    )
}

fn encedo_list(paged: bool) -> Schema {
    let n = || s(integer().minimum(Some(0)));
    let mut props = vec![
        ("total", n()),
        ("listed", n()),
        ("list", a(array(r("EncedoKey")))),
    ];
    let mut required = vec!["total", "listed", "list"];
    if paged {
        props.push(("offset", n()));
        required.push("offset");
    }
    closed(props, &required)
}

/// Every component: schemas and the two security schemes.
pub fn components() -> Components {
    let page_limit = || {
        integer()
            .minimum(Some(1))
            .maximum(Some(MAX_PAGE))
            .default(Some(encedo::DEFAULT_LIMIT.into()))
    };
    ComponentsBuilder::new()
        .schema("Error", error())
        .schema("Key", key())
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
        .schema("NewKey", new_key())
        .schema(
            "Created",
            closed(vec![("key", r("Key")), ("audit_id", audit_id())], &["key"]),
        )
        .schema("KeyPatch", key_patch())
        .schema("Updated", updated())
        .schema("DryRun", dry_run())
        .schema("KeyBatch", key_batch())
        .schema("BatchDone", batch_done())
        .schema("BatchKeyError", batch_key_error())
        .schema_from::<MintRequest>()
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
            "EncedoUpdate",
            closed(
                vec![
                    ("kid", s(kid())),
                    ("label", s(encedo_label())),
                    (
                        "descr",
                        s(descr()
                            .schema_type(or_null(Type::String))
                            .description(Some("Left out or null: the description is cleared"))),
                    ),
                ],
                &["kid", "label"],
            ),
        )
        .schema(
            "EncedoCreate",
            closed(
                vec![
                    ("label", s(encedo_label())),
                    ("type", s(string().enum_values(Some(ENCEDO_TYPES)))),
                    ("descr", s(descr().schema_type(or_null(Type::String)))),
                ],
                &["label", "type"],
            ),
        )
        .schema(
            "EncedoSearch",
            closed(
                vec![
                    (
                        "descr",
                        s(string().min_length(Some(1)).description(Some(
                            "The base64 of the text to look for in descriptions; a leading ^ \
                             asks for descriptions that start with it",
                        ))),
                    ),
                    (
                        "offset",
                        s(integer().minimum(Some(0)).default(Some(0.into()))),
                    ),
                    ("limit", s(page_limit())),
                ],
                &["descr"],
            ),
        )
        .schema("EncedoKey", encedo_key())
        .schema("EncedoList", encedo_list(false))
        .schema("EncedoSearchResult", encedo_list(true))
        .schema(
            "EncedoGet",
            closed(
                vec![
                    ("type", s(string())),
                    ("updated", s(integer())),
                    ("pubkey", s(base64())),
                ],
                &["type", "updated"],
            ),
        )
        .schema(
            "EncedoKid",
            closed(vec![("kid", s(kid())), ("audit_id", audit_id())], &["kid"]),
        )
        .schema("EncedoDone", closed(vec![("audit_id", audit_id())], &[]))
        .schema(
            "EncedoChallenge",
            closed(
                vec![
                    (
                        "eid",
                        s(string().description(Some("The EncedoID; PBKDF2's salt"))),
                    ),
                    (
                        "spk",
                        s(base64().description(Some("The device's X25519 public key"))),
                    ),
                    (
                        "jti",
                        s(string().description(Some("The challenge's nonce"))),
                    ),
                    (
                        "exp",
                        s(integer().description(Some("Its deadline, unix seconds"))),
                    ),
                    ("lbl", s(string())),
                ],
                &["eid", "spk", "jti", "exp", "lbl"],
            ),
        )
        .schema(
            "EncedoLogin",
            closed(
                vec![(
                    "auth",
                    s(string().description(Some("The eJWT: header.payload.HMAC"))),
                )],
                &["auth"],
            ),
        )
        .schema(
            "EncedoToken",
            closed(
                vec![("token", s(string())), ("audit_id", audit_id())],
                &["token"],
            ),
        )
        .schema(
            "EncedoVersion",
            closed(
                vec![
                    ("hwv", s(string())),
                    ("blv", s(string())),
                    ("fwv", s(string())),
                    ("fws", s(string())),
                ],
                &["hwv", "blv", "fwv", "fws"],
            ),
        )
        .schema(
            "EncedoStatus",
            closed(
                vec![
                    ("fls_state", s(integer())),
                    (
                        "ts",
                        s(string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))),
                    ),
                    ("uptime", s(integer().minimum(Some(0)))),
                ],
                &["fls_state", "ts", "uptime"],
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
        )
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
