//! The `[server]` section (connection limits, deadlines, body rate), and the one range
//! check every bounded number of the configuration goes through.

use std::fmt::Display;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Open client connections per listener; past it, new ones are refused (503 or close).
const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Time in-flight requests get to finish after SIGTERM.
const DEFAULT_DRAIN_TIMEOUT_S: u64 = 10;
/// Headers, and then the body, must each arrive within this many seconds.
const DEFAULT_REQUEST_TIMEOUT_S: u64 = 10;
/// Bytes per second a body must keep up after its first second: far below any real client,
/// far above a slow-loris one.
const DEFAULT_MIN_BODY_RATE: u64 = 1024;
/// TLS connections not yet authenticated, shared by every such client.
const DEFAULT_MAX_UNAUTHENTICATED: usize = 32;
/// Seconds a TLS connection may stay unauthenticated after its handshake.
const DEFAULT_UNAUTHENTICATED_TIMEOUT_S: u64 = 5;
/// Threads that serve the connections. One is enough for a token's pace: HSM calls run on
/// threads of their own, and each hand-off between two serving threads costs a wake-up.
const DEFAULT_IO_THREADS: usize = 1;
/// Connections of each listener served on a thread of their own (see `connection_threads`).
pub(super) const DEFAULT_CONNECTION_THREADS: usize = 16;

/// The `[server]` section: limits shared by the listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Open connections per listener (each listener has its own, so TLS clients can never
    /// take the Unix socket's).
    pub max_connections: usize,
    /// How long in-flight requests may run after a shutdown request.
    pub drain_timeout: Duration,
    /// Deadline for a request's headers, and then for its body.
    pub request_timeout: Duration,
    /// Least average body rate (bytes/s) after the first second; 0 turns the check off.
    pub min_body_rate: u64,
    /// Connections one caller may hold on one listener.
    pub max_connections_per_caller: usize,
    /// TLS connections not yet authenticated by a bearer token, all clients together.
    pub max_unauthenticated: usize,
    /// How long a TLS connection may stay unauthenticated after its handshake.
    pub unauthenticated_timeout: Duration,
    /// Threads of the async runtime: HTTP, TLS, JSON and the index (not HSM calls).
    pub io_threads: usize,
    /// Connections of each listener (Unix socket, TLS) that get a thread of their own, on
    /// which their token calls run without a hand-off (the fast lane); the connections past
    /// it are served by the `io_threads`, as all of them are with 0. Each such thread costs
    /// about 180 KiB.
    pub connection_threads: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    max_connections: Option<usize>,
    drain_timeout_s: Option<u64>,
    request_timeout_s: Option<u64>,
    min_body_rate: Option<u64>,
    max_connections_per_caller: Option<usize>,
    max_unauthenticated: Option<usize>,
    unauthenticated_timeout_s: Option<u64>,
    io_threads: Option<usize>,
    connection_threads: Option<usize>,
}

/// `value` if it lies in `lo..=hi`, else the error naming `key` and the range.
pub(super) fn in_range<T: PartialOrd + Display + Copy>(
    err: &dyn Fn(&str, String) -> ConfigError,
    key: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if value < lo || value > hi {
        return Err(err(key, format!("{value} is out of range {lo}..={hi}")));
    }
    Ok(value)
}

/// Validates `[server]`; the shares default to a part of `max_connections` and may not
/// exceed it.
pub(super) fn server_config(
    raw: RawServer,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ServerConfig, ConfigError> {
    let max = in_range(
        err,
        "server.max_connections",
        raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        1,
        65_536,
    )?;
    let seconds = |key: &str, v: Option<u64>, default: u64, lo: u64, hi: u64| {
        in_range(err, key, v.unwrap_or(default), lo, hi).map(Duration::from_secs)
    };
    Ok(ServerConfig {
        max_connections: max,
        drain_timeout: seconds(
            "server.drain_timeout_s",
            raw.drain_timeout_s,
            DEFAULT_DRAIN_TIMEOUT_S,
            0,
            3600,
        )?,
        request_timeout: seconds(
            "server.request_timeout_s",
            raw.request_timeout_s,
            DEFAULT_REQUEST_TIMEOUT_S,
            1,
            300,
        )?,
        min_body_rate: raw.min_body_rate.unwrap_or(DEFAULT_MIN_BODY_RATE),
        // Half the listener: a pool-happy app has room, and no one caller has it all.
        max_connections_per_caller: in_range(
            err,
            "server.max_connections_per_caller",
            raw.max_connections_per_caller.unwrap_or((max / 2).max(1)),
            1,
            max,
        )?,
        max_unauthenticated: in_range(
            err,
            "server.max_unauthenticated",
            raw.max_unauthenticated
                .unwrap_or(DEFAULT_MAX_UNAUTHENTICATED.min(max)),
            1,
            max,
        )?,
        unauthenticated_timeout: seconds(
            "server.unauthenticated_timeout_s",
            raw.unauthenticated_timeout_s,
            DEFAULT_UNAUTHENTICATED_TIMEOUT_S,
            1,
            300,
        )?,
        io_threads: in_range(
            err,
            "server.io_threads",
            raw.io_threads.unwrap_or(DEFAULT_IO_THREADS),
            1,
            64,
        )?,
        connection_threads: in_range(
            err,
            "server.connection_threads",
            raw.connection_threads
                .unwrap_or(DEFAULT_CONNECTION_THREADS.min(max)),
            0,
            max,
        )?,
    })
}
