//! Configuration: the TOML file named by `--config`, parsed and fully validated.
//!
//! Everything is checked here, before anything else starts, so a bad file stops startup with
//! a message naming the file, the key and the reason. The result holds typed values
//! ([`Scope`], [`RoleName`]) that the rest of the daemon uses without re-validating.
//! Owns: the file format. May call: `values` only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod encedo;
mod server;
mod tls;

pub use encedo::{EncedoConfig, EncedoUserConfig, UserKey};
pub use server::ServerConfig;

use server::RawServer;
use tls::{issuer_config, tls_config, tokens_config, RawIssuer, RawTls, RawTokens};
pub use tls::{IssuerConfig, JwtAlgorithm, TlsConfig, TokensConfig};

use crate::values::RoleName;
use crate::values::Scope;

/// Default size of the PKCS#11 session pool: as many as the default
/// `server.connection_threads`, so each connection served on a thread of its own makes its
/// token call without waiting for another's session. Sessions open on demand, so an idle
/// daemon holds few. With 8, 16 clients waited for HSM turns: each turn given back woke
/// another connection's thread, and 16-client updates ran about 5% slower (10% at p50).
const DEFAULT_MAX_SESSIONS: usize = server::DEFAULT_CONNECTION_THREADS;
/// Seconds over which refusals of unidentified callers are summed up per peer.
const DEFAULT_REFUSAL_WINDOW_S: u64 = 10;
/// Audit entries per signed checkpoint: a bounded unsigned tail at the cost of one C_Sign
/// (off the request path) per hundred entries.
const DEFAULT_CHECKPOINT_ENTRIES: u64 = 100;
/// Seconds between signed checkpoints of a quiet trail.
const DEFAULT_CHECKPOINT_INTERVAL_S: u64 = 300;
/// Superseded metadata objects the background worker may be behind by.
const DEFAULT_MAX_CLEANUP_BACKLOG: usize = 1024;

/// A configuration error: which file, which key, and why.
#[derive(Debug)]
pub struct ConfigError {
    /// The configuration file.
    pub path: PathBuf,
    /// The key at fault (`pkcs11.pin_file`, `principals[1].scopes`), or empty for the whole file.
    pub key: String,
    /// What is wrong and, where it helps, what to do.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "config {}: {}", self.path.display(), self.reason)
        } else {
            write!(
                f,
                "config {}: key `{}`: {}",
                self.path.display(),
                self.key,
                self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// How the token is chosen. Slot ids change between boots, so never by slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token whose CKA label (trailing spaces removed) equals this.
    Label(String),
    /// The token whose serial number (trailing spaces removed) equals this.
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label \"{l}\""),
            TokenSelector::Serial(s) => write!(f, "serial \"{s}\""),
        }
    }
}

/// The `[pkcs11]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Which token to use.
    pub token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Environment variables the module reads (e.g. `SOFTHSM2_CONF`), set before it loads.
    pub module_env: BTreeMap<String, String>,
    /// Upper bound on open PKCS#11 sessions.
    pub max_sessions: usize,
}

/// Where the user PIN is read from. Never inline in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose mode denies group and others.
    File(PathBuf),
    /// A systemd credential (`LoadCredential=<name>:...`), read from
    /// `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl PinSource {
    /// The file to read, resolving a credential against `credentials_dir`
    /// (`$CREDENTIALS_DIRECTORY`).
    pub fn path(&self, credentials_dir: Option<&Path>) -> Result<PathBuf, String> {
        match self {
            PinSource::File(p) => Ok(p.clone()),
            PinSource::Credential(name) => match credentials_dir {
                Some(dir) => Ok(dir.join(name)),
                None => Err(format!(
                    "pkcs11.pin_credential {name:?} needs $CREDENTIALS_DIRECTORY, which systemd \
                     sets for units with LoadCredential={name}:<file>; outside systemd use \
                     pkcs11.pin_file"
                )),
            },
        }
    }
}

/// The `[unix]` section: the local socket.
#[derive(Debug, Clone, PartialEq)]
pub struct UnixConfig {
    /// Socket path; its directory must not be writable by group or others.
    pub path: PathBuf,
    /// Permission bits of the socket file.
    pub mode: u32,
}

/// One `[[principals]]` entry: a local caller and what it may do.
#[derive(Debug, Clone)]
pub struct PrincipalConfig {
    /// Name used in logs and audit entries.
    pub name: String,
    /// Peer uids that map to this principal.
    pub uids: Vec<u32>,
    /// Peer gids that map to this principal (a uid match wins over a gid match).
    pub gids: Vec<u32>,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Roles held.
    pub roles: Vec<RoleName>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// `[pkcs11]`.
    pub pkcs11: Pkcs11Config,
    /// `[unix]`.
    pub unix: UnixConfig,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[keys] roles`: the role names keys may carry.
    pub roles: BTreeSet<RoleName>,
    /// `keys.max_cleanup_backlog`: superseded metadata objects left for the background
    /// worker before updates wait for it.
    pub max_cleanup_backlog: usize,
    /// `keys.unique_labels`: no two keys may share a label (default false; the shipped
    /// configuration sets true).
    pub unique_labels: bool,
    /// `keys.allow_delete`: whether `DELETE /v1/keys/{kid}` may destroy keys (default true).
    pub allow_delete: bool,
    /// `[[principals]]`.
    pub principals: Vec<PrincipalConfig>,
    /// `[audit]`.
    pub audit: AuditConfig,
    /// `[tls]`: the HTTPS front door, when configured.
    pub tls: Option<TlsConfig>,
    /// `[tokens]`: hsmkeyd's own bearer-token issuer.
    pub tokens: TokensConfig,
    /// `[[issuers]]`: external issuers whose tokens are accepted.
    pub issuers: Vec<IssuerConfig>,
    /// `[encedo]`: the Encedo HEM login and its users.
    pub encedo: EncedoConfig,
}

/// Where audit entries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditSink {
    /// journald's native protocol (production; startup is refused without journald).
    Journald,
    /// The same entries as JSON lines on stderr (development only).
    StderrJson,
}

/// The `[audit]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// Where entries go.
    pub sink: AuditSink,
    /// Window over which refusals of unidentified callers are aggregated per peer (0: off).
    pub refusal_window: Duration,
    /// A signed checkpoint after this many entries.
    pub checkpoint_entries: u64,
    /// A signed checkpoint at least this often while entries are written.
    pub checkpoint_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    pkcs11: RawPkcs11,
    unix: RawUnix,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    principals: Vec<RawPrincipal>,
    #[serde(default)]
    audit: RawAudit,
    tls: Option<RawTls>,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    encedo: encedo::RawEncedo,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    sink: Option<AuditSink>,
    refusal_window_s: Option<u64>,
    checkpoint_entries: Option<u64>,
    checkpoint_interval_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    pin_file: Option<PathBuf>,
    pin_credential: Option<String>,
    #[serde(default)]
    module_env: BTreeMap<String, String>,
    max_sessions: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnix {
    path: PathBuf,
    mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default)]
    roles: Vec<String>,
    max_cleanup_backlog: Option<usize>,
    allow_delete: Option<bool>,
    unique_labels: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (the path only names the file in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            err(
                "",
                format!(
                    "invalid TOML: {}",
                    e.to_string().trim_end().replace('\n', " ")
                ),
            )
        })?;

        let p = raw.pkcs11;
        absolute(&p.module).map_err(|r| err("pkcs11.module", r))?;
        let pin = match (p.pin_file, p.pin_credential) {
            (Some(f), None) => {
                absolute(&f).map_err(|r| err("pkcs11.pin_file", r))?;
                PinSource::File(f)
            }
            (None, Some(c)) => {
                if c.is_empty() || c.contains('/') || c == "." || c == ".." {
                    return Err(err(
                        "pkcs11.pin_credential",
                        format!("{c:?} is not a credential name"),
                    ));
                }
                PinSource::Credential(c)
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "pkcs11.pin_file",
                    "set pin_file or pin_credential, not both".into(),
                ))
            }
            (None, None) => {
                return Err(err(
                    "pkcs11.pin_file",
                    "name where the PIN comes from: pin_file (a mode 0600 file) or \
                     pin_credential (a systemd credential); never the PIN itself"
                        .into(),
                ))
            }
        };
        let token = match (p.token_label, p.token_serial) {
            (Some(l), None) if !l.trim().is_empty() => TokenSelector::Label(l.trim().to_string()),
            (None, Some(s)) if !s.trim().is_empty() => TokenSelector::Serial(s.trim().to_string()),
            (Some(_), Some(_)) => {
                return Err(err(
                    "pkcs11.token_label",
                    "set token_label or token_serial, not both".into(),
                ))
            }
            _ => {
                return Err(err(
                    "pkcs11.token_label",
                    "name the token with a non-empty token_label or token_serial".into(),
                ))
            }
        };
        for name in p.module_env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(err(
                    "pkcs11.module_env",
                    format!("invalid environment variable name {name:?}"),
                ));
            }
        }
        let max_sessions = p.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        if !(1..=256).contains(&max_sessions) {
            return Err(err(
                "pkcs11.max_sessions",
                format!("{max_sessions} is out of range 1..=256"),
            ));
        }

        absolute(&raw.unix.path).map_err(|r| err("unix.path", r))?;
        let mode = match raw.unix.mode {
            None => 0o660,
            Some(m) => parse_mode(&m).map_err(|r| err("unix.mode", r))?,
        };

        let server = server::server_config(raw.server, &err)?;

        let refusal_window_s = server::in_range(
            &err,
            "audit.refusal_window_s",
            raw.audit
                .refusal_window_s
                .unwrap_or(DEFAULT_REFUSAL_WINDOW_S),
            0,
            3600,
        )?;
        let checkpoint_entries = server::in_range(
            &err,
            "audit.checkpoint_entries",
            raw.audit
                .checkpoint_entries
                .unwrap_or(DEFAULT_CHECKPOINT_ENTRIES),
            1,
            1_000,
        )?;
        let checkpoint_interval_s = server::in_range(
            &err,
            "audit.checkpoint_interval_s",
            raw.audit
                .checkpoint_interval_s
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_S),
            1,
            86_400,
        )?;
        let max_cleanup_backlog = server::in_range(
            &err,
            "keys.max_cleanup_backlog",
            raw.keys
                .max_cleanup_backlog
                .unwrap_or(DEFAULT_MAX_CLEANUP_BACKLOG),
            1,
            1_000_000,
        )?;

        let mut roles = BTreeSet::new();
        for (i, r) in raw.keys.roles.iter().enumerate() {
            let role =
                RoleName::parse(r).map_err(|e| err(&format!("keys.roles[{i}]"), e.into()))?;
            if !roles.insert(role) {
                return Err(err(
                    &format!("keys.roles[{i}]"),
                    format!("role {r:?} is listed twice"),
                ));
            }
        }

        let mut principals = Vec::new();
        let mut names = BTreeSet::new();
        let mut uid_owner: HashMap<u32, String> = HashMap::new();
        let mut gid_owner: HashMap<u32, String> = HashMap::new();
        for (i, rp) in raw.principals.into_iter().enumerate() {
            let key = |k: &str| format!("principals[{i}].{k}");
            let name = rp.name.trim().to_string();
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
                return Err(err(
                    &key("name"),
                    "a principal name is 1..=64 printable ASCII characters without spaces".into(),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(err(
                    &key("name"),
                    format!("principal {name:?} is defined twice"),
                ));
            }
            if rp.uids.is_empty() && rp.gids.is_empty() {
                return Err(err(
                    &key("uids"),
                    format!("principal {name:?} maps no uid or gid, so no caller can be it"),
                ));
            }
            for uid in &rp.uids {
                if let Some(other) = uid_owner.insert(*uid, name.clone()) {
                    return Err(err(
                        &key("uids"),
                        format!("uid {uid} already maps to principal {other:?}"),
                    ));
                }
            }
            for gid in &rp.gids {
                if let Some(other) = gid_owner.insert(*gid, name.clone()) {
                    return Err(err(
                        &key("gids"),
                        format!("gid {gid} already maps to principal {other:?}"),
                    ));
                }
            }
            let mut scopes = Vec::new();
            for (j, s) in rp.scopes.iter().enumerate() {
                let scope = Scope::parse(s)
                    .map_err(|e| err(&format!("{}[{j}]", key("scopes")), e.into()))?;
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
            let mut proles = Vec::new();
            for (j, r) in rp.roles.iter().enumerate() {
                let k = format!("{}[{j}]", key("roles"));
                let role = RoleName::parse(r).map_err(|e| err(&k, e.into()))?;
                if !roles.contains(&role) {
                    return Err(err(&k, format!("role {r:?} is not defined in keys.roles")));
                }
                if !proles.contains(&role) {
                    proles.push(role);
                }
            }
            principals.push(PrincipalConfig {
                name,
                uids: rp.uids,
                gids: rp.gids,
                scopes,
                roles: proles,
            });
        }

        let encedo = encedo::encedo_config(raw.encedo, &roles, &err)?;

        Ok(Config {
            source: path.to_path_buf(),
            pkcs11: Pkcs11Config {
                module: p.module,
                token,
                pin,
                module_env: p.module_env,
                max_sessions,
            },
            unix: UnixConfig {
                path: raw.unix.path,
                mode,
            },
            server,
            roles,
            max_cleanup_backlog,
            allow_delete: raw.keys.allow_delete.unwrap_or(true),
            unique_labels: raw.keys.unique_labels.unwrap_or(false),
            principals,
            audit: AuditConfig {
                sink: raw.audit.sink.unwrap_or(AuditSink::Journald),
                refusal_window: Duration::from_secs(refusal_window_s),
                checkpoint_entries,
                checkpoint_interval: Duration::from_secs(checkpoint_interval_s),
            },
            tls: raw.tls.map(|t| tls_config(t, &err)).transpose()?,
            tokens: tokens_config(raw.tokens, &err)?,
            issuers: raw
                .issuers
                .into_iter()
                .enumerate()
                .map(|(i, r)| issuer_config(i, r, &err))
                .collect::<Result<_, _>>()?,
            encedo,
        })
    }
}

fn absolute(p: &Path) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!("{} must be an absolute path", p.display()))
    }
}

/// Parses an octal permission string such as "0660" or "660"; only rw bits for user and
/// group make sense on a socket, and others get nothing.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode like \"0660\""))?;
    if mode & !0o770 != 0 {
        return Err(format!(
            "{s:?} grants more than read/write to user and group; others must get nothing"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!("{s:?} must give the owner read and write"));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests;
