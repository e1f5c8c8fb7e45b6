//! The document against the code: the route table, the parsers' field lists, the key's
//! JSON, and the committed copy.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::super::body::{key_patch, PATCH_FIELDS};
use super::super::encedo::{new_key_spec, CREATE_FIELDS, SEARCH_FIELDS, UPDATE_FIELDS};
use super::super::lifecycle::{new_key, NEW_KEY_FIELDS, USAGE_FLAGS};
use super::schemas::{ENCEDO_TYPES, KEY_ATTRIBUTES, KEY_REQUIRED, STATUS_FIELDS};
use super::*;
use crate::keys::model::{Curve, KeyState, KeyType, KeyView};

fn doc() -> Value {
    serde_json::to_value(document()).unwrap()
}

fn schema(name: &str) -> Value {
    doc()["components"]["schemas"][name].clone()
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn list(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_route_has_an_operation_and_every_operation_a_route() {
    let d = doc();
    let routes: BTreeSet<(String, String)> = crate::api::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    for (method, path) in &routes {
        assert!(
            d["paths"][path][method.to_lowercase()].is_object(),
            "route {method} {path} is not in the OpenAPI document: give it a line in \
             OPERATIONS (src/api/openapi/operations.rs) and a function there"
        );
    }
    let documented: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routes,
        "OPERATIONS documents a route the table does not serve"
    );
    let ids: BTreeSet<String> = OPERATIONS
        .iter()
        .map(|(_, _, op)| op().operation_id.unwrap())
        .collect();
    assert_eq!(ids.len(), OPERATIONS.len(), "operation ids are unique");
}

#[test]
fn the_committed_document_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let generated = json();
    if std::env::var_os("HSMKEYD_WRITE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from what the code generates; regenerate it with\n  \
         HSMKEYD_WRITE_OPENAPI=1 cargo test --lib api::openapi\nand commit it"
    );
}

#[test]
fn the_key_schema_has_the_fields_a_key_serializes_to() {
    let mut full = KeyView::example(KeyType::Ec, Some(Curve::P256));
    full.bits = Some(256);
    full.state = KeyState::Inconsistent("two private keys".into());
    let bare = KeyView::example(KeyType::Aes, None);
    let (full, bare) = (
        serde_json::to_value(&full).unwrap(),
        serde_json::to_value(&bare).unwrap(),
    );
    let key = schema("Key");
    assert_eq!(
        names(&key["properties"]),
        names(&full),
        "the Key schema (src/api/openapi/schemas/keys.rs) and KeyView's JSON have different fields"
    );
    let required: BTreeSet<String> = key["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        required,
        names(&bare),
        "Key.required: the fields always there"
    );
    assert_eq!(required, list(&KEY_REQUIRED));
    assert_eq!(
        names(&key["properties"]["attributes"]["properties"]),
        names(&full["attributes"]),
    );
    assert_eq!(names(&full["attributes"]), list(&KEY_ATTRIBUTES));
}

#[test]
fn the_patch_schema_has_the_fields_the_parser_accepts() {
    let props = names(&schema("KeyPatch")["properties"]);
    assert_eq!(
        props,
        list(PATCH_FIELDS),
        "KeyPatch (schemas/keys.rs patch_properties) and body::PATCH_FIELDS differ"
    );
    for field in PATCH_FIELDS {
        // A value of the wrong type: refused as that field, never as unknown.
        let e = key_patch(json!({ *field: {"x": 1} }).as_object().unwrap().clone()).unwrap_err();
        assert_eq!(e.field(), Some(*field), "{field}");
        assert_ne!(e.code(), "unknown_field", "{field}");
    }
}

#[test]
fn the_new_key_schema_has_the_fields_types_and_sizes_the_parser_accepts() {
    let variants = schema("NewKey")["oneOf"].as_array().unwrap().clone();
    let mut fields = BTreeSet::new();
    for v in &variants {
        let props = &v["properties"];
        fields.extend(names(props));
        assert_eq!(names(&props["usage"]["properties"]), list(&USAGE_FLAGS));
        let kind = props["type"]["enum"][0].as_str().unwrap();
        let mut bodies = vec![json!({"type": kind, "label": "k"})];
        for b in props["bits"]["enum"].as_array().into_iter().flatten() {
            bodies.push(json!({"type": kind, "label": "k", "bits": b}));
        }
        if let Some(min) = props["bits"]["minimum"].as_u64() {
            bodies.push(json!({"type": kind, "label": "k", "bits": min}));
            bodies.push(json!({"type": kind, "label": "k", "bits": props["bits"]["maximum"]}));
        }
        for c in props["curve"]["enum"].as_array().into_iter().flatten() {
            bodies.push(json!({"type": kind, "label": "k", "curve": c}));
        }
        for (flag, s) in props["usage"]["properties"].as_object().unwrap() {
            let on = s.get("enum").is_none();
            bodies.push(json!({"type": kind, "label": "k", "usage": {flag.as_str(): on}}));
        }
        for body in bodies {
            let r = new_key(body.as_object().unwrap().clone());
            assert!(r.is_ok(), "{body} fits NewKey but the parser refuses it");
        }
    }
    assert_eq!(fields, list(&NEW_KEY_FIELDS));
}

#[test]
fn the_encedo_schemas_have_the_fields_the_parsers_accept() {
    for (name, fields) in [
        ("EncedoUpdate", &UPDATE_FIELDS),
        ("EncedoCreate", &CREATE_FIELDS),
        ("EncedoSearch", &SEARCH_FIELDS),
    ] {
        assert_eq!(
            names(&schema(name)["properties"]),
            list(fields),
            "{name} and its parser's field list differ"
        );
    }
    let types: Vec<String> = schema("EncedoCreate")["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ENCEDO_TYPES);
    for t in ENCEDO_TYPES {
        assert!(new_key_spec(t).is_ok(), "{t}");
    }
}

#[test]
fn limits_come_from_the_value_types() {
    use crate::values::{MAX_DESCRIPTION_CHARS, MAX_LABEL_BYTES};
    let patch = &schema("KeyPatch")["properties"];
    assert_eq!(patch["label"]["maxLength"], json!(MAX_LABEL_BYTES));
    assert_eq!(patch["label"]["minLength"], json!(1));
    assert_eq!(
        patch["description"]["maxLength"],
        json!(MAX_DESCRIPTION_CHARS)
    );
    let status = names(&schema("Status")["properties"]);
    assert_eq!(status, list(&STATUS_FIELDS));
    assert_eq!(
        schema(&super::schemas::token_request_name())["required"],
        json!(["scopes"])
    );
}

#[test]
fn both_security_schemes_are_declared_and_used() {
    let d = doc();
    let schemes = &d["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["bearer"]["bearerFormat"], "JWT");
    assert!(schemes["peerCredentials"]["description"]
        .as_str()
        .unwrap()
        .contains("SO_PEERCRED"));
    let list = &d["paths"]["/v1/keys"]["get"]["security"];
    assert_eq!(
        list,
        &json!([{"bearer": ["keymgmt:list"]}, {"peerCredentials": ["keymgmt:list"]}])
    );
    assert!(d["paths"]["/v1/auth/jwks"]["get"].get("security").is_none());
}

/// Found by schemathesis: a dry run's `changes` hold any value before and after (a label,
/// null for a key made or destroyed), and the schema had typed them as objects.
#[test]
fn a_dry_runs_changes_may_hold_any_value() {
    let change = &schema("DryRun")["properties"]["changes"]["additionalProperties"];
    for side in ["before", "after"] {
        assert_eq!(change["properties"][side], json!({}), "{side}");
    }
}
