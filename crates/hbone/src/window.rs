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
//! round trips in a row the windows double. On a long path
//! ([`LONG_PATH`]) each such round trip grows them fourfold
//! ([`LONG_PATH_GROWTH`]), as TCP's slow start would, so that a transfer
//! across regions reaches its speed in a few round trips. A node that is
//! itself the bottleneck (a busy CPU) has a queue in front of it, which
//! stretches the round trip well past the minimum: after
//! [`SHRINK_STREAK`] such round trips in a row the stream window halves
//! (never below the first), since more window would only lengthen the
//! queue that every tunnel waits in.
//!
//! Unless every tunnel on the connection moves bulk and no tunnel in the
//! process has trickled (moved less than bulk) within the last second
//! ([`Sharing::BulkOnly`]): then no request waits in any queue here, only
//! data that waits to be copied anyway, and larger windows carry it in
//! larger frames, fewer syscalls per byte. The windows then double on
//! every filled round trip, queue or not (no streak: there is no queue
//! to be wrong about), and do not shrink. The whole process counts, not
//! the connection: a request on another connection waits for the same
//! CPUs (measured: with only the connection counted, a request
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
/// A path whose shortest round trip is at least this long grows its
/// windows on each filled, queue-free round trip, without a streak, and
/// by [`LONG_PATH_GROWTH`]. The streak guards against a busy node's jitter
/// on a short path, where it costs milliseconds; on a long one it would
/// cost seconds (at 50 ms, three round trips per doubling took 1.8 s to
/// reach the largest window; doubling on every round trip, a one-second
/// transfer on a new connection moved 0.42 of what fixed 4 MiB windows
/// move, fourfold 0.67: `hbone bench --long-path`), and a node's queue of
/// a few milliseconds hides in the path's length anyway.
const LONG_PATH: Duration = Duration::from_millis(5);
/// What the windows grow by per filled round trip on a long path. A
/// measurement takes about two round trips (the PING waits for data, which
/// waits for the window the last one returned): four times per
/// measurement is TCP's slow start, twice per round trip.
const LONG_PATH_GROWTH: u32 = 4;
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
    /// tunnel); on a long path ([`LONG_PATH`]) one such round trip grows
    /// them fourfold. While only bulk moves ([`Sharing::BulkOnly`]) every
    /// filled round trip grows the windows, queue or not, and they do not
    /// shrink; once that ends, a stream window grown that way halves on
    /// every round trip behind a queue, without waiting for a streak.
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
        let long_path = min_rtt >= LONG_PATH;
        let streak = if sharing == Sharing::BulkOnly || long_path {
            1
        } else {
            GROWTH_STREAK
        };
        if self.streak < streak || stream >= self.ceiling {
            return None;
        }
        self.streak = 0;
        self.grown_for_bulk |= sharing == Sharing::BulkOnly;
        let factor = if long_path { LONG_PATH_GROWTH } else { 2 };
        Some(self.set_stream(stream.saturating_mul(factor).min(self.ceiling)))
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
    // The first measurement waits for data twice, and with no pause: a
    // connection that carries one exchange and closes sends no PING, and
    // arms no timer for it (a zero-length sleep is still a timer, due at
    // the next millisecond, whose registration wakes the runtime's driver).
    let mut first = true;
    loop {
        let measure = if std::mem::take(&mut cut) {
            tokio::time::sleep(pause).await;
            None
        } else {
            tokio::select! {
                before = async {
                    if std::mem::take(&mut first) {
                        probe.data_arrives().await;
                    } else {
                        tokio::time::sleep(pause).await;
                    }
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
mod tests;
