//! One socket write per turn of an HTTP/2 connection's task.
//!
//! h2 flushes its codec after every DATA frame larger than 256 bytes, and
//! tokio-rustls writes to the socket on every write it is given, so a turn
//! that sends frames for several streams costs a `writev` per frame. While
//! [`Cork::drive`] polls the connection, [`Hold`] (below TLS) refuses
//! writes, so rustls keeps the records it encrypted, and [`FlushGate`]
//! (above TLS) answers flushes without flushing. When the turn is over,
//! `drive` flushes the TLS stream itself: everything the turn produced
//! leaves in one vectored write (up to [`CORK_LIMIT`]; past it, the rest
//! of the turn is sent as it is written).
//!
//! Nothing is left behind: bytes written while corked are flushed at the
//! end of the same turn (a flush that cannot finish registers the task for
//! the socket), and a turn whose writes were turned away once rustls'
//! buffer was full is polled again uncorked to finish its work. Bytes
//! written uncorked that the socket could not take yet wait in rustls
//! too; since the next turn's flush is corked and answered at once, the
//! flush at that turn's end sends them (forgetting them once stalled a
//! transfer until the next keepalive PING).
//!
//! On the work-stealing runtime a turn may also leave its flush to a
//! later turn of the same round of the worker ([`batch`]), so that the
//! frames of the other tunnels that are about to run leave with it: the
//! connection defers while that pays, and tries it only now and then
//! while it does not.
//!
//! A client's TLS handshake runs through [`Cork::keeping_writes`]: its
//! last flight (certificate, signature, Finished), which rustls writes as
//! the handshake completes, stays in [`Hold`] and leaves in the same
//! `writev` as the HTTP/2 preface, SETTINGS and first request instead of
//! one of its own. Anything kept goes out before the transport is read,
//! so a handshake that waits for the peer has sent what it wrote.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::RuntimeFlavor;

use batch::Batching;

mod batch;

/// The most a turn writes into TLS before the cork lifts for the rest of
/// it: four full records. A bulk stream's 256 KiB frames are cheaper sent
/// as they are encrypted: in an A/B, holding a whole turn of them cost one
/// stream 3-4 % more CPU per byte, a 128 KiB limit about 2 %, this none.
const CORK_LIMIT: usize = 64 << 10;

/// The driving task's handle on one connection's cork.
pub(crate) struct Cork {
    flags: Arc<Flags>,
    /// The TLS stream (shared with [`FlushGate`], inside h2), for the flush
    /// that ends a turn; set by [`Cork::gate`].
    stream: Option<Arc<Mutex<dyn Flush>>>,
    /// Whether turns may defer their flush ([`batch`]): only where
    /// wake-ups jump the queue, on tokio's work-stealing runtime.
    batching: Option<Batching>,
}

impl Default for Cork {
    /// A cork for a connection driven on the current runtime.
    fn default() -> Self {
        let work_stealing = tokio::runtime::Handle::try_current()
            .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
        Cork {
            flags: Arc::default(),
            stream: None,
            batching: work_stealing.then(Batching::default),
        }
    }
}

/// Shared by a connection's [`Hold`], its [`FlushGate`] and the task that
/// drives it. All three run in that one task: relaxed atomics suffice.
#[derive(Debug, Default)]
struct Flags {
    /// Whether the connection is being polled corked.
    corked: AtomicBool,
    /// Bytes written into TLS in this corked turn.
    held: AtomicUsize,
    /// Whether TLS may hold encrypted bytes that no completed flush has
    /// sent since.
    unflushed: AtomicBool,
    /// Whether a write was turned away while corked, so that h2 stopped
    /// short of what it had to do and waits on no wake-up.
    starved: AtomicBool,
    /// Whether writes reaching [`Hold`] are kept there, unsent until the
    /// transport is next read, written or flushed after this clears.
    keeping: AtomicBool,
}

/// A stream the driving task can flush without knowing its type.
trait Flush: Send {
    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: AsyncWrite + Unpin + Send> Flush for T {
    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }
}

impl Cork {
    /// `inner` (the transport under TLS), its writes refused while corked.
    pub(crate) fn hold<T>(&self, inner: T) -> Hold<T> {
        Hold {
            inner,
            flags: self.flags.clone(),
            kept: Vec::new(),
        }
    }

    /// Runs `handshake` (a client's TLS handshake over [`Cork::hold`]'s
    /// transport) with its writes kept in [`Hold`]: each flight before the
    /// last leaves when the handshake reads the peer's answer, and the
    /// last, which ends the handshake, waits for the first turn of
    /// [`Cork::drive`]. The caller must drive the connection next.
    pub(crate) async fn keeping_writes<F: std::future::Future>(&self, handshake: F) -> F::Output {
        /// Stops keeping when the handshake ends, or is dropped.
        struct Keeping<'a>(&'a Flags);
        impl Drop for Keeping<'_> {
            fn drop(&mut self) {
                self.0.keeping.store(false, Relaxed);
            }
        }
        self.flags.keeping.store(true, Relaxed);
        let _keeping = Keeping(&self.flags);
        handshake.await
    }

    /// `inner` (the TLS stream), its flushes answered at once while corked;
    /// the turn's flush is then made by [`Cork::drive`].
    pub(crate) fn gate<T: AsyncWrite + Unpin + Send + 'static>(
        &mut self,
        inner: T,
    ) -> FlushGate<T> {
        let inner = Arc::new(Mutex::new(inner));
        self.stream = Some(inner.clone());
        FlushGate {
            inner,
            flags: self.flags.clone(),
        }
    }

    /// One turn of the connection: `poll` corked, then one flush of what
    /// it wrote. A turn that found its writes turned away is polled once
    /// more, uncorked, to finish its work (or, if it returned a result,
    /// its task is woken to come back for it).
    pub(crate) fn drive<R>(
        &self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.corked(cx, &mut poll, SendAfter::Always)
    }

    /// One poll of `poll` corked, with no flush after it: what it wrote
    /// waits in TLS for the next turn of [`Cork::drive`], which flushes
    /// it with whatever that turn writes. For the client's HTTP/2
    /// handshake, which writes only the connection preface: it then leaves
    /// in the same `writev` as the SETTINGS and the first request, instead
    /// of one of its own. The caller must drive the connection next.
    pub(crate) fn defer<R>(
        &self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.corked(cx, &mut poll, SendAfter::Never)
    }

    /// [`Cork::defer`] for a poll that may have to wait for the peer: if
    /// it finishes, what it wrote waits for the next turn; if it must
    /// wait, what it wrote leaves first, as after a turn of
    /// [`Cork::drive`], since the peer may be waiting for it. For the
    /// server's HTTP/2 handshake, which writes its SETTINGS and then reads
    /// the client's preface: when the preface came with the client's last
    /// handshake flight, the SETTINGS leave with the first turn's frames.
    pub(crate) fn defer_unless_waiting<R>(
        &self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.corked(cx, &mut poll, SendAfter::IfPending)
    }

    /// `poll` once corked; if its writes were turned away (TLS's buffer
    /// full) and it stopped short, once more uncorked to finish, which
    /// sends what it writes itself. Otherwise, as `send` says: what it
    /// wrote is flushed, and a poll that returned a result although some
    /// of its writes were turned away has its task woken to come back.
    fn corked<R>(
        &self,
        cx: &mut Context<'_>,
        poll: &mut impl FnMut(&mut Context<'_>) -> Poll<R>,
        send: SendAfter,
    ) -> Poll<R> {
        let flags = &self.flags;
        flags.held.store(0, Relaxed);
        flags.corked.store(true, Relaxed);
        let result = poll(cx);
        flags.corked.store(false, Relaxed);
        let starved = flags.starved.swap(false, Relaxed);
        if starved && result.is_pending() {
            return poll(cx);
        }
        let sends = match send {
            SendAfter::Always => true,
            SendAfter::IfPending => result.is_pending(),
            SendAfter::Never => false,
        };
        if sends {
            if flags.unflushed.load(Relaxed) {
                self.flush_or_defer(cx, result.is_pending() && !starved);
            } else if let Some(batching) = &self.batching {
                batching.sent();
            }
            if starved {
                cx.waker().wake_by_ref();
            }
        }
        result
    }

    /// Sends what the turn wrote, or leaves it for a later turn of the
    /// worker's round when [`Batching`] says other tunnels' turns are
    /// likely to join it (`may_defer`: the connection waits on, and the
    /// turn's writes all fit the cork).
    fn flush_or_defer(&self, cx: &mut Context<'_>, may_defer: bool) {
        if let Some(batching) = &self.batching {
            let held = self.flags.held.load(Relaxed);
            let may_defer = may_defer && held < CORK_LIMIT;
            if batching.after_turn(held > 0, may_defer) == batch::Flush::Later {
                wake_after_the_others(cx);
                return;
            }
        }
        self.flush(cx);
    }

    /// Sends what the turn wrote. A flush that cannot finish now (a full
    /// socket) has registered the task for when it can; an error is left
    /// for h2 to meet on its next write.
    fn flush(&self, cx: &mut Context<'_>) {
        let Some(stream) = &self.stream else {
            return;
        };
        let flushed = stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .poll_flush_now(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.flags.unflushed.store(false, Relaxed);
        }
    }
}

/// Has the task woken once the worker has run the other tasks that are
/// ready, rather than next: what tokio's `yield_now` does on its first
/// poll (the wake-up stays registered when the future is dropped).
fn wake_after_the_others(cx: &mut Context<'_>) {
    let mut yielding = std::pin::pin!(tokio::task::yield_now());
    let _ = yielding.as_mut().poll(cx);
}

/// Whether a corked poll ([`Cork::corked`]) sends what it wrote.
#[derive(Clone, Copy)]
enum SendAfter {
    /// At the end of every turn.
    Always,
    /// Only when the poll waits: a result means the caller turns next.
    IfPending,
    /// Never: the caller's next turn sends it.
    Never,
}

/// The transport under TLS: while corked, a write is refused (pending,
/// with no wake-up registered: [`Cork::drive`] flushes at the end of the
/// turn, and polls again a turn that this stopped short), so rustls keeps
/// the records for the turn's flush. While [`Cork::keeping_writes`] runs,
/// writes are taken into `kept` instead, and sent ahead of the next write.
#[derive(Debug)]
pub(crate) struct Hold<T> {
    inner: T,
    flags: Arc<Flags>,
    /// Written while keeping, not sent yet.
    kept: Vec<u8>,
}

impl<T> Hold<T> {
    /// The transport back, for a connection that is being closed.
    pub(crate) fn into_inner(self) -> T {
        self.inner
    }

    fn refused<R>(&self) -> Option<Poll<R>> {
        if self.flags.corked.load(Relaxed) {
            self.flags.unflushed.store(true, Relaxed);
            return Some(Poll::Pending);
        }
        None
    }

    /// Takes `bufs` into `kept` while keeping; how many bytes it took.
    fn kept_now(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        if !self.flags.keeping.load(Relaxed) {
            return None;
        }
        let before = self.kept.len();
        for buf in bufs {
            self.kept.extend_from_slice(buf);
        }
        self.flags.unflushed.store(true, Relaxed);
        Some(self.kept.len() - before)
    }
}

impl<T: AsyncWrite + Unpin> Hold<T> {
    /// Writes `bufs` after what was kept, in one vectored write where the
    /// transport takes it all; the count is of `bufs`' bytes alone.
    fn poll_write_after_kept(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        while !self.kept.is_empty() {
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(io::IoSlice::new(&self.kept));
            all.extend(bufs.iter().map(|buf| io::IoSlice::new(buf)));
            let written =
                std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &all))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if written < self.kept.len() {
                self.kept.drain(..written);
                continue;
            }
            let of_bufs = written - self.kept.len();
            self.kept = Vec::new();
            if of_bufs > 0 || bufs.iter().all(|buf| buf.is_empty()) {
                return Poll::Ready(Ok(of_bufs));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    /// Sends what was kept, if anything.
    fn poll_send_kept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kept.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.poll_write_after_kept(cx, &[]).map_ok(|_| ())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Hold<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A read may wait for the peer's answer to what was kept. (A
        // corked turn sends it at its end.) A send that must wait has
        // registered the task too.
        if !this.flags.corked.load(Relaxed) && !this.kept.is_empty() {
            let sent = match this.poll_send_kept(cx) {
                Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
                other => other,
            };
            if let Poll::Ready(Err(e)) = sent {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Hold<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(held) = this.refused() {
            return held;
        }
        if let Some(taken) = this.kept_now(&[io::IoSlice::new(buf)]) {
            return Poll::Ready(Ok(taken));
        }
        if !this.kept.is_empty() {
            return this.poll_write_after_kept(cx, &[io::IoSlice::new(buf)]);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(held) = this.refused() {
            return held;
        }
        if let Some(taken) = this.kept_now(bufs) {
            return Poll::Ready(Ok(taken));
        }
        if !this.kept.is_empty() {
            return this.poll_write_after_kept(cx, bufs);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(held) = this.refused() {
            return held;
        }
        if this.flags.keeping.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_send_kept(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(held) = this.refused() {
            return held;
        }
        std::task::ready!(this.poll_send_kept(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The TLS stream as h2 sees it: while corked, a flush returns at once;
/// the bytes it would have sent wait for the turn's end.
pub(crate) struct FlushGate<T> {
    inner: Arc<Mutex<T>>,
    flags: Arc<Flags>,
}

impl<T> FlushGate<T> {
    /// The stream; only this connection's task takes the lock.
    fn stream(&self) -> MutexGuard<'_, T> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes what a write or shutdown left behind; `len` is what a write
    /// took. Past [`CORK_LIMIT`] the turn goes on uncorked.
    ///
    /// Uncorked too, what TLS took may stay in it: the socket can fill
    /// mid-write, and then h2's flush waits for it. The next turn's flush
    /// is corked and answered at once, so only the turn's own flush
    /// ([`Cork::drive`]) sends those bytes, and it must know they wait.
    fn corked<R>(
        &self,
        done: Poll<io::Result<R>>,
        len: impl Fn(&R) -> usize,
    ) -> Poll<io::Result<R>> {
        let flags = &self.flags;
        if matches!(done, Poll::Ready(Ok(_))) {
            flags.unflushed.store(true, Relaxed);
        }
        if flags.corked.load(Relaxed) {
            match &done {
                Poll::Pending => flags.starved.store(true, Relaxed),
                Poll::Ready(Ok(done)) => {
                    let held = flags.held.load(Relaxed) + len(done);
                    flags.held.store(held, Relaxed);
                    if held >= CORK_LIMIT {
                        flags.corked.store(false, Relaxed);
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        done
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FlushGate<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FlushGate<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut *self.stream()).poll_write(cx, buf);
        self.corked(written, |&n| n)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut *self.stream()).poll_write_vectored(cx, bufs);
        self.corked(written, |&n| n)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.flags.corked.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut *self.stream()).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.flags.unflushed.store(false, Relaxed);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = self.corked(Pin::new(&mut *self.stream()).poll_shutdown(cx), |()| 0);
        if matches!(shut, Poll::Ready(Ok(()))) {
            self.flags.unflushed.store(false, Relaxed);
        }
        shut
    }
}

#[cfg(all(test, feature = "ca"))]
mod tests;
