//! The `:authority` of an HBONE CONNECT: the target as `ip:port`, or a
//! service as `hostname:port`.
//!
//! Literal addresses are taken as they are (IPv6 in brackets), as ztunnel
//! sends them for direct tunnels. In double HBONE, and from waypoints,
//! ztunnel names the service instead (`echo.default.svc.cluster.local:8081`,
//! on the inner request as on the outer one); such a name is only ever
//! looked up in tables the operator wrote (see [`crate::services`]), never
//! resolved on a peer's say-so. Zone ids and port 0 are refused, so the
//! server never guesses an interface on a peer's behalf.

use std::fmt;
use std::net::SocketAddr;

/// Why an authority is not a usable target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The request has no `:authority`, or an empty one.
    #[error("missing :authority")]
    Missing,
    /// Where only an address is accepted, the authority is not `ip:port`.
    #[error("authority {0:?} is not ip:port (IPv6 goes in brackets)")]
    NotAnAddress(String),
    /// The authority is neither an address nor a `hostname:port`.
    #[error("authority {0:?} is neither ip:port nor hostname:port")]
    NotATarget(String),
    /// The port is 0, which names no target.
    #[error("authority {0:?} has port 0")]
    PortZero(String),
    /// An IPv6 address names a zone (`%eth0`), which a peer may not choose.
    #[error("authority {0:?} carries an IPv6 zone id")]
    ZoneId(String),
}

/// Parses `ip:port` or `[ipv6]:port`.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, AuthorityError> {
    if authority.is_empty() {
        return Err(AuthorityError::Missing);
    }
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| AuthorityError::NotAnAddress(authority.to_owned()))?;
    if addr.port() == 0 {
        return Err(AuthorityError::PortZero(authority.to_owned()));
    }
    if let SocketAddr::V6(v6) = addr
        && (v6.scope_id() != 0 || authority.contains('%'))
    {
        return Err(AuthorityError::ZoneId(authority.to_owned()));
    }
    Ok(addr)
}

/// What a CONNECT asks for.
// Exhaustive on purpose: an authority is `host:port` with the host an IP
// literal or a name (RFC 9110 §7.2); there is no third form, and callers
// must handle both to be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A literal address.
    Addr(SocketAddr),
    /// A service by host name and service port.
    Service(ServiceName),
}

/// A service `hostname:port`, the host name in lower case without a
/// trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName {
    host: String,
    port: u16,
}

impl ServiceName {
    /// The host name, lower case.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The service port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// The addresses this target stands for, in the order to try them: the
    /// address itself, or what the system resolver answers for the name,
    /// duplicates removed. Each call asks afresh, so a name that moves (a
    /// Kubernetes Service, a DNS failover) is followed.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let name = match self {
            Target::Addr(addr) => return Ok(vec![*addr]),
            Target::Service(name) => name,
        };
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in tokio::net::lookup_host((name.host(), name.port())).await? {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} resolves to no address"),
            ));
        }
        Ok(addrs)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(addr) => addr.fmt(f),
            Target::Service(name) => name.fmt(f),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = AuthorityError;

    /// As [`parse_target`].
    fn from_str(text: &str) -> Result<Self, AuthorityError> {
        parse_target(text)
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::Addr(addr)
    }
}

/// Parses an authority into an address or a service name. Anything that
/// looks like an address but is not a valid one (`1.2.3:80`, `01.2.3.4:80`)
/// is refused rather than taken for a name.
pub fn parse_target(authority: &str) -> Result<Target, AuthorityError> {
    match parse_authority(authority) {
        Ok(addr) => return Ok(Target::Addr(addr)),
        Err(AuthorityError::NotAnAddress(_)) => {}
        Err(other) => return Err(other),
    }
    let not_a_target = || AuthorityError::NotATarget(authority.to_owned());
    let (host, port) = authority.rsplit_once(':').ok_or_else(not_a_target)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_target());
    }
    let port: u16 = port.parse().map_err(|_| not_a_target())?;
    if port == 0 {
        return Err(AuthorityError::PortZero(authority.to_owned()));
    }
    let host = normalize_host(host).ok_or_else(not_a_target)?;
    Ok(Target::Service(ServiceName { host, port }))
}

/// A DNS host name in lower case without its trailing dot, or `None` when
/// `host` is not one: labels of letters, digits and inner hyphens, 1 to 63
/// characters each, 253 in all, and a last label that is not all digits
/// (which would make it a mistyped IPv4 address).
pub fn normalize_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let last = host.rsplit('.').next().unwrap_or(host);
    if !labels_ok || last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_literal_addresses() {
        assert_eq!(
            parse_authority("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            parse_authority("[::1]:443").unwrap(),
            "[::1]:443".parse().unwrap()
        );
        assert_eq!(parse_authority("[fd00::1:2]:80").unwrap().port(), 80);
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "example.com:80",
            "127.0.0.1",
            "::1:80",
            "[::1]",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "[fe80::1%2]:80",
            "127.0.0.1:80/x",
            "127.0.0.1 :80",
            "01.2.3.4:80",
            "1.2.3:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn service_names_are_targets() {
        let service = |text: &str| match parse_target(text) {
            Ok(Target::Service(name)) => name,
            other => panic!("{text:?}: {other:?}"),
        };
        let echo = service("Echo.Default.svc.cluster.local.:8081");
        assert_eq!(echo.host(), "echo.default.svc.cluster.local");
        assert_eq!(echo.port(), 8081);
        assert_eq!(echo.to_string(), "echo.default.svc.cluster.local:8081");
        assert_eq!(service("localhost:1").host(), "localhost");
        assert_eq!(service("a-b.c9:65535").port(), 65535);
        assert_eq!(
            parse_target("[::1]:80"),
            Ok(Target::Addr("[::1]:80".parse().unwrap()))
        );
    }

    #[tokio::test]
    async fn targets_resolve_to_their_addresses() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(Target::from(addr).resolve().await.unwrap(), vec![addr]);
        let local = parse_target("localhost:9")
            .unwrap()
            .resolve()
            .await
            .unwrap();
        assert!(!local.is_empty());
        assert!(
            local.iter().all(|a| a.ip().is_loopback() && a.port() == 9),
            "{local:?}"
        );
        let mut unique = local.clone();
        unique.dedup();
        assert_eq!(unique, local);
        // A name under the reserved `.invalid` domain never resolves.
        assert!(
            parse_target("nothing.invalid:9")
                .unwrap()
                .resolve()
                .await
                .is_err()
        );
    }

    #[test]
    fn malformed_targets_are_refused() {
        for bad in [
            "",
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            ":80",
            "exa mple.com:80",
            "example..com:80",
            "-example.com:80",
            "example-.com:80",
            "ex_ample.com:80",
            "01.2.3.4:80",
            "1.2.3:80",
            "999.1.1.1:80",
            "[fe80::1%2]:80",
            "user@example.com:80",
            "example.com:80/path",
            "é.example:80",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("{}.example:80", "a".repeat(64));
        assert!(parse_target(&long).is_err());
    }
}
