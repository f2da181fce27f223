//! How busy each worker has been of late, read from its runtime's own
//! count of the time it spent running tasks (Tokio's
//! `worker_total_busy_duration`, kept whether or not anyone reads it).
//! [`super::Workers::place_handshake`] reads it to tell a worker that
//! carries every new connection because they all arrive on its CPU from
//! one that merely has some. A worker counts as busy as the quieter of
//! its last two windows, so that one burst (or one stretch that another
//! process had the CPU for) moves nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::runtime::Handle;

/// The shortest window a share is measured over: long enough to hold a
/// few handshakes, short enough to follow a change of load.
const WINDOW: Duration = Duration::from_millis(10);

/// One worker's busy share over its last window. Resampled by whoever
/// asks once the window has passed; racing askers let one of them do it.
#[derive(Default)]
pub(super) struct BusyShare {
    /// When the last window ended, in ns on the caller's clock.
    at: AtomicU64,
    /// The runtime's busy time then, in ns.
    busy: AtomicU64,
    /// Busy share of the last window, in thousandths.
    last: AtomicU64,
    /// The lower of the last two windows' shares.
    permille: AtomicU64,
}

impl BusyShare {
    /// The share (thousandths, 0–1000) of each of the last two windows
    /// that `runtime` spent running tasks, whichever is lower; `now` is in
    /// ns on a clock every caller shares.
    pub(super) fn permille(&self, runtime: &Handle, now: u64) -> u64 {
        let at = self.at.load(Relaxed);
        let elapsed = now.saturating_sub(at);
        if elapsed >= WINDOW.as_nanos() as u64
            && self.at.compare_exchange(at, now, Relaxed, Relaxed).is_ok()
        {
            // A current-thread runtime has one worker, number 0. Its count
            // grows when the worker stops to poll for I/O, at least every
            // few dozen tasks.
            let busy = runtime.metrics().worker_total_busy_duration(0).as_nanos() as u64;
            let before = self.busy.swap(busy, Relaxed);
            let share =
                (busy.saturating_sub(before).saturating_mul(1000) / elapsed.max(1)).min(1000);
            let previous = self.last.swap(share, Relaxed);
            self.permille.store(share.min(previous), Relaxed);
        }
        self.permille.load(Relaxed)
    }
}
