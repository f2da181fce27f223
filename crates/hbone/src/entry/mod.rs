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
use crate::workers::Workers;

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
///
/// On `workers` (the dialer's, [`crate::DialerConfig::workers`]) every
/// task runs on a worker, so that the tunnel it opens and the pooled
/// connection that carries it are that worker's too. A listener bound with
/// [`Workers::bind_listener`] gets a sibling per worker and each worker
/// accepts on its own; from any other, sockets are handed to the workers
/// in turn.
pub(crate) async fn accept_until<S, F, T>(
    listener: TcpListener,
    entry: &'static str,
    sources: &ClientSources,
    workers: Option<&Workers>,
    shutdown: S,
    task: F,
) where
    S: Future<Output = ()>,
    F: Fn(TcpStream, SocketAddr) -> T + Send + Sync + 'static,
    T: Future<Output = ()> + Send + Unpin + 'static,
{
    let acceptor = Arc::new(Acceptor {
        entry,
        sources: sources.clone(),
        refused: access::Refusals::new(entry, "source not allowed (allow-source)"),
        task,
        open: InFlight::default(),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_at_shutdown = async move {
        shutdown.await;
        stop.send_replace(true);
    };
    // Where each worker can accept on a listener of its own, it does: with
    // one worker that is the listener itself, so no socket changes threads.
    let siblings = match workers {
        Some(workers) if workers.count() == 1 => Some(Vec::new()),
        #[cfg(target_os = "linux")]
        Some(workers) => crate::listeners::siblings(&listener, workers),
        _ => None,
    };
    if let (Some(workers), Some(siblings)) = (workers, siblings) {
        let listeners = std::iter::once(listener.into_std()).chain(siblings.into_iter().map(Ok));
        let mut loops = tokio::task::JoinSet::new();
        for (index, listener) in listeners.enumerate() {
            let (acceptor, stopped) = (acceptor.clone(), stopped.clone());
            let workers_here = workers.clone();
            let accept = async move {
                match listener.and_then(TcpListener::from_std) {
                    Ok(listener) => {
                        acceptor
                            .accept(listener, Some((workers_here, Some(index))), stopped)
                            .await
                    }
                    Err(e) => tracing::warn!(error = %e, "{entry}: a worker cannot listen"),
                }
            };
            loops.spawn_on(accept, workers.handle(index));
        }
        tokio::join!(stop_at_shutdown, crate::listeners::join_all(loops));
        acceptor.open.all_done().await;
        return;
    }
    let accept = acceptor.clone().accept(
        listener,
        workers.map(|workers| (workers.clone(), None)),
        stopped,
    );
    tokio::join!(stop_at_shutdown, crate::listeners::run_as_task(accept));
    acceptor.open.all_done().await;
}

/// What each accept loop of an entry shares.
struct Acceptor<F> {
    entry: &'static str,
    sources: ClientSources,
    refused: access::Refusals,
    task: F,
    open: InFlight,
}

impl<F, T> Acceptor<F>
where
    F: Fn(TcpStream, SocketAddr) -> T + Send + Sync + 'static,
    T: Future<Output = ()> + Send + Unpin + 'static,
{
    /// Accepts on `listener` until `stopped` flips, running each task
    /// where it was accepted; on workers, on the one
    /// [`Workers::place`] picks, given the worker this loop runs on
    /// (`None`: a loop off the workers).
    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        workers: Option<(Workers, Option<usize>)>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let entry = self.entry;
        let mut listener = match crate::listeners::NodelayListener::new(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "{entry}: cannot accept on the listener");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped.wait_for(|stop| *stop) => break,
            };
            match accepted {
                Ok((app, source)) if !self.sources.allows(source.ip()) => {
                    drop(app);
                    self.refused.note(source);
                }
                Ok((app, source)) => {
                    let elsewhere = workers.as_ref().and_then(|(workers, accepted_on)| {
                        let to = workers.place(*accepted_on);
                        (Some(to) != *accepted_on).then_some((workers, to))
                    });
                    match elsewhere {
                        Some((workers, to)) => self.hand_over(workers, to, app, source),
                        None => match app.register() {
                            Ok(app) => {
                                tokio::spawn(self.open.track((self.task)(app, source)));
                            }
                            Err(e) => {
                                tracing::warn!(%source, error = %e, "{entry}: cannot serve a connection")
                            }
                        },
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin, and keep serving what is open.
                    tracing::warn!(error = %e, "{entry}: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Runs `app`'s task on worker `to`, its socket registered with that
    /// worker's reactor.
    fn hand_over(
        self: &Arc<Self>,
        workers: &Workers,
        to: usize,
        app: crate::listeners::Accepted,
        source: SocketAddr,
    ) {
        let entry = self.entry;
        match app.into_std() {
            Ok(app) => {
                let this = self.clone();
                workers.handle(to).spawn(self.open.track(Box::pin(async move {
                    match TcpStream::from_std(app) {
                        Ok(app) => (this.task)(app, source).await,
                        Err(e) => tracing::warn!(%source, error = %e, "{entry}: cannot move a connection to its worker"),
                    }
                })));
            }
            Err(e) => {
                tracing::warn!(%source, error = %e, "{entry}: cannot move a connection to a worker");
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::{ClientSources, accept_until};
    use std::sync::Arc;

    /// An entry awaited in `block_on` (as a binary's `main` does) must
    /// still accept on a runtime worker, where each connection's task is
    /// spawned without a cross-thread hand-off.
    #[test]
    fn an_entry_awaited_in_block_on_accepts_on_a_worker() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("runtime-worker")
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let _app = tokio::net::TcpStream::connect(addr).await;
        });
        let (accepted_on, thread) = std::sync::mpsc::channel();
        let accepted = Arc::new(tokio::sync::Notify::new());
        let task = {
            let accepted = accepted.clone();
            move |_app, _source| {
                let current = std::thread::current();
                let _ = accepted_on.send((current.id(), current.name().map(str::to_owned)));
                accepted.notify_one();
                std::future::ready(())
            }
        };
        let sources = ClientSources::Any;
        let shutdown = accepted.notified();
        runtime.block_on(accept_until(
            listener, "test", &sources, None, shutdown, task,
        ));
        let (ran_on, name) = thread.recv().unwrap();
        assert_ne!(
            ran_on,
            std::thread::current().id(),
            "accepted on the thread in block_on"
        );
        assert_eq!(name.as_deref(), Some("runtime-worker"));
    }
}
