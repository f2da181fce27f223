//! Which HTTP/2 connection carries the next tunnel.
//!
//! Connections are keyed by (server address, expected identities); the local
//! identity is fixed per dialer. A connection is handed out while it has a
//! free stream slot and has not closed; otherwise the dialer opens another.
//! A slot is a [`StreamLease`]: it is returned the moment the tunnel drops,
//! so a connection is usable again as soon as it has room.

use crate::client::PeerCache;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
// The runtime's clock, like the sleeps in `closed_when_idle`: the idle
// stamps and the timers then agree, also under paused time.
use tokio::time::Instant;

use crate::identity::SpiffeId;
use crate::tls::TlsFailure;
use crate::window::Probe;
use crate::workers::current_worker;

mod bulk;
#[cfg(test)]
pub(crate) use bulk::{BULK_BYTES, SPAN};
pub(crate) use bulk::{BulkMark, BulkSpan, MEMORY, Pace};

/// Identifies connections that may be shared. Each also names the
/// per-core worker it was made for ([`crate::workers::current_worker`]):
/// a worker's tunnels ride only connections its own thread drives, so
/// neither side of a tunnel wakes another thread.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PoolKey {
    /// Connections straight to a server.
    Direct {
        server: SocketAddr,
        expected: Vec<SpiffeId>,
        worker: Option<usize>,
    },
    /// Inner connections of double HBONE, each inside a tunnel through the
    /// gateway to the service.
    ViaGateway {
        gateway: SocketAddr,
        gateway_ids: Vec<SpiffeId>,
        service: String,
        expected: Vec<SpiffeId>,
        worker: Option<usize>,
    },
}

/// Identity lists compare as sets.
fn normalized(ids: &[SpiffeId]) -> Vec<SpiffeId> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids.dedup();
    ids
}

impl PoolKey {
    pub(crate) fn direct(server: SocketAddr, expected: &[SpiffeId]) -> Self {
        PoolKey::Direct {
            server,
            expected: normalized(expected),
            worker: current_worker(),
        }
    }

    pub(crate) fn via_gateway(
        gateway: SocketAddr,
        gateway_ids: &[SpiffeId],
        service: &str,
        expected: &[SpiffeId],
    ) -> Self {
        PoolKey::ViaGateway {
            gateway,
            gateway_ids: normalized(gateway_ids),
            service: service.to_owned(),
            expected: normalized(expected),
            worker: current_worker(),
        }
    }
}

/// Set in [`ConnState::slots`] once a connection takes no new streams.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Shared between a connection's handle, its driver task and its leases.
pub(crate) struct ConnState {
    /// Streams in use, plus the [`CLOSED`] bit. One atomic word, so that
    /// "idle, close it" and "take a slot" can never both succeed.
    slots: AtomicUsize,
    /// When the last stream ended, in ms since `created` (valid while no
    /// stream is in use).
    idle_since_ms: AtomicU64,
    created: Instant,
    tls_failure: OnceLock<TlsFailure>,
    /// The server's metadata and the metrics of this connection's tunnels,
    /// resolved on its first tunnel.
    pub(crate) peers: PeerCache,
    /// Set, and waiters woken, when the connection's driver task is done:
    /// what [`crate::Dialer::close`] waits for.
    ended: AtomicBool,
    end: tokio::sync::Notify,
    /// What the connection's tunnels received, for its window sizing.
    pub(crate) probe: Arc<Probe>,
}

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnState {
    pub(crate) fn new() -> Self {
        ConnState {
            slots: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            created: Instant::now(),
            tls_failure: OnceLock::new(),
            peers: PeerCache::default(),
            ended: AtomicBool::new(false),
            end: tokio::sync::Notify::new(),
            probe: Arc::new(Probe::for_pool()),
        }
    }

    /// The driver task is done with the connection.
    pub(crate) fn set_ended(&self) {
        self.mark_closed();
        self.ended.store(true, Ordering::Release);
        self.end.notify_waiters();
    }

    /// Resolves once [`ConnState::set_ended`] has been called.
    pub(crate) async fn ended(&self) {
        let notified = self.end.notified();
        tokio::pin!(notified);
        // Registered before the check, so a concurrent end is not missed.
        notified.as_mut().enable();
        if !self.ended.load(Ordering::Acquire) {
            notified.await;
        }
    }

    /// No new streams from now on; streams in flight carry on.
    pub(crate) fn mark_closed(&self) {
        self.slots.fetch_or(CLOSED, Ordering::AcqRel);
    }

    fn is_closed(&self) -> bool {
        self.slots.load(Ordering::Acquire) & CLOSED != 0
    }

    pub(crate) fn record_tls_failure(&self, failure: TlsFailure) {
        let _ = self.tls_failure.set(failure);
    }

    pub(crate) fn tls_failure(&self) -> Option<TlsFailure> {
        self.tls_failure.get().cloned()
    }

    fn now_ms(&self) -> u64 {
        self.created.elapsed().as_millis() as u64
    }

    /// Resolves once the connection has had no stream for `idle_timeout`,
    /// and has then been closed to new streams.
    pub(crate) async fn closed_when_idle(&self, idle_timeout: Duration) {
        loop {
            let slots = self.slots.load(Ordering::Acquire);
            if slots & CLOSED != 0 {
                return std::future::pending().await;
            }
            if slots != 0 {
                tokio::time::sleep(idle_timeout).await;
                continue;
            }
            let idle_for = Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.idle_since_ms.load(Ordering::Acquire)),
            );
            if idle_for < idle_timeout {
                tokio::time::sleep(idle_timeout - idle_for).await;
                continue;
            }
            // Still no stream at all? Then close; a racing lease wins
            // otherwise and we look again later.
            if self
                .slots
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// One HTTP/2 connection to an HBONE server.
pub(crate) struct PooledConn {
    send: SendRequest<Bytes>,
    pub(crate) state: Arc<ConnState>,
    pub(crate) peer_id: Arc<SpiffeId>,
    max_streams: usize,
}

impl PooledConn {
    pub(crate) fn new(
        send: SendRequest<Bytes>,
        state: Arc<ConnState>,
        peer_id: Arc<SpiffeId>,
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
        let limit = self.max_streams.min(self.send.current_max_send_streams());
        self.state
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n & CLOSED == 0 && n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(StreamLease {
            state: self.state.clone(),
        })
    }
}

/// A stream slot on a connection, given back on drop: the connection has
/// room again the moment a tunnel ends.
pub(crate) struct StreamLease {
    pub(crate) state: Arc<ConnState>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let state = &self.state;
        // Stamp the time first: if this was the last stream, the idle
        // watcher must never see a stale stamp with zero streams.
        state.idle_since_ms.store(state.now_ms(), Ordering::Release);
        state.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How [`Pool::checkout`] picks among a key's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Keep the tunnel off connections that carry bulk transfers, while
    /// the key may have more connections.
    AvoidBulk,
    /// The first connection with room: when no new one can be opened.
    Any,
}

/// The dialer's connections.
#[derive(Default)]
pub(crate) struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    /// Pooled connections a tunnel found unusable before the server
    /// answered (dead, or gone away), so that it moved on to another.
    retired: AtomicU64,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<PooledConn>>,
    /// Held while a new connection for this key is being opened, so that
    /// concurrent first tunnels share one handshake instead of racing.
    dialing: Arc<DialGate>,
}

impl Entry {
    /// No connection, and no one at the dial gate: the entry can go.
    fn unused(&self) -> bool {
        self.conns.is_empty() && Arc::strong_count(&self.dialing) == 1
    }
}

/// One dial at a time per key, and its failure shared with everyone who
/// waited for it: without that, each waiter would dial again in turn, and
/// against a black-holed server the last of N concurrent tunnels would
/// fail only after N connect timeouts.
#[derive(Default)]
pub(crate) struct DialGate {
    /// The last attempt's number and error, when it failed.
    last_failure: tokio::sync::Mutex<Option<(u64, crate::client::DialError)>>,
    /// Attempts finished so far.
    finished: AtomicU64,
}

impl DialGate {
    /// Waits for the gate. `Err` carries (a copy of) the error of an attempt
    /// that finished failing while we waited; `Ok` lets us dial.
    pub(crate) async fn enter(&self) -> Result<DialTurn<'_>, crate::client::DialError> {
        let arrived = self.finished.load(Ordering::Acquire);
        let last_failure = self.last_failure.lock().await;
        match &*last_failure {
            Some((attempt, error)) if *attempt > arrived => Err(error.duplicate()),
            _ => Ok(DialTurn {
                gate: self,
                last_failure,
            }),
        }
    }
}

/// The right to dial for a key; say how it went with [`DialTurn::finished`].
pub(crate) struct DialTurn<'a> {
    gate: &'a DialGate,
    last_failure: tokio::sync::MutexGuard<'a, Option<(u64, crate::client::DialError)>>,
}

impl DialTurn<'_> {
    /// Records the attempt's outcome for those waiting behind it.
    pub(crate) fn finished(mut self, failure: Option<&crate::client::DialError>) {
        let attempt = self.gate.finished.fetch_add(1, Ordering::AcqRel) + 1;
        *self.last_failure = failure.map(|e| (attempt, e.duplicate()));
    }
}

impl Pool {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection with a free slot for `key`, dropping closed ones.
    /// [`Choice::AvoidBulk`] takes one that carries no bulk transfer, and
    /// none while the key may still have a connection of its own for the
    /// tunnel ([`bulk`]); [`Choice::Any`] the first with room.
    pub(crate) fn checkout(
        &self,
        key: &PoolKey,
        choice: Choice,
    ) -> Option<(Arc<PooledConn>, StreamLease)> {
        let mut entries = self.entries();
        let entry = entries.get_mut(key)?;
        entry.conns.retain(|c| !c.state.is_closed());
        let acquire = |c: &Arc<PooledConn>| c.try_acquire().map(|lease| (c.clone(), lease));
        let found = match choice {
            Choice::AvoidBulk if entry.conns.len() < bulk::SEPARATE_UP_TO => entry
                .conns
                .iter()
                .filter(|c| !c.state.probe.carries_bulk())
                .find_map(acquire),
            Choice::AvoidBulk | Choice::Any => entry.conns.iter().find_map(acquire),
        };
        if entry.unused() {
            entries.remove(key);
        }
        found
    }

    /// The gate to pass while opening a connection for `key`.
    pub(crate) fn dial_gate(&self, key: &PoolKey) -> Arc<DialGate> {
        self.entries()
            .entry(key.clone())
            .or_default()
            .dialing
            .clone()
    }

    /// Adds a freshly opened connection, and forgets closed ones of every
    /// key (a key may never be dialled again to clean up after itself).
    pub(crate) fn insert(&self, key: PoolKey, conn: Arc<PooledConn>) {
        let mut entries = self.entries();
        Self::retain_open(&mut entries);
        entries.entry(key).or_default().conns.push(conn);
    }

    /// Drops `key`'s entry when it holds no connection and no one holds
    /// its dial gate.
    pub(crate) fn forget_unused(&self, key: &PoolKey) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(key) {
            entry.conns.retain(|c| !c.state.is_closed());
            if entry.unused() {
                entries.remove(key);
            }
        }
    }

    /// Drops closed connections: their `SendRequest` is what keeps h2 from
    /// ending the connection once its last stream is done.
    pub(crate) fn forget_closed(&self) {
        Self::retain_open(&mut self.entries());
    }

    fn retain_open(entries: &mut HashMap<PoolKey, Entry>) {
        entries.retain(|_, entry| {
            entry.conns.retain(|c| !c.state.is_closed());
            !entry.unused()
        });
    }

    /// Closes every connection to new streams and takes them all out.
    pub(crate) fn take_all(&self) -> Vec<Arc<PooledConn>> {
        let mut entries = self.entries();
        let mut taken = Vec::new();
        for entry in entries.values_mut() {
            for conn in entry.conns.drain(..) {
                conn.state.mark_closed();
                taken.push(conn);
            }
        }
        Self::retain_open(&mut entries);
        taken
    }

    /// Open connections and streams in use, by the server identity they
    /// proved (for metrics).
    pub(crate) fn by_peer(&self) -> Vec<(Arc<SpiffeId>, i64, i64)> {
        let mut peers: HashMap<Arc<SpiffeId>, (i64, i64)> = HashMap::new();
        for conn in self.entries().values().flat_map(|e| &e.conns) {
            let slots = conn.state.slots.load(Ordering::Acquire);
            if slots & CLOSED != 0 {
                continue;
            }
            let counts = peers.entry(conn.peer_id.clone()).or_default();
            counts.0 += 1;
            counts.1 += slots as i64;
        }
        peers.into_iter().map(|(p, (c, s))| (p, c, s)).collect()
    }

    /// A tunnel found `conn` unusable before the server answered: no new
    /// streams go on it, and the tunnel moves on.
    pub(crate) fn retire(&self, conn: &PooledConn) {
        conn.state.mark_closed();
        self.retired.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections retired by [`Pool::retire`] so far.
    pub(crate) fn retired(&self) -> u64 {
        self.retired.load(Ordering::Relaxed)
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

/// What the dialer's unit tests look at.
#[cfg(all(test, feature = "ca"))]
impl ConnState {
    /// Streams in use, whether or not the connection is closed.
    pub(crate) fn streams_in_use(&self) -> usize {
        self.slots.load(Ordering::Acquire) & !CLOSED
    }

    pub(crate) fn closed(&self) -> bool {
        self.is_closed()
    }
}

#[cfg(all(test, feature = "ca"))]
impl Pool {
    /// Keys with connections or a dial gate in use.
    pub(crate) fn keys(&self) -> usize {
        self.entries().len()
    }
}

#[cfg(test)]
mod tests;
