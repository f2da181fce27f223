//! A relay that holds every byte for a fixed time each way (`bench
//! delay`): a long path on loopback, for `hbone bench --long-path`.
//!
//! Loopback has no length, and the machine may have no `netem`. Bytes read
//! from one side are written to the other `delay` after they were read,
//! in order, end of stream included. The relay reads as fast as it is
//! sent to, so TCP beneath it runs at loopback speed: what the delay holds
//! back is a protocol that waits for its peer's answer, as HTTP/2's flow
//! control waits for WINDOW_UPDATEs, which cross it twice per round trip.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The most one read takes.
const CHUNK: usize = 256 << 10;

/// The line the relay prints once it listens: `delay=ADDR`.
pub const READY_PREFIX: &str = "delay=";

/// Relays each connection accepted on an ephemeral loopback port to `to`,
/// `delay` late each way; prints [`READY_PREFIX`] and the port first.
pub async fn run(to: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("the delay relay cannot listen")?;
    println!("{READY_PREFIX}{}", listener.local_addr()?);
    serve(listener, to, delay).await
}

/// Relays every connection `listener` accepts.
async fn serve(listener: TcpListener, to: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    loop {
        let (near, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            let Ok(far) = TcpStream::connect(to).await else {
                return;
            };
            let _ = (near.set_nodelay(true), far.set_nodelay(true));
            let (near_read, near_write) = near.into_split();
            let (far_read, far_write) = far.into_split();
            tokio::join!(
                carry(near_read, far_write, delay),
                carry(far_read, near_write, delay)
            );
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; the end of
/// stream as well.
async fn carry(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let read = async move {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = from.read_buf(&mut buf).await.unwrap_or(0);
            if chunks.send((Instant::now() + delay, buf.freeze())).is_err() || n == 0 {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if chunk.is_empty() {
                let _ = to.shutdown().await;
                break;
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_in_order_a_delay_late_and_the_end_follows() {
        let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let mut data = Vec::new();
            stream.read_to_end(&mut data).await.unwrap();
            stream.write_all(&data).await.unwrap();
        });
        let relay = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let delay = Duration::from_millis(30);
        tokio::spawn(serve(relay, echo_addr, delay));
        let mut client = TcpStream::connect(relay_addr).await.unwrap();
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, sent);
        // There and back: at least the delay twice.
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());
    }
}
