//! Caps on what one server takes on, so a flood from one peer or many
//! cannot exhaust memory or file descriptors. At a cap we refuse the new
//! thing cleanly (close the new TCP connection, or answer 503) and count
//! it; nothing already running is disturbed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The caps; each has a default meant for one busy node. Change one with
/// the `with_*` methods: `Limits::default().with_max_tunnels(1_000)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Open connections, all sources together.
    pub max_connections: usize,
    /// Open connections from one source IP.
    pub max_connections_per_ip: usize,
    /// Open tunnels, all connections together.
    pub max_tunnels: usize,
    /// Control frames one connection may send per
    /// [`Limits::control_frame_window`] (a burst of this many at once is
    /// allowed too); one more and the connection is closed with
    /// GOAWAY(ENHANCE_YOUR_CALM). Counted: SETTINGS, PING, PRIORITY,
    /// GOAWAY, frame types HTTP/2 does not define, DATA that carries no
    /// data and does not end its stream, and WINDOW_UPDATE and RST_STREAM
    /// beyond those that traffic accounts for (two per DATA frame the
    /// server sends, two per stream the client opens). Default 1,000: a
    /// client that PINGs every second and changes its SETTINGS now and
    /// then sends a few dozen.
    pub max_control_frames: u32,
    /// The period [`Limits::max_control_frames`] is counted over; 10 s by
    /// default.
    pub control_frame_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            max_tunnels: 100_000,
            max_control_frames: 1_000,
            control_frame_window: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_connections`].
    #[must_use]
    pub fn with_max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Sets [`Limits::max_connections_per_ip`].
    #[must_use]
    pub fn with_max_connections_per_ip(mut self, connections: usize) -> Self {
        self.max_connections_per_ip = connections;
        self
    }

    /// Sets [`Limits::max_tunnels`].
    #[must_use]
    pub fn with_max_tunnels(mut self, tunnels: usize) -> Self {
        self.max_tunnels = tunnels;
        self
    }

    /// Sets [`Limits::max_control_frames`] and
    /// [`Limits::control_frame_window`]: at most `frames` control frames
    /// per `window` on one connection. `frames` of 0 counts as 1; a
    /// `window` of zero turns the check off.
    #[must_use]
    pub fn with_max_control_frames(mut self, frames: u32, window: Duration) -> Self {
        self.max_control_frames = frames;
        self.control_frame_window = window;
        self
    }
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    Total,
    PerIp,
}

/// Counts what is open against [`Limits`].
#[derive(Debug, Default)]
pub(super) struct Gate {
    limits: Limits,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    tunnels: AtomicUsize,
}

impl Gate {
    pub(super) fn new(limits: Limits) -> Self {
        Gate {
            limits,
            ..Gate::default()
        }
    }

    /// Admits a connection from `ip`, or says which cap it hit.
    pub(super) fn admit_connection(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<ConnectionSlot, ConnectionRefusal> {
        let ip = ip.to_canonical();
        if !take(&self.connections, self.limits.max_connections) {
            return Err(ConnectionRefusal::Total);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.limits.max_connections_per_ip {
            drop(per_ip);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnectionRefusal::PerIp);
        }
        *count += 1;
        Ok(ConnectionSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// Admits a tunnel, unless the server already carries its maximum.
    pub(super) fn admit_tunnel(self: &Arc<Self>) -> Option<TunnelSlot> {
        take(&self.tunnels, self.limits.max_tunnels).then(|| TunnelSlot { gate: self.clone() })
    }
}

fn take(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

/// An admitted connection; frees its place on drop.
pub(super) struct ConnectionSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gate.connections.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.gate.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// An admitted tunnel; frees its place on drop.
pub(super) struct TunnelSlot {
    gate: Arc<Gate>,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.gate.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_free_on_drop() {
        let gate = Arc::new(Gate::new(Limits {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_tunnels: 1,
            ..Limits::default()
        }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = gate.admit_connection(a).unwrap();
        let _a2 = gate.admit_connection(a).unwrap();
        assert_eq!(
            gate.admit_connection(a).err(),
            Some(ConnectionRefusal::PerIp)
        );
        // The mapped form of the same address counts as the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            gate.admit_connection(mapped).err(),
            Some(ConnectionRefusal::PerIp)
        );
        let _b1 = gate.admit_connection(b).unwrap();
        assert_eq!(
            gate.admit_connection(b).err(),
            Some(ConnectionRefusal::Total)
        );
        drop(a1);
        assert!(gate.admit_connection(b).is_ok());
        let t = gate.admit_tunnel().unwrap();
        assert!(gate.admit_tunnel().is_none());
        drop(t);
        assert!(gate.admit_tunnel().is_some());
    }

    fn open_connections(gate: &Gate) -> (usize, usize) {
        let per_ip = gate.per_ip.lock().unwrap();
        (
            gate.connections.load(Ordering::Acquire),
            per_ip.values().sum(),
        )
    }

    #[test]
    fn a_refused_connection_takes_no_place() {
        let gate = Arc::new(Gate::new(Limits {
            max_connections: 2,
            max_connections_per_ip: 1,
            max_tunnels: 1,
            ..Limits::default()
        }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let _a1 = gate.admit_connection(a).unwrap();
        // Refused per source: the place it took in the total is returned.
        for _ in 0..5 {
            assert_eq!(
                gate.admit_connection(a).err(),
                Some(ConnectionRefusal::PerIp)
            );
        }
        assert_eq!(open_connections(&gate), (1, 1));
        let _b1 = gate.admit_connection("10.0.0.2".parse().unwrap()).unwrap();
        // Refused in total: no source's count moves.
        assert_eq!(
            gate.admit_connection("10.0.0.3".parse().unwrap()).err(),
            Some(ConnectionRefusal::Total)
        );
        assert_eq!(open_connections(&gate), (2, 2));
    }

    #[test]
    fn sources_are_counted_apart_and_forgotten_when_their_last_connection_ends() {
        let gate = Arc::new(Gate::new(Limits {
            max_connections: 10,
            max_connections_per_ip: 1,
            max_tunnels: 1,
            ..Limits::default()
        }));
        let v4 = gate.admit_connection("127.0.0.1".parse().unwrap()).unwrap();
        let v6 = gate.admit_connection("::1".parse().unwrap()).unwrap();
        let other = gate.admit_connection("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(gate.per_ip.lock().unwrap().len(), 3);
        drop((v4, v6, other));
        assert!(
            gate.per_ip.lock().unwrap().is_empty(),
            "no entry left behind"
        );
        assert_eq!(open_connections(&gate), (0, 0));
    }

    #[test]
    fn slots_taken_and_dropped_on_many_threads_add_up() {
        let gate = Arc::new(Gate::new(Limits {
            max_connections: 8,
            max_connections_per_ip: 3,
            max_tunnels: 5,
            ..Limits::default()
        }));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    let ip = IpAddr::from([10, 0, 0, t % 2]);
                    let mut held = Vec::new();
                    let mut tunnels = Vec::new();
                    for i in 0..2_000 {
                        if let Ok(slot) = gate.admit_connection(ip) {
                            held.push(slot);
                        }
                        tunnels.extend(gate.admit_tunnel());
                        if i % 3 == 0 {
                            held.clear();
                            tunnels.clear();
                        }
                        let (total, _) = open_connections(&gate);
                        assert!(total <= 8, "over the total cap: {total}");
                        assert!(gate.tunnels.load(Ordering::Acquire) <= 5);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(open_connections(&gate), (0, 0));
        assert!(gate.per_ip.lock().unwrap().is_empty());
        assert_eq!(gate.tunnels.load(Ordering::Acquire), 0);
    }
}
