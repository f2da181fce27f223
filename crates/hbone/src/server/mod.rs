//! The HBONE server: terminates mTLS + HTTP/2, checks each CONNECT, dials
//! the target and copies bytes both ways.
//!
//! Every connection and every stream runs in its own task, so a stream that
//! fails (bad request, denied, unreachable target) never disturbs the other
//! streams of its connection. The answer to CONNECT is `200` only once the
//! target dial has succeeded; refusals are sent as HEADERS with END_STREAM,
//! their status chosen in one place ([`Refusal::status`]).
//!
//! The same server acts as a double-HBONE gateway when given a routing
//! table: it then resolves `hostname:port` authorities to HBONE endpoints
//! and relays the (inner, encrypted) bytes without looking at them.

mod connect;
mod connection;
mod dial;
#[doc(hidden)]
pub mod fuzzing;
mod limits;
mod refusal;
mod stats;
#[cfg(all(test, feature = "ca"))]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::frame_guard::Rate;

use limits::Gate;
pub use limits::Limits;
pub use refusal::Refusal;
pub use stats::{ServerStats, StatsSnapshot};

use crate::access::{AccessLog, TracingLog};
use crate::config::{H2Settings, Timeouts};
use crate::gateway::Routes;
use crate::headers::Baggage;
use crate::identity::{Identity, SpiffeId};
use crate::lifecycle::Telemetry;
use crate::metrics::WorkloadMeta;
use crate::policy::{Policy, PolicyHandle};
use crate::revocation::Revocation;
use crate::services::{ServiceTable, ServicesHandle};
use crate::tls;
use crate::workers::Workers;

/// Everything a server needs: start from [`ServerConfig::new`] and change
/// what you need with the `with_*` methods.
///
/// ```
/// # fn example(identity: hbone::Identity) -> Result<(), Box<dyn std::error::Error>> {
/// use hbone::ServerConfig;
/// use hbone::config::Timeouts;
/// use hbone::server::Limits;
/// use std::time::Duration;
///
/// let config = ServerConfig::new("0.0.0.0:15008".parse()?, identity)
///     .with_timeouts(Timeouts::default().with_tunnel_idle(Duration::from_secs(3600)))
///     .with_limits(Limits::default().with_max_tunnels(10_000))
///     .with_proxy_protocol(true);
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where to listen; Istio's HBONE port is 15008. Ignored by
    /// [`Server::from_listener`], which serves the socket it is given.
    pub listen: SocketAddr,
    /// The certificate the server proves itself with, and the trust bundle
    /// it checks clients against.
    pub identity: Identity,
    /// Trust domains whose clients may connect; empty means the server's own.
    pub trust_domains: Vec<String>,
    /// Revocation lists client certificates are checked against; none by
    /// default. Replace them while running with
    /// [`tls::ServerTls::reload_revocation`] on [`Server::tls`].
    pub revocation: Revocation,
    /// Who may open tunnels to what; by default any peer of the trust
    /// domain, to loopback targets only.
    pub policy: Policy,
    /// HTTP/2 settings for accepted connections.
    pub h2: H2Settings,
    /// Limits on handshakes, target dials and idle connections or tunnels.
    pub timeouts: Timeouts,
    /// Receives one record per tunnel; by default a `tracing` line.
    pub access_log: Arc<dyn AccessLog>,
    /// Send a PROXY protocol v2 header to each target first, naming the
    /// original client and carrying the peer's SPIFFE ID (TLV 0xD0).
    pub proxy_protocol: bool,
    /// Our workload's metadata, returned as `baggage` on every 200.
    pub baggage: Baggage,
    /// Act as a double-HBONE gateway with these routes: authorities are
    /// service `hostname:port`s, relayed to their endpoints' HBONE port.
    pub gateway_routes: Option<Arc<Routes>>,
    /// Service host names this server answers for, when a CONNECT names
    /// a service instead of an address (ztunnel does in double HBONE).
    /// Empty by default: such requests are refused as unknown services.
    pub services: ServiceTable,
    /// Caps on connections and tunnels.
    pub limits: Limits,
    /// Metrics and the open-tunnel list, when the process keeps them.
    pub telemetry: Telemetry,
    /// Serve each accepted connection, with its tunnels, on one of these
    /// single-threaded workers instead of the runtime polling
    /// [`Server::run`]; `None` (the default) spawns there. With more than
    /// one worker, on Linux, [`Server::bind`] binds a listener per worker
    /// (SO_REUSEPORT) so that each accepts its own connections; a single
    /// worker accepts on the listener itself; a listener given to
    /// [`Server::from_listener`] is otherwise served by one accept loop
    /// that hands sockets to the workers in turn.
    pub workers: Option<Workers>,
}

impl ServerConfig {
    /// Defaults for everything but the address and identity.
    pub fn new(listen: SocketAddr, identity: Identity) -> Self {
        ServerConfig {
            listen,
            identity,
            trust_domains: Vec::new(),
            revocation: Revocation::default(),
            policy: Policy::default(),
            h2: H2Settings::server(),
            timeouts: Timeouts::default(),
            access_log: Arc::new(TracingLog::default()),
            proxy_protocol: false,
            baggage: Baggage::default(),
            gateway_routes: None,
            services: ServiceTable::default(),
            limits: Limits::default(),
            telemetry: Telemetry::default(),
            workers: None,
        }
    }

    /// Sets [`ServerConfig::trust_domains`].
    #[must_use]
    pub fn with_trust_domains(
        mut self,
        trust_domains: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.trust_domains = trust_domains.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`ServerConfig::revocation`].
    #[must_use]
    pub fn with_revocation(mut self, revocation: Revocation) -> Self {
        self.revocation = revocation;
        self
    }

    /// Sets [`ServerConfig::policy`].
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`ServerConfig::h2`].
    #[must_use]
    pub fn with_h2(mut self, h2: H2Settings) -> Self {
        self.h2 = h2;
        self
    }

    /// Sets [`ServerConfig::timeouts`].
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Sets [`ServerConfig::access_log`].
    #[must_use]
    pub fn with_access_log(mut self, access_log: Arc<dyn AccessLog>) -> Self {
        self.access_log = access_log;
        self
    }

    /// Sets [`ServerConfig::proxy_protocol`].
    #[must_use]
    pub fn with_proxy_protocol(mut self, proxy_protocol: bool) -> Self {
        self.proxy_protocol = proxy_protocol;
        self
    }

    /// Sets [`ServerConfig::baggage`].
    #[must_use]
    pub fn with_baggage(mut self, baggage: Baggage) -> Self {
        self.baggage = baggage;
        self
    }

    /// Makes the server a double-HBONE gateway with `routes`
    /// ([`ServerConfig::gateway_routes`]).
    #[must_use]
    pub fn with_gateway_routes(mut self, routes: impl Into<Arc<Routes>>) -> Self {
        self.gateway_routes = Some(routes.into());
        self
    }

    /// Sets [`ServerConfig::services`].
    #[must_use]
    pub fn with_services(mut self, services: ServiceTable) -> Self {
        self.services = services;
        self
    }

    /// Sets [`ServerConfig::limits`].
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`ServerConfig::telemetry`].
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Sets [`ServerConfig::workers`].
    #[must_use]
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = Some(workers);
        self
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The listener given to [`Server::from_listener`] has no local
    /// address: it is not a bound TCP socket.
    #[error("the listener given has no local address: {0}")]
    Listener(#[source] std::io::Error),
    /// The identity could not be made into a TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
}

/// A bound HBONE server.
pub struct Server {
    listener: TcpListener,
    /// The listener's address, read once.
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Where connections are served; kept out of [`Shared`] so that no
    /// task on a worker holds the workers alive.
    workers: Option<Workers>,
    /// With workers, on Linux, when the server bound its own address:
    /// listeners for workers 1.. on the same address (SO_REUSEPORT), so
    /// that each worker accepts for itself.
    spares: Vec<std::net::TcpListener>,
}

struct Shared {
    tls: tls::ServerTls,
    policy: PolicyHandle,
    h2: H2Settings,
    timeouts: Timeouts,
    access_log: Arc<dyn AccessLog>,
    stats: Arc<ServerStats>,
    telemetry: Telemetry,
    local_id: Arc<SpiffeId>,
    proxy_protocol: bool,
    /// The `baggage` response header, built once.
    baggage: Option<http::HeaderValue>,
    /// Our side of the tunnels in Istio's labels.
    local_meta: WorkloadMeta,
    gateway_routes: Option<Arc<Routes>>,
    services: ServicesHandle,
    gate: Arc<Gate>,
    /// How fast one connection may send control frames.
    control_frames: Rate,
    /// Flips to true when the server starts draining.
    draining: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Builds the TLS configuration and binds a listener on
    /// [`ServerConfig::listen`].
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        // TLS first: a bad identity is reported without touching the port.
        let tls = Self::server_tls(&config)?;
        let bind_error = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        #[cfg(target_os = "linux")]
        if let Some(workers) = &config.workers
            && workers.count() > 1
        {
            let mut listeners =
                crate::listeners::bind_reuseport(config.listen, workers, 0, workers.count())
                    .map_err(bind_error)?;
            let first = TcpListener::from_std(listeners.remove(0)).map_err(bind_error)?;
            let mut server = Self::serve_on(first, tls, config)?;
            server.spares = listeners;
            return Ok(server);
        }
        let listener = TcpListener::bind(config.listen).await.map_err(bind_error)?;
        Self::serve_on(listener, tls, config)
    }

    /// Builds the TLS configuration and serves `listener`, a socket bound
    /// elsewhere: handed over by systemd socket activation, inherited, or
    /// bound by the embedder with options of its own. `config.listen` is
    /// ignored; [`Server::local_addr`] is the listener's address, and it
    /// is the address the policy refuses as a target (the tunnel would
    /// loop).
    ///
    /// A `std::net::TcpListener` must be made non-blocking first, then
    /// converted inside the runtime:
    ///
    /// ```no_run
    /// # async fn example(identity: hbone::Identity) -> Result<(), Box<dyn std::error::Error>> {
    /// use hbone::{Server, ServerConfig};
    ///
    /// let socket = std::net::TcpListener::bind("127.0.0.1:15008")?;
    /// socket.set_nonblocking(true)?;
    /// let listener = tokio::net::TcpListener::from_std(socket)?;
    /// // `listen` is not used: the server takes the listener's address.
    /// let config = ServerConfig::new(([0, 0, 0, 0], 0).into(), identity);
    /// let server = Server::from_listener(listener, config)?;
    /// tokio::spawn(server.run());
    /// # Ok(()) }
    /// ```
    pub fn from_listener(
        listener: TcpListener,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let tls = Self::server_tls(&config)?;
        Self::serve_on(listener, tls, config)
    }

    /// The TLS configuration for `config`'s identity and trust domains.
    fn server_tls(config: &ServerConfig) -> Result<tls::ServerTls, ServerError> {
        let trust_domains = if config.trust_domains.is_empty() {
            vec![config.identity.id().trust_domain().to_owned()]
        } else {
            config.trust_domains.clone()
        };
        Ok(tls::ServerTls::with_revocation(
            &config.identity,
            trust_domains,
            config.revocation.clone(),
        )?)
    }

    /// The server on `listener`, whichever way it was bound.
    fn serve_on(
        listener: TcpListener,
        tls: tls::ServerTls,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let local_addr = listener.local_addr().map_err(ServerError::Listener)?;
        let workers = config.workers.clone();
        Ok(Server {
            listener,
            local_addr,
            shared: Arc::new(Shared::new(tls, config, local_addr)?),
            workers,
            spares: Vec::new(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The identity this server proves.
    pub fn local_id(&self) -> &SpiffeId {
        &self.shared.local_id
    }

    /// The TLS material in force; reload it to rotate certificates.
    pub fn tls(&self) -> tls::ServerTls {
        self.shared.tls.clone()
    }

    /// The policy in force; replace it to reload without a restart.
    pub fn policy(&self) -> PolicyHandle {
        self.shared.policy.clone()
    }

    /// The services table in force; replace it to reload without a
    /// restart.
    pub fn services(&self) -> ServicesHandle {
        self.shared.services.clone()
    }

    /// Live counters, shared with the running server.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// A handle that starts a graceful drain of this server.
    pub fn drainer(&self) -> Drainer {
        Drainer {
            draining: self.shared.draining.clone(),
        }
    }

    /// Accepts connections until a drain starts (see [`Server::drainer`]),
    /// then stops accepting, sends GOAWAY on every connection and returns
    /// once the tunnels in flight have finished. Bound the wait with a
    /// timeout of your choice: dropping the future leaves the remaining
    /// connections to end on their own.
    pub async fn run(self) {
        let Server {
            listener,
            shared,
            workers,
            spares,
            ..
        } = self;
        match workers {
            Some(workers) if !spares.is_empty() || workers.count() == 1 => {
                // Each worker accepts on its own listener (a single worker
                // on the one listener); the loops end as the drain starts,
                // or with this future (the set aborts them when dropped).
                let listeners =
                    std::iter::once(listener.into_std()).chain(spares.into_iter().map(Ok));
                let mut loops = tokio::task::JoinSet::new();
                for (index, listener) in listeners.enumerate() {
                    let shared = shared.clone();
                    let workers_here = workers.clone();
                    let accept = async move {
                        match listener.and_then(TcpListener::from_std) {
                            Ok(listener) => {
                                shared
                                    .accept_loop(listener, Some((workers_here, Some(index))))
                                    .await
                            }
                            Err(e) => tracing::warn!(error = %e, "a worker cannot listen"),
                        }
                    };
                    loops.spawn_on(accept, workers.handle(index));
                }
                crate::listeners::join_all(loops).await;
            }
            workers => {
                let workers = workers.map(|workers| (workers, None));
                let accept = shared.clone().accept_loop(listener, workers);
                crate::listeners::run_as_task(accept).await
            }
        }
        tracing::info!("draining: no new connections; waiting for open tunnels");
        while shared.stats.snapshot().connections_active > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts a graceful drain of a [`Server`]. Cheap to clone.
#[derive(Clone)]
pub struct Drainer {
    draining: tokio::sync::watch::Sender<bool>,
}

impl Drainer {
    /// Stop accepting and send GOAWAY; tunnels in flight carry on.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }
}

impl Shared {
    /// The state every connection of a server listening on `local_addr`
    /// shares.
    fn new(
        tls: tls::ServerTls,
        config: ServerConfig,
        local_addr: SocketAddr,
    ) -> Result<Shared, ServerError> {
        let policy = PolicyHandle::new(config.policy.with_own_listener(local_addr));
        // Peers of federated trust domains complete the handshake only when
        // the policy in force names them.
        let gate = {
            let policy = policy.clone();
            Arc::new(move |peer: &SpiffeId| policy.current().names_identity(peer))
        };
        let tls = tls.with_federation_gate(&config.identity, gate)?;
        Ok(Shared {
            tls,
            policy,
            h2: config.h2,
            timeouts: config.timeouts,
            access_log: config.access_log,
            stats: Arc::default(),
            telemetry: config.telemetry,
            local_id: Arc::new(config.identity.id().clone()),
            local_meta: WorkloadMeta::new(&config.baggage, Some(config.identity.id())),
            proxy_protocol: config.proxy_protocol,
            baggage: config
                .baggage
                .to_header()
                .and_then(|b| http::HeaderValue::from_str(&b).ok()),
            gateway_routes: config.gateway_routes,
            services: ServicesHandle::new(config.services),
            control_frames: Rate {
                frames: config.limits.max_control_frames,
                window: config.limits.control_frame_window,
            },
            gate: Arc::new(Gate::new(config.limits)),
            draining: tokio::sync::watch::Sender::new(false),
        })
    }
}
