//! Capture towards a remote network: three hosts as network namespaces
//! this test creates, A and B on networks that only G joins, and G
//! forwarding no packets (nothing leaves the machine). `hbone node` on A
//! sends an unmodified client's connection to B's app as double HBONE
//! through G's `hbone gateway` to B's `hbone server`. Needs root, `ip`,
//! `nft` and `python3`; `scripts/install-test-deps.sh` installs them.

use std::process::Command;

use crate::capture::{BIN, CLIENT_ID, SERVER_ID, issue_identities, script_values};
use crate::host_tools::{require, root_or_skip};

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";

#[test]
fn captured_connection_reaches_a_remote_network_only_through_its_gateway() {
    let test = "captured_connection_reaches_a_remote_network_only_through_its_gateway";
    if !root_or_skip(test, "network namespaces, nftables") {
        return;
    }
    for tool in ["ip", "nft", "python3", "timeout"] {
        require(tool, "tests/capture_remote.rs");
    }
    let dir = tempfile::tempdir().unwrap();
    issue_identities(
        dir.path(),
        &[
            (SERVER_ID, "server"),
            (CLIENT_ID, "client"),
            (GATEWAY_ID, "gateway"),
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/capture_remote.sh");
    // The script bounds every wait itself; `timeout` is the backstop.
    let output = Command::new("timeout")
        .args(["120", "bash", script, BIN, dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    let logs = ["node.log", "gateway.log", "server.log", "app.log"].map(|f| (f, read(f)));
    let mut context = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for (name, log) in &logs {
        context.push_str(&format!("\n--- {name}\n{log}"));
    }
    assert!(output.status.success(), "{context}");
    let [
        (_, node_log),
        (_, gateway_log),
        (_, server_log),
        (_, app_log),
    ] = &logs;
    let values = script_values(&stdout);
    let value = |key: &str| {
        *values
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the output\n{context}"))
    };
    // A cannot reach B but through the gateway.
    assert_eq!(value("gateway_forwarding"), "0", "{context}");
    assert_eq!(value("direct_path"), "none", "{context}");
    // The access record of `log` naming `target`, by `role`.
    let record = |log: &str, role: &str, target: &str| -> String {
        log.lines()
            .find(|l| {
                l.contains("hbone::access")
                    && l.contains(&format!("role=\"{role}\""))
                    && l.contains(&format!("target_addr={target}"))
            })
            .unwrap_or_else(|| panic!("no {role} record for {target}\n{context}"))
            .to_owned()
    };
    for (key, target, gateway, client) in [
        ("", "10.78.1.2:8080", "10.78.0.2:15008", "10.78.0.1"),
        ("v6_", "[fd78:1::2]:8080", "[fd78::2]:15008", "fd78::1"),
    ] {
        // Bytes intact both ways, through a half-close.
        let len = value(&format!("{key}echoed_len"));
        assert_eq!(len, (256 * 1024).to_string(), "{context}");
        let sent = value(&format!("{key}sent_sha"));
        assert_eq!(sent, value(&format!("{key}echoed_sha")), "{context}");
        assert_eq!(value(&format!("{key}client_local")), client, "{context}");
        // A's record: through the gateway, to B's node, which proved the
        // identity the peers table names.
        let captured = record(node_log, "client", target);
        assert!(
            captured.contains(&format!("gateway={gateway}")),
            "{captured}"
        );
        assert!(
            captured.contains(&format!("peer=\"{SERVER_ID}\"")),
            "{captured}"
        );
        assert!(captured.contains("result=done"), "{captured}");
        // G relayed an outer tunnel for A, for the service A's client
        // dialled.
        let relayed = record(gateway_log, "server", target);
        assert!(
            relayed.contains(&format!("peer=\"{CLIENT_ID}\"")),
            "{relayed}"
        );
        // B's server: the inner tunnel, end to end from A's identity, the
        // original client named.
        let served = record(server_log, "server", target);
        assert!(
            served.contains(&format!("peer=\"{CLIENT_ID}\"")),
            "{served}"
        );
        let original = if client.contains(':') {
            format!("original=\"[{client}]:")
        } else {
            format!("original=\"{client}:")
        };
        assert!(served.contains(&original), "{served}");
        assert!(served.contains("result=done"), "{served}");
    }
    // The app saw only B's server.
    let peers: Vec<&str> = app_log
        .lines()
        .filter_map(|l| l.strip_prefix("peer="))
        .collect();
    assert_eq!(peers, ["10.78.1.2", "fd78:1::2"], "{context}");
    assert_eq!(value("node_exit"), "0", "{context}");
}
