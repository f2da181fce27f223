//! Remote networks of the capture entry: destinations on another network,
//! which this host cannot reach but that network's gateway can. Their
//! connections go as double HBONE, as ztunnel sends them across the
//! networks of a multi-network mesh: an outer tunnel to the gateway for
//! the service `ip:port`, and inside it the usual mTLS tunnel to the
//! destination's own node, which the gateway cannot read.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use super::peers::{NetProblem, parse_ids, parse_net};
use crate::identity::SpiffeId;
use crate::policy::IpNet;

/// A network behind a gateway: destinations in `net` are reached through
/// the HBONE gateway at `gateway`, which must prove one of `gateway_ids`.
/// The destinations' own nodes are still verified against the peers
/// table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNetwork {
    /// The destinations on the remote network.
    pub net: IpNet,
    /// The gateway's HBONE address.
    pub gateway: SocketAddr,
    /// The identities the gateway may prove; at least one.
    pub gateway_ids: Vec<SpiffeId>,
}

/// Why a remote network does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// Not shaped like `CIDR=GATEWAY_ADDR:PORT,GATEWAY_ID[,GATEWAY_ID...]`.
    #[error(
        "expected CIDR=GATEWAY_ADDR:PORT,GATEWAY_ID[,GATEWAY_ID...], e.g. \
         10.78.0.0/16=192.0.2.10:15008,spiffe://cluster.local/ns/istio-system/sa/east-gateway"
    )]
    Syntax,
    /// The network does not parse.
    #[error("network {0:?}: {1}")]
    Net(String, String),
    /// A port was given with the network: a remote network is whole.
    #[error("network {0:?}: a remote network is a network without ports")]
    Ports(String),
    /// The gateway is not an address with a port.
    #[error("gateway {0:?}: expected IP:PORT (IPv6 in brackets), e.g. 192.0.2.10:15008")]
    Gateway(String),
    /// No identity follows the gateway's address.
    #[error("gateway {0}: give at least one identity it must prove after it, comma-separated")]
    NoGatewayId(String),
    /// A gateway identity does not parse.
    #[error("gateway identity {0:?}: {1}")]
    Id(String, String),
}

impl FromStr for RemoteNetwork {
    type Err = RemoteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, rest) = s.split_once('=').ok_or(RemoteError::Syntax)?;
        let (net, rest) = (net.trim(), rest.trim());
        if net.is_empty() || rest.is_empty() {
            return Err(RemoteError::Syntax);
        }
        let net = parse_net(net).map_err(|problem| match problem {
            NetProblem::Invalid(e) => RemoteError::Net(net.into(), e),
            NetProblem::Ports => RemoteError::Ports(net.into()),
        })?;
        let mut parts = rest.split(',');
        let gateway_text = parts.next().unwrap_or_default().trim();
        let gateway = gateway_text
            .parse::<SocketAddr>()
            .ok()
            .filter(|addr| addr.port() != 0)
            .ok_or_else(|| RemoteError::Gateway(gateway_text.into()))?;
        let gateway_ids = parse_ids(parts).map_err(|(id, e)| RemoteError::Id(id, e))?;
        if gateway_ids.is_empty() {
            return Err(RemoteError::NoGatewayId(gateway.to_string()));
        }
        Ok(RemoteNetwork {
            net,
            gateway,
            gateway_ids,
        })
    }
}

impl fmt::Display for RemoteNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.net, self.gateway)?;
        for id in &self.gateway_ids {
            write!(f, ",{id}")?;
        }
        Ok(())
    }
}

/// The most specific of `remotes` that holds `ip`.
pub(super) fn most_specific(remotes: &[RemoteNetwork], ip: IpAddr) -> Option<&RemoteNetwork> {
    remotes
        .iter()
        .filter(|remote| remote.net.contains(ip))
        .max_by_key(|remote| remote.net.prefix())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "spiffe://td/ns/istio-system/sa/gw";

    #[test]
    fn parses_ipv4_and_ipv6_gateways_and_several_ids() {
        let remote: RemoteNetwork = format!("10.78.0.0/16 = 192.0.2.10:15008, {GW}")
            .parse()
            .unwrap();
        assert_eq!(remote.net.to_string(), "10.78.0.0/16");
        assert_eq!(remote.gateway, "192.0.2.10:15008".parse().unwrap());
        assert_eq!(remote.gateway_ids, [SpiffeId::parse(GW).unwrap()]);

        let text = format!("fd78::/64=[fd00::9]:15009,{GW},spiffe://td");
        let remote: RemoteNetwork = text.parse().unwrap();
        assert_eq!(remote.gateway, "[fd00::9]:15009".parse().unwrap());
        assert_eq!(remote.gateway_ids.len(), 2);
        assert_eq!(remote.to_string(), text);
    }

    #[test]
    fn bad_remotes_say_what_is_wrong() {
        let err = |s: &str| s.parse::<RemoteNetwork>().unwrap_err().to_string();
        assert!(err("10.78.0.0/16").contains("expected CIDR=GATEWAY_ADDR:PORT"));
        assert!(err("=192.0.2.10:15008,spiffe://td").contains("expected CIDR="));
        assert!(err("10.78.0.0/16=").contains("expected CIDR="));
        assert!(err("10.78.0.1/16=192.0.2.10:15008,spiffe://td").contains("host bits"));
        assert!(err("nope=192.0.2.10:15008,spiffe://td").contains("invalid IP address"));
        assert!(err("10.78.0.0/16:80=192.0.2.10:15008,spiffe://td").contains("without ports"));
        let e = err("10.78.0.0/16=192.0.2.10,spiffe://td");
        assert!(
            e.contains("gateway \"192.0.2.10\": expected IP:PORT"),
            "{e}"
        );
        assert!(err("10.78.0.0/16=gw.example:15008,spiffe://td").contains("expected IP:PORT"));
        assert!(err("10.78.0.0/16=fd00::9:15008,spiffe://td").contains("IPv6 in brackets"));
        assert!(err("10.78.0.0/16=192.0.2.10:0,spiffe://td").contains("expected IP:PORT"));
        let e = err("10.78.0.0/16=192.0.2.10:15008");
        assert!(e.contains("at least one identity"), "{e}");
        let e = err("10.78.0.0/16=192.0.2.10:15008,http://td/gw");
        assert!(e.contains("gateway identity \"http://td/gw\""), "{e}");
    }

    #[test]
    fn the_most_specific_remote_network_decides() {
        let remotes: Vec<RemoteNetwork> = [
            format!("10.0.0.0/8=192.0.2.1:15008,{GW}"),
            format!("10.78.0.0/16=192.0.2.2:15008,{GW}"),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let gateway = |ip: &str| most_specific(&remotes, ip.parse().unwrap()).map(|r| r.gateway);
        assert_eq!(
            gateway("10.78.1.2"),
            Some("192.0.2.2:15008".parse().unwrap())
        );
        assert_eq!(
            gateway("10.9.1.2"),
            Some("192.0.2.1:15008".parse().unwrap())
        );
        assert_eq!(gateway("192.168.1.1"), None);
    }
}
