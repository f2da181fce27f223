//! The dialer's connection pool, rule by rule, with real connections.

use std::time::Duration;

use crate::common::*;
use hbone::config::H2Settings;
use hbone::keepalive::Keepalive;
use hbone::{Dialer, DialerConfig, ServerConfig, Tunnel};

fn dialer_with(pki: &Pki, adjust: impl FnOnce(&mut DialerConfig)) -> Dialer {
    let mut config = DialerConfig::default();
    adjust(&mut config);
    Dialer::with_config(&pki.client, config).unwrap()
}

async fn open(
    dialer: &Dialer,
    server: std::net::SocketAddr,
    pki: &Pki,
    echo: std::net::SocketAddr,
) -> Tunnel {
    dialer
        .connect(server, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap()
}

async fn check(tunnel: Tunnel, text: &str) {
    assert_eq!(
        echo_roundtrip(tunnel, text.as_bytes()).await.unwrap(),
        text.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_tunnels_share_one_handshake() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (dialer, server_id, addr) = (dialer.clone(), pki.server_id.clone(), server.addr);
        tasks.push(tokio::spawn(async move {
            let tunnel = dialer.connect(addr, &[server_id], echo).await.unwrap();
            let text = format!("tunnel {i}");
            assert_eq!(
                echo_roundtrip(tunnel, text.as_bytes()).await.unwrap(),
                text.as_bytes()
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(server.stats.snapshot().connections_accepted, 1);
    assert_eq!(server.stats.snapshot().handshake_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_connection_opens_another_and_takes_tunnels_again_once_one_ends() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = dialer_with(&pki, |c| c.h2.max_concurrent_streams = 2);
    let first = open(&dialer, server.addr, &pki, echo).await;
    let second = open(&dialer, server.addr, &pki, echo).await;
    assert_eq!(server.stats.snapshot().connections_accepted, 1);
    let third = open(&dialer, server.addr, &pki, echo).await;
    assert_eq!(
        server.stats.snapshot().connections_accepted,
        2,
        "the first connection was full"
    );
    assert_eq!(dialer.pooled_connections(), 2);
    check(first, "one").await;
    // A slot is free again on the first connection: no third connection.
    let fourth = open(&dialer, server.addr, &pki, echo).await;
    assert_eq!(server.stats.snapshot().connections_accepted, 2);
    for (tunnel, text) in [(second, "two"), (third, "three"), (fourth, "four")] {
        check(tunnel, text).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_stream_limit_caps_ours() {
    let pki = Pki::new();
    let config = ServerConfig::new(loopback(), pki.server.clone())
        .with_h2(H2Settings::server().with_max_concurrent_streams(3));
    let server = start_server(config).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let tunnel = open(&dialer, server.addr, &pki, echo).await;
        tunnels.push(tunnel);
    }
    assert_eq!(server.stats.snapshot().connections_accepted, 1);
    tunnels.push(open(&dialer, server.addr, &pki, echo).await);
    assert_eq!(server.stats.snapshot().connections_accepted, 2);
    for (i, tunnel) in tunnels.into_iter().enumerate() {
        check(tunnel, &format!("capped {i}")).await;
    }
    assert_eq!(server.stats.snapshot().refusals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_the_idle_timeout() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = dialer_with(&pki, |c| c.idle_timeout = Duration::from_millis(300));
    let tunnel = open(&dialer, server.addr, &pki, echo).await;
    // Busy connections are not idle, however long the tunnel lasts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(dialer.pooled_connections(), 1);
    check(tunnel, "long-lived").await;
    eventually("idle connection closed by the dialer", || {
        dialer.pooled_connections() == 0
    })
    .await;
    eventually("server saw it close", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;
    check(open(&dialer, server.addr, &pki, echo).await, "after idle").await;
    assert_eq!(server.stats.snapshot().connections_accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_fails_keepalive_and_gets_no_new_tunnels() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let relay = Relay::start(server.addr).await;
    // PINGs every 100 ms; an answer may take 2 s, which a loaded machine
    // never needs, so a healthy path cannot fail it spuriously.
    let dialer = dialer_with(&pki, |c| {
        c.timeouts.keepalive = Keepalive::new(Duration::from_millis(100), Duration::from_secs(2))
    });
    let mut stuck = open(&dialer, relay.addr, &pki, echo).await;
    // Keepalive passes while the path is healthy: many PINGs answered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dialer.pooled_connections(), 1);

    relay.set(RelayMode::Freeze);
    eventually("keepalive retired the silent connection", || {
        dialer.pooled_connections() == 0
    })
    .await;
    // The tunnel on it fails promptly instead of hanging.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stuck, &mut buf),
    )
    .await
    .expect("a tunnel on a dead connection must not hang");
    assert!(read.is_err(), "{read:?}");
    // New tunnels get a new connection (new relay connections pass).
    check(open(&dialer, relay.addr, &pki, echo).await, "fresh").await;
    assert_eq!(server.stats.snapshot().connections_accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_is_never_handed_out() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let relay = Relay::start(server.addr).await;
    let dialer = Dialer::new(&pki.client).unwrap();
    check(open(&dialer, relay.addr, &pki, echo).await, "before").await;
    relay.set(RelayMode::Kill);
    eventually("dialer noticed the reset", || {
        dialer.pooled_connections() == 0
    })
    .await;
    check(open(&dialer, relay.addr, &pki, echo).await, "after").await;
    assert_eq!(server.stats.snapshot().connections_accepted, 2);
    assert_eq!(
        dialer.pooled_connections_retired(),
        0,
        "no tunnel was tried on the reset connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_just_died_is_replaced_without_failing_the_tunnel() {
    let pki = Pki::new();
    // No PING may touch the connection before the next CONNECT: neither a
    // keepalive of ours nor a window-sizing PING of either end, which the
    // data of the first tunnel sets off (and which the client answers, or
    // sends, once the relay below is armed, killing the connection early).
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone())
            .with_h2(H2Settings::server().with_adaptive_windows(false)),
    )
    .await;
    let echo = start_echo().await;
    let relay = Relay::start(server.addr).await;
    let dialer = dialer_with(&pki, |c| {
        c.timeouts.keepalive = Keepalive::new(Duration::from_secs(3600), Duration::from_secs(60));
        c.h2.adaptive_windows = false;
    });
    check(open(&dialer, relay.addr, &pki, echo).await, "before").await;
    // The connection dies the moment the next CONNECT goes out on it, so
    // the pool surely hands it out: the dialer must notice that the request
    // got no answer, retire the connection and use a fresh one.
    relay.set(RelayMode::ResetOnNextSend);
    assert_eq!(dialer.pooled_connections(), 1);
    check(open(&dialer, relay.addr, &pki, echo).await, "right after").await;
    assert_eq!(
        dialer.pooled_connections_retired(),
        1,
        "the tunnel went out on the dead connection first"
    );
    assert_eq!(
        server.stats.snapshot().connections_accepted,
        2,
        "and then on a new one"
    );
}

/// What a [`start_goaway_server`] saw.
#[derive(Default)]
struct GoawayLog {
    /// Connections accepted.
    connections: std::sync::atomic::AtomicUsize,
    /// Connections whose client has read the GOAWAY: it answered a PING
    /// sent after it, and frames are read in order.
    goaway_read: std::sync::atomic::AtomicUsize,
    /// Streams a client opened on a connection after its first one (the
    /// server refuses them).
    late_streams: std::sync::atomic::AtomicUsize,
}

/// A minimal HBONE server that sends GOAWAY on each connection right after
/// its first stream, but keeps accepting new connections.
async fn start_goaway_server(pki: &Pki) -> (std::net::SocketAddr, std::sync::Arc<GoawayLog>) {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let acceptor = raw_tls_acceptor(&pki.server);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(GoawayLog::default());
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            kept.connections.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let log = kept.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut connection = h2::server::handshake(tls).await.unwrap();
                let mut ping_pong = connection.ping_pong();
                let mut first = true;
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if !first {
                        log.late_streams.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    first = false;
                    let target: std::net::SocketAddr =
                        request.uri().authority().unwrap().as_str().parse().unwrap();
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    tokio::spawn(async move {
                        let mut stream = stream_as_io(send, request.into_body());
                        let mut target = tokio::net::TcpStream::connect(target).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut target).await;
                    });
                    // The GOAWAY is written before any PING queued after
                    // it, so the PING's answer means the client read it.
                    connection.graceful_shutdown();
                    let mut ping_pong = ping_pong.take().unwrap();
                    let log = log.clone();
                    tokio::spawn(async move {
                        if ping_pong.ping(h2::Ping::opaque()).await.is_ok() {
                            log.goaway_read.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_stops_new_streams_while_in_flight_ones_finish() {
    use std::sync::atomic::Ordering;
    let pki = Pki::new();
    let echo = start_echo().await;
    let (server, log) = start_goaway_server(&pki).await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let in_flight = open(&dialer, server, &pki, echo).await;
    eventually("the client read the GOAWAY", || {
        log.goaway_read.load(Ordering::SeqCst) == 1
    })
    .await;
    // The pool still holds the connection (its stream is in flight); the
    // dialer must not open a stream on it but retire it and dial anew.
    let next = tokio::time::timeout(Duration::from_secs(10), open(&dialer, server, &pki, echo))
        .await
        .expect("the second tunnel opens");
    assert_eq!(
        log.late_streams.load(Ordering::SeqCst),
        0,
        "a stream went out on the connection after its GOAWAY"
    );
    assert_eq!(
        dialer.pooled_connections_retired(),
        1,
        "the connection that sent GOAWAY was retired"
    );
    assert_eq!(
        log.connections.load(Ordering::SeqCst),
        2,
        "the second tunnel needed a new connection"
    );
    check(next, "new connection").await;
    check(in_flight, "finished on the old connection after GOAWAY").await;
}

/// A server address that never answers the SYN (its accept queue is full,
/// so the kernel drops new SYNs): 20 tunnels asked for at once share the
/// one dial and its failure, and all fail after about one connect timeout,
/// not one after another, 20 timeouts for the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_failed_dial_fail_together() {
    let pki = Pki::new();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(loopback()).unwrap();
    let full = socket.listen(1).unwrap();
    let black_hole = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(black_hole),
        );
        if let Ok(Ok(stream)) = attempt.await {
            fillers.push(stream);
        }
    }
    let limit = Duration::from_millis(500);
    let dialer = dialer_with(&pki, |c| c.timeouts.connect = limit);
    let started = std::time::Instant::now();
    let attempts = (0..20).map(|_| {
        let dialer = dialer.clone();
        let server_id = pki.server_id.clone();
        tokio::spawn(async move {
            let result = dialer
                .connect(black_hole, &[server_id], "127.0.0.1:9".parse().unwrap())
                .await;
            (result.err(), started.elapsed())
        })
    });
    let outcomes = tokio::time::timeout(
        Duration::from_secs(30),
        futures_join_all(attempts.collect()),
    )
    .await
    .expect("every attempt ends");
    for (error, took) in outcomes {
        assert!(
            matches!(
                error,
                Some(hbone::DialError::Timeout {
                    stage: hbone::client::Stage::Connect,
                    ..
                })
            ),
            "{error:?}"
        );
        assert!(took >= limit - Duration::from_millis(50), "{took:?}");
        assert!(took < limit * 4, "failed only after {took:?}");
    }
    drop((full, fillers));
}

/// Awaits every task, in order.
async fn futures_join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
