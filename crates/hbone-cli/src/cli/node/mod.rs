//! `hbone node`: this host as a mesh node. Its outbound TCP to the mesh
//! is redirected by firewall rules (nftables, or iptables) to a capture
//! listener and tunnelled over HBONE to port 15008 of the address it was
//! going to, or through the gateway of the remote network it is on;
//! plaintext TCP from other hosts to its protected ports is refused, or
//! counted.

mod iptables;
mod nftables;
mod rules;

pub(super) use rules::Firewall;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use hbone::config::{Timeouts, parse_duration};
use hbone::entry::capture::{self, CaptureConfig, HBONE_PORT, Peer, Peers, RemoteNetwork};
use hbone::policy::{IpNet, TargetRule};
use hbone::{Dialer, DialerConfig};

use super::args::{ConfigArg, IdentityArgs};
use super::ops::Ops;
use super::revocation::RevocationArgs;
use super::sandbox::find_program;

#[derive(Args)]
pub(super) struct NodeArgs {
    #[command(flatten)]
    pub(super) config_file: ConfigArg,
    #[command(flatten)]
    pub(super) identity: IdentityArgs,
    #[command(flatten)]
    pub(super) revocation: RevocationArgs,
    /// Where redirected connections arrive: a loopback address (the rules
    /// redirect to this host) or an unspecified one.
    #[arg(long, default_value = "127.0.0.1:15001", value_parser = super::parse_ip_port)]
    pub(super) listen: SocketAddr,
    /// Destinations to capture, CIDR[:PORT|:PORT-PORT] (IPv6 in brackets);
    /// repeatable. Each must be covered by a peer.
    #[arg(
        long = "mesh",
        value_name = "CIDR[:PORTS]",
        required_unless_present = "print_rules"
    )]
    pub(super) mesh: Vec<TargetRule>,
    /// The identities the nodes of a network prove, CIDR=SPIFFE_ID, several
    /// IDs comma-separated, a trust domain alone (spiffe://TD) for any
    /// workload of it; repeatable (the most specific network wins).
    /// Captured connections to addresses in no peer network are closed.
    #[arg(
        long = "peer",
        value_name = "CIDR=SPIFFE_ID[,...]",
        required_unless_present = "print_rules"
    )]
    pub(super) peers: Vec<Peer>,
    /// A network this host cannot reach but its gateway can,
    /// CIDR=GATEWAY_ADDR:PORT,GATEWAY_ID[,...]; repeatable (the most
    /// specific network wins). Its connections go as double HBONE through
    /// the gateway, which must prove a GATEWAY_ID, for the service
    /// ORIGINAL_IP:PORT; the destination's node must still prove its --peer
    /// identity, so each remote network must be covered by a peer.
    #[arg(
        long = "remote",
        value_name = "CIDR=GATEWAY_ADDR:PORT,GATEWAY_ID[,...]"
    )]
    pub(super) remotes: Vec<RemoteNetwork>,
    /// Mesh destinations that no --peer covers: `pass` requires every
    /// --mesh to be covered, so only peers are captured and all other
    /// traffic leaves untouched; `refuse` lets a --mesh reach beyond the
    /// peers, and its addresses in no peer network are captured and closed
    /// (with an access record), so nothing in that range leaves in plaintext.
    #[arg(long, value_enum, default_value = "pass")]
    pub(super) unknown_destinations: UnknownDestinations,
    /// The port of the peers' HBONE servers.
    #[arg(long, value_name = "PORT", default_value_t = HBONE_PORT)]
    pub(super) server_port: u16,
    /// Local ports that other hosts may reach only through HBONE (this
    /// host's server delivers tunnels to them), PORT or PORT-PORT;
    /// repeatable. What becomes of plaintext TCP to them: --inbound.
    #[arg(long = "protect", value_name = "PORTS")]
    pub(super) protect: Vec<rules::PortRange>,
    /// Plaintext TCP from other hosts to a protected port: `strict` refuses
    /// it (TCP reset), `permissive` lets it through and counts it in the
    /// rule's counter (`nft list chain inet hbone input`, or `iptables -L
    /// HBONE-INPUT -v`), as Istio's PeerAuthentication STRICT and
    /// PERMISSIVE.
    #[arg(long, value_enum, default_value = "strict")]
    pub(super) inbound: rules::Inbound,
    /// Firewall mark on this node's own connections to peers, which the
    /// rules let pass uncaptured (decimal or 0x hex; the default is the
    /// mark Istio uses, 1337).
    #[arg(long, value_name = "MARK", default_value = "0x539", value_parser = parse_mark)]
    pub(super) socket_mark: u32,
    /// Do not install the firewall rules (an administrator installs what
    /// --print-rules shows).
    #[arg(long)]
    pub(super) no_install_rules: bool,
    /// Print the rules this node would install (an nft script, or
    /// iptables-restore input for each address family), and exit.
    #[arg(long)]
    pub(super) print_rules: bool,
    /// The firewall that carries the rules: `nftables` (a table of hbone's
    /// own), `iptables` (chains of hbone's own, with iptables and ip6tables,
    /// for hosts that have no nftables), or `auto`: nftables when its nft
    /// program is found, else iptables.
    #[arg(long, value_enum, default_value = "auto")]
    pub(super) firewall: rules::FirewallChoice,
    /// The nft program that installs the rules.
    #[arg(long, value_name = "PATH", default_value = "nft")]
    pub(super) nft: String,
    /// Timeout for TCP connect to a peer's HBONE server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(super) connect_timeout: Duration,
    /// Timeout for the TLS and HTTP/2 handshakes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) handshake_timeout: Duration,
    /// On SIGTERM or Ctrl-C: stop accepting and give open tunnels this long
    /// to finish; the rules are removed first, so new connections are no
    /// longer captured.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(super) drain_timeout: Duration,
}

/// What becomes of connections to mesh destinations outside the peers
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum UnknownDestinations {
    /// Never captured: each --mesh must lie within the peers' networks.
    Pass,
    /// Captured and closed.
    Refuse,
}

fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0) => Err("mark 0 is every unmarked connection; give a non-zero mark".into()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("invalid mark {text:?} (decimal or 0x hex): {e}")),
    }
}

impl NodeArgs {
    /// The firewall `--firewall` names; `auto` looks for nft as its start
    /// would, and settles on iptables only when iptables is there instead.
    pub(super) fn firewall(&self) -> rules::Firewall {
        let nftables = rules::Firewall::Nftables(self.nft.clone());
        match self.firewall {
            rules::FirewallChoice::Nftables => nftables,
            rules::FirewallChoice::Iptables => rules::Firewall::Iptables,
            rules::FirewallChoice::Auto => {
                if find_program(&self.nft).is_none() && find_program("iptables").is_some() {
                    rules::Firewall::Iptables
                } else {
                    nftables
                }
            }
        }
    }

    fn rules(&self) -> rules::Rules<'_> {
        rules::Rules {
            mesh: &self.mesh,
            listen_port: self.listen.port(),
            mark: self.socket_mark,
            protect: &self.protect,
            inbound: self.inbound,
        }
    }

    /// Refuses settings under which captured traffic could not work.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(range) = self.protect.iter().find(|r| r.contains(self.server_port)) {
            bail!(
                "--protect {range} takes in port {}, where peers' HBONE arrives: refusing \
                 plaintext there would refuse HBONE too; protect the apps' ports only",
                self.server_port
            );
        }
        let ip = self.listen.ip();
        if !(ip.is_loopback() || ip.is_unspecified()) {
            bail!(
                "--listen {}: redirected connections arrive on this host's loopback address; \
                 listen on 127.0.0.1, ::1, 0.0.0.0 or ::",
                self.listen
            );
        }
        for remote in &self.remotes {
            if !self.covered(remote.net) {
                bail!(
                    "--remote {remote}: {} is not covered by any --peer network, so the \
                     identity of its nodes is unknown; add --peer {}=SPIFFE_ID",
                    remote.net,
                    remote.net
                );
            }
        }
        for mesh in &self.mesh {
            let family_ok = if mesh.net.addr().is_ipv4() {
                ip.is_ipv4() || ip.is_unspecified()
            } else {
                ip.is_ipv6()
            };
            if !family_ok {
                bail!(
                    "--mesh {mesh}: --listen {} cannot take redirected connections of this \
                     address family; listen on [::1] or [::] for IPv6 (one node per family)",
                    self.listen
                );
            }
            if self.unknown_destinations == UnknownDestinations::Pass && !self.covered(mesh.net) {
                bail!(
                    "--mesh {mesh} is not covered by any --peer network: its connections \
                     would be captured and then refused; add --peer {}=SPIFFE_ID, or \
                     --unknown-destinations refuse if that is what you want",
                    mesh.net
                );
            }
        }
        Ok(())
    }

    /// Whether every address of `net` is in a peer network.
    fn covered(&self, net: IpNet) -> bool {
        self.peers
            .iter()
            .any(|p| p.net.prefix() <= net.prefix() && p.net.contains(net.addr()))
    }
}

/// Runs the node until SIGTERM or Ctrl-C: rules in, capture, rules out.
pub(super) async fn run_node(args: NodeArgs, ops: &Ops) -> anyhow::Result<()> {
    if args.print_rules {
        bail!("print-rules is for the command line: hbone node --config FILE --print-rules");
    }
    args.check()?;
    hbone::client::check_socket_mark(args.socket_mark).map_err(|e| {
        anyhow::anyhow!(
            "{e}: the node marks its own connections so that the capture rules let them \
             pass; run it as root, or grant it CAP_NET_ADMIN"
        )
    })?;
    let obtained = args.identity.obtain().await?;
    ops.identity_in_use(&obtained.identity);
    let mut config = DialerConfig::default()
        .with_timeouts(
            Timeouts::default()
                .with_connect(args.connect_timeout)
                .with_handshake(args.handshake_timeout),
        )
        .with_telemetry(ops.telemetry.clone())
        .with_revocation(args.revocation.load()?)
        .with_socket_mark(args.socket_mark);
    config.workers = ops.workers();
    let dialer = Dialer::with_config(&obtained.identity, config)?;
    // Renewed certificates and revocation lists reach new connections.
    super::commands::watch_dialer_sources(&dialer, &args.identity, &args.revocation, obtained, ops);
    let listener = super::commands::bind_entry(args.listen, ops).await?;
    let installed = !args.no_install_rules;
    let firewall = args.firewall();
    if installed {
        firewall.install(&args.rules())?;
        tracing::info!(rules = %firewall.holder(), "capture rules installed");
    }
    if let Some(metrics) = &ops.telemetry.metrics
        && !args.protect.is_empty()
    {
        tokio::spawn(count_plaintext(
            firewall.clone(),
            args.inbound,
            metrics.clone(),
        ));
    }
    ops.listener_bound();
    tracing::info!(
        listen = %listener.local_addr()?, id = %dialer.local_id(),
        mesh = args.mesh.len(), peers = args.peers.len(), remotes = args.remotes.len(),
        protected = args.protect.len(),
        inbound = ?args.inbound, "node ready"
    );
    let capture = CaptureConfig::new(Peers::new(args.peers.clone()))
        .with_server_port(args.server_port)
        .with_remotes(args.remotes.clone());
    let serving = capture::serve(
        listener,
        dialer.clone(),
        capture,
        args.identity.access_log(),
        ops.shutdown_requested(),
    );
    tokio::pin!(serving);
    // The entry itself stops accepting once shutdown is requested.
    let finished = tokio::select! {
        () = &mut serving => true,
        () = ops.shutdown_requested() => false,
    };
    if installed {
        match firewall.remove() {
            Ok(()) => tracing::info!(rules = %firewall.holder(), "capture rules removed"),
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "could not remove the capture rules; remove them with: {}",
                firewall.removal_hint()
            ),
        }
    }
    tracing::info!(
        deadline_s = args.drain_timeout.as_secs_f64(),
        "draining: stopped accepting; waiting for open tunnels"
    );
    if !finished
        && tokio::time::timeout(args.drain_timeout, serving)
            .await
            .is_err()
    {
        tracing::warn!("drain deadline passed; closing what is left");
    }
    if !dialer.close(Duration::from_secs(2)).await {
        tracing::info!("stopping with HBONE connections still open");
    }
    Ok(())
}

/// How often the protecting rule's counter is read into the metrics.
const PLAINTEXT_COUNT_EVERY: Duration = Duration::from_secs(5);

/// Copies the firewall's count of plaintext connections to protected
/// ports into `hbone_inbound_plaintext_connections_total` every few
/// seconds. A failed read (rules installed by hand, not yet, or removed)
/// is logged once and retried.
async fn count_plaintext(
    firewall: rules::Firewall,
    inbound: rules::Inbound,
    metrics: Arc<hbone::metrics::Metrics>,
) {
    let mut every = tokio::time::interval(PLAINTEXT_COUNT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        every.tick().await;
        let firewall = firewall.clone();
        let read = tokio::task::spawn_blocking(move || firewall.plaintext_connections()).await;
        match read {
            Ok(Ok(total)) => metrics.inbound_plaintext(inbound.label(), total),
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(
                    "cannot read the count of plaintext connections to protected ports: {e:#}"
                );
            }
            _ => {}
        }
    }
}

/// `--print-rules`: the script, for an administrator.
pub(super) fn print_rules(args: &NodeArgs) -> anyhow::Result<()> {
    args.check()?;
    print!("{}", args.firewall().script(&args.rules()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_decimal_and_hex() {
        assert_eq!(parse_mark("1337"), Ok(0x539));
        assert_eq!(parse_mark("0x539"), Ok(0x539));
        assert!(parse_mark("0").unwrap_err().contains("non-zero"));
        assert!(parse_mark("0xzz").unwrap_err().contains("invalid mark"));
    }

    #[test]
    fn auto_takes_nftables_when_nft_is_there() {
        let firewall = |extra: &[&str]| {
            let mut argv = vec!["hbone", "node", "--print-rules"];
            argv.extend_from_slice(extra);
            match <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
                .unwrap()
                .command
            {
                crate::cli::Command::Node { args, .. } => args.firewall(),
                _ => unreachable!("a node"),
            }
        };
        let sh = Firewall::Nftables("/bin/sh".into());
        assert_eq!(firewall(&["--nft", "/bin/sh"]), sh);
        assert_eq!(
            firewall(&["--nft", "/bin/sh", "--firewall", "nftables"]),
            sh
        );
        assert_eq!(
            firewall(&["--nft", "/bin/sh", "--firewall", "iptables"]),
            Firewall::Iptables
        );
        // No nft: iptables where it is found; else nftables, whose start
        // says what to install.
        let missing = firewall(&["--nft", "/nonexistent/nft"]);
        if find_program("iptables").is_some() {
            assert_eq!(missing, Firewall::Iptables);
        } else {
            assert_eq!(missing, Firewall::Nftables("/nonexistent/nft".into()));
        }
    }
}
