//! The building blocks of rules: identity patterns, IP networks and
//! target rules, each with a strict parser.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::identity::{SpiffeId, SpiffeIdError};

/// A set of peers, by SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in the trust domain: `spiffe://td/*`.
    TrustDomain(String),
    /// Any Istio-form ID in a namespace: `spiffe://td/ns/NS/*`.
    Namespace {
        /// The trust domain (`td`).
        trust_domain: String,
        /// The namespace (`NS`).
        namespace: String,
    },
    /// A service account of that name in any namespace:
    /// `spiffe://td/ns/*/sa/SA`.
    ServiceAccount {
        /// The trust domain (`td`).
        trust_domain: String,
        /// The service account's name (`SA`).
        service_account: String,
    },
}

impl IdPattern {
    /// The trust domain every ID of the set belongs to.
    pub fn trust_domain(&self) -> &str {
        match self {
            IdPattern::Exact(id) => id.trust_domain(),
            IdPattern::TrustDomain(td) => td,
            IdPattern::Namespace { trust_domain, .. }
            | IdPattern::ServiceAccount { trust_domain, .. } => trust_domain,
        }
    }

    /// Whether `id` belongs to the set.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(exact) => exact == id,
            IdPattern::TrustDomain(td) => id.trust_domain() == td,
            IdPattern::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == Some(namespace.as_str()),
            IdPattern::ServiceAccount {
                trust_domain,
                service_account,
            } => {
                id.trust_domain() == trust_domain
                    && id.service_account() == Some(service_account.as_str())
            }
        }
    }
}

/// Why an ID pattern does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdPatternError {
    /// Apart from its wildcard, the pattern is not a valid SPIFFE ID.
    #[error("{0}")]
    Id(#[from] SpiffeIdError),
    /// A `*` somewhere other than the three accepted forms.
    #[error("'*' is allowed only as spiffe://TD/*, spiffe://TD/ns/NS/* or spiffe://TD/ns/*/sa/SA")]
    Wildcard,
}

impl FromStr for IdPattern {
    type Err = IdPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((head, service_account)) = s.split_once("/ns/*/sa/") {
            // Check both halves by building the ID with a stand-in namespace.
            let probe = SpiffeId::parse(&format!("{head}/ns/x/sa/{service_account}")).map_err(
                |e| match e {
                    SpiffeIdError::PathChar('*') => IdPatternError::Wildcard,
                    e => IdPatternError::Id(e),
                },
            )?;
            if probe.service_account() != Some(service_account) {
                return Err(IdPatternError::Wildcard);
            }
            return Ok(IdPattern::ServiceAccount {
                trust_domain: probe.trust_domain().to_owned(),
                service_account: service_account.to_owned(),
            });
        }
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
            IdPattern::ServiceAccount {
                trust_domain,
                service_account,
            } => write!(f, "spiffe://{trust_domain}/ns/*/sa/{service_account}"),
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
        // Targets are judged in their IPv4 form when IPv4-mapped, so a
        // mapped network must be held in IPv4 form too, or it would
        // silently match nothing.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            if prefix < 96 {
                return Err(TargetRuleError::Mapped(format!("{addr}/{prefix}")));
            }
            return IpNet::new(IpAddr::V4(v4), prefix - 96);
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

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
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
// Exhaustive on purpose: a value made of a network and a port range, with
// the text form CIDR[:PORTS]; narrowing a rule further is `Rule`'s job
// (which is non-exhaustive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRule {
    /// The network a target's address must be in.
    pub net: IpNet,
    /// The lowest and highest port allowed, inclusive; `(1, 65535)` for
    /// any port.
    pub ports: (u16, u16),
}

/// Why a target rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetRuleError {
    /// The text is not shaped like `CIDR[:PORT|:PORT-PORT]`.
    #[error("expected CIDR[:PORT|:PORT-PORT], e.g. 10.0.0.0/8:443 or [fd00::/8]:80-90")]
    Syntax,
    /// The network's address is not an IP address.
    #[error("invalid IP address {0:?}")]
    Address(String),
    /// The prefix is longer than the address (given, then the maximum).
    #[error("prefix /{0} is longer than /{1}")]
    Prefix(u8, u8),
    /// The address has bits set beyond the prefix.
    #[error("{0} has host bits set; use the network address")]
    HostBits(String),
    /// An IPv4-mapped network with a prefix shorter than /96, which would
    /// cover other IPv6 addresses too.
    #[error("{0} mixes IPv4-mapped and other IPv6 addresses; write IPv4 networks in IPv4 form")]
    Mapped(String),
    /// A port is 0, not a number, or the range runs backwards.
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
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| TargetRuleError::Syntax)?
            }
            Some(_) => return Err(TargetRuleError::Syntax),
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
    let port = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| p.parse::<u16>().ok())
            .flatten()
            .filter(|p| *p != 0)
            .ok_or_else(bad)
    };
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

/// Services a tunnel may reach by name: a host name (as the CONNECT named
/// it) and a port range of the service port.
// Exhaustive on purpose, as `TargetRule`: a host name and a port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRule {
    /// Lower case, no trailing dot.
    pub host: String,
    /// The lowest and highest service port allowed, inclusive; `(1, 65535)`
    /// for any port.
    pub ports: (u16, u16),
}

/// Why a service rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceRuleError {
    /// The host is not a qualified host name (it needs a dot), or the text
    /// is not shaped like `HOST[:PORT|:PORT-PORT]`.
    #[error(
        "expected a qualified service HOST[:PORT|:PORT-PORT], e.g. echo.default.svc.cluster.local:8081"
    )]
    Syntax,
    /// A port is 0, not a number, or the range runs backwards.
    #[error("invalid port or port range {0:?} (1-65535, low-high)")]
    Ports(String),
}

impl ServiceRule {
    /// Whether a tunnel that asked for `host:port` falls within the rule.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.host == host && (self.ports.0..=self.ports.1).contains(&port)
    }
}

impl FromStr for ServiceRule {
    type Err = ServiceRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, ports) = match s.split_once(':') {
            Some((host, ports)) => (
                host,
                parse_ports(ports).map_err(|_| ServiceRuleError::Ports(ports.to_owned()))?,
            ),
            None => (s, (1, u16::MAX)),
        };
        // A single word is far more often a typo than a service: the names
        // HBONE carries are qualified (`echo.default.svc.cluster.local`).
        let host = crate::authority::normalize_host(host)
            .filter(|host| host.contains('.'))
            .ok_or(ServiceRuleError::Syntax)?;
        Ok(ServiceRule { host, ports })
    }
}

impl fmt::Display for ServiceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports {
            (1, u16::MAX) => write!(f, "{}", self.host),
            (low, high) if low == high => write!(f, "{}:{low}", self.host),
            (low, high) => write!(f, "{}:{low}-{high}", self.host),
        }
    }
}
