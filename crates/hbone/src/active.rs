//! The tunnels open right now, for the admin endpoint's `/tunnels`.
//!
//! Kept only when asked for (an admin endpoint is configured), and kept
//! small, since every open tunnel has an entry on each end: about 130 bytes
//! for the entry and its slot. Byte counts are refreshed by the relay as
//! bytes move, with relaxed stores nobody waits on.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::access::Role;
use crate::headers::ForwardedFor;
use crate::identity::SpiffeId;
use crate::relay::Transferred;

/// Spreads registrations over several locks, so that tunnels opening on
/// different threads rarely wait for each other.
const SHARDS: usize = 16;

/// The open tunnels of one process (any number of servers and entries).
#[derive(Default)]
pub struct ActiveTunnels {
    shards: [Mutex<Slots>; SHARDS],
    next_shard: AtomicUsize,
}

/// One shard: entries by index, and the indexes free for reuse.
#[derive(Default)]
struct Slots {
    entries: Vec<Option<Arc<ActiveTunnel>>>,
    free: Vec<u32>,
}

impl fmt::Debug for ActiveTunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveTunnels")
            .field("len", &self.len())
            .finish()
    }
}

/// An address without the IPv6 flow and scope ids `SocketAddr` carries,
/// and with the port optional (`forwarded` may name a bare IP).
// Exhaustive on purpose: an address and a port are all there is to it, as
// with `SocketAddr`; building one as a literal should stay possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The IP address.
    pub ip: IpAddr,
    /// The port, when known.
    pub port: Option<u16>,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint {
            ip: addr.ip(),
            port: Some(addr.port()),
        }
    }
}

impl From<ForwardedFor> for Endpoint {
    fn from(original: ForwardedFor) -> Self {
        Endpoint {
            ip: original.ip(),
            port: original.port(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (ip, None) => write!(f, "{ip}"),
            (IpAddr::V4(ip), Some(port)) => write!(f, "{ip}:{port}"),
            (IpAddr::V6(ip), Some(port)) => write!(f, "[{ip}]:{port}"),
        }
    }
}

/// One open tunnel.
#[derive(Debug)]
pub struct ActiveTunnel {
    /// The identity the other HBONE end proved.
    pub peer_id: Arc<SpiffeId>,
    /// The requested target, as sent in `:authority`.
    pub target: Box<str>,
    sent: AtomicU64,
    received: AtomicU64,
    /// Milliseconds since [`epoch`] when the tunnel opened.
    opened_ms: u64,
    /// The TCP peer: HBONE client (server side) or application (client side).
    pub source: Endpoint,
    /// The original client, from `forwarded` (server side).
    pub original_source: Option<Endpoint>,
    /// Which end of the tunnel this entry is.
    pub role: Role,
}

/// The process's reference instant for tunnel ages (an `Instant` per
/// entry would cost 16 bytes each).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl ActiveTunnel {
    /// Bytes sent back to the source side, and received from it, so far
    /// (Istio's convention, as in the access record and the metrics).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// How long the tunnel has been open (millisecond precision).
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.opened_ms))
    }

    /// When the tunnel opened, by the wall clock.
    pub fn opened_at(&self) -> SystemTime {
        SystemTime::now() - self.age()
    }
}

/// What describes a tunnel being registered: [`TunnelInfo::new`], then
/// [`TunnelInfo::with_original_source`] where there is one.
#[non_exhaustive]
pub struct TunnelInfo {
    /// Which end of the tunnel registers it.
    pub role: Role,
    /// The TCP peer: HBONE client (server side) or application (client side).
    pub source: SocketAddr,
    /// The original client, from `forwarded` (server side).
    pub original_source: Option<ForwardedFor>,
    /// The identity the other HBONE end proved.
    pub peer_id: Arc<SpiffeId>,
    /// The requested target, as sent in `:authority`.
    pub target: String,
}

impl TunnelInfo {
    /// A tunnel to `target` (as sent in `:authority`), seen from `role`'s
    /// end, with `source` its TCP peer and `peer_id` the identity the
    /// other HBONE end proved.
    pub fn new(
        role: Role,
        source: SocketAddr,
        peer_id: Arc<SpiffeId>,
        target: impl Into<String>,
    ) -> Self {
        TunnelInfo {
            role,
            source,
            original_source: None,
            peer_id,
            target: target.into(),
        }
    }

    /// Sets [`TunnelInfo::original_source`].
    #[must_use]
    pub fn with_original_source(mut self, original: ForwardedFor) -> Self {
        self.original_source = Some(original);
        self
    }
}

impl ActiveTunnels {
    fn shard(&self, index: usize) -> std::sync::MutexGuard<'_, Slots> {
        self.shards[index % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a tunnel; it is removed when the returned handle drops.
    pub fn register(self: &Arc<Self>, info: TunnelInfo) -> Registration {
        let tunnel = Arc::new(ActiveTunnel {
            peer_id: info.peer_id,
            target: info.target.into_boxed_str(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            opened_ms: now_ms(),
            source: info.source.into(),
            original_source: info.original_source.map(Endpoint::from),
            role: info.role,
        });
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut slots = self.shard(shard);
        let index = match slots.free.pop() {
            Some(index) => {
                slots.entries[index as usize] = Some(tunnel.clone());
                index
            }
            None => {
                slots.entries.push(Some(tunnel.clone()));
                (slots.entries.len() - 1) as u32
            }
        };
        drop(slots);
        Registration {
            registry: self.clone(),
            slot: (shard as u64) | (u64::from(index) << 8),
            tunnel,
        }
    }

    /// How many tunnels are open.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let slots = s.lock().unwrap_or_else(|e| e.into_inner());
                slots.entries.len() - slots.free.len()
            })
            .sum()
    }

    /// Open tunnels on the client side and on the server side.
    pub fn count_by_role(&self) -> (usize, usize) {
        let (mut clients, mut servers) = (0, 0);
        for shard in &self.shards {
            let slots = shard.lock().unwrap_or_else(|e| e.into_inner());
            for tunnel in slots.entries.iter().flatten() {
                match tunnel.role {
                    Role::Client => clients += 1,
                    Role::Server => servers += 1,
                }
            }
        }
        (clients, servers)
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open tunnels, oldest first, at most `limit` of them.
    pub fn list(&self, limit: usize) -> Vec<Arc<ActiveTunnel>> {
        let mut all: Vec<Arc<ActiveTunnel>> = Vec::new();
        for shard in &self.shards {
            let slots = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(slots.entries.iter().flatten().cloned());
        }
        all.sort_by_key(|t| t.opened_ms);
        all.truncate(limit);
        all
    }
}

/// A tunnel's place in [`ActiveTunnels`]; removes it when dropped.
pub struct Registration {
    registry: Arc<ActiveTunnels>,
    /// Shard in the low 8 bits, index above.
    slot: u64,
    tunnel: Arc<ActiveTunnel>,
}

impl Registration {
    /// Publishes the byte counts so far; `local_is_source` says whether the
    /// relay's local side (see [`Transferred`]) is the tunnel's source.
    pub fn update(&self, moved: Transferred, local_is_source: bool) {
        // Istio's convention, as in the access record: received from the
        // source side, sent back to it.
        let (received, sent) = if local_is_source {
            (moved.to_tunnel, moved.from_tunnel)
        } else {
            (moved.from_tunnel, moved.to_tunnel)
        };
        self.tunnel.sent.store(sent, Ordering::Relaxed);
        self.tunnel.received.store(received, Ordering::Relaxed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let index = (self.slot >> 8) as u32;
        let mut slots = self.registry.shard((self.slot & 0xff) as usize);
        if let Some(entry) = slots.entries.get_mut(index as usize) {
            *entry = None;
            slots.free.push(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_and_go_and_slots_are_reused() {
        let tunnels = Arc::new(ActiveTunnels::default());
        let info = || TunnelInfo {
            role: Role::Server,
            source: "[::1]:1".parse().unwrap(),
            original_source: Some(ForwardedFor::Ip("10.0.0.1".parse().unwrap())),
            peer_id: Arc::new(SpiffeId::parse("spiffe://td/a").unwrap()),
            target: "127.0.0.1:80".into(),
        };
        let first = tunnels.register(info());
        std::thread::sleep(Duration::from_millis(2));
        let second = tunnels.register(info());
        second.update(
            Transferred {
                to_tunnel: 5,
                from_tunnel: 7,
            },
            false,
        );
        assert_eq!(tunnels.len(), 2);
        let listed = tunnels.list(10);
        assert_eq!(listed.len(), 2);
        // A server's local side is the target: to_tunnel went back to the
        // source (sent), from_tunnel came from it (received).
        assert_eq!(listed[1].bytes(), (5, 7), "oldest first");
        assert_eq!(listed[0].source.to_string(), "[::1]:1");
        assert_eq!(
            listed[0].original_source.map(|o| o.to_string()).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(tunnels.list(1).len(), 1);
        drop(first);
        assert_eq!(tunnels.len(), 1);
        // SHARDS registrations later, every shard has taken one more; the
        // freed slot is reused rather than the shard growing.
        let more: Vec<_> = (0..SHARDS).map(|_| tunnels.register(info())).collect();
        assert_eq!(tunnels.len(), 1 + SHARDS);
        let grown: usize = tunnels
            .shards
            .iter()
            .map(|s| s.lock().unwrap().entries.len())
            .sum();
        assert_eq!(grown, SHARDS + 1, "the freed slot was reused");
        drop(more);
        drop(second);
        assert!(tunnels.is_empty());
    }

    #[test]
    fn entries_stay_small() {
        // Arc header (16) + entry: inside jemalloc's 112-byte class.
        assert!(std::mem::size_of::<ActiveTunnel>() <= 96);
    }
}
