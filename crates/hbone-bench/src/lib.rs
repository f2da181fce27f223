//! `hbone bench`: throughput, latency, connection rate, handshake rate, CPU
//! and memory of HBONE tunnels, each measured directly against the target
//! application and through the tunnel in the same run, so the figures can
//! be compared on the machine at hand rather than against a number from
//! somewhere else; and what each unit of work (a MB, a request, a tunnel)
//! costs the hbone processes in CPU time, context switches, migrations and
//! syscalls, counts that a busy machine hardly moves.
//!
//! The apps, the server, the client entries and the load generator are
//! separate processes (this binary re-executed with hidden subcommands):
//! the load generator is single-threaded, and /proc gives each process's
//! memory and CPU time on its own. The server and the entries also run
//! together in one `hbone run` process, as ztunnel runs, and in another
//! under `--runtime per-core`; every main workload goes through all three.
//!
//! | file | concern |
//! |---|---|
//! | `suite` | the order of workloads and runs, progress on stderr |
//! | `against` | `--against`: this build and another, in the same runs |
//! | `scaling` | `--scaling`: the rate as hbone gets more CPUs, under each runtime |
//! | `long_path` | `--long-path`: one bulk stream across a long round trip, sized windows against fixed |
//! | `placement` | `--placement`: requests and new tunnels with every process on one CPU, and placed by the scheduler |
//! | `delay` | a relay that holds bytes for a fixed time each way (`bench delay`) |
//! | `suite/isolation` | req/resp alone and beside bulk through one SOCKS5 entry |
//! | `suite/bare_relays` | bulk and req/resp through the bare relays, metered as hbone is |
//! | `runner` | one load generator run, its figures, and what went wrong |
//! | `stack` | identities on disk and the processes under test, apart or in one |
//! | `child`, `childlog` | starting, reading and killing child processes |
//! | `apps` | the sink and echo applications (`bench apps`) |
//! | `bare_relays` | relays that only seal and open TLS records (`bench relays`), a reference |
//! | `bare_relays/event_loop` | the same relays on one thread with epoll (`--one-thread`) |
//! | `load`, `workloads` | the load generator (`bench load`) |
//! | `wire` | the load generator's `key=value` result line |
//! | `sample` | memory, CPU time, context switches and migrations from /proc |
//! | `cross_cpu` | how far apart two CPUs were around each run (a cache line's round trip) |
//! | `perf` | syscall counts from `perf stat` |
//! | `cost` | the counters around a run, and the cost per unit of work |
//! | `results`, `stats` | figures per metric, median and spread |
//! | `report`, `targets` | the table on stdout and the verdicts |
//! | `markdown`, `machine` | `--write`: the results with their circumstances |

mod against;
mod apps;
mod bare_relays;
mod child;
mod childlog;
mod cost;
mod cross_cpu;
mod delay;
mod load;
mod long_path;
mod machine;
mod markdown;
mod perf;
mod placement;
mod report;
mod results;
mod runner;
mod sample;
mod scaling;
mod stack;
mod stats;
mod suite;
mod targets;
mod wire;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use hbone::config::parse_duration;

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  hbone bench                              # 3 runs of 5 s per workload, 10,000 idle tunnels
  hbone bench --quick                      # smoke test: 1 short run of everything
  hbone bench --runs 5 --write BENCHMARKS.md
  hbone bench --only isolation             # one workload, e.g. while tuning it
  hbone bench --against ./hbone-before     # this build against another, same runs
  hbone bench --scaling --write docs/scaling.md   # the rate as hbone gets more CPUs
  hbone bench --long-path --write docs/long-path.md   # bulk across a long round trip
  hbone bench --placement --write docs/placement.md   # one CPU against the scheduler's choice

Build with --release for figures worth keeping, and run on a quiet machine: the apps,
the server, the entries and the load generator all share its cores. Everything listens
on 127.0.0.1 only; all processes started are stopped when the bench ends."
)]
pub struct BenchArgs {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// Runs of each workload; the report gives the median and min–max.
    /// [default: 3; with --quick: 1]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: Option<u32>,
    /// Length of each throughput, latency and connection-rate run.
    /// [default: 5s; with --quick: 500ms]
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Idle tunnels to hold open for the memory figure.
    /// [default: 10000; with --quick: 200]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    tunnels: Option<u32>,
    /// Pause before reading memory, before and after opening the idle tunnels.
    /// [default: 1s; with --quick: 200ms]
    #[arg(long, value_parser = parse_duration)]
    settle: Option<Duration>,
    /// A smoke test, not a measurement: 1 run, 500 ms per workload, 200 idle tunnels.
    #[arg(long)]
    quick: bool,
    /// How the load enters the tunnel. `forward`: a port per target, as
    /// transparent as ztunnel's captured traffic; `socks5`: one SOCKS5 entry,
    /// which adds its negotiation to every connection.
    #[arg(long, value_enum, default_value_t = EntryKind::Forward)]
    entry: EntryKind,
    /// Log filter for the server and entry processes. `info` writes one
    /// access-log line per tunnel, as a deployment would; `warn` measures
    /// without it.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    tunnel_log: String,
    /// Run the server and entries without their admin endpoint (no
    /// metrics, no open-tunnel list), to see what those cost. By default
    /// they run with it, as `hbone run` does.
    #[arg(long)]
    no_admin: bool,
    /// How the server, gateway and entry processes of the other columns
    /// schedule their work (their `--runtime`): `work-stealing`, their
    /// default, or `per-core`, where servers, gateways and entries keep each
    /// connection on one worker thread. The "1 process, per-core" column
    /// always runs per-core.
    #[arg(long, value_name = "RUNTIME", default_value = "work-stealing",
          value_parser = ["work-stealing", "per-core"])]
    proxy_runtime: String,
    /// Worker threads of each server, gateway and entry process (their
    /// `--threads`; default: theirs, one per CPU). Processes that share a
    /// machine each take one per CPU by default; this measures them with
    /// the CPUs split between them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    proxy_threads: Option<u16>,
    /// Streams the servers under test allow on one connection (their
    /// `--max-streams`; default: theirs, 200). Fewer spread the tunnels
    /// between one entry and one server over more pooled connections: with
    /// `--scaling`, it shows whether work-stealing keeps growing past a few
    /// CPUs once those tunnels no longer share one connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    server_max_streams: Option<u32>,
    /// Also write the results as Markdown to FILE, with the machine, the
    /// command and how much the runs varied.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// Run only these workloads (repeat the flag or separate with commas);
    /// the others' figures and targets are reported as missing. [default:
    /// all]
    #[arg(long, value_enum, value_delimiter = ',', value_name = "WORKLOAD")]
    only: Vec<Part>,
    /// Instead of the full bench: this build against another hbone binary
    /// (an older commit, the last release) in the same runs. Bulk (1
    /// stream), 1 KiB request/response and new connections go through one
    /// `hbone run` process of each build in turn; the report gives what
    /// each unit of work cost each build, and their ratio; each build also
    /// takes a turn under `--runtime per-core`, compared with the other's.
    /// Figures from another day do not compare; these do.
    #[arg(long, value_name = "BINARY")]
    against: Option<PathBuf>,
    /// Instead of the full bench: how the rate grows as hbone gets more
    /// CPUs. The load generators and the apps keep the upper half of the
    /// CPUs; one `hbone run` gets 1, 2, 4... of the lower half (as many
    /// worker threads), under each runtime, on new connections, 1 KiB
    /// request/response and bulk, beside direct TCP from the same
    /// generators. Linux, 2 CPUs at least; 4 or more to see growth. It
    /// sets the proxies' runtime and threads itself.
    #[arg(long, conflicts_with_all = ["against", "proxy_runtime", "proxy_threads"])]
    scaling: bool,
    /// Instead of the full bench: one bulk stream across a long path (a
    /// relay that holds every byte for 5 and 25 ms each way between the
    /// entry and the server), a new connection each run, to a server that
    /// sizes its flow-control windows and to one with `--fixed-windows`.
    #[arg(long, conflicts_with_all = ["against", "scaling", "only"])]
    long_path: bool,
    /// Instead of the full bench: 1 KiB request/response and new
    /// connections with every process of the path (apps, load generator,
    /// proxy) held to one CPU, beside the same processes placed by the
    /// scheduler, in the same runs: what the machine's cross-CPU wake-ups
    /// cost each unit of work. Direct TCP, one `hbone run` under each
    /// runtime, and the one-thread bare relays. Linux only. It sets the
    /// proxies' runtime and threads itself.
    #[arg(
        long,
        conflicts_with_all = ["against", "scaling", "long_path", "proxy_runtime", "proxy_threads"]
    )]
    placement: bool,
}

/// The bench's workloads, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Bulk throughput, 1 and 8 streams.
    Bulk,
    /// 1 KiB request/response.
    ReqResp,
    /// A new connection and a 1-byte echo per tunnel.
    Connections,
    /// A full mTLS and HTTP/2 handshake per tunnel (no pool).
    Handshakes,
    /// Double HBONE through a gateway.
    Gateway,
    /// Request/response beside bulk streams on one connection.
    Isolation,
    /// Memory per idle tunnel.
    Idle,
    /// An unmodified client's TCP captured by `hbone node`, beside a
    /// forward entry and direct TCP, between two network namespaces
    /// (needs root, `ip` and `nft`).
    Capture,
}

/// The processes the bench starts of itself; not for people.
#[derive(Subcommand)]
enum Internal {
    /// The sink and echo applications.
    #[command(hide = true)]
    Apps {
        /// The address they listen on.
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
        /// Echo listeners, each on a port of its own.
        #[arg(long, default_value_t = 1)]
        echoes: usize,
    },
    /// One workload of the load generator.
    #[command(hide = true)]
    Load(load::LoadArgs),
    /// A relay that holds every byte for `--delay` each way: a long path
    /// on loopback. Prints `delay=ADDR` once it listens.
    #[command(hide = true)]
    Delay {
        /// Where it relays to.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// How long each byte waits, each way.
        #[arg(long, value_parser = parse_duration)]
        delay: Duration,
    },
    /// Bare relays that only seal and open TLS records: an entry relay
    /// and a server relay for each `--to`, the reference beside hbone on
    /// the bulk and request/response workloads.
    #[command(hide = true)]
    Relays {
        /// Where a server relay forwards; repeat for more.
        #[arg(long, required = true)]
        to: Vec<std::net::SocketAddr>,
        /// All connections of both relays on one thread that waits in
        /// epoll, instead of a blocking thread per direction.
        #[arg(long)]
        one_thread: bool,
    },
}

/// Which client entry carries the load into the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EntryKind {
    Forward,
    Socks5,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Forward => "forward",
            EntryKind::Socks5 => "socks5",
        }
    }
}

/// The bench's settings, with `--quick` and the defaults resolved.
#[derive(Debug, Clone)]
pub struct Options {
    pub runs: u32,
    pub duration: Duration,
    pub tunnels: u32,
    pub settle: Duration,
    pub quick: bool,
    pub entry: EntryKind,
    pub tunnel_log: String,
    /// Server and entries run their admin endpoint.
    pub admin: bool,
    /// The proxies' `--runtime`.
    pub proxy_runtime: String,
    /// The proxies' `--threads`, if given.
    pub proxy_threads: Option<u16>,
    /// The servers' `--max-streams`, if given.
    pub server_max_streams: Option<u32>,
    pub write: Option<PathBuf>,
    /// The workloads to run; empty: all of them.
    pub only: Vec<Part>,
    /// The command line, as typed, for the report.
    pub command: String,
    /// Another hbone binary to compare this build with, instead of the
    /// full bench.
    pub against: Option<PathBuf>,
    /// Measure the rate as hbone gets more CPUs, instead of the full
    /// bench.
    pub scaling: bool,
    /// Measure bulk across a long path, instead of the full bench.
    pub long_path: bool,
    /// Measure requests and tunnels on one CPU and placed by the
    /// scheduler, instead of the full bench.
    pub placement: bool,
}

impl Options {
    /// Whether `part` is among the workloads to run.
    pub fn runs_part(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// The flags that run the proxies otherwise than as deployed (their
    /// default runtime and threads, admin endpoint on, one access-log line
    /// per tunnel), if any: targets stated for the proxies as deployed
    /// are not judged on such a run.
    pub fn proxies_not_as_deployed(&self) -> Option<String> {
        let mut flags = Vec::new();
        if self.proxy_runtime != "work-stealing" {
            flags.push(format!("--proxy-runtime {}", self.proxy_runtime));
        }
        if let Some(threads) = self.proxy_threads {
            flags.push(format!("--proxy-threads {threads}"));
        }
        if let Some(streams) = self.server_max_streams {
            flags.push(format!("--server-max-streams {streams}"));
        }
        if !self.admin {
            flags.push("--no-admin".to_owned());
        }
        if self.tunnel_log != "info" {
            flags.push(format!("--tunnel-log {}", self.tunnel_log));
        }
        (!flags.is_empty()).then(|| flags.join(" "))
    }

    /// How the server, gateway and entry processes are started.
    pub fn child_flags(&self) -> stack::ChildFlags {
        stack::ChildFlags {
            log: self.tunnel_log.clone(),
            admin: self.admin,
            runtime: self.proxy_runtime.clone(),
            threads: self.proxy_threads,
            server_max_streams: self.server_max_streams,
            binary: None,
            cpus: None,
        }
    }
}

impl BenchArgs {
    fn options(self) -> Options {
        let quick = self.quick;
        let pick = |given: Option<Duration>, normal: u64, short: u64| {
            given.unwrap_or(Duration::from_millis(if quick { short } else { normal }))
        };
        Options {
            runs: self.runs.unwrap_or(if quick { 1 } else { 3 }),
            duration: pick(self.duration, 5000, 500),
            tunnels: self.tunnels.unwrap_or(if quick { 200 } else { 10_000 }),
            settle: pick(self.settle, 1000, 200),
            quick,
            entry: self.entry,
            tunnel_log: self.tunnel_log,
            admin: !self.no_admin,
            proxy_runtime: self.proxy_runtime,
            proxy_threads: self.proxy_threads,
            server_max_streams: self.server_max_streams,
            write: self.write,
            only: self.only,
            command: machine::command_line(),
            against: self.against,
            scaling: self.scaling,
            long_path: self.long_path,
            placement: self.placement,
        }
    }
}

/// Runs `hbone bench` (or one of its hidden child roles). On Ctrl-C it
/// removes its identities, calls `flush_log` (the caller's buffered log
/// would be lost to `exit`) and exits with status 130.
pub async fn run(args: BenchArgs, flush_log: fn()) -> anyhow::Result<()> {
    match args.internal {
        Some(Internal::Apps { ip, echoes }) => apps::run(ip, echoes).await,
        Some(Internal::Load(load)) => load::run(load).await,
        Some(Internal::Delay { to, delay }) => delay::run(to, delay).await,
        Some(Internal::Relays { to, one_thread }) => {
            tokio::task::spawn_blocking(move || bare_relays::run(&to, one_thread))
                .await
                .context("the relays' thread failed")?
        }
        None => {
            let options = args.options();
            let dir = stack::WorkDir::create()?;
            let path = dir.path().to_owned();
            // The bench itself is a plain sequence of blocking steps on one
            // thread; children die with that thread (see `child`).
            let bench = tokio::task::spawn_blocking(move || match &options.against {
                Some(other) => against::run(&options, other, &dir),
                None if options.scaling => scaling::run(&options, &dir),
                None if options.long_path => long_path::run(&options, &dir),
                None if options.placement => placement::run(&options, &dir),
                None => suite::run(&options, &dir),
            });
            tokio::select! {
                result = bench => result.context("the bench thread failed")?,
                _ = tokio::signal::ctrl_c() => {
                    // Children got the same Ctrl-C from the terminal, and die
                    // with this process in any case; the identities must go.
                    let _ = std::fs::remove_dir_all(&path);
                    eprintln!("hbone bench: interrupted");
                    flush_log();
                    std::process::exit(130);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: super::BenchArgs,
    }

    fn options(args: &[&str]) -> super::Options {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .bench
            .options()
    }

    #[test]
    fn says_when_the_proxies_run_otherwise_than_deployed() {
        assert_eq!(options(&[]).proxies_not_as_deployed(), None);
        assert_eq!(options(&["--quick"]).proxies_not_as_deployed(), None);
        assert_eq!(
            options(&["--no-admin", "--proxy-threads", "1", "--tunnel-log", "warn"])
                .proxies_not_as_deployed()
                .as_deref(),
            Some("--proxy-threads 1 --no-admin --tunnel-log warn")
        );
        assert_eq!(
            options(&["--proxy-runtime", "per-core"])
                .proxies_not_as_deployed()
                .as_deref(),
            Some("--proxy-runtime per-core")
        );
    }
}
