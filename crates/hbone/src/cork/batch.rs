//! Whether a turn's flush waits for the turns that other tunnels are
//! about to give the connection, so that their frames leave in one write.
//!
//! On tokio's work-stealing runtime a task that wakes another while it
//! runs puts it next in line (the worker's "LIFO slot"). Every tunnel
//! that queues a frame wakes its connection's task that way, so the
//! connection runs one turn, and sends one `writev`, per tunnel that just
//! ran, even when eight of them ran one after the other (measured: 4.5
//! `writev` per SOCKS5 tunnel there against 1.7 on the per-core runtime,
//! whose wake-ups queue behind what is ready). Deferring the flush to the
//! end of the worker's round (tokio's `yield_now`) lets the others' turns
//! write first, at the cost of a poll of the I/O driver and of a short
//! wait for the frame that went first. On one tunnel alone, request and
//! response, nothing joins and the deferral only costs: 12 syscalls per
//! request became 18. So the connection learns whether deferring pays:
//! it defers while deferred flushes carry the turns of other tunnels,
//! stops after those that carry only their own, and tries again now and
//! then.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// Turns one deferred flush waits for at most, its own included: past
/// this the flush goes out, so that a connection whose tunnels keep
/// writing still sends.
const MAX_JOINED: u32 = 8;
/// The average of the writes a deferred flush saved (the turns that
/// joined it), in sixteenths, at and above which turns defer: half a
/// write per deferral. A deferral costs about half a driver poll
/// (measured on SOCKS5 tunnels, eight at a time: 2.3 `writev` fewer per
/// tunnel for 1.1 `epoll_wait` more, 2.7 deferrals).
const DEFER_FROM: u32 = 8;
/// The average moves an eighth of the way to each new deferral's saving:
/// a few deferrals that saved nothing in a row, among many that did,
/// do not stop it.
const AVERAGE_OVER: u32 = 8;
/// While deferring is off, one turn in this many that writes tries it.
const PROBE_EVERY: u32 = 256;

/// What a turn does with what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Send it now.
    Now,
    /// Leave it for a later turn of the same round.
    Later,
}

/// One connection's record of whether deferred flushes pay. Only the
/// connection's task uses it (the atomics are for `Sync`).
#[derive(Debug, Default)]
pub(crate) struct Batching {
    /// Turns that wrote since the flush was first deferred; 0 when none is.
    joined: AtomicU32,
    /// The writes deferred flushes saved, on average, in sixteenths.
    saved: AtomicU32,
    /// Writing turns since deferring last was tried.
    since_probe: AtomicU32,
}

impl Batching {
    /// Decides for a turn that leaves bytes unsent. `wrote`: the turn
    /// wrote some of them itself (a turn woken to send a deferred flush
    /// writes nothing new); `may_defer`: nothing rules deferring out (the
    /// connection goes on, its writes fit the cork).
    pub(crate) fn after_turn(&self, wrote: bool, may_defer: bool) -> Flush {
        let joined = self.joined.load(Relaxed);
        if joined > 0 {
            if wrote && may_defer && joined < MAX_JOINED {
                self.joined.store(joined + 1, Relaxed);
                return Flush::Later;
            }
            let joined = joined + u32::from(wrote);
            let average = self.saved.load(Relaxed);
            let average = average - average / AVERAGE_OVER + (joined - 1) * 16 / AVERAGE_OVER;
            self.saved.store(average, Relaxed);
            self.joined.store(0, Relaxed);
            return Flush::Now;
        }
        if !wrote || !may_defer {
            return Flush::Now;
        }
        if self.saved.load(Relaxed) < DEFER_FROM {
            let since = self.since_probe.load(Relaxed) + 1;
            if since < PROBE_EVERY {
                self.since_probe.store(since, Relaxed);
                return Flush::Now;
            }
            // A fresh start: this deferral alone decides.
            self.since_probe.store(0, Relaxed);
            self.saved.store(DEFER_FROM, Relaxed);
        }
        self.joined.store(1, Relaxed);
        Flush::Later
    }

    /// Forgets a deferral whose bytes were sent some other way.
    pub(crate) fn sent(&self) {
        self.joined.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs writing turns until one defers; how many flushed first.
    fn turns_until_a_deferral(batching: &Batching) -> u32 {
        (0..10 * PROBE_EVERY)
            .position(|_| batching.after_turn(true, true) == Flush::Later)
            .expect("a deferral") as u32
    }

    #[test]
    fn a_lone_tunnel_sends_at_once_but_for_a_probe_now_and_then() {
        let batching = Batching::default();
        assert_eq!(turns_until_a_deferral(&batching), PROBE_EVERY - 1);
        // The round ends with nothing joined: the probe did not pay.
        assert_eq!(batching.after_turn(false, true), Flush::Now);
        assert_eq!(turns_until_a_deferral(&batching), PROBE_EVERY - 1);
    }

    /// Ends a deferral that `joined` writing turns joined, its own included.
    fn defer_joined_by(batching: &Batching, joined: u32) {
        for _ in 1..joined {
            assert_eq!(batching.after_turn(true, true), Flush::Later);
        }
        assert_eq!(batching.after_turn(false, true), Flush::Now);
    }

    #[test]
    fn deferring_goes_on_while_other_turns_join_and_stops_when_they_do_not() {
        let batching = Batching::default();
        turns_until_a_deferral(&batching);
        defer_joined_by(&batching, 2);
        // Paid: the next writing turn defers at once.
        for _ in 0..20 {
            assert_eq!(batching.after_turn(true, true), Flush::Later);
            defer_joined_by(&batching, 3);
        }
        // One that carries only its own turn does not stop it...
        assert_eq!(batching.after_turn(true, true), Flush::Later);
        defer_joined_by(&batching, 1);
        assert_eq!(batching.after_turn(true, true), Flush::Later);
        defer_joined_by(&batching, 1);
        // ...but a run of them does.
        let deferrals = (0..20)
            .take_while(|_| {
                let deferred = batching.after_turn(true, true) == Flush::Later;
                if deferred {
                    defer_joined_by(&batching, 1);
                }
                deferred
            })
            .count();
        assert!((1..20).contains(&deferrals), "{deferrals}");
        assert_eq!(turns_until_a_deferral(&batching), PROBE_EVERY - 2);
    }

    #[test]
    fn a_deferred_flush_leaves_after_at_most_max_joined_turns() {
        let batching = Batching::default();
        turns_until_a_deferral(&batching);
        for _ in 1..MAX_JOINED {
            assert_eq!(batching.after_turn(true, true), Flush::Later);
        }
        assert_eq!(batching.after_turn(true, true), Flush::Now);
    }

    #[test]
    fn a_turn_that_may_not_defer_sends_what_waits() {
        let batching = Batching::default();
        turns_until_a_deferral(&batching);
        assert_eq!(batching.after_turn(true, false), Flush::Now);
        assert_eq!(batching.after_turn(false, true), Flush::Now);
    }
}
