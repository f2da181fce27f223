//! Where an entry's tunnels go when the operator named the HBONE server or
//! the target by host name: names are resolved at each new connection (a
//! name that moves is followed; nothing is cached), and every address is
//! tried in order until one opens.

use std::net::SocketAddr;

use super::Attempt;
use crate::authority::{ServiceName, Target};
use crate::client::{DialError, Dialer, Route, Stage, Tunnel};
use crate::identity::SpiffeId;

/// A route and a target, either of which may be a host name.
///
/// ```
/// use hbone::authority::Target;
/// use hbone::entry::Destination;
///
/// let destination = Destination::direct(
///     "localhost:15008".parse().unwrap(),
///     vec!["spiffe://cluster.local/ns/demo/sa/server".parse().unwrap()],
///     "db.internal:5432".parse::<Target>().unwrap(),
/// );
/// assert_eq!(destination.target().to_string(), "db.internal:5432");
/// ```
#[derive(Debug, Clone)]
pub struct Destination {
    upstream: Upstream,
    target: Target,
}

#[derive(Debug, Clone)]
enum Upstream {
    /// A route with addresses.
    Route(Route),
    /// A direct route to a server named by host name.
    Named {
        server: ServiceName,
        server_ids: Vec<SpiffeId>,
    },
}

impl Destination {
    /// Tunnels along `route` to `target`.
    pub fn new(route: Route, target: impl Into<Target>) -> Self {
        Destination {
            upstream: Upstream::Route(route),
            target: target.into(),
        }
    }

    /// Tunnels straight to the HBONE server `server` (an address or a host
    /// name), which must prove one of `server_ids`, to `target`.
    pub fn direct(server: Target, server_ids: Vec<SpiffeId>, target: impl Into<Target>) -> Self {
        let upstream = match server {
            Target::Addr(server) => Upstream::Route(Route::Direct { server, server_ids }),
            Target::Service(server) => Upstream::Named { server, server_ids },
        };
        Destination {
            upstream,
            target: target.into(),
        }
    }

    /// The target, as configured.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The routes to try, in order.
    async fn routes(&self) -> Result<Vec<Route>, DialError> {
        match &self.upstream {
            Upstream::Route(route) => Ok(vec![route.clone()]),
            Upstream::Named { server, server_ids } => {
                let servers = resolve(&Target::Service(server.clone())).await?;
                Ok(servers
                    .into_iter()
                    .map(|server| Route::Direct {
                        server,
                        server_ids: server_ids.clone(),
                    })
                    .collect())
            }
        }
    }

    /// Resolves what needs resolving and opens the first tunnel that
    /// opens; `attempt.target` says which target address was tried last.
    pub(crate) async fn open(
        &self,
        dialer: &Dialer,
        attempt: &mut Attempt,
    ) -> Result<Tunnel, DialError> {
        let targets = resolve(&self.target).await?;
        let routes = self.routes().await?;
        let mut candidates = Vec::with_capacity(routes.len() * targets.len());
        for route in &routes {
            candidates.extend(targets.iter().map(|target| (route.clone(), *target)));
        }
        open_first(dialer, candidates, attempt).await
    }
}

/// As the startup line says it: `server ADDR (IDS) -> target HOST:PORT`.
impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.upstream {
            Upstream::Route(route) => write!(f, "{route}")?,
            Upstream::Named { server, server_ids } => {
                let ids: Vec<String> = server_ids.iter().map(SpiffeId::to_string).collect();
                write!(f, "server {server} ({})", ids.join(" or "))?;
            }
        }
        write!(f, " -> target {}", self.target)
    }
}

/// `target`'s addresses, or why there are none.
pub(crate) async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, DialError> {
    target.resolve().await.map_err(|source| DialError::Resolve {
        name: target.to_string(),
        source,
    })
}

/// Whether another address may succeed where this one failed, and which.
enum Retry {
    /// The server could not be reached: skip every candidate through it.
    OtherServer,
    /// The server could not reach this target address: try the next.
    OtherTarget,
    /// A verdict (policy, identity, a bad request) another address would
    /// get too.
    No,
}

fn retry_after(error: &DialError) -> Retry {
    match error {
        DialError::Connect { .. }
        | DialError::Closed { .. }
        | DialError::Http2 { .. }
        | DialError::Timeout {
            stage: Stage::Connect | Stage::Handshake,
            ..
        } => Retry::OtherServer,
        DialError::Status { status, .. } if matches!(status.as_u16(), 502..=504) => {
            Retry::OtherTarget
        }
        DialError::Timeout { .. } => Retry::OtherTarget,
        _ => Retry::No,
    }
}

/// The address a route dials first.
fn first_hop(route: &Route) -> Option<SocketAddr> {
    match route {
        Route::Direct { server, .. } => Some(*server),
        Route::Gateway { gateway, .. } => Some(*gateway),
    }
}

/// Tries each (route, target) in order until a tunnel opens; gives up on
/// a server once it could not be reached, and at once on a verdict that
/// another address would get too. Returns the last error.
pub(crate) async fn open_first(
    dialer: &Dialer,
    candidates: impl IntoIterator<Item = (Route, SocketAddr)>,
    attempt: &mut Attempt,
) -> Result<Tunnel, DialError> {
    let mut unreachable: Vec<SocketAddr> = Vec::new();
    let mut last = None;
    for (route, target) in candidates {
        let hop = first_hop(&route);
        if hop.is_some_and(|hop| unreachable.contains(&hop)) {
            continue;
        }
        attempt.target = target;
        attempt.gateway = match &route {
            Route::Gateway { gateway, .. } => Some(*gateway),
            Route::Direct { .. } => None,
        };
        let error = match dialer.open(&route, &attempt.request()).await {
            Ok(tunnel) => return Ok(tunnel),
            Err(error) => error,
        };
        match retry_after(&error) {
            Retry::No => return Err(error),
            Retry::OtherServer => unreachable.extend(hop),
            Retry::OtherTarget => {}
        }
        tracing::debug!(%target, error = %error, "trying the next address");
        last = Some(error);
    }
    // Never empty: a resolved name has at least one address, and the first
    // candidate of each server is always tried.
    Err(last.unwrap_or(DialError::NoExpectedIdentity))
}

#[cfg(all(test, feature = "ca"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::test_support::{test_id, test_identities};
    use crate::{Server, ServerConfig};

    /// A real server on loopback, an echo target, and a dialer that trusts
    /// the server: (dialer, server address, echo address).
    async fn setup() -> (Dialer, SocketAddr, SocketAddr) {
        let [server_identity, client_identity] = test_identities(["server", "client"]);
        let server = Server::bind(ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            server_identity,
        ))
        .await
        .unwrap();
        let server_addr = server.local_addr();
        tokio::spawn(server.run());
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = conn.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        (
            Dialer::new(&client_identity).unwrap(),
            server_addr,
            echo_addr,
        )
    }

    /// An address on loopback where nothing listens.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    fn direct(server: SocketAddr) -> Route {
        Route::Direct {
            server,
            server_ids: vec![test_id("server")],
        }
    }

    fn attempt() -> Attempt {
        Attempt::new("127.0.0.1:40000".parse().unwrap(), closed_addr())
    }

    fn closed_addr() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }

    async fn echoes(tunnel: Tunnel) {
        let mut tunnel = tunnel;
        tunnel.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        tunnel.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }

    #[tokio::test]
    async fn the_next_address_is_tried_after_an_unreachable_server_or_target() {
        let (dialer, server, echo) = setup().await;
        let dead_server = closed_port().await;
        let dead_target = closed_port().await;
        let mut attempt = attempt();
        let candidates = [
            (direct(dead_server), echo),
            // Skipped: its server already failed.
            (direct(dead_server), dead_target),
            // The server answers 503: the next target is tried.
            (direct(server), dead_target),
            (direct(server), echo),
        ];
        let tunnel = open_first(&dialer, candidates, &mut attempt)
            .await
            .expect("the last candidate opens");
        assert_eq!(attempt.target, echo);
        echoes(tunnel).await;
    }

    #[tokio::test]
    async fn a_policy_verdict_is_final() {
        let (dialer, server, echo) = setup().await;
        let mut attempt = attempt();
        // The default policy refuses targets off loopback with 403, which
        // another address would get too: the echo is never tried.
        let candidates = [
            (direct(server), "192.0.2.1:80".parse().unwrap()),
            (direct(server), echo),
        ];
        match open_first(&dialer, candidates, &mut attempt).await {
            Err(DialError::Status { status, .. }) => assert_eq!(status.as_u16(), 403),
            other => panic!("expected the 403, got {:?}", other.map(|_| ())),
        }
        assert_eq!(
            attempt.target,
            "192.0.2.1:80".parse::<SocketAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn every_server_failing_returns_the_last_error() {
        let (dialer, _server, echo) = setup().await;
        let (first, second) = (closed_port().await, closed_port().await);
        let candidates = [(direct(first), echo), (direct(second), echo)];
        match open_first(&dialer, candidates, &mut attempt()).await {
            Err(DialError::Connect { server, .. }) => assert_eq!(server, second),
            other => panic!("expected a connect error, got {:?}", other.map(|_| ())),
        }
    }

    /// The record of a tunnel names the gateway its route went through,
    /// and no gateway once a direct route is tried after it.
    #[tokio::test]
    async fn the_attempt_knows_the_gateway_it_went_through() {
        let (dialer, server, echo) = setup().await;
        let dead_gateway = closed_port().await;
        let through = Route::Gateway {
            gateway: dead_gateway,
            gateway_ids: vec![test_id("gateway")],
            service: echo.to_string(),
            server_ids: vec![test_id("server")],
        };
        let mut attempt = attempt();
        let failed = open_first(&dialer, [(through.clone(), echo)], &mut attempt).await;
        assert!(matches!(failed, Err(DialError::Connect { .. })));
        assert_eq!(attempt.gateway, Some(dead_gateway));
        let candidates = [(through, echo), (direct(server), echo)];
        let tunnel = open_first(&dialer, candidates, &mut attempt)
            .await
            .expect("the direct route opens");
        assert_eq!(attempt.gateway, None);
        echoes(tunnel).await;
    }

    #[tokio::test]
    async fn names_are_resolved_for_the_server_and_the_target() {
        let (dialer, server, echo) = setup().await;
        // `localhost` may resolve to ::1 first, where neither listens: the
        // addresses are tried in order until 127.0.0.1 answers.
        let destination = Destination::direct(
            format!("localhost:{}", server.port()).parse().unwrap(),
            vec![test_id("server")],
            format!("localhost:{}", echo.port())
                .parse::<Target>()
                .unwrap(),
        );
        assert_eq!(
            destination.to_string(),
            format!(
                "server localhost:{} ({}) -> target localhost:{}",
                server.port(),
                test_id("server"),
                echo.port()
            )
        );
        let mut attempt = attempt();
        let tunnel = destination.open(&dialer, &mut attempt).await.unwrap();
        // The server was asked for an address, never the name.
        assert_eq!(attempt.target, echo);
        echoes(tunnel).await;

        let nowhere = Destination::direct(
            "nothing.invalid:15008".parse().unwrap(),
            vec![test_id("server")],
            echo,
        );
        match nowhere.open(&dialer, &mut attempt).await {
            Err(error @ DialError::Resolve { .. }) => {
                assert_eq!(error.reason(), "resolve_failed");
                assert!(
                    error.to_string().contains("nothing.invalid:15008"),
                    "{error}"
                );
            }
            other => panic!("expected a resolve error, got {:?}", other.map(|_| ())),
        }
    }
}
