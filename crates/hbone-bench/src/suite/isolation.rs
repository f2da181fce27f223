//! The isolation workload: a 1 KiB request/response tunnel alone and
//! beside N bulk streams that go through the same entry and the same
//! server (the bulk streams share one pooled HTTP/2 connection; the
//! request/response, opened after them, gets one of its own); the
//! bulk streams' aggregate throughput beside it and alone; and the same
//! pairs direct (request/response to the echo app beside bulk streams to
//! the sink) as the baseline of the same run.
//!
//! A forward entry dials and pools for its one target, so the echo app and
//! the sink would each get a connection of their own. This workload runs
//! through one SOCKS5 entry, which serves both, whatever `--entry` says,
//! on a server and entry started for it alone in each topology.
//!
//! One pair, on each side: the bulk load generator starts with a limit far
//! beyond the run and is told to stop (its stdin closed) as soon as the
//! request/response run beside it is over, so the request/response never
//! runs without the bulk and the bulk runs without it only for the short
//! settle at its start. Then the same streams run alone for as long as
//! they ran beside it.

use std::time::Duration;

use anyhow::Context;

use super::{Bench, COMPARED, DIRECT};
use crate::child::Proc;
use crate::load::Workload;
use crate::report::{number, percent};
use crate::results::{IsoFigure, Topology};
use crate::runner::{self, EXIT_LIMIT, RESULT_GRACE, RoundTrips, gbits, run_load};
use crate::stack::{EntrySpec, Proxies, Route};
use crate::wire::Fields;
use crate::{EntryKind, Options};

/// Bulk streams beside the request/response.
const BESIDE: [u32; 3] = [1, 4, 16];
/// The same with `--quick`, to keep it short.
const BESIDE_QUICK: [u32; 1] = [4];
/// How long the bulk streams run before the request/response starts, so
/// that they are flowing when it does.
const SETTLE: Duration = Duration::from_millis(500);
const SETTLE_QUICK: Duration = Duration::from_millis(200);

/// The server and the SOCKS5 entry of this workload, in each topology.
struct Dedicated {
    split: Proxies,
    joined: Proxies,
    per_core: Proxies,
}

impl Dedicated {
    fn procs(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.split
            .procs
            .iter_mut()
            .chain(self.joined.procs.iter_mut())
            .chain(self.per_core.procs.iter_mut())
    }

    /// The routes to the echo app and to the sink, direct (`None`) or
    /// through the entry of a topology.
    fn routes(&self, side: Option<Topology>, bench: &Bench) -> anyhow::Result<(Route, Route)> {
        let (echo, sink) = (bench.apps.echo, bench.apps.sink);
        let proxies = match side {
            None => return Ok((Route::direct(echo), Route::direct(sink))),
            Some(Topology::Joined) => &self.joined,
            Some(Topology::JoinedPerCore) => &self.per_core,
            Some(Topology::Split | Topology::Gateway) => &self.split,
        };
        Ok((
            proxies.entry_for(echo)?.route(echo),
            proxies.entry_for(sink)?.route(sink),
        ))
    }
}

/// One request/response run beside bulk streams, and those streams alone.
struct Pair {
    trips: RoundTrips,
    /// Aggregate Gbit/s of the bulk streams beside the request/response.
    during: f64,
    /// The same streams alone, as long.
    alone: f64,
}

/// Direct, then through hbone in each topology.
const SIDES: [Option<Topology>; 4] = [
    None,
    Some(COMPARED[0]),
    Some(COMPARED[1]),
    Some(COMPARED[2]),
];

/// What a progress line reports on.
fn what(bulk: u32) -> String {
    match bulk {
        0 => "isolation: req/resp alone".to_owned(),
        n => format!("isolation: req/resp beside {n} bulk"),
    }
}

fn side_name(side: Option<Topology>) -> &'static str {
    side.map_or(DIRECT, Topology::label)
}

impl Bench<'_> {
    /// Runs the isolation workload `runs` times: each run measures the
    /// request/response alone, then beside each number of bulk streams,
    /// each on every side in turn.
    pub(super) fn isolation(&mut self) -> anyhow::Result<()> {
        let flags = &self.options.child_flags();
        let specs = [EntrySpec::new(EntryKind::Socks5, self.apps.sink, true)];
        let mut dedicated = Dedicated {
            split: Proxies::start_split(&specs, &self.pki, flags)?,
            joined: Proxies::start_joined(&specs, &self.pki, &self.dir, flags)?,
            per_core: Proxies::start(Topology::JoinedPerCore, &specs, &self.pki, &self.dir, flags)?,
        };
        let beside: &[u32] = if self.options.quick {
            self.isolation_notes.push(format!(
                "--quick: beside {} bulk streams only; without it, beside {}",
                BESIDE_QUICK[0],
                BESIDE.map(|n| n.to_string()).join(", ")
            ));
            &BESIDE_QUICK
        } else {
            &BESIDE
        };
        let result = self.isolation_runs(&mut dedicated, beside);
        for proc in dedicated.procs() {
            if let Some(summary) = proc.problem_summary() {
                self.logged.push(format!("isolation, {summary}"));
            }
        }
        result
    }

    fn isolation_runs(&mut self, dedicated: &mut Dedicated, beside: &[u32]) -> anyhow::Result<()> {
        for run in 1..=self.options.runs {
            let mut line = Vec::new();
            for side in SIDES {
                let (echo, _) = dedicated.routes(side, self)?;
                let options = self.options;
                let mut watched = self.watched();
                watched.extend(dedicated.procs());
                let fields = run_load(
                    options,
                    Workload::ReqResp,
                    side_name(side),
                    echo,
                    &[],
                    &mut watched,
                )?;
                let trips = RoundTrips::from(&fields)?;
                self.isolation.push(0, IsoFigure::P50, side, trips.p50);
                self.isolation.push(0, IsoFigure::P99, side, trips.p99);
                self.isolation.push(0, IsoFigure::Rate, side, trips.rate);
                line.push(format!("{}: {trips}", side_name(side)));
            }
            self.progress_as(&what(0), run, &line.join("; "));
            for &n in beside {
                let mut line = Vec::new();
                for side in SIDES {
                    let pair = self.pair(dedicated, side, n)?;
                    let kept = pair.during / pair.alone * 100.0;
                    self.isolation.push(n, IsoFigure::P50, side, pair.trips.p50);
                    self.isolation.push(n, IsoFigure::P99, side, pair.trips.p99);
                    self.isolation
                        .push(n, IsoFigure::Rate, side, pair.trips.rate);
                    self.isolation
                        .push(n, IsoFigure::BulkGbits, side, pair.during);
                    self.isolation.push(n, IsoFigure::BulkKept, side, kept);
                    line.push(format!(
                        "{}: {}; bulk {} Gbit/s, {} of {} alone",
                        side_name(side),
                        pair.trips,
                        number(pair.during),
                        percent(kept),
                        number(pair.alone)
                    ));
                }
                self.progress_as(&what(n), run, &line.join("; "));
            }
        }
        Ok(())
    }

    /// The request/response beside `n` bulk streams on one side, then the
    /// same streams alone for as long.
    fn pair(
        &mut self,
        dedicated: &mut Dedicated,
        side: Option<Topology>,
        n: u32,
    ) -> anyhow::Result<Pair> {
        let (echo, sink) = dedicated.routes(side, self)?;
        let settle = if self.options.quick {
            SETTLE_QUICK
        } else {
            SETTLE
        };
        let streams = ["--streams".to_owned(), n.to_string()];
        // Far beyond the run: it ends when told to.
        let limited = Options {
            duration: settle + self.options.duration + RESULT_GRACE,
            ..self.options.clone()
        };
        let mut until_told = streams.to_vec();
        until_told.push("--until-stdin-closes".to_owned());
        let name = format!("load generator (bulk beside req/resp, {})", side_name(side));
        let args = runner::load_args(Workload::Bulk, sink, &limited, &until_told);
        let mut bulk = Proc::spawn(&name, &args)?;
        std::thread::sleep(settle);
        let options = self.options;
        let mut watched = self.watched();
        watched.extend(dedicated.procs());
        watched.push(&mut bulk);
        let side_text = format!("beside {n} bulk, {}", side_name(side));
        let fields = runner::run_load_unprobed(
            options,
            Workload::ReqResp,
            &side_text,
            echo,
            &[],
            &mut watched,
        )?;
        let trips = RoundTrips::from(&fields)?;
        bulk.close_stdin();
        let during = bulk
            .next_line(RESULT_GRACE)
            .and_then(|line| {
                bulk.wait_success(EXIT_LIMIT)?;
                Fields::parse(&line).with_context(|| format!("{name} printed {line:?}"))
            })
            .map_err(|e| {
                let mut watched = self.watched();
                watched.extend(dedicated.procs());
                runner::explain(e, &mut watched)
            })?;
        let alone_for = Options {
            duration: Duration::from_secs_f64(during.positive("seconds")?),
            ..self.options.clone()
        };
        let mut watched = self.watched();
        watched.extend(dedicated.procs());
        let alone = run_load(
            &alone_for,
            Workload::Bulk,
            &format!("{n} bulk alone, {}", side_name(side)),
            sink,
            &streams,
            &mut watched,
        )?;
        Ok(Pair {
            trips,
            during: gbits(&during)?,
            alone: gbits(&alone)?,
        })
    }
}
