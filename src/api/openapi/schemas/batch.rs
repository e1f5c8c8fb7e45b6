//! The schemas of `POST /v1/keys/batch`: the request, its answer, and each key's refusal
//! or failure.

use utoipa::openapi::schema::ComponentsBuilder;

use super::*;

/// One key's refusal or failure in a batch.
pub(super) fn batch_key_error() -> Schema {
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
pub(super) fn key_batch() -> Schema {
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
    let patch = super::keys::patch_object("PATCH's fields but label", &["label"]);
    let if_match = ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::RefOr(s(string()))))
        .description(Some("kid -> etag, for keys of the selection"));
    closed(
        vec![
            ("select", RefOr::T(select)),
            ("patch", RefOr::T(patch)),
            ("if_match", s(if_match)),
        ],
        &["select", "patch"],
    )
}

/// A batch's answer: each key, what changed (and, for a dry run, before/after).
pub(super) fn batch_done() -> Schema {
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

/// Registers this part's schemas.
pub(super) fn add(b: ComponentsBuilder) -> ComponentsBuilder {
    b.schema("KeyBatch", key_batch())
        .schema("BatchDone", batch_done())
        .schema("BatchKeyError", batch_key_error())
        .schema_from::<MintRequest>()
}
