//! Window held back for the next frame: a request's WINDOW_UPDATE leaves
//! with its response, and holding never stalls a sender.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;
use crate::test_support::settle;
use crate::window::{HELD_WINDOW_PER_CONNECTION, Probe};

/// The peer's stream window: small, so that a few requests owe it an update.
const WINDOW: u32 = 16 << 10;
const REQUEST: usize = 1 << 10;

/// A transport that counts the flushes that follow writes: h2 flushes
/// once for each batch of frames it writes (and on many polls with nothing
/// written, not counted), so each counted one is a TLS record's worth of
/// writing and a system call on a socket.
struct CountingIo {
    inner: DuplexStream,
    flushes: Arc<AtomicUsize>,
    wrote: bool,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.wrote = true;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::take(&mut self.wrote) {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One CONNECT stream over memory: (our end, a server's stream reporting
/// to `probe`; the peer's end; the flushes of our end's connection).
async fn counted_pair(probe: Arc<Probe>) -> (H2Stream, H2Stream, Arc<AtomicUsize>) {
    let flushes = Arc::new(AtomicUsize::new(0));
    let (client_io, server_io) = duplex(1 << 20);
    let server_io = CountingIo {
        inner: server_io,
        flushes: flushes.clone(),
        wrote: false,
    };
    // A connection window the test never needs back: h2 sends that update
    // once data arrives (not when window is released), alone whatever this
    // side holds.
    let mut client = h2::client::Builder::new();
    client
        .initial_window_size(WINDOW)
        .initial_connection_window_size(1 << 20);
    let mut server = h2::server::Builder::new();
    server
        .initial_window_size(WINDOW)
        .initial_connection_window_size(1 << 20);
    let (client, server) = tokio::join!(
        client.handshake::<_, Bytes>(client_io),
        server.handshake::<_, Bytes>(server_io)
    );
    let (send, client) = client.unwrap();
    let mut server = server.unwrap();
    tokio::spawn(client);
    let (accepted, ours) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (request, mut respond) = server.accept().await.unwrap().unwrap();
        let send = respond.send_response(Response::new(()), false).unwrap();
        let stream = H2Stream::new(send, request.into_body()).with_probe(Some(probe));
        let _ = accepted.send(stream);
        while server.accept().await.is_some() {}
    });
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = "127.0.0.1:8080".parse().unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, send_stream) = send.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    // The connection lives as long as the streams: keep its handle.
    std::mem::forget(send);
    let peer = H2Stream::new(send_stream, response.into_body());
    (ours.await.unwrap(), peer, flushes)
}

#[tokio::test(start_paused = true)]
async fn a_requests_window_goes_back_with_its_response() {
    let probe = Arc::new(Probe::default());
    let (ours, mut peer, flushes) = counted_pair(probe.clone()).await;
    let (mut app, local) = duplex(64 << 10);
    let relay = tokio::spawn(Relay::new(AnyStream(local), ours));
    // The application answers each request with one of the same size.
    let echo = tokio::spawn(async move {
        let mut request = [0u8; REQUEST];
        while app.read_exact(&mut request).await.is_ok() {
            app.write_all(&request).await.unwrap();
        }
    });
    settle().await;
    flushes.store(0, Ordering::Relaxed);
    // Enough requests for the peer to need its window back several times
    // over: without it, it could not send them all.
    let rounds = 8 * WINDOW as usize / REQUEST;
    for round in 0..rounds {
        let request = vec![round as u8; REQUEST];
        peer.write_all(&request).await.unwrap();
        let mut response = vec![0u8; REQUEST];
        peer.read_exact(&mut response).await.unwrap();
        assert_eq!(response, request);
    }
    settle().await;
    assert_eq!(
        flushes.load(Ordering::Relaxed),
        rounds,
        "one write per response, window updates included"
    );
    assert!(
        probe.held_window() <= REQUEST,
        "at most the last request's window still held"
    );
    relay.abort();
    echo.abort();
}

#[tokio::test(start_paused = true)]
async fn held_window_never_stalls_a_sender_that_gets_no_answer() {
    let probe = Arc::new(Probe::default());
    let (ours, mut peer, _flushes) = counted_pair(probe.clone()).await;
    let (mut app, local) = duplex(64 << 10);
    let relay = tokio::spawn(Relay::new(AnyStream(local), ours));
    let total = 16 * WINDOW as usize;
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; total];
        app.read_exact(&mut got).await.unwrap();
        app
    });
    // Small writes, each under the most a stream holds back, and nothing
    // ever sent the other way to carry the window.
    let sender = tokio::spawn(async move {
        for _ in 0..total / REQUEST {
            peer.write_all(&[7u8; REQUEST]).await.unwrap();
        }
        peer
    });
    let (sent, read) = tokio::time::timeout(Duration::from_secs(5), async {
        (sender.await.unwrap(), reader.await.unwrap())
    })
    .await
    .expect("the sender got its window back without an answer");
    // The last turn's window waits for a frame that never comes, within
    // the connection's budget; ending the tunnel gives it back.
    assert!(probe.held_window() <= HELD_WINDOW_PER_CONNECTION);
    drop((sent, read));
    relay.abort();
    let _ = relay.await;
    assert_eq!(
        probe.held_window(),
        0,
        "a dropped stream gives its hold back"
    );
}

#[test]
fn a_connection_holds_back_no_more_than_its_budget() {
    let probe = Probe::default();
    assert!(probe.hold_window(HELD_WINDOW_PER_CONNECTION - 10));
    assert!(
        !probe.hold_window(11),
        "over the budget: given back at once"
    );
    assert!(probe.hold_window(10));
    probe.unhold_window(HELD_WINDOW_PER_CONNECTION);
    assert_eq!(probe.held_window(), 0);
}
