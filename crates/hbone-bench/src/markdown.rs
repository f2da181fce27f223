//! `--write FILE`: the results as Markdown, with what a reader needs to
//! trust or doubt them: the machine, the build, the exact command, how
//! busy the machine was and how far the runs disagreed. Only figures
//! measured in the same run are compared: direct TCP against the tunnel.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::Options;
use super::machine::{self, Machine};
use super::report::{self, HEADERS};
use super::results::{Metric, Results};
use super::targets::Verdict;

/// Everything the document reports.
pub struct Document<'a> {
    pub options: &'a Options,
    pub results: &'a Results,
    pub verdicts: &'a [Verdict],
    /// Problems the processes under test logged.
    pub logged: &'a [String],
    pub date: String,
    pub elapsed: Duration,
    pub load_before: String,
    pub load_after: String,
}

pub fn write(path: &Path, doc: &Document) -> anyhow::Result<()> {
    std::fs::write(path, render(doc)).with_context(|| format!("cannot write {}", path.display()))
}

fn render(doc: &Document) -> String {
    let o = doc.options;
    let machine = Machine::describe();
    let mut out = String::from("# hbone benchmarks\n\n");
    let _ = writeln!(
        out,
        "Measured with `hbone bench` on {}; the whole bench took {:.0} s.\n",
        doc.date,
        doc.elapsed.as_secs_f64()
    );
    out += "## Machine\n\n";
    let _ = writeln!(out, "- CPUs: {} × {}", machine.cpus, machine.cpu_model);
    let _ = writeln!(out, "- memory: {}", machine.memory);
    let _ = writeln!(out, "- kernel: {}", machine.kernel);
    let _ = writeln!(out, "- build: {}", machine::build_profile());
    let _ = writeln!(
        out,
        "- load average (1, 5, 15 min): {} before, {} after\n",
        doc.load_before, doc.load_after
    );
    out += "## Command\n\n";
    let _ = writeln!(out, "    {}\n", o.command);
    let _ = writeln!(
        out,
        "{} run(s) of each workload, {} ms each; idle memory with {} tunnels, read {} ms after \
         they are all open. Client entry: `{}`; server and entry log filter: `{}`; {}. Each figure is the median of the runs, with the lowest and highest in parentheses.\n",
        o.runs,
        o.duration.as_millis(),
        o.tunnels,
        o.settle.as_millis(),
        o.entry.name(),
        o.tunnel_log,
        if o.admin {
            "server, gateway and entries run with their admin endpoint on (metrics and the \
             open-tunnel list kept, as `hbone run` does by default)"
        } else {
            "server, gateway and entries run without an admin endpoint (`--no-admin`: no \
             metrics, no open-tunnel list)"
        }
    );
    out += "## Results\n\n";
    out += &report::table(&HEADERS, &report::rows(doc.results));
    out += "\nDirect and tunnelled figures come from the same run on the same machine; \
            compare the hbone/direct ratios more than the absolute numbers.\n\n";
    out += "## Targets, judged on the medians\n\n";
    for verdict in doc.verdicts {
        let _ = writeln!(
            out,
            "- **{}**: {} ({})",
            verdict.mark(),
            verdict.target,
            verdict.detail
        );
    }
    out += "\n## Problems logged\n\n";
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
    if doc.options.runs < 2 {
        out += "- One run per workload: no spread to report.\n";
    } else {
        let mut spreads: Vec<(String, f64)> = Vec::new();
        for metric in Metric::ALL {
            let summaries = [
                ("direct", doc.results.direct_summary(metric)),
                ("through hbone", doc.results.tunnel_summary(metric)),
            ];
            for (side, summary) in summaries {
                if let Some(s) = summary {
                    spreads.push((format!("{}, {side}", metric.label()), s.relative_spread()));
                }
            }
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
    out += "- Direct and tunnelled runs alternate, so a change in background load touches both \
            columns alike.\n";
    if doc.options.quick {
        out += "- `--quick` was used: a smoke test, not a measurement.\n";
    }
    out
}

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
every connection is a new tunnel (a new HTTP/2 stream on a pooled connection).
- Handshakes: the same through a second entry with pooling off, so every tunnel is a new TCP \
connection with a full mutual TLS 1.3 handshake and HTTP/2 setup.
- Double HBONE: the connection workload through a forward entry that goes via `hbone gateway` \
(outer CONNECT to the service's host:port, inner mTLS to the server inside it). 'inner pooled': \
inner connections are shared, so each user connection is one inner HTTP/2 stream. 'fresh inner \
each': the entry runs with `--no-pool`, so every user connection costs an outer tunnel plus a new \
inner TLS + HTTP/2 handshake, which is what ztunnel does.
- CPU per GB: user + system CPU time of the server and the entry during the 1-stream bulk run \
through hbone, over the bytes delivered (GB = 10^9 bytes).
- Idle: a fresh server and forward entry; VmRSS of both, before and after opening N tunnels to \
the echo app (each proven with a 1-byte echo), over N. KB = 1024 bytes, as /proc reports.
";
