//! Operations end to end, through the `hbone` binary: exact metrics and
//! access-log lines after a known sequence of tunnels, and every admin
//! endpoint, including `/readyz` during a drain.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{
    PEER_WAIT, echo_roundtrip, issue_with_cli, listening_sockets, payload, sha256, start_echo,
    within,
};
use crate::host_tools::{require, root_or_skip};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_hbone");
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

async fn make_pki(dir: &Path) {
    issue_with_cli(dir, &[(SERVER_ID, "server"), (CLIENT_ID, "client")]).await;
}

/// `hbone ARGS --log-format json`, its log on a pipe, killed when dropped.
fn spawn_json(args: &[&str]) -> Child {
    spawn_json_with(Command::new(BIN), args)
}

/// As [`spawn_json`], `hbone` started by `command` (which ends in hbone's
/// path, e.g. `unshare --net ... hbone`).
fn spawn_json_with(mut command: Command, args: &[&str]) -> Child {
    command
        .args(args)
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A running `hbone` with JSON logs, every line kept for inspection.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts `hbone ARGS --log-format json` and waits until it logged
    /// `ready_count` "... ready" lines (listeners plus the admin endpoint).
    async fn start(args: &[&str], ready_count: usize) -> Process {
        Process::start_with(Command::new(BIN), args, ready_count).await
    }

    /// As [`Process::start`], `hbone` started by `command`.
    async fn start_with(command: Command, args: &[&str], ready_count: usize) -> Process {
        let mut child = spawn_json_with(command, args);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                kept.lock().unwrap().push(value);
            }
        });
        let process = Process { child, lines };
        let ready = || {
            process
                .with_message(|m| m.ends_with("ready") || m.starts_with("admin endpoint ready"))
                .len()
        };
        eventually(Duration::from_secs(20), || ready() >= ready_count).await;
        process
    }

    fn with_message(&self, wanted: impl Fn(&str) -> bool) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(&wanted))
            .cloned()
            .collect()
    }

    /// The `listen` address of the line whose message starts with `prefix`.
    fn address(&self, prefix: &str) -> SocketAddr {
        let lines = self.with_message(|m| m.starts_with(prefix));
        lines[0]["listen"].as_str().unwrap().parse().unwrap()
    }

    fn access_records(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["target"] == "hbone::access")
            .cloned()
            .collect()
    }

    fn terminate(&self) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }
}

/// Polls `check` until it holds, failing after `limit`.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request; returns status and body.
async fn http(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_with_headers(admin, method, path).await;
    (status, body)
}

/// One HTTP/1.1 request; returns status, header lines (names lowercased)
/// and body.
async fn http_with_headers(
    admin: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, Vec<(String, String)>, String) {
    let exchange = async {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} {path}"));
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    (status, headers, body.to_owned())
}

/// The values of header `name` (lowercase) among `headers`.
fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A SOCKS5 CONNECT to `target` through `entry`; the reply code and the stream.
async fn socks5(entry: SocketAddr, target: SocketAddr) -> (u8, TcpStream) {
    let mut tcp = TcpStream::connect(entry).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    within(PEER_WAIT, "tcp: choice", tcp.read_exact(&mut choice))
        .await
        .unwrap();
    let SocketAddr::V4(v4) = target else { panic!() };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    within(PEER_WAIT, "tcp: reply", tcp.read_exact(&mut reply))
        .await
        .unwrap();
    (reply[1], tcp)
}

/// The value of the sample `name{labels}` in a scrape, 0 when absent.
fn sample(scrape: &str, name_and_labels: &str) -> u64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// An `istio_tcp_*` series between two workloads without metadata flags:
/// all Istio's labels `unknown` but the principals and the namespaces
/// (from the SPIFFE IDs).
fn istio(metric: &str, reporter: &str, source: &str, destination: &str, flags: &str) -> String {
    let namespace = |id: &str| {
        id.split("/ns/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("unknown")
            .to_owned()
    };
    let (source_ns, destination_ns) = (namespace(source), namespace(destination));
    format!(
        "{metric}{{reporter=\"{reporter}\",\
         source_workload=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",\
         source_workload_namespace=\"{source_ns}\",source_principal=\"{source}\",\
         source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",\
         destination_service=\"unknown\",destination_service_namespace=\"unknown\",destination_service_name=\"unknown\",\
         destination_workload=\"unknown\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",\
         destination_workload_namespace=\"{destination_ns}\",destination_principal=\"{destination}\",\
         destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"unknown\",\
         request_protocol=\"tcp\",response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\"}}"
    )
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    server: Process,
    entry: Process,
    echo: SocketAddr,
}

/// A server allowing 127.0.0.1 only and a SOCKS5 entry, both with admin
/// endpoints on ephemeral ports.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let server_dir = dir.path().join("server");
    let server = Process::start(
        &[
            "server",
            "--identity-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--allow-target",
            "127.0.0.1/32",
            "--admin",
            "127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ],
        2,
    )
    .await;
    let server_addr = server.address("HBONE server ready").to_string();
    let client_dir = dir.path().join("client");
    let entry = Process::start(
        &[
            "socks5",
            "--identity-dir",
            client_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--server",
            &server_addr,
            "--server-id",
            SERVER_ID,
            "--admin",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    Setup {
        _dir: dir,
        server,
        entry,
        echo,
    }
}

/// Identities in `dir`, an echo app, and `dir/hbone.toml` for `hbone run`:
/// the top-level keys `head`, a `[server]` on a free port with the
/// identity in `server/` and the keys `server_keys`, and a `[[forward]]`
/// to the echo app through it. Returns the file, the echo app and the
/// server's address.
async fn write_run_file(
    dir: &Path,
    head: &str,
    server_keys: &str,
) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    make_pki(dir).await;
    let echo = start_echo().await;
    let server_port = closed_port().await;
    let config = dir.join("hbone.toml");
    let text = format!(
        r#"{head}
[server]
identity-dir = "server"
listen = "{server_port}"
{server_keys}
[[forward]]
identity-dir = "client"
listen = "127.0.0.1:0"
server = "{server_port}"
server-id = ["{SERVER_ID}"]
target = "{echo}"
"#
    );
    std::fs::write(&config, text).unwrap();
    (config, echo, server_port)
}

/// Success (4 bytes each way), denied by policy, unreachable target.
async fn known_sequence(entry: SocketAddr, echo: SocketAddr) -> SocketAddr {
    let (reply, mut tunnel) = socks5(entry, echo).await;
    assert_eq!(reply, 0);
    tunnel.write_all(b"ping").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(PEER_WAIT, "tunnel: echoed", tunnel.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, b"ping");

    let denied: SocketAddr = "127.0.0.2:80".parse().unwrap();
    let (reply, _) = socks5(entry, denied).await;
    assert_eq!(reply, 2, "SOCKS5 'not allowed by ruleset'");

    let unreachable = closed_port().await;
    let (reply, _) = socks5(entry, unreachable).await;
    assert_ne!(reply, 0);
    unreachable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_after_a_known_sequence() {
    let setup = setup().await;
    let entry_addr = setup.entry.address("SOCKS5 entry ready");
    let server_admin = setup.server.address("admin endpoint ready");
    let entry_admin = setup.entry.address("admin endpoint ready");
    let unreachable = known_sequence(entry_addr, setup.echo).await;

    // Records are written when tunnels end; wait for all six.
    eventually(Duration::from_secs(10), || {
        setup.server.access_records().len() == 3 && setup.entry.access_records().len() == 3
    })
    .await;

    let (status, server) = http(server_admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let expect = |scrape: &str, metric: &str, reporter: &str, flags: &str, want: u64| {
        let series = istio(metric, reporter, CLIENT_ID, SERVER_ID, flags);
        assert_eq!(sample(scrape, &series), want, "{series} in\n{scrape}");
    };
    expect(
        &server,
        "istio_tcp_connections_opened_total",
        "destination",
        "-",
        1,
    );
    expect(
        &server,
        "istio_tcp_connections_closed_total",
        "destination",
        "-",
        1,
    );
    expect(
        &server,
        "istio_tcp_received_bytes_total",
        "destination",
        "-",
        4,
    );
    expect(&server, "istio_tcp_sent_bytes_total", "destination", "-", 4);
    expect(
        &server,
        "istio_tcp_connections_failed_total",
        "destination",
        "DENY",
        1,
    );
    expect(
        &server,
        "istio_tcp_connections_failed_total",
        "destination",
        "CONNECT",
        1,
    );
    let decisions = |rule: &str, decision: &str| {
        let series =
            format!("hbone_policy_decisions_total{{rule=\"{rule}\",decision=\"{decision}\"}}");
        sample(&server, &series)
    };
    assert_eq!(
        decisions("command line", "allow"),
        2,
        "echo and the closed port"
    );
    assert_eq!(decisions("(no rule allows)", "deny"), 1);
    assert_eq!(
        sample(&server, "hbone_tunnel_setup_seconds_count{role=\"server\"}"),
        1
    );
    assert_eq!(
        sample(
            &server,
            "hbone_tunnel_duration_seconds_count{role=\"server\"}"
        ),
        1
    );
    assert_eq!(
        sample(
            &server,
            "hbone_tls_handshake_seconds_count{role=\"server\",result=\"success\"}"
        ),
        1,
        "one pooled connection carried all three"
    );
    assert_eq!(sample(&server, "hbone_server_connections"), 1);
    assert!(server.contains(&format!(
        "hbone_certificate_expiry_timestamp_seconds{{id=\"{SERVER_ID}\"}} "
    )));
    assert!(server.ends_with("# EOF\n"));

    let (_, entry) = http(entry_admin, "GET", "/metrics").await;
    // The entry reports as the source; a refusal is not seen as a proven
    // peer there, so its failures carry destination "unknown".
    expect(
        &entry,
        "istio_tcp_connections_opened_total",
        "source",
        "-",
        1,
    );
    expect(
        &entry,
        "istio_tcp_connections_closed_total",
        "source",
        "-",
        1,
    );
    expect(&entry, "istio_tcp_received_bytes_total", "source", "-", 4);
    expect(&entry, "istio_tcp_sent_bytes_total", "source", "-", 4);
    for flags in ["DENY", "CONNECT"] {
        let series = istio(
            "istio_tcp_connections_failed_total",
            "source",
            CLIENT_ID,
            "unknown",
            flags,
        );
        assert_eq!(sample(&entry, &series), 1, "{series} in\n{entry}");
    }
    let pool = format!("hbone_pool_connections{{destination_principal=\"{SERVER_ID}\"}}");
    assert_eq!(sample(&entry, &pool), 1);
    let streams = format!("hbone_pool_streams{{destination_principal=\"{SERVER_ID}\"}}");
    assert_eq!(sample(&entry, &streams), 0);

    // The access log: one line per tunnel, field by field.
    let records = setup.server.access_records();
    let echo = setup.echo.to_string();
    let ok = &records[0];
    assert_eq!(ok["message"], "tunnel closed");
    assert_eq!(ok["role"], "server");
    assert_eq!(ok["peer"], CLIENT_ID);
    assert_eq!(ok["local"], SERVER_ID);
    assert_eq!(ok["target_addr"], echo.as_str());
    assert_eq!(ok["sent"], 4);
    assert_eq!(ok["received"], 4);
    assert_eq!(ok["result"], "done");
    assert_eq!(ok["trace"].as_str().unwrap().len(), 32, "trace id");
    assert!(
        ok["original"].as_str().unwrap().starts_with("127.0.0.1:"),
        "client address from forwarded"
    );
    assert!(ok["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(ok["duration_ms"].is_u64());
    let denied = &records[1];
    assert_eq!(denied["message"], "tunnel refused");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["reason"], "denied");
    assert_eq!(denied["target_addr"], "127.0.0.2:80");
    assert_eq!(denied["peer"], CLIENT_ID);
    let failed = &records[2];
    assert_eq!(failed["message"], "tunnel refused");
    assert_eq!(failed["status"], 503);
    assert_eq!(failed["reason"], "target_unreachable");
    assert_eq!(failed["target_addr"], unreachable.to_string());
    assert!(failed["detail"].as_str().unwrap().contains("unreachable"));

    let entry_records = setup.entry.access_records();
    assert_eq!(entry_records[0]["role"], "client");
    assert_eq!(entry_records[0]["peer"], SERVER_ID);
    assert_eq!(entry_records[0]["sent"], 4);
    // Both ends log the trace the CONNECT carried, refusals included.
    for (client, server) in entry_records.iter().zip(&records) {
        assert_eq!(client["trace"], server["trace"], "{client} vs {server}");
        assert_eq!(client["trace"].as_str().unwrap().len(), 32, "{client}");
    }
    // The client says what happened, in its own words.
    assert_eq!(entry_records[1]["status"], 403);
    assert_eq!(entry_records[1]["reason"], "denied_by_server");
    assert_eq!(entry_records[1]["peer"], "");
    assert_eq!(entry_records[2]["status"], 503);
    assert_eq!(entry_records[2]["reason"], "server_could_not_reach_target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_readiness_during_drain() {
    let mut setup = setup().await;
    let entry_addr = setup.entry.address("SOCKS5 entry ready");
    let admin = setup.server.address("admin endpoint ready");

    assert_eq!(http(admin, "GET", "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http(admin, "GET", "/readyz").await, (200, "ready\n".into()));
    let (status, body) = http(admin, "GET", "/nowhere").await;
    assert_eq!(status, 404, "{body}");
    // A 405 names in `Allow` exactly the methods the path answers: each
    // one listed is served, and a method left out is the one refused.
    for (path, refused, allowed) in [
        ("/metrics", "POST", "GET, HEAD"),
        ("/healthz", "DELETE", "GET, HEAD"),
        ("/logging", "DELETE", "GET, HEAD, POST, PUT"),
    ] {
        let (status, headers, body) = http_with_headers(admin, refused, path).await;
        assert_eq!(status, 405, "{refused} {path}: {body}");
        assert_eq!(
            header_values(&headers, "allow"),
            [allowed],
            "{refused} {path}"
        );
        for method in allowed.split(", ") {
            // Query-less POST and PUT to /logging are 400s: served, not 405.
            let (status, _, body) = http_with_headers(admin, method, path).await;
            assert_ne!(status, 405, "{method} {path} is listed in Allow: {body}");
        }
    }

    let (status, config) = http(admin, "GET", "/config").await;
    assert_eq!(status, 200);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["server"]["allow-target"],
        serde_json::json!(["127.0.0.1/32"])
    );
    // Typed: durations as seconds, numbers as numbers, switches as booleans.
    assert_eq!(config["server"]["drain-timeout"], 20.0);
    assert_eq!(config["server"]["max-tunnels"], 100_000);
    assert_eq!(config["server"]["proxy-protocol"], false);
    assert_eq!(config["log-format"], "json");

    // At the default filter (info) the server's debug lines are off.
    let accepted = |server: &Process| {
        server
            .with_message(|m| m == "HBONE connection accepted")
            .len()
    };
    assert_eq!(http(admin, "GET", "/logging").await, (200, "info\n".into()));
    let (status, body) = http(admin, "POST", "/logging?level=hbone%3Ddebug").await;
    assert_eq!((status, body.as_str()), (200, "hbone=debug\n"));
    assert_eq!(http(admin, "GET", "/logging").await.1, "hbone=debug\n");
    let (status, body) = http(admin, "POST", "/logging?level=%3D%3D%3D").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(http(admin, "POST", "/logging").await.0, 400);
    // The rejected filters left the previous one in force: it still reads
    // back, and it still acts (checked below, once the first tunnel has
    // made the server accept a connection).
    assert_eq!(http(admin, "GET", "/logging").await.1, "hbone=debug\n");
    assert_eq!(accepted(&setup.server), 0, "no connection yet");

    // An open tunnel shows in /tunnels with its bytes.
    let (reply, mut tunnel) = socks5(entry_addr, setup.echo).await;
    assert_eq!(reply, 0);
    tunnel.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    within(PEER_WAIT, "tunnel: buf", tunnel.read_exact(&mut buf))
        .await
        .unwrap();
    let (status, listed) = http(admin, "GET", "/tunnels").await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["total"], 1);
    // The entry's first tunnel opened the first HBONE connection; the
    // server logs its acceptance at debug, shown only under hbone=debug.
    eventually(Duration::from_secs(10), || accepted(&setup.server) == 1).await;
    let open = &listed["tunnels"][0];
    assert_eq!(open["peer_id"], CLIENT_ID);
    assert_eq!(open["target"], setup.echo.to_string());
    assert_eq!(open["role"], "server");
    assert_eq!(open["sent_bytes"], 5);
    assert_eq!(open["received_bytes"], 5);
    assert!(open["age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(http(admin, "GET", "/tunnels?limit=x").await.0, 400);
    // Istio's byte counters move with the bytes, not at the tunnel's end.
    let (_, scrape) = http(admin, "GET", "/metrics").await;
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        let series = istio(metric, "destination", CLIENT_ID, SERVER_ID, "-");
        assert_eq!(
            sample(&scrape, &series),
            5,
            "{series} while open, in\n{scrape}"
        );
    }
    let closed = istio(
        "istio_tcp_connections_closed_total",
        "destination",
        CLIENT_ID,
        SERVER_ID,
        "-",
    );
    assert_eq!(sample(&scrape, &closed), 0);
    assert_eq!(sample(&scrape, "hbone_tunnels_open{role=\"server\"}"), 1);
    assert_eq!(sample(&scrape, "hbone_tunnels_open{role=\"client\"}"), 0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &scrape,
            &format!("hbone_build_info{{version=\"{version}\"}}")
        ),
        1
    );

    // Draining: unready at once, still alive, the open tunnel still flows.
    setup.server.terminate();
    eventually(Duration::from_secs(10), || {
        !setup
            .server
            .with_message(|m| m.starts_with("draining"))
            .is_empty()
    })
    .await;
    let (status, body) = http(admin, "GET", "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    assert_eq!(http(admin, "GET", "/healthz").await.0, 200);
    tunnel.write_all(b"more").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(PEER_WAIT, "tunnel: rest", tunnel.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(rest, b"more");
    let status = tokio::time::timeout(Duration::from_secs(10), setup.server.child.wait())
        .await
        .expect("the server exits once drained")
        .unwrap();
    assert!(status.success());
}

/// `hbone run` starts every section of a file; flags given on the command
/// line win over the file, fields they do not give come from it; a single
/// subcommand takes its section with `--config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_from_a_config_file_with_flags_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Relative identity paths: relative to the file, not to our cwd.
    let (config, echo, _server) = write_run_file(
        dir.path(),
        "log-format = \"text\"\nadmin = \"127.0.0.1:0\"\n",
        "drain-timeout = \"7s\"\nmax-tunnels = 50\n",
    )
    .await;
    let config = config.to_str().unwrap();
    // Process::start adds --log-format json: it must beat the file's text.
    let mut run = Process::start(&["run", "--config", config], 3).await;
    let forward = run.address("forward ready");
    let admin = run.address("admin endpoint ready");
    let mut app = TcpStream::connect(forward).await.unwrap();
    app.write_all(b"through the file").await.unwrap();
    app.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(PEER_WAIT, "app: echoed", app.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, b"through the file");

    let (_, effective) = http(admin, "GET", "/config").await;
    let effective: Value = serde_json::from_str(&effective).unwrap();
    assert_eq!(effective["log-format"], "json", "the flag wins");
    assert_eq!(effective["server"]["drain-timeout"], 7.0, "from the file");
    assert_eq!(effective["server"]["max-tunnels"], 50);
    assert_eq!(effective["forward"][0]["target"], echo.to_string());
    let identity = effective["server"]["identity-dir"].as_str().unwrap();
    assert_eq!(Path::new(identity), dir.path().join("server"));
    // Without a policy file or --allow-* flags: the default rule.
    let rules = &effective["server"]["policy-rules"];
    assert_eq!(rules[0]["origin"], "default", "{rules}");
    assert_eq!(
        rules[0]["to"],
        serde_json::json!(["127.0.0.0/8", "[::1/128]"])
    );

    // One subcommand, its section from the file, one field overridden.
    let server = Process::start(
        &[
            "server",
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--max-tunnels",
            "5",
        ],
        2,
    )
    .await;
    let admin2 = server.address("admin endpoint ready");
    let (_, effective) = http(admin2, "GET", "/config").await;
    let effective: Value = serde_json::from_str(&effective).unwrap();
    assert_eq!(effective["server"]["max-tunnels"], 5, "the flag wins");
    assert_eq!(effective["server"]["drain-timeout"], 7.0, "from the file");

    run.terminate();
    let status = tokio::time::timeout(Duration::from_secs(10), run.child.wait())
        .await
        .expect("hbone run exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `hbone run` keeps an admin endpoint on 127.0.0.1:15000 unless told
/// otherwise, and `admin = "off"` keeps none. The default port is fixed:
/// where another program holds it, the start fails naming that address,
/// which shows the default as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_its_admin_endpoint_on_loopback_15000_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let server = "[server]\nidentity-dir = \"server\"\nlisten = \"127.0.0.1:0\"\n";
    let default = dir.path().join("default.toml");
    std::fs::write(&default, server).unwrap();
    let mut child = spawn_json(&["run", "--config", default.to_str().unwrap()]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let admin = within(PEER_WAIT, "the admin endpoint or an error", async {
        while let Ok(Some(line)) = lines.next_line().await {
            let parsed: Option<Value> = serde_json::from_str(&line).ok();
            seen.push(line);
            if let Some(parsed) = parsed
                && parsed["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("admin endpoint ready"))
            {
                return parsed["listen"].as_str().map(str::to_owned);
            }
        }
        None
    })
    .await;
    match admin {
        Some(listen) => assert_eq!(listen, "127.0.0.1:15000", "{seen:#?}"),
        None => assert!(
            seen.iter()
                .any(|l| l.contains("cannot listen on 127.0.0.1:15000 for the admin endpoint")),
            "neither the admin endpoint nor a bind error: {seen:#?}"
        ),
    }
    drop(child);

    let off = dir.path().join("off.toml");
    std::fs::write(&off, format!("admin = \"off\"\n{server}")).unwrap();
    // The admin endpoint, when there is one, is ready before any listener.
    let run = Process::start(&["run", "--config", off.to_str().unwrap()], 1).await;
    assert_eq!(run.with_message(|m| m.ends_with("ready")).len(), 1);
    assert!(
        run.with_message(|m| m.starts_with("admin endpoint"))
            .is_empty(),
        "admin = \"off\" still ran one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_bad_file_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[server]\nidentity-dir = \"x\"\nmax-tunels = 5\n").unwrap();
    let output = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .contains("bad.toml:3: [server] max-tunels: unknown field; did you mean max-tunnels?"),
        "{stderr}"
    );
    let output = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/hbone.toml"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/hbone.toml"));
}

/// Policy reloads are counted by result (a broken file keeps the old
/// policy), and the certificate in use is published with its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_certificate_expiry_are_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let policy = dir.path().join("policy.toml");
    let rule = |target: &str| {
        format!("[[rule]]\nname = \"to {target}\"\nfrom = [\"{CLIENT_ID}\"]\nto = [\"{target}\"]\n")
    };
    std::fs::write(&policy, rule("127.0.0.1/32")).unwrap();
    let server_dir = dir.path().join("server");
    let server = Process::start(
        &[
            "server",
            "--identity-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    let admin = server.address("admin endpoint ready");
    let reloads = |scrape: &str, result: &str| {
        sample(
            scrape,
            &format!("hbone_reloads_total{{what=\"policy\",result=\"{result}\"}}"),
        )
    };
    let hangup = || {
        let pid = server.child.id().unwrap() as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    let scrape_until = |want_ok: u64, want_failed: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, scrape) = http(admin, "GET", "/metrics").await;
            // Exactly: the file keeps its modification time, so only the
            // signal can have reloaded it.
            if reloads(&scrape, "success") == want_ok && reloads(&scrape, "failure") == want_failed
            {
                return scrape;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload counts in\n{scrape}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Rewritten with the old modification time: the 2 s file poll sees no
    // change, so each reload below is the signal's.
    let stamp = std::fs::metadata(&policy).unwrap().modified().unwrap();
    let rewrite = |contents: &str| {
        std::fs::write(&policy, contents).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&policy)
            .unwrap()
            .set_modified(stamp)
            .unwrap();
    };
    rewrite("[[rule]]\nname = \"broken\"\nto = [\"not-an-address\"]\n");
    hangup();
    scrape_until(0, 1).await;
    rewrite(&rule("127.0.0.2/32"));
    hangup();
    let scrape = scrape_until(1, 1).await;

    // The server's certificate: issued for 90 days by `hbone ca issue`.
    let series = format!("hbone_certificate_expiry_timestamp_seconds{{id=\"{SERVER_ID}\"}}");
    let expires = sample(&scrape, &series);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let days = (expires.saturating_sub(now)) / 86_400;
    assert!(
        (88..=90).contains(&days),
        "expires in {days} days: {scrape}"
    );
}

/// `/config` shows a server's policy rules as they are in force: the
/// policy file's, then the rule of the --allow-* flags; after a reload,
/// the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_shows_the_policy_rules_in_force_and_follows_reloads() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nname = \"client to echo\"\nfrom = [\"{CLIENT_ID}\"]\n\
             source = [\"127.0.0.0/8\"]\nto = [\"127.0.0.1/32:7\"]\n"
        ),
    )
    .unwrap();
    let server_dir = dir.path().join("server");
    let server = Process::start(
        &[
            "server",
            "--identity-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy.to_str().unwrap(),
            "--allow-id",
            "spiffe://cluster.local/ns/ops/*",
            "--allow-target",
            "127.0.0.2/32:22",
            "--admin",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    let admin = server.address("admin endpoint ready");
    let rules_in_force = || async move {
        let (status, body) = http(admin, "GET", "/config").await;
        assert_eq!(status, 200, "{body}");
        let config: Value = serde_json::from_str(&body).unwrap();
        config["server"]["policy-rules"].clone()
    };
    let flags_rule = serde_json::json!({
        "name": "command line",
        "action": "allow",
        "from": ["spiffe://cluster.local/ns/ops/*"],
        "source": [],
        "to": ["127.0.0.2/32:22"],
        "services": [],
        "origin": "flags",
    });
    assert_eq!(
        rules_in_force().await,
        serde_json::json!([
            {
                "name": "client to echo",
                "action": "allow",
                "from": [CLIENT_ID],
                "source": ["127.0.0.0/8"],
                "to": ["127.0.0.1/32:7"],
                "services": [],
                "origin": "policy file",
            },
            flags_rule,
        ])
    );

    // A new file, whole at once (renamed into place), then SIGHUP.
    let next = dir.path().join("policy.toml.new");
    std::fs::write(
        &next,
        "[[rule]]\nname = \"no ssh\"\naction = \"deny\"\nto = [\"0.0.0.0/0:22\"]\n\n\
         [[rule]]\nname = \"echo by name\"\nto = [\"echo.demo.svc.cluster.local:8080\"]\n",
    )
    .unwrap();
    std::fs::rename(&next, &policy).unwrap();
    let pid = server.child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually(Duration::from_secs(10), || {
        server
            .with_message(|m| m == "policy reloaded")
            .iter()
            .any(|line| line["rules"] == 3)
    })
    .await;
    assert_eq!(
        rules_in_force().await,
        serde_json::json!([
            {
                "name": "no ssh",
                "action": "deny",
                "from": [],
                "source": [],
                "to": ["0.0.0.0/0:22"],
                "services": [],
                "origin": "policy file",
            },
            {
                "name": "echo by name",
                "action": "allow",
                "from": [],
                "source": [],
                "to": [],
                "services": ["echo.demo.svc.cluster.local:8080"],
                "origin": "policy file",
            },
            flags_rule,
        ])
    );
}

/// SIGHUP re-reads the config file: the log filter applies at once, other
/// changes are named and wait for a restart, a broken file changes nothing;
/// each reload is counted by result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reloads_its_config_file_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let config = dir.path().join("hbone.toml");
    let file = |log: &str, max_tunnels: u32| {
        format!(
            "log = \"{log}\"\nadmin = \"127.0.0.1:0\"\n[server]\nidentity-dir = \"server\"\n\
             listen = \"127.0.0.1:0\"\nmax-tunnels = {max_tunnels}\n"
        )
    };
    std::fs::write(&config, file("info", 50)).unwrap();
    let run = Process::start(&["run", "--config", config.to_str().unwrap()], 2).await;
    let admin = run.address("admin endpoint ready");
    let hangup = || {
        let pid = run.child.id().unwrap() as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    let reloads = |result: &'static str| async move {
        let (_, scrape) = http(admin, "GET", "/metrics").await;
        sample(
            &scrape,
            &format!("hbone_reloads_total{{what=\"config\",result=\"{result}\"}}"),
        )
    };

    std::fs::write(&config, file("debug", 60)).unwrap();
    hangup();
    eventually(Duration::from_secs(10), || {
        !run.with_message(|m| m.starts_with("config file changed"))
            .is_empty()
    })
    .await;
    assert_eq!(http(admin, "GET", "/logging").await.1, "debug\n");
    let changed = run.with_message(|m| m.starts_with("config file changed"));
    assert_eq!(changed[0]["fields"], "[server] max-tunnels");
    assert!(reloads("success").await >= 1);
    assert_eq!(reloads("failure").await, 0);

    std::fs::write(&config, "[server]\nlisten = 5\n").unwrap();
    hangup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reloads("failure").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken file was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http(admin, "GET", "/readyz").await.0, 200, "still serving");
    assert_eq!(http(admin, "GET", "/logging").await.1, "debug\n");
}

/// One sample of a scrape: metric name, labels, value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the samples of a Prometheus text exposition (label values
/// unescaped).
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, mut rest) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        let mut labels = Vec::new();
        while !rest.is_empty() {
            let (label, after) = rest.split_once("=\"").unwrap();
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().unwrap() {
                    (_, '\\') => value.push(chars.next().unwrap().1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((label.to_owned(), value));
            rest = after[end + 1..].trim_start_matches(',');
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value: value.parse().unwrap(),
        });
    }
    samples
}

/// `sum by (source_workload, destination_service) (METRIC{reporter=R})`
/// over several scrapes, the way Kiali's graph asks for TCP traffic.
fn sum_by_workload_and_service(
    scrapes: &[&str],
    metric: &str,
    reporter: &str,
) -> std::collections::BTreeMap<(String, String), f64> {
    let mut sums = std::collections::BTreeMap::new();
    for scrape in scrapes {
        for sample in parse_exposition(scrape) {
            if sample.name == metric && sample.label("reporter") == reporter {
                let key = (
                    sample.label("source_workload").to_owned(),
                    sample.label("destination_service").to_owned(),
                );
                *sums.entry(key).or_default() += sample.value;
            }
        }
    }
    sums
}

/// Writes `data` through `forward` and reads it back from the echo.
async fn through(forward: SocketAddr, data: &[u8]) {
    let mut app = TcpStream::connect(forward).await.unwrap();
    app.write_all(data).await.unwrap();
    app.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(PEER_WAIT, "app: echoed", app.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, data);
}

/// Two workloads with their own metadata, straight and through a gateway:
/// both reporters label the tunnels with Istio's standard labels, and the
/// queries Kiali and Istio's dashboards make add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_standard_labels_between_workloads_with_metadata() {
    const WEB: &str = "spiffe://cluster.local/ns/frontend/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/backend/sa/db";
    const GATEWAY: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";
    const SERVICE: &str = "db.backend.svc.cluster.local";
    let dir = tempfile::tempdir().unwrap();
    issue_with_cli(
        dir.path(),
        &[(WEB, "web"), (DB, "db"), (GATEWAY, "gateway")],
    )
    .await;
    let identity = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let echo = start_echo().await;
    let (db_dir, web_dir, gateway_dir) = (identity("db"), identity("web"), identity("gateway"));
    let server = Process::start(
        &[
            "server",
            "--identity-dir",
            &db_dir,
            "--listen",
            "127.0.0.1:0",
            "--allow-target",
            "127.0.0.1/32",
            "--admin",
            "127.0.0.1:0",
            "--cluster",
            "c2",
            "--workload",
            "deployment/db",
            "--app",
            "db",
            "--app-version",
            "v2",
        ],
        2,
    )
    .await;
    let server_addr = server.address("HBONE server ready").to_string();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[route]]\nhost = \"{SERVICE}\"\nendpoints = [\"{server_addr}\"]\n"),
    )
    .unwrap();
    let gateway = Process::start(
        &[
            "gateway",
            "--identity-dir",
            &gateway_dir,
            "--listen",
            "127.0.0.1:0",
            "--routes",
            routes.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ],
        2,
    )
    .await;
    let gateway_addr = gateway.address("HBONE gateway ready").to_string();
    let echo_addr = echo.to_string();
    let web_meta = [
        "--cluster",
        "c1",
        "--workload",
        "deployment/web",
        "--app",
        "web",
        "--app-version",
        "v1",
    ];
    let forward = |route: Vec<&str>| {
        let mut args = vec![
            "forward",
            "--identity-dir",
            &web_dir,
            "--listen",
            "127.0.0.1:0",
            "--server-id",
            DB,
            "--target",
            &echo_addr,
            "--admin",
            "127.0.0.1:0",
        ];
        args.extend(route);
        args.extend(web_meta);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let direct_args = forward(vec!["--server", &server_addr]);
    let direct = Process::start(
        &direct_args.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
    )
    .await;
    let service = format!("{SERVICE}:5432");
    let via_args = forward(vec![
        "--gateway",
        &gateway_addr,
        "--gateway-id",
        GATEWAY,
        "--service",
        &service,
    ]);
    let via = Process::start(&via_args.iter().map(String::as_str).collect::<Vec<_>>(), 2).await;

    through(direct.address("forward ready"), b"hello").await;
    through(direct.address("forward ready"), b"hello world").await;
    through(via.address("forward ready"), b"gateway").await;
    // The gateway's tunnel stays open: it carries the pooled inner
    // connection.
    eventually(Duration::from_secs(10), || {
        server.access_records().len() == 3
            && direct.access_records().len() == 2
            && via.access_records().len() == 1
    })
    .await;
    let scrape = |process: &Process| {
        let admin = process.address("admin endpoint ready");
        async move { http(admin, "GET", "/metrics").await.1 }
    };
    let (server_scrape, gateway_scrape) = (scrape(&server).await, scrape(&gateway).await);
    let (direct_scrape, via_scrape) = (scrape(&direct).await, scrape(&via).await);

    // Every label, on both reporters of the direct tunnels.
    let web = "source_workload=\"web\",source_canonical_service=\"web\",\
               source_canonical_revision=\"v1\",source_workload_namespace=\"frontend\",\
               source_principal=\"spiffe://cluster.local/ns/frontend/sa/web\",\
               source_app=\"web\",source_version=\"v1\",source_cluster=\"c1\"";
    let no_service = "destination_service=\"unknown\",destination_service_namespace=\"unknown\",\
                      destination_service_name=\"unknown\"";
    let db = "destination_workload=\"db\",destination_canonical_service=\"db\",\
              destination_canonical_revision=\"v2\",destination_workload_namespace=\"backend\",\
              destination_principal=\"spiffe://cluster.local/ns/backend/sa/db\",\
              destination_app=\"db\",destination_version=\"v2\",destination_cluster=\"c2\"";
    let tail =
        "request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"";
    let series = |metric: &str, reporter: &str, service: &str, destination: &str| {
        format!("{metric}{{reporter=\"{reporter}\",{web},{service},{destination},{tail}}}")
    };
    let opened = "istio_tcp_connections_opened_total";
    let want = series(opened, "source", no_service, db);
    assert_eq!(
        sample(&direct_scrape, &want),
        2,
        "{want} in\n{direct_scrape}"
    );
    // The server saw the tunnel through the gateway as well, as a workload
    // address (the gateway resolved the service).
    let want = series(opened, "destination", no_service, db);
    assert_eq!(
        sample(&server_scrape, &want),
        3,
        "{want} in\n{server_scrape}"
    );
    let bytes = series("istio_tcp_sent_bytes_total", "destination", no_service, db);
    assert_eq!(sample(&server_scrape, &bytes), 5 + 11 + 7);

    // Through the gateway: the source names the service it asked for
    // and the workload that answered; the gateway the service it routed.
    let routed = "destination_service=\"db.backend.svc.cluster.local\",\
                  destination_service_namespace=\"backend\",destination_service_name=\"db\"";
    let want = series(opened, "source", routed, db);
    assert_eq!(sample(&via_scrape, &want), 1, "{want} in\n{via_scrape}");
    let gateway_workload = "destination_workload=\"unknown\",\
                            destination_canonical_service=\"unknown\",\
                            destination_canonical_revision=\"unknown\",\
                            destination_workload_namespace=\"istio-system\",\
                            destination_principal=\"spiffe://cluster.local/ns/istio-system/sa/gateway\",\
                            destination_app=\"unknown\",destination_version=\"unknown\",\
                            destination_cluster=\"unknown\"";
    let want = series(opened, "destination", routed, gateway_workload);
    assert_eq!(
        sample(&gateway_scrape, &want),
        1,
        "{want} in\n{gateway_scrape}"
    );

    // Kiali's graph: traffic by source workload and destination service.
    let key = |service: &str| ("web".to_owned(), service.to_owned());
    let sources = [direct_scrape.as_str(), via_scrape.as_str()];
    let sent = sum_by_workload_and_service(&sources, "istio_tcp_sent_bytes_total", "source");
    let opens = sum_by_workload_and_service(&sources, opened, "source");
    assert_eq!(
        sent,
        [(key("unknown"), 16.0), (key(SERVICE), 7.0)].into(),
        "{sources:?}"
    );
    assert_eq!(opens, [(key("unknown"), 2.0), (key(SERVICE), 1.0)].into());
    let destinations = [server_scrape.as_str(), gateway_scrape.as_str()];
    let opens = sum_by_workload_and_service(&destinations, opened, "destination");
    assert_eq!(opens, [(key("unknown"), 3.0), (key(SERVICE), 1.0)].into());
    let sent =
        sum_by_workload_and_service(&destinations, "istio_tcp_sent_bytes_total", "destination");
    assert_eq!(sent[&key("unknown")], 23.0);
    assert!(
        sent[&key(SERVICE)] > 7.0,
        "the gateway relays the inner TLS connection: more than the payload"
    );
}

/// An asymmetric tunnel (100 bytes from the application, 10,000 back):
/// the access records, `/tunnels` and Istio's byte counters of both ends
/// say the same, in Istio's convention: `received` from the source side,
/// `sent` back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_directions_agree_in_log_tunnels_and_metrics() {
    let setup = setup().await;
    let entry_addr = setup.entry.address("SOCKS5 entry ready");
    let admins = [
        ("server", setup.server.address("admin endpoint ready")),
        ("client", setup.entry.address("admin endpoint ready")),
    ];
    // A target that reads 100 bytes, answers 10,000, then waits for EOF.
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = target.accept().await.unwrap();
        let mut request = [0u8; 100];
        socket.read_exact(&mut request).await.unwrap();
        socket.write_all(&[7u8; 10_000]).await.unwrap();
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest).await;
    });
    let (reply, mut app) = socks5(entry_addr, target_addr).await;
    assert_eq!(reply, 0);
    app.write_all(&[1u8; 100]).await.unwrap();
    let mut answer = vec![0u8; 10_000];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();

    // While it is open: /tunnels on both ends.
    for (role, admin) in admins {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = http(admin, "GET", "/tunnels").await;
            let listed: Value = serde_json::from_str(&body).unwrap();
            let tunnel = &listed["tunnels"][0];
            if tunnel["received_bytes"] == 100 && tunnel["sent_bytes"] == 10_000 {
                assert_eq!(tunnel["role"], role);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{role}: /tunnels says {tunnel}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    for process in [&setup.server, &setup.entry] {
        eventually(Duration::from_secs(10), || {
            !process.access_records().is_empty()
        })
        .await;
        let record = &process.access_records()[0];
        assert_eq!(
            (&record["received"], &record["sent"]),
            (&Value::from(100), &Value::from(10_000)),
            "{record}"
        );
    }
    for (reporter, admin, source, destination) in [
        ("destination", admins[0].1, CLIENT_ID, SERVER_ID),
        ("source", admins[1].1, CLIENT_ID, SERVER_ID),
    ] {
        let (_, scrape) = http(admin, "GET", "/metrics").await;
        let received = istio(
            "istio_tcp_received_bytes_total",
            reporter,
            source,
            destination,
            "-",
        );
        let sent = istio(
            "istio_tcp_sent_bytes_total",
            reporter,
            source,
            destination,
            "-",
        );
        assert_eq!(sample(&scrape, &received), 100, "{received} in\n{scrape}");
        assert_eq!(sample(&scrape, &sent), 10_000, "{sent} in\n{scrape}");
    }
}

/// A peer turned away in the TLS handshake (a certificate from another CA)
/// gets one line under the access log's target, with its address and why,
/// so a log shipper that keeps only access records sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_in_the_access_log() {
    let setup = setup().await;
    let server_addr = setup.server.address("HBONE server ready");
    let stranger = crate::common::Pki::new();
    let attempt = crate::common::raw_tls(server_addr, Some(&stranger.client)).await;
    if let Ok(mut tls) = attempt {
        // TLS 1.3: the refusal arrives on the first read.
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    }
    eventually(Duration::from_secs(10), || {
        setup
            .server
            .access_records()
            .iter()
            .any(|r| r["message"] == "handshake failed")
    })
    .await;
    let record = setup
        .server
        .access_records()
        .into_iter()
        .find(|r| r["message"] == "handshake failed")
        .unwrap();
    assert!(
        record["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{record}"
    );
    assert!(!record["reason"].as_str().unwrap().is_empty(), "{record}");
}

/// A certificate in the last fifth of its validity is warned about when it
/// is loaded; a fresh one is not. (The warning comes before the listeners'
/// ready lines, so once those are in, its absence is final.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_expiry_is_warned_about_and_a_fresh_one_is_not() {
    const WARNING: &str = "certificate is in the last fifth of its validity; rotate it";
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    // Valid for ten days, nine of them gone: a tenth of its life is left.
    let ca = hbone::ca::DevCa::load(dir.path().join("ca")).unwrap();
    let id = hbone::SpiffeId::parse(SERVER_ID).unwrap();
    let day = time::Duration::days(1);
    let ageing = dir.path().join("ageing");
    ca.issue_any(
        &id,
        time::OffsetDateTime::now_utc() - day * 9,
        Duration::from_secs(10 * 86_400),
    )
    .unwrap()
    .save(&ageing)
    .unwrap();

    let serve = |identity: std::path::PathBuf| async move {
        Process::start(
            &[
                "server",
                "--identity-dir",
                identity.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ],
            2,
        )
        .await
    };
    let old = serve(ageing).await;
    let warnings = old.with_message(|m| m == WARNING);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["level"], "WARN");
    assert_eq!(warnings[0]["id"], SERVER_ID);
    let minutes_left = warnings[0]["minutes_left"].as_u64().unwrap();
    // About a day (the CA may add a few minutes for clock skew).
    assert!(
        (23 * 60..=25 * 60).contains(&minutes_left),
        "{minutes_left} minutes left"
    );

    let fresh = serve(dir.path().join("server")).await;
    assert!(
        !fresh
            .with_message(|m| m.starts_with("identity loaded"))
            .is_empty(),
        "the fresh identity was loaded"
    );
    assert_eq!(fresh.with_message(|m| m == WARNING), Vec::<Value>::new());
}

/// The admin endpoint has no authentication: on an address other than
/// loopback it warns once at startup, naming the address; on loopback it
/// does not. The one off loopback (0.0.0.0) is inside a network namespace
/// of the test's own, with only `lo`, so nothing else can reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_warns_when_it_is_not_on_loopback() {
    if !root_or_skip(
        "the_admin_endpoint_warns_when_it_is_not_on_loopback",
        "a network namespace",
    ) {
        return;
    }
    for tool in ["unshare", "ip"] {
        require(tool, "tests/operations.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let server_dir = dir.path().join("server");
    let server = |admin: &'static str| {
        [
            "server",
            "--identity-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            admin,
        ]
    };
    let warnings = |process: &Process| {
        process.with_message(|m| m.starts_with("the admin endpoint has no authentication"))
    };

    let mut isolated = Command::new("unshare");
    isolated.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" \"$@\"",
        BIN,
    ]);
    let exposed = Process::start_with(isolated, &server("0.0.0.0:0"), 2).await;
    let admin = exposed.address("admin endpoint ready");
    assert!(admin.ip().is_unspecified(), "admin endpoint on {admin}");
    let warned = warnings(&exposed);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["level"], "WARN");
    assert_eq!(warned[0]["listen"], admin.to_string());

    let on_loopback = Process::start(&server("127.0.0.1:0"), 2).await;
    assert!(
        on_loopback
            .address("admin endpoint ready")
            .ip()
            .is_loopback()
    );
    assert_eq!(warnings(&on_loopback), Vec::<Value>::new());
}

/// `hbone run` with `runtime = "per-core"`: a server and a forward entry in
/// one process on two single-threaded workers, each listener one socket
/// per worker (SO_REUSEPORT), and tunnels through both ends with a record
/// on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_per_core_serves_a_server_and_an_entry_on_its_workers() {
    const CONNECTIONS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let (config, _echo, server_port) = write_run_file(
        dir.path(),
        "runtime = \"per-core\"\nthreads = 2\nadmin = \"off\"\n",
        "",
    )
    .await;
    let run = Process::start(&["run", "--config", config.to_str().unwrap()], 2).await;
    let forward = run.address("forward ready");
    let pid = run.child.id().unwrap();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    let named = |prefix: &str| {
        threads
            .iter()
            .filter(|name| name.starts_with(prefix))
            .count()
    };
    assert_eq!(named("hbone-worker"), 2, "worker threads: {threads:?}");
    // The control plane's runtime keeps one thread of its own.
    assert_eq!(named("tokio-rt-worker"), 1, "runtime threads: {threads:?}");
    assert_eq!(
        listening_sockets(forward.port()),
        2,
        "the forward's listeners"
    );
    assert_eq!(
        listening_sockets(server_port.port()),
        2,
        "the server's listeners"
    );

    for seed in 0..CONNECTIONS {
        let app = TcpStream::connect(forward).await.unwrap();
        let data = payload(seed as u64, 20_000);
        let back = within(PEER_WAIT, "echo", echo_roundtrip(app, &data))
            .await
            .unwrap();
        assert_eq!(sha256(&back), sha256(&data), "connection {seed}");
    }
    eventually(Duration::from_secs(10), || {
        run.access_records().len() == 2 * CONNECTIONS
    })
    .await;
    let records = run.access_records();
    for role in ["client", "server"] {
        let ended = records
            .iter()
            .filter(|r| r["role"] == role && r["message"] == "tunnel closed")
            .count();
        assert_eq!(ended, CONNECTIONS, "{role} records: {records:?}");
    }
}
