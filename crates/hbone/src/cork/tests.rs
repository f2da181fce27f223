use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Wake;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::test_support::{test_id, test_identities};

/// A transport that counts the writes reaching it and takes vectored
/// writes whole, as a socket's `writev` does.
struct Counting {
    inner: DuplexStream,
    written: Arc<Written>,
}

/// What reached a [`Counting`] transport.
#[derive(Default)]
struct Written {
    writes: AtomicUsize,
    bytes: AtomicUsize,
    /// Writes given nothing to write (a `writev` of no bytes, wasted).
    empty: AtomicUsize,
}

impl Written {
    fn writes(&self) -> usize {
        self.writes.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl AsyncRead for Counting {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        if whole.is_empty() {
            this.written.empty.fetch_add(1, Ordering::Relaxed);
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, &whole);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            this.written.writes.fetch_add(1, Ordering::Relaxed);
            this.written.bytes.fetch_add(n, Ordering::Relaxed);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

type ServerSide = FlushGate<tokio_rustls::server::TlsStream<Hold<Counting>>>;
type ClientSide = tokio_rustls::client::TlsStream<DuplexStream>;

/// A server's and a client's TLS configuration, each trusting the other.
fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let [server_identity, client_identity] = test_identities(["server", "client"]);
    let server_tls = crate::tls::ServerTls::new(&server_identity, vec!["cluster.local".into()])
        .expect("server TLS")
        .current();
    let client_tls = crate::tls::client_base_config(&client_identity)
        .expect("client TLS")
        .for_peer(&[test_id("server")]);
    (server_tls, client_tls)
}

/// A TLS connection over memory whose server side is corked by `cork`;
/// returns both ends and what reached the transport under the server's TLS.
async fn tls_pair(cork: &mut Cork, pipe: usize) -> (ServerSide, ClientSide, Arc<Written>) {
    let (server_tls, client_tls) = tls_configs();
    let (server_io, client_io) = duplex(pipe);
    let written = Arc::new(Written::default());
    let server_io = cork.hold(Counting {
        inner: server_io,
        written: written.clone(),
    });
    let name = crate::tls::placeholder_server_name(std::net::Ipv4Addr::LOCALHOST.into());
    let (server, client) = tokio::join!(
        TlsAcceptor::from(server_tls).accept(server_io),
        TlsConnector::from(client_tls).connect(name, client_io)
    );
    let server = server.expect("server handshake");
    (
        cork.gate(server),
        client.expect("client handshake"),
        written,
    )
}

/// HTTP/2 over [`tls_pair`], the server's TLS buffer cut to 16 KiB and the
/// client's windows wide (1 MiB a stream); the client's connection runs
/// in a task of its own, the server's is the caller's to drive.
async fn h2_over_a_small_tls_buffer(
    cork: &mut Cork,
    pipe: usize,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::server::Connection<ServerSide, Bytes>,
    Arc<Written>,
) {
    let (server_io, client_io, written) = tls_pair(cork, pipe).await;
    server_io
        .stream()
        .get_mut()
        .1
        .set_buffer_limit(Some(16 << 10));
    let mut client_builder = h2::client::Builder::new();
    client_builder
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let (client, server) = tokio::join!(
        client_builder.handshake::<_, Bytes>(client_io),
        h2::server::handshake(server_io)
    );
    let (send, client) = client.expect("client h2");
    tokio::spawn(async move {
        let _ = client.await;
    });
    (send, server.expect("server h2"), written)
}

/// `count` streams over [`tls_pair`], each answered with response headers
/// through `cork` (not sent yet): the server's connection, the caller's
/// to drive from here; the server's ends of the streams; the client's
/// responses to come; what reached the server's transport.
async fn answered_streams(
    cork: &mut Cork,
    count: usize,
) -> (
    h2::server::Connection<ServerSide, Bytes>,
    Vec<h2::SendStream<Bytes>>,
    Vec<h2::client::ResponseFuture>,
    Arc<Written>,
) {
    let (server_io, client_io, written) = tls_pair(cork, 1 << 20).await;
    let (client, server) = tokio::join!(
        h2::client::handshake(client_io),
        h2::server::handshake(server_io)
    );
    let (mut send, client) = client.expect("client h2");
    let mut server = server.expect("server h2");
    tokio::spawn(async move {
        let _ = client.await;
    });
    let mut responses = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..count {
        let request = http::Request::post("https://server/").body(()).unwrap();
        send = send.ready().await.unwrap();
        let (response, _) = send.send_request(request, false).unwrap();
        responses.push(response);
        let (_, mut respond) =
            std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx)))
                .await
                .expect("a stream")
                .expect("a request");
        senders.push(
            respond
                .send_response(http::Response::new(()), false)
                .unwrap(),
        );
    }
    (server, senders, responses, written)
}

/// Whether a task was woken.
#[derive(Default)]
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls `poll` once as [`Cork::drive`] does, with a waker that records
/// whether it was woken.
fn turn<R>(cork: &Cork, poll: impl FnMut(&mut Context<'_>) -> Poll<R>) -> (Poll<R>, bool) {
    let woken = Arc::new(Woken::default());
    let waker = std::task::Waker::from(woken.clone());
    let result = cork.drive(&mut Context::from_waker(&waker), poll);
    (result, woken.0.load(Ordering::Relaxed))
}

#[tokio::test]
async fn frames_of_several_streams_sent_in_one_turn_leave_in_one_write() {
    // Fails rather than hangs if a turn leaves bytes behind.
    let test = async {
        let mut cork = Cork::default();
        let (mut server, mut senders, responses, written) = answered_streams(&mut cork, 4).await;
        // One turn sends the response headers.
        std::future::poll_fn(|cx| {
            let _ = cork.drive(cx, |cx| server.poll_accept(cx));
            Poll::Ready(())
        })
        .await;
        let mut bodies = Vec::new();
        for response in responses {
            bodies.push(response.await.expect("a response").into_body());
        }
        // Every stream has 4 KiB to send; one turn of the connection's task
        // sends them all.
        for (i, sender) in senders.iter_mut().enumerate() {
            sender
                .send_data(Bytes::from(vec![i as u8; 4096]), false)
                .unwrap();
        }
        let before = written.writes();
        let (result, _) = turn(&cork, |cx| server.poll_accept(cx));
        assert!(result.is_pending(), "no new stream");
        assert_eq!(written.writes() - before, 1, "four DATA frames, one write");
        assert!(!cork.flags.unflushed.load(Relaxed), "nothing left held");
        tokio::spawn(async move {
            loop {
                std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx))).await;
            }
        });
        for (i, mut body) in bodies.into_iter().enumerate() {
            let mut got = Vec::new();
            while got.len() < 4096 {
                let chunk = body.data().await.expect("data").expect("no error");
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, vec![i as u8; 4096], "stream {i}");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), test)
        .await
        .expect("the connection keeps moving");
}

/// Tunnels that run one after another on a work-stealing worker each wake
/// the connection's task next (tokio's LIFO slot), a turn and a write
/// per frame; once deferring has shown that it pays, their frames leave
/// together, and none is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn frames_of_tunnels_that_run_in_a_row_share_a_write_on_the_work_stealing_runtime() {
    // Not a divisor of the probing period, so that a probe lands within
    // a round rather than on its last frame, which nothing follows.
    const TUNNELS: usize = 6;
    const ROUNDS: usize = 150;
    const MEASURED: usize = 100;
    let test = async {
        let mut cork = Cork::default();
        assert!(cork.batching.is_some(), "work-stealing: flushes may wait");
        let (mut server, senders, responses, written) = answered_streams(&mut cork, TUNNELS).await;
        tokio::spawn(async move {
            loop {
                std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx))).await;
            }
        });
        let (received_tx, mut received) = tokio::sync::mpsc::unbounded_channel();
        for response in responses {
            let mut body = response.await.expect("a response").into_body();
            let received_tx = received_tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    let _ = received_tx.send(chunk.len());
                }
            });
        }
        // Each tunnel sends 16 bytes a round, woken with the others.
        let (round_tx, round_rx) = tokio::sync::watch::channel(0usize);
        for mut sender in senders {
            let mut round_rx = round_rx.clone();
            tokio::spawn(async move {
                while round_rx.changed().await.is_ok() {
                    sender
                        .send_data(Bytes::from_static(&[7; 16]), false)
                        .unwrap();
                }
            });
        }
        let round_tx = Arc::new(round_tx);
        let mut writes_before_measuring = 0;
        for round in 1..=ROUNDS {
            if round == ROUNDS - MEASURED + 1 {
                writes_before_measuring = written.writes();
            }
            // Woken from a task on the worker, as the peers' data would.
            let round_tx = round_tx.clone();
            tokio::spawn(async move { round_tx.send_replace(round) });
            let mut bytes = 0;
            while bytes < TUNNELS * 16 {
                bytes += received.recv().await.expect("the readers run");
            }
        }
        let writes = written.writes() - writes_before_measuring;
        assert!(
            writes <= 3 * MEASURED,
            "{writes} writes for {MEASURED} rounds of {TUNNELS} frames"
        );
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), test)
        .await
        .expect("every round's frames arrive");
}

#[tokio::test]
async fn a_turn_that_returns_a_result_still_sends_what_it_wrote() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    let before = written.writes();
    let (result, woken) = turn(&cork, |cx| {
        for part in [&b"one "[..], b"turn"] {
            let wrote = Pin::new(&mut server).poll_write(cx, part);
            assert!(matches!(wrote, Poll::Ready(Ok(4))), "TLS takes the bytes");
            assert!(Pin::new(&mut server).poll_flush(cx).is_ready());
        }
        assert_eq!(written.writes(), before, "nothing written while corked");
        Poll::Ready(())
    });
    assert!(result.is_ready());
    assert!(!woken, "nothing was turned away: no need to come back");
    assert_eq!(written.writes(), before + 1, "one write");
    let mut got = [0u8; 8];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one turn");
}

#[tokio::test]
async fn a_deferred_write_leaves_with_the_next_turn() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    let before = written.writes();
    let waker = std::task::Waker::noop();
    let deferred = cork.defer(&mut Context::from_waker(waker), |cx| {
        let wrote = Pin::new(&mut server).poll_write(cx, b"preface ");
        assert!(Pin::new(&mut server).poll_flush(cx).is_ready());
        wrote
    });
    assert!(
        matches!(deferred, Poll::Ready(Ok(8))),
        "TLS takes the bytes"
    );
    assert_eq!(written.writes(), before, "a deferred write is not sent");
    let (result, _) = turn(&cork, |cx| {
        Pin::new(&mut server).poll_write(cx, b"settings")
    });
    assert!(matches!(result, Poll::Ready(Ok(8))));
    assert_eq!(written.writes(), before + 1, "both in the turn's one write");
    let mut got = [0u8; 16];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"preface settings");
}

#[tokio::test]
async fn a_handshake_that_must_wait_sends_what_it_wrote_first() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    let before = written.writes();
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    // Finished at once: the write waits for the next turn.
    let done = cork.defer_unless_waiting(&mut cx, |cx| {
        let wrote = Pin::new(&mut server).poll_write(cx, b"settings ");
        assert!(Pin::new(&mut server).poll_flush(cx).is_ready());
        wrote.map_ok(|_| ())
    });
    assert!(matches!(done, Poll::Ready(Ok(()))));
    assert_eq!(written.writes(), before, "held for the next turn");
    // Waiting for the peer: what it wrote leaves now, the held bytes too.
    let waiting = cork.defer_unless_waiting(&mut cx, |cx| {
        let wrote = Pin::new(&mut server).poll_write(cx, b"again");
        assert!(matches!(wrote, Poll::Ready(Ok(5))));
        assert!(Pin::new(&mut server).poll_flush(cx).is_ready());
        Poll::<()>::Pending
    });
    assert!(waiting.is_pending());
    assert_eq!(written.writes(), before + 1, "sent in one write");
    let mut got = [0u8; 14];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"settings again");
}

#[tokio::test]
async fn a_turn_that_writes_past_the_limit_is_sent_as_it_goes() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    server
        .stream()
        .get_mut()
        .1
        .set_buffer_limit(Some(crate::tls::SEND_BUFFER));
    let before = written.writes();
    let chunk = [3u8; 16 << 10];
    let chunks = 2 * CORK_LIMIT / chunk.len();
    let (result, woken) = turn(&cork, |cx| {
        for i in 0..chunks {
            let wrote = Pin::new(&mut server).poll_write(cx, &chunk);
            assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == chunk.len()));
            assert!(Pin::new(&mut server).poll_flush(cx).is_ready());
            let corked = (i + 1) * chunk.len() < CORK_LIMIT;
            assert_eq!(
                written.writes() == before,
                corked,
                "after {} KiB",
                (i + 1) * 16
            );
        }
        Poll::Ready(())
    });
    assert!(result.is_ready());
    assert!(!woken);
    // What came before the limit in one write, then a write per flush.
    assert_eq!(
        written.writes() - before,
        1 + chunks - CORK_LIMIT / chunk.len()
    );
    let mut got = vec![0u8; chunks * chunk.len()];
    client.read_exact(&mut got).await.unwrap();
    assert!(got.iter().all(|&b| b == 3));
}

#[tokio::test]
async fn records_left_in_tls_by_an_uncorked_write_leave_with_a_later_turn() {
    // Past the limit a turn goes on uncorked, as h2 writes a frame and
    // flushes. Once the socket fills, rustls keeps the rest of a frame's
    // records and h2's flush waits for the socket. When the socket drains,
    // the next turn's flush is corked and answered at once: the turn's own
    // flush must send those records, or they wait for the next frame (a
    // keepalive PING, seconds later) while the peer waits for them.
    let mut cork = Cork::default();
    let pipe = CORK_LIMIT + (32 << 10);
    let (mut server, mut client, _) = tls_pair(&mut cork, pipe).await;
    server
        .stream()
        .get_mut()
        .1
        .set_buffer_limit(Some(crate::tls::SEND_BUFFER));
    let chunk = [7u8; 16 << 10];
    let mut taken = 0;
    let mut flushed_uncorked = false;
    let (result, _) = turn(&cork, |cx| {
        while taken < 4 * pipe {
            match Pin::new(&mut server).poll_write(cx, &chunk) {
                Poll::Ready(wrote) => taken += wrote.expect("no error"),
                Poll::Pending => break,
            }
            // As h2 does after each DATA frame.
            let flushed = Pin::new(&mut server).poll_flush(cx);
            if flushed.is_pending() {
                break;
            }
            flushed_uncorked |= taken > CORK_LIMIT;
        }
        Poll::<()>::Pending
    });
    assert!(result.is_pending());
    assert!(flushed_uncorked, "a flush past the limit finished");
    assert!(taken < 4 * pipe, "the socket filled");
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..50 {
        if got == taken {
            break;
        }
        // The peer reads what it can; the socket drains, and the
        // connection's next turn has nothing new to write.
        if let Ok(read) =
            tokio::time::timeout(std::time::Duration::from_millis(20), client.read(&mut buf)).await
        {
            got += read.expect("no error");
        }
        let _ = turn(&cork, |cx| {
            assert!(Pin::new(&mut server).poll_flush(cx).is_ready(), "corked");
            Poll::<()>::Pending
        });
    }
    assert_eq!(got, taken, "every byte TLS took arrived");
}

#[tokio::test]
async fn a_turn_turned_away_by_a_full_tls_buffer_comes_back() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    server.stream().get_mut().1.set_buffer_limit(Some(16 << 10));
    let before = written.writes();
    let chunk = [5u8; 4096];
    let mut taken = 0;
    let (result, woken) = turn(&cork, |cx| {
        while let Poll::Ready(wrote) = Pin::new(&mut server).poll_write(cx, &chunk) {
            taken += wrote.expect("no error");
        }
        Poll::Ready(())
    });
    assert!(result.is_ready());
    assert!(
        (12 << 10..=16 << 10).contains(&taken),
        "TLS took what its buffer holds: {taken}"
    );
    assert!(woken, "the turn stopped short: its task must come back");
    assert_eq!(written.writes(), before + 1, "one write");
    let mut got = vec![0u8; taken];
    client.read_exact(&mut got).await.unwrap();
    assert!(got.iter().all(|&b| b == 5));
}

#[tokio::test]
async fn a_turn_stopped_short_by_a_full_tls_buffer_is_finished() {
    let mut cork = Cork::default();
    let (mut send, mut server, written) = h2_over_a_small_tls_buffer(&mut cork, 1 << 20).await;
    let request = http::Request::post("https://server/").body(()).unwrap();
    send = send.ready().await.unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    let (_, mut respond) = std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx)))
        .await
        .expect("a stream")
        .expect("a request");
    let mut sender = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    let size = 256 << 10;
    sender
        .send_data(Bytes::from(vec![9u8; size]), true)
        .unwrap();
    // One turn, in which rustls' 16 KiB buffer fills long before h2 is
    // done; windows are wide and the pipe takes all, so no wake-up would
    // come from outside: the turn itself must finish the work.
    let before = written.bytes();
    let (result, _) = turn(&cork, |cx| server.poll_accept(cx));
    assert!(result.is_pending());
    assert!(
        written.bytes() - before > size,
        "the whole body left in that turn: {} bytes",
        written.bytes() - before
    );
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx))).await;
    });
    let mut body = response.await.expect("a response").into_body();
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        got += chunk.expect("no error").len();
    }
    assert_eq!(got, size);
}

#[tokio::test]
async fn a_turn_that_fills_the_tls_buffer_loses_nothing() {
    // Four streams of 256 KiB through a pipe of 8 KiB: writes are refused
    // by the cork, by rustls and by the pipe in turn; the client's window
    // updates wake the server too.
    let mut cork = Cork::default();
    let (mut send, mut server, _) = h2_over_a_small_tls_buffer(&mut cork, 8 << 10).await;
    let streams = 4;
    let size = 256 << 10;
    let server_task = tokio::spawn(async move {
        for i in 0..streams {
            let (_, mut respond) =
                std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx)))
                    .await
                    .expect("a stream")
                    .expect("a request");
            let mut sender = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            sender
                .send_data(Bytes::from(vec![i as u8; size]), true)
                .unwrap();
        }
        // Drives the connection while the client reads.
        let _ = std::future::poll_fn(|cx| cork.drive(cx, |cx| server.poll_accept(cx))).await;
    });
    let mut bodies = Vec::new();
    for _ in 0..streams {
        let request = http::Request::post("https://server/").body(()).unwrap();
        send = send.ready().await.unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        bodies.push(response);
    }
    let read_all = async {
        // Kept to the end: a body dropped gives its capacity back, and the
        // WINDOW_UPDATE that sends would wake the server.
        let mut read = Vec::new();
        for (i, response) in bodies.into_iter().enumerate() {
            let mut body = response.await.expect("a response").into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("no error");
                body.flow_control().release_capacity(chunk.len()).unwrap();
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got.len(), size, "stream {i}");
            assert!(got.iter().all(|&b| b == i as u8), "stream {i}");
            read.push(body);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read_all)
        .await
        .expect("every byte arrives");
    server_task.abort();
}

#[tokio::test]
async fn uncorked_the_layers_pass_everything_through() {
    let mut cork = Cork::default();
    let (mut server, mut client, written) = tls_pair(&mut cork, 1 << 20).await;
    let before = written.writes();
    server.write_all(b"one").await.unwrap();
    server.flush().await.unwrap();
    server.write_all(b"two").await.unwrap();
    server.flush().await.unwrap();
    assert_eq!(written.writes() - before, 2);
    let mut got = [0u8; 6];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"onetwo");
    server.shutdown().await.unwrap();
    assert_eq!(client.read(&mut got).await.unwrap(), 0, "close_notify");
}

#[tokio::test]
async fn a_clients_last_handshake_flight_leaves_with_its_first_write() {
    let (server_tls, client_tls) = tls_configs();
    let (server_io, client_io) = duplex(1 << 20);
    let written = Arc::new(Written::default());
    let mut cork = Cork::default();
    let client_io = cork.hold(Counting {
        inner: client_io,
        written: written.clone(),
    });
    let name = crate::tls::placeholder_server_name(std::net::Ipv4Addr::LOCALHOST.into());
    let connect = TlsConnector::from(client_tls).connect(name, client_io);
    let client = async {
        let client = cork
            .keeping_writes(connect)
            .await
            .expect("client handshake");
        // The ClientHello went out when the handshake read the answer; the
        // last flight is still kept.
        assert_eq!(written.writes(), 1, "only the ClientHello sent");
        let hello_bytes = written.bytes();
        let mut client = cork.gate(client);
        let before = written.writes();
        // As a connection starts: the HTTP/2 preface deferred, then the
        // first turn, whose end sends everything.
        let waker = std::task::Waker::noop();
        let deferred = cork.defer(&mut Context::from_waker(waker), |cx| {
            Pin::new(&mut client).poll_write(cx, b"first ")
        });
        assert!(matches!(deferred, Poll::Ready(Ok(6))));
        assert_eq!(
            written.writes(),
            before,
            "nothing sent before the first turn"
        );
        let (turned, _) = turn(&cork, |cx| Pin::new(&mut client).poll_write(cx, b"request"));
        assert!(matches!(turned, Poll::Ready(Ok(7))));
        assert_eq!(
            written.writes(),
            before + 1,
            "the last flight, the preface and the turn's frames in one write"
        );
        assert!(
            written.bytes() > hello_bytes + 1000,
            "the certificate went with it"
        );
        assert_eq!(written.empty.load(Ordering::Relaxed), 0, "no empty write");
        client
    };
    let server = async {
        let mut server = TlsAcceptor::from(server_tls)
            .accept(server_io)
            .await
            .expect("server handshake");
        let mut got = [0u8; 13];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first request");
        server
    };
    let test = async { tokio::join!(client, server) };
    tokio::time::timeout(std::time::Duration::from_secs(10), test)
        .await
        .expect("the handshake completes");
}

/// A transport that takes at most five bytes a write, in order.
#[derive(Default)]
struct Trickle {
    got: Vec<u8>,
}

impl AsyncWrite for Trickle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let taken: Vec<u8> = bufs
            .iter()
            .flat_map(|b| b.iter().copied())
            .take(5)
            .collect();
        this.got.extend_from_slice(&taken);
        Poll::Ready(Ok(taken.len()))
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

#[test]
fn kept_bytes_go_first_and_count_apart_when_the_transport_takes_a_few() {
    let cork = Cork::default();
    let mut hold = cork.hold(Trickle::default());
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    cork.flags.keeping.store(true, Relaxed);
    let kept = Pin::new(&mut hold).poll_write(&mut cx, b"the last flight, ");
    assert!(matches!(kept, Poll::Ready(Ok(17))), "taken while keeping");
    assert!(hold.inner.got.is_empty(), "nothing sent while keeping");
    cork.flags.keeping.store(false, Relaxed);
    let mut rest: &[u8] = b"then a request";
    while !rest.is_empty() {
        let half = rest.len() / 2;
        let bufs = [
            io::IoSlice::new(&rest[..half]),
            io::IoSlice::new(&rest[half..]),
        ];
        match Pin::new(&mut hold).poll_write_vectored(&mut cx, &bufs) {
            Poll::Ready(Ok(n)) => {
                assert!(
                    n > 0 && n <= rest.len(),
                    "a count of the caller's bytes: {n}"
                );
                rest = &rest[n..];
            }
            other => panic!("the transport always takes bytes: {other:?}"),
        }
    }
    assert_eq!(hold.inner.got, b"the last flight, then a request");
    assert!(hold.kept.is_empty());
}
