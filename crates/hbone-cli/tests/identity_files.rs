//! Loading identities from PEM files: the key formats rustls accepts, and
//! errors that name the file and say what is wrong.

use std::path::Path;

use crate::common::*;
use hbone::Identity;
use hbone::identity::IdentityError;

/// Writes a file readable by its owner only, as key files must be (the
/// others do not mind).
fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    path
}

fn pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        writeln!(out, "{}", std::str::from_utf8(line).unwrap()).unwrap();
    }
    writeln!(out, "-----END {label}-----").unwrap();
    out
}

#[test]
fn accepts_a_sec1_ec_private_key() {
    let pki = Pki::new();
    let issued = pki.ca.issue(&pki.client_id, DAY).unwrap();
    use aws_lc_rs::encoding::AsDer;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let PrivateKeyDer::Pkcs8(pkcs8) =
        PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap()
    else {
        panic!("rcgen writes PKCS#8");
    };
    let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.secret_pkcs8_der(),
    )
    .unwrap();
    let sec1 = key.private_key().as_der().unwrap();
    let sec1_pem = pem("EC PRIVATE KEY", sec1.as_ref());
    let identity = Identity::from_pem(&issued.chain_pem, &sec1_pem, &issued.bundle_pem).unwrap();
    assert_eq!(identity.id(), &pki.client_id);
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let pki = Pki::new();
    let issued = pki.ca.issue(&pki.client_id, DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "cert.pem", &issued.chain_pem);
    let key = write(dir.path(), "key.pem", &issued.key_pem);
    let bundle = write(dir.path(), "bundle.pem", &issued.bundle_pem);
    assert!(Identity::from_files(&cert, &key, &bundle).is_ok());

    let missing = dir.path().join("missing.pem");
    let error = Identity::from_files(&missing, &key, &bundle).unwrap_err();
    assert!(matches!(error, IdentityError::Read { .. }));
    assert!(error.to_string().contains("missing.pem"), "{error}");

    let garbage = write(dir.path(), "garbage.pem", "this is not PEM\n");
    let error = Identity::from_files(&garbage, &key, &bundle).unwrap_err();
    assert!(
        error.to_string().contains("garbage.pem") && error.to_string().contains("no CERTIFICATE"),
        "{error}"
    );

    let error = Identity::from_files(&cert, &garbage, &bundle).unwrap_err();
    assert!(
        error.to_string().contains("garbage.pem") && error.to_string().contains("private key"),
        "{error}"
    );

    let error = Identity::from_files(&cert, &key, &garbage).unwrap_err();
    assert!(error.to_string().contains("garbage.pem"), "{error}");

    let broken = write(
        dir.path(),
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let error = Identity::from_files(&broken, &key, &bundle).unwrap_err();
    assert!(
        error.to_string().contains("broken.pem") && error.to_string().contains("X.509"),
        "{error}"
    );

    // A certificate without a SPIFFE ID: the CA certificate's SAN is
    // spiffe://cluster.local, which is a valid ID, so use a chain whose
    // leaf has none by swapping in a plain rcgen certificate.
    let plain = rcgen::generate_simple_self_signed(vec!["example.com".to_owned()]).unwrap();
    let plain_cert = write(dir.path(), "plain.pem", &plain.cert.pem());
    let plain_key = write(
        dir.path(),
        "plain-key.pem",
        &plain.signing_key.serialize_pem(),
    );
    let error = Identity::from_files(&plain_cert, &plain_key, &bundle).unwrap_err();
    assert!(
        error.to_string().contains("plain.pem") && error.to_string().contains("spiffe://"),
        "{error}"
    );

    let other = pki.ca.issue(&pki.server_id, DAY).unwrap();
    let other_key = write(dir.path(), "other-key.pem", &other.key_pem);
    let error = Identity::from_files(&cert, &other_key, &bundle).unwrap_err();
    assert!(matches!(error, IdentityError::Mismatch(_)), "{error}");
}

#[test]
fn reads_istios_file_names_too() {
    let pki = Pki::new();
    let issued = pki.ca.issue(&pki.server_id, DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cert-chain.pem", &issued.chain_pem);
    write(dir.path(), "key.pem", &issued.key_pem);
    write(dir.path(), "root-cert.pem", &issued.bundle_pem);
    let identity = Identity::from_dir(dir.path()).unwrap();
    assert_eq!(identity.id(), &pki.server_id);

    // Our names win when both are present.
    let client = pki.ca.issue(&pki.client_id, DAY).unwrap();
    client.save(dir.path()).unwrap();
    assert_eq!(Identity::from_dir(dir.path()).unwrap().id(), &pki.client_id);
}
