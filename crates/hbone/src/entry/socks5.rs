//! A SOCKS5 entry (RFC 1928): no authentication, CONNECT only, IPv4 and
//! IPv6 addresses and domain names. A domain name is resolved here, with
//! the system resolver, at each request; its addresses are tried in order
//! and the HBONE server is asked for the address (the server's policy
//! judges the IP it would connect to, never a name).
//!
//! Each request becomes a tunnel to the configured HBONE server or, without
//! one, to port 15008 of the requested address, as Istio ambient does.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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
    let (target, early) = match timeout(NEGOTIATION_TIMEOUT, negotiate(&mut app)).await {
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "SOCKS5 negotiation timed out",
            ));
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok((Err(reply), _))) => return send_reply(&mut app, reply).await.map(|()| None),
        Ok(Ok((Ok(target), early))) => (target, early),
    };
    // Counted from the accept, negotiation included.
    let mut attempt = Attempt {
        started,
        ..Attempt::new(source, super::forward::placeholder(&target))
    };
    match config.open(dialer, target.clone(), &mut attempt).await {
        Ok(mut tunnel) => {
            send_reply(&mut app, Reply::Succeeded).await?;
            if !early.is_empty() {
                tunnel.write_all(&early).await?;
            }
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

/// The client's bytes during negotiation, read with as few reads as the
/// client allows: each read takes whatever has arrived (a greeting or a
/// request comes in one segment), and the parser takes what it needs from
/// that. Bytes a client sends after its request without waiting for the
/// reply (optimistic data) are kept, to go into the tunnel first.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    taken: usize,
}

/// A read's size during negotiation: more than a greeting or a request.
const NEGOTIATION_READ: usize = 512;

impl Incoming {
    /// The next `n` bytes, reading until they have arrived.
    async fn take(&mut self, app: &mut TcpStream, n: usize) -> io::Result<&[u8]> {
        while self.buf.len() - self.taken < n {
            self.buf.reserve(NEGOTIATION_READ);
            if app.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let start = self.taken;
        self.taken += n;
        Ok(&self.buf[start..self.taken])
    }

    /// The next `N` bytes as an array.
    async fn array<const N: usize>(&mut self, app: &mut TcpStream) -> io::Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(app, N).await?);
        Ok(out)
    }

    async fn byte(&mut self, app: &mut TcpStream) -> io::Result<u8> {
        Ok(self.array::<1>(app).await?[0])
    }

    async fn port(&mut self, app: &mut TcpStream) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.array(app).await?))
    }

    /// What came after the request.
    fn rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.taken);
        self.buf
    }
}

/// Reads the greeting and the request, and returns the target with any
/// bytes the client sent after its request. The inner `Err` is a reply to
/// send before closing (unsupported method, command or address type).
async fn negotiate(app: &mut TcpStream) -> io::Result<(Result<Target, Reply>, Vec<u8>)> {
    let mut incoming = Incoming::default();
    if incoming.byte(app).await? != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a SOCKS5 client",
        ));
    }
    let count = usize::from(incoming.byte(app).await?);
    if !incoming.take(app, count).await?.contains(&NO_AUTH) {
        app.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client offers no no-auth method",
        ));
    }
    app.write_all(&[VERSION, NO_AUTH]).await?;

    let [version, command, _reserved, address_type] = incoming.array(app).await?;
    if version != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad SOCKS5 request version",
        ));
    }
    let target = match address_type {
        ATYP_IPV4 => {
            let octets: [u8; 4] = incoming.array(app).await?;
            let port = incoming.port(app).await?;
            Ok(Target::Addr(SocketAddr::new(
                Ipv4Addr::from(octets).into(),
                port,
            )))
        }
        ATYP_IPV6 => {
            let octets: [u8; 16] = incoming.array(app).await?;
            let port = incoming.port(app).await?;
            Ok(Target::Addr(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                port,
            )))
        }
        ATYP_DOMAIN => {
            let len = usize::from(incoming.byte(app).await?);
            let host = String::from_utf8_lossy(incoming.take(app, len).await?).into_owned();
            let port = incoming.port(app).await?;
            // A host name (or an address written out, as some clients
            // send); anything else is not an address this entry takes.
            parse_target(&format!("{host}:{port}")).map_err(|_| Reply::AddressTypeNotSupported)
        }
        _ => Err(Reply::AddressTypeNotSupported),
    };
    let target = if command == CMD_CONNECT {
        target
    } else {
        Err(Reply::CommandNotSupported)
    };
    Ok((target, incoming.rest()))
}

async fn send_reply(app: &mut TcpStream, reply: Reply) -> io::Result<()> {
    // BND.ADDR/BND.PORT: the address we bound is of no use to the client
    // (the real connection is made by the HBONE server), so send zeros.
    app.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
        .await
}
