//! Control-frame floods: SETTINGS and PING frames, each demanding an ACK,
//! sent without ever reading the ACKs. h2 writes each ACK before it reads
//! the next frame, so once the ACKs back up the server stops reading and
//! TCP pushes back on the flooder; before that, the control-frame budget
//! closes the connection (`control_frames.rs` has floods from clients that
//! do read). Either way memory and CPU stay bounded.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use hbone::ServerConfig;

use super::support::*;
use super::wire::*;
use crate::common::*;

const MIB: u64 = 1 << 20;

/// How a flood ended.
#[derive(Debug)]
struct Flooded {
    frames: usize,
    /// The server stopped reading: a write made no progress for 1 s.
    stalled: bool,
    /// The server closed the connection: the write error.
    closed: Option<String>,
    took: Duration,
}

/// Writes `unit` over and over, 256 copies per write, never reading, until
/// the server stops reading, closes, or `max_frames` have gone in.
async fn flood(tls: &mut Tls, unit: &[u8], max_frames: usize) -> Flooded {
    const PER_WRITE: usize = 256;
    let batch = unit.repeat(PER_WRITE);
    let started = Instant::now();
    let mut frames = 0;
    while frames < max_frames && started.elapsed() < 10 * SECOND {
        match tokio::time::timeout(SECOND, tls.write_all(&batch)).await {
            Err(_) => {
                return Flooded {
                    frames,
                    stalled: true,
                    closed: None,
                    took: started.elapsed(),
                };
            }
            Ok(Err(e)) => {
                return Flooded {
                    frames,
                    stalled: false,
                    closed: Some(e.to_string()),
                    took: started.elapsed(),
                };
            }
            Ok(Ok(())) => frames += PER_WRITE,
        }
    }
    Flooded {
        frames,
        stalled: false,
        closed: None,
        took: started.elapsed(),
    }
}

/// Runs one flood of `unit` frames against a fresh server, beside a healthy
/// tunnel, from a client with a small receive buffer that never reads.
async fn flood_case(what: &str, unit: Vec<u8>) {
    const MAX_FRAMES: usize = 2_000_000;
    let _gate = alone().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = within(5 * SECOND, "TCP connect", socket.connect(server.addr))
        .await
        .unwrap();
    let mut tls = h2_handshake(tcp, &pki).await;
    let rss_before = rss_bytes();

    let flooded = flood(&mut tls, &unit, MAX_FRAMES).await;
    let growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "{what} flood: {flooded:?} ({} KiB written); memory grew {} KiB",
        (flooded.frames * unit.len()) >> 10,
        growth >> 10
    );
    assert!(
        flooded.stalled || flooded.closed.is_some(),
        "{what}: the server took all {} frames without pushing back",
        flooded.frames
    );
    assert!(flooded.took < 10 * SECOND);
    assert!(
        growth < 64 * MIB,
        "{what}: memory grew {} MiB during the flood",
        growth / MIB
    );

    // The flooder is stalled (or gone); everyone else carries on.
    alongside
        .assert_flowing(&format!("during the {what} flood"))
        .await;
    assert_serves(&server, &pki).await;
    drop(tls);
    settle(&server, 1).await;
    alongside.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_bounded() {
    flood_case("PING", frame(PING, 0, 0, b"floodme!")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_bounded() {
    // Five settings per frame, all valid, each frame needing an ACK.
    let mut settings = Vec::new();
    for (id, value) in [(1u16, 4096u32), (2, 0), (3, 100), (4, 65_535), (5, 16_384)] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&value.to_be_bytes());
    }
    flood_case("SETTINGS", frame(SETTINGS, 0, 0, &settings)).await;
}

/// The slow-read attack: a client opens a tunnel to a target that sends as
/// fast as it can, keeps reading the TLS connection (so TCP never pushes
/// back) but never sends WINDOW_UPDATE. The server sends no more than the
/// 65,535 bytes the client's default window allows, stops reading from the
/// target, and buffers nothing in between; granting window resumes the
/// flow by exactly what was granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_grants_window_gets_no_more_than_its_window() {
    const WINDOW: usize = 65_535;
    let _gate = alone().await;
    let pki = Pki::new();
    let server = start_server(ServerConfig::new(loopback(), pki.server.clone())).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, hosed) = firehose().await;
    let rss_before = rss_bytes();
    let mut wire = Wire::open(server.addr, &pki).await;
    let block = connect_block(&target.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));

    let hosed = within(15 * SECOND, "the target to stall", hosed)
        .await
        .expect("the firehose target reports");
    // The server has answered everything sent so far: what it would send
    // beyond the window would be here.
    wire.round_trip().await;
    let received = wire.data_of(1).0.len();
    let growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "window never granted: target wrote {} KiB before stalling ({hosed:?}), \
         client got {received} bytes, memory grew {} KiB",
        hosed.written >> 10,
        growth >> 10
    );
    assert!(hosed.stalled, "the target was never pushed back: {hosed:?}");
    assert!(
        hosed.written < 64 * MIB,
        "the server took {} MiB from the target for a client that reads nothing",
        hosed.written / MIB
    );
    assert!(
        received <= WINDOW,
        "{received} bytes sent against a {WINDOW}-byte window"
    );
    assert!(
        growth < 32 * MIB,
        "memory grew {} MiB for one stalled tunnel",
        growth / MIB
    );
    alongside
        .assert_flowing("while the slow reader stalls")
        .await;

    // Granting 1 MiB on the stream and the connection lets exactly that through.
    let grant = 1 << 20;
    let updates = [window_update(0, grant), window_update(1, grant)].concat();
    wire.send(&updates).await.unwrap();
    let goal = WINDOW + grant as usize;
    assert!(
        wire.wait(5 * SECOND, |w| w.data_of(1).0.len() >= goal)
            .await,
        "the granted window was not used: {} bytes (end {:?})",
        wire.data_of(1).0.len(),
        wire.end
    );
    wire.round_trip().await;
    assert_eq!(
        wire.data_of(1).0.len(),
        goal,
        "bytes sent beyond the window"
    );
    drop(wire);
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Small DATA frames cost the server far more memory than the bytes they
/// carry. 1-byte DATA frames to a target that never reads: once the
/// kernel buffers toward the target are full, h2 holds the frames, and
/// cuts the connection off with GOAWAY(ENHANCE_YOUR_CALM) when their
/// overhead passes its budget, long before the 4 MiB window is used.
/// Empty DATA frames without END_STREAM (which carry nothing at all) are
/// cut off after 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_and_empty_data_frames_are_bounded() {
    const FRAMES: usize = 400_000;
    const PER_WRITE: usize = 1_000;
    let _gate = alone().await;
    let pki = Pki::new();
    let server = start_server(ServerConfig::new(loopback(), pki.server.clone())).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let deaf = deaf_target().await;
    let rss_before = rss_bytes();

    let mut wire = Wire::open(server.addr, &pki).await;
    let block = connect_block(&deaf.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));
    let batch = frame(DATA, 0, 1, b"x").repeat(PER_WRITE);
    let started = Instant::now();
    let mut sent = 0;
    while sent < FRAMES && started.elapsed() < 10 * SECOND {
        if wire.send(&batch).await.is_err() {
            break;
        }
        sent += PER_WRITE;
        wire.poll();
        if wire.goaway().is_some() || wire.end.is_some() {
            break;
        }
    }
    let closed = wire.wait_closed(5 * SECOND).await;
    let growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "1-byte DATA frames to a deaf target: {sent} written in {:?}, GOAWAY {:?}, \
         end {:?}, memory grew {} KiB",
        started.elapsed(),
        wire.goaway(),
        wire.end,
        growth >> 10
    );
    assert_eq!(wire.goaway().map(|g| g.1), Some(ENHANCE_YOUR_CALM));
    assert!(closed, "the connection stayed open after GOAWAY");
    assert!(
        growth < 64 * MIB,
        "memory grew {} MiB for tiny frames",
        growth / MIB
    );
    drop(wire);

    // Empty DATA frames, on a tunnel to an echo target.
    let (echo, _) = counting_echo().await;
    let mut wire = Wire::open(server.addr, &pki).await;
    let block = connect_block(&echo.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));
    wire.send(&frame(DATA, 0, 1, b"").repeat(200))
        .await
        .unwrap();
    let closed = wire.wait_closed(5 * SECOND).await;
    eprintln!("200 empty DATA frames: GOAWAY {:?}", wire.goaway());
    assert_eq!(wire.goaway().map(|g| g.1), Some(ENHANCE_YOUR_CALM));
    assert!(closed);
    drop(wire);

    alongside
        .assert_flowing("after the small-frame floods")
        .await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}
