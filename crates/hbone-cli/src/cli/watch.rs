//! Watching configuration files: the policy file and the identity files
//! are reloaded when they change (checked every 2 s) and on SIGHUP.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};

/// What the watcher tells its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// Reload now; the reason is for the log ("files changed", "SIGHUP").
    Reload(&'static str),
    /// An hour passed (for checks such as certificate expiry).
    Hourly,
}

/// Calls `handle` with [`Event::Reload`] when one of `files` changes or the
/// process gets SIGHUP, and with [`Event::Hourly`] once an hour. The
/// returned future runs forever; spawn it. SIGHUP is taken over before this
/// returns, not when the task first runs: a reload signal sent as soon as
/// the process says it is ready must not meet the default action (exit).
pub(super) fn watch(
    files: Vec<PathBuf>,
    handle: impl FnMut(Event) + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let hangup = signal(SignalKind::hangup())
        .inspect_err(|e| tracing::warn!("cannot listen for SIGHUP: {e}"))
        .ok();
    watch_with(files, hangup, handle)
}

async fn watch_with(
    files: Vec<PathBuf>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut handle: impl FnMut(Event),
) {
    let stamp = |files: &[PathBuf]| -> Vec<Option<SystemTime>> {
        files
            .iter()
            .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .collect()
    };
    let mut last = stamp(&files);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // Not at once: whoever started the watcher has just checked.
    let hour = Duration::from_secs(3600);
    let mut hourly = tokio::time::interval_at(tokio::time::Instant::now() + hour, hour);
    loop {
        let hangup_received = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                let now = stamp(&files);
                if now != last {
                    last = now;
                    handle(Event::Reload("files changed"));
                }
            }
            Some(()) = hangup_received => {
                // What SIGHUP reloaded need not be reloaded again by the poll.
                last = stamp(&files);
                handle(Event::Reload("SIGHUP"));
            }
            _ = hourly.tick() => handle(Event::Hourly),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Under paused time: nothing at start or while the files stand still
    /// (an expiry check at start as well as at load would report twice), a
    /// reload within a round of a change, the expiry check after an hour.
    #[tokio::test(start_paused = true)]
    async fn reloads_on_change_and_checks_hourly_but_not_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let watcher = tokio::spawn(watch_with(vec![file.clone()], None, move |event| {
            seen.lock().unwrap().push(event)
        }));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*events.lock().unwrap(), []);

        let later = std::fs::metadata(&file).unwrap().modified().unwrap() + Duration::from_secs(5);
        let handle = std::fs::File::options().write(true).open(&file).unwrap();
        handle.set_modified(later).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(*events.lock().unwrap(), [Event::Reload("files changed")]);

        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            *events.lock().unwrap(),
            [Event::Reload("files changed"), Event::Hourly]
        );
        watcher.abort();
    }
}
