//! HTTP/2 PING keepalive: notices a peer that has gone silent.
//!
//! A crashed host or a black-holed path sends no FIN and no RST; without a
//! probe, a pooled connection to it would look healthy until TCP gives up,
//! minutes later. Every `interval` we send a PING; no answer within
//! `timeout` ends the connection.

use std::time::Duration;

use h2::{Ping, PingPong};

/// How often to probe and how long to wait for the answer.
///
/// `Keepalive::default().with_interval(..)`, or [`Keepalive::new`] with
/// both values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Keepalive {
    /// Time between PINGs; default 10 s.
    pub interval: Duration,
    /// How long a PING may go unanswered before the connection is ended;
    /// default 20 s.
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// ztunnel's values: a PING every 10 s, 20 s to answer.
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

impl Keepalive {
    /// A PING every `interval`, each allowed `timeout` to be answered.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Keepalive { interval, timeout }
    }

    /// Sets [`Keepalive::interval`].
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`Keepalive::timeout`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs until the peer fails to answer a PING in time; returns why.
    /// Poll it alongside the connection, which is what delivers the PONG.
    pub async fn watch(self, ping_pong: Option<PingPong>) -> String {
        let Some(mut ping_pong) = ping_pong else {
            // Only the first caller of `ping_pong()` gets the handle.
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.interval).await;
            match tokio::time::timeout(self.timeout, ping_pong.ping(Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
                Err(_) => return format!("no answer to keepalive PING within {:?}", self.timeout),
            }
        }
    }
}
