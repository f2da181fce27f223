//! Certificate rotation: new handshakes use new material, open tunnels
//! carry on, and a broken or mismatched pair is refused with the old
//! identity kept.

use std::time::Duration;

use crate::common::*;
use hbone::ca::DevCa;
use hbone::tls::TlsFailure;
use hbone::{DialError, Dialer, Identity, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The leaf certificate a server presents to a new connection.
async fn presented(server: std::net::SocketAddr) -> Vec<u8> {
    let tls = tokio::time::timeout(Duration::from_secs(10), raw_tls(server, None))
        .await
        .expect("the TLS handshake ends")
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rotates_without_dropping_tunnels() {
    let pki = Pki::new();
    let server = Server::bind(ServerConfig::new(loopback(), pki.server.clone()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let tls = server.tls();
    let _running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let dialer = Dialer::new(&pki.client).unwrap();
    let ids = std::slice::from_ref(&pki.server_id);
    let mut open = dialer.connect(addr, ids, echo).await.unwrap();
    open.write_all(b"before ").await.unwrap();
    assert_eq!(presented(addr).await, pki.server.chain()[0].to_vec());

    // Same identity, new key and certificate.
    let renewed = pki
        .ca
        .issue(&pki.server_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    tls.reload(&renewed).unwrap();
    assert_eq!(presented(addr).await, renewed.chain()[0].to_vec());
    let fresh = Dialer::new(&pki.client).unwrap();
    let tunnel = fresh.connect(addr, ids, echo).await.unwrap();
    assert_eq!(
        echo_roundtrip(tunnel, b"new handshake").await.unwrap(),
        b"new handshake"
    );

    // The tunnel opened before the rotation is untouched.
    open.write_all(b"and after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(
        PEER_WAIT,
        "the open tunnel's echo",
        open.read_to_end(&mut echoed),
    )
    .await
    .unwrap();
    assert_eq!(echoed, b"before and after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_rotation_on_both_sides() {
    let pki = Pki::new();
    let server = Server::bind(ServerConfig::new(loopback(), pki.server.clone()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let tls = server.tls();
    let _running = tokio::spawn(server.run());
    let echo = start_echo().await;
    let ids = std::slice::from_ref(&pki.server_id);

    // Both sides move to a new CA; the server first.
    let new_ca = DevCa::generate(TD, DAY).unwrap();
    let new_server = new_ca
        .issue(&pki.server_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    let new_client = new_ca
        .issue(&pki.client_id, DAY)
        .unwrap()
        .identity()
        .unwrap();
    tls.reload(&new_server).unwrap();
    let dialer = Dialer::new(&pki.client).unwrap();
    match dialer.connect(addr, ids, echo).await {
        Err(DialError::Tls {
            failure: TlsFailure::ServerUnknownCa,
            ..
        }) => {}
        other => panic!(
            "a client on the old CA must not trust the new server: {:?}",
            other.map(|_| "tunnel")
        ),
    }
    dialer.reload_identity(&new_client).unwrap();
    let tunnel = dialer.connect(addr, ids, echo).await.unwrap();
    assert_eq!(echo_roundtrip(tunnel, b"new CA").await.unwrap(), b"new CA");
}

#[test]
fn a_mismatched_pair_is_refused_before_it_reaches_tls() {
    let pki = Pki::new();
    let one = pki.ca.issue(&pki.server_id, DAY).unwrap();
    let two = pki.ca.issue(&pki.server_id, DAY).unwrap();
    let error = Identity::from_pem(&one.chain_pem, &two.key_pem, &one.bundle_pem).unwrap_err();
    assert!(error.to_string().contains("does not belong"), "{error}");
    let half = &one.chain_pem[..one.chain_pem.len() / 2];
    assert!(Identity::from_pem(half, &one.key_pem, &one.bundle_pem).is_err());
}

/// A root, an intermediate it signed, and leaves for `id` the
/// intermediate signs: PEM text of each, made with rcgen.
struct TwoTierCa {
    root_pem: String,
    intermediate_pem: String,
    intermediate: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TwoTierCa {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_params = |name: &str| {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            params
        };
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("test root");
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        let root = Issuer::new(root_params, root_key);
        let intermediate_key = KeyPair::generate().unwrap();
        let intermediate_params = ca_params("test intermediate");
        let intermediate_pem = intermediate_params
            .signed_by(&intermediate_key, &root)
            .unwrap()
            .pem();
        TwoTierCa {
            root_pem,
            intermediate_pem,
            intermediate: Issuer::new(intermediate_params, intermediate_key),
        }
    }

    /// A leaf for `id`: its PEM and its key's.
    fn leaf(&self, id: &str) -> (String, String) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.intermediate).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A rotation to a chain that left out its intermediate (leaf only, the
/// bundle holding the root) is refused, and the server keeps presenting the
/// certificate it had; the same leaf with its intermediate is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_missing_its_intermediate_is_refused_and_the_old_identity_kept() {
    let ca = TwoTierCa::new();
    let id = "spiffe://cluster.local/ns/test/sa/server";
    let (first_leaf, first_key) = ca.leaf(id);
    let full_chain = format!("{first_leaf}{}", ca.intermediate_pem);
    let first = Identity::from_pem(&full_chain, &first_key, &ca.root_pem).unwrap();
    assert_eq!(first.chain().len(), 2);
    let server = Server::bind(ServerConfig::new(loopback(), first.clone()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let tls = server.tls();
    let _running = tokio::spawn(server.run());
    assert_eq!(presented(addr).await, first.chain()[0].to_vec());

    let (next_leaf, next_key) = ca.leaf(id);
    // Loads (nothing in the files themselves is wrong)...
    let truncated = Identity::from_pem(&next_leaf, &next_key, &ca.root_pem).unwrap();
    assert_eq!(truncated.chain().len(), 1);
    // ...but would fail every handshake, so the server will not take it.
    let error = tls.reload(&truncated).unwrap_err();
    assert!(
        matches!(error, hbone::tls::TlsConfigError::IncompleteChain(_)),
        "{error}"
    );
    assert_eq!(
        presented(addr).await,
        first.chain()[0].to_vec(),
        "the old identity stays in force"
    );

    let complete = Identity::from_pem(
        &format!("{next_leaf}{}", ca.intermediate_pem),
        &next_key,
        &ca.root_pem,
    )
    .unwrap();
    tls.reload(&complete).unwrap();
    assert_eq!(presented(addr).await, complete.chain()[0].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_visible() {
    let pki = Pki::new();
    let expires = pki.server.expires_at().unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(23 * 3600) && left < Duration::from_secs(25 * 3600),
        "{left:?}"
    );
}
