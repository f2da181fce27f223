//! Log lines reach stderr through a buffer that a background thread
//! empties every few milliseconds.
//!
//! A proxy writes one access line per tunnel. Writing each to stderr on
//! the data path stalls tunnels behind a slow reader (a pipe to a busy log
//! shipper), and handing each to a thread through a channel wakes that
//! thread once per line: thousands of context switches a second at high
//! connection rates. Here the data path only appends to a buffer under a
//! short lock; the writer wakes on a timer, or early once the buffer is
//! large. If the reader falls far behind, lines are dropped and counted
//! rather than tunnels slowed.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Wake the writer early once this much is buffered.
const WAKE_AT: usize = 64 << 10;
/// Drop lines beyond this much unwritten output.
const MAX_BUFFERED: usize = 16 << 20;

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    closed: bool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `MakeWriter` for the log subscriber. Cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is buffered and stops the writer thread when dropped:
/// keep it alive for as long as the process logs.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The process's log buffer, for [`flush_before_exit`].
static PROCESS_LOG: OnceLock<Arc<Shared>> = OnceLock::new();

/// Writes what is buffered to stderr now: for `std::process::exit`, which
/// skips the guard.
pub fn flush_before_exit() {
    if let Some(shared) = PROCESS_LOG.get() {
        let buffered = std::mem::take(&mut shared.state().buffer);
        let _ = std::io::stderr().write_all(&buffered);
    }
}

/// Makes `writer` the one [`flush_before_exit`] empties.
pub fn register_process_log(writer: &BatchWriter) {
    let _ = PROCESS_LOG.set(writer.shared.clone());
}

/// A writer to `output`, and the guard that flushes it at the end.
pub fn batch_writer(output: impl Write + Send + 'static) -> (BatchWriter, FlushGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    let writer_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("hbone-log".into())
        .spawn(move || write_out(&writer_shared, output))
        .ok();
    (
        BatchWriter {
            shared: shared.clone(),
        },
        FlushGuard { shared, thread },
    )
}

/// The writer thread: swap the buffer out under the lock, write it
/// outside the lock.
fn write_out(shared: &Shared, mut output: impl Write) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut state = shared.state();
            if state.buffer.is_empty() && !state.closed {
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_EVERY)
                    .map(|(state, _)| state)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            state.closed
        };
        if !spare.is_empty() {
            let _ = output.write_all(&spare);
            let _ = output.flush();
            spare.clear();
            // Keep a normal buffer's capacity, not a burst's.
            spare.shrink_to(WAKE_AT * 2);
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                output,
                "hbone: {dropped} log line(s) dropped: the log reader is not keeping up"
            );
        }
        if closed && shared.state().buffer.is_empty() {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.state().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One event's output.
pub struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.state();
        if state.buffer.len() + bytes.len() > MAX_BUFFERED {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes.len());
        }
        state.buffer.extend_from_slice(bytes);
        let wake = state.buffer.len() >= WAKE_AT;
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
        }
    }
}

/// A `Write` that shares what it got with the test that reads it.
#[cfg(test)]
#[derive(Clone, Default)]
pub(super) struct Collected(pub(super) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Collected {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_arrive_in_order_soon_and_all_by_the_guard() {
        let out = Collected::default();
        let (writer, guard) = batch_writer(out.clone());
        for i in 0..1000 {
            writeln!(writer.make_writer(), "line {i}").unwrap();
        }
        // Written by the background thread within a few flush periods;
        // polled, with room for a loaded machine.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(FLUSH_EVERY);
        }
        assert!(
            !out.0.lock().unwrap().is_empty(),
            "written without the guard"
        );
        writeln!(writer.make_writer(), "last").unwrap();
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1001);
        assert_eq!(lines[999], "line 999");
        assert_eq!(lines[1000], "last");
    }

    #[test]
    fn a_stuck_reader_costs_dropped_lines_not_memory() {
        /// Blocks until the test lets it go.
        struct Stuck(Arc<Mutex<()>>);
        impl Write for Stuck {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                drop(self.0.lock().unwrap());
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (writer, guard) = batch_writer(Stuck(gate.clone()));
        let line = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            writer.make_writer().write_all(&line).unwrap();
        }
        // At most the buffer's bound is held (plus what the writer took).
        assert!(writer.shared.state().buffer.len() <= MAX_BUFFERED);
        assert!(
            writer.shared.dropped.load(Ordering::Relaxed) >= 64 - 2 * (MAX_BUFFERED >> 20) as u64
        );
        drop(held);
        drop(guard);
    }
}
