//! Sets `cfg(built_as_root)` when the build runs with euid 0, so the integration tests that
//! need root (switching a client to another uid, giving a directory to another owner) are
//! shown as ignored, not passed, when the suite runs unprivileged.

use std::fs;

/// The effective uid from /proc/self/status ("Uid: real effective saved fs"), without a
/// build dependency.
fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(built_as_root)");
    println!("cargo:rerun-if-changed=build.rs");
    // Whoever builds next may be someone else: these change with the user.
    for var in ["USER", "HOME", "SUDO_UID"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if euid() == Some(0) {
        println!("cargo:rustc-cfg=built_as_root");
    }
}
