//! TLS handshake refusals: each fails with its own typed error, and leaves
//! no connection open on the server nor in the dialer's pool.

use std::time::Duration;

use crate::common::*;
use hbone::tls::TlsFailure;
use hbone::{DialError, Dialer, Identity, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Dials with `identity`, expecting `expected_server`, and returns the TLS
/// failure, after checking nothing was left behind.
async fn refused(
    server: &RunningServer,
    identity: &Identity,
    expected_server: &hbone::SpiffeId,
) -> TlsFailure {
    let echo = start_echo().await;
    let dialer = Dialer::new(identity).unwrap();
    let error = match dialer
        .connect(server.addr, std::slice::from_ref(expected_server), echo)
        .await
    {
        Ok(_) => panic!("handshake should have failed"),
        Err(e) => e,
    };
    let failure = match error {
        DialError::Tls { failure, .. } => failure,
        other => panic!("expected a TLS failure, got {other:?}"),
    };
    eventually("server closed the refused connection", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;
    eventually("dialer pooled nothing", || dialer.pooled_connections() == 0).await;
    failure
}

#[tokio::test]
async fn client_certificate_from_another_ca() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let other_ca = hbone::ca::DevCa::generate(TD, DAY).unwrap();
    let rogue = other_ca.issue(&pki.client_id, DAY).unwrap();
    // Trusts the real CA, so only the server's check can fail.
    let identity = Identity::from_pem(&rogue.chain_pem, &rogue.key_pem, pki.ca.cert_pem()).unwrap();
    let failure = refused(&server, &identity, &pki.server_id).await;
    assert_eq!(failure, TlsFailure::RejectedUnknownCa);
    assert_eq!(server.stats.snapshot().handshake_failures, 1);
    assert_eq!(server.stats.snapshot().tunnels_opened, 0);
}

#[tokio::test]
async fn server_certificate_from_another_ca() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let other_ca = hbone::ca::DevCa::generate(TD, DAY).unwrap();
    let identity = other_ca
        .issue(&pki.client_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    let failure = refused(&server, &identity, &pki.server_id).await;
    assert_eq!(failure, TlsFailure::ServerUnknownCa);
}

#[tokio::test]
async fn no_client_certificate() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    // A raw client without a certificate: the TLS 1.3 client finishes its
    // side, then reads the server's alert.
    let result = async {
        let mut tls = raw_tls(server.addr, None).await?;
        let mut buf = [0u8; 16];
        tls.read(&mut buf).await
    }
    .await;
    let error = result.expect_err("a client without a certificate must be refused");
    assert_eq!(
        TlsFailure::from_io(&error),
        Some(TlsFailure::RejectedCertificateRequired),
        "{error}"
    );
    eventually("server closed the connection", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;
    assert_eq!(server.stats.snapshot().handshake_failures, 1);
}

#[tokio::test]
async fn client_in_another_trust_domain() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let foreign_id = id("spiffe://other.domain/ns/test/sa/client");
    let cert = pki
        .ca
        .issue_any(&foreign_id, OffsetDateTime::now_utc(), DAY)
        .unwrap();
    let failure = refused(&server, &cert.identity().unwrap(), &pki.server_id).await;
    assert_eq!(failure, TlsFailure::RejectedNotAuthorized);
}

#[tokio::test]
async fn client_expecting_another_server_identity() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let wanted = id("spiffe://cluster.local/ns/test/sa/somebody-else");
    let failure = refused(&server, &pki.client, &wanted).await;
    assert_eq!(
        failure,
        TlsFailure::WrongServerIdentity {
            expected: vec![wanted],
            presented: pki.server_id.clone(),
        }
    );
}

/// A dialer remembers the server chains it accepted, so that a repeat
/// handshake skips the CA's signature on them; the identity each dial
/// expects is still checked every time.
#[tokio::test]
async fn a_server_accepted_before_is_still_held_to_the_identity_each_dial_expects() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let echo = start_echo().await;
    let dialer = Dialer::with_config(
        &pki.client,
        hbone::DialerConfig::default().with_pooling(false),
    )
    .unwrap();
    for _ in 0..2 {
        let tunnel = dialer
            .connect(server.addr, std::slice::from_ref(&pki.server_id), echo)
            .await
            .expect("the expected server is accepted, first and again");
        let echoed = echo_roundtrip(tunnel, b"ping").await.unwrap();
        assert_eq!(echoed, b"ping");
    }
    let wanted = id("spiffe://cluster.local/ns/test/sa/somebody-else");
    let error = match dialer
        .connect(server.addr, std::slice::from_ref(&wanted), echo)
        .await
    {
        Ok(_) => panic!("a server of another identity must be refused"),
        Err(e) => e,
    };
    match error {
        DialError::Tls {
            failure: TlsFailure::WrongServerIdentity { presented, .. },
            ..
        } => assert_eq!(presented, pki.server_id),
        other => panic!("expected a wrong server identity, got {other:?}"),
    }
    assert_eq!(server.stats.snapshot().tunnels_opened, 2);
}

fn expired(pki: &Pki, who: &hbone::SpiffeId) -> Identity {
    let two_days_ago = OffsetDateTime::now_utc() - Duration::from_secs(2 * 86_400);
    pki.ca
        .issue_any(who, two_days_ago, Duration::from_secs(3600))
        .unwrap()
        .identity()
        .unwrap()
}

#[tokio::test]
async fn expired_client_certificate() {
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let failure = refused(&server, &expired(&pki, &pki.client_id), &pki.server_id).await;
    assert_eq!(failure, TlsFailure::RejectedExpired);
}

#[tokio::test]
async fn expired_server_certificate() {
    let pki = Pki::new();
    let config = ServerConfig::new(loopback(), expired(&pki, &pki.server_id));
    let server = start_server(config).await;
    let failure = refused(&server, &pki.client, &pki.server_id).await;
    assert_eq!(failure, TlsFailure::ServerCertExpired);
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.server.clone());
    config.timeouts.handshake = Duration::from_millis(300);
    let server = start_server(config).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connected = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("server should close a silent connection");
    assert!(matches!(read, Ok(0) | Err(_)));
    // Not before the timeout ran out (no TLS yet, so no GOAWAY to expect).
    assert!(
        connected.elapsed() >= Duration::from_millis(300),
        "closed after {:?}",
        connected.elapsed()
    );
    eventually("the failure counted", || {
        server.stats.snapshot().handshake_failures == 1
    })
    .await;
    eventually("connection closed", || {
        server.stats.snapshot().connections_active == 0
    })
    .await;
}

/// A server address that is not TLS at all (a plain TCP service) is named
/// as such, not as a "corrupt message of type InvalidContentType".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tcp_port_is_named_as_not_speaking_tls() {
    let pki = Pki::new();
    // A plain service that greets first, as SSH or SMTP do.
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let plain = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
        }
    });
    let dialer = Dialer::new(&pki.client).unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(10),
        dialer.connect(plain, std::slice::from_ref(&pki.server_id), plain),
    )
    .await
    .expect("the dial ends")
    .err()
    .expect("a plain port is not an HBONE server");
    assert!(
        matches!(
            error,
            DialError::Tls {
                failure: TlsFailure::NotTls,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("not speaking TLS"), "{error}");
}

/// Each waiting step of the dialer has its own limit and says which one
/// ran out: a server that accepts TCP and never speaks TLS fails the
/// handshake step; one that completes TLS and HTTP/2 and never answers the
/// CONNECT fails the response step. Neither fails before its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_side_timeout_names_its_stage() {
    use hbone::client::Stage;
    use hbone::config::Timeouts;
    let pki = Pki::new();
    let echo = start_echo().await;
    let handshake = Duration::from_millis(300);
    let response = Duration::from_millis(500);
    let dialer = hbone::Dialer::with_config(
        &pki.client,
        hbone::DialerConfig::default().with_timeouts(
            Timeouts::default()
                .with_handshake(handshake)
                .with_response(response),
        ),
    )
    .unwrap();
    let ids = std::slice::from_ref(&pki.server_id);

    // Accepts TCP, then silence.
    let mute = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(10),
        dialer.connect(mute_addr, ids, echo),
    )
    .await
    {
        Ok(Err(hbone::DialError::Timeout {
            stage: Stage::Handshake,
            ..
        })) => {}
        other => panic!(
            "expected a handshake timeout, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    assert!(started.elapsed() >= handshake, "{:?}", started.elapsed());

    // TLS and HTTP/2 complete; the CONNECT is never answered.
    let acceptor = raw_tls_acceptor(&pki.server);
    let silent = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = silent.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut connection = h2::server::handshake(tls).await.unwrap();
                let mut unanswered = Vec::new();
                while let Some(Ok(stream)) = connection.accept().await {
                    unanswered.push(stream);
                }
            });
        }
    });
    let started = std::time::Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(10),
        dialer.connect(silent_addr, ids, echo),
    )
    .await
    {
        Ok(Err(hbone::DialError::Timeout {
            stage: Stage::Response,
            ..
        })) => {}
        other => panic!(
            "expected a response timeout, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    assert!(started.elapsed() >= response, "{:?}", started.elapsed());
}

/// The server speaks TLS 1.3 with AES-GCM only and never resumes a session
/// (as ztunnel): a client offering only TLS 1.2, or only ChaCha20, is
/// refused, and a client that keeps session tickets gets a full handshake
/// every time. Clients written without hbone's TLS code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_suites_and_resumption_are_restricted() {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let pki = Pki::new();
    let server = start_default_server(&pki).await;
    let connect = |config: std::sync::Arc<rustls::ClientConfig>| async move {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(server.addr.ip().into());
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .expect("the handshake ends one way or the other")
    };

    let tls12 = raw_client_config_with(
        Some(&pki.client),
        &[&rustls::version::TLS12],
        default_provider(),
    );
    let refused = connect(std::sync::Arc::new(tls12)).await;
    assert!(refused.is_err(), "a TLS 1.2-only client was accepted");

    let mut chacha = default_provider();
    chacha.cipher_suites = vec![cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    let chacha = raw_client_config_with(Some(&pki.client), &[&rustls::version::TLS13], chacha);
    let refused = connect(std::sync::Arc::new(chacha)).await;
    assert!(refused.is_err(), "a ChaCha20-only client was accepted");

    // rustls resumes by default when the server sends tickets or keeps
    // sessions; this server does neither.
    let resuming = std::sync::Arc::new(raw_client_config_with(
        Some(&pki.client),
        &[&rustls::version::TLS13],
        default_provider(),
    ));
    for attempt in 0..3 {
        let mut tls = connect(resuming.clone())
            .await
            .expect("an AES-GCM TLS 1.3 client is served");
        let (_, connection) = tls.get_ref();
        assert_eq!(
            connection.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "connection {attempt} resumed a session"
        );
        // TLS 1.3 tickets come after the handshake, ahead of application
        // data: reading the server's SETTINGS takes in any ticket, so the
        // next attempt would resume if the server had sent one.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut settings = [0u8; 9];
        within(
            PEER_WAIT,
            "the server's SETTINGS",
            tls.read_exact(&mut settings),
        )
        .await
        .expect("the server answers the preface");
        assert_eq!(settings[3], 0x4, "the server's first frame is SETTINGS");
    }
}

/// RSA identities work end to end (the README says RSA and ECDSA keys
/// both do): a CA and two RSA-2048 leaves made here with rcgen, a server
/// and a dialer on them, bytes echoed through a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_identities_work_end_to_end() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        PKCS_RSA_SHA256, SanType,
    };
    let ca_key = KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |id: &str| {
        let key = KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        Identity::from_pem(&cert.pem(), &key.serialize_pem(), &ca_cert.pem())
            .expect("an RSA identity loads")
    };
    let server_id = "spiffe://cluster.local/ns/demo/sa/rsa-server";
    let server = start_server(ServerConfig::new(loopback(), leaf(server_id))).await;
    let client = leaf("spiffe://cluster.local/ns/demo/sa/rsa-client");
    let echo = start_echo().await;
    let dialer = Dialer::new(&client).unwrap();
    let tunnel = dialer
        .connect(server.addr, &[id(server_id)], echo)
        .await
        .expect("an RSA server and an RSA client open a tunnel");
    assert_eq!(
        echo_roundtrip(tunnel, b"over RSA").await.unwrap(),
        b"over RSA"
    );
}

/// A CA and leaves made here with rcgen, for certificates the development
/// CA will not issue: `leaf` signs a certificate naming each of `ids`.
struct RcgenCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl RcgenCa {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        RcgenCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, ids: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = ids
            .iter()
            .map(|id| SanType::URI((*id).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.signed_by(&key, &self.issuer).unwrap(), key)
    }

    fn identity(&self, id: &str) -> Identity {
        let (cert, key) = self.leaf(&[id]);
        Identity::from_pem(&cert.pem(), &key.serialize_pem(), &self.cert.pem()).unwrap()
    }
}

/// An X.509-SVID carries exactly one URI SAN: a client certificate naming
/// two SPIFFE IDs, from a CA the server trusts, is refused at the
/// handshake and counted, not taken for its first ID; a one-ID client of
/// the same CA is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_with_two_spiffe_ids_is_refused() {
    let ca = RcgenCa::new();
    let server_id = "spiffe://cluster.local/ns/demo/sa/server";
    let server = start_server(ServerConfig::new(loopback(), ca.identity(server_id))).await;
    let (two, key) = ca.leaf(&[
        "spiffe://cluster.local/ns/demo/sa/one",
        "spiffe://cluster.local/ns/demo/sa/two",
    ]);
    let config = raw_client_config_presenting(two.der().clone(), key.serialize_der());
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(server.addr.ip().into());
    // TLS 1.3: the client's handshake ends before the server has judged
    // its certificate; the refusal arrives as an alert on the first read.
    let outcome = within(PEER_WAIT, "the two-ID handshake", async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let mut byte = [0u8; 1];
        tls.read(&mut byte).await
    })
    .await;
    assert!(
        matches!(outcome, Err(_) | Ok(0)),
        "a two-ID client was served: {outcome:?}"
    );
    eventually("the refusal counted", || {
        server.stats.snapshot().handshake_failures == 1
    })
    .await;

    let echo = start_echo().await;
    let dialer = Dialer::new(&ca.identity("spiffe://cluster.local/ns/demo/sa/one")).unwrap();
    let tunnel = within(
        PEER_WAIT,
        "the one-ID tunnel",
        dialer.connect(server.addr, &[id(server_id)], echo),
    )
    .await
    .expect("a one-ID client of the same CA is served");
    assert_eq!(echo_roundtrip(tunnel, b"one").await.unwrap(), b"one");
    assert_eq!(server.stats.snapshot().handshake_failures, 1);
}

/// The dialer sends no SNI (a SPIFFE ID is not a host name, and a name
/// would tell onlookers where the tunnel goes: it names servers by address
/// and has SNI off besides) and offers ALPN h2 only; a server that does
/// not choose h2 is refused with `NoH2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_sends_no_sni_and_refuses_a_server_without_h2() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = (**raw_tls_acceptor(&pki.server).config()).clone();
    config.alpn_protocols = Vec::new();
    let config = std::sync::Arc::new(config);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .unwrap();
        let hello = start.client_hello();
        let sni = hello.server_name().map(str::to_owned);
        let alpn: Option<Vec<Vec<u8>>> = hello
            .alpn()
            .map(|offered| offered.map(<[u8]>::to_vec).collect());
        let _ = start.into_stream(config).await;
        (sni, alpn)
    });
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let server_id = std::slice::from_ref(&pki.server_id);
    let outcome = within(PEER_WAIT, "the dial", dialer.connect(addr, server_id, echo)).await;
    match outcome {
        Err(DialError::Tls {
            failure: TlsFailure::NoH2,
            ..
        }) => {}
        Err(other) => panic!("expected NoH2, got {other:?}"),
        Ok(_) => panic!("a server without h2 was used"),
    }
    let (sni, alpn) = within(PEER_WAIT, "the server's view", server)
        .await
        .unwrap();
    assert_eq!(sni, None, "the dialer sent SNI");
    assert_eq!(alpn, Some(vec![b"h2".to_vec()]), "ALPN offered");
}
