//! The tunnels open right now, for the admin endpoint's `/tunnels`.
//!
//! Kept only when asked for (an admin endpoint is configured): each entry
//! costs a small allocation per tunnel. Byte counts are refreshed by the
//! relay as bytes move, with relaxed stores nobody waits on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::access::Role;
use crate::copy::Transferred;
use crate::headers::ForwardedFor;
use crate::identity::SpiffeId;

/// Spreads registrations over several locks, so that tunnels opening on
/// different threads rarely wait for each other.
const SHARDS: usize = 16;

/// The open tunnels of one process (any number of servers and entries).
#[derive(Default)]
pub struct ActiveTunnels {
    shards: [Mutex<HashMap<u64, Arc<ActiveTunnel>>>; SHARDS],
    next_id: AtomicU64,
}

impl std::fmt::Debug for ActiveTunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveTunnels")
            .field("len", &self.len())
            .finish()
    }
}

/// One open tunnel.
#[derive(Debug)]
pub struct ActiveTunnel {
    pub role: Role,
    /// The TCP peer: HBONE client (server side) or application (client side).
    pub source: SocketAddr,
    pub original_source: Option<ForwardedFor>,
    /// The identity the other HBONE end proved.
    pub peer_id: Arc<SpiffeId>,
    pub target: Box<str>,
    started: Instant,
    sent: AtomicU64,
    received: AtomicU64,
}

impl ActiveTunnel {
    /// Bytes from the source side towards the target, and back, so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// When the tunnel opened, by the wall clock.
    pub fn opened_at(&self) -> SystemTime {
        SystemTime::now() - self.age()
    }
}

/// What describes a tunnel being registered.
pub struct TunnelInfo {
    pub role: Role,
    pub source: SocketAddr,
    pub original_source: Option<ForwardedFor>,
    pub peer_id: Arc<SpiffeId>,
    pub target: String,
}

impl ActiveTunnels {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ActiveTunnel>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a tunnel; it is removed when the returned handle drops.
    pub fn register(self: &Arc<Self>, info: TunnelInfo) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tunnel = Arc::new(ActiveTunnel {
            role: info.role,
            source: info.source,
            original_source: info.original_source,
            peer_id: info.peer_id,
            target: info.target.into_boxed_str(),
            started: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        self.shard(id).insert(id, tunnel.clone());
        Registration {
            registry: self.clone(),
            id,
            tunnel,
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open tunnels, oldest first, at most `limit` of them.
    pub fn list(&self, limit: usize) -> Vec<Arc<ActiveTunnel>> {
        let mut all: Vec<Arc<ActiveTunnel>> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.age()));
        all.truncate(limit);
        all
    }
}

/// A tunnel's place in [`ActiveTunnels`]; removes it when dropped.
pub struct Registration {
    registry: Arc<ActiveTunnels>,
    id: u64,
    tunnel: Arc<ActiveTunnel>,
}

impl Registration {
    /// Publishes the byte counts so far (`a` is the socket side, as in
    /// [`Transferred`]; `source_is_socket` says whether that is the source).
    pub fn update(&self, moved: Transferred, source_is_socket: bool) {
        let (sent, received) = if source_is_socket {
            (moved.a_to_b, moved.b_to_a)
        } else {
            (moved.b_to_a, moved.a_to_b)
        };
        self.tunnel.sent.store(sent, Ordering::Relaxed);
        self.tunnel.received.store(received, Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.shard(self.id).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_and_go() {
        let tunnels = Arc::new(ActiveTunnels::default());
        let info = || TunnelInfo {
            role: Role::Server,
            source: "127.0.0.1:1".parse().unwrap(),
            original_source: None,
            peer_id: Arc::new(SpiffeId::parse("spiffe://td/a").unwrap()),
            target: "127.0.0.1:80".into(),
        };
        let first = tunnels.register(info());
        let second = tunnels.register(info());
        second.update(
            Transferred {
                a_to_b: 5,
                b_to_a: 7,
            },
            false,
        );
        assert_eq!(tunnels.len(), 2);
        let listed = tunnels.list(10);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].bytes(), (7, 5));
        assert_eq!(tunnels.list(1).len(), 1);
        drop(first);
        assert_eq!(tunnels.len(), 1);
        drop(second);
        assert!(tunnels.is_empty());
    }
}
