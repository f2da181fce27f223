//! Identity from Istio's CA: hbone makes its own key, sends a certificate
//! request for its SPIFFE ID to istiod's certificate service (gRPC
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, port 15012)
//! with the workload's bearer token, and renews before the certificate
//! runs out.
//!
//! The key never leaves the process. The token is read from its file at
//! every request (whoever writes it rotates it) and is only ever sent
//! after the CA's TLS certificate has been verified against the configured
//! root.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use hbone::istio_ca::{IstioCa, IstioCaConfig};
//! use hbone::SpiffeId;
//!
//! let id = SpiffeId::parse("spiffe://cluster.local/ns/apps/sa/web")?;
//! let mut config = IstioCaConfig::new(
//!     "istiod.istio-system.svc:15012",
//!     "/etc/hbone/root-cert.pem",
//!     "/var/run/secrets/tokens/istio-token",
//!     id,
//! );
//! config.cluster_id = Some("Kubernetes".into());
//! let ca = IstioCa::new(config);
//! let identity = ca.issue().await?;
//! // Hand `identity` to a server or dialer, then keep it fresh:
//! ca.keep_renewed(identity, |event| {
//!     if let hbone::istio_ca::Renewal::Renewed(new) = event {
//!         println!("renewed: {}", new.id());
//!     }
//!     Ok(())
//! })
//! .await;
//! # Ok(()) }
//! ```

pub mod proto;
mod request;
mod schedule;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{Identity, SpiffeId};

/// Where to ask for certificates and with what credentials.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IstioCaConfig {
    /// The CA's `host:port` (istiod: `istiod.istio-system.svc:15012`).
    pub address: String,
    /// The root the CA's own TLS certificate must chain to (PEM; Istio's
    /// `root-cert.pem`), read at every request.
    pub root_cert: PathBuf,
    /// The name the CA's certificate must carry; the host of `address`
    /// when `None`. Set it when dialling the CA by IP address.
    pub server_name: Option<String>,
    /// The file holding the bearer token (a Kubernetes service-account
    /// token with audience `istio-ca`), read at every request.
    pub token_file: PathBuf,
    /// The cluster the token comes from, sent as `ClusterID` when set.
    pub cluster_id: Option<String>,
    /// The identity to ask for; the CA checks it against the token.
    pub id: SpiffeId,
    /// Requested certificate lifetime; the CA may shorten it.
    pub validity: Duration,
    /// Limit for one request: connecting, TLS and the call together.
    pub timeout: Duration,
    /// Also trust peers that chain to the certificates of `root_cert`,
    /// besides the root the CA answers with. While a mesh's root is being
    /// rotated Istio's `root-cert.pem` holds the old and the new root, and
    /// peers still on the old one must stay trusted. Off by default.
    pub trust_root_cert: bool,
}

impl IstioCaConfig {
    /// Istio's defaults: a 24-hour certificate, 10 s per request.
    pub fn new(
        address: impl Into<String>,
        root_cert: impl Into<PathBuf>,
        token_file: impl Into<PathBuf>,
        id: SpiffeId,
    ) -> Self {
        IstioCaConfig {
            address: address.into(),
            root_cert: root_cert.into(),
            server_name: None,
            token_file: token_file.into(),
            cluster_id: None,
            id,
            validity: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            trust_root_cert: false,
        }
    }

    /// The name the CA's certificate is checked against.
    pub fn effective_server_name(&self) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let host = match self.address.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => self.address.as_str(),
        };
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    }
}

/// Why no certificate came from the CA. Each names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IstioCaError {
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: io::Error,
    },
    /// The token file holds nothing.
    #[error("the token file {0} is empty")]
    EmptyToken(PathBuf),
    /// The CA root file could not be used.
    #[error("cannot use {path} as the Istio CA's root certificate: {problem}")]
    Root {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// No TCP connection to the CA.
    #[error("cannot reach the Istio CA at {address}: {problem}")]
    Unreachable {
        /// The CA's address.
        address: String,
        /// Why.
        problem: String,
    },
    /// The CA's TLS certificate was not accepted (no token was sent).
    #[error(
        "TLS with the Istio CA at {address} failed, so no token was sent: {problem} \
         (the CA's certificate must chain to {root} and name {server_name})"
    )]
    Untrusted {
        /// The CA's address.
        address: String,
        /// The root file in use.
        root: PathBuf,
        /// The name checked.
        server_name: String,
        /// What TLS said.
        problem: String,
    },
    /// The CA answered the request with an error.
    #[error("the Istio CA at {address} refused the certificate request: {code}: {message}")]
    Refused {
        /// The CA's address.
        address: String,
        /// The gRPC status code, by name (e.g. `Unauthenticated`).
        code: String,
        /// The CA's message.
        message: String,
    },
    /// The request took longer than the configured limit.
    #[error("the Istio CA at {address} did not answer within {limit:?}")]
    Timeout {
        /// The CA's address.
        address: String,
        /// The limit.
        limit: Duration,
    },
    /// The CA answered with something that is not a usable certificate.
    #[error("the Istio CA at {address} returned an unusable certificate chain: {problem}")]
    BadChain {
        /// The CA's address.
        address: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The certificate names another identity than the one asked for.
    #[error("the Istio CA at {address} issued a certificate for {issued}, not for {requested}")]
    WrongId {
        /// The CA's address.
        address: String,
        /// What was asked for.
        requested: SpiffeId,
        /// What the certificate says.
        issued: SpiffeId,
    },
    /// The key or the request could not be made (a local fault).
    #[error("cannot make a key and certificate request: {0}")]
    Request(String),
}

/// What [`IstioCa::keep_renewed`] reports.
#[derive(Debug)]
pub enum Renewal<'a> {
    /// A new certificate is held; the callback puts it in use. An `Err`
    /// from the callback counts as a failed renewal and is retried.
    Renewed(&'a Identity),
    /// The attempt failed; the certificate in use stays, and the next
    /// attempt comes after `retry_in`.
    Failed {
        /// Why.
        error: &'a IstioCaError,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// A client of Istio's certificate service.
#[derive(Clone, Debug)]
pub struct IstioCa {
    config: Arc<IstioCaConfig>,
}

impl IstioCa {
    /// A client for `config`; nothing is read or dialled until
    /// [`IstioCa::issue`].
    pub fn new(config: IstioCaConfig) -> Self {
        IstioCa {
            config: Arc::new(config),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &IstioCaConfig {
        &self.config
    }

    /// Asks for one certificate: a new key, a CSR, one call to the CA.
    pub async fn issue(&self) -> Result<Identity, IstioCaError> {
        let config = &self.config;
        let limit = config.timeout;
        match tokio::time::timeout(limit, self.issue_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(IstioCaError::Timeout {
                address: config.address.clone(),
                limit,
            }),
        }
    }

    async fn issue_unbounded(&self) -> Result<Identity, IstioCaError> {
        let config = &self.config;
        let token = read_token(&config.token_file)?;
        let (roots, roots_der) = read_roots(&config.root_cert)?;
        let (key_pem, csr) =
            request::key_and_csr(&config.id).map_err(|e| IstioCaError::Request(e.to_string()))?;
        let tls = self.connect(roots).await?;
        let chain = self.create_certificate(tls, &token, csr).await?;
        let identity = self.identity_from(chain, &key_pem)?;
        Ok(match config.trust_root_cert {
            true => identity.with_more_roots(roots_der),
            false => identity,
        })
    }

    /// TCP and TLS to the CA; the token goes nowhere before this succeeds.
    async fn connect(&self, roots: RootCertStore) -> Result<TlsStream<TcpStream>, IstioCaError> {
        let config = &self.config;
        let tcp = TcpStream::connect(config.address.as_str())
            .await
            .map_err(|e| IstioCaError::Unreachable {
                address: config.address.clone(),
                problem: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = config.effective_server_name();
        let untrusted = |problem: String| IstioCaError::Untrusted {
            address: config.address.clone(),
            root: config.root_cert.clone(),
            server_name: name.clone(),
            problem,
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| untrusted(format!("{name:?} is not a DNS name or IP address: {e}")))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IstioCaError::Request(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|e| untrusted(e.to_string()))
    }

    /// The gRPC call over the verified connection.
    async fn create_certificate(
        &self,
        tls: TlsStream<TcpStream>,
        token: &str,
        csr: String,
    ) -> Result<Vec<String>, IstioCaError> {
        let config = &self.config;
        let refused = |code: String, message: String| IstioCaError::Refused {
            address: config.address.clone(),
            code,
            message,
        };
        let local =
            |what: &str, e: &dyn std::fmt::Display| IstioCaError::Request(format!("{what}: {e}"));
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("https://{}", config.address))
                .map_err(|e| local("the CA address is not usable in a URI", &e))?;
        let channel = endpoint
            .connect_with_connector(Established::new(tls))
            .await
            .map_err(|e| refused("Unavailable".into(), e.to_string()))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| refused("Unavailable".into(), e.to_string()))?;
        let mut request = tonic::Request::new(proto::IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(config.validity.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        let metadata = request.metadata_mut();
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|e| local("the token is not a valid header value", &e))?;
        metadata.insert("authorization", bearer);
        if let Some(cluster) = &config.cluster_id {
            let cluster = cluster
                .parse()
                .map_err(|e| local("the cluster ID is not a valid header value", &e))?;
            // gRPC metadata keys are lowercase on the wire; istiod reads
            // `ClusterID` case-insensitively.
            metadata.insert("clusterid", cluster);
        }
        let path = http::uri::PathAndQuery::from_static(proto::CREATE_CERTIFICATE);
        let codec = tonic_prost::ProstCodec::<
            proto::IstioCertificateRequest,
            proto::IstioCertificateResponse,
        >::default();
        let response = grpc.unary(request, path, codec).await.map_err(|status| {
            refused(format!("{:?}", status.code()), status.message().to_owned())
        })?;
        Ok(response.into_inner().cert_chain)
    }

    /// Checks the answer and pairs it with the key: the leaf first, the
    /// root last and taken as the trust bundle.
    fn identity_from(&self, chain: Vec<String>, key_pem: &str) -> Result<Identity, IstioCaError> {
        let config = &self.config;
        let bad = |problem: String| IstioCaError::BadChain {
            address: config.address.clone(),
            problem,
        };
        let Some((root, issued)) = chain.split_last() else {
            return Err(bad("no certificates".into()));
        };
        if issued.is_empty() {
            return Err(bad(
                "one certificate only; the leaf and the root are expected".into(),
            ));
        }
        let issued: String = issued
            .iter()
            .map(|pem| format!("{}\n", pem.trim_end()))
            .collect();
        let identity =
            Identity::from_pem(&issued, key_pem, root).map_err(|e| bad(e.to_string()))?;
        if identity.id() != &config.id {
            return Err(IstioCaError::WrongId {
                address: config.address.clone(),
                requested: config.id.clone(),
                issued: identity.id().clone(),
            });
        }
        Ok(identity)
    }

    /// Renews `current` for ever: at about half of each certificate's
    /// lifetime, and after a failure again with a backoff (1 s doubling to
    /// 5 min, sooner as expiry nears). The certificate in use stays until
    /// a new one is in hand. Runs until dropped.
    pub async fn keep_renewed(
        &self,
        current: Identity,
        mut on_event: impl FnMut(Renewal<'_>) -> Result<(), String>,
    ) {
        let mut expires = current.expires_at().unwrap_or_else(SystemTime::now);
        let mut wait = next_renewal(&current);
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(wait).await;
            let outcome = match self.issue().await {
                Ok(identity) => match on_event(Renewal::Renewed(&identity)) {
                    Ok(()) => Ok(identity),
                    Err(problem) => Err(IstioCaError::Request(format!(
                        "the new certificate could not be put in use: {problem}"
                    ))),
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(identity) => {
                    failures = 0;
                    expires = identity.expires_at().unwrap_or_else(SystemTime::now);
                    wait = next_renewal(&identity);
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    wait = schedule::retry_delay(failures, SystemTime::now(), expires);
                    let _ = on_event(Renewal::Failed {
                        error: &error,
                        retry_in: wait,
                    });
                }
            }
        }
    }
}

/// The wait before renewing `identity`, just received. CAs backdate the
/// start of validity for clocks that run behind (minutes, on certificates
/// that may live seconds in tests), so the lifetime counts from now.
fn next_renewal(identity: &Identity) -> Duration {
    let now = SystemTime::now();
    match identity.validity() {
        Some((issued, expires)) => {
            schedule::renewal_delay(issued.max(now), expires, now, schedule::jitter())
        }
        None => Duration::ZERO,
    }
}

fn read_token(path: &Path) -> Result<String, IstioCaError> {
    let text = std::fs::read_to_string(path).map_err(|source| IstioCaError::Token {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(IstioCaError::EmptyToken(path.to_owned()));
    }
    Ok(token.to_owned())
}

/// The CA roots in `path`, as a store and as the certificates read.
type Roots = (RootCertStore, Vec<CertificateDer<'static>>);

fn read_roots(path: &Path) -> Result<Roots, IstioCaError> {
    let problem = |problem: String| IstioCaError::Root {
        path: path.to_owned(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("invalid PEM: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(problem("no usable CERTIFICATE block".into()));
    }
    Ok((roots, certs))
}

/// Hands tonic the connection made and verified beforehand, once.
struct Established(Arc<Mutex<Option<TlsStream<TcpStream>>>>);

impl Established {
    fn new(tls: TlsStream<TcpStream>) -> Self {
        Established(Arc::new(Mutex::new(Some(tls))))
    }
}

impl tonic::codegen::Service<http::Uri> for Established {
    type Response = hyper_util::rt::TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let taken = self.0.lock().map(|mut slot| slot.take()).unwrap_or(None);
        std::future::ready(
            taken
                .map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| io::Error::other("the verified connection to the CA is gone")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: &str) -> IstioCaConfig {
        IstioCaConfig::new(
            address,
            "/nonexistent/root.pem",
            "/nonexistent/token",
            SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
        )
    }

    #[test]
    fn the_server_name_is_the_host_of_the_address_unless_set() {
        assert_eq!(
            config("istiod.istio-system.svc:15012").effective_server_name(),
            "istiod.istio-system.svc"
        );
        assert_eq!(config("[::1]:15012").effective_server_name(), "::1");
        assert_eq!(
            config("127.0.0.1:15012").effective_server_name(),
            "127.0.0.1"
        );
        let mut named = config("127.0.0.1:15012");
        named.server_name = Some("istiod.istio-system.svc".into());
        assert_eq!(named.effective_server_name(), "istiod.istio-system.svc");
    }

    #[tokio::test]
    async fn a_missing_token_file_is_named_before_anything_is_dialled() {
        let error = IstioCa::new(config("127.0.0.1:1"))
            .issue()
            .await
            .unwrap_err();
        assert!(matches!(error, IstioCaError::Token { .. }), "{error}");
        assert!(error.to_string().contains("/nonexistent/token"), "{error}");
    }

    #[test]
    fn an_empty_token_is_refused() {
        let dir = std::env::temp_dir().join(format!("hbone-token-{}", std::process::id()));
        std::fs::write(&dir, " \n").unwrap();
        let error = read_token(&dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(error, IstioCaError::EmptyToken(_)), "{error}");
    }
}
