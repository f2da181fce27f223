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
//! connections, the order rotated every run so that drift in background
//! load touches both alike. On bulk and request/response the bare relays
//! (a thread per direction, and one thread with epoll) take their turns
//! too: what carrying the bytes as TLS records costs with nothing else in
//! the way, a floor for both builds. Both builds also run a second time
//! under `--runtime per-core` (unless `--proxy-runtime per-core` already
//! runs them so; an other build too old for the flag runs once), so that a
//! change is measured under each runtime, and each report says what the
//! choice of runtime is worth beside what the change of build is. The
//! report gives what each unit of work cost each, and their ratios to the
//! other build under the same runtime.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};

use super::child::Proc;
use super::cost::{BARE_RELAYS_LABEL, Cost, Meter, NO_PERF};
use super::cross_cpu::{self, Figure};
use super::load::Workload;
use super::machine::{self, Machine};
use super::perf::Syscalls;
use super::report::{cell, number, table};
use super::runner::{self, RoundTrips, run_load};
use super::stack::{Apps, BareRelays, DEFAULT_RUNTIME, Pki, Proxies, Route, WorkDir, entry_specs};
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
const HEADERS: [&str; 9] = [
    "work",
    "per",
    "build",
    "rate",
    "p50 (µs)",
    "CPU (µs)",
    "of it in the kernel",
    "context switches",
    "syscalls",
];

/// The two builds, in the table's order.
const THIS: &str = "this build";
/// This build again, under `--runtime per-core`.
const THIS_PER_CORE: &str = "this build, per-core";
const OTHER: &str = "other build";
/// The other build under `--runtime per-core`.
const OTHER_PER_CORE: &str = "other build, per-core";

/// What takes turns on a workload: a build's one process, or bare relays.
enum Contender<'a> {
    Build(&'static str, &'a mut Proxies),
    Reference(&'a mut BareRelays),
}

impl Contender<'_> {
    fn name(&self) -> &'static str {
        match self {
            Contender::Build(name, _) => name,
            Contender::Reference(relays) => relays.counted.label(),
        }
    }

    /// The processes counted, and the route to `target` through them.
    fn pids_and_route(&self, target: std::net::SocketAddr) -> anyhow::Result<(Vec<u32>, Route)> {
        Ok(match self {
            Contender::Build(_, proxies) => {
                (proxies.pids(), proxies.entry_for(target)?.route(target))
            }
            Contender::Reference(relays) => (vec![relays.proc.pid()], relays.route(target)?),
        })
    }

    fn procs(&mut self) -> Vec<&mut Proc> {
        match self {
            Contender::Build(_, proxies) => proxies.procs.iter_mut().collect(),
            Contender::Reference(relays) => vec![&mut relays.proc],
        }
    }
}

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
    // The entries of `--entry`'s kind only: the full bench's SOCKS5 entry
    // beside the forwards is not compared here, and older builds need not
    // know it.
    let specs: Vec<_> = entry_specs(options.entry, &apps)
        .into_iter()
        .filter(|spec| spec.kind == options.entry)
        .collect();
    let flags = options.child_flags();
    let mut this = Proxies::start_joined(&specs, &pki, dir.path(), &flags)?;
    let mut this_per_core = match flags.runtime == DEFAULT_RUNTIME {
        true => Some(Proxies::start_joined(
            &specs,
            &pki,
            dir.path(),
            &flags.per_core(),
        )?),
        false => None,
    };
    let mut that = Proxies::start_joined(&specs, &pki, dir.path(), &flags.of_binary(other))
        .with_context(|| {
            format!(
                "{} did not start as `hbone run --config FILE` (is it an hbone binary?)",
                other.display()
            )
        })?;
    // Builds older than `--runtime` do not start with it: they then run
    // once, and this build's per-core row is set against their default.
    let mut that_per_core = match this_per_core.is_some() {
        true => match Proxies::start_joined(
            &specs,
            &pki,
            dir.path(),
            &flags.of_binary(other).per_core(),
        ) {
            Ok(proxies) => Some(proxies),
            Err(e) => {
                eprintln!(
                    "hbone bench --against: {} does not run under --runtime per-core ({e:#}); \
                     it runs under its default only",
                    other.display()
                );
                None
            }
        },
        false => None,
    };
    let mut references = match options.runs_part(Part::Bulk) || options.runs_part(Part::ReqResp) {
        true => vec![
            BareRelays::start(&apps, false)?,
            BareRelays::start(&apps, true)?,
        ],
        false => Vec::new(),
    };
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
        let mut contenders = vec![Contender::Build(THIS, &mut this)];
        if let Some(per_core) = this_per_core.as_mut() {
            contenders.push(Contender::Build(THIS_PER_CORE, per_core));
        }
        contenders.push(Contender::Build(OTHER, &mut that));
        if let Some(per_core) = that_per_core.as_mut() {
            contenders.push(Contender::Build(OTHER_PER_CORE, per_core));
        }
        // New connections are hbone's work alone: the relays have no
        // pool, no streams to open.
        if workload != Workload::Connect {
            contenders.extend(references.iter_mut().map(Contender::Reference));
        }
        let mut turns: Vec<Vec<Turn>> = contenders.iter().map(|_| Vec::new()).collect();
        for run in 1..=options.runs {
            // Rotated every run: drift touches every contender alike.
            let count = contenders.len();
            let mut line = Vec::new();
            for slot in 0..count {
                let index = (slot + run as usize - 1) % count;
                let contender = &mut contenders[index];
                let turn = metered(
                    options,
                    contender,
                    &mut syscalls,
                    dir.path(),
                    workload,
                    target,
                    &extra,
                )?;
                line.push(format!(
                    "{}: {} {}, per {unit} {}",
                    contender.name(),
                    number(turn.rate.value),
                    turn.rate.unit,
                    turn.cost.brief()
                ));
                turns[index].push(turn);
            }
            eprintln!("  {label}, run {run}/{}: {}", options.runs, line.join("; "));
        }
        let names: Vec<_> = contenders.iter().map(Contender::name).collect();
        rows.extend(rows_of(label, unit, &names, &turns, &syscalls));
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

/// What one contender's run gave: its rate, its median round trip (on
/// request/response) and what each unit of work cost.
struct Turn {
    rate: Figure,
    p50: Option<f64>,
    cost: Cost,
}

/// One run of `workload` to `target` through `contender`, with its
/// counters read around it.
fn metered(
    options: &Options,
    contender: &mut Contender<'_>,
    syscalls: &mut Syscalls,
    dir: &Path,
    workload: Workload,
    target: std::net::SocketAddr,
    extra: &[String],
) -> anyhow::Result<Turn> {
    let (pids, route) = contender.pids_and_route(target)?;
    let side = format!("through the {}", contender.name());
    let mut watched = contender.procs();
    let meter =
        Meter::start(&pids, syscalls, false, dir).map_err(|e| runner::explain(e, &mut watched))?;
    let fields = run_load(options, workload, &side, route, extra, &mut watched)?;
    let usage = meter
        .finish(syscalls)
        .map_err(|e| runner::explain(e, &mut watched))?;
    let rate = runner::headline(workload, &fields)
        .with_context(|| format!("a {} run without a rate", workload.name()))?;
    let p50 = match workload {
        Workload::ReqResp => Some(RoundTrips::from(&fields)?.p50),
        _ => None,
    };
    Ok(Turn {
        rate,
        p50,
        cost: usage.per(runner::units(workload, &fields)?),
    })
}

/// A workload's rows: each contender's medians (with the spread), in
/// `names`' order, then each one's ratio to the other build's medians:
/// this build's per-core row to the other build's per-core row where
/// there is one, every other row to the other build's default.
fn rows_of(
    label: &str,
    unit: &str,
    names: &[&str],
    turns: &[Vec<Turn>],
    syscalls: &Syscalls,
) -> Vec<Vec<String>> {
    type Field = fn(&Turn) -> Option<f64>;
    let fields: [Field; 6] = [
        |t| Some(t.rate.value),
        |t| t.p50,
        |t| Some(t.cost.cpu_us),
        |t| Some(t.cost.kernel_us),
        |t| Some(t.cost.switches),
        |t| t.cost.syscalls,
    ];
    // The rate's unit, from any run: every run of a workload has the same.
    let rate_unit = turns.iter().flatten().next().map_or("", |t| t.rate.unit);
    let summary = |runs: &[Turn], field: Field| {
        let samples: Option<Vec<f64>> = runs.iter().map(field).collect();
        Summary::of(&samples.unwrap_or_default())
    };
    let mut rows = Vec::new();
    for (runs, name) in turns.iter().zip(names) {
        let mut row = vec![label.to_owned(), unit.to_owned(), (*name).to_owned()];
        for (column, field) in fields.into_iter().enumerate() {
            row.push(match (column, summary(runs, field)) {
                (0, rate) => format!("{} {rate_unit}", cell(rate)),
                // Only request/response has a round trip to time.
                (1, None) => "n/a".to_owned(),
                (_, None) if !syscalls.available() => NO_PERF.to_owned(),
                (_, other) => cell(other),
            });
        }
        rows.push(row);
    }
    let position = |wanted: &str| names.iter().position(|name| *name == wanted);
    for (runs, name) in turns.iter().zip(names) {
        if *name == OTHER || *name == OTHER_PER_CORE {
            continue;
        }
        let by = match position(OTHER_PER_CORE) {
            Some(at) if *name == THIS_PER_CORE => Some((at, "other, per-core")),
            _ => position(OTHER).map(|at| (at, "other")),
        };
        let Some((other, divisor)) = by else {
            continue;
        };
        let mut ratio = vec![
            label.to_owned(),
            unit.to_owned(),
            format!("{name} ÷ {divisor} (medians)"),
        ];
        for field in fields {
            let (this, other) = (summary(runs, field), summary(&turns[other], field));
            ratio.push(match (this, other) {
                (Some(this), Some(other)) if other.median > 0.0 => {
                    format!("{:.3}", this.median / other.median)
                }
                _ => "n/a".to_owned(),
            });
        }
        rows.push(ratio);
    }
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
         workload, {} ms each, the builds (and the references below) taking turns, their order \
         rotated every run; each figure is the median of the runs, with the lowest and highest \
         in parentheses.\n",
        started.elapsed().as_secs_f64(),
        options.runs,
        options.duration.as_millis(),
    );
    let _ = writeln!(
        out,
        "Each build runs as one `hbone run` process holding the server and the entries (entry: \
         {}); the figures are the rate the load generator saw (and on request/response its \
         median round trip), then what that process spent per unit of work: CPU time (utime + \
         stime from /proc), of it in the kernel (stime), context switches of its threads, and \
         syscalls (`perf stat -e raw_syscalls:sys_enter`). The apps and the load generator are \
         not counted. The ratio rows compare each with the other build, and only figures of \
         this run.\n",
        options.entry.name()
    );
    if report.contains(OTHER_PER_CORE) {
        out += "Each build runs twice: under the runtime the bench was given (work-stealing, \
                hbone's default), and under `--runtime per-core`, where each connection and \
                the tunnels it carries stay on one worker thread. The per-core rows compare \
                the builds under that runtime (their ratio divides by the other build's \
                per-core row), and say beside the default rows what the choice of runtime is \
                worth, in the same runs.\n\n";
    } else if report.contains(THIS_PER_CORE) {
        out += "This build runs twice: under the runtime the bench was given (work-stealing, \
                hbone's default), and under `--runtime per-core`, where each connection and \
                the tunnels it carries stay on one worker thread. The second row says what \
                the choice of runtime is worth, in the same runs (the other build does not \
                run per-core).\n\n";
    }
    if report.contains(BARE_RELAYS_LABEL) {
        out += "On bulk and request/response two references take their turns too, each one \
                process that is not hbone (`hbone bench relays`): an entry relay and a server \
                relay that carry the bytes between them as TLS 1.3 records sealed and opened \
                with AES-128-GCM and nothing else (no handshake, no HTTP/2, no copy of a \
                payload byte in user space), first with a blocking thread per direction of each \
                connection, then all on one thread that waits in edge-triggered epoll and \
                never reads only to learn EAGAIN. They show what the sockets, the cipher and \
                the wake-ups cost with nothing else in the way: a floor under both builds on \
                this machine, measured in the same runs.\n\n";
    }
    out += report;
    if let Syscalls::Unavailable(why) = syscalls {
        let _ = writeln!(out, "\nSyscalls: {NO_PERF} ({why}).");
    }
    out += "\n## Circumstances\n\n";
    out += &machine.markdown_items();
    let probed = cross_cpu::take();
    let _ = writeln!(out, "{}", cross_cpu::machine_item(&probed));
    out += &cross_cpu::variation_item(&probed).unwrap_or_default();
    let _ = writeln!(out, "- this build: {}", machine::build_profile());
    let _ = writeln!(
        out,
        "- other build: `{}` ({other_version})",
        other.display()
    );
    let _ = writeln!(out, "- command:\n\n    {}", options.command);
    out
}
