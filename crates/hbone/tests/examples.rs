//! The examples in `examples/`, run as tests: each must work as written.
#![cfg(all(feature = "ca", feature = "metrics"))]

#[allow(dead_code)]
#[path = "../examples/open_tunnel.rs"]
mod open_tunnel;

#[allow(dead_code)]
#[path = "../examples/server_with_policy.rs"]
mod server_with_policy;

#[allow(dead_code)]
#[path = "../examples/graceful_shutdown.rs"]
mod graceful_shutdown;

#[allow(dead_code)]
#[path = "../examples/own_registry.rs"]
mod own_registry;

use std::time::Duration;

/// Every example talks to peers on loopback; none may hang.
async fn bounded<T>(example: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), example)
        .await
        .expect("the example finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnel_echoes() {
    let said = bounded(open_tunnel::run()).await.unwrap();
    assert_eq!(
        said,
        "spiffe://cluster.local/ns/demo/sa/server echoed: hello through HBONE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_policy_allows_one_and_refuses_the_other() {
    let lines = bounded(server_with_policy::run()).await.unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].ends_with(": allowed"), "{lines:?}");
    assert!(
        lines[1].ends_with(": refused with 403 Forbidden"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_the_open_tunnel_finish() {
    let answer = bounded(graceful_shutdown::run()).await.unwrap();
    assert_eq!(answer, "still flowing after the drain began");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_registry_holds_both_kinds_of_series() {
    let text = bounded(own_registry::run()).await.unwrap();
    assert!(text.contains("app_requests_total 1"), "{text}");
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\""))
        .unwrap_or_else(|| panic!("no source series:\n{text}"));
    assert!(opened.ends_with(" 1"), "{opened}");
    let closed = text
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_closed_total{reporter=\"source\"")
                && l.contains("response_flags=\"-\"")
        })
        .unwrap_or_else(|| panic!("no closed series:\n{text}"));
    assert!(closed.ends_with(" 1"), "{closed}");
    assert!(
        text.contains("hbone_pool_connections{"),
        "refreshed gauges: {text}"
    );
}
