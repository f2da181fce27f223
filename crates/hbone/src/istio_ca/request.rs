//! The key and certificate request hbone sends to the CA.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::identity::SpiffeId;

/// A fresh ECDSA P-256 key and a CSR for `id` signed with it. The key is
/// returned as PEM text that stays in this process.
pub(super) fn key_and_csr(id: &SpiffeId) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // Like Istio's own agents: an empty subject, the SPIFFE ID as the one
    // URI SAN (the CA checks it against the caller's token).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateSigningRequestParams;

    #[test]
    fn the_request_names_the_spiffe_id_and_nothing_else() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/apps/sa/web").unwrap();
        let (key, csr) = key_and_csr(&id).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let parsed = CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let sans: Vec<String> = parsed
            .params
            .subject_alt_names
            .iter()
            .map(|san| format!("{san:?}"))
            .collect();
        assert_eq!(sans.len(), 1);
        assert!(
            sans[0].contains("spiffe://cluster.local/ns/apps/sa/web"),
            "{sans:?}"
        );
        assert_eq!(parsed.public_key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn every_request_has_its_own_key() {
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        assert_ne!(key_and_csr(&id).unwrap().0, key_and_csr(&id).unwrap().0);
    }
}
