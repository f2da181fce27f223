//! `--write FILE`: the results as Markdown, with what a reader needs to
//! trust or doubt them: the machine, the build, the exact command, how
//! busy the machine was and how far the runs disagreed. The headline is
//! the cost per unit of work, counted rather than timed. Only figures
//! measured in the same run are compared: direct TCP against the tunnel.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::Options;
use super::cost::{self, NO_PERF};
use super::cross_cpu;
use super::machine::{self, Machine};
use super::perf::Syscalls;
use super::report::{self, CAPTURE_HEADERS, HEADERS, ISOLATION_HEADERS, Measured};
use super::results::{Metric, Topology};
use super::targets::Verdict;

/// Everything the document reports.
pub struct Document<'a> {
    pub options: &'a Options,
    pub measured: &'a Measured,
    pub verdicts: &'a [Verdict],
    /// Problems the processes under test logged.
    pub logged: &'a [String],
    pub date: String,
    pub elapsed: Duration,
    pub load_before: String,
    pub load_after: String,
    /// The cross-CPU probes around every run.
    pub cross_cpu: &'a [cross_cpu::Around],
}

pub fn write(path: &Path, doc: &Document) -> anyhow::Result<()> {
    std::fs::write(path, render(doc)).with_context(|| format!("cannot write {}", path.display()))
}

fn render(doc: &Document) -> String {
    let o = doc.options;
    let m = doc.measured;
    let machine = Machine::describe();
    let mut out = String::from("# hbone benchmarks\n\n");
    let _ = writeln!(
        out,
        "Measured with `hbone bench` on {}; the whole bench took {:.0} s. {} run(s) of each \
         workload, {} ms each; each figure is the median of the runs, with the lowest and \
         highest in parentheses.\n",
        doc.date,
        doc.elapsed.as_secs_f64(),
        o.runs,
        o.duration.as_millis(),
    );
    out += "## Per unit of work\n\n";
    out += "What each unit of work costs the hbone processes (never the apps or the load \
            generator). Syscalls and context switches per unit are counts: they hardly move \
            when the machine is busy, unlike rates, and are the figures to compare across runs \
            and machines. CPU time per unit is a time, and moves with what else the machine's \
            cores and caches serve, and with what waking a sleeping thread on another CPU \
            costs there (*idle CPUs* under Machine says how its idle CPUs wait; `hbone bench \
            --placement` measures the share of it in a request). The bulk and request/response rows end with two references \
            measured in the same runs: two bare relays that do nothing but carry the bytes as \
            TLS records, first with a blocking thread per direction, then all on one thread \
            that waits in epoll. On bulk they show what the sockets and the cipher cost per MB \
            with nothing else in the way. On request/response the blocking relays need no \
            poll (a read and a write per hop) and pay for it in wake-ups, each hop waking \
            another thread; the one-thread relays show the least a readiness-driven proxy \
            holding both ends can do per request: a read and a write per hop, and an \
            `epoll_wait` each time readiness arrives.\n\n";
    out += &report::table(&cost::HEADERS, &m.costs.rows(&m.syscalls));
    out += "\n";
    out += PER_UNIT_METHOD;
    match &m.syscalls {
        Syscalls::Counted { .. } => out += PERF_METHOD,
        Syscalls::Unavailable(why) => {
            let _ = writeln!(out, "- syscalls: {NO_PERF} ({why}).");
        }
    }
    for note in cost::notes(&m.costs, &m.syscalls) {
        if !note.starts_with("syscalls:") {
            let _ = writeln!(out, "- {note}.");
        }
    }
    let mix = m.costs.mix_rows();
    if !mix.is_empty() {
        out += "\n### Where the syscalls go\n\n";
        out += "The syscalls made most per unit, counted with a perf counter per syscall \
                (`syscalls:sys_enter_NAME` tracepoints) in one extra run of each workload in \
                each topology, of 1 s at most and not timed; \"other\" is every syscall not \
                named.\n\n";
        out += &report::table(&cost::MIX_HEADERS, &mix);
    }
    out += "\n## Throughput, latency, memory\n\n";
    out += &report::table(&HEADERS, &report::rows(&m.results));
    if !m.notes.is_empty() {
        out += "\n";
    }
    for note in &m.notes {
        let _ = writeln!(out, "- {note}.");
    }
    out += "\nDirect and tunnelled figures come from the same run on the same machine; \
            compare the hbone/direct ratios more than the absolute numbers. \
            *2 processes*: `hbone server` and each entry in a process of its own (double \
            HBONE: the entry, `hbone gateway` and the server). *1 process*: `hbone run` with \
            the server and the entries in one process, as ztunnel runs. *1 process, per-core*: \
            the same under `--runtime per-core`, each connection the process accepts, with its \
            tunnels and the pooled connections they ride, on one single-threaded worker \
            (`--threads` of them, one per CPU).\n\n";
    let isolation = report::isolation_rows(&m.isolation);
    if !isolation.is_empty() {
        out += "## Latency isolation\n\n";
        out += ISOLATION_INTRO;
        out += &report::table(&ISOLATION_HEADERS, &isolation);
        if !m.isolation_notes.is_empty() {
            out += "\n";
        }
        for note in &m.isolation_notes {
            let _ = writeln!(out, "- {note}.");
        }
        out += "\n";
    }
    let capture = report::capture_rows(&m.capture);
    if !capture.is_empty() {
        out += "## Transparent capture\n\n";
        out += CAPTURE_INTRO;
        out += &report::table(&CAPTURE_HEADERS, &capture);
        out += "\n";
    }
    if let Some(why) = &m.capture.skipped {
        let _ = writeln!(out, "Transparent capture was not measured: {why}.\n");
    }
    out += "## Targets, judged on the medians\n\n";
    out += "Stated for the server and the entry in processes of their own (2 processes); \
            those on latency isolation and per unit of work for the server and the entry in one \
            process (1 process), as a node runs them, under the default runtime; those per new \
            tunnel for the SOCKS5 entry (the new-connection runs via SOCKS5, or the main ones \
            under `--entry socks5`). Counts per unit compare across \
            machines; CPU time per unit speaks for the machine below.\n\n";
    for verdict in doc.verdicts {
        let _ = writeln!(
            out,
            "- **{}**: {} ({})",
            verdict.mark(),
            verdict.target,
            verdict.detail
        );
    }
    out += "\n## Machine\n\n";
    out += &machine.markdown_items();
    let _ = writeln!(out, "- build: {}", machine::build_profile());
    let _ = writeln!(
        out,
        "- load average (1, 5, 15 min): {} before, {} after",
        doc.load_before, doc.load_after
    );
    let _ = writeln!(out, "{}\n", cross_cpu::machine_item(doc.cross_cpu));
    out += "## Command\n\n";
    let _ = writeln!(out, "    {}\n", o.command);
    let _ = writeln!(
        out,
        "{} run(s) of each workload, {} ms each; idle memory with {} tunnels, read {} ms after \
         they are all open. Client entry: `{}`; server and entry log filter: `{}`; their \
         runtime: `{}`, {}; {}.\n",
        o.runs,
        o.duration.as_millis(),
        o.tunnels,
        o.settle.as_millis(),
        o.entry.name(),
        o.tunnel_log,
        o.proxy_runtime,
        match o.proxy_threads {
            Some(n) => format!("{n} worker thread(s) each (`--proxy-threads`)"),
            None => "one worker thread per CPU each (their default)".to_owned(),
        },
        if o.admin {
            "server, gateway and entries run with their admin endpoint on (metrics and the \
             open-tunnel list kept, as `hbone run` does by default)"
        } else {
            "server, gateway and entries run without an admin endpoint (`--no-admin`: no \
             metrics, no open-tunnel list)"
        }
    );
    out += "## Problems logged\n\n";
    if doc.logged.is_empty() {
        out += "The server, entries and apps logged no warnings, errors or failed tunnels.\n";
    }
    for line in doc.logged {
        let _ = writeln!(out, "- `{line}`");
    }
    out += "\n## What varied\n\n";
    out += &variation(doc);
    out += "\n## How each figure is measured\n\n";
    out += METHOD;
    out
}

/// Which figures the runs disagreed on, and how busy the machine was.
fn variation(doc: &Document) -> String {
    let mut out = String::new();
    let m = doc.measured;
    if doc.options.runs < 2 {
        out += "- One run per workload: no spread to report.\n";
    } else {
        let mut spreads: Vec<(String, f64)> = Vec::new();
        for metric in Metric::ALL {
            let summaries = [
                ("direct", m.results.direct_summary(metric)),
                (
                    "hbone, 2 processes",
                    m.results.tunnel_summary(metric, Topology::Split),
                ),
                (
                    "hbone, 1 process",
                    m.results.tunnel_summary(metric, Topology::Joined),
                ),
                (
                    "hbone, 1 process, per-core",
                    m.results.tunnel_summary(metric, Topology::JoinedPerCore),
                ),
            ];
            for (side, summary) in summaries {
                if let Some(s) = summary {
                    spreads.push((format!("{}, {side}", metric.label()), s.relative_spread()));
                }
            }
        }
        for (bulk, figure) in m.isolation.measured() {
            for (side, topology) in [
                ("direct", None),
                ("hbone, 2 processes", Some(Topology::Split)),
                ("hbone, 1 process", Some(Topology::Joined)),
                ("hbone, 1 process, per-core", Some(Topology::JoinedPerCore)),
            ] {
                if let Some(s) = m.isolation.summary(bulk, figure, topology) {
                    spreads.push((
                        format!("isolation: {}, {side}", figure.label(bulk)),
                        s.relative_spread(),
                    ));
                }
            }
        }
        for (label, summary) in m.costs.summaries() {
            spreads.push((label, summary.relative_spread()));
        }
        spreads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let wide: Vec<_> = spreads.iter().filter(|(_, s)| *s > 0.10).collect();
        if wide.is_empty() {
            out += "- Every figure's runs were within 10 % of their median (min to max).\n";
        } else {
            out += "- Figures whose runs spread over more than 10 % of the median (min to max):\n";
            for (label, spread) in wide {
                let _ = writeln!(out, "  - {label}: {}", report::percent(spread * 100.0));
            }
        }
    }
    let _ = writeln!(
        out,
        "- Load average {} before and {} after: the apps, the server, the entries and the \
         load generator share the machine's cores with anything else running.",
        doc.load_before, doc.load_after
    );
    out += "- Each run goes direct, then through the 2 processes, then through the 1 process, \
            then through the 1 process under `--runtime per-core`, so a change in background \
            load touches every column alike.\n";
    if let Some(item) = cross_cpu::variation_item(doc.cross_cpu) {
        out += &item;
    }
    if doc.options.quick {
        out += "- `--quick` was used: a smoke test, not a measurement.\n";
    }
    out
}

/// What the capture table shows, before it.
const CAPTURE_INTRO: &str = "Two hosts as network namespaces joined by a veth pair. On host A \
     the load generator connects with plain TCP: to an echo app on host B that no rule captures \
     (direct), to a `hbone forward` entry on A, and to another echo app on B whose address \
     `hbone node` captures (nftables redirect, original destination from `SO_ORIGINAL_DST`, \
     a tunnel to B's `hbone server` on 15008). The paths alternate within each run. CPU is \
     that of the client-side proxy (node or entry) and the server together, per unit of \
     work.\n\n";

/// What the isolation table shows, before it.
const ISOLATION_INTRO: &str = "\
A 1 KiB request/response tunnel alone and beside bulk streams that go through the same entry and \
the same server, as tunnels between two nodes do; and what the bulk streams keep of their \
aggregate throughput beside it. The entry is one `hbone socks5` (a forward entry pools per \
target, so it would give each kind of tunnel a connection of its own) and a server, both started \
for this workload alone, whatever `--entry` says. The bulk streams start first and share one \
pooled HTTP/2 connection; the request/response tunnel opens a moment later and, since that \
connection then carries bulk, gets a connection of its own from the pool (README, \"Interactive \
tunnels stay fast beside bulk ones\"): the figures are those of an interactive tunnel opened \
during a transfer. Alone, the bulk streams are all the process carries and their windows grow \
freely; beside the request they are held to windows sized for it, so '% of alone' is also what \
keeping the request's queue short costs them. \
Direct: the same load generators straight to the echo app and the sink.\n\n";

/// How the per-unit figures are counted.
const PER_UNIT_METHOD: &str = "\
- Processes counted: *2 processes*: `hbone server` and every client entry (`hbone forward` to \
the sink, to the echo app, and to the echo app with `--no-pool`, and a pooled `hbone socks5` for \
the new-connection runs via SOCKS5; with `--entry socks5`, a pooled and an unpooled \
`hbone socks5`), each its own process, all counted whichever entry the workload uses. \
*1 process*: one `hbone run --config` process whose file holds a `[server]` and the same \
entries as `[[forward]]` and `[[socks5]]` sections (`[[socks5]]` alone under `--entry socks5`); \
*1 process, per-core*: the same with \
`--runtime per-core`. *3 processes*: `hbone server`, `hbone \
gateway` and both forwards that go through it. *bare relays (reference)*: not hbone, one process \
(`hbone bench relays`) with two relays on the path (load generator → entry relay → server \
relay → sink or echo app), a blocking thread per direction of each connection, that carry the \
bytes between them as TLS 1.3 records of up to 16 KiB sealed and opened with AES-128-GCM \
(aws-lc-rs, the suite and library hbone uses), with no handshake (shared keys, random IVs \
per connection), no HTTP/2 and no user-space copy: plaintext is read with one `readv` \
straight into the payload slots of 16 records (256 KiB, hbone's largest read), sealed in \
place and sent with one `writev`; records are read up to four at once (hbone reads 64 KiB \
under TLS), opened in place and their plaintexts sent with one `writev`. Each stream has a \
connection between the relays of its own, where hbone's streams share one HTTP/2 \
connection. Never the apps, the load generator or perf. *bare relays, one thread \
(reference)*: the same relays, records and reads in one thread (`hbone bench relays \
--one-thread`): non-blocking sockets registered once with edge-triggered epoll, a short read \
taken as having drained the socket (no read that only returns EAGAIN), every socket an \
`epoll_wait` names served before the next wait.
- Window: the counters are read just before the load generator starts and just after it exits, \
so a run's window also holds its connection set-up.
- Units: everything the load generator did in the window, warm-up included. Bulk: MB (10^6 \
bytes) delivered to the sink (µs of CPU per MB are ms per GB: ÷ 1000 for s/GB); req/resp: \
1 KiB exchanges; connection workloads: tunnels opened (each a connection, a 1-byte echo and a \
close).
- CPU: utime + stime of each process from `/proc/PID/stat` (every thread, ended ones \
included), in clock ticks (10 ms at the usual 100 Hz), after minus before; *of it in the \
kernel*: stime alone: syscalls and, unless the kernel accounts interrupt time apart \
(`CONFIG_IRQ_TIME_ACCOUNTING`), the softirq work loopback TCP runs inside them.
- Context switches: `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of \
`/proc/PID/task/TID/status`, after minus before, thread by thread and summed (threads started \
in the window count from zero); involuntary ones (preemptions) are shown apart, and are the \
ones a busy machine adds. CPU migrations: `se.nr_migrations` of `/proc/PID/task/TID/sched`, \
the same way.
";

const PERF_METHOD: &str = "\
- Syscalls: `perf stat -e raw_syscalls:sys_enter -p PIDS` (every syscall entry of every thread \
of those processes, threads started later included), attached before the window with its \
counters disabled, enabled just before the load generator starts and disabled just after it \
exits, over perf's control pipe. That one counter per thread costs the counted processes a \
little CPU per syscall and per context switch, and the timed figures are measured with it on. \
A counter per syscall costs much more: perf switches every one of a thread's counters at each \
context switch, and in an A/B on a 2-core machine the p50 of 1 KiB req/resp through 2 processes \
went from about 140 µs without perf to about 150 µs with the one counter and about 215 µs with \
thirty. So the mix below comes from an extra, untimed run instead.
";

const METHOD: &str = "\
- Processes: the target apps, `hbone server`, the client entries and a single-threaded load \
generator, each its own process on 127.0.0.1. Direct runs go from the load generator to the app; \
tunnelled runs go load generator → entry → HBONE (TLS 1.3, HTTP/2 CONNECT) → server → app.
- Bulk: 128 KiB writes to a sink for the duration, then a half-close; the sink answers with the \
byte count it received, and the clock stops when that answer arrives. 8 streams: the same on 8 \
connections at once, summed. Gbit/s = 10^9 bits per second.
- 1 KiB req/resp: write 1 KiB, read the same 1 KiB back, on one connection, after 50 warm-up \
exchanges; p50 and p99 of the round trips.
- Connection rate: 8 workers each connect, send 1 byte, read it back and close. Through hbone \
every connection is a new tunnel (a new HTTP/2 stream on a pooled connection). Via SOCKS5 (beside \
a forward entry): the same through a pooled `hbone socks5`, each connection first negotiating \
its target (no authentication, CONNECT to the echo app's address); direct runs are the same ones.
- Handshakes: the same through a second entry with pooling off, so every tunnel is a new TCP \
connection with a full mutual TLS 1.3 handshake and HTTP/2 setup.
- Double HBONE: the connection workload through a forward entry that goes via `hbone gateway` \
(outer CONNECT to the service's host:port, inner mTLS to the server inside it). 'inner pooled': \
inner connections are shared, so each user connection is one inner HTTP/2 stream. 'fresh inner \
each': the entry runs with `--no-pool`, so every user connection costs an outer tunnel plus a new \
inner TLS + HTTP/2 handshake, which is what ztunnel does.
- CPU per GB: user + system CPU time of the server and the entries during the 1-stream bulk \
run through hbone, over the bytes delivered (GB = 10^9 bytes); the per-MB CPU of the table \
above, ÷ 1000.
- One process: `hbone run --config FILE` with a `[server]` and the same entries as \
`[[forward]]` and `[[socks5]]` sections; the server's port is picked free and written into the \
file, since the entries must know it. It runs every workload but double HBONE, right after the \
2-process run of the same workload.
- Isolation: a bulk load generator with N streams to the sink (128 KiB writes, as in bulk) starts \
first; after a settle of 500 ms (200 ms with `--quick`) the 1 KiB req/resp load generator runs \
to the echo app (its 50 untimed warm-up exchanges, then the duration, timed), and as soon as it \
is done the bulk generator is told to stop (its stdin closes). The bulk figure beside req/resp is its \
bytes over its whole run, settle included; then the same N streams run alone for as long, and \
'% of alone' is the first over the second, run by run. 'alone' rows: the req/resp generator \
through the same entry with nothing beside it. Each run measures alone, then beside 1, 4 and 16 \
streams (only 4 with `--quick`), each direct, through 2 processes, through 1 process and \
through 1 process per-core in turn.
- Idle: a fresh server and forward entry (or a fresh one-process `hbone run` with both); VmRSS \
of the processes, before and after opening N tunnels to the echo app (each proven with a 1-byte \
echo), over N. KB = 1024 bytes, as /proc reports.
";
