//! Prometheus metrics: Istio's `istio_tcp_*` tunnel metrics (same names and
//! labels as ztunnel, so existing dashboards work) and our own, prefixed
//! `hbone_`.
//!
//! Label values are identities, rule names and fixed words, never
//! addresses, so the number of series stays bounded by the number of peers
//! and rules. Istio's byte counters are named from the reporting proxy's
//! point of view: `received` is what came from the downstream (client)
//! side, `sent` what went back to it. They count as bytes move, so a tunnel
//! that stays open for days shows its traffic while it flows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::identity::SpiffeId;

/// Which end of a tunnel reports: Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The end that opened the tunnel (dialer, entries).
    Source,
    /// The end that terminated it (server, gateway).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn role(self) -> &'static str {
        match self {
            Reporter::Source => "client",
            Reporter::Destination => "server",
        }
    }
}

/// Istio's `response_flags`: why a tunnel failed, `-` when it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    None,
    /// Denied by authorization policy (403).
    Deny,
    /// The target (or the HBONE server) could not be reached, or the
    /// tunnel broke after opening.
    Connect,
    /// The TLS handshake failed (wrong CA, identity, expired certificate).
    TlsFailure,
    /// A malformed request: not CONNECT, bad authority (400, 405, 431).
    BadRequest,
    /// A limit was reached (connections, tunnels).
    Overload,
    /// No route: the service named in `:authority` is unknown here
    /// (Envoy's `NR`).
    NoRoute,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
            ResponseFlag::BadRequest => "BAD_REQUEST",
            ResponseFlag::Overload => "OVERLOAD",
            ResponseFlag::NoRoute => "NR",
        }
    }
}

/// Istio's labels for `istio_tcp_*`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_principal: String,
    destination_principal: String,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// Used where a principal is not known (a handshake that failed).
const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    role: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    rule: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    destination_principal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdLabels {
    id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    what: &'static str,
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn lifetime_histogram() -> Histogram {
    // 1 ms to ~73 h.
    Histogram::new(exponential_buckets(0.001, 4.0, 14))
}

/// Called at each scrape to refresh gauges computed from live state.
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every metric the process exports. Share one between servers, dialers
/// and entries; [`Metrics::encode`] renders them.
pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    handshake_seconds: Histograms<HandshakeLabels>,
    setup_seconds: Histograms<RoleLabels>,
    duration_seconds: Histograms<RoleLabels>,
    limit_refusals: Family<LimitLabels, Counter>,
    policy_decisions: Family<DecisionLabels, Counter>,
    pool_connections: Family<PeerLabels, Gauge>,
    pool_streams: Family<PeerLabels, Gauge>,
    server_connections: Gauge,
    tunnels_open: Family<RoleLabels, Gauge>,
    cert_expiry: Family<IdLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let failed = Family::default();
        let received_bytes = Family::default();
        let sent_bytes = Family::default();
        let handshake_seconds: Histograms<HandshakeLabels> =
            Family::new_with_constructor(latency_histogram);
        let setup_seconds: Histograms<RoleLabels> = Family::new_with_constructor(latency_histogram);
        let duration_seconds: Histograms<RoleLabels> =
            Family::new_with_constructor(lifetime_histogram);
        let limit_refusals = Family::default();
        let policy_decisions = Family::default();
        let pool_connections = Family::default();
        let pool_streams = Family::default();
        let server_connections = Gauge::default();
        let tunnels_open = Family::default();
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let cert_expiry = Family::default();
        let reloads = Family::default();
        // Counters get `_total` appended by the encoder.
        registry.register(
            "istio_tcp_connections_opened",
            "Tunnels opened (answered 200)",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Tunnels that ended after opening",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "Tunnels that failed to open, and failed handshakes",
            failed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream side of ended tunnels",
            received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream side of ended tunnels",
            sent_bytes.clone(),
        );
        registry.register(
            "hbone_tls_handshake_seconds",
            "mTLS + HTTP/2 handshake duration",
            handshake_seconds.clone(),
        );
        registry.register(
            "hbone_tunnel_setup_seconds",
            "Time from CONNECT (or accepted application connection) to 200",
            setup_seconds.clone(),
        );
        registry.register(
            "hbone_tunnel_duration_seconds",
            "Lifetime of tunnels that opened",
            duration_seconds.clone(),
        );
        registry.register(
            "hbone_limit_refusals",
            "Connections closed and tunnels refused because a limit was reached",
            limit_refusals.clone(),
        );
        registry.register(
            "hbone_policy_decisions",
            "Authorization decisions by deciding rule",
            policy_decisions.clone(),
        );
        registry.register(
            "hbone_pool_connections",
            "Pooled HTTP/2 connections open, by server identity",
            pool_connections.clone(),
        );
        registry.register(
            "hbone_pool_streams",
            "Tunnels in use on pooled connections, by server identity",
            pool_streams.clone(),
        );
        registry.register(
            "hbone_server_connections",
            "HBONE connections open on servers and gateways",
            server_connections.clone(),
        );
        registry.register(
            "hbone_tunnels_open",
            "Tunnels open now (counted when the open-tunnel list is kept)",
            tunnels_open.clone(),
        );
        registry.register("hbone_build_info", "The hbone version running", build_info);
        registry.register(
            "hbone_certificate_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix time)",
            cert_expiry.clone(),
        );
        registry.register(
            "hbone_reloads",
            "Reloads of configuration, policy and identity files",
            reloads.clone(),
        );
        Metrics {
            registry,
            opened,
            closed,
            failed,
            received_bytes,
            sent_bytes,
            handshake_seconds,
            setup_seconds,
            duration_seconds,
            limit_refusals,
            policy_decisions,
            pool_connections,
            pool_streams,
            server_connections,
            tunnels_open,
            cert_expiry,
            reloads,
            scrape_hooks: Mutex::default(),
        }
    }

    /// The metrics in Prometheus text format (OpenMetrics).
    pub fn encode(&self) -> String {
        self.clear_pool();
        for hook in self.hooks().iter() {
            hook(self);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, Vec<ScrapeHook>> {
        self.scrape_hooks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `hook` before every scrape, to refresh gauges from live state.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks().push(Box::new(hook));
    }

    /// Counters of the successful path for one (source, destination) pair,
    /// resolved once per connection so tunnels do not look them up.
    pub fn tunnel_counters(
        &self,
        reporter: Reporter,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> TunnelCounters {
        let labels = tcp_labels(
            reporter,
            Some(source),
            Some(destination),
            ResponseFlag::None,
        );
        let role = RoleLabels {
            role: reporter.role(),
        };
        let broken_labels = TcpLabels {
            response_flags: ResponseFlag::Connect.as_str(),
            ..labels.clone()
        };
        TunnelCounters {
            opened: self.opened.get_or_create_owned(&labels),
            closed: self.closed.get_or_create_owned(&labels),
            broken: self.closed.get_or_create_owned(&broken_labels),
            bytes: Arc::new(self.relay_bytes(reporter, &labels)),
            setup: self.setup_seconds.get_or_create_owned(&role),
            duration: self.duration_seconds.get_or_create_owned(&role),
        }
    }

    /// The downstream side is the socket for a source (the application)
    /// and the tunnel for a destination (whose socket is the target).
    fn relay_bytes(&self, reporter: Reporter, labels: &TcpLabels) -> RelayBytes {
        let received = self.received_bytes.get_or_create_owned(labels);
        let sent = self.sent_bytes.get_or_create_owned(labels);
        match reporter {
            Reporter::Source => RelayBytes {
                from_socket: received,
                to_socket: sent,
            },
            Reporter::Destination => RelayBytes {
                from_socket: sent,
                to_socket: received,
            },
        }
    }

    /// A tunnel that never opened, or a failed handshake (principals
    /// unknown then).
    pub fn tunnel_failed(
        &self,
        reporter: Reporter,
        source: Option<&SpiffeId>,
        destination: Option<&SpiffeId>,
        flag: ResponseFlag,
    ) {
        let labels = tcp_labels(reporter, source, destination, flag);
        self.failed.get_or_create(&labels).inc();
    }

    pub fn handshake(&self, reporter: Reporter, succeeded: bool, took: Duration) {
        let labels = HandshakeLabels {
            role: reporter.role(),
            result: if succeeded { "success" } else { "failure" },
        };
        self.handshake_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// `limit` is one of `connections`, `connections_per_ip`, `tunnels`.
    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn policy_decision(&self, rule: &str, allowed: bool) {
        let labels = DecisionLabels {
            rule: rule.to_owned(),
            decision: if allowed { "allow" } else { "deny" },
        };
        self.policy_decisions.get_or_create(&labels).inc();
    }

    /// The gauge of HBONE connections open on servers.
    pub fn server_connections(&self) -> &Gauge {
        &self.server_connections
    }

    /// Sets the number of tunnels open now on each end.
    pub fn tunnels_open(&self, clients: i64, servers: i64) {
        for (role, open) in [("client", clients), ("server", servers)] {
            self.tunnels_open
                .get_or_create(&RoleLabels { role })
                .set(open);
        }
    }

    /// Records the expiry of the certificate `id` now uses (replacing an
    /// earlier one of the same ID).
    pub fn certificate(&self, id: &SpiffeId, expires: SystemTime) {
        let unix = expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.cert_expiry
            .get_or_create(&IdLabels { id: id.to_string() })
            .set(unix);
    }

    /// `what` is `config`, `policy`, `services` or `identity`.
    pub fn reload(&self, what: &'static str, succeeded: bool) {
        let labels = ReloadLabels {
            what,
            result: if succeeded { "success" } else { "failure" },
        };
        self.reloads.get_or_create(&labels).inc();
    }

    /// Clears the pool gauges; scrape hooks then add each dialer's share.
    fn clear_pool(&self) {
        self.pool_connections.clear();
        self.pool_streams.clear();
    }

    pub(crate) fn add_pool(&self, peer: &SpiffeId, connections: i64, streams: i64) {
        let labels = PeerLabels {
            destination_principal: peer.to_string(),
        };
        self.pool_connections
            .get_or_create(&labels)
            .inc_by(connections);
        self.pool_streams.get_or_create(&labels).inc_by(streams);
    }
}

fn tcp_labels(
    reporter: Reporter,
    source: Option<&SpiffeId>,
    destination: Option<&SpiffeId>,
    flag: ResponseFlag,
) -> TcpLabels {
    let name = |id: Option<&SpiffeId>| id.map_or_else(|| UNKNOWN.to_owned(), |id| id.to_string());
    TcpLabels {
        reporter: reporter.as_str(),
        source_principal: name(source),
        destination_principal: name(destination),
        response_flags: flag.as_str(),
        // Every HBONE tunnel is inside mutual TLS.
        connection_security_policy: "mutual_tls",
    }
}

/// The metrics one connection's successful tunnels update, without lookups.
#[derive(Clone, Debug)]
pub struct TunnelCounters {
    opened: Counter,
    closed: Counter,
    /// Closed with `CONNECT`: broke after opening.
    broken: Counter,
    bytes: Arc<RelayBytes>,
    setup: Histogram,
    duration: Histogram,
}

impl TunnelCounters {
    /// A tunnel was answered 200 `setup` after it was asked for.
    pub fn opened(&self, setup: Duration) {
        self.opened.inc();
        self.setup.observe(setup.as_secs_f64());
    }

    /// A tunnel ended after `lifetime`; a `broken` one failed after
    /// opening and is counted closed with `CONNECT`.
    pub fn ended(&self, lifetime: Duration, broken: bool) {
        if broken {
            self.broken.inc();
        } else {
            self.closed.inc();
        }
        self.duration.observe(lifetime.as_secs_f64());
    }

    /// The byte counters, for the relay to add to as bytes move.
    pub fn relay_bytes(&self) -> Arc<RelayBytes> {
        self.bytes.clone()
    }
}

/// Istio's byte counters as a relay sees them: by socket direction.
#[derive(Debug)]
pub struct RelayBytes {
    from_socket: Counter,
    to_socket: Counter,
}

impl RelayBytes {
    /// Bytes read from the relay's socket and written to it.
    pub fn add(&self, from_socket: u64, to_socket: u64) {
        if from_socket > 0 {
            self.from_socket.inc_by(from_socket);
        }
        if to_socket > 0 {
            self.to_socket.inc_by(to_socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels() {
        let metrics = Metrics::new();
        let client = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/client").unwrap();
        let server = SpiffeId::parse("spiffe://cluster.local/ns/b/sa/server").unwrap();
        let counters = metrics.tunnel_counters(Reporter::Destination, &client, &server);
        counters.opened(Duration::from_millis(1));
        counters.relay_bytes().add(20, 10);
        counters.ended(Duration::from_millis(5), false);
        metrics.tunnel_failed(
            Reporter::Destination,
            Some(&client),
            Some(&server),
            ResponseFlag::Deny,
        );
        let text = metrics.encode();
        let labels = "connection_security_policy=\"mutual_tls\"";
        assert!(text.contains(&format!(
            "istio_tcp_connections_opened_total{{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/a/sa/client\",destination_principal=\"spiffe://cluster.local/ns/b/sa/server\",response_flags=\"-\",{labels}}} 1"
        )), "{text}");
        assert!(text.contains("istio_tcp_received_bytes_total{reporter=\"destination\""));
        assert!(text.contains("response_flags=\"DENY\""));
        assert!(text.contains("hbone_tunnel_setup_seconds_count{role=\"server\"} 1"));
    }
}

/// What a server or dialer reports to, beyond its access log. Both parts
/// are optional: without them nothing is counted or tracked. A dialer
/// counts its handshakes and pooled connections; the tunnels themselves
/// are counted by whatever relays them (the entries do; a library user
/// holding a [`crate::Tunnel`] counts what it needs).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub metrics: Option<Arc<Metrics>>,
    /// Open tunnels, for `/tunnels`.
    pub tunnels: Option<Arc<crate::active::ActiveTunnels>>,
}
