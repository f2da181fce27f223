//! The admin endpoint's limits: at most 32 connections are served at once
//! and a client must send its request headers within 5 s, so idle or slow
//! clients cannot keep an operator or a probe out for long.

use std::time::{Duration, Instant};

use crate::common::loopback;
use hbone::admin::Admin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The endpoint's connection cap and header timeout (`admin.rs`).
const MAX_CONNECTIONS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: the machine may be loaded.
const SLACK: Duration = Duration::from_secs(10);

async fn start_admin() -> std::net::SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Admin::default().serve(listener));
    addr
}

/// Reads until the server closes; what it sent, or the error that ended it.
async fn read_until_closed(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    tokio::time::timeout(HEADER_TIMEOUT + SLACK, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")?;
    Ok(answer)
}

/// Sends a whole request and reads the answer's status line, however long
/// the server takes to get to it (bounded).
async fn healthz(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(tcp).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_request_is_served_at_once() {
    let admin = start_admin().await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    assert_eq!(healthz(&mut tcp).await, "HTTP/1.1 200 OK");
    assert!(
        started.elapsed() < HEADER_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}

/// Every slot taken by a client that sends nothing, or its headers a byte
/// at a time: one more client waits (it is not served beside them), the
/// header timeout closes them all, no sooner than it should, and the
/// waiting client is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_closed_after_the_header_timeout_and_free_their_slots() {
    let admin = start_admin().await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS - 1 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // A slow client: its request line, then a header byte every 200 ms.
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let drip = tokio::spawn(async move {
        let header = b"X-Slow: ".iter().chain([b'a'; 100].iter());
        for byte in header {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let closed = read_until_closed(&mut slow).await;
        (closed, started.elapsed())
    });

    // One more: connections are accepted in order, so every slot is
    // taken before this one's turn comes.
    let mut waiting = TcpStream::connect(admin).await.unwrap();
    let served = tokio::spawn(async move {
        let status = healthz(&mut waiting).await;
        (status, started.elapsed())
    });

    for mut tcp in idle {
        let closed = read_until_closed(&mut tcp).await;
        let after = started.elapsed();
        assert!(
            closed
                .as_ref()
                .is_ok_and(|sent| !sent.starts_with(b"HTTP/1.1 200"))
                || closed.is_err(),
            "an idle client got {closed:?}"
        );
        assert!(
            after >= HEADER_TIMEOUT,
            "idle client closed after {after:?}"
        );
    }
    let (closed, after) = drip.await.unwrap();
    assert!(
        closed
            .as_ref()
            .is_ok_and(|sent| !sent.starts_with(b"HTTP/1.1 200"))
            || closed.is_err(),
        "the slow client got {closed:?}"
    );
    assert!(
        after >= HEADER_TIMEOUT && after < HEADER_TIMEOUT + SLACK,
        "slow client closed after {after:?}"
    );
    let (status, after) = served.await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        after >= HEADER_TIMEOUT,
        "served after {after:?}, beside {MAX_CONNECTIONS} others"
    );
}
