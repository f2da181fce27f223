//! Prometheus metrics: Istio's `istio_tcp_*` tunnel metrics (same names and
//! labels as ztunnel, so existing dashboards work) and our own, prefixed
//! `hbone_`.
//!
//! Label values are identities, workload metadata (ours and the peer's
//! `baggage`), service host names, rule names and fixed words, never
//! addresses, so the number of series stays bounded by the number of
//! workloads, services and rules. Istio's byte counters are named from the reporting proxy's
//! point of view: `received` is what came from the downstream (client)
//! side, `sent` what went back to it. They count as bytes move, so a tunnel
//! that stays open for days shows its traffic while it flows.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::headers::{self, Baggage};
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

/// Istio's value for whatever is not known.
const UNKNOWN: &str = "unknown";

/// Istio's canonical revision of a workload that has no version.
const LATEST: &str = "latest";

/// One end of a tunnel as Istio's labels describe it: built from our own
/// configuration or from a peer's `baggage` and proven SPIFFE ID (see
/// [`WorkloadMeta::new`]). What is `None` is labelled `unknown`.
///
/// The derived labels follow Istio's rules for Kubernetes workloads:
/// `canonical_service` is the app (`service.name`, our `--app`), else the
/// workload name; `canonical_revision` is the version (`service.version`,
/// our `--app-version`), else `latest` once a canonical service is known.
/// `app` and `version` are the app and version as given, nothing derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// The proven identity: `*_principal`.
    pub id: Option<SpiffeId>,
    /// `k8s.cluster.name`: `*_cluster`.
    pub cluster: Option<String>,
    /// The namespace of an Istio-form SPIFFE ID, else `k8s.namespace.name`:
    /// `*_workload_namespace`.
    pub namespace: Option<String>,
    /// `k8s.<kind>.name` (e.g. `k8s.deployment.name`): `*_workload`.
    pub workload: Option<String>,
    /// `service.name`: `*_app`.
    pub app: Option<String>,
    /// `service.version`: `*_version`.
    pub version: Option<String>,
}

impl WorkloadMeta {
    /// The metadata of the workload proving `id` that sent (or, for
    /// ourselves, sends) `baggage`. The SPIFFE ID's namespace wins over
    /// the baggage's: it is proven, the baggage is only claimed.
    pub fn new(baggage: &Baggage, id: Option<&SpiffeId>) -> Self {
        let value = |key: &str| baggage.get(key).map(str::to_owned);
        let workload = baggage.iter().find_map(|(key, value)| {
            let kind = key.strip_prefix("k8s.")?.strip_suffix(".name")?;
            let is_workload = !matches!(kind, "cluster" | "namespace" | "node" | "container")
                && !kind.contains('.');
            is_workload.then(|| value.to_owned())
        });
        WorkloadMeta {
            id: id.cloned(),
            cluster: value(headers::CLUSTER_KEY),
            namespace: id
                .and_then(SpiffeId::namespace)
                .map(str::to_owned)
                .or_else(|| value(headers::NAMESPACE_KEY)),
            workload,
            app: value(headers::SERVICE_KEY),
            version: value(headers::VERSION_KEY),
        }
    }

    /// Istio's canonical service: the app, else the workload name.
    pub fn canonical_service(&self) -> &str {
        self.app
            .as_deref()
            .or(self.workload.as_deref())
            .unwrap_or(UNKNOWN)
    }

    /// Istio's canonical revision: the version, else `latest` for a
    /// workload whose canonical service is known.
    pub fn canonical_revision(&self) -> &str {
        match (&self.version, self.app.is_some() || self.workload.is_some()) {
            (Some(version), _) => version,
            (None, true) => LATEST,
            (None, false) => UNKNOWN,
        }
    }
}

/// Istio's `destination_service*` labels for a service host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationService {
    /// The host name, lowercase: `destination_service`.
    pub host: String,
    /// Its first label: `destination_service_name`.
    pub name: String,
    /// Its second label when the name has the Kubernetes form
    /// `NAME.NAMESPACE.svc[...]`: `destination_service_namespace`.
    pub namespace: String,
}

impl DestinationService {
    /// The labels for the service `host` a tunnel was for (see
    /// [`service_host`]); all `unknown` without one.
    pub fn from_host(host: Option<&str>) -> Self {
        let Some(host) = host
            .map(|h| h.trim_end_matches('.'))
            .filter(|h| !h.is_empty())
        else {
            return DestinationService {
                host: UNKNOWN.to_owned(),
                name: UNKNOWN.to_owned(),
                namespace: UNKNOWN.to_owned(),
            };
        };
        let host = host.to_ascii_lowercase();
        let mut labels = host.split('.');
        let name = labels.next().unwrap_or(UNKNOWN).to_owned();
        let namespace = match (labels.next(), labels.next()) {
            (Some(namespace), Some("svc")) if !namespace.is_empty() => namespace.to_owned(),
            _ => UNKNOWN.to_owned(),
        };
        DestinationService {
            host,
            name,
            namespace,
        }
    }
}

/// The service host name of a `hostname:port` authority; `None` for an
/// `ip:port` one (a workload address, not a service) and for anything
/// that is not a plain DNS name, so that label values stay names.
pub fn service_host(authority: &str) -> Option<&str> {
    let (host, port) = authority.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let is_name = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && host.parse::<std::net::IpAddr>().is_err();
    is_name.then_some(host)
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

    /// Counters of the successful path for one (source, destination,
    /// service) combination, resolved once per connection (and per
    /// metadata the connection's tunnels bring, see [`PerConnection`]) so
    /// tunnels do not look them up.
    pub fn tunnel_counters(
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

    /// A tunnel that never opened, or a failed handshake (the peer is
    /// all `unknown` then: [`WorkloadMeta::default`]).
    pub fn tunnel_failed(
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

/// Most distinct values [`PerConnection`] keeps beyond the first.
const PER_CONNECTION_MORE: usize = 7;

/// A connection's memo of what its tunnels' metadata resolves to (their
/// counters, mostly), keyed by what may vary from tunnel to tunnel: the
/// raw `baggage` header, the service. Nearly every connection sees one
/// value, which is read without a lock and without allocating; a few
/// more are kept under a lock; beyond that each is resolved anew, so a
/// peer that varies its metadata cannot grow the connection's memory.
#[derive(Debug)]
pub struct PerConnection<K, V> {
    first: OnceLock<(K, V)>,
    more: Mutex<Vec<(K, V)>>,
}

impl<K, V> Default for PerConnection<K, V> {
    fn default() -> Self {
        PerConnection {
            first: OnceLock::new(),
            more: Mutex::new(Vec::new()),
        }
    }
}

impl<K, V: Clone> PerConnection<K, V> {
    /// The value kept for the key `matches` accepts, else the one `make`
    /// builds (with its key, which `matches` must accept), kept if there
    /// is room.
    pub fn get_or_make(&self, matches: impl Fn(&K) -> bool, make: impl FnOnce() -> (K, V)) -> V {
        let mut make = Some(make);
        if let Some((key, value)) = self.first.get()
            && matches(key)
        {
            return value.clone();
        }
        let (key, value) = self
            .first
            .get_or_init(|| make.take().expect("not yet called")());
        if matches(key) {
            return value.clone();
        }
        let mut more = self.more.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, value)) = more.iter().find(|(key, _)| matches(key)) {
            return value.clone();
        }
        // `make` is still ours: had we initialised `first`, it would match.
        let (key, value) = make.take().expect("used only for first, which matched")();
        if more.len() < PER_CONNECTION_MORE {
            more.push((key, value.clone()));
        }
        value
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
    fn workload_meta_from_baggage_and_id() {
        let m = meta(
            "k8s.cluster.name=c2,k8s.namespace.name=claimed,k8s.statefulset.name=db,k8s.node.name=n1",
            "spiffe://cluster.local/ns/backend/sa/db",
        );
        assert_eq!(m.cluster.as_deref(), Some("c2"));
        assert_eq!(m.namespace.as_deref(), Some("backend"), "the proven one");
        assert_eq!(m.workload.as_deref(), Some("db"), "any kind, not the node");
        assert_eq!((m.app.as_deref(), m.version.as_deref()), (None, None));
        assert_eq!(m.canonical_service(), "db", "the workload name");
        assert_eq!(m.canonical_revision(), "latest");

        // Not an Istio-form ID: the baggage's namespace.
        let m = meta(
            "k8s.namespace.name=claimed,service.name=web,service.version=v3",
            "spiffe://example.org/web",
        );
        assert_eq!(m.namespace.as_deref(), Some("claimed"));
        assert_eq!(m.workload, None);
        assert_eq!(m.canonical_service(), "web", "the app");
        assert_eq!(m.canonical_revision(), "v3");

        let nothing = WorkloadMeta::default();
        assert_eq!(nothing.canonical_service(), "unknown");
        assert_eq!(nothing.canonical_revision(), "unknown");
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

    #[test]
    fn destination_service_from_host() {
        let labels = |host| {
            let s = DestinationService::from_host(host);
            (s.host, s.name, s.namespace)
        };
        let owned = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(labels(None), owned("unknown", "unknown", "unknown"));
        assert_eq!(labels(Some("")), owned("unknown", "unknown", "unknown"));
        assert_eq!(
            labels(Some("Echo.Demo.svc.cluster.local.")),
            owned("echo.demo.svc.cluster.local", "echo", "demo")
        );
        assert_eq!(
            labels(Some("echo.demo.svc")),
            owned("echo.demo.svc", "echo", "demo")
        );
        assert_eq!(
            labels(Some("echo.demo")),
            owned("echo.demo", "echo", "unknown"),
            "not the Kubernetes form"
        );
        assert_eq!(
            labels(Some("api.example.com")),
            owned("api.example.com", "api", "unknown")
        );
    }

    #[test]
    fn service_host_of_authorities() {
        assert_eq!(
            service_host("echo.demo.svc.cluster.local:8080"),
            Some("echo.demo.svc.cluster.local")
        );
        assert_eq!(service_host("db:5432"), Some("db"));
        for address in ["10.0.0.1:80", "[fd00::1]:80", "[::1]:443"] {
            assert_eq!(service_host(address), None, "{address}");
        }
        for odd in [
            "",
            "echo",
            "echo:http",
            ":80",
            "echo:99999",
            "a b:80",
            "a\"b:80",
        ] {
            assert_eq!(service_host(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn per_connection_resolves_each_value_once() {
        let cache: PerConnection<u32, u32> = PerConnection::default();
        let made = std::cell::Cell::new(0);
        let get = |key: u32| {
            cache.get_or_make(
                |k| *k == key,
                || {
                    made.set(made.get() + 1);
                    (key, key * 10)
                },
            )
        };
        assert_eq!(get(1), 10);
        assert_eq!(get(1), 10);
        assert_eq!(made.get(), 1, "the common case: one value");
        assert_eq!(get(2), 20);
        assert_eq!(get(2), 20);
        assert_eq!(get(1), 10);
        assert_eq!(made.get(), 2);
        // Beyond what is kept: still right, resolved each time.
        for key in 3..20 {
            assert_eq!(get(key), key * 10);
        }
        let before = made.get();
        assert_eq!(get(19), 190);
        assert_eq!(made.get(), before + 1, "not kept");
        assert_eq!(get(3), 30);
        assert_eq!(made.get(), before + 1, "kept");
        assert_eq!(cache.more.lock().unwrap().len(), PER_CONNECTION_MORE);
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
