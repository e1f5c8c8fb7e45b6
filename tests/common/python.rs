//! Python as an independent test client: the system's `python3` when it already has the
//! modules a test needs, else a venv under `target/tmp` that the test installs them in
//! from PyPI (the test command's setup, as README says). Concurrent tests do not race:
//! each builds its venv in a directory of its own and renames it into place; the first
//! rename wins and the others use the winner's.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

/// A Python that can import every module of `modules`, each given as
/// `(import name, PyPI package)`, e.g. `("cryptography", "cryptography")`.
pub fn python_with(modules: &[(&str, &str)]) -> PathBuf {
    let imports: Vec<&str> = modules.iter().map(|(m, _)| *m).collect();
    let check = format!("import {}", imports.join(", "));
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", &check])
            .status()
            .is_ok_and(|s| s.success())
    };
    let system = PathBuf::from("python3");
    if ok(&system) {
        return system;
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut packages: Vec<&str> = modules.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    let venv = root.join(format!("venv-{}", packages.join("+")));
    let py = venv.join("bin/python3");
    if ok(&py) {
        return py;
    }
    let building = root.join(format!(
        "venv-building-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    // `--copies`: the venv's interpreter stays valid after the rename below.
    run_ok(
        Command::new("python3")
            .args(["-m", "venv", "--copies"])
            .arg(&building),
        "python3 -m venv",
    );
    run_ok(
        Command::new(building.join("bin/python3"))
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(&packages),
        &format!("pip install {}", packages.join(" ")),
    );
    if std::fs::rename(&building, &venv).is_err() {
        // Another test got there first.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        ok(&py),
        "{} cannot import {}",
        py.display(),
        imports.join(", ")
    );
    py
}
