//! Limits refuse new work cleanly without touching what runs; a drain lets
//! in-flight tunnels finish while nothing new gets in.

use std::time::Duration;

use crate::common::*;
use hbone::server::Limits;
use hbone::{DialError, Dialer, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn limited(pki: &Pki, limits: Limits) -> ServerConfig {
    ServerConfig::new(loopback(), pki.server.clone()).with_limits(limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_connection_limit_closes_new_connections_only() {
    let pki = Pki::new();
    let limits = Limits::default().with_max_connections_per_ip(1);
    let server = start_server(limited(&pki, limits)).await;
    let echo = start_echo().await;
    let first = Dialer::new(&pki.client).unwrap();
    let mut running = first
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    // A second dialer needs a second connection from the same IP.
    let second = Dialer::new(&pki.client).unwrap();
    let refused = second
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await;
    // The client's error says what likely happened, not "tls handshake eof".
    match refused {
        Err(hbone::DialError::Tls {
            failure: hbone::tls::TlsFailure::ClosedDuringHandshake,
            ..
        }) => {}
        other => panic!(
            "expected a close during the handshake, got {:?}",
            other.err()
        ),
    }
    assert_eq!(server.stats.snapshot().limit_refusals, 1);
    // The running tunnel is untouched.
    running.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    within(PEER_WAIT, "running: buf", running.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"still here");
    drop(running);
    drop(first);
    eventually("the first connection closed", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;
    let again = second
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(again, b"room again").await.unwrap(),
        b"room again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_limit_answers_503_and_frees_on_close() {
    let pki = Pki::new();
    let limits = Limits::default().with_max_tunnels(1);
    let server = start_server(limited(&pki, limits)).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let first = dialer.connect(server.addr, ids, echo).await.unwrap();
    match dialer.connect(server.addr, ids, echo).await {
        Err(DialError::Status { status, .. }) => assert_eq!(status.as_u16(), 503),
        Err(other) => panic!("expected 503, got {other}"),
        Ok(_) => panic!("the tunnel limit let a second tunnel in"),
    }
    assert_eq!(server.stats.snapshot().limit_refusals, 1);
    assert_eq!(echo_roundtrip(first, b"one").await.unwrap(), b"one");
    eventually("the first tunnel closed", || {
        server.stats.snapshot().tunnels_active == 0
    })
    .await;
    let next = dialer.connect(server.addr, ids, echo).await.unwrap();
    assert_eq!(echo_roundtrip(next, b"two").await.unwrap(), b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_accepting_and_lets_tunnels_finish() {
    let pki = Pki::new();
    let server = Server::bind(ServerConfig::new(loopback(), pki.server.clone()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let drainer = server.drainer();
    let running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut in_flight = dialer
        .connect(addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    in_flight.write_all(b"before ").await.unwrap();

    drainer.drain();
    // The listener closes as the drain starts: wait for that, not a while.
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a draining server accepts no new connections");
    assert!(!running.is_finished(), "a tunnel is still in flight");

    in_flight.write_all(b"and after the drain").await.unwrap();
    in_flight.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(
        PEER_WAIT,
        "in_flight: echoed",
        in_flight.read_to_end(&mut echoed),
    )
    .await
    .unwrap();
    assert_eq!(echoed, b"before and after the drain");
    drop(in_flight);
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("run() returns once the last tunnel has finished")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed_when_a_limit_is_set() {
    let pki = Pki::new();
    let records = std::sync::Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    let limit = Duration::from_secs(1);
    config.timeouts.tunnel_idle = Some(limit);
    config.access_log = records.clone();
    let server = start_server(config).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let mut busy = dialer.connect(server.addr, ids, echo).await.unwrap();
    let mut idle = dialer.connect(server.addr, ids, echo).await.unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    within(PEER_WAIT, "idle: one", idle.read_exact(&mut one))
        .await
        .unwrap();
    let last_byte = std::time::Instant::now();
    // The busy tunnel keeps moving bytes, a tick each fifth of the limit,
    // for longer than the limit.
    let ticks = tokio::spawn(async move {
        for _ in 0..8 {
            busy.write_all(b"tick").await.unwrap();
            let mut tick = [0u8; 4];
            within(PEER_WAIT, "busy: tick", busy.read_exact(&mut tick))
                .await
                .unwrap();
            tokio::time::sleep(limit / 5).await;
        }
        busy
    });
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("the idle tunnel must be closed");
    assert!(
        last_byte.elapsed() >= limit,
        "closed after {:?}, before the idle limit",
        last_byte.elapsed()
    );
    let busy = ticks.await.unwrap();
    assert!(
        ended.is_err(),
        "an idle close is a reset, not a clean EOF: {ended:?}"
    );
    assert_eq!(
        echo_roundtrip(busy, b"still busy").await.unwrap(),
        b"still busy"
    );
    eventually("the idle tunnel was logged", || {
        records.all().iter().any(|r| {
            matches!(
                &r.outcome,
                hbone::access::Outcome::Failed { end: hbone::access::End::IdleTimeout, detail }
                    if detail.contains("idle")
            )
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_tunnels_get_goaway_after_the_idle_limit() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connection_idle = Duration::from_millis(300);
    let server = start_server(config).await;
    let echo = start_echo().await;
    // A client that completes the handshakes and never opens a stream.
    let tls = raw_tls(server.addr, Some(&pki.client)).await.unwrap();
    let (_send, connection) = h2::client::handshake(tls).await.unwrap();
    let opened = std::time::Instant::now();
    // The connection ends (with GOAWAY then close; the client may see the
    // close as a broken pipe when it answers, so only the end is checked).
    let _ = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the server must close a connection that stays idle");
    assert!(
        opened.elapsed() >= Duration::from_millis(300),
        "closed after {:?}, before the idle limit",
        opened.elapsed()
    );
    // A connection carrying a tunnel stays, however long.
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tunnel = dialer
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    tunnel.write_all(b"alive").await.unwrap();
    let mut back = [0u8; 5];
    within(PEER_WAIT, "tunnel: back", tunnel.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"alive");
}
