//! Python as an independent test client: the system's `python3` when it already has the
//! modules a test needs, else a venv under `target/tmp` that the test installs them in
//! from PyPI (the test command's setup, as README says). Concurrent tests do not race:
//! each builds its venv in a directory of its own and renames it into place; the first
//! rename wins and the others use the winner's.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run_ok, Token};

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

/// `(CKA_CLASS, start date, end date)` of the public key object with this id, read by
/// PyKCS11 (`-` for an empty date). Only the public one: SoftHSM 2.6 stores the dates of
/// private objects unencrypted and then fails to read them in another process
/// (CKR_GENERAL_ERROR; SoftHSMv2 issue 655), so no independent reader can see them.
pub fn public_dates(t: &Token, id: &str) -> Vec<(u64, String, String)> {
    let py = python_with(&[("PyKCS11", "PyKCS11")]);
    let script = r#"
import sys, PyKCS11
module, label, pin, kid = sys.argv[1:5]
lib = PyKCS11.PyKCS11Lib(); lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == label][0]
s = lib.openSession(slot); s.login(pin)
def text(v):
    b = bytes(v) if not isinstance(v, str) else v.encode()
    b = b.strip(b"\0 ")
    return b.decode() if b else "-"
for o in s.findObjects([(PyKCS11.CKA_ID, bytes.fromhex(kid))]):
    if s.getAttributeValue(o, [PyKCS11.CKA_CLASS])[0] != 2:
        continue
    c, a, b = s.getAttributeValue(o, [PyKCS11.CKA_CLASS, PyKCS11.CKA_START_DATE,
                                       PyKCS11.CKA_END_DATE])
    if c == 2:
        print(c, text(a), text(b))
"#;
    let out = run_ok(
        std::process::Command::new(py)
            .env("SOFTHSM2_CONF", &t.conf)
            .args(["-c", script, super::SOFTHSM, super::TOKEN_LABEL])
            .arg(super::USER_PIN)
            .arg(id),
        "PyKCS11 date read-back",
    );
    let mut v: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            (w[0].parse().unwrap(), w[1].to_string(), w[2].to_string())
        })
        .collect();
    v.sort();
    v
}
