//! One run of the load generator: its command line, its result, and when
//! it fails, what the processes under test were doing at the time.

use std::time::Duration;

use anyhow::Context;

use super::Options;
use super::child::Proc;
use super::cross_cpu;
use super::load::Workload;
use super::report::number;
use super::stack::Route;
use super::wire::Fields;

/// Time allowed beyond the run's duration for the load generator to
/// connect, drain and report.
pub const RESULT_GRACE: Duration = Duration::from_secs(30);
/// Time allowed for a load generator to exit after its result.
pub const EXIT_LIMIT: Duration = Duration::from_secs(10);
/// Problems logged by a watched process quoted in an error.
const PROBLEM_LINES: usize = 3;

/// Runs `workload` over `route` and returns its result line, probing how
/// far apart two CPUs were just before and after ([`cross_cpu`]). `side`
/// names the path in messages; `watched` are the processes whose death or
/// warnings explain a failure.
pub fn run_load(
    options: &Options,
    workload: Workload,
    side: &str,
    route: Route,
    extra: &[String],
    watched: &mut [&mut Proc],
) -> anyhow::Result<Fields> {
    run_load_in(None, options, workload, side, route, extra, watched)
}

/// [`run_load`] without the cross-CPU probes: for a run beside another
/// load generator (bulk beside requests), where a probe would time the
/// scheduler rather than a cache line and take CPU from the load beside,
/// and for runs whose figures are not reported (the syscall-mix runs).
pub fn run_load_unprobed(
    options: &Options,
    workload: Workload,
    side: &str,
    route: Route,
    extra: &[String],
    watched: &mut [&mut Proc],
) -> anyhow::Result<Fields> {
    load_result(None, options, workload, side, route, extra).map_err(|e| explain(e, watched))
}

/// [`run_load`] inside the network namespace `netns`, when one is given.
pub fn run_load_in(
    netns: Option<&str>,
    options: &Options,
    workload: Workload,
    side: &str,
    route: Route,
    extra: &[String],
    watched: &mut [&mut Proc],
) -> anyhow::Result<Fields> {
    let label = match extra {
        [] => format!("{} {side}", workload.name()),
        _ => format!("{} {side} ({})", workload.name(), extra.join(" ")),
    };
    let result = cross_cpu::around(
        label,
        || load_result(netns, options, workload, side, route, extra),
        |result| headline(workload, result.as_ref().ok()?),
    );
    result.map_err(|e| explain(e, watched))
}

/// Starts one load generator run and reads its result.
fn load_result(
    netns: Option<&str>,
    options: &Options,
    workload: Workload,
    side: &str,
    route: Route,
    extra: &[String],
) -> anyhow::Result<Fields> {
    let name = format!("load generator ({}, {side})", workload.name());
    let args = load_args(workload, route, options, extra);
    let mut load = Proc::spawn_in(netns, &name, &args)?;
    let line = load.next_line(options.duration + RESULT_GRACE)?;
    load.wait_success(EXIT_LIMIT)?;
    Fields::parse(&line).with_context(|| format!("{name} printed {line:?}"))
}

/// Runs one load generator of `workload` per route at once, each over its
/// own route, held to `cpus` (`--scaling`), and returns their result
/// lines.
pub fn run_loads_on(
    options: &Options,
    workload: Workload,
    side: &str,
    routes: &[Route],
    extra: &[String],
    cpus: &[usize],
    watched: &mut [&mut Proc],
) -> anyhow::Result<Vec<Fields>> {
    let count = routes.len();
    let result = (|| -> anyhow::Result<Vec<Fields>> {
        let mut loads = Vec::with_capacity(count);
        for (index, route) in (1..).zip(routes) {
            let name = format!(
                "load generator {index} of {count} ({}, {side})",
                workload.name()
            );
            let args = load_args(workload, *route, options, extra);
            loads.push((Proc::spawn_on(&name, &args, Some(cpus))?, name));
        }
        loads
            .iter_mut()
            .map(|(load, name)| {
                let line = load.next_line(options.duration + RESULT_GRACE)?;
                load.wait_success(EXIT_LIMIT)?;
                Fields::parse(&line).with_context(|| format!("{name} printed {line:?}"))
            })
            .collect()
    })();
    result.map_err(|e| explain(e, watched))
}

/// The command line of `hbone bench load` for one run.
pub fn load_args(
    workload: Workload,
    route: Route,
    options: &Options,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = ["bench", "load", "--log", "warn", "--workload"]
        .map(String::from)
        .to_vec();
    args.push(workload.name().to_owned());
    args.extend(["--addr".to_owned(), route.addr.to_string()]);
    if let Some(proxy) = route.socks5 {
        args.extend(["--socks5".to_owned(), proxy.to_string()]);
    }
    let millis = options.duration.as_millis();
    args.extend(["--duration".to_owned(), format!("{millis}ms")]);
    args.extend(extra.iter().cloned());
    args
}

/// Adds to a workload's error whether a watched process exited and the
/// warnings they logged: the usual reason a tunnelled run fails.
pub fn explain(error: anyhow::Error, watched: &mut [&mut Proc]) -> anyhow::Error {
    let mut notes = Vec::new();
    for proc in watched.iter_mut() {
        if let Err(e) = proc.check_running() {
            notes.push(format!("{e:#}"));
            continue;
        }
        let problems = proc.problems();
        if !problems.is_empty() {
            let last: Vec<&str> = problems
                .iter()
                .rev()
                .take(PROBLEM_LINES)
                .map(String::as_str)
                .collect();
            notes.push(format!("{} logged: {}", proc.name(), last.join(" / ")));
        }
    }
    if notes.is_empty() {
        error
    } else {
        anyhow::anyhow!("{error:#} (meanwhile {})", notes.join("; "))
    }
}

/// A run's one figure, for the cross-CPU probes' report and `--against`:
/// throughput, the rate of requests or of new connections.
pub fn headline(workload: Workload, fields: &Fields) -> Option<cross_cpu::Figure> {
    let (value, unit) = match workload {
        Workload::Bulk => (gbits(fields).ok()?, "Gbit/s"),
        Workload::ReqResp => (RoundTrips::from(fields).ok()?.rate, "req/s"),
        Workload::Connect => (conn_rate(fields).ok()?, "conn/s"),
        Workload::Idle => return None,
    };
    Some(cross_cpu::Figure { value, unit })
}

/// Throughput of a bulk run, in Gbit/s.
pub fn gbits(fields: &Fields) -> anyhow::Result<f64> {
    Ok(fields.positive("bytes")? * 8.0 / fields.positive("seconds")? / 1e9)
}

/// Completed connections per second of a connect run.
pub fn conn_rate(fields: &Fields) -> anyhow::Result<f64> {
    Ok(fields.positive("connections")? / fields.positive("seconds")?)
}

/// Units of work of a run for the per-unit costs: everything the load
/// generator did, warm-up included, since the proxies did it all. Bulk:
/// MB (10^6 bytes) delivered; req/resp: exchanges; connect: tunnels.
pub fn units(workload: Workload, fields: &Fields) -> anyhow::Result<f64> {
    Ok(match workload {
        Workload::Bulk => fields.positive("bytes")? / 1e6,
        Workload::ReqResp => fields.positive("requests")? + fields.positive("warmup")?,
        Workload::Connect => fields.positive("connections")? + fields.positive("warmup")?,
        Workload::Idle => fields.positive("open")?,
    })
}

/// The figures of one request/response run.
pub struct RoundTrips {
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
}

impl RoundTrips {
    pub fn from(fields: &Fields) -> anyhow::Result<RoundTrips> {
        Ok(RoundTrips {
            rate: fields.positive("requests")? / fields.positive("seconds")?,
            p50: fields.positive("p50_us")?,
            p99: fields.positive("p99_us")?,
        })
    }
}

impl std::fmt::Display for RoundTrips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} req/s, p50 {} µs, p99 {} µs",
            number(self.rate),
            number(self.p50),
            number(self.p99)
        )
    }
}
