//! Copies bytes both ways between two streams, with half-close.
//!
//! When one side reaches EOF, the other side's write half is shut down (for
//! TCP a FIN, for a tunnel END_STREAM) and the opposite direction keeps
//! flowing until it too ends. Byte counts survive an error, so the access log
//! can say how far a failed tunnel got.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::RelayBytes;
use crate::stream::H2Stream;

/// Buffer per direction. Large enough for full-sized TLS records and DATA
/// frames on bulk transfers.
const BUFFER_SIZE: usize = 64 << 10;

/// Bytes moved in each direction between two streams `a` and `b`; where
/// one of them is a TCP socket (the relay's socket), `a` is the socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// A copy that stopped on an I/O error, with what it had moved.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CopyError {
    /// What was moved before the error.
    pub transferred: Transferred,
    /// The I/O error that stopped the copy.
    #[source]
    pub error: io::Error,
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    let result = poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (forward, backward) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let transferred = Transferred {
        a_to_b: a_to_b.bytes,
        b_to_a: b_to_a.bytes,
    };
    result
        .map(|()| transferred)
        .map_err(|error| CopyError { transferred, error })
}

/// One direction's state.
struct Direction {
    buf: Box<[u8]>,
    /// Bytes `buf[start..end]` are read and not yet written.
    start: usize,
    end: usize,
    read_done: bool,
    needs_flush: bool,
    finished: bool,
    bytes: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            read_done: false,
            needs_flush: false,
            finished: false,
            bytes: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start == self.end && !self.read_done {
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: make sure what was
                        // written reaches the peer before waiting.
                        if self.needs_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.bytes += n as u64;
                self.needs_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Smallest read from a TCP socket into a DATA frame. Reads that fill the
/// buffer double it, up to [`MAX_READ`], so bulk transfers reach large
/// frames and TLS record batches within a few reads.
const MIN_READ: usize = 4 << 10;
const MAX_READ: usize = 256 << 10;

/// Relays between a TCP connection and a tunnel stream, both ways, with
/// half-close, without copying bytes through an intermediate buffer.
///
/// Socket reads land in a fresh buffer that is frozen and handed to h2 as a
/// DATA frame; received DATA frames are written to the socket as h2 decoded
/// them. Nothing is allocated until a socket is readable, so an idle tunnel
/// holds no buffer at all, and received window is returned to the peer only
/// as bytes are written out, so a stalled reader stalls its sender.
///
/// A plain struct rather than an `async fn`, so that an idle tunnel's task
/// holds exactly this state. On an error both sides are reset (RST_STREAM
/// CONNECT_ERROR on the tunnel, RST on the socket). `a` in [`Transferred`]
/// is the socket. The stream comes back with the result.
pub struct Relay<S> {
    parts: Option<(TcpStream, S)>,
    up: TcpToStream,
    down: StreamToTcp,
    /// Only when asked for: most tunnels have no idle limit.
    idle: Option<IdleLimit>,
    /// Metrics to add moved bytes to, as they move.
    bytes: Option<Arc<RelayBytes>>,
}

/// Ends a relay that moved no byte for `limit`.
struct IdleLimit {
    limit: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    seen: u64,
}

impl<S: AsH2Stream + Unpin> Relay<S> {
    pub fn new(tcp: TcpStream, stream: S) -> Self {
        Relay {
            parts: Some((tcp, stream)),
            up: TcpToStream::default(),
            down: StreamToTcp::default(),
            idle: None,
            bytes: None,
        }
    }

    /// Adds the bytes moved to `counters` as they move.
    pub fn with_byte_counters(mut self, counters: Arc<RelayBytes>) -> Self {
        self.bytes = Some(counters);
        self
    }

    /// Closes the tunnel (as an error, so both sides are reset) once no
    /// byte has moved either way for `limit`.
    pub fn with_idle_limit(mut self, limit: std::time::Duration) -> Self {
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
    pub fn transferred(&self) -> Transferred {
        Transferred {
            a_to_b: self.up.bytes,
            b_to_a: self.down.bytes,
        }
    }
}

impl<S: AsH2Stream + Unpin> Future for Relay<S> {
    type Output = (S, Result<Transferred, CopyError>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some((tcp, stream)) = this.parts.as_mut() else {
            return Poll::Pending;
        };
        let stream = stream.h2_stream();
        let before = (this.up.bytes, this.down.bytes);
        let up = this.up.poll(cx, tcp, stream);
        let down = match up {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => this.down.poll(cx, stream, tcp),
        };
        if let Some(bytes) = &this.bytes {
            bytes.add(this.up.bytes - before.0, this.down.bytes - before.1);
        }
        let cancelled = stream.cancelled();
        let outcome = match (up, down) {
            // The peer cancelled the tunnel: a normal end, whatever was
            // still in flight; the socket closes with the relay.
            _ if cancelled => Ok(()),
            (Poll::Ready(Err(error)), _) | (_, Poll::Ready(Err(error))) => Err(error),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Ok(()),
            _ if this.poll_idle(cx) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tunnel idle for too long",
            )),
            _ => return Poll::Pending,
        };
        let transferred = this.transferred();
        let Some((tcp, mut stream)) = this.parts.take() else {
            return Poll::Pending;
        };
        Poll::Ready(match outcome {
            Ok(()) => (stream, Ok(transferred)),
            Err(error) => {
                // Pass the failure on as a reset, in both directions.
                stream.h2_stream().reset(h2::Reason::CONNECT_ERROR);
                let _ = tcp.set_zero_linger();
                (stream, Err(CopyError { transferred, error }))
            }
        })
    }
}

/// What the zero-copy relay needs of a tunnel: its HTTP/2 stream. Kept
/// inside the crate so that no `h2` type shows in the public API.
pub(crate) trait AsH2Stream {
    fn h2_stream(&mut self) -> &mut H2Stream;
}

impl AsH2Stream for H2Stream {
    fn h2_stream(&mut self) -> &mut H2Stream {
        self
    }
}

/// TCP reads become DATA frames.
struct TcpToStream {
    /// Read from the socket, not yet within the peer's window.
    pending: Bytes,
    read_size: usize,
    eof: bool,
    finished: bool,
    bytes: u64,
}

impl Default for TcpToStream {
    fn default() -> Self {
        TcpToStream {
            pending: Bytes::new(),
            read_size: MIN_READ,
            eof: false,
            finished: false,
            bytes: 0,
        }
    }
}

impl TcpToStream {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &TcpStream,
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
            ready!(tcp.poll_read_ready(cx))?;
            let mut buf = BytesMut::with_capacity(self.read_size);
            match tcp.try_read_buf(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if n == self.read_size {
                        self.read_size = (self.read_size * 2).min(MAX_READ);
                    }
                    self.pending = buf.freeze();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// DATA frames become TCP writes.
#[derive(Default)]
struct StreamToTcp {
    /// Received, not yet written to the socket.
    pending: Bytes,
    finished: bool,
    bytes: u64,
}

impl StreamToTcp {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        tcp: &mut TcpStream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                stream.release(n);
                self.bytes += n as u64;
                continue;
            }
            match ready!(stream.poll_chunk(cx))? {
                Some(chunk) => self.pending = chunk,
                None => {
                    ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                    self.finished = true;
                }
            }
        }
    }
}

/// A tunnel's task in two phases: opening (dial, negotiate, answer), boxed
/// and freed when done, then the relay it produced, held inline.
///
/// Written out by hand because an `async` block awaiting a future it owns
/// keeps the future twice (once where it was made, once being awaited),
/// and an idle tunnel's task should hold its relay once.
pub(crate) enum Phased<O, R> {
    Opening(Pin<Box<O>>),
    Relaying(R),
    Done,
}

impl<O, R> Phased<O, R> {
    pub(crate) fn new(opening: O) -> Self {
        Phased::Opening(Box::pin(opening))
    }
}

impl<O, R> Future for Phased<O, R>
where
    O: Future<Output = Option<R>>,
    R: Future<Output = ()> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Phased::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Some(relay) => *this = Phased::Relaying(relay),
                    None => *this = Phased::Done,
                },
                Phased::Relaying(relay) => {
                    ready!(Pin::new(relay).poll(cx));
                    *this = Phased::Done;
                }
                Phased::Done => return Poll::Ready(()),
            }
        }
    }
}
