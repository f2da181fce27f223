//! `H2Stream` over an in-memory HTTP/2 connection with small windows,
//! under paused time.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use h2::client::SendRequest;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::test_support::settle;

/// The flow-control window of each stream, both ways.
const WINDOW: usize = 16 << 10;

async fn stream_pair() -> (H2Stream, H2Stream, SendRequest<Bytes>) {
    crate::test_support::stream_pair(WINDOW as u32).await
}

/// The `i`th byte of the test data: position-dependent, so that lost,
/// repeated or reordered bytes show.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(start_paused = true)]
async fn bytes_go_through_both_ways() {
    let (mut client, mut server, _conn) = stream_pair().await;
    client.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    let data = pattern(3 * WINDOW + 7);
    let writer = tokio::spawn(async move {
        server.write_all(&pattern(3 * WINDOW + 7)).await.unwrap();
        server
    });
    let mut back = vec![0u8; data.len()];
    client.read_exact(&mut back).await.unwrap();
    assert!(back == data, "bytes lost or reordered");
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_short_read_keeps_the_rest_of_the_chunk() {
    let (mut client, mut server, _conn) = stream_pair().await;
    client.write_all(b"abcdef").await.unwrap();
    let mut two = [0u8; 2];
    for expected in [b"ab", b"cd", b"ef"] {
        let n = server.read(&mut two).await.unwrap();
        assert_eq!(&two[..n], expected);
    }
}

/// Reads the next chunk without returning its window to the peer.
async fn chunk(stream: &mut H2Stream) -> Bytes {
    std::future::poll_fn(|cx| stream.poll_chunk(cx))
        .await
        .unwrap()
        .expect("data, not the end")
}

#[tokio::test(start_paused = true)]
async fn the_window_is_given_back_only_once_the_application_has_read() {
    let (mut client, mut server, _conn) = stream_pair().await;
    let total = 4 * WINDOW;
    let accepted = Arc::new(AtomicUsize::new(0));
    let writer = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let data = pattern(total);
            while accepted.load(Ordering::Acquire) < total {
                let from = accepted.load(Ordering::Acquire);
                let n = client.write(&data[from..(from + 4096).min(total)]).await?;
                accepted.fetch_add(n, Ordering::AcqRel);
            }
            io::Result::Ok(client)
        })
    };
    settle().await;
    // Nobody reads: the writer stops at one window, however long it waits.
    assert_eq!(accepted.load(Ordering::Acquire), WINDOW);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(accepted.load(Ordering::Acquire), WINDOW);

    // Received by the server's h2 but not yet handed on: still no room.
    let mut received = Vec::new();
    while received.len() < WINDOW {
        received.extend_from_slice(&chunk(&mut server).await);
    }
    assert_eq!(received.len(), WINDOW, "no more than the window arrived");
    settle().await;
    assert_eq!(accepted.load(Ordering::Acquire), WINDOW);

    // Handed on: the writer gets exactly that much room again.
    server.release(WINDOW);
    settle().await;
    assert_eq!(accepted.load(Ordering::Acquire), 2 * WINDOW);

    // `read` hands on and gives back in one step.
    let mut rest = vec![0u8; total - WINDOW];
    server.read_exact(&mut rest).await.unwrap();
    received.extend_from_slice(&rest);
    assert!(received == pattern(total), "bytes lost or reordered");
    let client = writer.await.unwrap().unwrap();
    drop(client);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_one_direction_and_the_other_still_flows() {
    let (mut client, mut server, _conn) = stream_pair().await;
    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping", "END_STREAM reads as EOF after the data");
    assert!(!server.cancelled(), "an END_STREAM is no reset");

    // The other direction is untouched by the half-close.
    server.write_all(b"pong").await.unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"pong");

    // Our write side stays shut; shutting down again is harmless.
    let late = client.write(b"late").await.unwrap_err();
    assert_eq!(late.kind(), io::ErrorKind::BrokenPipe);
    client.shutdown().await.unwrap();

    server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_reset_with_cancel_or_no_error_reads_as_a_clean_end() {
    for reason in [Reason::CANCEL, Reason::NO_ERROR] {
        let (mut client, mut server, _conn) = stream_pair().await;
        server.write_all(b"last words").await.unwrap();
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
        server.reset(reason);
        let mut buf = [0u8; 16];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(n, 0, "{reason:?} reads as EOF");
        assert!(client.cancelled(), "{reason:?} is a cancel");
        // Writing into the ended stream is refused, and still no error
        // of the peer's.
        let write = client.write(b"more").await.unwrap_err();
        assert_eq!(write.kind(), io::ErrorKind::BrokenPipe, "{reason:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn any_other_reset_reads_as_a_connection_reset() {
    for reason in [
        Reason::CONNECT_ERROR,
        Reason::INTERNAL_ERROR,
        Reason::REFUSED_STREAM,
    ] {
        let (mut client, mut server, _conn) = stream_pair().await;
        server.reset(reason);
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await.unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::ConnectionReset, "{reason:?}");
        assert!(!client.cancelled(), "{reason:?} is no cancel");
        let write = client.write(b"more").await.unwrap_err();
        assert_eq!(write.kind(), io::ErrorKind::ConnectionReset, "{reason:?}");
        assert!(!client.cancelled());
    }
}

#[tokio::test(start_paused = true)]
async fn a_writer_blocked_on_the_window_learns_of_a_reset() {
    let (mut client, mut server, _conn) = stream_pair().await;
    let writer = tokio::spawn(async move {
        let result = client.write_all(&pattern(2 * WINDOW)).await;
        (result, client.cancelled())
    });
    settle().await;
    assert!(!writer.is_finished(), "blocked at the window");
    server.reset(Reason::CONNECT_ERROR);
    let (result, cancelled) = writer.await.unwrap();
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert!(!cancelled);
}
