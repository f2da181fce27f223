//! How many syscalls a relay needs per 1 KiB request/response under three
//! I/O models, measured on a bare four-socket chain with no TLS and no
//! HTTP/2, so that only the I/O model differs:
//!
//! ```text
//! client ─A─ relay ─B══B'─ relay ─C─ echo
//! ```
//!
//! Each relay moves bytes both ways between its two sockets, copying
//! nothing in user space: it receives into a buffer and sends from it. The
//! client (a blocking thread) sends 1 KiB and waits for the echo, again and
//! again; the echo is a blocking thread too. Only the relay threads are
//! counted, in two passes over the same chain: one without any counter
//! attached, timed, for CPU (`/proc/self/task/TID/schedstat`) and the round
//! trip; one under `perf stat -e raw_syscalls:sys_enter` for syscalls (the
//! tracepoint slows every syscall, so it stays out of the timed pass).
//!
//! The models:
//! - `readiness`: tokio's own `TcpStream` (`copy_bidirectional`: epoll,
//!   then `recv`/`send`), as hbone and ztunnel do.
//! - `hybrid`: tokio's current-thread runtime still parks in `epoll_wait`,
//!   but the sockets are read and written through io_uring: operations are
//!   queued, and a task submits the queue once the tasks woken in a turn
//!   have run. The ring is set up with `DEFER_TASKRUN`; an eventfd
//!   (disabled while the thread runs) wakes epoll when the ring has work.
//! - `completion`: no tokio runtime at all; a loop whose only wait is
//!   `io_uring_enter`, submitting everything queued and waiting for one
//!   completion in the same call.
//!
//! Each model runs with both relays on one thread (as `hbone run` holds an
//! entry and a server in one process, and the hop B→B' completes within the
//! thread) and with one thread per relay (as when the entry and the server
//! are two processes or two hosts).
//!
//! `cargo run --release -p hbone-bench --example io_models [REQUESTS] [RUNS]`
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
    use std::sync::atomic::{AtomicBool, Ordering, fence};
    use std::sync::mpsc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::{Duration, Instant};

    use io_uring::{IoUring, opcode, squeue, types};
    use tokio::io::unix::AsyncFd;

    /// What one receive asks of the kernel.
    const BUFFER: usize = 64 * 1024;
    /// The size of one request and of its response.
    const MESSAGE: usize = 1024;
    /// Round trips before each pass, left uncounted.
    const WARM_UP: u32 = 1000;
    /// `IORING_ENTER_GETEVENTS`: run deferred completions, reap, wait.
    const GETEVENTS: u32 = 1;
    /// `IORING_RECVSEND_POLL_FIRST`: the relay posts a receive before the
    /// data it waits for can exist, so it waits for readiness without
    /// trying to read first.
    const RECVSEND_POLL_FIRST: u16 = 1;
    /// `user_data` of entries whose completion nobody awaits.
    const IGNORED: u64 = u64::MAX;

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
        let mut number = |default: u32| {
            args.next()
                .map(|n| n.parse().expect("REQUESTS and RUNS are numbers"))
                .unwrap_or(default)
                .max(1)
        };
        let requests = number(20_000);
        let runs = number(5);
        println!(
            "{requests} requests of {MESSAGE} bytes per pass, medians of {runs} runs; \
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
        let per_request = f64::from(requests);
        for (&(model, threads), runs) in layouts.iter().zip(&results) {
            let figures = |figure: fn(&Run) -> f64| {
                let mut figures: Vec<f64> = runs.iter().map(figure).collect();
                figures.sort_by(f64::total_cmp);
                figures
            };
            let median = |figure| figures(figure)[runs.len() / 2];
            let cpu = figures(|run| run.cpu.as_secs_f64());
            println!(
                "| {} | {} | {:.2} | {:.1} ({:.1}–{:.1}) | {:.1} |",
                model.name(),
                if threads == 1 {
                    "both on one thread"
                } else {
                    "one thread each"
                },
                median(|run| run.syscalls as f64) / per_request,
                cpu[runs.len() / 2] * 1e6 / per_request,
                cpu[0] * 1e6 / per_request,
                cpu[runs.len() - 1] * 1e6 / per_request,
                median(|run| run.round_trip.as_secs_f64()) * 1e6,
            );
        }
    }

    struct Run {
        syscalls: u64,
        cpu: Duration,
        round_trip: Duration,
    }

    /// Builds the chain, runs the timed pass and the counted pass of
    /// `requests` round trips each, and tears the chain down.
    fn run(model: Model, threads: usize, requests: u32) -> Run {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let echo_addr = echo.local_addr().expect("echo address");
        let echo = std::thread::spawn(move || echo_loop(echo));
        let entry = TcpListener::bind("127.0.0.1:0").expect("bind entry");
        let entry_addr = entry.local_addr().expect("entry address");
        // Connected before the relays start: they accept it first.
        let mut client = TcpStream::connect(entry_addr).expect("connect entry");
        client.set_nodelay(true).expect("nodelay");
        let (tids, relay_tids) = mpsc::channel();
        let relays = start_relays(model, threads, entry, echo_addr, tids);
        let relay_tids: Vec<i32> = (0..threads)
            .map(|_| relay_tids.recv().expect("relay thread"))
            .collect();
        let mut message = [7u8; MESSAGE];
        let mut round_trips = |count: u32| {
            for _ in 0..count {
                client.write_all(&message).expect("request");
                client.read_exact(&mut message).expect("response");
            }
        };

        round_trips(WARM_UP);
        let cpu_before = cpu_time(&relay_tids);
        let started = Instant::now();
        round_trips(requests);
        let round_trip = started.elapsed() / requests;
        let cpu = cpu_time(&relay_tids) - cpu_before;

        round_trips(WARM_UP);
        let perf = Perf::attach(&relay_tids);
        round_trips(requests);
        let syscalls = perf.finish();
        // Every relay thread waits for each request at least once.
        assert!(
            syscalls >= u64::from(requests) * threads as u64,
            "perf counted {syscalls} syscalls for {requests} requests: was it attached in time?"
        );

        let _ = client.shutdown(Shutdown::Both);
        for relay in relays {
            relay.join().expect("relay thread");
        }
        echo.join().expect("echo thread");
        Run {
            syscalls,
            cpu,
            round_trip,
        }
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

    /// The CPU time the threads ran, summed (schedstat's first field).
    fn cpu_time(tids: &[i32]) -> Duration {
        tids.iter()
            .map(|tid| {
                let path = format!("/proc/self/task/{tid}/schedstat");
                let stat = std::fs::read_to_string(&path).expect("schedstat");
                let nanos = stat.split_whitespace().next().and_then(|n| n.parse().ok());
                Duration::from_nanos(nanos.expect("schedstat's run time"))
            })
            .sum()
    }

    /// Connects A, B–B' and C, and starts the relays on `threads` threads;
    /// each relay thread sends its thread id once it runs. Returns the
    /// threads, which end when the client's connection closes.
    fn start_relays(
        model: Model,
        threads: usize,
        entry: TcpListener,
        echo: SocketAddr,
        tids: mpsc::Sender<i32>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let middle = TcpListener::bind("127.0.0.1:0").expect("bind middle");
        let b = TcpStream::connect(middle.local_addr().expect("middle address"))
            .expect("connect middle");
        let (b2, _) = middle.accept().expect("accept middle");
        let c = TcpStream::connect(echo).expect("connect echo");
        let (a, _) = entry.accept().expect("accept entry");
        let pairs = vec![(a, b), (b2, c)];
        if threads == 1 {
            vec![std::thread::spawn(move || relay_thread(model, pairs, tids))]
        } else {
            pairs
                .into_iter()
                .map(|pair| {
                    let tids = tids.clone();
                    std::thread::spawn(move || relay_thread(model, vec![pair], tids))
                })
                .collect()
        }
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
                if hybrid {
                    let (x, y) = (Arc::new(x), Arc::new(y));
                    relays.push(tokio::spawn(pump(x.clone(), y.clone())));
                    relays.push(tokio::spawn(pump(y, x)));
                } else {
                    relays.push(tokio::spawn(async move {
                        let tokio_stream = |s: TcpStream| {
                            s.set_nonblocking(true).expect("nonblocking");
                            tokio::net::TcpStream::from_std(s).expect("tokio stream")
                        };
                        let (mut x, mut y) = (tokio_stream(x), tokio_stream(y));
                        let _ = tokio::io::copy_bidirectional(&mut x, &mut y).await;
                    }));
                }
            }
            for relay in relays {
                let _ = relay.await;
            }
        });
    }

    /// The completion model: poll the woken pumps, then one
    /// `io_uring_enter` that submits what they queued and waits.
    fn completion_loop(pairs: Vec<(TcpStream, TcpStream)>) {
        struct Woken(AtomicBool);
        impl Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        type Pump = Pin<Box<dyn Future<Output = ()>>>;
        Ring::install(false);
        let mut pumps: Vec<(Pump, Arc<Woken>)> = Vec::new();
        for (x, y) in pairs {
            let (x, y) = (Arc::new(x), Arc::new(y));
            for pump in [pump(x.clone(), y.clone()), pump(y, x)] {
                pumps.push((Box::pin(pump), Arc::new(Woken(AtomicBool::new(true)))));
            }
        }
        loop {
            pumps.retain_mut(|(pump, woken)| {
                if !woken.0.swap(false, Ordering::Relaxed) {
                    return true;
                }
                let waker = Waker::from(woken.clone());
                pump.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            });
            if pumps.is_empty() {
                return;
            }
            if pumps
                .iter()
                .any(|(_, woken)| woken.0.load(Ordering::Relaxed))
            {
                continue;
            }
            Ring::with(|ring| ring.enter(1));
        }
    }

    /// Moves what arrives on `from` to `to` until `from` ends. Two
    /// buffers take turns: while one is sent from, the next receive is
    /// already posted into the other (queued with the send, so one
    /// submission carries both), and nothing is copied in user space.
    async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>) {
        let mut spare = vec![0; BUFFER];
        let mut receiving = Operation::receive(&from, vec![0; BUFFER]);
        loop {
            let (received, mut buffer) = (&mut receiving).await;
            let Ok(end @ 1..) = usize::try_from(received) else {
                break;
            };
            receiving = Operation::receive(&from, spare);
            let mut sent = 0;
            while sent < end {
                let (result, returned) = Operation::send(&to, buffer, sent..end).await;
                buffer = returned;
                let Ok(n @ 1..) = usize::try_from(result) else {
                    return;
                };
                sent += n;
            }
            spare = buffer;
        }
        let _ = to.shutdown(Shutdown::Write);
    }

    /// An operation in flight as a future: it owns its buffer (and a handle
    /// on its socket) until the kernel has completed it, and yields the
    /// result with the buffer.
    struct Operation {
        index: usize,
        parts: Option<(Vec<u8>, Arc<TcpStream>)>,
    }

    impl Operation {
        fn receive(socket: &Arc<TcpStream>, mut buffer: Vec<u8>) -> Operation {
            let fd = types::Fd(socket.as_raw_fd());
            let entry = opcode::Recv::new(fd, buffer.as_mut_ptr(), buffer.len() as u32)
                .ioprio(RECVSEND_POLL_FIRST)
                .build();
            Operation::start(entry, buffer, socket)
        }

        fn send(
            socket: &Arc<TcpStream>,
            buffer: Vec<u8>,
            range: std::ops::Range<usize>,
        ) -> Operation {
            let fd = types::Fd(socket.as_raw_fd());
            let bytes = &buffer[range];
            let entry = opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            Operation::start(entry, buffer, socket)
        }

        fn start(entry: squeue::Entry, buffer: Vec<u8>, socket: &Arc<TcpStream>) -> Operation {
            Operation {
                index: Ring::with(|ring| ring.push(entry)),
                parts: Some((buffer, socket.clone())),
            }
        }
    }

    impl Future for Operation {
        type Output = (i32, Vec<u8>);

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let result = std::task::ready!(Ring::with(|ring| ring.poll(self.index, cx)));
            let (buffer, _) = self.parts.take().expect("polled after completion");
            Poll::Ready((result, buffer))
        }
    }

    impl Drop for Operation {
        /// Dropped before completion: the buffer and the socket stay with the
        /// ring until the kernel lets go of them.
        fn drop(&mut self) {
            if let Some(parts) = self.parts.take() {
                Ring::with(|ring| ring.abandon(self.index, parts));
            }
        }
    }

    /// One operation's slot: its result once it completed, whom to wake,
    /// and what an abandoned operation leaves for the kernel.
    #[derive(Default)]
    struct Slot {
        result: Option<i32>,
        waker: Option<Waker>,
        abandoned: Option<(Vec<u8>, Arc<TcpStream>)>,
    }

    /// The thread's io_uring and the operations in flight on it.
    struct Ring {
        /// Declared first, so dropped first: closing the ring ends what is
        /// in flight before `slots` frees abandoned buffers.
        ring: IoUring,
        slots: Vec<Slot>,
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
                    slots: Vec::new(),
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

        /// Queues `entry`; returns its slot.
        fn push(&mut self, entry: squeue::Entry) -> usize {
            let index = self.free.pop().unwrap_or_else(|| {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            });
            self.queue(entry.user_data(index as u64));
            index
        }

        fn queue(&mut self, entry: squeue::Entry) {
            // SAFETY: every buffer an entry points at is owned by its
            // operation, or by its slot once abandoned, until its completion
            // is reaped.
            while unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.enter(0);
            }
            self.queued += 1;
            if let Some(submitter) = self.submitter.take() {
                submitter.wake();
            }
        }

        /// Submits the queue, runs deferred completions, waits for `wait`
        /// completions, and wakes their operations.
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
                let slot = &mut self.slots[index];
                if slot.abandoned.take().is_some() {
                    self.free.push(index);
                } else {
                    slot.result = Some(result);
                    if let Some(waker) = slot.waker.take() {
                        waker.wake();
                    }
                }
            }
        }

        /// The operation's result, once; until then, wakes the caller on
        /// completion.
        fn poll(&mut self, index: usize, cx: &mut Context<'_>) -> Poll<i32> {
            let slot = &mut self.slots[index];
            match slot.result.take() {
                Some(result) => {
                    *slot = Slot::default();
                    self.free.push(index);
                    Poll::Ready(result)
                }
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }

        /// An operation dropped before it yielded: free its slot if the
        /// kernel is done with it, else keep what it used and cancel it.
        fn abandon(&mut self, index: usize, parts: (Vec<u8>, Arc<TcpStream>)) {
            let slot = &mut self.slots[index];
            if slot.result.is_some() {
                *slot = Slot::default();
                self.free.push(index);
                return;
            }
            *slot = Slot {
                abandoned: Some(parts),
                ..Slot::default()
            };
            self.queue(
                opcode::AsyncCancel::new(index as u64)
                    .build()
                    .user_data(IGNORED),
            );
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
        /// it, unless work is already there (then reap instead of sleeping;
        /// tokio checks for woken tasks after this hook).
        fn before_park() {
            RING.with(|slot| {
                let mut slot = slot.borrow_mut();
                let Some(ring) = slot.as_mut() else { return };
                ring.ring.completion().enable_eventfd();
                // The enable must be visible to the kernel before the flags
                // below are read, or work it deferred in between is missed.
                fence(Ordering::SeqCst);
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

    /// `perf stat` counting the syscall entries of the relay threads.
    struct Perf {
        child: std::process::Child,
    }

    impl Perf {
        fn attach(tids: &[i32]) -> Perf {
            let tids: Vec<String> = tids.iter().map(i32::to_string).collect();
            let child = Command::new("perf")
                .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-t"])
                .arg(tids.join(","))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("perf (install linux-perf)");
            // perf needs a moment to open its counters; `run` checks the
            // count it reports.
            std::thread::sleep(Duration::from_millis(300));
            Perf { child }
        }

        /// Stops perf; returns the syscalls it counted.
        fn finish(self) -> u64 {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let output = self.child.wait_with_output().expect("perf output");
            let text = String::from_utf8_lossy(&output.stderr);
            text.lines()
                .find(|line| line.contains("raw_syscalls:sys_enter"))
                .and_then(|line| line.split(',').next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("perf did not count syscalls: {text}"))
        }
    }
}
