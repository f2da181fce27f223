//! One tunnel between this process's stdin/stdout and a target, for use as
//! an ssh `ProxyCommand`. EOF on stdin half-closes the tunnel; the answer
//! keeps flowing to stdout until the target closes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, Stdin, Stdout};

use super::{Attempt, Destination};
use crate::client::{DialError, Dialer};
use crate::relay::{CopyError, Transferred};

/// Why a stdin/stdout tunnel ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StdioError {
    /// The tunnel could not be opened.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The tunnel opened, then failed while relaying.
    #[error("tunnel failed: {0}")]
    Copy(#[from] CopyError),
}

/// Opens one tunnel and relays stdin/stdout through it until both ends close.
pub async fn run(dialer: &Dialer, destination: &Destination) -> Result<Transferred, StdioError> {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut attempt = Attempt::new(unknown, super::forward::placeholder(destination.target()));
    let tunnel = destination.open(dialer, &mut attempt).await?;
    let stdio = StdioStream {
        stdin: tokio::io::stdin(),
        stdout: tokio::io::stdout(),
    };
    Ok(tunnel.relay(stdio).await?)
}

/// stdin as the read half, stdout as the write half.
struct StdioStream {
    stdin: Stdin,
    stdout: Stdout,
}

impl AsyncRead for StdioStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stdin).poll_read(cx, buf)
    }
}

impl AsyncWrite for StdioStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stdout).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stdout).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The target closed: flush what is left; stdout closes on exit.
        Pin::new(&mut self.get_mut().stdout).poll_flush(cx)
    }
}
