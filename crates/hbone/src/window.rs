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
//! So the receiving side starts small and grows its windows to the
//! bandwidth-delay product it measures: a PING's round trip while data
//! flows, and the bytes that arrived meanwhile. The round trip is taken at
//! its minimum (a full queue stretches it, and must not count as path),
//! the bandwidth at its maximum, and the window granted is twice their
//! product: enough to keep the path busy with a margin, little more. A
//! path that is faster than the window allows shows it as a higher
//! bandwidth at the same round trip, and the window doubles; a node that
//! is slower than its peer shows it as a longer round trip at the same
//! bandwidth, and the window stays. The same PINGs keep the connection
//! alive ([`Keepalive`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use h2::{Ping, PingPong};
use tokio::sync::{Notify, watch};

use crate::config::H2Settings;
use crate::keepalive::Keepalive;

/// The smallest stream window granted: the protocol's default.
pub(crate) const MIN_STREAM_WINDOW: u32 = 65_535;
/// A connection's window is this many stream windows, so that a stream
/// whose reader stalls (holding a full window) cannot stop the others.
pub(crate) const STREAMS_PER_CONNECTION_WINDOW: u32 = 4;
/// The shortest time between two measuring PINGs while the window grows
/// or is filled; each costs a frame each way.
const GROWING_INTERVAL: Duration = Duration::from_millis(20);
/// The same while the peer sends less than the window allows.
const STEADY_INTERVAL: Duration = Duration::from_millis(250);
/// Windows grow by at least an eighth, or not at all: each change costs a
/// SETTINGS frame, and measurements wobble.
const LEAST_GROWTH_DIVISOR: u32 = 8;
/// A round trip up to this many times the shortest seen still counts as
/// one without a queue.
const QUEUE_FREE_RTT: f64 = 1.5;

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

/// The bandwidth-delay product of a connection, from PING round trips and
/// the bytes received during each.
#[derive(Debug)]
pub(crate) struct Estimator {
    min_rtt: Option<Duration>,
    /// Bytes per second.
    max_bandwidth: f64,
    windows: Windows,
    /// The largest stream window granted.
    ceiling: u32,
    /// The last round trip carried at least half a stream window.
    filled: bool,
}

impl Estimator {
    pub(crate) fn new(initial: Windows, ceiling: u32) -> Self {
        Estimator {
            min_rtt: None,
            max_bandwidth: 0.0,
            windows: initial,
            ceiling: ceiling.max(initial.stream),
            filled: false,
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

    /// Takes one round trip and the bytes received during it; returns the
    /// new windows when they grow. Windows never shrink: a smaller one
    /// would strand bytes the peer already sent.
    ///
    /// Two ways to grow. The product of the best bandwidth and the
    /// shortest round trip seen, doubled. And, since a peer held back by
    /// the window cannot show a higher bandwidth, doubling while the peer
    /// used at least half the window in a round trip (h2 returns window in
    /// halves) and the round trip stayed near its minimum: no queue has
    /// formed yet, so the path could carry more.
    ///
    /// `woke` is the burst that started the measurement (received before
    /// the PING went out), `during` what arrived until its answer: only the
    /// latter is a rate, but both show how much of the window was used.
    pub(crate) fn sample(&mut self, rtt: Duration, woke: u64, during: u64) -> Option<Windows> {
        if rtt.is_zero() {
            return None;
        }
        let min_rtt = *self
            .min_rtt
            .insert(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.max_bandwidth = self.max_bandwidth.max(during as f64 / rtt.as_secs_f64());
        let stream = self.windows.stream;
        let mut wanted = 2.0 * self.max_bandwidth * min_rtt.as_secs_f64();
        self.filled = woke + during >= u64::from(stream / 2);
        let unqueued = rtt.as_secs_f64() <= min_rtt.as_secs_f64() * QUEUE_FREE_RTT;
        if self.filled && unqueued {
            wanted = wanted.max(2.0 * f64::from(stream));
        }
        let wanted = wanted.min(f64::from(self.ceiling)) as u32;
        let least = stream + stream / LEAST_GROWTH_DIVISOR;
        (wanted >= least.min(self.ceiling) && wanted > stream).then(|| {
            self.windows = Windows::for_stream(wanted);
            self.windows
        })
    }
}

/// What the tunnels of a connection tell its window sizing: how many bytes
/// arrived. Shared by the connection's streams; a relaxed add per DATA
/// frame, and a wake-up only when a measurement waits for data.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    received: AtomicU64,
    waiting: AtomicBool,
    data: Notify,
}

impl Probe {
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
    loop {
        let measure = tokio::select! {
            before = async {
                tokio::time::sleep(pause).await;
                probe.data_arrives().await
            } => Some(before),
            () = tokio::time::sleep_until((last_ping + keepalive.interval).into()) => None,
        };
        let sent = Instant::now();
        let at_ping = probe.received();
        last_ping = sent;
        match tokio::time::timeout(keepalive.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("no answer to PING within {:?}", keepalive.timeout),
        }
        let Some(before) = measure else {
            continue;
        };
        let (rtt, woke, during) = (sent.elapsed(), at_ping - before, probe.received() - at_ping);
        let grown = estimator.sample(rtt, woke, during);
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
                    "flow-control windows grow"
                );
                windows.send_replace(new);
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

    fn estimator() -> Estimator {
        Estimator::new(Windows::for_stream(MIN_STREAM_WINDOW), 4 << 20)
    }

    #[test]
    fn a_path_faster_than_the_window_doubles_it() {
        let mut e = estimator();
        // 1 ms round trip, a full window each time: the path takes more.
        let first = e.sample(Duration::from_millis(1), 0, 65_535).unwrap();
        assert_eq!(first.stream, 131_070);
        assert_eq!(first.connection, 4 * 131_070);
        let second = e.sample(Duration::from_millis(1), 0, 4 * 131_070).unwrap();
        assert_eq!(second.stream, 8 * 131_070);
    }

    #[test]
    fn a_longer_round_trip_at_the_same_bandwidth_leaves_the_window() {
        let mut e = estimator();
        e.sample(Duration::from_micros(100), 0, 20_000);
        let settled = e.windows();
        // The node is the bottleneck: queued bytes stretch the round trip
        // in proportion, the bandwidth stays.
        for queued in [2, 4, 8, 16] {
            let rtt = Duration::from_micros(100 * queued);
            assert_eq!(e.sample(rtt, 0, 20_000 * queued), None, "queue ×{queued}");
        }
        assert_eq!(e.windows(), settled);
    }

    #[test]
    fn a_window_the_peer_fills_without_a_queue_doubles() {
        let mut e = estimator();
        // A long path: half the window per round trip (h2 gives window
        // back in halves), no higher bandwidth to be seen.
        let mut stream = MIN_STREAM_WINDOW;
        for _ in 0..4 {
            // The burst that woke the measurement; nothing more until the
            // window comes back.
            let grown = e.sample(Duration::from_millis(20), u64::from(stream / 2), 0);
            stream = grown.expect("doubled").stream;
        }
        assert_eq!(stream, 16 * MIN_STREAM_WINDOW);
        // The round trip grows: a queue formed, the path is full.
        assert_eq!(
            e.sample(Duration::from_millis(40), u64::from(stream), 0),
            None
        );
    }

    #[test]
    fn a_burst_is_not_a_rate() {
        let mut e = estimator();
        // A window's worth that arrived at once, then a queue-free round
        // trip: the window doubles for being filled, not for the burst's
        // apparent speed.
        let grown = e.sample(Duration::from_micros(100), 65_535, 0).unwrap();
        assert_eq!(grown.stream, 131_070);
        // Filled again, but behind a queue (ten times the round trip).
        assert_eq!(e.sample(Duration::from_millis(1), 131_070, 0), None);
    }

    #[test]
    fn a_small_change_is_not_worth_a_settings_frame() {
        let mut e = estimator();
        e.sample(Duration::from_millis(1), 0, 1_000);
        // Queued (twice the shortest round trip); twice the product is
        // 5 % above the window.
        assert_eq!(e.sample(Duration::from_millis(2), 0, 68_812), None);
        // 22 % above.
        let grown = e.sample(Duration::from_millis(2), 0, 80_000).unwrap();
        assert_eq!(grown.stream, 80_000);
    }

    #[test]
    fn windows_stay_between_the_floor_and_the_ceiling() {
        let mut e = estimator();
        assert_eq!(e.sample(Duration::from_micros(50), 0, 100), None);
        assert_eq!(e.windows().stream, MIN_STREAM_WINDOW);
        let mut e = estimator();
        let top = e.sample(Duration::from_millis(100), 0, 1 << 30).unwrap();
        assert_eq!(top.stream, 4 << 20);
        assert_eq!(e.sample(Duration::from_millis(100), 0, 1 << 31), None);
        assert_eq!(e.sample(Duration::ZERO, 0, 1 << 20), None);
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
