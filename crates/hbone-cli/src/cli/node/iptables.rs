//! The rules as iptables, for hosts without nftables: chains of hbone's
//! own, `HBONE-OUTPUT` in the `nat` table (jumped to from `OUTPUT`) and
//! `HBONE-INPUT` in `filter` (from `INPUT`), for IPv4 with iptables and
//! IPv6 with ip6tables. Each family changes in one `iptables-restore
//! --noflush` transaction, planned from what is installed: hbone's chains
//! are flushed and refilled, and a jump is added only where there is none
//! (extra ones are deleted), so applying twice, or after a crash, leaves
//! one jump and one copy of each chain.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use hbone::policy::IpNet;

use super::rules::{self, Inbound, Rules};

/// The package that has the iptables programs, for the error when one is
/// missing.
const PACKAGE: &str = "iptables (Debian and Ubuntu: apt install iptables)";

/// hbone's chain in a table, and the built-in chain that jumps to it.
struct Hook {
    table: &'static str,
    builtin: &'static str,
    chain: &'static str,
}

/// Outbound capture: NAT, as this host's connections start.
const NAT: Hook = Hook {
    table: "nat",
    builtin: "OUTPUT",
    chain: "HBONE-OUTPUT",
};

/// Inbound protection of local ports.
const FILTER: Hook = Hook {
    table: "filter",
    builtin: "INPUT",
    chain: "HBONE-INPUT",
};

/// iptables keeps the families apart: one set of programs each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn holds(self, net: IpNet) -> bool {
        net.addr().is_ipv4() == (self == Family::V4)
    }
}

/// What of a hook is installed already, read from `iptables -t TABLE -S`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Installed {
    chain: bool,
    jumps: usize,
}

impl Installed {
    fn read(listing: &str, hook: &Hook) -> Self {
        let chain = format!("-N {}", hook.chain);
        let jump = format!("-A {} -j {}", hook.builtin, hook.chain);
        Installed {
            chain: listing.lines().any(|line| line.trim() == chain),
            jumps: listing.lines().filter(|line| line.trim() == jump).count(),
        }
    }
}

/// The rules of `HBONE-OUTPUT` for one family: hbone's own connections
/// (the mark) and this host's own addresses pass, the mesh is redirected.
fn output_rules(rules: &Rules, family: Family) -> Vec<String> {
    let mut out = vec![
        format!("-m mark --mark {:#x} -j RETURN", rules.mark),
        // Not tunnelled to itself: its server's connections to local apps
        // would come back here.
        "-m addrtype --dst-type LOCAL -j RETURN".to_owned(),
    ];
    for rule in rules.mesh.iter().filter(|r| family.holds(r.net)) {
        let ports = match rule.ports {
            (1, u16::MAX) => "-p tcp".to_owned(),
            (low, high) if low == high => format!("-p tcp --dport {low}"),
            (low, high) => format!("-p tcp --dport {low}:{high}"),
        };
        out.push(format!(
            "-d {} {ports} -j REDIRECT --to-ports {}",
            rule.net, rules.listen_port
        ));
    }
    out
}

/// The rules of `HBONE-INPUT`, when ports are protected. Each protecting
/// rule's packet counter counts connections, as the nftables counter does:
/// a refused SYN is answered with a reset, and of a connection let through
/// only its first packet is new to connection tracking. What comes in on
/// the loopback interface is this host's own (its server delivering
/// tunnels included).
fn input_rules(rules: &Rules) -> Option<Vec<String>> {
    if rules.protect.is_empty() {
        return None;
    }
    let verdict = match rules.inbound {
        Inbound::Strict => "-j REJECT --reject-with tcp-reset",
        Inbound::Permissive => "-m conntrack --ctstate NEW",
    };
    let mut out = vec!["-i lo -j RETURN".to_owned()];
    for range in rules.protect {
        let ports = if range.low == range.high {
            range.low.to_string()
        } else {
            format!("{}:{}", range.low, range.high)
        };
        out.push(format!("-p tcp --dport {ports} {verdict}"));
    }
    Some(out)
}

/// One table's part of the restore input: hbone's chain filled with
/// `chain_rules` and jumped to once, or (`None`) gone.
fn table(out: &mut String, hook: &Hook, chain_rules: Option<Vec<String>>, installed: Installed) {
    let (chain, builtin) = (hook.chain, hook.builtin);
    let mut lines = Vec::new();
    match chain_rules {
        Some(chain_rules) => {
            lines.push(format!(":{chain} - [0:0]"));
            lines.push(format!("-F {chain}"));
            lines.extend(chain_rules.iter().map(|rule| format!("-A {chain} {rule}")));
            // First, ahead of rules that could accept or rewrite first.
            if installed.jumps == 0 {
                lines.push(format!("-I {builtin} 1 -j {chain}"));
            }
            for _ in 1..installed.jumps {
                lines.push(format!("-D {builtin} -j {chain}"));
            }
        }
        None => {
            for _ in 0..installed.jumps {
                lines.push(format!("-D {builtin} -j {chain}"));
            }
            if installed.chain {
                lines.push(format!("-F {chain}"));
                lines.push(format!("-X {chain}"));
            }
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(out, "*{}", hook.table);
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "COMMIT");
}

/// The `iptables-restore --noflush` input for `family` that installs
/// `rules`, or (`None`) removes hbone's chains, given what is installed;
/// empty when there is nothing to do.
fn restore_input(
    rules: Option<&Rules>,
    family: Family,
    nat: Installed,
    filter: Installed,
) -> String {
    let mut out = String::new();
    table(&mut out, &NAT, rules.map(|r| output_rules(r, family)), nat);
    table(&mut out, &FILTER, rules.and_then(input_rules), filter);
    out
}

/// What an administrator installs, per family (`--print-rules`).
pub(super) fn script(rules: &Rules) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# hbone node: capture outbound TCP to the mesh, with iptables and ip6tables."
    );
    let _ = writeln!(
        out,
        "# Add each jump (-I) once only; hbone node checks for one first."
    );
    let _ = writeln!(out, "# Remove with: {}", removal_hint());
    for family in FAMILIES {
        let none = Installed::default();
        let _ = writeln!(
            out,
            "# {}, for: {} --noflush",
            family.name(),
            family.restore()
        );
        out.push_str(&restore_input(Some(rules), family, none, none));
    }
    out
}

/// What is installed of `family` now.
fn installed(family: Family) -> anyhow::Result<(Installed, Installed)> {
    let read = |hook: &Hook| -> anyhow::Result<Installed> {
        let listing = rules::run(
            family.iptables(),
            &["-w", "-t", hook.table, "-S"],
            None,
            PACKAGE,
        )?;
        Ok(Installed::read(&String::from_utf8_lossy(&listing), hook))
    };
    Ok((read(&NAT)?, read(&FILTER)?))
}

/// Plans and applies, family by family.
fn change(rules: Option<&Rules>) -> anyhow::Result<()> {
    for family in FAMILIES {
        let (nat, filter) = installed(family)?;
        let input = restore_input(rules, family, nat, filter);
        if !input.is_empty() {
            rules::run(
                family.restore(),
                &["-w", "--noflush"],
                Some(&input),
                PACKAGE,
            )?;
        }
    }
    Ok(())
}

/// Installs `rules`, replacing what an earlier start left. The families
/// are two transactions: when the second fails, the first is taken back
/// (as far as it can be), so a node that stops here captures nothing.
pub(super) fn install(rules: &Rules) -> anyhow::Result<()> {
    change(Some(rules)).inspect_err(|_| {
        let _ = change(None);
    })
}

/// Removes hbone's jumps and chains (and succeeds when they are gone).
pub(super) fn remove() -> anyhow::Result<()> {
    change(None)
}

/// The commands that remove the rules by hand.
pub(super) fn removal_hint() -> String {
    let mut steps = Vec::new();
    for hook in [&NAT, &FILTER] {
        let (table, chain) = (hook.table, hook.chain);
        steps.push(format!(
            "iptables -t {table} -D {} -j {chain}",
            hook.builtin
        ));
        steps.push(format!("iptables -t {table} -F {chain}"));
        steps.push(format!("iptables -t {table} -X {chain}"));
    }
    format!("{}; the same with ip6tables", steps.join("; "))
}

/// Where the rules live, for the log.
pub(super) fn holder() -> String {
    format!(
        "iptables and ip6tables chains {} ({}) and {} ({})",
        NAT.chain, NAT.table, FILTER.chain, FILTER.table
    )
}

/// The programs the node runs: the restore programs only to install.
pub(super) fn programs(installs: bool) -> &'static [&'static str] {
    const ALL: [&str; 4] = [
        "iptables",
        "ip6tables",
        "iptables-restore",
        "ip6tables-restore",
    ];
    if installs { &ALL } else { &ALL[..2] }
}

/// Plaintext connections the protecting rules have counted, both families.
/// A family whose chain cannot be read counts nothing (an administrator
/// may have installed the IPv4 rules only); an error only when neither can.
pub(super) fn plaintext_connections() -> anyhow::Result<u64> {
    let read = |family: Family| -> anyhow::Result<u64> {
        let args = [
            "-w",
            "-t",
            FILTER.table,
            "-L",
            FILTER.chain,
            "-v",
            "-x",
            "-n",
        ];
        let listing = rules::run(family.iptables(), &args, None, PACKAGE)?;
        counted_packets(&String::from_utf8_lossy(&listing))
    };
    match (read(Family::V4), read(Family::V6)) {
        (Err(e), Err(_)) => Err(e),
        (v4, v6) => Ok(v4.unwrap_or(0) + v6.unwrap_or(0)),
    }
}

/// The packets of the protecting rules (those matching a destination
/// port) in `iptables -L CHAIN -v -x -n`, whose first column is packets.
fn counted_packets(listing: &str) -> anyhow::Result<u64> {
    if !listing.starts_with(&format!("Chain {} ", FILTER.chain)) {
        bail!("no {} chain in iptables' listing", FILTER.chain);
    }
    let mut total = 0;
    for line in listing.lines() {
        if !(line.contains(" dpt:") || line.contains(" dpts:")) {
            continue;
        }
        let packets = line.split_whitespace().next().unwrap_or_default();
        total += packets
            .parse::<u64>()
            .with_context(|| format!("no packet count in iptables' line {line:?}"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use hbone::policy::TargetRule;

    use super::super::rules::PortRange;
    use super::*;

    fn mesh() -> Vec<TargetRule> {
        [
            "10.0.0.0/24:8080",
            "10.1.0.0/16:80-90",
            "10.2.0.0/16",
            "[fd00::/64]",
            "[fd01::/64]:443",
        ]
        .iter()
        .map(|m| m.parse().unwrap())
        .collect()
    }

    fn protect() -> Vec<PortRange> {
        ["8080", "5432-5433"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    #[test]
    fn each_family_redirects_its_mesh_and_lets_marked_traffic_pass() {
        let mesh = mesh();
        let rules = Rules {
            mesh: &mesh,
            listen_port: 15001,
            mark: 0x10,
            protect: &[],
            inbound: Inbound::Strict,
        };
        let none = Installed::default();
        assert_eq!(
            restore_input(Some(&rules), Family::V4, none, none),
            "\
*nat
:HBONE-OUTPUT - [0:0]
-F HBONE-OUTPUT
-A HBONE-OUTPUT -m mark --mark 0x10 -j RETURN
-A HBONE-OUTPUT -m addrtype --dst-type LOCAL -j RETURN
-A HBONE-OUTPUT -d 10.0.0.0/24 -p tcp --dport 8080 -j REDIRECT --to-ports 15001
-A HBONE-OUTPUT -d 10.1.0.0/16 -p tcp --dport 80:90 -j REDIRECT --to-ports 15001
-A HBONE-OUTPUT -d 10.2.0.0/16 -p tcp -j REDIRECT --to-ports 15001
-I OUTPUT 1 -j HBONE-OUTPUT
COMMIT
"
        );
        assert_eq!(
            restore_input(Some(&rules), Family::V6, none, none),
            "\
*nat
:HBONE-OUTPUT - [0:0]
-F HBONE-OUTPUT
-A HBONE-OUTPUT -m mark --mark 0x10 -j RETURN
-A HBONE-OUTPUT -m addrtype --dst-type LOCAL -j RETURN
-A HBONE-OUTPUT -d fd00::/64 -p tcp -j REDIRECT --to-ports 15001
-A HBONE-OUTPUT -d fd01::/64 -p tcp --dport 443 -j REDIRECT --to-ports 15001
-I OUTPUT 1 -j HBONE-OUTPUT
COMMIT
"
        );
        let printed = script(&rules);
        let v4 = printed.find("# IPv4, for: iptables-restore --noflush\n*nat\n");
        let v6 = printed.find("# IPv6, for: ip6tables-restore --noflush\n*nat\n");
        assert!(v4.is_some() && v6 > v4, "{printed}");
        assert!(printed.contains("# Remove with: iptables -t nat -D OUTPUT"));
    }

    #[test]
    fn protected_ports_refuse_or_count_plaintext_in_both_families() {
        let protect = protect();
        let rules = |inbound| Rules {
            mesh: &[],
            listen_port: 15001,
            mark: 0x539,
            protect: &protect,
            inbound,
        };
        let none = Installed::default();
        let filter = |verdict: &str| {
            format!(
                "*filter\n:HBONE-INPUT - [0:0]\n-F HBONE-INPUT\n\
                 -A HBONE-INPUT -i lo -j RETURN\n\
                 -A HBONE-INPUT -p tcp --dport 8080 {verdict}\n\
                 -A HBONE-INPUT -p tcp --dport 5432:5433 {verdict}\n\
                 -I INPUT 1 -j HBONE-INPUT\nCOMMIT\n"
            )
        };
        for family in FAMILIES {
            let strict = restore_input(Some(&rules(Inbound::Strict)), family, none, none);
            assert!(
                strict.ends_with(&filter("-j REJECT --reject-with tcp-reset")),
                "{strict}"
            );
            assert!(strict.contains("--mark 0x539 -j RETURN"), "{strict}");
            let permissive = restore_input(Some(&rules(Inbound::Permissive)), family, none, none);
            assert!(
                permissive.ends_with(&filter("-m conntrack --ctstate NEW")),
                "{permissive}"
            );
        }
    }

    #[test]
    fn applying_again_keeps_one_jump_and_removal_leaves_nothing() {
        let protect = protect();
        let rules = Rules {
            mesh: &[],
            listen_port: 15001,
            mark: 0x539,
            protect: &protect,
            inbound: Inbound::Strict,
        };
        let once = Installed {
            chain: true,
            jumps: 1,
        };
        let again = restore_input(Some(&rules), Family::V4, once, once);
        assert!(!again.contains("-I "), "{again}");
        assert!(!again.contains("-D "), "{again}");
        assert!(again.contains(":HBONE-INPUT - [0:0]\n-F HBONE-INPUT\n"));
        // Jumps left over by an earlier crash in the middle: one stays.
        let thrice = Installed {
            chain: true,
            jumps: 3,
        };
        let fixed = restore_input(Some(&rules), Family::V4, thrice, once);
        assert_eq!(fixed.matches("-D OUTPUT -j HBONE-OUTPUT\n").count(), 2);
        // Protection dropped from the settings: its chain goes.
        let unprotected = Rules {
            protect: &[],
            ..rules
        };
        let input = restore_input(Some(&unprotected), Family::V4, once, once);
        assert!(
            input.ends_with(
                "*filter\n-D INPUT -j HBONE-INPUT\n-F HBONE-INPUT\n-X HBONE-INPUT\nCOMMIT\n"
            ),
            "{input}"
        );
        let removal = restore_input(None, Family::V6, thrice, once);
        assert_eq!(
            removal,
            "*nat\n-D OUTPUT -j HBONE-OUTPUT\n-D OUTPUT -j HBONE-OUTPUT\n\
             -D OUTPUT -j HBONE-OUTPUT\n-F HBONE-OUTPUT\n-X HBONE-OUTPUT\nCOMMIT\n\
             *filter\n-D INPUT -j HBONE-INPUT\n-F HBONE-INPUT\n-X HBONE-INPUT\nCOMMIT\n"
        );
        let none = Installed::default();
        assert_eq!(restore_input(None, Family::V4, none, none), "");
    }

    #[test]
    fn what_is_installed_is_read_from_the_listing() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N HBONE-OUTPUT\n-N OTHER\n\
                       -A OUTPUT -j HBONE-OUTPUT\n-A OUTPUT -p tcp -j HBONE-OUTPUT\n\
                       -A OUTPUT -j HBONE-OUTPUT\n-A HBONE-OUTPUT -m mark --mark 0x539 -j RETURN\n";
        assert_eq!(
            Installed::read(listing, &NAT),
            Installed {
                chain: true,
                jumps: 2
            }
        );
        assert_eq!(Installed::read(listing, &FILTER), Installed::default());
    }

    #[test]
    fn counters_are_read_from_the_listing() {
        let listing = "\
Chain HBONE-INPUT (1 references)
    pkts      bytes target     prot opt in     out     source               destination
      41     2460 RETURN     0    --  lo     *       0.0.0.0/0            0.0.0.0/0
       3      180            6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp dpt:8080 ctstate NEW
       2      120            6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp dpts:5432:5433 ctstate NEW
";
        assert_eq!(counted_packets(listing).unwrap(), 5);
        assert!(counted_packets("iptables: No chain/target/match by that name.").is_err());
        let garbled = "Chain HBONE-INPUT (1 references)\n  x  0 REJECT tcp dpt:8080\n";
        assert!(counted_packets(garbled).is_err());
    }

    #[test]
    fn a_missing_iptables_says_how_to_get_it() {
        let err = rules::run("/nonexistent/iptables-restore", &[], Some(""), PACKAGE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
        assert!(err.contains("apt install iptables"), "{err}");
        assert!(err.contains("--no-install-rules"), "{err}");
    }
}
