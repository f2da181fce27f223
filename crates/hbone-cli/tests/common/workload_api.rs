//! A stand-in for a SPIFFE Workload API agent on a Unix socket: the
//! `SpiffeWorkloadAPI/FetchX509SVID` stream of the SPIFFE proto, gRPC
//! framed by hand over the h2 crate, with SVIDs from a development CA.
//! Tests push updates (a new SVID, a new bundle) to every open stream.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hbone::SpiffeId;
use hbone::ca::{DevCa, IssuedCert};
use http::Response;
use prost::Message;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// `X509SVIDResponse` of the SPIFFE Workload API proto (workload.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// `X509SVID`: DER chain (leaf first), PKCS#8 key, DER bundle.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

pub struct TestAgent {
    pub socket: PathBuf,
    current: watch::Sender<Bytes>,
    /// Requests without the `workload.spiffe.io: true` header (refused).
    pub unmarked: Arc<Mutex<u32>>,
    task: JoinHandle<()>,
}

impl TestAgent {
    /// Listens on `dir/agent.sock`, serving `svid` with `bundle` (PEM
    /// roots) as the SVID's trust domain bundle.
    pub async fn start(dir: &Path, svid: &IssuedCert, bundle: &str) -> TestAgent {
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (current, _) = watch::channel(encode(svid, bundle));
        let unmarked = Arc::new(Mutex::new(0));
        let task = tokio::spawn(serve(listener, current.clone(), unmarked.clone()));
        TestAgent {
            socket,
            current,
            unmarked,
            task,
        }
    }

    /// `unix://` URI of the socket, as `SPIFFE_ENDPOINT_SOCKET` holds it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Pushes a new SVID and bundle to every open stream.
    pub fn push(&self, svid: &IssuedCert, bundle: &str) {
        self.current.send_replace(encode(svid, bundle));
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An SVID for `id` from `ca`, valid a day.
pub fn svid(ca: &DevCa, id: &str) -> IssuedCert {
    ca.issue(&SpiffeId::parse(id).unwrap(), Duration::from_secs(86_400))
        .unwrap()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .flat_map(|cert| cert.unwrap().to_vec())
        .collect()
}

fn encode(svid: &IssuedCert, bundle: &str) -> Bytes {
    use rustls_pki_types::PrivateKeyDer;
    let leaf = svid.identity().unwrap();
    let key = match PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).unwrap() {
        PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
        other => panic!("the development CA writes PKCS#8 keys, not {other:?}"),
    };
    let response = X509SvidResponse {
        svids: vec![X509Svid {
            spiffe_id: leaf.id().to_string(),
            x509_svid: der_of(&svid.chain_pem),
            x509_svid_key: key,
            bundle: der_of(bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    };
    let message = response.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    framed.freeze()
}

async fn serve(listener: UnixListener, current: watch::Sender<Bytes>, unmarked: Arc<Mutex<u32>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let current = current.clone();
        let unmarked = unmarked.clone();
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                let marked = request
                    .headers()
                    .get("workload.spiffe.io")
                    .is_some_and(|v| v == "true");
                if !marked {
                    *unmarked.lock().unwrap() += 1;
                }
                tokio::spawn(stream_svids(
                    request.uri().path() == FETCH_X509_SVID && marked,
                    respond,
                    current.subscribe(),
                ));
            }
        });
    }
}

/// Sends the current SVID, then every update, until the client goes.
async fn stream_svids(
    allowed: bool,
    mut respond: h2::server::SendResponse<Bytes>,
    mut updates: watch::Receiver<Bytes>,
) {
    let head = Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if !allowed {
        // As SPIRE answers a request without the security header, or a
        // method it does not serve: a trailers-only error.
        let refused = head
            .header("grpc-status", "3")
            .header("grpc-message", "security header missing from request")
            .body(())
            .unwrap();
        let _ = respond.send_response(refused, true);
        return;
    }
    let Ok(mut stream) = respond.send_response(head.body(()).unwrap(), false) else {
        return;
    };
    loop {
        let message = updates.borrow_and_update().clone();
        if stream.send_data(message, false).is_err() {
            return;
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}
