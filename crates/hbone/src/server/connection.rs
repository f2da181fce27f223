//! One HBONE connection from accept to close: admission against the
//! limits, placement on a worker, the TLS and HTTP/2 handshakes (each
//! bounded), then the loop that accepts its streams and watches its
//! keepalive, idle timer, drain and control-frame budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::limits::ConnectionRefusal;
use super::stats::CountOnDrop;
use super::{Shared, connect};
use crate::cork::{Cork, FlushGate, Hold};
use crate::frame_guard::{self, FrameGuard, Tripwire};
use crate::identity::{SpiffeId, spiffe_id_of};
use crate::metrics::{DestinationService, Reporter, ResponseFlag, WorkloadMeta};
use crate::read_ahead::ReadAhead;
use crate::tls;
use crate::window::{self, PingPlan, Probe, Windows};
use crate::woken::PollWhenWoken;
use crate::workers::Workers;

/// What, besides its streams, a server connection's loop acts on.
enum Control {
    IdleTimer,
    Tripped(frame_guard::Trip),
    Unresponsive(String),
    NewWindows,
    Drain,
}

impl Shared {
    /// Accepts on `listener` until a drain starts, then closes it. On
    /// workers, each connection runs on the one [`Workers::place`] picks,
    /// given the worker this loop runs on (`None`: a loop off them).
    pub(super) async fn accept_loop(
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
    pub(super) async fn serve_h2<S: AsyncRead + AsyncWrite + Unpin>(
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
        // The timers and signals are polled only after they woke the task,
        // not on every frame the connection moves.
        let mut control_gate = PollWhenWoken::default();
        loop {
            let (idle_watched, trip_watched) = (!goaway_sent, !calmed);
            // Dropped before the event is handled: it borrows what the
            // handling changes.
            let event = {
                let control = async {
                    tokio::select! {
                        () = &mut idle_timer, if idle_watched => Control::IdleTimer,
                        trip = tripwire.tripped(), if trip_watched => Control::Tripped(trip),
                        reason = &mut keepalive => Control::Unresponsive(reason),
                        Ok(()) = new_windows.changed() => Control::NewWindows,
                        _ = draining.wait_for(|d| *d), if idle_watched => Control::Drain,
                    }
                };
                tokio::pin!(control);
                // Streams until one of the control events comes.
                'streams: loop {
                    let next = std::future::poll_fn(|cx| {
                        if let Poll::Ready(event) = control_gate.poll(cx, control.as_mut()) {
                            return Poll::Ready(Err(event));
                        }
                        cork.drive(cx, |cx| connection.poll_accept(cx)).map(Ok)
                    })
                    .await;
                    match next {
                        Err(event) => break 'streams event,
                        Ok(Some(Ok((request, respond)))) => {
                            last_stream = tokio::time::Instant::now();
                            let serve = self.clone().serve_stream(from.clone(), request, respond);
                            tokio::spawn(serve);
                        }
                        Ok(Some(Err(e))) => {
                            tracing::debug!(%peer_addr, error = %e, "HBONE connection ended");
                            return;
                        }
                        Ok(None) => {
                            // No more streams will open; let the ones in flight
                            // finish, which needs the connection driven.
                            let _ = std::future::poll_fn(|cx| {
                                cork.drive(cx, |cx| connection.poll_closed(cx))
                            })
                            .await;
                            return;
                        }
                    }
                }
            };
            match event {
                Control::IdleTimer => {
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
                }
                Control::Tripped(trip) => {
                    // The guard passes h2 nothing more; GOAWAY goes out
                    // and the connection closes as h2 is driven on.
                    connection.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    calmed = true;
                    goaway_sent = true;
                    self.stats
                        .control_frame_floods
                        .fetch_add(1, Ordering::AcqRel);
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
                }
                Control::Unresponsive(reason) => {
                    tracing::info!(%peer_addr, %peer_id, %reason, "closing HBONE connection: client unresponsive");
                    return;
                }
                Control::NewWindows => {
                    let granted = *new_windows.borrow_and_update();
                    connection.set_target_window_size(granted.connection);
                    if let Err(e) = connection.set_initial_window_size(granted.stream) {
                        tracing::debug!(%peer_addr, error = %e, "cannot grow the stream window");
                    }
                }
                Control::Drain => {
                    // GOAWAY: the client opens no new streams here; the
                    // ones in flight finish and accept() then ends.
                    connection.graceful_shutdown();
                    goaway_sent = true;
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
    pub(super) async fn h2_handshake<S: AsyncRead + AsyncWrite + Unpin>(
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
