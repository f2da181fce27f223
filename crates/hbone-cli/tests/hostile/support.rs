//! Fixtures for the hostile-input suite: the healthy tunnel that runs
//! alongside every attack, targets that count or swallow dials, and waits
//! that always end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use hbone::{Dialer, Tunnel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::common::*;

pub const SECOND: Duration = Duration::from_secs(1);

static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Every test holds this gate shared while it runs...
pub async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    within(
        60 * SECOND,
        "waiting for a memory-measuring test",
        GATE.read(),
    )
    .await
}

/// ...and a test that measures this process's memory holds it alone, so
/// that no other test's allocations are counted.
pub async fn alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    within(60 * SECOND, "waiting for the other tests", GATE.write()).await
}

/// A TCP connection to `addr`, made within 5 s.
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    within(5 * SECOND, "TCP connect", TcpStream::connect(addr))
        .await
        .unwrap()
}

/// Polls `check` every 10 ms until it holds; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the server holds exactly `active` connections: what an
/// attack opened has been released.
pub async fn settle(server: &RunningServer, active: u64) {
    let what = format!("the server to hold {active} connection(s)");
    wait_until(&what, 5 * SECOND, || {
        server.stats.snapshot().connections_active == active
    })
    .await;
}

/// A fresh connection from a fresh `Dialer` still gets a working tunnel.
pub async fn assert_serves(server: &RunningServer, pki: &Pki) {
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let data = payload(0x5e7e, 64 << 10);
    let check = async {
        let tunnel = dialer
            .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
            .await
            .unwrap_or_else(|e| panic!("the server refused a new, valid tunnel: {e}"));
        echo_roundtrip(tunnel, &data).await.unwrap()
    };
    let back = tokio::time::timeout(10 * SECOND, check)
        .await
        .expect("a new tunnel after the attack timed out");
    assert_eq!(sha256(&back), sha256(&data), "new tunnel altered its bytes");
}

/// How a [`read_until_closed`] ended.
pub struct Closed {
    /// Everything read before the end.
    pub bytes: Vec<u8>,
    /// From the call to the end.
    pub after: Duration,
    /// `Some` when the end was an error rather than EOF.
    pub error: Option<std::io::Error>,
}

/// Reads until EOF or an error; panics if the peer keeps the connection
/// open longer than `limit` (or sends more than 16 MiB).
pub async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Closed {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the server kept the connection open for {limit:?} ({} bytes read)",
                    bytes.len()
                )
            });
        match read {
            Ok(0) => break,
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                assert!(bytes.len() < 16 << 20, "the server keeps talking");
            }
            Err(error) => {
                return Closed {
                    bytes,
                    after: started.elapsed(),
                    error: Some(error),
                };
            }
        }
    }
    Closed {
        bytes,
        after: started.elapsed(),
        error: None,
    }
}

/// An echo target that counts the connections it accepts.
pub async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    (addr, accepted)
}

/// What a [`firehose`] target managed to write.
#[derive(Debug, Clone, Copy)]
pub struct Hosed {
    pub written: u64,
    /// A write made no progress for 1 s (rather than failing or reaching
    /// the 256 MiB cap).
    pub stalled: bool,
}

/// A target that writes as fast as it can to the first connection it
/// accepts, until a write stalls for 1 s, fails, or 256 MiB have gone; it
/// reports, then holds the connection open for another 10 s.
pub async fn firehose() -> (SocketAddr, tokio::sync::oneshot::Receiver<Hosed>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, hosed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok(Ok((mut socket, _))) = tokio::time::timeout(10 * SECOND, listener.accept()).await
        else {
            return;
        };
        let chunk = payload(0xf12e, 64 << 10);
        let mut outcome = Hosed {
            written: 0,
            stalled: false,
        };
        while outcome.written < 256 << 20 {
            match tokio::time::timeout(SECOND, socket.write_all(&chunk)).await {
                Err(_) => {
                    outcome.stalled = true;
                    break;
                }
                Ok(Err(_)) => break,
                Ok(Ok(())) => outcome.written += chunk.len() as u64,
            }
        }
        let _ = report.send(outcome);
        tokio::time::sleep(10 * SECOND).await;
    });
    (addr, hosed)
}

/// A target that accepts connections and never reads from them (for 15 s).
pub async fn deaf_target() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let deadline = tokio::time::Instant::now() + 15 * SECOND;
        while let Ok(Ok((socket, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
            held.push(socket);
        }
    });
    addr
}

/// A target whose accept queue is full, so the kernel drops new SYNs and
/// every dial to it stays in SYN_SENT until the dialer gives up.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(loopback()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..8 {
            let attempt =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr));
            match attempt.await {
                Ok(Ok(stream)) => fillers.push(stream),
                _ => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "could not fill the black hole's accept queue");
        BlackHole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }

    /// Connections to this target now in SYN_SENT, from `/proc/net/tcp`:
    /// the server's dials that are still pending.
    pub fn pending_dials(&self) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let port = format!(":{:04X}", self.addr.port());
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // rem_address is field 2, st (02 = SYN_SENT) field 3.
                fields.len() > 3 && fields[2].ends_with(&port) && fields[3] == "02"
            })
            .count()
    }
}

/// Resident memory of this process (the server runs in it).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

const CHUNK: usize = 4 << 10;
const PACE: Duration = Duration::from_millis(5);
const STALL: Duration = Duration::from_secs(10);

/// A healthy tunnel on a connection of its own, opened with
/// `hbone::Dialer` before an attack and kept flowing through it: a writer
/// sends a deterministic stream of 4 KiB chunks every 5 ms, the echo target
/// returns it, and both directions are hashed. [`Alongside::finish`] checks
/// that every byte came back unaltered.
pub struct Alongside {
    _dialer: Dialer,
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Flow, String>>,
}

struct Flow {
    sent: u64,
    sent_hash: Vec<u8>,
    received: u64,
    received_hash: Vec<u8>,
    longest_gap: Duration,
}

impl Alongside {
    pub async fn open(server: &RunningServer, pki: &Pki) -> Alongside {
        let echo = start_echo().await;
        let dialer = Dialer::new(&pki.client).unwrap();
        let connect = dialer.connect(server.addr, std::slice::from_ref(&pki.server_id), echo);
        let tunnel = tokio::time::timeout(10 * SECOND, connect)
            .await
            .expect("healthy tunnel: connect timed out")
            .unwrap_or_else(|e| panic!("healthy tunnel: {e}"));
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(pump(tunnel, echoed.clone(), stop.clone()));
        let mut alongside = Alongside {
            _dialer: dialer,
            echoed,
            stop,
            task,
        };
        alongside.assert_flowing("right after opening").await;
        alongside
    }

    /// Bytes echoed back so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Acquire)
    }

    /// The tunnel moves another 64 KiB within 10 s.
    pub async fn assert_flowing(&mut self, when: &str) {
        let goal = self.echoed() + 16 * CHUNK as u64;
        let what = format!("the healthy tunnel to move 64 KiB more ({when})");
        let (echoed, task) = (&self.echoed, &self.task);
        wait_until(&what, 10 * SECOND, || {
            task.is_finished() || echoed.load(Ordering::Acquire) >= goal
        })
        .await;
        if self.task.is_finished() {
            let ended = (&mut self.task).await.expect("the healthy tunnel panicked");
            match ended {
                Err(e) => panic!("the healthy tunnel failed ({when}): {e}"),
                Ok(_) => panic!("the healthy tunnel ended early ({when})"),
            }
        }
    }

    /// Checks it still flows, half-closes, and compares what came back
    /// with what was sent, by length and SHA-256.
    pub async fn finish(mut self) {
        self.assert_flowing("at the end").await;
        self.stop.store(true, Ordering::Release);
        let flow = tokio::time::timeout(15 * SECOND, &mut self.task)
            .await
            .expect("the healthy tunnel did not finish")
            .expect("the healthy tunnel panicked")
            .unwrap_or_else(|e| panic!("the healthy tunnel failed: {e}"));
        assert!(flow.sent > 0);
        assert_eq!(flow.received, flow.sent, "the healthy tunnel lost bytes");
        assert_eq!(
            flow.received_hash, flow.sent_hash,
            "the healthy tunnel's bytes came back altered"
        );
        eprintln!(
            "healthy tunnel: {} KiB each way intact, longest pause {:?}",
            flow.sent >> 10,
            flow.longest_gap
        );
    }
}

async fn pump(
    tunnel: Tunnel,
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<Flow, String> {
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    let write = async move {
        let mut hash = digest::Context::new(&digest::SHA256);
        let (mut sent, mut seq) = (0u64, 0u64);
        while !stop.load(Ordering::Acquire) {
            let chunk = payload(seq, CHUNK);
            seq += 1;
            match tokio::time::timeout(STALL, writer.write_all(&chunk)).await {
                Err(_) => return Err(format!("a write stalled for {STALL:?} after {sent} bytes")),
                Ok(Err(e)) => return Err(format!("write failed after {sent} bytes: {e}")),
                Ok(Ok(())) => {}
            }
            hash.update(&chunk);
            sent += CHUNK as u64;
            tokio::time::sleep(PACE).await;
        }
        match tokio::time::timeout(STALL, writer.shutdown()).await {
            Ok(Ok(())) => Ok((sent, hash.finish().as_ref().to_vec())),
            Ok(Err(e)) => Err(format!("half-close failed: {e}")),
            Err(_) => Err("half-close stalled".to_owned()),
        }
    };
    let read = async move {
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        let (mut last, mut longest_gap) = (Instant::now(), Duration::ZERO);
        loop {
            let n = match tokio::time::timeout(STALL, reader.read(&mut buf)).await {
                Err(_) => return Err(format!("no echo for {STALL:?} after {received} bytes")),
                Ok(Err(e)) => return Err(format!("read failed after {received} bytes: {e}")),
                Ok(Ok(n)) => n,
            };
            longest_gap = longest_gap.max(last.elapsed());
            last = Instant::now();
            if n == 0 {
                return Ok((received, hash.finish().as_ref().to_vec(), longest_gap));
            }
            hash.update(&buf[..n]);
            received += n as u64;
            echoed.store(received, Ordering::Release);
        }
    };
    let ((sent, sent_hash), (received, received_hash, longest_gap)) =
        tokio::try_join!(write, read)?;
    Ok(Flow {
        sent,
        sent_hash,
        received,
        received_hash,
        longest_gap,
    })
}
