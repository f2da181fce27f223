//! The routing table of a double-HBONE gateway: service `hostname:port`
//! to the HBONE endpoints that serve it.
//!
//! A gateway terminates only the outer tunnel. It resolves the outer
//! `:authority` here and relays the bytes, which are the inner TLS
//! connection, to an endpoint's HBONE port; it never holds the inner keys.
//!
//! ```toml
//! [[route]]
//! host = "echo.demo.svc.cluster.local"
//! port = 8080                     # optional: only this service port
//! endpoints = ["10.0.0.7", "10.0.0.8:15008"]   # HBONE port defaults to 15008
//!
//! [[route]]
//! host = "10.78.1.2"              # an address, as a capturing node asks for it
//! endpoints = ["10.78.1.2"]
//! ```
//!
//! A host may be an IP address (IPv6 in brackets): a mesh node that
//! captured a connection to a remote network knows only the address it
//! was going to, and asks the gateway for that `ip:port`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(feature = "files")]
mod file;
#[cfg(feature = "files")]
pub use file::RoutesError;

/// One service and its endpoints.
#[derive(Debug)]
struct Route {
    host: Host,
    port: Option<u16>,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// Why a route cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteSpecError {
    /// The host is empty or holds a `:`, `/` or space, and is no IP
    /// address.
    #[error("host must be a bare host name or an IP address (IPv6 in brackets)")]
    Host,
    /// The route lists no endpoint.
    #[error("needs at least one endpoint")]
    NoEndpoint,
}

/// Why an outer `:authority` has no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The authority is not `hostname:port` (answered with 400).
    #[error("authority {0:?} is not hostname:port")]
    Malformed(String),
    /// No route matches the host name and port (answered with 503).
    #[error("no route for service {0}")]
    Unknown(String),
}

/// Service routes, matched by host name (case-insensitive) and port.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// An empty table; [`Routes::add`] fills it.
    pub fn new() -> Self {
        Routes::default()
    }

    /// Adds a service `host` (a bare host name, matched case-insensitively,
    /// or an IP address, IPv6 in brackets or not, matched as an address),
    /// for one service `port` or any, served by `endpoints` in turn.
    pub fn add(
        &mut self,
        host: &str,
        port: Option<u16>,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), RouteSpecError> {
        let host = match Host::ip(host).or_else(|| host.parse().ok().map(Host::Ip)) {
            Some(ip) => ip,
            None if host.is_empty() || host.contains([':', '/', ' ', '[', ']']) => {
                return Err(RouteSpecError::Host);
            }
            None => Host::Name(host.to_ascii_lowercase()),
        };
        if endpoints.is_empty() {
            return Err(RouteSpecError::NoEndpoint);
        }
        self.routes.push(Route {
            host,
            port,
            endpoints,
            next: AtomicUsize::new(0),
        });
        Ok(())
    }

    /// How many routes the table holds.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table holds no route.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The endpoint for `authority` (`hostname:port`); endpoints of a
    /// route take turns.
    pub fn resolve(&self, authority: &str) -> Result<SocketAddr, RouteError> {
        let (host, port) = authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| RouteError::Malformed(authority.to_owned()))?;
        let asked = Host::ip(host);
        let route = self
            .routes
            .iter()
            .find(|r| r.host.matches(host, asked.as_ref()) && r.port.is_none_or(|p| p == port))
            .ok_or_else(|| RouteError::Unknown(authority.to_owned()))?;
        let turn = route.next.fetch_add(1, Ordering::Relaxed);
        Ok(route.endpoints[turn % route.endpoints.len()])
    }
}

/// A route's host: a name, or an address.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    /// Lowercase.
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// The host of an authority when it is an address: IPv4, or IPv6 in
    /// brackets (bare IPv6 would be ambiguous beside a port).
    fn ip(host: &str) -> Option<Host> {
        let ip = match host.strip_prefix('[') {
            Some(v6) => IpAddr::V6(v6.strip_suffix(']')?.parse().ok()?),
            None => IpAddr::V4(host.parse().ok()?),
        };
        Some(Host::Ip(ip))
    }

    /// Whether an authority's `host` (`asked` when it is an address) is
    /// this one. Addresses compare as addresses, so `[fd00::1]` matches
    /// `[fd00:0::1]`.
    fn matches(&self, host: &str, asked: Option<&Host>) -> bool {
        match self {
            Host::Name(name) => name.eq_ignore_ascii_case(host),
            ip => asked == Some(ip),
        }
    }
}
