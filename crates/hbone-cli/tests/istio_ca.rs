//! Certificates from a stand-in for Istio's CA (real proto, real gRPC over
//! real TLS on loopback): issuance, the headers istiod reads, each failure
//! with its own clear error, and renewal through an outage.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hbone::SpiffeId;
use hbone::istio_ca::{IstioCa, IstioCaConfig, IstioCaError, Renewal};
use tokio::sync::mpsc;

use crate::common::istio_ca::{Answer, ISTIOD_NAME, TestIstioCa};
use crate::common::*;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.workload-token.signature";

struct Setup {
    ca: TestIstioCa,
    dir: tempfile::TempDir,
    id: SpiffeId,
    /// A peer of the same mesh with certificate files.
    peer: hbone::Identity,
    peer_id: SpiffeId,
}

impl Setup {
    async fn new() -> Setup {
        let pki = Pki::new();
        let (peer, peer_id) = (pki.client.clone(), pki.client_id.clone());
        let ca = TestIstioCa::start(pki.ca, TOKEN).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), &ca.root_pem).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        Setup {
            ca,
            dir,
            id: id("spiffe://cluster.local/ns/apps/sa/web"),
            peer,
            peer_id,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> IstioCaConfig {
        let mut config = IstioCaConfig::new(
            self.ca.addr.to_string(),
            self.path("root-cert.pem"),
            self.path("token"),
            self.id.clone(),
        );
        config.server_name = Some(ISTIOD_NAME.to_owned());
        config.cluster_id = Some("Kubernetes".to_owned());
        config.timeout = Duration::from_secs(5);
        config
    }
}

#[tokio::test]
async fn a_certificate_is_issued_for_the_requested_id_with_the_headers_istiod_reads() {
    let setup = Setup::new().await;
    let mut config = setup.config();
    config.validity = Duration::from_secs(3600);
    let identity = IstioCa::new(config).issue().await.unwrap();
    assert_eq!(identity.id(), &setup.id);
    let (issued, expires) = identity.validity().unwrap();
    let lifetime = expires.duration_since(issued).unwrap();
    assert!(lifetime >= Duration::from_secs(3600), "{lifetime:?}");
    assert_eq!(identity.bundle().len(), 1, "the root is the trust bundle");
    let seen = setup.ca.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(seen[0].validity_s, 3600);
    assert_eq!(seen[0].content_type.as_deref(), Some("application/grpc"));

    // The identity serves: a tunnel from a peer with certificate files
    // of the same mesh, which sees the issued SPIFFE ID.
    let server = start_server(hbone::ServerConfig::new(loopback(), identity)).await;
    let echo = start_echo().await;
    let dialer = hbone::Dialer::new(&setup.peer).unwrap();
    let tunnel = dialer
        .connect(server.addr, std::slice::from_ref(&setup.id), echo)
        .await
        .unwrap();
    assert_eq!(tunnel.peer_id(), &setup.id);
    let data = payload(3, 100_000);
    assert_eq!(echo_roundtrip(tunnel, &data).await.unwrap(), data);
    assert_eq!(
        server.stats.snapshot().tunnels_opened,
        1,
        "{:?}",
        setup.peer_id
    );
}

/// During a root rotation root-cert.pem holds the old root beside the new:
/// with `trust_root_cert` a peer still on the old root gets through; by
/// default only the root the CA answers with is trusted.
#[tokio::test]
async fn the_root_file_s_roots_are_trusted_for_peers_only_when_asked() {
    let setup = Setup::new().await;
    let old = Pki::new();
    // The stand-in's TLS root, the root it signs with, and the old root.
    let roots = format!(
        "{}{}{}",
        setup.ca.root_pem,
        setup.ca.signing_root_pem(),
        old.ca.cert_pem()
    );
    std::fs::write(setup.path("root-cert.pem"), roots).unwrap();
    let mut on_old_root = old.ca.issue(&old.client_id, DAY).unwrap();
    on_old_root.bundle_pem = setup.ca.signing_root_pem();
    let dialer = hbone::Dialer::new(&on_old_root.identity().unwrap()).unwrap();
    let echo = start_echo().await;
    for trusted in [false, true] {
        let mut config = setup.config();
        config.trust_root_cert = trusted;
        let identity = IstioCa::new(config).issue().await.unwrap();
        // The answer's root once, and the file's two others.
        assert_eq!(identity.bundle().len(), if trusted { 3 } else { 1 });
        let server = start_server(hbone::ServerConfig::new(loopback(), identity)).await;
        let tunnel = within(
            PEER_WAIT,
            "a tunnel from a peer on the old root",
            dialer.connect(server.addr, std::slice::from_ref(&setup.id), echo),
        )
        .await;
        assert_eq!(tunnel.is_ok(), trusted, "trusted: {trusted}");
    }
}

#[tokio::test]
async fn a_wrong_ca_root_is_a_clear_error_and_no_token_leaves() {
    let setup = Setup::new().await;
    let other = Pki::new();
    std::fs::write(setup.path("root-cert.pem"), other.ca.cert_pem()).unwrap();
    let error = IstioCa::new(setup.config()).issue().await.unwrap_err();
    assert!(matches!(error, IstioCaError::Untrusted { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("no token was sent"), "{text}");
    assert!(text.contains("root-cert.pem"), "{text}");
    assert!(setup.ca.seen().is_empty(), "the CA saw a request");
}

#[tokio::test]
async fn a_name_the_ca_certificate_lacks_is_refused() {
    let setup = Setup::new().await;
    let mut config = setup.config();
    config.server_name = Some("not-istiod.example".into());
    let error = IstioCa::new(config).issue().await.unwrap_err();
    assert!(matches!(error, IstioCaError::Untrusted { .. }), "{error}");
    assert!(error.to_string().contains("not-istiod.example"), "{error}");
    assert!(setup.ca.seen().is_empty());
}

#[tokio::test]
async fn the_ca_refusal_carries_its_status_and_message() {
    let setup = Setup::new().await;
    setup
        .ca
        .answer(Answer::Refuse(7, "no permission for that identity"));
    let error = IstioCa::new(setup.config()).issue().await.unwrap_err();
    let IstioCaError::Refused { code, message, .. } = &error else {
        panic!("{error}");
    };
    assert_eq!(code, "PermissionDenied");
    assert_eq!(message, "no permission for that identity");
    assert!(
        error.to_string().contains(&setup.ca.addr.to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn the_token_file_is_read_at_every_request() {
    let setup = Setup::new().await;
    let ca = IstioCa::new(setup.config());
    ca.issue().await.unwrap();
    // Rotated by whoever writes it: the CA now accepts only the new one.
    setup.ca.accept_token("rotated-token");
    std::fs::write(setup.path("token"), "rotated-token").unwrap();
    ca.issue().await.unwrap();
    let seen = setup.ca.seen();
    assert_eq!(
        seen[1].authorization.as_deref(),
        Some("Bearer rotated-token")
    );
    // A stale token is refused by the CA, as istiod does.
    std::fs::write(setup.path("token"), TOKEN).unwrap();
    let error = ca.issue().await.unwrap_err();
    assert!(error.to_string().contains("Unauthenticated"), "{error}");
}

#[tokio::test]
async fn a_certificate_for_another_id_is_refused() {
    let setup = Setup::new().await;
    setup
        .ca
        .answer(Answer::WrongId("spiffe://cluster.local/ns/apps/sa/admin"));
    let error = IstioCa::new(setup.config()).issue().await.unwrap_err();
    assert!(matches!(error, IstioCaError::WrongId { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("issued a certificate for spiffe://cluster.local/ns/apps/sa/admin")
            && text.contains("not for spiffe://cluster.local/ns/apps/sa/web"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_or_silent_ca_is_named_with_its_address() {
    let setup = Setup::new().await;
    let closed = closed_port().await;
    let mut config = setup.config();
    config.address = closed.to_string();
    let error = IstioCa::new(config).issue().await.unwrap_err();
    assert!(matches!(error, IstioCaError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains(&closed.to_string()), "{error}");

    setup.ca.answer(Answer::Stall(Duration::from_secs(30)));
    let mut config = setup.config();
    config.timeout = Duration::from_millis(800);
    let started = Instant::now();
    let error = IstioCa::new(config).issue().await.unwrap_err();
    assert!(matches!(error, IstioCaError::Timeout { .. }), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Short certificates (6 s): renewed at about half their life; through an
/// outage the retries back off and the old certificate stays in use;
/// once the CA is back a new one arrives.
#[tokio::test]
async fn renewal_runs_at_half_life_and_rides_out_an_outage() {
    let setup = Setup::new().await;
    let mut config = setup.config();
    config.validity = Duration::from_secs(6);
    config.timeout = Duration::from_secs(2);
    let ca = IstioCa::new(config);
    let first = ca.issue().await.unwrap();
    let (events, mut received) = mpsc::unbounded_channel();
    let renewing = tokio::spawn({
        let ca = ca.clone();
        let first = first.clone();
        async move {
            ca.keep_renewed(first, move |event| {
                let _ = events.send(match event {
                    Renewal::Renewed(identity) => Ok((Instant::now(), identity.chain()[0].clone())),
                    Renewal::Failed { retry_in, .. } => Err(retry_in),
                });
                Ok(())
            })
            .await;
        }
    });
    let started = Instant::now();
    let (at, second) = next(&mut received, 10).await.unwrap();
    let waited = at - started;
    assert!(
        waited >= Duration::from_millis(2000) && waited <= Duration::from_secs(5),
        "renewed after {waited:?} of a 6 s certificate"
    );
    assert_ne!(second, first.chain()[0], "a new certificate");

    setup.ca.go_away();
    let mut retries = Vec::new();
    while retries.len() < 3 {
        match next(&mut received, 10).await {
            Err(retry_in) => retries.push(retry_in),
            Ok(_) => panic!("renewed while the CA was away"),
        }
    }
    assert!(retries[1] >= retries[0], "backing off: {retries:?}");
    setup.ca.come_back().await;
    loop {
        if let Ok((_, third)) = next(&mut received, 15).await {
            assert_ne!(third, second);
            break;
        }
    }
    renewing.abort();
}

type Event = Result<(Instant, rustls_pki_types::CertificateDer<'static>), Duration>;

async fn next(received: &mut mpsc::UnboundedReceiver<Event>, limit_s: u64) -> Event {
    tokio::time::timeout(Duration::from_secs(limit_s), received.recv())
        .await
        .expect("no renewal event in time")
        .expect("renewal ended")
}
