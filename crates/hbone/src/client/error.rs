//! Why opening a tunnel failed: [`DialError`], with the stage that ran
//! out of time and the names logs and metrics give each failure.

use std::io;
use std::net::SocketAddr;

use http::StatusCode;

use crate::metrics::ResponseFlag;
use crate::tls::TlsFailure;

/// The step of opening a tunnel that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// TCP connect to the HBONE server.
    Connect,
    /// TLS and HTTP/2 handshakes.
    Handshake,
    /// Waiting for the response to CONNECT.
    Response,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "TCP connect",
            Stage::Handshake => "TLS/HTTP2 handshake",
            Stage::Response => "CONNECT response",
        })
    }
}

/// What a refusal status says, in words, for error messages.
fn status_meaning(status: StatusCode) -> &'static str {
    match status.as_u16() {
        403 => "denied by the server's policy",
        400 | 405 | 431 => "the server found the request malformed",
        503 => "the server could not reach the target, or knows no such service",
        504 => "the server timed out reaching the target",
        _ => "see the server's log",
    }
}

/// Why a tunnel could not be opened. [`DialError::reason`] and
/// [`DialError::response_flag`] classify it for logs and metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The route lists no SPIFFE ID the server (or gateway) must prove.
    #[error("no expected server identity given: pass at least one SPIFFE ID")]
    NoExpectedIdentity,
    /// A host name (of the HBONE server or of the target) did not resolve.
    #[error("cannot resolve {name}: {source}")]
    Resolve {
        /// The `host:port` that was looked up.
        name: String,
        /// What the resolver said.
        #[source]
        source: io::Error,
    },
    /// The TCP connection to the HBONE server could not be made.
    #[error("TCP connect to HBONE server {server} failed: {source}")]
    Connect {
        /// The HBONE server dialed.
        server: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: a bad or unexpected certificate on either
    /// side, or a protocol error.
    #[error("TLS handshake with {server} failed: {failure}")]
    Tls {
        /// The HBONE server concerned.
        server: SocketAddr,
        /// What went wrong.
        failure: TlsFailure,
    },
    /// The HTTP/2 connection or the CONNECT stream failed.
    #[error("HTTP/2 error with {server}: {source}")]
    Http2 {
        /// The HBONE server concerned.
        server: SocketAddr,
        /// The underlying error.
        #[source]
        source: h2::Error,
    },
    /// The connection closed before the server answered the CONNECT.
    #[error("HBONE connection to {server} closed before the tunnel could open")]
    Closed {
        /// The HBONE server concerned.
        server: SocketAddr,
    },
    /// The server answered the CONNECT with a status other than 200.
    #[error("{server} refused the tunnel to {target}: HTTP {status} ({})", status_meaning(*.status))]
    Status {
        /// The HBONE server that refused.
        server: SocketAddr,
        /// The `:authority` that was refused.
        target: String,
        /// The status it answered with.
        status: StatusCode,
    },
    /// A step took longer than its limit in [`Timeouts`](crate::config::Timeouts).
    #[error("{stage} with {server} timed out")]
    Timeout {
        /// The HBONE server concerned.
        server: SocketAddr,
        /// The step that ran out of time.
        stage: Stage,
    },
}

impl DialError {
    /// An equal error for another caller: the I/O source, which cannot be
    /// cloned, as its kind and message; an HTTP/2 error as its reason code
    /// (or, without one, as the connection having closed).
    pub(crate) fn duplicate(&self) -> DialError {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            DialError::NoExpectedIdentity => DialError::NoExpectedIdentity,
            DialError::Resolve { name, source } => DialError::Resolve {
                name: name.clone(),
                source: io(source),
            },
            DialError::Connect { server, source } => DialError::Connect {
                server: *server,
                source: io(source),
            },
            DialError::Tls { server, failure } => DialError::Tls {
                server: *server,
                failure: failure.clone(),
            },
            DialError::Http2 { server, source } => match source.reason() {
                Some(reason) => DialError::Http2 {
                    server: *server,
                    source: h2::Error::from(reason),
                },
                None => DialError::Closed { server: *server },
            },
            DialError::Closed { server } => DialError::Closed { server: *server },
            DialError::Status {
                server,
                target,
                status,
            } => DialError::Status {
                server: *server,
                target: target.clone(),
                status: *status,
            },
            DialError::Timeout { server, stage } => DialError::Timeout {
                server: *server,
                stage: *stage,
            },
        }
    }

    /// A short, stable word for logs: what happened, from the client's
    /// side. The server's refusals are told apart by status; a server we
    /// never reached is not confused with a target the server could not
    /// reach.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::NoExpectedIdentity => "no_expected_identity",
            DialError::Resolve { .. } => "resolve_failed",
            DialError::Connect { .. } => "server_unreachable",
            DialError::Timeout {
                stage: Stage::Connect,
                ..
            } => "server_timeout",
            DialError::Timeout {
                stage: Stage::Handshake,
                ..
            } => "handshake_timeout",
            DialError::Timeout {
                stage: Stage::Response,
                ..
            } => "response_timeout",
            DialError::Tls { .. } => "tls_failure",
            DialError::Http2 { .. } => "http2_error",
            DialError::Closed { .. } => "connection_closed",
            DialError::Status { status, .. } => match status.as_u16() {
                403 => "denied_by_server",
                400 | 405 | 431 => "refused_as_bad_request",
                503 => "server_could_not_reach_target",
                504 => "server_timed_out_reaching_target",
                _ => "refused_by_server",
            },
        }
    }

    /// Istio's `response_flags` for a tunnel that could not be opened.
    pub fn response_flag(&self) -> ResponseFlag {
        match self {
            DialError::Tls { .. } => ResponseFlag::TlsFailure,
            DialError::Status { status, .. } => match status.as_u16() {
                403 => ResponseFlag::Deny,
                400 | 405 | 431 => ResponseFlag::BadRequest,
                _ => ResponseFlag::Connect,
            },
            DialError::NoExpectedIdentity => ResponseFlag::BadRequest,
            _ => ResponseFlag::Connect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_tell_the_server_from_its_target() {
        let server: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let status = |code: u16| DialError::Status {
            server,
            target: "10.0.0.1:80".into(),
            status: StatusCode::from_u16(code).unwrap(),
        };
        let timeout = |stage| DialError::Timeout { server, stage };
        let refused = DialError::Connect {
            server,
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        for (error, reason) in [
            (refused, "server_unreachable"),
            (timeout(Stage::Connect), "server_timeout"),
            (timeout(Stage::Handshake), "handshake_timeout"),
            (timeout(Stage::Response), "response_timeout"),
            (status(403), "denied_by_server"),
            (status(400), "refused_as_bad_request"),
            (status(503), "server_could_not_reach_target"),
            (status(504), "server_timed_out_reaching_target"),
            (status(502), "refused_by_server"),
        ] {
            assert_eq!(error.reason(), reason, "{error}");
            if let DialError::Status { status, .. } = &error
                && status.as_u16() == 403
            {
                assert!(
                    error
                        .to_string()
                        .ends_with("HTTP 403 Forbidden (denied by the server's policy)"),
                    "{error}"
                );
            }
            // Waiters of a failed dial get an equal error.
            assert_eq!(error.duplicate().reason(), reason);
            assert_eq!(error.duplicate().to_string(), error.to_string());
        }
    }
}
