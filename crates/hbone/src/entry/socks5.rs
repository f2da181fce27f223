//! A SOCKS5 entry (RFC 1928): no authentication, or username and password
//! (RFC 1929, see [`Credentials`]) when the entry is given credentials;
//! CONNECT only, IPv4 and IPv6 addresses and domain names. A domain name is resolved here, with
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

mod auth;

pub use auth::{Credentials, CredentialsError, CredentialsHandle};
#[doc(hidden)]
pub use auth::{UserPassword, parse_auth};

use super::ClientSources;
use super::access::Refusals;

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

/// Who may use a SOCKS5 entry.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SocksAccess {
    /// The sources served; others are closed right after accept.
    pub sources: ClientSources,
    /// With credentials, clients must authenticate with a user name and
    /// password (RFC 1929); without, no authentication is asked.
    pub credentials: Option<CredentialsHandle>,
}

impl SocksAccess {
    /// Serves only `sources`.
    pub fn with_sources(mut self, sources: ClientSources) -> Self {
        self.sources = sources;
        self
    }

    /// Asks every client for a user name and password from `credentials`.
    pub fn with_credentials(mut self, credentials: CredentialsHandle) -> Self {
        self.credentials = Some(credentials);
        self
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
    let access = SocksAccess::default();
    serve_with_access(listener, dialer, config, log, access, shutdown).await;
}

/// As [`serve`], letting in only whom `access` allows.
pub async fn serve_with_access(
    listener: TcpListener,
    dialer: Dialer,
    config: SocksConfig,
    log: Arc<dyn AccessLog>,
    access: SocksAccess,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let entry = Arc::new(Socks {
        dialer,
        config,
        log,
        credentials: access.credentials,
        refused: Refusals::new("socks5", "username/password refused"),
    });
    // Negotiation and dial are boxed and hand back the relay, so the task
    // keeps only the relay's state for the tunnel's lifetime.
    let workers = entry.dialer.workers().cloned();
    super::accept_until(
        listener,
        "socks5",
        &access.sources,
        workers.as_ref(),
        shutdown,
        move |app, source| Phased::new(open(app, source, entry.clone())),
    )
    .await;
}

/// What every client of one SOCKS5 entry shares.
struct Socks {
    dialer: Dialer,
    config: SocksConfig,
    log: Arc<dyn AccessLog>,
    credentials: Option<CredentialsHandle>,
    /// Clients that failed to authenticate.
    refused: Refusals,
}

/// Negotiates, opens the tunnel and answers the client; returns the relay,
/// or `None` once the client has been told why not.
async fn open(app: TcpStream, source: SocketAddr, entry: Arc<Socks>) -> Option<ClientRelay> {
    match negotiate_and_open(app, source, &entry).await {
        Ok(relay) => relay,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            entry.refused.note(source);
            None
        }
        Err(e) => {
            tracing::debug!(%source, error = %e, "socks5: client dropped");
            None
        }
    }
}

async fn negotiate_and_open(
    mut app: TcpStream,
    source: SocketAddr,
    entry: &Socks,
) -> io::Result<Option<ClientRelay>> {
    let Socks {
        dialer,
        config,
        log,
        credentials,
        ..
    } = entry;
    let started = Instant::now();
    let credentials = credentials.as_ref().map(CredentialsHandle::current);
    let negotiated = timeout(
        NEGOTIATION_TIMEOUT,
        negotiate(&mut app, credentials.as_deref()),
    )
    .await;
    let (target, early) = match negotiated {
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

/// How far a step of the negotiation has got on the bytes received so far.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The step needs more bytes than have arrived.
    Incomplete,
    /// The step is complete: what it said, and how many bytes it took.
    Complete(T, usize),
}

/// A client the entry stops talking to (no reply can help it).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiationError {
    /// The greeting's version is not 5.
    NotSocks5,
    /// The greeting does not offer the method the entry asks for: "no
    /// authentication", or "username/password" when the entry has
    /// credentials (the entry answers "no acceptable method" before
    /// closing).
    NoAcceptableMethod,
    /// The request's version is not 5.
    BadRequestVersion,
    /// The username/password request's version is not 1.
    BadAuthVersion,
}

impl std::fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NegotiationError::NotSocks5 => "not a SOCKS5 client",
            NegotiationError::NoAcceptableMethod => {
                "client offers none of the methods the entry accepts"
            }
            NegotiationError::BadRequestVersion => "bad SOCKS5 request version",
            NegotiationError::BadAuthVersion => "bad username/password request version",
        })
    }
}

/// Reads the greeting (version, method count, methods) at the start of
/// `data`, for an entry without credentials (it must offer "no
/// authentication"). Pure, so that it can be tested and fuzzed without
/// sockets; decided on as few bytes as possible (a wrong version on the
/// first).
#[doc(hidden)]
pub fn parse_greeting(data: &[u8]) -> Result<Parsed<()>, NegotiationError> {
    parse_greeting_for(data, NO_AUTH)
}

/// As [`parse_greeting`], for an entry that asks for `method`.
#[doc(hidden)]
pub fn parse_greeting_for(data: &[u8], method: u8) -> Result<Parsed<()>, NegotiationError> {
    match data {
        [] => Ok(Parsed::Incomplete),
        [version, ..] if *version != VERSION => Err(NegotiationError::NotSocks5),
        [_] => Ok(Parsed::Incomplete),
        [_, count, methods @ ..] => {
            let count = usize::from(*count);
            match methods.get(..count) {
                None => Ok(Parsed::Incomplete),
                Some(offered) if offered.contains(&method) => Ok(Parsed::Complete((), 2 + count)),
                Some(_) => Err(NegotiationError::NoAcceptableMethod),
            }
        }
    }
}

/// Reads the request (version, command, reserved byte, address, port) at
/// the start of `data`. Complete with the target, or with the reply that
/// refuses it (unsupported command or address type). Pure, like
/// [`parse_greeting`].
#[doc(hidden)]
pub fn parse_request(data: &[u8]) -> Result<Parsed<Result<Target, Reply>>, NegotiationError> {
    let Some(&[version, command, _reserved, address_type]) = data.get(..4) else {
        return Ok(Parsed::Incomplete);
    };
    if version != VERSION {
        return Err(NegotiationError::BadRequestVersion);
    }
    let rest = &data[4..];
    let port_at = |at: usize| {
        rest.get(at..at + 2)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), 4 + at + 2))
    };
    let parsed = match address_type {
        ATYP_IPV4 => port_at(4).map(|(port, used)| {
            let octets: [u8; 4] = rest[..4].try_into().expect("four bytes");
            let addr = SocketAddr::new(Ipv4Addr::from(octets).into(), port);
            (Ok(Target::Addr(addr)), used)
        }),
        ATYP_IPV6 => port_at(16).map(|(port, used)| {
            let octets: [u8; 16] = rest[..16].try_into().expect("sixteen bytes");
            let addr = SocketAddr::new(Ipv6Addr::from(octets).into(), port);
            (Ok(Target::Addr(addr)), used)
        }),
        ATYP_DOMAIN => rest.first().and_then(|&len| {
            let len = usize::from(len);
            port_at(1 + len).map(|(port, used)| {
                let host = String::from_utf8_lossy(&rest[1..1 + len]);
                // A host name (or an address written out, as some clients
                // send); anything else is not an address this entry takes.
                let target = parse_target(&format!("{host}:{port}"))
                    .map_err(|_| Reply::AddressTypeNotSupported);
                (target, used)
            })
        }),
        _ => Some((Err(Reply::AddressTypeNotSupported), 4)),
    };
    Ok(match parsed {
        None => Parsed::Incomplete,
        Some((_, used)) if command != CMD_CONNECT => {
            Parsed::Complete(Err(Reply::CommandNotSupported), used)
        }
        Some((target, used)) => Parsed::Complete(target, used),
    })
}

/// A read's size during negotiation: more than a greeting or a request.
const NEGOTIATION_READ: usize = 512;

/// Reads more of the client's bytes onto `buf`; each read takes whatever
/// has arrived (a greeting or a request comes in one segment).
async fn read_more(app: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(NEGOTIATION_READ);
    if app.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads the greeting, the username and password when the entry has
/// `credentials`, and the request; returns the target with any bytes the
/// client sent after its request without waiting for the reply (optimistic
/// data, to go into the tunnel first). The inner `Err` is a reply to send
/// before closing (unsupported command or address type). Credentials that
/// do not match end it with a `PermissionDenied` error, once the client
/// has been told.
async fn negotiate(
    app: &mut TcpStream,
    credentials: Option<&Credentials>,
) -> io::Result<(Result<Target, Reply>, Vec<u8>)> {
    let invalid = |e: NegotiationError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let method = match credentials {
        Some(_) => auth::USER_PASS,
        None => NO_AUTH,
    };
    let mut buf = Vec::new();
    let greeting = loop {
        match parse_greeting_for(&buf, method) {
            Ok(Parsed::Complete((), used)) => break used,
            Ok(Parsed::Incomplete) => read_more(app, &mut buf).await?,
            Err(e) => {
                if e == NegotiationError::NoAcceptableMethod {
                    app.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
                }
                return Err(invalid(e));
            }
        }
    };
    app.write_all(&[VERSION, method]).await?;
    buf.drain(..greeting);
    if let Some(credentials) = credentials {
        let (accepted, used) = loop {
            match parse_auth(&buf).map_err(invalid)? {
                Parsed::Complete(given, used) => {
                    break (credentials.verify(given.user, given.password), used);
                }
                Parsed::Incomplete => read_more(app, &mut buf).await?,
            }
        };
        auth::consume_secret(&mut buf, used);
        app.write_all(&auth::auth_reply(accepted)).await?;
        if !accepted {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "username/password refused",
            ));
        }
    }
    loop {
        match parse_request(&buf).map_err(invalid)? {
            Parsed::Complete(target, used) => {
                buf.drain(..used);
                return Ok((target, buf));
            }
            Parsed::Incomplete => read_more(app, &mut buf).await?,
        }
    }
}

async fn send_reply(app: &mut TcpStream, reply: Reply) -> io::Result<()> {
    // BND.ADDR/BND.PORT: the address we bound is of no use to the client
    // (the real connection is made by the HBONE server), so send zeros.
    app.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_are_decided_on_as_few_bytes_as_possible() {
        assert_eq!(parse_greeting(&[]), Ok(Parsed::Incomplete));
        assert_eq!(parse_greeting(&[4]), Err(NegotiationError::NotSocks5));
        assert_eq!(parse_greeting(&[5]), Ok(Parsed::Incomplete));
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(Parsed::Incomplete));
        assert_eq!(
            parse_greeting(&[5, 2, 2, 0, 9]),
            Ok(Parsed::Complete((), 4))
        );
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(NegotiationError::NoAcceptableMethod)
        );
        assert_eq!(
            parse_greeting(&[5, 0]),
            Err(NegotiationError::NoAcceptableMethod)
        );
        // An entry with credentials wants username/password, and only it.
        assert_eq!(
            parse_greeting_for(&[5, 2, 0, 2], auth::USER_PASS),
            Ok(Parsed::Complete((), 4))
        );
        assert_eq!(
            parse_greeting_for(&[5, 1, 0], auth::USER_PASS),
            Err(NegotiationError::NoAcceptableMethod)
        );
    }

    #[test]
    fn requests_give_their_target_or_the_reply_refusing_it() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1F, 0x90];
        for short in 0..v4.len() {
            assert_eq!(parse_request(&v4[..short]), Ok(Parsed::Incomplete));
        }
        let addr = Target::Addr("127.0.0.1:8080".parse().unwrap());
        assert_eq!(parse_request(&v4), Ok(Parsed::Complete(Ok(addr), 10)));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&[0; 15]);
        v6.extend_from_slice(&[1, 0, 80, b'x']);
        let addr = Target::Addr("[::1]:80".parse().unwrap());
        assert_eq!(parse_request(&v6), Ok(Parsed::Complete(Ok(addr), 22)));
        let name = [&[5, 1, 0, 3, 5][..], b"a.B.c", &[0, 80]].concat();
        let Ok(Parsed::Complete(Ok(Target::Service(service)), 12)) = parse_request(&name) else {
            panic!("{:?}", parse_request(&name));
        };
        assert_eq!(service.to_string(), "a.b.c:80");
        let bad_name = [&[5, 1, 0, 3, 2][..], b"a/", &[0, 80]].concat();
        assert_eq!(
            parse_request(&bad_name),
            Ok(Parsed::Complete(Err(Reply::AddressTypeNotSupported), 9))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 1]),
            Ok(Parsed::Complete(Err(Reply::AddressTypeNotSupported), 4))
        );
        let bind = [5, 2, 0, 1, 127, 0, 0, 1, 0, 80];
        assert_eq!(
            parse_request(&bind),
            Ok(Parsed::Complete(Err(Reply::CommandNotSupported), 10))
        );
        assert_eq!(
            parse_request(&[4, 1, 0, 1]),
            Err(NegotiationError::BadRequestVersion)
        );
    }
}

#[cfg(test)]
mod auth_tests {
    use std::path::Path;

    use super::*;

    /// Runs `negotiate` with credentials for alice against a client that
    /// sends `bytes` one at a time (so every step sees partial input);
    /// what `negotiate` returned, and every byte the client got back.
    async fn negotiate_slowly(bytes: Vec<u8>) -> (io::Result<Target>, Vec<u8>) {
        let credentials = Credentials::parse(b"alice:s3cret\n", Path::new("users")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.set_nodelay(true).unwrap();
            for byte in bytes {
                // The entry may have closed already (refused credentials).
                if client.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut answers = Vec::new();
            let _ = client.read_to_end(&mut answers).await;
            answers
        });
        let (mut app, _) = listener.accept().await.unwrap();
        let negotiated = negotiate(&mut app, Some(&credentials)).await;
        drop(app);
        let answers = client.await.unwrap();
        let target = negotiated.map(|(target, early)| {
            assert!(early.is_empty());
            target.expect("a CONNECT to an address")
        });
        (target, answers)
    }

    /// Greeting and credentials, and the request when `request`.
    fn client_bytes(password: &[u8], request: bool) -> Vec<u8> {
        let mut bytes = vec![5, 2, 0, 2, 1, 5];
        bytes.extend_from_slice(b"alice");
        bytes.push(password.len() as u8);
        bytes.extend_from_slice(password);
        if request {
            bytes.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        }
        bytes
    }

    #[tokio::test]
    async fn the_right_password_arriving_byte_by_byte_gets_in() {
        let (target, answers) = negotiate_slowly(client_bytes(b"s3cret", true)).await;
        assert_eq!(
            target.unwrap(),
            Target::Addr("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(answers, [5, 2, 1, 0], "username/password chosen, accepted");
    }

    #[tokio::test]
    async fn a_wrong_password_is_told_and_refused() {
        // No request follows: bytes left unread would turn the close into
        // a reset, which may overtake the answer.
        let (target, answers) = negotiate_slowly(client_bytes(b"s3creT", false)).await;
        assert_eq!(target.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(answers, [5, 2, 1, 1], "username/password chosen, refused");
    }

    #[tokio::test]
    async fn a_client_without_username_password_gets_no_acceptable_method() {
        let (target, answers) = negotiate_slowly(vec![5, 1, 0]).await;
        assert_eq!(target.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(answers, [5, 0xff]);
    }
}
