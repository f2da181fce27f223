//! Counters of a running server.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a running server keeps; read them with `Server::stats`.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(super) connections_accepted: AtomicU64,
    pub(super) connections_closed: AtomicU64,
    pub(super) handshake_failures: AtomicU64,
    pub(super) tunnels_opened: AtomicU64,
    pub(super) tunnels_closed: AtomicU64,
    pub(super) refusals: AtomicU64,
    pub(super) malformed_headers: AtomicU64,
    pub(super) limit_refusals: AtomicU64,
}

/// A point-in-time copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub handshake_failures: u64,
    pub tunnels_opened: u64,
    pub tunnels_active: u64,
    pub refusals: u64,
    /// `forwarded`, `traceparent` or `baggage` values that were ignored.
    pub malformed_headers: u64,
    /// Connections closed and tunnels refused because a limit was reached.
    pub limit_refusals: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Acquire);
        let accepted = load(&self.connections_accepted);
        let opened = load(&self.tunnels_opened);
        StatsSnapshot {
            connections_accepted: accepted,
            connections_active: accepted - load(&self.connections_closed),
            handshake_failures: load(&self.handshake_failures),
            tunnels_opened: opened,
            tunnels_active: opened - load(&self.tunnels_closed),
            refusals: load(&self.refusals),
            malformed_headers: load(&self.malformed_headers),
            limit_refusals: load(&self.limit_refusals),
        }
    }
}

/// Increments `closed` when dropped, so a count is right on every exit path.
pub(super) struct CountOnDrop<'a>(pub(super) &'a AtomicU64);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}
