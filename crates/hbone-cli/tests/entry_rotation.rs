//! Certificate rotation for entries and the gateway: rotated files are
//! picked up for new connections, a half-written pair is refused with the
//! identity in use kept, and nothing is restarted.

use std::path::Path;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::cli::{
    CLIENT_ID, leaf_der, log_lines, make_pki, path, presented_cert, run_ok, spawn_logged,
};
use crate::common::*;

/// Issues `id` from the CA under `dir` into `dir/name`.
async fn issue(dir: &Path, id: &str, name: &str) {
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir, "ca"),
        "--id",
        id,
        "--out",
        &path(dir, name),
    ])
    .await;
}

/// Puts `from`'s certificate then its key in place of `to`'s: between the
/// two copies the pair does not match.
fn rotate(from: &Path, to: &Path) {
    std::fs::copy(from.join("cert.pem"), to.join("cert.pem")).unwrap();
    std::fs::copy(from.join("key.pem"), to.join("key.pem")).unwrap();
}

/// A forward without pooling (a connection per tunnel): after its files
/// are rotated to another identity, the server's access records name the
/// new identity for new tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_presents_rotated_files_on_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let rotated_id = "spiffe://cluster.local/ns/demo/sa/client-rotated";
    issue(dir.path(), rotated_id, "rotated").await;
    let (_server, server, server_log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let echo = start_echo().await;
    let (_forward, forward, forward_log) = spawn_logged(&[
        "forward",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--no-pool",
        "--listen",
        "127.0.0.1:0",
        "--server",
        &server.to_string(),
        "--server-id",
        crate::cli::SERVER_ID,
        "--target",
        &echo.to_string(),
    ])
    .await;
    let roundtrip = |seed| async move {
        let data = payload(seed, 10_000);
        let stream = TcpStream::connect(forward).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(stream, &data))
            .await
            .expect("tunnel timed out")
            .unwrap();
        assert_eq!(back, data);
    };
    roundtrip(1).await;
    log_lines(&server_log, CLIENT_ID, 1).await;

    rotate(&dir.path().join("rotated"), &dir.path().join("client"));
    log_lines(&forward_log, "identity reloaded", 1).await;
    roundtrip(2).await;
    log_lines(&server_log, rotated_id, 1).await;
}

/// A gateway's rotated files: refused while the pair does not match, then
/// presented to new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_presents_rotated_files_to_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let gateway_id = "spiffe://cluster.local/ns/istio-system/sa/gateway";
    issue(dir.path(), gateway_id, "gateway").await;
    issue(dir.path(), gateway_id, "renewed").await;
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nendpoints = [\"127.0.0.1:15008\"]\n",
    )
    .unwrap();
    let (_gateway, gateway, log) = spawn_logged(&[
        "gateway",
        "--identity-dir",
        &path(dir.path(), "gateway"),
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
    ])
    .await;
    let original = leaf_der(&dir.path().join("gateway/cert.pem"));
    assert_eq!(presented_cert(gateway).await, original);

    let renewed = dir.path().join("renewed");
    std::fs::copy(
        renewed.join("cert.pem"),
        dir.path().join("gateway/cert.pem"),
    )
    .unwrap();
    log_lines(&log, "identity not reloaded", 1).await;
    assert_eq!(
        presented_cert(gateway).await,
        original,
        "a mismatched pair was used"
    );

    std::fs::copy(renewed.join("key.pem"), dir.path().join("gateway/key.pem")).unwrap();
    log_lines(&log, "identity reloaded", 1).await;
    assert_eq!(
        presented_cert(gateway).await,
        leaf_der(&renewed.join("cert.pem"))
    );
}
