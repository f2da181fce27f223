//! Identity from the SPIFFE Workload API (SPIRE's agent socket, for
//! example): X.509-SVIDs and trust bundles streamed by the agent, every
//! update turned into a new [`Identity`] that the caller puts in use.
//!
//! The client is the `spiffe` crate's X.509 source, which keeps the stream
//! open and reconnects with backoff; this module only turns what it holds
//! into hbone's identity: the first SVID the agent lists (its default) and
//! the bundle of that SVID's trust domain. Bundles of other (federated)
//! trust domains are not trusted by this version; they are counted in the
//! log so that an operator sees them arrive.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use hbone::workload_api::WorkloadApi;
//! use std::time::Duration;
//!
//! let api = WorkloadApi::connect("unix:///run/spire/agent.sock", Duration::from_secs(10)).await?;
//! let identity = api.identity()?;
//! println!("{}", identity.id());
//! api.keep_updated(|update| match update {
//!     Ok(identity) => println!("rotated to {}", identity.expires_at().is_some()),
//!     Err(e) => eprintln!("{e}"),
//! })
//! .await;
//! # Ok(()) }
//! ```

use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{TrustDomain, X509Source, X509SourceBuilder};

use crate::identity::Identity;

/// Why the Workload API gave no usable identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadApiError {
    /// The endpoint could not be used or gave nothing in time.
    #[error("SPIFFE Workload API at {endpoint}: {problem}")]
    Unavailable {
        /// The endpoint (e.g. `unix:///run/spire/agent.sock`).
        endpoint: String,
        /// What the client said.
        problem: String,
    },
    /// The agent's SVID or bundle did not make a usable identity.
    #[error("SPIFFE Workload API at {endpoint} sent an unusable SVID: {problem}")]
    Unusable {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        problem: String,
    },
}

/// A live connection to the Workload API.
pub struct WorkloadApi {
    source: X509Source,
    endpoint: String,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// Connects to `endpoint` (`unix:///path` or `unix:/path`, as in
    /// `SPIFFE_ENDPOINT_SOCKET`) and waits up to `first_sync` for the
    /// first SVID.
    pub async fn connect(endpoint: &str, first_sync: Duration) -> Result<Self, WorkloadApiError> {
        let source = X509SourceBuilder::new()
            .endpoint(endpoint)
            .initial_sync_timeout(first_sync)
            .build()
            .await
            .map_err(|e| WorkloadApiError::Unavailable {
                endpoint: endpoint.to_owned(),
                problem: e.to_string(),
            })?;
        Ok(WorkloadApi {
            source,
            endpoint: endpoint.to_owned(),
        })
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The identity the agent gives now: its default SVID with the bundle
    /// of the SVID's own trust domain.
    pub fn identity(&self) -> Result<Identity, WorkloadApiError> {
        let unusable = |problem: String| WorkloadApiError::Unusable {
            endpoint: self.endpoint.clone(),
            problem,
        };
        let svid = self.source.svid().map_err(|e| unusable(e.to_string()))?;
        let bundles = self
            .source
            .bundle_set()
            .map_err(|e| unusable(e.to_string()))?;
        let trust_domain: TrustDomain = svid.spiffe_id().trust_domain().clone();
        let bundle = bundles
            .get(&trust_domain)
            .ok_or_else(|| unusable(format!("no bundle for trust domain {trust_domain}")))?;
        let others = bundles.len().saturating_sub(1);
        if others > 0 {
            tracing::debug!(
                federated = others,
                "bundles of other trust domains received and not trusted"
            );
        }
        let der = |cert: &spiffe::cert::Certificate| CertificateDer::from(cert.as_bytes().to_vec());
        let chain = svid.cert_chain().iter().map(der).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let roots = bundle.authorities().iter().map(der).collect();
        Identity::from_der(chain, key, roots).map_err(|e| unusable(e.to_string()))
    }

    /// Calls `on_update` with the new identity after every SVID or bundle
    /// update the agent sends, until the source closes.
    pub async fn keep_updated(
        &self,
        mut on_update: impl FnMut(Result<Identity, WorkloadApiError>),
    ) {
        let mut updates = self.source.updated();
        while updates.changed().await.is_ok() {
            on_update(self.identity());
        }
    }
}
