//! Tunables shared by the dialer and the server: HTTP/2 settings and
//! timeouts. The defaults start from what ztunnel uses (DESIGN.md §2).

use std::time::Duration;

use crate::keepalive::Keepalive;
use crate::window::Windows;

/// HTTP/2 settings for one side of a connection.
///
/// Start from [`H2Settings::client`] or [`H2Settings::server`] and change
/// what you need with the `with_*` methods (or by assigning a field).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct H2Settings {
    /// Flow-control window of each stream (bytes): the largest one granted
    /// when `adaptive_windows` is on, the only one when it is off.
    pub stream_window: u32,
    /// Flow-control window of the whole connection (bytes), used when
    /// `adaptive_windows` is off. Keep it well above `stream_window`: equal
    /// windows have deadlocked in the field.
    pub connection_window: u32,
    /// Start with small windows (64 KiB per stream, four stream windows
    /// per connection) and double them, up to `stream_window`, while PINGs
    /// show the peer filling them without a queue forming, instead of
    /// granting the largest windows at once. On by default: every
    /// tunnel to a peer shares one connection, and data in flight on it is
    /// a queue that a small request waits behind.
    pub adaptive_windows: bool,
    /// Largest DATA frame we accept (bytes).
    pub max_frame_size: u32,
    /// Streams one connection may carry at once.
    pub max_concurrent_streams: u32,
    /// Largest header list we accept (bytes).
    pub max_header_list_size: u32,
}

impl H2Settings {
    /// Client side: up to 200 streams per connection (ztunnel uses 100;
    /// each HTTP/2 + TLS connection costs ~65 KB of buffers per side, so
    /// twice the streams per connection saves ~0.65 KB per idle tunnel),
    /// 16 KiB headers.
    pub fn client() -> Self {
        H2Settings {
            max_concurrent_streams: 200,
            max_header_list_size: 16 << 10,
            ..Self::common()
        }
    }

    /// Server side: 200 streams per connection, 64 KiB headers.
    pub fn server() -> Self {
        H2Settings {
            max_concurrent_streams: 200,
            max_header_list_size: 64 << 10,
            ..Self::common()
        }
    }

    fn common() -> Self {
        H2Settings {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            adaptive_windows: true,
            max_frame_size: 1 << 20,
            max_concurrent_streams: 100,
            max_header_list_size: 16 << 10,
        }
    }

    /// Sets [`H2Settings::stream_window`].
    #[must_use]
    pub fn with_stream_window(mut self, bytes: u32) -> Self {
        self.stream_window = bytes;
        self
    }

    /// Sets [`H2Settings::connection_window`].
    #[must_use]
    pub fn with_connection_window(mut self, bytes: u32) -> Self {
        self.connection_window = bytes;
        self
    }

    /// Sets [`H2Settings::adaptive_windows`].
    #[must_use]
    pub fn with_adaptive_windows(mut self, adaptive: bool) -> Self {
        self.adaptive_windows = adaptive;
        self
    }

    /// Sets [`H2Settings::max_frame_size`].
    #[must_use]
    pub fn with_max_frame_size(mut self, bytes: u32) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Sets [`H2Settings::max_concurrent_streams`].
    #[must_use]
    pub fn with_max_concurrent_streams(mut self, streams: u32) -> Self {
        self.max_concurrent_streams = streams;
        self
    }

    /// Sets [`H2Settings::max_header_list_size`].
    #[must_use]
    pub fn with_max_header_list_size(mut self, bytes: u32) -> Self {
        self.max_header_list_size = bytes;
        self
    }

    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let initial = Windows::initial(self);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(initial.stream)
            .initial_connection_window_size(initial.connection)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            .enable_push(false);
        builder
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let initial = Windows::initial(self);
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(initial.stream)
            .initial_connection_window_size(initial.connection)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size);
        builder
    }
}

/// How long each waiting step may take.
///
/// ```
/// use std::time::Duration;
/// use hbone::config::Timeouts;
///
/// let timeouts = Timeouts::default()
///     .with_connect(Duration::from_secs(2))
///     .with_tunnel_idle(Duration::from_secs(600));
/// assert_eq!(timeouts.tunnel_idle, Some(Duration::from_secs(600)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// PING probes on every HTTP/2 connection, both sides.
    pub keepalive: Keepalive,
    /// TCP connect: to the HBONE server (dialer) or to the target (server).
    pub connect: Duration,
    /// TLS handshake plus HTTP/2 preface and SETTINGS.
    pub handshake: Duration,
    /// Dialer: from sending CONNECT to the response headers. Covers the
    /// server's dial of the target, so keep it above the server's `connect`.
    pub response: Duration,
    /// Server: a connection with no open stream for this long gets GOAWAY.
    /// Also ends clients that connect and never send a complete CONNECT.
    /// Keep it above the dialer's pool idle timeout (60 s), so that clients
    /// normally close first.
    pub connection_idle: Duration,
    /// Server: a tunnel that moves no byte either way for this long is
    /// closed. Off (`None`) by default: idle tunnels are legitimate.
    pub tunnel_idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            keepalive: Keepalive::default(),
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            response: Duration::from_secs(15),
            connection_idle: Duration::from_secs(300),
            tunnel_idle: None,
        }
    }
}

impl Timeouts {
    /// Sets [`Timeouts::keepalive`].
    #[must_use]
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Sets [`Timeouts::connect`].
    #[must_use]
    pub fn with_connect(mut self, limit: Duration) -> Self {
        self.connect = limit;
        self
    }

    /// Sets [`Timeouts::handshake`].
    #[must_use]
    pub fn with_handshake(mut self, limit: Duration) -> Self {
        self.handshake = limit;
        self
    }

    /// Sets [`Timeouts::response`].
    #[must_use]
    pub fn with_response(mut self, limit: Duration) -> Self {
        self.response = limit;
        self
    }

    /// Sets [`Timeouts::connection_idle`].
    #[must_use]
    pub fn with_connection_idle(mut self, limit: Duration) -> Self {
        self.connection_idle = limit;
        self
    }

    /// Closes tunnels idle for `limit` ([`Timeouts::tunnel_idle`]): a
    /// `Duration`, or `None` for no limit.
    #[must_use]
    pub fn with_tunnel_idle(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.tunnel_idle = limit.into();
        self
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number means seconds), the
/// form durations take on command lines and in configuration files. Zero
/// is refused: a zero timeout would fail everything.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if duration.is_zero() {
        return Err("a timeout of zero would fail everything; give a positive duration".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }
}

/// The defaults the README and SECURITY.md quote ("everything that waits
/// has a limit", "everything that accumulates has a cap", windows and
/// frames): changing one must change the docs too.
#[cfg(test)]
mod documented_defaults {
    use super::*;
    use crate::DialerConfig;
    use crate::server::Limits;

    #[test]
    fn timeouts() {
        let t = Timeouts::default();
        assert_eq!(t.connect, Duration::from_secs(5));
        assert_eq!(t.handshake, Duration::from_secs(10));
        assert_eq!(t.response, Duration::from_secs(15));
        assert_eq!(t.connection_idle, Duration::from_secs(300));
        assert_eq!(t.tunnel_idle, None);
        assert_eq!(t.keepalive.interval, Duration::from_secs(10));
        assert_eq!(t.keepalive.timeout, Duration::from_secs(20));
        assert_eq!(
            DialerConfig::default().idle_timeout,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn caps_and_budgets() {
        let limits = Limits::default();
        assert_eq!(limits.max_connections, 10_000);
        assert_eq!(limits.max_connections_per_ip, 1_000);
        assert_eq!(limits.max_tunnels, 100_000);
        assert_eq!(limits.max_control_frames, 1_000);
        assert_eq!(limits.control_frame_window, Duration::from_secs(10));
        let dialer = DialerConfig::default();
        assert_eq!(dialer.max_control_frames, 1_000);
        assert_eq!(dialer.control_frame_window, Duration::from_secs(10));
    }

    #[test]
    fn http2_settings() {
        for (side, h2, headers) in [
            ("server", H2Settings::server(), 64 << 10),
            ("client", H2Settings::client(), 16 << 10),
        ] {
            assert_eq!(h2.max_concurrent_streams, 200, "{side}");
            assert_eq!(h2.max_header_list_size, headers, "{side}");
            assert_eq!(h2.max_frame_size, 1 << 20, "{side}");
            assert!(h2.adaptive_windows, "{side}");
            assert_eq!(h2.stream_window, 4 << 20, "{side}");
            assert_eq!(h2.connection_window, 16 << 20, "{side}");
        }
        // Adaptive windows start at 64 KiB per stream, four of them per
        // connection.
        assert_eq!(crate::window::MIN_STREAM_WINDOW, 65_535);
        assert_eq!(crate::window::STREAMS_PER_CONNECTION_WINDOW, 4);
    }
}
