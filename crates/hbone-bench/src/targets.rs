//! The bench's targets, judged on the medians of the topology they are
//! stated for: the server and the entry in processes of their own, and
//! for latency isolation and the cost per unit of work ([`per_unit`]) the
//! server and the entry in one process, as a node runs them. A target
//! that could not be judged (a figure missing, or a `--quick` run) says
//! so instead of passing or failing quietly.

use super::EntryKind;
use super::cost::Costs;
use super::report::{number, percent};
use super::results::{IsoFigure, Isolation, Metric, Results, Topology};

mod per_unit;

/// The tunnel count the memory target is stated for.
pub const IDLE_TARGET_TUNNELS: u32 = 10_000;

/// One target and whether the medians meet it.
pub struct Verdict {
    pub target: &'static str,
    pub met: Option<bool>,
    pub detail: String,
}

impl Verdict {
    pub fn mark(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "unknown",
        }
    }
}

/// What the targets are judged on.
pub struct Judged<'a> {
    pub results: &'a Results,
    pub isolation: &'a Isolation,
    pub costs: &'a Costs,
    /// The entry the load went through.
    pub entry: EntryKind,
    /// How the proxies ran otherwise than as deployed, if they did
    /// ([`crate::Options::proxies_not_as_deployed`]).
    pub not_as_deployed: Option<String>,
    /// Idle tunnels the memory figure was read with.
    pub tunnels: u32,
}

/// Every target, in the order the report lists them. `quick`: one short
/// run measures nothing a target speaks of, so none is judged.
pub fn judge(on: &Judged<'_>, quick: bool) -> Vec<Verdict> {
    let mut verdicts = judge_medians(on.results, on.tunnels);
    verdicts.extend(judge_isolation(on.isolation));
    verdicts.extend(per_unit::judge(on));
    if quick {
        not_judged(&mut verdicts, "--quick is a smoke test, not a measurement");
    }
    verdicts
}

/// Takes back the verdicts that were given, saying `why` before the figure.
fn not_judged(verdicts: &mut [Verdict], why: &str) {
    for verdict in verdicts.iter_mut().filter(|v| v.met.is_some()) {
        verdict.met = None;
        verdict.detail = format!("not judged: {why} ({})", verdict.detail);
    }
}

fn judge_medians(results: &Results, tunnels: u32) -> Vec<Verdict> {
    const SPLIT: Topology = Topology::Split;
    let share = |target, metric, least: f64| match results.ratio(metric, SPLIT) {
        Some(ratio) => Verdict {
            target,
            met: Some(ratio >= least),
            detail: format!("{} of direct", percent(ratio * 100.0)),
        },
        None => missing(target),
    };
    let bulk1 = results
        .tunnel_summary(Metric::Bulk1, SPLIT)
        .map(|s| s.median);
    let bulk8 = results
        .tunnel_summary(Metric::Bulk8, SPLIT)
        .map(|s| s.median);
    let aggregate = match (bulk1, bulk8) {
        (Some(one), Some(eight)) => Verdict {
            target: "bulk through hbone: 8 streams not slower in aggregate than 1",
            met: Some(eight >= one),
            detail: format!("{} vs {} Gbit/s", number(eight), number(one)),
        },
        _ => missing("bulk through hbone: 8 streams not slower in aggregate than 1"),
    };
    let p50 = match results.added(Metric::ReqP50, SPLIT) {
        Some(added) => Verdict {
            target: "1 KiB req/resp: p50 latency added ≤ 50 µs",
            met: Some(added <= 50.0),
            detail: format!("{added:+.0} µs"),
        },
        None => missing("1 KiB req/resp: p50 latency added ≤ 50 µs"),
    };
    let idle_target = "idle: ≤ 5 KB per tunnel at 10,000 tunnels";
    let idle = match results.tunnel_summary(Metric::KbPerTunnel, SPLIT) {
        // Per-tunnel memory at a few hundred tunnels is dominated by fixed
        // costs: a figure from another count says nothing about this target.
        Some(kb) if tunnels == IDLE_TARGET_TUNNELS => Verdict {
            target: idle_target,
            met: Some(kb.median <= 5.0),
            detail: format!("{} KB", number(kb.median)),
        },
        Some(kb) => Verdict {
            target: idle_target,
            met: None,
            detail: format!(
                "not judged: {} KB per tunnel at {tunnels} tunnels, not {IDLE_TARGET_TUNNELS}",
                number(kb.median)
            ),
        },
        None => missing(idle_target),
    };
    vec![
        share("bulk, 1 stream: ≥ 22 % of direct", Metric::Bulk1, 0.22),
        share("bulk, 8 streams: ≥ 22 % of direct", Metric::Bulk8, 0.22),
        aggregate,
        share(
            "1 KiB req/resp: ≥ 35 % of direct req/s",
            Metric::ReqRate,
            0.35,
        ),
        p50,
        share("connection rate: ≥ 45 % of direct", Metric::ConnRate, 0.45),
        idle,
    ]
}

/// The isolation targets, for the server and the entry in one process.
fn judge_isolation(isolation: &Isolation) -> Vec<Verdict> {
    const JOINED: Option<Topology> = Some(Topology::Joined);
    let median = |bulk, figure| isolation.summary(bulk, figure, JOINED).map(|s| s.median);
    let latency = |target, bulk, figure, most_us: f64| match median(bulk, figure) {
        Some(us) => Verdict {
            target,
            met: Some(us <= most_us),
            detail: match median(0, figure) {
                Some(alone) => format!("{} µs; alone {} µs", number(us), number(alone)),
                None => format!("{} µs", number(us)),
            },
        },
        None => missing(target),
    };
    let kept_target =
        "isolation, 1 process: bulk streams beside req/resp keep ≥ 85 % of their throughput alone";
    let kept: Vec<(u32, f64)> = isolation
        .beside()
        .into_iter()
        .filter_map(|n| Some((n, median(n, IsoFigure::BulkKept)?)))
        .collect();
    let kept = match kept.iter().map(|&(_, k)| k).reduce(f64::min) {
        Some(least) => Verdict {
            target: kept_target,
            met: Some(least >= 85.0),
            detail: kept
                .iter()
                .map(|&(n, k)| format!("{} beside {n}", percent(k)))
                .collect::<Vec<_>>()
                .join(", "),
        },
        None => missing(kept_target),
    };
    vec![
        latency(
            "isolation, 1 process: req/resp beside 4 bulk streams, p50 ≤ 1 ms",
            4,
            IsoFigure::P50,
            1000.0,
        ),
        latency(
            "isolation, 1 process: req/resp beside 4 bulk streams, p99 ≤ 5 ms",
            4,
            IsoFigure::P99,
            5000.0,
        ),
        latency(
            "isolation, 1 process: req/resp beside 16 bulk streams, p50 ≤ 2 ms",
            16,
            IsoFigure::P50,
            2000.0,
        ),
        kept,
    ]
}

fn missing(target: &'static str) -> Verdict {
    Verdict {
        target,
        met: None,
        detail: "not measured".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judged on `results` alone: no isolation or per-unit figures.
    fn judged(results: &Results, tunnels: u32) -> Judged<'_> {
        static NONE: std::sync::LazyLock<(Isolation, Costs)> =
            std::sync::LazyLock::new(Default::default);
        Judged {
            results,
            isolation: &NONE.0,
            costs: &NONE.1,
            entry: EntryKind::Forward,
            not_as_deployed: None,
            tunnels,
        }
    }

    #[test]
    fn judges_medians() {
        let mut results = Results::default();
        results.direct(Metric::Bulk1, 30.0);
        results.tunnel(Metric::Bulk1, Topology::Split, 6.0);
        results.tunnel(Metric::Bulk1, Topology::Joined, 9.0);
        results.direct(Metric::ReqP50, 24.0);
        results.tunnel(Metric::ReqP50, Topology::Split, 104.0);
        let verdicts = judge(&judged(&results, 10_000), false);
        assert_eq!(
            verdicts[0].met,
            Some(false),
            "20 % < 22 %, one process aside"
        );
        assert_eq!(verdicts[4].met, Some(false), "+80 µs > 50 µs");
        assert_eq!(verdicts[6].met, None);
    }

    #[test]
    fn quick_runs_judge_nothing() {
        let mut results = Results::default();
        results.direct(Metric::Bulk1, 30.0);
        results.tunnel(Metric::Bulk1, Topology::Split, 6.0);
        let verdicts = judge(&judged(&results, 200), true);
        assert!(verdicts.iter().all(|v| v.met.is_none()));
        assert!(
            verdicts[0].detail.contains("--quick"),
            "{}",
            verdicts[0].detail
        );
        assert!(verdicts[0].detail.contains("20.0 %"), "the figure stays");
    }

    #[test]
    fn judges_isolation_in_one_process() {
        let joined = Some(Topology::Joined);
        let mut isolation = Isolation::default();
        isolation.push(0, IsoFigure::P50, joined, 150.0);
        isolation.push(4, IsoFigure::P50, joined, 12_400.0);
        isolation.push(4, IsoFigure::P99, joined, 4_000.0);
        isolation.push(4, IsoFigure::BulkKept, joined, 97.0);
        isolation.push(16, IsoFigure::BulkKept, joined, 80.0);
        // Two processes meet what one does not: only one process counts.
        isolation.push(4, IsoFigure::P50, Some(Topology::Split), 500.0);
        let verdicts = judge_isolation(&isolation);
        assert_eq!(verdicts[0].met, Some(false), "{}", verdicts[0].detail);
        assert!(
            verdicts[0].detail.contains("alone 150"),
            "{}",
            verdicts[0].detail
        );
        assert_eq!(verdicts[1].met, Some(true));
        assert_eq!(verdicts[2].met, None, "16 streams: no p50 measured");
        assert_eq!(verdicts[3].met, Some(false), "the least share counts");
        assert!(verdicts[3].detail.contains("80.0 % beside 16"));
    }
}
