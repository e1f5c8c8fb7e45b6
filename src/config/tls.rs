//! The `[tls]`, `[tokens]` and `[[issuers]]` sections: the HTTPS front door and the bearer
//! tokens it accepts.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{absolute, ConfigError};

/// The `[tls]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Address to listen on (loopback unless `allow_non_loopback`).
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf (permission-checked like the PIN file).
    pub key: PathBuf,
    /// Time a client gets to complete the TLS handshake.
    pub handshake_timeout: Duration,
}

/// The `[tokens]` section: hsmkeyd's own issuer (ES256, key in the HSM).
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// `iss` of minted tokens.
    pub issuer: String,
    /// `aud` of minted tokens, and the audience every accepted token must name.
    pub audience: String,
    /// Longest lifetime a minted token may ask for.
    pub max_ttl: Duration,
    /// Clock skew allowed on `exp` and `nbf`, for every issuer.
    pub leeway: Duration,
}

/// A JWT algorithm an external issuer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RS256,
    /// HMAC SHA-256 with a shared secret.
    HS256,
}

/// One `[[issuers]]` entry.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// `iss` the tokens carry.
    pub iss: String,
    /// `aud` the tokens must carry.
    pub aud: String,
    /// Accepted algorithms (one family: asymmetric with `key_file`, or HS256 with
    /// `secret_file`).
    pub algorithms: Vec<JwtAlgorithm>,
    /// PEM public key (ES256, EdDSA, RS256).
    pub key_file: Option<PathBuf>,
    /// File holding the HS256 secret (permission-checked like the PIN file).
    pub secret_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    listen: Option<String>,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    allow_non_loopback: bool,
    handshake_timeout_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    issuer: Option<String>,
    audience: Option<String>,
    max_ttl_s: Option<u64>,
    leeway_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    iss: String,
    aud: String,
    algorithms: Vec<JwtAlgorithm>,
    key_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
}

/// Default HTTPS address: loopback only.
const DEFAULT_TLS_LISTEN: &str = "127.0.0.1:8443";
/// Default time for a TLS handshake; a peer that sends nothing useful is closed after it.
const DEFAULT_HANDSHAKE_TIMEOUT_S: u64 = 10;
/// Default cap on a minted token's lifetime.
const DEFAULT_MAX_TTL_S: u64 = 3600;
/// Default clock skew allowed on `exp` and `nbf`.
const DEFAULT_LEEWAY_S: u64 = 30;

pub(super) fn tls_config(
    t: RawTls,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<TlsConfig, ConfigError> {
    let text = t.listen.unwrap_or_else(|| DEFAULT_TLS_LISTEN.to_string());
    let listen: std::net::SocketAddr = text.parse().map_err(|_| {
        err(
            "tls.listen",
            format!("{text:?} is not an address like \"127.0.0.1:8443\""),
        )
    })?;
    if !listen.ip().is_loopback() && !t.allow_non_loopback {
        return Err(err(
            "tls.listen",
            format!(
                "{listen} is not a loopback address; set tls.allow_non_loopback = true to \
                 serve beyond this host"
            ),
        ));
    }
    absolute(&t.cert).map_err(|r| err("tls.cert", r))?;
    absolute(&t.key).map_err(|r| err("tls.key", r))?;
    let hs = t.handshake_timeout_s.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_S);
    if !(1..=300).contains(&hs) {
        return Err(err(
            "tls.handshake_timeout_s",
            format!("{hs} is out of range 1..=300"),
        ));
    }
    Ok(TlsConfig {
        listen,
        cert: t.cert,
        key: t.key,
        handshake_timeout: Duration::from_secs(hs),
    })
}

pub(super) fn tokens_config(
    t: RawTokens,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<TokensConfig, ConfigError> {
    let nonempty = |v: Option<String>, key: &str| match v {
        None => Ok("hsmkeyd".to_string()),
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(err(key, "must not be empty".into())),
    };
    let max_ttl = t.max_ttl_s.unwrap_or(DEFAULT_MAX_TTL_S);
    if !(1..=86_400).contains(&max_ttl) {
        return Err(err(
            "tokens.max_ttl_s",
            format!("{max_ttl} is out of range 1..=86400"),
        ));
    }
    let leeway = t.leeway_s.unwrap_or(DEFAULT_LEEWAY_S);
    if leeway > 300 {
        return Err(err(
            "tokens.leeway_s",
            format!("{leeway} is over 300 seconds"),
        ));
    }
    Ok(TokensConfig {
        issuer: nonempty(t.issuer, "tokens.issuer")?,
        audience: nonempty(t.audience, "tokens.audience")?,
        max_ttl: Duration::from_secs(max_ttl),
        leeway: Duration::from_secs(leeway),
    })
}

pub(super) fn issuer_config(
    i: usize,
    r: RawIssuer,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<IssuerConfig, ConfigError> {
    let key = |k: &str| format!("issuers[{i}].{k}");
    if r.iss.trim().is_empty() {
        return Err(err(&key("iss"), "must not be empty".into()));
    }
    if r.aud.trim().is_empty() {
        return Err(err(&key("aud"), "must not be empty".into()));
    }
    if r.algorithms.is_empty() {
        return Err(err(
            &key("algorithms"),
            "name at least one algorithm".into(),
        ));
    }
    let hmac = r.algorithms.contains(&JwtAlgorithm::HS256);
    if hmac && r.algorithms.len() > 1 {
        return Err(err(
            &key("algorithms"),
            "HS256 cannot be mixed with public-key algorithms for one issuer".into(),
        ));
    }
    match (hmac, &r.key_file, &r.secret_file) {
        (true, None, Some(f)) => absolute(f).map_err(|e| err(&key("secret_file"), e))?,
        (false, Some(f), None) => absolute(f).map_err(|e| err(&key("key_file"), e))?,
        (true, _, _) => {
            return Err(err(
                &key("secret_file"),
                "HS256 needs secret_file and no key_file".into(),
            ))
        }
        (false, _, _) => {
            return Err(err(
                &key("key_file"),
                "public-key algorithms need key_file (a PEM public key) and no secret_file".into(),
            ))
        }
    }
    Ok(IssuerConfig {
        iss: r.iss,
        aud: r.aud,
        algorithms: r.algorithms,
        key_file: r.key_file,
        secret_file: r.secret_file,
    })
}
