//! `hbone bench --long-path`: one bulk stream across a long path, with the
//! flow-control windows sized as hbone sizes them and with the largest
//! windows granted at once.
//!
//! A relay (`bench delay`, see `delay`) between the entry and the server
//! holds every byte for a fixed time each way, so HTTP/2's WINDOW_UPDATEs
//! and PINGs cross a round trip of twice that. Two servers sit behind
//! relays of each delay: one sizes its windows (the default, starting at
//! 64 KiB per stream), one runs with `--fixed-windows` (4 MiB per stream
//! and 16 MiB per connection from the start, as a proxy with fixed windows
//! grants). Each run is one bulk stream for the run's duration through a
//! forward entry that does not pool, so every run opens a connection and
//! starts from its first windows: the figure is what a transfer of that
//! length on a new connection gets, ramp included. The two kinds of
//! server take turns, the order swapped every run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::child::Proc;
use super::load::Workload;
use super::report::{cell, number, table};
use super::runner::{gbits, run_load};
use super::stack::{
    Apps, Entry, EntrySpec, Pki, Route, WorkDir, start_delay_relay, start_entry, start_server_with,
};
use super::stats::Summary;
use super::{EntryKind, Options};
use super::{cross_cpu, machine};

/// The delays each way; the round trip is twice each.
const DELAYS_MS: [u64; 2] = [5, 25];
/// With `--quick`, one.
const DELAYS_MS_QUICK: [u64; 1] = [25];

const HEADERS: [&str; 5] = [
    "round trip",
    "windows",
    "1 bulk stream (MB/s)",
    "÷ fixed windows",
    "MB moved per run",
];

/// The two kinds of server.
const KINDS: [Kind; 2] = [Kind::Sized, Kind::Fixed];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sized,
    Fixed,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Sized => "sized (default)",
            Kind::Fixed => "fixed, 4 MiB per stream",
        }
    }
}

/// One delay, and an entry to each kind of server behind relays of it.
struct Path {
    delay_ms: u64,
    entries: [Entry; 2],
}

pub fn run(options: &Options, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    let apps = Apps::start()?;
    let flags = options.child_flags();
    let mut procs: Vec<Proc> = vec![apps.proc];
    let mut servers = Vec::new();
    for kind in KINDS {
        let extra: &[&str] = match kind {
            Kind::Sized => &[],
            Kind::Fixed => &["--fixed-windows"],
        };
        let server = start_server_with(&pki, &flags, extra)?;
        servers.push(server.addr);
        procs.push(server.proc);
    }
    let delays: &[u64] = if options.quick {
        &DELAYS_MS_QUICK
    } else {
        &DELAYS_MS
    };
    let mut paths = Vec::new();
    for &delay_ms in delays {
        let mut entries = Vec::new();
        for server in &servers {
            let (relay, addr) = start_delay_relay(*server, Duration::from_millis(delay_ms))?;
            procs.push(relay);
            let spec = EntrySpec::new(EntryKind::Forward, apps.sink, false);
            let (entry_proc, entry) = start_entry(spec, &pki, addr, &flags)?;
            procs.push(entry_proc);
            entries.push(entry);
        }
        let entries: [Entry; 2] = entries
            .try_into()
            .map_err(|_| anyhow::anyhow!("two entries per path"))?;
        paths.push(Path { delay_ms, entries });
    }
    eprintln!(
        "hbone bench --long-path: round trips of {:?} ms, {} run(s) of {} ms each",
        delays.iter().map(|d| 2 * d).collect::<Vec<_>>(),
        options.runs,
        options.duration.as_millis()
    );
    let extra = vec!["--streams".to_owned(), "1".to_owned()];
    let mut rows = Vec::new();
    for path in &paths {
        // MB/s of each kind, in KINDS order.
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for run in 0..options.runs as usize {
            for turn in 0..KINDS.len() {
                let index = (turn + run) % KINDS.len();
                let entry = path.entries[index];
                let side = format!(
                    "{} ms round trip, {} windows",
                    2 * path.delay_ms,
                    KINDS[index].label()
                );
                let mut watched: Vec<&mut Proc> = procs.iter_mut().collect();
                let fields = run_load(
                    options,
                    Workload::Bulk,
                    &side,
                    Route::direct(entry.addr),
                    &extra,
                    &mut watched,
                )?;
                rates[index].push(gbits(&fields)? * 1e3 / 8.0);
            }
            eprintln!(
                "  {} ms round trip, run {}/{}: sized {} MB/s, fixed {} MB/s",
                2 * path.delay_ms,
                run + 1,
                options.runs,
                number(*rates[0].last().unwrap_or(&0.0)),
                number(*rates[1].last().unwrap_or(&0.0)),
            );
        }
        rows.extend(rows_of(path.delay_ms, &rates, options.duration));
    }
    let report = table(&HEADERS, &rows);
    println!(
        "\nOne bulk stream across a long path, a new connection each run, medians of the runs\n"
    );
    println!("{report}");
    if let Some(out) = &options.write {
        let doc = document(options, &date, started, &report);
        std::fs::write(out, doc).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("hbone bench: wrote {}", out.display());
    }
    Ok(())
}

/// The two rows of one delay: sized windows, then fixed ones.
fn rows_of(delay_ms: u64, rates: &[Vec<f64>; 2], duration: Duration) -> Vec<Vec<String>> {
    let fixed = Summary::of(&rates[1]).map(|s| s.median);
    KINDS
        .iter()
        .zip(rates)
        .map(|(kind, runs)| {
            let summary = Summary::of(runs);
            let ratio = match (summary, fixed) {
                (Some(s), Some(f)) if f > 0.0 => format!("{:.2}", s.median / f),
                _ => "n/a".to_owned(),
            };
            vec![
                format!("{} ms", 2 * delay_ms),
                kind.label().to_owned(),
                cell(summary),
                ratio,
                summary.map_or("n/a".to_owned(), |s| {
                    number(s.median * duration.as_secs_f64())
                }),
            ]
        })
        .collect()
}

/// The Markdown report for `--write`.
fn document(options: &Options, date: &str, started: Instant, report: &str) -> String {
    let mut out = String::from("# hbone across a long path\n\n");
    let _ = write!(
        out,
        "Generated by `hbone bench --long-path` on {date}, in {} s. One bulk stream through a \
         forward entry that opens a new connection for every run, to a server behind a relay \
         that holds every byte for half the round trip each way (loopback has no length of its \
         own). TCP under the relay runs at loopback speed; what the round trip holds back is \
         HTTP/2's flow control. *sized*: the server's default, windows that start at 64 KiB per \
         stream and grow fourfold on each filled round trip of a path this long, up to 4 MiB; *fixed*: `--fixed-windows`, 4 MiB \
         per stream and 16 MiB per connection from the start, what a proxy with fixed windows \
         grants. Each figure is the run's bytes over its length ({} ms), the ramp up included: \
         what a transfer of that length on a new connection gets. Medians of {} run(s), \
         min–max in brackets; the kinds take turns, the order swapped every run. Compare rows \
         of this file only.\n\n",
        started.elapsed().as_secs(),
        options.duration.as_millis(),
        options.runs,
    );
    out += report;
    out += &machine::circumstances(&options.command, &cross_cpu::take());
    out
}
