//! Tunnels sharing one HTTP/2 connection: how much window the server
//! grants a tunnel before it has measured anything, and that a tunnel
//! whose target stops reading cannot stop its neighbours. Driven by a raw
//! `h2` client, so the windows seen are the server's own.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use crate::raw_h2::raw_h2;
use bytes::Bytes;
use h2::SendStream;
use h2::client::SendRequest;
use hbone::ServerConfig;
use http::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// The first window a stream gets: the protocol's default, 64 KiB.
const FIRST_STREAM_WINDOW: usize = 65_535;
/// The largest stream window the server grants.
const LARGEST_STREAM_WINDOW: usize = 4 << 20;
/// How long a stream may wait for window before the test calls it stalled.
const STALL: Duration = Duration::from_secs(2);

async fn open(
    send: &SendRequest<Bytes>,
    target: SocketAddr,
) -> (SendStream<Bytes>, h2::RecvStream) {
    let mut send = send.clone().ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let (response, stream) = send.send_request(request, false).unwrap();
    let response = timeout(Duration::from_secs(10), response)
        .await
        .expect("the server answers CONNECT")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    (stream, response.into_body())
}

/// Waits up to `limit` for window on `stream`; `None` when none came.
async fn window(stream: &mut SendStream<Bytes>, want: usize, limit: Duration) -> Option<usize> {
    stream.reserve_capacity(want);
    if stream.capacity() > 0 {
        return Some(stream.capacity());
    }
    let next = std::future::poll_fn(|cx| stream.poll_capacity(cx));
    match timeout(limit, next).await {
        Ok(Some(Ok(n))) if n > 0 => Some(n),
        Ok(Some(Ok(_))) => Some(stream.capacity()).filter(|n| *n > 0),
        Ok(other) => panic!("the stream ended while waiting for window: {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunnel_holds_one_window_and_its_neighbour_keeps_going() {
    let pki = Pki::new();
    let server = start_server(ServerConfig::new(loopback(), pki.server.clone())).await;
    let echo = start_echo().await;
    // A target that accepts and never reads.
    let stalled = TcpListener::bind(loopback()).await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let (socket, _) = stalled.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(socket);
    });
    let send = raw_h2(server.addr, &pki).await;

    // Before anything is measured, a stream gets one small window.
    let (mut bulk, _bulk_recv) = open(&send, stalled_addr).await;
    let first = window(&mut bulk, 1 << 20, Duration::from_secs(10))
        .await
        .expect("a new stream gets window");
    assert!(
        first <= FIRST_STREAM_WINDOW,
        "first grant {first} bytes, more than {FIRST_STREAM_WINDOW}"
    );
    // Push until the target's socket is full and the window is spent.
    let mut pushed = 0usize;
    while let Some(n) = window(&mut bulk, 1 << 20, STALL).await {
        bulk.send_data(Bytes::from(vec![0x5a; n]), false).unwrap();
        pushed += n;
        assert!(pushed < 256 << 20, "the stalled tunnel never stalled");
    }
    assert!(pushed >= first, "{pushed}");

    // The neighbour on the same connection moves 4 MiB both ways, many
    // times what the stalled tunnel holds.
    let (mut tunnel, mut back) = open(&send, echo).await;
    let total = 4 << 20;
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = window(&mut tunnel, total - sent, Duration::from_secs(10))
                .await
                .expect("the neighbour is not held up by the stalled tunnel")
                .min(total - sent);
            tunnel.send_data(Bytes::from(vec![0xa5; n]), false).unwrap();
            sent += n;
        }
        tunnel.send_data(Bytes::new(), true).unwrap();
        tunnel
    });
    let mut echoed = 0;
    while echoed < total {
        let chunk = timeout(Duration::from_secs(10), back.data())
            .await
            .expect("the echo keeps coming")
            .expect("the tunnel stays open")
            .unwrap();
        assert!(chunk.iter().all(|b| *b == 0xa5));
        let _ = back.flow_control().release_capacity(chunk.len());
        echoed += chunk.len();
    }
    assert_eq!(echoed, total);
    timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer finished")
        .unwrap();
    // The stalled tunnel may have been granted more as the windows grew
    // (a new stream window applies to every stream), but never more than
    // the largest stream window.
    let mut more = 0usize;
    while let Some(n) = window(&mut bulk, 1 << 20, STALL).await {
        bulk.send_data(Bytes::from(vec![0x5a; n]), false).unwrap();
        more += n;
        assert!(more <= LARGEST_STREAM_WINDOW, "{more} bytes more");
    }
}
