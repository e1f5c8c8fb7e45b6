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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HSMKEYD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

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
