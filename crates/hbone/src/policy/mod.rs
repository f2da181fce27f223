//! Who may open a tunnel to what.
//!
//! A policy is a list of rules, each allowing or denying tunnels from some
//! peers (SPIFFE ID patterns, source networks) to some targets (networks and
//! port ranges). A matching deny rule wins over any allow rule, and a tunnel
//! no allow rule matches is denied (403). On top of the rules, targets that
//! are link-local, unspecified or broadcast need an allow rule naming them,
//! and the server's own listener is never a target.
//!
//! The server is not an open proxy: with no rules at all, any peer of its
//! trust domain may reach loopback targets and nothing else. The CLI's
//! `--allow-target` and `--allow-id` flags are shorthand for one allow
//! rule; a policy file (the `file` module, with the `files` feature)
//! holds any number.

#[cfg(feature = "files")]
pub mod file;
mod patterns;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

pub use patterns::{
    IdPattern, IdPatternError, IpNet, ServiceRule, ServiceRuleError, TargetRule, TargetRuleError,
};

use crate::authority::ServiceName;
use crate::identity::SpiffeId;

/// Why a tunnel was refused by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// No allow rule names the peer's identity at all.
    #[error("identity {0} is not allowed to open tunnels")]
    Identity(SpiffeId),
    /// Rules allow the peer's identity, but not from this source address.
    #[error("source {0} is outside the networks the rules allow this identity from")]
    Source(IpAddr),
    /// Rules allow the peer, but none for this target.
    #[error("target {0} is not allowed")]
    Target(SocketAddr),
    /// A deny rule matched.
    #[error("denied by rule {rule:?}")]
    Rule {
        /// The deny rule's name.
        rule: String,
    },
    /// The target is link-local, unspecified or broadcast, and no allow
    /// rule names it.
    #[error("target {0} is link-local, unspecified or broadcast; allowed only by a rule naming it")]
    BuiltIn(SocketAddr),
    /// The target is the server's own listener; the tunnel would loop.
    #[error("target {0} is this server's own listener")]
    OwnListener(SocketAddr),
}

impl Denial {
    /// The deciding rule, as a metric label: the rule's name, or a fixed
    /// word for the built-in decisions (never an address).
    pub fn rule_label(&self) -> String {
        match self {
            Denial::Rule { rule } => rule.clone(),
            Denial::Identity(_) | Denial::Source(_) | Denial::Target(_) => {
                "(no rule allows)".to_owned()
            }
            Denial::BuiltIn(_) | Denial::OwnListener(_) => "(built-in)".to_owned(),
        }
    }
}

/// Targets refused even when a broad rule covers them: link-local
/// addresses (cloud metadata services live at 169.254.169.254), the
/// unspecified addresses and IPv4 broadcast. A rule lifts one of these only
/// by naming a network inside it, e.g. `169.254.169.254/32:80`, never by
/// covering it (`0.0.0.0/0`).
const BUILT_IN_DENIALS: [(IpAddr, u8); 5] = [
    (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
    (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
    (IpAddr::V4(Ipv4Addr::BROADCAST), 32),
];

fn built_in_denial(ip: IpAddr) -> Option<IpNet> {
    BUILT_IN_DENIALS
        .iter()
        .filter_map(|&(addr, prefix)| IpNet::new(addr, prefix).ok())
        .find(|net| net.contains(ip))
}

/// What a rule does when it matches.
// Exhaustive on purpose: whoever reads a policy (a summary, a linter, a
// converter) must handle both actions to be right, and a third action
// would change what every rule means; it should break such code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let matching tunnels through (unless a deny rule matches too).
    Allow,
    /// Refuse matching tunnels, whatever allow rules say.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// One rule. An empty list matches anything. Build one with
/// [`Rule::allow`] or [`Rule::deny`] and the `from_*`/`to_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rule {
    /// Names the rule in denials, logs and metric labels.
    pub name: String,
    /// What the rule does when it matches.
    pub action: Action,
    /// Peers, by SPIFFE ID.
    pub from: Vec<IdPattern>,
    /// Peers, by the address their TCP connection comes from.
    pub source: Vec<IpNet>,
    /// Targets, by address (the address a service name resolved to).
    pub to: Vec<TargetRule>,
    /// Targets, by the service name a tunnel asked for. A rule with
    /// neither `to` nor `services` matches any target.
    pub services: Vec<ServiceRule>,
}

impl Rule {
    /// A rule named `name` that allows what it matches (everything, until
    /// narrowed).
    pub fn allow(name: impl Into<String>) -> Self {
        Self::new(name, Action::Allow)
    }

    /// A rule named `name` that denies what it matches.
    pub fn deny(name: impl Into<String>) -> Self {
        Self::new(name, Action::Deny)
    }

    fn new(name: impl Into<String>, action: Action) -> Self {
        Rule {
            name: name.into(),
            action,
            from: Vec::new(),
            source: Vec::new(),
            to: Vec::new(),
            services: Vec::new(),
        }
    }

    /// Narrows the rule to peers with these SPIFFE IDs.
    pub fn from_ids(mut self, ids: impl IntoIterator<Item = IdPattern>) -> Self {
        self.from.extend(ids);
        self
    }

    /// Narrows the rule to peers connecting from these networks.
    pub fn from_networks(mut self, networks: impl IntoIterator<Item = IpNet>) -> Self {
        self.source.extend(networks);
        self
    }

    /// Narrows the rule to these target addresses.
    pub fn to_targets(mut self, targets: impl IntoIterator<Item = TargetRule>) -> Self {
        self.to.extend(targets);
        self
    }

    /// Narrows the rule to tunnels that asked for these services by name.
    pub fn to_services(mut self, services: impl IntoIterator<Item = ServiceRule>) -> Self {
        self.services.extend(services);
        self
    }

    fn matches_peer(&self, peer: &SpiffeId, source: IpAddr) -> bool {
        (self.from.is_empty() || self.from.iter().any(|p| p.matches(peer)))
            && (self.source.is_empty() || self.source.iter().any(|n| n.contains(source)))
    }

    fn matches_target(&self, target: SocketAddr, service: Option<&ServiceName>) -> bool {
        (self.to.is_empty() && self.services.is_empty())
            || self.to.iter().any(|t| t.matches(target))
            || service.is_some_and(|name| {
                self.services
                    .iter()
                    .any(|s| s.matches(name.host(), name.port()))
            })
    }

    /// Whether the rule applies to every target.
    fn any_target(&self) -> bool {
        self.to.is_empty() && self.services.is_empty()
    }

    /// Whether the rule allows `target` despite a built-in denial of
    /// `denied`: only a target rule naming a network inside it does.
    fn names(&self, target: SocketAddr, denied: IpNet) -> bool {
        self.to.iter().any(|t| {
            t.matches(target) && denied.contains(t.net.addr()) && t.net.prefix() >= denied.prefix()
        })
    }
}

/// The outcome of [`Policy::decide`] when allowed: the deciding rule.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Allowed<'a> {
    /// The name of the allow rule that matched.
    pub rule: &'a str,
}

/// The authorization policy of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The server's own listening address: a tunnel to it would loop.
    own_listener: Option<SocketAddr>,
}

impl Default for Policy {
    /// Any peer of the trust domain, loopback targets only.
    fn default() -> Self {
        Policy::new(Vec::new(), Vec::new())
    }
}

impl Policy {
    /// The policy of the `--allow-id` and `--allow-target` flags: one allow
    /// rule; no target rules means loopback only.
    pub fn new(ids: Vec<IdPattern>, targets: Vec<TargetRule>) -> Self {
        Policy::from_rules(vec![Self::flags_rule(ids, targets)])
    }

    /// The single allow rule the command-line flags stand for.
    pub fn flags_rule(ids: Vec<IdPattern>, targets: Vec<TargetRule>) -> Rule {
        let (name, to) = if targets.is_empty() {
            ("default: loopback only", Self::loopback())
        } else {
            ("command line", targets)
        };
        Rule::allow(name).from_ids(ids).to_targets(to)
    }

    /// A policy of `rules`, in order.
    pub fn from_rules(rules: Vec<Rule>) -> Self {
        Policy {
            rules,
            own_listener: None,
        }
    }

    fn loopback() -> Vec<TargetRule> {
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|rule| rule.parse().ok())
            .collect()
    }

    /// Refuses tunnels to `listener`, the server's own socket (and, when
    /// it listens on an unspecified address, to its port on loopback).
    pub fn with_own_listener(mut self, listener: SocketAddr) -> Self {
        self.own_listener = Some(listener);
        self
    }

    fn is_own_listener(&self, target: SocketAddr) -> bool {
        let Some(own) = self.own_listener else {
            return false;
        };
        if own.port() != target.port() {
            return false;
        }
        let ip = target.ip().to_canonical();
        ip == own.ip().to_canonical() || (own.ip().is_unspecified() && ip.is_loopback())
    }

    /// Allows or denies a tunnel from `peer`, connected from `source`, to
    /// `target`; says which rule decided.
    pub fn decide(
        &self,
        peer: &SpiffeId,
        source: IpAddr,
        target: SocketAddr,
    ) -> Result<Allowed<'_>, Denial> {
        self.decide_service(peer, source, target, None)
    }

    /// As [`Policy::decide`], for a tunnel that asked for `service` by name
    /// and resolved to `target`: rules naming the service match it, rules
    /// on addresses judge `target`.
    pub fn decide_service(
        &self,
        peer: &SpiffeId,
        source: IpAddr,
        target: SocketAddr,
        service: Option<&ServiceName>,
    ) -> Result<Allowed<'_>, Denial> {
        let source = source.to_canonical();
        if self.is_own_listener(target) {
            return Err(Denial::OwnListener(target));
        }
        let applicable = || {
            self.rules
                .iter()
                .filter(move |r| r.matches_peer(peer, source) && r.matches_target(target, service))
        };
        if let Some(deny) = applicable().find(|r| r.action == Action::Deny) {
            return Err(Denial::Rule {
                rule: deny.name.clone(),
            });
        }
        let denied_net = built_in_denial(target.ip().to_canonical());
        let allow = applicable()
            .filter(|r| r.action == Action::Allow)
            .find(|r| denied_net.is_none_or(|denied| r.names(target, denied)));
        match (allow, denied_net) {
            (Some(rule), _) => Ok(Allowed { rule: &rule.name }),
            (None, Some(_)) => Err(Denial::BuiltIn(target)),
            (None, None) if self.allows_peer(peer, source) => Err(Denial::Target(target)),
            (None, None) if self.allows_identity(peer) => Err(Denial::Source(source)),
            (None, None) => Err(Denial::Identity(peer.clone())),
        }
    }

    /// For a gateway, whose targets are its routes: whether `peer` may
    /// open tunnels at all. Deny rules without targets apply; so does any
    /// allow rule for the peer.
    pub fn decide_identity(&self, peer: &SpiffeId, source: IpAddr) -> Result<Allowed<'_>, Denial> {
        let source = source.to_canonical();
        if let Some(deny) = self
            .rules
            .iter()
            .find(|r| r.action == Action::Deny && r.any_target() && r.matches_peer(peer, source))
        {
            return Err(Denial::Rule {
                rule: deny.name.clone(),
            });
        }
        self.rules
            .iter()
            .find(|r| r.action == Action::Allow && r.matches_peer(peer, source))
            .map(|r| Allowed { rule: &r.name })
            .ok_or_else(|| Denial::Identity(peer.clone()))
    }

    /// Whether an allow rule names `peer` by an identity pattern (a rule
    /// open to every peer of the trust domain does not count): what admits
    /// a peer of a federated trust domain to the handshake.
    pub fn names_identity(&self, peer: &SpiffeId) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Action::Allow && r.from.iter().any(|p| p.matches(peer)))
    }

    /// Whether an allow rule names `peer`, wherever it connects from.
    fn allows_identity(&self, peer: &SpiffeId) -> bool {
        self.rules.iter().any(|r| {
            r.action == Action::Allow
                && (r.from.is_empty() || r.from.iter().any(|p| p.matches(peer)))
        })
    }

    fn allows_peer(&self, peer: &SpiffeId, source: IpAddr) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Action::Allow && r.matches_peer(peer, source))
    }

    /// The rules in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The allowed targets, for start-up summaries.
    pub fn targets(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.action == Action::Allow)
            .flat_map(|r| {
                let to = r.to.iter().map(ToString::to_string);
                to.chain(r.services.iter().map(ToString::to_string))
            })
            .collect()
    }
}

/// The policy in force, replaceable while the server runs (reloads).
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    current: Arc<RwLock<Arc<Policy>>>,
}

impl PolicyHandle {
    /// A handle that starts with `policy`.
    pub fn new(policy: Policy) -> Self {
        PolicyHandle {
            current: Arc::new(RwLock::new(Arc::new(policy))),
        }
    }

    /// The policy now; keep it for one decision.
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `policy` in force for every decision from now on, keeping the
    /// server's own-listener protection.
    pub fn replace(&self, policy: Policy) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let own = current.own_listener;
        let mut policy = policy;
        policy.own_listener = own;
        *current = Arc::new(policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }
    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_allows_loopback_only() {
        let policy = Policy::default();
        let peer = id("spiffe://cluster.local/ns/a/sa/b");
        assert!(policy.decide(&peer, LOCAL, addr("127.0.0.1:80")).is_ok());
        assert!(policy.decide(&peer, LOCAL, addr("127.9.9.9:80")).is_ok());
        assert!(policy.decide(&peer, LOCAL, addr("[::1]:80")).is_ok());
        assert!(
            policy
                .decide(&peer, LOCAL, addr("[::ffff:127.0.0.1]:80"))
                .is_ok()
        );
        assert_eq!(
            policy.decide(&peer, LOCAL, addr("10.0.0.1:80")),
            Err(Denial::Target(addr("10.0.0.1:80")))
        );
        assert!(
            policy
                .decide(&peer, LOCAL, addr("[::ffff:10.0.0.1]:80"))
                .is_err()
        );
        assert!(policy.decide(&peer, LOCAL, addr("[fe80::1]:80")).is_err());
    }

    #[test]
    fn target_rules_parse_and_match() {
        let rule: TargetRule = "10.0.0.0/8:443".parse().unwrap();
        assert!(rule.matches(addr("10.1.2.3:443")));
        assert!(!rule.matches(addr("10.1.2.3:444")));
        assert!(!rule.matches(addr("11.0.0.1:443")));
        let rule: TargetRule = "[fd00::/8]:80-90".parse().unwrap();
        assert!(rule.matches(addr("[fd12::1]:85")));
        assert!(!rule.matches(addr("[fd12::1]:91")));
        assert!(!rule.matches(addr("10.0.0.1:85")));
        let rule: TargetRule = "fd00::/8".parse().unwrap();
        assert_eq!(rule.ports, (1, 65535));
        let rule: TargetRule = "192.168.1.7".parse().unwrap();
        assert!(rule.matches(addr("192.168.1.7:1")));
        assert!(!rule.matches(addr("192.168.1.8:1")));
        let rule: TargetRule = "0.0.0.0/0:22".parse().unwrap();
        assert!(rule.matches(addr("8.8.8.8:22")));
        assert_eq!(rule.to_string(), "0.0.0.0/0:22");
    }

    #[test]
    fn target_rules_reject_garbage() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "10.0.0.0/8:0",
            "10.0.0.0/8:90-80",
            "10.0.0.0/8:x",
            "host:80",
            "[fd00::/8",
            "[fd00::/8]80",
            "10.0.0.0/8:70000",
        ] {
            assert!(
                bad.parse::<TargetRule>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn id_patterns() {
        let exact: IdPattern = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let domain: IdPattern = "spiffe://td/*".parse().unwrap();
        let ns: IdPattern = "spiffe://td/ns/a/*".parse().unwrap();
        let peer = id("spiffe://td/ns/a/sa/b");
        let other_ns = id("spiffe://td/ns/c/sa/b");
        let other_td = id("spiffe://other/ns/a/sa/b");
        assert!(exact.matches(&peer) && !exact.matches(&other_ns));
        assert!(domain.matches(&peer) && domain.matches(&other_ns) && !domain.matches(&other_td));
        assert!(ns.matches(&peer) && !ns.matches(&other_ns) && !ns.matches(&other_td));
        assert_eq!(ns.to_string(), "spiffe://td/ns/a/*");
        let sa: IdPattern = "spiffe://td/ns/*/sa/b".parse().unwrap();
        assert!(sa.matches(&peer) && sa.matches(&other_ns) && !sa.matches(&other_td));
        assert!(!sa.matches(&id("spiffe://td/ns/a/sa/c")));
        assert_eq!(sa.to_string(), "spiffe://td/ns/*/sa/b");
        assert!("spiffe://td/ns/*/sa/b/c".parse::<IdPattern>().is_err());
        assert!("spiffe://td/ns/*/sa/*".parse::<IdPattern>().is_err());
        for bad in [
            "spiffe://td/a*",
            "spiffe://td/x/*",
            "spiffe://td/ns/a/sa/*x",
            "td/*",
        ] {
            assert!(
                bad.parse::<IdPattern>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn built_in_denials_need_a_rule_naming_them() {
        let peer = id("spiffe://td/ns/a/sa/b");
        let everything = Policy::new(
            Vec::new(),
            vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        );
        assert!(everything.decide(&peer, LOCAL, addr("10.0.0.1:80")).is_ok());
        for denied in [
            "169.254.169.254:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "255.255.255.255:80",
            "[::]:80",
        ] {
            assert!(
                matches!(
                    everything.decide(&peer, LOCAL, addr(denied)),
                    Err(Denial::BuiltIn(_))
                ),
                "{denied} must stay denied under a covering rule"
            );
        }
        let metadata = Policy::new(Vec::new(), vec!["169.254.169.254/32:80".parse().unwrap()]);
        assert!(
            metadata
                .decide(&peer, LOCAL, addr("169.254.169.254:80"))
                .is_ok()
        );
        assert!(
            metadata
                .decide(&peer, LOCAL, addr("169.254.169.253:80"))
                .is_err()
        );
    }

    #[test]
    fn own_listener_is_refused() {
        let peer = id("spiffe://td/ns/a/sa/b");
        let policy = Policy::default().with_own_listener(addr("[::]:15008"));
        assert_eq!(
            policy.decide(&peer, LOCAL, addr("127.0.0.1:15008")),
            Err(Denial::OwnListener(addr("127.0.0.1:15008")))
        );
        assert!(policy.decide(&peer, LOCAL, addr("[::1]:15008")).is_err());
        assert!(policy.decide(&peer, LOCAL, addr("127.0.0.1:15009")).is_ok());
        let bound = Policy::default().with_own_listener(addr("127.0.0.2:7000"));
        assert!(bound.decide(&peer, LOCAL, addr("127.0.0.2:7000")).is_err());
        assert!(bound.decide(&peer, LOCAL, addr("127.0.0.1:7000")).is_ok());
    }

    #[test]
    fn id_rules_narrow_the_peers() {
        let policy = Policy::new(vec!["spiffe://td/ns/a/*".parse().unwrap()], Vec::new());
        assert!(
            policy
                .decide(&id("spiffe://td/ns/a/sa/x"), LOCAL, addr("127.0.0.1:1"))
                .is_ok()
        );
        assert!(matches!(
            policy.decide(&id("spiffe://td/ns/b/sa/x"), LOCAL, addr("127.0.0.1:1")),
            Err(Denial::Identity(_))
        ));
    }
}
