//! Development TLS material for hsmkeyd: a throw-away CA and a `localhost` server
//! certificate signed by it (P-256), written to a directory:
//!
//! - `ca.pem`: the CA certificate, for clients (`curl --cacert`);
//! - `cert.pem`: the server certificate followed by the CA (the chain `tls.cert` wants);
//! - `key.pem`: the server's private key, mode 0600 (`tls.key`).
//!
//! The CA's private key is never written: to re-issue, delete the directory and run again.
//! Existing files are left alone unless `--force` is given. Not for production.
#![forbid(unsafe_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// Create a development CA and a localhost server certificate for hsmkeyd.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Directory to write ca.pem, cert.pem and key.pem into (created mode 0700).
    #[arg(long)]
    out: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn run(cli: &Cli) -> Result<(), String> {
    let (ca_path, cert_path, key_path) = (
        cli.out.join("ca.pem"),
        cli.out.join("cert.pem"),
        cli.out.join("key.pem"),
    );
    if !cli.force && ca_path.exists() && cert_path.exists() && key_path.exists() {
        println!(
            "{} already holds ca.pem, cert.pem and key.pem",
            cli.out.display()
        );
        return Ok(());
    }
    fs::create_dir_all(&cli.out)
        .map_err(|e| format!("cannot create {}: {e}", cli.out.display()))?;
    fs::set_permissions(
        &cli.out,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| format!("cannot restrict {}: {e}", cli.out.display()))?;

    let err = |e: rcgen::Error| format!("certificate generation failed: {e}");
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "hsmkeyd development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;

    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(
        &cert_path,
        &format!("{}{}", cert.pem(), ca_cert.pem()),
        0o644,
    )?;
    write(&ca_path, &ca_cert.pem(), 0o644)?;
    println!(
        "wrote {}, {} and {}",
        ca_path.display(),
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmkeyd-devcert: {e}");
            ExitCode::FAILURE
        }
    }
}
