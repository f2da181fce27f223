//! Per-worker listening sockets: with SO_REUSEPORT the kernel spreads new
//! connections over several sockets bound to one address, so each worker
//! accepts its own and no accepted socket is handed between threads.
//! Servers bind such a group themselves; entries add to a listener bound
//! with [`crate::Workers::bind_listener`].
//!
//! Each socket asks for the connections whose packets arrive on the CPU
//! its worker is pinned to (SO_INCOMING_CPU, honoured within a group since
//! Linux 6.1): on loopback that is the CPU of the thread that connected,
//! so a worker dialling its own process's server is served by itself.
//! (Measured in one `hbone run` on 2 cores with the steering off, the
//! server half on the other worker: a bulk tunnel moved 9.5 Gbit/s
//! instead of 6.7, but a 1 KiB request cost 113 µs of CPU instead of 73.)
//! Where every connection arrives on one CPU, a server moves its new ones
//! off that CPU's worker once it is saturated
//! ([`crate::Workers::place_handshake`]).
//! Set before `listen`, so that no connection is spread by the hash alone
//! while the group forms.
//!
//! And every accept loop's listener ([`NodelayListener`]): TCP_NODELAY set
//! on the listening socket, for the sockets it accepts to inherit, and those
//! sockets left out of any reactor until the worker that serves them takes
//! them; and the task an accept loop runs as ([`run_as_task`]).

#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::net::SocketAddr;

#[cfg(target_os = "linux")]
use crate::workers::Workers;

/// A listener whose accepted sockets have TCP_NODELAY. On Linux it is set
/// once, on the listener, and every socket accepted later inherits it: one
/// `setsockopt` per listener instead of one per connection. Connections
/// whose handshake completed before that are queued without it; they are
/// taken at once and given it one by one.
///
/// On Linux it also hands out sockets that no reactor has registered yet
/// ([`Accepted`]): a connection that moves to another worker is registered
/// there only, instead of with this worker's reactor first and then out of
/// it again (an `epoll_ctl` ADD and DEL saved per move).
pub(crate) struct NodelayListener {
    /// The listening socket, registered with the reactor as if it were a
    /// stream: tokio's own listener registers every socket it accepts, and
    /// `AsyncFd` needs unsafe code; a stream's readiness (`readable`,
    /// `try_io`) is all an accept needs, and a listening socket is never
    /// read or written.
    #[cfg(target_os = "linux")]
    listener: tokio::net::TcpStream,
    #[cfg(not(target_os = "linux"))]
    listener: tokio::net::TcpListener,
    /// Accepted before the listener had TCP_NODELAY, given it since.
    queued: std::collections::VecDeque<(std::net::TcpStream, std::net::SocketAddr)>,
    /// Whether sockets accepted from now on have it without a call.
    inherited: bool,
}

impl NodelayListener {
    /// Takes over `listener`, which must be registered with the current
    /// runtime (made in it, or by `TcpListener::from_std` there).
    pub(crate) fn new(listener: tokio::net::TcpListener) -> std::io::Result<Self> {
        let mut queued = std::collections::VecDeque::new();
        #[cfg(target_os = "linux")]
        let (listener, inherited) = {
            let listening = std::os::fd::OwnedFd::from(listener.into_std()?);
            let listener = tokio::net::TcpStream::from_std(listening.into())?;
            let inherited = socket2::SockRef::from(&listener)
                .set_tcp_nodelay(true)
                .is_ok()
                && take_queued(&listener, &mut queued).is_ok();
            (listener, inherited)
        };
        #[cfg(not(target_os = "linux"))]
        let inherited = false;
        Ok(NodelayListener {
            listener,
            queued,
            inherited,
        })
    }

    /// The next connection, as `TcpListener::accept` (and as cancel-safe:
    /// a queued one is handed out within the first poll).
    pub(crate) async fn accept(&mut self) -> std::io::Result<(Accepted, std::net::SocketAddr)> {
        if let Some((tcp, peer)) = self.queued.pop_front() {
            return Accepted::from_std(tcp).map(|tcp| (tcp, peer));
        }
        let (tcp, peer) = self.accept_next().await?;
        if !self.inherited {
            let _ = tcp.set_nodelay();
        }
        Ok((tcp, peer))
    }

    #[cfg(target_os = "linux")]
    async fn accept_next(&self) -> std::io::Result<(Accepted, std::net::SocketAddr)> {
        use rustix::net::{SocketFlags, acceptfrom_with};
        // Non-blocking from the start (accept4): no fcntl after.
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let accept = || {
            let (socket, peer) = acceptfrom_with(&self.listener, flags)?;
            let peer = peer
                .and_then(|peer| std::net::SocketAddr::try_from(peer).ok())
                .ok_or_else(|| std::io::Error::other("an accepted peer without an IP address"))?;
            Ok((Accepted(std::net::TcpStream::from(socket)), peer))
        };
        loop {
            self.listener.readable().await?;
            match self.listener.try_io(tokio::io::Interest::READABLE, accept) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                accepted => return accepted,
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    async fn accept_next(&self) -> std::io::Result<(Accepted, std::net::SocketAddr)> {
        let (tcp, peer) = self.listener.accept().await?;
        Ok((Accepted(tcp), peer))
    }
}

/// A connection from [`NodelayListener::accept`]. On Linux, no reactor
/// has it yet: [`Accepted::register`] gives it to the reactor of the
/// runtime it is called on, [`Accepted::into_std`] hands it over as it is.
/// Elsewhere it was registered as it was accepted, and moving it costs its
/// deregistration.
pub(crate) struct Accepted(
    #[cfg(target_os = "linux")] std::net::TcpStream,
    #[cfg(not(target_os = "linux"))] tokio::net::TcpStream,
);

impl Accepted {
    fn from_std(tcp: std::net::TcpStream) -> std::io::Result<Self> {
        #[cfg(target_os = "linux")]
        return Ok(Accepted(tcp));
        #[cfg(not(target_os = "linux"))]
        return tokio::net::TcpStream::from_std(tcp).map(Accepted);
    }

    fn set_nodelay(&self) -> std::io::Result<()> {
        self.0.set_nodelay(true)
    }

    /// The socket, registered with the current runtime's reactor: call it
    /// where the connection is to be served.
    pub(crate) fn register(self) -> std::io::Result<tokio::net::TcpStream> {
        #[cfg(target_os = "linux")]
        return tokio::net::TcpStream::from_std(self.0);
        #[cfg(not(target_os = "linux"))]
        return Ok(self.0);
    }

    /// The socket, non-blocking, for another runtime to register.
    pub(crate) fn into_std(self) -> std::io::Result<std::net::TcpStream> {
        #[cfg(target_os = "linux")]
        return Ok(self.0);
        #[cfg(not(target_os = "linux"))]
        return self.0.into_std();
    }
}

/// Runs an accept loop as a task of the current runtime and waits for it.
///
/// An accept loop awaited in place runs wherever its caller is polled, and
/// a caller in `Runtime::block_on` is polled on the thread that called it,
/// not on a worker: there every accepted connection costs a cross-thread
/// wake-up to that thread (the reactor runs on a worker), its `futex` sleep
/// afterwards, and a spawn that wakes a worker back. As a task of its own
/// the loop accepts on a worker, which spawns the connection's task into
/// its own queue. Dropping the returned future aborts the loop: its
/// listener closes as soon as a worker runs the aborted task. A panic in
/// it carries on in the caller. On a current-thread runtime, where every
/// task runs on the caller's thread anyway, the loop is awaited in place
/// (and the listener closes with the future).
pub(crate) async fn run_as_task(
    accept_loop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        return accept_loop.await;
    }
    let mut task = tokio::task::JoinSet::new();
    task.spawn(accept_loop);
    join_all(task).await
}

/// Waits for every task of `set` to end; the first to panic carries its
/// panic on in the caller (the rest are aborted as the set drops), so an
/// accept loop that fails loudly is not mistaken for one that stopped.
pub(crate) async fn join_all(mut set: tokio::task::JoinSet<()>) {
    while let Some(ended) = set.join_next().await {
        if let Err(e) = ended
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Takes every connection queued on `listener` now, each set non-blocking
/// and given TCP_NODELAY; an error other than an empty queue leaves some
/// maybe untaken.
#[cfg(target_os = "linux")]
fn take_queued(
    listener: &impl std::os::fd::AsFd,
    into: &mut std::collections::VecDeque<(std::net::TcpStream, std::net::SocketAddr)>,
) -> std::io::Result<()> {
    let listening = socket2::SockRef::from(listener);
    loop {
        let (socket, peer) = match listening.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        into.push_back((socket.into(), peer));
    }
}

/// Listeners on `addr` for workers `first..first + count` of `workers`,
/// non-blocking and not yet registered with any runtime; with port 0 the
/// others take the port the first was given. Only sockets of the same user
/// can join the group (Linux's rule).
#[cfg(target_os = "linux")]
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    workers: &Workers,
    first: usize,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    // What tokio's `TcpListener::bind` uses.
    const BACKLOG: i32 = 1024;
    let mut listeners = Vec::with_capacity(count);
    let mut at = addr;
    for index in first..first + count {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        if let Some(cpu) = workers.cpu(index) {
            // Best effort: without it the group's hash decides.
            let _ = socket.set_cpu_affinity(cpu);
        }
        socket.bind(&at.into())?;
        socket.listen(BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        at = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// More listeners in `listener`'s SO_REUSEPORT group, one for each worker
/// but the first (whose `listener` is). `None` when it is not in a group
/// (bound without SO_REUSEPORT) or the group cannot grow: the caller then
/// hands accepted sockets over instead.
#[cfg(target_os = "linux")]
pub(crate) fn siblings(
    listener: &tokio::net::TcpListener,
    workers: &Workers,
) -> Option<Vec<std::net::TcpListener>> {
    let count = workers.count();
    let reuses_port = socket2::SockRef::from(listener)
        .reuse_port()
        .unwrap_or(false);
    if count < 2 || !reuses_port {
        return None;
    }
    let grown = listener
        .local_addr()
        .and_then(|addr| bind_reuseport(addr, workers, 1, count - 1));
    grown
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot give each worker a listener; handing connections over instead")
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::run_as_task;
    use std::time::{Duration, Instant};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("runtime-worker")
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_loop_awaited_in_block_on_runs_on_a_worker() {
        let runtime = runtime();
        let caller = std::thread::current().id();
        let (ran_on, name) = runtime.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            run_as_task(async move {
                let thread = std::thread::current();
                let _ = tx.send((thread.id(), thread.name().map(str::to_owned)));
            })
            .await;
            rx.await.unwrap()
        });
        assert_ne!(ran_on, caller, "the loop ran on the thread in block_on");
        assert_eq!(name.as_deref(), Some("runtime-worker"));
    }

    #[test]
    fn a_panic_in_the_loop_reaches_the_caller() {
        let runtime = runtime();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(run_as_task(async { panic!("the accept loop broke") }))
        }));
        let payload = outcome.expect_err("the panic was swallowed");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"the accept loop broke")
        );
    }

    #[test]
    fn one_loop_of_several_panicking_reaches_the_caller() {
        let runtime = runtime();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async {
                let mut loops = tokio::task::JoinSet::new();
                loops.spawn(std::future::pending::<()>());
                loops.spawn(async { panic!("one worker's loop broke") });
                // Bounded: a join that waited for the endless loop instead
                // would time out and return, failing the test below.
                let _ = tokio::time::timeout(Duration::from_secs(5), super::join_all(loops)).await;
            })
        }));
        let payload = outcome.expect_err("the panic was swallowed");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"one worker's loop broke")
        );
    }

    #[test]
    fn an_accepted_socket_is_served_on_the_runtime_that_registers_it() {
        use std::io::{Read, Write};
        let accepting = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (accepted, peer, mut client) = accepting.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let mut listener = super::NodelayListener::new(listener).unwrap();
            let (accepted, peer) = listener.accept().await.unwrap();
            (accepted.into_std().unwrap(), peer, client)
        });
        drop(accepting);
        assert_eq!(peer, client.local_addr().unwrap(), "the peer's address");
        // Non-blocking from accept on: nothing to read yet is WouldBlock.
        let mut byte = [0u8; 1];
        let nothing = (&accepted).read(&mut byte).unwrap_err();
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
        // The accepting runtime is gone; another one serves the socket.
        let serving = runtime();
        let echoed = serving.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut served = tokio::net::TcpStream::from_std(accepted).unwrap();
            assert!(served.nodelay().unwrap(), "TCP_NODELAY");
            client.write_all(b"x").unwrap();
            served.read_exact(&mut byte).await.unwrap();
            served.write_all(&byte).await.unwrap();
            let mut echoed = [0u8; 1];
            tokio::task::spawn_blocking(move || client.read_exact(&mut echoed).map(|()| echoed))
                .await
                .unwrap()
                .unwrap()
        });
        assert_eq!(&echoed, b"x");
    }

    #[test]
    fn dropping_the_wait_closes_the_loops_listener() {
        let runtime = runtime();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept_loop = async move {
                loop {
                    let _ = listener.accept().await;
                }
            };
            let waited =
                tokio::time::timeout(Duration::from_millis(50), run_as_task(accept_loop)).await;
            assert!(waited.is_err(), "an endless loop ended");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::net::TcpStream::connect(addr).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                    _ if Instant::now() > deadline => panic!("the listener outlived its loop"),
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
}
