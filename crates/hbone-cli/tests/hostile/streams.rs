//! Abuse of streams: rapid reset (CVE-2023-44487) and more streams than
//! the server allows, all on one hand-written HTTP/2 connection.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hbone::ServerConfig;

use super::support::*;
use super::wire::*;
use crate::common::*;

/// Rapid reset: thousands of CONNECTs, each cancelled in the same write
/// that opens it. h2 counts streams reset before they were accepted and
/// answers GOAWAY(ENHANCE_YOUR_CALM); the loop ends in well under a
/// second, the server dials the target for only a few of the streams, and
/// the healthy tunnel on its own connection never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_with_few_dials() {
    const STREAMS: u32 = 5_000;
    const BATCH: u32 = 50;
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let block = connect_block(&target.to_string(), &[]);
    let mut wire = Wire::open(server.addr, &pki).await;

    let started = Instant::now();
    let (mut sent, mut write_error) = (0u32, None);
    while sent < STREAMS && started.elapsed() < 10 * SECOND {
        let mut batch = Vec::new();
        for i in sent..sent + BATCH {
            let id = 2 * i + 1;
            batch.extend(frame(HEADERS, END_HEADERS, id, &block));
            batch.extend(rst_stream(id, CANCEL));
        }
        if let Err(e) = wire.send(&batch).await {
            write_error = Some(e);
            break;
        }
        sent += BATCH;
        wire.poll();
        if wire.goaway().is_some() || wire.end.is_some() {
            break;
        }
    }
    let cut_off = wire.wait_closed(5 * SECOND).await;
    let took = started.elapsed();
    // Dials from streams accepted just before the cut-off end with their
    // tunnels: once only the tunnel alongside is open, all are counted.
    settle(&server, 1).await;
    wait_until("only the tunnel alongside open", 5 * SECOND, || {
        server.stats.snapshot().tunnels_active == 1
    })
    .await;
    let dialled = dials.load(Ordering::Acquire);
    // Most of what was written sat unread in socket buffers: the GOAWAY's
    // last stream id says how far the server actually went.
    let processed = wire.goaway().map(|(last, _)| last.div_ceil(2));
    eprintln!(
        "rapid reset: {sent} streams written in {took:?}; GOAWAY {:?} (last stream id, code), \
         so {processed:?} streams processed; end {:?}; write error {write_error:?}; \
         {dialled} target dials",
        wire.goaway(),
        wire.end
    );
    assert!(
        cut_off,
        "the server took {sent} open-and-reset streams and kept the connection"
    );
    // The server says why before it closes.
    let (_, code) = wire
        .goaway()
        .expect("the server sends GOAWAY before closing the flooding connection");
    assert_eq!(code, ENHANCE_YOUR_CALM, "GOAWAY code");
    let processed = processed.unwrap_or(sent);
    assert!(
        processed <= 200,
        "the server processed {processed} open-and-reset streams before stopping"
    );
    assert!(took < 5 * SECOND, "the rapid-reset loop ran for {took:?}");
    assert!(
        dialled <= processed as usize,
        "{dialled} target dials for {processed} cancelled streams"
    );
    alongside.assert_flowing("after the rapid reset").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Streams h2 must reset for protocol errors (CONNECT with `:path`): the
/// server resets 1,024 of them on one connection, one RST_STREAM
/// (PROTOCOL_ERROR) each, and answers the 1,025th with GOAWAY
/// (ENHANCE_YOUR_CALM), ending the connection. Nothing is dialled, and the
/// tunnel on its own connection never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_resets_past_1024_end_the_connection() {
    const LIMIT: u32 = 1_024;
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let malformed = connect_block(&target.to_string(), &[(":path", b"/")]);
    let mut wire = Wire::open(server.addr, &pki).await;
    let ids: Vec<u32> = (0..LIMIT).map(|i| 2 * i + 1).collect();
    // In rounds well under the 200 streams a connection may hold: a stream
    // h2 resets holds its place until its RST_STREAM is written, and one
    // refused for want of a place counts towards the same limit.
    for round in ids.chunks(128) {
        let opens: Vec<u8> = round
            .iter()
            .flat_map(|&id| frame(HEADERS, END_HEADERS, id, &malformed))
            .collect();
        wire.send(&opens).await.expect("writing malformed CONNECTs");
        let reset = wire
            .wait(10 * SECOND, |w| {
                round.iter().all(|&id| w.reset_of(id).is_some())
            })
            .await;
        assert!(
            reset,
            "streams {round:?} not all reset (end {:?})",
            wire.end
        );
    }
    let protocol_errors = ids
        .iter()
        .filter(|&&id| wire.reset_of(id) == Some(PROTOCOL_ERROR))
        .count();
    // No GOAWAY yet, after a PING answered once all 1,024 were read.
    wire.round_trip().await;
    assert_eq!(
        protocol_errors, LIMIT as usize,
        "streams reset with PROTOCOL_ERROR"
    );
    assert_eq!(wire.goaway(), None, "GOAWAY at the limit, not past it");

    let over = 2 * LIMIT + 1;
    wire.send(&frame(HEADERS, END_HEADERS, over, &malformed))
        .await
        .expect("writing the 1,025th malformed CONNECT");
    assert!(
        wire.wait_closed(5 * SECOND).await,
        "the connection is still open after 1,025 protocol errors"
    );
    let (_, code) = wire
        .goaway()
        .expect("the server sends GOAWAY before closing the connection");
    assert_eq!(code, ENHANCE_YOUR_CALM, "GOAWAY code");
    assert_eq!(
        wire.reset_of(over),
        None,
        "the stream past the limit was reset, not the connection ended"
    );
    assert_eq!(dials.load(Ordering::Acquire), 0, "target dials");
    alongside.assert_flowing("after the protocol errors").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Rapid reset paced so that the server accepts every stream before its
/// RST_STREAM arrives, with the target black-holed so that each dial is
/// still pending when the client cancels. Reset streams stop counting
/// against SETTINGS_MAX_CONCURRENT_STREAMS at once, so the work the server
/// does for them must stop too: dials still pending after their streams
/// were cancelled must never exceed the 200 streams a connection may hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streams_do_not_keep_their_dials() {
    const ROUNDS: u32 = 5;
    const PER_ROUND: u32 = 150;
    let _gate = shared().await;
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connect = Duration::from_secs(3);
    let server = start_server(config).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let hole = BlackHole::start().await;
    let block = connect_block(&hole.addr.to_string(), &[]);
    let mut wire = Wire::open(server.addr, &pki).await;

    let started = Instant::now();
    let mut peak = 0;
    for round in 0..ROUNDS {
        let ids: Vec<u32> = (0..PER_ROUND)
            .map(|i| 2 * (round * PER_ROUND + i) + 1)
            .collect();
        let opens: Vec<u8> = ids
            .iter()
            .flat_map(|&id| frame(HEADERS, END_HEADERS, id, &block))
            .collect();
        wire.send(&opens).await.unwrap();
        // Until the server has accepted this round and started dialling.
        let floor = PER_ROUND as usize * 9 / 10;
        let dialling = async {
            while hole.pending_dials() < floor {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let accepted = tokio::time::timeout(3 * SECOND, dialling).await.is_ok();
        peak = peak.max(hole.pending_dials());
        assert!(accepted, "round {round}: the server did not dial");
        let resets: Vec<u8> = ids.iter().flat_map(|&id| rst_stream(id, CANCEL)).collect();
        wire.send(&resets).await.unwrap();
        // The cancellations reach the dialling tasks, which give up their
        // dials at once: well before the 3 s connect timeout would.
        let abandoned = async {
            while hole.pending_dials() > 0 {
                peak = peak.max(hole.pending_dials());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let abandoned = tokio::time::timeout(2 * SECOND, abandoned).await.is_ok();
        assert!(
            abandoned,
            "round {round}: {} dials still pending 2 s after their streams were cancelled",
            hole.pending_dials()
        );
    }
    wire.poll();
    eprintln!(
        "paced reset: {} streams in {:?}, peak {peak} dials pending, {} now, GOAWAY {:?}",
        ROUNDS * PER_ROUND,
        started.elapsed(),
        hole.pending_dials(),
        wire.goaway()
    );
    assert!(
        peak <= 200,
        "{peak} dials pending for streams the client had already cancelled \
         (a connection may hold 200 streams)"
    );
    alongside.assert_flowing("after the paced resets").await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// 300 CONNECTs that never send a byte, on one connection whose limit is
/// 200 streams: the first 200 get 200, the rest RST_STREAM(REFUSED_STREAM)
/// without a dial. Other connections are served meanwhile, and closing the
/// connection releases the 200 tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused() {
    const STREAMS: u32 = 300;
    const LIMIT: u32 = 200;
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let block = connect_block(&target.to_string(), &[]);
    let mut wire = Wire::open(server.addr, &pki).await;
    let ids: Vec<u32> = (0..STREAMS).map(|i| 2 * i + 1).collect();
    let opens: Vec<u8> = ids
        .iter()
        .flat_map(|&id| frame(HEADERS, END_HEADERS, id, &block))
        .collect();
    wire.send(&opens).await.unwrap();

    let answered = |w: &Wire| {
        ids.iter()
            .all(|&id| w.response_of(id).is_some() || w.reset_of(id).is_some())
    };
    let all = wire.wait(10 * SECOND, answered).await;
    let ok: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| wire.response_of(id) == Some(STATUS_200))
        .collect();
    let refused: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| wire.reset_of(id) == Some(REFUSED_STREAM))
        .collect();
    eprintln!(
        "{STREAMS} silent streams: {} got 200, {} REFUSED_STREAM, {} dials, GOAWAY {:?}",
        ok.len(),
        refused.len(),
        dials.load(Ordering::Acquire),
        wire.goaway()
    );
    assert!(all, "not every stream was answered: end {:?}", wire.end);
    assert_eq!(ok.len(), LIMIT as usize, "streams answered 200");
    assert_eq!(
        ok.last(),
        Some(&(2 * LIMIT - 1)),
        "the first 200 are the ones in"
    );
    assert_eq!(
        refused.len(),
        (STREAMS - LIMIT) as usize,
        "REFUSED_STREAM resets"
    );
    assert_eq!(wire.goaway(), None);
    // The target counts a dial when it accepts it, which may trail the
    // server's 200; wait for all of them and for their tunnels.
    wait_until("200 dials accepted", 5 * SECOND, || {
        dials.load(Ordering::Acquire) >= LIMIT as usize
    })
    .await;
    wait_until("200 tunnels open", 5 * SECOND, || {
        server.stats.snapshot().tunnels_active == u64::from(LIMIT) + 1
    })
    .await;
    // A PING answered after the refusals: the server has read every
    // stream it was sent. It opened tunnels for the 200 only (and the one
    // alongside), and the target saw no other dial.
    wire.round_trip().await;
    assert_eq!(
        server.stats.snapshot().tunnels_opened,
        u64::from(LIMIT) + 1,
        "tunnels opened for refused streams"
    );
    assert_eq!(
        dials.load(Ordering::Acquire),
        LIMIT as usize,
        "refused streams dialled"
    );

    // While the attacker holds its 200 idle tunnels, others are served.
    alongside
        .assert_flowing("while 200 idle tunnels are held")
        .await;
    assert_serves(&server, &pki).await;
    drop(wire);
    wait_until("the idle tunnels released", 5 * SECOND, || {
        server.stats.snapshot().tunnels_active == 1
    })
    .await;
    settle(&server, 1).await;
    alongside.finish().await;
}
