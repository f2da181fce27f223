//! The sandbox of the long-running commands: what it denies, and that
//! reloads and tunnels still work inside it.
//!
//! Whether the kernel enforces Landlock decides what the tests expect: a
//! denial where it does, the warning that it is missing where it does not.
//! They never pass without checking one or the other.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::cli::{
    CLIENT_ID, Log, SERVER_ID, leaf_der, log_lines, make_pki, path, presented_cert, run_ok,
    spawn_logged_with_env,
};
use crate::common::*;

const PROBE: &str = "HBONE_SANDBOX_PROBE";

/// Whether this kernel enforces Landlock. `/sys/kernel/security/lsm` lists
/// the active security modules where securityfs is mounted; where it is
/// not (containers, some VMs), the kernel is asked for its Landlock ABI
/// version (`landlock_create_ruleset` with
/// `LANDLOCK_CREATE_RULESET_VERSION`), which fails without Landlock.
pub(crate) fn landlock_enforced() -> bool {
    if let Ok(modules) = std::fs::read_to_string("/sys/kernel/security/lsm") {
        return modules.trim().split(',').any(|m| m == "landlock");
    }
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute and size 0, this flag only asks for the
    // ABI version; nothing is read or written.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi > 0
}

/// The probe's verdict in `log`: `opened`, `denied` or `failed...`.
async fn probe_verdict(log: &Log) -> String {
    let line = log_lines(log, "sandbox probe:", 1).await.remove(0);
    let (_, verdict) = line.split_once("sandbox probe: ").unwrap();
    verdict.split_whitespace().next().unwrap().to_owned()
}

/// Asserts that the process behind `log` is sandboxed: its probe of a
/// file outside what it was given was denied, or, on a kernel without
/// Landlock, it said so.
async fn assert_sandboxed(log: &Log) {
    if landlock_enforced() {
        log_lines(log, "sandbox in force", 1).await;
        assert_eq!(probe_verdict(log).await, "denied");
    } else {
        log_lines(log, "Landlock is not available", 1).await;
    }
}

fn write_outside(dir: &Path) -> std::path::PathBuf {
    let outside = dir.join("outside.txt");
    std::fs::write(&outside, "not for the sandbox").unwrap();
    outside
}

/// Replaces `path` as editors and `hbone ca revoke` do: a new file renamed
/// over it (a new inode, which a grant of the old file alone would miss).
fn replace_by_rename(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    // Private, as a key must be.
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_server_opens_only_what_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let outside = write_outside(dir.path());
    let identity = path(dir.path(), "server");
    let server = [
        "server",
        "--identity-dir",
        &identity,
        "--listen",
        "127.0.0.1:0",
    ];

    let (_sandboxed, _, log) =
        spawn_logged_with_env(&server, &[(PROBE, outside.as_os_str())]).await;
    assert_sandboxed(&log).await;

    // Its own identity directory stays readable.
    let cert = dir.path().join("server").join("cert.pem");
    let (_own, _, log) = spawn_logged_with_env(&server, &[(PROBE, cert.as_os_str())]).await;
    assert_eq!(probe_verdict(&log).await, "opened");

    // --no-sandbox: the same file outside opens.
    let unsandboxed = [&server[..], &["--no-sandbox"]].concat();
    let (_free, _, log) =
        spawn_logged_with_env(&unsandboxed, &[(PROBE, outside.as_os_str())]).await;
    log_lines(&log, "sandbox off", 1).await;
    assert_eq!(probe_verdict(&log).await, "opened");

    // So does `no-sandbox = true` at the top of a config file.
    let config = dir.path().join("hbone.toml");
    std::fs::write(
        &config,
        format!(
            "admin = \"off\"\nno-sandbox = true\n\n[server]\nidentity-dir = \"{identity}\"\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let (_run, _, log) = spawn_logged_with_env(
        &["run", "--config", config.to_str().unwrap()],
        &[(PROBE, outside.as_os_str())],
    )
    .await;
    log_lines(&log, "sandbox off", 1).await;
    assert_eq!(probe_verdict(&log).await, "opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_tunnels_work_inside_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let outside = write_outside(dir.path());
    let probe: &[(&str, &OsStr)] = &[(PROBE, outside.as_os_str())];
    let echo = start_echo().await;
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let policy = conf.join("policy.toml");
    let allow = format!(
        "[[rule]]\nname = \"client to echo\"\nfrom = [\"{CLIENT_ID}\"]\nto = [\"{echo}\"]\n"
    );
    std::fs::write(&policy, &allow).unwrap();
    let server_dir = dir.path().join("server");
    let (_server, server, server_log) = spawn_logged_with_env(
        &[
            "server",
            "--identity-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy.to_str().unwrap(),
        ],
        probe,
    )
    .await;
    assert_sandboxed(&server_log).await;
    let (_forward, forward, forward_log) = spawn_logged_with_env(
        &[
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
        ],
        probe,
    )
    .await;
    assert_sandboxed(&forward_log).await;

    // A tunnel through both.
    let tunnelled = tokio::time::timeout(Duration::from_secs(10), async {
        let stream = TcpStream::connect(forward).await.unwrap();
        echo_roundtrip(stream, b"through the sandbox")
            .await
            .unwrap()
    })
    .await
    .expect("the tunnel must carry bytes");
    assert_eq!(tunnelled, b"through the sandbox");

    // The policy, replaced by a rename, is reloaded.
    let two_rules = format!("{allow}\n[[rule]]\nname = \"nobody else\"\naction = \"deny\"\n");
    replace_by_rename(&policy, two_rules.as_bytes());
    let reloaded = log_lines(&server_log, "policy reloaded", 1).await.remove(0);
    assert!(reloaded.contains("rules=2"), "{reloaded}");

    // So is the identity: a renewed certificate and key, renamed into
    // place, are presented to new connections.
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
    for name in ["key.pem", "cert.pem"] {
        replace_by_rename(
            &server_dir.join(name),
            &std::fs::read(renewed.join(name)).unwrap(),
        );
    }
    let expected = leaf_der(&renewed.join("cert.pem"));
    let rotated = async {
        while presented_cert(server).await != expected {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), rotated)
        .await
        .is_err()
    {
        panic!(
            "the server must rotate to the renewed certificate inside the sandbox: {:?}",
            server_log.lock().unwrap()
        );
    }
    assert!(
        !server_log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("Permission denied")),
        "{:?}",
        server_log.lock().unwrap()
    );
}

/// `hbone run` sandboxes once, with what every section needs: a server and
/// a forward in one process carry a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_run_grants_what_all_its_sections_need() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path()).await;
    let outside = write_outside(dir.path());
    let echo = start_echo().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = dir.path().join("conf").join("hbone.toml");
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    std::fs::write(
        &config,
        format!(
            "admin = \"off\"\n\n[server]\nidentity-dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\n\
             [[forward]]\nidentity-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nserver = \"127.0.0.1:{port}\"\n\
             server-id = \"{SERVER_ID}\"\ntarget = \"{echo}\"\n",
            path(dir.path(), "server"),
            path(dir.path(), "client"),
        ),
    )
    .unwrap();
    let (_run, _, log) = spawn_logged_with_env(
        &["run", "--config", config.to_str().unwrap()],
        &[(PROBE, outside.as_os_str())],
    )
    .await;
    assert_sandboxed(&log).await;
    let forward: std::net::SocketAddr = log_lines(&log, "forward ready", 1).await[0]
        .split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .unwrap()
        .parse()
        .unwrap();
    let tunnelled = tokio::time::timeout(Duration::from_secs(10), async {
        let stream = TcpStream::connect(forward).await.unwrap();
        echo_roundtrip(stream, b"one process").await.unwrap()
    })
    .await
    .expect("the tunnel must carry bytes");
    assert_eq!(tunnelled, b"one process");
}
