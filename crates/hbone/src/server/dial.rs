//! Connecting to a tunnel's target with no call the connect does not need.
//!
//! tokio's connect asks the socket for its error (`getsockopt(SO_ERROR)`)
//! once the connect reports writable, and TCP_NODELAY then costs a call of
//! its own. Here the flag is set before the connect, and the outcome is
//! read from the readiness the connect reports: a refused or reset connect
//! reports an error, a finished one only writable. A tunnel costs one
//! syscall fewer; only a connect that failed asks for its error.
//!
//! A connect that finds no local port free says so: the OS's "cannot assign
//! requested address" reads like a fault of the target, where this host has
//! every ephemeral port to that target in use or in TIME-WAIT.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// A connection to `target`, with TCP_NODELAY set.
pub(super) async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    open(target).await.map_err(explain)
}

/// Says what "address not available" from a connect means.
fn explain(error: io::Error) -> io::Error {
    match error.kind() {
        io::ErrorKind::AddrNotAvailable => io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "no local port free to connect from ({error}): every ephemeral port to this \
                 target is in use or in TIME-WAIT; widen net.ipv4.ip_local_port_range, or \
                 let TIME-WAIT ports be reused (net.ipv4.tcp_tw_reuse = 1)"
            ),
        ),
        _ => error,
    }
}

#[cfg(target_os = "linux")]
async fn open(target: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use tokio::io::Interest;

    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the connection closed as it opened",
            )
        }));
    }
    Ok(stream)
}

#[cfg(not(target_os = "linux"))]
async fn open(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(target).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_connect_out_of_local_ports_says_so() {
        // EADDRNOTAVAIL, as connect() returns it when no port is free.
        let explained = explain(io::Error::from_raw_os_error(99));
        assert_eq!(explained.kind(), io::ErrorKind::AddrNotAvailable);
        let text = explained.to_string();
        assert!(text.contains("no local port free"), "{text}");
        assert!(text.contains("ip_local_port_range"), "{text}");
        assert!(
            text.contains("os error 99"),
            "the OS's words are kept: {text}"
        );
        // Other failures pass through as they are.
        let refused = explain(io::ErrorKind::ConnectionRefused.into());
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(refused.to_string(), "connection refused");
    }

    #[tokio::test]
    async fn connects_with_nodelay_and_carries_bytes() {
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(listen).await else {
                continue; // no IPv6 on this host
            };
            let target = listener.local_addr().unwrap();
            let echo = tokio::spawn(async move {
                let (mut peer, _) = listener.accept().await.unwrap();
                let mut byte = [0u8; 1];
                peer.read_exact(&mut byte).await.unwrap();
                peer.write_all(&byte).await.unwrap();
            });
            let mut stream = connect(target).await.unwrap();
            assert!(stream.nodelay().unwrap(), "{listen}: nodelay not set");
            assert_eq!(stream.peer_addr().unwrap(), target);
            stream.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            assert_eq!(&byte, b"x");
            echo.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_with_its_cause() {
        // A port that was just bound and released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = connect(port).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
