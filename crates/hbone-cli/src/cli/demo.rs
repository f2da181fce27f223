//! `hbone demo`: everything on loopback, in one process, from nothing.
//!
//! A CA and two identities are made in memory; an echo application, an
//! HBONE server and a forward entry start on ephemeral ports; a payload goes
//! through the tunnel and comes back checked byte for byte. Then a client
//! with a certificate from another CA is shown being turned away.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hbone::access::{AccessLog, Role, TunnelRecord};
use hbone::ca::{DevCa, IssuedCert};
use hbone::entry;
use hbone::tls::TlsFailure;
use hbone::{DialError, Dialer, Identity, Route, Server, ServerConfig, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TRUST_DOMAIN: &str = "cluster.local";
const BLOCK: usize = 1 << 20;

#[derive(Args)]
pub struct DemoArgs {
    /// Payload to echo through the tunnel, in MiB (at least 64).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(64..=65536))]
    mib: u32,
    /// Keep everything running afterwards and print how to try it by hand.
    #[arg(long)]
    serve: bool,
}

/// Keeps the access records of both ends, to report what each side verified.
#[derive(Default)]
struct Records(Mutex<Vec<TunnelRecord>>);

impl AccessLog for Records {
    fn record(&self, record: &TunnelRecord) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.clone());
    }
}

impl Records {
    fn find(&self, role: Role) -> Option<TunnelRecord> {
        let records = self.0.lock().unwrap_or_else(|e| e.into_inner());
        records.iter().find(|r| r.role == role).cloned()
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let ca = DevCa::generate(TRUST_DOMAIN, Duration::from_secs(86_400))?;
    let client_id = SpiffeId::istio(TRUST_DOMAIN, "demo", "client")?;
    let server_id = SpiffeId::istio(TRUST_DOMAIN, "demo", "server")?;
    let client_cert = ca.issue(&client_id, Duration::from_secs(86_400))?;
    let server_cert = ca.issue(&server_id, Duration::from_secs(86_400))?;
    let records = Arc::new(Records::default());
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));

    let echo = TcpListener::bind(loopback).await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(run_echo(echo));

    let server_config =
        ServerConfig::new(loopback, server_cert.identity()?).with_access_log(records.clone());
    let server = Server::bind(server_config).await?;
    let server_addr = server.local_addr();
    tokio::spawn(server.run());

    let dialer = Dialer::new(&client_cert.identity()?)?;
    let forward = TcpListener::bind(loopback).await?;
    let forward_addr = forward.local_addr()?;
    let route = Route::Direct {
        server: server_addr,
        server_ids: vec![server_id.clone()],
    };
    tokio::spawn(entry::forward::run(
        forward,
        dialer,
        entry::Destination::new(route, echo_addr),
        records.clone(),
    ));

    println!("hbone demo: TCP through an HBONE tunnel (TLS 1.3 + HTTP/2 CONNECT), all on loopback");
    println!("  CA            in memory, trust domain {TRUST_DOMAIN}, ECDSA P-256");
    println!("  echo app      {echo_addr}");
    println!("  hbone server  {server_addr}  as {server_id}  (targets allowed: loopback)");
    println!("  forward       {forward_addr}  as {client_id}  -> target {echo_addr}");

    let bytes = u64::from(args.mib) * BLOCK as u64;
    let elapsed = echo_through(forward_addr, bytes)
        .await
        .context("echo through the tunnel failed")?;
    let (client_seen, server_seen) = wait_for_records(&records).await?;
    let mib = args.mib;
    let gbits = (bytes * 8) as f64 / elapsed.as_secs_f64() / 1e9;
    println!(
        "  client verified the server as {}",
        client_seen
            .peer_id
            .as_deref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    println!(
        "  server verified the client as {}",
        server_seen
            .peer_id
            .as_deref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    println!(
        "  sent {mib} MiB and got {mib} MiB back, every byte checked, in {:.2} s ({gbits:.2} Gbit/s each way)",
        elapsed.as_secs_f64()
    );

    show_refusal(&ca, server_addr, &server_id, echo_addr).await?;

    if args.serve {
        serve_forever(
            &client_cert,
            forward_addr,
            server_addr,
            &server_id,
            echo_addr,
        )
        .await?;
    }
    Ok(())
}

/// Echoes every connection back, half-closing after the client does.
async fn run_echo(listener: TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut reader, mut writer) = socket.split();
            if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        });
    }
}

/// Block `i` of the payload: deterministic, different for every block, so
/// a lost, repeated or reordered block is caught.
fn payload_block(index: u64, block: &mut [u8]) {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in block.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Sends `bytes` through the forward entry while reading the echo, and
/// checks every byte that comes back.
async fn echo_through(forward: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let blocks = bytes / BLOCK as u64;
    let started = Instant::now();
    let stream = TcpStream::connect(forward).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let send = tokio::spawn(async move {
        let mut block = vec![0u8; BLOCK];
        for i in 0..blocks {
            payload_block(i, &mut block);
            writer.write_all(&block).await?;
        }
        writer.shutdown().await?;
        anyhow::Ok(())
    });
    let mut expected = vec![0u8; BLOCK];
    let mut received = vec![0u8; BLOCK];
    for i in 0..blocks {
        payload_block(i, &mut expected);
        reader
            .read_exact(&mut received)
            .await
            .with_context(|| format!("stream ended early, in MiB {i}"))?;
        if received != expected {
            bail!("MiB {i} came back different from what was sent");
        }
    }
    if reader.read(&mut received[..1]).await? != 0 {
        bail!("more bytes came back than were sent");
    }
    send.await??;
    Ok(started.elapsed())
}

async fn wait_for_records(records: &Records) -> anyhow::Result<(TunnelRecord, TunnelRecord)> {
    for _ in 0..200 {
        if let (Some(client), Some(server)) =
            (records.find(Role::Client), records.find(Role::Server))
        {
            return Ok((client, server));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the tunnel ends did not report the tunnel closing")
}

/// A client whose certificate comes from another CA must be refused.
/// The intruder trusts the real CA (so it would accept the server) but its
/// own certificate comes from a CA the server has never heard of.
async fn show_refusal(
    ca: &DevCa,
    server: SocketAddr,
    server_id: &SpiffeId,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let rogue_ca = DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600))?;
    let intruder = SpiffeId::istio(TRUST_DOMAIN, "demo", "intruder")?;
    let rogue = rogue_ca.issue(&intruder, Duration::from_secs(3600))?;
    let identity = Identity::from_pem(&rogue.chain_pem, &rogue.key_pem, ca.cert_pem())?;
    let dialer = Dialer::new(&identity)?;
    match dialer
        .connect(server, std::slice::from_ref(server_id), target)
        .await
    {
        Err(DialError::Tls {
            failure: failure @ TlsFailure::RejectedUnknownCa,
            ..
        }) => {
            println!("  refused: {intruder} with a certificate from another CA -> {failure}");
            Ok(())
        }
        Err(other) => bail!("the intruder was refused, but not as expected: {other}"),
        Ok(_) => bail!("a client from another CA was let in"),
    }
}

async fn serve_forever(
    client_cert: &IssuedCert,
    forward: SocketAddr,
    server: SocketAddr,
    server_id: &SpiffeId,
    echo: SocketAddr,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("hbone-demo-{}", std::process::id()));
    client_cert.save(&dir)?;
    println!();
    println!("Everything keeps running. Try, in another terminal:");
    println!(
        "  echo hello | nc -N {} {}    # through the forward entry",
        forward.ip(),
        forward.port()
    );
    println!(
        "  echo hello | hbone connect --identity-dir {} --server {server} --server-id {server_id} --target {echo}",
        dir.display()
    );
    println!("Press Ctrl-C to stop.");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    // The client's key was written to disk for the commands above.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
