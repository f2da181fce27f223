//! The dialer without sockets: its tunnels go on HTTP/2 connections over
//! memory, handed to it in place of a TLS handshake, and time is paused.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::metrics::ResponseFlag;
use crate::pool::ConnState;
use crate::test_support::{default_h2_pair, settle, test_id, test_identity};

const SERVER: &str = "127.0.0.1:15008";
const TARGET: &str = "127.0.0.1:8080";

fn server() -> SocketAddr {
    SERVER.parse().unwrap()
}

fn key() -> PoolKey {
    PoolKey::direct(server(), &[test_id("server")])
}

/// How the in-memory server answers each CONNECT.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// With this status. A 200 carries `baggage`, and the tunnel echoes
    /// what it reads once the client half-closes.
    Status(u16),
    /// Never: the request waits as long as the connection lives.
    Never,
}

fn answer(answer: Answer, request: http::Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let mut response = Response::new(());
    match answer {
        Answer::Status(200) => {
            response.headers_mut().insert(
                headers::BAGGAGE,
                HeaderValue::from_static("k8s.namespace.name=servers"),
            );
            let send = respond.send_response(response, false).unwrap();
            let mut stream = H2Stream::new(send, request.into_body());
            tokio::spawn(async move {
                let mut data = Vec::new();
                let _ = stream.read_to_end(&mut data).await;
                let _ = stream.write_all(&data).await;
                let _ = stream.shutdown().await;
            });
        }
        Answer::Status(code) => {
            *response.status_mut() = StatusCode::from_u16(code).unwrap();
            let _ = respond.send_response(response, true);
        }
        Answer::Never => unreachable!("held by the caller"),
    }
}

/// A connection to an in-memory server answering with `how`, allowing
/// `max_streams` tunnels; and the server's task (abort it to cut the
/// connection).
async fn connection(how: Answer, max_streams: usize) -> (Arc<PooledConn>, JoinHandle<()>) {
    let pair = default_h2_pair().await;
    tokio::spawn(pair.client);
    let mut server = pair.server;
    let task = tokio::spawn(async move {
        let mut unanswered = Vec::new();
        while let Some(Ok((request, respond))) = server.accept().await {
            match how {
                Answer::Never => unanswered.push((request, respond)),
                how => answer(how, request, respond),
            }
        }
    });
    let conn = PooledConn::new(
        pair.send,
        Arc::new(ConnState::new()),
        Arc::new(test_id("server")),
        max_streams,
    );
    (Arc::new(conn), task)
}

/// Stands in for TCP + TLS + HTTP/2 handshakes: counts the dials, takes
/// `delay`, and either fails or hands over an in-memory connection.
struct Dials {
    how: Answer,
    max_streams: usize,
    delay: Duration,
    fail: bool,
    count: AtomicUsize,
    made: std::sync::Mutex<Vec<(Arc<PooledConn>, JoinHandle<()>)>>,
}

impl Dials {
    fn new(how: Answer, max_streams: usize) -> Arc<Self> {
        Arc::new(Dials {
            how,
            max_streams,
            delay: Duration::ZERO,
            fail: false,
            count: AtomicUsize::new(0),
            made: Default::default(),
        })
    }

    fn slow(how: Answer, delay: Duration, fail: bool) -> Arc<Self> {
        Arc::new(Dials {
            delay,
            fail,
            ..Arc::into_inner(Dials::new(how, 100)).unwrap()
        })
    }

    async fn dial(&self) -> Result<Arc<PooledConn>, DialError> {
        self.count.fetch_add(1, Ordering::AcqRel);
        tokio::time::sleep(self.delay).await;
        if self.fail {
            return Err(DialError::Connect {
                server: server(),
                source: io::ErrorKind::ConnectionRefused.into(),
            });
        }
        let (conn, task) = connection(self.how, self.max_streams).await;
        self.made.lock().unwrap().push((conn.clone(), task));
        Ok(conn)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn conn(&self, n: usize) -> Arc<PooledConn> {
        self.made.lock().unwrap()[n].0.clone()
    }
}

fn dialer_with(configure: impl FnOnce(&mut DialerConfig)) -> Dialer {
    let mut config = DialerConfig::default();
    configure(&mut config);
    Dialer::with_config(&test_identity("client"), config).unwrap()
}

/// What `Dialer::open` does for a direct route, with `dials` in place of
/// the handshakes.
async fn open(dialer: &Dialer, dials: &Dials) -> Result<Tunnel, DialError> {
    let request =
        dialer.connect_request(TARGET, &TunnelRequest::new(TARGET.parse().unwrap()), false);
    dialer
        .tunnel(key(), server(), None, request, || dials.dial())
        .await
}

/// [`open`] on a task of its own, for tunnels opened concurrently.
fn spawn_open(
    dialer: &Dialer,
    dials: &Arc<Dials>,
) -> JoinHandle<(Result<Tunnel, DialError>, Instant)> {
    let (dialer, dials) = (dialer.clone(), dials.clone());
    tokio::spawn(async move {
        let result = open(&dialer, &dials).await;
        (result, Instant::now())
    })
}

#[tokio::test(start_paused = true)]
async fn a_200_opens_a_tunnel_with_the_servers_identity_and_metadata() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::new(Answer::Status(200), 10);
    let mut tunnel = open(&dialer, &dials).await.unwrap();
    assert_eq!(tunnel.peer_id(), &test_id("server"));
    assert_eq!(
        tunnel.peer_baggage().get(headers::NAMESPACE_KEY),
        Some("servers")
    );
    let conn = dials.conn(0);
    assert_eq!(conn.state.streams_in_use(), 1, "one slot taken");
    assert_eq!(dialer.pooled_connections(), 1);

    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tunnel.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"hello");
    drop(tunnel);
    assert_eq!(conn.state.streams_in_use(), 0, "slot returned");
}

#[tokio::test(start_paused = true)]
async fn refusal_statuses_become_dial_errors_and_keep_the_connection() {
    let dialer = dialer_with(|_| {});
    for (status, reason) in [
        (403, "denied_by_server"),
        (400, "refused_as_bad_request"),
        (405, "refused_as_bad_request"),
        (503, "server_could_not_reach_target"),
        (504, "server_timed_out_reaching_target"),
        (502, "refused_by_server"),
    ] {
        let dials = Dials::new(Answer::Status(status), 10);
        for _ in 0..2 {
            let error = open(&dialer, &dials).await.err().expect("refused");
            let DialError::Status {
                server: at,
                target,
                status: got,
            } = &error
            else {
                panic!("{status}: {error}");
            };
            assert_eq!(
                (*at, target.as_str(), got.as_u16()),
                (server(), TARGET, status)
            );
            assert_eq!(error.reason(), reason);
        }
        // A refusal is the tunnel's, not the connection's: the second
        // request went on the same connection, and its slot came back.
        assert_eq!(dials.count(), 1, "{status}");
        assert_eq!(dials.conn(0).state.streams_in_use(), 0);
        assert!(!dials.conn(0).state.closed());
        dialer.inner.pool.take_all();
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_times_out_after_the_response_timeout() {
    let limit = Duration::from_secs(7);
    let dialer = dialer_with(|config| config.timeouts.response = limit);
    let dials = Dials::new(Answer::Never, 10);
    let started = Instant::now();
    let error = open(&dialer, &dials).await.err().expect("no answer");
    assert_eq!(started.elapsed(), limit);
    assert!(
        matches!(
            error,
            DialError::Timeout {
                stage: Stage::Response,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.reason(), "response_timeout");
    // The slot is back and the connection stays pooled.
    let conn = dials.conn(0);
    assert_eq!(conn.state.streams_in_use(), 0);
    assert!(!conn.state.closed());
    assert_eq!(dialer.pooled_connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn tunnels_share_a_connection_until_it_is_full() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::new(Answer::Status(200), 2);
    let first = open(&dialer, &dials).await.unwrap();
    let _second = open(&dialer, &dials).await.unwrap();
    assert_eq!(dials.count(), 1, "the second tunnel shares the connection");
    let _third = open(&dialer, &dials).await.unwrap();
    assert_eq!(dials.count(), 2, "the first connection was full");
    assert_eq!(dialer.pooled_connections(), 2);
    drop(first);
    let _fourth = open(&dialer, &dials).await.unwrap();
    assert_eq!(dials.count(), 2, "the freed slot is used");
    assert_eq!(dials.conn(0).state.streams_in_use(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_opened_beside_a_bulk_transfer_gets_a_connection_of_its_own() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::new(Answer::Status(200), 10);
    let mut bulk = open(&dialer, &dials).await.unwrap();
    bulk.write_all(&vec![7; crate::pool::BULK_BYTES as usize])
        .await
        .unwrap();
    let interactive = open(&dialer, &dials).await.unwrap();
    assert_eq!(dials.count(), 2, "kept off the bulk connection");
    assert_eq!(dials.conn(1).state.streams_in_use(), 1);

    // When that connection cannot be opened, the tunnel joins the bulk one
    // rather than fail.
    drop(interactive);
    dials.made.lock().unwrap()[1].1.abort();
    settle().await;
    let failing = Dials::slow(Answer::Status(200), Duration::ZERO, true);
    let _joined = open(&dialer, &failing)
        .await
        .expect("a tunnel on the bulk connection");
    assert_eq!(failing.count(), 1, "a connection of its own was tried");
    assert_eq!(dials.conn(0).state.streams_in_use(), 2);

    // Once the transfer's tunnel has ended, its connection is calm again.
    drop(bulk);
    settle().await;
    let _calm = open(&dialer, &failing).await.expect("the calm connection");
    assert_eq!(failing.count(), 1, "no new connection needed");
}

#[tokio::test(start_paused = true)]
async fn without_pooling_every_tunnel_gets_a_connection_of_its_own() {
    let dialer = dialer_with(|config| config.pooling = false);
    let dials = Dials::new(Answer::Status(200), 10);
    let _first = open(&dialer, &dials).await.unwrap();
    let _second = open(&dialer, &dials).await.unwrap();
    assert_eq!(dials.count(), 2);
    assert_eq!(dialer.pooled_connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_tunnels_wait_for_one_dial_and_share_it() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::slow(Answer::Status(200), Duration::from_secs(1), false);
    let tunnels: Vec<_> = (0..5).map(|_| spawn_open(&dialer, &dials)).collect();
    for tunnel in tunnels {
        tunnel.await.unwrap().0.expect("a tunnel");
    }
    assert_eq!(dials.count(), 1, "one handshake for all");
    assert_eq!(dialer.pooled_connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_tunnels_fail_together_when_the_one_dial_fails() {
    let dialer = dialer_with(|_| {});
    let delay = Duration::from_secs(5);
    let dials = Dials::slow(Answer::Status(200), delay, true);
    let started = Instant::now();
    let tunnels: Vec<_> = (0..5).map(|_| spawn_open(&dialer, &dials)).collect();
    for tunnel in tunnels {
        let (result, at) = tunnel.await.unwrap();
        let error = result.err().expect("the dial's failure");
        assert_eq!(error.reason(), "server_unreachable");
        // All at the end of the one attempt, not one attempt after another.
        assert_eq!(at - started, delay);
    }
    assert_eq!(dials.count(), 1);
    assert_eq!(dialer.pooled_connections(), 0);
    assert_eq!(dialer.inner.pool.keys(), 0, "no entry left for the key");
    // The next caller dials anew, rather than inheriting the failure.
    let dials = Dials::new(Answer::Status(200), 10);
    open(&dialer, &dials).await.expect("a new attempt");
}

#[tokio::test(start_paused = true)]
async fn a_pooled_connection_that_died_is_retired_and_the_tunnel_goes_on_a_new_one() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::new(Answer::Status(200), 10);
    drop(open(&dialer, &dials).await.unwrap());
    // The server goes away without a word.
    dials.made.lock().unwrap()[0].1.abort();
    settle().await;
    let _tunnel = open(&dialer, &dials)
        .await
        .expect("a tunnel on a new connection");
    assert_eq!(dials.count(), 2);
    assert!(dials.conn(0).state.closed(), "the dead one is retired");
    assert_eq!(dialer.pooled_connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_fresh_connection_that_closes_before_answering_reads_as_refused_by_tls() {
    let dialer = dialer_with(|_| {});
    let (conn, server_task) = connection(Answer::Status(200), 10).await;
    // As when the server rejects our certificate after the TLS 1.3
    // handshake completed on our side, and its alert was lost.
    server_task.abort();
    settle().await;
    let request =
        dialer.connect_request(TARGET, &TunnelRequest::new(TARGET.parse().unwrap()), false);
    let on = OnConn {
        server: server(),
        service: None,
    };
    let error = dialer.open_fresh(&conn, on, request).await.err().unwrap();
    assert!(
        matches!(
            error,
            DialError::Tls {
                failure: TlsFailure::ClosedAfterHandshake,
                ..
            }
        ),
        "{error}"
    );

    // When the connection has already been closed, and the alert caught,
    // the alert is what is reported.
    let (conn, _server) = connection(Answer::Status(200), 10).await;
    conn.state.record_tls_failure(TlsFailure::NoH2);
    conn.state.mark_closed();
    let request =
        dialer.connect_request(TARGET, &TunnelRequest::new(TARGET.parse().unwrap()), false);
    let error = dialer.open_fresh(&conn, on, request).await.err().unwrap();
    assert!(
        matches!(
            error,
            DialError::Tls {
                failure: TlsFailure::NoH2,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_route_without_expected_identities_is_refused_before_any_dial() {
    let dialer = dialer_with(|_| {});
    let request = TunnelRequest::new(TARGET.parse().unwrap());
    let direct = Route::Direct {
        server: server(),
        server_ids: vec![],
    };
    let error = dialer.open(&direct, &request).await.err().unwrap();
    assert!(matches!(error, DialError::NoExpectedIdentity));
    for (gateway_ids, server_ids) in [(vec![], vec![test_id("s")]), (vec![test_id("g")], vec![])] {
        let via = Route::Gateway {
            gateway: server(),
            gateway_ids,
            service: "echo.default.svc:80".into(),
            server_ids,
        };
        let error = dialer.open(&via, &request).await.err().unwrap();
        assert!(matches!(error, DialError::NoExpectedIdentity));
        assert_eq!(error.response_flag(), ResponseFlag::BadRequest);
    }
    assert!(dialer.inner.pool.keys() == 0);
}

#[test]
fn the_connect_request_carries_authority_and_metadata_headers() {
    let dialer = dialer_with(|config| {
        config.baggage.set(headers::NAMESPACE_KEY, "clients");
        config.network = Some("network-a".into());
    });
    let trace =
        TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
    let request = TunnelRequest {
        target: TARGET.parse().unwrap(),
        source: Some("192.0.2.7:5555".parse().unwrap()),
        trace: Some(trace),
    };
    let outer = dialer.connect_request(TARGET, &request, false);
    assert_eq!(outer.method(), Method::CONNECT);
    assert_eq!(outer.uri().authority().unwrap().as_str(), TARGET);
    assert!(outer.uri().scheme().is_none() && outer.uri().path_and_query().is_none());
    let header = |request: &Request<()>, name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header(&outer, headers::FORWARDED).unwrap(),
        "for=\"192.0.2.7:5555\""
    );
    assert_eq!(
        header(&outer, headers::TRACEPARENT).unwrap(),
        trace.to_string()
    );
    assert_eq!(
        header(&outer, headers::BAGGAGE).unwrap(),
        "k8s.namespace.name=clients"
    );
    assert_eq!(
        header(&outer, headers::FORWARDED_NETWORK),
        None,
        "inner requests only"
    );
    let inner = dialer.connect_request(TARGET, &request, true);
    assert_eq!(
        header(&inner, headers::FORWARDED_NETWORK).unwrap(),
        "network-a"
    );

    // Without a trace to join, each tunnel starts its own.
    let bare = TunnelRequest::new(TARGET.parse().unwrap());
    let first = header(
        &dialer.connect_request(TARGET, &bare, false),
        headers::TRACEPARENT,
    );
    let second = header(
        &dialer.connect_request(TARGET, &bare, false),
        headers::TRACEPARENT,
    );
    assert!(TraceParent::parse(first.as_deref().unwrap()).is_some());
    assert_ne!(first, second);
    assert_eq!(
        header(
            &dialer.connect_request(TARGET, &bare, false),
            headers::FORWARDED
        ),
        None
    );

    // A copy for a retry on another connection is the same request.
    let copy = clone_request(&outer);
    assert_eq!((copy.method(), copy.uri()), (outer.method(), outer.uri()));
    assert_eq!(copy.headers(), outer.headers());
}

#[test]
fn authorities_drop_the_ipv6_scope_and_bracket_the_address() {
    let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
        "fe80::1".parse().unwrap(),
        8080,
        0,
        3,
    ));
    assert_eq!(authority_of(scoped), "[fe80::1]:8080");
    assert_eq!(authority_of("10.0.0.1:80".parse().unwrap()), "10.0.0.1:80");
}

#[tokio::test(start_paused = true)]
async fn close_waits_for_the_connections_to_end_up_to_its_limit() {
    let dialer = dialer_with(|_| {});
    let dials = Dials::new(Answer::Status(200), 10);
    let tunnel = open(&dialer, &dials).await.unwrap();
    let state = dials.conn(0).state.clone();

    // The connection's driver never reports an end: close gives up at
    // its limit, and says so.
    let started = Instant::now();
    assert!(!dialer.close(Duration::from_secs(3)).await);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(state.closed(), "no new tunnel goes on it");
    assert_eq!(dialer.pooled_connections(), 0);

    // A connection that ends in time: close returns as soon as it has.
    let dials = Dials::new(Answer::Status(200), 10);
    let _tunnel = open(&dialer, &dials).await.unwrap();
    let state = dials.conn(0).state.clone();
    tokio::spawn({
        let state = state.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            state.set_ended();
        }
    });
    let started = Instant::now();
    assert!(dialer.close(Duration::from_secs(10)).await);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    drop(tunnel);
}
