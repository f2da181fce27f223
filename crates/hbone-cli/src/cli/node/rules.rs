//! The nftables rules of a mesh node: hbone's own table, whose `output`
//! NAT chain redirects this host's TCP towards the mesh to the capture
//! listener, and lets hbone's own connections (carrying its socket mark)
//! pass. Applied with `nft -f -`, atomically; the script first deletes the
//! table, so applying it twice, or after a crash, leaves one table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
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
        let _ = writeln!(out, "}}");
        out
    }
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
