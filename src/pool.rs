//! Which HTTP/2 connection carries the next tunnel.
//!
//! Connections are keyed by (server address, expected identities); the local
//! identity is fixed per dialer. A connection is handed out while it has a
//! free stream slot and has not closed; otherwise the dialer opens another.
//! A slot is a [`StreamLease`]: it is returned the moment the tunnel drops,
//! so a connection is usable again as soon as it has room.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use h2::client::SendRequest;

use crate::identity::SpiffeId;
use crate::tls::TlsFailure;

/// Identifies connections that may be shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    server: SocketAddr,
    expected: Vec<SpiffeId>,
}

impl PoolKey {
    pub(crate) fn new(server: SocketAddr, expected: &[SpiffeId]) -> Self {
        let mut expected = expected.to_vec();
        expected.sort();
        expected.dedup();
        PoolKey { server, expected }
    }
}

/// Shared between a connection's handle, its driver task and its leases.
#[derive(Default)]
pub(crate) struct ConnState {
    active: AtomicUsize,
    closed: AtomicBool,
    tls_failure: OnceLock<TlsFailure>,
}

impl ConnState {
    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn record_tls_failure(&self, failure: TlsFailure) {
        let _ = self.tls_failure.set(failure);
    }

    pub(crate) fn tls_failure(&self) -> Option<TlsFailure> {
        self.tls_failure.get().cloned()
    }
}

/// One HTTP/2 connection to an HBONE server.
pub(crate) struct PooledConn {
    send: SendRequest<Bytes>,
    pub(crate) state: Arc<ConnState>,
    pub(crate) peer_id: SpiffeId,
    max_streams: usize,
}

impl PooledConn {
    pub(crate) fn new(
        send: SendRequest<Bytes>,
        state: Arc<ConnState>,
        peer_id: SpiffeId,
        max_streams: usize,
    ) -> Self {
        PooledConn {
            send,
            state,
            peer_id,
            max_streams,
        }
    }

    pub(crate) fn send_request(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }

    /// Takes a stream slot if the connection is open and has room under
    /// both our limit and the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    pub(crate) fn try_acquire(&self) -> Option<StreamLease> {
        if self.state.is_closed() {
            return None;
        }
        let limit = self.max_streams.min(self.send.current_max_send_streams());
        self.state
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(StreamLease {
            state: self.state.clone(),
        })
    }
}

/// A stream slot on a connection, given back on drop.
pub(crate) struct StreamLease {
    state: Arc<ConnState>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The dialer's connections.
#[derive(Default)]
pub(crate) struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<PooledConn>>,
    /// Held while a new connection for this key is being opened, so that
    /// concurrent first tunnels share one handshake instead of racing.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

impl Pool {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection with a free slot for `key`, dropping closed ones.
    pub(crate) fn checkout(&self, key: &PoolKey) -> Option<(Arc<PooledConn>, StreamLease)> {
        let mut entries = self.entries();
        let entry = entries.get_mut(key)?;
        entry.conns.retain(|c| !c.state.is_closed());
        let found = entry
            .conns
            .iter()
            .find_map(|c| c.try_acquire().map(|lease| (c.clone(), lease)));
        if entry.conns.is_empty() && Arc::strong_count(&entry.dialing) == 1 {
            entries.remove(key);
        }
        found
    }

    /// The lock to hold while opening a connection for `key`.
    pub(crate) fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.entries()
            .entry(key.clone())
            .or_default()
            .dialing
            .clone()
    }

    /// Adds a freshly opened connection.
    pub(crate) fn insert(&self, key: PoolKey, conn: Arc<PooledConn>) {
        self.entries().entry(key).or_default().conns.push(conn);
    }

    /// Open connections across all keys (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.entries()
            .values()
            .flat_map(|e| &e.conns)
            .filter(|c| !c.state.is_closed())
            .count()
    }
}
