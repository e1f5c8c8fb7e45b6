//! Secrets read from files: the permission check and the zeroizing holder.
//!
//! A PIN is read once, checked for a mode that keeps it private, and held in a
//! [`SecretString`] that is zeroized on drop. It never reaches logs, error bodies or the
//! environment.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use secrecy::{ExposeSecret, SecretString};

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read or inspected.
    #[error("cannot read PIN file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may access the file.
    #[error(
        "PIN file {path} has mode {mode:04o}; it must not be accessible by group or others \
         (run: chmod 600 {path})"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is empty once the trailing newline is removed.
    #[error("PIN file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The one rule for files holding secrets: group and others get no access. `Err` carries
/// the permission bits found.
fn private_mode(meta: &fs::Metadata) -> Result<(), u32> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        Ok(())
    } else {
        Err(mode)
    }
}

/// Reads a PIN from `path`, refusing files that group or others could read or write.
/// One trailing newline (LF or CRLF) is removed; the bytes are otherwise kept as they are.
pub fn read_pin_file(path: &Path) -> Result<SecretString, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    private_mode(&meta).map_err(|mode| SecretFileError::TooOpen {
        path: path.to_path_buf(),
        mode,
    })?;
    let mut text = zeroize::Zeroizing::new(fs::read_to_string(path).map_err(io)?);
    if text.ends_with('\n') {
        let _ = text.pop();
        if text.ends_with('\r') {
            let _ = text.pop();
        }
    }
    if text.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(SecretString::from(text.as_str()))
}

/// Reads a file that holds a secret other than the PIN (a TLS private key, an HS256
/// secret), with the same rule: group and others get no access. `what` names it in errors.
pub fn read_private_file(path: &Path, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let meta =
        fs::metadata(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    private_mode(&meta).map_err(|mode| {
        format!(
            "{what} {} has mode {mode:04o}; it must not be accessible by group or others \
             (run: chmod 600 {})",
            path.display(),
            path.display()
        )
    })?;
    fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}
