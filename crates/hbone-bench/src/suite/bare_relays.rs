//! The bare relays' runs beside hbone's on bulk and request/response:
//! metered as hbone's processes are, with a syscall mix of their own.

use std::net::SocketAddr;

use super::{Bench, mix_brief};
use crate::cost::Cost;
use crate::load::Workload;
use crate::results::Metric;
use crate::wire::Fields;

impl Bench<'_> {
    /// One run of `workload` to `app` through each of the bare relays,
    /// metered like hbone's: their label, the load generator's figures and
    /// the cost. Empty when they are not running.
    pub(super) fn bare_relays_runs(
        &mut self,
        metric: Metric,
        workload: Workload,
        app: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<Vec<(&'static str, Fields, Cost)>> {
        let mut runs = Vec::new();
        for index in 0..self.bare_relays.len() {
            let relays = &self.bare_relays[index];
            let (pid, route, counted) = (relays.proc.pid(), relays.route(app)?, relays.counted);
            let side = format!("through the {}", counted.label());
            let (fields, cost) = self.metered_pids(&[pid], &side, workload, route, extra)?;
            self.costs.push(metric, counted, cost.clone());
            runs.push((counted.label(), fields, cost));
        }
        Ok(runs)
    }

    /// Each of the bare relays' syscall mixes, as [`Bench::mixes`] counts
    /// hbone's.
    pub(super) fn bare_relays_mixes(
        &mut self,
        metric: Metric,
        workload: Workload,
        app: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<()> {
        if !self.syscalls.has_mix() {
            return Ok(());
        }
        for index in 0..self.bare_relays.len() {
            let relays = &self.bare_relays[index];
            let (pid, route, counted) = (relays.proc.pid(), relays.route(app)?, relays.counted);
            let side = format!("through the {}, counting each syscall", counted.label());
            let cost = self.count_mix(&[pid], &side, workload, route, extra, &mut [])?;
            self.progress_mix(
                metric,
                &format!("{}: {}", counted.label(), mix_brief(&cost)),
            );
            self.costs.push_mix(metric, counted, cost);
        }
        Ok(())
    }
}
