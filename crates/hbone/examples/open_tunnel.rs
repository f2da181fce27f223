//! Open a tunnel from a tokio program and talk through it.
//!
//! Everything runs on loopback: a development CA in memory, an HBONE
//! server, an echo application behind it, and a dialer that opens a tunnel
//! to the echo through the server, proving and checking SPIFFE identities.
//!
//! ```sh
//! cargo run -p hbone --example open_tunnel
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

/// Sends a greeting through a tunnel and returns what came back.
pub async fn run() -> Result<String, Box<dyn Error>> {
    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("cluster.local", day)?;
    let server_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/server".parse()?;
    let client_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse()?;

    // The application the tunnel leads to: echoes what it reads.
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });

    // The HBONE server, on a port of the system's choosing.
    let server_identity = ca.issue(&server_id, day)?.identity()?;
    let server = Server::bind(ServerConfig::new("127.0.0.1:0".parse()?, server_identity)).await?;
    let server_addr = server.local_addr();
    tokio::spawn(server.run());

    // The client: its identity, and the identity it expects the server to prove.
    let dialer = Dialer::new(&ca.issue(&client_id, day)?.identity()?)?;
    let mut tunnel = dialer
        .connect(server_addr, std::slice::from_ref(&server_id), echo_addr)
        .await?;
    tunnel.write_all(b"hello through HBONE").await?;
    tunnel.shutdown().await?; // half-close: the server closes its write side to the echo
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await?;
    let proved = tunnel.peer_id().clone();
    drop(tunnel);
    // End the pooled connection with GOAWAY and TLS close_notify.
    dialer.close(Duration::from_secs(2)).await;
    Ok(format!("{proved} echoed: {answer}"))
}
