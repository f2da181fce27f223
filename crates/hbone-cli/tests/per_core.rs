//! A server whose connections run on per-core workers: tunnels carry bytes
//! both ways and half-close, connections spread over the workers (each
//! tunnel's record names the thread that served it), whether each worker
//! accepts for itself or is handed its sockets, and a drain still waits
//! for a tunnel open on a worker. An entry on a dialer with workers: its
//! tunnels run on the workers, each worker with a pooled connection of its
//! own.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use hbone::access::{AccessLog, TunnelRecord};
use hbone::entry::{Destination, forward};
use hbone::{Dialer, DialerConfig, Server, ServerConfig, Workers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The name of the thread each tunnel record was written on: the
/// server writes it inline, on the thread running the tunnel.
#[derive(Default)]
struct Threads(Mutex<Vec<String>>);

impl AccessLog for Threads {
    fn record(&self, _: &TunnelRecord) {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        self.0.lock().unwrap().push(name);
    }
}

impl Threads {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
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
    let dialer =
        Dialer::with_config(&pki.client, DialerConfig::default().with_pooling(false)).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    for seed in 0..count {
        let tunnel = dialer.connect(server, ids, echo).await.unwrap();
        let data = payload(seed as u64, 100_000);
        let back = echo_roundtrip(tunnel, &data).await.unwrap();
        assert_eq!(sha256(&back), sha256(&data), "tunnel {seed}");
    }
    eventually("a record for each tunnel", || threads.all().len() == count).await;
    threads.all().into_iter().collect()
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
/// its own (SO_REUSEPORT, on Linux); the kernel spreads connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_connections_are_spread_over_the_workers() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let threads = Arc::new(Threads::default());
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone())
            .with_access_log(threads.clone())
            .with_workers(workers.clone()),
    )
    .await;
    // By source port hash: all 16 on one worker has odds of 2^-15.
    let names = names_of_serving_threads(&pki, server.addr, &threads, 16).await;
    assert_eq!(
        names,
        both_workers(),
        "every tunnel on a worker, both serving"
    );
    drop(server);
    workers.shutdown();
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

/// Runs a forward entry on `listener` with a dialer on `workers`, sends
/// `count` connections through it one after another (each checked by
/// its echo), and returns the threads that wrote the client records and
/// the connections the dialer pooled.
async fn forward_on_workers(
    pki: &Pki,
    workers: &Workers,
    listener: tokio::net::TcpListener,
    count: usize,
) -> (BTreeSet<String>, usize) {
    let server = start_default_server(pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::with_config(
        &pki.client,
        DialerConfig::default().with_workers(workers.clone()),
    )
    .unwrap();
    let destination = Destination::direct(server.addr.into(), vec![pki.server_id.clone()], echo);
    let threads = Arc::new(Threads::default());
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
        let app = tokio::net::TcpStream::connect(entry).await.unwrap();
        let data = payload(seed as u64, 50_000);
        let back = echo_roundtrip(app, &data).await.unwrap();
        assert_eq!(sha256(&back), sha256(&data), "connection {seed}");
    }
    eventually("a record for each tunnel", || threads.all().len() == count).await;
    let pooled = dialer.pooled_connections();
    let _ = stop.send(());
    within(Duration::from_secs(10), "the entry stops", serving)
        .await
        .unwrap();
    (threads.all().into_iter().collect(), pooled)
}

fn assert_each_worker_served_on_a_connection_of_its_own(names: &BTreeSet<String>, pooled: usize) {
    assert_eq!(
        *names,
        both_workers(),
        "every tunnel on a worker, both serving"
    );
    assert_eq!(pooled, 2, "pooled connections: one per worker");
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
    let watch_port = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..200 {
            most = most.max(listening_sockets(port));
            if most >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    // By source port hash: all 16 on one worker has odds of 2^-15.
    let (names, pooled) = forward_on_workers(&pki, &workers, listener, 16).await;
    assert_eq!(
        watch_port.await.unwrap(),
        2,
        "listening sockets on the entry's port"
    );
    assert_each_worker_served_on_a_connection_of_its_own(&names, pooled);
    workers.shutdown();
}

/// Any other listener: one accept loop hands the sockets to the workers
/// in turn, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_entry_hands_connections_to_the_workers_in_turn() {
    let pki = Pki::new();
    let workers = Workers::start(2).unwrap();
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let (names, pooled) = forward_on_workers(&pki, &workers, listener, 4).await;
    assert_each_worker_served_on_a_connection_of_its_own(&names, pooled);
    workers.shutdown();
}
