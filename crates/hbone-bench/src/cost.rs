//! What a unit of work costs the processes under test (the server, the
//! gateway and the entries; never the apps or the load generator): CPU
//! time, context switches, migrations between CPUs and syscalls, per MB
//! moved, per request answered, per tunnel opened.
//!
//! Counts like syscalls per request hardly move when the machine is busy,
//! unlike rates, so they are the figures to compare across machines and
//! changes. A [`Meter`] reads the counters just before a load generator
//! starts and just after it exits, so the window holds one run and its
//! start-up; the units are everything the load generator did in it,
//! warm-up included.

use std::collections::BTreeMap;
use std::path::Path;

use super::perf::{Counter, SyscallCounts, Syscalls};
use super::report::{cell, number};
use super::results::{Metric, Topology};
use super::sample::{Snapshot, Spent};
use super::stats::Summary;

/// What stands in the syscall cells when perf could not count.
pub const NO_PERF: &str = "perf not available";
/// Syscalls the mix names before "other".
const MIX_SHOWN: usize = 8;

/// Counters running over one load generator run.
pub struct Meter {
    pids: Vec<u32>,
    before: Snapshot,
    perf: Option<Counter>,
}

impl Meter {
    /// Attaches perf (if `syscalls` says it counts; with a counter per
    /// syscall of the mix if `mix`) and reads /proc. A perf that fails now
    /// is reported unavailable from here on.
    pub fn start(
        pids: &[u32],
        syscalls: &mut Syscalls,
        mix: bool,
        dir: &Path,
    ) -> anyhow::Result<Meter> {
        let perf = match syscalls {
            Syscalls::Counted { .. } => match Counter::start(pids, &syscalls.events(mix), dir) {
                Ok(counter) => Some(counter),
                Err(e) => {
                    *syscalls = Syscalls::Unavailable(format!("{e:#}"));
                    None
                }
            },
            Syscalls::Unavailable(_) => None,
        };
        Ok(Meter {
            pids: pids.to_vec(),
            before: Snapshot::take(pids)?,
            perf,
        })
    }

    /// Reads /proc again and stops perf.
    pub fn finish(self, syscalls: &mut Syscalls) -> anyhow::Result<Usage> {
        let spent = Snapshot::take(&self.pids)?.since(&self.before);
        let counted = match self.perf.map(Counter::finish) {
            Some(Ok(counts)) => Some(counts),
            Some(Err(e)) => {
                *syscalls = Syscalls::Unavailable(format!("{e:#}"));
                None
            }
            None => None,
        };
        Ok(Usage {
            spent,
            syscalls: counted,
        })
    }
}

/// What the processes under test spent over one run.
pub struct Usage {
    spent: Spent,
    syscalls: Option<SyscallCounts>,
}

impl Usage {
    /// The CPU time of the busiest thread of the processes, in seconds.
    pub fn busiest_thread_seconds(&self) -> f64 {
        self.spent.busiest_thread_seconds
    }

    /// The same, per unit of work.
    pub fn per(&self, units: f64) -> Cost {
        let each = |count: u64| count as f64 / units;
        Cost {
            cpu_us: self.spent.cpu_seconds * 1e6 / units,
            kernel_us: self.spent.system_seconds * 1e6 / units,
            switches: each(self.spent.voluntary + self.spent.involuntary),
            involuntary: each(self.spent.involuntary),
            migrations: self.spent.migrations.map(each),
            syscalls: self.syscalls.as_ref().map(|s| each(s.total)),
            mix: self
                .syscalls
                .iter()
                .flat_map(|s| s.by_name.iter().map(|(name, &n)| (name.clone(), each(n))))
                .collect(),
            threads_gone: self.spent.threads_gone,
        }
    }
}

/// One run's cost per unit of work.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    pub cpu_us: f64,
    /// Of `cpu_us`, the time spent in the kernel.
    pub kernel_us: f64,
    /// Voluntary and involuntary.
    pub switches: f64,
    pub involuntary: f64,
    pub migrations: Option<f64>,
    pub syscalls: Option<f64>,
    /// Per syscall of the mix.
    pub mix: BTreeMap<String, f64>,
    /// Threads that ended during the run (their switches are missing).
    pub threads_gone: usize,
}

impl Cost {
    /// For a progress line: `CPU 85.2 µs, 14.0 syscalls, 3.10 switches`.
    pub fn brief(&self) -> String {
        let syscalls = self
            .syscalls
            .map(|n| format!(", {} syscalls", number(n)))
            .unwrap_or_default();
        format!(
            "CPU {} µs{syscalls}, {} context switches",
            number(self.cpu_us),
            number(self.switches)
        )
    }
}

/// The unit each workload's cost is given per.
pub fn unit(metric: Metric) -> Option<&'static str> {
    match metric {
        Metric::Bulk1 | Metric::Bulk8 => Some("MB"),
        Metric::ReqRate => Some("request"),
        Metric::ConnRate
        | Metric::Socks5ConnRate
        | Metric::Handshakes
        | Metric::GatewayPooled
        | Metric::GatewayFresh => Some("tunnel"),
        _ => None,
    }
}

/// The workload's name in the per-unit table.
fn work(metric: Metric) -> &'static str {
    match metric {
        Metric::Bulk1 => "bulk, 1 stream",
        Metric::Bulk8 => "bulk, 8 streams",
        Metric::ReqRate => "1 KiB req/resp",
        Metric::ConnRate => "new conn + 1-byte echo",
        Metric::Socks5ConnRate => "new conn via SOCKS5 + 1-byte echo",
        Metric::Handshakes => "new conn, mTLS handshake each (no pool)",
        Metric::GatewayPooled => "double HBONE, inner pooled",
        Metric::GatewayFresh => "double HBONE, fresh inner each",
        _ => metric.label(),
    }
}

/// Whose work a cost counts: hbone's processes in a topology, or the bare
/// relays beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counted {
    Hbone(Topology),
    BareRelays,
    /// The same relays on one thread, with epoll.
    BareRelaysOneThread,
}

impl From<Topology> for Counted {
    fn from(topology: Topology) -> Counted {
        Counted::Hbone(topology)
    }
}

impl Counted {
    pub fn label(self) -> &'static str {
        match self {
            Counted::Hbone(topology) => topology.label(),
            Counted::BareRelays => BARE_RELAYS_LABEL,
            Counted::BareRelaysOneThread => BARE_RELAYS_ONE_THREAD_LABEL,
        }
    }
}

/// The bare relays' rows in the per-unit tables.
pub const BARE_RELAYS_LABEL: &str = "bare relays (reference)";
/// The one-thread bare relays' rows.
pub const BARE_RELAYS_ONE_THREAD_LABEL: &str = "bare relays, one thread (reference)";

/// Every run's cost, by workload and topology, and the syscall mix of
/// each from its extra run.
#[derive(Debug, Default, Clone)]
pub struct Costs {
    runs: BTreeMap<(Metric, Counted), Vec<Cost>>,
    mixes: BTreeMap<(Metric, Counted), Cost>,
}

pub const HEADERS: [&str; 9] = [
    "work",
    "per",
    "processes",
    "CPU (µs)",
    "of it in the kernel",
    "context switches",
    "of them involuntary",
    "CPU migrations",
    "syscalls",
];

impl Costs {
    /// One run's cost, of hbone in a topology or of the bare relays.
    pub fn push(&mut self, metric: Metric, counted: impl Into<Counted>, cost: Cost) {
        self.runs
            .entry((metric, counted.into()))
            .or_default()
            .push(cost);
    }

    /// The cost of the untimed run that counted each syscall of the mix.
    pub fn push_mix(&mut self, metric: Metric, counted: impl Into<Counted>, cost: Cost) {
        self.mixes.insert((metric, counted.into()), cost);
    }

    /// The median over the runs of one workload in one topology of a
    /// figure of their cost; none unless every run has it (syscalls where
    /// perf could not count).
    pub fn median(
        &self,
        metric: Metric,
        counted: impl Into<Counted>,
        figure: fn(&Cost) -> Option<f64>,
    ) -> Option<f64> {
        let runs = self.runs.get(&(metric, counted.into()))?;
        of_every_run(runs, figure).map(|s| s.median)
    }

    /// Median (min–max) of one figure over runs, for the "What varied" list.
    pub fn summaries(&self) -> Vec<(String, Summary)> {
        let mut out = Vec::new();
        for ((metric, counted), runs) in &self.runs {
            let name = |what: &str| {
                format!(
                    "{what} per {}, {}, {}",
                    unit_of(*metric),
                    work(*metric),
                    counted.label()
                )
            };
            let cpu: Vec<f64> = runs.iter().map(|c| c.cpu_us).collect();
            let syscalls: Vec<f64> = runs.iter().filter_map(|c| c.syscalls).collect();
            if let Some(s) = Summary::of(&cpu) {
                out.push((name("CPU"), s));
            }
            if let Some(s) = Summary::of(&syscalls) {
                out.push((name("syscalls"), s));
            }
        }
        out
    }

    /// The per-unit table: one row per workload and topology measured (and
    /// the bare relays).
    pub fn rows(&self, syscalls: &Syscalls) -> Vec<Vec<String>> {
        self.runs
            .iter()
            .map(|((metric, counted), runs)| {
                let of = |figure: fn(&Cost) -> Option<f64>| cell(of_every_run(runs, figure));
                let syscall_cell = if syscalls.available() {
                    of(|c| c.syscalls)
                } else {
                    NO_PERF.to_owned()
                };
                vec![
                    work(*metric).to_owned(),
                    unit_of(*metric).to_owned(),
                    counted.label().to_owned(),
                    of(|c| Some(c.cpu_us)),
                    of(|c| Some(c.kernel_us)),
                    of(|c| Some(c.switches)),
                    of(|c| Some(c.involuntary)),
                    of(|c| c.migrations),
                    syscall_cell,
                ]
            })
            .collect()
    }

    /// The syscall mix: per workload and topology, the syscalls its extra
    /// run made most per unit, then the rest as "other".
    pub fn mix_rows(&self) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        for ((metric, counted), cost) in &self.mixes {
            let Some(total) = cost.syscalls.filter(|_| !cost.mix.is_empty()) else {
                continue;
            };
            let mut named: Vec<(&str, f64)> = cost
                .mix
                .iter()
                .map(|(name, &n)| (name.as_str(), n))
                .filter(|(_, n)| *n > 0.0)
                .collect();
            named.sort_by(|a, b| b.1.total_cmp(&a.1));
            let shown: f64 = named.iter().take(MIX_SHOWN).map(|(_, n)| n).sum();
            let mut parts: Vec<String> = named
                .iter()
                .take(MIX_SHOWN)
                .map(|(name, n)| format!("{name} {}", number(*n)))
                .collect();
            parts.push(format!("other {}", number((total - shown).max(0.0))));
            rows.push(vec![
                work(*metric).to_owned(),
                unit_of(*metric).to_owned(),
                counted.label().to_owned(),
                number(total),
                parts.join(", "),
            ]);
        }
        rows
    }

    /// Threads that ended during some run, over all runs.
    pub fn threads_gone(&self) -> usize {
        self.runs.values().flatten().map(|c| c.threads_gone).sum()
    }
}

/// Median (min–max) of a figure of the runs' costs; none unless every run
/// has it (syscalls where perf could not count).
fn of_every_run(runs: &[Cost], figure: fn(&Cost) -> Option<f64>) -> Option<Summary> {
    let values: Vec<f64> = runs.iter().filter_map(figure).collect();
    if values.len() < runs.len() {
        return None;
    }
    Summary::of(&values)
}

pub const MIX_HEADERS: [&str; 5] = [
    "work",
    "per",
    "processes",
    "syscalls",
    "most made (per unit)",
];

fn unit_of(metric: Metric) -> &'static str {
    unit(metric).unwrap_or("run")
}

/// The notes printed under the per-unit table: what could not be counted.
pub fn notes(costs: &Costs, syscalls: &Syscalls) -> Vec<String> {
    let mut notes = Vec::new();
    if let Syscalls::Unavailable(why) = syscalls {
        notes.push(format!("syscalls: {NO_PERF} ({why})"));
    } else if let Syscalls::Counted {
        no_mix: Some(why), ..
    } = syscalls
    {
        notes.push(format!("syscall mix: {why}"));
    }
    let gone = costs.threads_gone();
    if gone > 0 {
        notes.push(format!(
            "{gone} thread(s) ended during a run: their context switches and migrations in that \
             run are missing (CPU time is not: /proc/PID/stat keeps ended threads' time)"
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(cpu_us: f64, syscalls: Option<f64>) -> Cost {
        Cost {
            cpu_us,
            kernel_us: cpu_us / 2.0,
            switches: 4.0,
            involuntary: 1.0,
            migrations: Some(0.5),
            syscalls,
            mix: BTreeMap::from([("read".to_owned(), 2.0), ("futex".to_owned(), 0.0)]),
            threads_gone: 0,
        }
    }

    #[test]
    fn usage_divides_by_units() {
        let usage = Usage {
            spent: Spent {
                cpu_seconds: 0.5,
                system_seconds: 0.3,
                voluntary: 3000,
                involuntary: 1000,
                migrations: Some(100),
                threads_gone: 0,
                busiest_thread_seconds: 0.25,
            },
            syscalls: Some(SyscallCounts {
                total: 20_000,
                by_name: BTreeMap::from([("read".to_owned(), 5000)]),
            }),
        };
        let cost = usage.per(1000.0);
        assert_eq!(cost.cpu_us, 500.0);
        assert_eq!(cost.kernel_us, 300.0);
        assert_eq!(cost.switches, 4.0);
        assert_eq!(cost.involuntary, 1.0);
        assert_eq!(cost.migrations, Some(0.1));
        assert_eq!(cost.syscalls, Some(20.0));
        assert_eq!(cost.mix["read"], 5.0);
    }

    #[test]
    fn rows_say_when_perf_could_not_count() {
        let mut costs = Costs::default();
        costs.push(Metric::ReqRate, Topology::Split, cost(80.0, Some(12.0)));
        costs.push(Metric::ReqRate, Topology::Split, cost(90.0, Some(14.0)));
        costs.push(Metric::ReqRate, Topology::Joined, cost(60.0, Some(10.0)));
        let counted = Syscalls::Counted {
            mix: vec!["read"],
            no_mix: None,
        };
        let rows = costs.rows(&counted);
        assert_eq!(
            rows[0][..4],
            [
                "1 KiB req/resp",
                "request",
                "2 processes",
                "85.0 (80.0–90.0)"
            ]
        );
        assert_eq!(rows[0][4], "42.5 (40.0–45.0)", "the kernel's share");
        assert_eq!(rows[0][8], "13.0 (12.0–14.0)");
        assert_eq!(rows[1][2], "1 process");
        let rows = costs.rows(&Syscalls::Unavailable("perf is not installed".into()));
        assert_eq!(rows[0][8], NO_PERF);
        assert!(costs.mix_rows().is_empty(), "no mix run, no mix");
        costs.push_mix(Metric::ReqRate, Topology::Split, cost(70.0, Some(13.0)));
        let mix = costs.mix_rows();
        assert_eq!(
            mix[0][..4],
            ["1 KiB req/resp", "request", "2 processes", "13.0"]
        );
        assert_eq!(mix[0][4], "read 2.00, other 11.0");
    }

    #[test]
    fn the_bare_relays_rows_follow_hbone_rows_of_the_same_work() {
        let mut costs = Costs::default();
        costs.push(Metric::Bulk1, Counted::BareRelays, cost(900.0, Some(22.0)));
        costs.push(
            Metric::Bulk1,
            Topology::JoinedPerCore,
            cost(1200.0, Some(30.0)),
        );
        costs.push(Metric::Bulk8, Topology::Split, cost(1300.0, Some(40.0)));
        let rows = costs.rows(&Syscalls::Unavailable("perf is not installed".into()));
        let labels: Vec<(&str, &str)> = rows
            .iter()
            .map(|row| (row[0].as_str(), row[2].as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("bulk, 1 stream", "1 process, per-core"),
                ("bulk, 1 stream", BARE_RELAYS_LABEL),
                ("bulk, 8 streams", "2 processes"),
            ]
        );
        assert_eq!(rows[1][3], "900");
    }
}
