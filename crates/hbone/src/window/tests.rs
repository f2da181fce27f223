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
    // A path of a few milliseconds: the burst that woke the measurement,
    // half a window (h2 gives window back in halves), then nothing until
    // it returns.
    let rtt = LONG_PATH / 2;
    let mut stream = MIN_STREAM_WINDOW;
    for _ in 0..4 {
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
    let queued = 2 * rtt;
    assert_eq!(
        feed(&mut e, SHRINK_STREAK - 1, queued, u64::from(stream), 0),
        None
    );
}

#[test]
fn on_a_long_path_each_filled_round_trip_grows_the_window_fourfold() {
    let mut e = estimator();
    let rtt = 10 * LONG_PATH;
    let mut stream = MIN_STREAM_WINDOW;
    let mut round_trips = 0;
    while stream < 4 << 20 {
        let grown = e
            .sample(rtt, u64::from(stream / 2), 0, Sharing::Alone)
            .expect("grown at once");
        assert_eq!(grown.stream, (LONG_PATH_GROWTH * stream).min(4 << 20));
        stream = grown.stream;
        round_trips += 1;
    }
    // Three round trips from the first window to within 64 bytes of the
    // largest (64 KiB less one byte, times 64), a fourth to it; one that
    // leaves the window unfilled grows nothing.
    assert_eq!(round_trips, 4);
    assert_eq!(e.sample(rtt, 1000, 0, Sharing::Alone), None);
    // A queue still stops the growth: twice the path's round trip.
    let mut queued = estimator();
    queued.sample(rtt, 0, 100, Sharing::Alone);
    assert_eq!(
        feed(&mut queued, 4, 2 * rtt, u64::from(MIN_STREAM_WINDOW), 0),
        None
    );
    assert_eq!(queued.windows().stream, MIN_STREAM_WINDOW);
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
    // Filled round trips fifty times the shortest: a busy node. Each one
    // doubles the windows, with no streak to wait for.
    for doubled in [2, 4, 8] {
        let grown = bulk.sample(queued, 1 << 20, 0, Sharing::BulkOnly);
        assert_eq!(grown.expect("doubled").stream, doubled * MIN_STREAM_WINDOW);
    }
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
    feed_as(&mut e, 3, queued, 8 << 20, Sharing::BulkOnly);
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
    let rtt = Duration::from_millis(1);
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
