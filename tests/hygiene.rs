//! Input that looks harmless and is not: invisible format characters in labels, duplicate
//! JSON fields, absolute-form request targets. Each is refused with a JSON error naming the
//! problem, and nothing changes in the token.

mod common;

use common::fixture::{token_with, Key, AES};
use common::{Daemon, Response, Setup};
use serde_json::json;

fn secret(label: &str) -> Vec<(String, String)> {
    vec![("Secret".to_string(), label.to_string())]
}

#[test]
fn labels_with_invisible_format_characters_are_refused() {
    let t = token_with(&[Key::aes(AES, "start")]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    for (what, label) in [
        ("right-to-left override", "pay\u{202E}spo"),
        ("zero-width space", "pay\u{200B}ops"),
        ("zero-width joiner", "pay\u{200D}ops"),
        ("byte order mark", "\u{FEFF}pay-ops"),
        ("left-to-right isolate", "\u{2066}pay-ops"),
        ("soft hyphen", "pay\u{00AD}ops"),
    ] {
        let body = c
            .patch(AES, &json!({ "label": label }))
            .assert_error(400, "invalid_label");
        assert_eq!(body["field"], "label", "{what}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("format characters"),
            "{what}: {body}"
        );
    }
    assert_eq!(t.labels_of(AES), secret("start"));
    // Letters of any script are fine.
    let body = Response::ok(&c.patch(AES, &json!({"label": "Überweisung-ключ-支付"})));
    assert_eq!(body["key"]["label"], "Überweisung-ключ-支付");
    assert_eq!(t.labels_of(AES), secret("Überweisung-ключ-支付"));
}

#[test]
fn a_field_given_twice_is_refused_naming_it() {
    let t = token_with(&[Key::aes(AES, "start")]);
    let d = Daemon::start(&t, &Setup::default());
    let c = d.client();
    let r = c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[("Content-Type", "application/json")],
        br#"{"label":"a","label":"b"}"#,
    );
    let body = r.assert_error(400, "duplicate_field");
    assert_eq!(body["field"], "label");
    let r = c.send(
        "POST",
        "/api/keymgmt/update",
        &[("Content-Type", "application/json")],
        format!(r#"{{"kid":"{AES}","label":"a","kid":"{AES}"}}"#).as_bytes(),
    );
    let body = r.assert_error(400, "duplicate_field");
    assert_eq!(body["field"], "kid");
    assert_eq!(t.labels_of(AES), secret("start"));
    // Not an object at all is still its own error.
    c.send(
        "PATCH",
        &format!("/v1/keys/{AES}"),
        &[("Content-Type", "application/json")],
        b"[1,2]",
    )
    .assert_error(400, "invalid_json");
}

#[test]
fn an_absolute_form_request_target_gets_400() {
    let t = token_with(&[Key::aes(AES, "start")]);
    let d = Daemon::start(&t, &Setup::default());
    let r = d.client().raw(
        format!(
            "PATCH http://localhost/v1/keys/{AES} HTTP/1.1\r\nHost: localhost\r\nConnection: \
             close\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{{\"label\":\"x\"}}"
        )
        .as_bytes(),
    );
    r.assert_error(400, "absolute_uri");
    let r = d.client().raw(
        b"GET http://localhost/v1/keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    r.assert_error(400, "absolute_uri");
    assert_eq!(t.labels_of(AES), secret("start"));
    // The origin form works.
    Response::ok(&d.client().get("/v1/keys"));
}
