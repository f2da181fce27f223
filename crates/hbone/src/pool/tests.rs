//! The pool without sockets: connections are h2 clients over memory, and
//! time is tokio's paused clock.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::time::Instant;

use super::*;
use crate::client::DialError;
use crate::test_support::{default_h2_pair, h2_pair, settle, test_id as id};

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A `SendRequest` for a connection nobody drives: enough for the pool,
/// which only reads the stream limit from it. h2 assumes no limit from
/// the server until its SETTINGS are read.
async fn send_request() -> SendRequest<Bytes> {
    default_h2_pair().await.send
}

async fn conn(max_streams: usize, peer: &str) -> Arc<PooledConn> {
    Arc::new(PooledConn::new(
        send_request().await,
        Arc::new(ConnState::new()),
        Arc::new(id(peer)),
        max_streams,
    ))
}

fn refused() -> DialError {
    DialError::Connect {
        server: addr("127.0.0.1:15008"),
        source: io::ErrorKind::ConnectionRefused.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_hands_out_at_most_its_slots_and_a_dropped_lease_frees_one() {
    let conn = conn(2, "server").await;
    let first = conn.try_acquire().expect("first slot");
    let second = conn.try_acquire().expect("second slot");
    assert!(conn.try_acquire().is_none(), "only two slots");
    drop(first);
    // At once: no task has to run for the slot to come back.
    let third = conn.try_acquire().expect("the freed slot");
    assert!(conn.try_acquire().is_none());
    drop((second, third));
    assert_eq!(conn.state.slots.load(Ordering::Acquire), 0);
}

#[tokio::test(start_paused = true)]
async fn the_servers_stream_limit_caps_the_slots_too() {
    let mut server = h2::server::Builder::new();
    server.max_concurrent_streams(1);
    let pair = h2_pair(&h2::client::Builder::new(), &server).await;
    let mut server_conn = pair.server;
    tokio::spawn(pair.client);
    tokio::spawn(async move { while server_conn.accept().await.is_some() {} });
    // Until the server's SETTINGS are read, h2 assumes no limit.
    settle().await;
    assert_eq!(pair.send.current_max_send_streams(), 1);
    let conn = PooledConn::new(pair.send, Arc::default(), Arc::new(id("server")), 10);
    let _lease = conn.try_acquire().expect("one slot");
    assert!(conn.try_acquire().is_none(), "the server allows one stream");
}

#[tokio::test(start_paused = true)]
async fn a_closed_connection_hands_out_no_lease_and_keeps_its_streams() {
    let conn = conn(5, "server").await;
    let held = conn.try_acquire().unwrap();
    conn.state.mark_closed();
    assert!(conn.try_acquire().is_none());
    assert!(conn.state.is_closed());
    // The stream in flight still counts, and ending it does not reopen.
    assert_eq!(conn.state.slots.load(Ordering::Acquire), CLOSED | 1);
    drop(held);
    assert_eq!(conn.state.slots.load(Ordering::Acquire), CLOSED);
    assert!(conn.try_acquire().is_none());
}

/// Spawns the idle watcher of `state`; the task ends, with the time, once
/// the watcher has closed the connection.
fn watch_idle(state: &Arc<ConnState>, idle_timeout: Duration) -> tokio::task::JoinHandle<Instant> {
    let state = state.clone();
    tokio::spawn(async move {
        state.closed_when_idle(idle_timeout).await;
        Instant::now()
    })
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_carried_a_stream_closes_after_exactly_the_idle_timeout() {
    let idle = Duration::from_secs(10);
    let conn = conn(5, "server").await;
    let opened = Instant::now();
    let watcher = watch_idle(&conn.state, idle);
    tokio::time::sleep(idle - Duration::from_millis(1)).await;
    assert!(!watcher.is_finished(), "closed before the idle timeout");
    // (Not probed with a lease: that would be a stream, restarting the clock.)
    assert!(!conn.state.is_closed(), "usable until then");
    let closed_at = watcher.await.unwrap();
    assert_eq!(closed_at - opened, idle);
    assert!(conn.try_acquire().is_none(), "closed to new streams");
}

#[tokio::test(start_paused = true)]
async fn a_held_lease_keeps_the_connection_open_and_the_clock_starts_when_it_drops() {
    let idle = Duration::from_secs(10);
    let conn = conn(5, "server").await;
    let lease = conn.try_acquire().unwrap();
    let watcher = watch_idle(&conn.state, idle);
    // Well past the idle timeout, several times over, with a stream open.
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert!(!watcher.is_finished(), "closed while a stream was in use");
    assert!(!conn.state.is_closed());
    let released = Instant::now();
    drop(lease);
    tokio::time::sleep(idle - Duration::from_millis(1)).await;
    assert!(!watcher.is_finished(), "closed before the idle timeout");
    let closed_at = watcher.await.unwrap();
    assert_eq!(closed_at - released, idle);
    assert!(conn.try_acquire().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_stream_taken_while_idle_restarts_the_idle_clock() {
    let idle = Duration::from_secs(10);
    let conn = conn(5, "server").await;
    let watcher = watch_idle(&conn.state, idle);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A short tunnel in the middle of the idle period.
    drop(conn.try_acquire().unwrap());
    let released = Instant::now();
    let closed_at = watcher.await.unwrap();
    assert_eq!(closed_at - released, idle);
}

#[tokio::test(start_paused = true)]
async fn a_connection_closed_otherwise_is_never_closed_again_by_the_idle_watcher() {
    let conn = conn(5, "server").await;
    conn.state.mark_closed();
    let watcher = watch_idle(&conn.state, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(60)).await;
    // The watcher's branch would close the connection a second time.
    assert!(!watcher.is_finished());
    watcher.abort();
}

/// The idle watcher closes the connection only from "no stream at all",
/// in one atomic step: a tunnel that got a slot never finds its
/// connection closed by the watcher under it. A stress test: another
/// thread takes and returns slots as fast as it can while the watcher
/// looks for its moment.
#[test]
fn idle_close_and_taking_a_slot_never_both_succeed() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let send = runtime.block_on(send_request());
    for _ in 0..200 {
        let conn = Arc::new(PooledConn::new(
            send.clone(),
            Arc::default(),
            Arc::new(id("server")),
            4,
        ));
        let started = Arc::new(std::sync::Barrier::new(2));
        let taker = {
            let (conn, started) = (conn.clone(), started.clone());
            std::thread::spawn(move || {
                // Busy before the watcher starts, so it has to wait for
                // a moment without streams.
                let mut lease = conn.try_acquire();
                started.wait();
                while let Some(held) = lease {
                    for _ in 0..10 {
                        assert!(!conn.state.is_closed(), "closed under a lease");
                        std::hint::spin_loop();
                    }
                    drop(held);
                    // As long without a stream, so the watcher finds one.
                    for _ in 0..10 {
                        std::hint::spin_loop();
                    }
                    lease = conn.try_acquire();
                }
                // Refused only because the connection closed, never full.
                assert!(conn.state.is_closed(), "a free slot was refused");
            })
        };
        started.wait();
        runtime.block_on(conn.state.closed_when_idle(Duration::ZERO));
        taker.join().unwrap();
        assert_eq!(conn.state.slots.load(Ordering::Acquire), CLOSED);
    }
}

#[test]
fn identity_lists_in_keys_compare_as_sets() {
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let server = addr("127.0.0.1:15008");
    let gateway = addr("127.0.0.1:15009");
    assert_eq!(
        PoolKey::direct(server, &[b.clone(), a.clone(), b.clone()]),
        PoolKey::direct(server, &[a.clone(), b.clone()])
    );
    assert_ne!(
        PoolKey::direct(server, &[a.clone(), b.clone()]),
        PoolKey::direct(server, &[a.clone(), c.clone()])
    );
    assert_ne!(
        PoolKey::direct(server, std::slice::from_ref(&a)),
        PoolKey::direct(gateway, std::slice::from_ref(&a))
    );
    let via = |gw_ids: &[SpiffeId], service: &str, ids: &[SpiffeId]| {
        PoolKey::via_gateway(gateway, gw_ids, service, ids)
    };
    assert_eq!(
        via(&[c.clone(), a.clone()], "echo:80", &[b.clone(), a.clone()]),
        via(
            &[a.clone(), c.clone(), c.clone()],
            "echo:80",
            &[a.clone(), b.clone()]
        )
    );
    assert_ne!(
        via(
            std::slice::from_ref(&a),
            "echo:80",
            std::slice::from_ref(&b)
        ),
        via(
            std::slice::from_ref(&a),
            "echo:81",
            std::slice::from_ref(&b)
        )
    );
    // The gateway's identities and the server's are not interchangeable.
    assert_ne!(
        via(
            std::slice::from_ref(&a),
            "echo:80",
            std::slice::from_ref(&b)
        ),
        via(
            std::slice::from_ref(&b),
            "echo:80",
            std::slice::from_ref(&a)
        )
    );
    // A direct connection to the gateway is not an inner one.
    assert_ne!(
        PoolKey::direct(gateway, std::slice::from_ref(&a)),
        via(
            std::slice::from_ref(&a),
            "echo:80",
            std::slice::from_ref(&a)
        )
    );
}

#[tokio::test(start_paused = true)]
async fn checkout_finds_a_connection_under_any_order_of_the_same_identities() {
    let pool = Pool::default();
    let server = addr("127.0.0.1:15008");
    let conn = conn(1, "a").await;
    pool.insert(PoolKey::direct(server, &[id("a"), id("b")]), conn.clone());
    let (found, lease) = pool
        .checkout(
            &PoolKey::direct(server, &[id("b"), id("a")]),
            Choice::AvoidBulk,
        )
        .expect("the same key");
    assert!(Arc::ptr_eq(&found, &conn));
    assert!(
        pool.checkout(&PoolKey::direct(server, &[id("a")]), Choice::AvoidBulk)
            .is_none(),
        "another set of identities is another key"
    );
    drop(lease);
}

#[tokio::test(start_paused = true)]
async fn checkout_moves_on_from_full_and_closed_connections() {
    let pool = Pool::default();
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let (first, second) = (conn(1, "a").await, conn(1, "a").await);
    pool.insert(key.clone(), first.clone());
    pool.insert(key.clone(), second.clone());
    let (a, lease_a) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    let (b, lease_b) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    assert!(Arc::ptr_eq(&a, &first) && Arc::ptr_eq(&b, &second));
    drop((a, b));
    assert!(
        pool.checkout(&key, Choice::AvoidBulk).is_none(),
        "both full"
    );
    drop(lease_a);
    let (again, _lease) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    assert!(Arc::ptr_eq(&again, &first));
    drop(lease_b);
    second.state.mark_closed();
    assert_eq!(Arc::strong_count(&second), 2, "the pool still holds it");
    assert!(
        pool.checkout(&key, Choice::AvoidBulk).is_none(),
        "the closed one is not offered"
    );
    assert_eq!(Arc::strong_count(&second), 1, "checkout dropped it");
}

/// One of `conn`'s streams moves a bulk span's bytes now, and stays open.
fn carry_bulk(conn: &PooledConn) {
    let mark = conn.state.probe.bulk.as_ref().expect("a pooled probe");
    bulk::BulkSpan::default().moved(bulk::BULK_BYTES as usize, Some(mark));
}

#[tokio::test(start_paused = true)]
async fn a_new_tunnel_avoids_connections_that_carry_bulk_while_the_key_may_have_more() {
    let pool = Pool::default();
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let busy = conn(100, "a").await;
    pool.insert(key.clone(), busy.clone());
    carry_bulk(&busy);
    assert!(
        pool.checkout(&key, Choice::AvoidBulk).is_none(),
        "a connection of its own is to be opened"
    );
    let (any, _lease) = pool.checkout(&key, Choice::Any).expect("the fallback");
    assert!(Arc::ptr_eq(&any, &busy));

    let calm = conn(100, "a").await;
    pool.insert(key.clone(), calm.clone());
    let (picked, _lease) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    assert!(
        Arc::ptr_eq(&picked, &calm),
        "the calm one, though inserted later"
    );

    // The mark fades once the bulk stops.
    tokio::time::advance(bulk::MEMORY).await;
    let (picked, _lease) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    assert!(Arc::ptr_eq(&picked, &busy), "first with room again");

    // With as many connections as a key may have, all carrying bulk, the
    // first with room takes the tunnel.
    let mut all = vec![busy, calm];
    while all.len() < bulk::SEPARATE_UP_TO {
        let more = conn(100, "a").await;
        pool.insert(key.clone(), more.clone());
        all.push(more);
    }
    all.iter().for_each(|c| carry_bulk(c));
    let (picked, _lease) = pool.checkout(&key, Choice::AvoidBulk).unwrap();
    assert!(Arc::ptr_eq(&picked, &all[0]));
}

#[tokio::test(start_paused = true)]
async fn forget_closed_and_insert_drop_the_pools_handle_on_closed_connections() {
    let pool = Pool::default();
    let key_a = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let key_b = PoolKey::direct(addr("127.0.0.1:15009"), &[id("b")]);
    let (a1, a2, b1) = (conn(1, "a").await, conn(1, "a").await, conn(1, "b").await);
    pool.insert(key_a.clone(), a1.clone());
    pool.insert(key_a.clone(), a2.clone());
    assert_eq!(pool.len(), 2);

    a1.state.mark_closed();
    assert_eq!(pool.len(), 1, "closed connections are not counted");
    assert_eq!(Arc::strong_count(&a1), 2);
    pool.forget_closed();
    // Its `SendRequest` must go, or h2 never ends the connection.
    assert_eq!(Arc::strong_count(&a1), 1);
    assert_eq!(Arc::strong_count(&a2), 2, "open ones stay");

    // Inserting for one key cleans up after every other key.
    a2.state.mark_closed();
    pool.insert(key_b.clone(), b1.clone());
    assert_eq!(Arc::strong_count(&a2), 1);
    assert!(pool.entries().get(&key_a).is_none(), "empty key removed");
    assert_eq!(pool.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn take_all_closes_every_connection_and_empties_the_pool() {
    let pool = Pool::default();
    let key_a = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let key_b = PoolKey::via_gateway(addr("127.0.0.1:15009"), &[id("g")], "echo:80", &[id("b")]);
    let (a, b) = (conn(2, "a").await, conn(2, "b").await);
    pool.insert(key_a.clone(), a.clone());
    pool.insert(key_b.clone(), b.clone());
    let (_, in_flight) = pool.checkout(&key_a, Choice::AvoidBulk).unwrap();

    let taken = pool.take_all();
    assert_eq!(taken.len(), 2);
    assert!(taken.iter().any(|c| Arc::ptr_eq(c, &a)));
    assert!(taken.iter().any(|c| Arc::ptr_eq(c, &b)));
    assert!(a.state.is_closed() && b.state.is_closed());
    assert_eq!(pool.len(), 0);
    assert!(pool.entries().is_empty());
    assert!(
        pool.checkout(&key_a, Choice::AvoidBulk).is_none()
            && pool.checkout(&key_b, Choice::AvoidBulk).is_none()
    );
    // The tunnel in flight carries on; its slot is still counted.
    assert_eq!(a.state.slots.load(Ordering::Acquire), CLOSED | 1);
    drop(in_flight);
    assert!(pool.take_all().is_empty());
}

#[tokio::test(start_paused = true)]
async fn by_peer_counts_open_connections_and_their_streams() {
    let pool = Pool::default();
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a"), id("b")]);
    let (a1, a2, b1) = (conn(3, "a").await, conn(3, "a").await, conn(3, "b").await);
    for conn in [&a1, &a2, &b1] {
        pool.insert(key.clone(), conn.clone());
    }
    let _leases = [a1.try_acquire(), a1.try_acquire(), b1.try_acquire()];
    let _closed_lease = a2.try_acquire();
    a2.state.mark_closed();
    let mut peers = pool.by_peer();
    peers.sort_by(|x, y| x.0.cmp(&y.0));
    let peers: Vec<_> = peers
        .into_iter()
        .map(|(p, c, s)| (p.to_string(), c, s))
        .collect();
    assert_eq!(
        peers,
        [(id("a").to_string(), 1, 2), (id("b").to_string(), 1, 1)]
    );
}

#[tokio::test(start_paused = true)]
async fn the_dial_gate_is_shared_per_key_while_someone_holds_it() {
    let pool = Pool::default();
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let gate = pool.dial_gate(&key);
    // A checkout that finds no connection must not drop the entry while
    // the gate is held: the next caller would get a gate of its own.
    assert!(pool.checkout(&key, Choice::AvoidBulk).is_none());
    assert!(Arc::ptr_eq(&gate, &pool.dial_gate(&key)));
    let other = pool.dial_gate(&PoolKey::direct(addr("127.0.0.1:15009"), &[id("a")]));
    assert!(!Arc::ptr_eq(&gate, &other), "one gate per key");
    drop((gate, other));
    pool.forget_closed();
    assert!(pool.entries().is_empty(), "unused gates are cleaned up");
}

#[tokio::test(start_paused = true)]
async fn waiters_of_a_failed_dial_fail_together_with_its_error() {
    let pool = Arc::new(Pool::default());
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let gate = pool.dial_gate(&key);
    let Ok(turn) = gate.enter().await else {
        panic!("the first caller dials");
    };
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let gate = pool.dial_gate(&key);
            tokio::spawn(async move { gate.enter().await.map(|_turn| ()) })
        })
        .collect();
    settle().await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "one dial at a time"
    );
    let error = refused();
    turn.finished(Some(&error));
    for waiter in waiters {
        let failed = waiter.await.unwrap().expect_err("the dial's failure");
        assert_eq!(failed.reason(), "server_unreachable");
        assert_eq!(failed.to_string(), error.to_string());
    }
    // Whoever comes after the failure tries again.
    let retry = gate.enter().await;
    assert!(retry.is_ok(), "a later caller dials anew");
}

#[tokio::test(start_paused = true)]
async fn waiters_of_a_successful_dial_check_out_its_connection() {
    let pool = Arc::new(Pool::default());
    let key = PoolKey::direct(addr("127.0.0.1:15008"), &[id("a")]);
    let gate = pool.dial_gate(&key);
    let Ok(turn) = gate.enter().await else {
        panic!("the first caller dials");
    };
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            let gate = pool.dial_gate(&key);
            tokio::spawn(async move {
                let Ok(_turn) = gate.enter().await else {
                    panic!("no failure to share");
                };
                // What the dialer does first with its turn.
                pool.checkout(&key, Choice::AvoidBulk)
                    .map(|(_, lease)| lease)
            })
        })
        .collect();
    settle().await;
    let conn = conn(3, "a").await;
    pool.insert(key.clone(), conn.clone());
    turn.finished(None);
    let mut leases = Vec::new();
    for waiter in waiters {
        leases.push(waiter.await.unwrap().expect("a slot on the new connection"));
    }
    assert_eq!(conn.state.slots.load(Ordering::Acquire), 3);
}
