//! The bare relays' runs beside hbone's on bulk and request/response:
//! metered as hbone's processes are, with a syscall mix of their own.

use std::net::SocketAddr;

use super::{Bench, mix_brief};
use crate::cost::{BARE_RELAYS_LABEL, Cost, Counted};
use crate::load::Workload;
use crate::results::Metric;
use crate::wire::Fields;

impl Bench<'_> {
    /// One run of `workload` to `app` through the bare relays, metered
    /// like hbone's; `None` when they are not running.
    pub(super) fn bare_relays_run(
        &mut self,
        metric: Metric,
        workload: Workload,
        app: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<Option<(Fields, Cost)>> {
        let Some(relays) = &self.bare_relays else {
            return Ok(None);
        };
        let (pid, route) = (relays.proc.pid(), relays.route(app)?);
        let side = "through the bare relays";
        let (fields, cost) = self.metered_pids(&[pid], side, workload, route, extra)?;
        self.costs.push(metric, Counted::BareRelays, cost.clone());
        Ok(Some((fields, cost)))
    }

    /// The bare relays' syscall mix, as [`Bench::mixes`] counts hbone's.
    pub(super) fn bare_relays_mix(
        &mut self,
        metric: Metric,
        workload: Workload,
        app: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let Some(relays) = &self.bare_relays else {
            return Ok(());
        };
        if !self.syscalls.has_mix() {
            return Ok(());
        }
        let (pid, route) = (relays.proc.pid(), relays.route(app)?);
        let side = "through the bare relays, counting each syscall";
        let cost = self.count_mix(&[pid], side, workload, route, extra, &mut [])?;
        self.progress_mix(
            metric,
            &format!("{BARE_RELAYS_LABEL}: {}", mix_brief(&cost)),
        );
        self.costs.push_mix(metric, Counted::BareRelays, cost);
        Ok(())
    }
}
