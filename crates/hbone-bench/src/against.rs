//! `hbone bench --against OTHER`: this build against another hbone binary
//! (an older commit, the last release) in the same runs on the same
//! machine. A machine's speed can drift by tens of percent from one hour to
//! the next (a VM's neighbours, its host's caches), so a figure measured
//! another day says little about what a change did; two builds measured in
//! alternation, run by run, do.
//!
//! Each build runs as one `hbone run` process holding the server and the
//! entries (the bench's one-process topology); both are started once and
//! take turns on bulk (1 stream), 1 KiB request/response and new
//! connections, the order of the two swapped every run so that drift in
//! background load touches both alike. The report gives what each unit of
//! work cost each build, and their ratio.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};

use super::cost::{Cost, Meter, NO_PERF};
use super::load::Workload;
use super::machine::{self, Machine};
use super::perf::Syscalls;
use super::report::{cell, table};
use super::runner::{self, run_load};
use super::stack::{Apps, Pki, Proxies, Route, WorkDir, entry_specs};
use super::stats::Summary;
use super::{Options, Part};

/// The workloads compared: (`--only` part, label, unit, workload, extra
/// load generator arguments).
const COMPARED: [(Part, &str, &str, Workload, &[&str]); 3] = [
    (
        Part::Bulk,
        "bulk, 1 stream",
        "MB",
        Workload::Bulk,
        &["--streams", "1"],
    ),
    (
        Part::ReqResp,
        "1 KiB req/resp",
        "request",
        Workload::ReqResp,
        &[],
    ),
    (
        Part::Connections,
        "new conn + 1-byte echo",
        "tunnel",
        Workload::Connect,
        &[],
    ),
];

/// The table's columns.
const HEADERS: [&str; 7] = [
    "work",
    "per",
    "build",
    "CPU (µs)",
    "of it in the kernel",
    "context switches",
    "syscalls",
];

/// The two builds, in the table's order.
const THIS: &str = "this build";
const OTHER: &str = "other build";
const RATIO: &str = "this ÷ other (medians)";

pub fn run(options: &Options, other: &Path, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let other_version = version_of(other)?;
    let compared: Vec<_> = COMPARED
        .iter()
        .filter(|(part, ..)| options.runs_part(*part))
        .collect();
    if compared.is_empty() {
        bail!("--against compares bulk, req-resp and connections only; --only names none of them");
    }
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    let apps = Apps::start()?;
    let specs = entry_specs(options.entry, &apps);
    let flags = options.child_flags();
    let mut this = Proxies::start_joined(&specs, &pki, dir.path(), &flags)?;
    let mut that = Proxies::start_joined(&specs, &pki, dir.path(), &flags.of_binary(other))
        .with_context(|| {
            format!(
                "{} did not start as `hbone run --config FILE` (is it an hbone binary?)",
                other.display()
            )
        })?;
    let mut syscalls = Syscalls::probe(apps.proc.pid(), dir.path(), options.quick);
    eprintln!(
        "hbone bench --against {} ({other_version}): {} run(s) of {} ms per workload, each \
         build in one `hbone run` process; this build: {}",
        other.display(),
        options.runs,
        options.duration.as_millis(),
        machine::build_profile()
    );
    let mut rows = Vec::new();
    for &&(_, label, unit, workload, extra) in &compared {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let target = match workload {
            Workload::Bulk => apps.sink,
            _ => apps.echo,
        };
        let mut costs: [Vec<Cost>; 2] = [Vec::new(), Vec::new()];
        for run in 1..=options.runs {
            // Swapped every run: drift touches both builds alike.
            let order = if run % 2 == 1 { [0, 1] } else { [1, 0] };
            let mut line = Vec::new();
            for build in order {
                let proxies = if build == 0 { &mut this } else { &mut that };
                let route = proxies.entry_for(target)?.route(target);
                let cost = metered(
                    options,
                    proxies,
                    &mut syscalls,
                    dir.path(),
                    workload,
                    route,
                    &extra,
                )?;
                line.push(format!(
                    "{}: per {unit} {}",
                    [THIS, OTHER][build],
                    cost.brief()
                ));
                costs[build].push(cost);
            }
            eprintln!("  {label}, run {run}/{}: {}", options.runs, line.join("; "));
        }
        rows.extend(rows_of(label, unit, &costs, &syscalls));
    }
    let report = table(&HEADERS, &rows);
    println!("\nPer unit of work, the server and entries in one process, medians of the runs\n");
    println!("{report}");
    if let Syscalls::Unavailable(why) = &syscalls {
        println!("syscalls: {NO_PERF} ({why})");
    }
    if let Some(path) = &options.write {
        let doc = document(
            options,
            other,
            &other_version,
            &date,
            started,
            &report,
            &syscalls,
        );
        std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("hbone bench: wrote {}", path.display());
    }
    Ok(())
}

/// One run of `workload` through `proxies`, with their counters read
/// around it.
fn metered(
    options: &Options,
    proxies: &mut Proxies,
    syscalls: &mut Syscalls,
    dir: &Path,
    workload: Workload,
    route: Route,
    extra: &[String],
) -> anyhow::Result<Cost> {
    let pids = proxies.pids();
    let mut watched: Vec<_> = proxies.procs.iter_mut().collect();
    let meter =
        Meter::start(&pids, syscalls, false, dir).map_err(|e| runner::explain(e, &mut watched))?;
    let fields = run_load(
        options,
        workload,
        "through hbone",
        route,
        extra,
        &mut watched,
    )?;
    let usage = meter
        .finish(syscalls)
        .map_err(|e| runner::explain(e, &mut watched))?;
    Ok(usage.per(runner::units(workload, &fields)?))
}

/// A workload's rows: each build's medians (with the spread), then their
/// ratio.
fn rows_of(
    label: &str,
    unit: &str,
    costs: &[Vec<Cost>; 2],
    syscalls: &Syscalls,
) -> Vec<Vec<String>> {
    type Field = fn(&Cost) -> Option<f64>;
    let fields: [Field; 4] = [
        |c| Some(c.cpu_us),
        |c| Some(c.kernel_us),
        |c| Some(c.switches),
        |c| c.syscalls,
    ];
    let summary = |build: &[Cost], field: Field| {
        let samples: Option<Vec<f64>> = build.iter().map(field).collect();
        Summary::of(&samples.unwrap_or_default())
    };
    let mut rows = Vec::new();
    for (build, name) in costs.iter().zip([THIS, OTHER]) {
        let mut row = vec![label.to_owned(), unit.to_owned(), name.to_owned()];
        for field in fields {
            row.push(match summary(build, field) {
                None if !syscalls.available() => NO_PERF.to_owned(),
                other => cell(other),
            });
        }
        rows.push(row);
    }
    let mut ratio = vec![label.to_owned(), unit.to_owned(), RATIO.to_owned()];
    for field in fields {
        let (this, other) = (summary(&costs[0], field), summary(&costs[1], field));
        ratio.push(match (this, other) {
            (Some(this), Some(other)) if other.median > 0.0 => {
                format!("{:.3}", this.median / other.median)
            }
            _ => "n/a".to_owned(),
        });
    }
    rows.push(ratio);
    rows
}

/// What `OTHER --version` prints, which also proves it runs.
fn version_of(other: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(other)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} (--against)", other.display()))?;
    if !output.status.success() {
        bail!(
            "{} --version failed ({}): is it an hbone binary?",
            other.display(),
            output.status
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The Markdown report of `--write`.
fn document(
    options: &Options,
    other: &Path,
    other_version: &str,
    date: &str,
    started: Instant,
    report: &str,
    syscalls: &Syscalls,
) -> String {
    let machine = Machine::describe();
    let mut out = String::from("# hbone against another build\n\n");
    let _ = writeln!(
        out,
        "Measured with `hbone bench --against` on {date}; it took {:.0} s. {} run(s) of each \
         workload, {} ms each, the two builds taking turns (their order swapped every run); \
         each figure is the median of the runs, with the lowest and highest in parentheses.\n",
        started.elapsed().as_secs_f64(),
        options.runs,
        options.duration.as_millis(),
    );
    let _ = writeln!(
        out,
        "Each build runs as one `hbone run` process holding the server and the entries (entry: \
         {}); the figures are what that process spent per unit of work: CPU time (utime + stime \
         from /proc), of it in the kernel (stime), context switches of its threads, and \
         syscalls (`perf stat -e raw_syscalls:sys_enter`). The apps and the load generator are \
         not counted. Only the ratio row compares, and only figures of this run.\n",
        options.entry.name()
    );
    out += report;
    if let Syscalls::Unavailable(why) = syscalls {
        let _ = writeln!(out, "\nSyscalls: {NO_PERF} ({why}).");
    }
    out += "\n## Circumstances\n\n";
    out += &machine.markdown_items();
    let _ = writeln!(out, "- this build: {}", machine::build_profile());
    let _ = writeln!(
        out,
        "- other build: `{}` ({other_version})",
        other.display()
    );
    let _ = writeln!(out, "- command:\n\n    {}", options.command);
    out
}
