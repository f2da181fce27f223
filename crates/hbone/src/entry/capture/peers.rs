//! The peers table of the capture entry: which HBONE identities the nodes
//! of each network must prove. A destination outside every network is not
//! in the mesh.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::identity::SpiffeId;
use crate::policy::{IpNet, TargetRule};

/// One row of the table: the nodes of `net` must prove one of `ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The network the destinations are in.
    pub net: IpNet,
    /// The identities their HBONE servers may prove; at least one. A
    /// trust domain ID accepts any workload of it ([`SpiffeId::accepts`]).
    pub ids: Vec<SpiffeId>,
}

/// Why a peer does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// Not shaped like `CIDR=SPIFFE_ID[,SPIFFE_ID...]`.
    #[error(
        "expected CIDR=SPIFFE_ID[,SPIFFE_ID...], e.g. 10.0.2.0/24=spiffe://cluster.local/ns/db/sa/db"
    )]
    Syntax,
    /// The network does not parse.
    #[error("network {0:?}: {1}")]
    Net(String, String),
    /// A port was given: peers are whole networks (the ports captured are
    /// the mesh rules' business).
    #[error("network {0:?}: a peer is a network without ports")]
    Ports(String),
    /// An identity does not parse.
    #[error("identity {0:?}: {1}")]
    Id(String, String),
}

impl FromStr for Peer {
    type Err = PeerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, ids) = s.split_once('=').ok_or(PeerError::Syntax)?;
        let (net, ids) = (net.trim(), ids.trim());
        if net.is_empty() || ids.is_empty() {
            return Err(PeerError::Syntax);
        }
        let net = parse_net(net).map_err(|problem| match problem {
            NetProblem::Invalid(e) => PeerError::Net(net.into(), e),
            NetProblem::Ports => PeerError::Ports(net.into()),
        })?;
        let ids = parse_ids(ids.split(',')).map_err(|(id, e)| PeerError::Id(id, e))?;
        Ok(Peer { net, ids })
    }
}

/// Why a network of the capture tables does not parse.
pub(super) enum NetProblem {
    /// Not a CIDR or address: what the parser said.
    Invalid(String),
    /// It names ports; the tables hold whole networks.
    Ports,
}

/// A whole network: `CIDR`, or one address (IPv6 with or without
/// brackets), without ports.
pub(super) fn parse_net(text: &str) -> Result<IpNet, NetProblem> {
    let rule: TargetRule = text
        .parse()
        .map_err(|e: crate::policy::TargetRuleError| NetProblem::Invalid(e.to_string()))?;
    if rule.ports != (1, u16::MAX) {
        return Err(NetProblem::Ports);
    }
    Ok(rule.net)
}

/// SPIFFE IDs, each trimmed; on failure the ID and what is wrong with it.
pub(super) fn parse_ids<'a>(
    ids: impl Iterator<Item = &'a str>,
) -> Result<Vec<SpiffeId>, (String, String)> {
    ids.map(|id| {
        let id = id.trim();
        SpiffeId::parse(id).map_err(|e| (id.to_owned(), e.to_string()))
    })
    .collect()
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.ids.iter().map(SpiffeId::to_string).collect();
        write!(f, "{}={}", self.net, ids.join(","))
    }
}

/// Networks and the identities their nodes prove; the most specific
/// network containing an address decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers {
    peers: Vec<Peer>,
}

impl Peers {
    /// A table of these rows.
    pub fn new(peers: Vec<Peer>) -> Self {
        Peers { peers }
    }

    /// The identities the node at `ip` must prove, or `None` when `ip` is
    /// in no network of the table.
    pub fn lookup(&self, ip: IpAddr) -> Option<&[SpiffeId]> {
        self.peers
            .iter()
            .filter(|peer| peer.net.contains(ip))
            .max_by_key(|peer| peer.net.prefix())
            .map(|peer| peer.ids.as_slice())
    }

    /// The rows, as given.
    pub fn rows(&self) -> &[Peer] {
        &self.peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn the_most_specific_network_decides() {
        let peers = Peers::new(vec![
            "10.0.0.0/8=spiffe://td/ns/a/sa/wide".parse().unwrap(),
            "10.1.2.0/24=spiffe://td/ns/a/sa/narrow, spiffe://td/ns/a/sa/other"
                .parse()
                .unwrap(),
        ]);
        let narrow = peers.lookup("10.1.2.3".parse().unwrap()).unwrap();
        assert_eq!(
            narrow,
            [
                id("spiffe://td/ns/a/sa/narrow"),
                id("spiffe://td/ns/a/sa/other")
            ]
        );
        let wide = peers.lookup("10.9.9.9".parse().unwrap()).unwrap();
        assert_eq!(wide, [id("spiffe://td/ns/a/sa/wide")]);
        assert!(peers.lookup("192.168.1.1".parse().unwrap()).is_none());
        assert!(peers.lookup("::1".parse().unwrap()).is_none());
    }

    #[test]
    fn ipv6_and_single_addresses() {
        let peers = Peers::new(vec![
            "fd00::/64=spiffe://td/ns/a/sa/v6".parse().unwrap(),
            "192.0.2.7=spiffe://td/ns/a/sa/one".parse().unwrap(),
        ]);
        assert!(peers.lookup("fd00::5".parse().unwrap()).is_some());
        assert!(peers.lookup("192.0.2.7".parse().unwrap()).is_some());
        assert!(peers.lookup("192.0.2.8".parse().unwrap()).is_none());
    }

    #[test]
    fn bad_peers_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Peer>().unwrap_err().to_string();
        assert!(err("10.0.0.0/8").contains("expected CIDR=SPIFFE_ID"));
        assert!(err("=spiffe://td/a").contains("expected CIDR=SPIFFE_ID"));
        assert!(err("10.0.0.1/8=spiffe://td/a").contains("host bits"));
        assert!(err("10.0.0.0/40=spiffe://td/a").contains("prefix"));
        assert!(err("nope=spiffe://td/a").contains("invalid IP address"));
        assert!(err("10.0.0.0/8:80=spiffe://td/a").contains("without ports"));
        assert!(err("10.0.0.0/8=http://td/a").contains("identity \"http://td/a\""));
    }

    #[test]
    fn displays_as_parsed() {
        let text = "10.0.0.0/8=spiffe://td/ns/a/sa/b,spiffe://td/ns/a/sa/c";
        assert_eq!(text.parse::<Peer>().unwrap().to_string(), text);
    }
}
