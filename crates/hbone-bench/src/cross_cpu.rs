//! How far apart two of the machine's CPUs are while the bench runs: the
//! time a cache line takes to go from one to the other and back, probed
//! just before and just after every load generator run.
//!
//! A proxy's data crosses CPUs all the time (the load generator, the apps
//! and the proxy's threads hand bytes to each other), and what a crossing
//! costs depends on whether the two CPUs share a cache. On a virtual
//! machine that can change under a running bench: its host may run the two
//! vCPUs on cores of one cache complex for a while and on cores of two
//! others later. On the 2-vCPU machine the bench's figures come from, the
//! round trip took about 66 ns in most probes and up to 400 ns in the
//! rest, and 8 bulk streams through one process ran at 6.9–8.6 Gbit/s in
//! the runs next to the slow probes against 10.9–11.1 in the others
//! (docs/bench-bulk-cross-cpu.md). The probes let a report say which runs
//! those were, and what they measured.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::report::number;
use super::stats;

/// Round trips in one timed batch: about 30 µs while the CPUs share a
/// cache.
const BATCH: u64 = 500;
/// Batches per probe; the probe is the fastest, since anything else on
/// either CPU (a proxy still closing the last run's connections) only
/// adds time: a batch that nothing interrupted times the cache line.
const BATCHES: usize = 21;
/// A probe that takes longer than this (a CPU held by something else) is
/// given up: no figure rather than a wrong one.
const GIVE_UP: Duration = Duration::from_millis(500);
/// A probe more than this many times the median of the bench's probes is
/// taken as the two CPUs not sharing a cache then. The median, not the
/// lowest: a host may also run two vCPUs as the two threads of one core
/// for a moment, and a probe then takes half the usual time.
pub const APART: f64 = 2.0;

/// The probes around one load generator run.
#[derive(Debug, Clone, PartialEq)]
pub struct Around {
    /// The run: workload, path and extra arguments.
    pub run: String,
    /// Nanoseconds per round trip just before and just after it.
    pub before: Option<f64>,
    pub after: Option<f64>,
    /// What the run measured, where it has one headline figure.
    pub figure: Option<Figure>,
}

/// A run's headline figure: its throughput or its rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure {
    pub value: f64,
    pub unit: &'static str,
}

impl Around {
    /// The slower of the two probes.
    fn worst(&self) -> Option<f64> {
        match (self.before, self.after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Every run probed so far in this process.
static PROBED: Mutex<Vec<Around>> = Mutex::new(Vec::new());

/// Runs `run`, probing the round trip just before and just after it, and
/// keeps the probes under `label` for [`take`], with what `figure` reads
/// from the result.
pub fn around<T>(
    label: String,
    run: impl FnOnce() -> T,
    figure: impl FnOnce(&T) -> Option<Figure>,
) -> T {
    let before = round_trip();
    let result = run();
    let after = round_trip();
    let figure = figure(&result);
    PROBED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Around {
            run: label,
            before,
            after,
            figure,
        });
    result
}

/// The probes kept so far, in the order of the runs; empties the list.
pub fn take() -> Vec<Around> {
    std::mem::take(
        &mut *PROBED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// The two CPUs probed: the first two this process may run on.
#[cfg(target_os = "linux")]
pub fn cpus() -> Option<(usize, usize)> {
    let cpus = super::machine::allowed_cpus("the cross-CPU probe").ok()?;
    match cpus[..] {
        [a, b, ..] => Some((a, b)),
        _ => None,
    }
}

/// Elsewhere threads are not held to CPUs, so there is nothing to probe.
#[cfg(not(target_os = "linux"))]
pub fn cpus() -> Option<(usize, usize)> {
    None
}

/// Nanoseconds for a cache line to go from the first CPU of [`cpus`] to
/// the second and back; `None` with fewer than two CPUs, off Linux, or
/// when a CPU was not to be had within [`GIVE_UP`].
pub fn round_trip() -> Option<f64> {
    let (first, second) = cpus()?;
    let line = AtomicU64::new(0);
    let deadline = Instant::now() + GIVE_UP;
    let total = BATCH * BATCHES as u64;
    std::thread::scope(|scope| {
        let line = &line;
        let answerer = scope.spawn(move || {
            if !hold_to(second) {
                line.store(u64::MAX, Ordering::Release);
                return;
            }
            for turn in 0..total {
                if !wait_for(line, 2 * turn + 1, deadline) {
                    return;
                }
                line.store(2 * turn + 2, Ordering::Release);
            }
        });
        // The asking side runs on a thread of its own too: holding the
        // caller to a CPU would hold it there for the rest of the bench.
        let asker = scope.spawn(move || {
            let asked = hold_to(first).then(|| {
                let mut fastest = f64::INFINITY;
                for batch in 0..BATCHES as u64 {
                    let started = Instant::now();
                    for turn in batch * BATCH..(batch + 1) * BATCH {
                        // From the answerer's last value only: not over
                        // its giving up.
                        let asked = line.compare_exchange(
                            2 * turn,
                            2 * turn + 1,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                        if asked.is_err() || !wait_for(line, 2 * turn + 2, deadline) {
                            return None;
                        }
                    }
                    fastest = fastest.min(started.elapsed().as_nanos() as f64 / BATCH as f64);
                }
                Some(fastest)
            });
            // Free the answerer, whatever happened on this side.
            line.store(u64::MAX, Ordering::Release);
            asked.flatten()
        });
        let asked = asker.join().ok().flatten();
        let _ = answerer.join();
        asked
    })
}

/// Spins until `line` holds `value`; false at the deadline or when the
/// other side gave up (`u64::MAX`).
fn wait_for(line: &AtomicU64, value: u64, deadline: Instant) -> bool {
    let mut spins = 0u32;
    loop {
        match line.load(Ordering::Acquire) {
            v if v == value => return true,
            u64::MAX => return false,
            _ => {}
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Holds the calling thread to `cpu`.
#[cfg(target_os = "linux")]
fn hold_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set, CPU_SET stays within it
    // (cpu comes from sched_getaffinity), and pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn hold_to(_cpu: usize) -> bool {
    false
}

/// What the probes of a bench say, for its report.
#[derive(Debug, PartialEq)]
pub struct Summary {
    /// Nanoseconds per round trip over every probe.
    pub round_trip: stats::Summary,
    pub probes: usize,
    /// The runs of each label that had a probe over [`APART`] times the
    /// median, beside the others: labels with no such run left out.
    pub apart: Vec<Apart>,
    /// All runs probed.
    pub runs: usize,
}

impl Summary {
    /// Runs with a probe over [`APART`] times the median.
    pub fn apart_runs(&self) -> usize {
        self.apart.iter().map(|a| a.apart.len()).sum()
    }
}

/// The runs of one label, split by whether their CPUs were apart.
#[derive(Debug, PartialEq)]
pub struct Apart {
    pub run: String,
    /// Their figures, in the order of the runs (`None`: none read).
    pub apart: Vec<Option<Figure>>,
    pub near: Vec<Option<Figure>>,
}

/// Sums up `probed`; `None` when no probe gave a figure.
pub fn summarize(probed: &[Around]) -> Option<Summary> {
    let all: Vec<f64> = probed
        .iter()
        .flat_map(|a| [a.before, a.after])
        .flatten()
        .collect();
    let round_trip = stats::Summary::of(&all)?;
    let usual = round_trip.median;
    let mut apart: Vec<Apart> = Vec::new();
    for around in probed {
        let far = around.worst().is_some_and(|w| w > usual * APART);
        let at = match apart.iter().position(|a| a.run == around.run) {
            Some(at) => at,
            None => {
                apart.push(Apart {
                    run: around.run.clone(),
                    apart: Vec::new(),
                    near: Vec::new(),
                });
                apart.len() - 1
            }
        };
        let runs = &mut apart[at];
        match far {
            true => runs.apart.push(around.figure),
            false => runs.near.push(around.figure),
        }
    }
    apart.retain(|a| !a.apart.is_empty());
    Some(Summary {
        round_trip,
        probes: all.len(),
        apart,
        runs: probed.len(),
    })
}

/// The line on how far apart two CPUs were, for a report's machine.
pub fn machine_item(probed: &[Around]) -> String {
    let (Some((first, second)), Some(s)) = (cpus(), summarize(probed)) else {
        return "- cross-CPU round trip: not probed (fewer than two CPUs, not Linux, or no \
                CPU to be had)"
            .to_owned();
    };
    format!(
        "- cross-CPU round trip (a cache line from CPU {first} to CPU {second} and back, probed \
         just before and just after each run): median {} ns, lowest {}, highest {}, over {} \
         probes",
        number(s.round_trip.median),
        number(s.round_trip.min),
        number(s.round_trip.max),
        s.probes
    )
}

/// For what varied between runs: whether two CPUs were ever far apart,
/// and next to which runs; `None` when no probe gave a figure.
pub fn variation_item(probed: &[Around]) -> Option<String> {
    let s = summarize(probed)?;
    if s.apart_runs() == 0 {
        return Some(format!(
            "- Every cross-CPU probe stayed within {} times the median round trip: the \
             two CPUs probed shared a cache throughout, as far as probed.\n",
            APART
        ));
    }
    let mut out = format!(
        "- In {} of {} runs a cross-CPU probe next to the run took over {} times the \
         median round trip: the two CPUs did not share a cache then (on a virtual machine, its \
         host ran its CPUs on cores apart), and every hand-over of data between CPUs (load \
         generator, proxy threads, apps) cost more. Those runs:\n",
        s.apart_runs(),
        s.runs,
        APART
    );
    for runs in &s.apart {
        let (apart, near) = (runs.apart.len(), runs.near.len());
        let of = apart + near;
        let runs_word = if of == 1 { "run" } else { "runs" };
        let _ = write!(out, "  - {}: {apart} of {of} {runs_word}", runs.run);
        if let Some(apart) = listed(&runs.apart) {
            let _ = write!(out, ", at {apart}");
            if let Some(span) = span(&runs.near) {
                let _ = write!(out, "; the other {near} at {span}");
            }
        }
        out.push('\n');
    }
    Some(out)
}

/// The figures of some runs one by one ("7.02, 7.10 Gbit/s"), where every
/// one has a figure.
fn listed(figures: &[Option<Figure>]) -> Option<String> {
    let figures: Option<Vec<Figure>> = figures.iter().copied().collect();
    let figures = figures.filter(|f| !f.is_empty())?;
    let values: Vec<String> = figures.iter().map(|f| number(f.value)).collect();
    Some(format!("{} {}", values.join(", "), figures[0].unit))
}

/// The lowest and highest figure of some runs ("10.1–10.9 Gbit/s").
fn span(figures: &[Option<Figure>]) -> Option<String> {
    let figures: Vec<Figure> = figures.iter().copied().flatten().collect();
    let unit = figures.first()?.unit;
    let values: Vec<f64> = figures.iter().map(|f| f.value).collect();
    let range = stats::Summary::of(&values)?;
    Some(match figures.len() {
        1 => format!("{} {unit}", number(range.min)),
        _ => format!("{}–{} {unit}", number(range.min), number(range.max)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn around(run: &str, before: f64, after: f64) -> Around {
        Around {
            run: run.to_owned(),
            before: Some(before),
            after: Some(after),
            figure: Some(Figure {
                value: 10.0 - after / 100.0,
                unit: "Gbit/s",
            }),
        }
    }

    #[test]
    fn a_run_counts_as_apart_when_either_probe_is_over_twice_the_median() {
        let probed = [
            around("bulk", 62.0, 64.0),
            around("bulk", 63.0, 361.0),
            around("req-resp", 120.0, 29.0),
            around("bulk", 360.0, 70.0),
            around("req-resp", 61.0, 66.0),
        ];
        let summary = summarize(&probed).unwrap();
        assert_eq!(summary.probes, 10);
        let stats::Summary { median, min, max } = summary.round_trip;
        assert_eq!((median, min, max), (65.0, 29.0, 361.0));
        // 120 ns is under twice the median, though over four times the
        // lowest: that run stays near.
        assert_eq!(summary.apart.len(), 1);
        let bulk = &summary.apart[0];
        assert_eq!(bulk.run, "bulk");
        assert_eq!((bulk.apart.len(), bulk.near.len()), (2, 1));
        assert_eq!((summary.apart_runs(), summary.runs), (2, 5));
        let said = variation_item(&probed).unwrap();
        assert!(said.starts_with("- In 2 of 5 runs "), "{said}");
        assert!(
            said.contains(
                "\n  - bulk: 2 of 3 runs, at 6.39, 9.30 Gbit/s; the other 1 at 9.36 Gbit/s\n"
            ),
            "{said}"
        );
        assert!(!said.contains("req-resp"), "{said}");
    }

    #[test]
    fn runs_without_a_figure_are_counted_but_never_apart() {
        let probed = [
            Around {
                run: "bulk".to_owned(),
                before: None,
                after: None,
                figure: None,
            },
            around("bulk", 60.0, 60.0),
        ];
        let summary = summarize(&probed).unwrap();
        assert_eq!(
            (summary.apart_runs(), summary.runs, summary.probes),
            (0, 2, 2)
        );
        assert!(summarize(&probed[..1]).is_none());
    }

    #[test]
    fn the_probe_times_a_round_trip_between_two_cpus() {
        match cpus() {
            Some(_) => {
                let ns = round_trip().expect("two CPUs, so a figure");
                // A cache line's round trip: tens to hundreds of ns, never
                // a scheduler's time slice.
                assert!(ns > 1.0 && ns < 100_000.0, "{ns} ns");
            }
            None => assert_eq!(round_trip(), None),
        }
    }
}
