//! Revocation lists on both ends of the handshake, through the library: a
//! server refuses revoked clients, a dialer revoked servers; lists reload
//! without touching open tunnels; an expired list is used unless
//! fail-closed.

use std::time::Duration;

use crate::common::*;
use hbone::revocation::Revocation;
use hbone::tls::TlsFailure;
use hbone::{DialError, Dialer, DialerConfig, Identity, ServerConfig};

/// The development CA of `pki`, saved in a directory, revoking leaves.
struct Revoker {
    dir: tempfile::TempDir,
}

impl Revoker {
    fn new(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        pki.ca.save(dir.path()).unwrap();
        Revoker { dir }
    }

    /// Revokes `identity`'s leaf; the lists of everything revoked so far.
    fn revoke(&self, identity: &Identity) -> Revocation {
        let cert = self.dir.path().join("leaf.der");
        std::fs::write(&cert, identity.chain()[0].as_ref()).unwrap();
        let revoked = hbone::ca::revoke(self.dir.path(), &cert, DAY).unwrap();
        Revocation::from_bytes(revoked.crl_pem.as_bytes(), "crl.pem").unwrap()
    }
}

async fn dial(dialer: &Dialer, server: &RunningServer, pki: &Pki) -> Result<(), DialError> {
    let echo = start_echo().await;
    let ids = std::slice::from_ref(&pki.server_id);
    let tunnel = tokio::time::timeout(
        Duration::from_secs(10),
        dialer.connect(server.addr, ids, echo),
    )
    .await
    .expect("the dial ends")?;
    let echoed = tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(tunnel, b"ping"))
        .await
        .expect("the echo ends")
        .unwrap();
    assert_eq!(echoed, b"ping");
    Ok(())
}

fn tls_failure(result: Result<(), DialError>) -> TlsFailure {
    match result {
        Err(DialError::Tls { failure, .. }) => failure,
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_a_revoked_client_and_takes_an_unrevoked_one() {
    let pki = Pki::new();
    let revoker = Revoker::new(&pki);
    let crl = revoker.revoke(&pki.client);
    let server =
        start_server(ServerConfig::new(loopback(), pki.server.clone()).with_revocation(crl)).await;

    let revoked = Dialer::new(&pki.client).unwrap();
    assert_eq!(
        tls_failure(dial(&revoked, &server, &pki).await),
        TlsFailure::RejectedRevoked
    );
    eventually("the refusal is counted", || {
        server.stats.snapshot().handshake_failures == 1
    })
    .await;

    let other = pki
        .ca
        .issue(&pki.client_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    dial(&Dialer::new(&other).unwrap(), &server, &pki)
        .await
        .expect("a certificate the CRL does not list passes");
    assert_eq!(server.stats.snapshot().handshake_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_refuses_a_revoked_server() {
    let pki = Pki::new();
    let revoker = Revoker::new(&pki);
    let crl = revoker.revoke(&pki.server);
    let server = start_default_server(&pki).await;

    let checking =
        Dialer::with_config(&pki.client, DialerConfig::default().with_revocation(crl)).unwrap();
    assert_eq!(
        tls_failure(dial(&checking, &server, &pki).await),
        TlsFailure::ServerCertRevoked
    );
    dial(&Dialer::new(&pki.client).unwrap(), &server, &pki)
        .await
        .expect("without the CRL the server is trusted");
}

/// A CRL of another CA says nothing of our peers: their status is
/// unknown, which passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_of_another_ca_does_not_refuse() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let crl = Revoker::new(&stranger).revoke(&stranger.client);
    let server = start_server(
        ServerConfig::new(loopback(), pki.server.clone()).with_revocation(crl.clone()),
    )
    .await;
    let dialer =
        Dialer::with_config(&pki.client, DialerConfig::default().with_revocation(crl)).unwrap();
    dial(&dialer, &server, &pki).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_lists_refuse_new_handshakes_and_leave_open_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let revoker = Revoker::new(&pki);
    let server = hbone::Server::bind(ServerConfig::new(loopback(), pki.server.clone()))
        .await
        .unwrap();
    let (addr, tls, stats) = (server.local_addr(), server.tls(), server.stats());
    let _running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let ids = std::slice::from_ref(&pki.server_id);
    let dialer = Dialer::new(&pki.client).unwrap();
    let mut open = dialer.connect(addr, ids, echo).await.unwrap();
    open.write_all(b"before ").await.unwrap();

    tls.reload_revocation(revoker.revoke(&pki.client)).unwrap();
    let fresh = Dialer::new(&pki.client).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), fresh.connect(addr, ids, echo)).await {
        Ok(Err(DialError::Tls {
            failure: TlsFailure::RejectedRevoked,
            ..
        })) => {}
        other => panic!(
            "expected a revoked refusal, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    eventually("the refusal is counted", || {
        stats.snapshot().handshake_failures == 1
    })
    .await;

    // Rotating the identity keeps the lists in force.
    let renewed = pki
        .ca
        .issue(&pki.server_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    tls.reload(&renewed).unwrap();
    let again = Dialer::new(&pki.client).unwrap();
    assert!(matches!(
        again.connect(addr, ids, echo).await,
        Err(DialError::Tls {
            failure: TlsFailure::RejectedRevoked,
            ..
        })
    ));

    // The tunnel opened before is untouched.
    open.write_all(b"and after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut echoed))
        .await
        .expect("the open tunnel ends")
        .unwrap();
    assert_eq!(echoed, b"before and after");
}

/// A dialer given new lists stops sending tunnels over connections made
/// before them: the next tunnel handshakes again, and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_reload_retires_its_pooled_connections() {
    let pki = Pki::new();
    let revoker = Revoker::new(&pki);
    let server = start_default_server(&pki).await;
    let dialer = Dialer::new(&pki.client).unwrap();
    dial(&dialer, &server, &pki).await.unwrap();
    dial(&dialer, &server, &pki).await.unwrap();
    assert_eq!(server.stats.snapshot().connections_accepted, 1, "pooled");

    dialer.reload_revocation(revoker.revoke(&pki.server));
    assert_eq!(
        tls_failure(dial(&dialer, &server, &pki).await),
        TlsFailure::ServerCertRevoked
    );
}

/// An expired CRL: still used by default (and reported stale); with
/// fail-closed, every handshake it covers is refused, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_is_used_by_default_and_refuses_when_fail_closed() {
    let pki = Pki::new();
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let expired = pki.ca.crl_at(&[], 1, two_days_ago, DAY).unwrap();
    let expired = Revocation::from_bytes(expired.as_bytes(), "old.crl").unwrap();
    let stale = expired.stale(std::time::SystemTime::now());
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].0, "old.crl");

    let lenient = start_server(
        ServerConfig::new(loopback(), pki.server.clone()).with_revocation(expired.clone()),
    )
    .await;
    let dialer = Dialer::with_config(
        &pki.client,
        DialerConfig::default().with_revocation(expired.clone()),
    )
    .unwrap();
    dial(&dialer, &lenient, &pki)
        .await
        .expect("an expired CRL that lists nobody refuses nobody");

    let strict = expired.with_fail_closed(true);
    let closed = start_server(
        ServerConfig::new(loopback(), pki.server.clone()).with_revocation(strict.clone()),
    )
    .await;
    assert!(matches!(
        dial(&Dialer::new(&pki.client).unwrap(), &closed, &pki).await,
        Err(DialError::Tls { .. })
    ));
    eventually("the refusal is counted", || {
        closed.stats.snapshot().handshake_failures == 1
    })
    .await;
    let strict_dialer =
        Dialer::with_config(&pki.client, DialerConfig::default().with_revocation(strict)).unwrap();
    match tls_failure(dial(&strict_dialer, &lenient, &pki).await) {
        TlsFailure::ServerCertInvalid(why) => assert!(why.contains("revocation list"), "{why}"),
        other => panic!("expected an expired-CRL refusal, got {other:?}"),
    }
}

/// The whole chain is checked: an intermediate CA its root revoked takes
/// every leaf it signed down with it, while a root CRL listing another
/// serial refuses nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_intermediate_refuses_the_leaves_under_it() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SanType, SerialNumber,
    };
    let ca_params = |name: &str, serial: u64| {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from(serial));
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("revocation test root", 1);
    let root_pem = root_params.self_signed(&root_key).unwrap().pem();
    let root = Issuer::new(root_params, root_key);
    let intermediate_key = KeyPair::generate().unwrap();
    let intermediate_params = ca_params("revocation test intermediate", 2);
    let intermediate_pem = intermediate_params
        .signed_by(&intermediate_key, &root)
        .unwrap()
        .pem();
    let intermediate = Issuer::new(intermediate_params, intermediate_key);
    let identity = |id: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params.signed_by(&key, &intermediate).unwrap().pem();
        Identity::from_pem(
            &format!("{leaf}{intermediate_pem}"),
            &key.serialize_pem(),
            &root_pem,
        )
        .unwrap()
    };
    let pki = Pki::new();
    let (server_identity, client_identity) = (
        identity(pki.server_id.as_str()),
        identity(pki.client_id.as_str()),
    );
    let root_crl = |serial: u64| {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let pem = params.signed_by(&root).unwrap().pem().unwrap();
        Revocation::from_bytes(pem.as_bytes(), "root.crl").unwrap()
    };

    let unrelated = start_server(
        ServerConfig::new(loopback(), server_identity.clone()).with_revocation(root_crl(99)),
    )
    .await;
    dial(&Dialer::new(&client_identity).unwrap(), &unrelated, &pki)
        .await
        .expect("a root CRL listing another serial refuses nobody");

    let server =
        start_server(ServerConfig::new(loopback(), server_identity).with_revocation(root_crl(2)))
            .await;
    assert_eq!(
        tls_failure(dial(&Dialer::new(&client_identity).unwrap(), &server, &pki).await),
        TlsFailure::RejectedRevoked
    );
}
