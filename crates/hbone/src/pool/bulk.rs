//! Which pooled connections carry bulk transfers right now, so that a new
//! tunnel can be kept off them.
//!
//! Every tunnel on a connection waits behind the bytes the others have in
//! flight: a request opened on a connection that carries a backup waits
//! for the backup's queued data, however small the flow-control windows
//! keep that queue. A tunnel opened while every connection to its peer
//! carries bulk therefore gets a connection of its own (up to
//! [`SEPARATE_UP_TO`] per peer), and a request beside a bulk transfer then
//! shares only the CPU with it. Tunnels already on a connection stay there
//! (an HTTP/2 stream cannot move); the window sizing keeps their queue
//! short (`crate::window`).
//!
//! A stream is bulk while it moves at least [`BULK_BYTES`] within one
//! [`SPAN`], either way (128 Mbit/s): far above what an interactive tunnel
//! sends, and met by any transfer that is limited by the path or a CPU
//! rather than by its application. A connection carries bulk while one of
//! its open streams has been bulk within the last [`MEMORY`]: a transfer
//! that pauses for a moment does not free the connection for interactive
//! tunnels, while one that ended or went quiet does.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

// The runtime's clock, so that tests can move it.
use tokio::time::Instant;

/// Bytes a stream moves within one [`SPAN`] to count as bulk.
pub(crate) const BULK_BYTES: u64 = 4 << 20;
/// The span over which a stream's bytes are counted.
pub(crate) const SPAN: Duration = Duration::from_millis(250);
/// How long a connection counts as carrying bulk after its last bulk span.
pub(crate) const MEMORY: Duration = Duration::from_secs(1);
/// Connections per peer (pool key) up to which a new tunnel gets a
/// connection of its own rather than join one that carries bulk. Past it,
/// a new tunnel takes the first connection with room, as it would if none
/// carried bulk: the connections to one peer stay few.
pub(crate) const SEPARATE_UP_TO: usize = 4;

/// A connection's memory of its bulk streams.
#[derive(Debug)]
pub(crate) struct BulkMark {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last bulk span, plus one; zero
    /// while none has been seen.
    last_ms: AtomicU64,
    /// Open streams that have been bulk at some point.
    streams: AtomicUsize,
}

impl Default for BulkMark {
    fn default() -> Self {
        BulkMark {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
        }
    }
}

impl BulkMark {
    fn mark(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether one of the connection's open streams moved bulk within
    /// [`MEMORY`].
    pub(crate) fn carries_bulk(&self) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 || self.streams.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
            + 1;
        now.saturating_sub(last) < MEMORY.as_millis() as u64
    }
}

/// One stream's count of bytes in its current [`SPAN`]; call
/// [`BulkSpan::end`] when the stream ends.
#[derive(Debug)]
pub(crate) struct BulkSpan {
    start: Instant,
    bytes: u64,
    /// The span before the current one was bulk and ended as this one
    /// began: the stream still moves bulk, whatever this span has so far.
    follows_bulk: bool,
    /// A span has ended: the stream had a span's time to show bulk.
    seasoned: bool,
    /// Counted in its connection's [`BulkMark`] streams.
    counted: bool,
}

impl Default for BulkSpan {
    fn default() -> Self {
        BulkSpan {
            start: Instant::now(),
            bytes: 0,
            follows_bulk: false,
            seasoned: false,
            counted: false,
        }
    }
}

/// What a stream's bytes say of it, after [`BulkSpan::moved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Its current span reached [`BULK_BYTES`], or the one just before it
    /// did.
    Bulk,
    /// Still in its first span, short of [`BULK_BYTES`]: it may be either.
    Starting,
    /// It had a span's time and moves less than bulk: small messages, or
    /// a slow transfer.
    Trickle,
}

impl BulkSpan {
    /// The stream moved `bytes`, either way: marks `connection` (when the
    /// dialer tracks it) when that makes this span bulk, and returns the
    /// stream's [`Pace`]. A stream that went quiet for a span or more, or
    /// moved less in the last one, no longer moves bulk.
    pub(crate) fn moved(&mut self, bytes: usize, connection: Option<&BulkMark>) -> Pace {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= SPAN {
            self.follows_bulk = self.bytes >= BULK_BYTES && elapsed < 2 * SPAN;
            self.seasoned = true;
            self.start = now;
            self.bytes = 0;
        }
        self.bytes += bytes as u64;
        let bulk_span = self.bytes >= BULK_BYTES;
        if let (true, Some(connection)) = (bulk_span, connection) {
            if !self.counted {
                self.counted = true;
                connection.streams.fetch_add(1, Ordering::Relaxed);
            }
            connection.mark(now);
        }
        if bulk_span || self.follows_bulk {
            Pace::Bulk
        } else if self.seasoned {
            Pace::Trickle
        } else {
            Pace::Starting
        }
    }

    /// The stream ended: it no longer makes its connection carry bulk.
    pub(crate) fn end(&mut self, connection: &BulkMark) {
        if std::mem::take(&mut self.counted) {
            connection.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_moves_the_bulk_bytes_within_a_span_marks_its_connection() {
        let mark = BulkMark::default();
        let mut span = BulkSpan::default();
        span.moved((BULK_BYTES - 1) as usize, Some(&mark));
        assert!(!mark.carries_bulk(), "one byte short");
        span.moved(1, Some(&mark));
        assert!(mark.carries_bulk());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_moves_bulk_until_a_span_without_it() {
        let mut span = BulkSpan::default();
        assert_eq!(span.moved((BULK_BYTES - 1) as usize, None), Pace::Starting);
        assert_eq!(
            span.moved(1, None),
            Pace::Bulk,
            "the span reached the bulk bytes"
        );
        tokio::time::advance(SPAN).await;
        assert_eq!(span.moved(1, None), Pace::Bulk, "the span after a bulk one");
        tokio::time::advance(SPAN).await;
        assert_eq!(
            span.moved(1, None),
            Pace::Trickle,
            "after a span that moved little"
        );
        assert_eq!(span.moved(BULK_BYTES as usize, None), Pace::Bulk);
        tokio::time::advance(2 * SPAN).await;
        assert_eq!(span.moved(1, None), Pace::Trickle, "after a quiet span");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_spread_over_spans_are_not_bulk() {
        let mark = BulkMark::default();
        let mut span = BulkSpan::default();
        for _ in 0..8 {
            span.moved((BULK_BYTES / 2) as usize, Some(&mark));
            tokio::time::advance(SPAN).await;
        }
        assert!(!mark.carries_bulk(), "half the bytes in each span");
    }

    #[tokio::test(start_paused = true)]
    async fn the_mark_lasts_its_memory_after_the_last_bulk_span() {
        let mark = BulkMark::default();
        let mut span = BulkSpan::default();
        span.moved(BULK_BYTES as usize, Some(&mark));
        tokio::time::advance(MEMORY - Duration::from_millis(10)).await;
        assert!(mark.carries_bulk(), "within its memory");
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!mark.carries_bulk(), "past its memory");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_stream_that_ended_leaves_no_mark() {
        let mark = BulkMark::default();
        let (mut ended, mut open) = (BulkSpan::default(), BulkSpan::default());
        ended.moved(BULK_BYTES as usize, Some(&mark));
        open.moved(BULK_BYTES as usize, Some(&mark));
        ended.end(&mark);
        assert!(mark.carries_bulk(), "one is still open");
        open.end(&mark);
        assert!(!mark.carries_bulk(), "both ended");
        open.end(&mark);
        assert_eq!(mark.streams.load(Ordering::Relaxed), 0, "ended once");
    }
}
