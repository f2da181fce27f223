//! Who may use an entry: the source addresses it serves, and the rate-kept
//! log of those it turns away.
//!
//! An entry opens tunnels with this workload's identity, so whoever can
//! reach its port borrows that identity. A source outside
//! [`ClientSources`] is closed right after accept: it never reaches the
//! SOCKS5 or forward logic, and no tunnel is dialled for it.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::policy::IpNet;

/// The source addresses an entry serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientSources {
    /// Any source (the listener's address decides who can connect).
    #[default]
    Any,
    /// Only sources inside one of these networks; others are closed at
    /// once. An empty list serves nobody.
    Only(Vec<IpNet>),
}

impl ClientSources {
    /// Whether a connection from `ip` is served. IPv4-mapped IPv6 sources
    /// are judged as the IPv4 address they carry.
    pub fn allows(&self, ip: IpAddr) -> bool {
        match self {
            ClientSources::Any => true,
            ClientSources::Only(nets) => nets.iter().any(|net| net.contains(ip)),
        }
    }
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or an
/// IPv4-mapped loopback): only this machine can reach a listener there.
/// The unspecified addresses (0.0.0.0, ::) take every address, so they are
/// not loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// How often a refusal is logged at warn level, at most; in between they
/// are counted and logged at debug.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counts refused clients and logs them without letting a flood of them
/// flood the log: every refusal at debug, and at most one warning per
/// [`WARN_EVERY`] with the number refused since the last one.
#[derive(Debug)]
pub(crate) struct Refusals {
    entry: &'static str,
    what: &'static str,
    total: AtomicU64,
    /// When the last warning went out, and the count then.
    last_warning: Mutex<Option<(Instant, u64)>>,
}

impl Refusals {
    pub(crate) fn new(entry: &'static str, what: &'static str) -> Self {
        Refusals {
            entry,
            what,
            total: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }
    }

    /// Counts one refusal of `source`, and logs it.
    pub(crate) fn note(&self, source: std::net::SocketAddr) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let (entry, what) = (self.entry, self.what);
        tracing::debug!(%source, "{entry}: {what}; closed");
        let now = Instant::now();
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        let since = match *last {
            Some((at, _)) if now.duration_since(at) < WARN_EVERY => return,
            Some((_, count)) => total - count,
            None => 1,
        };
        *last = Some((now, total));
        drop(last);
        tracing::warn!(
            %source, refused = since, total,
            "{entry}: {what}; closed (warned at most every {}s)",
            WARN_EVERY.as_secs()
        );
    }

    /// How many have been refused so far.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        let (addr, prefix) = text.split_once('/').unwrap();
        IpNet::new(addr.parse().unwrap(), prefix.parse().unwrap()).unwrap()
    }

    #[test]
    fn sources_outside_the_networks_are_refused() {
        let only = ClientSources::Only(vec![net("127.0.0.2/32"), net("fd00::/8")]);
        assert!(only.allows("127.0.0.2".parse().unwrap()));
        assert!(only.allows("::ffff:127.0.0.2".parse().unwrap()));
        assert!(only.allows("fd12::1".parse().unwrap()));
        assert!(!only.allows("127.0.0.1".parse().unwrap()));
        assert!(!only.allows("::1".parse().unwrap()));
        assert!(!ClientSources::Only(Vec::new()).allows("127.0.0.1".parse().unwrap()));
        assert!(ClientSources::Any.allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn only_loopback_addresses_are_loopback() {
        for yes in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.0.2.1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn refusals_are_all_counted() {
        let refusals = Refusals::new("socks5", "source not allowed");
        let source = "127.0.0.1:9".parse().unwrap();
        for _ in 0..5 {
            refusals.note(source);
        }
        assert_eq!(refusals.total(), 5);
    }
}
