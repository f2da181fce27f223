//! One CONNECT stream: check it, authorize it, dial the target, answer,
//! and relay until both directions end.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Refusal, Shared};
use crate::access::{Outcome, Role, TunnelRecord};
use crate::authority::parse_authority;
use crate::copy::{self, Phased};
use crate::headers::{self, Baggage, ForwardedFor, TraceParent};
use crate::identity::SpiffeId;
use crate::proxy_protocol;
use crate::server::limits::TunnelSlot;
use crate::stream::H2Stream;

/// A tunnel that was answered 200, ready to relay.
struct OpenTunnel {
    target: TcpStream,
    stream: H2Stream,
    record: Box<TunnelRecord>,
    slot: TunnelSlot,
    started: Instant,
}

/// Relays an answered tunnel, then logs it; counts it closed however it
/// ends. A plain future (see [`copy::Phased`] for why).
struct ServerRelay {
    relay: copy::Relay<H2Stream>,
    record: Box<TunnelRecord>,
    _slot: TunnelSlot,
    started: Instant,
    shared: Arc<Shared>,
}

impl Future for ServerRelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (_stream, result) = ready!(Pin::new(&mut this.relay).poll(cx));
        let record = &mut this.record;
        match result {
            Ok(moved) => {
                record.bytes_sent = moved.b_to_a;
                record.bytes_received = moved.a_to_b;
            }
            Err(e) => {
                record.bytes_sent = e.transferred.b_to_a;
                record.bytes_received = e.transferred.a_to_b;
                record.outcome = Outcome::Failed(e.to_string());
            }
        }
        record.duration = this.started.elapsed();
        this.shared.access_log.record(record);
        Poll::Ready(())
    }
}

impl Drop for ServerRelay {
    fn drop(&mut self) {
        self.shared
            .stats
            .tunnels_closed
            .fetch_add(1, Ordering::AcqRel);
    }
}

/// What the request headers say about the tunnel.
#[derive(Debug, Default)]
struct Context {
    original_source: Option<ForwardedFor>,
    trace: Option<TraceParent>,
    baggage: Baggage,
}

impl Shared {
    /// Serves one CONNECT stream. Everything up to the answer is boxed:
    /// checking, dialing and the PROXY header need far more state than
    /// relaying does, and an idle tunnel should keep only the latter.
    pub(super) fn serve_stream(
        self: Arc<Self>,
        source: SocketAddr,
        peer_id: Arc<SpiffeId>,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send + 'static {
        Phased::new(async move {
            let open = self.open_tunnel(source, peer_id, request, respond).await?;
            let mut relay = copy::Relay::new(open.target, open.stream);
            if let Some(limit) = self.timeouts.tunnel_idle {
                relay = relay.with_idle_limit(limit);
            }
            Some(ServerRelay {
                relay,
                record: open.record,
                _slot: open.slot,
                started: open.started,
                shared: self,
            })
        })
    }

    /// Checks, authorizes and dials, then answers: 200 with the tunnel to
    /// relay, or the refusal (logged here, `None` returned).
    async fn open_tunnel(
        &self,
        source: SocketAddr,
        peer_id: Arc<SpiffeId>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<OpenTunnel> {
        let started = Instant::now();
        let context = self.read_context(&request);
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut record = Box::new(TunnelRecord {
            role: Role::Server,
            source,
            peer_id,
            target: authority,
            original_source: context.original_source,
            trace: context.trace,
            outcome: Outcome::Completed,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
        });
        let Some(slot) = self.gate.admit_tunnel() else {
            self.refuse(&mut respond, &mut record, &Refusal::TunnelLimit, started);
            return None;
        };
        let dial = async {
            match self.open_target(&record.peer_id, source, &request).await {
                Ok(target) => {
                    self.send_proxy_header(target, source, &record.peer_id, &context)
                        .await
                }
                Err(refusal) => Err(refusal),
            }
        };
        // A client that resets the stream while we dial gets its slot back
        // at once: without this, open-and-cancel in a loop would pile up
        // dials (each holding a socket and a tunnel slot until the connect
        // timeout) beyond the stream limit.
        let cancelled = std::future::poll_fn(|cx| respond.poll_reset(cx));
        let opened = tokio::select! {
            opened = dial => opened,
            reason = cancelled => {
                let reason = reason.map(|r| format!("{r:?}")).unwrap_or_else(|e| e.to_string());
                record.outcome = Outcome::Failed(format!("client reset the stream ({reason}) while the target was dialled"));
                record.duration = started.elapsed();
                self.access_log.record(&record);
                return None;
            }
        };
        let target = match opened {
            Ok(target) => target,
            Err(refusal) => {
                self.refuse(&mut respond, &mut record, &refusal, started);
                return None;
            }
        };
        self.stats.tunnels_opened.fetch_add(1, Ordering::AcqRel);
        let mut response = Response::new(());
        if let Some(baggage) = &self.baggage {
            response
                .headers_mut()
                .insert(headers::BAGGAGE, baggage.clone());
        }
        match respond.send_response(response, false) {
            Ok(send) => Some(OpenTunnel {
                target,
                stream: H2Stream::new(send, request.into_body()),
                record,
                slot,
                started,
            }),
            Err(e) => {
                self.stats.tunnels_closed.fetch_add(1, Ordering::AcqRel);
                record.outcome = Outcome::Failed(format!("client went away: {e}"));
                record.duration = started.elapsed();
                self.access_log.record(&record);
                None
            }
        }
    }

    /// Answers a refused CONNECT and logs it.
    fn refuse(
        &self,
        respond: &mut SendResponse<Bytes>,
        record: &mut TunnelRecord,
        refusal: &Refusal,
        started: Instant,
    ) {
        self.stats.refusals.fetch_add(1, Ordering::AcqRel);
        if matches!(refusal, Refusal::TunnelLimit) {
            self.stats.limit_refusals.fetch_add(1, Ordering::AcqRel);
        }
        let mut response = Response::new(());
        *response.status_mut() = refusal.status();
        let _ = respond.send_response(response, true);
        record.outcome = Outcome::Refused {
            status: refusal.status().as_u16(),
            reason: refusal.reason(),
            detail: refusal.to_string(),
        };
        record.duration = started.elapsed();
        self.access_log.record(record);
    }

    /// Reads `forwarded`, `traceparent` and `baggage`; malformed values are
    /// ignored and counted.
    fn read_context(&self, request: &Request<RecvStream>) -> Context {
        let mut context = Context::default();
        let mut malformed = 0;
        let header = |name: &str| request.headers().get(name).map(|v| v.to_str().ok());
        match header(headers::FORWARDED) {
            None => {}
            Some(value) => match value.and_then(headers::parse_forwarded_for) {
                Some(original) => context.original_source = Some(original),
                None => malformed += 1,
            },
        }
        match header(headers::TRACEPARENT) {
            None => {}
            Some(value) => match value.and_then(TraceParent::parse) {
                Some(trace) => context.trace = Some(trace),
                None => malformed += 1,
            },
        }
        match header(headers::BAGGAGE) {
            None => {}
            Some(None) => malformed += 1,
            Some(Some(value)) => {
                let (baggage, bad) = Baggage::parse(value);
                context.baggage = baggage;
                malformed += bad;
            }
        }
        if malformed > 0 {
            self.stats
                .malformed_headers
                .fetch_add(malformed as u64, Ordering::AcqRel);
        }
        context
    }

    /// Validates the request, authorizes it and dials the target (for a
    /// gateway: the HBONE endpoint of the named service).
    async fn open_target(
        &self,
        peer_id: &SpiffeId,
        source: SocketAddr,
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
        let target = match &self.gateway_routes {
            None => {
                let target = parse_authority(authority)?;
                self.policy.current().decide(peer_id, source.ip(), target)?;
                target
            }
            // The routing table is the gateway's target policy.
            Some(routes) => {
                self.policy
                    .current()
                    .decide_identity(peer_id, source.ip())?;
                routes.resolve(authority)?
            }
        };
        let tcp = timeout(self.timeouts.connect, TcpStream::connect(target))
            .await
            .map_err(|_| Refusal::DialTimeout(target))?
            .map_err(|source| Refusal::Unreachable { target, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Writes the PROXY v2 header, when configured: the original client
    /// from `forwarded` (else the HBONE peer) and the peer's identity.
    async fn send_proxy_header(
        &self,
        mut target: TcpStream,
        peer_addr: SocketAddr,
        peer_id: &SpiffeId,
        context: &Context,
    ) -> Result<TcpStream, Refusal> {
        if !self.proxy_protocol || self.gateway_routes.is_some() {
            return Ok(target);
        }
        let source = match context.original_source {
            Some(original) => SocketAddr::new(original.ip(), original.port().unwrap_or(0)),
            None => peer_addr,
        };
        let destination = target.peer_addr().unwrap_or(source);
        let header = proxy_protocol::encode(source, destination, Some(peer_id));
        match timeout(self.timeouts.connect, target.write_all(&header)).await {
            Ok(Ok(())) => Ok(target),
            Ok(Err(source)) => Err(Refusal::Unreachable {
                target: destination,
                source,
            }),
            Err(_) => Err(Refusal::DialTimeout(destination)),
        }
    }
}
