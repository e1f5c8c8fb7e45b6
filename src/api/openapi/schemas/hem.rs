//! The schemas of the Encedo HEM-compatible endpoints (`/api/*`), with the appliance's
//! shapes and limits.

use utoipa::openapi::schema::ComponentsBuilder;

use super::*;

/// The appliance's label: 1..=32 printable ASCII characters.
pub(super) fn encedo_label() -> ObjectBuilder {
    string()
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_CHARS))
        .pattern(Some("^[\\x20-\\x7e]+$"))
}

/// The base64 of a description.
pub(super) fn descr() -> ObjectBuilder {
    base64()
        .max_length(Some(MAX_DESCRIPTION_CHARS * 4 / 3 * 4 + 4))
        .description(Some(format!(
            "Standard base64 of UTF-8 text of 0..={MAX_DESCRIPTION_CHARS} characters"
        )))
}

/// The appliance's key types hsmkeyd generates (`encedo::new_key_spec`).
pub(crate) const ENCEDO_TYPES: [&str; 10] = [
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

pub(super) fn encedo_key() -> Schema {
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

pub(super) fn encedo_list(paged: bool) -> Schema {
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

/// The appliance's page size: 1..=the listing limit, 15 when left out.
fn page_limit() -> ObjectBuilder {
    integer()
        .minimum(Some(1))
        .maximum(Some(MAX_PAGE))
        .default(Some(encedo::DEFAULT_LIMIT.into()))
}

/// Registers this part's schemas.
pub(super) fn add(b: ComponentsBuilder) -> ComponentsBuilder {
    b.schema(
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
}
