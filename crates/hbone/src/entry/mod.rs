//! Ways traffic gets into a tunnel: a local port forward, stdin/stdout, and
//! a SOCKS5 listener, and transparent capture of redirected connections
//! (a mesh node). Each accepts an application's byte stream, opens a
//! tunnel with the [`Dialer`], and relays with half-close.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::access::{AccessLog, Outcome, Role, TunnelRecord};
use crate::client::{DialError, Dialer, Tunnel, TunnelRequest};
use crate::headers::TraceParent;
use crate::lifecycle::TunnelLifecycle;
use crate::metrics::{DestinationService, Reporter, WorkloadMeta};
use crate::relay::Relay;

pub mod access;
pub mod capture;
mod destination;
pub mod forward;
pub mod socks5;
pub mod stdio;

pub use access::ClientSources;
pub use destination::Destination;

/// Accepts on `listener` until `shutdown` resolves, running `task` for each
/// connection (with TCP_NODELAY set) from a source `sources` allows, and
/// closing the others at once; then closes the listener and waits for the
/// tasks in flight. Callers bound that wait as they see fit.
pub(crate) async fn accept_until<S, T>(
    listener: TcpListener,
    entry: &'static str,
    sources: &ClientSources,
    shutdown: S,
    mut task: impl FnMut(TcpStream, SocketAddr) -> T,
) where
    S: Future<Output = ()>,
    T: Future<Output = ()> + Send + Unpin + 'static,
{
    let open = InFlight::default();
    let refused = access::Refusals::new(entry, "source not allowed (allow-source)");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((app, source)) if !sources.allows(source.ip()) => {
                drop(app);
                refused.note(source);
            }
            Ok((app, source)) => {
                let _ = app.set_nodelay(true);
                tokio::spawn(open.track(task(app, source)));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather
                // than spin, and keep serving what is open.
                tracing::warn!(error = %e, "{entry}: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    open.all_done().await;
}

/// The tasks an entry has in flight, so that a drain can wait for them.
#[derive(Default)]
struct InFlight(Arc<InFlightState>);

#[derive(Default)]
struct InFlightState {
    count: AtomicUsize,
    done: Notify,
}

impl InFlight {
    fn track<T>(&self, task: T) -> Tracked<T> {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        Tracked {
            task,
            state: self.0.clone(),
        }
    }

    async fn all_done(&self) {
        loop {
            let notified = self.0.done.notified();
            tokio::pin!(notified);
            // Registered before the check, so a task ending now is seen.
            notified.as_mut().enable();
            if self.0.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A task that counts itself out of its entry's [`InFlight`] when it ends
/// or is dropped.
struct Tracked<T> {
    task: T,
    state: Arc<InFlightState>,
}

impl<T: Future<Output = ()> + Unpin> Future for Tracked<T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().task).poll(cx)
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        if self.state.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.done.notify_waiters();
        }
    }
}

/// Relays an accepted application connection through a tunnel and
/// finishes the tunnel's lifecycle. A failure on either side is passed on
/// as a reset. A plain future (see [`crate::phased::Phased`] for why).
pub(crate) struct ClientRelay {
    relay: Relay<TcpStream, Tunnel>,
    /// Taken when the relay ends; dropped unfinished if the task is.
    lifecycle: Option<TunnelLifecycle>,
}

/// One application connection an entry tunnels: where from, where to,
/// since when, and the trace its CONNECT carries (so both ends log the
/// same trace id).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    pub(crate) source: SocketAddr,
    pub(crate) target: SocketAddr,
    pub(crate) started: Instant,
    pub(crate) trace: TraceParent,
    /// The gateway of the route tried last, when it was double HBONE.
    pub(crate) gateway: Option<SocketAddr>,
}

impl Attempt {
    pub(crate) fn new(source: SocketAddr, target: SocketAddr) -> Self {
        Attempt {
            source,
            target,
            started: Instant::now(),
            trace: TraceParent::random(),
            gateway: None,
        }
    }

    /// The tunnel request for it. An unspecified source (stdin/stdout has
    /// no peer address) is not sent.
    pub(crate) fn request(&self) -> TunnelRequest {
        TunnelRequest {
            source: (!self.source.ip().is_unspecified()).then_some(self.source),
            trace: Some(self.trace),
            ..TunnelRequest::new(self.target)
        }
    }
}

impl ClientRelay {
    pub(crate) fn new(
        app: TcpStream,
        tunnel: Tunnel,
        attempt: &Attempt,
        log: Arc<dyn AccessLog>,
        dialer: &Dialer,
    ) -> Self {
        let lifecycle = TunnelLifecycle::for_tunnel(
            dialer,
            &tunnel,
            attempt.source,
            attempt.target,
            log,
            attempt.started,
        )
        .with_trace(attempt.trace)
        .with_gateway(attempt.gateway);
        let mut relay = Relay::new(app, tunnel);
        if let Some(counters) = lifecycle.counters() {
            relay = relay.with_byte_counters(counters.relay_bytes());
        }
        ClientRelay {
            relay,
            lifecycle: Some(lifecycle),
        }
    }
}

impl Future for ClientRelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.relay).poll(cx);
        if let Some(lifecycle) = &mut this.lifecycle {
            lifecycle.progress(this.relay.transferred());
        }
        let (_tunnel, result) = ready!(polled);
        if let Some(lifecycle) = this.lifecycle.take() {
            lifecycle.finish(result.as_ref().copied());
        }
        Poll::Ready(())
    }
}

/// Writes the access record of a tunnel that could not be opened, and
/// counts it.
pub(crate) fn record_dial_failure(
    log: &Arc<dyn AccessLog>,
    dialer: &Dialer,
    attempt: &Attempt,
    error: &DialError,
) {
    let Attempt {
        source,
        target,
        started,
        trace,
        gateway,
    } = *attempt;
    // A name that did not resolve is the target the record can name.
    let target = match error {
        DialError::Resolve { name, .. } => name.clone(),
        _ => target.to_string(),
    };
    let status = match error {
        DialError::Status { status, .. } => status.as_u16(),
        _ => 0,
    };
    log.record(&TunnelRecord {
        role: Role::Client,
        source,
        peer_id: None,
        local_id: dialer.local_id_arc(),
        target,
        original_source: None,
        gateway,
        trace: Some(trace),
        outcome: Outcome::Refused {
            status,
            reason: error.reason(),
            detail: error.to_string(),
        },
        bytes_sent: 0,
        bytes_received: 0,
        duration: started.elapsed(),
    });
    if let Some(metrics) = &dialer.telemetry().metrics {
        metrics.tunnel_failed(
            Reporter::Source,
            dialer.local_meta(),
            &WorkloadMeta::default(),
            &DestinationService::from_host(None),
            error.response_flag(),
        );
    }
}
