//! Polls a future only after it has woken its task.
//!
//! A connection's task is woken for every frame it reads or writes, while
//! its timers, keepalive, drain and window signals fire a few times a
//! minute. Polled together in one `select!`, every data-path wake-up would
//! poll them all again (a timer check and a lock per signal each time).
//! [`PollWhenWoken`] polls such a future with a waker of its own, which
//! notes the wake-up before passing it on to the task, and skips the poll
//! while none has come.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// The gate in front of one future (or, after it completes, the next one
/// put in its place).
pub(crate) struct PollWhenWoken {
    shared: Arc<Shared>,
    /// The waker the gated future is polled with (wraps `shared`).
    waker: Waker,
    /// The task's waker as last passed on to `shared`, to notice a change
    /// without taking the lock.
    task: Option<Waker>,
}

struct Shared {
    /// The gated future asked to be polled again.
    woken: AtomicBool,
    /// Whom to wake then.
    task: Mutex<Option<Waker>>,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Default for PollWhenWoken {
    fn default() -> Self {
        let shared = Arc::new(Shared {
            // A future is polled once before it can have woken anyone.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        PollWhenWoken {
            waker: Waker::from(shared.clone()),
            shared,
            task: None,
        }
    }
}

impl PollWhenWoken {
    /// Polls `future` if it has not been polled yet or has woken the task
    /// since its last poll; `Pending` otherwise. Once it is ready, the
    /// next future passed here is polled at once.
    pub(crate) fn poll<F: Future + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        future: Pin<&mut F>,
    ) -> Poll<F::Output> {
        if !self
            .task
            .as_ref()
            .is_some_and(|task| task.will_wake(cx.waker()))
        {
            let task = cx.waker().clone();
            *self.shared.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
            self.task = Some(task);
        }
        if !self.shared.woken.load(Ordering::Acquire)
            || !self.shared.woken.swap(false, Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        let ready = future.poll(&mut Context::from_waker(&self.waker));
        if ready.is_ready() {
            self.shared.woken.store(true, Ordering::Release);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn polls_the_future_only_after_it_woke_the_task() {
        let open = Arc::new(tokio::sync::Notify::new());
        let notified = open.notified();
        tokio::pin!(notified);
        let (kick, mut kicks) = tokio::sync::mpsc::unbounded_channel::<()>();
        let opener = open.clone();
        let kicker = tokio::spawn(async move {
            for _ in 0..5 {
                kick.send(()).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            opener.notify_one();
        });
        let mut gate = PollWhenWoken::default();
        let (mut gated_polls, mut task_polls) = (0, 0);
        std::future::poll_fn(|cx| {
            task_polls += 1;
            // Wake-ups of the task by something else: the kicks.
            while let Poll::Ready(Some(())) = kicks.poll_recv(cx) {}
            let counted = std::future::poll_fn(|cx| {
                gated_polls += 1;
                notified.as_mut().poll(cx)
            });
            gate.poll(cx, std::pin::pin!(counted))
        })
        .await;
        kicker.await.unwrap();
        // Once to register, once after the notification woke it; never
        // for the kicks.
        assert_eq!(gated_polls, 2, "the task was polled {task_polls} times");
        assert!(task_polls >= 6, "the kicks woke the task: {task_polls}");
    }

    #[tokio::test]
    async fn a_future_put_in_after_a_ready_one_is_polled_at_once() {
        let mut gate = PollWhenWoken::default();
        let mut first = std::pin::pin!(std::future::ready(1));
        let got = std::future::poll_fn(|cx| gate.poll(cx, first.as_mut())).await;
        assert_eq!(got, 1);
        let mut second = std::pin::pin!(std::future::ready(2));
        let got = std::future::poll_fn(|cx| gate.poll(cx, second.as_mut())).await;
        assert_eq!(got, 2);
    }
}
