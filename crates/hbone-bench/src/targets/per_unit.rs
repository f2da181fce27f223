//! The targets on what a unit of work costs: stated for the server and
//! the entry in one process (`hbone run`, as a node runs them) under the
//! default work-stealing runtime, on this project's 2-core reference
//! machine. Counts (syscalls) are judged as they are; CPU time moves with
//! the machine, so a CPU verdict speaks for the machine of the run.
//! Those on new tunnels are stated for the SOCKS5 entry, which adds its
//! negotiation to every tunnel: judged on the main new-connection runs
//! under `--entry socks5`, and otherwise on the runs through the SOCKS5
//! entry beside the forwards. They speak of the proxies as deployed:
//! a run that changes their runtime, threads, admin endpoint or access
//! log gives the figures and judges none.

use crate::EntryKind;
use crate::cost::Cost;
use crate::report::number;
use crate::results::{Metric, Topology};

use super::{Judged, Verdict, missing, not_judged};

const ONE_PROCESS: Topology = Topology::Joined;

/// Every per-unit target, in the order the report lists them.
pub(super) fn judge(on: &Judged<'_>) -> Vec<Verdict> {
    let mut verdicts = judge_figures(on);
    if let Some(flags) = &on.not_as_deployed {
        let why = format!("stated for the proxies as deployed, not with {flags}");
        not_judged(&mut verdicts, &why);
    }
    verdicts
}

fn judge_figures(on: &Judged<'_>) -> Vec<Verdict> {
    let (results, costs, entry) = (on.results, on.costs, on.entry);
    let cpu = |c: &Cost| Some(c.cpu_us);
    let syscalls = |c: &Cost| c.syscalls;
    let at_most = |target, metric, figure, most: f64, unit: &str| match costs.median(
        metric,
        ONE_PROCESS,
        figure,
    ) {
        Some(value) => Verdict {
            target,
            met: Some(value <= most),
            detail: format!("{} {unit}", number(value)),
        },
        None => missing(target),
    };
    // The runs through a SOCKS5 entry: the main ones, or those beside
    // the forwards.
    let socks5_tunnels = match entry {
        EntryKind::Socks5 => Metric::ConnRate,
        EntryKind::Forward => Metric::Socks5ConnRate,
    };
    let bulk_target = "bulk through hbone, 1 process: 8 streams not slower in aggregate than 1";
    let one = results.tunnel_summary(Metric::Bulk1, ONE_PROCESS);
    let eight = results.tunnel_summary(Metric::Bulk8, ONE_PROCESS);
    let aggregate = match (one, eight) {
        (Some(one), Some(eight)) => Verdict {
            target: bulk_target,
            met: Some(eight.median >= one.median),
            detail: format!("{} vs {} Gbit/s", number(eight.median), number(one.median)),
        },
        _ => missing(bulk_target),
    };
    vec![
        at_most(
            "per unit, 1 process: 1 KiB req/resp ≤ 9 syscalls per request",
            Metric::ReqRate,
            syscalls,
            9.0,
            "syscalls",
        ),
        at_most(
            "per unit, 1 process: 1 KiB req/resp ≤ 65 µs CPU per request",
            Metric::ReqRate,
            cpu,
            65.0,
            "µs",
        ),
        at_most(
            "per unit, 1 process: new tunnel through the SOCKS5 entry ≤ 30 syscalls",
            socks5_tunnels,
            syscalls,
            30.0,
            "syscalls",
        ),
        at_most(
            "per unit, 1 process: new tunnel through the SOCKS5 entry ≤ 180 µs CPU",
            socks5_tunnels,
            cpu,
            180.0,
            "µs",
        ),
        at_most(
            "per unit, 1 process: bulk, 1 stream ≤ 1.1 s CPU per GB",
            Metric::Bulk1,
            // µs per MB are ms per GB.
            |c: &Cost| Some(c.cpu_us / 1000.0),
            1.1,
            "s/GB",
        ),
        at_most(
            "per unit, 1 process: bulk, 1 stream ≤ 60 syscalls per MB",
            Metric::Bulk1,
            syscalls,
            60.0,
            "syscalls",
        ),
        aggregate,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Costs;
    use crate::results::{Isolation, Results};

    fn judge_as_deployed(results: &Results, costs: &Costs, entry: EntryKind) -> Vec<Verdict> {
        judge(&Judged {
            results,
            isolation: &Isolation::default(),
            costs,
            entry,
            not_as_deployed: None,
            tunnels: 10_000,
        })
    }

    fn cost(cpu_us: f64, syscalls: Option<f64>) -> Cost {
        Cost {
            cpu_us,
            syscalls,
            ..Cost::default()
        }
    }

    #[test]
    fn judges_the_one_process_medians() {
        let mut costs = Costs::default();
        for cpu in [64.0, 70.0, 66.0] {
            costs.push(Metric::ReqRate, ONE_PROCESS, cost(cpu, Some(12.2)));
        }
        // Two processes meet what one does not: only one process counts.
        costs.push(Metric::ReqRate, Topology::Split, cost(40.0, Some(8.0)));
        costs.push(Metric::Bulk1, ONE_PROCESS, cost(1_050.0, Some(33.0)));
        let verdicts = judge_as_deployed(&Results::default(), &costs, EntryKind::Socks5);
        assert_eq!(verdicts[0].met, Some(false), "{}", verdicts[0].detail);
        assert_eq!(verdicts[0].detail, "12.2 syscalls");
        assert_eq!(verdicts[1].met, Some(false), "median 66 > 65");
        assert_eq!(verdicts[1].detail, "66.0 µs");
        assert_eq!(verdicts[2].met, None, "no new tunnels measured");
        assert_eq!(verdicts[4].met, Some(true), "{}", verdicts[4].detail);
        assert_eq!(verdicts[4].detail, "1.05 s/GB");
        assert_eq!(verdicts[5].met, Some(true));
        assert_eq!(verdicts[6].met, None, "no aggregate measured");
    }

    #[test]
    fn new_tunnels_are_judged_through_a_socks5_entry_only() {
        let mut costs = Costs::default();
        // Through the forward: never judged against the SOCKS5 targets.
        costs.push(Metric::ConnRate, ONE_PROCESS, cost(150.0, Some(24.0)));
        costs.push(Metric::Socks5ConnRate, ONE_PROCESS, cost(190.0, Some(31.0)));
        let forward = judge_as_deployed(&Results::default(), &costs, EntryKind::Forward);
        assert_eq!(forward[2].met, Some(false), "{}", forward[2].detail);
        assert_eq!(forward[2].detail, "31.0 syscalls");
        assert_eq!(forward[3].met, Some(false), "{}", forward[3].detail);
        // Under `--entry socks5` the main runs are through SOCKS5.
        let socks5 = judge_as_deployed(&Results::default(), &costs, EntryKind::Socks5);
        assert_eq!(socks5[2].met, Some(true), "{}", socks5[2].detail);
        assert_eq!(socks5[3].met, Some(true), "{}", socks5[3].detail);
    }

    #[test]
    fn syscalls_perf_did_not_count_are_not_judged() {
        let mut costs = Costs::default();
        costs.push(Metric::ReqRate, ONE_PROCESS, cost(60.0, Some(12.0)));
        costs.push(Metric::ReqRate, ONE_PROCESS, cost(60.0, None));
        let verdicts = judge_as_deployed(&Results::default(), &costs, EntryKind::Forward);
        assert_eq!(verdicts[0].met, None, "{}", verdicts[0].detail);
        assert_eq!(verdicts[1].met, Some(true));
    }

    #[test]
    fn judges_the_aggregate_in_one_process() {
        let mut results = Results::default();
        results.tunnel(Metric::Bulk1, ONE_PROCESS, 9.6);
        results.tunnel(Metric::Bulk8, ONE_PROCESS, 10.5);
        results.tunnel(Metric::Bulk8, Topology::Split, 7.9);
        let verdicts = judge_as_deployed(&results, &Costs::default(), EntryKind::Forward);
        assert_eq!(verdicts[6].met, Some(true), "{}", verdicts[6].detail);
        assert_eq!(verdicts[6].detail, "10.5 vs 9.60 Gbit/s");
    }

    #[test]
    fn proxies_run_otherwise_than_deployed_are_not_judged() {
        let mut costs = Costs::default();
        costs.push(Metric::ReqRate, ONE_PROCESS, cost(60.0, Some(12.0)));
        let verdicts = judge(&Judged {
            results: &Results::default(),
            isolation: &Isolation::default(),
            costs: &costs,
            entry: EntryKind::Socks5,
            not_as_deployed: Some("--no-admin".to_owned()),
            tunnels: 10_000,
        });
        assert!(verdicts.iter().all(|v| v.met.is_none()));
        assert!(
            verdicts[1].detail.contains("--no-admin") && verdicts[1].detail.contains("60.0 µs"),
            "{}",
            verdicts[1].detail
        );
    }
}
