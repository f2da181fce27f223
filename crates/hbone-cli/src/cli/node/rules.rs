//! The firewall rules of a mesh node, whichever firewall carries them:
//! this host's TCP towards the mesh is redirected to the capture listener,
//! except hbone's own connections (carrying its socket mark); plaintext TCP
//! from other hosts to protected ports is refused, or counted. The
//! firewalls' own forms are in `nftables` and `iptables`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::ValueEnum;
use hbone::policy::TargetRule;

use super::{iptables, nftables};

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

impl Inbound {
    /// The `mode` label of the plaintext-connection metric.
    pub(super) fn label(self) -> &'static str {
        match self {
            Inbound::Strict => "strict",
            Inbound::Permissive => "permissive",
        }
    }
}

/// Which firewall `--firewall` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FirewallChoice {
    /// nftables when its nft program is found, else iptables.
    Auto,
    /// A table of hbone's own, installed with nft.
    Nftables,
    /// Chains of hbone's own, installed with iptables-restore and
    /// ip6tables-restore, for hosts that have only iptables.
    Iptables,
}

/// The firewall that carries the rules, and the programs it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Firewall {
    /// The nft program (a path, or a name found in `PATH`).
    Nftables(String),
    /// iptables, ip6tables and their `-restore` programs, found in `PATH`.
    Iptables,
}

impl Firewall {
    /// Installs `rules`, replacing what an earlier start left.
    pub(super) fn install(&self, rules: &Rules) -> anyhow::Result<()> {
        match self {
            Firewall::Nftables(nft) => nftables::install(nft, rules),
            Firewall::Iptables => iptables::install(rules),
        }
    }

    /// Removes the rules; succeeds when they are gone already.
    pub(super) fn remove(&self) -> anyhow::Result<()> {
        match self {
            Firewall::Nftables(nft) => nftables::remove(nft),
            Firewall::Iptables => iptables::remove(),
        }
    }

    /// Plaintext connections to the protected ports counted so far.
    pub(super) fn plaintext_connections(&self) -> anyhow::Result<u64> {
        match self {
            Firewall::Nftables(nft) => nftables::plaintext_connections(nft),
            Firewall::Iptables => iptables::plaintext_connections(),
        }
    }

    /// What an administrator installs (`--print-rules`).
    pub(super) fn script(&self, rules: &Rules) -> String {
        match self {
            Firewall::Nftables(_) => nftables::script(rules),
            Firewall::Iptables => iptables::script(rules),
        }
    }

    /// The commands that remove the rules by hand.
    pub(super) fn removal_hint(&self) -> String {
        match self {
            Firewall::Nftables(_) => nftables::removal_hint(),
            Firewall::Iptables => iptables::removal_hint(),
        }
    }

    /// Where the rules live, for the log.
    pub(super) fn holder(&self) -> String {
        match self {
            Firewall::Nftables(_) => format!("nftables table inet {}", nftables::TABLE),
            Firewall::Iptables => iptables::holder(),
        }
    }

    /// The programs the node runs: all of them to install the rules
    /// (`installs`), else only those that read the counter.
    pub(crate) fn programs(&self, installs: bool) -> Vec<String> {
        match self {
            Firewall::Nftables(nft) => vec![nft.clone()],
            Firewall::Iptables => iptables::programs(installs)
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        }
    }
}

/// Runs `program` with `args`, writing `input` (if any) to its standard
/// input, and returns its standard output; the error says what to do when
/// the program is missing (install `package`) or may not change the rules.
pub(super) fn run(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    package: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "cannot run {program}: not found. Install {package}, or start with \
             --no-install-rules and install the rules that --print-rules shows yourself"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot run {program}")),
    };
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // A program that exits early is judged by its status and message.
        match stdin.write_all(input.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).with_context(|| format!("writing the rules to {program}"));
            }
            _ => {}
        }
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        bail!(
            "{program} may not change the firewall rules: installing them needs CAP_NET_ADMIN \
             (run as root, or grant the capability), or start with --no-install-rules and have \
             an administrator install what --print-rules shows. {program} said: {stderr}"
        );
    }
    if input.is_some() {
        bail!("{program} refused the rules ({}): {stderr}", output.status)
    }
    bail!(
        "{program} {} failed ({}): {stderr}",
        args.join(" "),
        output.status
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
