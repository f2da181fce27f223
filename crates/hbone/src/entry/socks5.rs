//! A SOCKS5 entry (RFC 1928): no authentication, CONNECT only, IPv4 and
//! IPv6 addresses and domain names. A domain name is resolved here, with
//! the system resolver, at each request; its addresses are tried in order
//! and the HBONE server is asked for the address (the server's policy
//! judges the IP it would connect to, never a name).
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

use super::destination::{open_first, resolve};
use super::{Attempt, ClientRelay, Destination, record_dial_failure};
use crate::access::AccessLog;
use crate::authority::{Target, parse_target};
use crate::client::{DialError, Dialer, Route, Tunnel};
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
    /// The client sent an unknown address type, or a domain name that is
    /// not a valid host name.
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
            DialError::Timeout { .. } | DialError::Resolve { .. } => Reply::HostUnreachable,
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
    /// Every tunnel to one HBONE server given by address or host name (a
    /// name is resolved at each request, every address tried in order);
    /// it must prove one of `server_ids`.
    Server {
        /// The HBONE server.
        server: Target,
        /// The identities it may prove; at least one.
        server_ids: Vec<SpiffeId>,
    },
}

impl SocksConfig {
    /// Opens a tunnel to `target` the way this entry is configured to.
    async fn open(
        &self,
        dialer: &Dialer,
        target: Target,
        attempt: &mut Attempt,
    ) -> Result<Tunnel, DialError> {
        match self {
            SocksConfig::PerTarget { server_ids } => {
                let candidates: Vec<(Route, SocketAddr)> = resolve(&target)
                    .await?
                    .into_iter()
                    .map(|addr| {
                        let route = Route::Direct {
                            server: SocketAddr::new(addr.ip(), HBONE_PORT),
                            server_ids: server_ids.clone(),
                        };
                        (route, addr)
                    })
                    .collect();
                open_first(dialer, candidates, attempt).await
            }
            SocksConfig::Fixed(route) => {
                Destination::new(route.clone(), target)
                    .open(dialer, attempt)
                    .await
            }
            SocksConfig::Server { server, server_ids } => {
                Destination::direct(server.clone(), server_ids.clone(), target)
                    .open(dialer, attempt)
                    .await
            }
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
    let mut attempt = Attempt {
        started,
        ..Attempt::new(source, super::forward::placeholder(&target))
    };
    match config.open(dialer, target.clone(), &mut attempt).await {
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
async fn negotiate(app: &mut TcpStream) -> io::Result<Result<Target, Reply>> {
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
            let mut name = vec![0u8; usize::from(len)];
            app.read_exact(&mut name).await?;
            let port = app.read_u16().await?;
            if command != CMD_CONNECT {
                return Ok(Err(Reply::CommandNotSupported));
            }
            // A host name (or an address written out, as some clients
            // send); anything else is not an address this entry takes.
            let host = String::from_utf8_lossy(&name);
            return Ok(
                parse_target(&format!("{host}:{port}")).map_err(|_| Reply::AddressTypeNotSupported)
            );
        }
        _ => return Ok(Err(Reply::AddressTypeNotSupported)),
    };
    let port = app.read_u16().await?;
    if command != CMD_CONNECT {
        return Ok(Err(Reply::CommandNotSupported));
    }
    Ok(Ok(Target::Addr(SocketAddr::new(ip, port))))
}

async fn send_reply(app: &mut TcpStream, reply: Reply) -> io::Result<()> {
    // BND.ADDR/BND.PORT: the address we bound is of no use to the client
    // (the real connection is made by the HBONE server), so send zeros.
    app.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
        .await
}
