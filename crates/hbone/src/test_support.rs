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
