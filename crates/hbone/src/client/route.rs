//! Where a tunnel goes ([`Route`]) and what it asks for ([`TunnelRequest`]).

use std::net::SocketAddr;

use crate::headers::TraceParent;
use crate::identity::SpiffeId;

/// Where a tunnel goes. Ways to route may be added, so a `match` on a
/// route needs a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// Straight to an HBONE server, which must prove one of `server_ids`
    /// (a trust domain ID among them accepts any workload of that domain:
    /// [`SpiffeId::accepts`]).
    Direct {
        /// The HBONE server's address.
        server: SocketAddr,
        /// The identities the server may prove; at least one.
        server_ids: Vec<SpiffeId>,
    },
    /// Double HBONE: through the gateway at `gateway` (proving one of
    /// `gateway_ids`) to the service `hostname:port`, whose server must
    /// prove one of `server_ids`.
    Gateway {
        /// The gateway's HBONE address.
        gateway: SocketAddr,
        /// The identities the gateway may prove; at least one.
        gateway_ids: Vec<SpiffeId>,
        /// The service's `hostname:port`, the outer CONNECT's authority.
        service: String,
        /// The identities the final server may prove; at least one.
        server_ids: Vec<SpiffeId>,
    },
}

/// One tunnel to open: [`TunnelRequest::new`], then the `with_*` methods.
///
/// ```
/// use hbone::TunnelRequest;
///
/// let request = TunnelRequest::new("10.0.0.7:8080".parse().unwrap())
///     .with_source("192.0.2.1:40000".parse().unwrap());
/// assert!(request.trace.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TunnelRequest {
    /// What the final server connects to.
    pub target: SocketAddr,
    /// The original client, sent as `forwarded: for=`.
    pub source: Option<SocketAddr>,
    /// The trace to join; a new one is started when `None`.
    pub trace: Option<TraceParent>,
}

impl TunnelRequest {
    /// A tunnel to `target`, with no original client and a new trace.
    pub fn new(target: SocketAddr) -> Self {
        TunnelRequest {
            target,
            source: None,
            trace: None,
        }
    }

    /// Names the original client ([`TunnelRequest::source`]).
    #[must_use]
    pub fn with_source(mut self, source: SocketAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Joins `trace` ([`TunnelRequest::trace`]).
    #[must_use]
    pub fn with_trace(mut self, trace: TraceParent) -> Self {
        self.trace = Some(trace);
        self
    }
}

/// For logs: `server ADDR (ID)`, or `gateway ADDR (ID) to SERVICE (ID)`.
impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = |ids: &[SpiffeId]| {
            ids.iter()
                .map(SpiffeId::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        };
        match self {
            Route::Direct { server, server_ids } => {
                write!(f, "server {server} ({})", ids(server_ids))
            }
            Route::Gateway {
                gateway,
                gateway_ids,
                service,
                server_ids,
            } => write!(
                f,
                "gateway {gateway} ({}) to {service} ({})",
                ids(gateway_ids),
                ids(server_ids)
            ),
        }
    }
}
