//! A stand-in for istiod's certificate service, on loopback: the real
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` messages, gRPC
//! framed by hand over the h2 crate (an implementation independent of the
//! tonic client under test), TLS with a serving certificate for istiod's
//! name under a root of its own, and CSRs signed by a development CA.
//! Tests can make it refuse, stall, issue for the wrong ID or go away, and
//! read back every request it saw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hbone::ca::DevCa;
use hbone::istio_ca::proto::{
    CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse,
};
use http::{HeaderMap, HeaderValue, Response};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The name istiod's serving certificate carries.
pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// How the next requests are answered.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Sign the CSR (when the token matches).
    Sign,
    /// A gRPC error status with a message.
    Refuse(u32, &'static str),
    /// Wait this long, then sign.
    Stall(Duration),
    /// Sign a certificate for this ID instead of the one asked for.
    WrongId(&'static str),
}

/// One request as the CA saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    pub validity_s: i64,
    pub content_type: Option<String>,
}

struct State {
    ca: DevCa,
    token: Mutex<String>,
    answer: Mutex<Answer>,
    seen: Mutex<Vec<Seen>>,
    /// TLS handshakes that completed, whether or not a request followed.
    handshakes: Mutex<u32>,
}

pub struct TestIstioCa {
    pub addr: SocketAddr,
    /// PEM of the root that signed the serving certificate.
    pub root_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl TestIstioCa {
    /// Starts on a loopback port; CSRs are signed by `ca`, and only
    /// `Bearer <token>` is accepted.
    pub async fn start(ca: DevCa, token: &str) -> TestIstioCa {
        let (root_pem, acceptor) = serving_tls();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            ca,
            token: Mutex::new(token.to_owned()),
            answer: Mutex::new(Answer::Sign),
            seen: Mutex::new(Vec::new()),
            handshakes: Mutex::new(0),
        });
        let task = tokio::spawn(serve(listener, acceptor.clone(), state.clone()));
        TestIstioCa {
            addr,
            root_pem,
            acceptor,
            state,
            task: Mutex::new(Some(task)),
        }
    }

    /// PEM of the root that signs the certificates it issues.
    pub fn signing_root_pem(&self) -> String {
        self.state.ca.cert_pem().to_owned()
    }

    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    /// The token the CA accepts from now on.
    pub fn accept_token(&self, token: &str) {
        *self.state.token.lock().unwrap() = token.to_owned();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn handshakes(&self) -> u32 {
        *self.state.handshakes.lock().unwrap()
    }

    /// Stops listening: connections are refused until [`Self::come_back`].
    pub fn go_away(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let task = tokio::spawn(serve(listener, self.acceptor.clone(), self.state.clone()));
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for TestIstioCa {
    fn drop(&mut self) {
        self.go_away();
    }
}

/// A root of istiod's own and a serving certificate for [`ISTIOD_NAME`]
/// and 127.0.0.1, offered with ALPN h2 as gRPC needs.
fn serving_tls() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec![ISTIOD_NAME.to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    (
        root.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            *state.handshakes.lock().unwrap() += 1;
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                tokio::spawn(answer(request, respond, state.clone()));
            }
        });
    }
}

async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    state: Arc<State>,
) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    let cluster_id = header("clusterid");
    let content_type = header("content-type");
    let path = request.uri().path().to_owned();
    let mut body = request.into_body();
    let mut bytes = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
        if bytes.len() > 1 << 20 {
            return;
        }
    }
    if path != CREATE_CERTIFICATE {
        return status_only(respond, 12, "unknown method");
    }
    // gRPC framing: a flag byte (0: not compressed), a 4-byte length.
    if bytes.len() < 5 || bytes[0] != 0 {
        return status_only(respond, 13, "bad gRPC frame");
    }
    let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let Ok(message) = IstioCertificateRequest::decode(&bytes[5..][..length.min(bytes.len() - 5)])
    else {
        return status_only(respond, 13, "undecodable request");
    };
    state.seen.lock().unwrap().push(Seen {
        authorization: authorization.clone(),
        cluster_id,
        validity_s: message.validity_duration,
        content_type,
    });
    let expected = format!("Bearer {}", state.token.lock().unwrap());
    if authorization.as_deref() != Some(expected.as_str()) {
        return status_only(respond, 16, "authentication failure");
    }
    let answer = state.answer.lock().unwrap().clone();
    let validity = Duration::from_secs(message.validity_duration.max(1) as u64);
    let leaf = match answer {
        Answer::Refuse(code, text) => return status_only(respond, code, text),
        Answer::Stall(wait) => {
            tokio::time::sleep(wait).await;
            state.ca.sign_request(&message.csr, validity)
        }
        Answer::Sign => state.ca.sign_request(&message.csr, validity),
        Answer::WrongId(other) => state.ca.sign_request_for(
            &message.csr,
            &hbone::SpiffeId::parse(other).unwrap(),
            validity,
        ),
    };
    let leaf = match leaf {
        Ok(leaf) => leaf,
        Err(e) => return status_only(respond, 3, &e.to_string()),
    };
    let reply = IstioCertificateResponse {
        cert_chain: vec![first_pem(&leaf), state.ca.cert_pem().to_owned()],
    };
    let encoded = reply.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let Ok(mut stream) = respond.send_response(response, false) else {
        return;
    };
    let _ = stream.send_data(framed.freeze(), false);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

/// The first PEM block of `text`.
fn first_pem(text: &str) -> String {
    let end = "-----END CERTIFICATE-----";
    let at = text.find(end).map_or(text.len(), |i| i + end.len());
    format!("{}\n", &text[..at])
}

/// A trailers-only gRPC error.
fn status_only(mut respond: h2::server::SendResponse<Bytes>, code: u32, message: &str) {
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message.replace(['\r', '\n'], " "))
        .body(())
        .unwrap();
    let _ = respond.send_response(response, true);
}
