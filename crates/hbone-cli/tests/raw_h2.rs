//! The server driven by a raw `h2` client (no hbone code on the client
//! side). Every bad request shares its connection with a healthy tunnel,
//! which must keep working.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use h2::client::SendRequest;
use hbone::ServerConfig;
use http::{Method, Request, StatusCode};

/// A raw `h2` client connection to `server`, with the client identity.
pub async fn raw_h2(server: SocketAddr, pki: &Pki) -> SendRequest<Bytes> {
    let tls = raw_tls(server, Some(&pki.client)).await.unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

fn request(method: Method, uri: &str) -> Request<()> {
    Request::builder().method(method).uri(uri).body(()).unwrap()
}

/// Sends `request` with END_STREAM and returns the status, or the reset.
async fn status_of(
    send: &SendRequest<Bytes>,
    request: Request<()>,
) -> Result<StatusCode, h2::Error> {
    Ok(response_to(send, request).await?.status())
}

/// The response's head to `request`, sent on `send`.
async fn response_to(
    send: &SendRequest<Bytes>,
    request: Request<()>,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let mut send = send.clone().ready().await?;
    let (response, _body) = send.send_request(request, false)?;
    tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server must answer every request")
}

/// A CONNECT tunnel on `send` to `echo`, opened and half used.
struct HealthyTunnel {
    send_stream: h2::SendStream<Bytes>,
    recv_stream: h2::RecvStream,
}

impl HealthyTunnel {
    async fn open(send: &SendRequest<Bytes>, echo: SocketAddr) -> Self {
        Self::open_to(send, &echo.to_string()).await
    }

    /// Opens a tunnel to `authority`, which must lead to an echo target.
    async fn open_to(send: &SendRequest<Bytes>, authority: &str) -> Self {
        let mut send = send.clone().ready().await.unwrap();
        let (response, mut send_stream) = send
            .send_request(request(Method::CONNECT, authority), false)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("the server must answer")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "CONNECT {authority}");
        let mut recv_stream = response.into_body();
        send_stream
            .send_data(Bytes::from_static(b"first half, "), false)
            .unwrap();
        let echoed = recv_stream.data().await.unwrap().unwrap();
        assert_eq!(&echoed[..], b"first half, ");
        let _ = recv_stream.flow_control().release_capacity(echoed.len());
        HealthyTunnel {
            send_stream,
            recv_stream,
        }
    }

    async fn finish(mut self) {
        self.send_stream
            .send_data(Bytes::from_static(b"second half"), true)
            .unwrap();
        let mut rest = Vec::new();
        while let Some(chunk) =
            tokio::time::timeout(Duration::from_secs(10), self.recv_stream.data())
                .await
                .expect("the echo must answer")
        {
            let chunk = chunk.unwrap();
            let _ = self
                .recv_stream
                .flow_control()
                .release_capacity(chunk.len());
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"second half");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_leave_the_good_tunnel_alone() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connect = Duration::from_secs(2);
    let server = start_server(config).await;
    let echo = start_echo().await;
    let send = raw_h2(server.addr, &pki).await;
    let healthy = HealthyTunnel::open(&send, echo).await;

    // Not CONNECT: a 405 that names the one method served.
    for (method, path) in [(Method::GET, "/"), (Method::POST, "/upload")] {
        let response = response_to(
            &send,
            request(method.clone(), &format!("https://{echo}{path}")),
        )
        .await
        .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}"
        );
        assert_eq!(
            response
                .headers()
                .get_all(http::header::ALLOW)
                .iter()
                .collect::<Vec<_>>(),
            ["CONNECT"],
            "{method}"
        );
    }

    // Authorities that are neither ip:port nor hostname:port.
    for bad in [
        "example.com",
        "127.0.0.1",
        "127.0.0.1:0",
        "[::1]",
        "1.2.3:80",
    ] {
        let status = status_of(&send, request(Method::CONNECT, bad))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "authority {bad:?}");
    }
    // A host name with no services table: unknown here, never looked up.
    let unknown = request(Method::CONNECT, "example.com:80");
    assert_eq!(
        status_of(&send, unknown).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Denied by the default policy (loopback only); nothing is dialled.
    let denied = request(Method::CONNECT, "192.0.2.1:80");
    assert_eq!(
        status_of(&send, denied).await.unwrap(),
        StatusCode::FORBIDDEN
    );
    let denied_v6 = request(Method::CONNECT, "[2001:db8::1]:443");
    assert_eq!(
        status_of(&send, denied_v6).await.unwrap(),
        StatusCode::FORBIDDEN
    );

    // Nothing listening.
    let closed = closed_port().await;
    let unreachable = request(Method::CONNECT, &closed.to_string());
    assert_eq!(
        status_of(&send, unreachable).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    healthy.finish().await;
    let stats = server.stats.snapshot();
    assert_eq!(
        stats.connections_accepted, 1,
        "all on one connection: {stats:?}"
    );
    assert!(stats.refusals >= 8, "{stats:?}");
}

/// A target that accepts nothing (its accept queue is full, so SYNs are
/// dropped) makes the dial time out: 504, and the tunnel beside it is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_timeout_is_504() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.connect = Duration::from_millis(300);
    let server = start_server(config).await;
    let echo = start_echo().await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(loopback()).unwrap();
    let full = socket.listen(1).unwrap();
    let full_addr = full.local_addr().unwrap();
    // Fill the accept queue; the listener never accepts.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(full_addr),
        );
        if let Ok(Ok(stream)) = attempt.await {
            fillers.push(stream);
        }
    }

    let send = raw_h2(server.addr, &pki).await;
    let healthy = HealthyTunnel::open(&send, echo).await;
    let started = std::time::Instant::now();
    let status = status_of(&send, request(Method::CONNECT, &full_addr.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(3));
    healthy.finish().await;
    drop(full);
}

/// A policy with `--allow-id` turns away other identities of the trust
/// domain with 403, and lets the listed one through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rules_are_enforced_per_stream() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.policy = hbone::policy::Policy::new(
        vec!["spiffe://cluster.local/ns/other/*".parse().unwrap()],
        Vec::new(),
    );
    let server = start_server(config).await;
    let echo = start_echo().await;
    let send = raw_h2(server.addr, &pki).await;
    let status = status_of(&send, request(Method::CONNECT, &echo.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);

    let insider_id = id("spiffe://cluster.local/ns/other/sa/app");
    let insider = pki.ca.issue(&insider_id, DAY).unwrap().identity().unwrap();
    let dialer = hbone::Dialer::new(&insider).unwrap();
    let tunnel = dialer
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tunnel, b"let in").await.unwrap(), b"let in");
}

/// HTTP/2 frames written by hand, for requests the `h2` crate refuses to
/// send: a CONNECT carrying `:scheme` and `:path`. Header blocks use HPACK
/// literals without indexing or Huffman coding, which any decoder accepts.
mod frames {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;

    pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            assert!(name.len() < 127 && value.len() < 127);
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        block
    }

    pub async fn write<W: AsyncWrite + Unpin>(
        w: &mut W,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) {
        let len = payload.len() as u32;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        w.write_all(&frame).await.unwrap();
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await.unwrap();
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.unwrap();
        (head[3], head[4], stream, payload)
    }
}

/// CONNECT with `:scheme` and `:path` is malformed (RFC 9113 §8.5): the
/// stream is reset or answered 400, and a tunnel on the same connection
/// carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_path_is_refused_without_harming_its_neighbour() {
    use frames::*;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let mut tls = raw_tls(server.addr, Some(&pki.client)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    write(&mut tls, SETTINGS, 0, 0, &[]).await;

    let authority = echo.to_string();
    let good = header_block(&[(":method", "CONNECT"), (":authority", &authority)]);
    write(&mut tls, HEADERS, END_HEADERS, 1, &good).await;
    let bad = header_block(&[
        (":method", "CONNECT"),
        (":scheme", "http"),
        (":authority", &authority),
        (":path", "/path"),
    ]);
    write(&mut tls, HEADERS, END_HEADERS, 3, &bad).await;

    let (mut good_status, mut bad_outcome, mut echoed, mut good_ended) =
        (None, None, Vec::new(), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(good_ended && bad_outcome.is_some()) {
        let (kind, flags, stream, payload) = tokio::time::timeout_at(deadline, read(&mut tls))
            .await
            .expect("server went quiet");
        match (kind, stream) {
            (SETTINGS, 0) if flags & ACK == 0 => write(&mut tls, SETTINGS, ACK, 0, &[]).await,
            // :status 200 and 400 are static-table entries 8 and 12.
            (HEADERS, 1) => {
                good_status = Some(payload[0]);
                write(&mut tls, DATA, END_STREAM, 1, b"still here").await;
            }
            (DATA, 1) => {
                echoed.extend_from_slice(&payload);
                good_ended |= flags & END_STREAM != 0;
            }
            (RST_STREAM, 3) => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                bad_outcome = Some(format!("reset {code}"));
            }
            (HEADERS, 3) => bad_outcome = Some(format!("status byte {:#x}", payload[0])),
            _ => {}
        }
    }
    assert_eq!(good_status, Some(0x88), "the good tunnel must get 200");
    assert_eq!(echoed, b"still here");
    let outcome = bad_outcome.unwrap();
    // PROTOCOL_ERROR (1) reset, or 400.
    assert!(
        outcome == "reset 1" || outcome == "status byte 0x8c",
        "{outcome}"
    );
}

/// RST_STREAM(CANCEL) from the client is a normal end (DESIGN.md §2): the
/// server closes its side of the target connection at once, even though
/// the target never closed, and logs the tunnel as completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_the_tunnel_cleanly_and_promptly() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let records = std::sync::Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.access_log = records.clone();
    let server = start_server(config).await;
    let target = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (got_hi, hi_arrived) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut hi = [0u8; 2];
        socket.read_exact(&mut hi).await.unwrap();
        let _ = got_hi.send(hi);
        // The target never writes or closes; it waits for the server.
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.map(|_| rest)
    });

    let send = raw_h2(server.addr, &pki).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send
        .send_request(request(Method::CONNECT, &target_addr.to_string()), false)
        .unwrap();
    let response = within(PEER_WAIT, "the response", response).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stream.send_data(Bytes::from_static(b"hi"), false).unwrap();
    let hi = tokio::time::timeout(Duration::from_secs(10), hi_arrived)
        .await
        .expect("the data reaches the target")
        .unwrap();
    assert_eq!(&hi, b"hi");
    stream.send_reset(h2::Reason::CANCEL);

    let after = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the target's connection must close after CANCEL")
        .unwrap();
    // A normal end: the target reads a FIN (a clean EOF), not a reset.
    let rest = after.expect("CANCEL closes the target connection with FIN, not RST");
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the tunnel was logged", || !records.all().is_empty()).await;
    assert_eq!(records.all()[0].outcome, hbone::access::Outcome::Completed);
    eventually("no tunnel left open", || {
        server.stats.snapshot().tunnels_active == 0
    })
    .await;
}

/// An echo target on `[::1]`.
async fn start_echo_v6() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// A CONNECT naming a service (`hostname:port`, as ztunnel sends in double
/// HBONE and from waypoints) is served through the services table: the
/// address the connection arrived on with the port map, or the service's
/// own address (IPv6 too), or, for a listed domain, the system resolver.
/// Names the table does not know are refused as unknown services, each
/// beside a healthy tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_host_names_are_served_from_the_services_table() {
    let pki = Pki::new();
    let echo = start_echo().await;
    let echo6 = start_echo_v6().await;
    let table = format!(
        r#"
        resolve-domains = ["localhost"]

        [[service]]
        host = "echo.default.svc.cluster.local"
        ports = {{ 8081 = {echo_port} }}

        [[service]]
        host = "echo6.default.svc.cluster.local"
        address = "::1"
        ports = {{ 8081 = {echo6_port} }}

        [[service]]
        host = "outside.default.svc.cluster.local"
        address = "192.0.2.1"
        "#,
        echo_port = echo.port(),
        echo6_port = echo6.port(),
    );
    let records = std::sync::Arc::new(Records::default());
    let metrics = std::sync::Arc::new(hbone::metrics::Metrics::new());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.services = hbone::services::ServiceTable::parse(&table, "services.toml").unwrap();
    config.access_log = records.clone();
    config.telemetry.metrics = Some(metrics.clone());
    let server = hbone::Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let services = server.services();
    let _running = tokio::spawn(server.run());
    let send = raw_h2(addr, &pki).await;
    let healthy = HealthyTunnel::open(&send, echo).await;

    // Arrived on 127.0.0.1: the service port maps to the echo's port there.
    for name in [
        "echo.default.svc.cluster.local:8081",
        "Echo.Default.svc.cluster.local.:8081",
        "echo6.default.svc.cluster.local:8081",
        &format!("localhost:{}", echo.port()),
    ] {
        HealthyTunnel::open_to(&send, name).await.finish().await;
    }

    let refused = [
        // Not in the table, and not under a listed domain: no lookup.
        (
            "unknown.default.svc.cluster.local:8081",
            503,
            "unknown_service",
        ),
        ("example.com:80", 503, "unknown_service"),
        // Listed, but not on this port.
        (
            "echo.default.svc.cluster.local:9999",
            503,
            "unknown_service",
        ),
        // The policy judges where the name leads (default: loopback only).
        ("outside.default.svc.cluster.local:80", 403, "denied"),
    ];
    for (authority, status, _) in refused {
        let got = status_of(&send, request(Method::CONNECT, authority))
            .await
            .unwrap();
        assert_eq!(got.as_u16(), status, "CONNECT {authority}");
    }
    healthy.finish().await;

    eventually("every tunnel was logged", || records.all().len() == 9).await;
    for (authority, status, reason) in refused {
        let record = records
            .all()
            .into_iter()
            .find(|r| r.target == authority)
            .unwrap_or_else(|| panic!("no record for {authority}"));
        match record.outcome {
            hbone::access::Outcome::Refused {
                status: got,
                reason: why,
                ..
            } => assert_eq!((got, why), (status, reason), "{authority}"),
            other => panic!("{authority}: {other:?}"),
        }
    }
    let text = metrics.encode();
    let no_route = text
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains("response_flags=\"NR\"")
        })
        .unwrap_or_else(|| panic!("no NR series:\n{text}"));
    assert!(no_route.ends_with(" 3"), "{no_route}");

    // A reloaded table is in force for the next tunnel.
    let renamed = table.replace("echo.default", "renamed.default");
    services.replace(hbone::services::ServiceTable::parse(&renamed, "services.toml").unwrap());
    HealthyTunnel::open_to(&send, "renamed.default.svc.cluster.local:8081")
        .await
        .finish()
        .await;
    let gone = request(Method::CONNECT, "echo.default.svc.cluster.local:8081");
    assert_eq!(
        status_of(&send, gone).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// Policy rules may name services: allowed by name, denied by name, and
/// the same target asked for by address matches neither rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_rules_may_name_services() {
    let pki = Pki::new();
    let echo = start_echo().await;
    let table = format!(
        "[[service]]\nhost = \"echo.demo.svc.cluster.local\"\nports = {{ 8080 = {port} }}\n\n\
         [[service]]\nhost = \"secret.demo.svc.cluster.local\"\nports = {{ 8080 = {port} }}\n",
        port = echo.port()
    );
    let policy = hbone::policy::file::parse(
        r#"
        [[rule]]
        name = "no secrets"
        action = "deny"
        to = ["secret.demo.svc.cluster.local"]

        [[rule]]
        name = "echo by name"
        from = ["spiffe://cluster.local/ns/test/*"]
        to = ["echo.demo.svc.cluster.local:8080"]
        "#,
        "policy.toml",
    )
    .unwrap();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.services = hbone::services::ServiceTable::parse(&table, "services.toml").unwrap();
    config.policy = policy;
    let server = start_server(config).await;
    let send = raw_h2(server.addr, &pki).await;
    let healthy = HealthyTunnel::open_to(&send, "echo.demo.svc.cluster.local:8080").await;
    for denied in ["secret.demo.svc.cluster.local:8080", &echo.to_string()] {
        let status = status_of(&send, request(Method::CONNECT, denied))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "CONNECT {denied}");
    }
    healthy.finish().await;
}
