use super::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn head(kind: u8, flags: u8, length: u32) -> Head {
    Head {
        kind,
        flags,
        length,
    }
}

/// A client's bytes, and the headers in them: every kind of frame,
/// empty ones, a payload longer than any piece, a padded DATA frame
/// with data and one that is all padding.
fn client_stream() -> (Vec<u8>, Vec<Head>) {
    let mut bytes = PREFACE.to_vec();
    let mut heads = Vec::new();
    let mut add = |kind: u8, flags: u8, payload: &[u8], length: u32| {
        bytes.extend(frame(kind, flags, 1, payload));
        heads.push(head(kind, flags, length));
    };
    add(SETTINGS, 0, &[0, 4, 0, 0, 0xff, 0xff], 6);
    add(SETTINGS, 1, &[], 0);
    add(HEADERS, 0x4, &[0x82; 40], 40);
    add(PING, 0, b"12345678", 8);
    add(DATA, 0, &[7; 3000], 3000);
    // Pad length 2: 3 bytes of data.
    add(DATA, PADDED, &[2, 1, 2, 3, 0, 0], 3);
    // Pad length 4: nothing but padding.
    add(DATA, PADDED, &[4, 0, 0, 0, 0], 0);
    add(DATA, 0, &[], 0);
    add(WINDOW_UPDATE, 0, &[0, 0, 1, 0], 4);
    add(PRIORITY, 0, &[0, 0, 0, 0, 16], 5);
    add(0xfa, 0, &[9; 17], 17);
    add(RST_STREAM, 0, &[0, 0, 0, 8], 4);
    add(DATA, END_STREAM, &[], 0);
    (bytes, heads)
}

fn scan_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Head> {
    let mut scanner = Scanner::client();
    let mut seen = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([&bytes.len()]) {
        let cut = scanner.scan(&bytes[from..to], |head| {
            seen.push(head);
            true
        });
        assert_eq!(cut, None);
        from = to;
    }
    seen
}

#[test]
fn headers_are_found_however_the_bytes_are_split() {
    let (bytes, heads) = client_stream();
    assert_eq!(scan_in_pieces(&bytes, &[]), heads);
    // One split at every offset: inside the preface, inside each
    // header, on the pad length byte and inside each payload.
    for at in 0..=bytes.len() {
        assert_eq!(scan_in_pieces(&bytes, &[at]), heads, "split at {at}");
    }
    // A byte at a time.
    let every: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(scan_in_pieces(&bytes, &every), heads);
    // Two splits, a few bytes apart, everywhere.
    for at in 0..bytes.len() {
        for gap in 1..11 {
            let second = (at + gap).min(bytes.len());
            assert_eq!(scan_in_pieces(&bytes, &[at, second]), heads);
        }
    }
}

#[test]
fn the_preface_is_never_read_as_a_header() {
    // A preface alone, then a piece that is one frame.
    let mut scanner = Scanner::client();
    let mut seen = Vec::new();
    for piece in [&PREFACE[..10], &PREFACE[10..]] {
        scanner.scan(piece, |h| {
            seen.push(h);
            true
        });
    }
    assert!(seen.is_empty(), "{seen:?}");
    scanner.scan(&frame(PING, 0, 0, &[0; 8]), |h| {
        seen.push(h);
        true
    });
    assert_eq!(seen, [head(PING, 0, 8)]);
    // The server's side has no preface.
    let mut seen = Vec::new();
    Scanner::server().scan(&frame(SETTINGS, 0, 0, &[]), |h| {
        seen.push(h);
        true
    });
    assert_eq!(seen, [head(SETTINGS, 0, 0)]);
}

#[test]
fn a_stop_reports_where_the_frame_began() {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(PING, 0, 0, &[0; 8]));
    let second = bytes.len();
    bytes.extend(frame(PING, 0, 0, &[0; 8]));
    let stop_at_second = |scanner: &mut Scanner, piece: &[u8], seen: &mut usize| {
        scanner.scan(piece, |_| {
            *seen += 1;
            *seen < 2
        })
    };
    let (mut scanner, mut seen) = (Scanner::client(), 0);
    assert_eq!(
        stop_at_second(&mut scanner, &bytes, &mut seen),
        Some(second)
    );
    // Header split: the second frame began in the earlier piece.
    let (mut scanner, mut seen) = (Scanner::client(), 0);
    assert_eq!(
        stop_at_second(&mut scanner, &bytes[..second + 4], &mut seen),
        None
    );
    assert_eq!(
        stop_at_second(&mut scanner, &bytes[second + 4..], &mut seen),
        Some(0)
    );
}

fn budget(frames: u32, secs: u64) -> Budget {
    Budget::new(Rate {
        frames,
        window: Duration::from_secs(secs),
    })
}

#[tokio::test(start_paused = true)]
async fn a_burst_is_allowed_then_the_rate() {
    let mut budget = budget(100, 10);
    let mut now = Instant::now;
    for _ in 0..100 {
        assert!(budget.received(head(PING, 0, 8), &mut now));
    }
    assert!(!budget.received(head(SETTINGS, 0, 0), &mut now));
    assert_eq!(budget.charged, 101);
    // 100 per 10 s: one more every 100 ms.
    let mut budget = budget_spent(100, 10);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(budget.received(head(PING, 0, 8), &mut now));
    assert!(!budget.received(head(PING, 0, 8), &mut now));
    // A quiet window refills the whole burst, no more.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..100 {
        assert!(budget.received(head(PRIORITY, 0, 5), &mut now));
    }
    assert!(!budget.received(head(PRIORITY, 0, 5), &mut now));
}

#[tokio::test(start_paused = true)]
async fn the_answers_to_our_pings_and_settings_are_free() {
    let mut budget = budget_spent(10, 10);
    let mut now = Instant::now;
    for _ in 0..100 {
        budget.sent(head(PING, 0, 8));
        assert!(budget.received(head(PING, ACK, 8), &mut now));
    }
    budget.sent(head(SETTINGS, 0, 6));
    assert!(budget.received(head(SETTINGS, ACK, 0), &mut now));
    // Our own ACKs pay for nothing; an ACK of nothing is charged.
    budget.sent(head(PING, ACK, 8));
    assert!(!budget.received(head(PING, ACK, 8), &mut now));
}

fn budget_spent(frames: u32, secs: u64) -> Budget {
    let mut budget = budget(frames, secs);
    let mut now = Instant::now;
    for _ in 0..frames {
        assert!(budget.received(head(PING, 0, 8), &mut now));
    }
    budget
}

#[tokio::test(start_paused = true)]
async fn a_steady_client_below_the_rate_is_never_stopped() {
    // A PING every second and a SETTINGS every 2 s, for an hour,
    // against 30 per 10 s.
    let mut budget = budget(30, 10);
    let mut now = Instant::now;
    for second in 0..3_600u32 {
        assert!(budget.received(head(PING, 0, 8), &mut now), "{second}");
        if second.is_multiple_of(2) {
            assert!(budget.received(head(SETTINGS, 0, 6), &mut now));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn what_is_charged() {
    let mut budget = budget_spent(10, 10);
    let mut now = Instant::now;
    let free = [
        head(DATA, 0, 1),
        head(DATA, END_STREAM, 0),
        head(CONTINUATION, 0, 100),
        head(PUSH_PROMISE, 0, 4),
    ];
    for h in free {
        assert!(budget.received(h, &mut now), "{h:?} charged");
    }
    for h in [
        head(DATA, 0, 0),
        head(DATA, PADDED, 0),
        head(SETTINGS, 1, 0),
        head(PING, 1, 8),
        head(PRIORITY, 0, 5),
        head(GOAWAY, 0, 8),
        head(0x20, 0, 0),
        head(WINDOW_UPDATE, 0, 4),
        head(RST_STREAM, 0, 4),
    ] {
        let mut spent = budget.clone();
        assert!(!spent.received(h, &mut now), "{h:?} not charged");
    }
}

#[tokio::test(start_paused = true)]
async fn traffic_pays_for_window_updates_and_resets() {
    let mut budget = budget_spent(10, 10);
    let mut now = Instant::now;
    // Three DATA frames out: six WINDOW_UPDATEs free. Empty DATA and
    // other frames out earn nothing.
    for h in [
        head(DATA, 0, 16_384),
        head(DATA, 0, 1),
        head(DATA, END_STREAM, 5),
        head(DATA, END_STREAM, 0),
        head(HEADERS, 0x4, 10),
        head(PING, 1, 8),
    ] {
        budget.sent(h);
    }
    for _ in 0..6 {
        assert!(budget.received(head(WINDOW_UPDATE, 0, 4), &mut now));
    }
    assert!(!budget.clone().received(head(WINDOW_UPDATE, 0, 4), &mut now));
    // A stream opened: its reset and one WINDOW_UPDATE are free.
    assert!(budget.received(head(HEADERS, 0x4, 20), &mut now));
    assert!(budget.received(head(RST_STREAM, 0, 4), &mut now));
    assert!(budget.received(head(WINDOW_UPDATE, 0, 4), &mut now));
    assert!(!budget.clone().received(head(RST_STREAM, 0, 4), &mut now));
    // Earnings are capped.
    for _ in 0..100_000 {
        budget.sent(head(DATA, 0, 1));
    }
    for _ in 0..EARNED_CAP {
        assert!(budget.received(head(WINDOW_UPDATE, 0, 4), &mut now));
    }
    assert!(!budget.received(head(WINDOW_UPDATE, 0, 4), &mut now));
}

fn rate(frames: u32) -> Rate {
    Rate {
        frames,
        window: Duration::from_secs(10),
    }
}

/// Polls a read once, without waiting.
fn read_now<S: AsyncRead + Unpin>(
    guard: &mut FrameGuard<S>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut read = ReadBuf::new(buf);
    Pin::new(guard)
        .poll_read(&mut cx, &mut read)
        .map_ok(|()| read.filled().len())
}

#[tokio::test(start_paused = true)]
async fn the_frame_that_trips_never_reaches_h2() {
    use tokio::io::AsyncWriteExt;
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let tripwire = Arc::new(Tripwire::default());
    let mut guard = FrameGuard::new(server, rate(5), tripwire.clone());
    let mut bytes = PREFACE.to_vec();
    let ping = frame(PING, 0, 0, &[0; 8]);
    for _ in 0..5 {
        bytes.extend(&ping);
    }
    let allowed = bytes.len();
    for _ in 0..100 {
        bytes.extend(&ping);
    }
    client.write_all(&bytes).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // The preface and five PINGs, in one read.
    assert!(matches!(read_now(&mut guard, &mut buf), Poll::Ready(Ok(n)) if n == allowed));
    assert!(tripwire.trip.get().is_some());
    // Then nothing, ever: not an end of stream, not an error.
    assert!(read_now(&mut guard, &mut buf).is_pending());
    client.write_all(&ping).await.unwrap();
    assert!(read_now(&mut guard, &mut buf).is_pending());
    let trip = tokio::time::timeout(Duration::from_secs(1), tripwire.tripped())
        .await
        .unwrap();
    assert_eq!(
        trip,
        Trip {
            kind: PING,
            charged: 6
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_trip_on_the_first_frame_of_a_read_returns_no_bytes() {
    use tokio::io::AsyncWriteExt;
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let tripwire = Arc::new(Tripwire::default());
    let mut guard = FrameGuard::new(server, rate(1), tripwire.clone());
    let mut buf = vec![0u8; 64 << 10];
    let mut first = PREFACE.to_vec();
    first.extend(frame(SETTINGS, 0, 0, &[]));
    client.write_all(&first).await.unwrap();
    assert!(matches!(read_now(&mut guard, &mut buf), Poll::Ready(Ok(n)) if n == first.len()));
    client.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
    assert!(read_now(&mut guard, &mut buf).is_pending());
    assert_eq!(
        tripwire.trip.get().copied(),
        Some(Trip {
            kind: SETTINGS,
            charged: 2
        })
    );
}

#[tokio::test(start_paused = true)]
async fn data_written_pays_for_the_clients_window_updates() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let tripwire = Arc::new(Tripwire::default());
    let mut guard = FrameGuard::new(server, rate(1), tripwire.clone());
    // 50 DATA frames out, written in pieces that split the headers.
    let data: Vec<u8> = (0..50).flat_map(|_| frame(DATA, 0, 1, &[1; 100])).collect();
    for piece in data.chunks(7) {
        guard.write_all(piece).await.unwrap();
    }
    let mut sink = vec![0u8; data.len()];
    client.read_exact(&mut sink).await.unwrap();
    // 100 WINDOW_UPDATEs back cost nothing; the 101st and 102nd are
    // charged (a budget of one).
    let mut bytes = PREFACE.to_vec();
    for _ in 0..102 {
        bytes.extend(frame(WINDOW_UPDATE, 0, 1, &[0, 0, 0, 100]));
    }
    client.write_all(&bytes).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let passed = bytes.len() - 13;
    assert!(matches!(read_now(&mut guard, &mut buf), Poll::Ready(Ok(n)) if n == passed));
    assert_eq!(tripwire.trip.get().map(|t| t.charged), Some(2));
}
