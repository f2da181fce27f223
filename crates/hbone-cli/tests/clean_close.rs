//! `Dialer::close`: pooled connections end with GOAWAY and TLS
//! close_notify, so servers and gateways record a normal end. A client
//! "process" here is a runtime of its own, dropped at the end the way an
//! exiting process drops its tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use crate::common::*;
use hbone::access::Outcome;
use hbone::gateway::Routes;
use hbone::{Dialer, DialerConfig, Route, ServerConfig, SpiffeId, TunnelRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::timeout;

const SERVICE: &str = "echo.demo.svc.cluster.local:8080";
const STEP: Duration = Duration::from_secs(10);

/// Runs `work` on a runtime of its own, then drops that runtime: whatever
/// `work` left running dies as it would when a process exits.
async fn as_a_process<F, T>(work: impl FnOnce() -> F + Send + 'static) -> T
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = runtime.block_on(work());
        drop(runtime);
        out
    })
    .await
    .unwrap()
}

/// Opens one tunnel on `route`, echoes a message through it, and closes
/// the dialer (when `close`) before "exiting". Returns whether `close`
/// reported every connection ended.
async fn one_tunnel_then_exit(
    pki: &Pki,
    route: Route,
    echo: std::net::SocketAddr,
    close: bool,
) -> bool {
    let identity = pki.client.clone();
    as_a_process(move || async move {
        let dialer = Dialer::new(&identity).unwrap();
        let tunnel = timeout(STEP, dialer.open(&route, &TunnelRequest::new(echo)))
            .await
            .unwrap()
            .unwrap();
        let back = timeout(STEP, echo_roundtrip(tunnel, b"hello"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"hello");
        if !close {
            return false;
        }
        let started = Instant::now();
        let closed = timeout(STEP, dialer.close(Duration::from_secs(2)))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "close took the whole bound"
        );
        assert_eq!(dialer.pooled_connections(), 0);
        closed
    })
    .await
}

/// How a peer's read side ended: `Ok` at close_notify, else the error.
type Ending = Arc<std::sync::Mutex<Option<Result<(), String>>>>;

/// Passes reads through and notes how the stream ended.
struct Witness<T> {
    inner: T,
    ending: Ending,
}

impl<T: AsyncRead + Unpin> AsyncRead for Witness<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                self.ending.lock().unwrap().get_or_insert(Ok(()));
            }
            Poll::Ready(Err(e)) => {
                self.ending
                    .lock()
                    .unwrap()
                    .get_or_insert(Err(e.to_string()));
            }
            _ => {}
        }
        result
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Witness<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    /// h2 stops reading once it has the client's GOAWAY: read on here,
    /// to see what the client sent after it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        let mut buf = [0u8; 1024];
        while self.ending.lock().unwrap().is_none() {
            ready!(self.as_mut().poll_read(cx, &mut ReadBuf::new(&mut buf)))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// An HBONE peer made of plain rustls and h2 that echoes the tunnels of
/// one connection itself, and reports how the TLS stream ended.
async fn witness_server(pki: &Pki) -> (std::net::SocketAddr, Ending) {
    let tls = hbone::tls::ServerTls::new(&pki.server, vec![TD.to_owned()]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ending = Ending::default();
    let witness = ending.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let io = Witness {
            inner: tls,
            ending: witness,
        };
        let mut connection = h2::server::handshake(io).await.unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                let mut send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let mut body = request.into_body();
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    let _ = send.send_data(data, false);
                }
                let _ = send.send_data(bytes::Bytes::new(), true);
            });
        }
    });
    (addr, ending)
}

async fn ending_of(ending: &Ending) -> Result<(), String> {
    eventually("the peer's read side ends", || {
        ending.lock().unwrap().is_some()
    })
    .await;
    ending.lock().unwrap().clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_reads_close_notify_only_after_close() {
    let pki = Pki::new();
    let echo = closed_port().await; // the peer echoes without dialling
    let route = |server| Route::Direct {
        server,
        server_ids: vec![pki.server_id.clone()],
    };

    // Exiting with the connection pooled: no close_notify.
    let (server, ending) = witness_server(&pki).await;
    assert!(!one_tunnel_then_exit(&pki, route(server), echo, false).await);
    let without = ending_of(&ending).await.unwrap_err();
    assert!(without.contains("close_notify"), "{without}");

    // With close: close_notify before the connection goes.
    let (server, ending) = witness_server(&pki).await;
    assert!(one_tunnel_then_exit(&pki, route(server), echo, true).await);
    assert_eq!(ending_of(&ending).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closes_with_close_notify_too() {
    let pki = Pki::new();
    let (server, ending) = witness_server(&pki).await;
    let config = DialerConfig::default().with_idle_timeout(Duration::from_millis(200));
    let dialer = Dialer::with_config(&pki.client, config).unwrap();
    let target = closed_port().await;
    let tunnel = timeout(
        STEP,
        dialer.connect(server, std::slice::from_ref(&pki.server_id), target),
    )
    .await
    .unwrap()
    .unwrap();
    let back = timeout(STEP, echo_roundtrip(tunnel, b"hello"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello");
    assert_eq!(ending_of(&ending).await, Ok(()));
    assert_eq!(dialer.pooled_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_an_open_tunnel_finish() {
    let pki = Pki::new();
    let records = Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.access_log = records.clone();
    let server = start_server(config).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let open = || async {
        let mut tunnel = timeout(
            STEP,
            dialer.connect(server.addr, std::slice::from_ref(&pki.server_id), echo),
        )
        .await
        .unwrap()
        .unwrap();
        tunnel.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 5];
        timeout(STEP, tunnel.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        tunnel
    };
    let still_flowing = |mut tunnel: hbone::Tunnel| async move {
        tunnel.write_all(b"still flowing").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(STEP, tunnel.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, b"still flowing");
    };

    // close() waits for the tunnel, which carries on meanwhile.
    let tunnel = open().await;
    let waiting = tokio::spawn({
        let dialer = dialer.clone();
        async move { dialer.close(STEP).await }
    });
    eventually("no new tunnels on the closing connection", || {
        dialer.pooled_connections() == 0
    })
    .await;
    still_flowing(tunnel).await;
    assert!(timeout(STEP, waiting).await.unwrap().unwrap());
    eventually("the connection is gone", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;

    // The bound passes first: close() says so and leaves the tunnel be;
    // its connection ends with it.
    let tunnel = open().await;
    let started = Instant::now();
    let closed = timeout(STEP, dialer.close(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(
        !closed,
        "a connection with an open tunnel cannot have ended"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    still_flowing(tunnel).await;
    eventually("the connection is gone", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;

    let stats = server.stats.snapshot();
    assert_eq!(stats.connections_accepted, 2);
    eventually("the tunnels' records", || records.all().len() == 2).await;
    for record in records.all() {
        assert_eq!(record.outcome, Outcome::Completed);
        assert_eq!(record.bytes_sent, 18);
    }
}

struct Mesh {
    pki: Pki,
    route: Route,
    echo: std::net::SocketAddr,
    gateway: RunningServer,
    gateway_log: Arc<Records>,
    server: RunningServer,
    server_log: Arc<Records>,
}

async fn mesh() -> Mesh {
    let pki = Pki::new();
    let server_log = Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.access_log = server_log.clone();
    let server = start_server(config).await;
    let echo = start_echo().await;
    let gateway_id = SpiffeId::istio(TD, "istio-system", "gateway").unwrap();
    let gateway_identity = pki.ca.issue(&gateway_id, DAY).unwrap().identity().unwrap();
    let routes = Routes::parse(
        &format!(
            "[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nport = 8080\nendpoints = [\"{}\"]\n",
            server.addr
        ),
        "test routes",
    )
    .unwrap();
    let gateway_log = Arc::new(Records::default());
    let mut config = ServerConfig::new(loopback(), gateway_identity);
    config.gateway_routes = Some(Arc::new(routes));
    config.access_log = gateway_log.clone();
    let gateway = start_server(config).await;
    let route = Route::Gateway {
        gateway: gateway.addr,
        gateway_ids: vec![gateway_id],
        service: SERVICE.to_owned(),
        server_ids: vec![pki.server_id.clone()],
    };
    Mesh {
        pki,
        route,
        echo,
        gateway,
        gateway_log,
        server,
        server_log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_gateway_the_outer_tunnel_completes() {
    let mesh = mesh().await;
    assert!(one_tunnel_then_exit(&mesh.pki, mesh.route.clone(), mesh.echo, true).await);
    eventually("both connections are gone", || {
        mesh.gateway.stats.snapshot().connections_active == 0
            && mesh.server.stats.snapshot().connections_active == 0
    })
    .await;
    eventually("the records", || {
        mesh.gateway_log.all().len() == 1 && mesh.server_log.all().len() == 1
    })
    .await;
    let outer = &mesh.gateway_log.all()[0];
    assert_eq!(outer.target, SERVICE);
    assert_eq!(outer.outcome, Outcome::Completed, "{outer:?}");
    assert_eq!(mesh.server_log.all()[0].outcome, Outcome::Completed);
}
