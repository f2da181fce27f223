//! The relay: moves bytes both ways between a local byte stream (a TCP
//! socket, stdin/stdout, an application's Unix or TLS stream) and a tunnel,
//! with half-close, until both directions end.
//!
//! One engine for every entry and the server. What it keeps:
//! - No buffer while idle: a read buffer is allocated only once the local
//!   stream is readable (for TCP, tested without allocating first) and handed
//!   to h2 as the DATA frame itself; received DATA frames are written out as
//!   h2 decoded them, those that wait together in one vectored write. An
//!   idle tunnel's relay holds no buffer at all.
//! - Flow-control window returned to the peer only as received bytes are
//!   written out, so a stalled reader stalls its sender.
//! - Half-close: EOF on one side becomes END_STREAM (or a write shutdown)
//!   on the other, and the opposite direction keeps flowing.
//! - Byte counts that survive an error, so the access log can say how far
//!   a failed tunnel got.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::metrics::RelayBytes;
use crate::stream::H2Stream;

/// Bytes a relay moved, by direction, seen from the tunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Read from the local stream and sent into the tunnel.
    pub to_tunnel: u64,
    /// Received from the tunnel and written to the local stream.
    pub from_tunnel: u64,
}

/// A relay that stopped on an I/O error, with what it had moved.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CopyError {
    /// What was moved before the error.
    pub transferred: Transferred,
    /// The I/O error that stopped the relay.
    #[source]
    pub error: io::Error,
}

/// What the relay needs of its local side beyond reading and writing.
pub(crate) trait LocalStream: AsyncRead + AsyncWrite + Unpin {
    /// Waits until a read would find something (data, EOF or an error),
    /// without a buffer. Streams that cannot tell say yes at once.
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The relay failed: end the stream as abruptly as it allows.
    fn abort(&self) {}

    /// Whether closing the stream after its reads reached EOF ends its
    /// writes as a shutdown would. The relay, which closes it as soon as
    /// both directions end, then skips the shutdown of the direction that
    /// ends last.
    fn close_ends_writes(&self) -> bool {
        false
    }
}

impl LocalStream for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    /// Closing with zero linger sends RST: the peer sees a reset, as the
    /// tunnel's other end did.
    fn abort(&self) {
        let _ = self.set_zero_linger();
    }

    /// With nothing left unread, `close` sends the FIN that `shutdown`
    /// would (no RST), after what is still queued: one system call fewer
    /// per tunnel.
    fn close_ends_writes(&self) -> bool {
        true
    }
}

/// Any other byte stream, relayed as it is.
pub(crate) struct AnyStream<T>(pub(crate) T);

impl<T: AsyncRead + Unpin> AsyncRead for AnyStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AnyStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> LocalStream for AnyStream<T> {}

/// Read sizes from the local stream, each the payload of one DATA frame:
/// a read that fills its buffer moves to the next size, so bulk transfers
/// reach large frames within a few reads. From 16 KiB up each is whole TLS
/// records (16,384 bytes of plaintext each) less the 9-byte frame header,
/// so that a frame does not spill a few bytes into a record of their own.
const READ_SIZES: [usize; 7] = [
    4 << 10,
    8 << 10,
    TLS_RECORD - FRAME_HEADER,
    2 * TLS_RECORD - FRAME_HEADER,
    4 * TLS_RECORD - FRAME_HEADER,
    8 * TLS_RECORD - FRAME_HEADER,
    16 * TLS_RECORD - FRAME_HEADER,
];
const TLS_RECORD: usize = 16 << 10;
const FRAME_HEADER: usize = 9;

/// A read, or a batch of received frames, at least this large marks the
/// tunnel as bulk until it goes quiet: a turn that moves this much
/// keeps a worker from the other tunnels for tens of microseconds, so new
/// connections are placed elsewhere ([`crate::Workers`]). Interactive
/// tunnels stay far below it.
const BULK_TURN: usize = 4 * TLS_RECORD - FRAME_HEADER;

/// Relays between a local stream and a tunnel stream, both ways, with
/// half-close, without copying bytes through an intermediate buffer.
///
/// Local reads land in a fresh buffer that is frozen and handed to h2 as a
/// DATA frame; received DATA frames are written out as h2 decoded them.
///
/// A plain struct rather than an `async fn`, so that an idle tunnel's task
/// holds exactly this state. On an error both sides are reset (RST_STREAM
/// CONNECT_ERROR on the tunnel, [`LocalStream::abort`] on the local side).
/// The stream comes back with the result.
pub(crate) struct Relay<L, S> {
    parts: Option<(L, S)>,
    up: ToTunnel,
    down: FromTunnel,
    /// Only when asked for: most tunnels have no idle limit.
    idle: Option<IdleLimit>,
    /// Metrics to add moved bytes to, as they move.
    bytes: Option<Arc<RelayBytes>>,
    /// Whether the tunnel counts as bulk on the worker it runs on.
    bulk: crate::workers::BulkTracker,
}

/// Ends a relay that moved no byte for `limit`.
struct IdleLimit {
    limit: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    seen: u64,
}

impl<L: LocalStream, S: AsH2Stream + Unpin> Relay<L, S> {
    pub(crate) fn new(local: L, stream: S) -> Self {
        Relay {
            parts: Some((local, stream)),
            up: ToTunnel::default(),
            down: FromTunnel::default(),
            idle: None,
            bytes: None,
            bulk: crate::workers::BulkTracker::default(),
        }
    }

    /// Adds the bytes moved to `counters` as they move.
    pub(crate) fn with_byte_counters(mut self, counters: Arc<RelayBytes>) -> Self {
        self.bytes = Some(counters);
        self
    }

    /// Closes the tunnel (as an error, so both sides are reset) once no
    /// byte has moved either way for `limit`.
    pub(crate) fn with_idle_limit(mut self, limit: std::time::Duration) -> Self {
        self.idle = Some(IdleLimit {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            seen: 0,
        });
        self
    }

    /// Whether the idle limit ran out; restarts it when bytes moved.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let moved = self.up.bytes + self.down.bytes;
        let Some(idle) = self.idle.as_mut() else {
            return false;
        };
        if moved != idle.seen {
            idle.seen = moved;
            idle.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + idle.limit);
        }
        idle.timer.as_mut().poll(cx).is_ready()
    }

    /// Bytes moved so far.
    pub(crate) fn transferred(&self) -> Transferred {
        Transferred {
            to_tunnel: self.up.bytes,
            from_tunnel: self.down.bytes,
        }
    }
}

impl<L: LocalStream, S: AsH2Stream + Unpin> Future for Relay<L, S> {
    type Output = (S, Result<Transferred, CopyError>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some((local, stream)) = this.parts.as_mut() else {
            return Poll::Pending;
        };
        let stream = stream.h2_stream();
        let before = (this.up.bytes, this.down.bytes);
        let up = this.up.poll(cx, local, stream);
        let down = match up {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => this.down.poll(cx, stream, local, this.up.finished),
        };
        if let Some(bytes) = &this.bytes {
            bytes.add(this.up.bytes - before.0, this.down.bytes - before.1);
        }
        if std::mem::take(&mut this.up.saw_bulk) | std::mem::take(&mut this.down.saw_bulk) {
            this.bulk.moved_bulk();
        }
        this.bulk.poll_quiet(cx);
        let cancelled = stream.cancelled();
        let outcome = match (up, down) {
            // The peer cancelled the tunnel: a normal end, whatever was
            // still in flight; the local stream closes with the relay.
            _ if cancelled && !this.down.holds_data() => Ok(()),
            (Poll::Ready(Err(error)), _) | (_, Poll::Ready(Err(error))) => Err(error),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Ok(()),
            _ if this.poll_idle(cx) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tunnel idle for too long",
            )),
            _ => {
                if let Some((_, stream)) = this.parts.as_mut() {
                    stream.h2_stream().end_turn();
                }
                return Poll::Pending;
            }
        };
        let transferred = this.transferred();
        let Some((local, mut stream)) = this.parts.take() else {
            return Poll::Pending;
        };
        stream.h2_stream().release_held();
        Poll::Ready(match outcome {
            Ok(()) => (stream, Ok(transferred)),
            Err(error) => {
                // Pass the failure on as a reset, in both directions.
                stream.h2_stream().reset(h2::Reason::CONNECT_ERROR);
                local.abort();
                (stream, Err(CopyError { transferred, error }))
            }
        })
    }
}

/// What the relay needs of a tunnel: its HTTP/2 stream. Kept inside the
/// crate so that no `h2` type shows in the public API.
pub(crate) trait AsH2Stream {
    fn h2_stream(&mut self) -> &mut H2Stream;
}

impl AsH2Stream for H2Stream {
    fn h2_stream(&mut self) -> &mut H2Stream {
        self
    }
}

/// Local reads become DATA frames.
struct ToTunnel {
    /// Read from the local stream, not yet within the peer's window.
    pending: Bytes,
    /// Index into [`READ_SIZES`].
    read_size: usize,
    eof: bool,
    finished: bool,
    bytes: u64,
    /// A read has brought [`BULK_TURN`] bytes or more since the relay
    /// last looked.
    saw_bulk: bool,
}

impl Default for ToTunnel {
    fn default() -> Self {
        ToTunnel {
            pending: Bytes::new(),
            read_size: 0,
            eof: false,
            finished: false,
            bytes: 0,
            saw_bulk: false,
        }
    }
}

impl ToTunnel {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        local: &mut impl LocalStream,
        stream: &mut H2Stream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            if !self.pending.is_empty() {
                let n = ready!(stream.poll_send_capacity(cx, self.pending.len()))?;
                let chunk = self.pending.split_to(n);
                stream.send_chunk(cx, chunk)?;
                self.bytes += n as u64;
                continue;
            }
            if self.eof {
                stream.finish(cx)?;
                self.finished = true;
                continue;
            }
            ready!(local.poll_read_ready(cx))?;
            // Read through `poll_read`, not a readiness test plus `try_read`:
            // tokio then knows a short read drained the socket and waits for
            // the next edge instead of trying a read that finds nothing.
            // The buffer is dropped if nothing came, so idle holds none.
            let size = READ_SIZES[self.read_size];
            let mut buf = BytesMut::with_capacity(size);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *local),
                cx,
                &mut buf
            )) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if n == size {
                        self.read_size = (self.read_size + 1).min(READ_SIZES.len() - 1);
                    }
                    self.saw_bulk |= n >= BULK_TURN;
                    self.pending = buf.freeze();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Most DATA frames written to the local stream in one call. Several
/// frames wait at once when many tunnels share a connection (each then
/// gets smaller frames); one vectored write for all of them saves a
/// system call per frame.
const MAX_GATHER: usize = 16;

/// DATA frames become local writes.
#[derive(Default)]
struct FromTunnel {
    /// Received, not yet written to the local stream.
    pending: FrameQueue,
    /// The stream ended (in error when `failed` holds one): acted on once
    /// what arrived before is written.
    ended: bool,
    failed: Option<io::Error>,
    /// Written since the last flush (buffered local streams such as TLS or
    /// stdout hold bytes until flushed; TCP's flush is free).
    needs_flush: bool,
    finished: bool,
    bytes: u64,
    /// One poll has gathered [`BULK_TURN`] bytes or more since the relay
    /// last looked.
    saw_bulk: bool,
}

impl FromTunnel {
    /// Whether received bytes still wait to be written out.
    fn holds_data(&self) -> bool {
        !self.pending.is_empty()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        local: &mut impl LocalStream,
        local_read_ended: bool,
    ) -> Poll<io::Result<()>> {
        // h2 had no more frames when last asked during this poll: it wakes
        // the task when one comes, so asking again before then (a lock and
        // a waker swap in h2) would find none.
        let mut drained = false;
        loop {
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            // Take every frame h2 already holds (up to a bound), so that
            // one write carries them all.
            let mut gathered = 0;
            while !self.ended && !drained && self.pending.len() < MAX_GATHER {
                match stream.poll_chunk(cx) {
                    Poll::Ready(Ok(Some(chunk))) => {
                        gathered += chunk.len();
                        self.pending.push_back(chunk);
                    }
                    Poll::Ready(Ok(None)) => self.ended = true,
                    Poll::Ready(Err(e)) => (self.ended, self.failed) = (true, Some(e)),
                    Poll::Pending => drained = true,
                }
            }
            self.saw_bulk |= gathered >= BULK_TURN;
            if !self.pending.is_empty() {
                let n = ready!(self.poll_write_pending(cx, local))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.consume(n, stream);
                continue;
            }
            if !self.ended {
                // Nothing more for now: what was written must reach the
                // local side before the relay waits.
                if self.needs_flush {
                    ready!(Pin::new(&mut *local).poll_flush(cx))?;
                    self.needs_flush = false;
                }
                return Poll::Pending;
            }
            if let Some(error) = self.failed.take() {
                return Poll::Ready(Err(error));
            }
            // Ending last, the relay closes the stream right after.
            if !(local_read_ended && local.close_ends_writes()) {
                ready!(Pin::new(&mut *local).poll_shutdown(cx))?;
            }
            self.finished = true;
        }
    }

    /// Writes the pending frames, all in one call where the local stream
    /// takes vectored writes.
    fn poll_write_pending(
        &self,
        cx: &mut Context<'_>,
        local: &mut impl LocalStream,
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() == 1 || !local.is_write_vectored() {
            return Pin::new(&mut *local).poll_write(cx, &self.pending.first);
        }
        let mut slices = [IoSlice::new(&[]); MAX_GATHER];
        for (slice, chunk) in slices.iter_mut().zip(self.pending.iter()) {
            *slice = IoSlice::new(chunk);
        }
        let count = self.pending.len().min(MAX_GATHER);
        Pin::new(&mut *local).poll_write_vectored(cx, &slices[..count])
    }

    /// `n` bytes were written: drop them and return their window, with
    /// the next frame this tunnel sends if one follows soon.
    fn consume(&mut self, n: usize, stream: &mut H2Stream) {
        self.pending.advance(n);
        stream.release_later(n);
        self.bytes += n as u64;
        self.needs_flush = true;
    }
}

/// Received frames, oldest first. The first is held inline, so that a
/// tunnel whose frames come one at a time (and every idle one) allocates
/// nothing for the queue.
#[derive(Default)]
struct FrameQueue {
    /// Empty only when the whole queue is.
    first: Bytes,
    /// Boxed: a tunnel's task holds one pointer for it, not three (which
    /// measurably grew every idle tunnel).
    #[expect(
        clippy::box_collection,
        reason = "one word in every tunnel's task instead of three"
    )]
    rest: Option<Box<VecDeque<Bytes>>>,
}

impl FrameQueue {
    fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    fn len(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            1 + self.rest.as_ref().map_or(0, |rest| rest.len())
        }
    }

    /// Adds a frame (never an empty one) at the back.
    fn push_back(&mut self, frame: Bytes) {
        if self.first.is_empty() {
            self.first = frame;
        } else {
            self.rest.get_or_insert_default().push_back(frame);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first)
            .filter(|first| !first.is_empty())
            .chain(self.rest.iter().flat_map(|rest| rest.iter()))
    }

    /// Drops the first `n` bytes.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && !self.first.is_empty() {
            let step = n.min(self.first.len());
            self.first.advance(step);
            n -= step;
            if self.first.is_empty() {
                let next = self.rest.as_mut().and_then(|rest| rest.pop_front());
                self.first = next.unwrap_or_default();
            }
        }
        if self.rest.as_ref().is_some_and(|rest| rest.is_empty()) {
            // Gathering is over for now: hold no memory while waiting.
            self.rest = None;
        }
    }
}

#[cfg(test)]
mod held_window_tests;
#[cfg(test)]
mod tests;
