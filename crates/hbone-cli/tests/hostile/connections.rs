//! A connection flood from one source address.

use std::time::Duration;

use hbone::ServerConfig;
use hbone::config::Timeouts;
use hbone::server::Limits;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::support::*;
use super::wire::{
    ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, NO_ERROR, PING, STATUS_200, Wire,
    connect_block, frame,
};
use crate::common::*;

/// With at most 5 connections per source IP and a healthy tunnel already
/// holding one from 127.0.0.1, 50 more TCP connections from 127.0.0.1: 4
/// are admitted (and wait for a TLS handshake), the other 46 are closed at
/// once, before any TLS work, and counted as limit refusals. The healthy
/// tunnel is untouched, and once the flood is gone the source gets in
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_from_one_ip_is_capped() {
    const PER_IP: usize = 5;
    const FLOOD: usize = 50;
    let _gate = shared().await;
    let pki = Pki::new();
    let config = ServerConfig::new(loopback(), pki.server.clone())
        .with_limits(Limits::default().with_max_connections_per_ip(PER_IP))
        // Long enough that the admitted flood connections stay open meanwhile.
        .with_timeouts(Timeouts::default().with_handshake(Duration::from_secs(10)));
    let server = start_server(config).await;
    let mut alongside = Alongside::open(&server, &pki).await;

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let tcp = tokio::time::timeout(SECOND, TcpStream::connect(server.addr))
            .await
            .expect("connect hung")
            .expect("the kernel accepts the TCP connection");
        flood.push(tcp);
    }
    wait_until("the flood refused", 5 * SECOND, || {
        server.stats.snapshot().limit_refusals == (FLOOD - (PER_IP - 1)) as u64
    })
    .await;

    // Which ones were closed: EOF (or reset) and no bytes, read on all of
    // them at once for 3 s; the admitted ones hear nothing for their 10 s
    // handshake timeout.
    let mut reads = tokio::task::JoinSet::new();
    for mut tcp in flood {
        reads.spawn(async move {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(3 * SECOND, tcp.read(&mut buf)).await;
            (tcp, read.map(|read| read.unwrap_or(0)))
        });
    }
    let (mut open, mut closed) = (0, 0);
    let mut flood = Vec::new();
    while let Some(read) = reads.join_next().await {
        let (tcp, read) = read.unwrap();
        match read {
            Err(_) => open += 1,
            Ok(0) => closed += 1,
            Ok(_) => panic!("a refused connection was sent bytes"),
        }
        flood.push(tcp);
    }
    let stats = server.stats.snapshot();
    eprintln!("connection flood: {open} admitted, {closed} closed at once, {stats:?}");
    assert_eq!(open, PER_IP - 1, "admitted beside the healthy tunnel");
    assert_eq!(closed, FLOOD - (PER_IP - 1));
    assert_eq!(stats.connections_active, PER_IP as u64);
    assert_eq!(
        stats.handshake_failures, 0,
        "no TLS work on refused connections"
    );

    alongside
        .assert_flowing("during the connection flood")
        .await;
    drop(flood);
    wait_until("the admitted flood connections closed", 5 * SECOND, || {
        server.stats.snapshot().connections_active == 1
    })
    .await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// A client that completes the handshakes and never opens a stream is
/// told to go with GOAWAY(NO_ERROR), read here off the wire, once the
/// connection has been idle for the limit, and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_goaway_no_error_after_the_limit() {
    const IDLE: Duration = Duration::from_millis(300);
    let _gate = shared().await;
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connection_idle = IDLE;
    let server = start_server(config).await;
    // Taken before the handshakes, so before the server's idle clock.
    let opened = std::time::Instant::now();
    let mut wire = Wire::open(server.addr, &pki).await;
    assert!(
        wire.wait(Duration::from_secs(10), |w| w.goaway().is_some())
            .await,
        "no GOAWAY for an idle connection: the connection ended with {:?}",
        wire.end
    );
    let after = opened.elapsed();
    assert!(
        after >= IDLE,
        "GOAWAY after {after:?}, before the idle limit"
    );
    assert_eq!(wire.goaway().map(|(_, code)| code), Some(NO_ERROR));
    assert_serves(&server, &pki).await;
}

/// A drain tells clients with GOAWAY(NO_ERROR), read here off the wire:
/// first one that refuses nothing yet, then (once the client answers the
/// server's PING) one whose last stream ID is the open tunnel's. That
/// tunnel still carries bytes both ways until it ends, and then the
/// connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_and_lets_the_open_stream_finish() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = hbone::Server::bind(ServerConfig::new(loopback(), pki.server.clone()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let drainer = server.drainer();
    let running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let mut wire = Wire::open(addr, &pki).await;
    let block = connect_block(&echo.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(PEER_WAIT, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));

    drainer.drain();
    let goaways = |w: &Wire| -> Vec<(u32, u32)> {
        w.frames
            .iter()
            .filter(|f| f.kind == GOAWAY)
            .map(|f| {
                let word =
                    |at: usize| u32::from_be_bytes(f.payload[at..at + 4].try_into().unwrap());
                (word(0) & 0x7fff_ffff, word(4))
            })
            .collect()
    };
    assert!(
        wire.wait(PEER_WAIT, |w| !goaways(w).is_empty()).await,
        "no GOAWAY on drain: {:?}",
        wire.end
    );
    assert_eq!(goaways(&wire)[0].1, NO_ERROR, "{:?}", goaways(&wire));
    // Answer the server's PINGs, as a client does, until the final GOAWAY.
    let deadline = tokio::time::Instant::now() + PEER_WAIT;
    let mut answered = 0;
    while !goaways(&wire).iter().any(|&(last, _)| last == 1) {
        assert!(
            tokio::time::Instant::now() < deadline && wire.end.is_none(),
            "no GOAWAY naming stream 1 after {answered} PING answers: {:?}, end {:?}",
            goaways(&wire),
            wire.end
        );
        let pings: Vec<Vec<u8>> = wire
            .frames
            .iter()
            .filter(|f| f.kind == PING && f.flags & ACK == 0)
            .skip(answered)
            .map(|f| f.payload.clone())
            .collect();
        for payload in pings {
            wire.send(&frame(PING, ACK, 0, &payload)).await.unwrap();
            answered += 1;
        }
        let seen = wire.frames.len();
        wire.wait(Duration::from_millis(100), |w| w.frames.len() > seen)
            .await;
    }
    assert!(
        goaways(&wire).iter().all(|&(_, code)| code == NO_ERROR),
        "{:?}",
        goaways(&wire)
    );

    // The open tunnel still works, both ways, to its end.
    wire.send(&frame(DATA, 0, 1, b"after the drain"))
        .await
        .unwrap();
    assert!(
        wire.wait(PEER_WAIT, |w| w.data_of(1).0 == b"after the drain")
            .await,
        "the open tunnel stopped carrying bytes: {:?}",
        wire.data_of(1)
    );
    wire.send(&frame(DATA, END_STREAM, 1, b"")).await.unwrap();
    assert!(
        wire.wait(PEER_WAIT, |w| w.data_of(1).1).await,
        "no END_STREAM"
    );
    assert!(
        wire.wait_closed(PEER_WAIT).await,
        "the drained connection stayed open"
    );
    within(PEER_WAIT, "run() to return once drained", running)
        .await
        .unwrap();
}
