//! Establishing an HBONE connection: TLS (verifying the server's
//! identity) and HTTP/2 over any byte stream, a TCP connection or, for
//! double HBONE, a tunnel through a gateway. The connection is then driven
//! by its own task, which also runs keepalive and closes it when idle.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::{DialError, Dialer, Inner, Stage};
use crate::cork::Cork;
use crate::frame_guard::{FrameGuard, Rate};
use crate::identity::{SpiffeId, spiffe_id_of};
use crate::metrics::Reporter;
use crate::pool::{ConnState, PooledConn};
use crate::read_ahead::ReadAhead;
use crate::tls::{self, TlsFailure};
use crate::window::{self, PingPlan, Windows};
use crate::woken::PollWhenWoken;

impl Dialer {
    /// TCP connect to `server`, then [`Dialer::establish`].
    pub(super) async fn establish_tcp(
        &self,
        server: SocketAddr,
        expected: &[SpiffeId],
    ) -> Result<Arc<PooledConn>, DialError> {
        let timeouts = &self.inner.config.timeouts;
        let mark = self.inner.config.socket_mark;
        let tcp = timeout(timeouts.connect, connect_marked(server, mark))
            .await
            .map_err(|_| DialError::Timeout {
                server,
                stage: Stage::Connect,
            })?
            .map_err(|source| DialError::Connect { server, source })?;
        let _ = tcp.set_nodelay(true);
        self.establish(ReadAhead::new(tcp), server, expected).await
    }

    /// TLS handshake over `io` (verifying that the server is one of
    /// `expected`) and HTTP/2 handshake. `server` names the connection in
    /// errors and logs.
    pub(super) async fn establish<IO>(
        &self,
        io: IO,
        server: SocketAddr,
        expected: &[SpiffeId],
    ) -> Result<Arc<PooledConn>, DialError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let started = std::time::Instant::now();
        let result = self.handshake(io, server, expected).await;
        if let Some(metrics) = &self.inner.config.telemetry.metrics {
            metrics.handshake(Reporter::Source, result.is_ok(), started.elapsed());
        }
        result
    }

    async fn handshake<IO>(
        &self,
        io: IO,
        server: SocketAddr,
        expected: &[SpiffeId],
    ) -> Result<Arc<PooledConn>, DialError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let timeouts = &self.inner.config.timeouts;
        let config = self
            .inner
            .tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .for_peer(expected);
        let connector = TlsConnector::from(config);
        let server_name = tls::placeholder_server_name(server.ip());
        let mut cork = Cork::default();
        let io = cork.hold(io);
        let handshake = cork.keeping_writes(connector.connect(server_name, io).into_fallible());
        let mut tls_stream = match timeout(timeouts.handshake, handshake).await {
            Err(_) => {
                return Err(DialError::Timeout {
                    server,
                    stage: Stage::Handshake,
                });
            }
            Ok(Err((e, mut io))) => {
                // The alert rustls wrote on failing waits with the kept
                // writes: it tells the server why.
                send_kept(&mut io).await;
                return Err(DialError::Tls {
                    server,
                    failure: TlsFailure::from_handshake_error(&e),
                });
            }
            Ok(Ok(tls_stream)) => tls_stream,
        };
        let (_, session) = tls_stream.get_mut();
        session.set_buffer_limit(Some(tls::SEND_BUFFER));
        let no_h2 = session.alpn_protocol() != Some(tls::ALPN_H2);
        let peer_id = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| spiffe_id_of(cert).ok());
        let peer_id = match (no_h2, peer_id) {
            (false, Some(peer_id)) => peer_id,
            (no_h2, _) => {
                // The server sees its handshake finish before the close.
                send_kept(tls_stream.get_mut().0).await;
                let failure = if no_h2 {
                    TlsFailure::NoH2
                } else {
                    TlsFailure::Protocol("server sent no SPIFFE certificate".into())
                };
                return Err(DialError::Tls { server, failure });
            }
        };
        let state = Arc::new(ConnState::new());
        let h2 = &self.inner.config.h2;
        let config = &self.inner.config;
        let budget = Rate {
            frames: config.max_control_frames,
            window: config.control_frame_window,
        };
        let io = ErrorRecorder {
            inner: FrameGuard::dialing(cork.gate(tls_stream), budget, server),
            state: state.clone(),
            linger: None,
        };
        let mut handshake = std::pin::pin!(h2.client_builder().handshake::<_, Bytes>(io));
        let (send, connection) = timeout(
            timeouts.handshake,
            std::future::poll_fn(|cx| cork.defer(cx, |cx| handshake.as_mut().poll(cx))),
        )
        .await
        .map_err(|_| DialError::Timeout {
            server,
            stage: Stage::Handshake,
        })?
        .map_err(|source| DialError::Http2 { server, source })?;
        tokio::spawn(drive(
            (connection, cork),
            state.clone(),
            server,
            PingPlan::new(timeouts.keepalive, h2),
            self.inner.config.idle_timeout,
            timeouts.handshake,
            Arc::downgrade(&self.inner),
        ));
        tracing::debug!(%server, %peer_id, "HBONE connection established");
        Ok(Arc::new(PooledConn::new(
            send,
            state,
            Arc::new(peer_id),
            self.inner.config.h2.max_concurrent_streams as usize,
        )))
    }
}

/// How long a failed dial waits to send what its TLS handshake kept (an
/// alert, or the last flight): a few bytes the socket takes at once.
const SEND_KEPT_LIMIT: Duration = Duration::from_millis(100);

/// Sends what [`Cork::keeping_writes`] kept in `io`, before a dial that
/// failed drops it, so that the server learns why.
async fn send_kept<T: AsyncWrite + Unpin>(io: &mut T) {
    use tokio::io::AsyncWriteExt;
    let _ = timeout(SEND_KEPT_LIMIT, io.flush()).await;
}

/// What a client connection's driver acts on.
enum Control {
    Ended(Result<(), h2::Error>),
    Unresponsive(String),
    NewWindows,
    Idle,
}

/// Runs a connection until it ends, each turn through `cork`; then marks
/// it ended for [`Dialer::close`]. A connection whose `SendRequest`
/// handles are all gone (dropped by the pool) ends cleanly once its last
/// stream is done: h2 sends GOAWAY and shuts the TLS stream down
/// (close_notify, then FIN).
async fn drive<IO>(
    (mut connection, cork): (h2::client::Connection<IO, Bytes>, Cork),
    state: Arc<ConnState>,
    server: SocketAddr,
    pings: PingPlan,
    idle_timeout: Duration,
    close_limit: Duration,
    dialer: Weak<Inner>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (windows, mut new_windows) = watch::channel(Windows::ZERO);
    let pinging = window::ping(connection.ping_pong(), pings, state.probe.clone(), windows);
    tokio::pin!(pinging);
    let idle = state.closed_when_idle(idle_timeout);
    tokio::pin!(idle);
    // The timers and signals are polled only after they woke the task,
    // not on every frame the connection moves.
    let mut control_gate = PollWhenWoken::default();
    loop {
        // Dropped before the event is handled: it borrows what the
        // handling changes.
        let event = {
            let control = async {
                tokio::select! {
                    reason = &mut pinging => Control::Unresponsive(reason),
                    Ok(()) = new_windows.changed() => Control::NewWindows,
                    () = &mut idle => Control::Idle,
                }
            };
            tokio::pin!(control);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(event) = control_gate.poll(cx, control.as_mut()) {
                    return Poll::Ready(event);
                }
                cork.drive(cx, |cx| Pin::new(&mut connection).poll(cx))
                    .map(Control::Ended)
            })
            .await
        };
        match event {
            Control::Ended(result) => {
                if let Err(e) = result {
                    tracing::debug!(%server, error = %e, "HBONE connection ended with an error");
                }
            }
            Control::Unresponsive(reason) => {
                tracing::info!(%server, %reason, "closing HBONE connection: peer unresponsive");
            }
            Control::NewWindows => {
                let granted = *new_windows.borrow_and_update();
                connection.set_target_window_size(granted.connection);
                if let Err(e) = connection.set_initial_window_size(granted.stream) {
                    tracing::debug!(%server, error = %e, "cannot grow the stream window");
                }
                continue;
            }
            Control::Idle => {
                tracing::debug!(%server, "closing idle HBONE connection");
                // The pool's handle is the last: dropping it lets h2 close.
                if let Some(inner) = dialer.upgrade() {
                    inner.pool.forget_closed();
                }
                let closing = std::future::poll_fn(|cx| {
                    cork.drive(cx, |cx| Pin::new(&mut connection).poll(cx))
                });
                match timeout(close_limit, closing).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%server, error = %e, "idle HBONE connection ended with an error")
                    }
                    Err(_) => {
                        tracing::debug!(%server, "idle HBONE connection did not close in time")
                    }
                }
            }
        }
        break;
    }
    state.set_ended();
}

/// Passes I/O through, and keeps the TLS error that ended the connection.
///
/// In TLS 1.3 the client finishes its handshake before the server has
/// checked the client certificate, so a rejection arrives as an alert on the
/// first read, inside HTTP/2. h2 keeps only the message of such an error;
/// this keeps the typed reason so the dialer can report it.
///
/// Shutting it down sends close_notify and FIN, then reads until the peer
/// closes too (bounded by [`LINGER`]): a socket closed with unread data is
/// reset, which could cost the peer its clean end.
struct ErrorRecorder<T> {
    inner: T,
    state: Arc<ConnState>,
    /// Started once our side is shut down.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a closed connection waits for the peer's close.
const LINGER: Duration = Duration::from_secs(1);

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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ErrorRecorder<T> {
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
        let this = self.get_mut();
        let linger = match &mut this.linger {
            Some(linger) => linger,
            None => {
                ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                this.linger.insert(Box::pin(tokio::time::sleep(LINGER)))
            }
        };
        let mut buf = [0u8; 2048];
        while linger.as_mut().poll(cx).is_pending() {
            let mut discard = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) if !discard.filled().is_empty() => continue,
                // The peer's close_notify or FIN, or an error: done.
                Poll::Ready(_) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A TCP connection to `server`, its packets carrying `mark` when given.
async fn connect_marked(server: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(server).await;
    };
    let socket = if server.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    set_mark(&socket, mark)?;
    socket.connect(server).await
}

/// Whether this process may give its sockets `mark`: Ok, or the error
/// every connection would fail with (neither CAP_NET_ADMIN nor CAP_NET_RAW, not Linux). For a
/// start-up check, so that a dialer with
/// [`DialerConfig::socket_mark`](super::DialerConfig::socket_mark) fails
/// before its first tunnel does.
pub fn check_socket_mark(mark: u32) -> io::Result<()> {
    set_mark(&tokio::net::TcpSocket::new_v4()?, mark)
}

#[cfg(target_os = "linux")]
fn set_mark(socket: &tokio::net::TcpSocket, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::PermissionDenied => " (needs CAP_NET_ADMIN or CAP_NET_RAW)",
            _ => "",
        };
        io::Error::new(
            e.kind(),
            format!("cannot set socket mark {mark:#x}{hint}: {e}"),
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn set_mark(_socket: &tokio::net::TcpSocket, mark: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("socket mark {mark:#x}: socket marks exist only on Linux"),
    ))
}

#[cfg(all(test, feature = "ca"))]
mod tests;
