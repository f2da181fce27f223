//! The nftables rules of a mesh node: hbone's own table, whose `output`
//! NAT chain redirects this host's TCP towards the mesh to the capture
//! listener, and lets hbone's own connections (carrying its socket mark)
//! pass; and, when local ports are protected, whose `input` chain refuses
//! (or counts) plaintext TCP to them from other hosts. Applied with
//! `nft -f -`, atomically; the script first deletes the table, so applying
//! it twice, or after a crash, leaves one table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::ValueEnum;
use hbone::policy::TargetRule;

/// The table hbone owns (family inet: IPv4 and IPv6 in one).
pub(super) const TABLE: &str = "hbone";

/// What the rules say.
pub(super) struct Rules<'a> {
    /// The destinations captured.
    pub(super) mesh: &'a [TargetRule],
    /// The capture listener's port (`redirect` sends to this host's own
    /// address on it).
    pub(super) listen_port: u16,
    /// Connections carrying this mark are hbone's own: not captured.
    pub(super) mark: u32,
    /// Local ports that other hosts reach only through HBONE.
    pub(super) protect: &'a [PortRange],
    /// What happens to plaintext TCP to them.
    pub(super) inbound: Inbound,
}

/// A port or an inclusive range of ports, `PORT` or `PORT-PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortRange {
    pub(crate) low: u16,
    pub(crate) high: u16,
}

impl PortRange {
    pub(super) fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "invalid port {p:?} in {text:?}: expected PORT or PORT-PORT, e.g. 8080 or \
                 8000-8099 (1-65535)"
            )),
            Ok(port) => Ok(port),
        };
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (port(low)?, port(high)?),
            None => (port(text)?, port(text)?),
        };
        if low > high {
            return Err(format!("port range {text:?} ends before it starts"));
        }
        Ok(PortRange { low, high })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// What becomes of plaintext TCP from other hosts to a protected port, as
/// Istio's PeerAuthentication modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Inbound {
    /// Refused with a TCP reset: mesh peers must come through HBONE.
    Strict,
    /// Let through and counted (the rule's counter), while clients move
    /// to the mesh.
    Permissive,
}

impl Rules<'_> {
    /// The nft script that installs the rules (replacing any earlier ones).
    pub(super) fn script(&self) -> String {
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
        let _ = writeln!(out, "\t\tmeta mark {:#010x} return", self.mark);
        // This host's own addresses are not tunnelled to itself: its
        // server's connections to local apps would come back here.
        let _ = writeln!(out, "\t\tfib daddr type local return");
        for rule in self.mesh {
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
                rule.net, self.listen_port
            );
        }
        let _ = writeln!(out, "\t}}");
        if !self.protect.is_empty() {
            self.input_chain(&mut out);
        }
        let _ = writeln!(out, "}}");
        out
    }

    /// Plaintext TCP from other hosts to the protected ports. What comes
    /// in on the loopback interface is this host's own, and that includes
    /// its HBONE server delivering tunnels to local apps, even at the
    /// host's external address.
    fn input_chain(&self, out: &mut String) {
        let ports = self
            .protect
            .iter()
            .map(PortRange::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // Each counts connections: a refused SYN is answered with a reset
        // (no retries), and of a connection let through only its first
        // packet is new to connection tracking.
        let verdict = match self.inbound {
            Inbound::Strict => " counter reject with tcp reset",
            Inbound::Permissive => " ct state new counter",
        };
        let _ = writeln!(out, "\tchain input {{");
        let _ = writeln!(out, "\t\ttype filter hook input priority 0; policy accept;");
        let _ = writeln!(out, "\t\tiifname \"lo\" return");
        let _ = writeln!(out, "\t\ttcp dport {{ {ports} }}{verdict}");
        let _ = writeln!(out, "\t}}");
    }
}

impl Inbound {
    /// The `mode` label of the plaintext-connection metric.
    pub(super) fn label(self) -> &'static str {
        match self {
            Inbound::Strict => "strict",
            Inbound::Permissive => "permissive",
        }
    }
}

/// Plaintext connections the protecting rule has counted, read from the
/// installed input chain (`nft -j`).
pub(super) fn plaintext_connections(nft: &str) -> anyhow::Result<u64> {
    let output = Command::new(nft)
        .args(["-j", "list", "chain", "inet", TABLE, "input"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {nft}"))?;
    if !output.status.success() {
        bail!(
            "{nft} cannot list the input chain: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    counted_packets(&output.stdout)
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

/// The script that removes the rules (and succeeds when they are gone).
pub(super) fn removal_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Runs `nft -f -` on `script`, with an error that says what to do when
/// nft is missing or may not change the rules.
pub(super) fn apply(nft: &str, script: &str) -> anyhow::Result<()> {
    let mut child = match Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "cannot run {nft}: not found. Install nftables (Debian and Ubuntu: apt install \
             nftables), or start with --no-install-rules and install the rules that \
             --print-rules shows yourself"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot run {nft}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // An nft that exits early is judged by its status and message.
        match stdin.write_all(script.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).with_context(|| format!("writing the rules to {nft}"));
            }
            _ => {}
        }
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {nft}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        bail!(
            "{nft} may not change the firewall rules: installing them needs CAP_NET_ADMIN (run \
             as root, or grant the capability), or start with --no-install-rules and have an \
             administrator install what --print-rules shows. nft said: {stderr}"
        );
    }
    bail!("{nft} refused the rules ({}): {stderr}", output.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_redirects_the_mesh_and_lets_marked_traffic_pass() {
        let mesh: Vec<TargetRule> = ["10.0.0.0/24:8080", "10.1.0.0/16:80-90", "[fd00::/64]"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        let script = Rules {
            mesh: &mesh,
            listen_port: 15001,
            mark: 0x539,
            protect: &[],
            inbound: Inbound::Strict,
        }
        .script();
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
            Rules {
                mesh: &[],
                listen_port: 15001,
                mark: 0x539,
                protect: &protect,
                inbound,
            }
            .script()
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
    fn port_ranges_parse_strictly() {
        assert_eq!(
            "8080".parse::<PortRange>(),
            Ok(PortRange {
                low: 8080,
                high: 8080
            })
        );
        assert_eq!("80-90".parse::<PortRange>().unwrap().to_string(), "80-90");
        for bad in ["0", "65536", "90-80", "http", "80-", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} was accepted");
        }
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
