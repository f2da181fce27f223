//! Worker-per-core scheduling: N threads, each running its own
//! single-threaded runtime, so that a connection handed to one worker
//! keeps everything it spawns (its HTTP/2 driver, tunnels, target dials,
//! relays) on that thread. A tunnel's relay and its connection then wake
//! each other without crossing threads, which a work-stealing runtime
//! cannot promise. On Linux each worker is pinned to one of the CPUs the
//! process may use, and the listeners bound for it ask for the connections
//! that arrive on that CPU (SO_INCOMING_CPU).
//!
//! A worker runs its tasks one at a time, so a tunnel on a worker that
//! carries bulk waits behind a bulk turn (a large read sealed and
//! written) at every hop. Each worker therefore counts the tunnels it
//! carries that move bulk (until they go quiet for a second), and a
//! connection accepted on a worker that carries more of
//! them than another worker does moves to the one carrying fewest
//! (`Workers::place`): interactive tunnels opened during a transfer land
//! beside no bulk where a worker without it exists.
//!
//! A server's connections also leave a worker that has been saturated
//! of late for the one running fewest tasks (`Workers::place_handshake`):
//! each starts with a TLS handshake, and where they all arrive on one CPU
//! (a network card with one queue, one client thread on loopback) that
//! CPU's worker would otherwise make every handshake alone.
//!
//! Give a [`Workers`] to a server with
//! [`ServerConfig::with_workers`](crate::ServerConfig::with_workers), and
//! to a dialer with
//! [`DialerConfig::with_workers`](crate::DialerConfig::with_workers): the
//! entries built on that dialer then serve each application connection on
//! a worker, and its tunnel rides a connection of that worker's own.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;

mod busy;

/// A set of worker threads, each with a current-thread runtime. Cheap to
/// clone; the threads stop when the last clone is dropped or at
/// [`Workers::shutdown`].
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    /// The zero of the clock busy shares are sampled on.
    started: std::time::Instant,
    /// What each worker carries, for placing new connections.
    loads: Vec<Arc<Load>>,
    /// The CPU each worker is pinned to, where it could be.
    cpus: Vec<Option<usize>>,
    /// The next worker [`Workers::spawn`] picks.
    next: AtomicUsize,
    /// Flips to true to stop every worker.
    stop: watch::Sender<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Numbers worker threads across every [`Workers`] of the process.
static NEXT_WORKER_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's worker number, if it is a worker.
    static WORKER_ID: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// This thread's load, if it is a worker.
    static WORKER_LOAD: std::cell::OnceCell<Arc<Load>> = const { std::cell::OnceCell::new() };
}

/// What a worker carries that new connections should avoid.
#[derive(Default)]
struct Load {
    /// Tunnels on this worker that have moved bulk ([`BulkMark`]).
    bulk: AtomicUsize,
    /// How much of late the worker spent running tasks.
    busy: busy::BusyShare,
}

/// Counts one bulk tunnel against the worker it was made on, until
/// dropped (with the tunnel).
pub(crate) struct BulkMark(Arc<Load>);

impl Drop for BulkMark {
    fn drop(&mut self) {
        self.0.bulk.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a tunnel on this thread as carrying bulk; `None` off the workers,
/// where nothing places connections by it.
fn mark_bulk() -> Option<BulkMark> {
    WORKER_LOAD.with(|load| {
        let load = load.get()?;
        load.bulk.fetch_add(1, Ordering::Relaxed);
        Some(BulkMark(load.clone()))
    })
}

/// A tunnel that has moved no bulk turn for this long stops counting as
/// bulk on its worker: a transfer that ended on a connection kept open (a
/// database session after a large result) no longer steers new
/// connections away from a worker that is in fact idle.
const BULK_QUIET: Duration = Duration::from_secs(1);

/// Whether a tunnel counts as bulk on its worker ([`BulkMark`]): from its
/// first bulk turn until it has moved none for [`BULK_QUIET`]. One timer
/// per bulk tunnel, re-armed at most once per [`BULK_QUIET`], however
/// many turns it moves.
#[derive(Default)]
pub(crate) enum BulkTracker {
    /// No bulk lately.
    #[default]
    Quiet,
    /// Moves bulk, counted against this worker.
    Marked(Box<Held>),
    /// Not on a worker: nothing places connections by it, so nothing is
    /// tracked.
    OffWorker,
}

/// The mark of a tunnel that moves bulk, with when it last did.
pub(crate) struct Held {
    _mark: BulkMark,
    last_bulk: tokio::time::Instant,
    /// Fires no earlier than `last_bulk` + [`BULK_QUIET`].
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl BulkTracker {
    /// The tunnel moved a bulk turn on this thread.
    pub(crate) fn moved_bulk(&mut self) {
        match self {
            BulkTracker::Marked(held) => held.last_bulk = tokio::time::Instant::now(),
            BulkTracker::OffWorker => {}
            BulkTracker::Quiet => {
                *self = match mark_bulk() {
                    Some(mark) => {
                        let now = tokio::time::Instant::now();
                        BulkTracker::Marked(Box::new(Held {
                            _mark: mark,
                            last_bulk: now,
                            quiet: Box::pin(tokio::time::sleep_until(now + BULK_QUIET)),
                        }))
                    }
                    None => BulkTracker::OffWorker,
                }
            }
        }
    }

    /// Drops the mark once the tunnel has moved no bulk for
    /// [`BULK_QUIET`]; until then, has `cx` woken when it may have. Call
    /// on every poll of the tunnel, after [`BulkTracker::moved_bulk`].
    pub(crate) fn poll_quiet(&mut self, cx: &mut std::task::Context<'_>) {
        let BulkTracker::Marked(held) = self else {
            return;
        };
        loop {
            if held.quiet.as_mut().poll(cx).is_pending() {
                return;
            }
            let due = held.last_bulk + BULK_QUIET;
            if held.quiet.deadline() >= due {
                *self = BulkTracker::Quiet;
                return;
            }
            held.quiet.as_mut().reset(due);
        }
    }

    /// Whether the tunnel counts as bulk on its worker now.
    #[cfg(test)]
    fn is_marked(&self) -> bool {
        matches!(self, BulkTracker::Marked(_))
    }
}

/// The worker this code runs on (a number unique in the process), or
/// `None` off the workers. The dialer's pool keeps each worker's
/// connections apart by it, so that a tunnel opened on a worker rides a
/// connection driven by the same thread.
pub(crate) fn current_worker() -> Option<usize> {
    WORKER_ID.with(std::cell::Cell::get)
}

/// The busy share (thousandths) past which a worker's new connections
/// may go to another ([`Workers::place_handshake`]).
const SATURATED: u64 = 500;

/// How many fewer tasks another worker must run to take a connection
/// from a saturated one: fewer would move connections back and forth
/// between workers that carry the same.
const SPREAD_MARGIN: usize = 2;

/// How long a stopping worker waits for its blocking tasks (name lookups)
/// before leaving them behind.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

impl Workers {
    /// Starts `count` workers (at least one), named `hbone-worker-I`.
    pub fn start(count: usize) -> io::Result<Workers> {
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        let mut cpus = Vec::new();
        let mut loads = Vec::new();
        let mut threads = Vec::new();
        let allowed = allowed_cpus();
        for index in 0..count.max(1) {
            let cpu = (!allowed.is_empty()).then(|| allowed[index % allowed.len()]);
            let (ready, started) = std::sync::mpsc::channel();
            let mut stopped = stop.subscribe();
            let load = Arc::new(Load::default());
            loads.push(load.clone());
            let thread = std::thread::Builder::new()
                .name(format!("hbone-worker-{index}"))
                .spawn(move || {
                    WORKER_ID
                        .with(|id| id.set(Some(NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed))));
                    WORKER_LOAD.with(|cell| {
                        let _ = cell.set(load);
                    });
                    let pinned = cpu.filter(|&cpu| pin_to(cpu));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok((runtime.handle().clone(), pinned)));
                    // Tasks spawned here run only while this is polled.
                    runtime.block_on(async {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                })?;
            let (handle, pinned) = started
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended before starting"))??;
            handles.push(handle);
            cpus.push(pinned);
            threads.push(thread);
        }
        Ok(Workers {
            inner: Arc::new(Inner {
                handles,
                started: std::time::Instant::now(),
                loads,
                cpus,
                next: AtomicUsize::new(0),
                stop,
                threads: Mutex::new(threads),
            }),
        })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.inner.handles.len()
    }

    /// A listener on `addr` for an entry whose dialer runs on these workers
    /// ([`DialerConfig::workers`](crate::DialerConfig::workers)): on Linux,
    /// with more than one worker, it is bound with SO_REUSEPORT, and the
    /// entry gives every worker a listener of its own beside it, so that
    /// each accepts its own connections; a single worker accepts on any
    /// listener itself; with more, any other listener is served by one
    /// accept loop that hands sockets to the workers in turn. Call it
    /// inside a Tokio runtime. Only processes of the same user can bind the
    /// port too (Linux's rule for such groups).
    pub fn bind_listener(&self, addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
        #[cfg(target_os = "linux")]
        if self.count() > 1 {
            let mut bound = crate::listeners::bind_reuseport(addr, self, 0, 1)?;
            return tokio::net::TcpListener::from_std(bound.remove(0));
        }
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// The CPU worker `index` (modulo the count) is pinned to, if any.
    pub(crate) fn cpu(&self, index: usize) -> Option<usize> {
        self.inner.cpus[index % self.inner.cpus.len()]
    }

    /// Worker `index`'s runtime (modulo the count).
    pub fn handle(&self, index: usize) -> &Handle {
        &self.inner.handles[index % self.inner.handles.len()]
    }

    /// The worker a connection should run on, given the one that accepted
    /// it (`None`: an accept loop off the workers, which takes the next in
    /// turn): that one, unless it carries more bulk tunnels than another
    /// worker does, and then the worker that carries fewest (the first of
    /// them). Moving a socket costs two `epoll_ctl` calls and a wake-up,
    /// so connections move only when they would otherwise queue behind
    /// bulk turns that another worker does not have.
    pub(crate) fn place(&self, accepted_on: Option<usize>) -> usize {
        let count = self.count();
        let here =
            accepted_on.unwrap_or_else(|| self.inner.next.fetch_add(1, Ordering::Relaxed)) % count;
        let bulk = |index: usize| self.inner.loads[index].bulk.load(Ordering::Relaxed);
        let here_bulk = bulk(here);
        if here_bulk == 0 {
            return here;
        }
        let (fewest, fewest_bulk) = (0..count)
            .map(|index| (index, bulk(index)))
            .min_by_key(|&(_, bulk)| bulk)
            .unwrap_or((here, here_bulk));
        if fewest_bulk < here_bulk {
            fewest
        } else {
            here
        }
    }

    /// The worker a new connection that opens with a TLS handshake should
    /// run on, given the one that accepted it: as [`Workers::place`]
    /// picks; but where that keeps it on the accepting worker and that
    /// worker was busy for [`SATURATED`] of each of its last two windows
    /// (10 ms or more each), the worker running the fewest tasks, if it
    /// runs [`SPREAD_MARGIN`] fewer. Connections accepted on a CPU stay on its worker (their
    /// packets are processed there) until it is saturated: where every
    /// connection arrives on one CPU (a NIC with one queue, or one client
    /// thread on loopback), the others would otherwise sit idle while
    /// handshakes queue. A handshake costs far more than the move (two
    /// `epoll_ctl` calls and a wake-up).
    pub(crate) fn place_handshake(&self, accepted_on: Option<usize>) -> usize {
        let placed = self.place(accepted_on);
        let Some(here) = accepted_on.filter(|&here| here == placed) else {
            return placed;
        };
        let now = self.inner.started.elapsed().as_nanos() as u64;
        let load = &self.inner.loads[here];
        if load.busy.permille(&self.inner.handles[here], now) < SATURATED {
            return here;
        }
        let tasks = |index: usize| self.inner.handles[index].metrics().num_alive_tasks();
        let here_tasks = tasks(here);
        let (fewest, fewest_tasks) = (0..self.count())
            .map(|index| (index, tasks(index)))
            .min_by_key(|&(_, tasks)| tasks)
            .unwrap_or((here, here_tasks));
        if fewest_tasks + SPREAD_MARGIN <= here_tasks {
            fewest
        } else {
            here
        }
    }

    /// Runs `future` on the next worker, round-robin.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let index = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.handle(index).spawn(future)
    }

    /// Stops every worker, dropping the tasks still on them, and waits for
    /// the threads to end. Call it from outside the workers (a worker
    /// cannot wait for itself); later spawns are dropped at once.
    pub fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// The CPUs this process may run on, in order (Linux); none elsewhere or
/// when they cannot be read, and then the workers are not pinned.
fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    if let Ok(set) = rustix::thread::sched_getaffinity(None) {
        return (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&cpu| set.is_set(cpu))
            .collect();
    }
    Vec::new()
}

/// Pins the calling thread to `cpu`: a worker then stays where the
/// connections steered to it (SO_INCOMING_CPU) arrive. False if it could
/// not be.
fn pin_to(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

impl Drop for Inner {
    /// The threads end on their own; joining here could be a worker
    /// waiting for itself.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawns_go_round_robin_to_distinct_threads() {
        let workers = Workers::start(2).unwrap();
        let mut names = Vec::new();
        for _ in 0..4 {
            let name = workers
                .spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap();
            names.push(name.unwrap());
        }
        assert_eq!(
            names,
            [
                "hbone-worker-0",
                "hbone-worker-1",
                "hbone-worker-0",
                "hbone-worker-1"
            ]
        );
        workers.shutdown();
        assert!(
            workers.spawn(async {}).await.is_err(),
            "stopped workers run nothing"
        );
    }

    /// Marks `count` bulk tunnels on worker `index`, held until dropped.
    async fn bulk_on(workers: &Workers, index: usize, count: usize) -> Vec<BulkMark> {
        workers
            .handle(index)
            .spawn(async move { (0..count).map(|_| mark_bulk().unwrap()).collect() })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn connections_are_placed_away_from_bulk() {
        assert!(mark_bulk().is_none(), "off the workers nothing is marked");
        let workers = Workers::start(3).unwrap();
        for index in 0..3 {
            assert_eq!(workers.place(Some(index)), index, "no bulk: stays");
        }
        let on_first = bulk_on(&workers, 0, 2).await;
        assert_eq!(workers.place(Some(0)), 1, "to the first without bulk");
        assert_eq!(workers.place(Some(2)), 2, "no bulk here: stays");
        let on_second = bulk_on(&workers, 1, 1).await;
        let on_third = bulk_on(&workers, 2, 1).await;
        assert_eq!(workers.place(Some(0)), 1, "to the fewest");
        assert_eq!(workers.place(Some(2)), 2, "none fewer than here: stays");
        assert_eq!(workers.place(None), 1, "loops off the workers too");
        drop(on_first);
        assert_eq!(workers.place(Some(1)), 0, "a mark ends with its tunnel");
        drop((on_second, on_third));
        assert_eq!(workers.place(Some(1)), 1);
        workers.shutdown();
    }

    /// Keeps worker `index` running tasks for `busy`, in 1 ms turns
    /// between which it polls for I/O (and so updates its busy count).
    fn keep_busy(workers: &Workers, index: usize, busy: Duration) -> tokio::task::JoinHandle<()> {
        workers.handle(index).spawn(async move {
            let until = std::time::Instant::now() + busy;
            while std::time::Instant::now() < until {
                let turn = std::time::Instant::now() + Duration::from_millis(1);
                while std::time::Instant::now() < turn {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        })
    }

    #[tokio::test]
    async fn handshakes_leave_a_saturated_worker_for_the_least_loaded() {
        let workers = Workers::start(2).unwrap();
        let parked: Vec<_> = (0..3)
            .map(|_| workers.handle(0).spawn(std::future::pending::<()>()))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(workers.place_handshake(Some(0)), 0, "idle: stays");

        let spinning = keep_busy(&workers, 0, Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            workers.place_handshake(Some(0)),
            0,
            "busy for one window after an idle one: stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            workers.place_handshake(Some(0)),
            1,
            "saturated, and the other runs fewer tasks: moves"
        );
        assert_eq!(workers.place_handshake(Some(1)), 1, "the other stays");
        assert_eq!(
            workers.place_handshake(None),
            workers.place_handshake(None) ^ 1,
            "off the workers: in turn"
        );
        spinning.await.unwrap();

        // As busy, but running as many tasks as the saturated one: stays.
        let spinning = keep_busy(&workers, 0, Duration::from_millis(400));
        let level: Vec<_> = (0..4)
            .map(|_| workers.handle(1).spawn(std::future::pending::<()>()))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        workers.place_handshake(Some(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(workers.place_handshake(Some(0)), 0, "no worker runs fewer");
        spinning.await.unwrap();
        for task in level {
            task.abort();
        }

        // Idle again, beside a worker running fewer tasks: stays.
        tokio::time::sleep(Duration::from_millis(50)).await;
        workers.place_handshake(Some(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(workers.place_handshake(Some(0)), 0, "idle again: stays");
        for task in parked {
            task.abort();
        }
        workers.shutdown();
    }

    /// Polls the tracker once, as a relay's poll would; whether it still
    /// counts the tunnel.
    async fn still_marked(tracker: &mut BulkTracker) -> bool {
        std::future::poll_fn(|cx| {
            tracker.poll_quiet(cx);
            std::task::Poll::Ready(tracker.is_marked())
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_mark_lapses_once_the_tunnel_goes_quiet() {
        let mut off_worker = BulkTracker::default();
        off_worker.moved_bulk();
        assert!(matches!(off_worker, BulkTracker::OffWorker));

        let load = Arc::new(Load::default());
        let counted = || load.bulk.load(Ordering::Relaxed);
        WORKER_LOAD.with(|cell| assert!(cell.set(load.clone()).is_ok()));
        let mut tracker = BulkTracker::default();
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        tracker.moved_bulk();
        assert!(still_marked(&mut tracker).await);
        assert_eq!(counted(), 1);
        step(600).await;
        tracker.moved_bulk();
        step(500).await;
        assert!(
            still_marked(&mut tracker).await,
            "0.5 s after the last bulk turn"
        );
        step(400).await;
        assert!(still_marked(&mut tracker).await, "0.9 s after it");
        step(200).await;
        assert!(!still_marked(&mut tracker).await, "1.1 s after it");
        assert_eq!(counted(), 0, "the mark is dropped");
        tracker.moved_bulk();
        assert_eq!(counted(), 1, "bulk again: marked again");
        drop(tracker);
        assert_eq!(counted(), 0, "and released with the tunnel");
    }
}
