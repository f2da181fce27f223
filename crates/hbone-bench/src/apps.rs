//! `hbone bench apps` (hidden): the target applications, in their own
//! process so their CPU and memory are not charged to hbone.
//!
//! - The sink reads and discards; at EOF it answers with the number of bytes
//!   it received (8 bytes, little-endian) and closes. The load generator
//!   times a bulk run until that answer, so bytes still sitting in buffers
//!   inside the tunnel are never counted as delivered, and it checks that
//!   nothing was lost.
//! - The echo app writes back whatever it reads and half-closes after the
//!   client does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SINK_BUFFER: usize = 256 * 1024;
const ECHO_BUFFER: usize = 8 * 1024;

/// Binds both apps on `ip` (loopback, or a namespace's own address in the
/// capture workload), prints `sink=ADDR echo=ADDR` on stdout and serves
/// until killed.
pub async fn run(ip: IpAddr) -> anyhow::Result<()> {
    let any_port = SocketAddr::new(ip, 0);
    let sink = TcpListener::bind(any_port)
        .await
        .context("cannot bind the sink")?;
    let echo = TcpListener::bind(any_port)
        .await
        .context("cannot bind the echo app")?;
    println!("sink={} echo={}", sink.local_addr()?, echo.local_addr()?);
    tokio::spawn(accept(sink, serve_sink));
    accept(echo, serve_echo).await;
    Ok(())
}

/// Parses the line [`run`] prints: `(sink, echo)`.
pub fn parse_ports(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut sink = None;
    let mut echo = None;
    for word in line.split_whitespace() {
        if let Some(addr) = word.strip_prefix("sink=") {
            sink = addr.parse().ok();
        } else if let Some(addr) = word.strip_prefix("echo=") {
            echo = addr.parse().ok();
        }
    }
    Some((sink?, echo?))
}

async fn accept<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve(socket));
            }
            Err(e) => {
                // Out of file descriptors, usually: wait rather than spin.
                tracing::warn!(error = %e, "bench apps: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_sink(mut socket: TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; SINK_BUFFER];
    let mut received: u64 = 0;
    loop {
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    socket.write_all(&received.to_le_bytes()).await?;
    socket.shutdown().await
}

async fn serve_echo(mut socket: TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; ECHO_BUFFER];
    loop {
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            return socket.shutdown().await;
        }
        socket.write_all(&buffer[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_line_round_trips() {
        let (sink, echo) = parse_ports("sink=127.0.0.1:1 echo=127.0.0.1:2").unwrap();
        assert_eq!(sink.port(), 1);
        assert_eq!(echo.port(), 2);
        assert!(parse_ports("sink=127.0.0.1:1").is_none());
    }
}
