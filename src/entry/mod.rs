//! Ways traffic gets into a tunnel: a local port forward, stdin/stdout, and
//! a SOCKS5 listener. Each accepts an application's byte stream, opens a
//! tunnel with the [`Dialer`], and relays with half-close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::access::{AccessLog, Outcome, Role, TunnelRecord};
use crate::client::{DialError, Dialer, Tunnel};
use crate::copy;

pub mod forward;
pub mod socks5;
pub mod stdio;

/// Relays an accepted application connection through `tunnel` and writes
/// the access record. A failure on either side is passed on as a reset.
///
/// Not an `async fn`: its arguments would stay in the future next to the
/// relay that consumes them, and an idle tunnel should hold only the relay.
pub(crate) fn relay(
    app: TcpStream,
    source: SocketAddr,
    tunnel: Tunnel,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
    started: Instant,
) -> impl Future<Output = ()> {
    let relay = copy::Relay::new(app, tunnel);
    async move {
        let (tunnel, result) = relay.await;
        let (moved, outcome) = match result {
            Ok(moved) => (moved, Outcome::Completed),
            Err(e) => (e.transferred, Outcome::Failed(e.error.to_string())),
        };
        log.record(&TunnelRecord {
            role: Role::Client,
            source,
            peer_id: tunnel.peer_id().clone(),
            target: target.to_string(),
            original_source: None,
            trace_id: None,
            outcome,
            bytes_sent: moved.a_to_b,
            bytes_received: moved.b_to_a,
            duration: started.elapsed(),
        });
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
        peer_id: dialer.local_id().clone(),
        target: target.to_string(),
        original_source: None,
        trace_id: None,
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
