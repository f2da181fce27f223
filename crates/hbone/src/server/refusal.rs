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

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::authority::{AuthorityError, Target, parse_target};
    use crate::client::DialError;

    fn all() -> Vec<Refusal> {
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let Ok(Target::Service(name)) = parse_target("echo.default.svc:80") else {
            panic!("a service name");
        };
        vec![
            Refusal::MethodNotAllowed(Method::GET),
            Refusal::NotPlainConnect,
            Refusal::BadAuthority(AuthorityError::PortZero("127.0.0.1:0".into())),
            Refusal::Denied(Denial::Target(target)),
            Refusal::NoRoute(RouteError::Malformed("echo".into())),
            Refusal::NoRoute(RouteError::Unknown("echo:80".into())),
            Refusal::UnknownService(ServiceError::Unknown(name.clone())),
            Refusal::UnknownService(ServiceError::Resolve {
                name,
                reason: "no address".into(),
            }),
            Refusal::Unreachable {
                target,
                source: io::ErrorKind::ConnectionRefused.into(),
            },
            Refusal::DialTimeout(target),
            Refusal::TunnelLimit,
        ]
    }

    #[test]
    fn each_refusal_has_its_status_flag_and_reason() {
        use ResponseFlag::*;
        let expected = [
            (405, BadRequest, "method_not_allowed"),
            (400, BadRequest, "bad_request"),
            (400, BadRequest, "bad_authority"),
            (403, Deny, "denied"),
            (400, BadRequest, "bad_authority"),
            (503, NoRoute, "unknown_service"),
            (503, NoRoute, "unknown_service"),
            (503, NoRoute, "resolve_failed"),
            (503, Connect, "target_unreachable"),
            (504, Connect, "target_timeout"),
            (503, Overload, "tunnel_limit"),
        ];
        let refusals = all();
        assert_eq!(refusals.len(), expected.len());
        for (refusal, (status, flag, reason)) in refusals.iter().zip(expected) {
            assert_eq!(refusal.status().as_u16(), status, "{refusal}");
            assert_eq!(refusal.response_flag(), flag, "{refusal}");
            assert_eq!(refusal.reason(), reason, "{refusal}");
        }
    }

    /// The dialer tells the server's refusals apart by status alone: each
    /// status the server sends must mean something specific there, never
    /// the catch-all.
    #[test]
    fn the_dialer_has_a_word_for_every_status_the_server_refuses_with() {
        let server: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        for refusal in all() {
            let seen = DialError::Status {
                server,
                target: "127.0.0.1:8080".into(),
                status: refusal.status(),
            };
            assert_ne!(seen.reason(), "refused_by_server", "{refusal}");
            if refusal.status() == StatusCode::FORBIDDEN {
                assert_eq!(seen.response_flag(), ResponseFlag::Deny);
            }
            if refusal.response_flag() == ResponseFlag::BadRequest {
                assert_eq!(seen.response_flag(), ResponseFlag::BadRequest, "{refusal}");
            }
        }
    }
}
