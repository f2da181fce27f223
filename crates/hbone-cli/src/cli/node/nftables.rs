//! The rules as nftables: hbone's own table, whose `output` NAT chain
//! redirects this host's TCP towards the mesh to the capture listener and
//! lets hbone's own connections (carrying its socket mark) pass, and whose
//! `input` chain refuses (or counts) plaintext TCP to the protected ports
//! from other hosts. Applied with `nft -f -`, atomically; the script first
//! deletes the table, so applying it twice, or after a crash, leaves one
//! table.

use std::fmt::Write as _;

use anyhow::Context;

use super::rules::{self, Inbound, PortRange, Rules};

/// The table hbone owns (family inet: IPv4 and IPv6 in one).
pub(super) const TABLE: &str = "hbone";

/// The package that has nft, for the error when it is missing.
const PACKAGE: &str = "nftables (Debian and Ubuntu: apt install nftables)";

/// The nft script that installs the rules (replacing any earlier ones).
pub(super) fn script(rules: &Rules) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# hbone node: capture outbound TCP to the mesh.");
    let _ = writeln!(out, "# Remove with: nft delete table inet {TABLE}");
    // Declaring the table first makes the delete succeed when there is
    // none yet; the whole script is one transaction.
    let _ = writeln!(out, "table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(out, "\tchain output {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook output priority -100; policy accept;"
    );
    let _ = writeln!(out, "\t\tmeta mark {:#010x} return", rules.mark);
    // This host's own addresses are not tunnelled to itself: its server's
    // connections to local apps would come back here.
    let _ = writeln!(out, "\t\tfib daddr type local return");
    for rule in rules.mesh {
        let family = if rule.net.addr().is_ipv4() {
            "ip"
        } else {
            "ip6"
        };
        let ports = match rule.ports {
            (1, u16::MAX) => "meta l4proto tcp".to_owned(),
            (low, high) if low == high => format!("tcp dport {low}"),
            (low, high) => format!("tcp dport {low}-{high}"),
        };
        let _ = writeln!(
            out,
            "\t\t{family} daddr {} {ports} counter redirect to :{}",
            rule.net, rules.listen_port
        );
    }
    let _ = writeln!(out, "\t}}");
    if !rules.protect.is_empty() {
        input_chain(rules, &mut out);
    }
    let _ = writeln!(out, "}}");
    out
}

/// Plaintext TCP from other hosts to the protected ports. What comes in on
/// the loopback interface is this host's own, and that includes its HBONE
/// server delivering tunnels to local apps, even at the host's external
/// address.
fn input_chain(rules: &Rules, out: &mut String) {
    let ports = rules
        .protect
        .iter()
        .map(PortRange::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // Each counts connections: a refused SYN is answered with a reset (no
    // retries), and of a connection let through only its first packet is
    // new to connection tracking.
    let verdict = match rules.inbound {
        Inbound::Strict => " counter reject with tcp reset",
        Inbound::Permissive => " ct state new counter",
    };
    let _ = writeln!(out, "\tchain input {{");
    let _ = writeln!(out, "\t\ttype filter hook input priority 0; policy accept;");
    let _ = writeln!(out, "\t\tiifname \"lo\" return");
    let _ = writeln!(out, "\t\ttcp dport {{ {ports} }}{verdict}");
    let _ = writeln!(out, "\t}}");
}

/// Installs `rules`, replacing any earlier table.
pub(super) fn install(nft: &str, rules: &Rules) -> anyhow::Result<()> {
    apply(nft, &script(rules))
}

/// Removes the table (and succeeds when it is gone already).
pub(super) fn remove(nft: &str) -> anyhow::Result<()> {
    apply(nft, &removal_script())
}

/// The command that removes the rules by hand.
pub(super) fn removal_hint() -> String {
    format!("nft delete table inet {TABLE}")
}

fn removal_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

fn apply(nft: &str, script: &str) -> anyhow::Result<()> {
    rules::run(nft, &["-f", "-"], Some(script), PACKAGE).map(drop)
}

/// Plaintext connections the protecting rule has counted, read from the
/// installed input chain (`nft -j`).
pub(super) fn plaintext_connections(nft: &str) -> anyhow::Result<u64> {
    let listing = rules::run(
        nft,
        &["-j", "list", "chain", "inet", TABLE, "input"],
        None,
        PACKAGE,
    )?;
    counted_packets(&listing)
}

/// The packets of every counter in nft's JSON listing of a chain.
fn counted_packets(json: &[u8]) -> anyhow::Result<u64> {
    let listing: serde_json::Value =
        serde_json::from_slice(json).context("nft's JSON did not parse")?;
    let items = listing["nftables"]
        .as_array()
        .context("no nftables array in nft's JSON")?;
    Ok(items
        .iter()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|expr| expr["counter"]["packets"].as_u64())
        .sum())
}

#[cfg(test)]
mod tests {
    use hbone::policy::TargetRule;

    use super::*;

    #[test]
    fn script_redirects_the_mesh_and_lets_marked_traffic_pass() {
        let mesh: Vec<TargetRule> = ["10.0.0.0/24:8080", "10.1.0.0/16:80-90", "[fd00::/64]"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        let script = script(&Rules {
            mesh: &mesh,
            listen_port: 15001,
            mark: 0x539,
            protect: &[],
            inbound: Inbound::Strict,
        });
        let expected = "\
table inet hbone
delete table inet hbone
table inet hbone {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x00000539 return
\t\tfib daddr type local return
\t\tip daddr 10.0.0.0/24 tcp dport 8080 counter redirect to :15001
\t\tip daddr 10.1.0.0/16 tcp dport 80-90 counter redirect to :15001
\t\tip6 daddr fd00::/64 meta l4proto tcp counter redirect to :15001
\t}
}
";
        assert!(script.ends_with(expected), "{script}");
        // The mark is excluded before any redirect.
        let mark = script.find("meta mark").unwrap();
        assert!(script.find("redirect").unwrap() > mark);
    }

    #[test]
    fn protected_ports_refuse_or_count_plaintext_from_other_hosts() {
        let protect: Vec<PortRange> = ["8080", "5432-5433"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let rules = |inbound| {
            script(&Rules {
                mesh: &[],
                listen_port: 15001,
                mark: 0x539,
                protect: &protect,
                inbound,
            })
        };
        let chain = |verdict: &str| {
            format!(
                "\tchain input {{\n\t\ttype filter hook input priority 0; policy accept;\n\
                 \t\tiifname \"lo\" return\n\t\ttcp dport {{ 8080, 5432-5433 }}{verdict}\n\
                 \t}}\n}}\n"
            )
        };
        let strict = rules(Inbound::Strict);
        assert!(
            strict.ends_with(&chain(" counter reject with tcp reset")),
            "{strict}"
        );
        let permissive = rules(Inbound::Permissive);
        assert!(
            permissive.ends_with(&chain(" ct state new counter")),
            "{permissive}"
        );
    }

    #[test]
    fn counters_are_read_from_nft_json() {
        let json = br#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
            {"chain": {"family": "inet", "table": "hbone", "name": "input"}},
            {"rule": {"chain": "input", "expr": [{"match": {"op": "==", "left": {"meta":
              {"key": "iifname"}}, "right": "lo"}}, {"return": null}]}},
            {"rule": {"chain": "input", "expr": [{"match": {"op": "==", "left": {"payload":
              {"protocol": "tcp", "field": "dport"}}, "right": 8080}},
              {"counter": {"packets": 3, "bytes": 180}}, {"reject": {"type": "tcp reset"}}]}}]}"#;
        assert_eq!(counted_packets(json).unwrap(), 3);
        assert!(counted_packets(b"not json").is_err());
        assert!(counted_packets(br#"{"other": 1}"#).is_err());
    }

    #[test]
    fn a_missing_nft_says_how_to_get_it() {
        let err = apply("/nonexistent/nft", "").unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
        assert!(err.contains("apt install nftables"), "{err}");
        assert!(err.contains("--no-install-rules"), "{err}");
    }

    #[test]
    fn a_failing_nft_passes_its_message_on() {
        // `false` stands in for an nft that refuses the script.
        let err = apply("false", "table inet hbone\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("refused the rules"), "{err}");
    }
}
