//! The dialer: opens tunnels to HBONE servers.
//!
//! A tunnel is one HTTP/2 CONNECT stream. Streams to the same server, with
//! the same expected identities, share a TLS + HTTP/2 connection until it
//! reaches its stream limit; then another connection is opened. The choice of
//! connection lives in [`crate::pool`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use crate::config::{H2Settings, Timeouts};
use crate::identity::{Identity, SpiffeId, spiffe_id_of};
use crate::pool::{ConnState, Pool, PoolKey, PooledConn, StreamLease};
use crate::stream::H2Stream;
use crate::tls::{self, ClientBase, TlsFailure};

/// The step of opening a tunnel that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect to the HBONE server.
    Connect,
    /// TLS and HTTP/2 handshakes.
    Handshake,
    /// Waiting for the response to CONNECT.
    Response,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "TCP connect",
            Stage::Handshake => "TLS/HTTP2 handshake",
            Stage::Response => "CONNECT response",
        })
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no expected server identity given: pass at least one SPIFFE ID")]
    NoExpectedIdentity,
    #[error("TCP connect to HBONE server {server} failed: {source}")]
    Connect {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {server} failed: {failure}")]
    Tls {
        server: SocketAddr,
        failure: TlsFailure,
    },
    #[error("HTTP/2 error with {server}: {source}")]
    Http2 {
        server: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("HBONE connection to {server} closed before the tunnel could open")]
    Closed { server: SocketAddr },
    #[error("{server} refused the tunnel to {target}: HTTP {status}")]
    Status {
        server: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("{stage} with {server} timed out")]
    Timeout { server: SocketAddr, stage: Stage },
}

/// How a dialer behaves.
#[derive(Debug, Clone)]
pub struct DialerConfig {
    pub h2: H2Settings,
    pub timeouts: Timeouts,
    /// Share HTTP/2 connections between tunnels. Off, every tunnel gets a
    /// fresh TLS + HTTP/2 connection (for measuring handshake cost).
    pub pooling: bool,
    /// A pooled connection without streams for this long is closed. Keeps
    /// stale connections from outliving the server's address.
    pub idle_timeout: Duration,
}

impl Default for DialerConfig {
    fn default() -> Self {
        DialerConfig {
            h2: H2Settings::client(),
            timeouts: Timeouts::default(),
            pooling: true,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Opens tunnels as one local identity. Cheap to clone; clones share the
/// connection pool.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<Inner>,
}

struct Inner {
    tls: ClientBase,
    local_id: SpiffeId,
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
        Ok(Dialer {
            inner: Arc::new(Inner {
                tls: tls::client_base_config(identity)?,
                local_id: identity.id().clone(),
                config,
                pool: Pool::default(),
            }),
        })
    }

    /// Open HTTP/2 connections in the pool.
    pub fn pooled_connections(&self) -> usize {
        self.inner.pool.len()
    }

    /// The identity this dialer presents.
    pub fn local_id(&self) -> &SpiffeId {
        &self.inner.local_id
    }

    /// Opens a tunnel to `target` through the HBONE server at `server`,
    /// which must prove one of the `expected` identities.
    pub async fn connect(
        &self,
        server: SocketAddr,
        expected: &[SpiffeId],
        target: SocketAddr,
    ) -> Result<Tunnel, DialError> {
        if expected.is_empty() {
            return Err(DialError::NoExpectedIdentity);
        }
        if !self.inner.config.pooling {
            let conn = self.handshake(server, expected).await?;
            return self.open_fresh(&conn, server, target).await;
        }
        let key = PoolKey::new(server, expected);
        if let Some(tunnel) = self.open_pooled(&key, server, target).await? {
            return Ok(tunnel);
        }
        // Nothing pooled has room: open a connection, one handshake at a
        // time per key. Whoever waited re-checks the pool first, since the
        // connection just opened usually has room for them too.
        let dial_lock = self.inner.pool.dial_lock(&key);
        let dialing = dial_lock.lock().await;
        if let Some(tunnel) = self.open_pooled(&key, server, target).await? {
            return Ok(tunnel);
        }
        let conn = self.handshake(server, expected).await?;
        self.inner.pool.insert(key, conn.clone());
        drop(dialing);
        self.open_fresh(&conn, server, target).await
    }

    /// Opens the first tunnel of a connection that was just established.
    async fn open_fresh(
        &self,
        conn: &PooledConn,
        server: SocketAddr,
        target: SocketAddr,
    ) -> Result<Tunnel, DialError> {
        // The connection may already have failed: in TLS 1.3 a server's
        // rejection of our certificate arrives after our handshake is done.
        let Some(lease) = conn.try_acquire() else {
            return Err(match conn.state.tls_failure() {
                Some(failure) => DialError::Tls { server, failure },
                None => DialError::Closed { server },
            });
        };
        match self.open(conn, lease, server, target).await {
            Ok(tunnel) => Ok(tunnel),
            Err(OpenError::Unusable(e) | OpenError::Tunnel(e)) => Err(e),
        }
    }

    /// Opens the tunnel on a pooled connection with room, if there is one.
    /// A pooled connection may have been closed by the peer since it was
    /// last used; such a failure before the request went out is not the
    /// tunnel's: the connection is retired and `None` returned.
    async fn open_pooled(
        &self,
        key: &PoolKey,
        server: SocketAddr,
        target: SocketAddr,
    ) -> Result<Option<Tunnel>, DialError> {
        while let Some((conn, lease)) = self.inner.pool.checkout(key) {
            match self.open(&conn, lease, server, target).await {
                Ok(tunnel) => return Ok(Some(tunnel)),
                Err(OpenError::Tunnel(e)) => return Err(e),
                Err(OpenError::Unusable(e)) => {
                    tracing::debug!(%server, error = %e, "retiring pooled connection");
                    conn.state.mark_closed();
                }
            }
        }
        Ok(None)
    }

    /// TCP connect, TLS handshake (verifying the server's identity), and
    /// HTTP/2 handshake; the connection is then driven by its own task.
    async fn handshake(
        &self,
        server: SocketAddr,
        expected: &[SpiffeId],
    ) -> Result<Arc<PooledConn>, DialError> {
        let timeouts = &self.inner.config.timeouts;
        let tcp = timeout(timeouts.connect, TcpStream::connect(server))
            .await
            .map_err(|_| DialError::Timeout {
                server,
                stage: Stage::Connect,
            })?
            .map_err(|source| DialError::Connect { server, source })?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.inner.tls.for_peer(expected));
        let server_name = tls::placeholder_server_name(server.ip());
        let tls_stream = timeout(timeouts.handshake, connector.connect(server_name, tcp))
            .await
            .map_err(|_| DialError::Timeout {
                server,
                stage: Stage::Handshake,
            })?
            .map_err(|e| DialError::Tls {
                server,
                failure: TlsFailure::from_io(&e)
                    .unwrap_or_else(|| TlsFailure::Protocol(e.to_string())),
            })?;
        let (_, session) = tls_stream.get_ref();
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(DialError::Tls {
                server,
                failure: TlsFailure::NoH2,
            });
        }
        let peer_id = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| spiffe_id_of(cert).ok())
            .ok_or_else(|| DialError::Tls {
                server,
                failure: TlsFailure::Protocol("server sent no SPIFFE certificate".into()),
            })?;
        let state = Arc::new(ConnState::default());
        let io = ErrorRecorder {
            inner: tls_stream,
            state: state.clone(),
        };
        let (send, connection) = timeout(
            timeouts.handshake,
            self.inner
                .config
                .h2
                .client_builder()
                .handshake::<_, Bytes>(io),
        )
        .await
        .map_err(|_| DialError::Timeout {
            server,
            stage: Stage::Handshake,
        })?
        .map_err(|source| DialError::Http2 { server, source })?;
        let driver_state = state.clone();
        let keepalive = timeouts.keepalive;
        let idle_timeout = self.inner.config.idle_timeout;
        tokio::spawn(async move {
            let mut connection = connection;
            let ping_pong = connection.ping_pong();
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(%server, error = %e, "HBONE connection ended with an error");
                    }
                }
                reason = keepalive.watch(ping_pong) => {
                    tracing::info!(%server, %reason, "closing HBONE connection: peer unresponsive");
                }
                () = driver_state.closed_when_idle(idle_timeout) => {
                    tracing::debug!(%server, "closing idle HBONE connection");
                }
            }
            driver_state.mark_closed();
        });
        tracing::debug!(%server, %peer_id, "HBONE connection established");
        Ok(Arc::new(PooledConn::new(
            send,
            state,
            peer_id,
            self.inner.config.h2.max_concurrent_streams as usize,
        )))
    }

    /// Sends CONNECT on `conn` and waits for the server's answer.
    async fn open(
        &self,
        conn: &PooledConn,
        lease: StreamLease,
        server: SocketAddr,
        target: SocketAddr,
    ) -> Result<Tunnel, OpenError> {
        let classify = |source: h2::Error| match conn.state.tls_failure() {
            Some(failure) => DialError::Tls { server, failure },
            None => DialError::Http2 { server, source },
        };
        let request = connect_request(target);
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
        Ok(Tunnel {
            stream: H2Stream::new(send, response.into_body()),
            peer_id: conn.peer_id.clone(),
            _lease: lease,
        })
    }
}

enum OpenError {
    /// The connection could not carry the request: it was closed, or
    /// failed before the server answered. Safe to retry elsewhere.
    Unusable(DialError),
    /// The request went out and the tunnel failed.
    Tunnel(DialError),
}

/// The CONNECT request for `target`: only `:method` and `:authority`.
fn connect_request(target: SocketAddr) -> Request<()> {
    // Drop any IPv6 scope id: it has no place in an authority.
    let target = SocketAddr::new(target.ip(), target.port());
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = http::Uri::try_from(target.to_string())
        .unwrap_or_else(|_| unreachable!("a socket address is a valid authority"));
    request
}

/// An open tunnel: a byte stream to the target, through the HBONE server.
pub struct Tunnel {
    stream: H2Stream,
    peer_id: SpiffeId,
    _lease: StreamLease,
}

impl Tunnel {
    /// The identity the server proved in the TLS handshake.
    pub fn peer_id(&self) -> &SpiffeId {
        &self.peer_id
    }

    /// The underlying stream, for the zero-copy relay in [`crate::copy`].
    pub(crate) fn stream_mut(&mut self) -> &mut H2Stream {
        &mut self.stream
    }

    /// Tears the tunnel down with RST_STREAM(CONNECT_ERROR): the server
    /// resets its TCP connection to the target instead of closing it.
    pub fn reset(&mut self) {
        self.stream.reset(h2::Reason::CONNECT_ERROR);
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Passes I/O through, and keeps the TLS error that ended the connection.
///
/// In TLS 1.3 the client finishes its handshake before the server has
/// checked the client certificate, so a rejection arrives as an alert on the
/// first read, inside HTTP/2. h2 keeps only the message of such an error;
/// this keeps the typed reason so the dialer can report it.
struct ErrorRecorder<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> ErrorRecorder<T> {
    fn record<R>(&self, result: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(e)) = &result
            && let Some(failure) = TlsFailure::from_io(e)
        {
            self.state.record_tls_failure(failure);
        }
        result
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ErrorRecorder<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.record(result)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorRecorder<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.record(result)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.record(result)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.record(result)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
