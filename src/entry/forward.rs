//! A local port forward: every accepted TCP connection becomes a tunnel to
//! one fixed target behind one HBONE server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::{record_dial_failure, relay};
use crate::access::AccessLog;
use crate::client::{Dialer, Route, TunnelRequest};

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
    let forward = Arc::new(Forward {
        dialer,
        route,
        target,
        log,
    });
    loop {
        let (app, source) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "forward: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = app.set_nodelay(true);
        let forward = forward.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let Forward {
                dialer,
                route,
                target,
                log,
            } = &*forward;
            let request = TunnelRequest {
                source: Some(source),
                ..TunnelRequest::new(*target)
            };
            // Boxed so the dial's state is freed once the tunnel is open.
            match Box::pin(dialer.open(route, &request)).await {
                Ok(tunnel) => relay(app, source, tunnel, *target, log.clone(), started).await,
                Err(e) => {
                    tracing::warn!(%source, %target, error = %e, "forward: tunnel failed");
                    record_dial_failure(log, source, dialer, *target, &e, started);
                }
            }
        });
    }
}
