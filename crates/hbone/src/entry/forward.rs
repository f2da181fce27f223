//! A local port forward: every accepted TCP connection becomes a tunnel to
//! one fixed target behind one HBONE server (either may be a host name,
//! resolved at each connection: see [`Destination`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::{Attempt, ClientRelay, ClientSources, Destination, record_dial_failure};
use crate::access::AccessLog;
use crate::authority::Target;
use crate::client::Dialer;
use crate::phased::Phased;

/// What every forwarded connection shares.
struct Forward {
    dialer: Dialer,
    destination: Destination,
    log: Arc<dyn AccessLog>,
}

/// Accepts on `listener` forever, tunnelling each connection to
/// `destination`.
pub async fn run(
    listener: TcpListener,
    dialer: Dialer,
    destination: Destination,
    log: Arc<dyn AccessLog>,
) {
    serve(listener, dialer, destination, log, std::future::pending()).await;
}

/// As [`run`], until `shutdown` resolves: then stops accepting and returns
/// once the tunnels in flight have ended. Bound that wait with a timeout of
/// your choice; then [`Dialer::close`] ends the connections cleanly.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    destination: Destination,
    log: Arc<dyn AccessLog>,
    shutdown: impl Future<Output = ()>,
) {
    let sources = ClientSources::Any;
    serve_with_access(listener, dialer, destination, log, sources, shutdown).await;
}

/// As [`serve`], tunnelling only connections from `sources`: others are
/// closed right after accept, before anything is dialled.
pub async fn serve_with_access(
    listener: TcpListener,
    dialer: Dialer,
    destination: Destination,
    log: Arc<dyn AccessLog>,
    sources: ClientSources,
    shutdown: impl Future<Output = ()>,
) {
    let forward = Arc::new(Forward {
        dialer,
        destination,
        log,
    });
    // The dial is boxed and hands back the relay, so the task keeps only
    // the relay's state for the tunnel's lifetime.
    let workers = forward.dialer.workers().cloned();
    super::accept_until(
        listener,
        "forward",
        &sources,
        workers.as_ref(),
        shutdown,
        move |app, source| Phased::new(open(forward.clone(), app, source)),
    )
    .await;
}

/// Opens the tunnel for one accepted connection and returns its relay, or
/// logs why it could not.
async fn open(forward: Arc<Forward>, app: TcpStream, source: SocketAddr) -> Option<ClientRelay> {
    let Forward {
        dialer,
        destination,
        log,
    } = &*forward;
    let mut attempt = Attempt::new(source, placeholder(destination.target()));
    match destination.open(dialer, &mut attempt).await {
        Ok(tunnel) => Some(ClientRelay::new(app, tunnel, &attempt, log.clone(), dialer)),
        Err(e) => {
            let target = destination.target();
            tracing::warn!(%source, %target, error = %e, "forward: tunnel failed");
            record_dial_failure(log, dialer, &attempt, &e);
            None
        }
    }
}

/// The target address an attempt starts with, until a name is resolved.
pub(super) fn placeholder(target: &Target) -> SocketAddr {
    match target {
        Target::Addr(addr) => *addr,
        Target::Service(name) => SocketAddr::from(([0, 0, 0, 0], name.port())),
    }
}
