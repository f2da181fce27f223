//! Revocation with the `hbone` binary: `hbone ca revoke` writes the CRL,
//! servers and entries given it refuse revoked peers, a rewritten CRL is
//! picked up while tunnels stay open, expired and malformed CRLs are
//! reported.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::cli::{CLIENT_ID, SERVER_ID, hbone, log_lines, make_pki, path, run_ok, spawn_logged};
use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `hbone ca revoke` of `cert` (relative to `dir`) into `dir/crl.pem`.
async fn revoke(dir: &Path, cert: &str) -> String {
    run_ok(&[
        "ca",
        "revoke",
        "--ca-dir",
        &path(dir, "ca"),
        "--cert",
        &path(dir, cert),
        "--crl-out",
        &path(dir, "crl.pem"),
    ])
    .await
}

/// `hbone connect` with the identity in `dir/identity` (and `extra`
/// flags) to `target` through `server`, sending a line; its output.
async fn connect(
    dir: &Path,
    identity: &str,
    server: SocketAddr,
    target: SocketAddr,
    extra: &[&str],
) -> Output {
    let identity = path(dir, identity);
    let (server, target) = (server.to_string(), target.to_string());
    let mut args = vec![
        "connect",
        "--identity-dir",
        &identity,
        "--server",
        &server,
        "--server-id",
        SERVER_ID,
        "--target",
        &target,
    ];
    args.extend_from_slice(extra);
    let mut child = hbone(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The tunnel may be refused before stdin is read: a broken pipe is fine.
    let _ = stdin.write_all(b"hello\n").await;
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("hbone connect ends")
        .unwrap()
}

fn succeeded(output: &Output) -> bool {
    output.status.success() && output.stdout == b"hello\n"
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The address after `listen=` in the first log line containing `what`.
pub(crate) async fn listen_of(log: &crate::cli::Log, what: &str) -> SocketAddr {
    let line = log_lines(log, what, 1).await.remove(0);
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .unwrap_or_else(|| panic!("no listen= in {line:?}"))
        .parse()
        .unwrap()
}

/// The admin endpoint's /metrics.
pub(crate) async fn scrape(admin: SocketAddr) -> String {
    let exchange = async {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        tcp.read_to_string(&mut body).await.unwrap();
        body
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the admin endpoint answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_given_the_crl_refuses_the_revoked_client_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    issue_with_cli_again(dir.path(), CLIENT_ID, "client2").await;
    let said = revoke(dir.path(), "client/cert.pem").await;
    assert!(said.contains("revoked; CRL number 1 of 1"), "{said}");
    let echo = start_echo().await;
    let (_server, _, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--crl",
        &path(dir.path(), "crl.pem"),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ])
    .await;
    let server = listen_of(&log, "HBONE server ready").await;
    let admin = listen_of(&log, "admin endpoint ready").await;

    let refused = connect(dir.path(), "client", server, echo, &[]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("server rejected our certificate: it is revoked"),
        "{}",
        stderr(&refused)
    );
    let line = log_lines(&log, "handshake failed", 1).await.remove(0);
    assert!(line.contains("revoked"), "{line}");
    let failures = |scrape: &str| -> Vec<String> {
        scrape
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_failed_total{")
                    && l.contains("response_flags=\"TLS_FAILURE\"")
            })
            .map(str::to_owned)
            .collect()
    };
    let counted = failures(&scrape(admin).await);
    assert!(
        counted.len() == 1 && counted[0].ends_with(" 1"),
        "{counted:?}"
    );

    let passed = connect(dir.path(), "client2", server, echo, &[]).await;
    assert!(succeeded(&passed), "{}", stderr(&passed));
    assert_eq!(failures(&scrape(admin).await), counted, "no new failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_given_the_crl_refuses_the_revoked_server() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    revoke(dir.path(), "server/cert.pem").await;
    let echo = start_echo().await;
    let (_server, server, _log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let crl = path(dir.path(), "crl.pem");
    let refused = connect(dir.path(), "client", server, echo, &["--crl", &crl]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("server certificate is revoked"),
        "{}",
        stderr(&refused)
    );
    let trusting = connect(dir.path(), "client", server, echo, &[]).await;
    assert!(succeeded(&trusting), "{}", stderr(&trusting));
}

/// Every component that does mutual TLS takes the flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mtls_component_takes_crl_flags() {
    for command in ["server", "gateway", "forward", "socks5", "connect"] {
        let help = run_ok(&[command, "--help"]).await;
        assert!(
            help.contains("--crl <FILE>") && help.contains("--crl-fail-closed"),
            "{command}: {help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_crl_refuses_new_handshakes_while_open_tunnels_go_on() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    issue_with_cli_again(dir.path(), CLIENT_ID, "client2").await;
    revoke(dir.path(), "client2/cert.pem").await;
    let echo = start_echo().await;
    let (_server, _, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--crl",
        &path(dir.path(), "crl.pem"),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ])
    .await;
    let server = listen_of(&log, "HBONE server ready").await;
    let admin = listen_of(&log, "admin endpoint ready").await;
    let (_forward, forward, _forward_log) = spawn_logged(&[
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
    ])
    .await;
    let mut open = TcpStream::connect(forward).await.unwrap();
    let mut echoed = [0u8; 7];
    open.write_all(b"before ").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), open.read_exact(&mut echoed))
        .await
        .expect("the tunnel echoes")
        .unwrap();
    assert_eq!(&echoed, b"before ");

    let said = revoke(dir.path(), "client/cert.pem").await;
    assert!(said.contains("CRL number 2 of 2"), "{said}");
    log_lines(&log, "revocation lists reloaded", 1).await;
    let refused = connect(dir.path(), "client", server, echo, &[]).await;
    assert!(
        stderr(&refused).contains("it is revoked"),
        "{}",
        stderr(&refused)
    );

    let mut echoed = [0u8; 5];
    open.write_all(b"after").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), open.read_exact(&mut echoed))
        .await
        .expect("the open tunnel still echoes")
        .unwrap();
    assert_eq!(&echoed, b"after");

    // A half-written CRL is refused and the lists in force stay.
    std::fs::write(dir.path().join("crl.pem"), "-----BEGIN X509 CRL-----\n").unwrap();
    let kept = log_lines(&log, "revocation lists not reloaded", 1).await;
    assert!(kept[0].contains("crl.pem"), "{kept:?}");
    let still = connect(dir.path(), "client", server, echo, &[]).await;
    assert!(
        stderr(&still).contains("it is revoked"),
        "{}",
        stderr(&still)
    );
    let scraped = scrape(admin).await;
    for result in ["success", "failure"] {
        let sample = format!("hbone_reloads_total{{what=\"revocation\",result=\"{result}\"}} 1");
        assert!(scraped.contains(&sample), "{sample} in\n{scraped}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_warns_by_default_and_refuses_when_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let ca = hbone::ca::DevCa::load(dir.path().join("ca")).unwrap();
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let old = ca.crl_at(&[], 1, two_days_ago, DAY).unwrap();
    std::fs::write(dir.path().join("old.crl"), old).unwrap();
    let echo = start_echo().await;

    let (_lenient, lenient, log) = spawn_logged(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--crl",
        &path(dir.path(), "old.crl"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let warned = log_lines(&log, "past its next update; still used", 1).await;
    assert!(
        warned[0].contains("WARN") && warned[0].contains("old.crl"),
        "{warned:?}"
    );
    let passed = connect(dir.path(), "client", lenient, echo, &[]).await;
    assert!(succeeded(&passed), "{}", stderr(&passed));

    // Fail-closed, from a config file this time.
    std::fs::write(
        dir.path().join("hbone.toml"),
        "[server]\nidentity-dir = \"server\"\nlisten = \"127.0.0.1:0\"\n\
         crl = [\"old.crl\"]\ncrl-fail-closed = true\n",
    )
    .unwrap();
    let (_strict, strict, log) = spawn_logged(&[
        "server",
        "--config",
        &path(dir.path(), "hbone.toml"),
        "--admin",
        "off",
    ])
    .await;
    log_lines(&log, "handshakes it covers are refused", 1).await;
    let refused = connect(dir.path(), "client", strict, echo, &[]).await;
    assert!(!refused.status.success(), "{}", stderr(&refused));
    let line = log_lines(&log, "handshake failed", 1).await.remove(0);
    assert!(line.contains("expired"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_crl_stops_the_start_and_fails_config_check() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    std::fs::write(dir.path().join("bad.crl"), "not a revocation list\n").unwrap();
    let output = hbone(&[
        "server",
        "--identity-dir",
        &path(dir.path(), "server"),
        "--crl",
        &path(dir.path(), "bad.crl"),
        "--listen",
        "127.0.0.1:0",
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains(&format!(
            "{}: not a usable CRL",
            path(dir.path(), "bad.crl")
        )),
        "{said}"
    );

    std::fs::write(
        dir.path().join("hbone.toml"),
        "[server]\nidentity-dir = \"server\"\ncrl = [\"bad.crl\"]\n",
    )
    .unwrap();
    let output = hbone(&["config", "check", &path(dir.path(), "hbone.toml")])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let said = format!(
        "{}{}",
        stderr(&output),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        said.contains("[server] crl") && said.contains("bad.crl"),
        "{said}"
    );
}

/// Another certificate for `id` from the CA `make_pki` made, into
/// `dir/name`.
async fn issue_with_cli_again(dir: &Path, id: &str, name: &str) {
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir, "ca"),
        "--id",
        id,
        "--out",
        &path(dir, name),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_revoke_writes_into_the_ca_directory_and_refuses_a_foreign_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let said = run_ok(&[
        "ca",
        "revoke",
        "--ca",
        &path(dir.path(), "ca"),
        "--cert",
        &path(dir.path(), "server/cert.pem"),
    ])
    .await;
    assert!(said.contains(&path(dir.path(), "ca/crl.pem")), "{said}");
    let crl = hbone::revocation::Revocation::from_files([dir.path().join("ca/crl.pem")]).unwrap();
    assert_eq!(crl.len(), 1);
    assert!(crl.stale(std::time::SystemTime::now() + 6 * DAY).is_empty());
    assert_eq!(crl.stale(std::time::SystemTime::now() + 8 * DAY).len(), 1);

    run_ok(&["ca", "init", "--out", &path(dir.path(), "other-ca")]).await;
    run_ok(&[
        "ca",
        "issue",
        "--ca",
        &path(dir.path(), "other-ca"),
        "--id",
        CLIENT_ID,
        "--out",
        &path(dir.path(), "stranger"),
    ])
    .await;
    let output = hbone(&[
        "ca",
        "revoke",
        "--ca",
        &path(dir.path(), "ca"),
        "--cert",
        &path(dir.path(), "stranger/cert.pem"),
    ])
    .output()
    .await
    .unwrap();
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains("stranger/cert.pem") && said.contains("not issued by this CA"),
        "{said}"
    );
}
