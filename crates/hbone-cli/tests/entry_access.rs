//! Who may use an entry, end to end: listeners off loopback refused unless
//! allowed, sources outside --allow-source closed at accept, SOCKS5
//! username/password (RFC 1929) with a reloaded credentials file, and
//! private keys that others may read refused.
//!
//! Every connection here stays on loopback; the refused listeners are
//! refused before anything is bound.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::cli::{
    SERVER_ID, hbone, log_lines, make_pki, path, presented_cert, read_reply, spawn_logged,
    spawn_ready,
};
use crate::common::*;

/// Runs `hbone args` to its end, which must be a failure; its stderr.
async fn refused(args: &[&str]) -> String {
    let output = tokio::time::timeout(Duration::from_secs(30), hbone(args).output())
        .await
        .expect("a refused start ends at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "hbone {args:?} started: {stderr}");
    stderr
}

/// An HBONE server for the entries, with the PKI under `dir`.
async fn server(dir: &Path) -> (tokio::process::Child, SocketAddr) {
    spawn_ready(&[
        "server",
        "--identity-dir",
        &path(dir, "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await
}

/// `hbone socks5` with the client identity under `dir`, sending every
/// tunnel to `server`, with `extra` flags.
fn socks5_args(dir: &Path, server: SocketAddr, listen: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "socks5",
        "--identity-dir",
        &path(dir, "client"),
        "--listen",
        listen,
        "--server",
        &server.to_string(),
        "--server-id",
        SERVER_ID,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Writes `text` to `dir/name` with `mode`.
fn write_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    file.to_str().unwrap().to_owned()
}

/// A SOCKS5 CONNECT request for `target` (IPv4).
fn connect_request(target: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 only here")
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    request
}

/// Greets offering username/password only, and sends `user`/`password`;
/// the entry's two answers (method chosen, auth status) and the stream.
async fn authenticate(socks: SocketAddr, user: &str, password: &str) -> ([u8; 2], u8, TcpStream) {
    let mut client = TcpStream::connect(socks).await.unwrap();
    client.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    read_exactly(&mut client, &mut choice).await;
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(password.len() as u8);
    auth.extend_from_slice(password.as_bytes());
    client.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    read_exactly(&mut client, &mut status).await;
    assert_eq!(status[0], 1, "the sub-negotiation's version");
    (choice, status[1], client)
}

async fn read_exactly(client: &mut TcpStream, buf: &mut [u8]) {
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(buf))
        .await
        .expect("the entry answers")
        .unwrap();
}

/// Whether the entry ends the connection without a byte (EOF or reset).
async fn closed_without_a_word(client: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the connection was neither closed nor answered"),
    }
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_off_loopback_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let stderr = refused(&strs(&socks5_args(dir.path(), unused, listen, &[]))).await;
        assert!(
            stderr.contains(&format!("refusing to listen on {listen}")),
            "{stderr}"
        );
        for fix in [
            "--allow-source CIDR",
            "--allow-remote-clients",
            "--socks5-credentials FILE",
        ] {
            assert!(stderr.contains(fix), "{fix} missing: {stderr}");
        }
    }
    let stderr = refused(&[
        "forward",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--listen",
        "0.0.0.0:0",
        "--server",
        "127.0.0.1:9",
        "--server-id",
        SERVER_ID,
        "--target",
        "127.0.0.1:9",
    ])
    .await;
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0") && stderr.contains("--allow-source"),
        "{stderr}"
    );
    assert!(!stderr.contains("credentials"), "{stderr}");

    // The same in a config file, named by line and spoken as fields.
    let config = dir.path().join("hbone.toml");
    std::fs::write(
        &config,
        format!(
            "admin = \"off\"\n\n[[socks5]]\nidentity-dir = \"{}\"\nserver-id = \"{SERVER_ID}\"\nlisten = \"0.0.0.0:0\"\n",
            path(dir.path(), "client")
        ),
    )
    .unwrap();
    let stderr = refused(&["run", "--config", config.to_str().unwrap()]).await;
    assert!(
        stderr.contains("hbone.toml:6: [[socks5]] #1 listen: refusing to listen on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("allow-remote-clients = true"), "{stderr}");
}

/// With --allow-remote-clients an entry may listen on every address (here
/// 0.0.0.0, port 0); the test reaches it on 127.0.0.1 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_remote_clients_lets_an_entry_listen_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (_server, server) = server(dir.path()).await;
    let args = socks5_args(dir.path(), server, "0.0.0.0:0", &["--allow-remote-clients"]);
    let (_socks, socks) = spawn_ready(&strs(&args)).await;
    assert!(socks.ip().is_unspecified(), "{socks}");
    let socks = SocketAddr::from(([127, 0, 0, 1], socks.port()));
    let mut client = TcpStream::connect(socks).await.unwrap();
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    read_exactly(&mut client, &mut choice).await;
    assert_eq!(choice, [5, 0]);
    client.write_all(&connect_request(echo)).await.unwrap();
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    assert_eq!(
        echo_roundtrip(client, b"any source").await.unwrap(),
        b"any source"
    );
}

/// --allow-source serves its networks and closes other sources right after
/// accept, before any tunnel: the forward is allowed 127.0.0.2 only, so a
/// connection from 127.0.0.1 is closed and one from 127.0.0.2 tunnelled;
/// a SOCKS5 entry allowed 127.0.0.1/32 serves 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_source_closes_other_sources_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (_server, server) = server(dir.path()).await;
    let (_forward, forward, log) = spawn_logged(&[
        "forward",
        "--identity-dir",
        &path(dir.path(), "client"),
        "--listen",
        "127.0.0.1:0",
        "--allow-source",
        "127.0.0.2/32",
        "--server",
        &server.to_string(),
        "--server-id",
        SERVER_ID,
        "--target",
        &echo.to_string(),
    ])
    .await;

    let mut outsider = connect_from([127, 0, 0, 1], forward).await;
    // Sent before the close lands, or refused: either way no echo.
    let _ = outsider.write_all(b"let me in").await;
    assert!(closed_without_a_word(&mut outsider).await);
    let warned = log_lines(&log, "source not allowed", 1).await;
    assert!(warned[0].contains("127.0.0.1:"), "{warned:?}");

    let allowed = connect_from([127, 0, 0, 2], forward).await;
    assert_eq!(
        echo_roundtrip(allowed, b"from 127.0.0.2").await.unwrap(),
        b"from 127.0.0.2"
    );
    // Only the allowed source's tunnel was ever opened: every tunnel
    // record (written as a tunnel ends) is of 127.0.0.2.
    log_lines(&log, "tunnel closed", 1).await;
    let lines = log.lock().unwrap().clone();
    let records: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("tunnel closed") || l.contains("tunnel refused"))
        .collect();
    assert!(
        records.iter().all(|l| l.contains("source=127.0.0.2:")),
        "{records:?}"
    );

    let args = socks5_args(
        dir.path(),
        server,
        "127.0.0.1:0",
        &["--allow-source", "127.0.0.1/32"],
    );
    let (_socks, socks) = spawn_ready(&strs(&args)).await;
    let mut client = connect_from([127, 0, 0, 1], socks).await;
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    read_exactly(&mut client, &mut choice).await;
    assert_eq!(choice, [5, 0]);
    client.write_all(&connect_request(echo)).await.unwrap();
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    let mut outsider = connect_from([127, 0, 0, 3], socks).await;
    let _ = outsider.write_all(&[5, 1, 0]).await;
    assert!(closed_without_a_word(&mut outsider).await);
}

/// RFC 1929: with a credentials file the entry asks for username/password,
/// lets the right pair in, answers 0x01 and closes on a wrong one, and
/// answers 0xFF to a client offering no authentication only. The file is
/// reloaded when it changes; a file that no longer loads keeps the old
/// users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_username_password_with_a_reloaded_file() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let echo = start_echo().await;
    let (_server, server) = server(dir.path()).await;
    let users = write_with_mode(
        dir.path(),
        "users",
        "# who may use the entry\nalice:s3cret\n",
        0o600,
    );
    let args = socks5_args(
        dir.path(),
        server,
        "127.0.0.1:0",
        &["--socks5-credentials", &users],
    );
    let (_socks, socks, log) = spawn_logged(&strs(&args)).await;

    let (choice, status, mut client) = authenticate(socks, "alice", "s3cret").await;
    assert_eq!((choice, status), ([5, 2], 0));
    client.write_all(&connect_request(echo)).await.unwrap();
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");
    assert_eq!(
        echo_roundtrip(client, b"authenticated").await.unwrap(),
        b"authenticated"
    );

    let (_, status, mut client) = authenticate(socks, "alice", "s3crex").await;
    assert_eq!(status, 1, "a wrong password fails");
    assert!(closed_without_a_word(&mut client).await);
    log_lines(&log, "username/password refused", 1).await;
    let (_, status, _) = authenticate(socks, "mallory", "s3cret").await;
    assert_eq!(status, 1, "an unknown user fails");

    // No authentication only: no acceptable method.
    let mut client = TcpStream::connect(socks).await.unwrap();
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    read_exactly(&mut client, &mut choice).await;
    assert_eq!(choice, [5, 0xff]);
    assert!(closed_without_a_word(&mut client).await);

    // A pipelined client (greeting, credentials and request at once).
    let mut client = TcpStream::connect(socks).await.unwrap();
    let mut burst = vec![5, 2, 0, 2, 1, 5];
    burst.extend_from_slice(b"alice");
    burst.push(6);
    burst.extend_from_slice(b"s3cret");
    burst.extend_from_slice(&connect_request(echo));
    client.write_all(&burst).await.unwrap();
    let mut answers = [0u8; 4];
    read_exactly(&mut client, &mut answers).await;
    assert_eq!(answers, [5, 2, 1, 0]);
    assert_eq!(read_reply(&mut client).await, 0, "succeeded");

    // The file changes: bob replaces alice.
    write_with_mode(dir.path(), "users", "bob:hunter2\n", 0o600);
    log_lines(&log, "SOCKS5 credentials reloaded", 1).await;
    let (_, status, _) = authenticate(socks, "bob", "hunter2").await;
    assert_eq!(status, 0, "the reloaded user is in");
    let (_, status, _) = authenticate(socks, "alice", "s3cret").await;
    assert_eq!(status, 1, "the removed user is out");

    // A file that does not load changes nothing.
    write_with_mode(dir.path(), "users", "bob hunter2\n", 0o600);
    let kept = log_lines(&log, "SOCKS5 credentials not reloaded", 1).await;
    assert!(
        kept[0].contains("users:1: expected user:password"),
        "{kept:?}"
    );
    let (_, status, _) = authenticate(socks, "bob", "hunter2").await;
    assert_eq!(status, 0, "the old credentials stay");
}

/// A credentials file others may read, or one that is not user:password,
/// stops the entry from starting, saying why and where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let loose = write_with_mode(dir.path(), "loose", "alice:s3cret\n", 0o644);
    let stderr = refused(&strs(&socks5_args(
        dir.path(),
        unused,
        "127.0.0.1:0",
        &["--socks5-credentials", &loose],
    )))
    .await;
    assert!(
        stderr.contains("readable by group or others")
            && stderr.contains(&format!("chmod 600 {loose}")),
        "{stderr}"
    );
    let malformed = write_with_mode(dir.path(), "malformed", "alice:s3cret\n\nbob\n", 0o600);
    let stderr = refused(&strs(&socks5_args(
        dir.path(),
        unused,
        "127.0.0.1:0",
        &["--socks5-credentials", &malformed],
    )))
    .await;
    assert!(
        stderr.contains(&format!("{malformed}:3: expected user:password")),
        "{stderr}"
    );
}

/// A private key that group or others may read is refused at start, with
/// the fix, unless --allow-insecure-key-permissions; and a key that
/// becomes readable later is refused at reload, the identity in use kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_others_may_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let server_dir = dir.path().join("server");
    let key = server_dir.join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let stderr = refused(&[
        "server",
        "--identity-dir",
        server_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert!(
        stderr.contains("readable by group or others (mode 640)")
            && stderr.contains(&format!("chmod 600 {}", key.display()))
            && stderr.contains("--allow-insecure-key-permissions"),
        "{stderr}"
    );
    let (_allowed, _) = spawn_ready(&[
        "server",
        "--identity-dir",
        server_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--allow-insecure-key-permissions",
    ])
    .await;

    // Started with a private key; then the key becomes readable by all and
    // a renewed certificate arrives: the reload is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_server, server, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        server_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let original = presented_cert(server).await;
    let renewed = dir.path().join("renewed");
    crate::cli::run_ok(&[
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
    std::fs::copy(renewed.join("key.pem"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::copy(renewed.join("cert.pem"), server_dir.join("cert.pem")).unwrap();
    let refused = log_lines(&log, "identity not reloaded", 1).await;
    assert!(
        refused[0].contains("readable by group or others"),
        "{refused:?}"
    );
    assert_eq!(
        presented_cert(server).await,
        original,
        "the old identity stays"
    );
}
