//! How many syscalls a relay needs per 1 KiB request/response under three
//! I/O models, measured on a bare four-socket chain with no TLS and no
//! HTTP/2, so that only the I/O model differs:
//!
//! ```text
//! client ─A─ relay ─B══B'─ relay ─C─ echo
//! ```
//!
//! Each relay copies bytes both ways between its two sockets with
//! `tokio::io::copy_bidirectional`. The client (a blocking thread) sends
//! 1 KiB and waits for the echo, again and again; the echo is a blocking
//! thread too. Only the relay threads are counted: syscalls with
//! `perf stat -e raw_syscalls:sys_enter --per-thread`, CPU with perf's
//! task-clock.
//!
//! The models:
//! - `readiness`: tokio's own `TcpStream` (epoll, then `recv`/`send`), as
//!   hbone and ztunnel do today.
//! - `hybrid`: tokio's current-thread runtime still parks in `epoll_wait`,
//!   but the sockets are read and written through io_uring: receives are
//!   posted ahead, sends are queued, and a task submits the queue once the
//!   tasks woken in a turn have run. The ring is set up with
//!   `DEFER_TASKRUN`; an eventfd (disabled while the thread runs) wakes
//!   epoll when the ring has work.
//! - `completion`: no tokio runtime at all; a loop whose only wait is
//!   `io_uring_enter`, submitting everything queued and waiting for one
//!   completion in the same call.
//!
//! Each model runs with both relays on one thread (as `hbone run` holds an
//! entry and a server in one process, and the hop B→B' completes within the
//! thread) and with one thread per relay (as when the entry and the server
//! are two processes or two hosts).
//!
//! `cargo run --release -p hbone-bench --example io_models [REQUESTS]`
//! (Linux, with `perf` installed and io_uring enabled).

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("io_models needs Linux (io_uring)");
}

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(target_os = "linux")]
mod linux {
    use std::cell::RefCell;
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::pin::Pin;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::{Duration, Instant};

    use io_uring::{IoUring, opcode, squeue, types};
    use tokio::io::unix::AsyncFd;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// What a socket asks of the kernel in one operation.
    const BUFFER: usize = 64 * 1024;
    /// The size of one request and of its response.
    const MESSAGE: usize = 1024;
    /// `IORING_ENTER_GETEVENTS`: run deferred completions, reap, wait.
    const GETEVENTS: u32 = 1;

    #[derive(Clone, Copy, PartialEq)]
    enum Model {
        Readiness,
        Hybrid,
        Completion,
    }

    impl Model {
        fn name(self) -> &'static str {
            match self {
                Model::Readiness => "readiness (tokio, epoll)",
                Model::Hybrid => "hybrid (tokio parks in epoll, sockets on io_uring)",
                Model::Completion => "completion (waits in io_uring_enter)",
            }
        }
    }

    pub fn main() {
        let mut args = std::env::args().skip(1);
        let mut number = |default: u64| {
            args.next()
                .map(|n| n.parse().expect("REQUESTS and RUNS are numbers"))
                .unwrap_or(default)
        };
        let requests = number(40_000);
        let runs = number(5).max(1);
        println!(
            "{requests} requests of {MESSAGE} bytes per run, medians of {runs} runs; \
             syscalls and CPU of the relay threads only"
        );
        println!();
        println!(
            "| model | relays | syscalls per request | CPU µs per request (lowest–highest) | µs per round trip |"
        );
        println!("|---|---|---|---|---|");
        let layouts: Vec<(Model, usize)> = [Model::Readiness, Model::Hybrid, Model::Completion]
            .into_iter()
            .flat_map(|model| [(model, 1), (model, 2)])
            .collect();
        // Round by round, every layout in turn, so that a slow spell of
        // the machine touches them alike.
        let mut results: Vec<Vec<Run>> = layouts.iter().map(|_| Vec::new()).collect();
        for _ in 0..runs {
            for (&(model, threads), results) in layouts.iter().zip(&mut results) {
                results.push(run(model, threads, requests));
            }
        }
        for (&(model, threads), runs) in layouts.iter().zip(&results) {
            let median = |figure: fn(&Run) -> f64| {
                let mut figures: Vec<f64> = runs.iter().map(figure).collect();
                figures.sort_by(f64::total_cmp);
                figures[figures.len() / 2]
            };
            println!(
                "| {} | {} | {:.2} | {:.1} ({:.1}–{:.1}) | {:.1} |",
                model.name(),
                if threads == 1 {
                    "both on one thread"
                } else {
                    "one thread each"
                },
                median(|run| run.syscalls as f64) / requests as f64,
                median(|run| run.cpu_ms) * 1000.0 / requests as f64,
                runs.iter().map(|run| run.cpu_ms).fold(f64::MAX, f64::min) * 1000.0
                    / requests as f64,
                runs.iter().map(|run| run.cpu_ms).fold(0.0, f64::max) * 1000.0 / requests as f64,
                median(|run| run.round_trip.as_secs_f64()) * 1e6,
            );
        }
    }

    struct Run {
        syscalls: u64,
        cpu_ms: f64,
        round_trip: Duration,
    }

    /// Builds the chain, runs the client for `requests` round trips with
    /// perf counting the relay threads, and tears it down.
    fn run(model: Model, threads: usize, requests: u64) -> Run {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let echo_addr = echo.local_addr().expect("echo address");
        std::thread::spawn(move || echo_loop(echo));
        let entry = TcpListener::bind("127.0.0.1:0").expect("bind entry");
        let entry_addr = entry.local_addr().expect("entry address");
        let (tids, relay_tids) = mpsc::channel();
        start_relays(model, threads, entry, echo_addr, tids);
        let mut client = TcpStream::connect(entry_addr).expect("connect entry");
        client.set_nodelay(true).expect("nodelay");
        let relay_tids: Vec<i32> = (0..threads)
            .map(|_| relay_tids.recv().expect("relay thread"))
            .collect();
        // Warm up, so that perf sees only the steady state.
        let mut message = [7u8; MESSAGE];
        for _ in 0..1000 {
            round_trip(&mut client, &mut message);
        }
        let perf = Perf::attach(&relay_tids);
        let started = Instant::now();
        for _ in 0..requests {
            round_trip(&mut client, &mut message);
        }
        let elapsed = started.elapsed();
        let (syscalls, cpu_ms) = perf.finish();
        let _ = client.shutdown(Shutdown::Both);
        Run {
            syscalls,
            cpu_ms,
            round_trip: elapsed / requests as u32,
        }
    }

    fn round_trip(client: &mut TcpStream, message: &mut [u8; MESSAGE]) {
        client.write_all(message).expect("request");
        client.read_exact(message).expect("response");
    }

    fn echo_loop(listener: TcpListener) {
        let (mut socket, _) = listener.accept().expect("accept at echo");
        socket.set_nodelay(true).expect("nodelay");
        let mut message = [0u8; MESSAGE];
        while socket.read_exact(&mut message).is_ok() {
            if socket.write_all(&message).is_err() {
                return;
            }
        }
    }

    /// Connects A, B–B' and C, and starts the relays on `threads` threads;
    /// each relay thread sends its thread id once it runs.
    fn start_relays(
        model: Model,
        threads: usize,
        entry: TcpListener,
        echo: SocketAddr,
        tids: mpsc::Sender<i32>,
    ) {
        let middle = TcpListener::bind("127.0.0.1:0").expect("bind middle");
        let b = TcpStream::connect(middle.local_addr().expect("middle address"))
            .expect("connect middle");
        let (b2, _) = middle.accept().expect("accept middle");
        let c = TcpStream::connect(echo).expect("connect echo");
        std::thread::spawn(move || {
            let (a, _) = entry.accept().expect("accept entry");
            let pairs = vec![(a, b), (b2, c)];
            if threads == 1 {
                relay_thread(model, pairs, tids);
            } else {
                for pair in pairs {
                    let tids = tids.clone();
                    std::thread::spawn(move || relay_thread(model, vec![pair], tids));
                }
            }
        });
    }

    fn relay_thread(model: Model, pairs: Vec<(TcpStream, TcpStream)>, tids: mpsc::Sender<i32>) {
        for (x, y) in &pairs {
            for socket in [x, y] {
                socket.set_nodelay(true).expect("nodelay");
            }
        }
        // SAFETY: gettid has no preconditions.
        let _ = tids.send(unsafe { libc::gettid() });
        match model {
            Model::Readiness => tokio_relays(pairs, false),
            Model::Hybrid => tokio_relays(pairs, true),
            Model::Completion => completion_loop(pairs),
        }
    }

    fn tokio_relays(pairs: Vec<(TcpStream, TcpStream)>, hybrid: bool) {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        if hybrid {
            builder
                .on_thread_park(Ring::before_park)
                .on_thread_unpark(Ring::after_unpark);
        }
        let runtime = builder.build().expect("runtime");
        runtime.block_on(async move {
            if hybrid {
                Ring::install(true);
                tokio::spawn(Ring::reap_on_eventfd());
                tokio::spawn(Ring::submit_after_each_turn());
            }
            let mut relays = Vec::new();
            for (x, y) in pairs {
                relays.push(if hybrid {
                    tokio::spawn(async move {
                        let (mut x, mut y) = (UringTcp::new(x), UringTcp::new(y));
                        let _ = tokio::io::copy_bidirectional(&mut x, &mut y).await;
                    })
                } else {
                    tokio::spawn(async move {
                        let tokio_stream = |s: TcpStream| {
                            s.set_nonblocking(true).expect("nonblocking");
                            tokio::net::TcpStream::from_std(s).expect("tokio stream")
                        };
                        let (mut x, mut y) = (tokio_stream(x), tokio_stream(y));
                        let _ = tokio::io::copy_bidirectional(&mut x, &mut y).await;
                    })
                });
            }
            for relay in relays {
                let _ = relay.await;
            }
        });
    }

    /// The completion model: poll the woken relays, then one
    /// `io_uring_enter` that submits what they queued and waits.
    fn completion_loop(pairs: Vec<(TcpStream, TcpStream)>) {
        struct Woken(AtomicBool);
        impl Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        type Relay = Pin<Box<dyn Future<Output = ()>>>;
        Ring::install(false);
        let mut relays: Vec<(Relay, Arc<Woken>)> = pairs
            .into_iter()
            .map(|(x, y)| {
                let relay: Relay = Box::pin(async move {
                    let (mut x, mut y) = (UringTcp::new(x), UringTcp::new(y));
                    let _ = tokio::io::copy_bidirectional(&mut x, &mut y).await;
                });
                (relay, Arc::new(Woken(AtomicBool::new(true))))
            })
            .collect();
        while !relays.is_empty() {
            relays.retain_mut(|(relay, woken)| {
                if !woken.0.swap(false, Ordering::Relaxed) {
                    return true;
                }
                let waker = Waker::from(woken.clone());
                relay
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            });
            if relays
                .iter()
                .any(|(_, woken)| woken.0.load(Ordering::Relaxed))
            {
                continue;
            }
            Ring::with(|ring| ring.enter(1));
        }
    }

    /// One operation in flight: its result once it completed, and whom to
    /// wake. A buffer left behind by a dropped socket lives here until the
    /// kernel is done with it.
    #[derive(Default)]
    struct Operation {
        result: Option<i32>,
        waker: Option<Waker>,
        orphaned: Option<Vec<u8>>,
    }

    /// The thread's io_uring and the operations in flight on it.
    struct Ring {
        ring: IoUring,
        operations: Vec<Operation>,
        free: Vec<usize>,
        /// Entries queued since the last submission.
        queued: usize,
        /// The task that submits the queue (hybrid model).
        submitter: Option<Waker>,
        /// The task that reaps after an eventfd wake (hybrid model).
        reaper: Option<Waker>,
        /// Set when the reaper must run without an eventfd wake.
        reap_now: bool,
        /// Until the reaper takes it (hybrid model).
        eventfd: Option<OwnedFd>,
    }

    /// `IORING_RECVSEND_POLL_FIRST`: a receive posted ahead finds no data
    /// yet, so it waits for readiness without trying to read first.
    const RECVSEND_POLL_FIRST: u16 = 1;

    /// `user_data` of entries whose completion nobody awaits.
    const IGNORED: u64 = u64::MAX;

    thread_local! {
        static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
    }

    impl Ring {
        /// Sets up this thread's ring; with `eventfd`, one that wakes epoll.
        fn install(eventfd: bool) {
            let ring = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(256)
                .expect("io_uring (is it enabled? /proc/sys/kernel/io_uring_disabled)");
            let eventfd = eventfd.then(|| {
                // SAFETY: plain syscall; the fd is checked below.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
                ring.submitter()
                    .register_eventfd(fd)
                    .expect("register eventfd");
                // SAFETY: a fresh fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            });
            RING.with(|slot| {
                *slot.borrow_mut() = Some(Ring {
                    ring,
                    operations: Vec::new(),
                    free: Vec::new(),
                    queued: 0,
                    submitter: None,
                    reaper: None,
                    reap_now: false,
                    eventfd,
                })
            });
        }

        fn with<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
            RING.with(|slot| {
                f(slot
                    .borrow_mut()
                    .as_mut()
                    .expect("no io_uring on this thread"))
            })
        }

        /// Queues `entry`; returns the operation's index.
        fn push(&mut self, entry: squeue::Entry) -> usize {
            let index = self.free.pop().unwrap_or_else(|| {
                self.operations.push(Operation::default());
                self.operations.len() - 1
            });
            self.operations[index] = Operation::default();
            self.queue(entry.user_data(index as u64));
            index
        }

        fn queue(&mut self, entry: squeue::Entry) {
            // SAFETY: every buffer an entry points at is owned by a socket
            // or by an orphaned operation until its completion is reaped.
            while unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.enter(0);
            }
            self.queued += 1;
            if let Some(submitter) = self.submitter.take() {
                submitter.wake();
            }
        }

        /// Submits the queue, runs deferred completions, waits for `wait`
        /// completions, and wakes their tasks.
        fn enter(&mut self, wait: u32) {
            let queued = self.ring.submission().len() as u32;
            self.queued = 0;
            // SAFETY: no argument struct is passed.
            let entered = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(queued, wait, GETEVENTS, None)
            };
            match entered {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            let completed: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (index, result) in completed {
                if index == IGNORED {
                    continue;
                }
                let index = index as usize;
                let operation = &mut self.operations[index];
                if operation.orphaned.take().is_some() {
                    self.free.push(index);
                } else {
                    operation.result = Some(result);
                    if let Some(waker) = operation.waker.take() {
                        waker.wake();
                    }
                }
            }
        }

        /// The operation's result, once; until then, wakes the caller on
        /// completion.
        fn poll(&mut self, index: usize, cx: &mut Context<'_>) -> Poll<i32> {
            match self.operations[index].result.take() {
                Some(result) => {
                    self.free.push(index);
                    Poll::Ready(result)
                }
                None => {
                    self.operations[index].waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }

        /// Hybrid model: runs after the tasks woken in a turn (it was woken
        /// by the first entry they queued), submits them all at once.
        async fn submit_after_each_turn() {
            loop {
                std::future::poll_fn(|cx| {
                    Ring::with(|ring| {
                        if ring.queued > 0 {
                            Poll::Ready(())
                        } else {
                            ring.submitter = Some(cx.waker().clone());
                            Poll::Pending
                        }
                    })
                })
                .await;
                Ring::with(|ring| ring.enter(0));
            }
        }

        /// Hybrid model: the ring's eventfd in tokio's epoll; each wake runs
        /// the completions the kernel deferred to this thread.
        async fn reap_on_eventfd() {
            let eventfd = Ring::with(|ring| ring.eventfd.take()).expect("eventfd");
            // SAFETY: the AsyncFd owns the eventfd, so it stays open while
            // registered.
            let eventfd = unsafe { AsyncFd::register(eventfd) }.expect("eventfd in epoll");
            loop {
                std::future::poll_fn(|cx| {
                    Ring::with(|ring| ring.reaper = Some(cx.waker().clone()));
                    match eventfd.poll_read_ready(cx) {
                        Poll::Ready(ready) => {
                            ready.expect("eventfd readiness").clear_ready();
                            Poll::Ready(())
                        }
                        Poll::Pending => Ring::with(|ring| {
                            if std::mem::take(&mut ring.reap_now) {
                                Poll::Ready(())
                            } else {
                                Poll::Pending
                            }
                        }),
                    }
                })
                .await;
                Ring::with(|ring| ring.enter(0));
            }
        }

        /// Hybrid model, before tokio sleeps in epoll: let the eventfd wake
        /// it, unless work is already there (then reap instead of sleeping).
        fn before_park() {
            RING.with(|slot| {
                let mut slot = slot.borrow_mut();
                let Some(ring) = slot.as_mut() else { return };
                ring.ring.completion().enable_eventfd();
                if ring.queued > 0
                    || ring.ring.submission().taskrun()
                    || !ring.ring.completion().is_empty()
                {
                    ring.reap_now = true;
                    if let Some(reaper) = ring.reaper.take() {
                        reaper.wake();
                    }
                }
            });
        }

        /// Hybrid model: while the thread runs, completions need no eventfd
        /// wake (the submitter reaps them).
        fn after_unpark() {
            RING.with(|slot| {
                if let Some(ring) = slot.borrow_mut().as_mut() {
                    ring.ring.completion().disable_eventfd();
                }
            });
        }
    }

    /// A TCP socket read and written through the thread's io_uring: a
    /// receive is always posted ahead while the reader has drained what
    /// came, and writes are queued (their errors show on the next write or
    /// flush).
    struct UringTcp {
        socket: TcpStream,
        received: Vec<u8>,
        read_from: usize,
        read_to: usize,
        receive: Option<usize>,
        eof: bool,
        sending: Vec<u8>,
        sent: usize,
        send: Option<usize>,
    }

    impl UringTcp {
        fn new(socket: TcpStream) -> UringTcp {
            UringTcp {
                socket,
                received: vec![0; BUFFER],
                read_from: 0,
                read_to: 0,
                receive: None,
                eof: false,
                sending: Vec::with_capacity(BUFFER),
                sent: 0,
                send: None,
            }
        }

        fn fd(&self) -> types::Fd {
            types::Fd(self.socket.as_raw_fd())
        }

        fn post_receive(&mut self, ring: &mut Ring) {
            let entry = opcode::Recv::new(self.fd(), self.received.as_mut_ptr(), BUFFER as u32)
                .ioprio(RECVSEND_POLL_FIRST)
                .build();
            self.receive = Some(ring.push(entry));
        }

        fn post_send(&mut self, ring: &mut Ring) {
            let rest = &self.sending[self.sent..];
            let entry = opcode::Send::new(self.fd(), rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            self.send = Some(ring.push(entry));
        }

        /// Ready once everything queued has been sent.
        fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Ring::with(|ring| {
                while let Some(index) = self.send {
                    let sent = std::task::ready!(ring.poll(index, cx));
                    self.send = None;
                    if sent < 0 {
                        return Poll::Ready(Err(io::Error::from_raw_os_error(-sent)));
                    }
                    self.sent += sent as usize;
                    if self.sent < self.sending.len() {
                        self.post_send(ring);
                    } else {
                        self.sending.clear();
                        self.sent = 0;
                    }
                }
                Poll::Ready(Ok(()))
            })
        }
    }

    impl AsyncRead for UringTcp {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            if this.read_from == this.read_to && !this.eof {
                let received = Ring::with(|ring| {
                    if this.receive.is_none() {
                        this.post_receive(ring);
                    }
                    ring.poll(this.receive.expect("posted"), cx)
                });
                let received = std::task::ready!(received);
                this.receive = None;
                if received < 0 {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-received)));
                }
                this.eof = received == 0;
                this.read_from = 0;
                this.read_to = received as usize;
            }
            let n = (this.read_to - this.read_from).min(buf.remaining());
            buf.put_slice(&this.received[this.read_from..this.read_from + n]);
            this.read_from += n;
            if this.read_from == this.read_to && !this.eof {
                Ring::with(|ring| this.post_receive(ring));
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for UringTcp {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            std::task::ready!(this.poll_sent(cx))?;
            let n = buf.len().min(BUFFER);
            this.sending.extend_from_slice(&buf[..n]);
            Ring::with(|ring| this.post_send(ring));
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_sent(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            std::task::ready!(self.poll_sent(cx))?;
            Poll::Ready(self.socket.shutdown(Shutdown::Write))
        }
    }

    impl Drop for UringTcp {
        /// Hands buffers still in the kernel's hands to their operations
        /// and cancels the receive.
        fn drop(&mut self) {
            let receive = self.receive.take();
            let send = self.send.take();
            if receive.is_none() && send.is_none() {
                return;
            }
            Ring::with(|ring| {
                if let Some(index) = receive {
                    ring.operations[index].orphaned = Some(std::mem::take(&mut self.received));
                    ring.queue(
                        opcode::AsyncCancel::new(index as u64)
                            .build()
                            .user_data(IGNORED),
                    );
                }
                if let Some(index) = send {
                    ring.operations[index].orphaned = Some(std::mem::take(&mut self.sending));
                }
            });
        }
    }

    /// `perf stat` on the relay threads: syscall entries and task-clock.
    struct Perf {
        child: std::process::Child,
    }

    impl Perf {
        fn attach(tids: &[i32]) -> Perf {
            let tids: Vec<String> = tids.iter().map(i32::to_string).collect();
            let child = Command::new("perf")
                .args([
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    "raw_syscalls:sys_enter,task-clock",
                    "-t",
                ])
                .arg(tids.join(","))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("perf (install linux-perf)");
            // perf needs a moment to open its counters.
            std::thread::sleep(Duration::from_millis(300));
            Perf { child }
        }

        /// Stops perf; returns (syscalls, task-clock ms).
        fn finish(self) -> (u64, f64) {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let output = self.child.wait_with_output().expect("perf output");
            let text = String::from_utf8_lossy(&output.stderr);
            let field = |event: &str| -> f64 {
                text.lines()
                    .find(|line| line.contains(event))
                    .and_then(|line| line.split(',').next())
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_else(|| panic!("perf did not count {event}: {text}"))
            };
            (field("raw_syscalls:sys_enter") as u64, field("task-clock"))
        }
    }
}
