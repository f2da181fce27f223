//! Ways traffic gets into a tunnel: a local port forward, stdin/stdout, and
//! a SOCKS5 listener. Each accepts an application's byte stream, opens a
//! tunnel with the [`Dialer`], and relays with half-close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::access::{AccessLog, Outcome, Role, TunnelRecord};
use crate::client::{DialError, Dialer};
use crate::copy;

pub mod forward;
pub mod socks5;
pub mod stdio;

/// Relays an accepted application connection through `tunnel` and writes
/// the access record. A failure on either side is passed on as a reset.
pub(crate) async fn relay(
    mut app: TcpStream,
    source: SocketAddr,
    mut tunnel: crate::client::Tunnel,
    target: SocketAddr,
    log: &Arc<dyn AccessLog>,
    started: Instant,
) {
    let mut record = TunnelRecord {
        role: Role::Client,
        source,
        peer_id: tunnel.peer_id().clone(),
        target: target.to_string(),
        original_source: None,
        trace_id: None,
        outcome: Outcome::Completed,
        bytes_sent: 0,
        bytes_received: 0,
        duration: Duration::ZERO,
    };
    match copy::tcp_tunnel(&mut app, tunnel.stream_mut()).await {
        Ok(moved) => {
            record.bytes_sent = moved.a_to_b;
            record.bytes_received = moved.b_to_a;
        }
        Err(e) => {
            record.bytes_sent = e.transferred.a_to_b;
            record.bytes_received = e.transferred.b_to_a;
            record.outcome = Outcome::Failed(e.to_string());
            tunnel.reset();
            let _ = app.set_zero_linger();
        }
    }
    record.duration = started.elapsed();
    log.record(&record);
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
