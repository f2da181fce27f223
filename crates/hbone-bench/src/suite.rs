//! The bench from start to end: start the deployment, run each workload
//! `runs` times (direct, then through hbone, alternating so that drift in
//! background load touches both alike), then print the table and write the
//! Markdown file.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::child::Proc;
use super::load::Workload;
use super::markdown::{self, Document};
use super::report::{self, number, percent};
use super::results::{Metric, Results};
use super::runner::{self, RESULT_GRACE, RoundTrips, conn_rate, gbits, run_load};
use super::sample;
use super::stack::{
    Apps, ClientSide, Entry, Listening, Pki, Route, WorkDir, start_gateway, start_gateway_forward,
    start_server,
};
use super::targets;
use super::wire::Fields;
use super::{EntryKind, Options, machine};

/// How a run reaches the app, for progress and error messages.
const DIRECT: &str = "direct";
const TUNNEL: &str = "through hbone";
/// Open files a process needs besides one per idle tunnel: HTTP/2
/// connections (one per 100 tunnels), listeners, logs.
const SPARE_FILES: u64 = 256;

pub fn run(options: &Options, dir: &WorkDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let date = machine::now_utc();
    let load_before = machine::load_average();
    check_open_files(options.tunnels)?;
    let pki = Pki::write(dir.path()).context("cannot create the bench identities")?;
    let apps = Apps::start()?;
    let flags = &options.child_flags();
    let server = start_server(&pki, flags)?;
    let clients = ClientSide::start(options.entry, &pki, server.addr, &apps, flags)?;
    eprintln!(
        "hbone bench: {} run(s) of {} ms per workload, {} idle tunnels, entry {}, build {}",
        options.runs,
        options.duration.as_millis(),
        options.tunnels,
        options.entry.name(),
        machine::build_profile()
    );
    let mut bench = Bench {
        options,
        pki,
        apps,
        server,
        clients,
        results: Results::default(),
        logged: Vec::new(),
        started,
    };
    bench.bulk(1, Metric::Bulk1)?;
    bench.bulk(8, Metric::Bulk8)?;
    bench.req_resp()?;
    bench.connections()?;
    bench.handshakes()?;
    bench.gateway(dir.path())?;
    bench.idle()?;
    let mut logged = std::mem::take(&mut bench.logged);
    let mut watched = vec![&bench.server.proc, &bench.apps.proc];
    watched.extend(bench.clients.pooled.iter().map(|e| &e.listening.proc));
    watched.push(&bench.clients.no_pool.listening.proc);
    logged.extend(watched.iter().filter_map(|proc| proc.problem_summary()));

    let verdicts = targets::judge(&bench.results, options.tunnels);
    let heading = format!(
        "hbone bench: median of {} run(s), min–max in parentheses; {} ms per run; entry {}; {} build",
        options.runs,
        options.duration.as_millis(),
        options.entry.name(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    print!(
        "{}",
        report::render(&heading, &bench.results, &verdicts, &logged)
    );
    if let Some(path) = &options.write {
        let doc = Document {
            options,
            results: &bench.results,
            verdicts: &verdicts,
            logged: &logged,
            date,
            elapsed: started.elapsed(),
            load_before,
            load_after: machine::load_average(),
        };
        markdown::write(path, &doc)?;
        eprintln!("hbone bench: wrote {}", path.display());
    }
    Ok(())
}

/// Every process of the bench holds about one socket per idle tunnel.
fn check_open_files(tunnels: u32) -> anyhow::Result<()> {
    let needed = u64::from(tunnels) + SPARE_FILES;
    let limit = machine::open_file_limit();
    if limit < needed {
        bail!(
            "{tunnels} idle tunnels need about {needed} open files per process, but the limit \
             is {limit}; lower --tunnels or raise the hard limit (ulimit -Hn)"
        );
    }
    Ok(())
}

struct Bench<'a> {
    options: &'a Options,
    pki: Pki,
    apps: Apps,
    server: Listening,
    clients: ClientSide,
    results: Results,
    /// Problems logged by processes that have already been stopped.
    logged: Vec<String>,
    /// For the elapsed time shown with each progress line.
    started: Instant,
}

impl Bench<'_> {
    /// Bulk to the sink; with one stream, also the CPU the server and the
    /// entry spend per GB.
    fn bulk(&mut self, streams: usize, metric: Metric) -> anyhow::Result<()> {
        let sink = self.apps.sink;
        let entry = self.clients.entry_for(sink)?;
        let tunnel = entry.route(sink);
        let pids = [self.server.proc.pid(), entry.listening.proc.pid()];
        let extra = ["--streams".to_owned(), streams.to_string()];
        for run in 1..=self.options.runs {
            let direct = gbits(&self.load(Workload::Bulk, DIRECT, Route::direct(sink), &extra)?)?;
            let cpu_before = sample::total_cpu_seconds(&pids)?;
            let fields = self.load(Workload::Bulk, TUNNEL, tunnel, &extra)?;
            let cpu = sample::total_cpu_seconds(&pids)? - cpu_before;
            let through = gbits(&fields)?;
            self.results.direct(metric, direct);
            self.results.tunnel(metric, through);
            let mut line = format!(
                "direct {} Gbit/s, hbone {} Gbit/s ({})",
                number(direct),
                number(through),
                percent(through / direct * 100.0)
            );
            if streams == 1 {
                let per_gb = cpu / (fields.positive("bytes")? / 1e9);
                self.results.tunnel(Metric::CpuPerGb, per_gb);
                line += &format!(", CPU {} s/GB", number(per_gb));
            }
            self.progress(metric, run, &line);
        }
        Ok(())
    }

    fn req_resp(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        let tunnel = self.clients.entry_for(echo)?.route(echo);
        for run in 1..=self.options.runs {
            let direct = self.load(Workload::ReqResp, DIRECT, Route::direct(echo), &[])?;
            let direct = RoundTrips::from(&direct)?;
            let through = RoundTrips::from(&self.load(Workload::ReqResp, TUNNEL, tunnel, &[])?)?;
            let pairs = [
                (Metric::ReqRate, direct.rate, through.rate),
                (Metric::ReqP50, direct.p50, through.p50),
                (Metric::ReqP99, direct.p99, through.p99),
            ];
            for (metric, d, t) in pairs {
                self.results.direct(metric, d);
                self.results.tunnel(metric, t);
            }
            self.progress(
                Metric::ReqRate,
                run,
                &format!("direct {direct}; hbone {through}"),
            );
        }
        Ok(())
    }

    fn connections(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        let tunnel = self.clients.entry_for(echo)?.route(echo);
        for run in 1..=self.options.runs {
            let direct =
                conn_rate(&self.load(Workload::Connect, DIRECT, Route::direct(echo), &[])?)?;
            let through = conn_rate(&self.load(Workload::Connect, TUNNEL, tunnel, &[])?)?;
            self.results.direct(Metric::ConnRate, direct);
            self.results.tunnel(Metric::ConnRate, through);
            let line = format!(
                "direct {}/s, hbone {}/s ({})",
                number(direct),
                number(through),
                percent(through / direct * 100.0)
            );
            self.progress(Metric::ConnRate, run, &line);
        }
        Ok(())
    }

    /// The connection workload through the entry with pooling off: each
    /// connection costs a full mTLS and HTTP/2 handshake.
    fn handshakes(&mut self) -> anyhow::Result<()> {
        let echo = self.apps.echo;
        let route = self.clients.no_pool.route(echo);
        for run in 1..=self.options.runs {
            let side = "through hbone, no pool";
            let rate = conn_rate(&self.load(Workload::Connect, side, route, &[])?)?;
            self.results.tunnel(Metric::Handshakes, rate);
            self.progress(Metric::Handshakes, run, &format!("{}/s", number(rate)));
        }
        Ok(())
    }

    /// The connection workload through `hbone gateway` (double HBONE),
    /// with inner connections pooled and, as ztunnel does, fresh for each.
    fn gateway(&mut self, dir: &std::path::Path) -> anyhow::Result<()> {
        let flags = &self.options.child_flags();
        let echo = self.apps.echo;
        let mut gateway = start_gateway(&self.pki, dir, self.server.addr, flags)?;
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
        for run in 1..=self.options.runs {
            for (metric, entry) in entries.iter_mut() {
                let route = Route::direct(entry.addr);
                let mut watched: Vec<&mut Proc> = vec![
                    &mut self.server.proc,
                    &mut self.apps.proc,
                    &mut gateway.proc,
                    &mut entry.proc,
                ];
                let fields = run_load(
                    self.options,
                    Workload::Connect,
                    "via gateway",
                    route,
                    &[],
                    &mut watched,
                )?;
                let rate = conn_rate(&fields)?;
                self.results.tunnel(*metric, rate);
                self.progress(*metric, run, &format!("{}/s", number(rate)));
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
    /// so that memory the allocator kept from earlier workloads cannot
    /// absorb the tunnels.
    fn idle(&mut self) -> anyhow::Result<()> {
        let n = self.options.tunnels;
        let limit = RESULT_GRACE * 2 + Duration::from_millis(10) * n;
        let (flags, echo) = (&self.options.child_flags(), self.apps.echo);
        for run in 1..=self.options.runs {
            let mut server = start_server(&self.pki, flags)?;
            let mut entry = Entry::start(
                EntryKind::Forward,
                &self.pki,
                server.addr,
                echo,
                true,
                flags,
            )?;
            let pids = [server.proc.pid(), entry.listening.proc.pid()];
            std::thread::sleep(self.options.settle);
            let before = rss_kib(&pids)?;
            let extra = ["--tunnels".to_owned(), n.to_string()];
            let args = runner::load_args(Workload::Idle, entry.route(echo), self.options, &extra);
            let mut load = Proc::spawn("load generator (idle, through hbone)", &args)?;
            let opened = load
                .next_line(limit)
                .and_then(|line| Fields::parse(&line))
                .map_err(|e| {
                    runner::explain(e, &mut [&mut server.proc, &mut entry.listening.proc])
                })?;
            std::thread::sleep(self.options.settle);
            let after = rss_kib(&pids)?;
            load.close_stdin();
            load.wait_success(limit)?;
            let grown = [after[0] - before[0], after[1] - before[1]];
            let per_tunnel = (grown[0] + grown[1]) / f64::from(n);
            self.results.tunnel(Metric::KbPerTunnel, per_tunnel);
            let line = format!(
                "{n} open in {:.1} s; server +{:.1} MiB, entry +{:.1} MiB: {} KB per tunnel",
                opened.positive("seconds")?,
                grown[0] / 1024.0,
                grown[1] / 1024.0,
                number(per_tunnel)
            );
            self.progress(Metric::KbPerTunnel, run, &line);
            for proc in [&server.proc, &entry.listening.proc] {
                if let Some(summary) = proc.problem_summary() {
                    self.logged.push(format!("idle run {run}, {summary}"));
                }
            }
        }
        Ok(())
    }

    /// One load generator run, watching every process under test.
    fn load(
        &mut self,
        workload: Workload,
        side: &str,
        route: Route,
        extra: &[String],
    ) -> anyhow::Result<Fields> {
        let mut watched: Vec<&mut Proc> = vec![&mut self.server.proc, &mut self.apps.proc];
        watched.extend(self.clients.procs_mut());
        run_load(self.options, workload, side, route, extra, &mut watched)
    }

    fn progress(&self, metric: Metric, run: u32, line: &str) {
        let runs = self.options.runs;
        let elapsed = self.started.elapsed().as_secs();
        eprintln!(
            "  [{:>2}m{:02}s] {} [run {run}/{runs}]: {line}",
            elapsed / 60,
            elapsed % 60,
            metric.label()
        );
    }
}

fn rss_kib(pids: &[u32; 2]) -> anyhow::Result<[f64; 2]> {
    Ok([
        sample::rss_kib(pids[0])? as f64,
        sample::rss_kib(pids[1])? as f64,
    ])
}
