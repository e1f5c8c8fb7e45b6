//! `hsmkeyctl`, the real binary, against a real daemon on a real token: every command, the
//! table and `--json` shapes, and every exit code (0 ok, 1 refused, 2 usage, 3 unavailable,
//! 4 precondition failed). One test drives it in a pseudo-terminal (`script`) for the table.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fixture::{keys_access, minting_access, token_with, Key, AES, AES_KEY, EC, EC_KEY};
use common::journal::Journal;
use common::{tls, Daemon, Setup};
use serde_json::Value;

const CTL: &str = env!("CARGO_BIN_EXE_hsmkeyctl");

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    ctl_at(&d.sock, args)
}

fn ctl_at(sock: &Path, args: &[&str]) -> Output {
    Command::new(CTL)
        .arg("--socket")
        .arg(sock)
        .args(args)
        .env_remove("HSMKEYD_TOKEN")
        .output()
        .expect("run hsmkeyctl")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    assert_eq!(code(o), 0, "stdout {} stderr {}", stdout(o), stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn daemon() -> (common::Token, Daemon) {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(minting_access()).https());
    (t, d)
}

#[test]
fn list_get_update_and_status_over_the_unix_socket() {
    let (t, d) = daemon();

    // list: a table with a header and one row per key; --json one document.
    let o = ctl(&d, &["list"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.lines().next().unwrap().contains("KID"), "{text}");
    assert!(
        text.contains("aes-key") && text.contains("ec-key"),
        "{text}"
    );
    let all = json(&ctl(&d, &["--json", "list"]));
    assert_eq!(all["total"], 2);
    assert_eq!(all["keys"].as_array().unwrap().len(), 2);

    // Paging: one key per page, every page with --all; without it, one page and a hint.
    let paged = json(&ctl(&d, &["--json", "list", "--limit", "1", "--all"]));
    let kids: Vec<&str> = paged["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [AES, EC]);
    let one = ctl(&d, &["list", "--limit", "1"]);
    assert_eq!(code(&one), 0);
    assert!(stderr(&one).contains("--all"), "{}", stderr(&one));
    let filtered = json(&ctl(&d, &["--json", "list", "--label-prefix", "ec-"]));
    assert_eq!(filtered["keys"][0]["kid"], EC);
    assert_eq!(filtered["keys"].as_array().unwrap().len(), 1);

    // get
    let key = json(&ctl(&d, &["--json", "get", EC]));
    assert_eq!(key["label"], "ec-key");
    assert!(stdout(&ctl(&d, &["get", EC])).contains("ec-key"));

    // update: the token changes (read back with pkcs11-tool), the answer names the change.
    let up = json(&ctl(
        &d,
        &[
            "--json",
            "update",
            EC,
            "--label",
            "ec-renamed",
            "--description",
            "from the cli",
        ],
    ));
    assert_eq!(up["key"]["label"], "ec-renamed");
    assert_eq!(up["key"]["description"], "from the cli");
    assert!(
        up["audit_id"].as_str().is_some_and(|a| a.len() == 32),
        "{up}"
    );
    assert!(t
        .labels_of(EC)
        .iter()
        .all(|(_, label)| label == "ec-renamed"));
    let cleared = json(&ctl(&d, &["--json", "update", EC, "--clear-description"]));
    assert_eq!(cleared["key"]["description"], Value::Null);

    // --if-match: the current etag passes, a stale one is exit 4 and changes nothing.
    let etag = json(&ctl(&d, &["--json", "get", AES]))["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let o = ctl(
        &d,
        &["update", AES, "--label", "first", "--if-match", &etag],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = ctl(
        &d,
        &["update", AES, "--label", "second", "--if-match", &etag],
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("412"), "{}", stderr(&o));
    assert_eq!(json(&ctl(&d, &["--json", "get", AES]))["label"], "first");

    // A refusal is exit 1, with the daemon's message and field on stderr.
    let o = ctl(&d, &["update", AES, "--label", &"x".repeat(65)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("(field: label)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("64 bytes"), "{}", stderr(&o));
    let o = ctl(&d, &["get", "00ff"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("404 key_not_found"), "{}", stderr(&o));

    // status
    let st = json(&ctl(&d, &["--json", "status"]));
    assert_eq!(st["keys"], 2);
    assert_eq!(st["state"], "serving");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["token_label"], "hsmkeyd-test");
    assert!(
        st["token_serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{st}"
    );
    assert!(st["uptime_s"].as_u64().is_some(), "{st}");
    assert_eq!(st["sessions"]["max"], 16, "{st}");
    assert!(st["sessions"]["open"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["audit"]["healthy"], true);
    assert_eq!(st["last_reload"], Value::Null);
    assert!(stdout(&ctl(&d, &["status"])).contains("serving"));
}

#[test]
fn usage_errors_are_exit_2_and_a_missing_daemon_is_exit_3() {
    let (_t, d) = daemon();
    for args in [
        &["list", "--no-such-flag"][..],
        &["update", AES],
        &["update", AES, "--roles", "ops", "--clear-roles"],
        &["--url", "http://localhost:1", "list"],
        &["--url", "https://localhost:1", "list"],
        &["update", AES, "--usage", "sign"],
        &["update", AES, "--usage", "sing=true"],
        &["update", AES, "--usage", "sign=yes"],
        &["update", AES, "--usage", "sign=true,sign=false"],
        &["update", AES, "--not-after", "2027-13-01"],
        &[
            "update",
            AES,
            "--not-after",
            "2027-06-30",
            "--clear-not-after",
        ],
        &[
            "update",
            AES,
            "--not-before",
            "2027-06-30",
            "--clear-not-before",
        ],
        &["update", AES, "--sensitive", "--no-sensitive"],
        &["update", AES, "--extractable", "--no-extractable"],
        &["list", "--expires-before", "next year"],
    ] {
        let o = ctl(&d, args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty(), "{args:?}");
    }
    let o = ctl_at(Path::new("/nonexistent/api.sock"), &["list"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}

#[test]
fn a_minted_token_drives_the_https_front_door() {
    let (t, d) = daemon();
    let port = d.https.as_ref().unwrap().addr.port();
    let url = format!("https://localhost:{port}");
    let ca = tls::tls_dir(t.path()).join("ca.pem");
    let ca = ca.to_str().unwrap();

    // -q prints the token alone, for $(...).
    let o = ctl(
        &d,
        &[
            "token",
            "--scope",
            "keymgmt:list",
            "--scope",
            "keymgmt:get",
            "-q",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let token = stdout(&o).trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let file = t.path().join("token");
    std::fs::write(&file, &token).unwrap();
    let file = file.to_str().unwrap();

    // Over HTTPS with the CA and the token file.
    let https = |args: &[&str]| {
        let mut all = vec!["--url", url.as_str(), "--cacert", ca, "--token-file", file];
        all.extend_from_slice(args);
        ctl(&d, &all)
    };
    let listed = json(&https(&["--json", "list"]));
    assert_eq!(listed["total"], 2);
    // The token from the environment works too; the token never needs an argument.
    let o = Command::new(CTL)
        .args(["--json", "--url", &url, "--cacert", ca, "get", EC])
        .env("HSMKEYD_TOKEN", &token)
        .output()
        .unwrap();
    assert_eq!(json(&o)["kid"], EC);
    // Its scopes are the token's: no update over it (403 is exit 1).
    let o = https(&["update", EC, "--label", "x"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("403 missing_scope"), "{}", stderr(&o));
    // Minting is for the Unix socket only: refused over TLS.
    let o = https(&["token", "--scope", "keymgmt:list"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    // Without the CA the certificate is not trusted: unavailable, exit 3.
    let o = ctl(&d, &["--url", &url, "--token-file", file, "list"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    // Without a token: usage.
    let o = ctl(&d, &["--url", &url, "--cacert", ca, "list"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // The --json answer of a mint carries the token and its scopes.
    let minted = json(&ctl(
        &d,
        &["--json", "token", "--scope", "keymgmt:list", "--ttl", "60"],
    ));
    assert_eq!(minted["scopes"], serde_json::json!(["keymgmt:list"]));
}

#[test]
fn audit_reads_the_journal_and_a_refused_audit_trail_is_exit_3() {
    let mut j = Journal::start();
    let t = token_with(&[AES_KEY]);
    let d = Daemon::start(
        &t,
        &Setup {
            audit: "sink = \"journald\"\n".to_string(),
            namespace: Some(j.pid()),
            ..Setup::with_access(minting_access())
        },
    );
    let up = json(&ctl(
        &d,
        &["--json", "update", AES, "--label", "journalled"],
    ));
    let rid = up["audit_id"].as_str().unwrap().to_string();
    let _ = j.wait_for("the update's result", |e| {
        e.iter()
            .any(|x| x["HSMKEYD_REQUEST_ID"] == rid.as_str() && x["HSMKEYD_RESULT"] == "OK")
    });
    let run = |args: &[&str]| {
        j.command(CTL)
            .args(args)
            .output()
            .expect("hsmkeyctl in the journal's namespace")
    };
    let entries = json(&run(&["--json", "audit", "--kid", AES]));
    let events: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["KEY_ATTRIBUTES_CHANGE_INTENT", "KEY_ATTRIBUTES_CHANGED"],
        "{entries:#}"
    );
    assert_eq!(entries[1]["result"], "OK");
    assert_eq!(entries[1]["changes"]["label"]["after"], "journalled");
    let by_request = json(&run(&["--json", "audit", "--request-id", &rid]));
    assert_eq!(by_request.as_array().unwrap().len(), 2);
    let by_event = json(&run(&["--json", "audit", "--event", "daemon_started"]));
    assert_eq!(by_event.as_array().unwrap().len(), 1, "{by_event:#}");
    let table = run(&["audit", "--kid", AES]);
    assert_eq!(code(&table), 0);
    assert!(
        stdout(&table).contains("KEY_ATTRIBUTES_CHANGED"),
        "{}",
        stdout(&table)
    );
    let o = run(&["audit", "--since", "not a time"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));

    // With journald gone the daemon refuses the update (503): exit 3.
    j.stop_journald();
    let o = ctl(&d, &["update", AES, "--label", "unrecorded"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("audit_unavailable"), "{}", stderr(&o));
}

#[test]
fn a_terminal_gets_a_drawn_table_and_completions_and_man_page_are_generated() {
    let (_t, d) = daemon();
    // `script` runs the command with a pseudo-terminal as its stdout.
    let cmd = format!("{CTL} --socket {} list", d.sock.display());
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux)");
    assert!(o.status.success(), "{}", stderr(&o));
    let tty = stdout(&o);
    assert!(tty.contains('─'), "no rule lines on a terminal: {tty}");
    assert!(tty.contains("aes-key"), "{tty}");
    let piped = stdout(&ctl(&d, &["list"]));
    assert!(!piped.contains('─'), "rule lines in piped output: {piped}");

    let bash = ctl(&d, &["completions", "bash"]);
    assert_eq!(code(&bash), 0);
    assert!(stdout(&bash).contains("_hsmkeyctl()"), "{}", stdout(&bash));
    let man = ctl(&d, &["man"]);
    assert_eq!(code(&man), 0);
    assert!(stdout(&man).starts_with(".ie") || stdout(&man).contains(".TH hsmkeyctl"));
}

#[test]
fn create_public_and_delete_with_a_confirmation_on_a_terminal() {
    let t = token_with(&[AES_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let made = json(&ctl(
        &d,
        &[
            "--json",
            "create",
            "--type",
            "ec",
            "--curve",
            "P-384",
            "--label",
            "from-ctl",
            "--kid",
            "cc01",
            "--usage",
            "derive",
            "--no-usage",
            "verify",
        ],
    ));
    assert_eq!(made["key"]["kid"], "cc01");
    assert_eq!(made["key"]["curve"], "P-384");
    assert_eq!(made["key"]["attributes"]["derive"], true);
    assert_eq!(made["key"]["attributes"]["verify"], false);
    assert!(t
        .objects()
        .iter()
        .any(|o| o.id == "cc01" && o.label == "from-ctl"));
    let o = ctl(
        &d,
        &["create", "--type", "ec", "--curve", "P-192", "--label", "x"],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("(field: curve)"), "{}", stderr(&o));

    // public: PEM as pkcs11-tool exports it, or a JWK.
    let pem = stdout(&ctl(&d, &["public", "cc01"]));
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let jwk = json(&ctl(&d, &["public", "cc01", "--jwk"]));
    assert_eq!(jwk["crv"], "P-384");
    let o = ctl(&d, &["public", AES]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no_public_key"), "{}", stderr(&o));

    // delete on a terminal asks; "n" keeps the key (exit 2), "y" deletes it.
    let on_tty = |answer: &str| {
        let cmd = format!("{CTL} --socket {} delete cc01", d.sock.display());
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let kept = on_tty("n");
    assert!(
        stdout(&kept).contains("cannot be undone"),
        "{}",
        stdout(&kept)
    );
    assert_eq!(code(&kept), 2, "{}", stdout(&kept));
    assert!(t.objects().iter().any(|o| o.id == "cc01"));
    let gone = on_tty("y");
    assert_eq!(code(&gone), 0, "{}", stdout(&gone));
    assert!(
        stdout(&gone).contains("key cc01 deleted"),
        "{}",
        stdout(&gone)
    );
    assert!(!t.objects().iter().any(|o| o.id == "cc01"));
    // In a pipe it does not ask; --yes is for scripts on a terminal.
    let _ = json(&ctl(
        &d,
        &[
            "--json", "create", "--type", "aes", "--label", "x", "--kid", "cc02",
        ],
    ));
    let o = ctl(&d, &["delete", "cc02", "--if-match", "stale"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert_eq!(code(&ctl(&d, &["delete", "cc02", "--yes"])), 0);
    let o = ctl(&d, &["get", "cc02"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn dry_runs_show_the_change_and_write_nothing() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let before = t.objects_text();
    let up = ctl(&d, &["update", EC, "--label", "maybe", "--dry-run"]);
    assert_eq!(code(&up), 0, "{}", stderr(&up));
    let text = stdout(&up);
    assert!(text.starts_with("dry run: nothing was written"), "{text}");
    assert!(text.contains("ec-key") && text.contains("maybe"), "{text}");
    let made = json(&ctl(
        &d,
        &[
            "--json",
            "create",
            "--type",
            "aes",
            "--label",
            "never",
            "--dry-run",
        ],
    ));
    assert_eq!(made["dry_run"], true);
    assert_eq!(made["key"]["label"], "never");
    let gone = json(&ctl(&d, &["--json", "delete", AES, "--dry-run"]));
    assert_eq!(gone["key"]["kid"], AES);
    // A dry run that would fail fails the same way.
    let o = ctl(&d, &["delete", "0bad", "--dry-run"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(t.objects_text(), before);
}

#[test]
fn batch_changes_many_keys_and_lists_each_key_it_refused() {
    use common::fixture::{OTHER, OTHER_KEY};
    let t = token_with(&[AES_KEY, EC_KEY, OTHER_KEY]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let kids = format!("{AES},{EC}");

    // A table of the keys changed, read back from the token with pkcs11-tool.
    let o = ctl(&d, &["batch", "--kids", &kids, "--description", "batched"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.lines().next().unwrap().contains("KID"), "{text}");
    assert!(
        text.contains(AES) && text.contains(EC) && !text.contains(OTHER),
        "{text}"
    );
    assert!(text.contains("batch id: "), "{text}");
    for kid in [AES, EC] {
        let prefix = format!("hsmkeyd-meta:{kid} ");
        assert!(
            t.objects()
                .iter()
                .filter_map(|o| o.label.strip_prefix(&prefix))
                .any(|r| r.contains(r#""description":"batched""#)),
            "{kid} has no record with the description"
        );
    }

    // --json, a dry run by label prefix: what would change, nothing written.
    let v = json(&ctl(
        &d,
        &[
            "--json",
            "batch",
            "--label-prefix",
            "other-",
            "--roles",
            "ops",
            "--dry-run",
        ],
    ));
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["keys"][0]["kid"], OTHER, "{v}");
    assert_eq!(
        v["keys"][0]["changes"]["roles"]["after"],
        serde_json::json!(["ops"])
    );
    assert!(!t
        .objects()
        .iter()
        .any(|o| o.label.starts_with(&format!("hsmkeyd-meta:{OTHER}"))));

    // One stale etag: exit 1, nothing written, the refused key named on stderr.
    let o = ctl(
        &d,
        &[
            "batch",
            "--kids",
            &kids,
            "--clear-description",
            "--if-match",
            &format!("{EC}=00"),
        ],
    );
    assert_eq!(code(&o), 1, "{} {}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(EC) && err.contains("precondition_failed"),
        "{err}"
    );
    assert!(err.contains("batch_refused"), "{err}");
    assert_eq!(
        json(&ctl(&d, &["--json", "get", AES]))["description"],
        "batched"
    );

    // Usage errors: exit 2 before anything is sent.
    for args in [
        vec!["batch", "--description", "x"],
        vec!["batch", "--kids", AES],
        vec![
            "batch",
            "--kids",
            AES,
            "--role",
            "ops",
            "--description",
            "x",
        ],
        vec!["batch", "--kids", AES, "--label", "x"],
        vec![
            "batch",
            "--kids",
            AES,
            "--description",
            "x",
            "--if-match",
            "nope",
        ],
    ] {
        let o = ctl(&d, &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn update_sets_usage_dates_and_the_one_way_flags_and_list_filters_by_expiry() {
    // An AES key that is neither sensitive nor unextractable yet.
    const OPEN: &str = "0be0";
    let t = token_with(&[
        AES_KEY,
        EC_KEY,
        Key::aes(OPEN, "open").flags(&["--not-sensitive", "--extractable"]),
    ]);
    let d = Daemon::start(&t, &Setup::with_access(keys_access()));
    let object = |id: &str, class: &str| {
        t.objects()
            .into_iter()
            .find(|o| o.id == id && o.class == class)
            .unwrap_or_else(|| panic!("no {class} object {id}"))
    };
    let has = |words: &[String], w: &str| words.iter().any(|x| x == w);
    let update = |args: &[&str]| json(&ctl(&d, &[&["--json", "update"], args].concat()));

    // A dry run shows the change and writes nothing.
    let before = t.objects_text();
    let o = ctl(
        &d,
        &[
            "update",
            EC,
            "--usage",
            "sign=false,derive=true",
            "--dry-run",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("usage"), "{}", stdout(&o));
    assert_eq!(t.objects_text(), before);

    // --usage: each flag on the object that carries it, read back with pkcs11-tool.
    let up = update(&[EC, "--usage", "sign=false,derive=true"]);
    assert_eq!(up["changed"], serde_json::json!(["usage"]), "{up}");
    let private = object(EC, "Private").usage;
    assert!(
        !has(&private, "sign") && has(&private, "derive"),
        "{private:?}"
    );
    assert!(has(&object(EC, "Public").usage, "verify"));

    // Dates (the public key's, read back with PyKCS11: see fields.rs).
    let up = update(&[
        EC,
        "--not-before",
        "2026-01-01",
        "--not-after",
        "2027-06-30",
    ]);
    assert_eq!(up["key"]["not_after"], "2027-06-30", "{up}");
    assert_eq!(
        common::python::public_dates(&t, EC),
        [(2, "20260101".into(), "20270630".into())]
    );

    // get and list show usage and dates; list filters on the end date.
    let shown = stdout(&ctl(&d, &["get", EC]));
    assert!(
        shown.contains("attributes.derive") && shown.contains("2027-06-30"),
        "{shown}"
    );
    let table = stdout(&ctl(&d, &["list"]));
    let row = table.lines().find(|l| l.contains(EC)).unwrap();
    assert!(
        row.contains("verify,derive") && row.contains("2026-01-01..2027-06-30"),
        "{table}"
    );
    let expiring = json(&ctl(
        &d,
        &["--json", "list", "--expires-before", "2027-07-01"],
    ));
    assert_eq!(common::kids(&expiring["keys"]), [EC], "{expiring}");
    let none = json(&ctl(
        &d,
        &["--json", "list", "--expires-before", "2027-06-30"],
    ));
    assert_eq!(none["keys"], serde_json::json!([]), "{none}");

    let up = update(&[EC, "--clear-not-before", "--clear-not-after"]);
    assert_eq!(up["key"]["not_before"], Value::Null, "{up}");
    assert_eq!(
        common::python::public_dates(&t, EC),
        [(2, "-".into(), "-".into())]
    );

    // The one-way flags, in the direction PKCS#11 allows.
    let up = update(&[OPEN, "--sensitive", "--no-extractable"]);
    assert_eq!(up["key"]["attributes"]["sensitive"], true, "{up}");
    let access = object(OPEN, "Secret").access;
    assert!(
        has(&access, "sensitive") && !has(&access, "extractable"),
        "{access:?}"
    );

    // The other direction is the daemon's refusal: exit 1, its message and field, and the
    // key as it was.
    // (The key's own objects: the worker may still be settling the EC key's record.)
    let of_aes = || -> Vec<_> { t.objects().into_iter().filter(|o| o.id == AES).collect() };
    let before = of_aes();
    let o = ctl(&d, &["update", AES, "--no-sensitive"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(field: sensitive)") && stderr(&o).contains("irreversible_attribute"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("cannot be undone"), "{}", stderr(&o));
    assert_eq!(of_aes(), before);
}
