//! The Debian package under a real systemd: each test boots a throw-away bookworm container
//! (systemd 252 as PID 1, `tests/container/ctl`), installs exactly the `.deb` that
//! `cargo deb` built, walks the operator's documented steps against a real SoftHSM2 token
//! and checks what the operator would see (`systemctl show`, `journalctl`).
//!
//! Needs root and a prepared cache: run `tests/container/run` (it installs what it needs,
//! builds the packages and the rootfs, then runs these tests). In a plain `cargo test` they
//! are ignored.

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const CTL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/container/ctl");
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SOCK: &str = "/run/hsmkeyd/api.sock";
const DEB: &str = "/mnt/debs/hsmkeyd.deb";
const REBUILT: &str = "/mnt/debs/hsmkeyd-rebuilt.deb";
/// The fault wrapper's control directory inside the container.
const FAULTS: &str = "/var/lib/hsmkeyd-fault";

/// One container at a time: the machine has two cores, and each boot is a whole OS.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A booted container; powered off and cleaned up on drop.
struct Container {
    name: String,
    pid: String,
    _turn: MutexGuard<'static, ()>,
}

impl Container {
    fn boot(name: &str) -> Container {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let out = Command::new(CTL)
            .args(["boot", name])
            .output()
            .expect("run tests/container/ctl");
        assert!(
            out.status.success(),
            "boot {name}: {}\n(prepare with tests/container/ctl prepare)",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Container {
            name: name.into(),
            pid,
            _turn: turn,
        }
    }

    /// Runs `script` with /bin/sh inside the container, as root, in a clean environment.
    fn sh(&self, script: &str) -> Out {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid, "-a", "env", "-i", PATH])
            .args([
                "LANG=C.UTF-8",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
                "HOME=/root",
            ])
            .args(["/bin/sh", "-c", script])
            .output()
            .expect("nsenter");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `script`, which must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert_eq!(
            o.code, 0,
            "`{script}` failed ({}):\n{}\n{}",
            o.code, o.stdout, o.stderr
        );
        o.stdout
    }

    /// `systemctl show -p PROP --value UNIT`.
    fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
            .trim()
            .to_string()
    }

    /// Waits up to `secs` for `check` to hold, else fails with the unit's status and log.
    fn wait_for(&self, secs: u64, what: &str, mut check: impl FnMut(&Container) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !check(self) {
            assert!(
                Instant::now() < end,
                "{what} within {secs} s; systemctl status:\n{}",
                self.sh("systemctl status --no-pager -l hsmkeyd; journalctl -b --no-pager -n 40 -u 'hsmkeyd*'").stdout
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn active(&self, unit: &str) -> bool {
        self.show(unit, "ActiveState") == "active"
    }

    /// The API over the Unix socket, as root: (status, body).
    fn api(&self, args: &str) -> (u16, String) {
        let o = self.ok(&format!(
            "curl -s --max-time 60 -w '\\n%{{http_code}}' --unix-socket {SOCK} {args}"
        ));
        let (body, code) = o.trim_end().rsplit_once('\n').unwrap_or(("", o.trim()));
        (code.parse().unwrap_or(0), body.to_string())
    }

    fn journal(&self, args: &str) -> String {
        self.ok(&format!("journalctl -b --no-pager {args}"))
    }

    fn main_pid(&self) -> String {
        self.show("hsmkeyd", "MainPID")
    }

    /// Installs exactly the package cargo-deb built.
    fn install(&self, deb: &str) -> String {
        self.ok(&format!(
            "DEBIAN_FRONTEND=noninteractive dpkg -i {deb} 2>&1"
        ))
    }

    /// The operator's documented steps after installing: a token with the label the
    /// config names, initialised as the daemon's user, and its PIN in /etc/hsmkeyd/pin.
    /// Also makes root a principal (so the test can call the API) and `keys` AES keys.
    fn operator_steps(&self, pin: &str, keys: &[(&str, &str)]) {
        self.ok(&format!(
            "set -e
             # setpriv, not runuser: runuser's PAM session entry records its command line
             # in the journal, and with it a PIN given with --pin.
             setpriv --reuid hsmkeyd --regid softhsm --clear-groups -- softhsm2-util --init-token \
               --free --label hsmkeyd --so-pin 10203040 --pin '{pin}' >/dev/null
             (umask 077; printf '%s\\n' '{pin}' > /etc/hsmkeyd/pin)"
        ));
        for (id, label) in keys {
            // The dev tool runs as the daemon's user so the token's files stay its own.
            self.ok(&format!(
                "set -e
                 install -m 0600 -o hsmkeyd /etc/hsmkeyd/pin /run/devtoken-pin
                 setpriv --reuid hsmkeyd --regid softhsm --clear-groups -- env SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf \
                   /mnt/tools/hsmkeyd-devtoken --token-label hsmkeyd --pin-file /run/devtoken-pin \
                   gen --kind aes256 --id {id} --label {label} >/dev/null
                 rm /run/devtoken-pin"
            ));
        }
        self.add_principal(
            "root-admin",
            "0",
            "\"keymgmt:list\", \"keymgmt:get\", \"keymgmt:upd\", \"auth:token\"",
        );
    }

    fn add_principal(&self, name: &str, uid: &str, scopes: &str) {
        self.ok(&format!(
            "printf '\\n[[principals]]\\nname = \"{name}\"\\nuids = [{uid}]\\nscopes = [{scopes}]\\n' \
               >> /etc/hsmkeyd/hsmkeyd.toml"
        ));
    }

    /// install + operator steps + `systemctl enable --now`, active.
    fn serving(&self, pin: &str, keys: &[(&str, &str)]) {
        let _ = self.install(DEB);
        self.operator_steps(pin, keys);
        self.ok("systemctl enable --now hsmkeyd 2>&1");
        self.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    }

    /// Routes the token through the fault wrapper (tests/pkcs11-fault), controlled from
    /// FAULTS, with a drop-in that lets the daemon write there; `unit_extra` adds to it.
    fn with_fault_wrapper(&self, unit_extra: &str) {
        self.ok(&format!(
            "set -e
             install -d -m 0700 -o hsmkeyd -g hsmkeyd {FAULTS}
             sed -i 's|^module = .*|module = \"/mnt/tools/libhsmkeyd_pkcs11_fault.so\"|' /etc/hsmkeyd/hsmkeyd.toml
             sed -i 's|^SOFTHSM2_CONF = .*|&\\nHSMKEYD_FAULT_MODULE = \"/usr/lib/softhsm/libsofthsm2.so\"\\nHSMKEYD_FAULT_DIR = \"{FAULTS}\"|' /etc/hsmkeyd/hsmkeyd.toml
             mkdir -p /etc/systemd/system/hsmkeyd.service.d
             printf '[Service]\\nReadWritePaths={FAULTS}\\n{unit_extra}\\n' > /etc/systemd/system/hsmkeyd.service.d/fault.conf
             systemctl daemon-reload"
        ));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(CTL).args(["stop", &self.name]).status();
    }
}

/// A PIN no other text contains, so finding it anywhere means it leaked.
fn unique_pin() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("pin{:x}", nanos & 0xffff_ffff_ffff)
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn enable_now_reaches_active_with_a_status_naming_the_token_and_the_key_count() {
    let c = Container::boot("enable");
    let log = c.install(DEB);
    assert!(!log.contains("warning"), "dpkg -i: {log}");
    c.operator_steps(&unique_pin(), &[("a1a1", "first"), ("b2b2", "second")]);
    c.ok("systemctl enable --now hsmkeyd 2>&1");
    c.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    assert_eq!(c.show("hsmkeyd", "SubState"), "running");
    assert_eq!(c.show("hsmkeyd", "UnitFileState"), "enabled");
    assert_eq!(c.show("hsmkeyd", "Type"), "notify");
    let status = c.show("hsmkeyd", "StatusText");
    assert!(
        status.starts_with("serving 2 keys from token \"hsmkeyd\"") && status.ends_with(SOCK),
        "{status}"
    );
    // The packaged config serves the Unix socket only until a certificate is configured.
    assert!(!status.contains("https"), "{status}");
    assert_ne!(c.sh("curl -s -o /dev/null http://127.0.0.1:8443/").code, 0);
    let (code, body) = c.api("http://localhost/v1/keys");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"total\":2"), "{body}");
    // The socket: mode 0660, owned by the daemon's user and group.
    let stat = c.ok(&format!("stat -c '%a %U %G' {SOCK}"));
    assert_eq!(stat.trim(), "660 hsmkeyd hsmkeyd");
    // The packaged CLI talks to the packaged socket by default; its man page and
    // completions are installed.
    let listed = c.ok("hsmkeyctl --json list");
    assert!(listed.contains("\"total\": 2"), "{listed}");
    c.ok("zcat /usr/share/man/man1/hsmkeyctl.1.gz | grep -q '^.TH hsmkeyctl'");
    c.ok("grep -q _hsmkeyctl /usr/share/bash-completion/completions/hsmkeyctl");
    c.ok("test -s /usr/share/zsh/vendor-completions/_hsmkeyctl");
    c.ok("test -s /usr/share/fish/vendor_completions.d/hsmkeyctl.fish");
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn before_the_operator_steps_the_status_says_why_and_nothing_loops() {
    let c = Container::boot("unconfigured");
    // Installing starts the unit at once; without a PIN it must not start, nor fail dpkg.
    let log = c.install(DEB);
    assert!(!log.contains("Job for hsmkeyd.service failed"), "{log}");
    assert_eq!(c.show("hsmkeyd", "UnitFileState"), "enabled");
    assert_ne!(c.show("hsmkeyd", "ActiveState"), "active");
    let status = c.sh("systemctl status --no-pager -l hsmkeyd").stdout;
    assert!(status.contains("/etc/hsmkeyd/pin"), "{status}");
    assert_eq!(c.show("hsmkeyd", "NRestarts"), "0");
    // A PIN but no token yet: the start fails once, and the daemon's reason is what
    // `systemctl status` ends with, not a restart loop.
    c.ok("(umask 077; echo 1234 > /etc/hsmkeyd/pin)");
    let _ = c.sh("systemctl restart hsmkeyd");
    c.wait_for(10, "hsmkeyd failed", |c| {
        c.show("hsmkeyd", "ActiveState") == "failed"
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.show("hsmkeyd", "ActiveState"), "failed");
    assert_eq!(c.show("hsmkeyd", "NRestarts"), "0");
    let status = c.sh("systemctl status --no-pager -l hsmkeyd").stdout;
    assert!(
        status.contains("no token with label \"hsmkeyd\""),
        "{status}"
    );
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn the_socket_activated_variant_starts_on_the_first_connection_to_either_socket() {
    let c = Container::boot("socket");
    let _ = c.install(DEB);
    c.operator_steps(&unique_pin(), &[("a1a1", "first")]);
    // The documented switch: the variant's two units override the packaged one.
    c.ok("set -e
          mkdir -p /etc/hsmkeyd/tls
          /mnt/tools/hsmkeyd-devcert --out /etc/hsmkeyd/tls >/dev/null
          chown hsmkeyd /etc/hsmkeyd/tls/key.pem
          chgrp hsmkeyd /etc/hsmkeyd/tls && chmod 0750 /etc/hsmkeyd/tls
          printf '\\n[tls]\\nlisten = \"127.0.0.1:8443\"\\ncert = \"/etc/hsmkeyd/tls/cert.pem\"\\nkey = \"/etc/hsmkeyd/tls/key.pem\"\\n' >> /etc/hsmkeyd/hsmkeyd.toml
          systemctl disable --now hsmkeyd.service 2>&1
          cp /usr/share/doc/hsmkeyd/examples/socket-activated/hsmkeyd.service \
             /usr/share/doc/hsmkeyd/examples/socket-activated/hsmkeyd.socket \
             /usr/share/doc/hsmkeyd/examples/socket-activated/hsmkeyd-tls.socket /etc/systemd/system/
          systemctl daemon-reload
          systemctl enable --now hsmkeyd.socket hsmkeyd-tls.socket 2>&1");
    assert_eq!(c.show("hsmkeyd.socket", "ActiveState"), "active");
    assert_eq!(c.show("hsmkeyd-tls.socket", "ActiveState"), "active");
    assert_eq!(c.show("hsmkeyd.service", "ActiveState"), "inactive");

    // First connection on the Unix socket.
    let (code, body) = c.api("http://localhost/v1/keys");
    assert_eq!(code, 200, "{body}");
    assert!(c.active("hsmkeyd.service"));
    let (code, body) = c.api(
        "-H 'Content-Type: application/json' -d '{\"scopes\": [\"keymgmt:list\"], \"ttl_s\": 600}' \
         http://localhost/v1/auth/token",
    );
    assert_eq!(code, 200, "{body}");
    let token = body
        .split("\"token\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();

    // Stopped again, the socket stays; the first connection on the HTTPS port starts it.
    c.ok("systemctl stop hsmkeyd.service");
    assert_eq!(c.show("hsmkeyd.service", "ActiveState"), "inactive");
    assert_eq!(c.show("hsmkeyd.socket", "SubState"), "listening");
    assert_eq!(c.show("hsmkeyd-tls.socket", "SubState"), "listening");
    let out = c.ok(&format!(
        "curl -s --max-time 30 -w '\\n%{{http_code}}' --cacert /etc/hsmkeyd/tls/ca.pem \
           -H 'Authorization: Bearer {token}' https://localhost:8443/v1/keys"
    ));
    assert!(out.trim_end().ends_with("200"), "{out}");
    assert!(out.contains("\"total\":1"), "{out}");
    assert!(c.active("hsmkeyd.service"));
    assert!(c
        .show("hsmkeyd", "StatusText")
        .starts_with("serving 1 keys"));
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn reload_swaps_the_config_and_a_bad_one_leaves_the_old_serving() {
    let c = Container::boot("reload");
    let _ = c.install(DEB);
    c.operator_steps(&unique_pin(), &[("a1a1", "first")]);
    // A second caller, uid 4242, that may only list: reading a key is refused.
    c.add_principal("lister", "4242", "\"keymgmt:list\"");
    c.ok("systemctl enable --now hsmkeyd 2>&1");
    c.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    let as_lister = |c: &Container| {
        c.ok(&format!(
            "setpriv --reuid 4242 --regid 4242 --groups $(getent group hsmkeyd | cut -d: -f3) \
               curl -s -o /dev/null -w '%{{http_code}}' --unix-socket {SOCK} http://localhost/v1/keys/a1a1"
        ))
    };
    assert_eq!(as_lister(&c), "403");
    let pid = c.main_pid();

    // Watch the notifications systemd gets.
    c.ok("systemd-analyze log-level debug");
    c.ok("sed -i 's|^scopes = \\[\"keymgmt:list\"\\]$|scopes = [\"keymgmt:list\", \"keymgmt:get\"]|' /etc/hsmkeyd/hsmkeyd.toml");
    c.ok("systemctl reload hsmkeyd");
    c.wait_for(10, "the reloaded config", |c| as_lister(c) == "200");
    assert_eq!(c.main_pid(), pid, "reload restarted the daemon");
    let notes = c.journal("-u hsmkeyd --grep 'notification message|Changed reload'");
    let reloading = notes
        .find("RELOADING=1")
        .unwrap_or_else(|| panic!("{notes}"));
    let ready = notes[reloading..]
        .find("READY=1")
        .unwrap_or_else(|| panic!("{notes}"));
    assert!(
        notes[reloading + ready..].contains("Changed reload -> running"),
        "{notes}"
    );
    c.ok("systemd-analyze log-level info");
    let audit = c.journal("-u hsmkeyd HSMKEYD_EVENT=CONFIG_RELOADED -o cat");
    assert!(!audit.trim().is_empty(), "no CONFIG_RELOADED entry");

    // A bad config: refused, the old one keeps serving, the unit stays active.
    c.ok("sed -i 's|^mode = \"0660\"|mode = \"0666\"|' /etc/hsmkeyd/hsmkeyd.toml");
    c.ok("systemctl reload hsmkeyd");
    c.wait_for(10, "the refusal in the log", |c| {
        c.journal("-u hsmkeyd -o cat").contains("reload refused")
    });
    assert_eq!(c.show("hsmkeyd", "ActiveState"), "active");
    assert_eq!(c.main_pid(), pid);
    assert_eq!(as_lister(&c), "200");
    let (code, _) = c.api("http://localhost/v1/keys/a1a1");
    assert_eq!(code, 200);
    let failed = c.journal("-u hsmkeyd HSMKEYD_EVENT=CONFIG_RELOADED HSMKEYD_RESULT=FAILED -o cat");
    assert!(failed.contains("unix.mode"), "{failed}");
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn stop_drains_an_in_flight_update() {
    let c = Container::boot("drain");
    let _ = c.install(DEB);
    c.operator_steps(&unique_pin(), &[("a1a1", "first")]);
    c.with_fault_wrapper("");
    c.ok("systemctl enable --now hsmkeyd 2>&1");
    c.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    // Hold the first label write in the HSM, with the PATCH in flight.
    c.ok(&format!("echo 0 > {FAULTS}/hang_C_SetAttributeValue"));
    c.ok(&format!(
        "curl -s -o /run/patch.out -w '%{{http_code}}' --unix-socket {SOCK} -X PATCH \
           -H 'Content-Type: application/json' -d '{{\"label\": \"drained\"}}' \
           http://localhost/v1/keys/a1a1 > /run/patch.code 2>&1 &"
    ));
    c.wait_for(10, "the write held", |c| {
        c.sh(&format!("test -e {FAULTS}/held_C_SetAttributeValue"))
            .code
            == 0
    });
    c.ok("systemctl stop --no-block hsmkeyd");
    c.wait_for(5, "deactivating", |c| {
        c.show("hsmkeyd", "ActiveState") == "deactivating"
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.show("hsmkeyd", "ActiveState"), "deactivating");
    c.ok(&format!("rm {FAULTS}/hang_C_SetAttributeValue"));
    c.wait_for(20, "stopped", |c| {
        c.show("hsmkeyd", "ActiveState") == "inactive"
    });
    assert_eq!(c.ok("cat /run/patch.code").trim(), "200");
    assert!(c.ok("cat /run/patch.out").contains("\"drained\""));
    assert_eq!(c.show("hsmkeyd", "Result"), "success");
    // The audit trail: the update's result, then the stop.
    let events = c.journal("-u hsmkeyd -o cat --output-fields=HSMKEYD_EVENT");
    let events: Vec<&str> = events.lines().filter(|l| !l.is_empty()).collect();
    let changed = events.iter().rposition(|e| *e == "KEY_ATTRIBUTES_CHANGED");
    let stopped = events.iter().rposition(|e| *e == "DAEMON_STOPPED");
    assert!(
        matches!((changed, stopped), (Some(a), Some(b)) if a < b),
        "{events:?}"
    );
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn the_watchdog_kills_and_restarts_a_daemon_whose_hsm_hangs() {
    let c = Container::boot("watchdog");
    let _ = c.install(DEB);
    c.operator_steps(&unique_pin(), &[("a1a1", "first")]);
    c.with_fault_wrapper("WatchdogSec=3s");
    c.ok("systemctl enable --now hsmkeyd 2>&1");
    c.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    let pid = c.main_pid();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.main_pid(), pid, "killed while the HSM answered");
    // Every C_GetSessionInfo (the watchdog's liveness check) now blocks.
    c.ok(&format!("touch {FAULTS}/hang"));
    c.wait_for(20, "the watchdog's verdict", |c| {
        c.journal("-u hsmkeyd -o cat")
            .contains("Failed with result 'watchdog'")
    });
    c.ok(&format!("rm {FAULTS}/hang"));
    c.wait_for(30, "hsmkeyd restarted", |c| {
        c.active("hsmkeyd") && c.main_pid() != pid
    });
    assert!(c.show("hsmkeyd", "NRestarts").parse::<u32>().unwrap() >= 1);
    assert!(c.journal("-u hsmkeyd -o cat").contains("Watchdog timeout"));
    assert_eq!(c.api("http://localhost/v1/keys").0, 200);
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn the_pin_arrives_only_through_load_credential() {
    let c = Container::boot("pin");
    let pin = unique_pin();
    c.serving(&pin, &[("a1a1", "first")]);
    let unit = c.ok("systemctl cat hsmkeyd");
    assert!(
        unit.lines()
            .any(|l| l == "LoadCredential=pin:/etc/hsmkeyd/pin"),
        "{unit}"
    );
    assert_eq!(c.ok("stat -c '%a %U' /etc/hsmkeyd/pin").trim(), "600 root");
    let pid = c.main_pid();
    let environ = c.ok(&format!("tr '\\0' '\\n' < /proc/{pid}/environ"));
    assert!(environ.contains("CREDENTIALS_DIRECTORY="), "{environ}");
    assert!(!environ.contains(&pin), "the PIN is in the environment");
    // The daemon can log in: a PATCH writes to the token.
    assert_eq!(
        c.api("-X PATCH -H 'Content-Type: application/json' -d '{\"label\": \"x\"}' http://localhost/v1/keys/a1a1").0,
        200
    );
    for (what, script) in [
        ("unit", "systemctl cat hsmkeyd"),
        ("environment", "systemctl show hsmkeyd"),
        ("config", "cat /etc/hsmkeyd/hsmkeyd.toml"),
        ("journal", "journalctl -b --no-pager -o verbose"),
    ] {
        let text = c.ok(script);
        assert!(text.len() > 100, "{what}: {text}");
        assert!(!text.contains(&pin), "the PIN is in the {what}");
    }
}

/// "Overall exposure level for hsmkeyd.service: 1.0 OK" -> 1.0
fn exposure(text: &str) -> f64 {
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
#[ignore = "needs root and a container: run tests/container/run"]
fn the_running_unit_scores_as_the_offline_analysis_does_and_has_no_privileges() {
    let c = Container::boot("security");
    c.serving(&unique_pin(), &[]);
    let live = c.ok("systemd-analyze security --no-pager hsmkeyd.service");
    let offline = c.ok(
        "systemd-analyze security --no-pager --offline=yes /usr/lib/systemd/system/hsmkeyd.service",
    );
    // Not just the score: every check, item by item.
    assert_eq!(live, offline, "the running unit is judged differently");
    // As tests/systemd.rs pins offline: 1.1 (no PrivateUsers=, see systemd/README.md).
    assert!(exposure(&live) <= 1.1, "{live}");

    // The sysusers user, a system account without a shell, and nothing more.
    let pid = c.main_pid();
    let passwd = c.ok("getent passwd hsmkeyd");
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system uid: {passwd}");
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    let status = c.ok(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert!(
        field("Uid").iter().all(|u| *u == uid.to_string()),
        "{status}"
    );
    let softhsm = c.ok("getent group softhsm | cut -d: -f3");
    assert!(field("Groups").contains(&softhsm.trim()), "{status}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(cap), ["0000000000000000"], "{cap}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"]);
    assert_eq!(field("Seccomp"), ["2"], "no system call filter");
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn a_crash_is_restarted_and_the_journal_shows_the_stop_and_the_start() {
    let c = Container::boot("crash");
    c.serving(&unique_pin(), &[("a1a1", "first")]);
    let pid = c.main_pid();
    // Rust's runtime catches the first SIGSEGV (its stack-overflow check), finds no fault
    // in a guard page and puts the default action back: a SIGSEGV sent with kill takes
    // effect the second time (a real segfault re-faults and dies at once).
    c.ok(&format!(
        "kill -SEGV {pid}; sleep 0.2; kill -SEGV {pid} 2>/dev/null || true"
    ));
    c.wait_for(20, "hsmkeyd restarted", |c| {
        c.active("hsmkeyd") && c.main_pid() != pid
    });
    assert_eq!(c.show("hsmkeyd", "NRestarts"), "1");
    let log = c.journal("-u hsmkeyd -o cat");
    assert!(log.contains("status=11/SEGV"), "{log}");
    // The daemon cannot write its own DAEMON_STOPPED when it crashes: systemd's entry
    // above stands for it; both starts are audited, the second by the new process.
    let starts =
        c.journal("-u hsmkeyd HSMKEYD_EVENT=DAEMON_STARTED -o verbose --output-fields=_PID");
    assert!(starts.contains(&format!("_PID={pid}")), "{starts}");
    assert!(
        starts.contains(&format!("_PID={}", c.main_pid())),
        "{starts}"
    );
    assert_eq!(c.api("http://localhost/v1/keys").0, 200);
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn audit_entries_are_queryable_by_kid_and_explained_by_the_catalog() {
    let c = Container::boot("journal");
    c.serving(&unique_pin(), &[("a1a1", "first"), ("b2b2", "second")]);
    let (code, body) = c.api(
        "-X PATCH -H 'Content-Type: application/json' -d '{\"label\": \"renamed\"}' http://localhost/v1/keys/a1a1",
    );
    assert_eq!(code, 200, "{body}");
    let entries = c.journal("-u hsmkeyd HSMKEYD_KID=a1a1 -o cat");
    assert!(
        entries.contains("label \"first\" -> \"renamed\" by root-admin"),
        "{entries}"
    );
    assert!(c
        .journal("-u hsmkeyd HSMKEYD_KID=b2b2 -o cat")
        .trim()
        .is_empty());
    let explained =
        c.journal("-x -u hsmkeyd HSMKEYD_KID=a1a1 HSMKEYD_EVENT=KEY_ATTRIBUTES_CHANGED");
    assert!(
        explained.contains("hsmkeyd answered an update of key a1a1: OK"),
        "{explained}"
    );
    assert!(explained.contains("Defined-By: hsmkeyd"), "{explained}");
}

/// Every path on the root file system, but the ones that change anyway (logs, the
/// journal, dpkg's own records, apt/debconf caches).
fn files(c: &Container) -> Vec<String> {
    let out = c.ok(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp \
           -o -path /var/log -o -path /var/lib/dpkg -o -path /var/cache -o -path /mnt \
           -o -path /var/lib/softhsm/tokens -o -path /var/lib/systemd/catalog \
           -o -path /var/tmp \\) -prune -o -print | sort",
    );
    out.lines().map(str::to_string).collect()
}

#[test]
#[ignore = "needs root and a container: run tests/container/run"]
fn the_package_installs_reinstalls_upgrades_removes_and_purges_cleanly() {
    let c = Container::boot("package");
    let before = files(&c);
    c.serving(&unique_pin(), &[("a1a1", "first")]);
    let installed = files(&c);
    let config = c.ok("cat /etc/hsmkeyd/hsmkeyd.toml");
    assert!(config.contains("root-admin"));
    assert_eq!(
        c.ok("stat -c '%a %U %G' /etc/hsmkeyd /etc/hsmkeyd/hsmkeyd.toml"),
        "750 root hsmkeyd\n644 root root\n"
    );

    // The same version again: still serving, the operator's config kept.
    let log = c.install(DEB);
    assert!(!log.contains("conffile"), "{log}");
    c.wait_for(20, "hsmkeyd active", |c| c.active("hsmkeyd"));
    assert_eq!(c.ok("cat /etc/hsmkeyd/hsmkeyd.toml"), config);
    assert_eq!(files(&c), installed);

    // A rebuilt package: the daemon restarts into it, the config is kept.
    let pid = c.main_pid();
    let _ = c.install(REBUILT);
    assert_eq!(c.ok("dpkg-query -W -f '${Version}' hsmkeyd"), "0.1.0-2");
    c.wait_for(20, "hsmkeyd restarted", |c| {
        c.active("hsmkeyd") && c.main_pid() != pid
    });
    assert_eq!(c.ok("cat /etc/hsmkeyd/hsmkeyd.toml"), config);
    assert_eq!(c.api("http://localhost/v1/keys").0, 200);
    assert_eq!(files(&c), installed, "the upgrade left files behind");

    // Remove: stopped, and only the configuration is left (with dpkg's and
    // deb-systemd-helper's records of what to do on purge).
    c.ok("dpkg -r hsmkeyd 2>&1");
    assert_eq!(c.show("hsmkeyd", "ActiveState"), "inactive");
    assert_ne!(c.sh(&format!("test -e {SOCK}")).code, 0);
    let left: Vec<String> = files(&c)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    let expected_left = [
        "/etc/hsmkeyd",
        "/etc/hsmkeyd/hsmkeyd.toml",
        "/etc/hsmkeyd/pin",
    ];
    let unexpected: Vec<&String> = left
        .iter()
        .filter(|f| {
            !expected_left.contains(&f.as_str())
                && !f.starts_with("/var/lib/systemd/deb-systemd-helper")
                && !f.starts_with("/etc/systemd/system")
                && ![
                    "/etc/passwd-",
                    "/etc/group-",
                    "/etc/shadow-",
                    "/etc/gshadow-",
                ]
                .contains(&f.as_str())
        })
        .collect();
    assert!(unexpected.is_empty(), "left after remove: {unexpected:?}");
    for f in expected_left {
        assert!(left.iter().any(|l| l == f), "remove took {f}");
    }

    // Purge: nothing of the package is left (the system user stays, as Debian's do).
    c.ok("dpkg -P hsmkeyd 2>&1");
    let left: Vec<String> = files(&c)
        .into_iter()
        .filter(|f| !before.contains(f))
        .filter(|f| {
            ![
                "/etc/passwd-",
                "/etc/group-",
                "/etc/shadow-",
                "/etc/gshadow-",
            ]
            .contains(&f.as_str())
        })
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(c.ok("getent passwd hsmkeyd").starts_with("hsmkeyd:"));
}
