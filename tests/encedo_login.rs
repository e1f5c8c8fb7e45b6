//! The Encedo HEM login, driven by an independent client: a Python script
//! (tests/common/encedo_client.py, with the `cryptography` package) written from the
//! appliance's description logs in over HTTPS with the user's passphrase, and the tokens it
//! gets run the appliance's key life cycle, read back with pkcs11-tool. Every refusal has
//! the appliance's status and an entry in a real journald.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::fixture::{access, pair, Principal};
use common::journal::Journal;
use common::python::python_with;
use common::{require_root, run_ok, Daemon, Setup, Token};
use serde_json::{json, Value};

/// The dev user's scopes: every keymgmt scope, as softhsm-setup.sh configures it.
const DEV_SCOPES: [&str; 6] = [
    "keymgmt:list",
    "keymgmt:search",
    "keymgmt:get",
    "keymgmt:upd",
    "keymgmt:gen",
    "keymgmt:del",
];

/// Seconds a challenge may be answered here (short, so the expiry test waits little).
const CHALLENGE_TTL_S: u64 = 2;

/// The Python client, pointed at one daemon.
struct Client {
    python: PathBuf,
    url: String,
    ca: PathBuf,
    passphrase: PathBuf,
}

impl Client {
    /// Runs the client in `mode` (see the script) for `scope`.
    fn run(&self, scope: &str, mode: &str) -> Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/encedo_client.py");
        let out = run_ok(
            Command::new(&self.python)
                .arg(script)
                .arg(&self.url)
                .arg(&self.ca)
                .arg(&self.passphrase)
                .args([scope, mode]),
            "encedo_client.py",
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client output ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The one answer of a run in `mode`.
    fn answer(&self, scope: &str, mode: &str) -> Value {
        let v = self.run(scope, mode);
        assert_eq!(v["answers"].as_array().unwrap().len(), 1, "{v}");
        v["answers"][0].clone()
    }

    /// A bearer token for `scope`.
    fn token(&self, scope: &str) -> String {
        let a = self.answer(scope, "ok");
        assert_eq!(a["status"], 200, "login for {scope}: {a}");
        a["body"]["token"].as_str().expect("token").to_string()
    }
}

/// A token's claims (it is hsmkeyd's own JWT; the signature is checked by the daemon).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// A daemon on HTTPS logging to `j`, with the dev user logging in by passphrase.
fn start(t: &Token, j: &Journal) -> (Daemon, Client) {
    require_root("a journald in its own mount namespace");
    let passphrase = t.path().join("encedo-passphrase");
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(
        &passphrase,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let scopes = serde_json::to_string(&DEV_SCOPES).unwrap();
    let setup = Setup {
        audit: "sink = \"journald\"\n".to_string(),
        namespace: Some(j.pid()),
        extra: format!(
            "[encedo]\nchallenge_ttl_s = {CHALLENGE_TTL_S}\n\n[[encedo.users]]\nname = \"dev\"\n\
             scopes = {scopes}\nroles = [\"ops\"]\npassphrase_file = \"{}\"\n",
            passphrase.display()
        ),
        ..Setup::with_access(access(
            &["ops"],
            &[Principal::me("operator").scopes(&["keymgmt:list"])],
        ))
        .https()
    };
    let d = Daemon::start(t, &setup);
    let client = Client {
        python: python_with(&[("cryptography", "cryptography")]),
        url: format!("https://localhost:{}", d.https().addr.port()),
        ca: common::tls::tls_dir(t.path()).join("ca.pem"),
        passphrase,
    };
    (d, client)
}

fn send(d: &Daemon, method: &str, path: &str, token: &str, body: &Value) -> common::Response {
    d.https().send(
        method,
        path,
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// The entries of one request, by its id.
fn entries_of(j: &Journal, rid: &str) -> Vec<Value> {
    j.wait_for(&format!("the entry of request {rid}"), |e| {
        e.iter().any(|x| x["HSMKEYD_REQUEST_ID"] == rid)
    })
    .into_iter()
    .filter(|x| x["HSMKEYD_REQUEST_ID"] == rid)
    .filter(|x| !x["HSMKEYD_EVENT"].as_str().unwrap().ends_with("_INTENT"))
    .collect()
}

/// The key ids pkcs11-tool sees (hsmkeyd's own keys and data objects left out).
fn token_kids(t: &Token) -> BTreeSet<String> {
    t.objects()
        .into_iter()
        .filter(|o| o.class != "Data" && !o.label.starts_with("hsmkeyd-"))
        .map(|o| o.id)
        .collect()
}

/// The description in the key's newest metadata record, as pkcs11-tool shows it.
fn description_in_token(t: &Token, kid: &str) -> Value {
    let prefix = format!("hsmkeyd-meta:{kid} ");
    t.objects()
        .into_iter()
        .filter(|o| o.class == "Data")
        .filter_map(|o| o.label.strip_prefix(&prefix).map(str::to_string))
        .map(|r| serde_json::from_str::<Value>(&r).unwrap())
        .max_by_key(|r| r["seq"].as_u64())
        .map(|r| r["description"].clone())
        .unwrap_or(Value::Null)
}

#[cfg_attr(not(built_as_root), ignore = "needs root")]
#[test]
fn a_passphrase_login_runs_the_appliance_life_cycle_read_back_by_pkcs11_tool() {
    let j = Journal::start();
    let t = Token::new();
    let _ = t.devtoken(&[
        "bulk",
        "--count",
        "31",
        "--id-prefix",
        "b0",
        "--label-prefix",
        "bulk-",
    ]);
    let (d, c) = start(&t, &j);
    let h = d.https();

    // Every key, page by page with limit 15.
    let list = c.token("keymgmt:list");
    let cl = claims(&list);
    assert_eq!(
        (&cl["sub"], &cl["scope"]),
        (&json!("dev"), &json!("keymgmt:list")),
        "{cl}"
    );
    let mut listed = BTreeSet::new();
    let mut offset = 0;
    loop {
        let page = h.get(&format!("/api/keymgmt/list/{offset}/15"), &list).ok();
        let keys = page["list"].as_array().unwrap();
        assert!(keys.len() <= 15, "{page}");
        for k in keys {
            assert!(listed.insert(k["kid"].as_str().unwrap().to_string()), "{k}");
        }
        offset += keys.len();
        if keys.len() < 15 {
            break;
        }
    }
    assert_eq!(offset, 31);
    assert_eq!(listed, token_kids(&t), "every key pkcs11-tool sees, once");

    // A key read with keymgmt:use:<kid>, and only that key.
    let mut kids = listed.iter();
    let (one, other) = (kids.next().unwrap().clone(), kids.next().unwrap().clone());
    let use_one = c.token(&format!("keymgmt:use:{one}"));
    let got = h.get(&format!("/api/keymgmt/get/{one}"), &use_one).ok();
    assert_eq!(got["type"], "AES256", "{got}");
    h.get(&format!("/api/keymgmt/get/{other}"), &use_one)
        .assert_error(403, "missing_scope");

    // Label and descr updated, as the token shows them.
    let upd = c.token("keymgmt:upd");
    let r = send(
        &d,
        "POST",
        "/api/keymgmt/update",
        &upd,
        &json!({"kid": one, "label": "logged-in", "descr": STANDARD.encode("from python")}),
    );
    let _ = r.ok();
    assert_eq!(
        t.labels_of(&one),
        vec![("Secret".to_string(), "logged-in".to_string())]
    );
    assert_eq!(description_in_token(&t, &one), "from python");

    // A key created and deleted.
    let gen = c.token("keymgmt:gen");
    let made = send(
        &d,
        "POST",
        "/api/keymgmt/create",
        &gen,
        &json!({"label": "made-at-login", "type": "SECP256R1"}),
    )
    .ok();
    let kid = made["kid"].as_str().unwrap().to_string();
    let objects_of = |kid: &str| {
        let mut v: Vec<(String, String)> = t
            .objects()
            .into_iter()
            .filter(|o| o.id == kid && o.class != "Data")
            .map(|o| (o.class, o.label))
            .collect();
        v.sort();
        v
    };
    assert_eq!(objects_of(&kid), pair("made-at-login"));
    let del = c.token("keymgmt:del");
    let _ = send(
        &d,
        "DELETE",
        &format!("/api/keymgmt/delete/{kid}"),
        &del,
        &json!({}),
    )
    .ok();
    assert!(
        t.objects().iter().all(|o| o.id != kid),
        "pkcs11-tool finds nothing of {kid}"
    );

    // Each login is an AUTH_SUCCESS_INTERNAL entry naming the user and the token's id.
    let tokens = [&list, &use_one, &upd, &gen, &del];
    let entries = j.wait_for("five logins", |e| {
        e.iter()
            .filter(|x| x["HSMKEYD_EVENT"] == "AUTH_SUCCESS_INTERNAL")
            .count()
            >= tokens.len()
    });
    for tok in tokens {
        let jti = claims(tok)["jti"].as_str().unwrap().to_string();
        let e = entries
            .iter()
            .find(|x| x["HSMKEYD_EVENT"] == "AUTH_SUCCESS_INTERNAL" && x["HSMKEYD_TOKEN_ID"] == jti)
            .unwrap_or_else(|| panic!("no login entry for token {jti}"));
        assert_eq!(
            (
                &e["HSMKEYD_RESULT"],
                &e["HSMKEYD_PRINCIPAL"],
                &e["HSMKEYD_STATUS"]
            ),
            (&json!("OK"), &json!("dev"), &json!("200")),
            "{e}"
        );
    }
    assert_eq!(d.stop(), 0);
}

#[cfg_attr(not(built_as_root), ignore = "needs root")]
#[test]
fn bad_logins_are_refused_with_the_appliance_status_and_recorded() {
    let j = Journal::start();
    let t = common::encedo::token();
    let (d, c) = start(&t, &j);

    // (mode, scope, status, code, whether the entry can name the user). Twice a wrong
    // passphrase: refused logins are recorded one by one, never summed up per peer as
    // other unidentified callers' refusals are.
    let wrong = (
        "wrong-passphrase",
        "keymgmt:list",
        401,
        "unknown_user",
        false,
    );
    let cases = [
        wrong,
        wrong,
        ("tampered", "keymgmt:list", 401, "bad_signature", true),
        ("expired", "keymgmt:list", 401, "challenge_expired", true),
        ("ok", "auth:token", 403, "missing_scope", true),
    ];
    let mut refused = Vec::new();
    for (mode, scope, status, code, named) in cases {
        let a = c.answer(scope, mode);
        assert_eq!(a["status"], status, "{mode}: {a}");
        assert_eq!(a["body"]["error"], code, "{mode}: {a}");
        assert!(a["body"].get("token").is_none(), "{mode}: {a}");
        refused.push((
            mode,
            a["request_id"].as_str().unwrap().to_string(),
            status,
            code,
            named,
        ));
    }
    // A replayed eJWT: the first answer logs in, the second is refused.
    let v = c.run("keymgmt:list", "replay");
    assert_eq!(v["answers"][0]["status"], 200, "{v}");
    assert_eq!(v["answers"][1]["status"], 401, "{v}");
    assert_eq!(v["answers"][1]["body"]["error"], "unknown_challenge", "{v}");
    let replayed = v["answers"][1]["request_id"].as_str().unwrap().to_string();
    // The challenge as the appliance shapes it: 32-byte spk and jti, a deadline seconds away.
    let ch = &v["challenge"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for field in ["spk", "jti", "eid"] {
        let bytes = STANDARD.decode(ch[field].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len(), 32, "{field}: {ch}");
    }
    let exp = ch["exp"].as_u64().unwrap();
    assert!(exp + 10 >= now && exp <= now + CHALLENGE_TTL_S, "{ch}");
    assert_eq!(ch["lbl"], common::TOKEN_LABEL, "{ch}");
    refused.push(("replay", replayed, 401, "unknown_challenge", true));

    // A token for one scope, used on another endpoint.
    let list = v["answers"][0]["body"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = send(
        &d,
        "POST",
        "/api/keymgmt/update",
        &list,
        &json!({"kid": common::encedo::AES, "label": "not-allowed"}),
    );
    let _ = r.assert_error(403, "missing_scope");
    let other = r.header("x-request-id").unwrap().to_string();
    assert_eq!(
        t.labels_of(common::encedo::AES)[0].1,
        "aes-key",
        "nothing changed"
    );

    for (mode, rid, status, code, named) in refused {
        let e = entries_of(&j, &rid);
        assert_eq!(e.len(), 1, "{mode}: {e:#?}");
        let e = &e[0];
        let event = if status == 403 {
            "FAILED_SCOPE_CHECK"
        } else {
            "AUTH_FAILED"
        };
        assert_eq!(e["HSMKEYD_EVENT"], event, "{mode}: {e}");
        assert_eq!(e["HSMKEYD_RESULT"], "FAILED", "{mode}: {e}");
        assert_eq!(e["HSMKEYD_STATUS"], status.to_string(), "{mode}: {e}");
        assert_eq!(e["HSMKEYD_ERROR"], code, "{mode}: {e}");
        assert_eq!(e["HSMKEYD_REQUEST"], "POST /api/auth/token", "{mode}: {e}");
        assert_eq!(e["HSMKEYD_PRINCIPAL"] == "dev", named, "{mode}: {e}");
    }
    let e = entries_of(&j, &other);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(
        (&e[0]["HSMKEYD_EVENT"], &e[0]["HSMKEYD_PRINCIPAL"]),
        (&json!("FAILED_SCOPE_CHECK"), &json!("dev")),
        "{:#}",
        e[0]
    );
    // No passphrase, seed or token reached the journal.
    let export = String::from_utf8_lossy(&j.export()).to_string();
    assert!(
        !export.contains("correct horse"),
        "the passphrase reached the journal"
    );
    assert!(!export.contains(&list), "a token reached the journal");
    assert_eq!(d.stop(), 0);
}

/// Also: a configured eid and label are what the challenge says, and the device key (spk)
/// survives a restart.
#[test]
fn login_answers_wait_half_a_second_then_longer_after_three_failures_without_blocking_others() {
    let t = common::encedo::token();
    let passphrase = t.path().join("encedo-passphrase");
    std::fs::write(&passphrase, "pass\n").unwrap();
    std::fs::set_permissions(
        &passphrase,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let setup = Setup {
        extra: format!(
            "[encedo]\neid = \"my-hem\"\nlabel = \"bench\"\n\n\
             [[encedo.users]]\nname = \"dev\"\nscopes = [\"keymgmt:list\"]\n\
             passphrase_file = \"{}\"\n",
            passphrase.display()
        ),
        ..Setup::default().https()
    };
    let d = Daemon::start(&t, &setup);
    let h = d.https();
    let post = |h: &common::tls::TlsClient| {
        let started = Instant::now();
        let r = h.send(
            "POST",
            "/api/auth/token",
            &[("Content-Type", "application/json")],
            br#"{"auth": "not.an.ejwt"}"#,
        );
        let _ = r.assert_error(400, "invalid_auth");
        started.elapsed()
    };
    for i in 0..3 {
        let took = post(&h);
        assert!(
            took >= Duration::from_millis(500),
            "failure {i} took {took:?}"
        );
    }
    // The fourth answer waits 1.5 s; meanwhile other requests are answered.
    let slow = std::thread::spawn({
        let h = h.clone();
        move || post(&h)
    });
    std::thread::sleep(Duration::from_millis(200));
    let c = h.send("GET", "/api/auth/token", &[], b"");
    let challenge = c.ok();
    assert_eq!(
        (&challenge["eid"], &challenge["lbl"]),
        (&json!("my-hem"), &json!("bench")),
        "eid and label as configured"
    );
    assert!(
        !slow.is_finished(),
        "the challenge waited for the slow login"
    );
    assert_eq!(
        challenge["jti"]
            .as_str()
            .map(|s| STANDARD.decode(s).unwrap().len()),
        Some(32)
    );
    let took = slow.join().unwrap();
    assert!(
        took >= Duration::from_millis(1500),
        "after three failures: {took:?}"
    );
    assert_eq!(d.stop(), 0);

    // The device key comes from the token: the same spk (and eid) after a restart, from a
    // secret key that pkcs11-tool shows as never extractable.
    let d = Daemon::start(&t, &setup);
    let again = d.https().send("GET", "/api/auth/token", &[], b"").ok();
    assert_eq!(
        (&again["spk"], &again["eid"]),
        (&challenge["spk"], &challenge["eid"])
    );
    assert_ne!(again["jti"], challenge["jti"]);
    let text = t.objects_text();
    // pkcs11-tool prints an object as a header line and indented attribute lines.
    let block: String = format!("\n{text}")
        .split("\nSecret Key Object")
        .map(|b| {
            b.lines()
                .take_while(|l| l.starts_with(' ') || l.starts_with(';'))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .find(|b| b.contains("label:      hsmkeyd-encedo-device"))
        .unwrap_or_else(|| panic!("no device key in {text}"));
    assert!(
        block.contains("never extractable") && block.contains("sensitive"),
        "{block}"
    );
    assert_eq!(d.stop(), 0);
}
