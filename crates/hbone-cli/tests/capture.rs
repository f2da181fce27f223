//! Transparent capture between two hosts: network namespaces A and B this
//! test creates, joined by a veth pair (nothing leaves the machine). An
//! unmodified client on A dials B's app; `hbone node` on A captures it and
//! B's `hbone server` delivers it, once with the nodes' rules in nftables
//! and once in iptables. Needs root, `ip`, `nft`, `iptables` and `python3`;
//! `scripts/install-test-deps.sh` installs them.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::host_tools::{require, root_or_skip};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_hbone");
pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

pub(crate) fn hbone(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `key=value` lines a namespace script prints.
pub(crate) fn script_values(stdout: &str) -> HashMap<&str, &str> {
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect()
}

/// What `hbone node ARGS --print-rules` prints; it must succeed.
fn printed_rules(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("node")
        .args(args)
        .arg("--print-rules")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A development CA in `dir/ca`, and for each (SPIFFE ID, name) an
/// identity in `dir/name`.
pub(crate) fn issue_identities(dir: &Path, ids: &[(&str, &str)]) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    hbone(&["ca", "init", "--out", &path("ca")]);
    for (id, name) in ids {
        hbone(&[
            "ca",
            "issue",
            "--ca",
            &path("ca"),
            "--id",
            id,
            "--out",
            &path(name),
        ]);
    }
}

#[test]
fn captured_connection_reaches_the_peer_only_through_hbone() {
    if !root_or_skip(
        "captured_connection_reaches_the_peer_only_through_hbone",
        "network namespaces, nftables",
    ) {
        return;
    }
    require("nft", "tests/capture.rs");
    capture_scenario("nftables");
}

/// The same with the rules in iptables and ip6tables chains, as on a host
/// without nftables: iptables' counters, its own idempotence (starts killed
/// with SIGKILL) and removal, and its programs run inside the sandbox.
#[test]
fn captured_connection_reaches_the_peer_only_through_hbone_on_iptables() {
    if !root_or_skip(
        "captured_connection_reaches_the_peer_only_through_hbone_on_iptables",
        "network namespaces, iptables",
    ) {
        return;
    }
    for tool in [
        "iptables",
        "ip6tables",
        "iptables-restore",
        "ip6tables-restore",
    ] {
        require(tool, "tests/capture.rs");
    }
    capture_scenario("iptables");
}

/// Runs `netns/capture.sh` with the nodes on `firewall`, and judges it.
fn capture_scenario(firewall: &str) {
    for tool in ["ip", "python3", "timeout", "curl"] {
        require(tool, "tests/capture.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    issue_identities(dir.path(), &[(SERVER_ID, "server"), (CLIENT_ID, "client")]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/capture.sh");
    // The script bounds every wait itself; `timeout` is the backstop.
    let output = Command::new("timeout")
        .args([
            "120",
            "bash",
            script,
            BIN,
            dir.path().to_str().unwrap(),
            firewall,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    let (node_log, server_log, app_log) = (read("node.log"), read("server.log"), read("app.log"));
    let context = format!(
        "firewall: {firewall}\n{stdout}\n{}\n--- node.log\n{node_log}\n--- server.log\n{server_log}\n--- app.log\n{app_log}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{context}");
    let values = script_values(&stdout);
    let value = |key: &str| {
        *values
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the output\n{context}"))
    };

    // Applying the rules twice (a restart, a crash) leaves one copy: one
    // table, or one jump to each chain and one chain.
    assert_eq!(value("tables_after_two_applies"), "1", "{context}");
    assert_eq!(value("tables_while_running"), "1", "{context}");
    // Bytes intact both ways, through a half-close.
    assert_eq!(value("echoed_len"), (256 * 1024).to_string(), "{context}");
    assert_eq!(value("sent_sha"), value("echoed_sha"), "{context}");
    assert_eq!(value("client_local"), "10.77.0.1", "{context}");
    // The redirect rule caught the client's packets.
    let packets: u64 = value("redirect_packets").parse().unwrap();
    assert!(packets > 0, "{context}");
    // The same over IPv6.
    assert_eq!(
        value("v6_echoed_len"),
        (256 * 1024).to_string(),
        "{context}"
    );
    assert_eq!(value("v6_sent_sha"), value("v6_echoed_sha"), "{context}");
    assert_eq!(value("v6_client_local"), "fd77::1", "{context}");
    let packets: u64 = value("v6_redirect_packets").parse().unwrap();
    assert!(packets > 0, "{context}");
    // The app was reached only by B's HBONE server, never by A directly.
    let (captured_phase, inbound_phase) = app_log
        .split_once("inbound-checks\n")
        .unwrap_or_else(|| panic!("the inbound checks did not start\n{context}"));
    let peers = |log: &str| -> Vec<String> {
        log.lines()
            .filter_map(|l| l.strip_prefix("peer="))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(peers(captured_phase), ["10.77.0.2", "fd77::2"], "{context}");
    // Inbound, strict: plaintext from A refused at B's firewall, and
    // counted; HBONE still delivered. Permissive: plaintext let through
    // and counted. The app saw B's server (tunnel) and, once, A (plain).
    assert_eq!(value("strict_plaintext"), "refused", "{context}");
    assert_eq!(value("permissive_plaintext"), "echoed", "{context}");
    for mode in ["strict", "permissive"] {
        // One plaintext connection: counted once by the firewall (a
        // connection let through, not each of its packets), and the
        // node's metric says the same.
        assert_eq!(value(&format!("{mode}_counted")), "1", "{context}");
        assert_eq!(value(&format!("{mode}_metric")), "1", "{context}");
        assert_eq!(
            value(&format!("{mode}_tunnelled")),
            "tunnelled",
            "{context}"
        );
        // One table while running: the second start replaces what the
        // first (killed with SIGKILL) left behind.
        assert_eq!(value(&format!("{mode}_tables")), "1", "{context}");
    }
    assert_eq!(value("strict_node_exit"), "137", "{context}");
    assert_eq!(
        value("strict_tables_after"),
        "1",
        "left by the kill\n{context}"
    );
    assert_eq!(value("permissive_node_exit"), "0", "{context}");
    // The permissive node ran in one `hbone run` with B's server, which
    // delivered the tunnel and named A's identity.
    let run_log = read("bnode-permissive.log");
    assert!(
        run_log.lines().any(|l| l.contains("hbone::access")
            && l.contains("role=\"server\"")
            && l.contains(&format!("peer=\"{CLIENT_ID}\""))
            && l.contains("target_addr=10.77.0.2:8080")),
        "{context}\n--- bnode-permissive.log\n{run_log}"
    );
    assert_eq!(value("permissive_tables_after"), "0", "{context}");
    assert_eq!(
        peers(inbound_phase),
        ["10.77.0.2", "10.77.0.1", "10.77.0.2"],
        "{context}"
    );
    // B's server knew the client's identity and the original destination.
    let served = server_log
        .lines()
        .find(|l| l.contains("hbone::access") && l.contains("target_addr=10.77.0.2:8080"))
        .unwrap_or_else(|| panic!("no access record on B\n{context}"));
    assert!(
        served.contains(&format!("peer=\"{CLIENT_ID}\"")),
        "{served}"
    );
    assert!(served.contains("original=\"10.77.0.1:"), "{served}");
    assert!(served.contains("result=done"), "{served}");
    // A's record names the original destination and B's identity.
    let captured = node_log
        .lines()
        .find(|l| l.contains("hbone::access") && l.contains("target_addr=10.77.0.2:8080"))
        .unwrap_or_else(|| panic!("no access record on A\n{context}"));
    assert!(
        captured.contains(&format!("peer=\"{SERVER_ID}\"")),
        "{captured}"
    );
    assert!(captured.contains("result=done"), "{captured}");
    assert!(captured.contains("source=10.77.0.1:"), "{captured}");
    let captured = node_log
        .lines()
        .find(|l| l.contains("hbone::access") && l.contains("target_addr=[fd77::2]:8080"))
        .unwrap_or_else(|| panic!("no IPv6 access record on A\n{context}"));
    assert!(
        captured.contains(&format!("peer=\"{SERVER_ID}\"")),
        "{captured}"
    );
    assert!(captured.contains("source=[fd77::1]:"), "{captured}");
    assert!(captured.contains("result=done"), "{captured}");
    let no_route: u32 = value("no_route_counted").parse().unwrap();
    assert!(no_route > 0, "{context}\n{}", read("metrics.txt"));
    // This host's own address is never captured, though in the mesh.
    assert_eq!(value("local_reply"), "local", "{context}");
    assert!(!node_log.contains("10.77.0.1:9090"), "{context}");
    // A redirected destination outside the peers table: closed, recorded.
    assert_eq!(value("unknown_destination_echoed"), "0", "{context}");
    let refused = node_log
        .lines()
        .find(|l| l.contains("hbone::access") && l.contains("target_addr=10.77.0.3:80"))
        .unwrap_or_else(|| panic!("no refusal record on A\n{context}"));
    assert!(
        refused.contains("reason=\"unknown_destination\""),
        "{refused}"
    );
    // The node follows its identity's renewal.
    assert!(node_log.contains("identity reloaded"), "{context}");
    // SIGTERM: a clean exit, and the rules are gone.
    assert_eq!(value("node_exit"), "0", "{context}");
    assert_eq!(value("tables_after_exit"), "0", "{context}");
    assert!(node_log.contains("capture rules removed"), "{context}");
    // All of it inside the sandbox: nft or iptables ran under it, B's key stayed
    // out of reach.
    if crate::sandbox::landlock_enforced() {
        assert!(node_log.contains("sandbox in force"), "{context}");
        assert!(node_log.contains("sandbox probe: denied"), "{context}");
    } else {
        assert!(node_log.contains("Landlock is not available"), "{context}");
    }
}

/// The rules an administrator would install, from a config file's [node]
/// section (needs no root: nothing is installed).
#[test]
fn node_prints_its_rules_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    hbone(&["ca", "init", "--out", &path("ca")]);
    hbone(&[
        "ca",
        "issue",
        "--ca",
        &path("ca"),
        "--id",
        CLIENT_ID,
        "--out",
        &path("client"),
    ]);
    let config = dir.path().join("hbone.toml");
    std::fs::write(
        &config,
        "[node]\nidentity-dir = \"client\"\nlisten = \"127.0.0.1:15011\"\n\
         mesh = [\"10.0.2.0/24:5432\", \"10.0.3.0/24\"]\n\
         peer = [\"10.0.0.0/16=spiffe://cluster.local/ns/db/sa/db\"]\nsocket-mark = 0x10\n\
         remote = [\"10.0.3.0/24=10.9.0.1:15008,spiffe://cluster.local/ns/gw/sa/gw\"]\n",
    )
    .unwrap();
    let stdout = printed_rules(&["--config", config.to_str().unwrap()]);
    assert!(stdout.contains("meta mark 0x00000010 return\n"), "{stdout}");
    assert!(
        stdout.contains("ip daddr 10.0.2.0/24 tcp dport 5432 counter redirect to :15011\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ip daddr 10.0.3.0/24 meta l4proto tcp counter redirect to :15011\n"),
        "{stdout}"
    );
    // The same rules as iptables-restore input, the flag over the file.
    let stdout = printed_rules(&[
        "--config",
        config.to_str().unwrap(),
        "--firewall",
        "iptables",
    ]);
    for line in [
        "# IPv4, for: iptables-restore --noflush\n*nat\n",
        "-A HBONE-OUTPUT -m mark --mark 0x10 -j RETURN\n",
        "-A HBONE-OUTPUT -d 10.0.2.0/24 -p tcp --dport 5432 -j REDIRECT --to-ports 15011\n",
        "-A HBONE-OUTPUT -d 10.0.3.0/24 -p tcp -j REDIRECT --to-ports 15011\n",
        "-I OUTPUT 1 -j HBONE-OUTPUT\nCOMMIT\n# IPv6, for: ip6tables-restore --noflush\n",
    ] {
        assert!(stdout.contains(line), "{line:?}\n{stdout}");
    }
}

/// Operator mistakes are named before anything is installed.
#[test]
fn node_names_bad_settings() {
    let err = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["node", "--print-rules"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let peer = "--peer=10.0.0.0/16=spiffe://td/ns/a/sa/b";
    let e = err(&["--mesh", "10.0.2.1/24", peer]);
    assert!(e.contains("host bits set"), "{e}");
    let e = err(&["--mesh", "10.0.2.0/24", "--peer", "10.0.0.0/16"]);
    assert!(e.contains("expected CIDR=SPIFFE_ID"), "{e}");
    let e = err(&["--mesh", "10.9.0.0/24", peer]);
    assert!(e.contains("not covered by any --peer network"), "{e}");
    assert!(e.contains("--unknown-destinations refuse"), "{e}");
    let e = err(&["--mesh", "10.0.2.0/24", peer, "--listen", "10.0.0.1:15001"]);
    assert!(e.contains("loopback"), "{e}");
    let e = err(&["--mesh", "[fd00::/64]", "--peer=fd00::/48=spiffe://td/a"]);
    assert!(e.contains("address family"), "{e}");
    let e = err(&["--mesh", "10.0.2.0/24", peer, "--socket-mark", "0"]);
    assert!(e.contains("non-zero mark"), "{e}");
    let gw = "10.1.0.9:15008,spiffe://td/ns/istio-system/sa/gw";
    let e = err(&[
        "--mesh",
        "10.0.2.0/24",
        peer,
        "--remote",
        "10.0.2.0/24=10.1.0.9",
    ]);
    assert!(e.contains("expected IP:PORT"), "{e}");
    let remote = format!("10.9.0.0/16={gw}");
    let e = err(&["--mesh", "10.0.2.0/24", peer, "--remote", &remote]);
    assert!(
        e.contains("--remote 10.9.0.0/16=") && e.contains("not covered by any --peer network"),
        "{e}"
    );
}

/// With `--unknown-destinations refuse` a mesh may reach beyond the peers
/// (its other addresses are captured and closed, as the namespace test's
/// unknown destination is): the whole range is redirected.
#[test]
fn a_mesh_beyond_the_peers_is_taken_when_unknown_destinations_are_refused() {
    let stdout = printed_rules(&[
        "--mesh",
        "10.0.0.0/8",
        "--peer",
        "10.0.2.0/24=spiffe://td/ns/a/sa/b",
        "--unknown-destinations",
        "refuse",
    ]);
    assert!(
        stdout.contains("ip daddr 10.0.0.0/8 meta l4proto tcp counter redirect to :15001\n"),
        "{stdout}"
    );
}

/// Without CAP_NET_ADMIN (nor CAP_NET_RAW, which also allows the socket
/// mark) the node stops at once and says why, whether it
/// installs the rules or not (it marks its own connections either way).
/// Runs in a network namespace of its own (`unshare -n`), so no rule could
/// reach this machine's.
#[test]
fn node_without_cap_net_admin_says_so() {
    if !root_or_skip(
        "node_without_cap_net_admin_says_so",
        "network namespaces, nftables",
    ) {
        return;
    }
    for tool in ["unshare", "setpriv", "nft"] {
        require(tool, "tests/capture.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    hbone(&["ca", "init", "--out", &path("ca")]);
    hbone(&[
        "ca",
        "issue",
        "--ca",
        &path("ca"),
        "--id",
        CLIENT_ID,
        "--out",
        &path("client"),
    ]);
    for extra in [&[][..], &["--no-install-rules"][..]] {
        let identity = path("client");
        let mut args = vec![
            "-n",
            "setpriv",
            "--bounding-set=-net_admin,-net_raw",
            BIN,
            "node",
            "--identity-dir",
            &identity,
            "--mesh",
            "10.0.2.0/24",
            "--peer",
            "10.0.2.0/24=spiffe://td/ns/a/sa/b",
        ];
        args.extend_from_slice(extra);
        // It stops by itself; `timeout` only guards against it serving.
        let out = Command::new("timeout")
            .arg("20")
            .arg("unshare")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("CAP_NET_ADMIN"), "{extra:?}: {stderr}");
    }
}
