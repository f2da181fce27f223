//! For fuzzing and tests only: not part of the supported API, and may
//! change without notice.
//!
//! [`PlaintextServer`] serves HTTP/2 connections over any byte stream, as
//! if the TLS handshake had already admitted a given peer: what a server
//! does with the decrypted bytes of an accepted connection, through the
//! same code (the control-frame guard, the HTTP/2 settings and limits,
//! CONNECT checks, the policy, target dials and relays). Only the TLS
//! layer and the connection admission (its limits and counters) are left
//! out. The fuzz target `h2_front` drives it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};

use super::stats::CountOnDrop;
use super::{Server, ServerConfig, ServerError, ServerStats, Shared};
use crate::cork::Cork;
use crate::frame_guard::Tripwire;
use crate::identity::SpiffeId;

/// A server's shared state without a listener or TLS; see the module.
pub struct PlaintextServer {
    shared: Arc<Shared>,
    /// The address connections are taken to arrive on.
    local_addr: SocketAddr,
}

impl PlaintextServer {
    /// The state a [`Server`] bound to `config.listen` would have: the
    /// policy refuses that address as a target, as it refuses the
    /// listener's. Nothing is bound.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        let local_addr = config.listen;
        let tls = Server::server_tls(&config)?;
        Ok(PlaintextServer {
            shared: Arc::new(Shared::new(tls, config, local_addr)?),
            local_addr,
        })
    }

    /// Serves one HTTP/2 connection over `io`, from `peer_id` at
    /// `peer_addr`, until it ends. The streams it opens run in tasks of
    /// their own (on the current runtime) and may outlive it.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        peer_addr: SocketAddr,
        peer_id: SpiffeId,
    ) {
        let shared = &self.shared;
        shared
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::AcqRel);
        let _closed = CountOnDrop(&shared.stats.connections_closed);
        let tripwire = Arc::new(Tripwire::default());
        let cork = Cork::default();
        let connection = match shared.h2_handshake(io, &cork, tripwire.clone()).await {
            Ok(connection) => connection,
            Err(reason) => {
                tracing::debug!(%peer_addr, %reason, "handshake failed");
                return;
            }
        };
        shared
            .clone()
            .serve_h2(
                connection,
                cork,
                peer_addr,
                self.local_addr.ip(),
                peer_id,
                tripwire,
            )
            .await;
    }

    /// Live counters, as [`Server::stats`].
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }
}
