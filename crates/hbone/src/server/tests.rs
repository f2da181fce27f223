//! The server's CONNECT handling without TLS: a bound (never run) server
//! lends its shared state, and an in-memory h2 connection brings the
//! requests, dispatched as `serve_connection` does. Targets are loopback
//! listeners; the dials are real, so time is not paused here.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::connect::FromConnection;
use super::*;
use crate::access::{AccessLog, Outcome, TunnelRecord};
use crate::headers::{BAGGAGE, FORWARDED, ForwardedFor, TRACEPARENT};
use crate::stream::H2Stream;
use crate::test_support::{h2_pair, test_id, test_identity};

/// Keeps every record, and says how many there are.
struct Recorder {
    records: Mutex<Vec<TunnelRecord>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl AccessLog for Recorder {
    fn record(&self, record: &TunnelRecord) {
        let mut records = self.records.lock().unwrap();
        records.push(record.clone());
        self.count.send_replace(records.len());
    }
}

impl Recorder {
    /// The `n`th record (from 1), once it is written.
    async fn nth(&self, n: usize) -> TunnelRecord {
        let mut count = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(10), count.wait_for(|c| *c >= n))
            .await
            .expect("the record in time")
            .unwrap();
        self.records.lock().unwrap()[n - 1].clone()
    }
}

/// A server's shared state, serving one in-memory HTTP/2 connection from
/// the client `test_id("client")` at `SOURCE`.
struct Harness {
    shared: Arc<Shared>,
    listener: SocketAddr,
    send: SendRequest<Bytes>,
    log: Arc<Recorder>,
}

const SOURCE: &str = "127.0.0.1:40000";

async fn harness(configure: impl FnOnce(&mut ServerConfig)) -> Harness {
    let log = Arc::new(Recorder {
        records: Mutex::default(),
        count: tokio::sync::watch::Sender::new(0),
    });
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), test_identity("server"));
    config.access_log = log.clone();
    configure(&mut config);
    let server = Server::bind(config).await.unwrap();
    let listener = server.local_addr();
    let shared = server.shared.clone();
    // Extended CONNECT enabled, so that the client may send one and see
    // the server refuse it.
    let mut h2_server = shared.h2.server_builder();
    h2_server.enable_connect_protocol();
    let pair = h2_pair(&h2::client::Builder::new(), &h2_server).await;
    tokio::spawn(pair.client);
    let mut conn = pair.server;
    let dispatch = shared.clone();
    tokio::spawn(async move {
        let peer_id = Arc::new(test_id("client"));
        let arrived_on = IpAddr::from([127, 0, 0, 1]);
        while let Some(Ok((request, respond))) = conn.accept().await {
            let from = FromConnection {
                source: SOURCE.parse().unwrap(),
                arrived_on,
                peer_id: peer_id.clone(),
                counters: None,
                probe: Arc::default(),
            };
            tokio::spawn(dispatch.clone().serve_stream(from, request, respond));
        }
    });
    Harness {
        shared,
        listener,
        send: pair.send,
        log,
    }
}

fn connect_to(authority: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = http::Uri::try_from(authority).unwrap();
    request
}

impl Harness {
    async fn send(&self, request: Request<()>) -> (Response<RecvStream>, SendStream<Bytes>) {
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, stream) = send.send_request(request, false).unwrap();
        (response.await.unwrap(), stream)
    }

    async fn status_of(&self, request: Request<()>) -> StatusCode {
        self.send(request).await.0.status()
    }

    /// Opens a tunnel that must be answered 200.
    async fn open(&self, authority: &str) -> (Response<()>, H2Stream) {
        let (response, send) = self.send(connect_to(authority)).await;
        assert_eq!(response.status(), StatusCode::OK, "{authority}");
        let (parts, body) = response.into_parts();
        (Response::from_parts(parts, ()), H2Stream::new(send, body))
    }

    fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

/// A loopback listener that echoes each connection; its address.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// A loopback address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn refused(record: &TunnelRecord) -> (u16, &'static str) {
    match &record.outcome {
        Outcome::Refused { status, reason, .. } => (*status, reason),
        other => panic!("not a refusal: {other:?}"),
    }
}

#[tokio::test]
async fn refusals_are_answered_with_their_status_and_logged() {
    let h = harness(|_| {}).await;
    let own = h.listener.to_string();
    let mut get = Request::new(());
    *get.uri_mut() = "http://127.0.0.1:8080/".parse().unwrap();
    let cases: Vec<(Request<()>, StatusCode, &str)> = vec![
        (get, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        // The default policy allows loopback targets only.
        (connect_to("10.0.0.1:80"), StatusCode::FORBIDDEN, "denied"),
        (connect_to(&own), StatusCode::FORBIDDEN, "denied"),
        (
            connect_to("127.0.0.1:0"),
            StatusCode::BAD_REQUEST,
            "bad_authority",
        ),
        // No services table: every name is unknown.
        (
            connect_to("echo.default.svc:80"),
            StatusCode::SERVICE_UNAVAILABLE,
            "unknown_service",
        ),
    ];
    let total = cases.len();
    for (n, (request, status, reason)) in cases.into_iter().enumerate() {
        let target = request.uri().to_string();
        assert_eq!(h.status_of(request).await, status, "{target}");
        let record = h.log.nth(n + 1).await;
        assert_eq!(refused(&record), (status.as_u16(), reason), "{target}");
        assert_eq!(record.peer_id.as_deref(), Some(&test_id("client")));
        assert_eq!(record.source, SOURCE.parse().unwrap());
    }

    // An extended CONNECT (with :protocol, :scheme and :path) is no tunnel.
    let mut extended = Request::new(());
    *extended.method_mut() = Method::CONNECT;
    *extended.uri_mut() = "http://127.0.0.1:8080/chat".parse().unwrap();
    extended
        .extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    assert_eq!(h.status_of(extended).await, StatusCode::BAD_REQUEST);
    assert_eq!(refused(&h.log.nth(total + 1).await).1, "bad_request");

    let stats = h.stats();
    assert_eq!(stats.refusals, total as u64 + 1);
    assert_eq!(stats.tunnels_opened, 0);
    assert_eq!(stats.limit_refusals, 0);
}

#[tokio::test]
async fn request_headers_are_read_and_malformed_ones_counted() {
    let h = harness(|_| {}).await;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut good = connect_to("10.0.0.1:80");
    let headers = good.headers_mut();
    headers.insert(
        FORWARDED,
        HeaderValue::from_static("for=\"192.0.2.7:5555\""),
    );
    headers.insert(TRACEPARENT, HeaderValue::from_static(trace));
    h.status_of(good).await;
    let record = h.log.nth(1).await;
    assert_eq!(
        record.original_source,
        Some(ForwardedFor::Addr("192.0.2.7:5555".parse().unwrap()))
    );
    assert_eq!(record.trace.map(|t| t.to_string()).as_deref(), Some(trace));
    assert_eq!(h.stats().malformed_headers, 0);

    let mut bad = connect_to("10.0.0.1:80");
    let headers = bad.headers_mut();
    headers.insert(FORWARDED, HeaderValue::from_static("for=_hidden"));
    headers.insert(TRACEPARENT, HeaderValue::from_static("not-a-trace"));
    headers.insert(
        BAGGAGE,
        HeaderValue::from_static("k8s.namespace.name=demo,junk"),
    );
    // Still answered, on its merits: the headers are only ignored.
    assert_eq!(h.status_of(bad).await, StatusCode::FORBIDDEN);
    let record = h.log.nth(2).await;
    assert_eq!(record.original_source, None);
    assert_eq!(record.trace, None);
    assert_eq!(h.stats().malformed_headers, 3);
}

#[tokio::test]
async fn an_answered_tunnel_relays_both_ways_and_is_counted_until_it_ends() {
    let h = harness(|config| config.baggage.set("k8s.namespace.name", "servers")).await;
    let target = echo().await;
    let (response, mut tunnel) = h.open(&target.to_string()).await;
    assert_eq!(
        response.headers().get(BAGGAGE).unwrap(),
        "k8s.namespace.name=servers",
        "our metadata on the 200"
    );
    let stats = h.stats();
    assert_eq!((stats.tunnels_opened, stats.tunnels_active), (1, 1));

    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tunnel.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"hello");

    let record = h.log.nth(1).await;
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.target, target.to_string());
    assert_eq!((record.bytes_received, record.bytes_sent), (5, 5));
    let stats = h.stats();
    assert_eq!((stats.tunnels_opened, stats.tunnels_active), (1, 0));
    assert_eq!(stats.refusals, 0);
}

#[tokio::test]
async fn a_target_that_refuses_the_connection_is_answered_503() {
    let h = harness(|_| {}).await;
    let target = closed_port().await;
    assert_eq!(
        h.status_of(connect_to(&target.to_string())).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(refused(&h.log.nth(1).await), (503, "target_unreachable"));
    assert_eq!(h.stats().tunnels_opened, 0);
}

#[tokio::test]
async fn the_tunnel_limit_answers_503_and_every_end_frees_the_slot() {
    let h = harness(|config| {
        config.limits.max_tunnels = 1;
    })
    .await;
    let target = echo().await.to_string();
    // A refused tunnel gives its slot back at once.
    assert_eq!(
        h.status_of(connect_to("10.0.0.1:80")).await,
        StatusCode::FORBIDDEN
    );
    let (_, mut first) = h.open(&target).await;

    assert_eq!(
        h.status_of(connect_to(&target)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(refused(&h.log.nth(2).await), (503, "tunnel_limit"));
    let stats = h.stats();
    assert_eq!((stats.limit_refusals, stats.refusals), (1, 2));

    // The first tunnel ends; its slot is free for the next.
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    assert_eq!(h.log.nth(3).await.outcome, Outcome::Completed);
    assert_eq!(h.stats().tunnels_active, 0);
    let (_, _second) = h.open(&target).await;
    assert_eq!(h.stats().tunnels_opened, 2);
}

#[tokio::test]
async fn the_proxy_header_names_the_original_client_and_the_peer() {
    let h = harness(|config| config.proxy_protocol = true).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let mut request = connect_to(&target.to_string());
    request.headers_mut().insert(
        FORWARDED,
        HeaderValue::from_static("for=\"192.0.2.7:5555\""),
    );
    let (response, _send) = h.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut header = vec![0u8; 16];
    socket.read_exact(&mut header).await.unwrap();
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(16 + len, 0);
    socket.read_exact(&mut header[16..]).await.unwrap();
    let decoded = crate::proxy_protocol::decode(&header).expect("a PROXY v2 header");
    assert_eq!(decoded.source, "192.0.2.7:5555".parse().unwrap());
    assert_eq!(decoded.destination, target);
    assert_eq!(
        decoded.peer_identity.as_deref(),
        Some(test_id("client").to_string().as_str())
    );
}

#[tokio::test]
async fn a_gateway_relays_to_the_routes_endpoint_and_refuses_what_it_cannot_route() {
    let endpoint = echo().await;
    let mut routes = crate::gateway::Routes::new();
    routes
        .add("echo.default.svc", Some(80), vec![endpoint])
        .unwrap();
    let h = harness(|config| config.gateway_routes = Some(Arc::new(routes))).await;

    let (_, mut tunnel) = h.open("echo.default.svc:80").await;
    tunnel.write_all(b"through").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tunnel.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"through");
    let record = h.log.nth(1).await;
    assert_eq!(record.outcome, Outcome::Completed);

    assert_eq!(
        h.status_of(connect_to("echo.default.svc:81")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(refused(&h.log.nth(2).await), (503, "unknown_service"));
    // An address is no service name to a gateway.
    assert_eq!(
        h.status_of(connect_to(&endpoint.to_string())).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn a_named_service_leads_to_its_mapped_port() {
    let target = echo().await;
    let mut services = crate::services::ServiceTable::new();
    services
        .add_service(
            "echo.default.svc.cluster.local",
            [(8080, target.port())],
            Some(target.ip()),
        )
        .unwrap();
    let h = harness(|config| config.services = services).await;

    let (_, mut tunnel) = h.open("echo.default.svc.cluster.local:8080").await;
    tunnel.write_all(b"by name").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tunnel.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"by name");

    assert_eq!(
        h.status_of(connect_to("echo.default.svc.cluster.local:9090"))
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "a port the service does not list"
    );
    assert_eq!(refused(&h.log.nth(2).await), (503, "unknown_service"));
}
