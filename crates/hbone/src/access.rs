//! One record per tunnel, handed to an access log when the tunnel ends or is
//! refused. The default log writes one `tracing` line; operations work
//! (JSON lines, metrics) plugs in another [`AccessLog`].

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use crate::headers::{ForwardedFor, TraceParent};
use crate::identity::SpiffeId;

/// How a tunnel ended. Kinds of ending may be added: a log that matches
/// on it keeps a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Both directions reached EOF (or the client cancelled the stream,
    /// HBONE's normal end).
    Completed,
    /// The tunnel was open and then failed.
    Failed {
        /// What happened, in a stable word.
        end: End,
        /// The error's own text, for people.
        detail: String,
    },
    /// Refused before any byte flowed, with the status sent.
    Refused {
        /// The HTTP status answered, or 0 when the client never got one
        /// (the dial itself failed).
        status: u16,
        /// A short, stable reason for logs and metrics, such as `denied`.
        reason: &'static str,
        /// The full error message.
        detail: String,
    },
}

/// How an open tunnel that did not complete ended: stable words for logs,
/// dashboards and alerts, never a library's error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum End {
    /// One side reset it: a TCP reset, or RST_STREAM with an error code.
    Reset,
    /// No byte moved either way for the tunnel idle timeout.
    IdleTimeout,
    /// Still open when the process stopped: a drain deadline, or shutdown.
    DrainDeadline,
    /// The HBONE connection under it went away without a clean end.
    ConnectionLost,
    /// The client went away before the tunnel could start.
    ClientGone,
    /// Any other I/O error.
    Error,
}

impl End {
    /// The word logged as `result=`.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Reset => "reset",
            End::IdleTimeout => "idle_timeout",
            End::DrainDeadline => "drain_deadline",
            End::ConnectionLost => "connection_lost",
            End::ClientGone => "client_gone",
            End::Error => "error",
        }
    }

    /// Classifies a relay's I/O error.
    pub fn of(error: &std::io::Error) -> End {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                End::Reset
            }
            ErrorKind::TimedOut => End::IdleTimeout,
            ErrorKind::UnexpectedEof => End::ConnectionLost,
            _ => End::Error,
        }
    }
}

/// What happened to one tunnel. Made by the server, the entries and
/// [`crate::lifecycle::TunnelLifecycle`]; an [`AccessLog`] reads it.
/// Fields may be added, so it cannot be built outside this crate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TunnelRecord {
    /// Which end wrote the record.
    pub role: Role,
    /// The TCP peer: the HBONE client (server side) or the local
    /// application (client side).
    pub source: SocketAddr,
    /// The identity the other HBONE end proved (none when no connection
    /// was made).
    pub peer_id: Option<Arc<SpiffeId>>,
    /// Our own identity.
    pub local_id: Arc<SpiffeId>,
    /// The requested target, as sent in `:authority`.
    pub target: String,
    /// The original client, from `forwarded` (server side).
    pub original_source: Option<ForwardedFor>,
    /// The gateway a double-HBONE tunnel went through (client side);
    /// `None` for a direct tunnel.
    pub gateway: Option<SocketAddr>,
    /// The W3C trace context of the tunnel, when known.
    pub trace: Option<TraceParent>,
    /// How the tunnel ended.
    pub outcome: Outcome,
    /// Bytes sent back to the source side (the downstream: the HBONE
    /// client for a server, the application for an entry), as Istio's
    /// `istio_tcp_sent_bytes_total` counts them.
    pub bytes_sent: u64,
    /// Bytes received from the source side, towards the target, as Istio's
    /// `istio_tcp_received_bytes_total` counts them.
    pub bytes_received: u64,
    /// How long the tunnel was open, or how long refusing it took.
    pub duration: Duration,
}

/// Which end of a tunnel a record comes from. More may be told apart
/// one day (a gateway, a waypoint), so a `match` needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// The end that dialed the tunnel.
    Client,
    /// The end that accepted it (a server or gateway).
    Server,
}

impl Role {
    /// The word logged as `role=`: `client` or `server`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

/// Receives a record for every tunnel.
pub trait AccessLog: Send + Sync {
    /// Called once per tunnel, when it ends or is refused. It is called
    /// inline, so it should not block.
    fn record(&self, record: &TunnelRecord);
}

/// Writes each record as one `tracing` event at info level.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingLog {
    identity_source: &'static str,
}

impl TracingLog {
    /// A log whose records name where this process's own identity comes
    /// from (`identity_source=`, e.g. `files`, `istio-ca`,
    /// `workload-api`), so a record shows which certificate the tunnel
    /// was made under. [`TracingLog::default`] leaves the field empty.
    pub fn with_identity_source(source: &'static str) -> Self {
        TracingLog {
            identity_source: source,
        }
    }
}

impl AccessLog for TracingLog {
    fn record(&self, r: &TunnelRecord) {
        let role = r.role.as_str();
        let identity_source = self.identity_source;
        let original = r.original_source.map(|o| o.to_string()).unwrap_or_default();
        let peer = r
            .peer_id
            .as_deref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let trace = r.trace.map(|t| t.trace_id_hex()).unwrap_or_default();
        // Only records of tunnels through a gateway carry the field.
        let gateway = r.gateway.map(tracing::field::display);
        match &r.outcome {
            Outcome::Refused {
                status,
                reason,
                detail,
            } => tracing::info!(
                target: "hbone::access", role, source = %r.source, peer, local = %r.local_id, identity_source,
                target_addr = %r.target, original, gateway, trace, status, reason, detail = %detail,
                "tunnel refused"
            ),
            Outcome::Completed => tracing::info!(
                target: "hbone::access", role, source = %r.source, peer, local = %r.local_id, identity_source,
                target_addr = %r.target, original, gateway, trace, sent = r.bytes_sent,
                received = r.bytes_received,
                duration_ms = r.duration.as_millis() as u64,
                result = %"done",
                "tunnel closed"
            ),
            Outcome::Failed { end, detail } => tracing::info!(
                target: "hbone::access", role, source = %r.source, peer, local = %r.local_id, identity_source,
                target_addr = %r.target, original, gateway, trace, sent = r.bytes_sent,
                received = r.bytes_received,
                duration_ms = r.duration.as_millis() as u64,
                result = %end.as_str(), detail = %detail,
                "tunnel closed"
            ),
        }
    }
}
