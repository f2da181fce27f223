//! A local port forward: every accepted TCP connection becomes a tunnel to
//! one fixed target behind one HBONE server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::{Attempt, ClientRelay, record_dial_failure};
use crate::access::AccessLog;
use crate::client::{Dialer, Route};
use crate::phased::Phased;

/// What every forwarded connection shares.
struct Forward {
    dialer: Dialer,
    route: Route,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
}

/// Accepts on `listener` forever, tunnelling each connection to `target`.
pub async fn run(
    listener: TcpListener,
    dialer: Dialer,
    route: Route,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
) {
    serve(listener, dialer, route, target, log, std::future::pending()).await;
}

/// As [`run`], until `shutdown` resolves: then stops accepting and returns
/// once the tunnels in flight have ended. Bound that wait with a timeout of
/// your choice; then [`Dialer::close`] ends the connections cleanly.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    route: Route,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
    shutdown: impl Future<Output = ()>,
) {
    let forward = Arc::new(Forward {
        dialer,
        route,
        target,
        log,
    });
    // The dial is boxed and hands back the relay, so the task keeps only
    // the relay's state for the tunnel's lifetime.
    super::accept_until(listener, "forward", shutdown, |app, source| {
        Phased::new(open(forward.clone(), app, source))
    })
    .await;
}

/// Opens the tunnel for one accepted connection and returns its relay, or
/// logs why it could not.
async fn open(forward: Arc<Forward>, app: TcpStream, source: SocketAddr) -> Option<ClientRelay> {
    let Forward {
        dialer,
        route,
        target,
        log,
    } = &*forward;
    let attempt = Attempt::new(source, *target);
    match dialer.open(route, &attempt.request()).await {
        Ok(tunnel) => Some(ClientRelay::new(app, tunnel, &attempt, log.clone(), dialer)),
        Err(e) => {
            tracing::warn!(%source, %target, error = %e, "forward: tunnel failed");
            record_dial_failure(log, dialer, &attempt, &e);
            None
        }
    }
}
