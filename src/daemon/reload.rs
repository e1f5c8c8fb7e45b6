//! Reload on SIGHUP (`systemctl reload`): read the configuration again, validate all of it,
//! then swap it in as one. Requests already running finish on the configuration they
//! started with (they hold a snapshot). A configuration that does not load, or that changes
//! something only a restart can change (module, token, sockets, audit sink, limits), is
//! refused with a logged reason and the old one keeps serving.
//!
//! What a reload changes: principals, roles, bearer-token issuers and lifetimes, the TLS
//! certificate and key (re-read even when the paths are unchanged, for rotation), and the
//! PIN (logging in again with it; if the token refuses it the old login stays and the
//! reload is refused).

use std::sync::{Arc, RwLock};

use crate::api::Live;
use crate::audit::{Auditor, Entry, Event, Outcome};
use crate::auth::jwt::Signer;
use crate::auth::Principals;
use crate::config::Config;
use crate::front::tls::SharedConfig;
use crate::keys::KeyStore;
use crate::{front, sync, systemd};

/// Everything a reload reads or replaces.
pub(super) struct Reloader {
    pub(super) running: Config,
    pub(super) live: Arc<RwLock<Arc<Live>>>,
    pub(super) tls: Option<SharedConfig>,
    pub(super) keys: Arc<KeyStore>,
    pub(super) signer: Arc<dyn Signer>,
    pub(super) audit: Arc<Auditor>,
    /// The STATUS line sent with READY=1 after a reload.
    pub(super) status: String,
    /// What `GET /v1/status` shows of the last reload.
    pub(super) last_reload: Arc<std::sync::Mutex<Option<crate::api::LastReload>>>,
}

impl Reloader {
    /// Handles one SIGHUP.
    pub(super) async fn reload(&mut self) {
        systemd::reloading();
        tracing::info!(config = %self.running.source.display(), "SIGHUP: reloading");
        let (outcome, message) = match self.try_reload().await {
            Ok(summary) => {
                tracing::info!("{summary}");
                (Outcome::Ok, summary)
            }
            Err(reason) => {
                tracing::error!("reload refused, the old configuration keeps serving: {reason}");
                (
                    Outcome::Failed,
                    format!("reload refused, the old configuration keeps serving: {reason}"),
                )
            }
        };
        *sync::lock(&self.last_reload) = Some(crate::api::LastReload {
            at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            applied: outcome == Outcome::Ok,
        });
        if let Err(e) = self
            .audit
            .write_async(Entry::new(Event::ConfigReloaded, outcome, message))
            .await
        {
            tracing::error!(error = %e, "could not record the reload in the audit trail");
        }
        systemd::ready(&self.status);
    }

    async fn try_reload(&mut self) -> Result<String, String> {
        let new = Config::load(&self.running.source).map_err(|e| e.to_string())?;
        needs_restart(&self.running, &new)?;
        let pin = super::read_pin(&new)?;
        let tokens = super::token_service(&new, self.signer.clone()).map_err(|e| e.0)?;
        let tls = match (&new.tls, &self.tls) {
            (Some(t), Some(_)) => Some(front::tls::server_config(t)?),
            _ => None,
        };
        let principals = Principals::new(&new.principals);
        // The one step that touches the token comes last: everything else is validated.
        let hsm = self.keys.hsm().clone();
        let relogged = tokio::task::spawn_blocking(move || hsm.change_pin(pin))
            .await
            .map_err(|e| format!("the PIN check failed: {e}"))?
            .map_err(|e| format!("the token refused the new PIN ({e}); the old login stays"))?;

        *sync::write(&self.live) = Arc::new(Live::new(
            principals,
            tokens,
            new.roles.iter().cloned().collect(),
            new.allow_delete,
        ));
        if let (Some(shared), Some(config)) = (&self.tls, tls) {
            *sync::write(shared) = config;
        }
        self.keys.set_roles(new.roles.clone());
        self.keys.set_unique_labels(new.unique_labels);
        let summary = format!(
            "reloaded {}: {} principals, {} roles, {} external issuers{}{}",
            new.source.display(),
            new.principals.len(),
            new.roles.len(),
            new.issuers.len(),
            if self.tls.is_some() {
                ", TLS certificate re-read"
            } else {
                ""
            },
            if relogged {
                ", logged in with the new PIN"
            } else {
                ""
            },
        );
        self.running = new;
        Ok(summary)
    }
}

/// Refuses changes that only a restart can apply.
fn needs_restart(old: &Config, new: &Config) -> Result<(), String> {
    let mut changed = Vec::new();
    let p = (&old.pkcs11, &new.pkcs11);
    if p.0.module != p.1.module {
        changed.push("pkcs11.module");
    }
    if p.0.token != p.1.token {
        changed.push("pkcs11.token_label/token_serial");
    }
    if p.0.module_env != p.1.module_env {
        changed.push("pkcs11.module_env");
    }
    if p.0.max_sessions != p.1.max_sessions {
        changed.push("pkcs11.max_sessions");
    }
    if old.unix != new.unix {
        changed.push("[unix]");
    }
    if old.server != new.server {
        changed.push("[server]");
    }
    if old.audit != new.audit {
        changed.push("audit.sink");
    }
    if old.encedo != new.encedo {
        changed.push("[encedo]");
    }
    if old.max_cleanup_backlog != new.max_cleanup_backlog {
        changed.push("keys.max_cleanup_backlog");
    }
    match (&old.tls, &new.tls) {
        (None, None) => {}
        (Some(a), Some(b))
            if a.listen == b.listen && a.handshake_timeout == b.handshake_timeout => {}
        _ => changed.push("[tls] (listen address, handshake timeout, or the section itself)"),
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} changed, which needs a restart (systemctl restart hsmkeyd)",
            changed.join(", ")
        ))
    }
}
