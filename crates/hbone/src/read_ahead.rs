//! A read buffer under TLS, so that one `recv` takes several records.
//!
//! rustls asks its transport for one record at a time (up to ~16 KiB), so
//! a bulk transfer costs a `recv` per record. Beneath it, this layer reads
//! up to [`READ_AHEAD`] at once while data streams in, and hands rustls its
//! records from memory: one system call instead of four, for a copy.
//!
//! Only while data streams in: a read that fills what rustls asked for
//! says more is waiting, and switches read-ahead on; a read-ahead that
//! comes back short, or finds nothing, switches it off and frees the
//! buffer. Request/response traffic thus reads straight into rustls as
//! before (no copy, no allocation), and an idle connection holds nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes from the socket: four full TLS records.
pub(crate) const READ_AHEAD: usize = 64 << 10;

/// A read-ahead shorter than this ends streaming mode: one TLS record.
const STREAMING: usize = 16 << 10;

/// `T` with reads taken [`READ_AHEAD`] bytes at a time while data streams.
#[derive(Debug)]
pub(crate) struct ReadAhead<T> {
    inner: T,
    /// Read from `inner`, not yet handed out; unallocated when not
    /// streaming.
    buf: BytesMut,
    /// Whether the last read suggested that more data is waiting.
    streaming: bool,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            streaming: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The transport back; bytes read ahead and not handed out are lost,
    /// so only for a connection that is being closed.
    pub(crate) fn into_inner(self) -> T {
        self.inner
    }

    /// Hands out what was read ahead.
    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        if self.buf.is_empty() && !self.streaming {
            self.buf = BytesMut::new();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        if !this.streaming || out.remaining() >= READ_AHEAD {
            // Straight into the caller's buffer; a read that fills it says
            // more is waiting.
            let asked = out.remaining();
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            this.streaming = asked > 0 && out.filled().len() - before == asked;
            return Poll::Ready(Ok(()));
        }
        this.buf.reserve(READ_AHEAD);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf);
        let n = match read {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(_)) | Poll::Pending => 0,
        };
        // A short read, EOF, an error or nothing yet: the stream paused.
        this.streaming = n >= STREAMING;
        if n == 0 {
            this.buf = BytesMut::new();
            ready!(read)?;
            return Poll::Ready(Ok(()));
        }
        this.serve(out);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Counts the reads that reach the transport.
    struct Counting<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                this.reads += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_stream_is_read_ahead_and_nothing_is_kept_once_it_pauses() {
        let (mut writer, reader) = duplex(1 << 20);
        let data: Vec<u8> = (0..4 * READ_AHEAD as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        writer.write_all(&data).await.unwrap();
        let mut ahead = ReadAhead::new(Counting {
            inner: reader,
            reads: 0,
        });
        // Reads of a record's size, as rustls makes them.
        let mut got = Vec::new();
        let mut record = vec![0u8; 16 << 10];
        while got.len() < data.len() {
            let n = ahead.read(&mut record).await.unwrap();
            got.extend_from_slice(&record[..n]);
        }
        assert_eq!(got, data);
        // The first read fills the record and switches read-ahead on; the
        // rest come 64 KiB at a time: 1 + 4, not 16.
        assert_eq!(ahead.get_ref().reads, 5, "reads of the transport");
        // The stream pauses: nothing to read, and the buffer is freed.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            ahead.read(&mut record),
        )
        .await;
        assert!(waiting.is_err(), "nothing was written");
        assert_eq!(ahead.buf.capacity(), 0, "a paused stream holds no buffer");
        assert!(!ahead.streaming);
        drop(writer);
        assert_eq!(
            ahead.read(&mut record).await.unwrap(),
            0,
            "EOF passes through"
        );
    }

    #[tokio::test]
    async fn request_sized_reads_go_straight_through() {
        let (mut writer, reader) = duplex(1 << 20);
        let mut ahead = ReadAhead::new(Counting {
            inner: reader,
            reads: 0,
        });
        let mut record = vec![0u8; 16 << 10];
        for round in 0..3u8 {
            writer.write_all(&[round; 1024]).await.unwrap();
            assert_eq!(ahead.read(&mut record).await.unwrap(), 1024);
            assert!(!ahead.streaming);
            assert_eq!(ahead.buf.capacity(), 0, "no buffer for a short read");
        }
        assert_eq!(ahead.get_ref().reads, 3);
    }

    #[tokio::test]
    async fn large_reads_go_straight_to_the_transport() {
        let (mut writer, reader) = duplex(1 << 20);
        writer.write_all(&[7u8; 100]).await.unwrap();
        let mut ahead = ReadAhead::new(reader);
        let mut big = vec![0u8; READ_AHEAD];
        assert_eq!(ahead.read(&mut big).await.unwrap(), 100);
        assert_eq!(ahead.buf.capacity(), 0);
    }
}
