//! A connection's driver task over an in-memory HTTP/2 connection, under
//! paused time: idle close and keepalive.

use std::sync::Weak;

use tokio::time::Instant;

use super::*;
use crate::keepalive::Keepalive;
use crate::pool::PoolKey;
use crate::test_support::{default_h2_pair, test_id, test_identity};

fn server() -> SocketAddr {
    "127.0.0.1:15008".parse().unwrap()
}

/// Keepalive that probes every 10 s and gives a PING 20 s.
fn keepalive() -> Keepalive {
    Keepalive {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_after_the_idle_timeout_and_leaves_the_pool() {
    let idle = Duration::from_secs(60);
    let config = super::super::DialerConfig {
        idle_timeout: idle,
        ..Default::default()
    };
    let dialer = Dialer::with_config(&test_identity("client"), config).unwrap();
    let pair = default_h2_pair().await;
    let state = Arc::new(ConnState::new());
    let conn = PooledConn::new(pair.send, state.clone(), Arc::new(test_id("server")), 10);
    let key = PoolKey::direct(server(), &[test_id("server")]);
    dialer.inner.pool.insert(key, Arc::new(conn));
    let mut server_conn = pair.server;
    // Answers PINGs until the client ends the connection.
    let server_side = tokio::spawn(async move {
        while let Some(Ok(_)) = server_conn.accept().await {}
        Instant::now()
    });

    let started = Instant::now();
    tokio::spawn(drive(
        (pair.client, Cork::default()),
        state.clone(),
        server(),
        PingPlan {
            keepalive: keepalive(),
            sizing: None,
        },
        idle,
        Duration::from_secs(10),
        Arc::downgrade(&dialer.inner),
    ));
    state.ended().await;
    assert_eq!(started.elapsed(), idle, "ended at the idle timeout");
    assert!(state.closed());
    assert_eq!(dialer.pooled_connections(), 0, "the pool let go of it");
    // Ended cleanly: the server saw the connection close, not time out.
    let server_saw_end = server_side.await.unwrap();
    assert_eq!(server_saw_end - started, idle);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_keeps_the_connection_and_a_silent_one_loses_it() {
    // Answering: alive well past many keepalive periods.
    let pair = default_h2_pair().await;
    let state = Arc::new(ConnState::new());
    let _send = pair.send;
    let mut server_conn = pair.server;
    tokio::spawn(async move { while let Some(Ok(_)) = server_conn.accept().await {} });
    let driver = tokio::spawn(drive(
        (pair.client, Cork::default()),
        state.clone(),
        server(),
        PingPlan {
            keepalive: keepalive(),
            sizing: None,
        },
        Duration::from_secs(3600),
        Duration::from_secs(10),
        Weak::new(),
    ));
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(!driver.is_finished(), "PONGs keep it alive");
    driver.abort();

    // Silent (the server's side is never read): the first PING goes
    // unanswered and the connection ends when its time is up.
    let pair = default_h2_pair().await;
    let state = Arc::new(ConnState::new());
    let (_send, _silent) = (pair.send, pair.server);
    let started = Instant::now();
    tokio::spawn(drive(
        (pair.client, Cork::default()),
        state.clone(),
        server(),
        PingPlan {
            keepalive: keepalive(),
            sizing: None,
        },
        Duration::from_secs(3600),
        Duration::from_secs(10),
        Weak::new(),
    ));
    state.ended().await;
    assert_eq!(
        started.elapsed(),
        keepalive().interval + keepalive().timeout
    );
    assert!(state.closed(), "no new tunnel goes on it");
}

#[tokio::test]
async fn a_client_that_refuses_the_server_tells_it_why() {
    let [server_identity, client_identity] =
        crate::test_support::test_identities(["server", "client"]);
    let dialer = Dialer::with_config(&client_identity, Default::default()).unwrap();
    let server_tls = crate::tls::ServerTls::new(&server_identity, vec!["cluster.local".into()])
        .unwrap()
        .current();
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let accept = tokio_rustls::TlsAcceptor::from(server_tls).accept(server_io);
    // The client expects another identity, so it refuses the server's.
    let expected = [test_id("someone-else")];
    let dial = dialer.establish(client_io, server(), &expected);
    let (accepted, dialled) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, dial)
    })
    .await
    .expect("both sides finish");
    assert!(
        matches!(dialled, Err(DialError::Tls { .. })),
        "the dial fails"
    );
    let error = match accepted {
        Ok(_) => panic!("the server's handshake should fail"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("alert"),
        "the server learns of the client's alert, not just a close: {error}"
    );
}
