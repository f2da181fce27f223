//! Ways traffic gets into a tunnel: a local port forward, stdin/stdout, and
//! a SOCKS5 listener. Each accepts an application's byte stream, opens a
//! tunnel with the [`Dialer`], and relays with half-close.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::net::TcpStream;

use crate::access::{AccessLog, Outcome, Role, TunnelRecord};
use crate::client::{DialError, Dialer, Tunnel};
use crate::copy;
use crate::lifecycle::TunnelLifecycle;
use crate::metrics::{DestinationService, Reporter, WorkloadMeta};

pub mod forward;
pub mod socks5;
pub mod stdio;

/// Relays an accepted application connection through a tunnel and
/// finishes the tunnel's lifecycle. A failure on either side is passed on
/// as a reset. A plain future (see [`copy::Phased`] for why).
pub(crate) struct ClientRelay {
    relay: copy::Relay<Tunnel>,
    /// Taken when the relay ends; dropped unfinished if the task is.
    lifecycle: Option<TunnelLifecycle>,
}

impl ClientRelay {
    pub(crate) fn new(
        app: TcpStream,
        source: SocketAddr,
        tunnel: Tunnel,
        target: SocketAddr,
        log: Arc<dyn AccessLog>,
        started: Instant,
        dialer: &Dialer,
    ) -> Self {
        let lifecycle = TunnelLifecycle::for_tunnel(dialer, &tunnel, source, target, log, started);
        let mut relay = copy::Relay::new(app, tunnel);
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
    source: SocketAddr,
    dialer: &Dialer,
    target: SocketAddr,
    error: &DialError,
    started: Instant,
) {
    let status = match error {
        DialError::Status { status, .. } => status.as_u16(),
        _ => 0,
    };
    log.record(&TunnelRecord {
        role: Role::Client,
        source,
        peer_id: None,
        local_id: dialer.local_id_arc(),
        target: target.to_string(),
        original_source: None,
        trace: None,
        outcome: Outcome::Refused {
            status,
            reason: "dial_failed",
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
