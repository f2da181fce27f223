//! An open tunnel as the application sees it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::headers::Baggage;
use crate::identity::SpiffeId;
use crate::metrics::{PerConnection, TunnelCounters};
use crate::pool::StreamLease;
use crate::relay::{AnyStream, AsH2Stream, CopyError, Relay, Transferred};
use crate::stream::H2Stream;

/// An open tunnel: a byte stream to the target, through the HBONE server.
pub struct Tunnel {
    pub(super) stream: H2Stream,
    /// Shared with the connection's other tunnels.
    pub(super) peer_id: Arc<SpiffeId>,
    /// The server's workload metadata, if it sent any, and the counters
    /// it resolves to; shared with the connection's tunnels that got the
    /// same.
    pub(super) peer: Arc<PeerMeta>,
    /// The stream slot, returned to the connection when the tunnel drops.
    pub(super) _lease: StreamLease,
}

impl Tunnel {
    /// The identity the server proved in the TLS handshake.
    pub fn peer_id(&self) -> &SpiffeId {
        &self.peer_id
    }

    /// The server's identity, shared (for records that outlive the tunnel).
    pub fn peer_arc(&self) -> Arc<SpiffeId> {
        self.peer_id.clone()
    }

    /// The metrics of tunnels on this tunnel's connection, when kept.
    pub(crate) fn counters(&self) -> Option<&Arc<TunnelCounters>> {
        self.peer.counters.as_ref()
    }

    /// Workload metadata the server sent in its `baggage` response header.
    pub fn peer_baggage(&self) -> &Baggage {
        &self.peer.baggage
    }

    /// Tears the tunnel down with RST_STREAM(CONNECT_ERROR): the server
    /// resets its TCP connection to the target instead of closing it.
    pub fn reset(&mut self) {
        self.stream.reset(h2::Reason::CONNECT_ERROR);
    }

    /// Relays between this tunnel and `local` (a socket, a Unix stream,
    /// stdin/stdout joined, a TLS stream) until both directions end, with
    /// half-close: EOF from `local` ends the tunnel's sending side, the end
    /// of the tunnel shuts `local`'s writing side down. Holds no buffer
    /// while idle, and returns the peer's flow-control window only as
    /// bytes are written to `local`. If either side fails, the tunnel is
    /// reset; the error carries what was moved until then.
    pub async fn relay<L>(self, local: L) -> Result<Transferred, CopyError>
    where
        L: AsyncRead + AsyncWrite + Unpin,
    {
        Relay::new(AnyStream(local), self).await.1
    }
}

/// What a server said about itself in the `baggage` of a 200, and the
/// counters of tunnels it answered so.
#[derive(Debug, Default)]
pub(crate) struct PeerMeta {
    pub(crate) baggage: Baggage,
    pub(crate) counters: Option<Arc<TunnelCounters>>,
}

/// A connection's [`PeerMeta`]s, by the raw `baggage` of the 200.
pub(crate) type PeerCache = PerConnection<Option<http::HeaderValue>, Arc<PeerMeta>>;

/// The underlying stream, for the relay.
impl AsH2Stream for Tunnel {
    fn h2_stream(&mut self) -> &mut H2Stream {
        &mut self.stream
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
