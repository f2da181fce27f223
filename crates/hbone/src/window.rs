//! Flow-control windows sized to what the connection carries, not to the
//! worst case.
//!
//! Every tunnel between two nodes shares one HTTP/2 connection, and the
//! bytes in flight on it form one queue: a small request waits behind all
//! the bulk data sent before it, and the connection's window bounds that
//! data. Windows big enough for a long, fast path (16 MiB) let one bulk
//! tunnel queue tens of milliseconds of data on a CPU-bound node, ahead of
//! every interactive tunnel sharing the connection.
//!
//! So the receiving side starts small (64 KiB per stream, four times that
//! for the connection) and grows its windows only where they are what
//! limits: while data flows, it sends a PING and counts the bytes that
//! came in during its round trip. A peer held back by the window sends a
//! window's worth per round trip and then waits, and its round trip stays
//! at the path's minimum: no queue formed. After [`GROWTH_STREAK`] such
//! round trips in a row the windows double. A node that is itself the
//! bottleneck (a busy CPU) has a queue in front of it, which stretches
//! the round trip well past the minimum: after [`SHRINK_STREAK`] such
//! round trips in a row the stream window halves (never below the
//! first), since more window would only lengthen the queue that every
//! tunnel waits in.
//!
//! Unless every tunnel on the connection moves bulk and no tunnel in the
//! process has trickled (moved less than bulk) within the last second
//! ([`Sharing::BulkOnly`]): then no request waits in any queue here, only
//! data that waits to be copied anyway, and larger windows carry it in
//! larger frames, fewer syscalls per byte. The windows then grow on
//! filled round trips, queue or not, and do not shrink. The whole process
//! counts, not the connection: a request on another connection waits for
//! the same CPUs (measured: with only the connection counted, a request
//! beside four bulk streams on their own connection waited ten times as
//! long). Once a tunnel trickles, a window grown that way halves on every
//! round trip behind a queue until there is none.
//!
//! Rates are not measured: the bytes are counted as tunnels consume them,
//! which on a busy node comes in bursts from h2's buffers, so a rate from
//! them would be a fiction. A lower stream window is safe: the peer
//! applies it before it acknowledges the SETTINGS, and until then data
//! counts against the old one (RFC 9113 §6.9.2). The connection's window
//! never shrinks: what stalled streams hold of it would stop the others.
//! The same PINGs keep the connection alive ([`Keepalive`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use h2::{FlowControl, Ping, PingPong};
use tokio::sync::{Notify, watch};

use crate::config::H2Settings;
use crate::keepalive::Keepalive;
use crate::pool::{BulkMark, BulkSpan, Pace};

/// The smallest stream window granted: the protocol's default.
pub(crate) const MIN_STREAM_WINDOW: u32 = 65_535;
/// Most window the streams of one connection hold back between them
/// ([`crate::stream::H2Stream::release_later`]): a sixteenth of the
/// smallest connection window, so that tunnels that went quiet holding
/// some never stop the connection's others.
pub(crate) const HELD_WINDOW_PER_CONNECTION: usize = MIN_STREAM_WINDOW as usize / 4;
/// A connection's window is this many stream windows, so that a stream
/// whose reader stalls (holding a full window) cannot stop the others.
pub(crate) const STREAMS_PER_CONNECTION_WINDOW: u32 = 4;
/// The shortest time between two measuring PINGs while the window grows
/// or is filled; each costs a frame each way.
const GROWING_INTERVAL: Duration = Duration::from_millis(20);
/// The same while the peer sends less than the window allows.
const STEADY_INTERVAL: Duration = Duration::from_millis(250);
/// Filled, queue-free round trips in a row before the windows double: one
/// could be a busy node's queue that happened to be empty.
pub(crate) const GROWTH_STREAK: u32 = 3;
/// Filled round trips behind a queue in a row before the stream window
/// halves: the node cannot take what the window lets in, and the surplus
/// only waits, ahead of every other tunnel.
pub(crate) const SHRINK_STREAK: u32 = 5;
/// A round trip up to this many times the shortest seen still counts as
/// one without a queue...
const QUEUE_FREE_RTT: f64 = 1.5;
/// ...and so does one up to this much longer than the shortest, while the
/// connection carries a single tunnel: on a short path, wake-ups and
/// context switches move a round trip by more than its own length. A
/// queue then delays only that tunnel's own data, so the sizing lets it
/// stand this long rather than shrink windows a busy node's jitter would
/// shrink too (each halving costs a bulk tunnel syscalls per byte).
const QUEUE_FREE_SLACK_ALONE: Duration = Duration::from_micros(500);
/// The same while several tunnels share the connection: then the queue is
/// the wait of every other tunnel's next request behind one tunnel's bulk
/// data, and this is the queueing delay the sizing aims to stay under.
/// It trades the request's latency against the bulk streams' throughput,
/// point for point. Measured with `hbone bench --only isolation` (one
/// process on 2 CPUs, the request beside 4 bulk streams on their own
/// connection): 150 µs gives the request a p50 of about 250 µs and a p99
/// of about 2 ms, bulk keeping 82-84 % of its throughput alone; 300 µs
/// gives 450 µs, 3.6-5.2 ms and 87-88 %; 600 µs gives 0.6-0.8 ms, 5-9 ms
/// and 93 %. The shorter slack sides with the request.
const QUEUE_FREE_SLACK_SHARED: Duration = Duration::from_micros(150);

/// The windows granted to the peer: per stream, and for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Windows {
    /// None granted: a placeholder where sizing is off.
    pub(crate) const ZERO: Windows = Windows {
        stream: 0,
        connection: 0,
    };

    fn for_stream(stream: u32) -> Windows {
        Windows {
            stream,
            connection: stream.saturating_mul(STREAMS_PER_CONNECTION_WINDOW),
        }
    }

    /// What a connection starts with: the smallest windows, or the fixed
    /// ones when `settings` turns the sizing off.
    pub(crate) fn initial(settings: &H2Settings) -> Windows {
        if settings.adaptive_windows {
            Windows::for_stream(MIN_STREAM_WINDOW.min(settings.stream_window))
        } else {
            Windows {
                stream: settings.stream_window,
                connection: settings.connection_window,
            }
        }
    }
}

/// Whom a queue on a connection would delay, as far as its window sizing
/// is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// One tunnel, not [`Sharing::BulkOnly`]: a queue on the connection
    /// delays only its own data.
    Alone,
    /// Several tunnels, not [`Sharing::BulkOnly`]: a queue delays a
    /// request behind the others' data.
    Shared,
    /// Every open tunnel moves bulk ([`crate::pool::BULK_BYTES`] within a
    /// span) and none in the process trickled lately ([`Activity`]): a
    /// queue holds only data that waits to be copied anyway, and larger
    /// windows carry it in fewer, larger frames.
    BulkOnly,
}

/// The bandwidth-delay product of a connection, from PING round trips and
/// the bytes received during each.
#[derive(Debug)]
pub(crate) struct Estimator {
    min_rtt: Option<Duration>,
    /// Filled, queue-free round trips in a row.
    streak: u32,
    /// Filled round trips behind a queue in a row.
    queued: u32,
    windows: Windows,
    /// The largest stream window granted.
    ceiling: u32,
    /// The last round trip carried at least half a stream window.
    filled: bool,
    /// The stream window grew while only bulk moved, without looking for
    /// a queue: once that ends, it halves on every round trip that shows
    /// a queue until one does not.
    grown_for_bulk: bool,
}

impl Estimator {
    pub(crate) fn new(initial: Windows, ceiling: u32) -> Self {
        Estimator {
            min_rtt: None,
            streak: 0,
            queued: 0,
            windows: initial,
            ceiling: ceiling.max(initial.stream),
            filled: false,
            grown_for_bulk: false,
        }
    }

    pub(crate) fn windows(&self) -> Windows {
        self.windows
    }

    /// Whether the last round trip carried at least half a stream window:
    /// the window may be what limits, and is worth measuring again soon.
    pub(crate) fn filled(&self) -> bool {
        self.filled
    }

    /// Takes one round trip and the bytes received for it; returns the
    /// new windows when they change. `woke` is the burst that started the
    /// measurement (received before the PING went out), `during` what
    /// arrived until its answer. A round trip counts towards growth when
    /// they add up to at least half a stream window (h2 returns window in
    /// halves, so a peer held back by it may show no more) and it took at
    /// most [`QUEUE_FREE_RTT`] times the shortest seen, or the slack more
    /// ([`QUEUE_FREE_SLACK_SHARED`] when the connection is
    /// [`Sharing::Shared`], [`QUEUE_FREE_SLACK_ALONE`] when it carries one
    /// tunnel). While only bulk moves ([`Sharing::BulkOnly`]) a filled
    /// round trip counts towards growth, queue or not, and the windows do
    /// not shrink; once that ends, a stream window grown that way halves
    /// on every round trip behind a queue, without waiting for a streak.
    pub(crate) fn sample(
        &mut self,
        rtt: Duration,
        woke: u64,
        during: u64,
        sharing: Sharing,
    ) -> Option<Windows> {
        if rtt.is_zero() {
            return None;
        }
        let min_rtt = *self
            .min_rtt
            .insert(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        let stream = self.windows.stream;
        self.filled = woke + during >= u64::from(stream / 2);
        let slack = match sharing {
            Sharing::Alone => QUEUE_FREE_SLACK_ALONE,
            Sharing::Shared => QUEUE_FREE_SLACK_SHARED,
            Sharing::BulkOnly => Duration::MAX,
        };
        let unqueued = rtt
            <= min_rtt
                .mul_f64(QUEUE_FREE_RTT)
                .max(min_rtt.saturating_add(slack));
        if sharing != Sharing::BulkOnly && self.grown_for_bulk {
            (self.streak, self.queued) = (0, 0);
            if stream <= MIN_STREAM_WINDOW || (unqueued && self.filled) {
                self.grown_for_bulk = false;
            }
            if unqueued || !self.grown_for_bulk {
                return None;
            }
            return Some(self.set_stream((stream / 2).max(MIN_STREAM_WINDOW)));
        }
        if !self.filled {
            (self.streak, self.queued) = (0, 0);
            return None;
        }
        if !unqueued {
            self.streak = 0;
            self.queued += 1;
            if self.queued < SHRINK_STREAK || stream <= MIN_STREAM_WINDOW {
                return None;
            }
            self.queued = 0;
            // Half, never more, per round trip: h2 returns window once the
            // peer holds less than two thirds of it, so after a halving the
            // peer still holds some and keeps sending. A larger cut can
            // leave it none while this side has consumed everything and so
            // has no reason to return any: the stream stalls for good (a
            // cut straight to the first window stalled bulk streams here).
            // Cuts in a row are safe only because each is followed by
            // `Probe::return_owed_window`.
            return Some(self.set_stream((stream / 2).max(MIN_STREAM_WINDOW)));
        }
        self.queued = 0;
        self.streak += 1;
        if self.streak < GROWTH_STREAK || stream >= self.ceiling {
            return None;
        }
        self.streak = 0;
        self.grown_for_bulk |= sharing == Sharing::BulkOnly;
        Some(self.set_stream(stream.saturating_mul(2).min(self.ceiling)))
    }

    /// A new stream window; the connection's follows it up, never down:
    /// what a stalled stream holds of it would stop the others.
    fn set_stream(&mut self, stream: u32) -> Windows {
        let connection = stream.saturating_mul(STREAMS_PER_CONNECTION_WINDOW);
        self.windows = Windows {
            stream,
            connection: connection.max(self.windows.connection),
        };
        self.windows
    }
}

/// What the tunnels of a connection tell its window sizing: how many bytes
/// arrived. Shared by the connection's streams; a relaxed add per DATA
/// frame, and a wake-up only when a measurement waits for data.
#[derive(Debug)]
pub(crate) struct Probe {
    received: AtomicU64,
    waiting: AtomicBool,
    data: Notify,
    /// Streams of the connection that report here ([`StreamProbe`]s).
    streams: AtomicUsize,
    /// Those of them that move bulk now, for the sizing.
    bulk_streams: AtomicUsize,
    /// Their receive windows, to return what a cut left owed
    /// ([`Probe::return_owed_window`]), by [`StreamProbe`] number.
    flows: Mutex<Vec<(u64, FlowControl)>>,
    next_flow: AtomicU64,
    /// Whether one of them moves bulk now, for the pool's choice of
    /// connection for a new tunnel: kept only on pooled connections
    /// ([`Probe::for_pool`]), so a server's streams do not count it.
    pub(crate) bulk: Option<BulkMark>,
    /// When a tunnel that trickles last moved data, anywhere in the process.
    activity: Arc<Activity>,
    /// Window its streams hold back now ([`Probe::hold_window`]).
    held_window: AtomicUsize,
}

impl Default for Probe {
    fn default() -> Self {
        Probe::with_activity(Activity::process())
    }
}

/// When a tunnel that moves less than bulk (requests, a terminal) last
/// moved data. One for the whole process: its tunnels share its CPUs, and
/// data that waits on any connection there is work that the next small
/// request waits behind.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: std::time::Instant,
    /// Milliseconds after `epoch` of the last such data, plus one; zero
    /// while there was none.
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// The process's own.
    fn process() -> Arc<Activity> {
        static PROCESS: std::sync::OnceLock<Arc<Activity>> = std::sync::OnceLock::new();
        PROCESS.get_or_init(Arc::default).clone()
    }

    fn ms(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// A tunnel that trickles moved data at `at`.
    fn trickled(&self, at: std::time::Instant) {
        let ms = self.ms(at);
        if self.last_ms.load(Ordering::Relaxed) < ms {
            self.last_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// Whether one did within [`crate::pool::MEMORY`] before `at`.
    fn recent(&self, at: std::time::Instant) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        last != 0 && self.ms(at).saturating_sub(last) < crate::pool::MEMORY.as_millis() as u64
    }
}

/// One stream's handle on its connection's [`Probe`]: counted while it
/// lives, so the sizing knows whether a queue delays other tunnels.
#[derive(Debug)]
pub(crate) struct StreamProbe {
    probe: Arc<Probe>,
    span: BulkSpan,
    /// Counted in the probe's `bulk_streams`.
    moves_bulk: bool,
    /// Moved bytes, and whether ever at a bulk pace: a tunnel too
    /// short-lived to trickle for a span still tells the process's
    /// [`Activity`] when it ends.
    moved: bool,
    ever_bulk: bool,
    /// Its number among the probe's `flows`, where it registered one.
    flow: Option<u64>,
}

impl StreamProbe {
    /// The connection's probe.
    pub(crate) fn probe(&self) -> &Probe {
        &self.probe
    }

    /// Counts a stream on `probe`; `flow`, its receive window, lets the
    /// sizing return window that a cut left owed.
    pub(crate) fn new(probe: Arc<Probe>, flow: Option<FlowControl>) -> Self {
        probe.streams.fetch_add(1, Ordering::Relaxed);
        let flow = flow.map(|flow| {
            let number = probe.next_flow.fetch_add(1, Ordering::Relaxed);
            lock(&probe.flows).push((number, flow));
            number
        });
        StreamProbe {
            probe,
            span: BulkSpan::default(),
            moves_bulk: false,
            moved: false,
            ever_bulk: false,
            flow,
        }
    }

    /// `bytes` of DATA arrived on this stream.
    pub(crate) fn record(&mut self, bytes: usize) {
        self.probe.record(bytes);
        self.sent(bytes);
    }

    /// `bytes` of DATA were handed to h2 to send on this stream (and, from
    /// [`StreamProbe::record`], received: bulk counts both ways).
    pub(crate) fn sent(&mut self, bytes: usize) {
        let pace = self.span.moved(bytes, self.probe.bulk.as_ref());
        if pace == Pace::Trickle {
            self.probe.activity.trickled(std::time::Instant::now());
        }
        let moves_bulk = pace == Pace::Bulk;
        self.moved |= bytes > 0;
        self.ever_bulk |= moves_bulk;
        if moves_bulk != self.moves_bulk {
            self.moves_bulk = moves_bulk;
            if moves_bulk {
                self.probe.bulk_streams.fetch_add(1, Ordering::Relaxed);
            } else {
                self.probe.bulk_streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for StreamProbe {
    fn drop(&mut self) {
        // Bulk first: never more bulk streams than open ones.
        if self.moves_bulk {
            self.probe.bulk_streams.fetch_sub(1, Ordering::Relaxed);
        }
        self.probe.streams.fetch_sub(1, Ordering::Relaxed);
        if self.moved && !self.ever_bulk {
            self.probe.activity.trickled(std::time::Instant::now());
        }
        if let Some(number) = self.flow {
            let mut flows = lock(&self.probe.flows);
            if let Some(at) = flows.iter().position(|(n, _)| *n == number) {
                flows.swap_remove(at);
            }
        }
        if let Some(mark) = &self.probe.bulk {
            self.span.end(mark);
        }
    }
}

/// The lock's contents, even after a panic elsewhere left it poisoned
/// (a list of handles stays consistent between pushes and removals).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Probe {
    /// The probe of a pooled connection, which also tells the pool whether
    /// the connection carries bulk.
    pub(crate) fn for_pool() -> Self {
        Probe {
            bulk: Some(BulkMark::default()),
            ..Probe::default()
        }
    }

    /// Has h2 send the window updates that a cut of the stream window
    /// made due: h2 decides on them only when data is released, so a
    /// stream that had consumed everything before the cut would otherwise
    /// owe its peer window for good, however many cuts followed. Call once
    /// the peer has acknowledged the cut.
    fn return_owed_window(&self) {
        for (_, flow) in lock(&self.flows).iter_mut() {
            // Nothing to release: an error only means the stream ended.
            let _ = flow.release_capacity(0);
        }
    }

    /// A probe whose tunnels report trickles to `activity`.
    fn with_activity(activity: Arc<Activity>) -> Self {
        Probe {
            received: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            data: Notify::new(),
            streams: AtomicUsize::new(0),
            bulk_streams: AtomicUsize::new(0),
            flows: Mutex::new(Vec::new()),
            next_flow: AtomicU64::new(0),
            bulk: None,
            activity,
            held_window: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` of the connection's budget for held-back window
    /// ([`HELD_WINDOW_PER_CONNECTION`]), if that much is left.
    pub(crate) fn hold_window(&self, bytes: usize) -> bool {
        self.held_window
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                let total = held + bytes;
                (total <= HELD_WINDOW_PER_CONNECTION).then_some(total)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken by [`Probe::hold_window`].
    pub(crate) fn unhold_window(&self, bytes: usize) {
        self.held_window.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Window held back now.
    #[cfg(test)]
    pub(crate) fn held_window(&self) -> usize {
        self.held_window.load(Ordering::Relaxed)
    }

    /// Whether one of the connection's open streams moves bulk now
    /// (never, on a probe that does not track it).
    pub(crate) fn carries_bulk(&self) -> bool {
        self.bulk.as_ref().is_some_and(BulkMark::carries_bulk)
    }

    /// Whom a queue on the connection would delay.
    fn sharing(&self) -> Sharing {
        let open = self.streams.load(Ordering::Relaxed);
        let bulk = self.bulk_streams.load(Ordering::Relaxed);
        if open > 0 && bulk >= open && !self.activity.recent(std::time::Instant::now()) {
            Sharing::BulkOnly
        } else if open > 1 {
            Sharing::Shared
        } else {
            Sharing::Alone
        }
    }

    /// `bytes` of DATA arrived on one of the connection's streams.
    pub(crate) fn record(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::AcqRel) {
            self.data.notify_one();
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Returns once data arrives after this call, with the count of bytes
    /// received before it: a measurement counts the data that woke it
    /// (a peer held back by the window sends in bursts, one per round
    /// trip, and the burst that wakes it is the one to count).
    async fn data_arrives(&self) -> u64 {
        let notified = self.data.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let before = self.received();
        self.waiting.store(true, Ordering::Release);
        notified.await;
        before
    }
}

/// What a connection's PINGs are for: keepalive always, window sizing
/// when its settings ask for it.
#[derive(Debug)]
pub(crate) struct PingPlan {
    pub keepalive: Keepalive,
    pub sizing: Option<Estimator>,
}

impl PingPlan {
    pub(crate) fn new(keepalive: Keepalive, settings: &H2Settings) -> Self {
        PingPlan {
            keepalive,
            sizing: settings
                .adaptive_windows
                .then(|| Estimator::new(Windows::initial(settings), settings.stream_window)),
        }
    }
}

/// PINGs the peer: to measure while data flows (when `plan` sizes
/// windows) and to notice a silent peer ([`Keepalive`]). New windows go
/// to `windows`, for the connection's driver to apply. Returns why the
/// connection should end, as [`Keepalive::watch`] does.
pub(crate) async fn ping(
    ping_pong: Option<PingPong>,
    plan: PingPlan,
    probe: Arc<Probe>,
    windows: watch::Sender<Windows>,
) -> String {
    let keepalive = plan.keepalive;
    let Some(mut estimator) = plan.sizing else {
        return keepalive.watch(ping_pong).await;
    };
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    let mut last_ping = Instant::now();
    let mut pause = Duration::ZERO;
    // A cut was sent: the next PING goes out without waiting for data, so
    // that its answer (after the peer's acknowledgement) returns the
    // window the cut left owed.
    let mut cut = false;
    loop {
        let measure = if std::mem::take(&mut cut) {
            tokio::time::sleep(pause).await;
            None
        } else {
            tokio::select! {
                before = async {
                    tokio::time::sleep(pause).await;
                    probe.data_arrives().await
                } => Some(before),
                () = tokio::time::sleep_until((last_ping + keepalive.interval).into()) => None,
            }
        };
        let sent = Instant::now();
        let at_ping = probe.received();
        last_ping = sent;
        match tokio::time::timeout(keepalive.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("no answer to PING within {:?}", keepalive.timeout),
        }
        // After every answer, not only the first after a cut: h2 may have
        // sent the cut after this PING, when its driver was busy.
        probe.return_owed_window();
        let Some(before) = measure else {
            continue;
        };
        let (rtt, woke, during) = (sent.elapsed(), at_ping - before, probe.received() - at_ping);
        let before_sample = estimator.windows().stream;
        let grown = estimator.sample(rtt, woke, during, probe.sharing());
        tracing::trace!(
            ?rtt,
            woke,
            during,
            window = estimator.windows().stream,
            "flow-control window measured"
        );
        pause = match grown {
            Some(new) => {
                tracing::trace!(
                    stream = new.stream,
                    connection = new.connection,
                    "flow-control windows change"
                );
                windows.send_replace(new);
                cut = new.stream < before_sample;
                GROWING_INTERVAL
            }
            None if estimator.filled() => GROWING_INTERVAL,
            None => STEADY_INTERVAL,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn estimator() -> Estimator {
        Estimator::new(Windows::for_stream(MIN_STREAM_WINDOW), 4 << 20)
    }

    /// Feeds `n` identical round trips; returns the last answer.
    fn feed(e: &mut Estimator, n: u32, rtt: Duration, woke: u64, during: u64) -> Option<Windows> {
        (0..n)
            .map(|_| e.sample(rtt, woke, during, Sharing::Alone))
            .last()
            .flatten()
    }

    /// The same, for a connection shared as `sharing` says.
    fn feed_as(
        e: &mut Estimator,
        n: u32,
        rtt: Duration,
        woke: u64,
        sharing: Sharing,
    ) -> Option<Windows> {
        (0..n)
            .map(|_| e.sample(rtt, woke, 0, sharing))
            .last()
            .flatten()
    }

    #[test]
    fn a_window_the_peer_fills_without_a_queue_doubles() {
        let mut e = estimator();
        // A long path: the burst that woke the measurement, half a window
        // (h2 gives window back in halves), then nothing until it returns.
        let mut stream = MIN_STREAM_WINDOW;
        for _ in 0..4 {
            let rtt = Duration::from_millis(20);
            assert_eq!(
                feed(&mut e, GROWTH_STREAK - 1, rtt, u64::from(stream / 2), 0),
                None
            );
            let grown = e
                .sample(rtt, u64::from(stream / 2), 0, Sharing::Alone)
                .expect("doubled");
            assert_eq!(grown.stream, 2 * stream);
            assert_eq!(
                grown.connection,
                STREAMS_PER_CONNECTION_WINDOW * grown.stream
            );
            stream = grown.stream;
        }
        assert_eq!(stream, 16 * MIN_STREAM_WINDOW);
        // The round trip grows: a queue formed, the path is full.
        let queued = Duration::from_millis(40);
        assert_eq!(
            feed(&mut e, SHRINK_STREAK - 1, queued, u64::from(stream), 0),
            None
        );
    }

    #[test]
    fn a_busy_node_with_a_queue_keeps_its_window() {
        let mut e = estimator();
        e.sample(Duration::from_micros(100), 0, 1_000, Sharing::Alone);
        // Megabytes consumed per round trip, but behind a queue that
        // stretches it ten times and more.
        for queued in [10, 20, 40] {
            let rtt = Duration::from_micros(100 * queued);
            assert_eq!(
                feed(&mut e, 20, rtt, 1 << 20, 1 << 20),
                None,
                "queue ×{queued}"
            );
        }
        // An empty queue now and then is not a streak.
        for _ in 0..20 {
            assert_eq!(
                e.sample(Duration::from_micros(110), 1 << 20, 0, Sharing::Alone),
                None
            );
            assert_eq!(
                e.sample(Duration::from_millis(2), 1 << 20, 0, Sharing::Alone),
                None
            );
        }
        assert_eq!(e.windows().stream, MIN_STREAM_WINDOW);
    }

    #[test]
    fn on_a_short_path_jitter_under_the_slack_is_no_queue() {
        let mut e = estimator();
        e.sample(Duration::from_micros(40), 0, 100, Sharing::Alone);
        // Six times the shortest round trip, but within the slack.
        let rtt = Duration::from_micros(240);
        let grown = feed(&mut e, GROWTH_STREAK, rtt, 65_535, 0).expect("doubled");
        assert_eq!(grown.stream, 2 * MIN_STREAM_WINDOW);
        // Past the slack: a queue.
        assert_eq!(
            feed(&mut e, 10, Duration::from_micros(700), 1 << 20, 0),
            None
        );
    }

    #[test]
    fn a_window_filled_behind_a_queue_halves_back_to_the_first() {
        let mut e = estimator();
        let short = Duration::from_millis(1);
        feed(&mut e, 3 * GROWTH_STREAK, short, 1 << 20, 0).unwrap();
        assert_eq!(e.windows().stream, 8 * MIN_STREAM_WINDOW);
        let peak = e.windows().connection;
        // Behind a queue: ten times the round trip.
        let long = Duration::from_millis(10);
        assert_eq!(feed(&mut e, SHRINK_STREAK - 1, long, 1 << 20, 0), None);
        let halved = e.sample(long, 1 << 20, 0, Sharing::Alone).expect("halved");
        assert_eq!(halved.stream, 4 * MIN_STREAM_WINDOW);
        assert_eq!(halved.connection, peak, "the connection's window stays");
        feed(&mut e, 4 * SHRINK_STREAK, long, 1 << 20, 0);
        assert_eq!(
            e.windows().stream,
            MIN_STREAM_WINDOW,
            "never below the first"
        );
        assert_eq!(feed(&mut e, 4 * SHRINK_STREAK, long, 1 << 20, 0), None);
    }

    #[test]
    fn a_queue_that_one_tunnel_may_keep_shrinks_a_shared_window() {
        let short = Duration::from_micros(50);
        // 300 µs over the shortest: within the slack of a connection that
        // carries one tunnel, a queue where others wait behind it.
        let queued = Duration::from_micros(350);
        let mut alone = estimator();
        alone.sample(short, 0, 100, Sharing::Alone);
        feed(&mut alone, GROWTH_STREAK, short, 1 << 20, 0).expect("doubled");
        let grown = feed(&mut alone, GROWTH_STREAK, queued, 1 << 20, 0).expect("no queue");
        assert_eq!(grown.stream, 4 * MIN_STREAM_WINDOW);

        let mut shared = estimator();
        shared.sample(short, 0, 100, Sharing::Shared);
        feed(&mut shared, GROWTH_STREAK, short, 1 << 20, 0).expect("doubled");
        let halved =
            feed_as(&mut shared, SHRINK_STREAK, queued, 1 << 20, Sharing::Shared).expect("halved");
        assert_eq!(halved.stream, MIN_STREAM_WINDOW);
    }

    #[test]
    fn while_only_bulk_moves_windows_grow_behind_a_queue_and_stay() {
        let short = Duration::from_micros(100);
        let queued = Duration::from_millis(5);
        let mut bulk = estimator();
        bulk.sample(short, 0, 100, Sharing::BulkOnly);
        // Filled round trips fifty times the shortest: a busy node.
        let grown = feed_as(&mut bulk, GROWTH_STREAK, queued, 1 << 20, Sharing::BulkOnly);
        assert_eq!(grown.expect("doubled").stream, 2 * MIN_STREAM_WINDOW);
        feed_as(
            &mut bulk,
            20 * GROWTH_STREAK,
            queued,
            8 << 20,
            Sharing::BulkOnly,
        );
        assert_eq!(bulk.windows().stream, 4 << 20, "up to the ceiling");
        assert_eq!(bulk.windows().connection, 16 << 20);

        // The same round trips where a tunnel that does not move bulk
        // shares the connection: no growth.
        let mut shared = estimator();
        shared.sample(short, 0, 100, Sharing::Shared);
        let kept = feed_as(
            &mut shared,
            4 * GROWTH_STREAK,
            queued,
            1 << 20,
            Sharing::Shared,
        );
        assert_eq!(kept, None);
        assert_eq!(shared.windows().stream, MIN_STREAM_WINDOW);
    }

    #[test]
    fn a_window_grown_for_bulk_halves_each_queued_round_trip_once_shared() {
        let short = Duration::from_micros(100);
        let queued = Duration::from_millis(5);
        let mut e = estimator();
        e.sample(short, 0, 100, Sharing::BulkOnly);
        feed_as(
            &mut e,
            3 * GROWTH_STREAK,
            queued,
            8 << 20,
            Sharing::BulkOnly,
        );
        assert_eq!(e.windows().stream, 8 * MIN_STREAM_WINDOW);
        // A request joins: every round trip behind the queue halves the
        // window, never more than half at once.
        let halved = e.sample(queued, 1 << 20, 0, Sharing::Shared);
        assert_eq!(halved.expect("halved").stream, 4 * MIN_STREAM_WINDOW);
        // A quiet round trip says nothing of the queue bulk will make.
        assert_eq!(e.sample(short, 0, 0, Sharing::Shared), None);
        let halved = e.sample(queued, 1 << 20, 0, Sharing::Shared);
        assert_eq!(halved.expect("halved").stream, 2 * MIN_STREAM_WINDOW);
        // A round trip without a queue: the window now suits sharing, and
        // shrinks again only after a streak behind a queue.
        assert_eq!(e.sample(short, 1 << 20, 0, Sharing::Shared), None);
        assert_eq!(
            feed_as(&mut e, SHRINK_STREAK - 1, queued, 1 << 20, Sharing::Shared),
            None
        );
        let halved = e.sample(queued, 1 << 20, 0, Sharing::Shared);
        assert_eq!(halved.expect("halved").stream, MIN_STREAM_WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_tells_a_connection_that_only_bulk_moves() {
        // A tunnel that ends within its first span, having moved little,
        // trickled; one that moved bulk did not.
        let brief = Arc::new(Activity::default());
        let mut transfer = StreamProbe::new(Arc::new(Probe::with_activity(brief.clone())), None);
        transfer.record(crate::pool::BULK_BYTES as usize);
        drop(transfer);
        assert!(!brief.recent(std::time::Instant::now()));
        let mut request = StreamProbe::new(Arc::new(Probe::with_activity(brief.clone())), None);
        request.record(100);
        assert!(!brief.recent(std::time::Instant::now()), "may yet be bulk");
        drop(request);
        assert!(brief.recent(std::time::Instant::now()));

        let activity = Arc::new(Activity::default());
        let probe = Arc::new(Probe::with_activity(activity.clone()));
        let bulk = crate::pool::BULK_BYTES as usize;
        let mut first = StreamProbe::new(probe.clone(), None);
        first.record(bulk);
        assert_eq!(probe.sharing(), Sharing::BulkOnly, "one bulk tunnel");
        let mut second = StreamProbe::new(probe.clone(), None);
        second.record(1_000);
        assert_eq!(probe.sharing(), Sharing::Shared, "beside a new one");
        second.sent(bulk);
        assert_eq!(probe.sharing(), Sharing::BulkOnly, "both move bulk");
        drop(second);
        assert_eq!(probe.sharing(), Sharing::BulkOnly);
        assert!(!activity.recent(std::time::Instant::now()));

        // Another connection's tunnel trickles, past its first span.
        let elsewhere = Arc::new(Probe::with_activity(activity.clone()));
        let mut small = StreamProbe::new(elsewhere, None);
        small.record(100);
        assert!(
            !activity.recent(std::time::Instant::now()),
            "may yet be bulk"
        );
        tokio::time::advance(crate::pool::SPAN).await;
        small.record(100);
        assert!(activity.recent(std::time::Instant::now()));
        first.record(bulk);
        assert_eq!(probe.sharing(), Sharing::Alone, "requests wait behind it");
        let later = std::time::Instant::now() + crate::pool::MEMORY;
        assert!(!activity.recent(later), "forgotten after a while");

        // A quiet span: the tunnel no longer moves bulk.
        tokio::time::advance(2 * crate::pool::SPAN).await;
        first.record(1);
        assert_eq!(probe.bulk_streams.load(Ordering::Relaxed), 0);
        first.record(bulk);
        assert_eq!(probe.bulk_streams.load(Ordering::Relaxed), 1);
        drop(first);
        assert_eq!(probe.bulk_streams.load(Ordering::Relaxed), 0);
        assert_eq!(probe.sharing(), Sharing::Alone);
    }

    /// A receiver that cuts its stream window as the sizing does, again
    /// and again, after taking a quarter of it and returning none (h2
    /// returns window only once the peer holds less than two thirds), must
    /// still receive what the peer sends next: each cut takes window from
    /// the peer, and without the window it left owed returned the peer
    /// would be left with none, for good.
    #[tokio::test]
    async fn cut_windows_still_let_the_peer_send() {
        use bytes::Bytes;
        use http::{Method, Request, Response};

        let window = 8 * MIN_STREAM_WINDOW;
        // The sizing's cuts from this window, behind a queue.
        let mut e = Estimator::new(Windows::for_stream(window), window);
        e.sample(Duration::from_micros(100), 0, 100, Sharing::Alone);
        let queued = Duration::from_millis(10);
        let cuts: Vec<u32> = (0..4 * SHRINK_STREAK)
            .filter_map(|_| e.sample(queued, u64::from(window), 0, Sharing::Alone))
            .map(|w| w.stream)
            .collect();
        assert_eq!(cuts, [4, 2, 1].map(|n| n * MIN_STREAM_WINDOW));

        let mut server = h2::server::Builder::new();
        server
            .initial_window_size(window)
            .initial_connection_window_size(16 << 20);
        let pair = crate::test_support::h2_pair(&h2::client::Builder::new(), &server).await;
        tokio::spawn(pair.client);
        let mut connection = pair.server;
        let mut ping_pong = connection.ping_pong().expect("a PING handle");
        let (cut_tx, mut cut_rx) = tokio::sync::mpsc::channel::<(u32, oneshot::Sender<()>)>(1);
        let (body_tx, body_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            let _send = respond.send_response(Response::new(()), false).unwrap();
            let _ = body_tx.send(request.into_body());
            loop {
                tokio::select! {
                    accepted = connection.accept() => if accepted.is_none() { break },
                    Some((size, applied)) = cut_rx.recv() => {
                        connection.set_initial_window_size(size).unwrap();
                        let _ = applied.send(());
                    }
                }
            }
        });
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = "127.0.0.1:8080".parse().unwrap();
        let mut send_request = pair.send.ready().await.unwrap();
        let (response, mut upload) = send_request.send_request(request, false).unwrap();
        response.await.unwrap();
        let mut body = body_rx.await.unwrap();
        let probe = Arc::new(Probe::with_activity(Arc::default()));
        let _counted = StreamProbe::new(probe.clone(), Some(body.flow_control().clone()));

        // A quarter of the window arrives and is consumed: too little for
        // h2 to return it.
        let quarter = (window / 4) as usize;
        upload
            .send_data(Bytes::from(vec![1; quarter]), false)
            .unwrap();
        let mut received = 0;
        while received < quarter {
            let data = body.data().await.unwrap().unwrap();
            body.flow_control().release_capacity(data.len()).unwrap();
            received += data.len();
        }
        for cut in cuts {
            let (applied, done) = oneshot::channel();
            cut_tx.send((cut, applied)).await.unwrap();
            done.await.unwrap();
            // The peer answers the PING after it acknowledged the SETTINGS
            // sent before it; then the sizing returns what is owed.
            ping_pong.ping(Ping::opaque()).await.unwrap();
            probe.return_owed_window();
        }

        let more = 4 * window as usize;
        upload.send_data(Bytes::from(vec![2; more]), true).unwrap();
        let mut received = 0;
        let all = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                body.flow_control().release_capacity(data.len()).unwrap();
                received += data.len();
            }
        })
        .await;
        assert!(all.is_ok(), "stalled after {received} of {more} bytes");
        assert_eq!(received, more);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_pooled_probe_tracks_bulk() {
        for (probe, tracks) in [(Probe::for_pool(), true), (Probe::default(), false)] {
            let mut stream = StreamProbe::new(Arc::new(probe), None);
            stream.sent(crate::pool::BULK_BYTES as usize);
            assert_eq!(stream.probe.carries_bulk(), tracks);
        }
    }

    #[test]
    fn the_probe_counts_the_streams_that_hold_it() {
        let probe = Arc::new(Probe::default());
        let first = StreamProbe::new(probe.clone(), None);
        assert_eq!(probe.sharing(), Sharing::Alone);
        let mut second = StreamProbe::new(probe.clone(), None);
        assert_eq!(probe.sharing(), Sharing::Shared);
        second.record(7);
        drop(first);
        assert_eq!(probe.sharing(), Sharing::Alone);
        assert_eq!(probe.received(), 7);
        drop(second);
        assert_eq!(probe.streams.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_window_the_peer_does_not_fill_stays() {
        let mut e = estimator();
        let rtt = Duration::from_millis(1);
        assert_eq!(feed(&mut e, 50, rtt, 1_024, 1_024), None);
        assert_eq!(e.windows().stream, MIN_STREAM_WINDOW);
        assert!(!e.filled());
    }

    #[test]
    fn windows_stop_at_the_ceiling() {
        let mut e = Estimator::new(Windows::for_stream(MIN_STREAM_WINDOW), 100_000);
        let rtt = Duration::from_millis(5);
        let top = feed(&mut e, GROWTH_STREAK, rtt, 1 << 20, 0).unwrap();
        assert_eq!(top.stream, 100_000);
        assert_eq!(feed(&mut e, 10, rtt, 1 << 20, 0), None);
        assert_eq!(e.sample(Duration::ZERO, 1 << 20, 0, Sharing::Alone), None);
    }

    #[tokio::test]
    async fn the_probe_wakes_a_waiting_measurement_only() {
        let probe = Arc::new(Probe::default());
        probe.record(10);
        assert_eq!(probe.received(), 10);
        let waiter = tokio::spawn({
            let probe = probe.clone();
            async move { probe.data_arrives().await }
        });
        // Until the waiter is parked, a record may come before it.
        while !probe.waiting.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        probe.record(5);
        let before = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiting measurement woke")
            .unwrap();
        assert_eq!(before, 10, "counted from before the data that woke it");
        assert_eq!(probe.received(), 15);
        assert!(!probe.waiting.load(Ordering::Acquire));
    }
}
