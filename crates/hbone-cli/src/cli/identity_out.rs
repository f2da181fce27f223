//! Writes the identity in use to a directory for other local processes,
//! when it comes from Istio's CA or a SPIFFE agent rather than from files:
//! `cert.pem` (the chain, leaf first), `key.pem` (mode 0600) and
//! `bundle.pem`. Each file is written whole under a temporary name and
//! renamed, so a reader never sees half of one.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use hbone::Identity;
use hbone::identity::{BUNDLE_FILE, CERT_FILE, KEY_FILE};
use rustls_pki_types::PrivateKeyDer;

/// Writes `identity` into `dir` (created if missing).
pub(super) fn write(dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let chain: String = identity
        .chain()
        .iter()
        .map(|cert| pem("CERTIFICATE", cert.as_ref()))
        .collect();
    let bundle: String = identity
        .bundle()
        .iter()
        .map(|cert| pem("CERTIFICATE", cert.as_ref()))
        .collect();
    let (label, der) = match identity.key() {
        PrivateKeyDer::Pkcs8(key) => ("PRIVATE KEY", key.secret_pkcs8_der()),
        PrivateKeyDer::Sec1(key) => ("EC PRIVATE KEY", key.secret_sec1_der()),
        PrivateKeyDer::Pkcs1(key) => ("RSA PRIVATE KEY", key.secret_pkcs1_der()),
        _ => anyhow::bail!("a private key of an unknown kind cannot be written"),
    };
    // The key first: a reader that sees the new certificate finds its key.
    replace(&dir.join(KEY_FILE), &pem(label, der), true)?;
    replace(&dir.join(CERT_FILE), &chain, false)?;
    replace(&dir.join(BUNDLE_FILE), &bundle, false)
}

fn replace(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("pem.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// PEM text for `der` under `label`, 64 base64 characters per line.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]);
            } else {
                encoded.push(b'=');
            }
        }
    }
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.chunks(64) {
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_padding_follows_the_standard() {
        // RFC 4648's test vectors.
        for (input, output) in [
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let text = pem("X", input.as_bytes());
            assert_eq!(text.lines().nth(1), Some(output), "{input}");
        }
    }

    #[test]
    fn the_written_files_load_back_as_the_same_identity() {
        let ca = hbone::ca::DevCa::generate("td", std::time::Duration::from_secs(3600)).unwrap();
        let id = hbone::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let identity = ca
            .issue(&id, std::time::Duration::from_secs(3600))
            .unwrap()
            .identity()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("hbone-identity-out-{}", std::process::id()));
        write(&dir, &identity).unwrap();
        let loaded = Identity::from_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.chain(), identity.chain());
        assert_eq!(loaded.bundle(), identity.bundle());
        assert_eq!(loaded.id(), identity.id());
        assert_eq!(mode & 0o777, 0o600);
    }
}
