//! Revocation lists on the command line: the flags every component that
//! does mutual TLS takes, loading them (a list that does not load stops
//! the start), warning of expired ones, and reloading them when their
//! files change and on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;
use hbone::metrics::Metrics;
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
        let files = self.crls.clone();
        let mut watching = Watching {
            current: self.read().ok(),
            metrics: ops.telemetry.metrics.clone(),
            args: self,
            apply,
        };
        tokio::spawn(watch(files, move |event| watching.on(event)));
    }
}

/// The lists being watched: what the watcher's events do to them.
struct Watching<A> {
    args: RevocationArgs,
    /// The lists in use, for the hourly check of their next update.
    current: Option<Revocation>,
    metrics: Option<Arc<Metrics>>,
    apply: A,
}

impl<A: Fn(Revocation) -> anyhow::Result<()>> Watching<A> {
    fn on(&mut self, event: Event) {
        match event {
            Event::Hourly => {
                if let Some(revocation) = &self.current {
                    warn_if_stale(revocation);
                }
            }
            Event::Reload(why) => {
                let loaded = self.args.read().and_then(|revocation| {
                    (self.apply)(revocation.clone())?;
                    Ok(revocation)
                });
                if let Some(metrics) = &self.metrics {
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
                        self.current = Some(revocation);
                    }
                    Err(e) => tracing::error!(
                        why,
                        "revocation lists not reloaded, the ones in use stay: {e:#}"
                    ),
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use hbone::ca::DevCa;

    use super::super::logwriter::Collected;
    use super::*;

    /// What was logged while `run` ran, as text.
    fn logged(run: impl FnOnce()) -> String {
        let sink = Collected::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    /// A list loaded while fresh that has since passed its next update is
    /// reported by the hourly check, as a warning while it is still used and
    /// as an error under `--crl-fail-closed`; a fresh one is not.
    #[test]
    fn the_hourly_check_reports_a_list_past_its_next_update() {
        let day = std::time::Duration::from_secs(86_400);
        let ca = DevCa::generate("cluster.local", day).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let expired = ca
            .crl_at(&[], 1, now - time::Duration::days(2), day)
            .unwrap();
        let fresh = ca.crl_at(&[], 2, now, day).unwrap();
        let hourly = |crl: &str, fail_closed: bool| {
            let revocation = Revocation::from_bytes(crl.as_bytes(), "ca.crl")
                .unwrap()
                .with_fail_closed(fail_closed);
            let mut watching = Watching {
                args: RevocationArgs::default(),
                current: Some(revocation),
                metrics: None,
                apply: |_| Ok(()),
            };
            logged(|| watching.on(Event::Hourly))
        };

        let lenient = hourly(&expired, false);
        assert!(
            lenient.contains("WARN") && lenient.contains("past its next update; still used"),
            "{lenient}"
        );
        assert!(lenient.contains("crl=\"ca.crl\""), "{lenient}");
        let strict = hourly(&expired, true);
        assert!(
            strict.contains("ERROR") && strict.contains("handshakes it covers are refused"),
            "{strict}"
        );
        assert_eq!(hourly(&fresh, false), "");
    }
}
