//! `hbone bench load` (hidden): runs one workload against one address and
//! prints the result as one `key=value` line on stdout.
//!
//! It runs on a current-thread runtime, so the load generator uses at most
//! one core and leaves the rest to the apps, the server and the entries;
//! the same generator drives the direct and the tunnelled runs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::workloads;

/// Longest wait for a TCP connect or a SOCKS5 reply.
pub const DIAL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Write 128 KiB blocks to the sink for the duration.
    Bulk,
    /// 1 KiB request, 1 KiB response, one after another, on each of
    /// `--streams` connections (one by default).
    ReqResp,
    /// New connection, 1-byte echo, close; `--concurrency` at a time.
    Connect,
    /// Open `--tunnels` connections to the echo app and hold them until
    /// stdin closes.
    Idle,
}

impl Workload {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::ReqResp => "req-resp",
            Workload::Connect => "connect",
            Workload::Idle => "idle",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Where to connect; with --socks5, the target to ask the entry for.
    #[arg(long)]
    pub addr: SocketAddr,
    /// A SOCKS5 entry to go through.
    #[arg(long)]
    pub socks5: Option<SocketAddr>,
    /// How long to run (bulk, req-resp, connect).
    #[arg(long, default_value = "5s", value_parser = hbone::config::parse_duration)]
    pub duration: Duration,
    /// Parallel streams (bulk), or connections (req-resp).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Workers opening connections at the same time (connect).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Connections to hold (idle).
    #[arg(long, default_value_t = 1000)]
    pub tunnels: usize,
    /// Bulk: also stop when stdin closes, if that comes before the
    /// duration ends, so the bench can end the bulk when a run beside it
    /// is over.
    #[arg(long)]
    pub until_stdin_closes: bool,
}

/// Runs the workload on its own current-thread runtime.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the load generator's runtime")?;
        let line = runtime.block_on(workloads::run(&args))?;
        println!("{line}");
        anyhow::Ok(())
    })
    .await
    .context("the load generator thread failed")?
}

/// Opens a connection the way the workload reaches its target: straight to
/// `args.addr`, or through the SOCKS5 entry. Nagle is off, as in any
/// latency-sensitive client.
pub async fn dial(args: &LoadArgs) -> anyhow::Result<TcpStream> {
    let first_hop = args.socks5.unwrap_or(args.addr);
    let stream = timeout(DIAL_LIMIT, TcpStream::connect(first_hop))
        .await
        .with_context(|| format!("connect to {first_hop} timed out"))?
        .with_context(|| format!("cannot connect to {first_hop}"))?;
    stream.set_nodelay(true)?;
    match args.socks5 {
        None => Ok(stream),
        Some(proxy) => timeout(DIAL_LIMIT, socks5_connect(stream, args.addr))
            .await
            .with_context(|| format!("SOCKS5 entry {proxy} did not answer in time"))?
            .with_context(|| format!("SOCKS5 entry {proxy}")),
    }
}

/// The client half of RFC 1928: no authentication, CONNECT to an address.
async fn socks5_connect(mut stream: TcpStream, target: SocketAddr) -> anyhow::Result<TcpStream> {
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice != [5, 0] {
        bail!("refused the no-authentication method (answered {choice:?})");
    }
    let mut request = vec![5, 1, 0];
    match target.ip() {
        IpAddr::V4(ip) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
    }
    request.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .context("closed before replying to CONNECT")?;
    if head[1] != 0 {
        bail!("refused the tunnel to {target}: SOCKS5 reply {}", head[1]);
    }
    let bound_len = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        other => bail!("reply has address type {other}"),
    };
    let mut bound = [0u8; 18];
    stream.read_exact(&mut bound[..bound_len]).await?;
    Ok(stream)
}
