//! A local port forward: every accepted TCP connection becomes a tunnel to
//! one fixed target behind one HBONE server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::{record_dial_failure, relay};
use crate::access::AccessLog;
use crate::client::{Dialer, Route, TunnelRequest};

/// Accepts on `listener` forever, tunnelling each connection to `target`.
pub async fn run(
    listener: TcpListener,
    dialer: Dialer,
    route: Route,
    target: SocketAddr,
    log: Arc<dyn AccessLog>,
) {
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
        let dialer = dialer.clone();
        let route = route.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let request = TunnelRequest {
                source: Some(source),
                ..TunnelRequest::new(target)
            };
            match dialer.open(&route, &request).await {
                Ok(tunnel) => relay(app, source, tunnel, target, &log, started).await,
                Err(e) => {
                    tracing::warn!(%source, %target, error = %e, "forward: tunnel failed");
                    record_dial_failure(&log, source, &dialer, target, &e, started);
                }
            }
        });
    }
}
