//! The `hbone` binary end to end: CA, server, forward, connect and socks5
//! as separate processes, with certificates written by `hbone ca`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_hbone");
pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

pub(crate) fn hbone(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).kill_on_drop(true).env_remove("RUST_LOG");
    command
}

pub(crate) async fn run_ok(args: &[&str]) -> String {
    let output = hbone(args).output().await.unwrap();
    assert!(
        output.status.success(),
        "hbone {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ca init` plus a client and a server certificate in `dir`.
pub(crate) async fn make_pki(dir: &Path) {
    issue_with_cli(dir, &[(SERVER_ID, "server"), (CLIENT_ID, "client")]).await;
}

/// Starts a long-running subcommand and returns it with the address it
/// reports in its "ready" log line (so `--listen 127.0.0.1:0` works).
pub(crate) async fn spawn_ready(args: &[&str]) -> (Child, SocketAddr) {
    let (child, addr, _) = spawn_logged(args).await;
    (child, addr)
}

/// Log lines a subcommand has written so far.
pub(crate) type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`spawn_ready`], keeping every later log line.
pub(crate) async fn spawn_logged(args: &[&str]) -> (Child, SocketAddr, Log) {
    spawn_logged_with_env(args, &[]).await
}

/// [`spawn_logged`] with `env` added to its environment.
pub(crate) async fn spawn_logged_with_env(
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> (Child, SocketAddr, Log) {
    let mut child = hbone(args)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Log::default();
    let kept = log.clone();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            kept.lock().unwrap().push(line.clone());
            if line.contains("ready") {
                let listen = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("listen="))
                    .unwrap_or_else(|| panic!("no listen= in {line:?}"));
                return listen.parse::<SocketAddr>().unwrap();
            }
        }
        panic!("hbone {args:?} exited before it was ready");
    })
    .await
    .expect("subcommand did not become ready");
    // Keep draining its log so it never blocks on a full pipe.
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    (child, addr, log)
}

/// The first `count` lines of `log` containing `wanted`, waiting up to
/// 10 s for them.
pub(crate) async fn log_lines(log: &Log, wanted: &str, count: usize) -> Vec<String> {
    let find = || {
        let lines = log.lock().unwrap();
        let found: Vec<String> = lines
            .iter()
            .filter(|l| l.contains(wanted))
            .cloned()
            .collect();
        (found.len() >= count).then(|| found[..count].to_vec())
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(lines) = find() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not {count} {wanted:?} in the log: {:?}",
            log.lock().unwrap()
        )
    })
}

/// `hbone forward` with the client identity under `dir`, to `target`
/// through the server at `server`.
async fn spawn_forward(dir: &Path, server: SocketAddr, target: SocketAddr) -> (Child, SocketAddr) {
    spawn_ready(&[
        "forward",
        "--identity-dir",
        &path(dir, "client"),
        "--listen",
        "127.0.0.1:0",
        "--server",
        &server.to_string(),
        "--server-id",
        SERVER_ID,
        "--target",
        &target.to_string(),
    ])
    .await
}

pub(crate) fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_server_forward_connect_and_socks5() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca/ca-key.pem", "server/key.pem", "client/key.pem"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key} must be private");
        }
    }
    let echo = start_echo().await;
    let echo_s = echo.to_string();
    let server_dir = path(dir.path(), "server");
    let client_dir = path(dir.path(), "client");

    let (_server, server) = spawn_ready(&[
        "server",
        "--identity-dir",
        &server_dir,
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let server_s = server.to_string();

    // forward: a plain TCP client through a local port; the server and
    // the target named by host name, resolved for each connection.
    let (_forward, forward, forward_log) = spawn_logged(&[
        "forward",
        "--identity-dir",
        &client_dir,
        "--listen",
        "127.0.0.1:0",
        "--server",
        &format!("localhost:{}", server.port()),
        "--server-id",
        SERVER_ID,
        "--target",
        &format!("localhost:{}", echo.port()),
    ])
    .await;
    // Its startup line says where tunnels go in words, not Rust's Debug.
    let ready = log_lines(&forward_log, "forward ready", 1).await;
    assert!(
        ready[0].contains(&format!(
            "route=server localhost:{} ({SERVER_ID}) -> target localhost:{}",
            server.port(),
            echo.port()
        )),
        "{ready:?}"
    );
    assert!(
        !ready[0].contains('{') && !ready[0].contains("SpiffeId("),
        "{ready:?}"
    );
    let data = payload(3, 4 << 20);
    let back = echo_roundtrip(TcpStream::connect(forward).await.unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    // connect: stdin to the target, the answer on stdout.
    let mut connect = hbone(&[
        "connect",
        "--cert",
        &path(dir.path(), "client/cert.pem"),
        "--key",
        &path(dir.path(), "client/key.pem"),
        "--trust-bundle",
        &path(dir.path(), "client/bundle.pem"),
        "--server",
        &server_s,
        "--server-id",
        SERVER_ID,
        "--target",
        &echo_s,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = connect.stdin.take().unwrap();
    stdin.write_all(b"through stdin and back").await.unwrap();
    drop(stdin); // EOF half-closes the tunnel
    let output = tokio::time::timeout(Duration::from_secs(20), connect.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"through stdin and back");

    // socks5, with every tunnel sent to our server (named).
    let (_socks, socks) = spawn_ready(&[
        "socks5",
        "--identity-dir",
        &client_dir,
        "--listen",
        "127.0.0.1:0",
        "--server",
        &format!("LocalHost.:{}", server.port()),
        "--server-id",
        SERVER_ID,
    ])
    .await;
    let mut client = socks5_connect(socks, echo).await;
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    let back = echo_roundtrip(client, b"via socks5").await.unwrap();
    assert_eq!(back, b"via socks5");

    // Not allowed by the server's default policy: reply 2, nothing dialled.
    let mut client = socks5_connect(socks, "192.0.2.1:80".parse().unwrap()).await;
    assert_eq!(read_reply(&mut client).await, 2, "not allowed");
    // Nothing listening behind the server: reply 5.
    let mut client = socks5_connect(socks, closed_port().await).await;
    assert_eq!(read_reply(&mut client).await, 5, "connection refused");
    // BIND is not supported: reply 7.
    let mut client = socks5_greet(socks).await;
    client
        .write_all(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
        .await
        .unwrap();
    assert_eq!(read_reply(&mut client).await, 7, "command not supported");
    // A domain name is resolved by the entry and its addresses tried.
    let mut client = socks5_greet(socks).await;
    client
        .write_all(
            &[
                &[5u8, 1, 0, 3, 9][..],
                b"localhost",
                &echo.port().to_be_bytes(),
            ]
            .concat(),
        )
        .await
        .unwrap();
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    let back = echo_roundtrip(client, b"by name").await.unwrap();
    assert_eq!(back, b"by name");
    // A client that sends its greeting, its request and its first bytes
    // at once, without waiting for the replies, gets them all through.
    let mut client = TcpStream::connect(socks).await.unwrap();
    let SocketAddr::V4(echo_v4) = echo else {
        panic!("the echo listens on IPv4")
    };
    let mut burst = vec![5u8, 1, 0, 5, 1, 0, 1];
    burst.extend_from_slice(&echo_v4.ip().octets());
    burst.extend_from_slice(&echo.port().to_be_bytes());
    burst.extend_from_slice(b"early bytes");
    client.write_all(&burst).await.unwrap();
    let mut choice = [0u8; 2];
    within(PEER_WAIT, "client: choice", client.read_exact(&mut choice))
        .await
        .unwrap();
    assert_eq!(choice, [5, 0]);
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    let mut early = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut early))
        .await
        .expect("the early bytes come back through the tunnel")
        .unwrap();
    assert_eq!(&early, b"early bytes");
    // A name that does not resolve: host unreachable (4).
    let mut client = socks5_greet(socks).await;
    client
        .write_all(&[&[5u8, 1, 0, 3, 15][..], b"nothing.invalid", &[0, 80]].concat())
        .await
        .unwrap();
    assert_eq!(read_reply(&mut client).await, 4, "host unreachable");
    // Something that is no host name: address type not supported (8).
    let mut client = socks5_greet(socks).await;
    client
        .write_all(&[&[5u8, 1, 0, 3, 8][..], b"not a/na", &[0, 80]].concat())
        .await
        .unwrap();
    assert_eq!(
        read_reply(&mut client).await,
        8,
        "address type not supported"
    );
    // A client offering only username/password auth is turned away.
    let mut client = TcpStream::connect(socks).await.unwrap();
    client.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    within(PEER_WAIT, "client: choice", client.read_exact(&mut choice))
        .await
        .unwrap();
    assert_eq!(choice, [5, 0xff]);
}

/// Without `--server`, the SOCKS5 entry sends each tunnel to port 15008
/// of the requested address, as Istio ambient does: a server on
/// 127.0.0.2:15008 (an address no other test uses) carries a tunnel to an
/// echo on 127.0.0.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_sends_each_tunnel_to_port_15008_of_its_target() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo_listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let echo = echo_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo_listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let (_server, server) = spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.2:15008",
    ])
    .await;
    assert_eq!(server.port(), 15008);
    let (_socks, socks) = spawn_ready(&[
        "socks5",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--listen",
        "127.0.0.1:0",
        "--server-id",
        SERVER_ID,
    ])
    .await;
    let mut client = socks5_connect(socks, echo).await;
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    assert_eq!(
        echo_roundtrip(client, b"to 15008 of the target")
            .await
            .unwrap(),
        b"to 15008 of the target"
    );
}

async fn socks5_greet(socks: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(socks).await.unwrap();
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    within(PEER_WAIT, "client: choice", client.read_exact(&mut choice))
        .await
        .unwrap();
    assert_eq!(choice, [5, 0]);
    client
}

async fn socks5_connect(socks: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut client = socks5_greet(socks).await;
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 only here")
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    client.write_all(&request).await.unwrap();
    client
}

pub(crate) async fn read_reply(client: &mut TcpStream) -> u8 {
    let mut reply = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[0], 5);
    reply[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exits_zero_and_reports() {
    let output = hbone(&["demo"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("client verified the server as spiffe://cluster.local/ns/demo/sa/server")
    );
    assert!(
        stdout.contains("server verified the client as spiffe://cluster.local/ns/demo/sa/client")
    );
    assert!(stdout.contains("every byte checked"));
    assert!(stdout.contains("refused"));
}

/// A listen address that is taken is refused with a hint that covers both
/// ways it can be taken: a process listening on it, or a connection that
/// holds it as its local port (which a list of listeners does not show).
#[tokio::test]
async fn a_taken_listen_address_gets_a_hint_that_covers_connections() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    // A connection whose local port nothing listens on.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let held = socket.local_addr().unwrap();
    let _connection = socket.connect(peer.local_addr().unwrap()).await.unwrap();
    let listen = held.to_string();
    let identity = path(dir.path(), "server");
    let output = hbone(&["server", "--identity-dir", &identity, "--listen", &listen])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {listen}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: another socket holds that address: a process listening on it")
            && stderr.contains("a connection that took it as its local port"),
        "{stderr}"
    );
}

#[tokio::test]
async fn operator_mistakes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = path(dir.path(), "nowhere");

    let output = hbone(&["server", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--identity-dir"));

    let output = hbone(&["server", "--identity-dir", &missing])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nowhere/cert.pem"), "{stderr}");
    assert!(
        stderr.contains("hint: check the path; `hbone ca init`"),
        "{stderr}"
    );

    // Values that would refuse everything, or write an expired certificate.
    for (args, needle) in [
        (&["server", "--max-streams", "0"][..], "--max-streams"),
        (
            &["server", "--max-control-frames", "0"],
            "--max-control-frames",
        ),
        (
            &["gateway", "--control-frame-window", "0s"],
            "a window of zero would count nothing",
        ),
        (
            &["server", "--max-tunnels", "0"],
            "0 would refuse everything",
        ),
        (
            &["server", "--max-connections", "0"],
            "0 would refuse everything",
        ),
        (
            &["server", "--max-connections-per-ip", "0"],
            "0 would refuse everything",
        ),
        (
            &[
                "ca", "issue", "--ca", "x", "--id", CLIENT_ID, "--out", "y", "--days", "0",
            ],
            "--days",
        ),
        (&["ca", "init", "--out", "x", "--days", "0"], "--days"),
        // Addresses: what is expected, with examples.
        (
            &[
                "forward",
                "--identity-dir",
                "x",
                "--listen",
                "127.0.0.1:0",
                "--server-id",
                SERVER_ID,
                "--server",
                "10.0.0.2",
                "--target",
                "127.0.0.1:80",
            ],
            "expected HOST:PORT, e.g. 127.0.0.1:8080",
        ),
        (
            &["server", "--listen", "localhost:15008"],
            "expected IP:PORT, e.g. 127.0.0.1:8080",
        ),
    ] {
        let output = hbone(args).output().await.unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }

    let output = hbone(&[
        "ca", "issue", "--ca", &missing, "--id", CLIENT_ID, "--out", &missing,
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("ca-cert.pem"));

    let output = hbone(&[
        "server",
        "--identity-dir",
        &missing,
        "--allow-target",
        "10.0.0.1/8",
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("host bits"));

    // A key that does not belong to the certificate.
    make_pki(dir.path()).await;
    std::fs::copy(
        dir.path().join("client/key.pem"),
        dir.path().join("server/key.pem"),
    )
    .unwrap();
    let output = hbone(&["server", "--identity-dir", &path(dir.path(), "server")])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not belong"));

    // A fatal error is the last line printed, after what was logged, and a
    // broken policy file is named with its line, on one line.
    let broken_routes = dir.path().join("r3.toml");
    std::fs::write(
        &broken_routes,
        "[[route]]\nhost = \"echo\"\nendpoints = []\n",
    )
    .unwrap();
    let broken_policy = dir.path().join("p3.toml");
    std::fs::write(&broken_policy, "[[rule]]\nto = [\"10.0.0.0/8\"\n").unwrap();
    for (args, needle) in [
        (
            vec!["gateway", "--routes", broken_routes.to_str().unwrap()],
            "needs at least one endpoint",
        ),
        (
            vec!["server", "--policy", broken_policy.to_str().unwrap()],
            "p3.toml: line ",
        ),
    ] {
        let identity = path(dir.path(), "client");
        let mut full = vec!["--log", "info"];
        full.extend(&args);
        full.extend(["--identity-dir", identity.as_str()]);
        let output = hbone(&full).output().await.unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("hint:")).collect();
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{stderr}"
        );
        assert!(
            stderr.contains("identity loaded"),
            "logged before: {stderr}"
        );
    }

    // A missing policy file gets a hint about paths, not about the CA.
    let output = hbone(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--policy",
        &path(dir.path(), "missing-policy.toml"),
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing-policy.toml"), "{stderr}");
    assert!(stderr.contains("hint: check the path, and"), "{stderr}");
    assert!(!stderr.contains("ca init"), "{stderr}");

    // Refuses to overwrite a CA key.
    let output = hbone(&["ca", "init", "--out", &path(dir.path(), "ca")])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("refusing to overwrite"));

    // Issuing for another trust domain than the CA's.
    let output = hbone(&[
        "ca",
        "issue",
        "--ca",
        &path(dir.path(), "ca"),
        "--id",
        "spiffe://elsewhere/ns/a/sa/b",
        "--out",
        &missing,
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("trust domain"));
}

/// The gateway's identity in the double HBONE tests.
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";

/// Issues a gateway identity under `dir` (which `make_pki` filled),
/// starts `hbone gateway` routing `echo.demo.svc.cluster.local` to
/// `server`, and a forward to `target` through it with `extra` flags.
/// Returns the gateway and its address, the forward and its address.
async fn forward_through_gateway(
    dir: &Path,
    server: SocketAddr,
    target: &str,
    extra: &[&str],
) -> (Child, SocketAddr, Child, SocketAddr) {
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir, "ca"),
        "--id",
        GATEWAY_ID,
        "--out",
        &path(dir, "gateway"),
    ])
    .await;
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nendpoints = [\"{server}\"]\n"),
    )
    .unwrap();
    let (gateway_child, gateway) = spawn_ready(&[
        "gateway",
        "--identity-dir",
        &path(dir, "gateway"),
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
    ])
    .await;
    let (gateway_addr, client) = (gateway.to_string(), path(dir, "client"));
    let mut args = vec![
        "forward",
        "--identity-dir",
        &client,
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        &gateway_addr,
        "--gateway-id",
        GATEWAY_ID,
        "--service",
        "echo.demo.svc.cluster.local:8080",
        "--server-id",
        SERVER_ID,
        "--target",
        target,
    ];
    args.extend(extra);
    let (forward_child, forward) = spawn_ready(&args).await;
    (gateway_child, gateway, forward_child, forward)
}

/// `--network` names the client's network on the inner CONNECT of double
/// HBONE, as ztunnel sends `x-forwarded-network`. The final server here is
/// a bare TLS and HTTP/2 server that records each CONNECT's headers and
/// echoes the stream, so the header is seen as it arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_flag_reaches_the_final_server_on_the_inner_connect() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let identity = hbone::Identity::from_dir(dir.path().join("server")).unwrap();
    let acceptor = raw_tls_acceptor(&identity);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let server = listener.local_addr().unwrap();
    let (seen, mut headers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let _ = seen.send(request.headers().clone());
                    let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                        continue;
                    };
                    let stream = stream_as_io(send, request.into_body());
                    tokio::spawn(async move {
                        let (mut from, mut to) = tokio::io::split(stream);
                        let _ = tokio::io::copy(&mut from, &mut to).await;
                        let _ = to.shutdown().await;
                    });
                }
            });
        }
    });
    let (_gateway, _, _forward, forward) = forward_through_gateway(
        dir.path(),
        server,
        "127.0.0.1:8080",
        &["--network", "west-net"],
    )
    .await;
    let stream = TcpStream::connect(forward).await.unwrap();
    let back = within(
        PEER_WAIT,
        "the echo",
        echo_roundtrip(stream, b"across networks"),
    )
    .await
    .unwrap();
    assert_eq!(back, b"across networks");
    let inner = within(PEER_WAIT, "the inner CONNECT", headers.recv())
        .await
        .unwrap();
    assert_eq!(
        inner.get("x-forwarded-network").map(|v| v.as_bytes()),
        Some(&b"west-net"[..]),
        "{inner:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_hbone_through_hbone_gateway() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let services = dir.path().join("services.toml");
    let services_table = |name: &str| {
        format!(
            "[[service]]\nhost = \"{name}\"\nports = {{ 8080 = {} }}\n",
            echo.port()
        )
    };
    std::fs::write(&services, services_table("echo.demo.svc.cluster.local")).unwrap();
    let (_server, server) = spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--services",
        services.to_str().unwrap(),
    ])
    .await;
    let (_gateway, gateway, _forward, forward) =
        forward_through_gateway(dir.path(), server, &echo.to_string(), &[]).await;
    let data = payload(11, 1 << 20);
    let back = echo_roundtrip(TcpStream::connect(forward).await.unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    // As ztunnel does it: both CONNECTs name the service, and the inner
    // one is resolved by the server's services table.
    let client = hbone::Identity::from_dir(dir.path().join("client")).unwrap();
    let outer = raw_h2_over(raw_tls(gateway, Some(&client)).await.unwrap()).await;
    let inner_over_gateway = |service: &'static str| {
        let outer = outer.clone();
        let client = client.clone();
        async move {
            let (status, stream) = raw_connect(&outer, service).await;
            assert_eq!(status, 200, "the gateway routes {service}");
            let connector = tokio_rustls::TlsConnector::from(raw_client_config(Some(&client)));
            let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
            let tls = tokio::time::timeout(
                Duration::from_secs(10),
                connector.connect(name, stream.unwrap()),
            )
            .await
            .expect("inner handshake stalled")
            .unwrap();
            raw_h2_over(tls).await
        }
    };
    let inner = inner_over_gateway("echo.demo.svc.cluster.local:8080").await;
    let (status, tunnel) = raw_connect(&inner, "echo.demo.svc.cluster.local:8080").await;
    assert_eq!(status, 200);
    let back = echo_roundtrip(tunnel.unwrap(), &data).await.unwrap();
    assert_eq!(sha256(&back), sha256(&data));
    let (status, _) = raw_connect(&inner, "other.demo.svc.cluster.local:8080").await;
    assert_eq!(status, 503, "not in the services table");

    // The services table reloads when the file changes.
    std::fs::write(&services, services_table("other.demo.svc.cluster.local")).unwrap();
    let reloaded = async {
        loop {
            if raw_connect(&inner, "other.demo.svc.cluster.local:8080")
                .await
                .0
                == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reloaded)
        .await
        .expect("the new services table must take effect");

    // A bad services table is one clear error naming the file and line.
    std::fs::write(&services, "[[service]]\nhost = \"a b\"\n").unwrap();
    let output = hbone(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--services",
        services.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("services.toml, line 1") && stderr.contains("not a host name"),
        "{stderr}"
    );

    // A bad routing table is one clear error naming the file.
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nhost = \"x\"\nendpoints = [\"not-an-ip\"]\n",
    )
    .unwrap();
    let output = hbone(&[
        "gateway",
        "--identity-dir",
        &path(dir.path(), "gateway"),
        "--routes",
        routes.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("routes.toml") && stderr.contains("not-an-ip"),
        "{stderr}"
    );
}

/// `hbone connect` and `hbone forward` close their pooled connections
/// before they exit: the gateway's outer tunnel, which carried the inner
/// connection, ends normally instead of with a lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_through_a_gateway_end_the_outer_tunnel_normally() {
    let dir = tempfile::tempdir().unwrap();
    let gateway_id = "spiffe://cluster.local/ns/istio-system/sa/gateway";
    issue_with_cli(
        dir.path(),
        &[
            (SERVER_ID, "server"),
            (CLIENT_ID, "client"),
            (gateway_id, "gateway"),
        ],
    )
    .await;
    let echo = start_echo().await;
    let (_server, server, server_log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[route]]\nhost = \"echo.demo.svc.cluster.local\"\nendpoints = [\"{server}\"]\n"),
    )
    .unwrap();
    let (_gateway, gateway, gateway_log) = spawn_logged(&[
        "gateway",
        "--identity-dir",
        &path(dir.path(), "gateway"),
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
    ])
    .await;
    let mut connect = hbone(&[
        "connect",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--gateway",
        &gateway.to_string(),
        "--gateway-id",
        gateway_id,
        "--service",
        "echo.demo.svc.cluster.local:8080",
        "--server-id",
        SERVER_ID,
        "--target",
        &echo.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = connect.stdin.take().unwrap();
    stdin.write_all(b"through the gateway").await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(20), connect.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(output.stdout, b"through the gateway");

    // And `hbone forward` when it stops on SIGTERM.
    let (mut forward, forward_addr, forward_log) = spawn_logged(&[
        "forward",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        &gateway.to_string(),
        "--gateway-id",
        gateway_id,
        "--service",
        "echo.demo.svc.cluster.local:8080",
        "--server-id",
        SERVER_ID,
        "--target",
        &echo.to_string(),
    ])
    .await;
    let app = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(forward_addr))
        .await
        .unwrap()
        .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(app, b"forwarded"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"forwarded");
    terminate(&forward);
    let status = tokio::time::timeout(Duration::from_secs(10), forward.wait())
        .await
        .expect("forward exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Its startup line names the route in words, and each phase of the
    // drain has its line.
    let ready = log_lines(&forward_log, "forward ready", 1).await;
    assert!(
        ready[0].contains(&format!(
            "route=gateway {gateway} ({gateway_id}) to echo.demo.svc.cluster.local:8080 ({SERVER_ID})"
        )),
        "{ready:?}"
    );
    log_lines(&forward_log, "draining: stopped accepting", 1).await;
    log_lines(&forward_log, "drained: every tunnel finished", 1).await;

    for (who, log) in [("gateway", &gateway_log), ("server", &server_log)] {
        for line in log_lines(log, "tunnel closed", 2).await {
            assert!(line.contains("result=done"), "{who}: {line}");
        }
    }
}

fn terminate(child: &Child) {
    send_signal(child, libc::SIGTERM);
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = child.id().expect("child is running") as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() {
    drains_then_exits_zero(libc::SIGTERM).await;
}

/// Ctrl-C is a stop request like SIGTERM: the same drain, the same exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    drains_then_exits_zero(libc::SIGINT).await;
}

async fn drains_then_exits_zero(signal: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (mut server, server_addr) = spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let (_forward, forward) = spawn_forward(dir.path(), server_addr, echo).await;
    let mut app = TcpStream::connect(forward).await.unwrap();
    app.write_all(b"open ").await.unwrap();
    let mut buf = [0u8; 5];
    within(PEER_WAIT, "app: buf", app.read_exact(&mut buf))
        .await
        .unwrap();

    send_signal(&server, signal);
    refuses_connections_soon(server_addr).await;
    assert!(
        server.try_wait().unwrap().is_none(),
        "still serving the open tunnel"
    );
    app.write_all(b"still flowing").await.unwrap();
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(PEER_WAIT, "app: rest", app.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(rest, b"still flowing");
    drop(app);
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits once drained")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Waits until `addr` refuses connections, as a draining listener does.
async fn refuses_connections_soon(addr: SocketAddr) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no new connections while draining");
}

/// A second SIGTERM during a drain exits at once (status 130), without
/// waiting for the open tunnel or the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (mut server, server_addr, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "1h",
    ])
    .await;
    let (_forward, forward) = spawn_forward(dir.path(), server_addr, echo).await;
    let mut app = TcpStream::connect(forward).await.unwrap();
    app.write_all(b"open ").await.unwrap();
    let mut buf = [0u8; 5];
    within(PEER_WAIT, "app: buf", app.read_exact(&mut buf))
        .await
        .unwrap();

    terminate(&server);
    log_lines(&log, "draining", 1).await;
    assert!(server.try_wait().unwrap().is_none(), "draining, not gone");
    terminate(&server);
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("a second signal exits at once, whatever is open")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_drain_timeout_is_accepted_and_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let (mut server, _) = spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "0s",
    ])
    .await;
    terminate(&server);
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (mut server, server_addr, server_log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--drain-timeout",
        "300ms",
    ])
    .await;
    let (_forward, forward) = spawn_forward(dir.path(), server_addr, echo).await;
    let mut app = TcpStream::connect(forward).await.unwrap();
    app.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    within(PEER_WAIT, "app: buf", app.read_exact(&mut buf))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    terminate(&server);
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits at the deadline")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The deadline in seconds, not as Rust's Debug of a Duration.
    let draining = log_lines(&server_log, "draining", 1).await;
    assert!(draining[0].contains("deadline_s=0.3"), "{draining:?}");
    // The tunnel that outlived the deadline is closed, not left hanging.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the application must see its tunnel end");
    // And the tunnel cut at the deadline has its access record.
    let closed = log_lines(&server_log, "tunnel closed", 1).await;
    assert!(
        closed[0].contains("result=drain_deadline") && closed[0].contains("sent=1"),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_check_test_and_live_reload() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let policy = dir.path().join("policy.toml");
    let allow = format!(
        "[[rule]]\nname = \"client to echo\"\nfrom = [\"{CLIENT_ID}\"]\nto = [\"{echo}\"]\n"
    );
    let deny = format!("{allow}\n[[rule]]\nname = \"closed for maintenance\"\naction = \"deny\"\n");
    std::fs::write(&policy, &allow).unwrap();
    let policy_s = policy.to_str().unwrap().to_owned();

    let checked = run_ok(&["policy", "check", &policy_s]).await;
    assert!(checked.contains("1 rule(s), valid"), "{checked}");
    let tested = run_ok(&[
        "policy",
        "test",
        &policy_s,
        "--id",
        CLIENT_ID,
        "--target",
        &echo.to_string(),
    ])
    .await;
    assert!(
        tested.contains("allow: rule \"client to echo\""),
        "{tested}"
    );
    let denied = hbone(&[
        "policy",
        "test",
        &policy_s,
        "--id",
        SERVER_ID,
        "--target",
        &echo.to_string(),
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(denied.status.code(), Some(1));
    // Rules may name the service a CONNECT asked for.
    let by_name = dir.path().join("by-name.toml");
    std::fs::write(
        &by_name,
        "[[rule]]\nname = \"echo by name\"\nto = [\"echo.demo.svc.cluster.local:8080\"]\n",
    )
    .unwrap();
    let by_name = by_name.to_str().unwrap();
    let named = [
        "policy",
        "test",
        by_name,
        "--id",
        CLIENT_ID,
        "--target",
        "10.0.0.7:8080",
    ];
    let tested = run_ok(
        &[
            &named[..],
            &["--service", "echo.demo.svc.cluster.local:8080"],
        ]
        .concat(),
    )
    .await;
    assert!(tested.contains("allow: rule \"echo by name\""), "{tested}");
    let unnamed = hbone(&named).output().await.unwrap();
    assert_eq!(
        unnamed.status.code(),
        Some(1),
        "the address alone matches no rule"
    );
    assert!(
        String::from_utf8_lossy(&unnamed.stdout).contains("(source 127.0.0.1 assumed"),
        "the default source is said"
    );

    // With rules on source networks, the source must be given, and a wrong
    // one is named as the reason.
    let office = dir.path().join("office.toml");
    std::fs::write(
        &office,
        format!(
            "[[rule]]\nname = \"office\"\nfrom = [\"{CLIENT_ID}\"]\nsource = [\"192.0.2.0/24\"]\n"
        ),
    )
    .unwrap();
    let office = office.to_str().unwrap();
    let base = [
        "policy",
        "test",
        office,
        "--id",
        CLIENT_ID,
        "--target",
        "10.1.2.3:5432",
    ];
    let output = hbone(&base).output().await.unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("give --source IP"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outside = hbone(&[&base[..], &["--source", "10.0.0.5"]].concat())
        .output()
        .await
        .unwrap();
    assert_eq!(outside.status.code(), Some(1));
    let said = String::from_utf8_lossy(&outside.stdout);
    assert!(said.contains("deny: source 10.0.0.5 is outside"), "{said}");
    let inside = run_ok(&[&base[..], &["--source", "192.0.2.7"]].concat()).await;
    assert!(inside.contains("allow: rule \"office\""), "{inside}");

    // A policy that allows nothing says so.
    let nothing = dir.path().join("nothing.toml");
    std::fs::write(&nothing, "").unwrap();
    let checked = run_ok(&["policy", "check", nothing.to_str().unwrap()]).await;
    assert!(checked.contains("allows nothing"), "{checked}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rule]]\nname = \"x\"\nto = [\"10.0.0.1/8\"]\n").unwrap();
    let output = hbone(&["policy", "check", bad.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml, line 3") && stderr.contains("host bits"),
        "{stderr}"
    );

    let (_server, server, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--policy",
        &policy_s,
    ])
    .await;
    let client = hbone::Identity::from_dir(dir.path().join("client")).unwrap();
    let dialer = hbone::Dialer::new(&client).unwrap();
    let server_id = hbone::SpiffeId::parse(SERVER_ID).unwrap();
    let tunnel = dialer
        .connect(server, std::slice::from_ref(&server_id), echo)
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tunnel, b"allowed").await.unwrap(),
        b"allowed"
    );

    // Deny everything: in force within the 2 s reload period.
    std::fs::write(&policy, &deny).unwrap();
    let denied_soon = async {
        loop {
            match dialer
                .connect(server, std::slice::from_ref(&server_id), echo)
                .await
            {
                Err(hbone::DialError::Status { status, .. }) if status.as_u16() == 403 => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), denied_soon)
        .await
        .expect("the new policy must take effect");

    // A broken file keeps the last good policy: still denied.
    std::fs::write(&policy, "[[rule]\n").unwrap();
    log_lines(&log, "policy not reloaded", 1).await;
    match dialer
        .connect(server, std::slice::from_ref(&server_id), echo)
        .await
    {
        Err(hbone::DialError::Status { status, .. }) => assert_eq!(status.as_u16(), 403),
        other => panic!(
            "expected the old policy (403), got {:?}",
            other.map(|_| "a tunnel")
        ),
    }
}

/// The leaf certificate a server presents to a new connection.
pub(crate) async fn presented_cert(server: SocketAddr) -> Vec<u8> {
    let tls = raw_tls(server, None).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

pub(crate) fn leaf_der(cert_pem: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(cert_pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_picks_up_rotated_files_and_refuses_a_mismatched_pair() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let server_dir = dir.path().join("server");
    let (_server, server, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        server_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let original = leaf_der(&server_dir.join("cert.pem"));
    assert_eq!(presented_cert(server).await, original);

    // A renewed certificate arrives before its key: refused, old one kept.
    let renewed = dir.path().join("renewed");
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir.path(), "ca"),
        "--id",
        SERVER_ID,
        "--out",
        renewed.to_str().unwrap(),
    ])
    .await;
    std::fs::copy(renewed.join("cert.pem"), server_dir.join("cert.pem")).unwrap();
    log_lines(&log, "identity not reloaded", 1).await;
    assert_eq!(
        presented_cert(server).await,
        original,
        "a mismatched pair must not be used"
    );

    // The key follows: the renewed certificate is in use for new handshakes.
    std::fs::copy(renewed.join("key.pem"), server_dir.join("key.pem")).unwrap();
    let expected = leaf_der(&renewed.join("cert.pem"));
    let picked_up = async {
        while presented_cert(server).await != expected {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), picked_up)
        .await
        .expect("the server must rotate to the renewed certificate");
}

/// SIGHUP reloads the identity by itself: the renewed files are put in
/// place with their old modification times, so the 2 s poll sees no
/// change and only the signal can have loaded them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let server_dir = dir.path().join("server");
    let (server_child, server, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        server_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let renewed = dir.path().join("renewed");
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir.path(), "ca"),
        "--id",
        SERVER_ID,
        "--out",
        renewed.to_str().unwrap(),
    ])
    .await;
    for file in ["cert.pem", "key.pem"] {
        let target = server_dir.join(file);
        let stamp = std::fs::metadata(&target).unwrap().modified().unwrap();
        std::fs::copy(renewed.join(file), &target).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_modified(stamp)
            .unwrap();
    }
    let pid = server_child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloaded = log_lines(&log, "identity reloaded", 1).await;
    assert!(reloaded[0].contains("SIGHUP"), "{reloaded:?}");
    assert_eq!(
        presented_cert(server).await,
        leaf_der(&renewed.join("cert.pem")),
        "new handshakes use the reloaded certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_record_per_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let mut child = hbone(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_json = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .expect("the server is still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let listen: SocketAddr = loop {
        let event = next_json().await;
        if event["message"] == "HBONE server ready" {
            break event["listen"].as_str().unwrap().parse().unwrap();
        }
    };

    let client = hbone::Identity::from_dir(dir.path().join("client")).unwrap();
    let dialer = hbone::Dialer::new(&client).unwrap();
    let server_id = hbone::SpiffeId::parse(SERVER_ID).unwrap();
    let tunnel = dialer
        .connect(listen, std::slice::from_ref(&server_id), echo)
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tunnel, b"hello").await.unwrap(), b"hello");

    let record = loop {
        let event = next_json().await;
        if event["target"] == "hbone::access" {
            break event;
        }
    };
    assert_eq!(record["message"], "tunnel closed");
    assert_eq!(record["role"], "server");
    assert_eq!(record["peer"], CLIENT_ID);
    assert_eq!(record["identity_source"], "files");
    assert_eq!(record["target_addr"], echo.to_string());
    assert_eq!(record["sent"], 5);
    assert_eq!(record["received"], 5);
    assert_eq!(record["result"], "done");
    assert_eq!(record["trace"].as_str().unwrap().len(), 32, "{record}");
    assert!(record["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    child.kill().await.unwrap();
}

/// Shell completions and the manual page come from the same definition as
/// `--help`: each names every subcommand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_page_cover_every_subcommand() {
    let subcommands = [
        "ca",
        "server",
        "forward",
        "connect",
        "socks5",
        "policy",
        "gateway",
        "demo",
        "bench",
        "run",
        "config",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = run_ok(&["completions", shell]).await;
        for sub in subcommands {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        // And the flags of a subcommand.
        assert!(
            script.contains("identity-dir"),
            "{shell}: no --identity-dir"
        );
    }
    let page = run_ok(&["man"]).await;
    assert!(
        page.starts_with(".ie"),
        "not roff: {}",
        &page[..40.min(page.len())]
    );
    for sub in subcommands {
        let section = format!(".SH \"HBONE {}\"", sub.to_uppercase());
        assert!(page.contains(&section), "man page lacks {section}");
    }
    assert!(
        page.contains(".SH \"HBONE CA ISSUE\""),
        "nested subcommands too"
    );
    let output = hbone(&["completions", "tcsh"]).output().await.unwrap();
    assert!(!output.status.success(), "an unknown shell is refused");
}

/// The long flags of the option lines of one section of a help text
/// ("Options:", "Global options:"), in order.
fn help_flags(help: &str, title: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != title)
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') => rest.split_once(", ")?.1,
                _ => line,
            };
            let flag = line.strip_prefix("--")?;
            let end = flag
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(flag.len());
            Some(flag[..end].to_owned())
        })
        .collect()
}

/// `--help` lists a subcommand's own flags first, then, under their own
/// heading, the flags about the whole process that apply to it: `--admin`
/// (and `--no-sandbox`) only where something serves until stopped,
/// `--threads` where tunnels run, the log flags everywhere. Where they do not apply, clap refuses
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_groups_own_flags_then_the_global_ones_that_apply() {
    let server = run_ok(&["server", "--help"]).await;
    let own = help_flags(&server, "Options:");
    assert!(
        own.contains(&"listen".to_owned()) && own.contains(&"identity-dir".to_owned()),
        "{own:?}"
    );
    // The global options each kind of command offers.
    const SERVING: &[&str] = &[
        "log",
        "log-format",
        "threads",
        "runtime",
        "admin",
        "no-sandbox",
    ];
    const TUNNELLING: &[&str] = &["log", "log-format", "threads", "runtime"];
    const ONE_SHOT: &[&str] = &["log", "log-format"];
    let global = help_flags(&server, "Global options:");
    assert_eq!(global, SERVING, "{server}");
    for flag in &global {
        assert!(!own.contains(flag), "--{flag} among the server's own flags");
    }
    assert!(
        server.find("\nOptions:") < server.find("\nGlobal options:"),
        "the server's own flags come first:\n{server}"
    );

    let cases: [(&[&str], &[&str]); 15] = [
        (&["server"], SERVING),
        (&["gateway"], SERVING),
        (&["forward"], SERVING),
        (&["socks5"], SERVING),
        (&["run"], SERVING),
        (&["connect"], TUNNELLING),
        (&["demo"], TUNNELLING),
        (&["ca", "init"], ONE_SHOT),
        (&["ca", "issue"], ONE_SHOT),
        (&["policy", "check"], ONE_SHOT),
        (&["policy", "test"], ONE_SHOT),
        (&["config", "check"], ONE_SHOT),
        (&["config", "example"], ONE_SHOT),
        (&["completions"], ONE_SHOT),
        (&["man"], ONE_SHOT),
    ];
    for (command, wanted) in cases {
        let help = run_ok(&[command, &["--help"]].concat()).await;
        assert_eq!(
            help_flags(&help, "Global options:"),
            wanted,
            "hbone {command:?} --help"
        );
        if !wanted.contains(&"admin") {
            assert!(
                !help.contains("--admin"),
                "hbone {command:?} --help:\n{help}"
            );
        }
    }

    // Not offered, not accepted.
    let dir = tempfile::tempdir().unwrap();
    let out = path(dir.path(), "ca");
    for refused in [
        &["ca", "init", "--admin", "127.0.0.1:1", "--out", &out][..],
        &["ca", "init", "--threads", "2", "--out", &out],
        &["completions", "bash", "--admin", "127.0.0.1:1"],
    ] {
        let output = hbone(refused).output().await.unwrap();
        assert_eq!(output.status.code(), Some(2), "{refused:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("unexpected argument '--"),
            "{refused:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(!dir.path().join("ca").exists(), "nothing was written");
}

/// A private key readable by others, when allowed, gets one warning naming
/// the file and the fix; an expired certificate is reported once, not
/// twice. (Not allowed, such a key is refused: see entry_access.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_permissions_and_expiry_are_reported_once_each() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let key = dir.path().join("server/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // An expired certificate for the server, from the same CA.
    let ca = hbone::ca::DevCa::load(dir.path().join("ca")).unwrap();
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    ca.issue_any(
        &hbone::SpiffeId::parse(SERVER_ID).unwrap(),
        two_days_ago,
        Duration::from_secs(3600),
    )
    .unwrap()
    .save(dir.path().join("expired"))
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("expired/key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let (_loose, _, loose_log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
        "--allow-insecure-key-permissions",
    ])
    .await;
    let warning = log_lines(&loose_log, "readable by group or others", 1).await;
    assert!(
        warning[0].contains(&format!("chmod 600 {}", key.display())),
        "{warning:?}"
    );

    let (_expired, listen, expired_log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "expired"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    log_lines(&expired_log, "certificate has EXPIRED", 1).await;
    // Once, at load. That the file watcher's first rounds add no second
    // report is shown by the watcher's own unit test, under paused time.
    let _ = TcpStream::connect(listen).await;
    let lines = expired_log.lock().unwrap().clone();
    let reported = lines.iter().filter(|l| l.contains("EXPIRED")).count();
    assert_eq!(reported, 1, "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("readable by group")),
        "a 0600 key gets no warning: {lines:?}"
    );
}

/// An entry drains like a server: on SIGTERM it stops accepting, gives its
/// open tunnels --drain-timeout, then closes them, each phase logged, the
/// tunnel it cut recorded, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_drains_until_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (_server, server) = spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let (mut forward, forward_addr, log) = spawn_logged(&[
        "forward",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--listen",
        "127.0.0.1:0",
        "--server",
        &server.to_string(),
        "--server-id",
        SERVER_ID,
        "--target",
        &echo.to_string(),
        "--drain-timeout",
        "400ms",
    ])
    .await;
    let mut app = TcpStream::connect(forward_addr).await.unwrap();
    app.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    terminate(&forward);
    let status = tokio::time::timeout(Duration::from_secs(10), forward.wait())
        .await
        .expect("the entry exits after its deadline")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    log_lines(&log, "draining: stopped accepting", 1).await;
    log_lines(&log, "drain deadline passed", 1).await;
    let record = log_lines(&log, "tunnel closed", 1).await;
    assert!(record[0].contains("result=drain_deadline"), "{record:?}");
    // No new connection is accepted once it stopped.
    assert!(TcpStream::connect(forward_addr).await.is_err());
}

/// systemd's readiness protocol, read from a Unix datagram socket as
/// systemd would: READY=1 once listening, RELOADING=1 (with the monotonic
/// time) then READY=1 around a SIGHUP reload of `hbone run`, STOPPING=1
/// when the drain starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let socket_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let config = dir.path().join("hbone.toml");
    std::fs::write(
        &config,
        format!(
            "admin = \"off\"\n\n[server]\nidentity-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ndrain-timeout = \"0s\"\n",
            path(dir.path(), "server")
        ),
    )
    .unwrap();
    let mut child = hbone(&["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let next = || async {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(20), notify.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().await.trim(), "READY=1");
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloading = next().await;
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next().await.trim(), "READY=1");
    terminate(&child);
    assert_eq!(next().await.trim(), "STOPPING=1");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The first window a client gets from `hbone server` (with `flags`) on a
/// new stream: CONNECT to an echo target, then ask for 1 MiB.
async fn first_grant(dir: &Path, flags: &[&str]) -> usize {
    let echo = start_echo().await;
    let server_dir = path(dir, "server");
    let mut args = vec![
        "server",
        "--identity-dir",
        &server_dir,
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(flags);
    let (_server, server) = spawn_ready(&args).await;
    let client = hbone::Identity::from_dir(dir.join("client")).unwrap();
    let tls = raw_tls(server, Some(&client)).await.unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(echo.to_string())
        .body(())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server answers CONNECT")
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    stream.reserve_capacity(1 << 20);
    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx));
    tokio::time::timeout(Duration::from_secs(10), granted)
        .await
        .expect("the stream gets window")
        .expect("the stream is open")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_windows_grant_the_largest_window_at_once() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let sized = first_grant(dir.path(), &[]).await;
    assert!(
        sized <= 65_535,
        "sized windows start at 64 KiB, not {sized}"
    );
    let fixed = first_grant(dir.path(), &["--fixed-windows"]).await;
    assert!(fixed > 4 * 65_535, "--fixed-windows granted only {fixed}");
}
