//! An HTTP/2 stream seen as a byte stream (`AsyncRead + AsyncWrite`).
//!
//! Reading hands out DATA frames as they arrive and gives their bytes back to
//! the peer's flow-control window only once the application has consumed
//! them, so a slow reader holds at most one stream window in memory.
//! Writing sends no more than the stream has window for, so a slow peer
//! applies backpressure instead of growing a send buffer. Shutting down the
//! write side sends an empty DATA frame with END_STREAM (half-close); an
//! END_STREAM from the peer reads as EOF. A reset with NO_ERROR or CANCEL is
//! a normal end; any other reset reads as a connection reset.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::window::{Probe, StreamProbe};

/// Largest chunk handed to h2 in one write; matches the 1 MiB frame size.
const MAX_WRITE: usize = 1 << 20;

/// Most window one stream holds back ([`H2Stream::release_later`]): a
/// quarter of the smallest stream window, so only small exchanges wait;
/// bulk frames are larger and give their window back at once.
const HELD_WINDOW_PER_STREAM: usize = crate::window::MIN_STREAM_WINDOW as usize / 4;

/// Both halves of one HTTP/2 stream as a byte stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read by the application.
    pending: Bytes,
    write_closed: bool,
    /// The peer ended the stream with RST_STREAM NO_ERROR or CANCEL.
    cancelled: bool,
    /// Where the connection's window sizing learns what arrived, and
    /// that this stream is open.
    probe: Option<StreamProbe>,
    /// Consumed bytes whose window goes back later ([`H2Stream::release_later`]).
    held: HeldWindow,
}

/// Window owed to the peer for bytes already written out, held back so
/// that the WINDOW_UPDATE leaves with this stream's next DATA frame (a
/// request's window with its response) instead of in a TLS record, a
/// write and a peer's read of its own.
#[derive(Debug, Default)]
struct HeldWindow {
    /// Consumed during the relay's current turn.
    fresh: usize,
    /// Held over from the turn before: given back at the end of this one
    /// if no DATA frame took it first.
    carried: usize,
}

impl HeldWindow {
    fn total(&self) -> usize {
        self.fresh + self.carried
    }
}

impl H2Stream {
    /// Wraps the send half and receive half of one stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            cancelled: false,
            probe: None,
            held: HeldWindow::default(),
        }
    }

    /// Reports the bytes received to the connection's window sizing.
    pub(crate) fn with_probe(mut self, probe: Option<Arc<Probe>>) -> Self {
        let flow = self.recv.flow_control().clone();
        self.probe = probe.map(|probe| StreamProbe::new(probe, Some(flow)));
        self
    }

    /// Ends the stream abruptly with `reason` (RST_STREAM). Use a reason
    /// other than NO_ERROR/CANCEL to tell the peer the TCP side was reset.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

/// Whether an h2 error is a peer's normal end of the stream.
fn is_graceful(error: &h2::Error) -> bool {
    error.is_reset()
        && matches!(
            error.reason(),
            Some(Reason::NO_ERROR) | Some(Reason::CANCEL)
        )
}

/// Maps an h2 error to the I/O error an application expects.
pub(crate) fn to_io_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if error.is_reset() || error.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, error)
}

impl H2Stream {
    /// The next chunk of received data, as h2 decoded it (no copy), or
    /// `None` at END_STREAM. Its window is not returned to the peer until
    /// [`H2Stream::release`] says the bytes were handed on.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(None)),
                // An empty DATA frame (as END_STREAM often comes) is no chunk.
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    if let Some(probe) = &mut self.probe {
                        probe.record(data.len());
                    }
                    Poll::Ready(Ok(Some(data)))
                }
                Some(Err(e)) if is_graceful(&e) => {
                    self.cancelled = true;
                    Poll::Ready(Ok(None))
                }
                Some(Err(e)) => Poll::Ready(Err(to_io_error(e))),
            };
        }
    }

    /// Returns `n` consumed bytes of flow-control window to the peer.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// Returns `n` consumed bytes of window with this stream's next DATA
    /// frame, or at the end of the relay's next turn
    /// ([`H2Stream::end_turn`]) if none goes before. Held only while the
    /// stream holds at most [`HELD_WINDOW_PER_STREAM`] and its connection
    /// [`crate::window::HELD_WINDOW_PER_CONNECTION`]: the peer keeps at
    /// least three quarters of the smallest window whatever this side
    /// holds, and tunnels that go quiet while holding window cannot starve
    /// the connection's. Otherwise given back at once, with what was held.
    pub(crate) fn release_later(&mut self, n: usize) {
        let holds = self.held.total() + n <= HELD_WINDOW_PER_STREAM
            && self
                .probe
                .as_ref()
                .is_some_and(|probe| probe.probe().hold_window(n));
        if holds {
            self.held.fresh += n;
        } else {
            self.release_held();
            self.release(n);
        }
    }

    /// Gives back all window held by [`H2Stream::release_later`].
    pub(crate) fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held).total();
        self.unhold(held);
    }

    /// The relay's turn is over: window held since the turn before goes
    /// back now (no DATA frame of this stream took it), and what this
    /// turn consumed waits for the next.
    pub(crate) fn end_turn(&mut self) {
        let carried = std::mem::take(&mut self.held.carried);
        self.unhold(carried);
        self.held.carried = std::mem::take(&mut self.held.fresh);
    }

    /// Returns `n` held bytes of window to the peer and to the
    /// connection's budget.
    fn unhold(&mut self, n: usize) {
        if n > 0 {
            if let Some(probe) = &self.probe {
                probe.probe().unhold_window(n);
            }
            self.release(n);
        }
    }

    /// Waits until the peer's window lets us send, and says how much
    /// (at most `want`, never zero).
    pub fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(want.min(MAX_WRITE));
        let mut available = self.send.capacity();
        while available == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) => available = n,
                Some(Err(e)) => return Poll::Ready(Err(self.send_failed(cx, e))),
                None => {
                    return Poll::Ready(
                        Err(self.send_failed(cx, h2::Reason::STREAM_CLOSED.into())),
                    );
                }
            }
        }
        Poll::Ready(Ok(available.min(want)))
    }

    /// Sends `data`, which must fit the capacity granted by
    /// [`H2Stream::poll_send_capacity`].
    pub fn send_chunk(&mut self, cx: &mut Context<'_>, data: Bytes) -> io::Result<()> {
        if let Some(probe) = &mut self.probe {
            probe.sent(data.len());
        }
        // Queued before the frame, so h2 writes the update with it.
        self.release_held();
        match self.send.send_data(data, false) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.send_failed(cx, e)),
        }
    }

    /// Whether the peer ended the stream with a graceful reset (NO_ERROR or
    /// CANCEL): the tunnel is over, and not in error.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }

    /// A send failed: find out whether the peer reset the stream, and how.
    fn send_failed(&mut self, cx: &mut Context<'_>, error: h2::Error) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR | Reason::CANCEL)) => {
                self.cancelled = true;
                io::ErrorKind::BrokenPipe.into()
            }
            Poll::Ready(Ok(reason)) => {
                io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason))
            }
            _ => to_io_error(error),
        }
    }

    /// Sends END_STREAM (half-close), once.
    pub fn finish(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.write_closed {
            self.write_closed = true;
            self.release_held();
            if let Err(e) = self.send.send_data(Bytes::new(), true) {
                return Err(self.send_failed(cx, e));
            }
        }
        Ok(())
    }
}

impl Drop for H2Stream {
    /// Window held for a frame that never came goes back, and leaves the
    /// connection's budget.
    fn drop(&mut self) {
        self.release_held();
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(mut chunk) = ready!(this.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk.split_to(n));
        this.pending = chunk;
        this.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        self.send_chunk(cx, Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames from its connection task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish(cx))
    }
}

#[cfg(test)]
mod tests;
