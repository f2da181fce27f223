//! The dialer: opens tunnels to HBONE servers, directly or through a
//! gateway (double HBONE).
//!
//! A tunnel is one HTTP/2 CONNECT stream. Streams to the same server, with
//! the same expected identities, share a TLS + HTTP/2 connection until it
//! reaches its stream limit; then another connection is opened. The choice of
//! connection lives in `pool`; establishing one in `establish`.
//!
//! Through a gateway, the dialer opens an outer tunnel to the gateway with
//! the service's `hostname:port` as authority, runs a second mTLS handshake
//! inside it with the final server, and sends the real CONNECT on that
//! inner connection. Inner connections are pooled too, per (gateway,
//! service, expected identities), so a new user connection costs one
//! stream, not two handshakes.

mod config;
mod error;
mod establish;
#[cfg(all(test, feature = "ca"))]
mod in_memory_tests;
mod route;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode};
use tokio::time::timeout;

pub use config::DialerConfig;
pub use error::{DialError, Stage};
pub use establish::check_socket_mark;
pub use route::{Route, TunnelRequest};
pub(crate) use tunnel::PeerCache;
use tunnel::PeerMeta;
pub use tunnel::Tunnel;

use crate::headers::{self, Baggage, TraceParent};
use crate::identity::{Identity, SpiffeId};
use crate::lifecycle::Telemetry;
use crate::metrics::{DestinationService, Reporter, WorkloadMeta, service_host};
use crate::pool::{Choice, DialGate, Pool, PoolKey, PooledConn, StreamLease};
use crate::revocation::Revocation;
use crate::stream::H2Stream;
use crate::tls::{self, ClientBase, TlsFailure};
use crate::workers::Workers;

/// Opens tunnels as one local identity. Cheap to clone; clones share the
/// connection pool.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced on certificate rotation; connections already open keep
    /// the material they were made with.
    tls: std::sync::RwLock<ClientBase>,
    local_id: Arc<SpiffeId>,
    /// Our side of the tunnels in Istio's labels.
    local_meta: WorkloadMeta,
    config: DialerConfig,
    pool: Pool,
}

impl Dialer {
    /// A dialer presenting `identity`, with default settings.
    pub fn new(identity: &Identity) -> Result<Self, tls::TlsConfigError> {
        Self::with_config(identity, DialerConfig::default())
    }

    /// A dialer presenting `identity`, with `config`.
    pub fn with_config(
        identity: &Identity,
        config: DialerConfig,
    ) -> Result<Self, tls::TlsConfigError> {
        let metrics = config.telemetry.metrics.clone();
        let dialer = Dialer {
            inner: Arc::new(Inner {
                tls: std::sync::RwLock::new(
                    tls::client_base_config(identity)?.with_revocation(config.revocation.clone()),
                ),
                local_id: Arc::new(identity.id().clone()),
                local_meta: WorkloadMeta::new(&config.baggage, Some(identity.id())),
                config,
                pool: Pool::default(),
            }),
        };
        if let Some(metrics) = metrics {
            // Weak: the metrics must not keep a dropped dialer's pool alive.
            let inner = Arc::downgrade(&dialer.inner);
            metrics.on_scrape(move |metrics| {
                if let Some(inner) = inner.upgrade() {
                    for (peer, connections, streams) in inner.pool.by_peer() {
                        metrics.add_pool(&peer, connections, streams);
                    }
                }
            });
        }
        Ok(dialer)
    }

    /// Uses `identity` (certificate, key and trust bundle) for connections
    /// made from now on. On error the previous material stays in force.
    /// The revocation lists in force are kept.
    pub fn reload_identity(&self, identity: &Identity) -> Result<(), tls::TlsConfigError> {
        let base = tls::client_base_config(identity)?;
        let mut tls = self.inner.tls.write().unwrap_or_else(|e| e.into_inner());
        *tls = base.with_revocation(tls.revocation().clone());
        Ok(())
    }

    /// Checks server certificates of new connections against `revocation`
    /// (replacing the lists in force). Pooled connections take no new
    /// tunnels from now on, so that a server revoked meanwhile is not
    /// reached through a connection made before; the tunnels they carry
    /// go on until they end.
    pub fn reload_revocation(&self, revocation: Revocation) {
        {
            let mut tls = self.inner.tls.write().unwrap_or_else(|e| e.into_inner());
            *tls = tls.clone().with_revocation(revocation);
        }
        // Dropped here: each ends once its open tunnels are done.
        drop(self.inner.pool.take_all());
    }

    /// Ends the pooled connections cleanly, so that peers record a normal
    /// end rather than a lost connection: no new tunnels go on them, and
    /// each sends GOAWAY and TLS close_notify once its open tunnels are
    /// done. Call it before the process exits. Waits up to `limit`, and
    /// says whether every connection had ended by then; those still
    /// carrying tunnels are left to end with them. A double-HBONE inner
    /// connection ends its outer tunnel as it closes, so the connection to
    /// the gateway follows. Tunnels opened afterwards get new connections.
    pub async fn close(&self, limit: Duration) -> bool {
        let states: Vec<_> = self
            .inner
            .pool
            .take_all()
            .into_iter()
            .map(|conn| conn.state.clone())
            .collect();
        let all_ended = async {
            for state in &states {
                state.ended().await;
            }
        };
        timeout(limit, all_ended).await.is_ok()
    }

    /// Open HTTP/2 connections in the pool.
    pub fn pooled_connections(&self) -> usize {
        self.inner.pool.len()
    }

    /// Pooled connections retired so far because a tunnel found them
    /// unusable before the server answered (the peer had closed or reset
    /// them, or sent GOAWAY); each time the tunnel went on another
    /// connection instead of failing.
    pub fn pooled_connections_retired(&self) -> u64 {
        self.inner.pool.retired()
    }

    /// Where entries built on this dialer serve their connections
    /// ([`DialerConfig::workers`]).
    pub(crate) fn workers(&self) -> Option<&Workers> {
        self.inner.config.workers.as_ref()
    }

    /// The identity this dialer presents.
    pub fn local_id(&self) -> &SpiffeId {
        &self.inner.local_id
    }

    /// The identity, shared (for records).
    pub fn local_id_arc(&self) -> Arc<SpiffeId> {
        self.inner.local_id.clone()
    }

    /// Our workload as Istio's labels describe it: from the `baggage` we
    /// send and our identity.
    pub fn local_meta(&self) -> &WorkloadMeta {
        &self.inner.local_meta
    }

    /// Where this dialer's tunnels are counted and listed.
    pub fn telemetry(&self) -> &Telemetry {
        &self.inner.config.telemetry
    }

    /// Opens a tunnel to `target` through the HBONE server at `server`,
    /// which must prove one of the `expected` identities.
    pub async fn connect(
        &self,
        server: SocketAddr,
        expected: &[SpiffeId],
        target: SocketAddr,
    ) -> Result<Tunnel, DialError> {
        let route = Route::Direct {
            server,
            server_ids: expected.to_vec(),
        };
        self.open(&route, &TunnelRequest::new(target)).await
    }

    /// Opens a tunnel along `route` for `request`.
    pub async fn open(&self, route: &Route, request: &TunnelRequest) -> Result<Tunnel, DialError> {
        let target = authority_of(request.target);
        match route {
            Route::Direct { server, server_ids } => {
                if server_ids.is_empty() {
                    return Err(DialError::NoExpectedIdentity);
                }
                let key = PoolKey::direct(*server, server_ids);
                let connect_request = self.connect_request(&target, request, false);
                self.tunnel(key, *server, None, connect_request, || {
                    self.establish_tcp(*server, server_ids)
                })
                .await
            }
            Route::Gateway {
                gateway,
                gateway_ids,
                service,
                server_ids,
            } => {
                if server_ids.is_empty() || gateway_ids.is_empty() {
                    return Err(DialError::NoExpectedIdentity);
                }
                let key = PoolKey::via_gateway(*gateway, gateway_ids, service, server_ids);
                let connect_request = self.connect_request(&target, request, true);
                let establish_inner = || async {
                    let outer_key = PoolKey::direct(*gateway, gateway_ids);
                    let outer_request = self.connect_request(service, request, false);
                    let outer = self
                        .tunnel(outer_key, *gateway, None, outer_request, || {
                            self.establish_tcp(*gateway, gateway_ids)
                        })
                        .await?;
                    self.establish(outer, *gateway, server_ids).await
                };
                let service = service_host(service);
                self.tunnel(key, *gateway, service, connect_request, establish_inner)
                    .await
            }
        }
    }

    /// Opens a tunnel with `request` on a connection of `key`: a pooled one
    /// with room, or one made by `establish`. `service` is the host name of
    /// the service a tunnel through a gateway is for.
    async fn tunnel<E, F>(
        &self,
        key: PoolKey,
        server: SocketAddr,
        service: Option<&str>,
        request: Request<()>,
        establish: E,
    ) -> Result<Tunnel, DialError>
    where
        E: Fn() -> F,
        F: Future<Output = Result<Arc<PooledConn>, DialError>>,
    {
        let on = OnConn { server, service };
        if !self.inner.config.pooling {
            // Boxed: the handshake's state is large and short-lived; kept
            // inline it would make every tunnel's task as big.
            let conn = Box::pin(establish()).await?;
            return self.open_fresh(&conn, on, request).await;
        }
        if let Some(tunnel) = self
            .open_pooled(&key, on, &request, Choice::AvoidBulk)
            .await?
        {
            return Ok(tunnel);
        }
        let gate = self.inner.pool.dial_gate(&key);
        let dialled = self.dial_through(&gate, &key, on, request, establish).await;
        if dialled.is_err() {
            // A key whose dials fail keeps no entry once no one waits on
            // it: a node dialling many unreachable peers would pile them up.
            drop(gate);
            self.inner.pool.forget_unused(&key);
        }
        dialled
    }

    /// Nothing pooled has room, or every connection carries bulk: opens a
    /// connection through `gate`, one handshake at a time per key. Whoever
    /// waited re-checks the pool first, since the connection just opened
    /// usually has room for them too.
    async fn dial_through<E, F>(
        &self,
        gate: &DialGate,
        key: &PoolKey,
        on: OnConn<'_>,
        request: Request<()>,
        establish: E,
    ) -> Result<Tunnel, DialError>
    where
        E: Fn() -> F,
        F: Future<Output = Result<Arc<PooledConn>, DialError>>,
    {
        let turn = match gate.enter().await {
            Ok(turn) => turn,
            Err(e) => return self.pooled_or(e, key, on, &request).await,
        };
        if let Some(tunnel) = self
            .open_pooled(key, on, &request, Choice::AvoidBulk)
            .await?
        {
            return Ok(tunnel);
        }
        let conn = match Box::pin(establish()).await {
            Ok(conn) => conn,
            Err(e) => {
                // Everyone who waited behind this attempt fails with it,
                // unless a connection that carries bulk has room.
                turn.finished(Some(&e));
                return self.pooled_or(e, key, on, &request).await;
            }
        };
        self.inner.pool.insert(key.clone(), conn.clone());
        turn.finished(None);
        self.open_fresh(&conn, on, request).await
    }

    /// Opens the first tunnel of a connection that was just established.
    async fn open_fresh(
        &self,
        conn: &PooledConn,
        on: OnConn<'_>,
        request: Request<()>,
    ) -> Result<Tunnel, DialError> {
        let server = on.server;
        // The connection may already have failed: in TLS 1.3 a server's
        // rejection of our certificate arrives after our handshake is done.
        let Some(lease) = conn.try_acquire() else {
            return Err(rejected_after_handshake(server, conn));
        };
        match self.send_connect(conn, lease, on, request).await {
            Ok(tunnel) => Ok(tunnel),
            // A brand-new connection that dies before its first answer was
            // almost always refused by the server; when its alert was lost
            // to the close (peers that reset instead of draining), say so.
            Err(OpenError::Unusable(e)) if closed_under_us(&e) => {
                Err(rejected_after_handshake(server, conn))
            }
            Err(OpenError::Unusable(e) | OpenError::Tunnel(e)) => Err(e),
        }
    }

    /// Opens the tunnel on a pooled connection with room, if there is one.
    /// A pooled connection may have been closed by the peer since it was
    /// last used; such a failure before the server answered is not the
    /// tunnel's: the connection is retired and the next one tried.
    async fn open_pooled(
        &self,
        key: &PoolKey,
        on: OnConn<'_>,
        request: &Request<()>,
        choice: Choice,
    ) -> Result<Option<Tunnel>, DialError> {
        let server = on.server;
        while let Some((conn, lease)) = self.inner.pool.checkout(key, choice) {
            match self
                .send_connect(&conn, lease, on, clone_request(request))
                .await
            {
                Ok(tunnel) => return Ok(Some(tunnel)),
                Err(OpenError::Tunnel(e)) => return Err(e),
                Err(OpenError::Unusable(e)) => {
                    tracing::debug!(%server, error = %e, "retiring pooled connection");
                    self.inner.pool.retire(&conn);
                }
            }
        }
        Ok(None)
    }

    /// A new connection for `key` could not be opened (`error`): the
    /// tunnel goes on a pooled one with room after all, bulk or not.
    async fn pooled_or(
        &self,
        error: DialError,
        key: &PoolKey,
        on: OnConn<'_>,
        request: &Request<()>,
    ) -> Result<Tunnel, DialError> {
        match self.open_pooled(key, on, request, Choice::Any).await? {
            Some(tunnel) => Ok(tunnel),
            None => Err(error),
        }
    }

    /// The CONNECT request: `:authority`, then `forwarded` (when the
    /// original client is known), `traceparent`, our `baggage`, and on the
    /// inner request of double HBONE our network name.
    fn connect_request(
        &self,
        authority: &str,
        request: &TunnelRequest,
        inner: bool,
    ) -> Request<()> {
        let mut connect = Request::new(());
        *connect.method_mut() = Method::CONNECT;
        match http::Uri::try_from(authority) {
            Ok(uri) => *connect.uri_mut() = uri,
            // Left without authority: the server answers 400, which the
            // caller sees as a refusal naming the authority.
            Err(_) => tracing::warn!(authority, "not a valid :authority"),
        }
        let config = &self.inner.config;
        let headers = connect.headers_mut();
        let mut insert = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        if let Some(source) = request.source {
            insert(headers::FORWARDED, &headers::forwarded_for(source));
        }
        let trace = request.trace.unwrap_or_else(TraceParent::random);
        insert(headers::TRACEPARENT, &trace.to_string());
        if let Some(baggage) = config.baggage.to_header() {
            insert(headers::BAGGAGE, &baggage);
        }
        if inner && let Some(network) = &config.network {
            insert(headers::FORWARDED_NETWORK, network);
        }
        connect
    }

    /// Sends CONNECT on `conn` and waits for the server's answer.
    async fn send_connect(
        &self,
        conn: &PooledConn,
        lease: StreamLease,
        on: OnConn<'_>,
        request: Request<()>,
    ) -> Result<Tunnel, OpenError> {
        let server = on.server;
        let classify = |source: h2::Error| match conn.state.tls_failure() {
            Some(failure) => DialError::Tls { server, failure },
            None => DialError::Http2 { server, source },
        };
        let target = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut send_request = conn
            .send_request()
            .ready()
            .await
            .map_err(|e| OpenError::Unusable(classify(e)))?;
        let (response, send) = send_request
            .send_request(request, false)
            .map_err(|e| OpenError::Unusable(classify(e)))?;
        let response = timeout(self.inner.config.timeouts.response, response)
            .await
            .map_err(|_| {
                OpenError::Tunnel(DialError::Timeout {
                    server,
                    stage: Stage::Response,
                })
            })?
            .map_err(|e| {
                // The connection died (or refused the stream) before the
                // server answered: no byte of the tunnel has flowed, so
                // the request may go out again on another connection.
                if e.is_io() || e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    OpenError::Unusable(classify(e))
                } else {
                    OpenError::Tunnel(classify(e))
                }
            })?;
        if response.status() != StatusCode::OK {
            return Err(OpenError::Tunnel(DialError::Status {
                server,
                target,
                status: response.status(),
            }));
        }
        let peer = self.peer_meta(conn, on.service, response.headers().get(headers::BAGGAGE));
        Ok(Tunnel {
            stream: H2Stream::new(send, response.into_body())
                .with_probe(Some(conn.state.probe.clone())),
            peer_id: conn.peer_id.clone(),
            peer,
            _lease: lease,
        })
    }

    /// The server's metadata from the `baggage` of its 200, and the
    /// counters of tunnels so answered: the connection's, parsed and
    /// resolved only when a 200 brings a `baggage` it has not seen yet.
    fn peer_meta(
        &self,
        conn: &PooledConn,
        service: Option<&str>,
        baggage: Option<&HeaderValue>,
    ) -> Arc<PeerMeta> {
        conn.state.peers.get_or_make(
            |seen| seen.as_ref() == baggage,
            || {
                let parsed = baggage
                    .and_then(|v| v.to_str().ok())
                    .map(|v| Baggage::parse(v).0)
                    .unwrap_or_default();
                let counters = self.inner.config.telemetry.metrics.as_ref().map(|metrics| {
                    Arc::new(metrics.tunnel_counters(
                        Reporter::Source,
                        &self.inner.local_meta,
                        &WorkloadMeta::new(&parsed, Some(&conn.peer_id)),
                        &DestinationService::from_host(service),
                    ))
                });
                let peer = PeerMeta {
                    baggage: parsed,
                    counters,
                };
                (baggage.cloned(), Arc::new(peer))
            },
        )
    }
}

/// The connection a tunnel goes on, as errors and metrics name it: the
/// server's address, and the service when through a gateway.
#[derive(Clone, Copy)]
struct OnConn<'a> {
    server: SocketAddr,
    service: Option<&'a str>,
}

enum OpenError {
    /// The connection could not carry the request: it was closed, or
    /// failed before the server answered. Safe to retry elsewhere.
    Unusable(DialError),
    /// The request went out and the tunnel failed.
    Tunnel(DialError),
}

/// Whether the connection itself went away (as opposed to the server
/// answering with an HTTP/2 error of its own).
fn closed_under_us(error: &DialError) -> bool {
    match error {
        DialError::Closed { .. } => true,
        DialError::Http2 { source, .. } => source.is_io(),
        _ => false,
    }
}

/// The error for a fresh connection that closed before its first answer:
/// the TLS alert if we caught it, else the most likely reason.
fn rejected_after_handshake(server: SocketAddr, conn: &PooledConn) -> DialError {
    let failure = conn
        .state
        .tls_failure()
        .unwrap_or(TlsFailure::ClosedAfterHandshake);
    DialError::Tls { server, failure }
}

/// `ip:port` with IPv6 in brackets and no scope id, which has no place in
/// an authority.
fn authority_of(target: SocketAddr) -> String {
    SocketAddr::new(target.ip(), target.port()).to_string()
}

/// A copy of a bodiless request, to send it again on another connection.
fn clone_request(request: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}
