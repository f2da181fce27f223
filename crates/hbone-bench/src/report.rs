//! The results table, printed on stdout and reused in the Markdown file.
//! It is a pipe table padded for the terminal, which Markdown also accepts.

use super::cost::{self, Costs};
use super::perf::Syscalls;
use super::results::{
    Capture, CaptureFigure, CapturePath, Comparison, Isolation, Metric, Results, Topology,
};
use super::stats::Summary;
use super::targets::Verdict;

/// The columns through hbone, in the order of the tables.
const TUNNELLED: [Topology; 3] = [Topology::Split, Topology::Joined, Topology::JoinedPerCore];

/// What stands in a cell that was not measured.
pub const NOT_MEASURED: &str = "n/a";

/// Everything the bench measured.
pub struct Measured {
    pub results: Results,
    pub costs: Costs,
    /// Whether perf counted the syscalls (and why not).
    pub syscalls: Syscalls,
    /// How figures were measured differently from the usual, and why.
    pub notes: Vec<String>,
    /// Request/response alone and beside bulk streams.
    pub isolation: Isolation,
    /// How the isolation figures were measured, where that differs from
    /// the usual.
    pub isolation_notes: Vec<String>,
    /// Through `hbone node`'s capture, a forward entry and direct.
    pub capture: Capture,
}

/// The rows of the results table: workload, direct, then for each
/// topology through hbone and how it compares with direct.
pub fn rows(results: &Results) -> Vec<Vec<String>> {
    Metric::ALL
        .iter()
        // Runs via SOCKS5 beside the main entry are made only where that
        // is a forward: under `--entry socks5` the row above is them.
        .filter(|&&metric| {
            metric != Metric::Socks5ConnRate || results.direct_summary(metric).is_some()
        })
        .map(|&metric| {
            let mut row = vec![
                metric.label().to_owned(),
                cell(results.direct_summary(metric)),
            ];
            for topology in TUNNELLED {
                let compared = match metric.comparison() {
                    Comparison::Ratio => results
                        .ratio(metric, topology)
                        .map(|r| percent(r * 100.0))
                        .unwrap_or_default(),
                    Comparison::Added => results
                        .added(metric, topology)
                        .map(|us| format!("{us:+.0} µs"))
                        .unwrap_or_default(),
                    Comparison::TunnelOnly => String::new(),
                };
                row.push(cell(results.tunnel_summary(metric, topology)));
                row.push(compared);
            }
            row
        })
        .collect()
}

/// The rows of the isolation table: figure, then direct and through
/// hbone in each topology.
pub fn isolation_rows(isolation: &Isolation) -> Vec<Vec<String>> {
    isolation
        .measured()
        .map(|(bulk, figure)| {
            let mut row = vec![figure.label(bulk)];
            let sides = std::iter::once(None).chain(TUNNELLED.map(Some));
            for side in sides {
                row.push(cell(isolation.summary(bulk, figure, side)));
            }
            row
        })
        .collect()
}

pub const ISOLATION_HEADERS: [&str; 5] = [
    "1 KiB req/resp and bulk, one SOCKS5 entry",
    "direct",
    "hbone, 2 processes",
    "hbone, 1 process",
    "hbone, 1 process, per-core",
];

/// The rows of the capture table: figure, then each path.
pub fn capture_rows(capture: &Capture) -> Vec<Vec<String>> {
    if capture.is_empty() {
        return Vec::new();
    }
    CaptureFigure::ALL
        .iter()
        .map(|&figure| {
            let mut row = vec![figure.label().to_owned()];
            for path in CapturePath::ALL {
                row.push(cell(capture.summary(figure, path)));
            }
            row
        })
        .collect()
}

pub const CAPTURE_HEADERS: [&str; 4] = [
    "between two network namespaces",
    "direct",
    "forward entry",
    "captured by hbone node",
];

/// The capture table's title on stdout; tests/bench.rs finds it by this.
pub const CAPTURE_HEADING: &str = "Transparent capture: an unmodified client's TCP captured by      hbone node, beside a forward entry and direct, medians of the runs";

/// The isolation table's title on stdout; tests/bench.rs finds it by this.
pub const ISOLATION_HEADING: &str = "Latency isolation: 1 KiB req/resp alone and beside bulk \
     streams through the same entry and server, medians of the runs";

pub const HEADERS: [&str; 8] = [
    "workload",
    "direct",
    "hbone, 2 processes",
    "vs direct",
    "hbone, 1 process",
    "vs direct",
    "hbone, 1 process, per-core",
    "vs direct",
];

/// The whole stdout report: a heading line, the tables, the targets, and
/// the problems the processes under test logged.
pub fn render(
    heading: &str,
    measured: &Measured,
    verdicts: &[Verdict],
    logged: &[String],
) -> String {
    let mut out = format!("{heading}\n\n");
    out += &table(&HEADERS, &rows(&measured.results));
    for note in &measured.notes {
        out += &format!("  {note}\n");
    }
    let isolation = isolation_rows(&measured.isolation);
    if !isolation.is_empty() {
        out += &format!("\n{ISOLATION_HEADING}:\n\n");
        out += &table(&ISOLATION_HEADERS, &isolation);
        for note in &measured.isolation_notes {
            out += &format!("  {note}\n");
        }
    }
    let capture = capture_rows(&measured.capture);
    if !capture.is_empty() {
        out += &format!("\n{CAPTURE_HEADING}:\n\n");
        out += &table(&CAPTURE_HEADERS, &capture);
    }
    if let Some(why) = &measured.capture.skipped {
        out += &format!("\nCapture not measured: {why}.\n");
    }
    out += &format!("\n{PER_UNIT_HEADING}:\n\n");
    out += &table(&cost::HEADERS, &measured.costs.rows(&measured.syscalls));
    for note in cost::notes(&measured.costs, &measured.syscalls) {
        out += &format!("  {note}\n");
    }
    out += "\nTargets, judged on the medians:\n";
    for verdict in verdicts {
        out += &format!(
            "  {:<8} {}: {}\n",
            verdict.mark(),
            verdict.target,
            verdict.detail
        );
    }
    if logged.is_empty() {
        out += "\nThe server, entries and apps logged no warnings, errors or failed tunnels.\n";
    } else {
        out += "\nLogged by the processes under test (warnings, errors, failed tunnels):\n";
        for line in logged {
            out += &format!("  {line}\n");
        }
    }
    out
}

/// The per-unit table's title on stdout; tests/bench.rs finds it by this.
pub const PER_UNIT_HEADING: &str =
    "Per unit of work, server + entries (or + gateway) only, medians of the runs";

/// A padded pipe table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(text, &width)| format!("{text}{}", " ".repeat(width - text.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.to_vec());
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    out += &format!("|-{}-|\n", rule.join("-|-"));
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `median (min–max)`, or the median alone after a single run.
pub fn cell(summary: Option<Summary>) -> String {
    match summary {
        None => NOT_MEASURED.to_owned(),
        Some(s) if s.min == s.max => number(s.median),
        Some(s) => format!("{} ({}–{})", number(s.median), number(s.min), number(s.max)),
    }
}

/// Three significant figures or so, with thousands separated by commas.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        group_thousands(value.round() as i64)
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// One decimal, so a ratio just under a target never shows as meeting it.
pub fn percent(value: f64) -> String {
    format!("{value:.1} %")
}

fn group_thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(36_214.4), "36,214");
        assert_eq!(number(1_234_567.0), "1,234,567");
        assert_eq!(number(104.4), "104");
        assert_eq!(number(28.74), "28.7");
        assert_eq!(number(4.618), "4.62");
        assert_eq!(percent(21.74), "21.7 %");
        assert_eq!(percent(4.26), "4.3 %");
    }

    #[test]
    fn cells_show_the_spread() {
        assert_eq!(cell(None), "n/a");
        assert_eq!(cell(Summary::of(&[5.0])), "5.00");
        assert_eq!(cell(Summary::of(&[5.0, 4.0, 6.0])), "5.00 (4.00–6.00)");
    }

    #[test]
    fn table_is_aligned() {
        let text = table(&["a", "bb"], &[vec!["µs".into(), "1".into()]]);
        let widths: Vec<usize> = text.lines().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|&w| w == widths[0]), "{text}");
    }
}
