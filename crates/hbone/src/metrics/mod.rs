//! Prometheus metrics (with the `metrics` feature): Istio's `istio_tcp_*` tunnel metrics (same names and
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

use std::sync::{Mutex, OnceLock};

use crate::headers::{self, Baggage};
use crate::identity::SpiffeId;

#[cfg(not(feature = "metrics"))]
mod disabled;
#[cfg(feature = "metrics")]
mod registry;

#[cfg(not(feature = "metrics"))]
pub use disabled::{ConnectionGauge, Metrics, RelayBytes, TunnelCounters};
#[cfg(feature = "metrics")]
pub use registry::{ConnectionGauge, Metrics, RelayBytes, TunnelCounters};

/// Which end of a tunnel reports: Istio's `reporter` label. Istio knows
/// more reporters (`waypoint`), which may be added here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reporter {
    /// The end that opened the tunnel (dialer, entries).
    Source,
    /// The end that terminated it (server, gateway).
    Destination,
}

impl Reporter {
    /// Istio's label value: `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    /// Our `role` label value: `client` or `server`.
    pub fn role(self) -> &'static str {
        match self {
            Reporter::Source => "client",
            Reporter::Destination => "server",
        }
    }
}

/// Istio's `response_flags`: why a tunnel failed, `-` when it did not.
/// Envoy defines many more flags, which may be added here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseFlag {
    /// The tunnel did not fail (`-`).
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
    /// The label value, as Istio writes it (`-`, `DENY`, `NR`, ...).
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

/// Istio's value for whatever is not known.
pub(crate) const UNKNOWN: &str = "unknown";

/// Istio's canonical revision of a workload that has no version.
pub(crate) const LATEST: &str = "latest";

/// One end of a tunnel as Istio's labels describe it: built from our own
/// configuration or from a peer's `baggage` and proven SPIFFE ID (see
/// [`WorkloadMeta::new`]). What is `None` is labelled `unknown`.
///
/// The derived labels follow Istio's rules for Kubernetes workloads:
/// `canonical_service` is the app (`service.name`, our `--app`), else the
/// workload name; `canonical_revision` is the version (`service.version`,
/// our `--app-version`), else `latest` once a canonical service is known.
/// `app` and `version` are the app and version as given, nothing derived.
/// Labels may be added, so it is built with [`WorkloadMeta::new`] (or
/// `Default` and field assignment), never as a literal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Istio's `destination_service*` labels for a service host name, made by
/// [`DestinationService::from_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

/// Most distinct values [`PerConnection`] keeps beyond the first.
const PER_CONNECTION_MORE: usize = 7;

/// A connection's memo of what its tunnels' metadata resolves to (their
/// counters, mostly), keyed by what may vary from tunnel to tunnel: the
/// raw `baggage` header, the service. Nearly every connection sees one
/// value, which is read without a lock and without allocating; a few
/// more are kept under a lock; beyond that each is resolved anew, so a
/// peer that varies its metadata cannot grow the connection's memory.
#[derive(Debug)]
pub(crate) struct PerConnection<K, V> {
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
    pub(crate) fn get_or_make(
        &self,
        matches: impl Fn(&K) -> bool,
        make: impl FnOnce() -> (K, V),
    ) -> V {
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
