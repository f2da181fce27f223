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
    pub(super) control_frame_floods: AtomicU64,
}

/// A point-in-time copy of [`ServerStats`]. Read-only: counters may be
/// added, so it cannot be built outside this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// TCP connections taken on (within the limits) since the start.
    pub connections_accepted: u64,
    /// Connections open now, handshaking included.
    pub connections_active: u64,
    /// Connections whose TLS or HTTP/2 handshake failed or timed out.
    pub handshake_failures: u64,
    /// Tunnels whose target was reached.
    pub tunnels_opened: u64,
    /// Tunnels open now.
    pub tunnels_active: u64,
    /// CONNECT requests answered with an error status (denied, bad
    /// request, unreachable target, a limit).
    pub refusals: u64,
    /// `forwarded`, `traceparent` or `baggage` values that were ignored.
    pub malformed_headers: u64,
    /// Connections closed and tunnels refused because a limit was reached
    /// (control-frame floods included).
    pub limit_refusals: u64,
    /// Connections closed with GOAWAY(ENHANCE_YOUR_CALM) for sending
    /// control frames faster than `Limits::max_control_frames` allows.
    pub control_frame_floods: u64,
}

impl ServerStats {
    /// Reads every counter; active counts are never negative.
    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Acquire);
        // Closes first: every close counted was preceded by its open, so
        // the opens read afterwards are at least as many. Read the other
        // way round, a connection that opened and closed between the two
        // reads would make the difference negative.
        let closed = load(&self.connections_closed);
        let accepted = load(&self.connections_accepted);
        let tunnels_closed = load(&self.tunnels_closed);
        let opened = load(&self.tunnels_opened);
        StatsSnapshot {
            connections_accepted: accepted,
            connections_active: accepted - closed,
            handshake_failures: load(&self.handshake_failures),
            tunnels_opened: opened,
            tunnels_active: opened - tunnels_closed,
            refusals: load(&self.refusals),
            malformed_headers: load(&self.malformed_headers),
            limit_refusals: load(&self.limit_refusals),
            control_frame_floods: load(&self.control_frame_floods),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Connections and tunnels opening and closing while another thread
    /// reads: a snapshot never counts more closed than opened (read in the
    /// other order, the subtraction underflows: a panic in this debug
    /// build, a huge gauge in a release one).
    #[test]
    fn snapshots_never_count_more_closed_than_opened() {
        let stats = Arc::new(ServerStats::default());
        let done = Arc::new(AtomicBool::new(false));
        let churn = {
            let (stats, done) = (stats.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..300_000 {
                    stats.connections_accepted.fetch_add(1, Ordering::AcqRel);
                    stats.tunnels_opened.fetch_add(1, Ordering::AcqRel);
                    stats.tunnels_closed.fetch_add(1, Ordering::AcqRel);
                    stats.connections_closed.fetch_add(1, Ordering::AcqRel);
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut snapshots = 0u64;
        while !done.load(Ordering::Acquire) {
            let snapshot = stats.snapshot();
            assert!(snapshot.connections_active <= snapshot.connections_accepted);
            assert!(snapshot.tunnels_active <= snapshot.tunnels_opened);
            snapshots += 1;
        }
        churn.join().unwrap();
        assert!(snapshots > 0);
        assert_eq!(stats.snapshot().connections_active, 0);
    }

    #[test]
    fn each_counter_lands_in_its_field() {
        let stats = ServerStats::default();
        for (counter, n) in [
            (&stats.connections_accepted, 10),
            (&stats.connections_closed, 3),
            (&stats.handshake_failures, 2),
            (&stats.tunnels_opened, 20),
            (&stats.tunnels_closed, 15),
            (&stats.refusals, 4),
            (&stats.malformed_headers, 5),
            (&stats.limit_refusals, 1),
            (&stats.control_frame_floods, 6),
        ] {
            counter.fetch_add(n, Ordering::AcqRel);
        }
        let snapshot = stats.snapshot();
        assert_eq!(
            (
                snapshot.connections_accepted,
                snapshot.connections_active,
                snapshot.handshake_failures
            ),
            (10, 7, 2)
        );
        assert_eq!((snapshot.tunnels_opened, snapshot.tunnels_active), (20, 5));
        assert_eq!(
            (
                snapshot.refusals,
                snapshot.malformed_headers,
                snapshot.limit_refusals
            ),
            (4, 5, 1)
        );
        assert_eq!(snapshot.control_frame_floods, 6);
    }

    #[test]
    fn count_on_drop_counts_once_on_every_exit() {
        let stats = ServerStats::default();
        let early_return = |fail: bool| -> Result<(), ()> {
            let _closed = CountOnDrop(&stats.connections_closed);
            if fail {
                return Err(());
            }
            Ok(())
        };
        stats.connections_accepted.fetch_add(2, Ordering::AcqRel);
        assert!(early_return(true).is_err());
        assert_eq!(stats.snapshot().connections_active, 1);
        assert!(early_return(false).is_ok());
        assert_eq!(stats.snapshot().connections_active, 0);
    }
}
