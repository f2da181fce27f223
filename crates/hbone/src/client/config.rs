//! How a dialer behaves: [`DialerConfig`].

use std::time::Duration;

use crate::config::{H2Settings, Timeouts};
use crate::headers::Baggage;
use crate::lifecycle::Telemetry;
use crate::revocation::Revocation;
use crate::workers::Workers;

/// How a dialer behaves: start from [`DialerConfig::default`] and change
/// what you need with the `with_*` methods.
///
/// ```
/// use hbone::DialerConfig;
/// use hbone::config::Timeouts;
/// use std::time::Duration;
///
/// let config = DialerConfig::default()
///     .with_timeouts(Timeouts::default().with_connect(Duration::from_secs(1)))
///     .with_network("west");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DialerConfig {
    /// HTTP/2 settings for the dialer's connections.
    pub h2: H2Settings,
    /// Limits on connecting, handshaking and waiting for the CONNECT answer.
    pub timeouts: Timeouts,
    /// Share HTTP/2 connections between tunnels. Off, every tunnel gets a
    /// fresh TLS + HTTP/2 connection (for measuring handshake cost).
    pub pooling: bool,
    /// A pooled connection without streams for this long is closed. Keeps
    /// stale connections from outliving the server's address.
    pub idle_timeout: Duration,
    /// Our workload's metadata, sent as `baggage` on every CONNECT.
    pub baggage: Baggage,
    /// Our network name, sent as `x-forwarded-network` on the inner
    /// CONNECT of double HBONE.
    pub network: Option<String>,
    /// Metrics and the open-tunnel list, when the process keeps them.
    pub telemetry: Telemetry,
    /// Revocation lists server (and gateway) certificates are checked
    /// against; none by default. Replace them while running with
    /// [`Dialer::reload_revocation`](super::Dialer::reload_revocation).
    pub revocation: Revocation,
    /// A firewall mark (SO_MARK) set on every TCP connection to a server
    /// or gateway, so that rules capturing traffic can let this dialer's
    /// own connections pass. Setting it needs CAP_NET_ADMIN (or, since
    /// Linux 5.17, CAP_NET_RAW), and Linux;
    /// elsewhere every connect fails. None by default.
    pub socket_mark: Option<u32>,
    /// Control frames a server may send on one connection: a burst of
    /// this many, and as many per [`DialerConfig::control_frame_window`],
    /// counted as a server counts its clients'
    /// ([`crate::server::Limits::max_control_frames`]; its own PINGs and
    /// SETTINGS answered and the window updates our uploads earn are
    /// free). One more closes the connection, and its tunnels fail.
    /// Default 1,000.
    pub max_control_frames: u32,
    /// The period [`DialerConfig::max_control_frames`] is counted over;
    /// 10 s by default, zero to turn the check off.
    pub control_frame_window: Duration,
    /// The entries built on this dialer (forward, SOCKS5, capture) serve
    /// each accepted connection on one of these single-threaded workers,
    /// in turn, instead of the runtime that accepted it. Wherever a tunnel
    /// is opened on a worker, the pool gives it a connection of that
    /// worker's own, so the application's socket, the relay, the tunnel
    /// and the HTTP/2 connection under it never wake another thread (at
    /// the cost of a connection per worker and server). `None` (the
    /// default) leaves the entries' tasks to the runtime.
    pub workers: Option<Workers>,
}

impl Default for DialerConfig {
    fn default() -> Self {
        DialerConfig {
            h2: H2Settings::client(),
            timeouts: Timeouts::default(),
            pooling: true,
            idle_timeout: Duration::from_secs(60),
            baggage: Baggage::default(),
            network: None,
            telemetry: Telemetry::default(),
            revocation: Revocation::default(),
            socket_mark: None,
            max_control_frames: 1_000,
            control_frame_window: Duration::from_secs(10),
            workers: None,
        }
    }
}

impl DialerConfig {
    /// Sets [`DialerConfig::workers`].
    #[must_use]
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Sets [`DialerConfig::h2`].
    #[must_use]
    pub fn with_h2(mut self, h2: H2Settings) -> Self {
        self.h2 = h2;
        self
    }

    /// Sets [`DialerConfig::timeouts`].
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Sets [`DialerConfig::pooling`].
    #[must_use]
    pub fn with_pooling(mut self, pooling: bool) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets [`DialerConfig::idle_timeout`].
    #[must_use]
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Sets [`DialerConfig::baggage`].
    #[must_use]
    pub fn with_baggage(mut self, baggage: Baggage) -> Self {
        self.baggage = baggage;
        self
    }

    /// Sets our network name ([`DialerConfig::network`]).
    #[must_use]
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Sets [`DialerConfig::telemetry`].
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Sets [`DialerConfig::revocation`].
    #[must_use]
    pub fn with_revocation(mut self, revocation: Revocation) -> Self {
        self.revocation = revocation;
        self
    }

    /// Sets [`DialerConfig::max_control_frames`] and
    /// [`DialerConfig::control_frame_window`].
    #[must_use]
    pub fn with_max_control_frames(mut self, frames: u32, window: Duration) -> Self {
        self.max_control_frames = frames;
        self.control_frame_window = window;
        self
    }

    /// Sets [`DialerConfig::socket_mark`].
    #[must_use]
    pub fn with_socket_mark(mut self, mark: u32) -> Self {
        self.socket_mark = Some(mark);
        self
    }
}
