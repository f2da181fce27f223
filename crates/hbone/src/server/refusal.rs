//! Why a CONNECT was refused, and the status each refusal is answered with.

use std::net::SocketAddr;

use http::{Method, StatusCode};

use crate::authority::AuthorityError;
use crate::gateway::RouteError;
use crate::metrics::ResponseFlag;
use crate::policy::Denial;
use crate::services::ServiceError;

/// Why a CONNECT was refused. The only place statuses and reasons are chosen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request is not a CONNECT (405).
    #[error("method {0} is not allowed; HBONE accepts CONNECT only")]
    MethodNotAllowed(Method),
    /// An extended CONNECT, with `:scheme` or `:path` (400).
    #[error("CONNECT must not carry :scheme or :path")]
    NotPlainConnect,
    /// The `:authority` is not a usable target (400).
    #[error(transparent)]
    BadAuthority(#[from] AuthorityError),
    /// The policy refuses the tunnel (403).
    #[error(transparent)]
    Denied(#[from] Denial),
    /// A gateway has no route for the service asked for (400 or 503).
    #[error(transparent)]
    NoRoute(#[from] RouteError),
    /// The service asked for is not in the server's table, or did not
    /// resolve (503).
    #[error(transparent)]
    UnknownService(#[from] ServiceError),
    /// Connecting to the target failed (503).
    #[error("target {target} unreachable: {source}")]
    Unreachable {
        /// The target's address.
        target: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the target took longer than the connect timeout (504).
    #[error("target {0} did not answer in time")]
    DialTimeout(SocketAddr),
    /// The server already carries its maximum number of tunnels (503).
    #[error("the server carries its maximum number of tunnels")]
    TunnelLimit,
}

impl Refusal {
    /// The HTTP status sent for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotPlainConnect | Refusal::BadAuthority(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::NoRoute(RouteError::Malformed(_)) => StatusCode::BAD_REQUEST,
            Refusal::NoRoute(RouteError::Unknown(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UnknownService(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::DialTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::TunnelLimit => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Istio's `response_flags` for this refusal.
    pub fn response_flag(&self) -> ResponseFlag {
        match self {
            Refusal::MethodNotAllowed(_)
            | Refusal::NotPlainConnect
            | Refusal::BadAuthority(_)
            | Refusal::NoRoute(RouteError::Malformed(_)) => ResponseFlag::BadRequest,
            Refusal::Denied(_) => ResponseFlag::Deny,
            Refusal::NoRoute(RouteError::Unknown(_)) | Refusal::UnknownService(_) => {
                ResponseFlag::NoRoute
            }
            Refusal::Unreachable { .. } | Refusal::DialTimeout(_) => ResponseFlag::Connect,
            Refusal::TunnelLimit => ResponseFlag::Overload,
        }
    }

    /// A short, stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::NotPlainConnect => "bad_request",
            Refusal::BadAuthority(_) => "bad_authority",
            Refusal::Denied(_) => "denied",
            Refusal::NoRoute(RouteError::Malformed(_)) => "bad_authority",
            Refusal::NoRoute(RouteError::Unknown(_)) => "unknown_service",
            Refusal::UnknownService(ServiceError::Resolve { .. }) => "resolve_failed",
            Refusal::UnknownService(_) => "unknown_service",
            Refusal::Unreachable { .. } => "target_unreachable",
            Refusal::DialTimeout(_) => "target_timeout",
            Refusal::TunnelLimit => "tunnel_limit",
        }
    }
}
