//! Transparent capture: the entry of a mesh node. Connections that NAT
//! rules redirected to its listener are tunnelled to the HBONE server on
//! port 15008 of the address they were going to, with that address and
//! port as the `:authority`, as Istio's ztunnel does; the application
//! keeps dialling its peer's plain address and never knows.
//!
//! Which addresses are in the mesh, and which identities their nodes must
//! prove, is the [`Peers`] table. A redirected connection to an address
//! outside it is closed: it was captured by mistake, and sending it out
//! in the clear would hide that. Addresses on another network, which
//! this host cannot reach, go through that network's gateway as double
//! HBONE ([`RemoteNetwork`]).
//!
//! The rules themselves are the caller's (the `hbone node` command writes
//! nftables rules); they must let this entry's own connections out, e.g.
//! by [`DialerConfig::socket_mark`](crate::DialerConfig::socket_mark).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::access::Refusals;
use super::{Attempt, ClientRelay, ClientSources, Destination, record_dial_failure};
use crate::access::{AccessLog, Outcome, Role, TunnelRecord};
use crate::client::{Dialer, Route};
use crate::metrics::{DestinationService, Reporter, ResponseFlag, WorkloadMeta};
use crate::phased::Phased;

mod original_dst;
mod peers;
mod remote;

pub use peers::{Peer, PeerError, Peers};
pub use remote::{RemoteError, RemoteNetwork};

/// The port HBONE servers listen on in Istio ambient.
pub const HBONE_PORT: u16 = 15008;

/// What the capture entry needs besides its dialer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaptureConfig {
    /// Which destinations are in the mesh, and who their nodes are.
    pub peers: Peers,
    /// The port of every node's HBONE server; [`HBONE_PORT`] by default.
    /// Not used through a gateway: its routes name the port.
    pub server_port: u16,
    /// Networks reached through their gateway; the most specific one
    /// holding a destination decides. None by default.
    pub remotes: Vec<RemoteNetwork>,
}

impl CaptureConfig {
    /// Captures towards `peers`, their servers on port 15008.
    pub fn new(peers: Peers) -> Self {
        CaptureConfig {
            peers,
            server_port: HBONE_PORT,
            remotes: Vec::new(),
        }
    }

    /// Sets [`CaptureConfig::remotes`].
    #[must_use]
    pub fn with_remotes(mut self, remotes: Vec<RemoteNetwork>) -> Self {
        self.remotes = remotes;
        self
    }

    /// Sets [`CaptureConfig::server_port`].
    #[must_use]
    pub fn with_server_port(mut self, port: u16) -> Self {
        self.server_port = port;
        self
    }

    /// The route a connection originally bound for `target` takes, or
    /// `None` when `target` is not in the mesh. On a remote network it is
    /// double HBONE through its gateway, for the service `target` (the
    /// gateway's routes map it to the node's HBONE address); either way
    /// the final node must prove what the peers table says.
    pub fn route(&self, target: SocketAddr) -> Option<Route> {
        let server_ids = self.peers.lookup(target.ip())?.to_vec();
        Some(match remote::most_specific(&self.remotes, target.ip()) {
            Some(remote) => Route::Gateway {
                gateway: remote.gateway,
                gateway_ids: remote.gateway_ids.clone(),
                service: target.to_string(),
                server_ids,
            },
            None => Route::Direct {
                server: SocketAddr::new(target.ip(), self.server_port),
                server_ids,
            },
        })
    }
}

struct Capture {
    dialer: Dialer,
    config: CaptureConfig,
    log: Arc<dyn AccessLog>,
    /// Warnings about refused connections, rate-kept (a rule gone wrong
    /// may send many); each still gets its access record.
    unknown: Refusals,
    not_redirected: Refusals,
}

/// Accepts redirected connections on `listener` until `shutdown`
/// resolves, tunnelling each to its original destination's node; then
/// stops accepting and returns once the tunnels in flight have ended.
/// Bound that wait with a timeout of your choice; then [`Dialer::close`]
/// ends the connections cleanly.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    config: CaptureConfig,
    log: Arc<dyn AccessLog>,
    shutdown: impl Future<Output = ()>,
) {
    let capture = Arc::new(Capture {
        dialer,
        config,
        log,
        unknown: Refusals::new("capture", "destination not in the peers table"),
        not_redirected: Refusals::new("capture", "connection not redirected by a NAT rule"),
    });
    // Only this host's own traffic is redirected here. Anyone else who
    // reaches the listener (on an unspecified address) was not redirected,
    // and is refused below for want of another destination.
    let sources = ClientSources::Any;
    let workers = capture.dialer.workers().cloned();
    super::accept_until(
        listener,
        "capture",
        &sources,
        workers.as_ref(),
        shutdown,
        move |app, source| Phased::new(open(capture.clone(), app, source)),
    )
    .await;
}

/// Opens the tunnel for one redirected connection and returns its relay,
/// or logs why it could not.
async fn open(capture: Arc<Capture>, app: TcpStream, source: SocketAddr) -> Option<ClientRelay> {
    let Capture {
        dialer,
        config,
        log,
        unknown,
        not_redirected,
    } = &*capture;
    // A listener on [::] sees IPv4 clients as IPv4-mapped: the records
    // and the `forwarded` header name them as the IPv4 they are.
    let source = SocketAddr::new(source.ip().to_canonical(), source.port());
    let target = match redirected_to(&app) {
        Ok(target) => target,
        Err(refusal) => {
            let attempt = Attempt::new(source, app.local_addr().unwrap_or(source));
            not_redirected.note(source);
            refuse(log, dialer, &attempt, refusal);
            return None;
        }
    };
    let mut attempt = Attempt::new(source, target);
    let Some(route) = config.route(target) else {
        unknown.note(source);
        let detail = format!("{target} is in no network of the peers table");
        let refusal = Refusal {
            reason: "unknown_destination",
            detail,
            flag: ResponseFlag::NoRoute,
        };
        refuse(log, dialer, &attempt, refusal);
        return None;
    };
    let destination = Destination::new(route, target);
    match destination.open(dialer, &mut attempt).await {
        Ok(tunnel) => Some(ClientRelay::new(app, tunnel, &attempt, log.clone(), dialer)),
        Err(e) => {
            // The route as `hbone forward` logs it: through a gateway or not.
            tracing::warn!(%source, route = %destination, error = %e, "capture: tunnel failed");
            record_dial_failure(log, dialer, &attempt, &e);
            None
        }
    }
}

/// Why a connection was closed without a tunnel.
struct Refusal {
    /// A stable word for logs and metrics.
    reason: &'static str,
    detail: String,
    /// How the Istio metrics count it.
    flag: ResponseFlag,
}

/// The original destination of a redirected connection. A connection
/// made straight to the listener has none worth tunnelling to: it would
/// come back here.
fn redirected_to(app: &TcpStream) -> Result<SocketAddr, Refusal> {
    let original = original_dst::original_dst(app).map_err(|e| Refusal {
        reason: "no_original_destination",
        detail: e.to_string(),
        flag: ResponseFlag::BadRequest,
    })?;
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let original = canonical(original);
    match app.local_addr().map(canonical) {
        Ok(local) if local == original => Err(Refusal {
            reason: "not_redirected",
            detail: format!("{original} is the capture listener"),
            flag: ResponseFlag::BadRequest,
        }),
        _ => Ok(original),
    }
}

/// Writes the access record of a connection closed without a tunnel, and
/// counts it.
fn refuse(log: &Arc<dyn AccessLog>, dialer: &Dialer, attempt: &Attempt, refusal: Refusal) {
    if let Some(metrics) = &dialer.telemetry().metrics {
        metrics.tunnel_failed(
            Reporter::Source,
            dialer.local_meta(),
            &WorkloadMeta::default(),
            &DestinationService::from_host(None),
            refusal.flag,
        );
    }
    log.record(&TunnelRecord {
        role: Role::Client,
        source: attempt.source,
        peer_id: None,
        local_id: dialer.local_id_arc(),
        target: attempt.target.to_string(),
        original_source: None,
        gateway: None,
        trace: Some(attempt.trace),
        outcome: Outcome::Refused {
            status: 0,
            reason: refusal.reason,
            detail: refusal.detail,
        },
        bytes_sent: 0,
        bytes_received: 0,
        duration: attempt.started.elapsed(),
    });
}

#[cfg(all(test, feature = "ca"))]
mod tests;
