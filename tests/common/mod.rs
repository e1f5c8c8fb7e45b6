//! Shared setup for the integration tests: a fresh SoftHSM token per test, the real daemon
//! as a child process, a small HTTP client over its Unix socket, and independent read-back
//! of the token with OpenSC's pkcs11-tool. What goes into a token and a config (kids, keys,
//! principals) is in [`fixture`]; the HTTPS client in [`tls`], journald in [`journal`], the
//! NOTIFY_SOCKET in [`notify`].
//!
//! # Duplicates that remain
//!
//! `duplicates --repo tests` still lists these pairs; none is a copy of one job:
//! - pkcs11-fault/src/lib.rs, `wrap_get_attribute_value` ~ `wrap_set_attribute_value` (and
//!   the other wrappers): the same C signature, because PKCS#11 gives both functions the same
//!   parameters, but each wrapper injects its own faults (counting, hang, dropped session,
//!   label cap, failure after N calls). The shared tail, the call into the real module, is
//!   the `forward!` macro; a macro generating whole wrappers would take the per-function
//!   fault list as input and read worse than the functions do.
//! - common/mod.rs `Client::send` ~ common/tls.rs `TlsClient::send`: the same signature over
//!   two transports, each one line that hands [`request`]'s bytes to its own `raw`.
//! - robustness.rs, the connection-limit tests: the same "503 and a message naming the
//!   limit" shape, for different limits (a uid's share, the socket's total, the TLS budget);
//!   each test's setup and recovery check differ.
//! - audit.rs, `every_event_type_is_recorded_with_its_fields`: one block per request that
//!   checks its single result entry; the fields checked differ per outcome (key_not_found
//!   has a kid that names no key, a refused update has no intent entry, ...), so a table
//!   would hold a different column set per row.
//! - common/journal.rs `Journal::wait_for` ~ token_loss.rs `until`: both poll until a
//!   deadline, on different things (journal entries; a status while asserting every answer
//!   is 200 or 503).
//! - consistency.rs ~ layout.rs test prologues: token, fault directory, daemon, client;
//!   four lines that are each already a shared helper call.
//! - hygiene.rs ~ keys_api.rs: raw PATCH requests with a chosen Content-Type and body,
//!   each asserting a different error; the request is the thing under test.
#![allow(dead_code)]

pub mod batch;
pub mod encedo;
pub mod fixture;
mod http;
pub mod journal;
pub mod notify;
pub mod python;
pub mod tls;

pub use http::{parse_response, request, Client, Response};

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN_LABEL: &str = "hsmkeyd-test";
pub const USER_PIN: &str = "test-user-pin-5678";

/// Runs `cmd` (called `what` in messages) and returns its output; fails the test if it
/// cannot start or exits non-zero, with its stderr.
#[track_caller]
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes a softhsm2.conf at `path` that keeps its tokens in `tokendir`.
pub fn write_softhsm_conf(path: &Path, tokendir: &Path) {
    fs::write(
        path,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokendir.display()
        ),
    )
    .unwrap();
}

fn require_tools() {
    for tool in ["softhsm2-util", "pkcs11-tool"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found && Path::new(SOFTHSM).exists(),
            "{tool} or {SOFTHSM} is missing: run ./softhsm-setup.sh --deps-only first"
        );
    }
}

/// A fresh SoftHSM token in its own directory.
pub struct Token {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
}

impl Token {
    pub fn new() -> Token {
        require_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        write_softhsm_conf(&conf, &tokens);
        let _ = run_ok(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", TOKEN_LABEL])
                .args(["--so-pin", "test-so-pin-1234", "--pin", USER_PIN]),
            "softhsm2-util --init-token",
        );
        let pin_file = dir.path().join("pin");
        fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
        fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600)).unwrap();
        Token {
            dir,
            conf,
            pin_file,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the dev token tool against this token and returns its stdout.
    pub fn devtoken(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(env!("CARGO_BIN_EXE_hsmkeyd-devtoken"))
                .env("SOFTHSM2_CONF", &self.conf)
                .args(["--module", SOFTHSM, "--token-label", TOKEN_LABEL])
                .arg("--pin-file")
                .arg(&self.pin_file)
                .args(args),
            &format!("hsmkeyd-devtoken {args:?}"),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Generates a key: `kind` as the dev tool names it (aes256, ec-p256, rsa2048, ...).
    pub fn gen(&self, kind: &str, id: &str, label: &str, extra: &[&str]) -> String {
        let mut args = vec!["gen", "--kind", kind, "--id", id, "--label", label];
        args.extend_from_slice(extra);
        self.devtoken(&args).trim().to_string()
    }

    /// pkcs11-tool logged in to this token as the user.
    fn pkcs11_tool(&self) -> Command {
        let mut c = Command::new("pkcs11-tool");
        let _ = c
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", SOFTHSM, "--token-label", TOKEN_LABEL])
            .args(["--login", "--pin", USER_PIN]);
        c
    }

    /// pkcs11-tool's whole `--list-objects` text (every attribute it shows), read
    /// independently of hsmkeyd.
    pub fn objects_text(&self) -> String {
        let out = run_ok(
            self.pkcs11_tool().arg("--list-objects"),
            "pkcs11-tool --list-objects",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a DER certificate object with this id and label, as pkcs11-tool does.
    pub fn write_certificate(&self, id: &str, label: &str, der: &Path) {
        let _ = run_ok(
            self.pkcs11_tool()
                .args(["--write-object"])
                .arg(der)
                .args(["--type", "cert", "--id", id, "--label", label]),
            "pkcs11-tool --write-object",
        );
    }

    /// Objects as pkcs11-tool sees them: (class line, label, id hex), read independently of
    /// hsmkeyd.
    pub fn objects(&self) -> Vec<P11Object> {
        let out = run_ok(
            self.pkcs11_tool().arg("--list-objects"),
            "pkcs11-tool --list-objects",
        );
        parse_objects(&String::from_utf8_lossy(&out.stdout))
    }

    /// The public key object with this id as pkcs11-tool exports it (DER
    /// SubjectPublicKeyInfo), read independently of hsmkeyd.
    pub fn public_key_der(&self, id: &str) -> Vec<u8> {
        let out = self.dir.path().join(format!("pub-{id}.der"));
        let _ = run_ok(
            self.pkcs11_tool()
                .args([
                    "--read-object",
                    "--type",
                    "pubkey",
                    "--id",
                    id,
                    "--output-file",
                ])
                .arg(&out),
            "pkcs11-tool --read-object",
        );
        let bytes = fs::read(&out).unwrap();
        // OpenSC writes some key types (EdDSA) as PEM.
        match std::str::from_utf8(&bytes) {
            Ok(pem) if pem.starts_with("-----BEGIN") => {
                use base64::Engine;
                let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("PEM body is base64")
            }
            _ => bytes,
        }
    }

    /// The CKA_VALUE (JSON) of the data object with this label, read with pkcs11-tool.
    pub fn data_value(&self, label: &str) -> Value {
        let out = run_ok(
            self.pkcs11_tool()
                .args(["--read-object", "--type", "data", "--label", label]),
            "pkcs11-tool --read-object",
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "data object {label} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The CKA_VALUE (JSON) of the data object with this label, or None when pkcs11-tool
    /// cannot read it: the object went between a listing and this read (a daemon's
    /// background worker destroys superseded objects while a test watches).
    pub fn try_data_value(&self, label: &str) -> Option<Value> {
        let out = self
            .pkcs11_tool()
            .args(["--read-object", "--type", "data", "--label", label])
            .output()
            .expect("cannot run pkcs11-tool");
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "data object {label} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        }))
    }

    /// Labels of the key objects with this id, by class, from pkcs11-tool.
    pub fn labels_of(&self, id: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .objects()
            .into_iter()
            .filter(|o| o.id == id && o.class != "Data")
            .map(|o| (o.class, o.label))
            .collect();
        v.sort();
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P11Object {
    pub class: String,
    pub label: String,
    pub id: String,
    /// pkcs11-tool's `Usage:` words (`sign`, `verify`, ...; it never prints CKA_SIGN of a
    /// secret key).
    pub usage: Vec<String>,
    /// pkcs11-tool's `Access:` words (`sensitive`, `extractable`, `never extractable`, ...).
    pub access: Vec<String>,
}

fn words(list: &str) -> Vec<String> {
    list.split(',')
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty() && w != "none")
        .collect()
}

fn parse_objects(text: &str) -> Vec<P11Object> {
    let mut out: Vec<P11Object> = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && (line.contains("Object") || line.starts_with("Data object")) {
            let class = if line.starts_with("Secret Key") {
                "Secret"
            } else if line.starts_with("Private Key") {
                "Private"
            } else if line.starts_with("Public Key") {
                "Public"
            } else if line.starts_with("Certificate") {
                "Certificate"
            } else if line.starts_with("Data object") {
                "Data"
            } else {
                "Other"
            };
            out.push(P11Object {
                class: class.into(),
                label: String::new(),
                id: String::new(),
                usage: Vec::new(),
                access: Vec::new(),
            });
        } else if let Some(o) = out.last_mut() {
            let t = line.trim_start();
            if let Some(l) = t.strip_prefix("label:") {
                o.label = l.trim().trim_matches('\'').to_string();
            } else if let Some(i) = t.strip_prefix("ID:") {
                o.id = i.trim().to_lowercase();
            } else if let Some(u) = t.strip_prefix("Usage:") {
                o.usage = words(u);
            } else if let Some(a) = t.strip_prefix("Access:") {
                o.access = words(a);
            }
        }
    }
    out
}

/// A call counter the fault wrapper writes (`count_C_FindObjectsInit`, ...); 0 before the
/// first call.
pub fn fault_count(dir: &Path, function: &str) -> u64 {
    fs::read_to_string(dir.join(format!("count_{function}")))
        .map(|s| s.trim().parse().expect("a counter file holds a number"))
        .unwrap_or(0)
}

/// Path of the fault-injecting PKCS#11 wrapper, built once per test binary into its own
/// target directory (so it does not wait on the lock `cargo test` holds).
pub fn fault_module() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = root.join("target").join("pkcs11-fault");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let _ = run_ok(
                Command::new(cargo)
                    .args(["build", "--quiet", "--manifest-path"])
                    .arg(root.join("tests/pkcs11-fault/Cargo.toml"))
                    .arg("--target-dir")
                    .arg(&target),
                "cargo build of the fault module",
            );
            target.join("debug/libhsmkeyd_pkcs11_fault.so")
        })
        .clone()
}

/// Options for one daemon run.
pub struct Setup {
    /// TOML for `[[principals]]` and `[keys]`; `{uid}` is replaced by the test's uid.
    pub access: String,
    /// Route the module through the fault wrapper, controlled from this directory.
    pub fault_dir: Option<PathBuf>,
    /// Extra lines appended to the `[pkcs11]` section.
    pub pkcs11_extra: String,
    /// Body of the `[audit]` section (default: the stderr-json development sink).
    pub audit: String,
    /// Run the daemon in this process's mount namespace (a [`journal::Journal`]'s pid).
    pub namespace: Option<u32>,
    /// Extra environment for the daemon process (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// Serve HTTPS on this loopback port (certificates made in the token's directory).
    pub tls_port: Option<u16>,
    /// More TOML appended to the config (e.g. `[tokens]`, `[[issuers]]`).
    pub extra: String,
    /// Read the PIN from this systemd credential instead of the PIN file.
    pub pin_credential: Option<String>,
    /// More lines for the `[server]` section (e.g. limits).
    pub server_extra: String,
}

/// Waits until the fault wrapper holds a call of `function` (its `held_<function>` marker).
pub fn wait_held(faults: &Path, function: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !faults.join(format!("held_{function}")).exists() {
        assert!(Instant::now() < deadline, "{function} was never held");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 10 ms until it holds or `limit` passes; says whether it held.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("gave up waiting for {what}");
    false
}

pub fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Fails loudly unless the test runs as root. Tests that call it also carry
/// `#[cfg_attr(not(built_as_root), ignore = "needs root")]` (build.rs sets the cfg), so an
/// unprivileged run shows them as ignored; this catches a binary built as root and run as
/// another user.
#[track_caller]
pub fn require_root(why: &str) {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test needs root ({why}) but runs as uid {euid}"
    );
}

impl Setup {
    /// The default setup with this `[keys]`/`[[principals]]` TOML (see [`fixture::access`]).
    pub fn with_access(access: impl Into<String>) -> Setup {
        Setup {
            access: access.into(),
            ..Setup::default()
        }
    }

    /// The default setup with the module routed through the fault wrapper, controlled from
    /// `dir`.
    pub fn faulty(dir: &Path) -> Setup {
        Setup::default().with_faults(dir)
    }

    /// This setup with the module routed through the fault wrapper, controlled from `dir`.
    pub fn with_faults(self, dir: &Path) -> Setup {
        Setup {
            fault_dir: Some(dir.to_path_buf()),
            ..self
        }
    }

    /// This setup, also serving HTTPS on a free loopback port.
    pub fn https(self) -> Setup {
        Setup {
            tls_port: Some(tls::free_port()),
            ..self
        }
    }
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            access: fixture::all_access(),
            fault_dir: None,
            pkcs11_extra: String::new(),
            audit: "sink = \"stderr-json\"\n".to_string(),
            namespace: None,
            env: Vec::new(),
            tls_port: None,
            extra: String::new(),
            pin_credential: None,
            server_extra: String::new(),
        }
    }
}

/// Writes the config for `token` and returns its path.
pub fn write_config(token: &Token, setup: &Setup) -> PathBuf {
    let sock = token.path().join("api.sock");
    let (module, env) = match &setup.fault_dir {
        Some(dir) => (
            fault_module(),
            format!(
                "HSMKEYD_FAULT_MODULE = \"{SOFTHSM}\"\nHSMKEYD_FAULT_DIR = \"{}\"\n",
                dir.display()
            ),
        ),
        None => (PathBuf::from(SOFTHSM), String::new()),
    };
    let text = format!(
        "[pkcs11]\nmodule = \"{}\"\ntoken_label = \"{TOKEN_LABEL}\"\n{}\n{}\n\
         [pkcs11.module_env]\nSOFTHSM2_CONF = \"{}\"\n{env}\n\
         [unix]\npath = \"{}\"\nmode = \"0660\"\n\n[server]\ndrain_timeout_s = 5\n{}\n\
         [audit]\n{}\n{}",
        module.display(),
        match &setup.pin_credential {
            Some(name) => format!("pin_credential = \"{name}\""),
            None => format!("pin_file = \"{}\"", token.pin_file.display()),
        },
        setup.pkcs11_extra,
        token.conf.display(),
        sock.display(),
        setup.server_extra,
        setup.audit,
        setup.access.replace("{uid}", &uid().to_string()),
    );
    let mut text = text;
    if let Some(port) = setup.tls_port {
        let dir = tls::tls_dir(token.path());
        tls::make_certs(&dir);
        text.push_str(&format!(
            "\n[tls]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             handshake_timeout_s = 2\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ));
    }
    text.push('\n');
    text.push_str(&setup.extra);
    let path = token.path().join("hsmkeyd.toml");
    fs::write(&path, text).unwrap();
    path
}

/// The daemon as a child process.
pub struct Daemon {
    pub child: Child,
    pub sock: PathBuf,
    pub stderr: PathBuf,
    /// The HTTPS client, when the daemon serves TLS.
    pub https: Option<tls::TlsClient>,
}

impl Daemon {
    /// The audit entries the daemon wrote (stderr-json sink), in order.
    pub fn audit_entries(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("HSMKEYD_EVENT").is_some())
            .collect()
    }

    /// Starts the daemon on `token` and waits until its socket answers.
    pub fn start(token: &Token, setup: &Setup) -> Daemon {
        Daemon::try_start(token, setup).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    /// Starts the daemon; `Err` carries its stderr if it exits before serving.
    pub fn try_start(token: &Token, setup: &Setup) -> Result<Daemon, String> {
        let config = write_config(token, setup);
        let mut cmd = match setup.namespace {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                let _ = c
                    .args(["-t", &pid.to_string(), "-m", "--"])
                    .arg(env!("CARGO_BIN_EXE_hsmkeyd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hsmkeyd")),
        };
        let _ = cmd
            .envs(setup.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&config)
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null());
        let https = setup.tls_port.map(|port| {
            tls::TlsClient::new(
                ([127, 0, 0, 1], port).into(),
                &tls::tls_dir(token.path()).join("ca.pem"),
            )
        });
        Daemon::spawn(cmd, token.path().join("api.sock"), token.path(), https)
    }

    /// Spawns `cmd` (the daemon with its arguments), its stderr in a fresh log file in
    /// `log_dir`, and waits until it serves on `sock`.
    pub fn spawn(
        mut cmd: Command,
        sock: PathBuf,
        log_dir: &Path,
        https: Option<tls::TlsClient>,
    ) -> Result<Daemon, String> {
        let stderr = log_dir.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn hsmkeyd");
        let mut d = Daemon {
            child,
            sock,
            stderr,
            https,
        };
        d.wait_ready().map(|()| d)
    }

    /// Waits until the daemon serves (it logs `serving` once the token is open and the
    /// index built; the socket itself is bound earlier), or `Err` with its log if it exits.
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if self.log().contains(" serving socket=") && UnixStream::connect(&self.sock).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("never started serving: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The HTTPS client (panics if the setup had no `tls_port`).
    pub fn https(&self) -> tls::TlsClient {
        self.https.clone().expect("this daemon serves no TLS")
    }

    /// Mints a bearer token over the Unix socket.
    pub fn mint(&self, scopes: &[&str], ttl_s: u64) -> String {
        let r = self.client().send(
            "POST",
            "/v1/auth/token",
            &[("Content-Type", "application/json")],
            serde_json::json!({"scopes": scopes, "ttl_s": ttl_s})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(
            r.status,
            200,
            "minting failed: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["token"].as_str().unwrap().to_string()
    }

    pub fn client(&self) -> Client {
        Client {
            sock: self.sock.clone(),
        }
    }

    /// SIGTERM, then waits; returns the exit code.
    pub fn stop(mut self) -> i32 {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kid` of each entry of a JSON array of keys (a listing's `keys`, or `list` on the
/// Encedo endpoints), in order.
pub fn kids(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array of keys: {list}"))
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect()
}
