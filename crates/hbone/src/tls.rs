//! rustls configurations for both ends of an HBONE connection.
//!
//! Both sides speak TLS 1.3 only, with AES-GCM suites (as ztunnel does), ALPN
//! `h2`, and mutual authentication by SPIFFE certificates. SPIFFE
//! certificates carry no DNS or IP SAN, so the client cannot use the stock
//! hostname verifier: it checks the chain with webpki and then compares the
//! server's URI SAN with the identities it expects. The server checks the
//! client's chain and that the client belongs to its trust domain; which
//! identity may reach which target is decided later, by [`crate::policy`].
//!
//! Both sides can also check certificates against revocation lists, as
//! [`crate::revocation`] describes.
//!
//! Session resumption is off on both sides: a resumed TLS 1.3 session skips
//! certificate verification, and the client's expected identities differ per
//! destination, so a ticket must never stand in for a full check. Only
//! the CA's signature on a chain accepted before is taken as read, while
//! that verdict cannot have changed (see the `verified_chains` module).

use std::io;
use std::sync::{Arc, RwLock};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};

use crate::identity::{Identity, SpiffeId, spiffe_id_of};
use crate::revocation::Revocation;
use crate::verified_chains::VerifiedChains;

/// The most TLS a connection queues for sending: a whole 256 KiB DATA
/// frame's records (16 of 16 KiB, with their overhead) and as much again,
/// so that one frame goes out in one `writev`; rustls' default, 64 KiB,
/// split it in four.
pub(crate) const SEND_BUFFER: usize = 512 << 10;

/// The ALPN protocol both sides require.
pub const ALPN_H2: &[u8] = b"h2";

pub use crate::crypto::provider;

/// A configuration that could not be built from the given identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// No certificate of the trust bundle can serve as a trust anchor.
    #[error("trust bundle holds no usable CA certificate: {0}")]
    Bundle(String),
    /// rustls refused the certificate chain or the private key.
    #[error("certificate or key rejected by TLS: {0}")]
    Certificate(#[from] rustls::Error),
    /// A rotation would present a chain that its own trust bundle cannot
    /// verify (an intermediate left out, or a bundle without the issuer),
    /// where the chain in use could: peers sharing the bundle would refuse
    /// every new handshake.
    #[error("certificate chain does not lead to the trust bundle: {0}")]
    IncompleteChain(String),
}

/// Whether `identity`'s chain leads to a certificate of its own trust
/// bundle. Only a missing link or a bad signature counts against it: an
/// expired certificate or a missing key usage is reported elsewhere.
fn chains_to_own_bundle(identity: &Identity) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(identity.bundle().iter().cloned());
    let Some((leaf, intermediates)) = identity.chain().split_first() else {
        return Err("no certificate".into());
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    match rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    ) {
        Err(
            e @ rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ),
        ) => Err(e.to_string()),
        _ => Ok(()),
    }
}

fn root_store(identity: &Identity) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(identity.bundle().iter().cloned());
    if added == 0 {
        return Err(TlsConfigError::Bundle(format!(
            "{ignored} certificate(s) could not be used as trust anchors"
        )));
    }
    Ok(Arc::new(roots))
}

/// Decides whether a peer of a federated trust domain, its chain verified
/// against its own domain's roots, may complete the handshake: the server
/// asks its policy whether a rule names the peer.
pub type FederationGate = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// The roots of each federated trust domain of `identity`, as stores.
fn federated_stores(
    identity: &Identity,
) -> Result<std::collections::BTreeMap<String, Arc<RootCertStore>>, TlsConfigError> {
    identity
        .federated_bundles()
        .iter()
        .map(|(domain, roots)| {
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
            if added == 0 {
                return Err(TlsConfigError::Bundle(format!(
                    "trust domain {domain}: {ignored} certificate(s) could not be used as trust anchors"
                )));
            }
            Ok((domain.clone(), Arc::new(store)))
        })
        .collect()
}

/// Server side: require a client certificate chained to the bundle, not
/// revoked by `revocation`, and in one of `trust_domains`. Peers of a
/// federated trust domain of `identity` are verified against that
/// domain's roots instead, and admitted only when `federation` says so
/// (no gate: never).
pub fn server_config(
    identity: &Identity,
    trust_domains: Vec<String>,
    revocation: &Revocation,
    federation: Option<FederationGate>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = provider();
    let chain_verifier_for = |roots| {
        revocation
            .client_verifier(roots, provider.clone())
            .map_err(|e| TlsConfigError::Bundle(e.to_string()))
    };
    let chain_verifier = chain_verifier_for(root_store(identity)?)?;
    let federated = federated_stores(identity)?
        .into_iter()
        .map(|(domain, roots)| Ok((domain, chain_verifier_for(roots)?)))
        .collect::<Result<_, TlsConfigError>>()?;
    let verifier = Arc::new(SpiffeClientVerifier {
        chain_verifier,
        trust_domains,
        federated,
        federation,
        verified: VerifiedChains::new(revocation),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The server's TLS configuration, replaceable while the server runs: new
/// handshakes use the material given last; connections already open keep
/// theirs (certificate rotation without dropping tunnels).
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<ServerState>>,
    trust_domains: Vec<String>,
    federation: Option<FederationGate>,
}

/// What the server's configuration was built from, so that either part
/// can be replaced alone.
struct ServerState {
    config: Arc<rustls::ServerConfig>,
    /// Whether the identity's chain leads to its own bundle.
    chained: bool,
    identity: Identity,
    revocation: Revocation,
}

impl ServerTls {
    /// The configuration for `identity`, accepting clients of
    /// `trust_domains` (and of federated trust domains only once a gate is
    /// set with [`ServerTls::with_federation_gate`]).
    pub fn new(identity: &Identity, trust_domains: Vec<String>) -> Result<Self, TlsConfigError> {
        Self::with_revocation(identity, trust_domains, Revocation::default())
    }

    /// As [`ServerTls::new`], refusing client certificates that
    /// `revocation` revokes.
    pub fn with_revocation(
        identity: &Identity,
        trust_domains: Vec<String>,
        revocation: Revocation,
    ) -> Result<Self, TlsConfigError> {
        let config = server_config(identity, trust_domains.clone(), &revocation, None)?;
        let chained = chains_to_own_bundle(identity).is_ok();
        Ok(ServerTls {
            current: Arc::new(RwLock::new(ServerState {
                config,
                chained,
                identity: identity.clone(),
                revocation,
            })),
            trust_domains,
            federation: None,
        })
    }

    /// Admits peers of federated trust domains that `gate` approves, for
    /// `identity` and every identity reloaded later.
    pub fn with_federation_gate(
        mut self,
        identity: &Identity,
        gate: FederationGate,
    ) -> Result<Self, TlsConfigError> {
        self.federation = Some(gate);
        self.reload(identity)?;
        Ok(self)
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .clone()
    }

    /// Checks client certificates of new handshakes against `revocation`
    /// (replacing the lists in force); the identity stays. Connections
    /// already open are not re-checked. On error the previous lists stay.
    pub fn reload_revocation(&self, revocation: Revocation) -> Result<(), TlsConfigError> {
        // Built under the write lock, as in `reload`: an identity reload
        // and a revocation reload at once must not undo each other.
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.config = server_config(
            &current.identity,
            self.trust_domains.clone(),
            &revocation,
            self.federation.clone(),
        )?;
        current.revocation = revocation;
        Ok(())
    }

    /// Switches to `identity` (certificate, key and trust bundle) for new
    /// handshakes. On error the previous material stays in force. A chain
    /// that its own bundle cannot verify is refused when the chain in use
    /// could be verified ([`TlsConfigError::IncompleteChain`]): a rotation
    /// that lost an intermediate would otherwise fail every handshake.
    /// The revocation lists in force are kept.
    pub fn reload(&self, identity: &Identity) -> Result<(), TlsConfigError> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let config = server_config(
            identity,
            self.trust_domains.clone(),
            &current.revocation,
            self.federation.clone(),
        )?;
        let chained = chains_to_own_bundle(identity);
        if let (true, Err(why)) = (current.chained, &chained) {
            return Err(TlsConfigError::IncompleteChain(why.clone()));
        }
        current.config = config;
        current.chained = chained.is_ok();
        current.identity = identity.clone();
        Ok(())
    }
}

/// Client side, without a verifier: [`ClientBase::for_peer`] adds the one that
/// checks the identities expected of a given server. Build this once per
/// dialer and derive per-destination configs from it. It checks no
/// revocation list until given some with [`ClientBase::with_revocation`].
pub fn client_base_config(identity: &Identity) -> Result<ClientBase, TlsConfigError> {
    let provider = provider();
    let roots = TrustAnchors {
        own_domain: identity.id().trust_domain().to_owned(),
        own: root_store(identity)?,
        federated: federated_stores(identity)?,
    };
    let roots = Arc::new(roots);
    let verified = Arc::new(VerifiedChains::new(&Revocation::default()));
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots.clone(),
        algorithms: provider.signature_verification_algorithms,
        expected: Vec::new(),
        revocation: Revocation::default(),
        verified: verified.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(ClientBase {
        config,
        roots,
        algorithms: provider.signature_verification_algorithms,
        revocation: Revocation::default(),
        verified,
    })
}

/// A client configuration awaiting the identities it should expect.
#[derive(Clone)]
pub struct ClientBase {
    config: rustls::ClientConfig,
    roots: Arc<TrustAnchors>,
    algorithms: WebPkiSupportedAlgorithms,
    revocation: Revocation,
    /// Server chains accepted under these roots and lists, shared by
    /// every destination's config.
    verified: Arc<VerifiedChains>,
}

impl ClientBase {
    /// The same, refusing server certificates that `revocation` revokes
    /// (replacing any lists given before).
    #[must_use]
    pub fn with_revocation(mut self, revocation: Revocation) -> Self {
        // Chains accepted under the old lists are checked anew.
        self.verified = Arc::new(VerifiedChains::new(&revocation));
        self.revocation = revocation;
        self
    }

    /// The revocation lists server certificates are checked against.
    pub fn revocation(&self) -> &Revocation {
        &self.revocation
    }

    /// A config that accepts only a server presenting one of `expected`.
    pub fn for_peer(&self, expected: &[SpiffeId]) -> Arc<rustls::ClientConfig> {
        let mut config = self.config.clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: self.roots.clone(),
                algorithms: self.algorithms,
                expected: expected.to_vec(),
                revocation: self.revocation.clone(),
                verified: self.verified.clone(),
            }));
        Arc::new(config)
    }
}

/// The server name passed to rustls. SNI is disabled, so it never reaches
/// the wire; rustls still wants one.
pub fn placeholder_server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// The server presented a valid certificate for someone we did not expect.
#[derive(Debug, Clone, thiserror::Error)]
#[error("server presented {presented}, expected one of [{}]", join_ids(.expected))]
#[non_exhaustive]
pub struct UnexpectedPeer {
    /// The identities the dialer would accept.
    pub expected: Vec<SpiffeId>,
    /// The identity the server's certificate proves.
    pub presented: SpiffeId,
}

fn join_ids(ids: &[SpiffeId]) -> String {
    ids.iter()
        .map(SpiffeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The client's certificate is valid but from a trust domain we do not serve.
#[derive(Debug, Clone, thiserror::Error)]
#[error("client {presented} is outside trust domain(s) [{}]", .allowed.join(", "))]
#[non_exhaustive]
pub struct ForeignTrustDomain {
    /// The trust domains the server accepts clients from.
    pub allowed: Vec<String>,
    /// The identity the client's certificate proves.
    pub presented: SpiffeId,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

/// The roots a client verifies servers with: a server claiming an ID of a
/// federated trust domain must chain to that domain's roots; any other
/// to the bundle.
#[derive(Debug)]
struct TrustAnchors {
    own_domain: String,
    own: Arc<RootCertStore>,
    federated: std::collections::BTreeMap<String, Arc<RootCertStore>>,
}

impl TrustAnchors {
    fn for_peer(&self, end_entity: &CertificateDer<'_>) -> &RootCertStore {
        let federated = spiffe_id_of(end_entity).ok().and_then(|id| {
            (id.trust_domain() != self.own_domain)
                .then(|| self.federated.get(id.trust_domain()))
                .flatten()
        });
        federated.unwrap_or(&self.own)
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<TrustAnchors>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Vec<SpiffeId>,
    revocation: Revocation,
    verified: Arc<VerifiedChains>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verified.check(end_entity, intermediates, now, || {
            self.revocation.verify_server_chain(
                end_entity,
                intermediates,
                self.roots.for_peer(end_entity),
                self.algorithms.all,
                now,
            )
        })?;
        let presented = spiffe_id_of(end_entity).map_err(other)?;
        if !self.expected.iter().any(|id| id.accepts(&presented)) {
            return Err(other(UnexpectedPeer {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled; rustls never calls this.
        Err(rustls::Error::General("TLS 1.2 is disabled".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

struct SpiffeClientVerifier {
    chain_verifier: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
    /// A chain verifier per federated trust domain.
    federated: std::collections::BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    federation: Option<FederationGate>,
    /// Client chains accepted by `chain_verifier` or a federated one.
    verified: VerifiedChains,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domains", &self.trust_domains)
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A peer of a federated trust domain: its domain's roots, then the
    /// gate. `None` when `presented` is not of a federated domain.
    fn verify_federated(
        &self,
        presented: &SpiffeId,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<Result<ClientCertVerified, rustls::Error>> {
        if self
            .trust_domains
            .iter()
            .any(|td| td == presented.trust_domain())
        {
            return None;
        }
        let verifier = self.federated.get(presented.trust_domain())?;
        Some((|| {
            self.verified.check(end_entity, intermediates, now, || {
                verifier.verify_client_cert(end_entity, intermediates, now)
            })?;
            if self.federation.as_ref().is_some_and(|gate| gate(presented)) {
                return Ok(ClientCertVerified::assertion());
            }
            tracing::debug!(
                peer = %presented,
                "peer of a federated trust domain that no policy rule names"
            );
            Err(CertificateError::ApplicationVerificationFailure.into())
        })())
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Ok(presented) = spiffe_id_of(end_entity)
            && let Some(verdict) = self.verify_federated(&presented, end_entity, intermediates, now)
        {
            return verdict;
        }
        self.verified.check(end_entity, intermediates, now, || {
            self.chain_verifier
                .verify_client_cert(end_entity, intermediates, now)
        })?;
        let presented = spiffe_id_of(end_entity).map_err(other)?;
        if !self
            .trust_domains
            .iter()
            .any(|td| td == presented.trust_domain())
        {
            tracing::debug!(
                "{}",
                ForeignTrustDomain {
                    allowed: self.trust_domains.clone(),
                    presented,
                }
            );
            // Sent as an access_denied alert, so the client can tell this
            // apart from an unknown CA.
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain_verifier.supported_verify_schemes()
    }
}

/// Why a TLS handshake failed, as the dialer reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFailure {
    /// We do not trust the server's certificate: no CA of our bundle
    /// signed it.
    #[error("server certificate is not signed by a CA in our trust bundle")]
    ServerUnknownCa,
    /// The server's certificate is expired or not yet valid.
    #[error("server certificate is expired or not yet valid")]
    ServerCertExpired,
    /// The server's certificate, or one of its CAs, is revoked by a
    /// revocation list we were given.
    #[error("server certificate is revoked")]
    ServerCertRevoked,
    /// The server's certificate is valid but proves an identity we did
    /// not expect.
    #[error("wrong server identity: presented {presented}, expected one of [{}]", join_ids(.expected))]
    WrongServerIdentity {
        /// The identities we would accept.
        expected: Vec<SpiffeId>,
        /// The identity the server proved.
        presented: SpiffeId,
    },
    /// We rejected the server's certificate for another reason.
    #[error("server certificate rejected: {0}")]
    ServerCertInvalid(String),
    /// The server does not trust our certificate's CA (`unknown_ca` alert).
    #[error("server rejected our certificate: its CA is unknown to the server")]
    RejectedUnknownCa,
    /// The server found our certificate expired or not yet valid.
    #[error("server rejected our certificate: expired or not yet valid")]
    RejectedExpired,
    /// The server found our certificate revoked (`certificate_revoked`
    /// alert).
    #[error("server rejected our certificate: it is revoked")]
    RejectedRevoked,
    /// The server refused our identity (`access_denied` alert), typically
    /// a foreign trust domain.
    #[error("server rejected our identity: not in its trust domain")]
    RejectedNotAuthorized,
    /// The server wants a client certificate and got none.
    #[error("server requires a client certificate")]
    RejectedCertificateRequired,
    /// The server sent another alert, named here.
    #[error("server rejected the handshake: {0} alert")]
    RejectedOther(String),
    /// The two sides did not agree on ALPN `h2`.
    #[error("peer did not negotiate ALPN h2")]
    NoH2,
    /// The server closed the connection right after the handshake; in TLS
    /// 1.3 that most likely means it rejected our certificate.
    #[error(
        "server closed the connection right after the handshake, before any answer; \
         it most likely rejected our certificate (its alert was lost to the close)"
    )]
    ClosedAfterHandshake,
    /// The peer answered with something that is not TLS: probably not an
    /// HBONE server at all (a plain TCP service on that port).
    #[error("the peer is not speaking TLS: is it an HBONE server?")]
    NotTls,
    /// The server closed the connection before the handshake completed,
    /// without an alert: typically a server at its connection limit, or
    /// something that is not an HBONE server.
    #[error(
        "the server closed the connection during the TLS handshake, without saying why \
         (at its connection limit, or not an HBONE server?)"
    )]
    ClosedDuringHandshake,
    /// Any other TLS error.
    #[error("TLS protocol error: {0}")]
    Protocol(String),
}

impl TlsFailure {
    /// Classifies a rustls error seen by the client.
    pub fn from_rustls(error: &rustls::Error) -> TlsFailure {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(cert_error) => match cert_error {
                CertificateError::UnknownIssuer => TlsFailure::ServerUnknownCa,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsFailure::ServerCertExpired,
                CertificateError::Revoked => TlsFailure::ServerCertRevoked,
                CertificateError::Other(OtherError(inner)) => {
                    match inner.downcast_ref::<UnexpectedPeer>() {
                        Some(u) => TlsFailure::WrongServerIdentity {
                            expected: u.expected.clone(),
                            presented: u.presented.clone(),
                        },
                        None => TlsFailure::ServerCertInvalid(inner.to_string()),
                    }
                }
                other => TlsFailure::ServerCertInvalid(other.to_string()),
            },
            E::AlertReceived(alert) => match alert {
                AlertDescription::UnknownCA => TlsFailure::RejectedUnknownCa,
                AlertDescription::CertificateExpired => TlsFailure::RejectedExpired,
                AlertDescription::CertificateRevoked => TlsFailure::RejectedRevoked,
                AlertDescription::AccessDenied => TlsFailure::RejectedNotAuthorized,
                AlertDescription::CertificateRequired => TlsFailure::RejectedCertificateRequired,
                AlertDescription::NoApplicationProtocol => TlsFailure::NoH2,
                other => TlsFailure::RejectedOther(format!("{other:?}")),
            },
            E::NoApplicationProtocol => TlsFailure::NoH2,
            E::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => TlsFailure::NotTls,
            other => TlsFailure::Protocol(other.to_string()),
        }
    }

    /// Classifies an error of the client's TLS handshake: a rustls error,
    /// or the connection ending under it.
    pub fn from_handshake_error(error: &io::Error) -> TlsFailure {
        match TlsFailure::from_io(error) {
            Some(failure) => failure,
            None if matches!(
                error.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
            {
                TlsFailure::ClosedDuringHandshake
            }
            None => TlsFailure::Protocol(error.to_string()),
        }
    }

    /// Classifies an I/O error from a TLS stream, if it carries a rustls error.
    pub fn from_io(error: &io::Error) -> Option<TlsFailure> {
        rustls_error_in(error).map(TlsFailure::from_rustls)
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error_in(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}
