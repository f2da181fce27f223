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
use crate::active::{Registration, TunnelInfo};
use crate::client::{DialError, Dialer, Tunnel};
use crate::copy;
use crate::identity::SpiffeId;
use crate::metrics::{DestinationService, Reporter, WorkloadMeta};

pub mod forward;
pub mod socks5;
pub mod stdio;

/// Relays an accepted application connection through a tunnel, then writes
/// the access record. A failure on either side is passed on as a reset.
/// A plain future (see [`copy::Phased`] for why).
pub(crate) struct ClientRelay {
    relay: copy::Relay<Tunnel>,
    source: SocketAddr,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
    started: Instant,
    local_id: Arc<SpiffeId>,
    /// Present only when the dialer lists open tunnels.
    registration: Option<Registration>,
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
        let local_id = dialer.local_id_arc();
        let bytes = tunnel.counters().map(|counters| {
            counters.opened(started.elapsed());
            counters.relay_bytes()
        });
        let registration = dialer.telemetry().tunnels.as_ref().map(|tunnels| {
            tunnels.register(TunnelInfo {
                role: Role::Client,
                source,
                original_source: None,
                peer_id: tunnel.peer_arc(),
                target: target.to_string(),
            })
        });
        let mut relay = copy::Relay::new(app, tunnel);
        if let Some(bytes) = bytes {
            relay = relay.with_byte_counters(bytes);
        }
        ClientRelay {
            relay,
            source,
            target,
            log,
            started,
            local_id,
            registration,
        }
    }
}

impl Future for ClientRelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.relay).poll(cx);
        if let Some(registration) = &this.registration {
            // The socket is the application: the source.
            registration.update(this.relay.transferred(), true);
        }
        let (tunnel, result) = ready!(polled);
        let (moved, outcome) = match result {
            Ok(moved) => (moved, Outcome::Completed),
            Err(e) => (e.transferred, Outcome::Failed(e.error.to_string())),
        };
        let record = TunnelRecord {
            role: Role::Client,
            source: this.source,
            peer_id: Some(tunnel.peer_arc()),
            local_id: this.local_id.clone(),
            target: this.target.to_string(),
            original_source: None,
            trace: None,
            outcome,
            bytes_sent: moved.a_to_b,
            bytes_received: moved.b_to_a,
            duration: this.started.elapsed(),
        };
        this.log.record(&record);
        if let Some(counters) = tunnel.counters() {
            let broken = matches!(record.outcome, Outcome::Failed(_));
            counters.ended(record.duration, broken);
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
