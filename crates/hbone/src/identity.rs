//! SPIFFE identities and the certificate material that proves them.
//!
//! A workload is known by the one URI SAN of its certificate, a `spiffe://`
//! ID (X.509-SVID). This module parses those IDs, extracts them from
//! certificates, and loads a certificate chain, its private key and the trust
//! bundle from PEM, with errors that say which file is wrong and how.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::{Zeroize, Zeroizing};

/// Trust domain Istio uses when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Longest SPIFFE ID we accept, as the SPIFFE spec recommends (2048 bytes).
const MAX_ID_LEN: usize = 2048;

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`.
///
/// Parsing follows the SPIFFE ID spec: the trust domain is lower-case letters,
/// digits, `.`, `-` and `_`; the path is made of non-empty segments other than
/// `.` and `..`, of letters, digits, `.`, `-` and `_`; no query, fragment,
/// port or user info.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID as text; `td_end` splits trust domain from path.
    text: String,
    td_end: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The text does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    /// The trust domain holds a character it may not (upper case included).
    #[error("trust domain may hold only a-z, 0-9, '.', '-' and '_' (found {0:?})")]
    TrustDomainChar(char),
    /// The path has `//` or a trailing `/`.
    #[error("SPIFFE ID path has an empty segment, or ends with '/'")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("SPIFFE ID path may not contain '.' or '..' segments")]
    DotSegment,
    /// The path holds a character it may not.
    #[error("SPIFFE ID path may hold only a-z, A-Z, 0-9, '.', '-' and '_' (found {0:?})")]
    PathChar(char),
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>[/<path>]`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if let Some(c) = td
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(*c)))
        {
            return Err(SpiffeIdError::TrustDomainChar(c));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ => {}
                }
                if let Some(c) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || ".-_".contains(*c)))
                {
                    return Err(SpiffeIdError::PathChar(c));
                }
            }
        }
        Ok(SpiffeId {
            text: s.to_owned(),
            td_end: "spiffe://".len() + td.len(),
        })
    }

    /// Builds the Istio form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.text["spiffe://".len()..self.td_end]
    }

    /// The path including its leading `/`, or "" for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.text[self.td_end..]
    }

    /// Whether a peer presenting `presented` meets this ID as an
    /// expectation: an ID with a path accepts itself only; a trust domain
    /// ID (`spiffe://TD`, which no workload is) accepts every ID of TD.
    pub fn accepts(&self, presented: &SpiffeId) -> bool {
        if self.path().is_empty() {
            self.trust_domain() == presented.trust_domain()
        } else {
            self == presented
        }
    }

    /// The whole ID as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Namespace of an Istio-form ID (`/ns/<ns>/sa/<sa>`), else `None`.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// Service account of an Istio-form ID (`/ns/<ns>/sa/<sa>`), else `None`.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

/// Why a certificate carries no usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertIdError {
    /// The certificate could not be parsed.
    #[error("certificate is not valid X.509 DER: {0}")]
    Parse(String),
    /// The certificate has no URI SAN, or one that is not `spiffe://`.
    #[error("certificate has no spiffe:// URI SAN")]
    Missing,
    /// The certificate has more than one URI SAN (how many is given).
    #[error("certificate has {0} URI SANs; an X.509-SVID carries exactly one, its SPIFFE ID")]
    SeveralUris(usize),
    /// The `spiffe://` URI SAN is not a valid SPIFFE ID.
    #[error("certificate's spiffe:// URI SAN is invalid: {0}")]
    Invalid(#[from] SpiffeIdError),
}

/// The SPIFFE ID of a certificate. An X.509-SVID carries exactly one URI
/// SAN, and it is the SPIFFE ID (SPIFFE X.509-SVID §2); a certificate with
/// several URIs is refused rather than one of them picked.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertIdError> {
    let info = crate::x509::parse(cert.as_ref()).map_err(|e| CertIdError::Parse(e.to_string()))?;
    match info.uris.as_slice() {
        [] => Err(CertIdError::Missing),
        [uri] if uri.starts_with("spiffe://") => Ok(SpiffeId::parse(uri)?),
        [_] => Err(CertIdError::Missing),
        several => Err(CertIdError::SeveralUris(several.len())),
    }
}

/// A problem with identity files, naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but holds no usable certificate or key.
    #[error("{path}: {problem}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("{0}")]
    Mismatch(String),
}

impl IdentityError {
    fn content(path: &Path, problem: impl Into<String>) -> Self {
        IdentityError::Content {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

/// A workload's certificate chain, private key and trust bundle, and the
/// SPIFFE ID its leaf certificate proves. The private key's bytes are wiped
/// from memory when the identity (or a clone of it) is dropped.
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
    /// Roots of other trust domains (SPIFFE federation), by trust domain.
    federated: FederatedBundles,
}

/// Trust bundles of federated trust domains: each domain's peers are
/// verified against its own roots only.
pub type FederatedBundles = std::collections::BTreeMap<String, Vec<CertificateDer<'static>>>;

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            bundle: self.bundle.clone(),
            federated: self.federated.clone(),
        }
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        // `PrivateKeyDer` can be wiped but does not wipe itself.
        self.key.zeroize();
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("bundle_len", &self.bundle.len())
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The certificate chain, leaf first, in an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key in an identity directory (Istio's name too).
pub const KEY_FILE: &str = "key.pem";
/// The trust bundle (CA certificates) in an identity directory.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// Istio's name for the certificate chain (istio-proxy's `/etc/certs`
/// layout).
pub const ISTIO_CERT_FILE: &str = "cert-chain.pem";
/// Istio's name for the trust bundle.
pub const ISTIO_BUNDLE_FILE: &str = "root-cert.pem";

impl Identity {
    /// Loads `cert.pem`, `key.pem` and `bundle.pem` from `dir`, or Istio's
    /// `cert-chain.pem`, `key.pem` and `root-cert.pem` when ours are absent.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let dir = dir.as_ref();
        let ours = dir.join(CERT_FILE);
        let istio = dir.join(ISTIO_CERT_FILE);
        if !ours.exists() && istio.exists() {
            return Self::from_files(istio, dir.join(KEY_FILE), dir.join(ISTIO_BUNDLE_FILE));
        }
        Self::from_files(ours, dir.join(KEY_FILE), dir.join(BUNDLE_FILE))
    }

    /// Loads the certificate chain (leaf first), key and trust bundle files.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        bundle: impl AsRef<Path>,
    ) -> Result<Self, IdentityError> {
        let (cert, key, bundle) = (cert.as_ref(), key.as_ref(), bundle.as_ref());
        // Wiped when dropped: the key file's PEM is the key.
        let read = |path: &Path| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|source| IdentityError::Read {
                    path: path.to_owned(),
                    source,
                })
        };
        Self::from_pem_sources(
            (cert, &read(cert)?),
            (key, &read(key)?),
            (bundle, &read(bundle)?),
        )
    }

    /// Builds an identity from PEM text held in memory (the demo uses this).
    /// The identity's own copy of the key is wiped when it is dropped; the
    /// text given here is the caller's to wipe.
    pub fn from_pem(cert: &str, key: &str, bundle: &str) -> Result<Self, IdentityError> {
        Self::from_pem_sources(
            (Path::new("<certificate>"), cert.as_bytes()),
            (Path::new("<key>"), key.as_bytes()),
            (Path::new("<bundle>"), bundle.as_bytes()),
        )
    }

    /// Builds an identity from DER held in memory: the chain (leaf
    /// first), its PKCS#8, SEC1 or PKCS#1 key and the trust bundle, as the
    /// SPIFFE Workload API hands them out. The same checks as for files.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let (cert_path, key_path, bundle_path) = (
            Path::new("<certificate>"),
            Path::new("<key>"),
            Path::new("<bundle>"),
        );
        check_certs(cert_path, &chain)?;
        check_certs(bundle_path, &bundle)?;
        let id = spiffe_id_of(&chain[0])
            .map_err(|e| IdentityError::content(cert_path, format!("first certificate: {e}")))?;
        let identity = Identity {
            id,
            chain,
            key,
            bundle,
            federated: FederatedBundles::new(),
        };
        identity.check_key_matches(cert_path, key_path)?;
        Ok(identity)
    }

    fn from_pem_sources(
        (cert_path, cert_pem): (&Path, &[u8]),
        (key_path, key_pem): (&Path, &[u8]),
        (bundle_path, bundle_pem): (&Path, &[u8]),
    ) -> Result<Self, IdentityError> {
        let chain = parse_certs(cert_path, cert_pem)?;
        let id = spiffe_id_of(&chain[0])
            .map_err(|e| IdentityError::content(cert_path, format!("first certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            IdentityError::content(
                key_path,
                format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected): {e}"),
            )
        })?;
        let bundle = parse_certs(bundle_path, bundle_pem)?;
        let identity = Identity {
            id,
            chain,
            key,
            bundle,
            federated: FederatedBundles::new(),
        };
        identity.check_key_matches(cert_path, key_path)?;
        Ok(identity)
    }

    fn check_key_matches(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        let provider = crate::crypto::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| {
                IdentityError::content(key_path, format!("unsupported private key: {e}"))
            })?;
        let certified = rustls::sign::CertifiedKey::new(self.chain.clone(), signing_key);
        certified.keys_match().map_err(|_| {
            IdentityError::Mismatch(format!(
                "private key {} does not belong to certificate {}",
                key_path.display(),
                cert_path.display()
            ))
        })
    }

    /// Adds the roots of other trust domains (SPIFFE federation). A peer
    /// of such a domain is verified against its domain's roots only, and a
    /// server admits it only when its policy names the peer's identity.
    /// An entry for this identity's own trust domain is ignored: its roots
    /// are the bundle.
    pub fn with_federated_bundles(mut self, mut bundles: FederatedBundles) -> Self {
        bundles.remove(self.id.trust_domain());
        bundles.retain(|_, roots| !roots.is_empty());
        self.federated = bundles;
        self
    }

    /// Adds `roots` to the trust bundle, skipping those already in it.
    #[cfg(feature = "istio-ca")]
    pub(crate) fn with_more_roots(
        mut self,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Self {
        for root in roots {
            if !self.bundle.contains(&root) {
                self.bundle.push(root);
            }
        }
        self
    }

    /// The roots of federated trust domains, by trust domain.
    pub fn federated_bundles(&self) -> &FederatedBundles {
        &self.federated
    }

    /// The SPIFFE ID the leaf certificate proves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the leaf certificate stops being valid.
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        Some(self.validity()?.1)
    }

    /// The leaf certificate's validity period (not before, not after).
    pub fn validity(&self) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let info = crate::x509::parse(self.chain[0].as_ref()).ok()?;
        Some((info.not_before, info.not_after))
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The trust anchors peers are verified against.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::content(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::content(path, "no CERTIFICATE blocks found"));
    }
    check_certs(path, &certs)?;
    Ok(certs)
}

/// Every certificate parses as X.509, and there is at least one.
fn check_certs(path: &Path, certs: &[CertificateDer<'static>]) -> Result<(), IdentityError> {
    if certs.is_empty() {
        return Err(IdentityError::content(path, "no certificates"));
    }
    for (i, cert) in certs.iter().enumerate() {
        crate::x509::parse(cert.as_ref()).map_err(|e| {
            IdentityError::content(
                path,
                format!("certificate #{} is not valid X.509: {e}", i + 1),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trust_domain_id_accepts_its_workloads_and_an_id_only_itself() {
        let id = |text: &str| SpiffeId::parse(text).unwrap();
        let web = id("spiffe://cluster.local/ns/a/sa/web");
        assert!(web.accepts(&web));
        assert!(!web.accepts(&id("spiffe://cluster.local/ns/a/sa/db")));
        assert!(!web.accepts(&id("spiffe://cluster.local")));
        let domain = id("spiffe://cluster.local");
        assert!(domain.accepts(&web));
        assert!(domain.accepts(&domain));
        assert!(!domain.accepts(&id("spiffe://cluster.local.evil/ns/a/sa/web")));
        assert!(!domain.accepts(&id("spiffe://partner.example/ns/a/sa/web")));
    }

    /// A self-signed certificate with these SANs, valid over `days`
    /// (Unix days) as given.
    #[cfg(feature = "ca")]
    fn cert_with(sans: &[rcgen::SanType], days: (i64, i64)) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        let day = |d: i64| time::OffsetDateTime::from_unix_timestamp(d * 86_400 + 3_661).unwrap();
        params.not_before = day(days.0);
        params.not_after = day(days.1);
        params.self_signed(&key).unwrap().der().clone()
    }

    #[cfg(feature = "ca")]
    #[test]
    fn the_one_uri_san_is_the_id() {
        use rcgen::SanType::{DnsName, URI};
        let uri = |text: &str| URI(text.try_into().unwrap());
        let dns = DnsName("echo.example".try_into().unwrap());
        let id = "spiffe://cluster.local/ns/a/sa/b";
        let cert = cert_with(&[dns.clone(), uri(id), dns.clone()], (20_000, 20_400));
        assert_eq!(spiffe_id_of(&cert).unwrap().as_str(), id);
        let two = cert_with(&[uri(id), uri("spiffe://cluster.local/ns/a/sa/c")], (0, 1));
        assert_eq!(spiffe_id_of(&two), Err(CertIdError::SeveralUris(2)));
        let mixed = cert_with(&[uri("https://example.com/"), uri(id)], (0, 1));
        assert_eq!(spiffe_id_of(&mixed), Err(CertIdError::SeveralUris(2)));
        let web = cert_with(&[uri("https://example.com/")], (0, 1));
        assert_eq!(spiffe_id_of(&web), Err(CertIdError::Missing));
        let none = cert_with(&[dns], (0, 1));
        assert_eq!(spiffe_id_of(&none), Err(CertIdError::Missing));
        let bad = cert_with(&[uri("spiffe://Cluster.local/x")], (0, 1));
        assert!(matches!(spiffe_id_of(&bad), Err(CertIdError::Invalid(_))));
        let info = crate::x509::parse(cert.as_ref()).unwrap();
        let at =
            |d: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(d * 86_400 + 3_661);
        assert_eq!((info.not_before, info.not_after), (at(20_000), at(20_400)));
        // GeneralizedTime past 2049.
        let late = cert_with(&[uri(id)], (29_000, 30_000));
        let late = crate::x509::parse(late.as_ref()).unwrap();
        assert_eq!(late.not_after, at(30_000));
        // Every truncation of a real certificate is refused, never misread.
        for len in 0..cert.len() {
            assert!(crate::x509::parse(&cert[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn parses_istio_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/demo/sa/client");
        assert_eq!(id.namespace(), Some("demo"));
        assert_eq!(id.service_account(), Some("client"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
    }

    #[test]
    fn parses_general_ids() {
        let id = SpiffeId::parse("spiffe://example.org/workload/web-1").unwrap();
        assert_eq!(id.namespace(), None);
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(td.trust_domain(), "example.org");
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b/extra")
                .unwrap()
                .namespace(),
            None
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        use SpiffeIdError::*;
        let cases = [
            ("http://cluster.local/ns/a/sa/b", Scheme),
            ("spiffe:///ns/a", EmptyTrustDomain),
            ("spiffe://Cluster.local/x", TrustDomainChar('C')),
            ("spiffe://td:8080/x", TrustDomainChar(':')),
            ("spiffe://user@td/x", TrustDomainChar('@')),
            ("spiffe://td/a//b", EmptySegment),
            ("spiffe://td/a/", EmptySegment),
            ("spiffe://td/a/../b", DotSegment),
            ("spiffe://td/a?x=1", PathChar('?')),
            ("spiffe://td/a#f", PathChar('#')),
            ("spiffe://td/a%20b", PathChar('%')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }
}
