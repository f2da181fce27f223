//! `hbone bench --placement`: what a request and a new tunnel cost when
//! every process of the path runs on one CPU, beside the same path with
//! the scheduler free to place its processes, in the same runs.
//!
//! Request/response sleeps and wakes at every hop: the load generator
//! waits for the entry, the server for the app, the entry for the server.
//! A wake-up that crosses CPUs sends the other CPU an interrupt, and where
//! that CPU had nothing to run it has halted and must come back first; on
//! a virtual machine both go through the hypervisor. Held to one CPU,
//! every wake-up is a context switch where the waker runs. The difference
//! between the two placements is what the machine's cross-CPU wake-ups
//! cost each unit of work: a property of the machine (its idle states,
//! its hypervisor) as much as of the code, and the reason CPU per request
//! differs between machines that run the same build. The full bench
//! measures with the scheduler free, as a deployment runs.
//!
//! Each placement has apps, a `hbone run` per runtime and the one-thread
//! bare relays of its own, started once; the contenders take turns, the
//! order rotated every run.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, bail};

use super::child::Proc;
use super::cost::{Cost, Meter, NO_PERF};
use super::load::Workload;
use super::machine;
use super::perf::Syscalls;
use super::report::{cell, number, table};
use super::runner::{self, RoundTrips, conn_rate, run_loads_on};
use super::stack::{Apps, BareRelays, ChildFlags, EntrySpec, Pki, Proxies, Route, WorkDir};
use super::stats::Summary;
use super::{Options, Part};

/// A workload of the placement runs.
struct Work {
    part: Part,
    label: &'static str,
    workload: Workload,
    rate_unit: &'static str,
    /// The unit of work CPU time is given per.
    per: &'static str,
}

const WORKS: [Work; 2] = [
    Work {
        part: Part::ReqResp,
        label: "1 KiB req/resp",
        workload: Workload::ReqResp,
        rate_unit: "req/s",
        per: "request",
    },
    Work {
        part: Part::Connections,
        label: "new conn + 1-byte echo",
        workload: Workload::Connect,
        rate_unit: "conn/s",
        per: "tunnel",
    },
];

const HEADERS: [&str; 11] = [
    "work",
    "path",
    "processes on",
    "rate",
    "p50 (µs)",
    "CPU per unit (µs)",
    "of it in the kernel",
    "context switches",
    "CPU migrations",
    "syscalls",
    "CPU ÷ scheduler's",
];

/// Where a placement's processes run.
struct Placement {
    /// `None`: wherever the scheduler puts them.
    cpu: Option<usize>,
    /// Every CPU this process may use, for the load generators of the
    /// scheduler's placement.
    all: Vec<usize>,
}

impl Placement {
    fn label(&self) -> String {
        match self.cpu {
            None => "the scheduler's choice".to_owned(),
            Some(cpu) => format!("CPU {cpu} alone"),
        }
    }

    fn held(&self) -> Option<Vec<usize>> {
        self.cpu.map(|cpu| vec![cpu])
    }

    fn load_cpus(&self) -> Vec<usize> {
        self.held().unwrap_or_else(|| self.all.clone())
    }
}

/// What carries the load.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Hbone(&'static str),
    BareRelays,
}

impl Path {
    fn label(self) -> String {
        match self {
            Path::Direct => "direct".to_owned(),
            Path::Hbone(runtime) => format!("hbone, 1 process, {runtime}"),
            Path::BareRelays => "bare relays, one thread (reference)".to_owned(),
        }
    }
}

const PATHS: [Path; 4] = [
    Path::Direct,
    Path::Hbone("work-stealing"),
    Path::Hbone("per-core"),
    Path::BareRelays,
];

/// One path under one placement, with what it runs.
struct Contender {
    placement: usize,
    path: Path,
    /// The hbone process or the relays; none for direct.
    procs: Vec<Proc>,
    /// The route of each work, by `WORKS` index; none where the path does
    /// not carry it (the bare relays open no new connections).
    routes: [Option<Route>; 2],
}

/// One run of one contender.
struct Sample {
    rate: f64,
    p50: Option<f64>,
    cost: Option<Cost>,
}

pub fn run(options: &Options, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let works: Vec<(usize, &Work)> = WORKS
        .iter()
        .enumerate()
        .filter(|(_, w)| options.runs_part(w.part))
        .collect();
    if works.is_empty() {
        bail!("--placement measures req-resp and connections only; --only names neither");
    }
    let all = machine::allowed_cpus("--placement")?;
    let last = *all.last().context("this process may run on no CPU")?;
    let placements = [
        Placement {
            cpu: None,
            all: all.clone(),
        },
        Placement {
            cpu: Some(last),
            all: all.clone(),
        },
    ];
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    // The apps of each placement, kept running until the end.
    let mut apps_procs = Vec::new();
    let mut contenders = Vec::new();
    for (index, placement) in placements.iter().enumerate() {
        let (apps, started) = start_placement(options, index, placement, &pki, dir)?;
        apps_procs.push(apps);
        contenders.extend(started);
    }
    let mut syscalls = Syscalls::probe(apps_procs[0].pid(), dir.path(), true);
    eprintln!(
        "hbone bench --placement: every process on CPU {last}, and wherever the scheduler puts \
         them; {} run(s) of {} ms per workload",
        options.runs,
        options.duration.as_millis()
    );
    let mut rows = Vec::new();
    for &(work_index, work) in &works {
        let taking: Vec<usize> = (0..contenders.len())
            .filter(|&i| contenders[i].routes[work_index].is_some())
            .collect();
        let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
        for run in 0..options.runs as usize {
            let mut line = Vec::new();
            for turn in 0..taking.len() {
                let index = taking[(turn + run) % taking.len()];
                let contender = &mut contenders[index];
                let placement = &placements[contender.placement];
                let sample = measure(
                    options,
                    work,
                    work_index,
                    contender,
                    placement,
                    &mut syscalls,
                    dir,
                )?;
                line.push(format!(
                    "{} on {}: {} {}",
                    contender.path.label(),
                    placement.label(),
                    number(sample.rate),
                    work.rate_unit
                ));
                samples[index].push(sample);
            }
            eprintln!(
                "  {}, run {}/{}: {}",
                work.label,
                run + 1,
                options.runs,
                line.join("; ")
            );
        }
        rows.extend(rows_of(work, &placements, &contenders, &samples, &syscalls));
    }
    let report = table(&HEADERS, &rows);
    println!("\nOne CPU against the scheduler's choice, medians of the runs\n");
    println!("{report}");
    if let Some(path) = &options.write {
        let doc = document(options, last, &date, started, &report);
        std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("hbone bench: wrote {}", path.display());
    }
    Ok(())
}

/// The apps of placement `index` and a contender per path, every process
/// held to the placement's CPU where it has one.
fn start_placement(
    options: &Options,
    index: usize,
    placement: &Placement,
    pki: &Pki,
    dir: &WorkDir,
) -> anyhow::Result<(Proc, Vec<Contender>)> {
    let held = placement.held();
    // An echo listener per path: new connections to one destination
    // reuse a port in TIME-WAIT only after a second.
    let apps = Apps::start_on(held.as_deref(), PATHS.len())?;
    let mut contenders = Vec::new();
    for (&path, &echo) in PATHS.iter().zip(&apps.echoes) {
        let (procs, routes) = match path {
            Path::Direct => (Vec::new(), [Some(Route::direct(echo)); 2]),
            Path::Hbone(runtime) => {
                let flags = ChildFlags {
                    runtime: runtime.to_owned(),
                    threads: placement.cpu.map(|_| 1),
                    cpus: held.clone(),
                    ..options.child_flags()
                };
                let spec = EntrySpec::new(options.entry, echo, true);
                let proxies = Proxies::start_joined(&[spec], pki, dir.path(), &flags)?;
                let route = proxies.entry_for(echo)?.route(echo);
                (proxies.procs, [Some(route); 2])
            }
            Path::BareRelays => {
                let relays = BareRelays::start_on(&apps, true, held.as_deref())?;
                let route = relays.route(apps.echo)?;
                (vec![relays.proc], [Some(route), None])
            }
        };
        contenders.push(Contender {
            placement: index,
            path,
            procs,
            routes,
        });
    }
    Ok((apps.proc, contenders))
}

/// One run of `work` through `contender`, and what its processes spent.
fn measure(
    options: &Options,
    work: &Work,
    work_index: usize,
    contender: &mut Contender,
    placement: &Placement,
    syscalls: &mut Syscalls,
    dir: &WorkDir,
) -> anyhow::Result<Sample> {
    let route = contender.routes[work_index].context("no route for this work")?;
    let side = format!("{} on {}", contender.path.label(), placement.label());
    let pids: Vec<u32> = contender.procs.iter().map(Proc::pid).collect();
    let mut watched: Vec<&mut Proc> = contender.procs.iter_mut().collect();
    let meter = match pids.is_empty() {
        true => None,
        false => Some(
            Meter::start(&pids, syscalls, false, dir.path())
                .map_err(|e| runner::explain(e, &mut watched))?,
        ),
    };
    let fields = run_loads_on(
        options,
        work.workload,
        &side,
        &[route],
        &[],
        &placement.load_cpus(),
        &mut watched,
    )?;
    let fields = fields
        .first()
        .context("the load generator printed nothing")?;
    let cost = match meter {
        None => None,
        Some(meter) => {
            let usage = meter
                .finish(syscalls)
                .map_err(|e| runner::explain(e, &mut watched))?;
            Some(usage.per(runner::units(work.workload, fields)?))
        }
    };
    let (rate, p50) = match work.workload {
        Workload::Connect => (conn_rate(fields)?, None),
        _ => {
            let trips = RoundTrips::from(fields)?;
            (trips.rate, Some(trips.p50))
        }
    };
    Ok(Sample { rate, p50, cost })
}

/// A work's rows: each path under each placement, the scheduler's first.
fn rows_of(
    work: &Work,
    placements: &[Placement],
    contenders: &[Contender],
    samples: &[Vec<Sample>],
    syscalls: &Syscalls,
) -> Vec<Vec<String>> {
    let summary = |runs: &[Sample], field: &dyn Fn(&Sample) -> Option<f64>| {
        Summary::of(&runs.iter().filter_map(field).collect::<Vec<_>>())
    };
    let cpu = |runs: &[Sample]| summary(runs, &|s| s.cost.as_ref().map(|c| c.cpu_us));
    let mut rows = Vec::new();
    for path in PATHS {
        let of_path: Vec<(&Contender, &Vec<Sample>)> = contenders
            .iter()
            .zip(samples)
            .filter(|(c, runs)| c.path == path && !runs.is_empty())
            .collect();
        let free_cpu = of_path
            .iter()
            .find(|(c, _)| placements[c.placement].cpu.is_none())
            .and_then(|(_, runs)| cpu(runs));
        for (contender, runs) in &of_path {
            let placement = &placements[contender.placement];
            let hbone = !contender.procs.is_empty();
            let costed = |field: &dyn Fn(&Cost) -> Option<f64>| match hbone {
                false => "n/a".to_owned(),
                true => cell(summary(runs, &|s| s.cost.as_ref().and_then(field))),
            };
            let syscalls_cell = match hbone && !syscalls.available() {
                true => NO_PERF.to_owned(),
                false => costed(&|c| c.syscalls),
            };
            let ratio = match (placement.cpu, cpu(runs), free_cpu) {
                (Some(_), Some(here), Some(free)) => format!("{:.2}", here.median / free.median),
                _ => String::new(),
            };
            rows.push(vec![
                work.label.to_owned(),
                path.label(),
                placement.label(),
                format!(
                    "{} {}",
                    cell(summary(runs, &|s| Some(s.rate))),
                    work.rate_unit
                ),
                match work.workload {
                    Workload::Connect => "n/a".to_owned(),
                    _ => cell(summary(runs, &|s| s.p50)),
                },
                match hbone {
                    false => "n/a".to_owned(),
                    true => format!("{} per {}", cell(cpu(runs)), work.per),
                },
                costed(&|c| Some(c.kernel_us)),
                costed(&|c| Some(c.switches)),
                costed(&|c| c.migrations),
                syscalls_cell,
                ratio,
            ]);
        }
    }
    rows
}

/// The Markdown report of `--write`.
fn document(options: &Options, cpu: usize, date: &str, started: Instant, report: &str) -> String {
    let mut out = String::from("# hbone on one CPU and where the scheduler puts it\n\n");
    let _ = writeln!(
        out,
        "Measured with `hbone bench --placement` on {date}; it took {:.0} s. {} run(s) of each \
         workload, {} ms each, every contender taking its turn, the order rotated every run; \
         each figure is the median of the runs, with the lowest and highest in parentheses.\n",
        started.elapsed().as_secs_f64(),
        options.runs,
        options.duration.as_millis(),
    );
    let _ = writeln!(
        out,
        "Each path runs twice: with every process on it (the apps, a single-threaded load \
         generator, the proxy) held to CPU {cpu}, and with the same processes wherever the \
         scheduler puts them, as the full bench and a deployment run. *hbone, 1 process*: one \
         `hbone run` with a server and a `{}` entry, under each runtime (on one CPU with one \
         worker thread); *bare relays, one thread*: the reference of the full bench, two relays \
         that only seal and open TLS records on one thread (request/response only). Request/\
         response sleeps and wakes at every hop; a wake-up that crosses CPUs interrupts the \
         other CPU and, where that CPU had halted for want of work, waits for it to come back, \
         through the hypervisor on a virtual machine (see *idle CPUs* below). On one CPU every \
         wake-up is a context switch where the waker runs. *CPU ÷ scheduler's* is what a unit \
         of work costs on one CPU over what it costs placed by the scheduler: below 1, the \
         rest is what crossing CPUs cost (wake-ups, data moving between caches), less what \
         sharing one CPU with the apps added (their preemptions show in the context \
         switches). CPU, context switches, migrations and \
         syscalls (`perf stat -e raw_syscalls:sys_enter`, attached during every run) are those \
         of the proxy processes only, per request or tunnel. Compare rows of this file only.\n",
        options.entry.name(),
    );
    out += report;
    out += &machine::circumstances(&options.command, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_holds_every_process_and_the_scheduler_holds_none() {
        let free = Placement {
            cpu: None,
            all: vec![0, 1],
        };
        assert_eq!(free.held(), None);
        assert_eq!(free.load_cpus(), vec![0, 1]);
        assert_eq!(free.label(), "the scheduler's choice");
        let one = Placement {
            cpu: Some(1),
            all: vec![0, 1],
        };
        assert_eq!(one.held(), Some(vec![1]));
        assert_eq!(one.load_cpus(), vec![1]);
        assert_eq!(one.label(), "CPU 1 alone");
    }
}
