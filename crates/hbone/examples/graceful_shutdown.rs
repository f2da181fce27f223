//! Serve a listener bound beforehand, then shut the server down
//! gracefully: stop accepting, let the tunnel in flight finish, return.
//!
//! ```sh
//! cargo run -p hbone --example graceful_shutdown
//! ```

use std::error::Error;
use std::time::Duration;

use hbone::ca::DevCa;
use hbone::{Dialer, Server, ServerConfig, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    println!("{}", run().await?);
    Ok(())
}

/// Drains a server with a tunnel open; says what the tunnel carried after
/// the drain began.
pub async fn run() -> Result<String, Box<dyn Error>> {
    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("cluster.local", day)?;
    let server_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/server".parse()?;
    let client_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse()?;

    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = target.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });

    // The server serves a socket bound beforehand, as one handed over by
    // systemd socket activation would be; Server::bind would bind its own.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let server = Server::from_listener(
        listener,
        ServerConfig::new(server_addr, ca.issue(&server_id, day)?.identity()?),
    )?;
    assert_eq!(server.local_addr(), server_addr);
    let drainer = server.drainer();
    let running = tokio::spawn(server.run());

    let dialer = Dialer::new(&ca.issue(&client_id, day)?.identity()?)?;
    let mut tunnel = dialer
        .connect(server_addr, std::slice::from_ref(&server_id), target_addr)
        .await?;

    // Drain: no new connections; the open tunnel carries on.
    drainer.drain();
    tunnel
        .write_all(b"still flowing after the drain began")
        .await?;
    tunnel.shutdown().await?;
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await?;
    drop(tunnel);
    dialer.close(Duration::from_secs(2)).await;

    // The server's run() returns once its last connection has closed;
    // bound the wait as you see fit.
    tokio::time::timeout(Duration::from_secs(10), running).await??;
    Ok(answer)
}
