//! The schemas of a key: the key as answered, a create's body (one variant per key type),
//! and a PATCH's fields.

use super::*;

/// The key as every `/v1` endpoint shows it (`keys::model::KeyView`).
pub(super) fn key() -> Schema {
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
pub(crate) const KEY_REQUIRED: [&str; 13] = [
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
pub(crate) const KEY_ATTRIBUTES: [&str; 10] = [
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
pub(super) fn new_key() -> Schema {
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
            ("usage", RefOr::T(usage_or_null(&spec))),
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
const MAX_NEW_KID_BYTES: usize = crate::api::lifecycle::MAX_NEW_KID_BYTES;

/// The usage flags of a key type: the allowed ones free, the others false only.
pub(super) fn usage(spec: &KeySpec) -> Schema {
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

/// A new key's `usage`: the flags of [`usage`], or null (as when left out: the type's
/// defaults; `lifecycle::usage`).
fn usage_or_null(spec: &KeySpec) -> Schema {
    match usage(spec) {
        Schema::Object(mut o) => {
            o.schema_type = [Type::Object, Type::Null].into_iter().collect();
            o.description =
                Some("The usage flags; the type's defaults when left out or null".into());
            Schema::Object(o)
        }
        other => other,
    }
}

/// `PATCH /v1/keys/{kid}`: the fields of `body::PATCH_FIELDS`.
pub(super) fn key_patch() -> Schema {
    patch_object("The fields to change; at least one", &[])
}

/// A PATCH body: at least one of [`patch_properties`] but those in `without`, nothing else.
pub(super) fn patch_object(description: &str, without: &[&str]) -> Schema {
    let mut o = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .min_properties(Some(1))
        .description(Some(description));
    for (name, schema) in patch_properties() {
        if !without.contains(&name) {
            o = o.property(name, schema);
        }
    }
    Schema::Object(o.build())
}

/// The schema of each field a PATCH takes. A field added to `body::PATCH_FIELDS` gets its
/// schema here (`tests.rs` checks the two lists are the same).
pub(crate) fn patch_properties() -> Vec<(&'static str, RefOr<Schema>)> {
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
            s(boolean().description(Some(
                "CKA_SENSITIVE only goes from false to true: false on a sensitive key is 400 \
                 irreversible_attribute; on a key that is not sensitive it changes nothing",
            ))),
        ),
        (
            "extractable",
            s(boolean().description(Some(
                "CKA_EXTRACTABLE only goes from true to false: true on a key that is not \
                 extractable is 400 irreversible_attribute; on an extractable key it changes \
                 nothing",
            ))),
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
