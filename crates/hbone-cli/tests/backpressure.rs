//! A tunnel whose target stops reading must stall its sender instead of
//! buffering: memory stays within the flow-control windows, and other
//! tunnels on the same HTTP/2 connection keep flowing. (Alone in its test
//! binary, so the process's memory is this test's.)

mod common;

use std::time::Duration;

use common::*;
use hbone::Dialer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_stalls_the_sender_with_bounded_memory() {
    const MIB: u64 = 1 << 20;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;

    // A target that accepts and does not read until told to.
    let target = TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (start_reading, mut go) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let _ = (&mut go).await;
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n as u64;
        }
    });

    let dialer = Dialer::new(&pki.client).unwrap();
    let mut stalled = dialer
        .connect(
            server.addr,
            std::slice::from_ref(&pki.server_id),
            target_addr,
        )
        .await
        .unwrap();
    let rss_before = rss_bytes();

    // Push up to 256 MiB; stop when a write makes no progress for 2 s (a
    // loaded machine can pause a flowing write for a fraction of that).
    let block = payload(5, MIB as usize);
    let mut written = 0u64;
    while written < 256 * MIB {
        match tokio::time::timeout(Duration::from_secs(2), stalled.write(&block)).await {
            Ok(Ok(n)) => written += n as u64,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    let rss_stalled = rss_bytes();
    eprintln!(
        "stalled after {} KiB, RSS grew {} KiB",
        written >> 10,
        rss_stalled.saturating_sub(rss_before) >> 10
    );
    // Windows: 4 MiB per stream in h2, plus kernel socket buffers on the
    // way (not counted in RSS). Far from the 256 MiB we tried to send.
    assert!(
        written < 40 * MIB,
        "the sender was not stalled: {} MiB accepted",
        written / MIB
    );
    let growth = rss_stalled.saturating_sub(rss_before);
    assert!(
        growth < 24 * MIB,
        "memory grew by {} MiB while stalled",
        growth / MIB
    );

    // Still stalled a while later, and memory flat.
    let more = tokio::time::timeout(Duration::from_secs(1), stalled.write(&block)).await;
    assert!(more.is_err(), "a stalled tunnel accepted more data");
    assert!(rss_bytes().saturating_sub(rss_stalled) < 4 * MIB);

    // Another tunnel on the same connection flows meanwhile.
    let neighbour = dialer
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    let data = payload(6, 8 * MIB as usize);
    let back = tokio::time::timeout(Duration::from_secs(20), echo_roundtrip(neighbour, &data))
        .await
        .expect("the neighbouring tunnel stalled too")
        .unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    assert_eq!(
        server.stats.snapshot().connections_accepted,
        1,
        "both tunnels on one connection"
    );

    // The reader wakes up: everything written arrives, nothing lost.
    start_reading.send(()).unwrap();
    stalled.shutdown().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received, written);
}
