//! Faults that need a network of their own: a peer black-holed with
//! iptables, and socket buffers capped, inside a network
//! namespace this test creates (`unshare -n`, which holds only `lo`;
//! nothing leaves the machine, and the host's settings stay as they are).
//! Needs root and iptables; `scripts/install-test-deps.sh` installs
//! iptables.

use std::process::Command;

use crate::host_tools::{require, root_or_skip};

const BIN: &str = env!("CARGO_BIN_EXE_hbone");

#[test]
fn black_holed_server_is_detected_by_keepalive() {
    if !root_or_skip(
        "black_holed_server_is_detected_by_keepalive",
        "network namespaces, iptables",
    ) {
        return;
    }
    for tool in ["unshare", "ip", "iptables", "timeout"] {
        require(tool, "tests/netns.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ca", "init", "--out", ca.to_str().unwrap()]);
    for (id, name) in [
        ("spiffe://cluster.local/ns/demo/sa/server", "server"),
        ("spiffe://cluster.local/ns/demo/sa/client", "client"),
    ] {
        let out = dir.path().join(name);
        run(&[
            "ca",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/blackhole.sh");
    // The script bounds every wait itself; `timeout` is the backstop.
    let output = Command::new("timeout")
        .args(["120", "unshare", "-n", "bash", script, BIN])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    let logs = ["server.log", "forward.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        output.status.success(),
        "{stdout}\n{}\n{logs}",
        String::from_utf8_lossy(&output.stderr)
    );
    let detected_ms: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("detected_ms="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no measurement in {stdout}"));
    // Keepalive: a PING every 200 ms, 500 ms to answer. Allow scheduling
    // slack, but far below the 10 s the script waits.
    assert!(
        detected_ms < 2_000,
        "took {detected_ms} ms to notice the black hole\n{logs}"
    );
    assert!(stdout.contains("keepalive_logged=yes"), "{stdout}\n{logs}");
}

#[test]
fn bulk_through_small_socket_buffers_never_waits_for_a_keepalive() {
    if !root_or_skip(
        "bulk_through_small_socket_buffers_never_waits_for_a_keepalive",
        "network namespaces",
    ) {
        return;
    }
    for tool in ["unshare", "ip", "timeout"] {
        require(tool, "tests/netns.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    crate::capture::issue_identities(
        dir.path(),
        &[
            ("spiffe://cluster.local/ns/demo/sa/server", "server"),
            ("spiffe://cluster.local/ns/demo/sa/client", "client"),
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/small_buffers.sh");
    let output = Command::new("timeout")
        .args(["200", "unshare", "-n", "bash", script, BIN])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "{stdout}\n{}\n{log}",
        String::from_utf8_lossy(&output.stderr)
    );
    let transfers: Vec<(f64, u64)> = stdout
        .lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_owned)
            };
            Some((
                field("seconds=")?.parse().ok()?,
                field("bytes=")?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(transfers.len(), 6, "six transfers: {stdout}");
    for (seconds, bytes) in transfers {
        // Each writes for one second and then closes; bytes stranded in a
        // buffer would hold it until the next keepalive PING, 10 s on.
        assert!(
            seconds < 5.0,
            "a 1 s transfer took {seconds} s ({bytes} bytes): {stdout}\n{log}"
        );
        assert!(bytes > 0, "{stdout}");
    }
}
