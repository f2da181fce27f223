//! Identity from a stand-in SPIFFE Workload API agent (the real proto,
//! gRPC over h2 on a Unix socket) through the `spiffe` crate's client:
//! the first SVID, rotations and bundle updates streamed live.

use std::time::Duration;

use hbone::workload_api::{WorkloadApi, WorkloadApiError};
use tokio::sync::mpsc;

use crate::common::workload_api::{TestAgent, svid};
use crate::common::*;

const WEB: &str = "spiffe://cluster.local/ns/apps/sa/web";
const SYNC: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_svid_and_bundle_become_the_identity_and_updates_rotate_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = svid(&pki.ca, WEB);
    let agent = TestAgent::start(dir.path(), &first, pki.ca.cert_pem()).await;
    let api = WorkloadApi::connect(&agent.endpoint(), SYNC).await.unwrap();
    let identity = api.identity().unwrap();
    assert_eq!(identity.id().as_str(), WEB);
    assert_eq!(identity.chain()[0], first.identity().unwrap().chain()[0]);
    assert_eq!(identity.bundle(), first.identity().unwrap().bundle());
    assert_eq!(
        *agent.unmarked.lock().unwrap(),
        0,
        "the security header is sent"
    );

    // The identity serves: a peer with files from the same CA reaches it.
    let server = start_server(hbone::ServerConfig::new(loopback(), identity)).await;
    let echo = start_echo().await;
    let dialer = hbone::Dialer::new(&pki.client).unwrap();
    let web = id(WEB);
    let tunnel = dialer
        .connect(server.addr, std::slice::from_ref(&web), echo)
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tunnel, b"hello").await.unwrap(), b"hello");

    let (sender, mut updates) = mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        api.keep_updated(move |update| {
            let _ = sender.send(update);
        })
        .await;
    });
    // A rotated SVID from the same CA.
    let second = svid(&pki.ca, WEB);
    agent.push(&second, pki.ca.cert_pem());
    let rotated = next(&mut updates).await;
    assert_eq!(rotated.chain()[0], second.identity().unwrap().chain()[0]);

    // A new CA: the bundle and the SVID change together.
    let other = Pki::new();
    let third = svid(&other.ca, WEB);
    agent.push(&third, other.ca.cert_pem());
    let moved = next(&mut updates).await;
    assert_eq!(moved.bundle(), third.identity().unwrap().bundle());
    assert_ne!(moved.bundle(), rotated.bundle());
    watching.abort();
}

#[tokio::test]
async fn a_missing_agent_is_named_within_the_first_sync_limit() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", dir.path().join("absent.sock").display());
    let started = std::time::Instant::now();
    let error = WorkloadApi::connect(&endpoint, Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert!(
        matches!(error, WorkloadApiError::Unavailable { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("absent.sock"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

type Updates = mpsc::UnboundedReceiver<Result<hbone::Identity, WorkloadApiError>>;

async fn next(updates: &mut Updates) -> hbone::Identity {
    tokio::time::timeout(Duration::from_secs(10), updates.recv())
        .await
        .expect("no update in time")
        .expect("updates ended")
        .expect("unusable update")
}
