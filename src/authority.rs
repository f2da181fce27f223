//! The `:authority` of an HBONE CONNECT: the target as `ip:port`.
//!
//! Only literal addresses are accepted (IPv6 in brackets), as ztunnel sends
//! them. Host names, zone ids and port 0 are refused so that the server never
//! resolves names or guesses an interface on a peer's behalf.

use std::net::SocketAddr;

/// Why an authority is not a usable target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("missing :authority")]
    Missing,
    #[error("authority {0:?} is not ip:port (host names are not supported; IPv6 goes in brackets)")]
    NotAnAddress(String),
    #[error("authority {0:?} has port 0")]
    PortZero(String),
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
}
