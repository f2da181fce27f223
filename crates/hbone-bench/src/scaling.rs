//! `hbone bench --scaling`: how much work hbone gets through as it is
//! given more CPUs, under each runtime.
//!
//! The machine's CPUs are split in two halves. The load generators and the
//! apps are held to the upper half throughout, so the load side is the same
//! at every step; one `hbone run` process (server and entries) is held to
//! the first 1, 2, 4... CPUs of the lower half with as many worker threads,
//! under `--runtime work-stealing` and under `--runtime per-core`. As many
//! single-threaded load generators as the load side has CPUs run at once,
//! each with connections of its own (bulk: one stream; request/response:
//! eight connections, one request at a time on each; new connections: eight
//! at a time), and their rates are summed. Bulk and requests go through one
//! entry, as the tunnels between two nodes do; for new connections each
//! generator of each contender reaches an echo listener of its own (through
//! a forward entry of its own), as the kernel holds new connections from one
//! address to one destination to about 14,000 a second. Direct TCP from the
//! same generators to the same apps, measured in the same runs, is the load
//! side's ceiling: a step whose rate is near it, or whose CPUs are far from
//! busy, was held back by the load, not by hbone, unless hbone's busiest
//! thread was near saturation while the others waited: the table gives that
//! thread's share of the run too.
//!
//! Per CPU given, the rate stays flat when hbone scales linearly; the
//! "÷ 1 CPU" column says how much of the one-CPU rate each CPU keeps.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, bail};

use super::child::Proc;
use super::cost::{Meter, NO_PERF};
use super::load::Workload;
use super::machine;
use super::perf::Syscalls;
use super::report::{cell, number, table};
use super::runner::{self, RoundTrips, conn_rate, gbits, run_loads_on};
use super::stack::{Apps, ChildFlags, EntrySpec, Pki, Proxies, Route, WorkDir};
use super::stats::Summary;
use super::wire::Fields;
use super::{EntryKind, Options, Part};

/// A workload of the scaling runs.
struct Scaled {
    part: Part,
    label: &'static str,
    workload: Workload,
    extra: &'static [&'static str],
    /// What the rate is counted in.
    rate_unit: &'static str,
    /// The unit of work CPU time is given per.
    per: &'static str,
}

const SCALED: [Scaled; 3] = [
    Scaled {
        part: Part::Connections,
        label: "new conn + 1-byte echo",
        workload: Workload::Connect,
        extra: &[],
        rate_unit: "conn/s",
        per: "tunnel",
    },
    Scaled {
        part: Part::ReqResp,
        label: "1 KiB req/resp, 8 connections each",
        workload: Workload::ReqResp,
        extra: &["--streams", "8"],
        rate_unit: "req/s",
        per: "request",
    },
    Scaled {
        part: Part::Bulk,
        label: "bulk, 1 stream each",
        workload: Workload::Bulk,
        extra: &["--streams", "1"],
        rate_unit: "Gbit/s",
        per: "MB",
    },
];

/// The runtimes each step runs under, as `--runtime` names them.
const RUNTIMES: [&str; 2] = ["work-stealing", "per-core"];

const HEADERS: [&str; 10] = [
    "work",
    "hbone CPUs",
    "runtime",
    "rate",
    "per hbone CPU",
    "per CPU ÷ 1 CPU's",
    "hbone CPUs busy",
    "busiest thread",
    "CPU per unit (µs)",
    "syscalls per unit",
];

/// How the CPUs are shared out.
#[derive(Debug, PartialEq)]
struct Plan {
    /// The CPUs hbone's steps take from, in order.
    hbone: Vec<usize>,
    /// The CPUs of the load generators and the apps.
    load: Vec<usize>,
    /// How many of `hbone` each step gives it.
    steps: Vec<usize>,
}

impl Plan {
    /// The lower half of `cpus` for hbone, the upper for the load; steps
    /// double from 1 up to the whole lower half.
    fn of(cpus: &[usize]) -> anyhow::Result<Plan> {
        if cpus.len() < 2 {
            bail!(
                "--scaling needs at least 2 CPUs, one for hbone and one for the load; this \
                 process may use {}",
                cpus.len()
            );
        }
        let half = cpus.len() / 2;
        let mut steps: Vec<usize> = std::iter::successors(Some(1), |&k| Some(k * 2))
            .take_while(|&k| k <= half)
            .collect();
        if steps.last() != Some(&half) {
            steps.push(half);
        }
        Ok(Plan {
            hbone: cpus[..half].to_vec(),
            load: cpus[half..].to_vec(),
            steps,
        })
    }
}

/// One contender: direct TCP, or one `hbone run` held to some CPUs.
struct Contender {
    cpus: usize,
    runtime: &'static str,
    proxies: Option<Proxies>,
    /// The echo listeners its generators reach, one each.
    echoes: Vec<SocketAddr>,
}

impl Contender {
    fn name(&self) -> String {
        match self.proxies {
            None => "direct".to_owned(),
            Some(_) => format!("{} CPU(s), {}", self.cpus, self.runtime),
        }
    }
}

/// One run of one contender.
struct Sample {
    rate: f64,
    /// hbone's CPU time over the window, ÷ (window × CPUs given).
    busy: Option<f64>,
    /// The busiest thread's CPU time over the window ÷ the window.
    busiest: Option<f64>,
    cpu_per_unit: Option<f64>,
    syscalls_per_unit: Option<f64>,
}

pub fn run(options: &Options, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let scaled: Vec<&Scaled> = SCALED
        .iter()
        .filter(|s| options.runs_part(s.part))
        .collect();
    if scaled.is_empty() {
        bail!("--scaling measures bulk, req-resp and connections only; --only names none of them");
    }
    let plan = Plan::of(&machine::allowed_cpus("--scaling")?)?;
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    let generators = plan.load.len();
    // Each contender's generators reach echo listeners of their own: the
    // kernel holds new connections to one destination to about 14,000 a
    // second (connect() reuses a port in TIME-WAIT only after a second),
    // and a contender would otherwise start on the ports the last one left.
    let contenders_count = 1 + plan.steps.len() * RUNTIMES.len();
    let apps = Apps::start_on(Some(&plan.load), generators * contenders_count)?;
    let mut echoes = apps.echoes.chunks(generators).map(<[SocketAddr]>::to_vec);
    let mut contenders = vec![Contender {
        cpus: 0,
        runtime: "",
        proxies: None,
        echoes: echoes.next().context("the apps have no echo listener")?,
    }];
    for &cpus in &plan.steps {
        for runtime in RUNTIMES {
            let flags = ChildFlags {
                runtime: runtime.to_owned(),
                threads: Some(u16::try_from(cpus).context("too many CPUs")?),
                cpus: Some(plan.hbone[..cpus].to_vec()),
                ..options.child_flags()
            };
            let echoes = echoes
                .next()
                .context("the apps have too few echo listeners")?;
            let specs = match options.entry {
                EntryKind::Forward => std::iter::once(apps.sink)
                    .chain(echoes.iter().copied())
                    .map(|target| EntrySpec::new(EntryKind::Forward, target, true))
                    .collect(),
                EntryKind::Socks5 => vec![EntrySpec::new(EntryKind::Socks5, apps.sink, true)],
            };
            let proxies = Proxies::start_joined(&specs, &pki, dir.path(), &flags)?;
            contenders.push(Contender {
                cpus,
                runtime,
                proxies: Some(proxies),
                echoes,
            });
        }
    }
    // One counter for every syscall (no mix: its counters cost the timed
    // figures much more), attached while hbone works, as the full bench does.
    let mut syscalls = Syscalls::probe(apps.proc.pid(), dir.path(), true);
    eprintln!(
        "hbone bench --scaling: hbone on the first {:?} of CPUs {:?}, {generators} load \
         generator(s) and the apps on CPUs {:?}; {} run(s) of {} ms per workload",
        plan.steps,
        plan.hbone,
        plan.load,
        options.runs,
        options.duration.as_millis()
    );
    let mut rows = Vec::new();
    for work in scaled {
        let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
        for run in 1..=options.runs {
            let mut line = Vec::new();
            // Rotated every run: drift touches every contender alike.
            for turn in 0..contenders.len() {
                let index = (turn + run as usize - 1) % contenders.len();
                let contender = &mut contenders[index];
                // Bulk and requests through one entry, as the tunnels
                // between two nodes share one; new connections through an
                // entry per generator, each to a destination of its own.
                let targets = match work.workload {
                    Workload::Bulk => vec![apps.sink; generators],
                    Workload::Connect => contender.echoes.clone(),
                    _ => vec![contender.echoes[0]; generators],
                };
                let sample = measure(
                    options,
                    contender,
                    work,
                    &targets,
                    &plan.load,
                    &mut syscalls,
                    dir,
                )?;
                line.push(format!(
                    "{}: {} {}",
                    contender.name(),
                    number(sample.rate),
                    work.rate_unit
                ));
                samples[index].push(sample);
            }
            eprintln!(
                "  {}, run {run}/{}: {}",
                work.label,
                options.runs,
                line.join("; ")
            );
        }
        rows.extend(rows_of(work, &contenders, &samples, &syscalls));
    }
    let report = table(&HEADERS, &rows);
    println!(
        "\nThroughput as hbone gets more CPUs (one `hbone run`), medians of the runs; load on \
         CPUs {:?}\n",
        plan.load
    );
    println!("{report}");
    if let Some(path) = &options.write {
        let doc = document(options, &plan, &date, started, &report);
        std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("hbone bench: wrote {}", path.display());
    }
    Ok(())
}

/// One run of `work` through `contender`: every load generator at once,
/// one per target, and what hbone spent meanwhile.
fn measure(
    options: &Options,
    contender: &mut Contender,
    work: &Scaled,
    targets: &[SocketAddr],
    load_cpus: &[usize],
    syscalls: &mut Syscalls,
    dir: &WorkDir,
) -> anyhow::Result<Sample> {
    let extra: Vec<String> = work.extra.iter().map(|s| (*s).to_owned()).collect();
    let Some(proxies) = contender.proxies.as_mut() else {
        let routes: Vec<Route> = targets.iter().map(|t| Route::direct(*t)).collect();
        let fields = run_loads_on(
            options,
            work.workload,
            "direct",
            &routes,
            &extra,
            load_cpus,
            &mut [],
        )?;
        return Ok(Sample {
            rate: rate_of(work.workload, &fields)?,
            busy: None,
            busiest: None,
            cpu_per_unit: None,
            syscalls_per_unit: None,
        });
    };
    let routes = targets
        .iter()
        .map(|t| Ok(proxies.entry_for(*t)?.route(*t)))
        .collect::<anyhow::Result<Vec<Route>>>()?;
    let pids = proxies.pids();
    let side = format!("through hbone on {} CPU(s)", contender.cpus);
    let mut watched: Vec<&mut Proc> = proxies.procs.iter_mut().collect();
    let window = Instant::now();
    let meter = Meter::start(&pids, syscalls, false, dir.path())
        .map_err(|e| runner::explain(e, &mut watched))?;
    let fields = run_loads_on(
        options,
        work.workload,
        &side,
        &routes,
        &extra,
        load_cpus,
        &mut watched,
    )?;
    let usage = meter
        .finish(syscalls)
        .map_err(|e| runner::explain(e, &mut watched))?;
    let seconds = window.elapsed().as_secs_f64();
    let units: f64 = fields
        .iter()
        .map(|f| runner::units(work.workload, f))
        .sum::<anyhow::Result<f64>>()?;
    let cpu_seconds = usage.per(1.0).cpu_us / 1e6;
    let per_unit = usage.per(units);
    Ok(Sample {
        rate: rate_of(work.workload, &fields)?,
        busy: Some(cpu_seconds / (seconds * contender.cpus as f64)),
        busiest: Some(usage.busiest_thread_seconds() / seconds),
        cpu_per_unit: Some(per_unit.cpu_us),
        syscalls_per_unit: per_unit.syscalls,
    })
}

/// The generators' rates, summed.
fn rate_of(workload: Workload, fields: &[Fields]) -> anyhow::Result<f64> {
    fields
        .iter()
        .map(|f| match workload {
            Workload::Bulk => gbits(f),
            Workload::Connect => conn_rate(f),
            _ => Ok(RoundTrips::from(f)?.rate),
        })
        .sum()
}

/// A workload's rows: direct first, then each step under each runtime.
fn rows_of(
    work: &Scaled,
    contenders: &[Contender],
    samples: &[Vec<Sample>],
    syscalls: &Syscalls,
) -> Vec<Vec<String>> {
    let median = |runs: &[Sample], field: fn(&Sample) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(field).collect();
        Summary::of(&values).map(|s| s.median)
    };
    let rates = |runs: &[Sample]| Summary::of(&runs.iter().map(|s| s.rate).collect::<Vec<_>>());
    let one_cpu = |runtime: &str| {
        contenders
            .iter()
            .zip(samples)
            .find(|(c, _)| c.cpus == 1 && c.runtime == runtime)
            .and_then(|(_, runs)| rates(runs))
            .map(|rates| rates.median)
    };
    contenders
        .iter()
        .zip(samples)
        .map(|(contender, runs)| {
            let rates = rates(runs);
            let rate = rates.map(|r| r.median);
            let (cpus, runtime, per_cpu, kept) = match contender.proxies {
                None => ("direct (no hbone)".to_owned(), "", None, None),
                Some(_) => {
                    let per_cpu = rate.map(|r| r / contender.cpus as f64);
                    let kept = per_cpu.zip(one_cpu(contender.runtime)).map(|(p, o)| p / o);
                    (contender.cpus.to_string(), contender.runtime, per_cpu, kept)
                }
            };
            vec![
                work.label.to_owned(),
                cpus,
                runtime.to_owned(),
                format!("{} {}", cell(rates), work.rate_unit),
                shown(per_cpu, number),
                shown(kept, |k| format!("{k:.2}")),
                shown(median(runs, |s| s.busy), |b| format!("{:.0} %", b * 100.0)),
                shown(median(runs, |s| s.busiest), |b| {
                    format!("{:.0} %", b * 100.0)
                }),
                shown(median(runs, |s| s.cpu_per_unit), |c| {
                    format!("{} per {}", number(c), work.per)
                }),
                match median(runs, |s| s.syscalls_per_unit) {
                    None if contender.proxies.is_some() && !syscalls.available() => {
                        NO_PERF.to_owned()
                    }
                    value => shown(value, number),
                },
            ]
        })
        .collect()
}

/// A figure, or "n/a" where there is none.
fn shown(value: Option<f64>, show: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "n/a".to_owned(), show)
}

/// The Markdown report of `--write`.
fn document(options: &Options, plan: &Plan, date: &str, started: Instant, report: &str) -> String {
    let mut out = String::from("# hbone as it gets more CPUs\n\n");
    let _ = writeln!(
        out,
        "Measured with `hbone bench --scaling` on {date}; it took {:.0} s. {} run(s) of each \
         workload, {} ms each, every contender taking its turn, the order rotated every run; \
         each figure is the median of the runs, the rates with the lowest and highest in \
         parentheses.\n",
        started.elapsed().as_secs_f64(),
        options.runs,
        options.duration.as_millis(),
    );
    let _ = writeln!(
        out,
        "One `hbone run` process (a server and the entries, entry: {}) is held to the first \
         1, 2, 4... of CPUs {:?} with as many worker threads, under each runtime; {} \
         single-threaded load generator(s) and the apps are held to CPUs {:?} throughout, each \
         generator with connections of its own (bulk: one stream; request/response: eight \
         connections, each one request at a time; new connections: eight at a time), their \
         rates summed. Bulk and requests go through one entry, as tunnels between two nodes \
         do; new connections through a forward entry per generator (a SOCKS5 entry serves \
         them all) to an echo listener of its own, apart for every contender: the kernel \
         lets one source address open about 14,000 connections a second to one destination, \
         reusing a port in TIME-WAIT only after a second. *direct* is the same generators \
         straight to the apps: the load side's ceiling. *per CPU ÷ 1 CPU's* is what each CPU \
         keeps of the one-CPU rate (1.00: linear); *hbone CPUs busy* is the process's CPU \
         time over the run ÷ (the run × the CPUs it was given): a step far from busy was held back by the load side, or by \
         work spread unevenly over hbone's threads, which *busiest thread* tells apart: \
         the CPU time of hbone's busiest thread over the run ÷ the run (near 100 %: one \
         thread, or one worker, was saturated while others waited). *CPU per unit* is \
         hbone's CPU time per tunnel, request or MB, and *syscalls per unit* its syscalls \
         (`perf stat -e raw_syscalls:sys_enter`, attached to it during every run).\n",
        options.entry.name(),
        plan.hbone,
        plan.load.len(),
        plan.load,
    );
    if plan.steps.len() == 1 {
        out += "This machine gives hbone a single step: it shows what one CPU carries, not how \
                the rate grows. A machine with 4 CPUs or more shows the growth.\n\n";
    }
    out += report;
    out += &machine::circumstances(&options.command, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpus_split_in_halves_and_steps_double_up_to_the_lower_half() {
        assert!(Plan::of(&[0]).is_err());
        assert_eq!(
            Plan::of(&[0, 1]).unwrap(),
            Plan {
                hbone: vec![0],
                load: vec![1],
                steps: vec![1]
            }
        );
        let sixteen: Vec<usize> = (0..16).collect();
        let plan = Plan::of(&sixteen).unwrap();
        assert_eq!(plan.hbone, (0..8).collect::<Vec<_>>());
        assert_eq!(plan.load, (8..16).collect::<Vec<_>>());
        assert_eq!(plan.steps, vec![1, 2, 4, 8]);
        // Odd counts and steps that miss the half: the load side takes the
        // extra CPU, the last step the whole half.
        let plan = Plan::of(&[2, 3, 5, 7, 11, 13, 17]).unwrap();
        assert_eq!(plan.hbone, vec![2, 3, 5]);
        assert_eq!(plan.load, vec![7, 11, 13, 17]);
        assert_eq!(plan.steps, vec![1, 2, 3]);
    }
}
