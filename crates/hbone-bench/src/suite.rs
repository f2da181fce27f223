//! The bench from start to end: start the deployment (the server and the
//! entries once apart and once in one process), run each workload `runs`
//! times (direct, then through hbone in each topology, alternating so that
//! drift in background load touches all alike) with the proxies' counters
//! read around each tunnelled run, then print the tables and write the
//! Markdown file.

mod bare_relays;
mod capture;
mod isolation;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::child::Proc;
use super::cost::{Cost, Costs, Meter, NO_PERF};
use super::load::Workload;
use super::markdown::{self, Document};
use super::perf::Syscalls;
use super::report::{self, Measured, number, percent};
use super::results::{Capture, Isolation, Metric, Results, Topology};
use super::runner::{self, RESULT_GRACE, RoundTrips, conn_rate, gbits, run_load};
use super::sample;
use super::stack::{
    Apps, BareRelays, EntrySpec, Pki, Proxies, Route, WorkDir, entry_specs, start_gateway,
    start_gateway_forward,
};
use super::targets;
use super::wire::Fields;
use super::{EntryKind, Options, Part, cross_cpu, machine};

/// How a run reaches the app, for progress and error messages.
const DIRECT: &str = "direct";
const TUNNEL: &str = "through hbone";
/// The extra run that counts each syscall of hbone's mix.
const HBONE_MIX: &str = "through hbone, counting each syscall";
/// Open files a process needs besides one per idle tunnel: HTTP/2
/// connections (one per 100 tunnels), listeners, logs.
const SPARE_FILES: u64 = 256;

pub fn run(options: &Options, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let load_before = machine::load_average();
    let (joined_tunnels, joined_note) = check_open_files(options.tunnels)?;
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    let apps = Apps::start()?;
    let flags = &options.child_flags();
    let specs = entry_specs(options.entry, &apps);
    let split = Proxies::start_split(&specs, &pki, flags)?;
    let joined = Proxies::start_joined(&specs, &pki, dir.path(), flags)?;
    let per_core = Proxies::start(Topology::JoinedPerCore, &specs, &pki, dir.path(), flags)?;
    let bare_relays = match options.runs_part(Part::Bulk) || options.runs_part(Part::ReqResp) {
        true => vec![
            BareRelays::start(&apps, false)?,
            BareRelays::start(&apps, true)?,
        ],
        false => Vec::new(),
    };
    let syscalls = Syscalls::probe(apps.proc.pid(), dir.path(), options.quick);
    eprintln!(
        "hbone bench: {} run(s) of {} ms per workload, {} idle tunnels, entry {}, build {}; {}",
        options.runs,
        options.duration.as_millis(),
        options.tunnels,
        options.entry.name(),
        machine::build_profile(),
        match &syscalls {
            Syscalls::Counted { .. } => "syscalls counted with perf".to_owned(),
            Syscalls::Unavailable(why) => format!("syscalls: {NO_PERF} ({why})"),
        }
    );
    let mut bench = Bench {
        options,
        pki,
        dir: dir.path().to_owned(),
        apps,
        split,
        joined,
        per_core,
        bare_relays,
        results: Results::default(),
        isolation: Isolation::default(),
        isolation_notes: Vec::new(),
        capture: Capture::default(),
        costs: Costs::default(),
        syscalls,
        joined_tunnels,
        notes: Vec::from_iter(joined_note),
        logged: Vec::new(),
        started,
    };
    if options.runs_part(Part::Bulk) {
        bench.bulk(1, Metric::Bulk1)?;
        bench.bulk(8, Metric::Bulk8)?;
    }
    if options.runs_part(Part::ReqResp) {
        bench.req_resp()?;
    }
    if options.runs_part(Part::Connections) {
        bench.connections()?;
    }
    if options.runs_part(Part::Handshakes) {
        bench.handshakes()?;
    }
    if options.runs_part(Part::Gateway) {
        bench.gateway()?;
    }
    if options.runs_part(Part::Isolation) {
        bench.isolation()?;
    }
    if options.runs_part(Part::Idle) {
        bench.idle()?;
    }
    if options.runs_part(Part::Capture) {
        bench.capture()?;
    }
    let mut logged = std::mem::take(&mut bench.logged);
    let mut watched = vec![&bench.apps.proc];
    watched.extend(&bench.split.procs);
    watched.extend(&bench.joined.procs);
    watched.extend(&bench.per_core.procs);
    watched.extend(bench.bare_relays.iter().map(|relays| &relays.proc));
    logged.extend(watched.iter().filter_map(|proc| proc.problem_summary()));

    let verdicts = targets::judge(
        &targets::Judged {
            results: &bench.results,
            isolation: &bench.isolation,
            costs: &bench.costs,
            entry: options.entry,
            not_as_deployed: options.proxies_not_as_deployed(),
            tunnels: options.tunnels,
        },
        options.quick,
    );
    let measured = Measured {
        results: bench.results,
        costs: bench.costs,
        syscalls: bench.syscalls,
        notes: bench.notes,
        isolation: bench.isolation,
        isolation_notes: bench.isolation_notes,
        capture: bench.capture,
    };
    let heading = format!(
        "hbone bench: median of {} run(s), min–max in parentheses; {} ms per run; entry {}; {} build",
        options.runs,
        options.duration.as_millis(),
        options.entry.name(),
        env!("HBONE_BENCH_PROFILE")
    );
    print!(
        "{}",
        report::render(&heading, &measured, &verdicts, &logged)
    );
    if let Some(path) = &options.write {
        let doc = Document {
            options,
            measured: &measured,
            verdicts: &verdicts,
            logged: &logged,
            date,
            elapsed: started.elapsed(),
            load_before,
            load_after: machine::load_average(),
            cross_cpu: &cross_cpu::take(),
        };
        markdown::write(path, &doc)?;
        eprintln!("hbone bench: wrote {}", path.display());
    }
    Ok(())
}

/// The route of a new-connection run to `target`: through the pooled
/// entry that leads there, or through the pooled SOCKS5 entry.
fn connection_route(proxies: &Proxies, target: SocketAddr, socks5: bool) -> anyhow::Result<Route> {
    let entry = match socks5 {
        true => proxies.socks5_entry()?,
        false => proxies.entry_for(target)?,
    };
    Ok(entry.route(target))
}

/// The path of a tunnelled run in `topology`, in messages.
fn tunnel_side(topology: Topology) -> &'static str {
    match topology {
        Topology::Joined => "through hbone, one process",
        Topology::JoinedPerCore => "through hbone, one process, per-core",
        Topology::Split | Topology::Gateway => TUNNEL,
    }
}

/// Every process of the bench holds about one socket per idle tunnel, and
/// a process holding both the entry and the server two. The first is
/// needed. Where the limit cannot be raised for the second, the
/// one-process idle run opens as many tunnels as fit; returns how many,
/// with a note saying why when that is fewer.
fn check_open_files(tunnels: u32) -> anyhow::Result<(u32, Option<String>)> {
    let needed = u64::from(tunnels) + SPARE_FILES;
    let joined = 2 * u64::from(tunnels) + SPARE_FILES;
    let limit = machine::raise_open_file_limit(joined);
    if limit < needed {
        bail!(
            "{tunnels} idle tunnels need about {needed} open files per process, but the limit \
             is {limit}; lower --tunnels or raise the hard limit (ulimit -Hn)"
        );
    }
    if limit >= joined {
        return Ok((tunnels, None));
    }
    let fit = u32::try_from((limit - SPARE_FILES) / 2).unwrap_or(tunnels);
    let note = format!(
        "{}, 1 process: with {fit} tunnels, not {tunnels}: one process holds a socket on each \
         side of every tunnel, and the open-file limit is {limit} (the hard limit could not be \
         raised to {joined}; `ulimit -Hn` can)",
        Metric::KbPerTunnel.label()
    );
    Ok((fit, Some(note)))
}

struct Bench<'a> {
    options: &'a Options,
    pki: Pki,
    /// Where config files and perf's output go.
    dir: PathBuf,
    apps: Apps,
    /// The server and the entries, each in a process of its own.
    split: Proxies,
    /// The same in one `hbone run` process.
    joined: Proxies,
    /// The same under `--runtime per-core`.
    per_core: Proxies,
    /// Bare relays that only seal and open records, with a thread per
    /// direction and on one thread: the references for bulk and req/resp.
    /// Started only when one of those runs.
    bare_relays: Vec<BareRelays>,
    results: Results,
    /// The isolation workload's figures, and how they were measured where
    /// that differs from the usual.
    isolation: Isolation,
    isolation_notes: Vec<String>,
    /// The capture workload's figures, or why it was skipped.
    capture: Capture,
    costs: Costs,
    /// Whether perf counts syscalls (it may give up during the bench).
    syscalls: Syscalls,
    /// Idle tunnels the one-process run opens: fewer than asked where the
    /// open-file limit is too low for both sides in one process.
    joined_tunnels: u32,
    /// How figures were measured differently from the usual, and why.
    notes: Vec<String>,
    /// Problems logged by processes that have already been stopped.
    logged: Vec<String>,
    /// For the elapsed time shown with each progress line.
    started: Instant,
}

/// The topologies every main workload runs through, in this order after
/// its direct run.
const COMPARED: [Topology; 3] = [Topology::Split, Topology::Joined, Topology::JoinedPerCore];
/// The longest extra run that counts the syscall mix: counts per unit
/// need no more.
const MIX_DURATION: Duration = Duration::from_secs(1);

impl Bench<'_> {
    fn proxies(&self, topology: Topology) -> &Proxies {
        match topology {
            Topology::Joined => &self.joined,
            Topology::JoinedPerCore => &self.per_core,
            Topology::Split | Topology::Gateway => &self.split,
        }
    }

    /// Bulk to the sink; with one stream, also the CPU the server and the
    /// entries spend per GB.
    fn bulk(&mut self, streams: usize, metric: Metric) -> anyhow::Result<()> {
        let sink = self.apps.sink;
        let extra = ["--streams".to_owned(), streams.to_string()];
        for run in 1..=self.options.runs {
            let direct = gbits(&self.load(Workload::Bulk, DIRECT, Route::direct(sink), &extra)?)?;
            self.results.direct(metric, direct);
            let mut line = format!("direct {} Gbit/s", number(direct));
            for topology in COMPARED {
                let route = self.proxies(topology).entry_for(sink)?.route(sink);
                let (fields, cost) = self.metered(topology, Workload::Bulk, route, &extra)?;
                let through = gbits(&fields)?;
                self.results.tunnel(metric, topology, through);
                if streams == 1 {
                    // µs per MB is ms per GB.
                    self.results
                        .tunnel(Metric::CpuPerGb, topology, cost.cpu_us / 1000.0);
                }
                line += &format!(
                    "; {}: {} Gbit/s ({}), per MB {}",
                    topology.label(),
                    number(through),
                    percent(through / direct * 100.0),
                    cost.brief()
                );
                self.costs.push(metric, topology, cost);
            }
            for (label, fields, cost) in
                self.bare_relays_runs(metric, Workload::Bulk, sink, &extra)?
            {
                let through = gbits(&fields)?;
                line += &format!(
                    "; {label}: {} Gbit/s ({}), per MB {}",
                    number(through),
                    percent(through / direct * 100.0),
                    cost.brief()
                );
            }
            self.progress(metric, run, &line);
        }
        self.mixes(metric, Workload::Bulk, &extra, |p| {
            Ok(p.entry_for(sink)?.route(sink))
        })?;
        self.bare_relays_mixes(metric, Workload::Bulk, sink, &extra)
    }

    fn req_resp(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        for run in 1..=self.options.runs {
            let direct = self.load(Workload::ReqResp, DIRECT, Route::direct(echo), &[])?;
            let direct = RoundTrips::from(&direct)?;
            self.results.direct(Metric::ReqRate, direct.rate);
            self.results.direct(Metric::ReqP50, direct.p50);
            self.results.direct(Metric::ReqP99, direct.p99);
            let mut line = format!("direct {direct}");
            for topology in COMPARED {
                let route = self.proxies(topology).entry_for(echo)?.route(echo);
                let (fields, cost) = self.metered(topology, Workload::ReqResp, route, &[])?;
                let through = RoundTrips::from(&fields)?;
                self.results.tunnel(Metric::ReqRate, topology, through.rate);
                self.results.tunnel(Metric::ReqP50, topology, through.p50);
                self.results.tunnel(Metric::ReqP99, topology, through.p99);
                line += &format!(
                    "; {}: {through}, per request {}",
                    topology.label(),
                    cost.brief()
                );
                self.costs.push(Metric::ReqRate, topology, cost);
            }
            for (label, fields, cost) in
                self.bare_relays_runs(Metric::ReqRate, Workload::ReqResp, echo, &[])?
            {
                let through = RoundTrips::from(&fields)?;
                line += &format!("; {label}: {through}, per request {}", cost.brief());
            }
            self.progress(Metric::ReqRate, run, &line);
        }
        self.mixes(Metric::ReqRate, Workload::ReqResp, &[], |p| {
            Ok(p.entry_for(echo)?.route(echo))
        })?;
        self.bare_relays_mixes(Metric::ReqRate, Workload::ReqResp, echo, &[])
    }

    fn connections(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        for run in 1..=self.options.runs {
            let direct =
                conn_rate(&self.load(Workload::Connect, DIRECT, Route::direct(echo), &[])?)?;
            self.results.direct(Metric::ConnRate, direct);
            let mut line = format!("direct {}/s", number(direct));
            for (metric, socks5) in self.connection_entries() {
                if socks5 {
                    self.results.direct(metric, direct);
                    line += "; via SOCKS5";
                }
                for topology in COMPARED {
                    let route = connection_route(self.proxies(topology), echo, socks5)?;
                    let pids = self.proxies(topology).pids();
                    let side = match socks5 {
                        true => format!("{}, via SOCKS5", tunnel_side(topology)),
                        false => tunnel_side(topology).to_owned(),
                    };
                    let (fields, cost) =
                        self.metered_pids(&pids, &side, Workload::Connect, route, &[])?;
                    let through = conn_rate(&fields)?;
                    self.results.tunnel(metric, topology, through);
                    line += &format!(
                        "; {}: {}/s ({}), per tunnel {}",
                        topology.label(),
                        number(through),
                        percent(through / direct * 100.0),
                        cost.brief()
                    );
                    self.costs.push(metric, topology, cost);
                }
            }
            self.progress(Metric::ConnRate, run, &line);
        }
        for (metric, socks5) in self.connection_entries() {
            self.mixes(metric, Workload::Connect, &[], |p| {
                connection_route(p, echo, socks5)
            })?;
        }
        Ok(())
    }

    /// The new-connection runs: through the main entry, and where that is
    /// a forward, through a SOCKS5 entry too (`true`), the entry the
    /// targets on new tunnels are stated for.
    fn connection_entries(&self) -> Vec<(Metric, bool)> {
        match self.options.entry {
            EntryKind::Forward => vec![(Metric::ConnRate, false), (Metric::Socks5ConnRate, true)],
            EntryKind::Socks5 => vec![(Metric::ConnRate, false)],
        }
    }

    /// The connection workload through the entry with pooling off: each
    /// connection costs a full mTLS and HTTP/2 handshake.
    fn handshakes(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        for run in 1..=self.options.runs {
            let mut line = Vec::new();
            for topology in COMPARED {
                let route = self.proxies(topology).no_pool_for(echo)?.route(echo);
                let pids = self.proxies(topology).pids();
                let side = format!("{}, no pool", tunnel_side(topology));
                let (fields, cost) =
                    self.metered_pids(&pids, &side, Workload::Connect, route, &[])?;
                let rate = conn_rate(&fields)?;
                self.results.tunnel(Metric::Handshakes, topology, rate);
                line.push(format!(
                    "{}: {}/s, per tunnel {}",
                    topology.label(),
                    number(rate),
                    cost.brief()
                ));
                self.costs.push(Metric::Handshakes, topology, cost);
            }
            self.progress(Metric::Handshakes, run, &line.join("; "));
        }
        self.mixes(Metric::Handshakes, Workload::Connect, &[], |p| {
            Ok(p.no_pool_for(echo)?.route(echo))
        })
    }

    /// The connection workload through `hbone gateway` (double HBONE),
    /// with inner connections pooled and, as ztunnel does, fresh for each.
    fn gateway(&mut self) -> anyhow::Result<()> {
        let flags = &self.options.child_flags();
        let echo = self.apps.echo;
        let server = self.split.server;
        let mut gateway = start_gateway(&self.pki, &self.dir, server, flags)?;
        let mut entries = [
            (
                Metric::GatewayPooled,
                start_gateway_forward(&self.pki, gateway.addr, echo, true, flags)?,
            ),
            (
                Metric::GatewayFresh,
                start_gateway_forward(&self.pki, gateway.addr, echo, false, flags)?,
            ),
        ];
        // The server, the gateway and both entries: all the proxies of
        // double HBONE.
        let pids = [
            self.split.procs[0].pid(),
            gateway.proc.pid(),
            entries[0].1.proc.pid(),
            entries[1].1.proc.pid(),
        ];
        for run in 1..=self.options.runs {
            for (metric, entry) in entries.iter_mut() {
                let route = Route::direct(entry.addr);
                let meter = Meter::start(&pids, &mut self.syscalls, false, &self.dir)?;
                let mut watched: Vec<&mut Proc> = vec![
                    &mut self.split.procs[0],
                    &mut self.apps.proc,
                    &mut gateway.proc,
                    &mut entry.proc,
                ];
                let side = match metric {
                    Metric::GatewayPooled => "via gateway, inner pooled",
                    _ => "via gateway, fresh inner each",
                };
                let fields = run_load(
                    self.options,
                    Workload::Connect,
                    side,
                    route,
                    &[],
                    &mut watched,
                )?;
                let cost = meter
                    .finish(&mut self.syscalls)?
                    .per(runner::units(Workload::Connect, &fields)?);
                let rate = conn_rate(&fields)?;
                self.results.tunnel(*metric, Topology::Gateway, rate);
                let line = format!("{}/s, per tunnel {}", number(rate), cost.brief());
                self.costs.push(*metric, Topology::Gateway, cost);
                self.progress(*metric, run, &line);
            }
        }
        if self.syscalls.has_mix() {
            for (metric, entry) in entries.iter_mut() {
                let route = Route::direct(entry.addr);
                let mut also = [&mut gateway.proc, &mut entry.proc];
                let cost =
                    self.count_mix(&pids, HBONE_MIX, Workload::Connect, route, &[], &mut also)?;
                self.progress_mix(*metric, &mix_brief(&cost));
                self.costs.push_mix(*metric, Topology::Gateway, cost);
            }
        }
        for proc in [&gateway.proc, &entries[0].1.proc, &entries[1].1.proc] {
            if let Some(summary) = proc.problem_summary() {
                self.logged.push(summary);
            }
        }
        Ok(())
    }

    /// Memory per idle tunnel, on a fresh server and forward entry each run
    /// (in each topology) so that memory the allocator kept from earlier
    /// workloads cannot absorb the tunnels.
    fn idle(&mut self) -> anyhow::Result<()> {
        let (flags, echo) = (&self.options.child_flags(), self.apps.echo);
        let specs = [EntrySpec::new(EntryKind::Forward, echo, true)];
        for run in 1..=self.options.runs {
            for topology in COMPARED {
                let n = match topology {
                    Topology::Joined | Topology::JoinedPerCore => self.joined_tunnels,
                    Topology::Split | Topology::Gateway => self.options.tunnels,
                };
                let limit = RESULT_GRACE * 2 + Duration::from_millis(10) * n;
                let mut proxies = Proxies::start(topology, &specs, &self.pki, &self.dir, flags)?;
                let pids = proxies.pids();
                std::thread::sleep(self.options.settle);
                let before = rss_kib(&pids)?;
                let extra = ["--tunnels".to_owned(), n.to_string()];
                let route = proxies.entry_for(echo)?.route(echo);
                let args = runner::load_args(Workload::Idle, route, self.options, &extra);
                let mut load = Proc::spawn("load generator (idle, through hbone)", &args)?;
                let opened = load
                    .next_line(limit)
                    .and_then(|line| Fields::parse(&line))
                    .map_err(|e| {
                        let mut watched: Vec<&mut Proc> = proxies.procs.iter_mut().collect();
                        runner::explain(e, &mut watched)
                    })?;
                std::thread::sleep(self.options.settle);
                let after = rss_kib(&pids)?;
                load.close_stdin();
                load.wait_success(limit)?;
                let grown: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
                let per_tunnel = grown.iter().sum::<f64>() / f64::from(n);
                self.results
                    .tunnel(Metric::KbPerTunnel, topology, per_tunnel);
                let growth = match topology {
                    Topology::Joined | Topology::JoinedPerCore => {
                        format!("process +{:.1} MiB", grown[0] / 1024.0)
                    }
                    Topology::Split | Topology::Gateway => format!(
                        "server +{:.1} MiB, entry +{:.1} MiB",
                        grown[0] / 1024.0,
                        grown[1] / 1024.0
                    ),
                };
                let line = format!(
                    "{}: {n} open in {:.1} s; {growth}: {} KB per tunnel",
                    topology.label(),
                    opened.positive("seconds")?,
                    number(per_tunnel)
                );
                self.progress(Metric::KbPerTunnel, run, &line);
                for proc in &proxies.procs {
                    if let Some(summary) = proc.problem_summary() {
                        self.logged.push(format!("idle run {run}, {summary}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The untimed extra run of `workload` in each topology that counts
    /// each syscall of the mix; none where perf cannot.
    fn mixes(
        &mut self,
        metric: Metric,
        workload: Workload,
        extra: &[String],
        route: impl Fn(&Proxies) -> anyhow::Result<Route>,
    ) -> anyhow::Result<()> {
        if !self.syscalls.has_mix() {
            return Ok(());
        }
        let mut line = Vec::new();
        for topology in COMPARED {
            let route = route(self.proxies(topology))?;
            let pids = self.proxies(topology).pids();
            let cost = self.count_mix(&pids, HBONE_MIX, workload, route, extra, &mut [])?;
            line.push(format!("{}: {}", topology.label(), mix_brief(&cost)));
            self.costs.push_mix(metric, topology, cost);
        }
        self.progress_mix(metric, &line.join("; "));
        Ok(())
    }

    /// One run of [`MIX_DURATION`] at most with a perf counter per syscall
    /// of the mix on `pids`; `also` are processes beyond the usual to watch.
    fn count_mix(
        &mut self,
        pids: &[u32],
        side: &str,
        workload: Workload,
        route: Route,
        extra: &[String],
        also: &mut [&mut Proc],
    ) -> anyhow::Result<Cost> {
        let options = Options {
            duration: self.options.duration.min(MIX_DURATION),
            ..self.options.clone()
        };
        let meter = Meter::start(pids, &mut self.syscalls, true, &self.dir)?;
        let mut watched = self.watched();
        watched.extend(also.iter_mut().map(|proc| &mut **proc));
        let fields =
            runner::run_load_unprobed(&options, workload, side, route, extra, &mut watched)?;
        let usage = meter.finish(&mut self.syscalls)?;
        Ok(usage.per(runner::units(workload, &fields)?))
    }

    fn progress_mix(&self, metric: Metric, line: &str) {
        let elapsed = self.started.elapsed().as_secs();
        eprintln!(
            "  [{:>2}m{:02}s] {} [syscall mix]: {line}",
            elapsed / 60,
            elapsed % 60,
            metric.label()
        );
    }

    /// One tunnelled run in `topology`, with the counters of its server
    /// and entries read around it; returns its result and its cost per unit.
    fn metered(
        &mut self,
        topology: Topology,
        workload: Workload,
        route: Route,
        extra: &[String],
    ) -> anyhow::Result<(Fields, Cost)> {
        let pids = self.proxies(topology).pids();
        self.metered_pids(&pids, tunnel_side(topology), workload, route, extra)
    }

    /// One run of `workload` with the counters of `pids` read around it;
    /// returns its result and its cost per unit.
    fn metered_pids(
        &mut self,
        pids: &[u32],
        side: &str,
        workload: Workload,
        route: Route,
        extra: &[String],
    ) -> anyhow::Result<(Fields, Cost)> {
        let meter = Meter::start(pids, &mut self.syscalls, false, &self.dir)
            .map_err(|e| runner::explain(e, &mut self.watched()))?;
        let fields = self.load(workload, side, route, extra)?;
        let usage = meter
            .finish(&mut self.syscalls)
            .map_err(|e| runner::explain(e, &mut self.watched()))?;
        let cost = usage.per(runner::units(workload, &fields)?);
        Ok((fields, cost))
    }

    /// One load generator run, watching every process under test.
    fn load(
        &mut self,
        workload: Workload,
        side: &str,
        route: Route,
        extra: &[String],
    ) -> anyhow::Result<Fields> {
        let options = self.options;
        run_load(options, workload, side, route, extra, &mut self.watched())
    }

    /// The apps and every server and entry: the processes whose exit or
    /// warnings explain a failed run.
    fn watched(&mut self) -> Vec<&mut Proc> {
        let mut watched: Vec<&mut Proc> = vec![&mut self.apps.proc];
        watched.extend(self.split.procs.iter_mut());
        watched.extend(self.joined.procs.iter_mut());
        watched.extend(self.per_core.procs.iter_mut());
        watched.extend(self.bare_relays.iter_mut().map(|relays| &mut relays.proc));
        watched
    }

    fn progress(&self, metric: Metric, run: u32, line: &str) {
        self.progress_as(metric.label(), run, line);
    }

    /// A progress line for the figures of `what`.
    fn progress_as(&self, what: &str, run: u32, line: &str) {
        let runs = self.options.runs;
        let elapsed = self.started.elapsed().as_secs();
        eprintln!(
            "  [{:>2}m{:02}s] {what} [run {run}/{runs}]: {line}",
            elapsed / 60,
            elapsed % 60,
        );
    }
}

/// For a progress line: the syscalls per unit and the two most made.
fn mix_brief(cost: &Cost) -> String {
    let mut named: Vec<(&String, &f64)> = cost.mix.iter().collect();
    named.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: Vec<String> = named
        .iter()
        .take(2)
        .map(|(name, n)| format!("{name} {}", number(**n)))
        .collect();
    format!(
        "{} syscalls per unit ({})",
        cost.syscalls.map(number).unwrap_or_default(),
        top.join(", ")
    )
}

fn rss_kib(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter()
        .map(|&pid| Ok(sample::rss_kib(pid)? as f64))
        .collect()
}
