//! The `hsmkeyd` binary: command line, logging, exit codes.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use hsmkeyd::config::Config;
use hsmkeyd::daemon;

/// Exit status for an unusable configuration (sysexits EX_CONFIG), so systemd units can
/// refuse to restart on it.
const EXIT_CONFIG: u8 = 78;

// jemalloc, linked with unprefixed names, is the whole process's malloc: Rust's System
// allocator below and the PKCS#11 module's own C and C++ allocations (SoftHSM keeps every
// token object in memory: about 100 MiB at 10,000 keys) all go to it. Against glibc's
// malloc, measured by the update bench at 10,000 keys: 7 MiB less RSS once serving and
// no growth of 0.2 MiB for each thread that worked (glibc's per-thread cache kept that
// much, and under 16 clients the blocking pool holds about 20 threads); see README,
// Performance.
use tikv_jemalloc_sys as _;

/// Counts the bytes Rust code holds (`GET /v1/status` `memory.heap_bytes`), so a growing
/// resident set can be told apart as ours or the PKCS#11 module's.
#[global_allocator]
static HEAP: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Key-management daemon for PKCS#11 tokens.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Validate the configuration (and the PIN file's permissions) and exit.
    #[arg(long)]
    check_config: bool,
}

/// Whether stderr is the journal: `JOURNAL_STREAM` (set by systemd) names the device and
/// inode of stderr's stream socket.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The operational log (not the audit trail): structured journald entries (target, span
/// fields as `F_<NAME>`, PRIORITY) when stderr is the journal, text on stderr otherwise.
/// Levels map to syslog priorities as syslog means them (info is 6, "informational";
/// tracing-journald's default would make every info line a 5, "notice").
/// tracing-journald drops entries journald does not take, which is why the audit trail has
/// its own sink.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HSMKEYD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(
                    journald
                        .with_syslog_identifier("hsmkeyd-log".into())
                        .with_priority_mappings(tracing_journald::PriorityMappings {
                            info: tracing_journald::Priority::Informational,
                            debug: tracing_journald::Priority::Debug,
                            ..tracing_journald::PriorityMappings::new()
                        }),
                )
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    hsmkeyd::memory::set_heap_gauge(|| HEAP.allocated());
    let cli = Cli::parse();
    init_logging();

    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hsmkeyd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // A PIN file that is missing, empty or readable by others is a configuration error in
    // both modes, so a unit's RestartPreventExitStatus=78 does not loop on it.
    let pin = match daemon::read_pin(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hsmkeyd: config {}: {e}", cli.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!("config {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    daemon::set_module_env(&config);
    match daemon::run(config, pin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmkeyd: {e}");
            ExitCode::FAILURE
        }
    }
}
