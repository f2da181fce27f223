//! Shared fixtures: certificates from our CA, servers and echo targets on
//! loopback, and payload helpers.
#![allow(dead_code)]

pub mod istio_ca;
pub mod workload_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hbone::ca::DevCa;
use hbone::server::ServerStats;
use hbone::{Identity, Server, ServerConfig, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const TD: &str = "cluster.local";
pub const DAY: Duration = Duration::from_secs(86_400);

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn id(text: &str) -> SpiffeId {
    SpiffeId::parse(text).unwrap()
}

/// A CA with a client and a server identity.
pub struct Pki {
    pub ca: DevCa,
    pub client_id: SpiffeId,
    pub server_id: SpiffeId,
    pub client: Identity,
    pub server: Identity,
}

impl Pki {
    pub fn new() -> Self {
        let ca = DevCa::generate(TD, DAY).unwrap();
        let client_id = SpiffeId::istio(TD, "test", "client").unwrap();
        let server_id = SpiffeId::istio(TD, "test", "server").unwrap();
        let client = ca.issue(&client_id, DAY).unwrap().identity().unwrap();
        let server = ca.issue(&server_id, DAY).unwrap().identity().unwrap();
        Pki {
            ca,
            client_id,
            server_id,
            client,
            server,
        }
    }
}

/// A running server; aborted when dropped.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    task: JoinHandle<()>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_server(config: ServerConfig) -> RunningServer {
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let task = tokio::spawn(server.run());
    RunningServer { addr, stats, task }
}

pub async fn start_default_server(pki: &Pki) -> RunningServer {
    start_server(ServerConfig::new(loopback(), pki.server.clone())).await
}

/// An echo target: copies everything back, then half-closes.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A port on loopback with nothing listening.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    listener.local_addr().unwrap()
}

/// Deterministic pseudo-random bytes, different per seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// How long [`echo_roundtrip`] waits for its whole exchange: far beyond
/// what the largest echo in the tests takes on a loaded machine, so that a
/// regression fails instead of hanging.
const ECHO_WAIT: Duration = Duration::from_secs(60);

/// Writes `data` and half-closes while reading everything back; returns
/// what was read, or `TimedOut` after [`ECHO_WAIT`].
pub async fn echo_roundtrip<S>(stream: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(ECHO_WAIT, echo_unbounded(stream, data))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo round trip"))?
}

async fn echo_unbounded<S>(stream: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(data).await?;
        writer.shutdown().await
    };
    let read = async {
        let mut back = Vec::with_capacity(data.len());
        reader.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let ((), back) = tokio::try_join!(write, read)?;
    Ok(back)
}

/// A TLS 1.3 acceptor with `identity`, requiring client certificates from
/// its trust bundle and offering `h2`: the TLS side of a hand-made HBONE
/// server whose HTTP/2 behaviour a test controls.
pub fn raw_tls_acceptor(identity: &Identity) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.bundle()[0].clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// How long a test waits for a peer's bytes or close before it fails
/// rather than hangs: far beyond what a loaded machine needs.
pub const PEER_WAIT: Duration = Duration::from_secs(10);

/// Bounds `future` by `limit`; panics naming `what` when it runs out.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

/// Polls `check` until it holds, for up to ten seconds: generous, so that
/// a loaded machine does not fail a test whose event is merely late.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A rustls client config written without hbone's TLS code: it accepts any
/// server certificate (the tests check the server's behaviour, not ours)
/// and presents `identity`'s certificate if given.
pub fn raw_client_config(identity: Option<&Identity>) -> Arc<rustls::ClientConfig> {
    Arc::new(raw_client_config_with(
        identity,
        &[&rustls::version::TLS13],
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
}

/// [`raw_client_config`] offering only `versions`, with `provider`'s
/// cipher suites, for clients the server should turn away.
pub fn raw_client_config_with(
    identity: Option<&Identity>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    provider: rustls::crypto::CryptoProvider,
) -> rustls::ClientConfig {
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// [`raw_client_config`] presenting a certificate that hbone itself would
/// not load (so no [`Identity`] can hold it): `cert` with its PKCS#8 `key`.
pub fn raw_client_config_presenting(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: Vec<u8>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key).into();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 not offered".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `server` made with [`raw_client_config`].
pub async fn raw_tls(
    server: SocketAddr,
    identity: Option<&Identity>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(server).await?;
    let connector = tokio_rustls::TlsConnector::from(raw_client_config(identity));
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    connector.connect(name, tcp).await
}

/// What a [`Relay`] does with the connections it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Forward bytes both ways.
    Pass,
    /// Stop forwarding on existing connections but keep them open, like a
    /// black-holed path. New connections still pass.
    Freeze,
    /// Reset every existing connection. New connections still pass.
    Kill,
    /// Stop forwarding on existing connections, and reset each one as soon
    /// as its client next sends: a peer that lost the connection (its host
    /// restarted), which the client learns only by writing. New
    /// connections still pass.
    ResetOnNextSend,
}

/// A TCP relay on loopback that can black-hole or reset the connections it
/// carries, to play a peer that dies or goes silent.
pub struct Relay {
    pub addr: SocketAddr,
    mode: tokio::sync::watch::Sender<(RelayMode, u64)>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watch) = tokio::sync::watch::channel((RelayMode::Pass, 0u64));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut watch = watch.clone();
                // Connections only react to orders given after they opened.
                let born = watch.borrow_and_update().1;
                tokio::spawn(async move {
                    let order = loop {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            changed = watch.changed() => {
                                if changed.is_err() { return; }
                                let (mode, serial) = *watch.borrow_and_update();
                                if serial > born && mode != RelayMode::Pass { break mode; }
                            }
                        }
                    };
                    match order {
                        RelayMode::Kill => {
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                        RelayMode::ResetOnNextSend => {
                            let mut byte = [0u8; 1];
                            tokio::select! {
                                _ = inbound.read(&mut byte) => {}
                                _ = watch.wait_for(|_| false) => {}
                            }
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                        _ => {
                            // Frozen: hold both sockets silently until the
                            // relay is dropped.
                            let _ = watch.wait_for(|_| false).await;
                        }
                    }
                });
            }
        });
        Relay { addr, mode }
    }

    /// Applies `mode` to the connections open now.
    pub fn set(&self, mode: RelayMode) {
        self.mode.send_modify(|(m, serial)| {
            *m = mode;
            *serial += 1;
        });
    }
}

/// An access log that keeps every record, for assertions.
#[derive(Default)]
pub struct Records(pub std::sync::Mutex<Vec<hbone::access::TunnelRecord>>);

impl hbone::access::AccessLog for Records {
    fn record(&self, record: &hbone::access::TunnelRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
}

impl Records {
    pub fn all(&self) -> Vec<hbone::access::TunnelRecord> {
        self.0.lock().unwrap().clone()
    }
}

/// With the `hbone` binary: `ca init` in `dir/ca`, then `ca issue` of each
/// (SPIFFE ID, folder name) into `dir/NAME`, as an operator would.
pub async fn issue_with_cli(dir: &std::path::Path, identities: &[(&str, &str)]) {
    let ca = dir.join("ca");
    let ca = ca.to_str().unwrap();
    run_hbone(&["ca", "init", "--out", ca]).await;
    for (id, name) in identities {
        let out = dir.join(name);
        run_hbone(&[
            "ca",
            "issue",
            "--ca",
            ca,
            "--id",
            id,
            "--out",
            out.to_str().unwrap(),
        ])
        .await;
    }
}

/// Runs the `hbone` binary to completion; it must succeed.
pub async fn run_hbone(args: &[&str]) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hbone"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "hbone {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An h2 stream as a byte stream, built without hbone's code: two pumps
/// between the stream and one end of an in-memory pipe.
pub fn stream_as_io(
    mut send: h2::SendStream<bytes::Bytes>,
    mut recv: h2::RecvStream,
) -> tokio::io::DuplexStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (mut read_half, mut write_half) = tokio::io::split(ours);
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(chunk.len());
            if write_half.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = write_half.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match read_half.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = send.send_data(bytes::Bytes::new(), true);
                    return;
                }
                Ok(n) => {
                    if send
                        .send_data(bytes::Bytes::copy_from_slice(&buf[..n]), false)
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    theirs
}

/// Sends CONNECT `authority` on `send`; the status and, on 200, the stream.
pub async fn raw_connect(
    send: &h2::client::SendRequest<bytes::Bytes>,
    authority: &str,
) -> (u16, Option<tokio::io::DuplexStream>) {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (response, stream) = send.send_request(request, false).unwrap();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
        .await
        .expect("no answer to CONNECT")
        .unwrap();
    let status = response.status().as_u16();
    let io = (status == 200).then(|| stream_as_io(stream, response.into_body()));
    (status, io)
}

/// An h2 client over `io`, its connection driven in the background.
pub async fn raw_h2_over<IO>(io: IO) -> h2::client::SendRequest<bytes::Bytes>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Listening sockets on loopback `port`, from the kernel's table.
pub fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // State 0A is LISTEN.
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
        })
        .count()
}
