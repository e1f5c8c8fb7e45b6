//! Startup and shutdown of the real daemon: every refusal exits non-zero with a message that
//! names the cause (the path, the key, the token, the CKR_ value), configuration errors exit
//! 78, the socket is handled safely (stale ones replaced, live ones and other files left
//! alone, unsafe directories refused), and SIGTERM stops it cleanly.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture::{token_with, AES_KEY};
use common::{write_config, Daemon, Setup, Token, SOFTHSM, TOKEN_LABEL};

/// How a daemon run that was expected to end, ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Writes the usual config for `token`, then lets `edit` rewrite its text.
fn config_with(token: &Token, setup: &Setup, edit: impl FnOnce(String) -> String) -> PathBuf {
    let path = write_config(token, setup);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, edit(text)).unwrap();
    path
}

/// The usual config for `token`, loading `module` instead of SoftHSM.
fn with_module(token: &Token, module: &Path) -> PathBuf {
    config_with(token, &Setup::default(), |c| {
        c.replace(
            &format!("module = \"{SOFTHSM}\""),
            &format!("module = \"{}\"", module.display()),
        )
    })
}

/// The socket path `write_config` puts in the config.
fn default_sock(token: &Token) -> PathBuf {
    token.path().join("api.sock")
}

/// Moves the socket of a `write_config` file to `sock`.
fn with_sock(text: String, token: &Token, sock: &Path) -> String {
    let old = format!("path = \"{}\"", default_sock(token).display());
    assert!(text.contains(&old), "config has no {old}: {text}");
    text.replace(&old, &format!("path = \"{}\"", sock.display()))
}

fn daemon_command(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmkeyd"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("HSMKEYD_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs the daemon with `args` and `--config config`, expecting it to exit on its own
/// within 30 s (it is killed and the test fails otherwise).
fn run_to_exit(args: &[&str], config: &Path, envs: &[(&str, &str)]) -> Outcome {
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut cmd = daemon_command(args, config);
    cmd.envs(envs.iter().copied())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().expect("spawn hsmkeyd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hsmkeyd did not exit within 30 s; stderr: {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// A daemon start that must fail: runs it with `config` and returns how it ended.
fn refused(config: &Path) -> Outcome {
    run_to_exit(&[], config, &[])
}

/// Starts the daemon with `config` and waits until `sock` answers.
fn start_with(config: &Path, sock: &Path, log_dir: &Path) -> Result<Daemon, String> {
    Daemon::spawn(
        daemon_command(&[], config),
        sock.to_path_buf(),
        log_dir,
        None,
    )
}

#[track_caller]
fn assert_startup_failure(o: &Outcome, needles: &[&str]) {
    assert_eq!(o.code, Some(1), "startup failures exit 1: {o:?}");
    for n in needles {
        assert!(o.stderr.contains(n), "stderr does not name {n:?}: {o:?}");
    }
}

#[track_caller]
fn assert_config_error(o: &Outcome, needles: &[&str]) {
    assert_eq!(o.code, Some(78), "configuration errors exit 78: {o:?}");
    for n in needles {
        assert!(o.stderr.contains(n), "stderr does not name {n:?}: {o:?}");
    }
}

fn write_pin(path: &Path, pin: &str, mode: u32) {
    fs::write(path, format!("{pin}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

// ---------------------------------------------------------------------------------------
// The PKCS#11 side: module, token, PIN.
// ---------------------------------------------------------------------------------------

#[test]
fn a_missing_module_is_named_and_exits_1() {
    let t = Token::new();
    let module = t.path().join("no-such-dir/libnothere-pkcs11.so");
    let config = with_module(&t, &module);
    let o = refused(&config);
    assert_startup_failure(
        &o,
        &[
            &module.display().to_string(),
            "does not exist",
            "pkcs11.module",
        ],
    );
    assert!(!default_sock(&t).exists(), "no socket without a token");
}

#[test]
fn a_file_that_is_no_pkcs11_module_is_named_and_exits_1() {
    let t = Token::new();
    let module = t.path().join("not-a-module.so");
    fs::write(&module, "this is not a shared library\n").unwrap();
    let config = with_module(&t, &module);
    let o = refused(&config);
    assert_startup_failure(
        &o,
        &["cannot load PKCS#11 module", &module.display().to_string()],
    );
}

#[test]
fn a_wrong_token_label_names_the_wanted_label_and_the_tokens_found() {
    let t = Token::new();
    let config = config_with(&t, &Setup::default(), |c| {
        c.replace(
            &format!("token_label = \"{TOKEN_LABEL}\""),
            "token_label = \"hsmkeyd-prod\"",
        )
    });
    let o = refused(&config);
    assert_startup_failure(
        &o,
        &[
            "no token with label \"hsmkeyd-prod\"",
            SOFTHSM,
            "tokens found:",
            &format!("token \"{TOKEN_LABEL}\""),
        ],
    );
    assert!(!default_sock(&t).exists());
}

#[test]
fn a_token_directory_without_tokens_says_so() {
    let t = Token::new();
    let empty = t.path().join("empty-tokens");
    fs::create_dir(&empty).unwrap();
    let conf = t.path().join("softhsm2-empty.conf");
    common::write_softhsm_conf(&conf, &empty);
    let config = config_with(&t, &Setup::default(), |c| {
        c.replace(
            &format!("SOFTHSM2_CONF = \"{}\"", t.conf.display()),
            &format!("SOFTHSM2_CONF = \"{}\"", conf.display()),
        )
    });
    let o = refused(&config);
    assert_startup_failure(
        &o,
        &[
            &format!("no token with label \"{TOKEN_LABEL}\""),
            "no initialized token",
            "SOFTHSM2_CONF",
        ],
    );
}

#[test]
fn a_wrong_pin_names_ckr_pin_incorrect_and_the_file_but_never_the_pin() {
    let t = Token::new();
    const WRONG: &str = "Wr0ng-PIN-never-print-me";
    let pin_file = t.path().join("wrong-pin");
    write_pin(&pin_file, WRONG, 0o600);
    let config = config_with(&t, &Setup::default(), |c| {
        c.replace(
            &format!("pin_file = \"{}\"", t.pin_file.display()),
            &format!("pin_file = \"{}\"", pin_file.display()),
        )
    });
    // The most verbose log level: the PIN must not appear at any level.
    let o = run_to_exit(&[], &config, &[("HSMKEYD_LOG", "trace")]);
    assert_startup_failure(
        &o,
        &[
            "CKR_PIN_INCORRECT",
            &pin_file.display().to_string(),
            &format!("token \"{TOKEN_LABEL}\""),
        ],
    );
    assert!(
        !o.stderr.contains(WRONG) && !o.stdout.contains(WRONG),
        "the PIN was printed: {o:?}"
    );
    assert!(!default_sock(&t).exists());
}

#[test]
fn a_locked_pin_names_ckr_pin_locked() {
    let t = Token::new();
    let faults = tempfile::tempdir().unwrap();
    fs::write(faults.path().join("fail_login_with"), "0xa4\n").unwrap();
    let setup = Setup {
        fault_dir: Some(faults.path().to_path_buf()),
        ..Setup::default()
    };
    let config = write_config(&t, &setup);
    let o = refused(&config);
    assert_startup_failure(&o, &["CKR_PIN_LOCKED", "locked", "security officer"]);
    let logins = fs::read_to_string(faults.path().join("count_C_Login")).unwrap_or_default();
    assert_ne!(logins, "", "the daemon never called C_Login: {o:?}");
    assert!(!default_sock(&t).exists());
}

#[test]
fn a_pin_file_readable_by_others_is_refused_with_its_path_and_mode() {
    let t = Token::new();
    fs::set_permissions(&t.pin_file, fs::Permissions::from_mode(0o644)).unwrap();
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup {
        fault_dir: Some(faults.path().to_path_buf()),
        ..Setup::default()
    };
    let config = write_config(&t, &setup);
    let pin = t.pin_file.display().to_string();

    // A configuration error (78), as under --check-config, so systemd does not restart on it.
    let o = refused(&config);
    assert_eq!(o.code, Some(78), "{o:?}");
    for n in [pin.as_str(), "0644", "chmod 600"] {
        assert!(o.stderr.contains(n), "stderr does not name {n:?}: {o:?}");
    }
    assert!(
        !faults.path().join("count_C_Login").exists(),
        "the PIN was used although the file is open to others"
    );
    assert!(!default_sock(&t).exists());

    // --check-config checks the PIN file's mode too.
    let o = run_to_exit(&["--check-config"], &config, &[]);
    assert_config_error(&o, &[&pin, "0644"]);

    // Group access alone is refused as well.
    fs::set_permissions(&t.pin_file, fs::Permissions::from_mode(0o640)).unwrap();
    let o = refused(&config);
    assert_eq!(o.code, Some(78), "{o:?}");
    assert!(o.stderr.contains("0640"), "{o:?}");
}

// ---------------------------------------------------------------------------------------
// The configuration file.
// ---------------------------------------------------------------------------------------

#[test]
fn an_unknown_config_key_exits_78_naming_the_file_and_the_key() {
    let t = Token::new();
    let config = config_with(&t, &Setup::default(), |c| {
        c.replace("[unix]\n", "[unix]\nsokcet_group = \"hsmkeyd\"\n")
    });
    let o = refused(&config);
    assert_config_error(&o, &[&config.display().to_string(), "sokcet_group"]);
    assert!(!default_sock(&t).exists());

    // An unknown section as well.
    let config = config_with(&t, &Setup::default(), |c| {
        format!("{c}\n[listen]\naddress = \"127.0.0.1:8443\"\n")
    });
    let o = refused(&config);
    assert_config_error(&o, &[&config.display().to_string(), "listen"]);
}

#[test]
fn bad_config_values_exit_78_naming_the_key() {
    let t = Token::new();
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "unix.mode",
            Box::new(|c: String| c.replace("mode = \"0660\"", "mode = \"0666\"")),
        ),
        (
            "unix.mode",
            Box::new(|c: String| c.replace("mode = \"0660\"", "mode = \"rw-rw----\"")),
        ),
        (
            "pkcs11.max_sessions",
            Box::new(|c: String| c.replace("[pkcs11]\n", "[pkcs11]\nmax_sessions = 0\n")),
        ),
        (
            "pkcs11.pin_file",
            Box::new(|c: String| {
                let (head, tail) = c.split_once("pin_file = \"").unwrap();
                let rest = tail.split_once('"').unwrap().1;
                format!("{head}pin_file = \"relative/pin\"{rest}")
            }),
        ),
        (
            "server.drain_timeout_s",
            Box::new(|c: String| c.replace("drain_timeout_s = 5", "drain_timeout_s = 7200")),
        ),
        (
            "principals[0].scopes[0]",
            Box::new(|c: String| c.replace("\"keymgmt:list\"", "\"keymgmt:delete\"")),
        ),
    ];
    for (key, edit) in cases {
        let config = config_with(&t, &Setup::default(), edit);
        let o = refused(&config);
        assert_config_error(
            &o,
            &[&config.display().to_string(), &format!("key `{key}`")],
        );
    }
    assert!(!default_sock(&t).exists());
}

#[test]
fn a_missing_config_file_exits_78_naming_it() {
    let t = Token::new();
    let config = t.path().join("does-not-exist.toml");
    let o = refused(&config);
    assert_config_error(&o, &[&config.display().to_string(), "cannot read"]);
}

#[test]
fn check_config_accepts_a_good_file_without_touching_token_or_socket() {
    let t = Token::new();
    let faults = tempfile::tempdir().unwrap();
    let setup = Setup {
        fault_dir: Some(faults.path().to_path_buf()),
        ..Setup::default()
    };
    let config = write_config(&t, &setup);
    let o = run_to_exit(&["--check-config"], &config, &[]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(
        o.stdout.contains(&config.display().to_string()) && o.stdout.contains("valid"),
        "{o:?}"
    );
    assert!(
        !default_sock(&t).exists(),
        "--check-config created the socket"
    );
    assert!(
        !faults.path().join("count_C_Login").exists(),
        "--check-config logged in to the token"
    );

    // The same file really does start the daemon.
    let d = Daemon::start(&t, &setup);
    assert_eq!(d.client().get("/v1/keys").status, 200);
}

#[test]
fn check_config_rejects_a_bad_file_with_78() {
    let t = Token::new();
    let config = config_with(&t, &Setup::default(), |c| {
        c.replace("mode = \"0660\"", "mode = \"0666\"")
    });
    let o = run_to_exit(&["--check-config"], &config, &[]);
    assert_config_error(&o, &[&config.display().to_string(), "unix.mode", "0666"]);
    assert!(!o.stdout.contains("valid"), "{o:?}");

    let config = config_with(&t, &Setup::default(), |c| {
        c.replace("[server]\n", "[server]\nlisten = \"0.0.0.0:80\"\n")
    });
    let o = run_to_exit(&["--check-config"], &config, &[]);
    assert_config_error(&o, &[&config.display().to_string(), "listen"]);
    assert!(!default_sock(&t).exists());
}

// ---------------------------------------------------------------------------------------
// The socket.
// ---------------------------------------------------------------------------------------

#[test]
fn a_socket_directory_writable_by_group_or_others_is_refused() {
    let t = Token::new();
    for mode in [0o770, 0o777, 0o1777, 0o720, 0o702] {
        let dir = t.path().join(format!("run-{mode:o}"));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let sock = dir.join("api.sock");
        let config = config_with(&t, &Setup::default(), |c| with_sock(c, &t, &sock));
        let o = refused(&config);
        assert_startup_failure(
            &o,
            &[
                &format!("socket directory {}", dir.display()),
                &format!("{mode:04o}"),
            ],
        );
        assert!(
            !sock.exists(),
            "socket created in a mode {mode:o} directory"
        );
    }

    // The same place is accepted once group and others cannot write it.
    let dir = t.path().join("run-750");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
    let sock = dir.join("api.sock");
    let config = config_with(&t, &Setup::default(), |c| with_sock(c, &t, &sock));
    let d = start_with(&config, &sock, t.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.client().get("/v1/keys").status, 200);
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode is the configured one");
}

#[test]
#[cfg_attr(not(built_as_root), ignore = "needs root")]
fn a_socket_directory_owned_by_another_user_is_refused() {
    common::require_root("giving a directory to another uid");
    let t = Token::new();
    let dir = t.path().join("run-other");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).unwrap();
    let sock = dir.join("api.sock");
    let config = config_with(&t, &Setup::default(), |c| with_sock(c, &t, &sock));
    let o = refused(&config);
    assert_startup_failure(&o, &[&dir.display().to_string(), "uid 4242"]);
    assert!(!sock.exists());
}

#[test]
fn a_missing_socket_directory_is_named() {
    let t = Token::new();
    let dir = t.path().join("no-such-run-dir");
    let sock = dir.join("api.sock");
    let config = config_with(&t, &Setup::default(), |c| with_sock(c, &t, &sock));
    let o = refused(&config);
    assert_startup_failure(&o, &[&format!("socket directory {}", dir.display())]);
    assert!(
        !dir.exists(),
        "the daemon must not create the directory itself"
    );
}

#[test]
fn a_second_daemon_on_a_live_socket_refuses_and_the_first_keeps_serving() {
    let t = token_with(&[AES_KEY]);
    let first = Daemon::start(&t, &Setup::default());
    let sock = default_sock(&t);
    let ino = fs::metadata(&sock).unwrap().ino();

    // The second daemon goes through the fault wrapper, whose counters show it never logs
    // in: the socket is claimed before the token is touched.
    let faults = tempfile::tempdir().unwrap();
    let second = Setup {
        fault_dir: Some(faults.path().to_path_buf()),
        ..Setup::default()
    };
    let config = write_config(&t, &second);
    let o = refused(&config);
    assert_startup_failure(
        &o,
        &["another process is serving on", &sock.display().to_string()],
    );
    assert!(
        !faults.path().join("count_C_Login").exists(),
        "the second daemon logged in to the token before finding the socket taken"
    );

    assert_eq!(
        fs::metadata(&sock).map(|m| m.ino()).ok(),
        Some(ino),
        "the second daemon replaced or removed the live socket"
    );
    let r = first.client().get("/v1/keys");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["keys"][0]["kid"], "a1a1");
    assert_eq!(first.stop(), 0);
}

#[test]
fn a_stale_socket_is_replaced_and_served() {
    let t = token_with(&[AES_KEY]);
    let sock = default_sock(&t);
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(
        fs::symlink_metadata(&sock).unwrap().file_type().is_socket(),
        "the stale socket file must remain for this test"
    );
    // A child another test forks at this moment holds a copy of the listener until it
    // execs (close-on-exec): wait for that copy to go before checking the socket is dead.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale socket still accepts connections"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let d = Daemon::start(&t, &Setup::default());
    let r = d.client().get("/v1/keys");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["keys"][0]["kid"], "a1a1");
    assert!(d.log().contains("stale socket"), "{}", d.log());
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
    let t = Token::new();
    let sock = default_sock(&t);
    fs::write(&sock, "precious data\n").unwrap();
    let config = write_config(&t, &Setup::default());
    let o = refused(&config);
    assert_startup_failure(&o, &[&sock.display().to_string(), "not a socket"]);
    assert_eq!(fs::read_to_string(&sock).unwrap(), "precious data\n");

    // A directory there is not replaced either.
    fs::remove_file(&sock).unwrap();
    fs::create_dir(&sock).unwrap();
    fs::write(sock.join("keep"), "x").unwrap();
    let o = refused(&config);
    assert_startup_failure(&o, &[&sock.display().to_string(), "not a socket"]);
    assert!(sock.join("keep").exists());
}

#[test]
fn a_symlink_at_the_socket_path_is_not_followed_or_replaced() {
    let t = Token::new();
    let sock = default_sock(&t);
    let target = t.path().join("target-file");
    fs::write(&target, "precious data\n").unwrap();
    std::os::unix::fs::symlink(&target, &sock).unwrap();
    let config = write_config(&t, &Setup::default());
    let o = refused(&config);
    assert_startup_failure(&o, &[&sock.display().to_string(), "not a socket"]);
    assert!(fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious data\n");
}

// ---------------------------------------------------------------------------------------
// Stopping.
// ---------------------------------------------------------------------------------------

#[test]
fn sigterm_stops_cleanly_exit_0_and_removes_the_socket() {
    let t = Token::new();
    let d = Daemon::start(&t, &Setup::default());
    let sock = d.sock.clone();
    let log = d.stderr.clone();
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(d.client().get("/v1/keys").status, 200);
    assert_eq!(d.stop(), 0);
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "the socket file is left behind after SIGTERM"
    );
    let log = fs::read_to_string(log).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("stopped"), "{log}");

    // The token is usable again at once: a new daemon starts on the same token.
    let d = Daemon::start(&t, &Setup::default());
    assert_eq!(d.client().get("/v1/keys").status, 200);
}

#[test]
fn sigint_stops_cleanly_too() {
    let t = Token::new();
    let d = Daemon::start(&t, &Setup::default());
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let mut d = d;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGINT ignored: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(fs::symlink_metadata(&d.sock).is_err(), "socket left behind");
}
