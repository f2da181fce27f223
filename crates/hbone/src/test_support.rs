//! Helpers for the unit tests: HTTP/2 connections over memory, so that the
//! pool, the stream wrapper, the dialer and the server's CONNECT handling
//! can be exercised without sockets, under paused time.

use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection as ClientConnection, SendRequest};
use h2::server::Connection as ServerConnection;
use tokio::io::DuplexStream;

/// Bytes either direction of the in-memory pipe buffers; more than any
/// test's flow-control window, so the transport never is the bottleneck.
const PIPE: usize = 1 << 20;

/// Both ends of one HTTP/2 connection over memory, handshakes done.
pub(crate) struct H2Pair {
    pub(crate) send: SendRequest<Bytes>,
    pub(crate) client: ClientConnection<DuplexStream, Bytes>,
    pub(crate) server: ServerConnection<DuplexStream, Bytes>,
}

/// Connects an h2 client built by `client` to an h2 server built by
/// `server` through a `tokio::io::duplex` pipe.
pub(crate) async fn h2_pair(client: &h2::client::Builder, server: &h2::server::Builder) -> H2Pair {
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (client, server) = tokio::join!(
        client.handshake::<_, Bytes>(client_io),
        server.handshake::<_, Bytes>(server_io)
    );
    let (send, client) = client.expect("client handshake");
    H2Pair {
        send,
        client,
        server: server.expect("server handshake"),
    }
}

/// An h2 client and server with default settings.
pub(crate) async fn default_h2_pair() -> H2Pair {
    h2_pair(&h2::client::Builder::new(), &h2::server::Builder::new()).await
}

/// One CONNECT stream over memory, as the client sees it and as the
/// server sees it, each side granting `window` per stream.
/// The `SendRequest` keeps the connection from closing under them.
pub(crate) async fn stream_pair(
    window: u32,
) -> (
    crate::stream::H2Stream,
    crate::stream::H2Stream,
    SendRequest<Bytes>,
) {
    use crate::stream::H2Stream;
    use http::{Method, Request, Response};
    let mut client = h2::client::Builder::new();
    client
        .initial_window_size(window)
        .initial_connection_window_size(1 << 20);
    let mut server = h2::server::Builder::new();
    server
        .initial_window_size(window)
        .initial_connection_window_size(1 << 20);
    let pair = h2_pair(&client, &server).await;
    tokio::spawn(pair.client);
    let mut server_conn = pair.server;
    let (accepted, server_stream) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (request, mut respond) = server_conn.accept().await.unwrap().unwrap();
        let send = respond.send_response(Response::new(()), false).unwrap();
        let _ = accepted.send(H2Stream::new(send, request.into_body()));
        // Drives the connection for as long as the client keeps it.
        while server_conn.accept().await.is_some() {}
    });
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = "127.0.0.1:8080".parse().unwrap();
    let mut send = pair.send.ready().await.unwrap();
    let (response, send_stream) = send.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    let client_stream = H2Stream::new(send_stream, response.into_body());
    (client_stream, server_stream.await.unwrap(), send)
}

/// Lets every other task run until nothing is left to do. Under paused
/// time the runtime only moves the clock when all tasks are idle, so this
/// returns once the others are blocked (and advances the clock by a
/// millisecond, well below any timeout the tests use).
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// `spiffe://cluster.local/ns/test/sa/{name}`.
pub(crate) fn test_id(name: &str) -> crate::SpiffeId {
    format!("spiffe://cluster.local/ns/test/sa/{name}")
        .parse()
        .expect("a valid SPIFFE ID")
}

/// An identity for `test_id(name)`, from a development CA of its own.
#[cfg(feature = "ca")]
pub(crate) fn test_identity(name: &str) -> crate::Identity {
    let day = Duration::from_secs(86_400);
    let ca = crate::ca::DevCa::generate("cluster.local", day).expect("a CA");
    ca.issue(&test_id(name), day)
        .expect("a certificate")
        .identity()
        .expect("an identity")
}

/// Identities for `test_id(name)` of each name, all from one development
/// CA, so that they trust each other.
#[cfg(feature = "ca")]
pub(crate) fn test_identities<const N: usize>(names: [&str; N]) -> [crate::Identity; N] {
    let day = Duration::from_secs(86_400);
    let ca = crate::ca::DevCa::generate("cluster.local", day).expect("a CA");
    names.map(|name| {
        ca.issue(&test_id(name), day)
            .expect("a certificate")
            .identity()
            .expect("an identity")
    })
}
