//! The command line: every command, option and exit code, as clap parses them (also the
//! source of the completions and the man page).

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

use crate::patch::PatchFlags;

const EXIT_CODES: &str = "Exit codes: 0 done, 1 refused by the daemon (4xx), 2 usage, \
3 daemon or token unavailable (5xx or no connection), 4 precondition failed (412). \
audit verify: 0 verified, 10 broken chain, 11 gap in HSMKEYD_SEQ, 12 unsigned tail, \
13 bad checkpoint signature.";

/// Manage the keys of an hsmkeyd daemon.
#[derive(Parser)]
#[command(name = "hsmkeyctl", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// The daemon's Unix socket.
    #[arg(
        long,
        env = "HSMKEYD_SOCKET",
        default_value = "/run/hsmkeyd/api.sock",
        global = true
    )]
    pub(crate) socket: PathBuf,
    /// Use the HTTPS front door instead, e.g. https://localhost:8443 (needs a token).
    #[arg(long, global = true)]
    pub(crate) url: Option<String>,
    /// CA certificate(s), PEM, to verify the daemon's HTTPS certificate.
    #[arg(long, global = true)]
    pub(crate) cacert: Option<PathBuf>,
    /// File holding the bearer token for --url (else $HSMKEYD_TOKEN; never an argument).
    #[arg(long, global = true)]
    pub(crate) token_file: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// List keys (every page with --all).
    List {
        /// Only keys with exactly this label.
        #[arg(long)]
        label: Option<String>,
        /// Only keys whose label starts with this.
        #[arg(long)]
        label_prefix: Option<String>,
        /// Keys per page (1..=1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this cursor (next_cursor of an earlier page).
        #[arg(long, conflicts_with = "all")]
        cursor: Option<String>,
        /// Only keys whose end date (not_after) is before this day (YYYY-MM-DD).
        #[arg(long, value_name = "DATE", value_parser = crate::patch::date)]
        expires_before: Option<String>,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// Show one key.
    Get {
        /// The key id (hex).
        kid: String,
    },
    /// Change a key's label, description, roles, usage flags, dates or one-way flags.
    Update {
        /// The key id (hex).
        kid: String,
        /// New label (CKA_LABEL of every object of the key).
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        patch: PatchFlags,
        /// Update only if the key still has this ETag (from `get`).
        #[arg(long)]
        if_match: Option<String>,
        /// Check everything and show the key as it would be; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change many keys at once (all are checked before any is written; one refused key
    /// and none is changed): the keys named, those whose label starts with a prefix, or
    /// those carrying a role. Labels are changed one key at a time, with `update`.
    #[command(group(ArgGroup::new("select").required(true).args(["kids", "label_prefix", "role"])))]
    Batch {
        /// These keys (hex ids, comma-separated; at most 1,000).
        #[arg(long, value_delimiter = ',')]
        kids: Option<Vec<String>>,
        /// Every key whose label starts with this.
        #[arg(long)]
        label_prefix: Option<String>,
        /// Every key carrying this role.
        #[arg(long)]
        role: Option<String>,
        #[command(flatten)]
        patch: PatchFlags,
        /// KID=ETAG: change KID only if it still has this ETag (from `get`); repeatable.
        #[arg(long, value_name = "KID=ETAG")]
        if_match: Vec<String>,
        /// Check every key and show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Generate a key in the token (scope keymgmt:gen).
    Create {
        /// aes, generic-secret, ec, ed25519 or rsa.
        #[arg(long = "type")]
        key_type: String,
        /// Label (CKA_LABEL).
        #[arg(long)]
        label: String,
        /// Size in bits (aes 128/192/256, generic-secret 256..=512, rsa 2048/3072/4096).
        #[arg(long)]
        bits: Option<u32>,
        /// Curve of an ec key: P-256 (default), P-384 or P-521.
        #[arg(long)]
        curve: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Roles, comma-separated (you must hold one of them).
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// Usage flags to turn on, comma-separated (sign, verify, encrypt, decrypt, wrap,
        /// unwrap, derive); the type's defaults otherwise.
        #[arg(long, value_delimiter = ',')]
        usage: Option<Vec<String>>,
        /// Usage flags to turn off, comma-separated.
        #[arg(long, value_delimiter = ',')]
        no_usage: Option<Vec<String>>,
        /// The key id (hex, 1..=32 bytes); 16 random bytes otherwise.
        #[arg(long)]
        kid: Option<String>,
        /// Check everything and show the key as it would be; make nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Destroy every object of a key (scope keymgmt:del). Asks first on a terminal.
    Delete {
        /// The key id (hex).
        kid: String,
        /// Delete only if the key still has this ETag (from `get`).
        #[arg(long)]
        if_match: Option<String>,
        /// Do not ask.
        #[arg(short, long)]
        yes: bool,
        /// Check everything and show the key that would be destroyed; destroy nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A key's public half: PEM, or a JWK with --jwk.
    Public {
        /// The key id (hex).
        kid: String,
        /// Print the JWK instead of PEM.
        #[arg(long)]
        jwk: bool,
    },
    /// Mint a bearer token for the HTTPS front door (over the Unix socket only).
    Token {
        /// A scope to grant (repeat); you must hold it yourself.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime in seconds (default and maximum: the daemon's tokens.max_ttl_s).
        #[arg(long)]
        ttl: Option<u64>,
        /// Print only the token, for $(...).
        #[arg(short, long)]
        quiet: bool,
    },
    /// The daemon's state: token, keys, background work.
    Status,
    /// This host's audit trail (journalctl), oldest first; `audit verify` checks it.
    Audit {
        #[command(subcommand)]
        action: Option<AuditCmd>,
        /// Only entries about this key.
        #[arg(long)]
        kid: Option<String>,
        /// Only this event, e.g. KEY_ATTRIBUTES_CHANGED.
        #[arg(long)]
        event: Option<String>,
        /// Only the entries of one request (an answer's audit_id).
        #[arg(long)]
        request_id: Option<String>,
        /// Since this time, as journalctl --since takes it ("today", "1 hour ago", ...).
        #[arg(long)]
        since: Option<String>,
        /// At most this many of the newest entries.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
    },
    /// Shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The man page (roff), e.g. `hsmkeyctl man > hsmkeyctl.1`.
    Man,
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Recompute the audit hash chain and check every checkpoint signature. Exit 0
    /// verified, 10 broken chain, 11 gap in HSMKEYD_SEQ, 12 unsigned tail, 13 bad
    /// signature.
    Verify {
        /// Journal file(s) to read, as `journalctl --file` takes them.
        #[arg(long, conflicts_with_all = ["directory", "export"])]
        file: Option<PathBuf>,
        /// A journal directory, as `journalctl --directory` takes it.
        #[arg(long, conflicts_with = "export")]
        directory: Option<PathBuf>,
        /// A `journalctl -o export` dump.
        #[arg(long)]
        export: Option<PathBuf>,
        /// The audit-signing public key (PEM, from `GET /v1/audit/key`); else the running
        /// daemon is asked for it.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}
