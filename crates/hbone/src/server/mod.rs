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
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::cork::{Cork, FlushGate, Hold};
use crate::frame_guard::{self, FrameGuard, Rate, Tripwire};
use crate::read_ahead::ReadAhead;

pub use limits::Limits;
use limits::{ConnectionRefusal, Gate};
pub use refusal::Refusal;
use stats::CountOnDrop;
pub use stats::{ServerStats, StatsSnapshot};

use crate::access::{AccessLog, TracingLog};
use crate::config::{H2Settings, Timeouts};
use crate::gateway::Routes;
use crate::headers::Baggage;
use crate::identity::{Identity, SpiffeId, spiffe_id_of};
use crate::lifecycle::Telemetry;
use crate::metrics::{DestinationService, Reporter, ResponseFlag, WorkloadMeta};
use crate::policy::{Policy, PolicyHandle};
use crate::revocation::Revocation;
use crate::services::{ServiceTable, ServicesHandle};
use crate::tls;
use crate::window::{self, PingPlan, Probe, Windows};
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

    /// Accepts on `listener` until a drain starts, then closes it. On
    /// workers, each connection runs on the one [`Workers::place`] picks,
    /// given the worker this loop runs on (`None`: a loop off them).
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        workers: Option<(Workers, Option<usize>)>,
    ) {
        let mut draining = self.draining.subscribe();
        let mut listener = match crate::listeners::NodelayListener::new(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept on the listener");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = draining.wait_for(|d| *d) => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let workers = workers.as_ref().map(|(workers, on)| (workers, *on));
                    self.clone().admit(tcp, peer, workers)
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin, and keep serving what is open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves a new connection if the limits allow; otherwise closes it at
    /// once, before any TLS work is spent on it.
    ///
    /// On `workers`, the socket goes to the chosen worker's reactor, so
    /// that the connection and all it spawns run on that thread.
    fn admit(
        self: Arc<Self>,
        tcp: crate::listeners::Accepted,
        peer: SocketAddr,
        workers: Option<(&Workers, Option<usize>)>,
    ) {
        let workers = workers.and_then(|(workers, accepted_on)| {
            let to = workers.place_handshake(accepted_on);
            (Some(to) != accepted_on).then_some((workers, to))
        });
        match self.gate.admit_connection(peer.ip()) {
            Ok(slot) => match workers {
                None => match tcp.register() {
                    Ok(tcp) => {
                        tokio::spawn(async move {
                            self.serve_connection(tcp, peer).await;
                            drop(slot);
                        });
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
                },
                Some((workers, to)) => match tcp.into_std() {
                    Ok(tcp) => {
                        workers.handle(to).spawn(async move {
                            match TcpStream::from_std(tcp) {
                                Ok(tcp) => self.serve_connection(tcp, peer).await,
                                Err(e) => {
                                    tracing::warn!(%peer, error = %e, "cannot move a connection to its worker");
                                }
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot move a connection to a worker");
                    }
                },
            },
            Err(which) => {
                self.stats.limit_refusals.fetch_add(1, Ordering::AcqRel);
                let (which, metric) = match which {
                    ConnectionRefusal::Total => ("connection limit", "connections"),
                    ConnectionRefusal::PerIp => {
                        ("per-source connection limit", "connections_per_ip")
                    }
                };
                if let Some(metrics) = &self.telemetry.metrics {
                    metrics.limit_refused(metric);
                }
                tracing::warn!(%peer, "refusing connection: {which} reached");
            }
        }
    }

    async fn serve_connection(self: Arc<Self>, tcp: TcpStream, peer_addr: SocketAddr) {
        self.stats
            .connections_accepted
            .fetch_add(1, Ordering::AcqRel);
        let _closed = CountOnDrop(&self.stats.connections_closed);
        // Where the connection arrived: services without an address of
        // their own are reached there, as ztunnel does.
        let arrived_on = tcp
            .local_addr()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
        let handshake_started = std::time::Instant::now();
        let tripwire = Arc::new(Tripwire::default());
        let handshake = self.handshake(tcp, peer_addr, tripwire.clone()).await;
        let metrics = self.telemetry.metrics.as_deref();
        if let Some(metrics) = metrics {
            metrics.handshake(
                Reporter::Destination,
                handshake.is_ok(),
                handshake_started.elapsed(),
            );
        }
        let (connection, peer_id, cork) = match handshake {
            Ok(connection) => connection,
            Err(reason) => {
                self.stats.handshake_failures.fetch_add(1, Ordering::AcqRel);
                if let Some(metrics) = metrics {
                    metrics.tunnel_failed(
                        Reporter::Destination,
                        &WorkloadMeta::default(),
                        &self.local_meta,
                        &DestinationService::from_host(None),
                        ResponseFlag::TlsFailure,
                    );
                }
                // Under the access log's target, so that a shipper keeping only
                // access records still sees the peers that were turned away.
                tracing::info!(
                    target: "hbone::access", source = %peer_addr, reason = %reason,
                    "handshake failed"
                );
                return;
            }
        };
        self.clone()
            .serve_h2(connection, cork, peer_addr, arrived_on, peer_id, tripwire)
            .await;
    }

    /// Serves the streams of an HTTP/2 connection whose peer is `peer_id`
    /// (its handshakes done), until it ends. Each turn of the connection
    /// is driven through `cork`, so that its writes leave together.
    async fn serve_h2<S: AsyncRead + AsyncWrite + Unpin>(
        self: Arc<Self>,
        mut connection: h2::server::Connection<FrameGuard<S>, Bytes>,
        cork: Cork,
        peer_addr: SocketAddr,
        arrived_on: std::net::IpAddr,
        peer_id: SpiffeId,
        tripwire: Arc<Tripwire>,
    ) {
        let metrics = self.telemetry.metrics.as_deref();
        // One copy per connection, shared by its tunnels' records.
        let peer_id = Arc::new(peer_id);
        // Resolved on the connection's first tunnel: they depend on the
        // client's metadata, which comes with each request.
        let counters = metrics.map(|_| Arc::default());
        let _open = metrics.map(|metrics| metrics.server_connection());
        let probe = Arc::new(Probe::default());
        let pings = PingPlan::new(self.timeouts.keepalive, &self.h2);
        let (windows, mut new_windows) = watch::channel(Windows::ZERO);
        let keepalive = window::ping(connection.ping_pong(), pings, probe.clone(), windows);
        tokio::pin!(keepalive);
        let mut draining = self.draining.subscribe();
        let mut goaway_sent = false;
        let mut calmed = false;
        // One timer per connection, looked at only when it fires: a new
        // stream just moves the time it will be judged from.
        let idle_limit = self.timeouts.connection_idle;
        let idle_timer = tokio::time::sleep(idle_limit);
        tokio::pin!(idle_timer);
        let mut last_stream = tokio::time::Instant::now();
        let from = connect::FromConnection {
            source: peer_addr,
            arrived_on,
            peer_id: peer_id.clone(),
            counters,
            probe,
        };
        loop {
            let next = tokio::select! {
                next = std::future::poll_fn(|cx| cork.drive(cx, |cx| connection.poll_accept(cx))) => next,
                () = &mut idle_timer, if !goaway_sent => {
                    let now = tokio::time::Instant::now();
                    if connection.has_streams() {
                        idle_timer.as_mut().reset(now + idle_limit);
                    } else if last_stream + idle_limit > now {
                        idle_timer.as_mut().reset(last_stream + idle_limit);
                    } else {
                        tracing::debug!(%peer_addr, %peer_id, "closing idle HBONE connection");
                        connection.graceful_shutdown();
                        goaway_sent = true;
                    }
                    continue;
                }
                trip = tripwire.tripped(), if !calmed => {
                    // The guard passes h2 nothing more; GOAWAY goes out
                    // and the connection closes as h2 is driven on.
                    connection.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    calmed = true;
                    goaway_sent = true;
                    self.stats.control_frame_floods.fetch_add(1, Ordering::AcqRel);
                    self.stats.limit_refusals.fetch_add(1, Ordering::AcqRel);
                    if let Some(metrics) = metrics {
                        metrics.limit_refused("control_frames");
                    }
                    tracing::warn!(
                        %peer_addr, %peer_id,
                        frames = trip.charged,
                        last = frame_guard::kind_name(trip.kind),
                        limit = self.control_frames.frames,
                        per = ?self.control_frames.window,
                        "closing HBONE connection with ENHANCE_YOUR_CALM: control-frame flood"
                    );
                    continue;
                }
                reason = &mut keepalive => {
                    tracing::info!(%peer_addr, %peer_id, %reason, "closing HBONE connection: client unresponsive");
                    break;
                }
                Ok(()) = new_windows.changed() => {
                    let granted = *new_windows.borrow_and_update();
                    connection.set_target_window_size(granted.connection);
                    if let Err(e) = connection.set_initial_window_size(granted.stream) {
                        tracing::debug!(%peer_addr, error = %e, "cannot grow the stream window");
                    }
                    continue;
                }
                _ = draining.wait_for(|d| *d), if !goaway_sent => {
                    // GOAWAY: the client opens no new streams here; the
                    // ones in flight finish and accept() then ends.
                    connection.graceful_shutdown();
                    goaway_sent = true;
                    continue;
                }
            };
            match next {
                Some(Ok((request, respond))) => {
                    last_stream = tokio::time::Instant::now();
                    let serve = self.clone().serve_stream(from.clone(), request, respond);
                    tokio::spawn(serve);
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer_addr, error = %e, "HBONE connection ended");
                    break;
                }
                None => {
                    // No more streams will open; let the ones in flight
                    // finish, which needs the connection driven.
                    let _ =
                        std::future::poll_fn(|cx| cork.drive(cx, |cx| connection.poll_closed(cx)))
                            .await;
                    break;
                }
            }
        }
    }

    /// TLS then HTTP/2, each bounded by the handshake timeout.
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        tripwire: Arc<Tripwire>,
    ) -> Result<(h2::server::Connection<Guarded, Bytes>, SpiffeId, Cork), String> {
        let limit = self.timeouts.handshake;
        let acceptor = TlsAcceptor::from(self.tls.current());
        let mut cork = Cork::default();
        let tcp = cork.hold(ReadAhead::new(tcp));
        let tls_stream = match timeout(limit, acceptor.accept(tcp).into_fallible()).await {
            Err(_) => return Err(format!("TLS handshake timed out after {limit:?}")),
            Ok(Err((error, tcp))) => {
                linger_close(tcp.into_inner().into_inner()).await;
                let why = tls::rustls_error_in(&error).and_then(crate::revocation::describe);
                return Err(match why {
                    Some(why) => format!("TLS: {why}"),
                    None => format!("TLS: {error}"),
                });
            }
            Ok(Ok(tls_stream)) => tls_stream,
        };
        let mut tls_stream = tls_stream;
        let (_, session) = tls_stream.get_mut();
        session.set_buffer_limit(Some(tls::SEND_BUFFER));
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err("client did not negotiate ALPN h2".into());
        }
        let peer_id = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or("client sent no certificate")
            .and_then(|cert| {
                spiffe_id_of(cert).map_err(|_| "client certificate has no SPIFFE ID")
            })?;
        let connection = self
            .h2_handshake(cork.gate(tls_stream), &cork, tripwire)
            .await?;
        tracing::debug!(%peer_addr, %peer_id, "HBONE connection accepted");
        Ok((connection, peer_id, cork))
    }

    /// The HTTP/2 handshake over `io` (decrypted), under the control-frame
    /// guard, bounded by the handshake timeout.
    async fn h2_handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        cork: &Cork,
        tripwire: Arc<Tripwire>,
    ) -> Result<h2::server::Connection<FrameGuard<S>, Bytes>, String> {
        let limit = self.timeouts.handshake;
        let guarded = FrameGuard::new(io, self.control_frames, tripwire);
        let mut handshake = std::pin::pin!(self.h2.server_builder().handshake(guarded));
        let handshake = std::future::poll_fn(|cx| {
            cork.defer_unless_waiting(cx, |cx| handshake.as_mut().poll(cx))
        });
        timeout(limit, handshake)
            .await
            .map_err(|_| format!("HTTP/2 preface timed out after {limit:?}"))?
            .map_err(|e| format!("HTTP/2: {e}"))
    }
}

/// What h2 reads and writes on a server connection: TLS over TCP, with
/// the control-frame budget watching the frames go by, and the cork's
/// layers on either side of TLS.
type Guarded = FrameGuard<FlushGate<tokio_rustls::server::TlsStream<Hold<ReadAhead<TcpStream>>>>>;

/// Closes a connection whose handshake failed so that the peer reads our
/// alert: send FIN, then read and discard what the peer had in flight.
/// Closing with unread data would make the kernel send RST, which can
/// destroy the alert before the client reads it, leaving it with a bare
/// "connection reset" instead of the reason.
async fn linger_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: Duration = Duration::from_secs(1);
    const MAX_DRAIN: usize = 64 << 10;
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_DRAIN {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = timeout(LINGER, drain).await;
}
