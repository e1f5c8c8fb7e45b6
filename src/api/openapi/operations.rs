//! The operation of every route of `api::routes()`, in [`OPERATIONS`]. A new route gets a
//! line there and a function here; `tests.rs` fails for a route without one.

use utoipa::openapi::path::Operation;
use utoipa::openapi::{Content, ResponseBuilder};

use super::ops::{etag, json_response, link, page_limit, path, query, Access, Doc};
use super::schemas::{r, string};
use crate::api::body::{MAX_BODY, PATCH_FIELDS};
use crate::api::encedo;

/// Method, path (as the route table registers it) and the operation's description.
pub type Described = (&'static str, &'static str, fn() -> Operation);

/// Every documented operation.
pub const OPERATIONS: &[Described] = &[
    ("GET", "/v1/keys", list_keys),
    ("POST", "/v1/keys", create_key),
    ("GET", "/v1/keys/{kid}", get_key),
    ("PATCH", "/v1/keys/{kid}", update_key),
    ("POST", "/v1/keys/batch", batch),
    ("DELETE", "/v1/keys/{kid}", delete_key),
    ("GET", "/v1/keys/{kid}/public", public_key),
    ("GET", "/v1/keys/by-label/{label}", get_by_label),
    ("PATCH", "/v1/keys/by-label/{label}", update_by_label),
    ("DELETE", "/v1/keys/by-label/{label}", delete_by_label),
    ("GET", "/v1/jwks", jwks),
    ("POST", "/v1/auth/token", mint_token),
    ("GET", "/v1/auth/jwks", token_jwks),
    ("GET", "/v1/status", status),
    ("GET", "/v1/audit/key", audit_key),
    ("GET", "/v1/openapi.json", openapi),
    ("POST", "/api/keymgmt/update", encedo_update),
    ("POST", "/api/keymgmt/create", encedo_create),
    ("DELETE", "/api/keymgmt/delete/{kid}", encedo_delete),
    ("POST", "/api/keymgmt/search", encedo_search),
    ("GET", "/api/keymgmt/list/{offset}/{limit}", encedo_list),
    ("GET", "/api/keymgmt/list/{offset}", encedo_list_default),
    ("GET", "/api/keymgmt/get/{kid}", encedo_get),
    ("GET", "/api/auth/token", encedo_challenge),
    ("POST", "/api/auth/token", encedo_login),
    ("GET", encedo::VERSION_PATH, encedo_version),
    ("GET", encedo::STATUS_PATH, encedo_status),
];

const LIST: Access = Access::Scope(&["keymgmt:list"]);
const GET: Access = Access::Scope(&["keymgmt:get"]);
const GEN: Access = Access::Scope(&["keymgmt:gen"]);
const DEL: Access = Access::Scope(&["keymgmt:del"]);
const UPD: Access = Access::Scope(&["keymgmt:upd", "keymgmt:upd:<kid>"]);
const JSON_BODIES: &[&str] = &["application/json"];

fn list_keys() -> Operation {
    Doc::new("listKeys", "List keys, a page at a time", LIST)
        .param(query("limit", "Page size (default 100)", page_limit()))
        .param(query(
            "cursor",
            "next_cursor of the page before",
            string().into(),
        ))
        .param(query("label", "Only keys with this label", string().into()))
        .param(query(
            "label_prefix",
            "Only keys whose label starts with this",
            string().into(),
        ))
        .param(query(
            "expires_before",
            "Only keys whose not_after is before this date",
            super::schemas::date().into(),
        ))
        .json(200, "A page of keys", "KeyPage")
        .errors(
            400,
            &[
                "invalid_query",
                "invalid_limit",
                "invalid_cursor",
                "invalid_date",
            ],
        )
        .errors(503, &["token_unavailable"])
        .build()
}

fn create_key() -> Operation {
    let created = json_response("The key was made", "Created").header(
        "Location",
        utoipa::openapi::HeaderBuilder::new()
            .schema(string())
            .description(Some("The new key's path, /v1/keys/ and its kid"))
            .build(),
    );
    let created = link(created, "GetKey", "getKey", "$response.body#/key/kid");
    let created = link(created, "UpdateKey", "updateKey", "$response.body#/key/kid");
    let created = link(created, "DeleteKey", "deleteKey", "$response.body#/key/kid");
    Doc::new("createKey", "Generate a key in the token", GEN)
        .dry_run()
        .body("NewKey", JSON_BODIES, MAX_BODY)
        .answers(201, created.build())
        .json(200, "Dry run: the key as it would be", "DryRun")
        .change()
        .errors(
            400,
            &[
                "invalid_field",
                "missing_type",
                "invalid_type",
                "invalid_bits",
                "invalid_curve",
                "missing_label",
                "invalid_label",
                "invalid_description",
                "invalid_roles",
                "invalid_kid",
                "invalid_usage",
                "invalid_date",
                "invalid_validity",
                "unknown_role",
                "role_not_held",
            ],
        )
        .errors(409, &["kid_taken", "label_taken"])
        .build()
}

fn get_key() -> Operation {
    let ok = etag(json_response("The key", "Key"));
    let ok = link(ok, "UpdateKey", "updateKey", "$request.path.kid");
    let ok = link(ok, "DeleteKey", "deleteKey", "$request.path.kid");
    Doc::new("getKey", "One key", GET)
        .kid()
        .key()
        .answers(200, ok.build())
        .build()
}

/// What a PATCH of a key's attributes takes and answers, by kid or by label.
fn patch(doc: Doc) -> Doc {
    doc.describe(&format!(
        "Changes the fields given ({}); the others stay.",
        PATCH_FIELDS.join(", ")
    ))
    .dry_run()
    .if_match()
    .body(
        "KeyPatch",
        &["application/json", "application/merge-patch+json"],
        MAX_BODY,
    )
    .answers(
        200,
        etag(
            ResponseBuilder::new()
                .description("The key after the change (or, for a dry run, as it would be)")
                .content(
                    "application/json",
                    Content::new(Some(utoipa::openapi::schema::Schema::OneOf(
                        utoipa::openapi::OneOfBuilder::new()
                            .item(r("Updated"))
                            .item(r("DryRun"))
                            .build(),
                    ))),
                ),
        )
        .build(),
    )
    .change()
    .errors(
        400,
        &[
            "empty_patch",
            "invalid_label",
            "invalid_description",
            "invalid_roles",
            "unknown_role",
            "invalid_usage",
            "invalid_field",
            "irreversible_attribute",
            "invalid_date",
            "invalid_validity",
        ],
    )
    .errors(406, &["key_not_modifiable"])
    .errors(409, &["label_taken"])
}

fn update_key() -> Operation {
    patch(
        Doc::new("updateKey", "Change a key's attributes", UPD)
            .kid()
            .key(),
    )
    .build()
}

fn update_by_label() -> Operation {
    patch(
        Doc::new(
            "updateKeyByLabel",
            "Change the attributes of the key with this label",
            UPD,
        )
        .by_label(),
    )
    .build()
}

/// What a delete takes and answers, by kid or by label.
fn delete(doc: Doc) -> Doc {
    doc.describe(
        "Destroys the key's objects in the token. Turned off by keys.allow_delete = false.",
    )
    .dry_run()
    .if_match()
    .answers(
        204,
        ResponseBuilder::new()
            .description("The key is gone")
            .build(),
    )
    .json(200, "Dry run: the key that would be destroyed", "DryRun")
    .change()
    .errors(403, &["delete_disabled"])
    .errors(406, &["key_not_destroyable"])
}

fn batch() -> Operation {
    Doc::new(
        "updateKeys",
        "Change many keys with one patch, all or nothing",
        UPD,
    )
    .describe(
        "Every selected key is checked as a PATCH would check it before anything is \
             written; if any fails, nothing is written (409 batch_refused, each failure \
             listed). A token failure part-way sets back the keys already changed (batch_failed).",
    )
    .dry_run()
    .body("KeyBatch", JSON_BODIES, super::super::batch::MAX_BATCH_BODY)
    .json(
        200,
        "Each key after the change (or as it would be)",
        "BatchDone",
    )
    .change()
    .errors(
        400,
        &[
            "empty_select",
            "ambiguous_select",
            "invalid_select",
            "missing_select",
            "too_many_keys",
            "no_keys_selected",
            "duplicate_kid",
            "invalid_kid",
            "invalid_label_prefix",
            "invalid_role",
            "label_not_batchable",
            "empty_patch",
            "missing_patch",
            "invalid_patch",
            "invalid_if_match",
            "if_match_outside_selection",
            "invalid_description",
            "invalid_roles",
            "unknown_role",
            "invalid_usage",
            "invalid_field",
            "invalid_date",
            "invalid_validity",
        ],
    )
    .errors(409, &["batch_refused"])
    .errors(406, &["batch_failed"])
    .errors(503, &["batch_failed"])
    .build()
}

fn delete_key() -> Operation {
    delete(Doc::new("deleteKey", "Destroy a key", DEL).kid().key()).build()
}

fn delete_by_label() -> Operation {
    delete(Doc::new("deleteKeyByLabel", "Destroy the key with this label", DEL).by_label()).build()
}

fn public_key() -> Operation {
    let ok = ResponseBuilder::new()
        .description(
            "The public key: PEM SubjectPublicKeyInfo, or a JWK with Accept: application/jwk+json",
        )
        .content("application/x-pem-file", Content::new(Some(string())))
        .content("application/jwk+json", Content::new(Some(r("Jwk"))));
    Doc::new("getPublicKey", "An asymmetric key's public half", GET)
        .kid()
        .key()
        .answers(200, ok.build())
        .errors(406, &["no_public_key"])
        .build()
}

fn get_by_label() -> Operation {
    Doc::new("getKeyByLabel", "The key with this label", GET)
        .by_label()
        .answers(200, etag(json_response("The key", "Key")).build())
        .build()
}

fn jwk_set(what: &str, content_type: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(what)
        .content(content_type, Content::new(Some(r("JwkSet"))))
        .build()
}

fn jwks() -> Operation {
    Doc::new(
        "getJwks",
        "The public keys of the keys that match, as a JWK set",
        GET,
    )
    .param(query(
        "label_prefix",
        "Only keys whose label starts with this",
        string().into(),
    ))
    .param(query("role", "Only keys with this role", string().into()))
    .answers(200, jwk_set("A JWK set", "application/jwk-set+json"))
    .errors(400, &["invalid_query", "invalid_role", "too_many_keys"])
    .errors(503, &["token_unavailable"])
    .build()
}

fn mint_token() -> Operation {
    Doc::new("mintToken", "Mint a bearer token for the HTTPS port", Access::Scope(&["auth:token"]))
        .describe("Over the Unix socket only: on the HTTPS port the answer is always 403 unix_socket_only. The token carries only scopes the caller holds.")
        .body("TokenRequest", JSON_BODIES, MAX_BODY)
        .json(200, "The token", "Token")
        .errors(400, &["invalid_token_request", "invalid_scopes", "invalid_ttl"])
        .errors(403, &["unix_socket_only"])
        .errors(503, &["token_unavailable"])
        .build()
}

fn token_jwks() -> Operation {
    Doc::new(
        "getTokenJwks",
        "The key that verifies hsmkeyd's bearer tokens",
        Access::Public,
    )
    .answers(200, jwk_set("A JWK set", "application/json"))
    .build()
}

fn status() -> Operation {
    Doc::new(
        "getStatus",
        "What the daemon serves and how it is doing",
        LIST,
    )
    .json(200, "The status", "Status")
    .build()
}

fn audit_key() -> Operation {
    Doc::new(
        "getAuditKey",
        "The key that signs the audit trail's checkpoints",
        Access::Principal,
    )
    .json(200, "The audit-signing key", "AuditKey")
    .build()
}

fn openapi() -> Operation {
    Doc::new("getOpenApi", "This document", Access::Principal)
        .json(200, "The OpenAPI document", "OpenApi")
        .build()
}

fn encedo_update() -> Operation {
    Doc::new("encedoUpdate", "Encedo HEM: change a key's label and description", UPD)
        .describe("The appliance rewrites the whole record: leaving descr out clears the description. An unknown kid is 406, as on the appliance.")
        .length_required()
        .body("EncedoUpdate", JSON_BODIES, encedo::MAX_BODY)
        .json(200, "Done", "EncedoDone")
        .change()
        .errors(
            400,
            &["missing_kid", "invalid_kid", "missing_label", "invalid_label", "invalid_descr"],
        )
        .errors(406, &["key_not_found", "key_not_modifiable"])
        .errors(409, &["label_taken"])
        .build()
}

fn encedo_create() -> Operation {
    let ok = json_response("The key was made", "EncedoKid");
    let ok = link(ok, "EncedoGet", "encedoGet", "$response.body#/kid");
    let ok = link(ok, "EncedoDelete", "encedoDelete", "$response.body#/kid");
    Doc::new("encedoCreate", "Encedo HEM: generate a key", GEN)
        .length_required()
        .body("EncedoCreate", JSON_BODIES, encedo::MAX_BODY)
        .answers(200, ok.build())
        .change()
        .errors(
            400,
            &[
                "missing_label",
                "invalid_label",
                "missing_type",
                "invalid_type",
                "unsupported_type",
                "unsupported_mode",
                "invalid_descr",
            ],
        )
        .errors(409, &["kid_taken", "label_taken"])
        .build()
}

fn encedo_delete() -> Operation {
    Doc::new("encedoDelete", "Encedo HEM: destroy a key", DEL)
        .kid()
        .if_match()
        .json(200, "The key is gone", "EncedoDone")
        .change()
        .errors(403, &["delete_disabled"])
        .errors(406, &["key_not_found", "key_not_destroyable"])
        .build()
}

fn encedo_search() -> Operation {
    Doc::new(
        "encedoSearch",
        "Encedo HEM: keys whose description matches",
        Access::Scope(&["keymgmt:search", "keymgmt:list"]),
    )
    .describe("A read with a body: no audit entry on success.")
    .length_required()
    .body("EncedoSearch", JSON_BODIES, encedo::MAX_BODY)
    .json(
        200,
        "The keys that match, a page of them",
        "EncedoSearchResult",
    )
    .errors(
        400,
        &[
            "missing_descr",
            "invalid_descr",
            "invalid_offset",
            "invalid_limit",
        ],
    )
    .errors(404, &["no_key_matches"])
    .errors(503, &["token_unavailable"])
    .build()
}

fn offset() -> utoipa::openapi::path::Parameter {
    path(
        "offset",
        super::schemas::integer().minimum(Some(0)).build().into(),
    )
}

fn encedo_list() -> Operation {
    Doc::new("encedoList", "Encedo HEM: a page of keys", LIST)
        .param(offset())
        .param(path("limit", page_limit()))
        .json(200, "A page of keys", "EncedoList")
        .errors(400, &["invalid_offset", "invalid_limit"])
        .errors(503, &["token_unavailable"])
        .build()
}

fn encedo_list_default() -> Operation {
    Doc::new("encedoListDefault", "Encedo HEM: a page of 15 keys", LIST)
        .param(offset())
        .json(200, "A page of keys", "EncedoList")
        .errors(400, &["invalid_offset"])
        .errors(503, &["token_unavailable"])
        .build()
}

fn encedo_get() -> Operation {
    Doc::new(
        "encedoGet",
        "Encedo HEM: a key's type, public key and last update",
        Access::Scope(&["keymgmt:get", "keymgmt:use:<kid>"]),
    )
    .kid()
    .json(200, "The key", "EncedoGet")
    .errors(406, &["key_not_found"])
    .errors(503, &["token_unavailable"])
    .build()
}

fn encedo_challenge() -> Operation {
    Doc::new(
        "encedoChallenge",
        "Encedo HEM login, step 1: a challenge (single use, valid for a few seconds)",
        Access::Public,
    )
    .json(200, "The challenge", "EncedoChallenge")
    .errors(404, &["login_disabled"])
    .errors(503, &["too_many_challenges"])
    .build()
}

fn encedo_login() -> Operation {
    Doc::new(
        "encedoLogin",
        "Encedo HEM login, step 2: an eJWT for one scope in, a bearer token out",
        Access::Public,
    )
    .describe(
        "The eJWT is HMAC-SHA256 keyed with X25519(the user's key, spk); each answer \
         takes at least 500 ms (1,500 ms after three failures).",
    )
    .length_required()
    .body("EncedoLogin", JSON_BODIES, encedo::MAX_BODY)
    .json(200, "A bearer token for the scope asked for", "EncedoToken")
    .change()
    .errors(400, &["invalid_auth"])
    .errors(
        401,
        &[
            "wrong_audience",
            "unknown_user",
            "bad_signature",
            "unknown_challenge",
            "challenge_expired",
            "auth_expired",
        ],
    )
    .errors(403, &["missing_scope"])
    .errors(404, &["login_disabled"])
    .build()
}

fn encedo_version() -> Operation {
    Doc::new(
        "encedoVersion",
        "Encedo HEM: what hsmkeyd is",
        Access::Public,
    )
    .json(200, "Versions", "EncedoVersion")
    .build()
}

fn encedo_status() -> Operation {
    Doc::new(
        "encedoStatus",
        "Encedo HEM: that hsmkeyd runs",
        Access::Public,
    )
    .json(200, "Status", "EncedoStatus")
    .build()
}
