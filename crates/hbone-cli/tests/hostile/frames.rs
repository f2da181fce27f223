//! Malformed and abusive frames: endless CONTINUATION, header lists over
//! the limit, and WINDOW_UPDATEs that break flow control (RFC 9113 §6.9).

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, StatusCode};

use super::support::*;
use super::wire::*;
use crate::common::*;

/// Opens stream 1 with a HEADERS frame carrying `first` and no
/// END_HEADERS, then sends CONTINUATION frames made by `next` (never with
/// END_HEADERS) until the server cuts the connection off, at most 20,000
/// of them or 5 s. Returns how many went out.
async fn continuation_flood(
    wire: &mut Wire,
    first: &[u8],
    next: impl Fn(usize) -> Vec<u8>,
) -> usize {
    const MAX: usize = 20_000;
    const PER_WRITE: usize = 16;
    wire.send(&frame(HEADERS, 0, 1, first)).await.unwrap();
    let started = Instant::now();
    let mut sent = 0;
    while sent < MAX && started.elapsed() < 5 * SECOND {
        let batch: Vec<u8> = (sent..sent + PER_WRITE)
            .flat_map(|i| frame(CONTINUATION, 0, 1, &next(i)))
            .collect();
        if wire.send(&batch).await.is_err() {
            break;
        }
        sent += PER_WRITE;
        wire.poll();
        if wire.goaway().is_some() || wire.end.is_some() {
            break;
        }
    }
    sent
}

/// A header block that never ends: HEADERS without END_HEADERS, then
/// CONTINUATION after CONTINUATION, of valid header fields (1 KiB each),
/// of nothing at all, and of bytes that are not HPACK. The server cuts
/// each connection off with a GOAWAY long before the flood ends, and no
/// stream is ever dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let first = connect_block(&target.to_string(), &[]);
    fn junk_fields(i: usize) -> Vec<u8> {
        let mut block = Vec::new();
        literal(&mut block, format!("x-junk-{i}").as_bytes(), &[b'j'; 1000]);
        block
    }
    type Fragment = fn(usize) -> Vec<u8>;
    let floods: [(&str, Fragment); 3] = [
        ("1 KiB header fields", junk_fields),
        ("empty frames", |_| Vec::new()),
        ("bytes that are not HPACK", |i| payload(i as u64, 1000)),
    ];
    for (what, next) in floods {
        let mut wire = Wire::open(server.addr, &pki).await;
        let started = Instant::now();
        let sent = continuation_flood(&mut wire, &first, next).await;
        let closed = wire.wait_closed(5 * SECOND).await;
        let took = started.elapsed();
        // `sent` counts what went into socket buffers, not what the server
        // read: it stops reading at the GOAWAY.
        eprintln!(
            "CONTINUATION flood of {what}: {sent} frames written, closed after {took:?}, \
             GOAWAY {:?}, end {:?}",
            wire.goaway(),
            wire.end
        );
        let (_, code) = wire
            .goaway()
            .unwrap_or_else(|| panic!("{what}: no GOAWAY (end: {:?})", wire.end));
        assert!(
            matches!(code, ENHANCE_YOUR_CALM | COMPRESSION_ERROR | PROTOCOL_ERROR),
            "{what}: GOAWAY code {code:#x}"
        );
        assert!(closed, "{what}: connection left open after GOAWAY");
        assert!(took < 3 * SECOND, "{what}: the flood ran for {took:?}");
    }
    assert_eq!(
        dials.load(Ordering::Acquire),
        0,
        "a header block that never ended was dialled"
    );
    alongside
        .assert_flowing("after the CONTINUATION floods")
        .await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Sends CONNECT with `header` on a raw `h2` client connection and returns
/// the status, or the error the stream ended with.
async fn connect_with(
    send: &h2::client::SendRequest<Bytes>,
    target: &str,
    header: (&str, String),
) -> Result<StatusCode, h2::Error> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header(header.0, header.1)
        .body(())
        .unwrap();
    let mut send = within(10 * SECOND, "stream capacity", send.clone().ready()).await?;
    let (response, _body) = send.send_request(request, false)?;
    let response = tokio::time::timeout(10 * SECOND, response)
        .await
        .expect("the server must answer or reset an oversized request")?;
    Ok(response.status())
}

/// Header lists over the server's 64 KiB limit, sent by a raw `h2` client:
/// one 70 KiB value, and 2,000 small fields (80 KiB), are refused with 431
/// and nothing is dialled, while the connection carries on (a normal
/// CONNECT on it still works); a 300 KiB value, past h2's abuse limit of
/// four times the limit, closes the connection with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let authority = target.to_string();
    let tls = within(10 * SECOND, "TLS", raw_tls(server.addr, Some(&pki.client)))
        .await
        .unwrap();
    let (send, connection) = within(10 * SECOND, "h2", h2::client::handshake(tls))
        .await
        .unwrap();
    tokio::spawn(connection);

    let big_value = ("x-oversized", "v".repeat(70 << 10));
    let outcome = connect_with(&send, &authority, big_value).await;
    eprintln!("70 KiB header value: {outcome:?}");
    assert_eq!(
        outcome.ok(),
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );

    let request = (0..2_000).fold(Request::builder(), |b, i| {
        b.header(format!("x-field-{i:04}"), "0123456789012345678901234")
    });
    let request = request
        .method(Method::CONNECT)
        .uri(authority.as_str())
        .body(())
        .unwrap();
    let mut ready = within(10 * SECOND, "stream capacity", send.clone().ready())
        .await
        .unwrap();
    let (response, _body) = ready.send_request(request, false).unwrap();
    let outcome = tokio::time::timeout(10 * SECOND, response).await.unwrap();
    eprintln!(
        "2,000 header fields: {:?}",
        outcome.as_ref().map(|r| r.status())
    );
    assert_eq!(
        outcome.map(|r| r.status()).ok(),
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );
    assert_eq!(
        dials.load(Ordering::Acquire),
        0,
        "an oversized request was dialled"
    );

    // The same connection still opens tunnels.
    let mut ready = within(10 * SECOND, "stream capacity", send.clone().ready())
        .await
        .unwrap();
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str())
        .body(())
        .unwrap();
    let (response, mut body_out) = ready.send_request(connect, false).unwrap();
    let response = tokio::time::timeout(10 * SECOND, response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    body_out
        .send_data(Bytes::from_static(b"after 431"), true)
        .unwrap();
    let mut body = response.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = tokio::time::timeout(10 * SECOND, body.data())
        .await
        .unwrap()
    {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"after 431");

    // Far over: the connection goes.
    let huge = ("x-huge", "h".repeat(300 << 10));
    let outcome = connect_with(&send, &authority, huge).await;
    eprintln!("300 KiB header value: {outcome:?}");
    let error = outcome.expect_err("a 300 KiB header list must not be answered");
    assert!(error.is_go_away(), "{error:?}");
    assert_eq!(error.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM));
    assert_eq!(
        dials.load(Ordering::Acquire),
        1,
        "only the normal CONNECT was dialled"
    );

    alongside
        .assert_flowing("after the oversized headers")
        .await;
    drop(send);
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// WINDOW_UPDATE abuse (RFC 9113 §6.9): an increment that takes the
/// connection window past 2^31-1, in one frame or two, is a connection
/// error FLOW_CONTROL_ERROR (GOAWAY); on a stream it is a stream error
/// (RST_STREAM FLOW_CONTROL_ERROR) and the connection's other streams carry
/// on; a zero increment on the connection is a PROTOCOL_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_update_abuse_is_a_flow_control_error() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let (target, dials) = counting_echo().await;
    let block = connect_block(&target.to_string(), &[]);

    let connection_cases: [(&str, Vec<u8>, u32); 3] = [
        (
            "one increment of 2^31-1",
            window_update(0, 0x7fff_ffff),
            FLOW_CONTROL_ERROR,
        ),
        (
            "two increments of 2^30",
            [window_update(0, 1 << 30), window_update(0, 1 << 30)].concat(),
            FLOW_CONTROL_ERROR,
        ),
        ("a zero increment", window_update(0, 0), PROTOCOL_ERROR),
    ];
    for (what, frames, expected) in connection_cases {
        let mut wire = Wire::open(server.addr, &pki).await;
        wire.send(&frames).await.unwrap();
        let closed = wire.wait_closed(5 * SECOND).await;
        eprintln!(
            "connection WINDOW_UPDATE, {what}: GOAWAY {:?}, end {:?}",
            wire.goaway(),
            wire.end
        );
        assert_eq!(wire.goaway().map(|g| g.1), Some(expected), "{what}");
        assert!(closed, "{what}: the connection stayed open");
    }

    // On a stream: that stream is reset, its neighbour carries on.
    let mut wire = Wire::open(server.addr, &pki).await;
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.response_of(1).is_some()).await);
    assert_eq!(wire.response_of(1), Some(STATUS_200));
    wire.send(&window_update(1, 0x7fff_ffff)).await.unwrap();
    assert!(wire.wait(5 * SECOND, |w| w.reset_of(1).is_some()).await);
    eprintln!(
        "stream WINDOW_UPDATE past 2^31-1: RST_STREAM {:?}",
        wire.reset_of(1)
    );
    assert_eq!(wire.reset_of(1), Some(FLOW_CONTROL_ERROR));
    wire.send(&frame(HEADERS, END_HEADERS, 3, &block))
        .await
        .unwrap();
    wire.send(&frame(DATA, END_STREAM, 3, b"neighbour"))
        .await
        .unwrap();
    assert!(
        wire.wait(5 * SECOND, |w| w.data_of(3).1).await,
        "end {:?}",
        wire.end
    );
    assert_eq!(wire.response_of(3), Some(STATUS_200));
    assert_eq!(wire.data_of(3).0, b"neighbour");
    assert_eq!(wire.goaway(), None);
    assert_eq!(dials.load(Ordering::Acquire), 2);
    drop(wire);

    alongside
        .assert_flowing("after the WINDOW_UPDATE abuse")
        .await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// DATA beyond the server's flow-control window (RFC 9113 §6.9.1): while
/// the target dial is still pending, so that the server has read nothing,
/// the client sends 80 KiB on a stream whose first window is 64 KiB (the
/// connection's is four times that). The stream is reset with
/// FLOW_CONTROL_ERROR; the connection and its other streams carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_beyond_the_window_is_a_flow_control_error() {
    const WINDOW: usize = 65_535;
    const FRAME: usize = 16 << 10;
    let _gate = shared().await;
    let pki = Pki::new();
    let mut config = hbone::ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connect = 2 * SECOND;
    assert!(
        config.h2.adaptive_windows,
        "windows start at {WINDOW} bytes"
    );
    let server = start_server(config).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let hole = BlackHole::start().await;
    let (echo, _) = counting_echo().await;
    let mut wire = Wire::open(server.addr, &pki).await;
    // The connection's window is 65,535 bytes until the server's first
    // WINDOW_UPDATE on stream 0; only then is 80 KiB a stream-level excess
    // rather than a connection-level one.
    assert!(
        wire.wait(5 * SECOND, |w| w
            .frames
            .iter()
            .any(|f| f.kind == WINDOW_UPDATE && f.stream == 0))
            .await,
        "no connection WINDOW_UPDATE: end {:?}",
        wire.end
    );
    let block = connect_block(&hole.addr.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    let chunk = payload(7, FRAME);
    let data: Vec<u8> = (0..WINDOW / FRAME + 2)
        .flat_map(|_| frame(DATA, 0, 1, &chunk))
        .collect();
    wire.send(&data).await.unwrap();
    assert!(
        wire.wait(5 * SECOND, |w| w.reset_of(1).is_some()).await,
        "no reset for DATA beyond the window: GOAWAY {:?}, end {:?}",
        wire.goaway(),
        wire.end
    );
    eprintln!(
        "DATA beyond the window: RST_STREAM {:?}, GOAWAY {:?}",
        wire.reset_of(1),
        wire.goaway()
    );
    assert_eq!(wire.reset_of(1), Some(FLOW_CONTROL_ERROR));
    assert_eq!(wire.response_of(1), None, "answered a stream it had reset");

    // The connection is fine: another stream opens and echoes.
    let echo_block = connect_block(&echo.to_string(), &[]);
    wire.send(&frame(HEADERS, END_HEADERS, 3, &echo_block))
        .await
        .unwrap();
    wire.send(&frame(DATA, END_STREAM, 3, b"next door"))
        .await
        .unwrap();
    assert!(
        wire.wait(5 * SECOND, |w| w.data_of(3).1).await,
        "end {:?}",
        wire.end
    );
    assert_eq!(wire.response_of(3), Some(STATUS_200));
    assert_eq!(wire.data_of(3).0, b"next door");
    assert_eq!(wire.goaway(), None);
    drop(wire);

    alongside
        .assert_flowing("after DATA beyond the window")
        .await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Frames are accepted up to 1 MiB (SETTINGS_MAX_FRAME_SIZE); a frame
/// header announcing more is a connection error: GOAWAY(FRAME_SIZE_ERROR)
/// before the payload is read, with a healthy tunnel alongside untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_size_limit_is_a_frame_size_error() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let mut wire = Wire::open(server.addr, &pki).await;
    let len: u32 = (1 << 20) + 1;
    let mut header = len.to_be_bytes()[1..].to_vec();
    header.extend_from_slice(&[DATA, 0, 0, 0, 0, 1]);
    header.extend_from_slice(&[0; 64]);
    wire.send(&header).await.unwrap();
    assert!(
        wire.wait_closed(5 * SECOND).await,
        "the connection outlived a {len}-byte frame"
    );
    let (_, code) = wire
        .goaway()
        .expect("the server sends GOAWAY for an oversized frame");
    assert_eq!(code, FRAME_SIZE_ERROR, "GOAWAY code");
    alongside.assert_flowing("after the oversized frame").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}
