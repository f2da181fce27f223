//! The bench's targets, judged on the medians of the topology they are
//! stated for: the server and the entry in processes of their own. A
//! target that could not be judged (a figure missing, or a `--quick` run)
//! says so instead of passing or failing quietly.

use super::report::{number, percent};
use super::results::{Metric, Results, Topology};

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

/// Every target, in the order the report lists them. `quick`: one short
/// run measures nothing a target speaks of, so none is judged.
pub fn judge(results: &Results, tunnels: u32, quick: bool) -> Vec<Verdict> {
    let mut verdicts = judge_medians(results, tunnels);
    if quick {
        for verdict in verdicts.iter_mut().filter(|v| v.met.is_some()) {
            verdict.met = None;
            verdict.detail = format!(
                "not judged: --quick is a smoke test, not a measurement ({})",
                verdict.detail
            );
        }
    }
    verdicts
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

    #[test]
    fn judges_medians() {
        let mut results = Results::default();
        results.direct(Metric::Bulk1, 30.0);
        results.tunnel(Metric::Bulk1, Topology::Split, 6.0);
        results.tunnel(Metric::Bulk1, Topology::Joined, 9.0);
        results.direct(Metric::ReqP50, 24.0);
        results.tunnel(Metric::ReqP50, Topology::Split, 104.0);
        let verdicts = judge(&results, 10_000, false);
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
        let verdicts = judge(&results, 200, true);
        assert!(verdicts.iter().all(|v| v.met.is_none()));
        assert!(
            verdicts[0].detail.contains("--quick"),
            "{}",
            verdicts[0].detail
        );
        assert!(verdicts[0].detail.contains("20.0 %"), "the figure stays");
    }
}
