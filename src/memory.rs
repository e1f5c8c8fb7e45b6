//! Whose memory the daemon holds: the bytes Rust code has allocated and not freed (ours),
//! next to the process's resident set (ours, the PKCS#11 module's, the allocator's own).
//! The binary installs a counting global allocator and hands its gauge to [`set_heap_gauge`];
//! the module calls `malloc` directly (jemalloc, like the rest of the process), which that
//! allocator never sees.

use std::sync::OnceLock;

static HEAP_GAUGE: OnceLock<fn() -> usize> = OnceLock::new();

/// Registers the counting allocator's reading (once, from `main`).
pub fn set_heap_gauge(gauge: fn() -> usize) {
    let _ = HEAP_GAUGE.set(gauge);
}

/// Bytes Rust code holds now; `None` when no counting allocator was installed (the
/// library used without the daemon's `main`).
pub fn heap_bytes() -> Option<usize> {
    HEAP_GAUGE.get().map(|gauge| gauge())
}

/// The process's resident set in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_is_read_and_the_heap_is_unknown_without_a_gauge() {
        assert!(rss_bytes().is_some_and(|b| b > 1024 * 1024));
        // Unit tests run without the daemon's allocator.
        assert_eq!(heap_bytes(), None);
    }
}
