//! A tunnel's task in two phases, held as compactly as an idle tunnel
//! needs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// A tunnel's task in two phases: opening (dial, negotiate, answer), boxed
/// and freed when done, then the relay it produced, held inline.
///
/// Written out by hand because an `async` block awaiting a future it owns
/// keeps the future twice (once where it was made, once being awaited),
/// and an idle tunnel's task should hold its relay once.
pub(crate) enum Phased<O, R> {
    Opening(Pin<Box<O>>),
    Relaying(R),
    Done,
}

impl<O, R> Phased<O, R> {
    pub(crate) fn new(opening: O) -> Self {
        Phased::Opening(Box::pin(opening))
    }
}

impl<O, R> Future for Phased<O, R>
where
    O: Future<Output = Option<R>>,
    R: Future<Output = ()> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Phased::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Some(relay) => *this = Phased::Relaying(relay),
                    None => *this = Phased::Done,
                },
                Phased::Relaying(relay) => {
                    ready!(Pin::new(relay).poll(cx));
                    *this = Phased::Done;
                }
                Phased::Done => return Poll::Ready(()),
            }
        }
    }
}
