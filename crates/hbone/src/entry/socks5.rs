//! A SOCKS5 entry (RFC 1928): no authentication, CONNECT only, IPv4 and
//! IPv6 addresses. Domain names are refused with "address type not
//! supported": HBONE targets are addresses, and resolving here would leak
//! the name to local DNS.
//!
//! Each request becomes a tunnel to the configured HBONE server or, without
//! one, to port 15008 of the requested address, as Istio ambient does.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use super::{Attempt, ClientRelay, record_dial_failure};
use crate::access::AccessLog;
use crate::client::{DialError, Dialer, Route};
use crate::identity::SpiffeId;
use crate::phased::Phased;

use crate::HBONE_PORT;

/// How long a client may take to send its greeting and request.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// SOCKS5 reply codes (RFC 1928 §6).
// Exhaustive on purpose: the codes are wire values fixed by the RFC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// The tunnel is open; bytes flow from here on.
    Succeeded = 0,
    /// Any failure without a better code.
    GeneralFailure = 1,
    /// Refused by policy (HTTP 403) or the TLS handshake failed.
    NotAllowed = 2,
    /// The HBONE server's network is unreachable.
    NetworkUnreachable = 3,
    /// The HBONE server or the target could not be reached, or not in time.
    HostUnreachable = 4,
    /// The HBONE server refused the connection, or answered 503.
    ConnectionRefused = 5,
    /// The client asked for something other than CONNECT.
    CommandNotSupported = 7,
    /// The client sent a domain name or an unknown address type.
    AddressTypeNotSupported = 8,
}

impl Reply {
    /// The reply for a tunnel that could not be opened.
    pub fn for_dial_error(error: &DialError) -> Reply {
        match error {
            DialError::Status { status, .. } => match status.as_u16() {
                403 => Reply::NotAllowed,
                503 => Reply::ConnectionRefused,
                504 => Reply::HostUnreachable,
                _ => Reply::GeneralFailure,
            },
            DialError::Connect { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
                io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
                _ => Reply::HostUnreachable,
            },
            DialError::Timeout { .. } => Reply::HostUnreachable,
            DialError::Tls { .. } => Reply::NotAllowed,
            DialError::NoExpectedIdentity | DialError::Http2 { .. } | DialError::Closed { .. } => {
                Reply::GeneralFailure
            }
        }
    }
}

/// Where a SOCKS5 entry sends its tunnels.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SocksConfig {
    /// To port 15008 of each requested address, as Istio ambient does; the
    /// server there must prove one of `server_ids`.
    PerTarget {
        /// The identities each server may prove; at least one.
        server_ids: Vec<SpiffeId>,
    },
    /// Every tunnel along one route (one server, or a gateway).
    Fixed(Route),
}

impl SocksConfig {
    fn route_for(&self, target: SocketAddr) -> Route {
        match self {
            SocksConfig::PerTarget { server_ids } => Route::Direct {
                server: SocketAddr::new(target.ip(), HBONE_PORT),
                server_ids: server_ids.clone(),
            },
            SocksConfig::Fixed(route) => route.clone(),
        }
    }
}

/// Accepts SOCKS5 clients on `listener` forever.
pub async fn run(
    listener: TcpListener,
    dialer: Dialer,
    config: SocksConfig,
    log: Arc<dyn AccessLog>,
) {
    serve(listener, dialer, config, log, std::future::pending()).await;
}

/// As [`run`], until `shutdown` resolves: then stops accepting and returns
/// once the tunnels in flight have ended. Bound that wait with a timeout of
/// your choice; then [`Dialer::close`] ends the connections cleanly.
pub async fn serve(
    listener: TcpListener,
    dialer: Dialer,
    config: SocksConfig,
    log: Arc<dyn AccessLog>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let config = Arc::new(config);
    // Negotiation and dial are boxed and hand back the relay, so the task
    // keeps only the relay's state for the tunnel's lifetime.
    super::accept_until(listener, "socks5", shutdown, |app, source| {
        Phased::new(open(
            app,
            source,
            dialer.clone(),
            config.clone(),
            log.clone(),
        ))
    })
    .await;
}

/// Negotiates, opens the tunnel and answers the client; returns the relay,
/// or `None` once the client has been told why not.
async fn open(
    app: TcpStream,
    source: SocketAddr,
    dialer: Dialer,
    config: Arc<SocksConfig>,
    log: Arc<dyn AccessLog>,
) -> Option<ClientRelay> {
    match negotiate_and_open(app, source, &dialer, &config, &log).await {
        Ok(relay) => relay,
        Err(e) => {
            tracing::debug!(%source, error = %e, "socks5: client dropped");
            None
        }
    }
}

async fn negotiate_and_open(
    mut app: TcpStream,
    source: SocketAddr,
    dialer: &Dialer,
    config: &SocksConfig,
    log: &Arc<dyn AccessLog>,
) -> io::Result<Option<ClientRelay>> {
    let started = Instant::now();
    let target = match timeout(NEGOTIATION_TIMEOUT, negotiate(&mut app)).await {
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "SOCKS5 negotiation timed out",
            ));
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(reply))) => return send_reply(&mut app, reply).await.map(|()| None),
        Ok(Ok(Ok(target))) => target,
    };
    // Counted from the accept, negotiation included.
    let attempt = Attempt {
        started,
        ..Attempt::new(source, target)
    };
    match dialer
        .open(&config.route_for(target), &attempt.request())
        .await
    {
        Ok(tunnel) => {
            send_reply(&mut app, Reply::Succeeded).await?;
            Ok(Some(ClientRelay::new(
                app,
                tunnel,
                &attempt,
                log.clone(),
                dialer,
            )))
        }
        Err(e) => {
            tracing::warn!(%source, %target, error = %e, "socks5: tunnel failed");
            record_dial_failure(log, dialer, &attempt, &e);
            send_reply(&mut app, Reply::for_dial_error(&e))
                .await
                .map(|()| None)
        }
    }
}

/// Reads the greeting and the request. The inner `Err` is a reply to send
/// before closing (unsupported method, command or address type).
async fn negotiate(app: &mut TcpStream) -> io::Result<Result<SocketAddr, Reply>> {
    let mut header = [0u8; 2];
    app.read_exact(&mut header).await?;
    if header[0] != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a SOCKS5 client",
        ));
    }
    let mut methods = vec![0u8; usize::from(header[1])];
    app.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        app.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client offers no no-auth method",
        ));
    }
    app.write_all(&[VERSION, NO_AUTH]).await?;

    let mut request = [0u8; 4];
    app.read_exact(&mut request).await?;
    let [version, command, _reserved, address_type] = request;
    if version != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad SOCKS5 request version",
        ));
    }
    let ip = match address_type {
        ATYP_IPV4 => {
            let mut octets = [0u8; 4];
            app.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        ATYP_IPV6 => {
            let mut octets = [0u8; 16];
            app.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        ATYP_DOMAIN => {
            let len = app.read_u8().await?;
            let mut name = vec![0u8; usize::from(len) + 2];
            app.read_exact(&mut name).await?;
            return Ok(Err(Reply::AddressTypeNotSupported));
        }
        _ => return Ok(Err(Reply::AddressTypeNotSupported)),
    };
    let port = app.read_u16().await?;
    if command != CMD_CONNECT {
        return Ok(Err(Reply::CommandNotSupported));
    }
    Ok(Ok(SocketAddr::new(ip, port)))
}

async fn send_reply(app: &mut TcpStream, reply: Reply) -> io::Result<()> {
    // BND.ADDR/BND.PORT: the address we bound is of no use to the client
    // (the real connection is made by the HBONE server), so send zeros.
    app.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
        .await
}
