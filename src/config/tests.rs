//! Unit tests of the configuration format: defaults, the shipped example, and errors that
//! name their key.

use super::*;

const GOOD: &str = r#"
[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
pin_file = "/etc/hsmkeyd/pin"
[unix]
path = "/run/hsmkeyd/api.sock"
[keys]
roles = ["ops"]
[[principals]]
name = "ops"
uids = [1000]
scopes = ["keymgmt:list", "keymgmt:upd:0a1b"]
roles = ["ops"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/hsmkeyd/hsmkeyd.toml"), text)
}

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.unix.mode, 0o660);
    assert_eq!(c.pkcs11.max_sessions, DEFAULT_MAX_SESSIONS);
    assert_eq!(c.principals[0].scopes.len(), 2);
    assert_eq!(c.pkcs11.token, TokenSelector::Label("t".into()));
}

#[test]
fn shipped_example_config_is_valid() {
    let c = parse(include_str!("../../config/hsmkeyd.toml")).unwrap();
    assert_eq!(c.pkcs11.token, TokenSelector::Label("hsmkeyd".into()));
    assert_eq!(c.unix.path, Path::new("/run/hsmkeyd/api.sock"));
    assert_eq!(c.principals.len(), 3);
    assert_eq!(c.roles.len(), 2);
    assert_eq!(
        c.audit.sink,
        AuditSink::Journald,
        "production audits to journald"
    );
    let tls = c.tls.expect("the example serves HTTPS");
    assert_eq!(tls.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.tokens.max_ttl, Duration::from_secs(3600));
    assert_eq!(c.tokens.leeway, Duration::from_secs(30));
}

#[test]
fn the_pin_comes_from_a_file_or_a_credential_never_both() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.pkcs11.pin, PinSource::File("/etc/hsmkeyd/pin".into()));
    let cred = GOOD.replace(
        "pin_file = \"/etc/hsmkeyd/pin\"",
        "pin_credential = \"pin\"",
    );
    let c = parse(&cred).unwrap();
    assert_eq!(c.pkcs11.pin, PinSource::Credential("pin".into()));
    assert_eq!(
        c.pkcs11
            .pin
            .path(Some(Path::new("/run/credentials/hsmkeyd.service")))
            .unwrap(),
        Path::new("/run/credentials/hsmkeyd.service/pin")
    );
    assert!(c
        .pkcs11
        .pin
        .path(None)
        .unwrap_err()
        .contains("CREDENTIALS_DIRECTORY"));
    let both = GOOD.replace("pin_file = ", "pin_credential = \"pin\"\npin_file = ");
    assert_eq!(parse(&both).unwrap_err().key, "pkcs11.pin_file");
    let neither = GOOD.replace("pin_file = \"/etc/hsmkeyd/pin\"", "");
    assert_eq!(parse(&neither).unwrap_err().key, "pkcs11.pin_file");
    let sneaky = GOOD.replace(
        "pin_file = \"/etc/hsmkeyd/pin\"",
        "pin_credential = \"../pin\"",
    );
    assert_eq!(parse(&sneaky).unwrap_err().key, "pkcs11.pin_credential");
    let inline = GOOD.replace("pin_file = \"/etc/hsmkeyd/pin\"", "pin = \"1234\"");
    assert!(parse(&inline).is_err(), "an inline PIN is an unknown key");
}

#[test]
fn tls_is_loopback_only_unless_allowed_and_issuers_are_checked() {
    let tls = |extra: &str| format!("{GOOD}\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n{extra}");
    assert!(parse(&tls("")).unwrap().tls.is_some());
    let e = parse(&tls("listen = \"0.0.0.0:8443\"\n")).unwrap_err();
    assert_eq!(e.key, "tls.listen", "{e}");
    assert!(e.reason.contains("allow_non_loopback"), "{e}");
    let c = parse(&tls(
        "listen = \"0.0.0.0:8443\"\nallow_non_loopback = true\n",
    ))
    .unwrap();
    assert!(!c.tls.unwrap().listen.ip().is_loopback());
    assert_eq!(
        parse(&tls("listen = \"nowhere\"\n")).unwrap_err().key,
        "tls.listen"
    );

    let issuer = |body: &str| format!("{GOOD}\n[[issuers]]\niss = \"i\"\naud = \"a\"\n{body}");
    assert!(parse(&issuer("algorithms = [\"ES256\"]\nkey_file = \"/k.pem\"\n")).is_ok());
    let e = parse(&issuer(
        "algorithms = [\"HS256\", \"ES256\"]\nkey_file = \"/k\"\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "issuers[0].algorithms", "{e}");
    let e = parse(&issuer("algorithms = [\"HS256\"]\nkey_file = \"/k\"\n")).unwrap_err();
    assert_eq!(e.key, "issuers[0].secret_file", "{e}");
    let e = parse(&issuer("algorithms = [\"ES256\"]\n")).unwrap_err();
    assert_eq!(e.key, "issuers[0].key_file", "{e}");
    assert!(parse(&issuer("algorithms = [\"none\"]\nkey_file = \"/k\"\n")).is_err());
    let e = parse(&format!("{GOOD}\n[tokens]\nmax_ttl_s = 0\n")).unwrap_err();
    assert_eq!(e.key, "tokens.max_ttl_s");
}

#[test]
fn audit_sink_defaults_to_journald_and_rejects_unknown_sinks() {
    assert_eq!(parse(GOOD).unwrap().audit.sink, AuditSink::Journald);
    let c = parse(&format!("{GOOD}\n[audit]\nsink = \"stderr-json\"\n")).unwrap();
    assert_eq!(c.audit.sink, AuditSink::StderrJson);
    let e = parse(&format!("{GOOD}\n[audit]\nsink = \"syslog\"\n")).unwrap_err();
    assert!(e.to_string().contains("syslog"), "{e}");
}

#[test]
fn unknown_key_names_the_file_and_key() {
    let e = parse(&GOOD.replace("[unix]", "[unix]\nsokcet = 1")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("/etc/hsmkeyd/hsmkeyd.toml"), "{msg}");
    assert!(msg.contains("sokcet"), "{msg}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            GOOD.replace("\"/etc/hsmkeyd/pin\"", "\"pin\""),
            "pkcs11.pin_file",
        ),
        (
            GOOD.replace("token_label = \"t\"", ""),
            "pkcs11.token_label",
        ),
        (
            GOOD.replace("[unix]", "[unix]\nmode = \"0666\""),
            "unix.mode",
        ),
        (
            GOOD.replace("\"keymgmt:list\"", "\"keymgmt:delete\""),
            "principals[0].scopes[0]",
        ),
        (
            GOOD.replace(
                "scopes = [\"keymgmt:list\", \"keymgmt:upd:0a1b\"]\nroles = [\"ops\"]",
                "scopes = []\nroles = [\"finance\"]",
            ),
            "principals[0].roles[0]",
        ),
        (GOOD.replace("uids = [1000]", ""), "principals[0].uids"),
    ];
    for (text, key) in cases {
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
}

#[test]
fn a_uid_maps_to_one_principal_only() {
    let text = format!("{GOOD}\n[[principals]]\nname = \"b\"\nuids = [1000]\n");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "principals[1].uids");
}

#[test]
fn limits_default_sensibly_and_bad_values_name_their_key() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.server.max_connections, 256);
    assert_eq!(c.server.max_connections_per_caller, 128);
    assert_eq!(c.server.max_unauthenticated, 32);
    assert_eq!(c.server.request_timeout, Duration::from_secs(10));
    assert_eq!(c.server.min_body_rate, 1024);
    assert_eq!(c.server.io_threads, 1);
    assert_eq!(c.server.connection_threads, 16);
    assert_eq!(c.max_cleanup_backlog, 1024);
    assert_eq!(c.audit.refusal_window, Duration::from_secs(10));
    for (section, line, key) in [
        (
            "server",
            "request_timeout_s = 0",
            "server.request_timeout_s",
        ),
        (
            "server",
            "request_timeout_s = 301",
            "server.request_timeout_s",
        ),
        (
            "server",
            "unauthenticated_timeout_s = 0",
            "server.unauthenticated_timeout_s",
        ),
        ("server", "max_connections = 0", "server.max_connections"),
        ("server", "io_threads = 0", "server.io_threads"),
        ("server", "io_threads = 65", "server.io_threads"),
        (
            "server",
            "max_connections = 10\nconnection_threads = 11",
            "server.connection_threads",
        ),
        ("server", "drain_timeout_s = 3601", "server.drain_timeout_s"),
        (
            "server",
            "max_connections = 10\nmax_connections_per_caller = 11",
            "server.max_connections_per_caller",
        ),
        (
            "server",
            "max_connections = 10\nmax_unauthenticated = 0",
            "server.max_unauthenticated",
        ),
        (
            "keys",
            "max_cleanup_backlog = 0",
            "keys.max_cleanup_backlog",
        ),
        ("audit", "refusal_window_s = 3601", "audit.refusal_window_s"),
        (
            "audit",
            "checkpoint_entries = 0",
            "audit.checkpoint_entries",
        ),
        (
            "audit",
            "checkpoint_interval_s = 0",
            "audit.checkpoint_interval_s",
        ),
    ] {
        // The section may already be in GOOD ([keys]); add the line to it there.
        let text = if GOOD.contains(&format!("[{section}]\n")) {
            GOOD.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"))
        } else {
            format!("{GOOD}\n[{section}]\n{line}\n")
        };
        let e = parse(&text).expect_err(line);
        assert_eq!(e.key, key, "{line}: {e}");
        assert!(e.reason.contains("out of range"), "{line}: {e}");
    }
    let c = parse(&format!(
        "{GOOD}\n[server]\nio_threads = 4\nconnection_threads = 0\n"
    ))
    .unwrap();
    assert_eq!(c.server.io_threads, 4);
    assert_eq!(c.server.connection_threads, 0);
    // A small listener gets shares that fit it.
    let c = parse(&format!("{GOOD}\n[server]\nmax_connections = 10\n")).unwrap();
    assert_eq!(
        (
            c.server.max_connections_per_caller,
            c.server.max_unauthenticated,
            c.server.connection_threads
        ),
        (5, 10, 10)
    );
}

#[test]
fn encedo_users_have_one_key_source_and_bad_values_name_their_key() {
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let user = |rest: &str| {
        format!(
            "{GOOD}[encedo]\nchallenge_ttl_s = 5\n[[encedo.users]]\nname = \"dev\"\n\
             scopes = [\"keymgmt:list\"]\nroles = [\"ops\"]\n{rest}\n"
        )
    };
    let c = parse(&user(&format!("pubkey = \"{key}\""))).unwrap();
    assert_eq!(c.encedo.users[0].key, UserKey::Public([0; 32]));
    assert_eq!(c.encedo.challenge_ttl, Duration::from_secs(5));
    assert_eq!(parse(GOOD).unwrap().encedo.users.len(), 0, "off by default");
    let c = parse(&user("passphrase_file = \"/etc/hsmkeyd/encedo\"")).unwrap();
    assert_eq!(
        c.encedo.users[0].key,
        UserKey::PassphraseFile("/etc/hsmkeyd/encedo".into())
    );
    for (rest, at) in [
        (String::new(), "encedo.users[0].pubkey"),
        (
            format!("pubkey = \"{key}\"\npassphrase_file = \"/etc/p\""),
            "encedo.users[0].pubkey",
        ),
        ("pubkey = \"c2hvcnQ=\"".into(), "encedo.users[0].pubkey"),
        (
            "passphrase_file = \"relative\"".into(),
            "encedo.users[0].passphrase_file",
        ),
    ] {
        let e = parse(&user(&rest)).unwrap_err();
        assert_eq!(e.key, at, "{rest}: {e}");
    }
    let bad_role = user(&format!("pubkey = \"{key}\""))
        .replace("roles = [\"ops\"]\npubkey", "roles = [\"nope\"]\npubkey");
    assert_eq!(
        parse(&bad_role).unwrap_err().key,
        "encedo.users[0].roles[0]"
    );
    let bad_ttl =
        user(&format!("pubkey = \"{key}\"")).replace("challenge_ttl_s = 5", "challenge_ttl_s = 0");
    assert_eq!(parse(&bad_ttl).unwrap_err().key, "encedo.challenge_ttl_s");
}
