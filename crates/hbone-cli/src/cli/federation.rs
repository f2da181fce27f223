//! `--federated-bundle TD=FILE`: another trust domain's roots (SPIFFE
//! federation) for identities from files or from the Istio CA. The
//! Workload API brings its own federated bundles.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, bail};
use hbone::identity::FederatedBundles;
use hbone::{Identity, SpiffeId};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// One `TD=FILE` value: the trust domain and the PEM file of its roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FederatedBundleArg {
    pub(super) trust_domain: String,
    pub(super) path: PathBuf,
}

impl FromStr for FederatedBundleArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let Some((domain, path)) = text.split_once('=') else {
            return Err("expected TD=FILE, e.g. partner.example=/etc/hbone/partner.pem".into());
        };
        let domain = domain.strip_prefix("spiffe://").unwrap_or(domain);
        let id = SpiffeId::parse(&format!("spiffe://{domain}"))
            .map_err(|e| format!("trust domain {domain:?}: {e}"))?;
        if !id.path().is_empty() {
            return Err(format!(
                "{domain:?} is not a trust domain: give the name alone, without a path"
            ));
        }
        if path.is_empty() {
            return Err(format!("no file given for trust domain {domain}"));
        }
        Ok(FederatedBundleArg {
            trust_domain: id.trust_domain().to_owned(),
            path: PathBuf::from(path),
        })
    }
}

/// Reads every federated bundle. A trust domain given twice, a file that
/// cannot be read or holds no certificate is an error that names it.
pub(super) fn read(args: &[FederatedBundleArg]) -> anyhow::Result<FederatedBundles> {
    let mut bundles = FederatedBundles::new();
    for arg in args {
        let pem = std::fs::read(&arg.path).with_context(|| {
            format!(
                "cannot read the federated bundle of {} from {}",
                arg.trust_domain,
                arg.path.display()
            )
        })?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                anyhow::anyhow!(
                    "federated bundle {} of {}: not PEM certificates: {e}",
                    arg.path.display(),
                    arg.trust_domain
                )
            })?;
        if roots.is_empty() {
            bail!(
                "federated bundle {} of {} holds no certificate",
                arg.path.display(),
                arg.trust_domain
            );
        }
        if bundles.insert(arg.trust_domain.clone(), roots).is_some() {
            bail!(
                "trust domain {} has two --federated-bundle files; give one (it may hold several roots)",
                arg.trust_domain
            );
        }
    }
    Ok(bundles)
}

/// `identity` with the federated bundles of `args` (read now). Our own
/// trust domain among them is refused: its roots are the trust bundle.
pub(super) fn attach(identity: Identity, args: &[FederatedBundleArg]) -> anyhow::Result<Identity> {
    if args.is_empty() {
        return Ok(identity);
    }
    let own = identity.id().trust_domain();
    if args.iter().any(|arg| arg.trust_domain == own) {
        bail!(
            "--federated-bundle names {own}, this identity's own trust domain; its roots belong in the trust bundle"
        );
    }
    Ok(identity.with_federated_bundles(read(args)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_a_trust_domain_and_a_file() {
        let arg: FederatedBundleArg = "partner.example=/etc/p.pem".parse().unwrap();
        assert_eq!(arg.trust_domain, "partner.example");
        assert_eq!(arg.path, PathBuf::from("/etc/p.pem"));
        let arg: FederatedBundleArg = "spiffe://partner.example=p.pem".parse().unwrap();
        assert_eq!(arg.trust_domain, "partner.example");
        for (bad, says) in [
            ("partner.example", "TD=FILE"),
            ("Partner.example=/p", "trust domain"),
            ("partner.example/ns=/p", "without a path"),
            ("partner.example=", "no file"),
            ("=/p", "trust domain"),
        ] {
            let error = bad.parse::<FederatedBundleArg>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn unreadable_empty_and_doubled_bundles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            hbone::ca::DevCa::generate("partner.example", std::time::Duration::from_secs(3600))
                .unwrap();
        let good = dir.path().join("good.pem");
        std::fs::write(&good, ca.cert_pem()).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let arg = |td: &str, path: &std::path::Path| FederatedBundleArg {
            trust_domain: td.into(),
            path: path.into(),
        };
        let bundles = read(&[arg("partner.example", &good)]).unwrap();
        assert_eq!(bundles["partner.example"].len(), 1);
        let error = read(&[arg("p.example", &empty)]).unwrap_err().to_string();
        assert!(error.contains("holds no certificate"), "{error}");
        let missing = dir.path().join("missing.pem");
        let error = read(&[arg("p.example", &missing)]).unwrap_err().to_string();
        assert!(error.contains("missing.pem"), "{error}");
        let twice = [arg("p.example", &good), arg("p.example", &good)];
        let error = read(&twice).unwrap_err().to_string();
        assert!(error.contains("two --federated-bundle"), "{error}");
    }
}
