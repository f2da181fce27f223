//! The Prometheus registry behind [`Metrics`]: every series the process
//! exports, and the counters tunnels update without lookups.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{DestinationService, Reporter, ResponseFlag, UNKNOWN, WorkloadMeta};
use crate::identity::SpiffeId;

/// Istio's standard labels for `istio_tcp_*`, in ztunnel's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InboundLabels {
    mode: &'static str,
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
    /// Our own registry; `None` when registered into a caller's.
    registry: Option<Registry>,
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
    renewals: Family<RenewalLabels, Counter>,
    inbound_plaintext: Family<InboundLabels, Counter>,
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
    /// Every metric, in a registry of its own; [`Metrics::encode`]
    /// renders it.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut metrics = Self::register(&mut registry);
        metrics.registry = Some(registry);
        metrics
    }

    /// Every metric, registered into `registry`, a registry of the
    /// application's: it then exports hbone's series beside its own. Call
    /// [`Metrics::refresh`] before encoding it, so that gauges computed from
    /// live state (pools, open tunnels) are current.
    pub fn register(registry: &mut Registry) -> Self {
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
        let renewals = Family::default();
        let inbound_plaintext = Family::default();
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
        registry.register(
            "hbone_certificate_renewals",
            "Certificates asked of an identity source (e.g. istio-ca), by result",
            renewals.clone(),
        );
        registry.register(
            "hbone_inbound_plaintext_connections",
            "Plaintext TCP connections from other hosts to ports a node protects: refused \
             (mode strict) or let through (mode permissive)",
            inbound_plaintext.clone(),
        );
        Metrics {
            registry: None,
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
            renewals,
            inbound_plaintext,
            scrape_hooks: Mutex::default(),
        }
    }

    /// Brings gauges computed from live state (pools, open tunnels) up to
    /// date; [`Metrics::encode`] does it itself.
    pub fn refresh(&self) {
        self.clear_pool();
        for hook in self.hooks().iter() {
            hook(self);
        }
    }

    /// The metrics in Prometheus text format (OpenMetrics). Empty for
    /// metrics registered into an application's registry: encode that.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut text = String::new();
        if let Some(registry) = &self.registry {
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, registry);
        }
        text
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, Vec<ScrapeHook>> {
        self.scrape_hooks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `hook` before every scrape, to refresh gauges from live state.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks().push(Box::new(hook));
    }

    /// Counters of the successful path for one (source, destination,
    /// service) combination, resolved once per connection (and per
    /// metadata the connection's tunnels bring, see [`super::PerConnection`]) so
    /// tunnels do not look them up.
    pub(crate) fn tunnel_counters(
        &self,
        reporter: Reporter,
        source: &WorkloadMeta,
        destination: &WorkloadMeta,
        service: &DestinationService,
    ) -> TunnelCounters {
        let labels = tcp_labels(reporter, source, destination, service, ResponseFlag::None);
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

    /// The downstream side is the relay's local side for a source (the
    /// application) and the tunnel for a destination (whose local side is
    /// the target).
    fn relay_bytes(&self, reporter: Reporter, labels: &TcpLabels) -> RelayBytes {
        let received = self.received_bytes.get_or_create_owned(labels);
        let sent = self.sent_bytes.get_or_create_owned(labels);
        match reporter {
            Reporter::Source => RelayBytes {
                to_tunnel: received,
                from_tunnel: sent,
            },
            Reporter::Destination => RelayBytes {
                to_tunnel: sent,
                from_tunnel: received,
            },
        }
    }

    /// A tunnel that never opened, or a failed handshake (the peer is
    /// all `unknown` then: [`WorkloadMeta::default`]).
    pub(crate) fn tunnel_failed(
        &self,
        reporter: Reporter,
        source: &WorkloadMeta,
        destination: &WorkloadMeta,
        service: &DestinationService,
        flag: ResponseFlag,
    ) {
        let labels = tcp_labels(reporter, source, destination, service, flag);
        self.failed.get_or_create(&labels).inc();
    }

    /// Records a TLS handshake's duration and result in
    /// `hbone_tls_handshake_seconds`.
    pub(crate) fn handshake(&self, reporter: Reporter, succeeded: bool, took: Duration) {
        let labels = HandshakeLabels {
            role: reporter.role(),
            result: if succeeded { "success" } else { "failure" },
        };
        self.handshake_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// `limit` is one of `connections`, `connections_per_ip`, `tunnels`,
    /// `control_frames`.
    pub(crate) fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Counts a policy decision in `hbone_policy_decisions`, by the rule
    /// that decided.
    pub(crate) fn policy_decision(&self, rule: &str, allowed: bool) {
        let labels = DecisionLabels {
            rule: rule.to_owned(),
            decision: if allowed { "allow" } else { "deny" },
        };
        self.policy_decisions.get_or_create(&labels).inc();
    }

    /// Counts an HBONE connection open on a server until the guard drops.
    pub(crate) fn server_connection(&self) -> ConnectionGauge {
        self.server_connections.inc();
        ConnectionGauge(self.server_connections.clone())
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

    /// `what` is `config`, `policy`, `services`, `identity` or `revocation`.
    pub fn reload(&self, what: &'static str, succeeded: bool) {
        let labels = ReloadLabels {
            what,
            result: if succeeded { "success" } else { "failure" },
        };
        self.reloads.get_or_create(&labels).inc();
    }

    /// A certificate asked of `source` (e.g. `istio-ca`) came, or did not.
    pub fn renewal(&self, source: &'static str, succeeded: bool) {
        let labels = RenewalLabels {
            source,
            result: if succeeded { "success" } else { "failure" },
        };
        self.renewals.get_or_create(&labels).inc();
    }

    /// Plaintext connections to protected ports so far in `mode`
    /// (`strict` or `permissive`), as the firewall counted them: the
    /// counter moves up to `total` (a count that went down, as when the
    /// rules were reinstalled, is not taken back).
    pub fn inbound_plaintext(&self, mode: &'static str, total: u64) {
        let counter = self
            .inbound_plaintext
            .get_or_create(&InboundLabels { mode });
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
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
    source: &WorkloadMeta,
    destination: &WorkloadMeta,
    service: &DestinationService,
    flag: ResponseFlag,
) -> TcpLabels {
    let or_unknown = |value: &Option<String>| value.as_deref().unwrap_or(UNKNOWN).to_owned();
    let principal =
        |id: &Option<SpiffeId>| id.as_ref().map_or(UNKNOWN.to_owned(), |id| id.to_string());
    TcpLabels {
        reporter: reporter.as_str(),
        source_workload: or_unknown(&source.workload),
        source_canonical_service: source.canonical_service().to_owned(),
        source_canonical_revision: source.canonical_revision().to_owned(),
        source_workload_namespace: or_unknown(&source.namespace),
        source_principal: principal(&source.id),
        source_app: or_unknown(&source.app),
        source_version: or_unknown(&source.version),
        source_cluster: or_unknown(&source.cluster),
        destination_service: service.host.clone(),
        destination_service_namespace: service.namespace.clone(),
        destination_service_name: service.name.clone(),
        destination_workload: or_unknown(&destination.workload),
        destination_canonical_service: destination.canonical_service().to_owned(),
        destination_canonical_revision: destination.canonical_revision().to_owned(),
        destination_workload_namespace: or_unknown(&destination.namespace),
        destination_principal: principal(&destination.id),
        destination_app: or_unknown(&destination.app),
        destination_version: or_unknown(&destination.version),
        destination_cluster: or_unknown(&destination.cluster),
        // HBONE carries TCP.
        request_protocol: "tcp",
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

/// Istio's byte counters as a relay sees them: into and out of the tunnel.
#[derive(Debug)]
pub struct RelayBytes {
    to_tunnel: Counter,
    from_tunnel: Counter,
}

impl RelayBytes {
    /// Bytes the relay sent into the tunnel and received from it.
    pub fn add(&self, to_tunnel: u64, from_tunnel: u64) {
        if to_tunnel > 0 {
            self.to_tunnel.inc_by(to_tunnel);
        }
        if from_tunnel > 0 {
            self.from_tunnel.inc_by(from_tunnel);
        }
    }
}

/// Holds the open-connection gauge one higher for as long as it lives.
#[derive(Debug)]
pub struct ConnectionGauge(Gauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Baggage;

    fn meta(baggage: &str, id: &str) -> WorkloadMeta {
        WorkloadMeta::new(
            &Baggage::parse(baggage).0,
            Some(&SpiffeId::parse(id).unwrap()),
        )
    }

    #[test]
    fn istio_names_and_labels() {
        let metrics = Metrics::new();
        let client = meta(
            "k8s.cluster.name=c1,k8s.deployment.name=web,service.name=web,service.version=v1",
            "spiffe://cluster.local/ns/a/sa/client",
        );
        let server = meta("", "spiffe://cluster.local/ns/b/sa/server");
        let service = DestinationService::from_host(Some("db.b.svc.cluster.local"));
        let counters = metrics.tunnel_counters(Reporter::Destination, &client, &server, &service);
        counters.opened(Duration::from_millis(1));
        counters.relay_bytes().add(20, 10);
        counters.ended(Duration::from_millis(5), false);
        metrics.tunnel_failed(
            Reporter::Destination,
            &client,
            &server,
            &DestinationService::from_host(None),
            ResponseFlag::Deny,
        );
        let text = metrics.encode();
        let source = "source_workload=\"web\",source_canonical_service=\"web\",source_canonical_revision=\"v1\",source_workload_namespace=\"a\",source_principal=\"spiffe://cluster.local/ns/a/sa/client\",source_app=\"web\",source_version=\"v1\",source_cluster=\"c1\"";
        let service = "destination_service=\"db.b.svc.cluster.local\",destination_service_namespace=\"b\",destination_service_name=\"db\"";
        let destination = "destination_workload=\"unknown\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_workload_namespace=\"b\",destination_principal=\"spiffe://cluster.local/ns/b/sa/server\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"unknown\"";
        let tail = "request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"";
        assert!(
            text.contains(&format!(
                "istio_tcp_connections_opened_total{{reporter=\"destination\",{source},{service},{destination},{tail}}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("istio_tcp_received_bytes_total{reporter=\"destination\""));
        assert!(text.contains("destination_service=\"unknown\",destination_service_namespace=\"unknown\",destination_service_name=\"unknown\""));
        assert!(text.contains("response_flags=\"DENY\""));
        assert!(text.contains("hbone_tunnel_setup_seconds_count{role=\"server\"} 1"));
    }

    #[test]
    fn a_workload_without_metadata_is_unknown() {
        let nothing = WorkloadMeta::default();
        let labels = tcp_labels(
            Reporter::Source,
            &nothing,
            &nothing,
            &DestinationService::from_host(None),
            ResponseFlag::Connect,
        );
        assert_eq!(labels.source_principal, "unknown");
        assert_eq!(labels.source_workload_namespace, "unknown");
        assert_eq!(labels.destination_cluster, "unknown");
        assert_eq!(labels.request_protocol, "tcp");
    }
}
