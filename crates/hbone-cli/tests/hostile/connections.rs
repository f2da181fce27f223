//! A connection flood from one source address.

use std::time::Duration;

use hbone::ServerConfig;
use hbone::config::Timeouts;
use hbone::server::Limits;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::support::*;
use super::wire::{NO_ERROR, Wire};
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

    // Which ones were closed: EOF (or reset) within 300 ms, no bytes.
    let (mut open, mut closed) = (0, 0);
    for tcp in &mut flood {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await {
            Err(_) => open += 1,
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("a refused connection was sent bytes"),
        }
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
