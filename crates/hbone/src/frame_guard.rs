//! A budget on control frames, enforced under `h2`.
//!
//! `h2` answers every SETTINGS and PING and ignores PRIORITY and unknown
//! frame types, without limit: a client that reads its ACKs can keep a
//! server busy at line rate forever. [`FrameGuard`] wraps the decrypted
//! stream handed to `h2::server` and reads the 9-byte header of every
//! frame as the bytes go by (after the 24-byte client preface), skipping
//! payloads without copying them. Control frames are charged to a token
//! bucket: a burst of up to `frames`, refilled at `frames` per `window`.
//! The frame that finds the bucket empty trips the guard: it is not passed
//! to `h2`, reading stops, and the server closes the connection with
//! GOAWAY(ENHANCE_YOUR_CALM) (see [`Tripwire`]). Failing the read instead
//! would not do: `h2` takes an I/O error as the end of the connection and
//! closes it without a GOAWAY, so the peer would not learn why.
//!
//! What is charged:
//! - SETTINGS and PING (an ACK only when it answers none of ours: each
//!   PING or SETTINGS the server sends pays for its ACK, so the PINGs that
//!   size flow-control windows while data flows cost the client nothing),
//!   PRIORITY, GOAWAY,
//!   frame types `h2` does not know, and DATA frames that carry no data
//!   (padding aside) and do not end their stream.
//! - WINDOW_UPDATE and RST_STREAM, unless paid for by traffic. A client
//!   that receives data must return window, and some clients do so for
//!   every DATA frame, on the stream and on the connection: a 10 Gbit/s
//!   download in 16 KiB frames then draws some 150,000 WINDOW_UPDATEs a
//!   second, more than a control-frame flood sends. A count alone cannot
//!   tell the two apart, so each DATA frame the server writes earns two
//!   free frames, and each HEADERS frame the client sends (a new stream,
//!   which may be cancelled or given more window) earns two more. Only
//!   WINDOW_UPDATE and RST_STREAM beyond what was earned are charged.
//!   Earnings are capped ([`EARNED_CAP`]), so a client cannot save up for
//!   a flood later.
//!
//! HEADERS, CONTINUATION and DATA that carries data are not charged: `h2`
//! bounds them itself (streams, header sizes, flow control, rapid reset).
//!
//! A dialer guards its connections the same way ([`FrameGuard::dialing`]),
//! with the roles turned round: the server's frames are charged, the
//! dialer's DATA and HEADERS earn the server's WINDOW_UPDATEs and resets.
//! `h2`'s client cannot send GOAWAY, so there a trip fails the read: the
//! connection ends, its tunnels with it, and the pool dials afresh.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The client connection preface (RFC 9113 §3.4), passed unparsed.
const PREFACE_LEN: usize = 24;
/// Length, type, flags and stream identifier.
const HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
/// The flag of a PING or SETTINGS that answers one.
const ACK: u8 = 0x1;
/// Our PINGs and SETTINGS not answered yet that may be, free. h2 has at
/// most a few of its own out at once; more is a peer's game.
const ANSWERS_CAP: u32 = 16;
const PADDED: u8 = 0x8;

/// The most free WINDOW_UPDATE and RST_STREAM frames a connection can
/// hold in reserve: twice the DATA frames of a full 16 MiB connection
/// window in 16 KiB frames.
pub(crate) const EARNED_CAP: u32 = 4096;

/// How long a tripped connection goes on reading (and discarding) after
/// its GOAWAY, and how much, so that closing it does not make the kernel
/// reset the connection while the GOAWAY is still on its way out.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

/// One frame header, as far as the guard needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    /// Payload length; for a PADDED DATA frame, the data it carries
    /// (padding and the pad length byte excluded).
    pub(crate) length: u32,
}

/// Finds frame headers in a byte stream fed in pieces of any size. Keeps
/// at most one partial header between pieces; payloads are skipped.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    /// Bytes of the preface still to pass over.
    preface: usize,
    header: [u8; HEADER_LEN],
    /// Bytes of `header` filled so far.
    have: usize,
    /// Payload bytes still to skip.
    skip: u32,
    /// A PADDED DATA frame whose pad length byte comes next.
    pad_of: Option<Head>,
}

impl Scanner {
    /// A scanner for what a client sends: the preface, then frames.
    pub(crate) fn client() -> Self {
        Self::after(PREFACE_LEN)
    }

    /// A scanner for what a server sends: frames from the first byte.
    pub(crate) fn server() -> Self {
        Self::after(0)
    }

    fn after(preface: usize) -> Self {
        Scanner {
            preface,
            header: [0; HEADER_LEN],
            have: 0,
            skip: 0,
            pad_of: None,
        }
    }

    /// Reads `bytes`, calling `frame` with each complete header. Stops
    /// when `frame` returns false, and returns where in `bytes` that
    /// frame's header began (0 when it began in an earlier piece).
    pub(crate) fn scan(
        &mut self,
        bytes: &[u8],
        mut frame: impl FnMut(Head) -> bool,
    ) -> Option<usize> {
        let mut at = 0;
        if self.preface > 0 {
            let n = self.preface.min(bytes.len());
            self.preface -= n;
            at = n;
        }
        // Where the frame now being read began in `bytes`.
        let mut start = 0;
        while at < bytes.len() {
            if let Some(mut head) = self.pad_of.take() {
                let pad = u32::from(bytes[at]);
                at += 1;
                self.skip -= 1;
                head.length = self.skip.saturating_sub(pad);
                if !frame(head) {
                    return Some(start);
                }
                continue;
            }
            if self.skip > 0 {
                let n = (self.skip as usize).min(bytes.len() - at);
                at += n;
                // n <= skip, a u32.
                self.skip -= n as u32;
                continue;
            }
            if self.have == 0 {
                start = at;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len() - at);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[at..at + n]);
            self.have += n;
            at += n;
            if self.have < HEADER_LEN {
                break;
            }
            self.have = 0;
            let h = &self.header;
            let length = u32::from_be_bytes([0, h[0], h[1], h[2]]);
            let head = Head {
                kind: h[3],
                flags: h[4],
                length,
            };
            self.skip = length;
            if head.kind == DATA && head.flags & PADDED != 0 && length > 0 {
                self.pad_of = Some(head);
                continue;
            }
            if !frame(head) {
                return Some(start);
            }
        }
        None
    }
}

/// How a client's frame is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// Not counted here.
    Free,
    /// Opens a stream: earns free frames.
    Earns,
    /// Free while earned, charged beyond.
    Earned,
    /// Always charged.
    Control,
}

fn charge(head: Head) -> Charge {
    match head.kind {
        DATA if head.length == 0 && head.flags & END_STREAM == 0 => Charge::Control,
        DATA | CONTINUATION | PUSH_PROMISE => Charge::Free,
        HEADERS => Charge::Earns,
        RST_STREAM | WINDOW_UPDATE => Charge::Earned,
        PRIORITY | SETTINGS | PING | GOAWAY => Charge::Control,
        _ => Charge::Control,
    }
}

/// The name of a frame type, for the log.
pub(crate) fn kind_name(kind: u8) -> &'static str {
    match kind {
        DATA => "empty DATA",
        HEADERS => "HEADERS",
        PRIORITY => "PRIORITY",
        RST_STREAM => "RST_STREAM",
        SETTINGS => "SETTINGS",
        PUSH_PROMISE => "PUSH_PROMISE",
        PING => "PING",
        GOAWAY => "GOAWAY",
        WINDOW_UPDATE => "WINDOW_UPDATE",
        CONTINUATION => "CONTINUATION",
        _ => "unknown type",
    }
}

/// The rate control frames may arrive at: a burst of up to `frames`, and
/// `frames` per `window` sustained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub(crate) frames: u32,
    pub(crate) window: Duration,
}

/// A token bucket in the form of a theoretical arrival time (GCRA): each
/// charged frame moves `due` on by `window / frames`; a frame that would
/// put `due` more than `window` ahead of now finds the bucket empty.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    step: Duration,
    window: Duration,
    due: Option<Instant>,
    earned: u32,
    /// Our PINGs and SETTINGS whose ACKs are free.
    answers: u32,
    /// Frames charged, the one that tripped included.
    pub(crate) charged: u64,
}

impl Budget {
    pub(crate) fn new(rate: Rate) -> Self {
        Budget {
            step: rate.window / rate.frames.max(1),
            window: rate.window,
            due: None,
            earned: 0,
            answers: 0,
            charged: 0,
        }
    }

    fn earn(&mut self, frames: u32) {
        self.earned = self.earned.saturating_add(frames).min(EARNED_CAP);
    }

    /// A frame the server wrote: DATA that carries data earns the client
    /// its WINDOW_UPDATEs.
    /// PING and SETTINGS pay for their ACKs.
    pub(crate) fn sent(&mut self, head: Head) {
        match head.kind {
            DATA if head.length > 0 => self.earn(2),
            PING | SETTINGS if head.flags & ACK == 0 => {
                self.answers = (self.answers + 1).min(ANSWERS_CAP);
            }
            _ => {}
        }
    }

    /// A frame the client sent, at `now` (read only for charged frames);
    /// false when it is one too many.
    pub(crate) fn received(&mut self, head: Head, now: &mut impl FnMut() -> Instant) -> bool {
        let answer = matches!(head.kind, PING | SETTINGS) && head.flags & ACK != 0;
        if answer && self.answers > 0 {
            self.answers -= 1;
            return true;
        }
        match charge(head) {
            Charge::Free => return true,
            Charge::Earns => {
                self.earn(2);
                return true;
            }
            Charge::Earned if self.earned > 0 => {
                self.earned -= 1;
                return true;
            }
            Charge::Earned | Charge::Control => {}
        }
        self.charged += 1;
        let now = now();
        let due = self.due.filter(|due| *due > now).unwrap_or(now) + self.step;
        self.due = Some(due);
        due - now <= self.window
    }
}

/// What tripped a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trip {
    /// The type of the frame that found the budget spent.
    pub(crate) kind: u8,
    /// Control frames charged on the connection, that one included.
    pub(crate) charged: u64,
}

/// Shared between a [`FrameGuard`] (inside `h2`) and the task serving its
/// connection, which waits on [`Tripwire::tripped`] and closes the
/// connection when it fires.
#[derive(Debug, Default)]
pub(crate) struct Tripwire {
    trip: OnceLock<Trip>,
    notify: Notify,
}

impl Tripwire {
    /// Waits until the guard trips; returns at once if it has.
    pub(crate) async fn tripped(&self) -> Trip {
        loop {
            let notified = self.notify.notified();
            if let Some(trip) = self.trip.get() {
                return *trip;
            }
            notified.await;
        }
    }

    fn set(&self, trip: Trip) {
        if self.trip.set(trip).is_ok() {
            self.notify.notify_one();
        }
    }

    fn is_set(&self) -> bool {
        self.trip.get().is_some()
    }
}

/// The decrypted stream of one server connection, with its frame headers
/// read on the way in and out (see the module documentation).
pub(crate) struct FrameGuard<S> {
    inner: S,
    incoming: Scanner,
    outgoing: Scanner,
    budget: Budget,
    tripwire: Arc<Tripwire>,
    /// After a trip: whether our side is shut down, the end of the
    /// linger, and what it has discarded.
    shut: bool,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    discarded: usize,
    /// On a dialer's connection, the server it leads to: a trip then
    /// fails the read rather than waiting for a GOAWAY to be sent.
    dialing: Option<std::net::SocketAddr>,
}

impl<S> FrameGuard<S> {
    pub(crate) fn new(inner: S, rate: Rate, tripwire: Arc<Tripwire>) -> Self {
        FrameGuard {
            inner,
            incoming: Scanner::client(),
            outgoing: Scanner::server(),
            budget: Budget::new(rate),
            tripwire,
            shut: false,
            linger: None,
            discarded: 0,
            dialing: None,
        }
    }

    /// The guard of a dialer's connection to `server`: the server's
    /// frames are charged, and a trip fails the read.
    pub(crate) fn dialing(inner: S, rate: Rate, server: std::net::SocketAddr) -> Self {
        FrameGuard {
            incoming: Scanner::server(),
            outgoing: Scanner::client(),
            dialing: Some(server),
            ..FrameGuard::new(inner, rate, Arc::default())
        }
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let budget = &mut self.budget;
        self.outgoing.scan(bytes, |head| {
            budget.sent(head);
            true
        });
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(trip) = this.tripwire.trip.get() {
            return match this.dialing {
                Some(server) => Poll::Ready(Err(flooded(server, *trip))),
                // Nothing more for h2: the server task, woken by the trip,
                // closes the connection.
                None => Poll::Pending,
            };
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let budget = &mut this.budget;
        let mut tripped_by = None;
        let cut = this.incoming.scan(&buf.filled()[before..], |head| {
            let within = budget.received(head, &mut now);
            if !within {
                tripped_by = Some(head.kind);
            }
            within
        });
        let (Some(cut), Some(kind)) = (cut, tripped_by) else {
            return Poll::Ready(Ok(()));
        };
        this.tripwire.set(Trip {
            kind,
            charged: this.budget.charged,
        });
        if let Some(server) = this.dialing {
            tracing::warn!(
                %server, last = kind_name(kind), charged = this.budget.charged,
                "HBONE server sent control frames past the budget; closing its connection"
            );
            // No task waits on a dialer's tripwire: fail the read now, or
            // h2 would wait for bytes that are never handed over.
            let trip = Trip {
                kind,
                charged: this.budget.charged,
            };
            return Poll::Ready(Err(flooded(server, trip)));
        }
        // h2 gets what came before the frame that tripped (the preface,
        // perhaps), and never that frame.
        buf.set_filled(before + cut);
        if cut == 0 {
            // Returning no bytes would read as end of stream.
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

/// The error a dialer's guard fails its reads with, once tripped.
fn flooded(server: std::net::SocketAddr, trip: Trip) -> io::Error {
    io::Error::other(format!(
        "HBONE server {server} sent control frames past the budget ({} charged, the last {}); \
         connection closed",
        trip.charged,
        kind_name(trip.kind)
    ))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.wrote(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for slice in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(slice.len());
            this.wrote(&slice[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// After a trip, closing goes on reading for a moment: closing a
    /// socket with unread data makes the kernel send a reset, which
    /// throws away whatever it has not sent yet, the GOAWAY included.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tripwire.is_set() {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        if !this.shut {
            let shutdown = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
            this.shut = true;
            if shutdown.is_err() {
                return Poll::Ready(shutdown);
            }
        }
        let linger = this
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        let mut scratch = [0u8; 8 << 10];
        while this.discarded < LINGER_BYTES {
            let mut discard = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) if !discard.filled().is_empty() => {
                    this.discarded += discard.filled().len();
                }
                // End of stream or an error: nothing more will come.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return linger.as_mut().poll(cx).map(Ok),
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
