//! The relay over in-memory streams: a `duplex` pipe as the local side and
//! an HTTP/2 stream pair over another pipe as the tunnel.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, DuplexStream, duplex};

use super::*;

/// The relay's end and the peer's end of one stream over memory. The
/// connection stays up while the stream is open.
async fn h2_pair(window: u32) -> (H2Stream, H2Stream) {
    let (ours, peer, _send) = crate::test_support::stream_pair(window).await;
    (ours, peer)
}

type TestRelay = Relay<AnyStream<DuplexStream>, H2Stream>;

/// A relay between an in-memory local stream and a tunnel: (the relay,
/// the application's end of the local stream, the tunnel's far end).
async fn relay(window: u32, local_capacity: usize) -> (TestRelay, DuplexStream, H2Stream) {
    let (ours, peer) = h2_pair(window).await;
    let (app, local) = duplex(local_capacity);
    (Relay::new(AnyStream(local), ours), app, peer)
}

#[tokio::test]
async fn moves_bytes_both_ways_with_half_close() {
    let (relay, mut app, mut peer) = relay(64 << 10, 64 << 10).await;
    let relay = tokio::spawn(relay);
    app.write_all(b"question").await.unwrap();
    app.shutdown().await.unwrap();
    // The application's EOF reaches the peer as the end of the stream ...
    let mut asked = Vec::new();
    peer.read_to_end(&mut asked).await.unwrap();
    assert_eq!(asked, b"question");
    // ... while the other direction still flows, more than one window.
    let answer = vec![7u8; 200_000];
    let sent = answer.clone();
    let writer = tokio::spawn(async move {
        peer.write_all(&sent).await.unwrap();
        peer.shutdown().await.unwrap();
        peer
    });
    let mut got = Vec::new();
    app.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, answer);
    drop(writer.await.unwrap());
    let (_stream, result) = relay.await.unwrap();
    assert_eq!(
        result.unwrap(),
        Transferred {
            to_tunnel: 8,
            from_tunnel: 200_000,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_local_reader_stalls_the_sender_at_the_window() {
    let window = 16 << 10;
    let local_capacity = 1 << 10;
    let (relay, mut app, mut peer) = relay(window, local_capacity).await;
    let relay = tokio::spawn(relay);
    // The application reads nothing: the peer may send the stream window
    // plus what the local pipe holds, and no more.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    let writer = tokio::spawn(async move {
        let chunk = [1u8; 1024];
        loop {
            if peer.write_all(&chunk).await.is_err() {
                break;
            }
            counted.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Paused time: the sleep ends only once every task is blocked, that
    // is once the writer has stalled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        stalled_at <= (window as usize) + local_capacity + 1024,
        "the peer sent {stalled_at} bytes to a reader that read none"
    );
    assert!(
        stalled_at >= local_capacity,
        "nothing got through: {stalled_at}"
    );
    // Reading releases window, and the sender goes on.
    let mut buf = vec![0u8; 64 << 10];
    let mut read = 0;
    while read < 3 * window as usize {
        read += app.read(&mut buf).await.unwrap();
    }
    assert!(sent.load(std::sync::atomic::Ordering::Relaxed) > stalled_at);
    writer.abort();
    relay.abort();
}

#[tokio::test]
async fn buffered_local_streams_are_flushed_while_the_tunnel_stays_open() {
    let (ours, mut peer) = h2_pair(64 << 10).await;
    let (mut app, local) = duplex(64 << 10);
    // A local side that keeps writes until flushed, as TLS or stdout do.
    let relay = tokio::spawn(Relay::new(AnyStream(BufWriter::new(local)), ours));
    peer.write_all(b"partial answer").await.unwrap();
    let mut got = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .expect("the relay flushes once the tunnel has nothing more for now")
        .unwrap();
    assert_eq!(&got, b"partial answer");
    relay.abort();
}

/// A local stream whose reads fail after some bytes.
struct FailingReader {
    left: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let n = self.left.min(buf.remaining());
        buf.put_slice(&vec![5u8; n]);
        self.left -= n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FailingReader {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_local_failure_resets_the_tunnel_and_keeps_the_counts() {
    let (ours, mut peer) = h2_pair(64 << 10).await;
    let relay = Relay::new(AnyStream(FailingReader { left: 3000 }), ours);
    let (_stream, result) = relay.await;
    let error = result.unwrap_err();
    assert_eq!(error.error.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(error.transferred.to_tunnel, 3000);
    // The peer sees a reset that is not a clean end (what was still queued
    // may be dropped with it, as a TCP RST drops unread bytes).
    let mut got = Vec::new();
    let end = peer.read_to_end(&mut got).await.unwrap_err();
    assert!(got.len() <= 3000);
    assert_eq!(end.kind(), io::ErrorKind::ConnectionReset);
    assert!(!peer.cancelled());
}

#[tokio::test]
async fn a_peer_cancel_is_a_clean_end() {
    let (relay, _app, mut peer) = relay(64 << 10, 64 << 10).await;
    let relay = tokio::spawn(relay);
    peer.write_all(b"x").await.unwrap();
    peer.reset(h2::Reason::CANCEL);
    let (_stream, result) = tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .unwrap()
        .unwrap();
    result.expect("CANCEL ends the relay without an error");
}

#[tokio::test(start_paused = true)]
async fn the_idle_limit_counts_from_the_last_byte() {
    let (relay, mut app, mut peer) = relay(64 << 10, 64 << 10).await;
    let relay = tokio::spawn(relay.with_idle_limit(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_secs(8)).await;
    // A byte at 8 s restarts the clock: the limit passes at 18 s, not 10 s.
    app.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    peer.read_exact(&mut one).await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!relay.is_finished(), "ended before the idle limit");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_stream, result) = relay.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.error.kind(), io::ErrorKind::TimedOut);
    assert_eq!(error.transferred.to_tunnel, 1);
}

#[tokio::test]
async fn reads_grow_for_bulk_and_stay_whole() {
    let (relay, mut app, mut peer) = relay(4 << 20, 4 << 20).await;
    let relay = tokio::spawn(relay);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        app.write_all(&sent).await.unwrap();
        app.shutdown().await.unwrap();
        app
    });
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.unwrap();
    assert!(got == data, "bytes arrived out of order or changed");
    peer.shutdown().await.unwrap();
    let (_stream, result) = relay.await.unwrap();
    assert_eq!(result.unwrap().to_tunnel, 3_000_000);
    drop(writer.await.unwrap());
}

/// A local stream that takes every write whole and keeps what each call
/// wrote; its reads never end.
#[derive(Default)]
struct RecordingWriter {
    writes: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl AsyncRead for RecordingWriter {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for RecordingWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let call: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = call.len();
        self.writes.lock().unwrap().push(call);
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn frames_that_wait_together_leave_in_one_write() {
    let (ours, mut peer) = h2_pair(64 << 10).await;
    for part in [b"one ".as_slice(), b"two ", b"three"] {
        peer.write_all(part).await.unwrap();
        peer.flush().await.unwrap();
    }
    // Paused time: the sleep ends once every task is blocked, that is once
    // all three DATA frames wait at our end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let local = RecordingWriter::default();
    let writes = local.writes.clone();
    let relay = tokio::spawn(Relay::new(AnyStream(local), ours));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*writes.lock().unwrap(), vec![b"one two three".to_vec()]);
    // A frame arriving later is a write of its own.
    peer.write_all(b" four").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(writes.lock().unwrap().last().unwrap(), b" four");
    relay.abort();
}

#[tokio::test(start_paused = true)]
async fn what_arrived_before_a_cancel_is_still_written() {
    let (ours, mut peer) = h2_pair(64 << 10).await;
    peer.write_all(b"first ").await.unwrap();
    peer.write_all(b"second").await.unwrap();
    // Both frames reach our end before the reset is sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    peer.reset(h2::Reason::CANCEL);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A local pipe smaller than what waits: the relay sees the cancel while
    // bytes are still to be written.
    let (mut app, local) = duplex(4);
    let relay = tokio::spawn(Relay::new(AnyStream(local), ours));
    let mut got = Vec::new();
    app.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"first second");
    let (_stream, result) = relay.await.unwrap();
    result.expect("CANCEL ends the relay without an error");
}

#[test]
fn the_frame_queue_drops_written_bytes_across_frames() {
    let mut queue = FrameQueue::default();
    for frame in ["ab", "cde", "f"] {
        queue.push_back(Bytes::from_static(frame.as_bytes()));
    }
    assert_eq!(queue.len(), 3);
    queue.advance(3);
    let left: Vec<&[u8]> = queue.iter().map(|frame| &frame[..]).collect();
    assert_eq!(left, [b"de".as_slice(), b"f"]);
    assert_eq!(queue.len(), 2);
    queue.advance(3);
    assert!(queue.is_empty());
    assert_eq!(queue.iter().count(), 0);
    assert!(queue.rest.is_none(), "an empty queue holds no memory");
}
