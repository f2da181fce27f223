//! The client side of each workload, as run by `hbone bench load`. Every
//! socket operation has a time limit, so a stalled tunnel fails the run
//! with a message instead of hanging it, and every byte that comes back is
//! checked, so a tunnel that corrupts or loses data cannot score.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::load::{LoadArgs, Workload, dial};
use super::wire::Fields;

/// Size of each write in the bulk workload.
const BULK_BLOCK: usize = 128 * 1024;
/// Size of a request and of its response.
const MESSAGE: usize = 1024;
/// Longest a single read or write may wait before the run is failed.
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Requests sent before timing starts (first tunnel, warm caches).
const WARMUP_REQUESTS: usize = 50;
/// Connections the idle workload opens at the same time.
const IDLE_OPENERS: usize = 64;
/// Longest the idle workload holds its tunnels waiting for the bench.
const IDLE_HOLD_LIMIT: Duration = Duration::from_secs(600);

/// Runs the workload in `args` and returns its result line.
pub async fn run(args: &LoadArgs) -> anyhow::Result<String> {
    match args.workload {
        Workload::Bulk => bulk(args).await,
        Workload::ReqResp => req_resp(args).await,
        Workload::Connect => connect(args).await,
        Workload::Idle => idle(args).await,
    }
}

/// Awaits `op` for at most [`STALL_LIMIT`].
async fn limited<T>(what: &str, op: impl Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    match timeout(STALL_LIMIT, op).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no progress for {} s", STALL_LIMIT.as_secs()),
    }
}

/// `streams` connections write to the sink until the deadline (or, with
/// `--until-stdin-closes`, until stdin closes if that comes first), then
/// half-close and wait for the sink's count. Result: `bytes` delivered and
/// `seconds` from the first write to the last count.
async fn bulk(args: &LoadArgs) -> anyhow::Result<String> {
    let mut streams = Vec::with_capacity(args.streams);
    for _ in 0..args.streams {
        streams.push(dial(args).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    if args.until_stdin_closes {
        // A plain thread, not the runtime's blocking pool: a read still
        // pending when the deadline comes first must not hold up the exit.
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| tokio::spawn(bulk_stream(stream, deadline, stop.clone())))
        .collect();
    let mut bytes = 0u64;
    for (i, task) in tasks.into_iter().enumerate() {
        bytes += task
            .await
            .context("bulk stream task failed")?
            .with_context(|| format!("bulk stream {} of {}", i + 1, args.streams))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Fields::line(&[
        ("bytes", bytes as f64),
        ("seconds", seconds),
    ]))
}

async fn bulk_stream(
    mut stream: TcpStream,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let block = vec![0x5a_u8; BULK_BLOCK];
    let mut sent = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        limited("writing", stream.write_all(&block)).await?;
        sent += BULK_BLOCK as u64;
    }
    limited("half-closing", stream.shutdown()).await?;
    let mut count = [0u8; 8];
    limited(
        "waiting for the sink's byte count",
        stream.read_exact(&mut count),
    )
    .await?;
    let received = u64::from_le_bytes(count);
    if received != sent {
        bail!("sent {sent} bytes but the sink received {received}");
    }
    Ok(received)
}

/// `--streams` connections (one unless asked), each 1 KiB out and the
/// same 1 KiB back, again and again. Result: `requests`, `seconds`, and
/// `p50_us`/`p99_us` latency of the timed ones over every connection, and
/// the `warmup` exchanges before them.
async fn req_resp(args: &LoadArgs) -> anyhow::Result<String> {
    let connections = args.streams.max(1);
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let args = args.clone();
        running.spawn(async move { exchanges(&args).await });
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let mut seconds: f64 = 0.0;
    while let Some(done) = running.join_next().await {
        let (mut timed, took) = done.context("a request/response connection failed")??;
        latencies.append(&mut timed);
        seconds = seconds.max(took);
    }
    latencies.sort_unstable();
    Ok(Fields::line(&[
        ("requests", latencies.len() as f64),
        ("seconds", seconds),
        ("p50_us", micros(percentile(&latencies, 50))),
        ("p99_us", micros(percentile(&latencies, 99))),
        ("warmup", (WARMUP_REQUESTS * connections) as f64),
    ]))
}

/// One connection's exchanges: the latency of each timed one, and how
/// long they took.
async fn exchanges(args: &LoadArgs) -> anyhow::Result<(Vec<Duration>, f64)> {
    let mut stream = dial(args).await?;
    let request: Vec<u8> = (0..MESSAGE).map(|i| (i % 251) as u8).collect();
    let mut response = vec![0u8; MESSAGE];
    for _ in 0..WARMUP_REQUESTS {
        exchange(&mut stream, &request, &mut response).await?;
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let started = Instant::now();
    let deadline = started + args.duration;
    while Instant::now() < deadline {
        let sent = Instant::now();
        exchange(&mut stream, &request, &mut response)
            .await
            .with_context(|| format!("request {}", latencies.len() + 1))?;
        latencies.push(sent.elapsed());
    }
    Ok((latencies, started.elapsed().as_secs_f64()))
}

async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> anyhow::Result<()> {
    limited("sending a request", stream.write_all(request)).await?;
    limited("reading a response", stream.read_exact(response)).await?;
    if response != request {
        bail!("the response differs from the request");
    }
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// `concurrency` workers each connect, echo one byte and close, until the
/// deadline. Result: `connections` completed and `seconds`, and the 1
/// `warmup` connection before them.
async fn connect(args: &LoadArgs) -> anyhow::Result<String> {
    // One connection first, so a pooled entry has its HTTP/2 connection
    // before timing starts (with pooling off it makes no difference).
    one_connection(args).await.context("first connection")?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let args = args.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    one_connection(&args)
                        .await
                        .with_context(|| format!("connection {} of a worker", done + 1))?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut connections = 0u64;
    for worker in workers {
        connections += worker.await.context("connect worker failed")??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Fields::line(&[
        ("connections", connections as f64),
        ("seconds", seconds),
        ("warmup", 1.0),
    ]))
}

async fn one_connection(args: &LoadArgs) -> anyhow::Result<()> {
    let mut stream = dial(args).await?;
    echo_byte(&mut stream).await
}

/// Sends one byte and waits for it to come back: proof that the whole path
/// (through a forward entry, the tunnel and the server) is connected.
async fn echo_byte(stream: &mut TcpStream) -> anyhow::Result<()> {
    limited("sending a byte", stream.write_all(b"x")).await?;
    let mut byte = [0u8; 1];
    limited("reading the echoed byte", stream.read_exact(&mut byte)).await?;
    if byte != *b"x" {
        bail!("the echo came back as {byte:?}");
    }
    Ok(())
}

/// Opens `tunnels` connections (each proven with a 1-byte echo), prints
/// `open=N seconds=S`, holds them until stdin closes, then closes them.
async fn idle(args: &LoadArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    let openers: Vec<_> = (0..IDLE_OPENERS)
        .map(|opener| {
            let args = args.clone();
            let share = (args.tunnels + IDLE_OPENERS - 1 - opener) / IDLE_OPENERS;
            tokio::spawn(async move {
                let mut held = Vec::with_capacity(share);
                for _ in 0..share {
                    let mut stream = dial(&args).await?;
                    echo_byte(&mut stream).await?;
                    held.push(stream);
                }
                anyhow::Ok(held)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(args.tunnels);
    for opener in openers {
        let streams = opener
            .await
            .context("idle opener failed")?
            .with_context(|| {
                format!(
                    "opening idle tunnels ({} of {} open)",
                    held.len(),
                    args.tunnels
                )
            })?;
        held.extend(streams);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        Fields::line(&[("open", held.len() as f64), ("seconds", seconds)])
    );
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    // Any line or EOF means "done"; the limit only guards against a bench
    // that forgot us.
    let _ = timeout(IDLE_HOLD_LIMIT, stdin.read_line(&mut line)).await;
    let count = held.len();
    drop(held);
    Ok(Fields::line(&[("closed", count as f64)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99), Duration::from_micros(99));
        assert_eq!(percentile(&samples[..1], 99), Duration::from_micros(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }
}
