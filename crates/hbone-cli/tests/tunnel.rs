//! Data through tunnels: bulk transfer, many tunnels at once, half-close in
//! both directions, connection sharing, and a server on a listener bound
//! beforehand.

use std::time::Duration;

use crate::common::*;
use hbone::{DialError, Dialer, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_checked_by_hash() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();

    let tunnel = dialer
        .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
        .await
        .unwrap();
    assert_eq!(tunnel.peer_id(), &pki.server_id);
    let data = payload(1, 64 << 20);
    let back = echo_roundtrip(tunnel, &data).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tunnels_each_checked() {
    const TUNNELS: u64 = 200;
    const SIZE: usize = 512 << 10;
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    // ztunnel's client limit of 100 streams per connection, so that 200
    // concurrent tunnels need two connections.
    let mut config = hbone::DialerConfig::default();
    config.h2.max_concurrent_streams = 100;
    let dialer = Dialer::with_config(&pki.client, config).unwrap();

    // Every tunnel is open before any sends, so all 200 are concurrent.
    let all_open = std::sync::Arc::new(tokio::sync::Barrier::new(TUNNELS as usize));
    let mut tasks = Vec::new();
    for seed in 0..TUNNELS {
        let dialer = dialer.clone();
        let server_id = pki.server_id.clone();
        let addr = server.addr;
        let all_open = all_open.clone();
        tasks.push(tokio::spawn(async move {
            let tunnel = dialer.connect(addr, &[server_id], echo).await.unwrap();
            all_open.wait().await;
            let data = payload(seed, SIZE);
            let back = echo_roundtrip(tunnel, &data).await.unwrap();
            assert_eq!(sha256(&back), sha256(&data), "tunnel {seed} corrupted data");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = server.stats.snapshot();
    assert_eq!(stats.tunnels_opened, TUNNELS);
    // 200 concurrent tunnels at 100 streams per connection: exactly two
    // connections, shared, and no handshake per tunnel.
    assert_eq!(stats.connections_accepted, 2, "{stats:?}");
    eventually("all tunnels closed on the server", || {
        server.stats.snapshot().tunnels_active == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_tunnels_share_one_connection() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    for i in 0..5 {
        let tunnel = dialer
            .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
            .await
            .unwrap();
        let back = echo_roundtrip(tunnel, format!("hello {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(back, format!("hello {i}").as_bytes());
    }
    assert_eq!(server.stats.snapshot().connections_accepted, 1);
    assert_eq!(dialer.pooled_connections(), 1);
}

/// The client writes a request and half-closes; the target answers only
/// after it has read EOF; the client reads the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let target = TcpListener::bind(loopback()).await.unwrap();
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
    let mut tunnel = dialer
        .connect(
            server.addr,
            std::slice::from_ref(&pki.server_id),
            target_addr,
        )
        .await
        .unwrap();
    let request = payload(7, 300_000);
    tunnel.write_all(&request).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 300000 bytes");
    assert_eq!(app.await.unwrap(), request);
}

/// The mirror case: the target sends everything and half-closes first; the
/// client reads to EOF and only then sends its reply, which still arrives,
/// followed by a clean EOF: the server, whose reads from the target had
/// ended, closes the socket without a shutdown of its own, and the close
/// must send a FIN, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_target() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let target = TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let greeting = payload(9, 200_000);
    let sent = greeting.clone();
    let app = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        socket.write_all(&sent).await.unwrap();
        socket.shutdown().await.unwrap();
        let mut reply = Vec::new();
        socket.read_to_end(&mut reply).await.unwrap();
        reply
    });

    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tunnel = dialer
        .connect(
            server.addr,
            std::slice::from_ref(&pki.server_id),
            target_addr,
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    within(
        PEER_WAIT,
        "tunnel: received",
        tunnel.read_to_end(&mut received),
    )
    .await
    .unwrap();
    assert_eq!(received, greeting);
    tunnel.write_all(b"thanks, all read").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), app)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"thanks, all read");
}

/// A target that resets its connection makes the client see an error, not
/// a clean EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_the_client_as_an_error() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let target = TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut buf = [0u8; 5];
        socket.read_exact(&mut buf).await.unwrap();
        socket.set_zero_linger().unwrap();
        drop(socket);
    });
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tunnel = dialer
        .connect(
            server.addr,
            std::slice::from_ref(&pki.server_id),
            target_addr,
        )
        .await
        .unwrap();
    tunnel.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
        .await
        .unwrap();
    let error = result.expect_err("a reset target must not look like a clean EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

/// The other direction: a client that resets its tunnel
/// (RST_STREAM CONNECT_ERROR) makes the server reset the target's TCP
/// connection, so the target reads an error, not a clean EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_the_target_as_a_reset() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let target = TcpListener::bind(loopback()).await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (greeted, greeting) = tokio::sync::oneshot::channel();
    let seen = tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut buf = [0u8; 5];
        socket.read_exact(&mut buf).await.unwrap();
        let _ = greeted.send(());
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await
    });
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut tunnel = dialer
        .connect(
            server.addr,
            std::slice::from_ref(&pki.server_id),
            target_addr,
        )
        .await
        .unwrap();
    tunnel.write_all(b"hello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), greeting)
        .await
        .expect("the target got the greeting")
        .unwrap();
    tunnel.reset();
    let result = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .expect("the target's connection ends")
        .unwrap();
    let error = result.expect_err("a reset tunnel must not look like a clean EOF to the target");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

/// An embedder binds the socket itself (as systemd socket activation hands
/// one over) and the server serves it: `from_listener` ignores the
/// configured `listen`, reports the listener's address, and refuses
/// tunnels back to that address as to its own listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_bound_beforehand_is_served() {
    let pki = Pki::new();
    let socket = std::net::TcpListener::bind(loopback()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let bound = socket.local_addr().unwrap();
    let listener = TcpListener::from_std(socket).unwrap();
    // Nothing listens at the configured address: only the listener given
    // may be served.
    let config = ServerConfig::new(closed_port().await, pki.server.clone());
    let server = Server::from_listener(listener, config).unwrap();
    assert_eq!(server.local_addr(), bound);
    let stats = server.stats();
    let running = tokio::spawn(server.run());

    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let tunnel = dialer.connect(bound, ids, echo).await.unwrap();
    let sent = b"through a server on a listener bound beforehand";
    let back = echo_roundtrip(tunnel, sent).await.unwrap();
    assert_eq!(back, sent);
    assert_eq!(stats.snapshot().tunnels_opened, 1);

    // The listener's address is the server's own: a tunnel to it would loop.
    match dialer.connect(bound, ids, bound).await {
        Err(DialError::Status { status, .. }) => assert_eq!(status.as_u16(), 403),
        Err(other) => panic!("expected 403, got {other}"),
        Ok(_) => panic!("a tunnel to the server's own listener was let in"),
    }
    running.abort();
}

/// This process's connected TCP sockets: local and peer address, and
/// whether TCP_NODELAY is set.
fn connected_sockets() -> Vec<(std::net::SocketAddr, std::net::SocketAddr, bool)> {
    use std::os::fd::FromRawFd;
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    fds.filter_map(|entry| {
        let fd = entry
            .ok()?
            .file_name()
            .to_string_lossy()
            .parse::<i32>()
            .ok()?;
        // SAFETY: the socket is only looked at, never closed (ManuallyDrop);
        // a descriptor that is not a connected socket fails the calls.
        let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        let (local, peer) = (socket.local_addr().ok()?, socket.peer_addr().ok()?);
        Some((local, peer, socket.nodelay().ok()?))
    })
    .collect()
}

/// Whether this process's socket from `local` to `peer` has TCP_NODELAY.
fn nodelay_of(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<bool> {
    let sockets = connected_sockets().into_iter();
    sockets
        .filter(|&(l, p, _)| (l, p) == (local, peer))
        .map(|(_, _, nodelay)| nodelay)
        .next()
}

/// Sockets accepted by an entry and by the server have TCP_NODELAY (on
/// Linux inherited from their listener, with no call of their own), so
/// their small writes go out at once instead of waiting for an ACK; so
/// does one whose handshake completed before the entry ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sockets_have_nodelay() {
    use hbone::entry::{Destination, forward};
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let entry = listener.local_addr().unwrap();
    let destination = Destination::direct(server.addr.into(), vec![pki.server_id.clone()], echo);
    // Queued before the entry runs: accepted before its listener has it.
    let early = tokio::net::TcpStream::connect(entry).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(forward::serve(
        listener,
        dialer.clone(),
        destination,
        std::sync::Arc::new(Records::default()),
        async move {
            let _ = stopped.await;
        },
    ));
    let late = tokio::net::TcpStream::connect(entry).await.unwrap();
    for (mut app, which) in [(early, "queued before"), (late, "after")] {
        app.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        app.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        let accepted_by_entry = nodelay_of(entry, app.local_addr().unwrap());
        assert_eq!(
            accepted_by_entry,
            Some(true),
            "the entry's socket for a connection made {which} it ran"
        );
    }
    // The dialer's one pooled connection, seen from the server's end.
    let dialed: Vec<_> = connected_sockets()
        .into_iter()
        .filter(|&(_, peer, _)| peer == server.addr)
        .map(|(local, _, _)| local)
        .collect();
    assert_eq!(dialed.len(), 1, "one connection to the server: {dialed:?}");
    let accepted_by_server = nodelay_of(server.addr, dialed[0]);
    assert_eq!(
        accepted_by_server,
        Some(true),
        "the server's accepted socket"
    );

    let _ = stop.send(());
    within(Duration::from_secs(10), "the entry stops", serving)
        .await
        .unwrap();
}
