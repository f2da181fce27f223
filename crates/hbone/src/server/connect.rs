//! One CONNECT stream: check it, authorize it, dial the target, answer,
//! and relay until both directions end.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
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
use crate::access::{End, Outcome, Role, TunnelRecord};
use crate::authority::{ServiceName, Target, parse_target};
use crate::headers::{self, Baggage, ForwardedFor, TraceParent};
use crate::identity::SpiffeId;
use crate::lifecycle::TunnelLifecycle;
use crate::metrics::{
    DestinationService, Metrics, PerConnection, Reporter, ResponseFlag, TunnelCounters,
    WorkloadMeta, service_host,
};
use crate::phased::Phased;
use crate::policy::{Allowed, Denial};
use crate::proxy_protocol;
use crate::relay::Relay;
use crate::server::limits::TunnelSlot;
use crate::services::{Resolution, ServiceError};
use crate::stream::H2Stream;
use crate::window::Probe;

/// A tunnel that was answered 200, ready to relay.
struct OpenTunnel {
    target: TcpStream,
    stream: H2Stream,
    lifecycle: TunnelLifecycle,
    slot: TunnelSlot,
}

/// Relays an answered tunnel and finishes its lifecycle; counts it closed
/// in the server's stats however it ends. A plain future (see
/// [`Phased`] for why).
struct ServerRelay {
    relay: Relay<TcpStream, H2Stream>,
    /// Taken when the relay ends; dropped unfinished if the task is.
    lifecycle: Option<TunnelLifecycle>,
    _slot: TunnelSlot,
    shared: Arc<Shared>,
}

impl Future for ServerRelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.relay).poll(cx);
        if let Some(lifecycle) = &mut this.lifecycle {
            lifecycle.progress(this.relay.transferred());
        }
        let (_stream, result) = ready!(polled);
        if let Some(lifecycle) = this.lifecycle.take() {
            lifecycle.finish(result.as_ref().copied());
        }
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

/// A connection's counters, by the client's raw `baggage` and the service
/// host its tunnels asked for.
pub(super) type ConnCounters =
    PerConnection<(Option<http::HeaderValue>, Option<Box<str>>), Arc<TunnelCounters>>;

/// What the request headers say about the tunnel.
#[derive(Debug, Default)]
struct RequestHeaders {
    original_source: Option<ForwardedFor>,
    trace: Option<TraceParent>,
    baggage: Baggage,
}

/// What the streams of one HBONE connection share.
#[derive(Clone)]
pub(super) struct FromConnection {
    /// The client's address.
    pub source: SocketAddr,
    /// Our address the connection arrived on.
    pub arrived_on: IpAddr,
    pub peer_id: Arc<SpiffeId>,
    pub counters: Option<Arc<ConnCounters>>,
    /// What the connection's window sizing learns from.
    pub probe: Arc<Probe>,
}

impl Shared {
    /// Serves one CONNECT stream. Everything up to the answer is boxed:
    /// checking, dialing and the PROXY header need far more state than
    /// relaying does, and an idle tunnel should keep only the latter.
    pub(super) fn serve_stream(
        self: Arc<Self>,
        conn: FromConnection,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send + 'static {
        Phased::new(async move {
            let open = self
                .open_tunnel(
                    conn.source,
                    conn.arrived_on,
                    conn.peer_id,
                    conn.counters.as_deref(),
                    request,
                    respond,
                )
                .await?;
            let stream = open.stream.with_probe(Some(conn.probe));
            let mut relay = Relay::new(open.target, stream);
            if let Some(limit) = self.timeouts.tunnel_idle {
                relay = relay.with_idle_limit(limit);
            }
            if let Some(counters) = open.lifecycle.counters() {
                relay = relay.with_byte_counters(counters.relay_bytes());
            }
            Some(ServerRelay {
                relay,
                lifecycle: Some(open.lifecycle),
                _slot: open.slot,
                shared: self,
            })
        })
    }

    /// Checks, authorizes and dials, then answers: 200 with the tunnel to
    /// relay, or the refusal (logged here, `None` returned).
    async fn open_tunnel(
        &self,
        source: SocketAddr,
        arrived_on: IpAddr,
        peer_id: Arc<SpiffeId>,
        counters: Option<&ConnCounters>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<OpenTunnel> {
        let started = Instant::now();
        let context = self.read_headers(&request);
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut record = Box::new(TunnelRecord {
            role: Role::Server,
            source,
            peer_id: Some(peer_id.clone()),
            local_id: self.local_id.clone(),
            target: authority,
            original_source: context.original_source,
            gateway: None,
            trace: context.trace,
            outcome: Outcome::Completed,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
        });
        let Some(slot) = self.gate.admit_tunnel() else {
            let refusal = Refusal::TunnelLimit;
            self.refuse(&mut respond, &mut record, &refusal, &context, started);
            return None;
        };
        let dial = async {
            match self
                .open_target(&peer_id, source, arrived_on, &request)
                .await
            {
                Ok(target) => {
                    self.send_proxy_header(target, source, &peer_id, &context)
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
                record.outcome = Outcome::Failed {
                    end: End::ClientGone,
                    detail: format!("client reset the stream ({reason}) while the target was dialled"),
                };
                record.duration = started.elapsed();
                self.access_log.record(&record);
                self.count_failure(&peer_id, &context, ResponseFlag::Connect);
                return None;
            }
        };
        let target = match opened {
            Ok(target) => target,
            Err(refusal) => {
                self.refuse(&mut respond, &mut record, &refusal, &context, started);
                return None;
            }
        };
        self.stats.tunnels_opened.fetch_add(1, Ordering::AcqRel);
        let counters = self
            .telemetry
            .metrics
            .as_deref()
            .zip(counters)
            .map(|(metrics, conn)| {
                self.tunnel_counters(metrics, conn, &peer_id, &request, &context)
            });
        let lifecycle = TunnelLifecycle::open(
            record,
            started,
            self.access_log.clone(),
            &self.telemetry,
            counters,
        );
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
                lifecycle,
                slot,
            }),
            Err(e) => {
                self.stats.tunnels_closed.fetch_add(1, Ordering::AcqRel);
                lifecycle.fail(End::ClientGone, format!("client went away: {e}"));
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
        context: &RequestHeaders,
        started: Instant,
    ) {
        self.stats.refusals.fetch_add(1, Ordering::AcqRel);
        if matches!(refusal, Refusal::TunnelLimit) {
            self.stats.limit_refusals.fetch_add(1, Ordering::AcqRel);
            if let Some(metrics) = &self.telemetry.metrics {
                metrics.limit_refused("tunnels");
            }
        }
        if let Some(peer) = &record.peer_id {
            self.count_failure(peer, context, refusal.response_flag());
        }
        let mut response = Response::new(());
        *response.status_mut() = refusal.status();
        if matches!(refusal, Refusal::MethodNotAllowed(_)) {
            // A 405 must say what the resource does accept (RFC 9110).
            response.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("CONNECT"),
            );
        }
        let _ = respond.send_response(response, true);
        record.outcome = Outcome::Refused {
            status: refusal.status().as_u16(),
            reason: refusal.reason(),
            detail: refusal.to_string(),
        };
        record.duration = started.elapsed();
        self.access_log.record(record);
    }

    /// The counters of an opened tunnel: the connection's, unless this
    /// tunnel brings metadata (the client's `baggage`, the service it
    /// asked for) that the connection has not seen yet.
    // Without the `metrics` feature no `Metrics` exists and this is never
    // called; the compiler then sees its tail as dead.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn tunnel_counters(
        &self,
        metrics: &Metrics,
        conn: &ConnCounters,
        peer_id: &SpiffeId,
        request: &Request<RecvStream>,
        context: &RequestHeaders,
    ) -> Arc<TunnelCounters> {
        let baggage = request.headers().get(headers::BAGGAGE);
        // Looked at only once the tunnel opened: the name was then one the
        // server serves, so the values stay bounded by its services.
        let service = request
            .uri()
            .authority()
            .and_then(|a| service_host(a.as_str()));
        conn.get_or_make(
            |(b, s)| b.as_ref() == baggage && s.as_deref() == service,
            || {
                let peer = WorkloadMeta::new(&context.baggage, Some(peer_id));
                let counters = metrics.tunnel_counters(
                    Reporter::Destination,
                    &peer,
                    &self.local_meta,
                    &DestinationService::from_host(service),
                );
                (
                    (baggage.cloned(), service.map(Box::from)),
                    Arc::new(counters),
                )
            },
        )
    }

    /// Counts a tunnel that did not open. The service is left `unknown`:
    /// a name the server does not serve is the client's to choose, and
    /// would make the number of series unbounded.
    fn count_failure(&self, peer: &SpiffeId, context: &RequestHeaders, flag: ResponseFlag) {
        if let Some(metrics) = &self.telemetry.metrics {
            metrics.tunnel_failed(
                Reporter::Destination,
                &WorkloadMeta::new(&context.baggage, Some(peer)),
                &self.local_meta,
                &DestinationService::from_host(None),
                flag,
            );
        }
    }

    /// Reads `forwarded`, `traceparent` and `baggage`; malformed values are
    /// ignored and counted.
    fn read_headers(&self, request: &Request<RecvStream>) -> RequestHeaders {
        let mut context = RequestHeaders::default();
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
        arrived_on: IpAddr,
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
        if let Some(routes) = &self.gateway_routes {
            // The routing table is the gateway's target policy.
            let policy = self.policy.current();
            self.count_decision(policy.decide_identity(peer_id, source.ip()))?;
            return self.dial(routes.resolve(authority)?).await;
        }
        match parse_target(authority)? {
            Target::Addr(target) => {
                let policy = self.policy.current();
                self.count_decision(policy.decide(peer_id, source.ip(), target))?;
                self.dial(target).await
            }
            Target::Service(name) => {
                let resolution = self.services.current().resolve(&name, arrived_on)?;
                let candidates = match resolution {
                    Resolution::Addr(target) => vec![target],
                    Resolution::Lookup(name) => self.lookup(&name).await?,
                };
                self.dial_service(peer_id, source, &name, candidates).await
            }
        }
    }

    /// Dials the first of `candidates` the policy allows and that answers;
    /// the policy judges each address (and may name the service).
    async fn dial_service(
        &self,
        peer_id: &SpiffeId,
        source: SocketAddr,
        name: &ServiceName,
        candidates: Vec<SocketAddr>,
    ) -> Result<TcpStream, Refusal> {
        let policy = self.policy.current();
        let mut refusal = None;
        for target in candidates {
            let decision = policy.decide_service(peer_id, source.ip(), target, Some(name));
            if let Err(denial) = self.count_decision(decision) {
                refusal.get_or_insert(Refusal::Denied(denial));
                continue;
            }
            match self.dial(target).await {
                Ok(tcp) => return Ok(tcp),
                // A later address may answer; an earlier denial is still
                // the more useful reason if none does.
                Err(failed) => refusal = Some(refusal.unwrap_or(failed)),
            }
        }
        Err(refusal.unwrap_or_else(|| {
            Refusal::UnknownService(ServiceError::Resolve {
                name: name.clone(),
                reason: "no address".into(),
            })
        }))
    }

    /// Resolves a name under a domain the operator listed, bounded by the
    /// connect timeout.
    async fn lookup(&self, name: &ServiceName) -> Result<Vec<SocketAddr>, Refusal> {
        let failed = |reason: String| {
            Refusal::UnknownService(ServiceError::Resolve {
                name: name.clone(),
                reason,
            })
        };
        let lookup = tokio::net::lookup_host((name.host(), name.port()));
        match timeout(self.timeouts.connect, lookup).await {
            Err(_) => Err(failed(format!(
                "no answer within {:?}",
                self.timeouts.connect
            ))),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Ok(Ok(addrs)) => {
                // At most a handful: each is judged and may be dialled.
                let addrs: Vec<SocketAddr> = addrs.take(8).collect();
                if addrs.is_empty() {
                    Err(failed("no address".into()))
                } else {
                    Ok(addrs)
                }
            }
        }
    }

    /// Connects to `target` within the connect timeout.
    async fn dial(&self, target: SocketAddr) -> Result<TcpStream, Refusal> {
        timeout(self.timeouts.connect, super::dial::connect(target))
            .await
            .map_err(|_| Refusal::DialTimeout(target))?
            .map_err(|source| Refusal::Unreachable { target, source })
    }

    /// Counts a policy decision by the rule that made it.
    fn count_decision(&self, decision: Result<Allowed<'_>, Denial>) -> Result<(), Denial> {
        if let Some(metrics) = &self.telemetry.metrics {
            match &decision {
                Ok(allowed) => metrics.policy_decision(allowed.rule, true),
                Err(denial) => metrics.policy_decision(&denial.rule_label(), false),
            }
        }
        decision.map(|_| ())
    }

    /// Writes the PROXY v2 header, when configured: the original client
    /// from `forwarded` (else the HBONE peer) and the peer's identity.
    async fn send_proxy_header(
        &self,
        mut target: TcpStream,
        peer_addr: SocketAddr,
        peer_id: &SpiffeId,
        context: &RequestHeaders,
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
