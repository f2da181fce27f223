//! Revocation lists on the command line: the flags every component that
//! does mutual TLS takes, loading them (a list that does not load stops
//! the start), warning of expired ones, and reloading them when their
//! files change and on SIGHUP.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;
use hbone::revocation::Revocation;

use super::ops::Ops;
use super::watch::{Event, watch};

/// Certificate revocation lists peers' certificates are checked against.
#[derive(Args, Clone, Default)]
pub(super) struct RevocationArgs {
    /// Certificate revocation list (CRL, PEM or DER) the peers'
    /// certificates are checked against, repeatable; reloaded when it
    /// changes and on SIGHUP. Every certificate of a peer's chain is looked
    /// up in the CRL of its issuer; one whose issuer has no CRL here passes.
    #[arg(long = "crl", value_name = "FILE")]
    pub(super) crls: Vec<PathBuf>,
    /// Refuse handshakes that a CRL past its next update covers, until a
    /// fresh one is loaded. Without it such a CRL is still used, with a
    /// warning at load and hourly.
    #[arg(long, requires = "crls")]
    pub(super) crl_fail_closed: bool,
}

impl RevocationArgs {
    /// Loads the lists, logs them and warns of expired ones.
    pub(super) fn load(&self) -> anyhow::Result<Revocation> {
        let revocation = self.read()?;
        if !revocation.is_empty() {
            tracing::info!(
                crls = revocation.len(),
                fail_closed = revocation.fail_closed(),
                "revocation lists loaded"
            );
        }
        warn_if_stale(&revocation);
        Ok(revocation)
    }

    fn read(&self) -> anyhow::Result<Revocation> {
        Ok(Revocation::from_files(&self.crls)
            .context("revocation list")?
            .with_fail_closed(self.crl_fail_closed))
    }

    /// Reloads the lists when their files change and on SIGHUP, and hands
    /// them to `apply`; warns hourly of expired ones. A list that does not
    /// load is refused, and the lists in use stay.
    pub(super) fn watch(
        self,
        ops: &Ops,
        apply: impl Fn(Revocation) -> anyhow::Result<()> + Send + 'static,
    ) {
        if self.crls.is_empty() {
            return;
        }
        let mut current = self.read().ok();
        let metrics = ops.telemetry.metrics.clone();
        tokio::spawn(watch(self.crls.clone(), move |event| match event {
            Event::Hourly => {
                if let Some(revocation) = &current {
                    warn_if_stale(revocation);
                }
            }
            Event::Reload(why) => {
                let loaded = self.read().and_then(|revocation| {
                    apply(revocation.clone())?;
                    Ok(revocation)
                });
                if let Some(metrics) = &metrics {
                    metrics.reload("revocation", loaded.is_ok());
                }
                match loaded {
                    Ok(revocation) => {
                        tracing::info!(
                            crls = revocation.len(),
                            why,
                            "revocation lists reloaded; new handshakes use them"
                        );
                        warn_if_stale(&revocation);
                        current = Some(revocation);
                    }
                    Err(e) => tracing::error!(
                        why,
                        "revocation lists not reloaded, the ones in use stay: {e:#}"
                    ),
                }
            }
        }));
    }
}

/// A CRL past its next update: a warning when it is still used, an error
/// when it refuses handshakes.
fn warn_if_stale(revocation: &Revocation) {
    for (source, next_update) in revocation.stale(SystemTime::now()) {
        let ago = SystemTime::now()
            .duration_since(next_update)
            .unwrap_or_default()
            .as_secs()
            / 60;
        if revocation.fail_closed() {
            tracing::error!(
                crl = source,
                minutes_ago = ago,
                "revocation list is past its next update; handshakes it covers are refused until a fresh one is loaded"
            );
        } else {
            tracing::warn!(
                crl = source,
                minutes_ago = ago,
                "revocation list is past its next update; still used, replace it"
            );
        }
    }
}
