//! Revocation by the development CA: the serials it revoked, kept in its
//! directory ([`REVOKED_FILE`]), and CRLs it signs listing them.
//!
//! Each [`revoke`] adds one certificate (again is harmless), raises the
//! CRL number by one and signs a fresh CRL of every serial revoked so far,
//! valid from now for the given time (7 days by default on the command
//! line): re-running it before the `nextUpdate` renews the list.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use super::{CaError, DevCa, io_error, write_file};

/// The serials a CA directory's CA revoked, and the number of its last
/// CRL.
pub const REVOKED_FILE: &str = "revoked.txt";
/// Where `hbone ca revoke` writes the CRL in the CA directory unless told
/// otherwise.
pub const CRL_FILE: &str = "crl.pem";

/// A certificate the CA revoked: its serial number (the content octets of
/// its DER INTEGER) and when.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RevokedCert {
    /// The certificate's serial number.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: SystemTime,
}

impl RevokedCert {
    /// The certificate `serial`, revoked at `revoked_at`.
    pub fn new(serial: impl Into<Vec<u8>>, revoked_at: SystemTime) -> Self {
        RevokedCert {
            serial: serial.into(),
            revoked_at,
        }
    }
}

/// What [`revoke`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Revoked {
    /// The new CRL, PEM.
    pub crl_pem: String,
    /// Its CRL number.
    pub number: u64,
    /// Every certificate it lists.
    pub revoked: Vec<RevokedCert>,
    /// Whether this certificate was listed already.
    pub already: bool,
}

impl DevCa {
    /// A CRL signed by this CA, numbered `number`, listing `revoked`,
    /// issued now and valid for `validity`.
    pub fn crl(
        &self,
        revoked: &[RevokedCert],
        number: u64,
        validity: Duration,
    ) -> Result<String, CaError> {
        self.crl_at(revoked, number, OffsetDateTime::now_utc(), validity)
    }

    /// As [`DevCa::crl`], issued at `this_update` (a CRL expired already,
    /// for tests: a past time and a short validity).
    pub fn crl_at(
        &self,
        revoked: &[RevokedCert],
        number: u64,
        this_update: OffsetDateTime,
        validity: Duration,
    ) -> Result<String, CaError> {
        let params = CertificateRevocationListParams {
            this_update,
            next_update: this_update + validity,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: OffsetDateTime::from(r.revoked_at),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(params.signed_by(&issuer)?.pem()?)
    }
}

/// Revokes the certificate in `cert` (PEM, its first certificate, or DER)
/// with the CA in `ca_dir`: adds it to the directory's [`REVOKED_FILE`]
/// and returns a new CRL of all it revoked, valid for `validity`. A
/// certificate this CA did not issue is refused.
pub fn revoke(ca_dir: &Path, cert: &Path, validity: Duration) -> Result<Revoked, CaError> {
    let ca = DevCa::load(ca_dir)?;
    let bytes = fs::read(cert).map_err(io_error(cert))?;
    let content = |problem: String| CaError::Content {
        path: cert.to_owned(),
        problem,
    };
    let der = if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        CertificateDer::from_pem_slice(&bytes)
            .map_err(|e| content(format!("no usable PEM certificate: {e}")))?
    } else {
        CertificateDer::from(bytes)
    };
    issued_by(&ca, &der).map_err(content)?;
    let serial = crate::x509::serial(&der)
        .map_err(|e| content(format!("not an X.509 certificate: {e}")))?
        .to_vec();

    let state_path = ca_dir.join(REVOKED_FILE);
    let (mut number, mut revoked) = read_state(&state_path)?;
    let already = revoked.iter().any(|r| r.serial == serial);
    if !already {
        revoked.push(RevokedCert::new(serial, SystemTime::now()));
    }
    number += 1;
    let crl_pem = ca.crl(&revoked, number, validity)?;
    write_file(&state_path, &render_state(number, &revoked), false)?;
    Ok(Revoked {
        crl_pem,
        number,
        revoked,
        already,
    })
}

/// Whether `der` carries this CA's signature. Only the signature counts:
/// an expired certificate can still be revoked.
fn issued_by(ca: &DevCa, der: &CertificateDer<'_>) -> Result<(), String> {
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .map_err(|e| format!("CA certificate: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca_der)
        .map_err(|e| format!("CA certificate: {e}"))?;
    let parsed = rustls::server::ParsedCertificate::try_from(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    match rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        rustls_pki_types::UnixTime::now(),
        crate::crypto::provider()
            .signature_verification_algorithms
            .all,
    ) {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => Err(format!(
            "was not issued by this CA ({}); revoke it with the CA that issued it",
            ca.trust_domain
        )),
        _ => Ok(()),
    }
}

/// The CRL number and the revoked certificates: nothing yet when the file
/// does not exist.
fn read_state(path: &Path) -> Result<(u64, Vec<RevokedCert>), CaError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
        Err(e) => return Err(io_error(path)(e)),
    };
    let mut number = 0;
    let mut revoked = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let bad = || CaError::Content {
            path: path.to_owned(),
            problem: format!("line {}: not understood: {line:?}", index + 1),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [first, ..] if first.starts_with('#') => {}
            ["crl-number", n] => number = n.parse().map_err(|_| bad())?,
            ["revoked", serial, at] => {
                let serial = hex_decode(serial).ok_or_else(bad)?;
                let at: u64 = at.parse().map_err(|_| bad())?;
                revoked.push(RevokedCert::new(
                    serial,
                    UNIX_EPOCH + Duration::from_secs(at),
                ));
            }
            _ => return Err(bad()),
        }
    }
    Ok((number, revoked))
}

fn render_state(number: u64, revoked: &[RevokedCert]) -> String {
    let mut text = String::from(
        "# Certificates this development CA revoked: serial (hex) and when\n\
         # (seconds since 1970). Kept by hbone ca revoke.\n",
    );
    text.push_str(&format!("crl-number {number}\n"));
    for r in revoked {
        let at = r
            .revoked_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let serial: String = r.serial.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("revoked {serial} {at}\n"));
    }
    text
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::Revocation;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn revoking_accumulates_and_numbers_each_crl() {
        let dir = std::env::temp_dir().join(format!("hbone-ca-revoke-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = DevCa::generate("cluster.local", DAY).unwrap();
        ca.save(&dir).unwrap();
        let id = crate::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let (one, two) = (ca.issue(&id, DAY).unwrap(), ca.issue(&id, DAY).unwrap());
        fs::write(dir.join("one.pem"), &one.chain_pem).unwrap();
        fs::write(dir.join("two.pem"), &two.chain_pem).unwrap();

        let first = revoke(&dir, &dir.join("one.pem"), DAY).unwrap();
        assert_eq!(
            (first.number, first.revoked.len(), first.already),
            (1, 1, false)
        );
        let second = revoke(&dir, &dir.join("two.pem"), DAY).unwrap();
        assert_eq!((second.number, second.revoked.len()), (2, 2));
        let again = revoke(&dir, &dir.join("one.pem"), DAY).unwrap();
        assert_eq!(
            (again.number, again.revoked.len(), again.already),
            (3, 2, true)
        );
        assert_eq!(again.revoked[0].serial, first.revoked[0].serial);

        // The CRL is one webpki accepts, fresh for the validity given.
        let crl = Revocation::from_bytes(again.crl_pem.as_bytes(), "crl").unwrap();
        assert!(crl.stale(SystemTime::now()).is_empty());
        assert_eq!(crl.stale(SystemTime::now() + 2 * DAY).len(), 1);

        // A certificate of another CA is refused, naming the file.
        let other = DevCa::generate("cluster.local", DAY).unwrap();
        fs::write(
            dir.join("foreign.pem"),
            other.issue(&id, DAY).unwrap().chain_pem,
        )
        .unwrap();
        let error = revoke(&dir, &dir.join("foreign.pem"), DAY)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("foreign.pem") && error.contains("not issued by this CA"),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trips_and_garbage_is_refused() {
        let revoked = vec![RevokedCert::new(
            vec![0x01, 0xab],
            UNIX_EPOCH + Duration::from_secs(42),
        )];
        let dir = std::env::temp_dir().join(format!("hbone-ca-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(REVOKED_FILE);
        fs::write(&path, render_state(7, &revoked)).unwrap();
        assert_eq!(read_state(&path).unwrap(), (7, revoked));
        fs::write(&path, "revoked zz 1\n").unwrap();
        assert!(
            read_state(&path)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
