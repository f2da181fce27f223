//! Interoperability with HTTP/2 stacks we did not write. Each peer is a
//! small program under `tests/interop/` that uses only its platform's own
//! HTTP/2 and TLS code:
//!
//! - Go's standard library (`net/http` with its bundled HTTP/2, `crypto/tls`),
//!   as an HBONE client and as an HBONE server;
//! - Node.js's `http2` module, as a client and as a server;
//! - HAProxy as a relay: curl sends an HTTP/1.1 CONNECT to it and HAProxy
//!   carries it to `hbone server` as an HTTP/2 CONNECT over mutual TLS.
//!
//! Every transfer is checked by SHA-256, half-close is checked in both
//! orders (client first: the target answers only after reading EOF; target
//! first: the client keeps sending after the target's FIN), and each side's
//! SPIFFE checks are shown to refuse a wrong identity.
//!
//! The tools come from Debian packages (`golang-go`, `nodejs`, `haproxy`,
//! `curl`); `scripts/install-test-deps.sh` installs them and a missing one
//! fails the test with that advice. Everything listens on loopback, every
//! wait has a limit, and every child process is killed on drop.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use hbone::ca::DevCa;
use hbone::{DialError, Dialer, Identity, SpiffeId};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{OnceCell, mpsc};

const HBONE_BIN: &str = env!("CARGO_BIN_EXE_hbone");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TARGET_TMPDIR: &str = env!("CARGO_TARGET_TMPDIR");

/// The limit on any one wait: a peer starting, a transfer, an exit.
const WAIT: Duration = Duration::from_secs(60);
/// The bulk transfer through each pair, each way.
const BULK: usize = 8 << 20;
/// Sent by the client in the half-close checks.
const REQUEST: usize = 1 << 20;
/// What the target sends before it half-closes, in the target-first check.
const BANNER: &[u8] = b"hello from a target that half-closes first\n";

// ---------------------------------------------------------------------------
// Tools and peer programs

fn interop_dir() -> PathBuf {
    Path::new(MANIFEST_DIR).join("tests/interop")
}

/// `tool` on PATH, or a failure that says how to get it.
fn require(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the interop tests need `{tool}` (Debian package {package}); \
                 run `bash scripts/install-test-deps.sh` as root"
            )
        })
}

struct GoPeers {
    client: PathBuf,
    server: PathBuf,
}

/// Builds the Go peers once per test run, standard library only: no
/// modules, no proxy, no cgo (so no C compiler is needed).
async fn go_peers() -> &'static GoPeers {
    static PEERS: OnceCell<GoPeers> = OnceCell::const_new();
    PEERS
        .get_or_init(|| async {
            let go = require("go", "golang-go");
            let out = Path::new(TARGET_TMPDIR).join("interop-go");
            std::fs::create_dir_all(&out).unwrap();
            let mut built = Vec::new();
            for name in ["client", "server"] {
                let binary = out.join(format!("go-{name}"));
                // Built beside it and renamed into place, so that a test run
                // in another process never sees a half-written binary.
                let partial = out.join(format!("go-{name}.{}", std::process::id()));
                let source = interop_dir().join("go").join(format!("{name}.go"));
                let build = Command::new(&go)
                    .arg("build")
                    .arg("-o")
                    .arg(&partial)
                    .arg(&source)
                    .env("GO111MODULE", "off")
                    .env("GOPROXY", "off")
                    .env("GOTOOLCHAIN", "local")
                    .env("GOFLAGS", "")
                    .env("CGO_ENABLED", "0")
                    .env("GOCACHE", out.join("cache"))
                    .env("GOPATH", out.join("gopath"))
                    .kill_on_drop(true)
                    .output();
                let output = tokio::time::timeout(Duration::from_secs(300), build)
                    .await
                    .expect("go build timed out")
                    .expect("could not run go build");
                assert!(
                    output.status.success(),
                    "go build {} failed:\n{}",
                    source.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
                std::fs::rename(&partial, &binary).unwrap();
                built.push(binary);
            }
            let server = built.pop().unwrap();
            let client = built.pop().unwrap();
            GoPeers { client, server }
        })
        .await
}

/// An HTTP/2 implementation that is not ours.
#[derive(Clone, Copy, Debug)]
enum Peer {
    Go,
    Node,
}

impl Peer {
    /// The peer's HBONE client: stdin into a tunnel to `target` through
    /// `server`, the tunnel to stdout; exit 3 on a non-200 status.
    async fn client(
        self,
        server: SocketAddr,
        target: SocketAddr,
        files: &Path,
        server_id: &SpiffeId,
    ) -> Command {
        let server = server.to_string();
        let target = target.to_string();
        let file = |name: &str| files.join(name).to_str().unwrap().to_owned();
        let mut command = match self {
            Peer::Go => {
                let mut command = Command::new(&go_peers().await.client);
                command.args(["-server", &server, "-target", &target]);
                command.args(["-cert", &file("cert.pem"), "-key", &file("key.pem")]);
                command.args(["-ca", &file("bundle.pem"), "-server-id", server_id.as_str()]);
                command
            }
            Peer::Node => {
                let mut command = Command::new(require("node", "nodejs"));
                command.env_remove("NODE_OPTIONS");
                command.arg(interop_dir().join("node/client.js"));
                command.args(["--server", &server, "--target", &target]);
                command.args(["--cert", &file("cert.pem"), "--key", &file("key.pem")]);
                command.args([
                    "--ca",
                    &file("bundle.pem"),
                    "--server-id",
                    server_id.as_str(),
                ]);
                command
            }
        };
        command.kill_on_drop(true);
        command
    }

    /// The peer's HBONE server, accepting only `client_id`.
    async fn server(self, files: &Path, client_id: &SpiffeId) -> Command {
        let file = |name: &str| files.join(name).to_str().unwrap().to_owned();
        let mut command = match self {
            Peer::Go => {
                let mut command = Command::new(&go_peers().await.server);
                command.args(["-listen", "127.0.0.1:0"]);
                command.args(["-cert", &file("cert.pem"), "-key", &file("key.pem")]);
                command.args(["-ca", &file("bundle.pem"), "-client-id", client_id.as_str()]);
                command
            }
            Peer::Node => {
                let mut command = Command::new(require("node", "nodejs"));
                command.env_remove("NODE_OPTIONS");
                command.arg(interop_dir().join("node/server.js"));
                command.args(["--listen", "127.0.0.1:0"]);
                command.args(["--cert", &file("cert.pem"), "--key", &file("key.pem")]);
                command.args([
                    "--ca",
                    &file("bundle.pem"),
                    "--client-id",
                    client_id.as_str(),
                ]);
                command
            }
        };
        command.kill_on_drop(true);
        command
    }
}

// ---------------------------------------------------------------------------
// Certificates on disk for the peers

/// PEM files from our CA for the peers: `client/` and `server/` each hold
/// cert.pem, key.pem and bundle.pem.
struct PeerFiles {
    dir: tempfile::TempDir,
}

impl PeerFiles {
    fn new(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (id, name) in [(&pki.client_id, "client"), (&pki.server_id, "server")] {
            pki.ca
                .issue(id, DAY)
                .unwrap()
                .save(dir.path().join(name))
                .unwrap();
        }
        PeerFiles { dir }
    }

    fn client(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    fn server(&self) -> PathBuf {
        self.dir.path().join("server")
    }
}

/// An identity with `id` whose certificate comes from a CA nobody here
/// trusts, but which itself trusts `pki`'s CA (so only the peer objects).
fn foreign_identity(pki: &Pki, id: &SpiffeId) -> Identity {
    let issued = DevCa::generate(TD, DAY).unwrap().issue(id, DAY).unwrap();
    Identity::from_pem(&issued.chain_pem, &issued.key_pem, pki.ca.cert_pem()).unwrap()
}

// ---------------------------------------------------------------------------
// Processes

/// A long-running peer; killed when dropped.
struct Running {
    _child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains all of `needles`.
    async fn wait_for_log(&self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(line) = self
                    .log()
                    .into_iter()
                    .find(|line| needles.iter().all(|n| line.contains(n)))
                {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {needles:?} in {:#?}", self.log()))
    }
}

/// Starts a peer server and waits for its "ready listen=ADDR" line on
/// stderr; keeps collecting its later lines.
async fn spawn_ready(mut command: Command) -> Running {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {command:?}: {e}"));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(Vec::new()));
    let addr = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().unwrap().push(line.clone());
            if line.contains("ready") {
                let listen = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("listen="))
                    .unwrap_or_else(|| panic!("no listen= in {line:?}"));
                return listen.parse::<SocketAddr>().unwrap();
            }
        }
        panic!(
            "{command:?} exited before it was ready: {:#?}",
            log.lock().unwrap()
        );
    })
    .await
    .unwrap_or_else(|_| panic!("{command:?} was not ready within {WAIT:?}"));
    let collected = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            collected.lock().unwrap().push(line);
        }
    });
    Running {
        _child: child,
        addr,
        log,
    }
}

/// Runs a client process: `input` goes to its stdin, which is then closed
/// (the half-close); returns what it printed and its exit status.
async fn run_client(mut command: Command, input: Vec<u8>) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {command:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    // Written while the output is read, or a large echo would deadlock.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        // Dropping stdin closes it: EOF for the client.
    });
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {WAIT:?}"))
        .unwrap();
    writer.await.unwrap();
    output
}

fn describe(output: &Output) -> String {
    format!(
        "status {}, {} bytes on stdout, stderr:\n{}",
        output.status,
        output.stdout.len(),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// Targets

/// Reads to EOF, then answers with the length and SHA-256 of what it read
/// and closes: an answer the client gets only if its half-close arrived.
async fn start_digest_target() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if socket.read_to_end(&mut data).await.is_ok() {
                    let _ = socket.write_all(digest_line(&data).as_bytes()).await;
                    let _ = socket.shutdown().await;
                }
            });
        }
    });
    addr
}

fn digest_line(data: &[u8]) -> String {
    let hex: String = sha256(data).iter().map(|b| format!("{b:02x}")).collect();
    format!("{} bytes sha256 {hex}\n", data.len())
}

/// Sends [`BANNER`] and half-closes at once, then reads to EOF and reports
/// the length and SHA-256 of what it read.
async fn start_banner_target() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let _ = socket.write_all(BANNER).await;
                let _ = socket.shutdown().await;
                let mut data = Vec::new();
                let line = match socket.read_to_end(&mut data).await {
                    Ok(_) => digest_line(&data),
                    Err(e) => format!("read failed after {} bytes: {e}\n", data.len()),
                };
                let _ = report.send(line);
            });
        }
    });
    (addr, reports)
}

/// An echo target on `ip`.
async fn start_echo_on(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {ip}: {e}"));
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

async fn next_report(reports: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, reports.recv())
        .await
        .expect("the target did not report")
        .expect("the target went away")
}

async fn read_exactly<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(WAIT, reader.read_exact(&mut buf))
        .await
        .expect("timed out reading")
        .expect("read failed");
    buf
}

// ---------------------------------------------------------------------------
// A peer's client through `hbone` (the library server, as `hbone server`
// runs it)

async fn peer_client_through_hbone_server(peer: Peer) {
    let pki = Pki::new();
    let files = PeerFiles::new(&pki);
    let server = start_default_server(&pki).await;
    let client_files = files.client();
    let client =
        |target: SocketAddr| peer.client(server.addr, target, &client_files, &pki.server_id);

    // Bulk, both ways, checked by hash.
    let echo = start_echo().await;
    let data = payload(1, BULK);
    let output = run_client(client(echo).await, data.clone()).await;
    assert!(
        output.status.success(),
        "{peer:?} bulk: {}",
        describe(&output)
    );
    assert_eq!(
        output.stdout.len(),
        data.len(),
        "{peer:?} bulk: {}",
        describe(&output)
    );
    assert!(
        sha256(&output.stdout) == sha256(&data),
        "{peer:?} bulk: data corrupted"
    );

    // Client half-closes first: the target answers only after EOF.
    let digest = start_digest_target().await;
    let request = payload(2, REQUEST);
    let output = run_client(client(digest).await, request.clone()).await;
    assert!(
        output.status.success(),
        "{peer:?} half-close: {}",
        describe(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        digest_line(&request)
    );

    // The target half-closes first: the client gets the banner and
    // END_STREAM (it says so on stderr), then still sends its whole request.
    let (banner, mut reports) = start_banner_target().await;
    let mut child = client(banner)
        .await
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    assert_eq!(read_exactly(&mut stdout, BANNER.len()).await, BANNER);
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut early = Vec::new();
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = stderr.next_line().await {
            let ended = line.contains("response ended");
            early.push(line);
            if ended {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        ended,
        Ok(true),
        "{peer:?}: the client never saw the target's END_STREAM: {early:#?}"
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&request).await.unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stdout.read_to_end(&mut rest))
        .await
        .expect("client stdout did not end")
        .unwrap();
    assert!(rest.is_empty(), "{peer:?}: more than the banner came back");
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("client did not exit")
        .unwrap();
    assert!(
        output.status.success(),
        "{peer:?} target-first half-close: {}\nearlier stderr: {early:#?}",
        describe(&output)
    );
    assert_eq!(next_report(&mut reports).await, digest_line(&request));

    // An IPv6 target: the authority is "[::1]:port".
    let echo6 = start_echo_on(IpAddr::V6(Ipv6Addr::LOCALHOST)).await;
    let data6 = payload(3, 64 << 10);
    let output = run_client(client(echo6).await, data6.clone()).await;
    assert!(
        output.status.success(),
        "{peer:?} IPv6: {}",
        describe(&output)
    );
    assert!(output.stdout == data6, "{peer:?} IPv6: data corrupted");

    let before = server.stats.snapshot();
    assert_eq!(before.tunnels_opened, 4, "{before:?}");

    // A target nobody listens on: hbone answers 503, the client sees it.
    let output = run_client(client(closed_port().await).await, Vec::new()).await;
    assert_eq!(
        output.status.code(),
        Some(3),
        "{peer:?} refused: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("status=503"), "{peer:?} refused: {stderr}");

    // The peer's SPIFFE check: expecting another identity, it refuses ours.
    let impostor = SpiffeId::istio(TD, "test", "not-the-server").unwrap();
    let command = peer
        .client(server.addr, echo, &client_files, &impostor)
        .await;
    let output = run_client(command, b"never sent".to_vec()).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{peer:?} impostor: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("want {impostor}")),
        "{peer:?}: {stderr}"
    );

    let after = server.stats.snapshot();
    assert_eq!(after.tunnels_opened, 4, "{after:?}");
    assert_eq!(after.refusals, before.refusals + 1, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_through_hbone_server() {
    peer_client_through_hbone_server(Peer::Go).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_through_hbone_server() {
    peer_client_through_hbone_server(Peer::Node).await;
}

// ---------------------------------------------------------------------------
// hbone's client (the library dialer, and the `hbone connect` binary)
// through a peer's server

async fn connect(
    dialer: &Dialer,
    server: SocketAddr,
    id: &SpiffeId,
    target: SocketAddr,
) -> hbone::Tunnel {
    tokio::time::timeout(
        WAIT,
        dialer.connect(server, std::slice::from_ref(id), target),
    )
    .await
    .expect("dial timed out")
    .unwrap_or_else(|e| panic!("tunnel to {target} via {server}: {e}"))
}

async fn dial_error(
    dialer: &Dialer,
    server: SocketAddr,
    id: &SpiffeId,
    target: SocketAddr,
) -> DialError {
    match tokio::time::timeout(
        WAIT,
        dialer.connect(server, std::slice::from_ref(id), target),
    )
    .await
    .expect("dial timed out")
    {
        Ok(_) => panic!("a tunnel to {target} via {server} opened; it should have failed"),
        Err(e) => e,
    }
}

async fn hbone_through_peer_server(peer: Peer) {
    let pki = Pki::new();
    let files = PeerFiles::new(&pki);
    let server = spawn_ready(peer.server(&files.server(), &pki.client_id).await).await;
    let dialer = Dialer::new(&pki.client).unwrap();

    // Bulk, both ways, checked by hash; the peer counted every byte.
    let echo = start_echo().await;
    let tunnel = connect(&dialer, server.addr, &pki.server_id, echo).await;
    assert_eq!(tunnel.peer_id(), &pki.server_id);
    let data = payload(1, BULK);
    let back = tokio::time::timeout(WAIT, echo_roundtrip(tunnel, &data))
        .await
        .expect("bulk transfer timed out")
        .unwrap();
    assert_eq!(back.len(), data.len(), "{peer:?} bulk");
    assert!(
        sha256(&back) == sha256(&data),
        "{peer:?} bulk: data corrupted"
    );
    server
        .wait_for_log(&[
            &format!("target={echo} "),
            &format!("up={BULK} down={BULK}"),
        ])
        .await;

    // Many tunnels at once, multiplexed on the pooled connection.
    let mut tasks = Vec::new();
    for seed in 0..16u64 {
        let dialer = dialer.clone();
        let id = pki.server_id.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let tunnel = connect(&dialer, addr, &id, echo).await;
            let data = payload(100 + seed, 256 << 10);
            let back = echo_roundtrip(tunnel, &data).await.unwrap();
            assert!(
                sha256(&back) == sha256(&data),
                "tunnel {seed}: data corrupted"
            );
        }));
    }
    for task in tasks {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("concurrent tunnels timed out")
            .unwrap();
    }
    assert_eq!(
        dialer.pooled_connections(),
        1,
        "{peer:?}: one connection carries all"
    );

    // Client half-closes first: the target answers only after EOF.
    let digest = start_digest_target().await;
    let request = payload(2, REQUEST);
    let tunnel = connect(&dialer, server.addr, &pki.server_id, digest).await;
    let answer = tokio::time::timeout(WAIT, echo_roundtrip(tunnel, &request))
        .await
        .expect("half-close timed out")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), digest_line(&request));

    // The same through the `hbone connect` binary: EOF on stdin half-closes.
    let client_files = files.client();
    let file = |name: &str| client_files.join(name).to_str().unwrap().to_owned();
    let mut command = Command::new(HBONE_BIN);
    command
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .arg("connect");
    command.args(["--cert", &file("cert.pem"), "--key", &file("key.pem")]);
    command.args(["--trust-bundle", &file("bundle.pem")]);
    command.args([
        "--server",
        &server.addr.to_string(),
        "--server-id",
        pki.server_id.as_str(),
    ]);
    command.args(["--target", &digest.to_string()]);
    let output = run_client(command, request.clone()).await;
    assert!(
        output.status.success(),
        "hbone connect via {peer:?}: {}",
        describe(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        digest_line(&request)
    );

    // The target half-closes first: we read the banner to its end, then
    // still send the whole request.
    let (banner, mut reports) = start_banner_target().await;
    let mut tunnel = connect(&dialer, server.addr, &pki.server_id, banner).await;
    assert_eq!(read_exactly(&mut tunnel, BANNER.len()).await, BANNER);
    tokio::time::timeout(WAIT, async {
        tunnel.write_all(&request).await?;
        tunnel.shutdown().await?;
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await?;
        assert!(rest.is_empty(), "{peer:?}: more than the banner came back");
        Ok::<_, std::io::Error>(())
    })
    .await
    .expect("target-first half-close timed out")
    .unwrap();
    assert_eq!(next_report(&mut reports).await, digest_line(&request));

    // An IPv6 target: the authority is "[::1]:port".
    let echo6 = start_echo_on(IpAddr::V6(Ipv6Addr::LOCALHOST)).await;
    let tunnel = connect(&dialer, server.addr, &pki.server_id, echo6).await;
    let data6 = payload(3, 64 << 10);
    let back = tokio::time::timeout(WAIT, echo_roundtrip(tunnel, &data6))
        .await
        .expect("IPv6 transfer timed out")
        .unwrap();
    assert!(back == data6, "{peer:?} IPv6: data corrupted");

    // A target nobody listens on: the peer answers 503, a typed error here.
    let closed = closed_port().await;
    match dial_error(&dialer, server.addr, &pki.server_id, closed).await {
        DialError::Status { status, .. } => assert_eq!(status.as_u16(), 503),
        other => panic!("{peer:?}: expected a 503, got {other}"),
    }

    // Our check on the peer: expecting another identity, we refuse it.
    let impostor = SpiffeId::istio(TD, "test", "not-the-server").unwrap();
    match dial_error(&dialer, server.addr, &impostor, echo).await {
        DialError::Tls { .. } => {}
        other => panic!("{peer:?}: expected a TLS failure, got {other}"),
    }

    // The peer's checks on us: a client ID it does not accept, and a
    // certificate from a CA it does not trust. Either way the connection
    // fails before any tunnel, and the peer says why.
    let unknown_ca = match peer {
        Peer::Go => "certificate signed by unknown authority",
        Peer::Node => "refused TLS client",
    };
    for (identity, reason) in [
        (pki.server.clone(), format!("want {}", pki.client_id)),
        (
            foreign_identity(&pki, &pki.client_id),
            unknown_ca.to_owned(),
        ),
    ] {
        let dialer = Dialer::new(&identity).unwrap();
        match dial_error(&dialer, server.addr, &pki.server_id, echo).await {
            // The peer's alert, or, when its close destroyed the alert,
            // the dialer's account of a connection refused right after
            // the handshake: a TLS failure either way.
            DialError::Tls { .. } => {}
            other => panic!("{peer:?} refusing {}: unexpected {other}", identity.id()),
        }
        server.wait_for_log(&[&reason]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_through_go_server() {
    hbone_through_peer_server(Peer::Go).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_through_node_server() {
    hbone_through_peer_server(Peer::Node).await;
}

// ---------------------------------------------------------------------------
// curl -> HAProxy (HTTP/1.1 CONNECT in, HTTP/2 CONNECT over mTLS out) ->
// hbone server

/// A minimal HTTP/1.1 server: answers one request per connection with its
/// body echoed back.
async fn start_http_echo() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = http_echo_once(socket).await;
            });
        }
    });
    addr
}

async fn http_echo_once(socket: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(socket);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    let mut socket = reader.into_inner();
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(&body).await?;
    socket.shutdown().await
}

/// Two distinct loopback ports that were free a moment ago (HAProxy binds
/// them itself).
async fn free_ports() -> (u16, u16) {
    let first = TcpListener::bind(loopback()).await.unwrap();
    let second = TcpListener::bind(loopback()).await.unwrap();
    (
        first.local_addr().unwrap().port(),
        second.local_addr().unwrap().port(),
    )
}

/// Runs curl through the HTTP proxy at `proxy` with CONNECT (-p), POSTing
/// `body` to the HTTP echo at `target`.
async fn curl_through(proxy: u16, target: SocketAddr, body: &Path, out: &Path) -> Output {
    let mut command = Command::new(require("curl", "curl"));
    command
        .args(["--silent", "--show-error", "--fail", "--proxytunnel"])
        .args(["--proxy", &format!("http://127.0.0.1:{proxy}")])
        // No proxy settings from the environment: neither a proxy nor an
        // exception for loopback.
        .args(["--noproxy", ""])
        .args(["--max-time", "60", "--header", "Expect:"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg("--output")
        .arg(out)
        .arg(format!("http://{target}/echo"))
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        command.env_remove(var);
    }
    run_client(command, Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_haproxy_h2_connect_to_hbone_server() {
    let haproxy = require("haproxy", "haproxy");
    require("curl", "curl");
    let pki = Pki::new();
    let files = PeerFiles::new(&pki);
    let server = start_default_server(&pki).await;
    let target = start_http_echo().await;

    // HAProxy wants the certificate and its key in one file. A second
    // backend trusts another CA, to show that HAProxy checks the chain.
    let client = files.client();
    let pem = client.join("haproxy.pem");
    let mut combined = std::fs::read_to_string(client.join("cert.pem")).unwrap();
    combined.push_str(&std::fs::read_to_string(client.join("key.pem")).unwrap());
    std::fs::write(&pem, combined).unwrap();
    // It holds the key: the owner's alone, as hbone wants its own keys.
    std::fs::set_permissions(&pem, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let other_ca = client.join("other-ca.pem");
    std::fs::write(&other_ca, DevCa::generate(TD, DAY).unwrap().cert_pem()).unwrap();

    let (good, wrong_ca) = free_ports().await;
    let template = interop_dir().join("haproxy/haproxy.cfg.in");
    let config = std::fs::read_to_string(&template)
        .unwrap()
        .replace("@GOOD_PORT@", &good.to_string())
        .replace("@WRONG_CA_PORT@", &wrong_ca.to_string())
        .replace("@HBONE_ADDR@", &server.addr.to_string())
        .replace("@CLIENT_PEM@", pem.to_str().unwrap())
        .replace("@BUNDLE@", client.join("bundle.pem").to_str().unwrap())
        .replace("@OTHER_CA@", other_ca.to_str().unwrap());
    assert!(!config.contains('@'), "unfilled placeholder in {config}");
    let config_path = files.dir.path().join("haproxy.cfg");
    std::fs::write(&config_path, &config).unwrap();

    let mut child = Command::new(&haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("could not start haproxy");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        });
    }
    let haproxy_log = || log.lock().unwrap().join("\n");
    // Ready once both frontends accept connections.
    tokio::time::timeout(WAIT, async {
        for port in [good, wrong_ca] {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("haproxy exited ({status}):\n{}\n{config}", haproxy_log());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("haproxy did not listen:\n{}", haproxy_log()));

    // Bulk through the relay, checked by hash.
    let data = payload(1, BULK);
    let body = files.dir.path().join("body");
    std::fs::write(&body, &data).unwrap();
    let out = files.dir.path().join("out");
    let output = curl_through(good, target, &body, &out).await;
    assert!(
        output.status.success(),
        "curl via HAProxy: {}\nHAProxy log:\n{}",
        describe(&output),
        haproxy_log()
    );
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        sha256(&back) == sha256(&data),
        "data corrupted through HAProxy"
    );
    // It went through one HBONE tunnel (hbone speaks only HTTP/2 and
    // refuses a CONNECT with :scheme or :path), and HAProxy logged the
    // CONNECT it relayed.
    let stats = server.stats.snapshot();
    assert_eq!(stats.tunnels_opened, 1, "{stats:?}");
    let connect_line = format!("\"CONNECT {target} HTTP/1.1\"");
    eventually("HAProxy logs the CONNECT", || {
        haproxy_log().contains(&connect_line)
    })
    .await;

    // HAProxy checks our server's chain: trusting another CA, it fails the
    // handshake and answers curl's CONNECT with 503.
    let output = curl_through(wrong_ca, target, &body, &out).await;
    assert!(
        !output.status.success(),
        "a relay with the wrong CA worked: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("503"),
        "{stderr}\nHAProxy log:\n{}",
        haproxy_log()
    );
    let stats = server.stats.clone();
    eventually("hbone counts the refused handshake", || {
        stats.snapshot().handshake_failures >= 1
    })
    .await;
    assert_eq!(server.stats.snapshot().tunnels_opened, 1);
}

// ---------------------------------------------------------------------------
// hbone server -> PROXY v2 -> HAProxy (accept-proxy) -> echo

/// HAProxy reads the PROXY v2 headers the server sends (an IPv4 one, and
/// an IPv6 one for a client on IPv6 reaching an IPv4 target): it takes the
/// connection, names the original client the header carries, and passes
/// the bytes after it through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_reads_the_proxy_v2_headers_the_server_sends() {
    let haproxy = require("haproxy", "haproxy");
    let pki = Pki::new();
    let mut config = hbone::ServerConfig::new(loopback(), pki.server.clone());
    config.proxy_protocol = true;
    let server = start_server(config).await;
    let echo = start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = free_ports().await;
    let config = std::fs::read_to_string(interop_dir().join("haproxy/proxy-v2.cfg.in"))
        .unwrap()
        .replace("@PORT@", &port.to_string())
        .replace("@ECHO_ADDR@", &echo.to_string());
    assert!(!config.contains('@'), "unfilled placeholder in {config}");
    let config_path = dir.path().join("haproxy.cfg");
    std::fs::write(&config_path, &config).unwrap();
    let mut child = Command::new(&haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("could not start haproxy");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let kept = log.clone();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    let haproxy_log = || log.lock().unwrap().join("\n");
    let frontend = SocketAddr::from(([127, 0, 0, 1], port));
    tokio::time::timeout(WAIT, async {
        while TcpStream::connect(frontend).await.is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("haproxy exited ({status}):\n{}\n{config}", haproxy_log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("haproxy did not listen:\n{}", haproxy_log()));

    let dialer = Dialer::new(&pki.client).unwrap();
    let route = hbone::Route::Direct {
        server: server.addr,
        server_ids: vec![pki.server_id.clone()],
    };
    for (original, logged) in [
        (
            "192.0.2.44:5555",
            format!("proxied from 192.0.2.44:5555 to {frontend}"),
        ),
        // Mixed families go as IPv6, the IPv4 destination mapped.
        (
            "[2001:db8::7]:6000",
            format!("proxied from 2001:db8::7:6000 to ::ffff:127.0.0.1:{port}"),
        ),
    ] {
        let request = hbone::TunnelRequest::new(frontend).with_source(original.parse().unwrap());
        let tunnel = tokio::time::timeout(WAIT, dialer.open(&route, &request))
            .await
            .expect("the tunnel opens in time")
            .unwrap();
        let text = format!("from {original}");
        let back = tokio::time::timeout(WAIT, echo_roundtrip(tunnel, text.as_bytes()))
            .await
            .expect("the echo ends in time")
            .unwrap();
        assert_eq!(
            back,
            text.as_bytes(),
            "through HAProxy, the header taken off:\n{}",
            haproxy_log()
        );
        eventually("HAProxy logs the client from the header", || {
            log.lock().unwrap().iter().any(|line| line == &logged)
        })
        .await;
    }
    assert_eq!(server.stats.snapshot().tunnels_opened, 2);
}
