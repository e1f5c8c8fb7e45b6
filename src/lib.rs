//! hsmkeyd: a key-management daemon that puts a PKCS#11 token behind a small HTTP API.
//!
//! Layers point one way (see ARCHITECTURE.md):
//! `front` (listeners) -> `auth` (who is calling) -> `api` (HTTP shapes, error mapping)
//! -> `keys` (domain: validation, update planning, locks, index) -> `hsm` (PKCS#11).
//! No PKCS#11 type is visible above `hsm`.
#![forbid(unsafe_code)]
#![deny(missing_docs, unused_results)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod blocking;
pub mod config;
pub mod daemon;
pub mod front;
pub mod hsm;
pub mod keys;
pub mod memory;
pub mod secret;
pub mod sync;
pub mod systemd;
pub mod values;
