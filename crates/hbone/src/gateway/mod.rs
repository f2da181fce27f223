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
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(feature = "files")]
mod file;
#[cfg(feature = "files")]
pub use file::RoutesError;

/// One service and its endpoints.
#[derive(Debug)]
struct Route {
    host: String,
    port: Option<u16>,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// Why a route cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteSpecError {
    /// The host is empty or holds a `:`, `/` or space.
    #[error("host must be a bare host name")]
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

    /// Adds a service `host` (a bare host name, matched case-insensitively),
    /// for one service `port` or any, served by `endpoints` in turn.
    pub fn add(
        &mut self,
        host: &str,
        port: Option<u16>,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), RouteSpecError> {
        if host.is_empty() || host.contains([':', '/', ' ']) {
            return Err(RouteSpecError::Host);
        }
        if endpoints.is_empty() {
            return Err(RouteSpecError::NoEndpoint);
        }
        self.routes.push(Route {
            host: host.to_ascii_lowercase(),
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
        let route = self
            .routes
            .iter()
            .find(|r| r.host.eq_ignore_ascii_case(host) && r.port.is_none_or(|p| p == port))
            .ok_or_else(|| RouteError::Unknown(authority.to_owned()))?;
        let turn = route.next.fetch_add(1, Ordering::Relaxed);
        Ok(route.endpoints[turn % route.endpoints.len()])
    }
}
