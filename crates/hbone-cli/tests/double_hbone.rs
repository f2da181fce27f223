//! Double HBONE: client → gateway → server. The gateway routes by service
//! name, relays the inner TLS connection, and never sees the payload.

use std::sync::{Arc, Mutex};

use crate::common::*;
use hbone::gateway::Routes;
use hbone::tls::TlsFailure;
use hbone::{DialError, Dialer, Route, ServerConfig, SpiffeId, TunnelRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVICE: &str = "echo.demo.svc.cluster.local:8080";

/// A TCP relay that keeps a copy of every byte it carries, both ways.
async fn recording_relay(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(upstream).await.unwrap();
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            for (mut from, mut to, log) in [
                (
                    Box::new(in_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(out_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    log.clone(),
                ),
                (Box::new(out_read), Box::new(in_write), log.clone()),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        match from.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = to.shutdown().await;
                                return;
                            }
                            Ok(n) => {
                                log.lock().unwrap().extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        }
    });
    (addr, seen)
}

struct Mesh {
    pki: Pki,
    gateway_id: SpiffeId,
    gateway: RunningServer,
    server: RunningServer,
    echo: std::net::SocketAddr,
    seen_by_gateway_link: Arc<Mutex<Vec<u8>>>,
}

async fn mesh() -> Mesh {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let (relay, seen) = recording_relay(server.addr).await;
    let gateway_id = SpiffeId::istio(TD, "istio-system", "gateway").unwrap();
    let gateway_identity = pki.ca.issue(&gateway_id, DAY).unwrap().identity().unwrap();
    let routes = Routes::parse(
        &format!("[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nport = 8080\nendpoints = [\"{relay}\"]\n"),
        "test routes",
    )
    .unwrap();
    let mut config = ServerConfig::new(loopback(), gateway_identity);
    config.gateway_routes = Some(Arc::new(routes));
    let gateway = start_server(config).await;
    Mesh {
        pki,
        gateway_id,
        gateway,
        server,
        echo,
        seen_by_gateway_link: seen,
    }
}

impl Mesh {
    fn route(&self, service: &str, server_id: &SpiffeId) -> Route {
        Route::Gateway {
            gateway: self.gateway.addr,
            gateway_ids: vec![self.gateway_id.clone()],
            service: service.to_owned(),
            server_ids: vec![server_id.clone()],
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_end_to_end_and_the_gateway_cannot_read_it() {
    let mesh = mesh().await;
    let dialer = Dialer::new(&mesh.pki.client).unwrap();
    let route = mesh.route(SERVICE, &mesh.pki.server_id);
    let marker = b"TOP-SECRET-PAYLOAD-MARKER";
    let mut data = Vec::new();
    for i in 0..2000u32 {
        data.extend_from_slice(marker);
        data.extend_from_slice(&i.to_le_bytes());
    }
    let tunnel = dialer
        .open(&route, &TunnelRequest::new(mesh.echo))
        .await
        .unwrap();
    assert_eq!(
        tunnel.peer_id(),
        &mesh.pki.server_id,
        "the inner handshake proved the final server"
    );
    let back = echo_roundtrip(tunnel, &data).await.unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    let seen = mesh.seen_by_gateway_link.lock().unwrap().clone();
    assert!(seen.len() > data.len(), "the relay carried the traffic");
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker),
        "plaintext crossed the gateway's link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_connections_are_pooled_per_service() {
    let mesh = mesh().await;
    let dialer = Dialer::new(&mesh.pki.client).unwrap();
    let route = mesh.route(SERVICE, &mesh.pki.server_id);
    for i in 0..5 {
        let tunnel = dialer
            .open(&route, &TunnelRequest::new(mesh.echo))
            .await
            .unwrap();
        let text = format!("inner {i}");
        assert_eq!(
            echo_roundtrip(tunnel, text.as_bytes()).await.unwrap(),
            text.as_bytes()
        );
    }
    // One outer tunnel through the gateway, one inner TLS + HTTP/2
    // connection to the server, five tunnels on it.
    assert_eq!(mesh.gateway.stats.snapshot().tunnels_opened, 1);
    assert_eq!(mesh.server.stats.snapshot().connections_accepted, 1);
    assert_eq!(mesh.server.stats.snapshot().tunnels_opened, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_503_from_the_gateway() {
    let mesh = mesh().await;
    let dialer = Dialer::new(&mesh.pki.client).unwrap();
    let route = mesh.route("nothing.demo.svc.cluster.local:8080", &mesh.pki.server_id);
    match dialer.open(&route, &TunnelRequest::new(mesh.echo)).await {
        Err(DialError::Status { status, target, .. }) => {
            assert_eq!(status.as_u16(), 503);
            assert_eq!(target, "nothing.demo.svc.cluster.local:8080");
        }
        Err(other) => panic!("expected 503, got {other}"),
        Ok(_) => panic!("an unknown service was routed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_servers_identity_is_checked_inside() {
    let mesh = mesh().await;
    let dialer = Dialer::new(&mesh.pki.client).unwrap();
    let impostor = SpiffeId::istio(TD, "demo", "someone-else").unwrap();
    let route = mesh.route(SERVICE, &impostor);
    match dialer.open(&route, &TunnelRequest::new(mesh.echo)).await {
        Err(DialError::Tls {
            failure: TlsFailure::WrongServerIdentity { presented, .. },
            ..
        }) => assert_eq!(presented, mesh.pki.server_id),
        Err(other) => panic!("expected a wrong-identity failure, got {other}"),
        Ok(_) => panic!("the inner handshake accepted the wrong server"),
    }
}

/// ztunnel's double HBONE, played by a raw client: the outer CONNECT to the
/// gateway and the inner CONNECT to the final server both name the service
/// (`hostname:port`), and the inner mTLS runs inside the outer tunnel. The
/// server resolves the name through its services table and echoes; a name
/// it does not know is refused inside with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_style_service_names_inside_and_outside() {
    let pki = Pki::new();
    let echo = start_echo().await;
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.services = hbone::services::ServiceTable::parse(
        &format!(
            "[[service]]\nhost = \"echo.demo.svc.cluster.local\"\nports = {{ 8080 = {} }}\n",
            echo.port()
        ),
        "services.toml",
    )
    .unwrap();
    let records = Arc::new(Records::default());
    config.access_log = records.clone();
    let server = start_server(config).await;
    let gateway_id = SpiffeId::istio(TD, "istio-system", "gateway").unwrap();
    let gateway_identity = pki.ca.issue(&gateway_id, DAY).unwrap().identity().unwrap();
    let routes = Routes::parse(
        &format!(
            "[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nendpoints = [\"{}\"]\n",
            server.addr
        ),
        "test routes",
    )
    .unwrap();
    let mut gateway_config = ServerConfig::new(loopback(), gateway_identity);
    gateway_config.gateway_routes = Some(Arc::new(routes));
    let gateway = start_server(gateway_config).await;

    let outer_tls = raw_tls(gateway.addr, Some(&pki.client)).await.unwrap();
    let outer = raw_h2_over(outer_tls).await;
    let (status, outer_stream) = raw_connect(&outer, SERVICE).await;
    assert_eq!(status, 200, "the gateway routes the service name");
    let connector = tokio_rustls::TlsConnector::from(raw_client_config(Some(&pki.client)));
    let name = rustls::pki_types::ServerName::IpAddress(server.addr.ip().into());
    let inner_tls = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        connector.connect(name, outer_stream.unwrap()),
    )
    .await
    .expect("inner handshake stalled")
    .unwrap();
    let inner = raw_h2_over(inner_tls).await;

    let (status, tunnel) = raw_connect(&inner, SERVICE).await;
    assert_eq!(status, 200, "the server serves the service name inside");
    let data = payload(7, 100_000);
    let back = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        echo_roundtrip(tunnel.unwrap(), &data),
    )
    .await
    .expect("echo stalled")
    .unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    let (status, _) = raw_connect(&inner, "nothing.demo.svc.cluster.local:8080").await;
    assert_eq!(status, 503, "an unknown name is refused inside");
    eventually("the server logged both tunnels", || {
        records.all().len() == 2
    })
    .await;
    let targets: Vec<String> = records.all().into_iter().map(|r| r.target).collect();
    assert!(targets.contains(&SERVICE.to_owned()), "{targets:?}");
}
