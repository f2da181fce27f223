//! `hbone bench apps` (hidden): the target applications, in their own
//! process so their CPU and memory are not charged to hbone.
//!
//! - The sink reads and discards; at EOF it answers with the number of bytes
//!   it received (8 bytes, little-endian) and closes. The load generator
//!   times a bulk run until that answer, so bytes still sitting in buffers
//!   inside the tunnel are never counted as delivered, and it checks that
//!   nothing was lost.
//! - The echo app writes back whatever it reads and half-closes after the
//!   client does. It can listen on several ports (`--echoes`): the kernel
//!   gives one destination (address and port) about 14,000 new connections
//!   a second from one source address, as connect() reuses a port in
//!   TIME-WAIT only after a second, so load generators that open
//!   connections in parallel each need a destination of their own.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SINK_BUFFER: usize = 256 * 1024;
const ECHO_BUFFER: usize = 8 * 1024;

/// Binds the sink and `echoes` echo listeners (at least one) on `ip`
/// (loopback, or a namespace's own address in the capture workload),
/// prints `sink=ADDR echo=ADDR [echo=ADDR...]` on stdout and serves until
/// killed.
pub async fn run(ip: IpAddr, echoes: usize) -> anyhow::Result<()> {
    let any_port = SocketAddr::new(ip, 0);
    let sink = TcpListener::bind(any_port)
        .await
        .context("cannot bind the sink")?;
    let mut line = format!("sink={}", sink.local_addr()?);
    tokio::spawn(accept(sink, serve_sink));
    for _ in 0..echoes.max(1) {
        let echo = TcpListener::bind(any_port)
            .await
            .context("cannot bind the echo app")?;
        line += &format!(" echo={}", echo.local_addr()?);
        tokio::spawn(accept(echo, serve_echo));
    }
    println!("{line}");
    std::future::pending::<()>().await;
    Ok(())
}

/// Parses the line [`run`] prints: the sink and the echo listeners, in
/// order (at least one).
pub fn parse_ports(line: &str) -> Option<(SocketAddr, Vec<SocketAddr>)> {
    let mut sink = None;
    let mut echoes = Vec::new();
    for word in line.split_whitespace() {
        if let Some(addr) = word.strip_prefix("sink=") {
            sink = Some(addr.parse().ok()?);
        } else if let Some(addr) = word.strip_prefix("echo=") {
            echoes.push(addr.parse().ok()?);
        }
    }
    (!echoes.is_empty()).then_some(())?;
    Some((sink?, echoes))
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
        let (sink, echoes) = parse_ports("sink=127.0.0.1:1 echo=127.0.0.1:2").unwrap();
        assert_eq!(sink.port(), 1);
        assert_eq!(echoes, [SocketAddr::from(([127, 0, 0, 1], 2))]);
        let (_, echoes) = parse_ports("sink=127.0.0.1:1 echo=127.0.0.1:2 echo=[::1]:3").unwrap();
        assert_eq!(echoes.iter().map(|e| e.port()).collect::<Vec<_>>(), [2, 3]);
        assert!(parse_ports("sink=127.0.0.1:1").is_none());
        assert!(parse_ports("sink=127.0.0.1:1 echo=nonsense").is_none());
    }
}
