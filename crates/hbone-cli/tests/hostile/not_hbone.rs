//! Connections that never become HBONE: bytes that are not TLS, TLS that
//! does not negotiate h2, h2 that never starts, and clients that go silent
//! at each step. Each is closed and counted as a failed handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::ServerConfig;
use hbone::config::Timeouts;
use hbone::keepalive::Keepalive;
use tokio::io::AsyncWriteExt;

use super::support::*;
use super::wire::*;
use crate::common::*;

/// Writes `bytes`, ignoring a failure: the server may close before all of
/// them are taken, which is itself the expected outcome.
async fn write_ignoring_close<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    let _ = tokio::time::timeout(5 * SECOND, write).await;
}

/// Plain-text HTTP/1.1, random bytes and a clear-text HTTP/2 preface on
/// the TLS port: each connection is closed at once, with at most a TLS
/// alert, never an HTTP answer; each counts as a handshake failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_tls_at_all_is_closed_and_counted() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let clear_h2 = [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat();
    let inputs: [(&str, Vec<u8>); 3] = [
        (
            "plain-text HTTP/1.1",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        ),
        ("random bytes", payload(0xbad, 4096)),
        ("clear-text HTTP/2 preface", clear_h2),
    ];
    for (i, (what, bytes)) in inputs.iter().enumerate() {
        let mut tcp = tcp_connect(server.addr).await;
        write_ignoring_close(&mut tcp, bytes).await;
        // Well under the 10 s handshake timeout: refused, not timed out.
        let closed = read_until_closed(&mut tcp, 3 * SECOND).await;
        let head = &closed.bytes[..closed.bytes.len().min(16)];
        eprintln!(
            "{what}: closed after {:?}, {} bytes back ({head:02x?}), error {:?}",
            closed.after,
            closed.bytes.len(),
            closed.error
        );
        assert!(
            closed.bytes.is_empty() || closed.bytes[0] == 0x15,
            "{what}: the server sent something other than a TLS alert: {head:02x?}"
        );
        let failures = i as u64 + 1;
        wait_until(&format!("{what} counted"), 5 * SECOND, || {
            server.stats.snapshot().handshake_failures == failures
        })
        .await;
    }
    alongside
        .assert_flowing("after the non-TLS connections")
        .await;
    settle(&server, 1).await;
    assert_eq!(server.stats.snapshot().tunnels_opened, 1);
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// A client certificate is valid, but the client offers no ALPN at all or
/// only `http/1.1`: the server never speaks HTTP/2 to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_alpn_h2_is_refused() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let connect = |alpn: Vec<Vec<u8>>| {
        let mut config = (*raw_client_config(Some(&pki.client))).clone();
        config.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = server.addr;
        async move {
            let tcp = tcp_connect(addr).await;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            tokio::time::timeout(5 * SECOND, connector.connect(name, tcp))
                .await
                .expect("TLS handshake hung")
        }
    };

    // No ALPN: TLS completes (nothing to disagree on), then the server
    // drops the connection without one HTTP/2 byte.
    let mut tls = connect(Vec::new()).await.expect("TLS without ALPN");
    let closed = read_until_closed(&mut tls, 3 * SECOND).await;
    eprintln!(
        "no ALPN: closed after {:?}, {} bytes, error {:?}",
        closed.after,
        closed.bytes.len(),
        closed.error
    );
    assert!(
        closed.bytes.is_empty(),
        "the server spoke to a client without ALPN h2"
    );
    wait_until("no-ALPN counted", 5 * SECOND, || {
        server.stats.snapshot().handshake_failures == 1
    })
    .await;

    // ALPN http/1.1 only: the handshake fails with no_application_protocol.
    let error = match connect(vec![b"http/1.1".to_vec()]).await {
        Err(error) => error,
        Ok(mut tls) => {
            let closed = read_until_closed(&mut tls, 3 * SECOND).await;
            closed
                .error
                .expect("an http/1.1-only client must get an error, not EOF")
        }
    };
    eprintln!("ALPN http/1.1: {error}");
    assert!(
        format!("{error:?}").contains("NoApplicationProtocol"),
        "expected a no_application_protocol alert: {error:?}"
    );
    wait_until("http/1.1 counted", 5 * SECOND, || {
        server.stats.snapshot().handshake_failures == 2
    })
    .await;

    alongside.assert_flowing("after the ALPN refusals").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// mTLS succeeds, then the client sends something other than the HTTP/2
/// preface: the connection is closed at once, long before the (default,
/// 10 s) handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_the_http2_preface_is_closed_promptly() {
    let _gate = shared().await;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let inputs: [(&str, Vec<u8>); 3] = [
        (
            "HTTP/1.1 inside TLS",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        ),
        ("random bytes inside TLS", payload(0x9a7b, 4096)),
        ("a preface with one byte wrong", {
            let mut preface = PREFACE.to_vec();
            preface[5] = b'X';
            preface
        }),
    ];
    for (i, (what, bytes)) in inputs.iter().enumerate() {
        let tcp = tcp_connect(server.addr).await;
        let mut tls = tls_over(tcp, &pki).await;
        write_ignoring_close(&mut tls, bytes).await;
        let closed = read_until_closed(&mut tls, 3 * SECOND).await;
        let kinds: Vec<u8> = parse_frames(&closed.bytes).iter().map(|f| f.kind).collect();
        eprintln!(
            "{what}: closed after {:?}; frames from the server {kinds:?}",
            closed.after
        );
        // At most the server's own SETTINGS (sent first) and a GOAWAY.
        assert!(
            kinds
                .iter()
                .all(|k| matches!(*k, SETTINGS | WINDOW_UPDATE | GOAWAY)),
            "{what}: unexpected frames {kinds:?}"
        );
        let failures = i as u64 + 1;
        wait_until(&format!("{what} counted"), 5 * SECOND, || {
            server.stats.snapshot().handshake_failures == failures
        })
        .await;
    }
    alongside.assert_flowing("after the bad prefaces").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// Clients that stop half-way: a partial TLS record, a completed TLS
/// handshake with no HTTP/2 preface, and half a preface. The handshake
/// timeout (2 s here, long enough for the test's own handshakes on a
/// loaded machine) covers each step; all three are closed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_mid_handshake_are_closed_by_the_timeout() {
    const LIMIT: Duration = Duration::from_secs(2);
    let _gate = shared().await;
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.handshake = LIMIT;
    let server = start_server(config).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let addr = server.addr;

    let partial_record = async {
        let mut tcp = tcp_connect(addr).await;
        // A TLS handshake record header announcing 512 bytes, then nothing.
        write_ignoring_close(&mut tcp, &[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        read_until_closed(&mut tcp, 10 * SECOND).await
    };
    let no_preface = async {
        let mut tls = tls_over(tcp_connect(addr).await, &pki).await;
        read_until_closed(&mut tls, 5 * SECOND).await
    };
    let half_preface = async {
        let mut tls = tls_over(tcp_connect(addr).await, &pki).await;
        write_ignoring_close(&mut tls, &PREFACE[..12]).await;
        read_until_closed(&mut tls, 5 * SECOND).await
    };
    let (partial_record, no_preface, half_preface) =
        tokio::join!(partial_record, no_preface, half_preface);
    for (what, closed) in [
        ("partial TLS record", partial_record),
        ("TLS, then no preface", no_preface),
        ("half a preface", half_preface),
    ] {
        eprintln!("{what}: closed after {:?}", closed.after);
        assert!(
            closed.after >= LIMIT / 2,
            "{what}: closed after {:?}, before the timeout ran out",
            closed.after
        );
        assert!(
            closed.after < LIMIT + 3 * SECOND,
            "{what}: closed only after {:?}",
            closed.after
        );
    }
    wait_until("the three counted", 5 * SECOND, || {
        server.stats.snapshot().handshake_failures == 3
    })
    .await;
    alongside
        .assert_flowing("after the stalled handshakes")
        .await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}

/// A client that completes the HTTP/2 handshake and then never reads or
/// answers a PING is dropped by the server's keepalive (every 300 ms here,
/// 1 s to answer), while the healthy client, which answers, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_answers_ping_is_dropped_by_keepalive() {
    let _gate = shared().await;
    let pki = Pki::new();
    let config = ServerConfig::new(loopback(), pki.server.clone()).with_timeouts(
        Timeouts::default().with_keepalive(Keepalive::new(
            Duration::from_millis(300),
            Duration::from_secs(1),
        )),
    );
    let server = start_server(config).await;
    let mut alongside = Alongside::open(&server, &pki).await;
    let started = Instant::now();
    let mut tls = h2_handshake(tcp_connect(server.addr).await, &pki).await;
    // Reading does not answer: only a PING ACK would.
    let closed = read_until_closed(&mut tls, 10 * SECOND).await;
    let frames = parse_frames(&closed.bytes);
    eprintln!(
        "silent h2 client: closed after {:?}, {} PING(s) seen",
        started.elapsed(),
        frames.iter().filter(|f| f.kind == PING).count()
    );
    assert!(
        frames.iter().any(|f| f.kind == PING && f.flags & ACK == 0),
        "the server closed without probing"
    );
    // No earlier than one interval plus the time to answer; well before
    // the generous upper bound.
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert!(started.elapsed() < Duration::from_secs(6));
    alongside.assert_flowing("after the keepalive drop").await;
    settle(&server, 1).await;
    assert_serves(&server, &pki).await;
    alongside.finish().await;
}
