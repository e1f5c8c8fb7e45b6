//! Who may call the daemon and what they may do: callers are identified by SO_PEERCRED
//! (uid, then gid) and mapped to the configured principals; unknown callers get 401
//! everywhere, missing scopes and roles get 403, and a refused request changes nothing in
//! the token (read back independently with pkcs11-tool).
//!
//! The tests run as root, so most of them vary the principals instead of the caller. One
//! test spawns a real non-root client (this test binary itself, run as uid 65534 through
//! the ignored `child_client` test) to prove the daemon uses the peer's real credentials.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::fixture::{
    access, token_with, Key, Principal, AES, ALL_SCOPES, BOTH_ROLES, NO_KEY, OTHER,
};
use common::{Client, Daemon, Setup, Token};
use serde_json::{json, Value};

fn two_keys() -> Token {
    token_with(&[Key::aes(AES, "key-a"), Key::aes(OTHER, "key-b")])
}

fn gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

/// A setup with `principals` and the roles "ops" and "payments" defined.
fn with_principals(principals: &[Principal]) -> Setup {
    Setup::with_access(access(&BOTH_ROLES, principals))
}

/// The key's labels as pkcs11-tool sees them.
fn label_in_token(t: &Token, kid: &str) -> String {
    let labels = t.labels_of(kid);
    assert_eq!(labels.len(), 1, "{kid}: {labels:?}");
    labels[0].1.clone()
}

/// Both keys keep their generated labels and hsmkeyd wrote no metadata object.
#[track_caller]
fn assert_untouched(t: &Token) {
    assert_eq!(label_in_token(t, AES), "key-a");
    assert_eq!(label_in_token(t, OTHER), "key-b");
    assert_eq!(
        meta_objects(t),
        Vec::<String>::new(),
        "metadata was written"
    );
}

/// hsmkeyd's metadata objects in the token (not the audit trail's high-water mark).
fn meta_objects(t: &Token) -> Vec<String> {
    t.objects()
        .into_iter()
        .filter(|o| o.class == "Data" && !o.label.starts_with("hsmkeyd-audit-mark"))
        .map(|o| o.label)
        .collect()
}

#[track_caller]
fn assert_missing_scope(r: &common::Response, scope: &str) {
    let body = r.assert_error(403, "missing_scope");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains(scope), "message does not name {scope}: {body}");
}

/// Every endpoint, and some paths that are none, with good and bad input alike.
fn every_request(c: &Client) -> Vec<(String, common::Response)> {
    let patch =
        |kid: &str, body: Value| (format!("PATCH /v1/keys/{kid} {body}"), c.patch(kid, &body));
    vec![
        ("GET /v1/keys".into(), c.get("/v1/keys")),
        ("GET /v1/keys?limit=1".into(), c.get("/v1/keys?limit=1")),
        ("GET /v1/keys?limit=0".into(), c.get("/v1/keys?limit=0")),
        (
            format!("GET /v1/keys/{AES}"),
            c.get(&format!("/v1/keys/{AES}")),
        ),
        (
            format!("GET /v1/keys/{NO_KEY}"),
            c.get(&format!("/v1/keys/{NO_KEY}")),
        ),
        ("GET /v1/keys/xyz".into(), c.get("/v1/keys/xyz")),
        patch(AES, json!({"label": "stolen"})),
        patch(AES, json!({"description": "stolen", "roles": ["ops"]})),
        patch(OTHER, json!({"colour": "red"})),
        patch(NO_KEY, json!({"label": "x"})),
        (
            format!("PATCH /v1/keys/{AES} text/plain"),
            c.send(
                "PATCH",
                &format!("/v1/keys/{AES}"),
                &[("Content-Type", "text/plain")],
                b"{\"label\":\"x\"}",
            ),
        ),
        (
            format!("DELETE /v1/keys/{AES}"),
            c.send("DELETE", &format!("/v1/keys/{AES}"), &[], b""),
        ),
        (
            "POST /v1/keys".into(),
            c.send(
                "POST",
                "/v1/keys",
                &[("Content-Type", "application/json")],
                b"{}",
            ),
        ),
        ("GET /".into(), c.get("/")),
        ("GET /v1/status".into(), c.get("/v1/status")),
        ("GET /v1/audit/key".into(), c.get("/v1/audit/key")),
    ]
}

#[test]
fn an_unknown_uid_gets_401_on_every_endpoint_and_changes_nothing() {
    let t = two_keys();
    // The daemon creates its signing pairs and the audit high-water mark on first start;
    // nothing else may appear.
    let managed = |t: &Token| {
        t.objects()
            .into_iter()
            .filter(|o| {
                o.label != "hsmkeyd-jwt-signing"
                    && o.label != "hsmkeyd-audit-signing"
                    && !o.label.starts_with("hsmkeyd-audit-mark")
            })
            .count()
    };
    let before = managed(&t);
    let setup = with_principals(&[Principal::named("someone-else")
        .uids(&[4242])
        .gids(&[4242])
        .scopes(&ALL_SCOPES)
        .roles(&BOTH_ROLES)]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    for (what, r) in every_request(&c) {
        let body = r.assert_error_for(&what, 401, "unauthenticated");
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("uid {}", common::uid())),
            "{what}: the message should name the caller's uid: {body}"
        );
        assert!(
            !body.to_string().contains("key-a") && !body.to_string().contains("key-b"),
            "{what}: a 401 leaks key data: {body}"
        );
    }
    assert_untouched(&t);
    assert_eq!(managed(&t), before);
    assert!(
        d.log().contains("maps to no principal"),
        "refused callers are logged: {}",
        d.log()
    );
}

#[test]
fn without_any_principal_nobody_gets_in() {
    let t = two_keys();
    let d = Daemon::start(&t, &with_principals(&[]));
    let c = d.client();
    c.get("/v1/keys").assert_error(401, "unauthenticated");
    c.get(&format!("/v1/keys/{AES}"))
        .assert_error(401, "unauthenticated");
    c.patch(AES, &json!({"label": "x"}))
        .assert_error(401, "unauthenticated");
    assert_eq!(label_in_token(&t, AES), "key-a");
}

#[test]
fn a_principal_mapped_by_gid_works_when_no_uid_matches() {
    let t = two_keys();
    let setup = with_principals(&[
        Principal::named("other-user")
            .uids(&[4242])
            .scopes(&["keymgmt:list"]),
        Principal::named("by-group")
            .gids(&[gid()])
            .scopes(&ALL_SCOPES)
            .roles(&["ops"]),
    ]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    let r = c.get("/v1/keys");
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["total"], 2);
    let r = c.get(&format!("/v1/keys/{AES}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["label"], "key-a");
    let r = c.patch(AES, &json!({"label": "renamed-by-group"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["changed"], json!(["label"]));
    assert_eq!(label_in_token(&t, AES), "renamed-by-group");
}

#[test]
fn a_uid_match_wins_over_a_gid_match() {
    let t = two_keys();
    let setup = with_principals(&[
        Principal::me("by-uid").scopes(&["keymgmt:list"]),
        Principal::named("by-group")
            .gids(&[gid()])
            .scopes(&ALL_SCOPES)
            .roles(&BOTH_ROLES),
    ]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    assert_eq!(c.get("/v1/keys").status, 200);
    // The group's scopes must not leak into the uid's principal.
    assert_missing_scope(&c.get(&format!("/v1/keys/{AES}")), "keymgmt:get");
    assert_missing_scope(&c.patch(AES, &json!({"label": "x"})), "keymgmt:upd");
    assert_eq!(label_in_token(&t, AES), "key-a");
}

#[test]
fn a_read_only_principal_cannot_patch_and_changes_nothing() {
    let t = two_keys();
    let setup = with_principals(&[Principal::me("reader")
        .scopes(&["keymgmt:list", "keymgmt:get"])
        .roles(&BOTH_ROLES)]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    let r = c.get("/v1/keys");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 2);
    let r = c.get(&format!("/v1/keys/{AES}"));
    assert_eq!(r.status, 200);
    let etag = r.json()["etag"].clone();

    assert_missing_scope(&c.patch(AES, &json!({"label": "stolen"})), "keymgmt:upd");
    assert_missing_scope(
        &c.patch(OTHER, &json!({"description": "stolen", "roles": ["ops"]})),
        "keymgmt:upd",
    );
    // The scope is checked before the key is looked up: no existence oracle.
    assert_missing_scope(&c.patch(NO_KEY, &json!({"label": "x"})), "keymgmt:upd");

    assert_untouched(&t);
    let r = c.get(&format!("/v1/keys/{AES}"));
    assert_eq!(r.json()["etag"], etag, "the key changed");
    assert_eq!(r.json()["updated_at"], Value::Null);
}

#[test]
fn an_update_only_principal_cannot_list_or_read() {
    let t = two_keys();
    let setup = with_principals(&[Principal::me("writer").scopes(&["keymgmt:upd"])]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    assert_missing_scope(&c.get("/v1/keys"), "keymgmt:list");
    assert_missing_scope(&c.get("/v1/keys?label=key-a"), "keymgmt:list");
    assert_missing_scope(&c.get(&format!("/v1/keys/{AES}")), "keymgmt:get");
    // What it holds works.
    let r = c.patch(AES, &json!({"label": "written"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(label_in_token(&t, AES), "written");
}

#[test]
fn a_scope_narrowed_to_one_kid_updates_that_key_only() {
    let t = two_keys();
    let setup = with_principals(&[Principal::me("one-key")
        .scopes(&["keymgmt:list", "keymgmt:get", &format!("keymgmt:upd:{AES}")])
        .roles(&["ops"])]);
    let d = Daemon::start(&t, &setup);
    let c = d.client();

    let r = c.patch(AES, &json!({"label": "mine"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["key"]["label"], "mine");
    assert_eq!(label_in_token(&t, AES), "mine");
    // The kid in the path is case-insensitive; the scope follows the key, not the spelling.
    let r = c.patch(&AES.to_uppercase(), &json!({"label": "mine-again"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(label_in_token(&t, AES), "mine-again");

    let r = c.patch(OTHER, &json!({"label": "not-mine"}));
    assert_missing_scope(&r, &format!("keymgmt:upd:{OTHER}"));
    assert_missing_scope(
        &c.patch(OTHER, &json!({"description": "not mine"})),
        "keymgmt:upd",
    );
    assert_eq!(label_in_token(&t, OTHER), "key-b");
    assert_eq!(
        c.get(&format!("/v1/keys/{OTHER}")).json()["description"],
        Value::Null
    );
}

#[test]
fn a_key_with_roles_needs_a_principal_holding_one() {
    let t = two_keys();
    // Give key A the role "payments" as a principal that holds it.
    let d = Daemon::start(&t, &Setup::default());
    let r = d
        .client()
        .patch(AES, &json!({"roles": ["payments"], "description": "pays"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(d.stop(), 0);
    let meta_before = meta_objects(&t);
    assert_eq!(
        meta_before.len(),
        2,
        "the record and its spare: {meta_before:?}"
    );

    // An "ops" principal with every scope.
    let ops = with_principals(&[Principal::me("ops-only")
        .scopes(&ALL_SCOPES)
        .roles(&["ops"])]);
    let d = Daemon::start(&t, &ops);
    let c = d.client();
    let etag = c.get(&format!("/v1/keys/{AES}")).json()["etag"].clone();
    for patch in [
        json!({"label": "hijacked"}),
        json!({"roles": ["ops"]}),
        json!({"roles": null}),
        json!({"description": "hijacked"}),
    ] {
        let r = c.patch(AES, &patch);
        let body = r.assert_error(403, "missing_role");
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains("payments"),
            "{patch}: the message names the role: {body}"
        );
        assert!(
            msg.contains(AES),
            "{patch}: the message names the key: {body}"
        );
    }
    let key = c.get(&format!("/v1/keys/{AES}")).json();
    assert_eq!(key["etag"], etag, "a refused update changed the key");
    assert_eq!(key["roles"], json!(["payments"]));
    assert_eq!(key["description"], "pays");
    assert_eq!(label_in_token(&t, AES), "key-a");
    assert_eq!(meta_objects(&t), meta_before, "metadata was written");

    // A key without roles is open to any principal with the scope.
    let r = c.patch(OTHER, &json!({"label": "ops-may"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(label_in_token(&t, OTHER), "ops-may");
    assert_eq!(d.stop(), 0);

    // A "payments" principal may.
    let payments = with_principals(&[Principal::me("payments")
        .scopes(&["keymgmt:upd", "keymgmt:get"])
        .roles(&["payments"])]);
    let d = Daemon::start(&t, &payments);
    let c = d.client();
    let r = c.patch(AES, &json!({"label": "paid"}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["key"]["roles"], json!(["payments"]));
    assert_eq!(label_in_token(&t, AES), "paid");
}

// ---------------------------------------------------------------------------------------
// A real non-root peer.
// ---------------------------------------------------------------------------------------

const CHILD_SOCK: &str = "HSMKEYD_TEST_CHILD_SOCK";
const CHILD_MODE: &str = "HSMKEYD_TEST_CHILD_MODE";
const NOBODY: u32 = 65534;

/// The root-only tests run exactly when the binary runs as root: a binary built by another
/// user than the one running it fails here, and so does a CI run (`CI=true`; CI runs as
/// root) that would leave them ignored.
#[test]
fn root_only_tests_run_when_and_only_when_root() {
    let root = nix::unistd::geteuid().is_root();
    assert_eq!(
        cfg!(built_as_root),
        root,
        "built as root: {}, running as root: {root}; rebuild as the user who runs the tests",
        cfg!(built_as_root)
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(
            root,
            "CI=true but not root: the root-only tests would not run"
        );
    }
}

/// Not a test of its own: the client half of `a_non_root_peer_is_identified_by_so_peercred`,
/// run in a child process as another uid. Without the environment it does nothing.
#[test]
#[ignore = "helper: run as a child process by a_non_root_peer_is_identified_by_so_peercred"]
fn child_client() {
    let Ok(sock) = std::env::var(CHILD_SOCK) else {
        return;
    };
    let ids = format!(
        "uid={} gid={}",
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw()
    );
    println!("CHILD-IDS {ids}");
    let mode = std::env::var(CHILD_MODE).unwrap_or_default();
    if mode == "connect" {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(_) => println!("CHILD-CONNECT ok"),
            Err(e) => println!("CHILD-CONNECT {:?}", e.kind()),
        }
        return;
    }
    let c = Client { sock: sock.into() };
    let r = c.get("/v1/keys");
    println!(
        "CHILD-LIST {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let r = c.patch(AES, &json!({"label": "set-by-nobody"}));
    println!(
        "CHILD-PATCH {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

/// Runs `child_client` as `uid`/`gid` and returns its `CHILD-*` lines, keyed by tag.
fn run_child(sock: &std::path::Path, uid: u32, gid: u32, mode: &str) -> Vec<(String, String)> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_client", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_SOCK, sock)
        .env(CHILD_MODE, mode)
        .stdin(Stdio::null())
        .uid(uid)
        .gid(gid)
        .output()
        .expect("spawn the child client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<(String, String)> = stdout
        .lines()
        // libtest may print "test child_client ... " on the same line, before the first one.
        .filter_map(|l| l.find("CHILD-").map(|i| &l[i..]))
        .map(|l| {
            let (tag, rest) = l.split_once(' ').unwrap_or((l, ""));
            (tag.to_string(), rest.to_string())
        })
        .collect();
    let ids = lines.iter().find(|(t, _)| t == "CHILD-IDS");
    assert_eq!(
        ids.map(|(_, v)| v.as_str()),
        Some(format!("uid={uid} gid={gid}").as_str()),
        "the child did not run as intended: {stdout}"
    );
    lines
}

fn child_line<'a>(lines: &'a [(String, String)], tag: &str) -> &'a str {
    lines
        .iter()
        .find(|(t, _)| t == tag)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {tag} line in {lines:?}"))
}

/// "STATUS BODY" -> (status, JSON body).
fn child_response(line: &str) -> (u16, Value) {
    let (status, body) = line.split_once(' ').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_non_root_peer_is_identified_by_so_peercred() {
    common::require_root(&format!("switching the client to uid {NOBODY}"));
    let t = two_keys();
    // The child (gid 0) reaches the 0660 root:root socket through its group; the socket's
    // directory must be traversable, and stays unwritable for group and others.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let setup = with_principals(&[Principal::named("nobody-svc")
        .uids(&[NOBODY])
        .scopes(&ALL_SCOPES)
        .roles(&["ops"])]);
    let d = Daemon::start(&t, &setup);

    // Root maps to no principal here.
    let body = d
        .client()
        .get("/v1/keys")
        .assert_error(401, "unauthenticated");
    assert!(
        body["message"].as_str().unwrap().contains("uid 0 "),
        "{body}"
    );

    let lines = run_child(&d.sock, NOBODY, 0, "api");
    let (status, list) = child_response(child_line(&lines, "CHILD-LIST"));
    assert_eq!(status, 200, "{list}");
    assert_eq!(common::kids(&list["keys"]), vec![AES, OTHER]);
    let (status, patched) = child_response(child_line(&lines, "CHILD-PATCH"));
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["key"]["label"], "set-by-nobody");
    assert_eq!(label_in_token(&t, AES), "set-by-nobody");

    // Root still gets nothing, even after uid 65534 was served.
    d.client()
        .patch(OTHER, &json!({"label": "root"}))
        .assert_error(401, "unauthenticated");
    assert_eq!(label_in_token(&t, OTHER), "key-b");

    // The socket's mode (0660, root:root) keeps out a process with neither the owner's uid
    // nor its group, even though its uid is a principal.
    let lines = run_child(&d.sock, NOBODY, NOBODY, "connect");
    assert_eq!(child_line(&lines, "CHILD-CONNECT"), "PermissionDenied");
    assert_eq!(
        fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
}
