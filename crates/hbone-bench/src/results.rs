//! What the bench measured: for each metric, one figure per run, direct
//! and through the tunnel in each topology.

use std::collections::BTreeMap;

use super::stats::Summary;

/// Each row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Bulk1,
    Bulk8,
    ReqRate,
    ReqP50,
    ReqP99,
    ConnRate,
    /// New tunnels through a SOCKS5 entry when the main entry is a
    /// forward: the targets on new tunnels are stated for SOCKS5.
    Socks5ConnRate,
    Handshakes,
    GatewayPooled,
    GatewayFresh,
    CpuPerGb,
    KbPerTunnel,
}

/// Where the server and the entries under test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Topology {
    /// `hbone server` and each entry in a process of its own: a tunnel
    /// crosses two hbone processes.
    Split,
    /// `hbone run` with the server and the entries in one process, as
    /// ztunnel runs: a tunnel enters and leaves the same process.
    Joined,
    /// As [`Topology::Joined`], under `--runtime per-core`: each connection
    /// the process accepts, with its tunnels and the pooled connections
    /// they ride, on one single-threaded worker.
    JoinedPerCore,
    /// Double HBONE: the entry, `hbone gateway` and the server, each in a
    /// process of its own.
    Gateway,
}

impl Topology {
    pub fn label(self) -> &'static str {
        match self {
            Topology::Split => "2 processes",
            Topology::Joined => "1 process",
            Topology::JoinedPerCore => "1 process, per-core",
            Topology::Gateway => "3 processes",
        }
    }
}

/// How the tunnelled figure of a metric compares with the direct one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Higher is better: tunnel / direct, in percent.
    Ratio,
    /// A latency: the time the tunnel adds.
    Added,
    /// Only measured through the tunnel.
    TunnelOnly,
}

impl Metric {
    pub const ALL: [Metric; 12] = [
        Metric::Bulk1,
        Metric::Bulk8,
        Metric::ReqRate,
        Metric::ReqP50,
        Metric::ReqP99,
        Metric::ConnRate,
        Metric::Socks5ConnRate,
        Metric::Handshakes,
        Metric::GatewayPooled,
        Metric::GatewayFresh,
        Metric::CpuPerGb,
        Metric::KbPerTunnel,
    ];

    /// The row label, with the unit. tests/bench.rs looks rows up by these.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Bulk1 => "bulk, 1 stream (Gbit/s)",
            Metric::Bulk8 => "bulk, 8 streams (Gbit/s)",
            Metric::ReqRate => "1 KiB req/resp (req/s)",
            Metric::ReqP50 => "1 KiB req/resp, p50 (µs)",
            Metric::ReqP99 => "1 KiB req/resp, p99 (µs)",
            Metric::ConnRate => "new conn + 1-byte echo, 8 at once (conn/s)",
            Metric::Socks5ConnRate => "new conn via SOCKS5 + 1-byte echo, 8 at once (conn/s)",
            Metric::Handshakes => "mTLS + HTTP/2 handshakes, no pool (/s)",
            Metric::GatewayPooled => "double HBONE via gateway, inner pooled (conn/s)",
            Metric::GatewayFresh => "double HBONE via gateway, fresh inner each (conn/s)",
            Metric::CpuPerGb => "CPU, server + entries, bulk 1 stream (s/GB)",
            Metric::KbPerTunnel => "idle tunnels, server + entry (KB/tunnel)",
        }
    }

    pub fn comparison(self) -> Comparison {
        match self {
            Metric::ReqP50 | Metric::ReqP99 => Comparison::Added,
            Metric::Handshakes
            | Metric::GatewayPooled
            | Metric::GatewayFresh
            | Metric::CpuPerGb
            | Metric::KbPerTunnel => Comparison::TunnelOnly,
            _ => Comparison::Ratio,
        }
    }
}

/// The figures of every run of one metric.
#[derive(Debug, Default, Clone)]
pub struct Series {
    pub direct: Vec<f64>,
    /// Server and entries apart (or, for double HBONE, via the gateway).
    pub tunnel: Vec<f64>,
    /// Server and entries in one process.
    pub joined: Vec<f64>,
    /// The same under `--runtime per-core`.
    pub per_core: Vec<f64>,
}

impl Series {
    fn through(&self, topology: Topology) -> &Vec<f64> {
        match topology {
            Topology::Split | Topology::Gateway => &self.tunnel,
            Topology::Joined => &self.joined,
            Topology::JoinedPerCore => &self.per_core,
        }
    }

    /// The runs direct (`None`) or through hbone in a topology.
    fn side(&self, side: Option<Topology>) -> &Vec<f64> {
        match side {
            None => &self.direct,
            Some(topology) => self.through(topology),
        }
    }

    fn push(&mut self, side: Option<Topology>, value: f64) {
        match side {
            None => self.direct.push(value),
            Some(Topology::Split | Topology::Gateway) => self.tunnel.push(value),
            Some(Topology::Joined) => self.joined.push(value),
            Some(Topology::JoinedPerCore) => self.per_core.push(value),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Results(BTreeMap<Metric, Series>);

impl Results {
    pub fn direct(&mut self, metric: Metric, value: f64) {
        self.0.entry(metric).or_default().direct.push(value);
    }

    /// A figure through hbone; a gateway's goes beside the split ones.
    pub fn tunnel(&mut self, metric: Metric, topology: Topology, value: f64) {
        let series = self.0.entry(metric).or_default();
        match topology {
            Topology::Split | Topology::Gateway => series.tunnel.push(value),
            Topology::Joined => series.joined.push(value),
            Topology::JoinedPerCore => series.per_core.push(value),
        }
    }

    /// Median and spread of the direct runs.
    pub fn direct_summary(&self, metric: Metric) -> Option<Summary> {
        self.0.get(&metric).and_then(|s| Summary::of(&s.direct))
    }

    /// Median and spread of the tunnelled runs in `topology`.
    pub fn tunnel_summary(&self, metric: Metric, topology: Topology) -> Option<Summary> {
        self.0
            .get(&metric)
            .and_then(|s| Summary::of(s.through(topology)))
    }

    /// Tunnel median / direct median.
    pub fn ratio(&self, metric: Metric, topology: Topology) -> Option<f64> {
        let direct = self.direct_summary(metric)?.median;
        let tunnel = self.tunnel_summary(metric, topology)?.median;
        (direct > 0.0).then(|| tunnel / direct)
    }

    /// Tunnel median − direct median.
    pub fn added(&self, metric: Metric, topology: Topology) -> Option<f64> {
        Some(self.tunnel_summary(metric, topology)?.median - self.direct_summary(metric)?.median)
    }
}

/// A figure of the isolation workload: a 1 KiB request/response tunnel
/// alone or beside bulk streams through the same entry and server, and
/// those bulk streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsoFigure {
    /// Request/response p50, in µs.
    P50,
    /// Request/response p99, in µs.
    P99,
    /// Request/response rate, in req/s.
    Rate,
    /// The bulk streams' aggregate throughput while the request/response
    /// ran beside them, in Gbit/s.
    BulkGbits,
    /// That throughput as a share of what the same streams reach alone
    /// right after, in percent.
    BulkKept,
}

impl IsoFigure {
    /// The row label for the figure with `bulk` streams beside the
    /// request/response (0: alone). tests/bench.rs looks rows up by these.
    pub fn label(self, bulk: u32) -> String {
        let streams = match bulk {
            1 => "1 bulk stream".to_owned(),
            n => format!("{n} bulk streams"),
        };
        let req_resp = match bulk {
            0 => "req/resp alone".to_owned(),
            _ => format!("req/resp beside {streams}"),
        };
        match self {
            IsoFigure::P50 => format!("{req_resp}, p50 (µs)"),
            IsoFigure::P99 => format!("{req_resp}, p99 (µs)"),
            IsoFigure::Rate => format!("{req_resp} (req/s)"),
            IsoFigure::BulkGbits => format!("{streams} beside req/resp (Gbit/s)"),
            IsoFigure::BulkKept => format!("{streams} beside req/resp, % of alone"),
        }
    }
}

/// The isolation workload's figures, per number of bulk streams beside
/// the request/response (0: alone) and figure, direct and through hbone.
#[derive(Debug, Default, Clone)]
pub struct Isolation(BTreeMap<(u32, IsoFigure), Series>);

impl Isolation {
    /// A figure of one run, direct (`side` `None`) or through hbone.
    pub fn push(&mut self, bulk: u32, figure: IsoFigure, side: Option<Topology>, value: f64) {
        self.0.entry((bulk, figure)).or_default().push(side, value);
    }

    pub fn summary(&self, bulk: u32, figure: IsoFigure, side: Option<Topology>) -> Option<Summary> {
        self.0
            .get(&(bulk, figure))
            .and_then(|series| Summary::of(series.side(side)))
    }

    /// What was measured, alone first, then by the number of bulk streams.
    pub fn measured(&self) -> impl Iterator<Item = (u32, IsoFigure)> + '_ {
        self.0.keys().copied()
    }

    /// The numbers of bulk streams measured beside the request/response.
    pub fn beside(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self.measured().map(|(n, _)| n).filter(|&n| n > 0).collect();
        counts.dedup();
        counts
    }
}

/// How the capture workload's client reaches the echo app on the other
/// host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CapturePath {
    /// Plain TCP to an echo app no rule captures.
    Direct,
    /// To a `hbone forward` entry on the client's host.
    Forward,
    /// Plain TCP to the app's own address, captured by `hbone node`.
    Captured,
}

impl CapturePath {
    pub const ALL: [CapturePath; 3] = [
        CapturePath::Direct,
        CapturePath::Forward,
        CapturePath::Captured,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CapturePath::Direct => "direct",
            CapturePath::Forward => "forward entry",
            CapturePath::Captured => "captured by hbone node",
        }
    }
}

/// A figure of the capture workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CaptureFigure {
    ReqRate,
    ReqP50,
    ReqP99,
    /// CPU of the client-side proxy and the server per request, in µs.
    ReqCpu,
    ConnRate,
    /// The same per tunnel.
    ConnCpu,
}

impl CaptureFigure {
    pub const ALL: [CaptureFigure; 6] = [
        CaptureFigure::ReqRate,
        CaptureFigure::ReqP50,
        CaptureFigure::ReqP99,
        CaptureFigure::ReqCpu,
        CaptureFigure::ConnRate,
        CaptureFigure::ConnCpu,
    ];

    /// The row label; tests/bench.rs looks rows up by these.
    pub fn label(self) -> &'static str {
        match self {
            CaptureFigure::ReqRate => "host to host, 1 KiB req/resp (req/s)",
            CaptureFigure::ReqP50 => "host to host, 1 KiB req/resp, p50 (µs)",
            CaptureFigure::ReqP99 => "host to host, 1 KiB req/resp, p99 (µs)",
            CaptureFigure::ReqCpu => "CPU per request, proxy + server (µs)",
            CaptureFigure::ConnRate => "host to host, new conn + 1-byte echo (conn/s)",
            CaptureFigure::ConnCpu => "CPU per connection, proxy + server (µs)",
        }
    }
}

/// The capture workload's figures by path, or why it did not run.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    samples: BTreeMap<(CaptureFigure, CapturePath), Vec<f64>>,
    /// Why the workload was skipped, when it was.
    pub skipped: Option<String>,
}

impl Capture {
    pub fn push(&mut self, figure: CaptureFigure, path: CapturePath, value: f64) {
        self.samples.entry((figure, path)).or_default().push(value);
    }

    pub fn summary(&self, figure: CaptureFigure, path: CapturePath) -> Option<Summary> {
        self.samples
            .get(&(figure, path))
            .and_then(|values| Summary::of(values))
    }

    /// Whether any run was measured.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}
