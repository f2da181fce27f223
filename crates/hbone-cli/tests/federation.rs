//! SPIFFE federation: an identity carrying another trust domain's roots.
//! A peer of that domain must chain to those roots (a certificate for its
//! ID from our own CA is a forgery), and a server admits it to the
//! handshake only when its policy names the peer; the default stays "our
//! trust domain only".

use std::time::Duration;

use hbone::ca::DevCa;
use hbone::identity::FederatedBundles;
use hbone::policy::{IdPattern, Policy};
use hbone::{DialError, Dialer, Identity, ServerConfig, SpiffeId};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::common::*;

const PARTNER_TD: &str = "partner.example";
const PARTNER: &str = "spiffe://partner.example/ns/billing/sa/api";
const PARTNER_OTHER: &str = "spiffe://partner.example/ns/billing/sa/batch";

fn roots(ca: &DevCa) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes())
        .map(Result::unwrap)
        .collect()
}

/// `ca`'s certificate for `id`, trusting `federated` besides `ca`.
fn identity(ca: &DevCa, id: &str, federated: &[(&str, &DevCa)]) -> Identity {
    let identity = ca
        .issue_any(
            &SpiffeId::parse(id).unwrap(),
            time::OffsetDateTime::now_utc() - Duration::from_secs(60),
            DAY,
        )
        .unwrap()
        .identity()
        .unwrap();
    let bundles: FederatedBundles = federated
        .iter()
        .map(|(domain, ca)| ((*domain).to_owned(), roots(ca)))
        .collect();
    identity.with_federated_bundles(bundles)
}

struct Meshes {
    ours: DevCa,
    partner: DevCa,
    echo: std::net::SocketAddr,
}

impl Meshes {
    async fn new() -> Meshes {
        Meshes {
            ours: DevCa::generate(TD, DAY).unwrap(),
            partner: DevCa::generate(PARTNER_TD, DAY).unwrap(),
            echo: start_echo().await,
        }
    }

    /// Our server, federated with the partner, under `policy`.
    async fn server(&self, policy: Policy) -> RunningServer {
        let server_id = "spiffe://cluster.local/ns/shop/sa/server";
        let mut config = ServerConfig::new(
            loopback(),
            identity(&self.ours, server_id, &[(PARTNER_TD, &self.partner)]),
        );
        config.policy = policy;
        start_server(config).await
    }

    /// A tunnel from `client` to `server`, expecting our server's ID.
    async fn tunnel(&self, client: &Identity, server: &RunningServer) -> Result<(), DialError> {
        let dialer = Dialer::new(client).unwrap();
        let expected = id("spiffe://cluster.local/ns/shop/sa/server");
        let tunnel = dialer
            .connect(server.addr, std::slice::from_ref(&expected), self.echo)
            .await?;
        assert_eq!(echo_roundtrip(tunnel, b"across").await.unwrap(), b"across");
        Ok(())
    }

    /// A partner workload that trusts our trust domain through federation.
    fn partner_client(&self, id: &str) -> Identity {
        identity(&self.partner, id, &[(TD, &self.ours)])
    }
}

fn allow(ids: &[&str]) -> Policy {
    Policy::new(
        ids.iter()
            .map(|p| p.parse::<IdPattern>().unwrap())
            .collect(),
        Vec::new(),
    )
}

#[tokio::test]
async fn a_federated_peer_is_refused_by_default_and_admitted_when_named() {
    let meshes = Meshes::new().await;
    let partner = meshes.partner_client(PARTNER);

    // The default policy: any peer of our trust domain, none of another.
    let server = meshes.server(Policy::default()).await;
    assert!(
        meshes.tunnel(&partner, &server).await.is_err(),
        "a federated peer no rule names completed the handshake"
    );
    let ours = identity(&meshes.ours, "spiffe://cluster.local/ns/shop/sa/web", &[]);
    meshes.tunnel(&ours, &server).await.unwrap();
    let refused = server.stats.snapshot().handshake_failures;
    assert!(
        refused >= 1,
        "the refusal happened in the handshake: {refused}"
    );

    // A rule naming the partner's workload admits that one only.
    let server = meshes
        .server(allow(&[PARTNER, "spiffe://cluster.local/*"]))
        .await;
    meshes.tunnel(&partner, &server).await.unwrap();
    let other = meshes.partner_client(PARTNER_OTHER);
    assert!(meshes.tunnel(&other, &server).await.is_err());
    meshes.tunnel(&ours, &server).await.unwrap();
}

#[tokio::test]
async fn a_partner_id_signed_by_our_own_ca_is_a_forgery() {
    let meshes = Meshes::new().await;
    let server = meshes
        .server(allow(&[
            "spiffe://partner.example/*",
            "spiffe://cluster.local/*",
        ]))
        .await;
    // Our CA signing an ID of the partner's domain: its chain leads to
    // our roots, not the partner's, so the server refuses it.
    let forged = identity(&meshes.ours, PARTNER, &[]);
    assert!(meshes.tunnel(&forged, &server).await.is_err());
    let genuine = meshes.partner_client(PARTNER);
    meshes.tunnel(&genuine, &server).await.unwrap();
}

#[tokio::test]
async fn a_client_checks_a_federated_server_against_its_domain_roots() {
    let meshes = Meshes::new().await;
    let partner_server = |ca: &DevCa| {
        let mut config =
            ServerConfig::new(loopback(), identity(ca, PARTNER, &[(TD, &meshes.ours)]));
        config.policy = allow(&["spiffe://cluster.local/*"]);
        config
    };
    let genuine = start_server(partner_server(&meshes.partner)).await;
    let ours = identity(
        &meshes.ours,
        "spiffe://cluster.local/ns/shop/sa/web",
        &[(PARTNER_TD, &meshes.partner)],
    );
    let dialer = Dialer::new(&ours).unwrap();
    let expected = id(PARTNER);
    let tunnel = dialer
        .connect(genuine.addr, std::slice::from_ref(&expected), meshes.echo)
        .await
        .unwrap();
    assert_eq!(tunnel.peer_id(), &expected);

    // The same ID from our own CA: refused by our client.
    let forged = start_server({
        let mut config = ServerConfig::new(loopback(), identity(&meshes.ours, PARTNER, &[]));
        config.policy = allow(&["spiffe://cluster.local/*"]);
        config.trust_domains = vec![TD.to_owned()];
        config
    })
    .await;
    let Err(error) = dialer
        .connect(forged.addr, std::slice::from_ref(&expected), meshes.echo)
        .await
    else {
        panic!("our client accepted a partner ID signed by our own CA");
    };
    assert!(error.to_string().contains("not signed by a CA"), "{error}");
}

/// A server ID given as a trust domain alone (`spiffe://TD`) accepts any
/// workload of that domain, still checked against that domain's roots,
/// and no workload of another.
#[tokio::test]
async fn a_client_expecting_a_trust_domain_accepts_its_workloads_only() {
    let meshes = Meshes::new().await;
    let mut config = ServerConfig::new(
        loopback(),
        identity(&meshes.partner, PARTNER, &[(TD, &meshes.ours)]),
    );
    config.policy = allow(&["spiffe://cluster.local/*"]);
    let partner = start_server(config).await;
    let ours = identity(
        &meshes.ours,
        "spiffe://cluster.local/ns/shop/sa/web",
        &[(PARTNER_TD, &meshes.partner)],
    );
    let dialer = Dialer::new(&ours).unwrap();
    let tunnel = dialer
        .connect(partner.addr, &[id("spiffe://partner.example")], meshes.echo)
        .await
        .unwrap();
    assert_eq!(tunnel.peer_id(), &id(PARTNER));
    assert_eq!(echo_roundtrip(tunnel, b"td").await.unwrap(), b"td");

    let Err(error) = dialer
        .connect(partner.addr, &[id("spiffe://cluster.local")], meshes.echo)
        .await
    else {
        panic!("a server of another trust domain met spiffe://cluster.local");
    };
    assert!(
        error.to_string().contains("wrong server identity"),
        "{error}"
    );
}
