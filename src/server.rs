//! The HBONE server: terminates mTLS + HTTP/2, checks each CONNECT, dials
//! the target and copies bytes both ways.
//!
//! Every connection and every stream runs in its own task, so a stream that
//! fails (bad request, denied, unreachable target) never disturbs the other
//! streams of its connection. The answer to CONNECT is `200` only once the
//! target dial has succeeded; refusals are sent as HEADERS with END_STREAM,
//! their status chosen in one place ([`Refusal::status`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::access::{AccessLog, Outcome, Role, TracingLog, TunnelRecord};
use crate::authority::{AuthorityError, parse_authority};
use crate::config::{H2Settings, Timeouts};
use crate::copy;
use crate::identity::{Identity, SpiffeId, spiffe_id_of};
use crate::policy::{Denial, Policy};
use crate::stream::H2Stream;
use crate::tls;

/// Everything a server needs.
#[derive(Clone)]
pub struct ServerConfig {
    /// Where to listen; Istio's HBONE port is 15008.
    pub listen: SocketAddr,
    pub identity: Identity,
    /// Trust domains whose clients may connect; empty means the server's own.
    pub trust_domains: Vec<String>,
    pub policy: Policy,
    pub h2: H2Settings,
    pub timeouts: Timeouts,
    pub access_log: Arc<dyn AccessLog>,
}

impl ServerConfig {
    /// Defaults for everything but the address and identity.
    pub fn new(listen: SocketAddr, identity: Identity) -> Self {
        ServerConfig {
            listen,
            identity,
            trust_domains: Vec::new(),
            policy: Policy::default(),
            h2: H2Settings::server(),
            timeouts: Timeouts::default(),
            access_log: Arc::new(TracingLog),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
}

/// Why a CONNECT was refused. The only place statuses and reasons are chosen.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("method {0} is not allowed; HBONE accepts CONNECT only")]
    MethodNotAllowed(Method),
    #[error("CONNECT must not carry :scheme or :path")]
    NotPlainConnect,
    #[error(transparent)]
    BadAuthority(#[from] AuthorityError),
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("target {target} unreachable: {source}")]
    Unreachable {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("target {0} did not answer in time")]
    DialTimeout(SocketAddr),
}

impl Refusal {
    /// The HTTP status sent for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotPlainConnect | Refusal::BadAuthority(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::DialTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::NotPlainConnect => "bad_request",
            Refusal::BadAuthority(_) => "bad_authority",
            Refusal::Denied(_) => "denied",
            Refusal::Unreachable { .. } => "target_unreachable",
            Refusal::DialTimeout(_) => "target_timeout",
        }
    }
}

/// Counters a running server keeps; read them with [`Server::stats`].
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_closed: AtomicU64,
    handshake_failures: AtomicU64,
    tunnels_opened: AtomicU64,
    tunnels_closed: AtomicU64,
    refusals: AtomicU64,
}

/// A point-in-time copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub handshake_failures: u64,
    pub tunnels_opened: u64,
    pub tunnels_active: u64,
    pub refusals: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Acquire);
        let accepted = load(&self.connections_accepted);
        let opened = load(&self.tunnels_opened);
        StatsSnapshot {
            connections_accepted: accepted,
            connections_active: accepted - load(&self.connections_closed),
            handshake_failures: load(&self.handshake_failures),
            tunnels_opened: opened,
            tunnels_active: opened - load(&self.tunnels_closed),
            refusals: load(&self.refusals),
        }
    }
}

/// Increments `closed` when dropped, so a count is right on every exit path.
struct CountOnDrop<'a>(&'a AtomicU64);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A bound HBONE server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    acceptor: TlsAcceptor,
    policy: Policy,
    h2: H2Settings,
    timeouts: Timeouts,
    access_log: Arc<dyn AccessLog>,
    stats: Arc<ServerStats>,
    local_id: SpiffeId,
}

impl Server {
    /// Builds the TLS configuration and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let trust_domains = if config.trust_domains.is_empty() {
            vec![config.identity.id().trust_domain().to_owned()]
        } else {
            config.trust_domains.clone()
        };
        let tls_config = tls::server_config(&config.identity, trust_domains)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                acceptor: TlsAcceptor::from(tls_config),
                policy: config.policy,
                h2: config.h2,
                timeouts: config.timeouts,
                access_log: config.access_log,
                stats: Arc::default(),
                local_id: config.identity.id().clone(),
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The identity this server proves.
    pub fn local_id(&self) -> &SpiffeId {
        &self.shared.local_id
    }

    /// Live counters, shared with the running server.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// Accepts connections until the task is dropped or aborted.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move { shared.serve_connection(tcp, peer).await });
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
}

impl Shared {
    async fn serve_connection(self: Arc<Self>, tcp: TcpStream, peer_addr: SocketAddr) {
        self.stats
            .connections_accepted
            .fetch_add(1, Ordering::AcqRel);
        let _closed = CountOnDrop(&self.stats.connections_closed);
        let _ = tcp.set_nodelay(true);
        let connection = match self.handshake(tcp, peer_addr).await {
            Ok(connection) => connection,
            Err(reason) => {
                self.stats.handshake_failures.fetch_add(1, Ordering::AcqRel);
                tracing::info!(%peer_addr, %reason, "HBONE handshake failed");
                return;
            }
        };
        let (mut connection, peer_id) = connection;
        let keepalive = self.timeouts.keepalive.watch(connection.ping_pong());
        tokio::pin!(keepalive);
        loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                reason = &mut keepalive => {
                    tracing::info!(%peer_addr, %peer_id, %reason, "closing HBONE connection: client unresponsive");
                    break;
                }
            };
            match next {
                Some(Ok((request, respond))) => {
                    let shared = self.clone();
                    let peer_id = peer_id.clone();
                    tokio::spawn(async move {
                        shared
                            .serve_stream(peer_addr, peer_id, request, respond)
                            .await
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer_addr, error = %e, "HBONE connection ended");
                    break;
                }
                None => {
                    // No more streams will open; let the ones in flight
                    // finish, which needs the connection driven.
                    let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
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
    ) -> Result<
        (
            h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
            SpiffeId,
        ),
        String,
    > {
        let limit = self.timeouts.handshake;
        let tls_stream = match timeout(limit, self.acceptor.accept(tcp).into_fallible()).await {
            Err(_) => return Err(format!("TLS handshake timed out after {limit:?}")),
            Ok(Err((error, tcp))) => {
                linger_close(tcp).await;
                return Err(format!("TLS: {error}"));
            }
            Ok(Ok(tls_stream)) => tls_stream,
        };
        let (_, session) = tls_stream.get_ref();
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
        let connection = timeout(limit, self.h2.server_builder().handshake(tls_stream))
            .await
            .map_err(|_| format!("HTTP/2 preface timed out after {limit:?}"))?
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tracing::debug!(%peer_addr, %peer_id, "HBONE connection accepted");
        Ok((connection, peer_id))
    }

    async fn serve_stream(
        &self,
        source: SocketAddr,
        peer_id: SpiffeId,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let started = Instant::now();
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut record = TunnelRecord {
            role: Role::Server,
            source,
            peer_id,
            target: authority,
            outcome: Outcome::Completed,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
        };
        match self.open_target(&record.peer_id, &request).await {
            Err(refusal) => {
                self.stats.refusals.fetch_add(1, Ordering::AcqRel);
                let mut response = Response::new(());
                *response.status_mut() = refusal.status();
                let _ = respond.send_response(response, true);
                record.outcome = Outcome::Refused {
                    status: refusal.status().as_u16(),
                    reason: refusal.reason(),
                    detail: refusal.to_string(),
                };
            }
            Ok(mut target) => {
                self.stats.tunnels_opened.fetch_add(1, Ordering::AcqRel);
                let _closed = CountOnDrop(&self.stats.tunnels_closed);
                let send = match respond.send_response(Response::new(()), false) {
                    Ok(send) => send,
                    Err(e) => {
                        record.outcome = Outcome::Failed(format!("client went away: {e}"));
                        record.duration = started.elapsed();
                        self.access_log.record(&record);
                        return;
                    }
                };
                let mut stream = H2Stream::new(send, request.into_body());
                match copy::tcp_tunnel(&mut target, &mut stream).await {
                    Ok(moved) => {
                        record.bytes_sent = moved.b_to_a;
                        record.bytes_received = moved.a_to_b;
                    }
                    Err(e) => {
                        record.bytes_sent = e.transferred.b_to_a;
                        record.bytes_received = e.transferred.a_to_b;
                        record.outcome = Outcome::Failed(e.to_string());
                        // Pass the failure on as a reset, in both directions.
                        stream.reset(h2::Reason::CONNECT_ERROR);
                        let _ = target.set_zero_linger();
                    }
                }
            }
        }
        record.duration = started.elapsed();
        self.access_log.record(&record);
    }

    /// Validates the request, authorizes it and dials the target.
    async fn open_target(
        &self,
        peer_id: &SpiffeId,
        request: &Request<RecvStream>,
    ) -> Result<TcpStream, Refusal> {
        if request.method() != Method::CONNECT {
            return Err(Refusal::MethodNotAllowed(request.method().clone()));
        }
        let uri = request.uri();
        if uri.scheme().is_some() || uri.path_and_query().is_some() {
            return Err(Refusal::NotPlainConnect);
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let target = parse_authority(authority)?;
        self.policy.decide(peer_id, target)?;
        let tcp = timeout(self.timeouts.connect, TcpStream::connect(target))
            .await
            .map_err(|_| Refusal::DialTimeout(target))?
            .map_err(|source| Refusal::Unreachable { target, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

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
