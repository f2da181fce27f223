//! The headers Istio's HBONE carries: what our client sends, what our
//! server makes of them (access log, PROXY protocol), and that malformed
//! values are ignored, counted and never fatal.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use hbone::headers::{Baggage, TraceParent};
use hbone::{Dialer, DialerConfig, Route, ServerConfig, TunnelRequest};
use http::{Method, Request, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_headers_reach_the_access_log_and_server_baggage_comes_back() {
    let pki = Pki::new();
    let records = Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.access_log = records.clone();
    config.baggage.set("k8s.cluster.name", "west");
    config.baggage.set("service.name", "backend");
    let server = start_server(config).await;
    let echo = start_echo().await;

    let mut dialer_config = DialerConfig::default();
    dialer_config.baggage.set("service.name", "frontend");
    let dialer = Dialer::with_config(&pki.client, dialer_config).unwrap();
    let trace = TraceParent::random();
    let original: std::net::SocketAddr = "192.0.2.10:40000".parse().unwrap();
    let request = TunnelRequest::new(echo)
        .with_source(original)
        .with_trace(trace);
    let route = Route::Direct {
        server: server.addr,
        server_ids: vec![pki.server_id.clone()],
    };
    let tunnel = dialer.open(&route, &request).await.unwrap();
    assert_eq!(tunnel.peer_baggage().get("k8s.cluster.name"), Some("west"));
    assert_eq!(tunnel.peer_baggage().get("service.name"), Some("backend"));
    assert_eq!(echo_roundtrip(tunnel, b"traced").await.unwrap(), b"traced");

    eventually("server logged the tunnel", || !records.all().is_empty()).await;
    let record = records.all().remove(0);
    assert_eq!(
        record.original_source,
        Some(hbone::headers::ForwardedFor::Addr(original))
    );
    assert_eq!(record.trace, Some(trace));
    assert_eq!(record.bytes_sent, 6);
    assert_eq!(record.bytes_received, 6);
    assert_eq!(server.stats.snapshot().malformed_headers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_are_ignored_and_counted() {
    let pki = Pki::new();
    let records = Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.access_log = records.clone();
    let server = start_server(config).await;
    let echo = start_echo().await;

    let tls = raw_tls(server.addr, Some(&pki.client)).await.unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .header("forwarded", "for=not-an-address")
        .header("traceparent", "00-zz-yy-01")
        .header("baggage", "good=1,no-equals-sign")
        .body(())
        .unwrap();
    let (response, mut body_out) = send.send_request(request, false).unwrap();
    let response = within(PEER_WAIT, "the response", response).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "bad metadata must not refuse the tunnel"
    );
    body_out
        .send_data(Bytes::from_static(b"still fine"), true)
        .unwrap();
    let mut body = response.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"still fine");
    assert_eq!(server.stats.snapshot().malformed_headers, 3);
    eventually("server logged the tunnel", || !records.all().is_empty()).await;
    let record = records.all().remove(0);
    assert_eq!(record.original_source, None);
    assert_eq!(record.trace, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_original_client_and_its_identity() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.proxy_protocol = true;
    let server = start_server(config).await;
    let target = TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        received
    });

    let dialer = Dialer::new(&pki.client).unwrap();
    let route = Route::Direct {
        server: server.addr,
        server_ids: vec![pki.server_id.clone()],
    };
    let original: std::net::SocketAddr = "192.0.2.44:5555".parse().unwrap();
    let request = TunnelRequest::new(target_addr).with_source(original);
    let mut tunnel = dialer.open(&route, &request).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tunnel, b"payload")
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut tunnel)
        .await
        .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    let header = hbone::proxy_protocol::decode(&received).expect("a PROXY v2 header first");
    assert_eq!(header.source, original);
    assert_eq!(header.destination, target_addr);
    assert_eq!(
        header.peer_identity.as_deref(),
        Some(pki.client_id.as_str())
    );
    assert_eq!(&received[header.len..], b"payload");
}

#[test]
fn baggage_values_we_send_are_valid_headers() {
    let mut baggage = Baggage::default();
    baggage.set("k8s.namespace.name", "default");
    let header = baggage.to_header().unwrap();
    assert!(http::HeaderValue::from_str(&header).is_ok());
}
