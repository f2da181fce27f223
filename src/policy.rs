//! Who may open a tunnel to what.
//!
//! The server is not an open proxy. With no rules, any peer of its trust
//! domain may reach targets on loopback and nothing else. `--allow-target`
//! rules replace that default with the listed networks and ports (list
//! loopback again to keep it); `--allow-id` patterns narrow which peers may
//! open tunnels at all. The policy-file work extends this module with ordered
//! allow/deny rules; the decision stays here.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::identity::{SpiffeId, SpiffeIdError};

/// A set of peers, by SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in the trust domain: `spiffe://td/*`.
    TrustDomain(String),
    /// Any Istio-form ID in a namespace: `spiffe://td/ns/NS/*`.
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl IdPattern {
    /// Whether `id` belongs to the set.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(exact) => exact == id,
            IdPattern::TrustDomain(td) => id.trust_domain() == td,
            IdPattern::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == Some(namespace.as_str()),
        }
    }
}

/// Why an ID pattern does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdPatternError {
    #[error("{0}")]
    Id(#[from] SpiffeIdError),
    #[error("'*' is allowed only as spiffe://TD/* or spiffe://TD/ns/NS/*")]
    Wildcard,
}

impl FromStr for IdPattern {
    type Err = IdPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(prefix) = s.strip_suffix("/*") {
            let id = SpiffeId::parse(prefix).map_err(|e| match e {
                SpiffeIdError::PathChar('*') => IdPatternError::Wildcard,
                e => IdPatternError::Id(e),
            })?;
            let trust_domain = id.trust_domain().to_owned();
            let segments: Vec<&str> = id.path().split('/').skip(1).collect();
            return match segments.as_slice() {
                [] => Ok(IdPattern::TrustDomain(trust_domain)),
                ["ns", namespace] => Ok(IdPattern::Namespace {
                    trust_domain,
                    namespace: (*namespace).to_owned(),
                }),
                _ => Err(IdPatternError::Wildcard),
            };
        }
        SpiffeId::parse(s)
            .map(IdPattern::Exact)
            .map_err(|e| match e {
                SpiffeIdError::PathChar('*') => IdPatternError::Wildcard,
                e => IdPatternError::Id(e),
            })
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdPattern::Exact(id) => write!(f, "{id}"),
            IdPattern::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
            IdPattern::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/*"),
        }
    }
}

/// An IP network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// A network; host bits of `addr` must be zero.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, TargetRuleError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(TargetRuleError::Prefix(prefix, max));
        }
        let net = IpNet { addr, prefix };
        if net.mask(addr) != addr {
            return Err(TargetRuleError::HostBits(net.to_string()));
        }
        Ok(net)
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(bits & mask))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        }
    }

    /// Whether `ip` is inside the network. IPv4-mapped IPv6 addresses are
    /// treated as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.mask(ip) == self.addr
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Targets a tunnel may reach: a network and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRule {
    pub net: IpNet,
    pub ports: (u16, u16),
}

/// Why a target rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetRuleError {
    #[error("expected CIDR[:PORT|:PORT-PORT], e.g. 10.0.0.0/8:443 or [fd00::/8]:80-90")]
    Syntax,
    #[error("invalid IP address {0:?}")]
    Address(String),
    #[error("prefix /{0} is longer than /{1}")]
    Prefix(u8, u8),
    #[error("{0} has host bits set; use the network address")]
    HostBits(String),
    #[error("invalid port or port range {0:?} (1-65535, low-high)")]
    Ports(String),
}

impl TargetRule {
    /// Whether `target` falls within the rule.
    pub fn matches(&self, target: SocketAddr) -> bool {
        self.net.contains(target.ip()) && (self.ports.0..=self.ports.1).contains(&target.port())
    }
}

impl FromStr for TargetRule {
    type Err = TargetRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or(TargetRuleError::Syntax)?;
            match after {
                "" => (net, None),
                _ => (
                    net,
                    Some(after.strip_prefix(':').ok_or(TargetRuleError::Syntax)?),
                ),
            }
        } else if s.matches(':').count() == 1 {
            let (net, ports) = s.split_once(':').ok_or(TargetRuleError::Syntax)?;
            (net, Some(ports))
        } else {
            (s, None)
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (net, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| TargetRuleError::Address(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse().map_err(|_| TargetRuleError::Syntax)?,
            None => max,
        };
        let ports = match ports {
            None => (1, u16::MAX),
            Some(p) => parse_ports(p)?,
        };
        Ok(TargetRule {
            net: IpNet::new(addr, prefix)?,
            ports,
        })
    }
}

fn parse_ports(s: &str) -> Result<(u16, u16), TargetRuleError> {
    let bad = || TargetRuleError::Ports(s.to_owned());
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    let (low, high) = match s.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => (port(s)?, port(s)?),
    };
    if low > high {
        return Err(bad());
    }
    Ok((low, high))
}

impl fmt::Display for TargetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = if self.net.addr.is_ipv6() {
            format!("[{}]", self.net)
        } else {
            self.net.to_string()
        };
        match self.ports {
            (1, u16::MAX) => write!(f, "{net}"),
            (low, high) if low == high => write!(f, "{net}:{low}"),
            (low, high) => write!(f, "{net}:{low}-{high}"),
        }
    }
}

/// Why a tunnel was refused by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("identity {0} is not allowed to open tunnels")]
    Identity(SpiffeId),
    #[error("target {0} is not allowed")]
    Target(SocketAddr),
    #[error("target {0} is link-local, unspecified or broadcast; allowed only by a rule naming it")]
    BuiltIn(SocketAddr),
    #[error("target {0} is this server's own listener")]
    OwnListener(SocketAddr),
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

/// The authorization policy of a server.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Empty: every peer that passed the TLS check (our trust domain).
    ids: Vec<IdPattern>,
    targets: Vec<TargetRule>,
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
    /// A policy from `--allow-id` patterns and `--allow-target` rules; an
    /// empty target list means loopback only.
    pub fn new(ids: Vec<IdPattern>, targets: Vec<TargetRule>) -> Self {
        let targets = if targets.is_empty() {
            Self::loopback()
        } else {
            targets
        };
        Policy {
            ids,
            targets,
            own_listener: None,
        }
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

    fn loopback() -> Vec<TargetRule> {
        let rule = |addr: IpAddr, prefix| TargetRule {
            net: IpNet { addr, prefix },
            ports: (1, u16::MAX),
        };
        vec![
            rule(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            rule(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        ]
    }

    /// Allows or denies a tunnel from `peer` to `target`.
    pub fn decide(&self, peer: &SpiffeId, target: SocketAddr) -> Result<(), Denial> {
        self.decide_identity(peer)?;
        if self.is_own_listener(target) {
            return Err(Denial::OwnListener(target));
        }
        let ip = target.ip().to_canonical();
        let denied_net = BUILT_IN_DENIALS
            .iter()
            .map(|&(addr, prefix)| IpNet { addr, prefix })
            .find(|net| net.contains(ip));
        let allowed = self.targets.iter().any(|rule| {
            rule.matches(target)
                && denied_net.is_none_or(|denied| {
                    denied.contains(rule.net.addr) && rule.net.prefix >= denied.prefix
                })
        });
        match (allowed, denied_net) {
            (true, _) => Ok(()),
            (false, Some(_)) => Err(Denial::BuiltIn(target)),
            (false, None) => Err(Denial::Target(target)),
        }
    }

    /// Allows or denies `peer` opening tunnels at all.
    pub fn decide_identity(&self, peer: &SpiffeId) -> Result<(), Denial> {
        if !self.ids.is_empty() && !self.ids.iter().any(|p| p.matches(peer)) {
            return Err(Denial::Identity(peer.clone()));
        }
        Ok(())
    }

    /// The target rules in force, for logs and `--help`-style summaries.
    pub fn targets(&self) -> &[TargetRule] {
        &self.targets
    }

    /// The identity patterns in force (empty: whole trust domain).
    pub fn ids(&self) -> &[IdPattern] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(policy.decide(&peer, addr("127.0.0.1:80")).is_ok());
        assert!(policy.decide(&peer, addr("127.9.9.9:80")).is_ok());
        assert!(policy.decide(&peer, addr("[::1]:80")).is_ok());
        assert!(policy.decide(&peer, addr("[::ffff:127.0.0.1]:80")).is_ok());
        assert_eq!(
            policy.decide(&peer, addr("10.0.0.1:80")),
            Err(Denial::Target(addr("10.0.0.1:80")))
        );
        assert!(policy.decide(&peer, addr("[::ffff:10.0.0.1]:80")).is_err());
        assert!(policy.decide(&peer, addr("[fe80::1]:80")).is_err());
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
        assert!(everything.decide(&peer, addr("10.0.0.1:80")).is_ok());
        for denied in [
            "169.254.169.254:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "255.255.255.255:80",
            "[::]:80",
        ] {
            assert!(
                matches!(
                    everything.decide(&peer, addr(denied)),
                    Err(Denial::BuiltIn(_))
                ),
                "{denied} must stay denied under a covering rule"
            );
        }
        let metadata = Policy::new(Vec::new(), vec!["169.254.169.254/32:80".parse().unwrap()]);
        assert!(metadata.decide(&peer, addr("169.254.169.254:80")).is_ok());
        assert!(metadata.decide(&peer, addr("169.254.169.253:80")).is_err());
    }

    #[test]
    fn own_listener_is_refused() {
        let peer = id("spiffe://td/ns/a/sa/b");
        let policy = Policy::default().with_own_listener(addr("[::]:15008"));
        assert_eq!(
            policy.decide(&peer, addr("127.0.0.1:15008")),
            Err(Denial::OwnListener(addr("127.0.0.1:15008")))
        );
        assert!(policy.decide(&peer, addr("[::1]:15008")).is_err());
        assert!(policy.decide(&peer, addr("127.0.0.1:15009")).is_ok());
        let bound = Policy::default().with_own_listener(addr("127.0.0.2:7000"));
        assert!(bound.decide(&peer, addr("127.0.0.2:7000")).is_err());
        assert!(bound.decide(&peer, addr("127.0.0.1:7000")).is_ok());
    }

    #[test]
    fn id_rules_narrow_the_peers() {
        let policy = Policy::new(vec!["spiffe://td/ns/a/*".parse().unwrap()], Vec::new());
        assert!(
            policy
                .decide(&id("spiffe://td/ns/a/sa/x"), addr("127.0.0.1:1"))
                .is_ok()
        );
        assert!(matches!(
            policy.decide(&id("spiffe://td/ns/b/sa/x"), addr("127.0.0.1:1")),
            Err(Denial::Identity(_))
        ));
    }
}
