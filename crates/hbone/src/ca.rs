//! A small development CA that issues SPIFFE certificates (X.509-SVIDs).
//!
//! Certificates look like Istio's: ECDSA P-256, an empty subject with a
//! critical URI SAN carrying the SPIFFE ID, and both server and client
//! authentication EKUs so one certificate serves either end of a tunnel.
//! This is for development and tests; production meshes use their own CA.
//! It can also revoke what it issued and sign CRLs ([`revoke`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{BUNDLE_FILE, CERT_FILE, Identity, IdentityError, KEY_FILE, SpiffeId};

mod revoke;
pub use revoke::{CRL_FILE, REVOKED_FILE, Revoked, RevokedCert, revoke};

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The CA's private key in a CA directory (written with mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Slack before "now" in `not_before`, for peers whose clocks run behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A CA problem, naming the file where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Making a key or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file was read but is not a usable certificate or key.
    #[error("{path}: {problem}")]
    Content {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Saving would overwrite an existing CA key.
    #[error("{0} already exists; refusing to overwrite a CA key (remove it first)")]
    Exists(PathBuf),
    /// Asked to issue for an ID outside the CA's trust domain.
    #[error("this CA serves trust domain {ca}, not {requested}")]
    TrustDomain {
        /// The CA's trust domain.
        ca: String,
        /// The trust domain of the requested ID.
        requested: String,
    },
    /// An issued certificate did not make a usable identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A CA certificate and its signing key.
pub struct DevCa {
    cert_pem: String,
    key: KeyPair,
    trust_domain: String,
}

/// A certificate issued by [`DevCa`], in PEM.
#[derive(Clone)]
#[non_exhaustive]
pub struct IssuedCert {
    /// Leaf then CA certificate.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// The CA certificate: the trust bundle for peers.
    pub bundle_pem: String,
}

impl DevCa {
    /// A new self-signed CA for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        // A unique name per CA, so that two development CAs are never
        // mistaken for each other when a chain is built.
        let serial = random_serial();
        let tag: String = serial
            .to_bytes()
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        name.push(DnType::CommonName, format!("hbone development CA {tag}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        set_validity(
            &mut params,
            OffsetDateTime::now_utc() - CLOCK_SKEW,
            validity,
        );
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Loads a CA written by [`DevCa::save`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, CaError> {
        let dir = dir.as_ref();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Content {
            path: key_path.clone(),
            problem: format!("not a usable private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, &key).map_err(|e| CaError::Content {
            path: cert_path.clone(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
        drop(issuer);
        let der = rustls_pki_types::CertificateDer::from(pem_body(&cert_pem, &cert_path)?);
        let trust_domain = crate::identity::spiffe_id_of(&der)
            .map(|id| id.trust_domain().to_owned())
            .map_err(|e| CaError::Content {
                path: cert_path.clone(),
                problem: format!("CA certificate names no trust domain: {e}"),
            })?;
        Ok(DevCa {
            cert_pem,
            key,
            trust_domain,
        })
    }

    /// Writes `ca-cert.pem` and `ca-key.pem` (mode 0600) into `dir`,
    /// refusing to overwrite an existing key.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), CaError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(CaError::Exists(key_path));
        }
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, false)?;
        write_file(&key_path, &self.key.serialize_pem(), true)
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, which is the trust bundle for its workloads.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `id`, valid from now for `validity`. The ID
    /// must be in this CA's trust domain.
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<IssuedCert, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                ca: self.trust_domain.clone(),
                requested: id.trust_domain().to_owned(),
            });
        }
        self.issue_any(id, OffsetDateTime::now_utc() - CLOCK_SKEW, validity)
    }

    /// Issues a certificate for any ID with an explicit start time; tests
    /// use it for expired certificates and foreign trust domains.
    pub fn issue_any(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        validity: Duration,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(id, not_before, validity)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            bundle_pem: self.cert_pem.clone(),
        })
    }

    /// Signs a certificate request (PEM PKCS#10) as a mesh CA does: the
    /// request's one URI SAN must be a SPIFFE ID in this trust domain, and
    /// only its key and that ID are taken from it. Returns the leaf PEM;
    /// test servers use it to play Istio's CA.
    pub fn sign_request(&self, csr_pem: &str, validity: Duration) -> Result<String, CaError> {
        let bad = |problem: String| CaError::Content {
            path: PathBuf::from("<certificate request>"),
            problem,
        };
        let request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let uris: Vec<&str> = request
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        let [uri] = uris[..] else {
            return Err(bad(format!(
                "{} URI SANs; exactly one SPIFFE ID is expected",
                uris.len()
            )));
        };
        let id = SpiffeId::parse(uri).map_err(|e| bad(format!("{uri}: {e}")))?;
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                ca: self.trust_domain.clone(),
                requested: id.trust_domain().to_owned(),
            });
        }
        self.sign_request_for(csr_pem, &id, validity)
    }

    /// Signs the request's key for `id`, whatever the request asks for:
    /// tests use it to play a CA that issues the wrong identity.
    #[doc(hidden)]
    pub fn sign_request_for(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        validity: Duration,
    ) -> Result<String, CaError> {
        let request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = leaf_params(id, OffsetDateTime::now_utc() - CLOCK_SKEW, validity)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(params.signed_by(&request.public_key, &issuer)?.pem())
    }
}

/// A leaf as Istio issues them: empty subject, the SPIFFE ID as the URI
/// SAN, not a CA, usable at either end of a tunnel.
fn leaf_params(
    id: &SpiffeId,
    not_before: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // `CA:FALSE` spelled out, as Istio's leaves have it and as X.509-SVID
    // parsers (the spiffe crate's among them) require.
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, not_before, validity);
    Ok(params)
}

impl IssuedCert {
    /// The certificate as an [`Identity`] ready for a dialer or server.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::from_pem(&self.chain_pem, &self.key_pem, &self.bundle_pem)
    }

    /// Writes `cert.pem`, `key.pem` (mode 0600) and `bundle.pem` into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), CaError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        write_file(&dir.join(CERT_FILE), &self.chain_pem, false)?;
        write_file(&dir.join(KEY_FILE), &self.key_pem, true)?;
        write_file(&dir.join(BUNDLE_FILE), &self.bundle_pem, false)
    }
}

fn set_validity(params: &mut CertificateParams, not_before: OffsetDateTime, validity: Duration) {
    params.not_before = not_before;
    params.not_after = not_before + CLOCK_SKEW + validity;
}

/// A random 16-byte serial. Should the system RNG fail, the bytes come from
/// the clock instead: still distinct, and this CA is for development only.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn pem_body(pem: &str, path: &Path) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| CaError::Content {
            path: path.to_owned(),
            problem: format!("invalid PEM certificate: {e}"),
        })
}

/// Writes a file; private ones are created with mode 0600 from the start.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error(path))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        // An existing file keeps its old mode on open; force it.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_error(path))?;
    }
    file.write_all(contents.as_bytes()).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn request_for(uris: &[&str]) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_request_for_an_id_of_the_trust_domain_is_signed() {
        let ca = DevCa::generate("td.example", Duration::from_secs(3600)).unwrap();
        let leaf = ca
            .sign_request(
                &request_for(&["spiffe://td.example/ns/a/sa/b"]),
                Duration::from_secs(60),
            )
            .unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
        assert_eq!(
            crate::identity::spiffe_id_of(&der).unwrap().as_str(),
            "spiffe://td.example/ns/a/sa/b"
        );
    }

    #[test]
    fn requests_outside_the_trust_domain_or_with_several_ids_are_refused() {
        let ca = DevCa::generate("td.example", Duration::from_secs(3600)).unwrap();
        let minute = Duration::from_secs(60);
        let foreign = ca.sign_request(&request_for(&["spiffe://other/ns/a/sa/b"]), minute);
        assert!(
            matches!(foreign, Err(CaError::TrustDomain { .. })),
            "{foreign:?}"
        );
        let two = ca.sign_request(
            &request_for(&["spiffe://td.example/a", "spiffe://td.example/b"]),
            minute,
        );
        assert!(two.unwrap_err().to_string().contains("2 URI SANs"));
        let none = ca.sign_request(&request_for(&[]), minute);
        assert!(none.unwrap_err().to_string().contains("0 URI SANs"));
    }
}
