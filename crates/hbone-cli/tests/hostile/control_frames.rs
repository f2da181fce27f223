//! Control-frame floods from a client that reads everything the server
//! sends, so TCP never pushes back: each kind is cut off with
//! GOAWAY(ENHANCE_YOUR_CALM) once the connection has spent its budget
//! (`Limits::max_control_frames`, 1,000 per 10 s by default). A client that
//! keeps its connection alive with a PING every second and returns window
//! for every DATA frame of a bulk transfer is never cut off.

use std::time::{Duration, Instant};

use hbone::ServerConfig;
use hbone::server::Limits;

use super::support::*;
use super::wire::*;
use crate::common::*;

const PRIORITY: u8 = 0x2;

/// Flood frames per marker PING.
const BATCH: usize = 99;

/// How a flood ended.
#[derive(Debug)]
struct Calmed {
    /// Flood frames written, markers included; most of them may never
    /// have been read by the server.
    written: usize,
    /// Flood frames the server certainly read: those before the last
    /// marker PING it answered (or, for a PING flood, the PINGs it
    /// answered).
    processed: usize,
    took: Duration,
}

/// Writes `unit` over and over, with a PING carrying a batch number after
/// every [`BATCH`] copies, until the server answers GOAWAY or closes. The
/// reader task takes in every frame the server sends, so the server is
/// never held back by TCP. Each PING the server ACKs marks the frames
/// before it as read.
async fn flood_until_calmed(wire: &mut Wire, unit: &[u8]) -> Calmed {
    let started = Instant::now();
    let mut written = 0;
    let mut batch_no = 0u64;
    while started.elapsed() < 10 * SECOND {
        let mut batch = unit.repeat(BATCH);
        batch.extend(frame(PING, 0, 0, &batch_no.to_be_bytes()));
        batch_no += 1;
        if wire.send(&batch).await.is_err() {
            break;
        }
        written += BATCH + 1;
        wire.poll();
        if wire.goaway().is_some() || wire.end.is_some() {
            break;
        }
    }
    let closed = wire.wait_closed(5 * SECOND).await;
    assert!(closed, "the connection stayed open after the flood");
    let acks: Vec<&Frame> = wire
        .frames
        .iter()
        .filter(|f| f.kind == PING && f.flags & ACK != 0)
        .collect();
    let processed = if unit[3] == PING {
        acks.len()
    } else {
        acks.iter()
            .filter_map(|f| Some(u64::from_be_bytes(f.payload.clone().try_into().ok()?)))
            .max()
            .map_or(0, |last| (last as usize + 1) * (BATCH + 1))
    };
    Calmed {
        written,
        processed,
        took: started.elapsed(),
    }
}

/// One flood of `unit` frames against a server with default limits,
/// beside a healthy tunnel on its own connection.
async fn flood_case(what: &str, unit: Vec<u8>) {
    let limit = Limits::default().max_control_frames as usize;
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let mut wire = Wire::open(server.addr, &pki).await;

    let calmed = flood_until_calmed(&mut wire, &unit).await;
    eprintln!(
        "{what} flood: {} frames written, {} of them certainly read, in {:?}; \
         GOAWAY {:?}; end {:?}",
        calmed.written,
        calmed.processed,
        calmed.took,
        wire.goaway(),
        wire.end
    );
    assert_eq!(
        wire.goaway().map(|(_, code)| code),
        Some(ENHANCE_YOUR_CALM),
        "{what}: no GOAWAY(ENHANCE_YOUR_CALM) before the close"
    );
    // Not before the budget is spent, and not long after: the budget
    // refills at 100 frames a second, and the flood lasts far less.
    assert!(
        calmed.processed >= limit - 2 * (BATCH + 1),
        "{what}: cut off after {} frames, below the limit of {limit}",
        calmed.processed
    );
    assert!(
        calmed.processed <= limit + 2 * (BATCH + 1),
        "{what}: the server read {} frames before cutting the flood off",
        calmed.processed
    );
    assert!(calmed.took < 5 * SECOND, "{what}: took {:?}", calmed.took);
    let stats = server.stats.snapshot();
    assert_eq!(stats.control_frame_floods, 1);
    assert_eq!(stats.limit_refusals, 1);

    alongside
        .assert_flowing(&format!("after the {what} flood"))
        .await;
    drop(wire);
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_calmed() {
    // Five settings per frame, all valid, each frame needing an ACK.
    let mut settings = Vec::new();
    for (id, value) in [(1u16, 4096u32), (2, 0), (3, 100), (4, 65_535), (5, 16_384)] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&value.to_be_bytes());
    }
    flood_case("SETTINGS", frame(SETTINGS, 0, 0, &settings)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_calmed() {
    flood_case("PING", frame(PING, 0, 0, b"floodme!")).await;
}

/// PRIORITY frames draw no answer and h2 ignores them: nothing but the
/// budget stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_flood_is_calmed() {
    // Stream 3 depends on stream 1, weight 16: valid, and about a stream
    // that never opens.
    flood_case("PRIORITY", frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 15])).await;
}

/// WINDOW_UPDATEs that no data was sent for: 1 byte of connection window
/// at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_update_flood_is_calmed() {
    flood_case("WINDOW_UPDATE", window_update(0, 1)).await;
}

/// Frames of a type HTTP/2 does not define are to be ignored (RFC 9113
/// §4.1), so they cost the server a read and nothing stops them either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_type_flood_is_calmed() {
    flood_case("unknown type", frame(0xfa, 0, 0, b"x")).await;
}

/// A legitimate, busy client: a PING every second, a SETTINGS change
/// every 2 s, and a 4 MiB round trip through an echo target with
/// WINDOW_UPDATE on the stream and on the connection for every DATA
/// frame it receives (a 4 KiB stream window, so the server sends over a
/// thousand frames, and the WINDOW_UPDATEs alone outnumber the
/// control-frame budget twice over). Nothing is cut off and every byte
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_legitimate_client_is_never_calmed() {
    const TOTAL: usize = 4 << 20;
    const CHUNK: usize = 16 << 10;
    const IN_FLIGHT: usize = 48 << 10;
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (echo, _) = counting_echo().await;
    let mut wire = Wire::open(server.addr, &pki).await;
    // A 4 KiB stream window: the server can send 4 KiB at a time until
    // the client returns it.
    let settings = [0u8, 4, 0, 0, 0x10, 0];
    wire.send(&frame(SETTINGS, 0, 0, &settings)).await.unwrap();
    let block = connect_block(&echo.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));

    let data = payload(0xb0b, TOTAL);
    let mut chunks = data.chunks(CHUNK);
    let mut pings = tokio::time::interval(SECOND);
    let mut sent_pings = 0u64;
    // DATA frames seen so far, and the bytes they carried.
    let (mut seen, mut echoed, mut sent) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    // At least 5 s, so that keepalive PINGs add up; and until everything
    // is back.
    while echoed < TOTAL || started.elapsed() < 5 * SECOND {
        assert!(
            started.elapsed() < 30 * SECOND,
            "the round trip stalled at {echoed} of {TOTAL} bytes"
        );
        // Within the server's first window (64 KiB): what has not come
        // back yet is all the server may hold.
        if sent - echoed + CHUNK <= IN_FLIGHT
            && let Some(chunk) = chunks.next()
        {
            wire.send(&frame(DATA, 0, 1, chunk)).await.unwrap();
            sent += chunk.len();
        }
        tokio::select! {
            _ = pings.tick() => {
                let mut out = frame(PING, 0, 0, &sent_pings.to_be_bytes());
                if sent_pings.is_multiple_of(2) {
                    out.extend(frame(SETTINGS, 0, 0, &settings));
                }
                sent_pings += 1;
                wire.send(&out).await.unwrap();
            }
            _ = wire.wait(Duration::from_millis(20), |w| w.frames.len() > seen) => {}
        }
        wire.poll();
        assert!(wire.end.is_none(), "the connection ended: {:?}", wire.end);
        assert_eq!(wire.goaway(), None, "the server sent GOAWAY");
        // Window back for every DATA frame that arrived, and an answer
        // to every PING of the server's (it measures the round trip).
        let mut updates = Vec::new();
        for f in wire.frames.iter().skip(seen) {
            if f.kind == PING && f.flags & ACK == 0 {
                updates.extend(frame(PING, ACK, 0, &f.payload));
            }
            if f.kind == DATA && f.stream == 1 && !f.payload.is_empty() {
                echoed += f.payload.len();
                let len = u32::try_from(f.payload.len()).unwrap();
                updates.extend(window_update(1, len));
                updates.extend(window_update(0, len));
            }
        }
        seen = wire.frames.len();
        if !updates.is_empty() {
            wire.send(&updates).await.unwrap();
        }
    }
    let (back, _) = wire.data_of(1);
    assert_eq!(back.len(), TOTAL);
    assert!(back == data, "the echo came back altered");
    let data_frames = wire.frames.iter().filter(|f| f.kind == DATA).count();
    let ping_acks = wire
        .frames
        .iter()
        .filter(|f| f.kind == PING && f.flags & ACK != 0)
        .count();
    eprintln!(
        "busy client: {data_frames} DATA frames received and as many pairs of WINDOW_UPDATEs \
         sent, {sent_pings} PINGs ({ping_acks} answered) in {:?}",
        started.elapsed()
    );
    assert!(data_frames > Limits::default().max_control_frames as usize);
    assert!(sent_pings >= 5);
    let stats = server.stats.snapshot();
    assert_eq!(stats.control_frame_floods, 0);
    assert_eq!(stats.limit_refusals, 0);
    alongside.assert_flowing("beside the busy client").await;
    drop(wire);
    settle(&server, 1).await;
    alongside.finish().await;
}

/// The limit is the operator's: with 50 per hour, the 51st control frame
/// closes the connection, and a client that stays at the limit is left
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_configurable() {
    let _gate = shared().await;
    let pki = Pki::new();
    let limits = Limits::default().with_max_control_frames(50, 3_600 * SECOND);
    let metrics = std::sync::Arc::new(hbone::metrics::Metrics::new());
    let mut config = ServerConfig::new(loopback(), pki.server.clone()).with_limits(limits);
    config.telemetry.metrics = Some(metrics.clone());
    let server = start_server(config).await;
    let mut calm = Wire::open(server.addr, &pki).await;
    let mut wire = Wire::open(server.addr, &pki).await;
    // The handshake's SETTINGS counts (its ACK answers the server's and is
    // free): 49 PINGs fill the 50.
    let ping = frame(PING, 0, 0, b"12345678");
    wire.send(&ping.repeat(49)).await.unwrap();
    calm.send(&ping.repeat(49)).await.unwrap();
    let acks = |w: &Wire| {
        w.frames
            .iter()
            .filter(|f| f.kind == PING && f.flags & ACK != 0)
            .count()
    };
    assert!(wire.wait(5 * SECOND, |w| acks(w) == 49).await);
    assert!(calm.wait(5 * SECOND, |w| acks(w) == 49).await);
    wire.send(&ping).await.unwrap();
    assert!(wire.wait_closed(5 * SECOND).await);
    assert_eq!(wire.goaway().map(|g| g.1), Some(ENHANCE_YOUR_CALM));
    assert_eq!(acks(&wire), 49, "the PING over the limit was answered");
    // The other connection, at 50 of 50, is still served.
    calm.poll();
    assert_eq!(calm.end, None);
    assert_eq!(calm.goaway(), None);
    assert_eq!(server.stats.snapshot().control_frame_floods, 1);
    // Operators see it as a limit refusal of its own kind.
    let scrape = metrics.encode();
    let refusals: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("hbone_limit_refusals_total{"))
        .collect();
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("limit=\"control_frames\"") && l.ends_with(" 1")),
        "{refusals:#?}"
    );
    drop(calm);
    assert_serves(&server, &pki).await;
}

/// A double-HBONE gateway serves its connections the same way, budget
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_calms_floods_too() {
    let limit = Limits::default().max_control_frames as usize;
    let _gate = shared().await;
    let pki = Pki::new();
    let config = ServerConfig::new(loopback(), pki.server.clone())
        .with_gateway_routes(hbone::gateway::Routes::new());
    let gateway = start_server(config).await;
    let mut wire = Wire::open(gateway.addr, &pki).await;
    let calmed = flood_until_calmed(&mut wire, &frame(PING, 0, 0, b"floodme!")).await;
    eprintln!("PING flood on a gateway: {calmed:?}");
    assert_eq!(wire.goaway().map(|g| g.1), Some(ENHANCE_YOUR_CALM));
    assert!(calmed.processed <= limit + 2 * (BATCH + 1));
    assert_eq!(gateway.stats.snapshot().control_frame_floods, 1);
    // Another connection to the gateway is served.
    let mut next = Wire::open(gateway.addr, &pki).await;
    next.send(&frame(PING, 0, 0, b"12345678")).await.unwrap();
    assert!(
        next.wait(5 * SECOND, |w| w.frames.iter().any(|f| f.kind == PING))
            .await
    );
}

/// The dialer keeps the same budget on servers: one that PINGs without
/// end (waiting for each answer, so nothing backs up) has its connection
/// closed by the dialer within a bounded number of PINGs, its tunnel
/// fails, and the next tunnel gets a connection of its own. A budget of
/// 100 keeps the test short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_closes_a_server_that_floods_pings() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    const BUDGET: u32 = 100;
    let pki = Pki::new();
    let acceptor = raw_tls_acceptor(&pki.server);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = start_echo().await;
    let connections = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let (flood_over, mut flood_ended) = tokio::sync::mpsc::unbounded_channel();
    // Set once the first tunnel is up, so the flood cannot race it.
    let go = Arc::new(tokio::sync::Notify::new());
    let (counted, pongs, start) = (connections.clone(), answered.clone(), go.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            let (acceptor, pongs, flood_over, start) = (
                acceptor.clone(),
                pongs.clone(),
                flood_over.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                let mut ping_pong = connection.ping_pong().unwrap();
                // Serve CONNECTs to their target while the connection lives.
                let serving = async {
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let target: std::net::SocketAddr =
                            request.uri().authority().unwrap().as_str().parse().unwrap();
                        let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                            continue;
                        };
                        let mut stream = stream_as_io(send, request.into_body());
                        tokio::spawn(async move {
                            if let Ok(mut target) = tokio::net::TcpStream::connect(target).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut stream, &mut target).await;
                            }
                        });
                    }
                };
                if !first {
                    serving.await;
                    return;
                }
                let flooding = async {
                    // Once the first tunnel is up, PING until refused.
                    start.notified().await;
                    while ping_pong.ping(h2::Ping::opaque()).await.is_ok() {
                        pongs.fetch_add(1, Ordering::SeqCst);
                    }
                };
                tokio::select! {
                    () = serving => {}
                    () = flooding => {}
                }
                let _ = flood_over.send(());
            });
        }
    });

    let config =
        hbone::DialerConfig::default().with_max_control_frames(BUDGET, Duration::from_secs(10));
    let dialer = hbone::Dialer::with_config(&pki.client, config).unwrap();
    let server_id = std::slice::from_ref(&pki.server_id);
    let first = within(
        PEER_WAIT,
        "the first tunnel",
        dialer.connect(addr, server_id, echo),
    )
    .await
    .unwrap();
    go.notify_one();
    within(PEER_WAIT, "the flood's end", flood_ended.recv())
        .await
        .unwrap();
    let pings = answered.load(Ordering::SeqCst);
    assert!(
        pings < u64::from(BUDGET) + 10,
        "the dialer answered {pings} PINGs on a budget of {BUDGET}"
    );
    // The flooded connection is gone, and its tunnel with it.
    let broken = within(
        PEER_WAIT,
        "the first tunnel's end",
        echo_roundtrip(first, b"x"),
    )
    .await;
    assert!(broken.is_err(), "a tunnel outlived its flooded connection");
    let second = within(
        PEER_WAIT,
        "the second tunnel",
        dialer.connect(addr, server_id, echo),
    )
    .await
    .unwrap();
    assert_eq!(echo_roundtrip(second, b"again").await.unwrap(), b"again");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}
