//! Certificate revocation lists (CRLs), checked on both ends of a
//! handshake: a server checks its clients' certificates, a dialer its
//! servers'.
//!
//! What is checked: every certificate of the presented chain below the
//! trust anchor (the leaf and any intermediate) is looked up in the CRL
//! its issuer signed, so an intermediate CA revoked by its root is refused
//! too. A certificate whose issuer has no CRL here passes: a CRL speaks
//! for one CA, and a mesh may trust several (rustls' "unknown revocation
//! status" is allowed). A CRL whose signature does not verify against the
//! issuer it names, or whose issuer may not sign CRLs, fails the
//! handshakes it would cover.
//!
//! An expired CRL (its `nextUpdate` passed) still names what it revoked,
//! so by default it is still used, and [`Revocation::stale`] lets the
//! caller warn. [`Revocation::with_fail_closed`] refuses instead every
//! handshake whose chain such a CRL covers, until a fresh one arrives.
//!
//! Revocation is checked at the handshake only: a connection already open
//! when a certificate is revoked is not re-checked.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use hbone::revocation::Revocation;
//! use hbone::tls::ServerTls;
//! # let dir = std::env::temp_dir().join(format!("hbone-doc-crl-{}", std::process::id()));
//! # let ca = hbone::ca::DevCa::generate("cluster.local", std::time::Duration::from_secs(86_400))?;
//! # let id = hbone::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b")?;
//! # let issued = ca.issue(&id, std::time::Duration::from_secs(3600))?;
//! # let identity = issued.identity()?;
//! # std::fs::create_dir_all(&dir)?;
//! # let crl_file = dir.join("crl.pem");
//! # std::fs::write(&crl_file, ca.crl(&[], 1, std::time::Duration::from_secs(3600))?)?;
//! let revocation = Revocation::from_files([&crl_file])?;
//! let tls = ServerTls::with_revocation(&identity, vec!["cluster.local".into()], revocation)?;
//! // Later, when the CRL file changes: new handshakes use the new list.
//! tls.reload_revocation(Revocation::from_files([&crl_file])?)?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::ServerCertVerified;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertRevocationListError, CertificateError, OtherError, RootCertStore};

/// The CRLs a handshake checks certificates against, and what an expired
/// one means. Cheap to clone. The default holds none: nothing is checked.
#[derive(Clone, Default)]
pub struct Revocation {
    lists: Arc<[Crl]>,
    fail_closed: bool,
}

struct Crl {
    der: CertificateRevocationListDer<'static>,
    parsed: webpki::CertRevocationList<'static>,
    next_update: SystemTime,
    source: String,
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field(
                "lists",
                &self.lists.iter().map(|c| &c.source).collect::<Vec<_>>(),
            )
            .field("fail_closed", &self.fail_closed)
            .finish()
    }
}

/// A CRL that could not be read, naming where it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a CRL this library can use.
    #[error("{origin}: {problem}")]
    Content {
        /// The file, or what the caller named the bytes.
        origin: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Revocation {
    /// The CRLs in `paths`, each PEM (one or more `X509 CRL` blocks) or
    /// DER (one CRL), told apart by their content.
    pub fn from_files<P: AsRef<Path>>(
        paths: impl IntoIterator<Item = P>,
    ) -> Result<Self, RevocationError> {
        let mut lists = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let bytes = std::fs::read(path).map_err(|source| RevocationError::Read {
                path: path.to_owned(),
                source,
            })?;
            lists.extend(parse(&bytes, &path.display().to_string())?);
        }
        Ok(Revocation {
            lists: lists.into(),
            fail_closed: false,
        })
    }

    /// The CRLs in `bytes` (PEM or DER, as for [`Revocation::from_files`]);
    /// `source` names them in errors and in [`Revocation::stale`].
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self, RevocationError> {
        Ok(Revocation {
            lists: parse(bytes, source)?.into(),
            fail_closed: false,
        })
    }

    /// With `fail_closed`, a CRL past its `nextUpdate` refuses every
    /// handshake whose chain it covers; without (the default) it is still
    /// used, as the last word of its CA.
    #[must_use]
    pub fn with_fail_closed(mut self, fail_closed: bool) -> Self {
        self.fail_closed = fail_closed;
        self
    }

    /// Whether an expired CRL refuses handshakes.
    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// How many CRLs are held.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// Whether no CRL is held (nothing is checked).
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// The CRLs whose `nextUpdate` is at or before `now`: where each came
    /// from, and when it should have been replaced.
    pub fn stale(&self, now: SystemTime) -> Vec<(&str, SystemTime)> {
        self.lists
            .iter()
            .filter(|crl| crl.next_update <= now)
            .map(|crl| (crl.source.as_str(), crl.next_update))
            .collect()
    }

    /// When a chain's acceptance under these lists stops holding whatever
    /// the chain: with `fail_closed`, at the earliest `nextUpdate`, from
    /// which that list refuses handshakes; otherwise never.
    pub(crate) fn verdicts_lapse(&self) -> Option<SystemTime> {
        if !self.fail_closed {
            return None;
        }
        self.lists.iter().map(|crl| crl.next_update).min()
    }

    /// The options webpki checks a chain with; `None` when there is no CRL.
    fn options<'a>(
        &self,
        refs: &'a [&'a webpki::CertRevocationList<'a>],
    ) -> Option<webpki::RevocationOptions<'a>> {
        let builder = webpki::RevocationOptionsBuilder::new(refs).ok()?;
        Some(
            builder
                .with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(if self.fail_closed {
                    webpki::ExpirationPolicy::Enforce
                } else {
                    webpki::ExpirationPolicy::Ignore
                })
                .build(),
        )
    }

    /// The server's check of client chains: rustls' verifier with these
    /// CRLs under the policy of this module.
    pub(crate) fn client_verifier(
        &self,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .with_crls(self.lists.iter().map(|crl| crl.der.clone()))
            .allow_unknown_revocation_status();
        if self.fail_closed {
            builder = builder.enforce_revocation_expiration();
        }
        builder.build()
    }

    /// The dialer's check of a server chain: signed by a trust anchor of
    /// `roots`, valid now, for server authentication, and not revoked.
    /// (rustls' own server verifier would also demand a DNS or IP name,
    /// which SPIFFE certificates do not carry.)
    pub(crate) fn verify_server_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        algorithms: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.lists.is_empty() {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                algorithms,
            )?;
            return Ok(ServerCertVerified::assertion());
        }
        let refs: Vec<_> = self.lists.iter().map(|crl| &crl.parsed).collect();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            algorithms,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            self.options(&refs),
            None,
        )
        .map_err(pki_error)?;
        Ok(ServerCertVerified::assertion())
    }
}

/// Why a handshake failed, in words, when revocation is the reason.
pub(crate) fn describe(error: &rustls::Error) -> Option<&'static str> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            Some("the peer's certificate (or one of its CAs) is revoked")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. },
        ) => Some(
            "a revocation list covering the peer's certificate has expired (fail-closed: refused until a fresh one is loaded)",
        ),
        rustls::Error::InvalidCertRevocationList(_) => {
            Some("a revocation list covering the peer's certificate does not verify against its CA")
        }
        _ => None,
    }
}

/// webpki's verdicts as rustls reports them, so that callers see the same
/// errors whether or not CRLs are configured.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding.into(),
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        E::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        E::InvalidCertValidity => CertificateError::Expired.into(),
        E::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        E::CertRevoked => CertificateError::Revoked.into(),
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus.into(),
        E::CrlExpired { time, next_update } => {
            CertificateError::ExpiredRevocationListContext { time, next_update }.into()
        }
        E::IssuerNotCrlSigner => CertRevocationListError::IssuerInvalidForCrl.into(),
        E::InvalidCrlSignatureForPublicKey => CertRevocationListError::BadSignature.into(),
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose.into(),
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

/// The CRLs in `bytes`: PEM when it holds a PEM header, else one DER CRL.
fn parse(bytes: &[u8], source: &str) -> Result<Vec<Crl>, RevocationError> {
    let problem = |problem: String| RevocationError::Content {
        origin: source.to_owned(),
        problem,
    };
    let ders: Vec<CertificateRevocationListDer<'static>> =
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            let ders = CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| problem(format!("invalid PEM: {e}")))?;
            if ders.is_empty() {
                return Err(problem("no X509 CRL block in this PEM file".into()));
            }
            ders
        } else {
            vec![CertificateRevocationListDer::from(bytes.to_vec())]
        };
    ders.into_iter()
        .enumerate()
        .map(|(i, der)| {
            let which = if i == 0 {
                String::new()
            } else {
                format!(" (CRL #{})", i + 1)
            };
            let parsed = webpki::OwnedCertRevocationList::from_der(&der)
                .map_err(|e| problem(format!("not a usable CRL{which}: {e}")))?;
            let next_update = crate::x509::crl_next_update(&der)
                .map_err(|e| problem(format!("not a usable CRL{which}: {e}")))?;
            Ok(Crl {
                der,
                parsed: parsed.into(),
                next_update,
                source: source.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_its_source() {
        for (bytes, words) in [
            (&b"not a CRL at all"[..], "not a usable CRL"),
            (b"", "not a usable CRL"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "no X509 CRL",
            ),
            (
                b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
                "not a usable CRL",
            ),
        ] {
            let error = Revocation::from_bytes(bytes, "crl.pem")
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with("crl.pem: ") && error.contains(words),
                "{error}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Revocation::from_files(["/nonexistent/crl.pem"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/crl.pem"), "{error}");
    }

    #[test]
    fn revocation_reasons_are_described_and_others_left_alone() {
        assert!(
            describe(&CertificateError::Revoked.into())
                .unwrap()
                .contains("revoked")
        );
        assert!(
            describe(&CertificateError::ExpiredRevocationList.into())
                .unwrap()
                .contains("expired")
        );
        assert_eq!(describe(&CertificateError::UnknownIssuer.into()), None);
    }

    #[test]
    fn webpki_errors_map_as_rustls_maps_them() {
        assert_eq!(
            pki_error(webpki::Error::CertRevoked),
            CertificateError::Revoked.into()
        );
        assert_eq!(
            pki_error(webpki::Error::UnknownIssuer),
            CertificateError::UnknownIssuer.into()
        );
        assert!(matches!(
            pki_error(webpki::Error::MaximumPathDepthExceeded),
            rustls::Error::InvalidCertificate(CertificateError::Other(_))
        ));
    }
}
