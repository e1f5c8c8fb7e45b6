//! The service-manager side: the shipped units verify cleanly and score as hardened, and
//! the daemon reports readiness, status and stopping over a test-bound NOTIFY_SOCKET.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture::{access, token_with, Principal, AES, AES_KEY, EC_KEY, MINTING_SCOPES};
use common::notify::NotifySocket;
use common::{Daemon, Setup, Token};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");

/// The shipped service unit of `variant` ("" standalone, "socket-activated/") with
/// ExecStart pointing at the binary under test (verify checks that the command exists),
/// and the variant's socket units beside it.
fn unit_copy_of(variant: &str, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("{UNITS}/{variant}hsmkeyd.service")).unwrap();
    assert!(
        text.contains("ExecStart=/usr/bin/hsmkeyd "),
        "unit runs /usr/bin/hsmkeyd"
    );
    let path = dir.join("hsmkeyd.service");
    std::fs::write(
        &path,
        text.replace("/usr/bin/hsmkeyd", env!("CARGO_BIN_EXE_hsmkeyd")),
    )
    .unwrap();
    for name in ["hsmkeyd.socket", "hsmkeyd-tls.socket"] {
        let socket = format!("{UNITS}/{variant}{name}");
        if Path::new(&socket).exists() {
            let _ = std::fs::copy(&socket, dir.join(name)).unwrap();
        }
    }
    path
}

fn unit_copy(dir: &Path) -> std::path::PathBuf {
    unit_copy_of("", dir)
}

/// `systemd-analyze security --offline` of `unit`: passes `threshold` (0-100 scale) and
/// returns the exposure (0-10 scale).
fn exposure(unit: &Path, threshold: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={threshold}"))
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure over the threshold {threshold}:\n{text}"
    );
    text.lines()
        .find_map(|l| {
            l.split("Overall exposure level for hsmkeyd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"))
}

#[test]
fn the_socket_activated_variant_verifies_and_scores_half_or_less() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy_of("socket-activated/", dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .arg(dir.path().join("hsmkeyd.socket"))
        .arg(dir.path().join("hsmkeyd-tls.socket"))
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let level = exposure(&unit, "5");
    assert!(level <= 0.5, "exposure {level}");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.lines().any(|l| l == "PrivateNetwork=yes"));
    assert!(text.lines().any(|l| l == "RestrictAddressFamilies=AF_UNIX"));
    // One name per socket unit: systemd gives every socket of a unit the same name.
    let unix = std::fs::read_to_string(dir.path().join("hsmkeyd.socket")).unwrap();
    let tls = std::fs::read_to_string(dir.path().join("hsmkeyd-tls.socket")).unwrap();
    assert!(
        unix.lines().any(|l| l == "FileDescriptorName=unix"),
        "{unix}"
    );
    assert!(!unix.contains("FileDescriptorName=tls"), "{unix}");
    assert!(tls.lines().any(|l| l == "FileDescriptorName=tls"), "{tls}");
    assert!(tls.lines().any(|l| l == "Service=hsmkeyd.service"), "{tls}");
}

#[test]
fn the_service_unit_verifies_without_a_word_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    assert!(out.status.success());
}

#[test]
fn the_service_unit_is_hardened_to_exposure_1_1_or_less() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let level = exposure(&unit, "11");
    // 1.1, not 1.0: PrivateUsers= (0.2) would map every caller to nobody and break the
    // Unix socket's peer credentials (tests/container.rs shows a uid principal working).
    assert!(level <= 1.1, "exposure {level}");
}

#[test]
fn the_unit_never_rate_limits_the_audit_trail_and_sysusers_parses() {
    let text = std::fs::read_to_string(format!("{UNITS}/hsmkeyd.service")).unwrap();
    assert!(text.lines().any(|l| l == "LogRateLimitIntervalSec=0"));
    assert!(text.lines().any(|l| l == "RestartPreventExitStatus=78"));
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg("--dry-run")
        .arg(format!("{UNITS}/hsmkeyd.sysusers"))
        .output()
        .expect("systemd-sysusers");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Creating user 'hsmkeyd'"), "{stderr}");
}

#[test]
fn notify_socket_gets_ready_with_status_then_stopping() {
    let t = token_with(&[AES_KEY, EC_KEY]);
    let notify = NotifySocket::bind(Duration::from_millis(100));
    let ops = Principal::me("ops").scopes(&["keymgmt:list", "auth:token"]);
    let setup = Setup {
        env: vec![notify.env()],
        ..Setup::with_access(access(&[], &[ops])).https()
    };
    let d = Daemon::start(&t, &setup);
    let mut got = Vec::new();
    notify.receive_until("READY=1", &mut got);
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap();
    // READY comes only once the token is open and the index built: the log says so.
    let log = d.log();
    assert!(log.contains("key index built"), "{log}");
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS with READY: {ready:?}"));
    assert!(
        status.starts_with("serving 2 keys from token \"hsmkeyd-test\""),
        "{status}"
    );
    assert!(status.ends_with(&d.sock.display().to_string()), "{status}");
    let port = setup.tls_port.unwrap();
    assert!(
        status.contains(&format!("https://127.0.0.1:{port}")),
        "{status}"
    );
    // Both listeners answer once READY=1 has been sent.
    assert_eq!(d.client().get("/v1/keys").status, 200);
    let tok = d.mint(&["keymgmt:list"], 60);
    assert_eq!(d.https().get("/v1/keys", &tok).status, 200);
    assert!(
        !got.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING before SIGTERM: {got:?}"
    );

    assert_eq!(d.stop(), 0);
    notify.receive_until("STOPPING=1", &mut got);
}

fn feeds(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[test]
fn the_watchdog_is_fed_at_half_the_interval_and_stops_when_the_hsm_hangs() {
    let t = token_with(&[AES_KEY]);
    let faults = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(Duration::from_millis(50));
    let setup = Setup {
        env: vec![
            notify.env(),
            // 400 ms: a feed every 200 ms.
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..Setup::faulty(faults.path())
    };
    let d = Daemon::start(&t, &setup);
    let mut got = Vec::new();
    notify.receive_until("READY=1", &mut got);

    let healthy = feeds(&notify.collect(Duration::from_secs(2)));
    assert!(
        (6..=14).contains(&healthy),
        "{healthy} feeds in 2 s at a 200 ms cadence"
    );

    // A wedged HSM: every C_GetSessionInfo blocks. Feeding stops.
    std::fs::write(faults.path().join("hang"), "").unwrap();
    let _ = notify.collect(Duration::from_millis(600));
    let hung = feeds(&notify.collect(Duration::from_secs(2)));
    assert_eq!(hung, 0, "fed the watchdog while the HSM hung");

    // The HSM answers again: feeding resumes.
    std::fs::remove_file(faults.path().join("hang")).unwrap();
    let back = feeds(&notify.collect(Duration::from_secs(2)));
    assert!(back >= 4, "{back} feeds after the HSM came back");
    assert_eq!(d.stop(), 0);
}

#[test]
fn without_watchdog_usec_nothing_is_fed() {
    let t = Token::new();
    let notify = NotifySocket::bind(Duration::from_millis(50));
    let setup = Setup {
        env: vec![notify.env()],
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    let msgs = notify.collect(Duration::from_secs(1));
    assert!(msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    assert_eq!(feeds(&msgs), 0);
    assert_eq!(d.stop(), 0);
}

#[test]
fn the_pin_comes_from_a_systemd_credential_and_never_reaches_environ_or_logs() {
    use std::os::unix::fs::PermissionsExt;
    let t = token_with(&[AES_KEY]);
    let pin = std::fs::read_to_string(&t.pin_file)
        .unwrap()
        .trim()
        .to_string();
    // What systemd's LoadCredential=pin:/etc/hsmkeyd/pin makes: a 0400 file in a 0500 dir.
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("pin"), format!("{pin}\n")).unwrap();
    std::fs::set_permissions(
        creds.path().join("pin"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    std::fs::set_permissions(creds.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
    // The PIN file is gone: only the credential can log in.
    std::fs::remove_file(&t.pin_file).unwrap();

    let setup = Setup {
        pin_credential: Some("pin".into()),
        env: vec![(
            "CREDENTIALS_DIRECTORY".into(),
            creds.path().display().to_string(),
        )],
        ..Setup::default()
    };
    let d = Daemon::start(&t, &setup);
    let c = d.client();
    assert_eq!(c.get("/v1/keys").status, 200);
    let r = c.patch(AES, &serde_json::json!({"label": "via-credential"}));
    assert_eq!(r.status, 200);
    let environ = std::fs::read(format!("/proc/{}/environ", d.child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(&pin),
        "the PIN is in the daemon's environment"
    );
    assert!(!String::from_utf8_lossy(&r.body).contains(&pin));
    let log = d.log();
    assert_eq!(d.stop(), 0);
    assert!(!log.contains(&pin), "the PIN reached the log");

    // Without $CREDENTIALS_DIRECTORY (not started by systemd): a config error naming why.
    let setup = Setup {
        pin_credential: Some("pin".into()),
        ..Setup::default()
    };
    let e = Daemon::try_start(&t, &setup).err().expect("must not start");
    assert!(e.contains("exit status: 78"), "{e}");
    assert!(
        e.contains("CREDENTIALS_DIRECTORY") && e.contains("LoadCredential"),
        "{e}"
    );
}

#[test]
fn socket_activation_serves_through_the_named_unix_and_tls_sockets() {
    use common::tls::{free_port, TlsClient};
    let t = token_with(&[AES_KEY]);
    let activated = Principal::me("activated").scopes(&MINTING_SCOPES);
    let setup = Setup::with_access(access(&[], &[activated])).https();
    // The config names its own socket path and port; systemd's sockets must win.
    let config = common::write_config(&t, &setup);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let port = free_port();
    let log = t.path().join("activate.log");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=unix:tls")
        .arg(env!("CARGO_BIN_EXE_hsmkeyd"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which takes over both sockets.
    let unix = common::Client { sock: sock.clone() };
    let r = unix.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", std::fs::read_to_string(&log).unwrap());
    let tok = {
        let r = unix.send(
            "POST",
            "/v1/auth/token",
            &[("Content-Type", "application/json")],
            br#"{"scopes": ["keymgmt:list", "keymgmt:upd"], "ttl_s": 60}"#,
        );
        assert_eq!(r.status, 200);
        r.json()["token"].as_str().unwrap().to_string()
    };
    let https = TlsClient::new(
        ([127, 0, 0, 1], port).into(),
        &common::tls::tls_dir(t.path()).join("ca.pem"),
    );
    assert_eq!(https.get("/v1/keys", &tok).status, 200);
    let r = https.patch(AES, &tok, &serde_json::json!({"label": "activated"}));
    assert_eq!(r.status, 200);
    assert_eq!(t.labels_of(AES)[0].1, "activated");
    // Nothing was bound from the config.
    assert!(!t.path().join("api.sock").exists());
    let configured = setup.tls_port.unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", configured)).is_err());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("serving HTTPS address=127.0.0.1:{port}")),
        "{text}"
    );

    // SIGTERM: a clean exit, and systemd's socket file is left for systemd.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        sock.exists(),
        "the daemon removed a socket it did not create"
    );
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_the_config_directory() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let run = |tool: &str, args: &[&str]| {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("systemd-sysusers", &[&format!("{UNITS}/hsmkeyd.sysusers")]);
    run(
        "systemd-tmpfiles",
        &["--create", &format!("{UNITS}/hsmkeyd.tmpfiles")],
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("hsmkeyd:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no hsmkeyd group in {group}"));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("hsmkeyd:")),
        "{passwd}"
    );
    let dir = std::fs::metadata(root.path().join("etc/hsmkeyd")).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
    assert_eq!((dir.uid(), dir.gid()), (0, gid));
}
