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
}

impl ClientRelay {
    pub(crate) fn new(
        app: TcpStream,
        source: SocketAddr,
        tunnel: Tunnel,
        target: SocketAddr,
        log: Arc<dyn AccessLog>,
        started: Instant,
    ) -> Self {
        ClientRelay {
            relay: copy::Relay::new(app, tunnel),
            source,
            target,
            log,
            started,
        }
    }
}

impl Future for ClientRelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (tunnel, result) = ready!(Pin::new(&mut this.relay).poll(cx));
        let (moved, outcome) = match result {
            Ok(moved) => (moved, Outcome::Completed),
            Err(e) => (e.transferred, Outcome::Failed(e.error.to_string())),
        };
        this.log.record(&TunnelRecord {
            role: Role::Client,
            source: this.source,
            peer_id: tunnel.peer_arc(),
            target: this.target.to_string(),
            original_source: None,
            trace: None,
            outcome,
            bytes_sent: moved.a_to_b,
            bytes_received: moved.b_to_a,
            duration: this.started.elapsed(),
        });
        Poll::Ready(())
    }
}

/// Writes the access record of a tunnel that could not be opened.
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
        peer_id: Arc::new(dialer.local_id().clone()),
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
}
