//! The request headers Istio's HBONE carries besides `:authority`:
//! `forwarded` (the original client address), `traceparent` (W3C trace
//! context) and `baggage` (workload metadata), plus `x-forwarded-network`
//! on the inner request of double HBONE.
//!
//! Building is strict; parsing is forgiving: a malformed value is ignored
//! (and counted by the caller), never fatal to the tunnel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The original client's address (RFC 7239), as `for="ip:port"`.
pub const FORWARDED: &str = "forwarded";
/// The W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Workload metadata (W3C baggage), sent on CONNECT and in the answer.
pub const BAGGAGE: &str = "baggage";
/// The client's network name, on the inner CONNECT of double HBONE.
pub const FORWARDED_NETWORK: &str = "x-forwarded-network";

/// Longest header value we look into; longer ones are treated as malformed.
const MAX_VALUE: usize = 8 << 10;

/// `for="<ip:port>"`, IPv6 in brackets, as ztunnel sends it.
pub fn forwarded_for(source: SocketAddr) -> String {
    format!("for=\"{}\"", SocketAddr::new(source.ip(), source.port()))
}

/// The original client of a `forwarded` header: the first element's `for=`
/// parameter, an address with or without a port. `None` if there is none
/// or it is not an address (obfuscated identifiers like `_hidden` or
/// `unknown` included).
pub fn parse_forwarded_for(value: &str) -> Option<ForwardedFor> {
    if value.len() > MAX_VALUE {
        return None;
    }
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(ForwardedFor::Addr(addr));
    }
    let bare = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    bare.parse::<IpAddr>().ok().map(ForwardedFor::Ip)
}

/// The original client named by `forwarded`.
// Exhaustive on purpose: an address with or without a port is every form
// we accept (obfuscated and `unknown` nodes are ignored), and callers match
// on it to learn whether a port is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// An address with a port.
    Addr(SocketAddr),
    /// A bare IP address, without a port.
    Ip(IpAddr),
}

impl ForwardedFor {
    /// The client's IP address.
    pub fn ip(&self) -> IpAddr {
        match self {
            ForwardedFor::Addr(addr) => addr.ip(),
            ForwardedFor::Ip(ip) => *ip,
        }
    }

    /// The client's port, when the header named one.
    pub fn port(&self) -> Option<u16> {
        match self {
            ForwardedFor::Addr(addr) => Some(addr.port()),
            ForwardedFor::Ip(_) => None,
        }
    }
}

impl fmt::Display for ForwardedFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardedFor::Addr(addr) => write!(f, "{addr}"),
            ForwardedFor::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A W3C trace context: `00-<trace-id>-<parent-id>-<flags>`.
// Exhaustive on purpose: version 00 of the format has exactly these three
// fields, and building one from known ids is a legitimate use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The whole trace's id; never all zeros.
    pub trace_id: [u8; 16],
    /// The id of the calling span; never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 means sampled.
    pub flags: u8,
}

impl TraceParent {
    /// A new trace with random ids, not sampled.
    pub fn random() -> Self {
        let mut bytes = [0u8; 24];
        if aws_lc_rs::rand::fill(&mut bytes).is_err() {
            // Without an RNG, a clock-derived id still tells traces apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(1);
            bytes[..16].copy_from_slice(&nanos.to_be_bytes());
            bytes[16..].copy_from_slice(&(nanos as u64 | 1).to_le_bytes());
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        trace_id.copy_from_slice(&bytes[..16]);
        parent_id.copy_from_slice(&bytes[16..]);
        // All-zero ids are invalid; make sure neither is.
        trace_id[15] |= 1;
        parent_id[7] |= 1;
        TraceParent {
            trace_id,
            parent_id,
            flags: 0,
        }
    }

    /// Parses version 00 strictly; later versions by their 00 prefix, as
    /// the spec asks. `None` when malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let extra = parts.next();
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        if version == "00" && extra.is_some() {
            return None;
        }
        if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        decode_hex(trace, &mut trace_id)?;
        decode_hex(parent, &mut parent_id)?;
        let mut flag = [0u8; 1];
        decode_hex(flags, &mut flag)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: flag[0],
        })
    }

    /// The trace id as 32 lower-case hex digits, for logs.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn decode_hex(s: &str, out: &mut [u8]) -> Option<()> {
    if !is_lower_hex(s) || s.len() != out.len() * 2 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

/// Lower-case hex, two digits a byte: once per tunnel for its CONNECT
/// header and again for its access record, so without a `format!` (and an
/// allocation) per byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Workload metadata carried in `baggage`, with ztunnel's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    entries: BTreeMap<String, String>,
}

/// The workload's cluster. This and the keys below are the ones ztunnel
/// uses; the workload name key depends on the workload kind
/// (`k8s.deployment.name`, `k8s.pod.name`, ...).
pub const CLUSTER_KEY: &str = "k8s.cluster.name";
/// The workload's Kubernetes namespace.
pub const NAMESPACE_KEY: &str = "k8s.namespace.name";
/// The workload's app (our `--app`), the `app` metric label.
pub const SERVICE_KEY: &str = "service.name";
/// The app's version (our `--app-version`), the `version` metric label.
pub const VERSION_KEY: &str = "service.version";

impl Baggage {
    /// Sets `key` to `value`; empty values are left out.
    pub fn set(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.entries.insert(key.to_owned(), value.to_owned());
        }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every key and value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parses `key=value` members separated by commas; members that are
    /// malformed are skipped and counted in the second value.
    pub fn parse(value: &str) -> (Baggage, usize) {
        let mut baggage = Baggage::default();
        let mut malformed = 0;
        if value.len() > MAX_VALUE {
            return (baggage, 1);
        }
        for member in value.split(',') {
            // Properties after ';' are allowed by the spec and ignored here.
            let pair = member.split(';').next().unwrap_or_default();
            match pair.split_once('=') {
                Some((key, val)) if is_token(key.trim()) && is_baggage_value(val.trim()) => {
                    baggage.set(key.trim(), val.trim());
                }
                _ if member.trim().is_empty() => {}
                _ => malformed += 1,
            }
        }
        (baggage, malformed)
    }

    /// Only members whose key and value are valid are written, and only
    /// as many as fit the size [`Baggage::parse`] accepts (8 KiB).
    pub fn to_header(&self) -> Option<String> {
        let mut header = String::new();
        for (key, value) in &self.entries {
            if !is_token(key) || !is_baggage_value(value) {
                continue;
            }
            let extra = usize::from(!header.is_empty()) + key.len() + 1 + value.len();
            if header.len() + extra > MAX_VALUE {
                tracing::debug!(key, "baggage member left out: header would exceed 8 KiB");
                continue;
            }
            if !header.is_empty() {
                header.push(',');
            }
            header.push_str(key);
            header.push('=');
            header.push_str(value);
        }
        (!header.is_empty()).then_some(header)
    }
}

/// An RFC 7230 token, which is what baggage keys are.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Baggage values: printable ASCII except space, `"`, `,`, `;` and `\`.
fn is_baggage_value(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && !b"\",;\\".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_roundtrip() {
        let v4: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(forwarded_for(v4), "for=\"10.1.2.3:4567\"");
        assert_eq!(forwarded_for(v6), "for=\"[fd00::1]:80\"");
        assert_eq!(
            parse_forwarded_for(&forwarded_for(v4)),
            Some(ForwardedFor::Addr(v4))
        );
        assert_eq!(
            parse_forwarded_for(&forwarded_for(v6)),
            Some(ForwardedFor::Addr(v6))
        );
    }

    #[test]
    fn forwarded_variants() {
        let ip = |s: &str| Some(ForwardedFor::Ip(s.parse().unwrap()));
        assert_eq!(
            parse_forwarded_for("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            parse_forwarded_for("For=\"[2001:db8:cafe::17]\""),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            parse_forwarded_for("for=10.0.0.1, for=10.0.0.2"),
            ip("10.0.0.1")
        );
        assert_eq!(
            parse_forwarded_for("proto=https;for=\"10.0.0.9:9\";host=svc.ns"),
            parse_forwarded_for("for=\"10.0.0.9:9\"")
        );
        for bad in [
            "",
            "for=unknown",
            "for=_hidden",
            "by=10.0.0.1",
            "for=\"10.0.0.1",
            "for=999.0.0.1",
        ] {
            assert_eq!(parse_forwarded_for(bad), None, "{bad:?}");
        }
        assert_eq!(parse_forwarded_for(&"x".repeat(MAX_VALUE + 1)), None);
    }

    #[test]
    fn traceparent_roundtrip_and_validation() {
        let t = TraceParent::random();
        let text = t.to_string();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceParent::parse(&text), Some(t));
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(good).unwrap();
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.to_string(), good);
        // A future version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn baggage_parse_and_build() {
        let (b, bad) = Baggage::parse(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default, service.name=web;prop=1,oops,=x",
        );
        assert_eq!(bad, 2);
        assert_eq!(b.get(CLUSTER_KEY), Some("Kubernetes"));
        assert_eq!(b.get(NAMESPACE_KEY), Some("default"));
        assert_eq!(b.get(SERVICE_KEY), Some("web"));
        assert_eq!(
            b.to_header().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,service.name=web"
        );
        let mut built = Baggage::default();
        built.set(VERSION_KEY, "v1");
        built.set("k8s.deployment.name", "web");
        built.set(SERVICE_KEY, "");
        assert_eq!(
            built.to_header().unwrap(),
            "k8s.deployment.name=web,service.version=v1"
        );
        assert_eq!(Baggage::default().to_header(), None);
        built.set("bad key", "x");
        built.set("k", "a,b");
        assert_eq!(
            built.to_header().unwrap(),
            "k8s.deployment.name=web,service.version=v1"
        );
    }
}
