//! A server whose connections run on per-core workers: tunnels carry bytes
//! both ways and half-close, connections spread over the workers (each
//! tunnel's record names the thread that served it), whether each worker
//! accepts for itself or is handed its sockets, and a drain still waits
//! for a tunnel open on a worker. An entry on a dialer with workers: its
//! tunnels run on the workers, each worker with a pooled connection of its
//! own. A connection arriving on a worker that carries bulk moves to one
//! that does not, until that bulk goes quiet. A single worker accepts for
//! itself.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use hbone::access::{AccessLog, TunnelRecord};
use hbone::entry::{Destination, forward};
use hbone::{Dialer, DialerConfig, Server, ServerConfig, Workers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The name of the thread each tunnel record was written on, with the
/// tunnel's trace id: servers and entries write it inline, on the thread
/// running the tunnel.
#[derive(Default)]
struct Threads(Mutex<Vec<(String, String)>>);

impl AccessLog for Threads {
    fn record(&self, record: &TunnelRecord) {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        let trace = record.trace.map(|t| t.to_string()).unwrap_or_default();
        self.0.lock().unwrap().push((trace, name));
    }
}

impl Threads {
    fn all(&self) -> Vec<String> {
        let records = self.0.lock().unwrap();
        records.iter().map(|(_, name)| name.clone()).collect()
    }

    fn by_trace(&self) -> std::collections::BTreeMap<String, String> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

/// The first two CPUs this process may use: the workers are pinned to
/// them, worker 0 to the first.
fn two_cpus() -> [usize; 2] {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills
    // it for this thread and reads nothing else.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
        set
    };
    // SAFETY: CPU_ISSET reads the set within its size.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    assert!(
        cpus.len() >= 2,
        "the per-core tests need two CPUs, and this process may use {cpus:?}"
    );
    [cpus[0], cpus[1]]
}

/// Runs `work` in a runtime of its own on a thread pinned to `cpu`, so
/// that the connections it opens come from that CPU, and returns what it
/// returns.
async fn from_cpu<W, F, T>(cpu: usize, work: W) -> T
where
    W: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let pinned = move || {
        // SAFETY: an empty set with one CPU added, for this thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(
                libc::sched_setaffinity(0, size, &set),
                0,
                "pinning to CPU {cpu}"
            );
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work())
    };
    tokio::task::spawn_blocking(pinned).await.unwrap()
}

/// Opens `count` tunnels, each on a connection of its own, checks their
/// echoes, and returns the names of the threads that served them.
async fn names_of_serving_threads(
    pki: &Pki,
    server: std::net::SocketAddr,
    threads: &Threads,
    count: usize,
) -> BTreeSet<String> {
    let echo = start_echo().await;
    open_tunnels(pki, server, echo, 0..count).await;
    eventually("a record for each tunnel", || threads.all().len() == count).await;
    threads.all().into_iter().collect()
}

/// Opens a tunnel for each of `seeds` to `echo` through `server`, each on
/// a connection of its own, and checks its echo.
async fn open_tunnels(
    pki: &Pki,
    server: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    seeds: std::ops::Range<usize>,
) {
    let dialer =
        Dialer::with_config(&pki.client, DialerConfig::default().with_pooling(false)).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    for seed in seeds {
        let tunnel = dialer.connect(server, ids, echo).await.unwrap();
        let data = payload(seed as u64, 100_000);
        let back = echo_roundtrip(tunnel, &data).await.unwrap();
        assert_eq!(sha256(&back), sha256(&data), "tunnel {seed}");
    }
}

/// A server that binds its own address, on two workers, recording the
/// thread of each tunnel.
async fn server_on_two_workers(pki: &Pki) -> (Workers, Arc<Threads>, RunningServer) {
    let workers = Workers::start(2).unwrap();
    let threads = Arc::new(Threads::default());
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone())
            .with_access_log(threads.clone())
            .with_workers(workers.clone()),
    )
    .await;
    (workers, threads, server)
}

fn both_workers() -> BTreeSet<String> {
    BTreeSet::from(["hbone-worker-0".to_owned(), "hbone-worker-1".to_owned()])
}

/// A listener bound beforehand: the accept loop hands sockets to the
/// workers in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_connections_are_handed_to_the_workers_in_turn() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let threads = Arc::new(Threads::default());
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let config = ServerConfig::new(loopback(), pki.server.clone())
        .with_access_log(threads.clone())
        .with_workers(workers.clone());
    let server = Server::from_listener(listener, config).unwrap();
    let addr = server.local_addr();
    let running = tokio::spawn(server.run());
    let names = names_of_serving_threads(&pki, addr, &threads, 4).await;
    assert_eq!(
        names,
        both_workers(),
        "every tunnel on a worker, both serving"
    );
    running.abort();
    workers.shutdown();
}

/// A server that binds its own address gives each worker a listener of
/// its own (SO_REUSEPORT, on Linux), each worker pinned to a CPU and its
/// listener steered to that CPU (SO_INCOMING_CPU): connections opened from
/// a CPU are served by the worker pinned to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_connections_go_to_the_worker_on_their_cpu() {
    let cpus = two_cpus();
    let pki = Arc::new(Pki::new());
    let (workers, threads, server) = server_on_two_workers(&pki).await;
    let echo = start_echo().await;
    for (index, cpu) in cpus.into_iter().enumerate() {
        let (pki, server) = (pki.clone(), server.addr);
        let seeds = 8 * index..8 * (index + 1);
        from_cpu(cpu, move || async move {
            open_tunnels(&pki, server, echo, seeds).await
        })
        .await;
        eventually("a record for each tunnel", || {
            threads.all().len() == 8 * (index + 1)
        })
        .await;
        let served: BTreeSet<String> = threads.all()[8 * index..].iter().cloned().collect();
        assert_eq!(
            served,
            BTreeSet::from([format!("hbone-worker-{index}")]),
            "tunnels opened from CPU {cpu}"
        );
    }
    drop(server);
    workers.shutdown();
}

/// A scenario run from the first worker's CPU against a server on two
/// workers: tunnels opened there arrive on worker 0 unless placed
/// elsewhere. The dialer does not pool, so each tunnel rides a connection
/// of its own and is placed on its own.
struct FromFirstCpu {
    dialer: Dialer,
    server: std::net::SocketAddr,
    ids: Vec<hbone::SpiffeId>,
    echo: std::net::SocketAddr,
    records: Arc<Threads>,
}

impl FromFirstCpu {
    /// Starts the server, runs `scenario` from the first CPU, and returns
    /// the thread that served each tunnel, in the order of their records.
    async fn run<W, F>(scenario: W) -> Vec<String>
    where
        W: FnOnce(FromFirstCpu) -> F + Send + 'static,
        F: std::future::Future<Output = ()>,
    {
        let [first_cpu, _] = two_cpus();
        let pki = Arc::new(Pki::new());
        let (workers, threads, server) = server_on_two_workers(&pki).await;
        let echo = start_echo().await;
        let (server_addr, records) = (server.addr, threads.clone());
        from_cpu(first_cpu, move || async move {
            let config = DialerConfig::default().with_pooling(false);
            scenario(FromFirstCpu {
                dialer: Dialer::with_config(&pki.client, config).unwrap(),
                server: server_addr,
                ids: vec![pki.server_id.clone()],
                echo,
                records,
            })
            .await
        })
        .await;
        let served = threads.all();
        drop(server);
        workers.shutdown();
        served
    }

    async fn tunnel(&self) -> hbone::Tunnel {
        let tunnel = self.dialer.connect(self.server, &self.ids, self.echo);
        tunnel.await.unwrap()
    }

    /// A short tunnel: one echo, then closed.
    async fn short(&self, message: &[u8]) {
        let echoed = echo_roundtrip(self.tunnel().await, message).await.unwrap();
        assert_eq!(echoed, message);
    }

    /// A tunnel held open once 4 MB have gone there and back through it.
    async fn bulk(&self) -> hbone::Tunnel {
        let (mut from_bulk, mut to_bulk) = tokio::io::split(self.tunnel().await);
        let data = payload(1, 4 << 20);
        let mut back = vec![0; data.len()];
        let (sent, received) =
            tokio::join!(to_bulk.write_all(&data), from_bulk.read_exact(&mut back));
        sent.unwrap();
        received.unwrap();
        assert_eq!(sha256(&back), sha256(&data), "the bulk echo");
        from_bulk.unsplit(to_bulk)
    }

    /// Closes `tunnel` from this side and reads it to its end.
    async fn close(&self, mut tunnel: hbone::Tunnel) {
        tunnel.shutdown().await.unwrap();
        tunnel.read_to_end(&mut Vec::new()).await.unwrap();
    }

    async fn records(&self, count: usize) {
        let what = format!("{count} tunnel records");
        eventually(&what, || self.records.all().len() == count).await;
    }
}

/// A connection that arrives on a worker carrying a bulk tunnel moves to
/// a worker without bulk, so that its tunnels do not queue behind bulk
/// turns; once the bulk tunnel ends, connections stay where they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_connections_arriving_beside_bulk_move_to_another_worker() {
    let served = FromFirstCpu::run(|here| async move {
        let bulk = here.bulk().await;
        here.short(b"beside").await;
        here.records(1).await;
        here.close(bulk).await;
        here.records(2).await;
        here.short(b"after").await;
        here.records(3).await;
    })
    .await;
    assert_eq!(
        served,
        ["hbone-worker-1", "hbone-worker-0", "hbone-worker-0"],
        "the short tunnel, then the bulk one, then one after it"
    );
}

/// A bulk tunnel that stays open but goes quiet stops counting as bulk
/// after a second: connections arriving on its worker then stay there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_a_quiet_bulk_tunnel_stops_moving_connections() {
    let served = FromFirstCpu::run(|here| async move {
        let mut bulk = here.bulk().await;
        here.short(b"beside").await;
        here.records(1).await;
        // Well past the quiet period, with the bulk tunnel still open.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        here.short(b"later").await;
        here.records(2).await;
        bulk.write_all(b"still open").await.unwrap();
        let mut back = [0; 10];
        bulk.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still open");
        here.close(bulk).await;
        here.records(3).await;
    })
    .await;
    assert_eq!(
        served,
        ["hbone-worker-1", "hbone-worker-0", "hbone-worker-0"],
        "a short tunnel beside the bulk one, one once it went quiet, then the bulk one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_half_close_from_the_client() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone()).with_workers(workers.clone()),
    )
    .await;
    let target = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let app = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut request = Vec::new();
        socket.read_to_end(&mut request).await.unwrap();
        let answer = format!("got {} bytes", request.len());
        socket.write_all(answer.as_bytes()).await.unwrap();
        socket.shutdown().await.unwrap();
        request
    });
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let mut tunnel = dialer.connect(server.addr, ids, target_addr).await.unwrap();
    let request = payload(9, 300_000);
    tunnel.write_all(&request).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut answer = String::new();
    within(PEER_WAIT, "the answer", tunnel.read_to_string(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, "got 300000 bytes");
    assert_eq!(app.await.unwrap(), request);
    drop(server);
    workers.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_drain_waits_for_a_tunnel_on_a_worker() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let server = Server::bind(
        ServerConfig::new(loopback(), pki.server.clone()).with_workers(workers.clone()),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let drainer = server.drainer();
    let running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let mut in_flight = dialer.connect(addr, ids, echo).await.unwrap();
    in_flight.write_all(b"before ").await.unwrap();

    drainer.drain();
    within(Duration::from_secs(10), "the listener closes", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!running.is_finished(), "a tunnel is still in flight");

    in_flight.write_all(b"and after the drain").await.unwrap();
    in_flight.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(PEER_WAIT, "echoed", in_flight.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, b"before and after the drain");
    drop(in_flight);
    within(
        Duration::from_secs(5),
        "run() returns once drained",
        running,
    )
    .await
    .unwrap();
    workers.shutdown();
}

/// What a forward entry run showed while it ran.
struct EntryRun {
    /// The threads that wrote the client records.
    names: BTreeSet<String>,
    /// Connections the dialer pooled.
    pooled: usize,
    /// Sockets listening on the entry's port.
    listening: usize,
}

/// Runs a forward entry on `listener` with a dialer on `workers` and
/// sends `count` connections through it (see [`forward_to`]).
async fn forward_on_workers(
    pki: &Pki,
    workers: &Workers,
    listener: tokio::net::TcpListener,
    count: usize,
) -> EntryRun {
    let server = start_default_server(pki).await;
    let threads = Arc::new(Threads::default());
    let (pooled, listening) =
        forward_to(pki, workers, listener, server.addr, &threads, count).await;
    EntryRun {
        names: threads.all().into_iter().collect(),
        pooled,
        listening,
    }
}

/// Runs a forward entry on `listener` to the echo app through `server`,
/// its records in `threads`, sends `count` connections through it one
/// after another, from the first two CPUs in turn (each checked by its
/// echo), and returns the connections the dialer pooled and the sockets
/// listening on the entry's port, both counted before it stops.
async fn forward_to(
    pki: &Pki,
    workers: &Workers,
    listener: tokio::net::TcpListener,
    server: std::net::SocketAddr,
    threads: &Arc<Threads>,
    count: usize,
) -> (usize, usize) {
    let cpus = two_cpus();
    let echo = start_echo().await;
    let dialer = Dialer::with_config(
        &pki.client,
        DialerConfig::default().with_workers(workers.clone()),
    )
    .unwrap();
    let destination = Destination::direct(server.into(), vec![pki.server_id.clone()], echo);
    let entry = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(forward::serve(
        listener,
        dialer.clone(),
        destination,
        threads.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    for seed in 0..count {
        let through_entry = move || async move {
            let app = tokio::net::TcpStream::connect(entry).await.unwrap();
            let data = payload(seed as u64, 50_000);
            let back = echo_roundtrip(app, &data).await.unwrap();
            assert_eq!(sha256(&back), sha256(&data), "connection {seed}");
        };
        from_cpu(cpus[seed % 2], through_entry).await;
    }
    eventually("a record for each tunnel", || threads.all().len() == count).await;
    let pooled = dialer.pooled_connections();
    let listening = listening_sockets(entry.port());
    let _ = stop.send(());
    within(Duration::from_secs(10), "the entry stops", serving)
        .await
        .unwrap();
    (pooled, listening)
}

fn assert_each_worker_served_on_a_connection_of_its_own(run: &EntryRun) {
    assert_eq!(
        run.names,
        both_workers(),
        "every tunnel on a worker, both serving"
    );
    assert_eq!(run.pooled, 2, "pooled connections: one per worker");
}

/// A listener bound with `Workers::bind_listener`: every worker accepts
/// on a listener of its own (two sockets listen on the port while the
/// entry runs), every tunnel runs on a worker, and each worker keeps a
/// pooled connection of its own to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_entry_gives_each_worker_a_listener_and_a_connection() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let listener = workers.bind_listener(loopback()).unwrap();
    let port = listener.local_addr().unwrap().port();
    assert_eq!(listening_sockets(port), 1, "before the entry runs");
    // From both CPUs in turn: each worker accepts the ones from its own.
    let run = forward_on_workers(&pki, &workers, listener, 16).await;
    assert_eq!(run.listening, 2, "sockets listening on the entry's port");
    assert_each_worker_served_on_a_connection_of_its_own(&run);
    workers.shutdown();
}

/// Any other listener: one accept loop hands the sockets to the workers
/// in turn, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_entry_hands_connections_to_the_workers_in_turn() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let run = forward_on_workers(&pki, &workers, listener, 4).await;
    assert_eq!(run.listening, 1, "sockets listening on the entry's port");
    assert_each_worker_served_on_a_connection_of_its_own(&run);
    workers.shutdown();
}

/// The server and an entry in one process on the same two workers: a
/// connection is accepted by the worker on the CPU it came from, and on
/// loopback that is the CPU of the thread that connected, so the worker
/// that runs a tunnel's entry side also serves the connection it dials.
/// Both records of every tunnel, matched by the trace id they share, name
/// the same worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_tunnel_ends_in_one_process_share_a_worker() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let on_server = Arc::new(Threads::default());
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone())
            .with_access_log(on_server.clone())
            .with_workers(workers.clone()),
    )
    .await;
    let on_entry = Arc::new(Threads::default());
    let listener = workers.bind_listener(loopback()).unwrap();
    forward_to(&pki, &workers, listener, server.addr, &on_entry, 16).await;
    eventually("a server record for each tunnel", || {
        on_server.all().len() == 16
    })
    .await;
    let (entry_side, server_side) = (on_entry.by_trace(), on_server.by_trace());
    assert_eq!(entry_side.len(), 16, "distinct traces: {entry_side:?}");
    let workers_used: BTreeSet<&String> = entry_side.values().collect();
    assert_eq!(workers_used.len(), 2, "both workers: {entry_side:?}");
    assert_eq!(
        entry_side, server_side,
        "the worker of each tunnel's two ends"
    );
    drop(server);
    workers.shutdown();
}

/// With a single worker, the server and the entry accept on that worker
/// itself: no socket is handed over from the runtime that started them.
/// Shown by stalling that runtime (its one thread blocks) while an
/// application sends through the entry, the server and a blocking echo
/// app: every step runs on the worker, so the echo comes back.
#[tokio::test(flavor = "current_thread")]
async fn per_core_one_worker_accepts_for_itself() {
    use std::io::{Read, Write};

    let pki = Pki::new();
    let workers = Workers::start(1).unwrap();
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone()).with_workers(workers.clone()),
    )
    .await;
    let echo = std::net::TcpListener::bind(loopback()).unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((mut socket, _)) = echo.accept() {
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = socket.read(&mut buffer) {
                    if socket.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dialer = Dialer::with_config(
        &pki.client,
        DialerConfig::default().with_workers(workers.clone()),
    )
    .unwrap();
    let listener = workers.bind_listener(loopback()).unwrap();
    let entry = listener.local_addr().unwrap();
    let destination =
        Destination::direct(server.addr.into(), vec![pki.server_id.clone()], echo_addr);
    let serving = tokio::spawn(forward::serve(
        listener,
        dialer,
        destination,
        Arc::new(Threads::default()),
        std::future::pending(),
    ));
    // Let the server and the entry start their accept loops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let app = std::thread::spawn(move || {
        let mut app = std::net::TcpStream::connect(entry).unwrap();
        app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        app.write_all(b"from the app").unwrap();
        let mut back = [0u8; 12];
        app.read_exact(&mut back).map(|()| back)
    });
    // Blocks this runtime's only thread until the app is done.
    let back = app.join().unwrap();
    assert_eq!(
        back.expect("no echo while the starting runtime was stalled"),
        *b"from the app"
    );
    serving.abort();
    workers.shutdown();
}
