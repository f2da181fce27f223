//! The checks behind the fuzz targets: one public function per target in
//! `fuzz_targets/`, taking the fuzzer's bytes. Each runs one parser of
//! untrusted input and asserts more than "no panic": what parses must print
//! and parse back to the same value, and must obey the parser's contract
//! (the same properties tests/properties.rs checks on generated inputs).
//!
//! See FUZZING.md at the repository root for how to run them.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Unstructured;
use hbone::SpiffeId;
use hbone::authority::parse_authority;
use hbone::gateway::{RouteError, Routes};
use hbone::headers::{Baggage, ForwardedFor, TraceParent, forwarded_for, parse_forwarded_for};
use hbone::policy::{IdPattern, IpNet, TargetRule};
use hbone::proxy_protocol;

pub mod h2_front;
pub use h2_front::h2_front;

/// The gateway's default HBONE port for endpoints written without one.
const HBONE_PORT: u16 = 15008;

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// The SPIFFE ID grammar, written independently of `SpiffeId::parse`.
fn spiffe_grammar(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let mut parts = rest.split('/');
    let td = parts.next().unwrap_or_default();
    s.len() <= 2048
        && !td.is_empty()
        && td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        && parts.all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

/// `SpiffeId::parse`: agrees with the grammar; what parses prints as
/// written and parses back equal; its parts rebuild it.
pub fn spiffe_id(data: &[u8]) {
    let s = text(data);
    let parsed = SpiffeId::parse(&s);
    assert_eq!(parsed.is_ok(), spiffe_grammar(&s), "{s:?} gave {parsed:?}");
    let Ok(id) = parsed else { return };
    assert_eq!(id.to_string(), s);
    assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
    assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
    if let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) {
        assert_eq!(SpiffeId::istio(id.trust_domain(), ns, sa).as_ref(), Ok(&id));
    }
}

/// `parse_authority`: accepts exactly the literal socket addresses with a
/// port other than 0 and no zone id, and gives them back through Display.
pub fn authority(data: &[u8]) {
    let s = text(data);
    let parsed = parse_authority(&s);
    let expected = s.parse::<SocketAddr>().ok().filter(|addr| {
        addr.port() != 0
            && !s.contains('%')
            && match addr {
                SocketAddr::V4(_) => true,
                SocketAddr::V6(v6) => v6.scope_id() == 0,
            }
    });
    assert_eq!(parsed.clone().ok(), expected, "{s:?} gave {parsed:?}");
    if let Ok(addr) = parsed {
        assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
    }
}

fn is_ipv4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// The last address of `net` and the first address outside it (below or
/// above, by flipping the last prefix bit), if any.
fn edges(net: IpNet) -> (IpAddr, Option<IpAddr>) {
    let prefix = u32::from(net.prefix());
    match net.addr() {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
            let outside = (prefix > 0).then(|| bits ^ (1 << (32 - prefix)));
            (
                IpAddr::V4(Ipv4Addr::from(bits | host)),
                outside.map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            )
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let host = u128::MAX.checked_shr(prefix).unwrap_or(0);
            let outside = (prefix > 0).then(|| bits ^ (1 << (128 - prefix)));
            (
                IpAddr::V6(Ipv6Addr::from(bits | host)),
                outside.map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            )
        }
    }
}

/// `TargetRule::from_str`: what parses prints and parses back equal, has
/// a valid port range and a network address without host bits, matches
/// the edges of its network and ports and nothing just outside them, and
/// judges IPv4-mapped IPv6 targets as their IPv4 address.
pub fn target_rule(data: &[u8]) {
    let s = text(data);
    let Ok(rule) = s.parse::<TargetRule>() else {
        return;
    };
    let printed = rule.to_string();
    assert_eq!(
        printed.parse::<TargetRule>(),
        Ok(rule),
        "{s:?} printed as {printed:?}"
    );
    let (low, high) = rule.ports;
    assert!(1 <= low && low <= high, "{s:?}: ports {low}-{high}");
    assert_eq!(IpNet::new(rule.net.addr(), rule.net.prefix()), Ok(rule.net));
    let (last, outside) = edges(rule.net);
    // An IPv4-mapped address is judged as IPv4, so an IPv6 rule never
    // matches one, even inside its network (`::/80` ends in
    // `::ffff:255.255.255.255`). A rule written as an IPv4-mapped network
    // is held as the IPv4 network it maps (tests/properties.rs,
    // `ipv4_mapped_target_rule_matches_its_ipv4_targets`); the checks that
    // edges in IPv4-mapped form match skip those.
    if !is_ipv4_mapped(rule.net.addr()) {
        assert!(rule.matches(SocketAddr::new(rule.net.addr(), low)), "{s:?}");
    }
    if !is_ipv4_mapped(last) {
        assert!(rule.matches(SocketAddr::new(last, high)), "{s:?}");
    }
    if low > 1 {
        assert!(!rule.matches(SocketAddr::new(rule.net.addr(), low - 1)));
    }
    if high < u16::MAX {
        assert!(!rule.matches(SocketAddr::new(last, high + 1)));
    }
    if let Some(outside) = outside {
        assert!(!rule.matches(SocketAddr::new(outside, low)), "{s:?}");
    }
    if let IpAddr::V4(v4) = rule.net.addr() {
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert!(rule.matches(SocketAddr::new(mapped, low)), "{s:?}");
    }
}

/// `IdPattern::from_str`: what parses prints exactly as written and parses
/// back equal, and matches its own members and not their neighbours.
pub fn id_pattern(data: &[u8]) {
    let s = text(data);
    let Ok(pattern) = s.parse::<IdPattern>() else {
        return;
    };
    assert_eq!(pattern.to_string(), s);
    assert_eq!(s.parse::<IdPattern>().as_ref(), Ok(&pattern));
    let id = |text: &str| SpiffeId::parse(text).unwrap();
    match &pattern {
        IdPattern::Exact(exact) => {
            assert_eq!(SpiffeId::parse(&s).as_ref(), Ok(exact));
            assert!(pattern.matches(exact));
        }
        IdPattern::TrustDomain(td) => {
            assert!(pattern.matches(&id(&format!("spiffe://{td}"))));
            assert!(pattern.matches(&id(&format!("spiffe://{td}/ns/a/sa/b"))));
            assert!(!pattern.matches(&id(&format!("spiffe://{td}x/ns/a/sa/b"))));
        }
        IdPattern::Namespace {
            trust_domain,
            namespace,
        } => {
            let member = SpiffeId::istio(trust_domain, namespace, "sa").unwrap();
            assert!(pattern.matches(&member));
            assert!(!pattern.matches(&id(&format!("{member}/more"))));
            assert!(!pattern.matches(&id(&format!(
                "spiffe://{trust_domain}/ns/{namespace}x/sa/sa"
            ))));
            assert!(!pattern.matches(&id(&format!(
                "spiffe://{trust_domain}x/ns/{namespace}/sa/sa"
            ))));
        }
        IdPattern::ServiceAccount {
            trust_domain,
            service_account,
        } => {
            let member = SpiffeId::istio(trust_domain, "ns", service_account).unwrap();
            assert!(pattern.matches(&member));
            assert!(!pattern.matches(&id(&format!("{member}/more"))));
            assert!(!pattern.matches(&id(&format!(
                "spiffe://{trust_domain}/ns/ns/sa/{service_account}x"
            ))));
            assert!(!pattern.matches(&id(&format!(
                "spiffe://{trust_domain}x/ns/ns/sa/{service_account}"
            ))));
        }
        // A pattern form added later must get its checks here.
        other => panic!("a pattern form the fuzz check does not know: {other:?}"),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_baggage_value(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !b"\",;\\".contains(&b))
}

/// W3C Trace Context's `traceparent` grammar (section 3.2), written from
/// the specification apart from the parser: version, trace-id, parent-id
/// and flags in lowercase hex, version `ff` invalid, version `00` exactly
/// 55 characters, a later version's extra fields after a `-`, all-zero
/// ids invalid. `None` for values no HTTP header can carry (controls other
/// than tab, non-ASCII), which the model does not judge.
fn traceparent_model(value: &str) -> Option<bool> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b >= 0x7f) {
        return None;
    }
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return Some(false);
    }
    let hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    Some(
        hex(version)
            && hex(trace)
            && hex(parent)
            && hex(flags)
            && version != b"ff"
            && !(version == b"00" && v.len() != 55)
            && (v.len() == 55 || v[55] == b'-')
            && !zero(trace)
            && !zero(parent),
    )
}

/// Whether RFC 7239 leaves `parse_forwarded_for` nothing to find in
/// `value`, judged without its code: past the 8 KiB any header value may
/// take; no `for` parameter in the first element (before any `,`); or a
/// first `for` that names no address (an obfuscated `_identifier` or
/// `unknown`, RFC 7239 §6). Values no HTTP header can carry (controls
/// other than tab, non-ASCII) are not judged (false).
fn forwarded_has_no_client(value: &str) -> bool {
    if value.len() > 8 << 10 {
        return true;
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b >= 0x7f) {
        return false;
    }
    let first: String = value
        .split(',')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !matches!(c, ' ' | '\t'))
        .collect::<String>()
        .to_ascii_lowercase();
    let Some(node) = first
        .split(';')
        .find_map(|pair| pair.strip_prefix("for="))
    else {
        return true;
    };
    let node = node.trim_matches('"');
    node.starts_with('_') || node == "unknown"
}

/// `parse_forwarded_for`, `TraceParent::parse` and `Baggage::parse` on
/// the first, second and third line of the input: what parses prints and
/// parses back equal, a `forwarded` value with no client in it yields
/// none, and a trace context parses exactly when the specification's
/// grammar accepts it. The input's first 25 bytes also
/// make a trace context that must round-trip.
pub fn headers(data: &[u8]) {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let forwarded = text(lines.next().unwrap_or_default());
    let traceparent = text(lines.next().unwrap_or_default());
    let baggage = text(lines.next().unwrap_or_default());

    if forwarded_has_no_client(&forwarded) {
        assert_eq!(parse_forwarded_for(&forwarded), None, "{forwarded:?}");
    }
    if let Some(node) = parse_forwarded_for(&forwarded) {
        assert_eq!(
            parse_forwarded_for(&format!("for=\"{node}\"")),
            Some(node),
            "{forwarded:?}"
        );
        if let ForwardedFor::Addr(addr) = node {
            let plain = SocketAddr::new(addr.ip(), addr.port());
            assert_eq!(
                parse_forwarded_for(&forwarded_for(addr)),
                Some(ForwardedFor::Addr(plain))
            );
        }
    }

    if let Some(valid) = traceparent_model(&traceparent) {
        assert_eq!(
            TraceParent::parse(&traceparent).is_some(),
            valid,
            "{traceparent:?}"
        );
    }
    if let Some(trace) = TraceParent::parse(&traceparent) {
        let printed = trace.to_string();
        assert_eq!(printed.len(), 55);
        assert_eq!(TraceParent::parse(&printed), Some(trace), "{traceparent:?}");
        assert!(trace.trace_id != [0; 16] && trace.parent_id != [0; 8]);
    }
    if let Some(bytes) = data.get(..25) {
        let mut trace = TraceParent {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: bytes[24],
        };
        trace.trace_id.copy_from_slice(&bytes[..16]);
        trace.parent_id.copy_from_slice(&bytes[16..24]);
        let parsed = TraceParent::parse(&trace.to_string());
        if trace.trace_id == [0; 16] || trace.parent_id == [0; 8] {
            assert_eq!(parsed, None);
        } else {
            assert_eq!(parsed, Some(trace));
        }
    }

    let (parsed, _malformed) = Baggage::parse(&baggage);
    for (key, value) in parsed.iter() {
        assert!(
            is_token(key) && is_baggage_value(value),
            "{key:?}={value:?}"
        );
    }
    match parsed.to_header() {
        None => assert!(parsed.is_empty()),
        // The reprint is no longer than the input, so within the 8 KiB
        // the parser looks into.
        Some(header) => assert_eq!(Baggage::parse(&header), (parsed, 0), "{baggage:?}"),
    }
}

/// `proxy_protocol::decode`: a decoded header lies within the input and
/// decodes the same from its own bytes alone; encoding what was decoded
/// and decoding that gives the same addresses and identity back.
pub fn proxy_protocol_decode(data: &[u8]) {
    let Some(decoded) = proxy_protocol::decode(data) else {
        return;
    };
    assert!(16 <= decoded.len && decoded.len <= data.len());
    assert_eq!(data[..12], proxy_protocol::SIGNATURE);
    assert_eq!(
        proxy_protocol::decode(&data[..decoded.len]).as_ref(),
        Some(&decoded)
    );
    assert_eq!(decoded.source.is_ipv4(), decoded.destination.is_ipv4());
    let peer = decoded
        .peer_identity
        .as_deref()
        .and_then(|id| SpiffeId::parse(id).ok());
    let header = proxy_protocol::encode(decoded.source, decoded.destination, peer.as_ref());
    let again = proxy_protocol::decode(&header).expect("our own header decodes");
    assert_eq!(again.source, decoded.source);
    assert_eq!(again.destination, decoded.destination);
    assert_eq!(again.peer_identity, peer.map(|id| id.to_string()));
    assert_eq!(again.len, header.len());
}

/// `Routes::parse` and `Routes::resolve`. An input starting with an even
/// byte is a TOML text: parsing and resolving never panic. One starting
/// with an odd byte describes a table (hosts, ports, endpoints in every
/// written form) that is rendered as TOML: it must parse, and `resolve`
/// must pick the first matching route (host case-insensitive, port if the
/// route names one) and take its endpoints in turn.
pub fn gateway_routes(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        raw_routes(rest);
    } else {
        let _ = structured_routes(&mut Unstructured::new(rest));
    }
}

fn raw_routes(data: &[u8]) {
    let text = text(data);
    let Ok(routes) = Routes::parse(&text, "fuzz.toml") else {
        return;
    };
    // Every quoted string of the table, as a host with a port.
    for quoted in text.split('"').skip(1).step_by(2) {
        for authority in [format!("{quoted}:80"), quoted.to_owned()] {
            if let Err(RouteError::Malformed(_)) = routes.resolve(&authority) {
                assert!(authority.rsplit_once(':').is_none_or(|(host, port)| {
                    host.is_empty() || port.parse::<u16>().is_err()
                }));
            }
        }
    }
}

struct Model {
    host: String,
    port: Option<u16>,
    endpoints: Vec<SocketAddr>,
    turn: usize,
}

fn structured_routes(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    const HOSTS: [&str; 4] = ["echo.demo", "ECHO.demo", "db", "db.demo.svc.cluster.local"];
    let mut toml = String::new();
    let mut model = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let host = *u.choose(&HOSTS)?;
        // Port 0 names nothing and is refused; the model writes valid files.
        let port: Option<u16> = u.arbitrary::<Option<u16>>()?.filter(|p| *p != 0);
        toml.push_str(&format!("[[route]]\nhost = \"{host}\"\n"));
        if let Some(port) = port {
            toml.push_str(&format!("port = {port}\n"));
        }
        let mut written = Vec::new();
        let mut endpoints = Vec::new();
        for _ in 0..u.int_in_range(1..=3)? {
            let ip: IpAddr = u.arbitrary()?;
            let port: Option<u16> = u.arbitrary::<Option<u16>>()?.filter(|p| *p != 0);
            written.push(match (ip, port) {
                (IpAddr::V4(v4), None) => format!("\"{v4}\""),
                (IpAddr::V4(v4), Some(p)) => format!("\"{v4}:{p}\""),
                (IpAddr::V6(v6), None) if u.arbitrary()? => format!("\"{v6}\""),
                (IpAddr::V6(v6), None) => format!("\"[{v6}]\""),
                (IpAddr::V6(v6), Some(p)) => format!("\"[{v6}]:{p}\""),
            });
            endpoints.push(SocketAddr::new(ip, port.unwrap_or(HBONE_PORT)));
        }
        toml.push_str(&format!("endpoints = [{}]\n\n", written.join(", ")));
        model.push(Model {
            host: host.to_owned(),
            port,
            endpoints,
            turn: 0,
        });
    }
    let routes = Routes::parse(&toml, "fuzz.toml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(routes.len(), model.len());
    for _ in 0..u.int_in_range(0..=12)? {
        let host = *u.choose(&HOSTS)?;
        let host: String = host
            .chars()
            .map(|c| {
                if u.arbitrary().unwrap_or(false) {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        let port: u16 = u.arbitrary()?;
        let authority = format!("{host}:{port}");
        let expected = model
            .iter_mut()
            .find(|r| r.host.eq_ignore_ascii_case(&host) && r.port.is_none_or(|p| p == port))
            .map(|r| {
                r.turn += 1;
                r.endpoints[(r.turn - 1) % r.endpoints.len()]
            })
            .ok_or_else(|| RouteError::Unknown(authority.clone()));
        assert_eq!(routes.resolve(&authority), expected, "{toml}");
    }
    assert!(matches!(
        routes.resolve("echo.demo"),
        Err(RouteError::Malformed(_))
    ));
    assert!(matches!(
        routes.resolve(":80"),
        Err(RouteError::Malformed(_))
    ));
    Ok(())
}

/// Reading a peer's SPIFFE ID out of its certificate (DER from the wire):
/// never panics, and whatever ID it returns is a valid SPIFFE ID that
/// appears in the certificate's bytes, as the URI SAN it came from.
pub fn peer_certificate(data: &[u8]) {
    let cert = rustls_pki_types::CertificateDer::from(data);
    if let Ok(id) = hbone::identity::spiffe_id_of(&cert) {
        let text = id.as_str();
        assert!(spiffe_grammar(text), "{text:?}");
        assert!(
            data.windows(text.len())
                .any(|w| w.eq_ignore_ascii_case(text.as_bytes())),
            "{text:?} is not in the certificate"
        );
    }
}

/// The username/password request (RFC 1929) a SOCKS5 entry with
/// credentials reads after the greeting, on the same bytes: complete
/// exactly when the version is 1 and both lengths and what they count
/// have arrived, with the name and password where the lengths put them;
/// "incomplete" on every shorter prefix; the same with anything appended.
fn socks5_user_password(data: &[u8]) {
    use hbone::entry::socks5::{NegotiationError, Parsed, parse_auth};

    let parsed = parse_auth(data);
    let mut extended = data.to_vec();
    extended.extend_from_slice(b"\x01\x01after");
    match parsed {
        Ok(Parsed::Incomplete) => {
            assert!(data.is_empty() || data[0] == 1);
            let user_end = data.get(1).map_or(2, |&n| 2 + usize::from(n));
            let end = data
                .get(user_end)
                .map_or(data.len() + 1, |&n| user_end + 1 + usize::from(n));
            assert!(data.len() < end);
        }
        Err(NegotiationError::BadAuthVersion) => {
            assert_ne!(data[0], 1);
            assert_eq!(parse_auth(&extended), parsed);
        }
        Err(other) => panic!("a username/password request cannot fail with {other:?}"),
        Ok(Parsed::Complete(given, used)) => {
            assert_eq!(data[0], 1);
            let user_len = usize::from(data[1]);
            assert_eq!(given.user, &data[2..2 + user_len]);
            let password_len = usize::from(data[2 + user_len]);
            assert_eq!(
                given.password,
                &data[3 + user_len..3 + user_len + password_len]
            );
            assert_eq!(used, 3 + user_len + password_len);
            assert_eq!(parse_auth(&extended), parsed);
            for short in 0..used {
                assert_eq!(parse_auth(&data[..short]), Ok(Parsed::Incomplete));
            }
        }
    }
}

/// The SOCKS5 entry's negotiation, on the bytes a client sends: greeting,
/// request, then whatever follows. Each step is decided by the bytes it
/// says it took, and only by them: the same on exactly those bytes and
/// with anything appended, and "incomplete" on any shorter prefix that
/// does not already break the rules. A greeting is complete only when it
/// offers "no authentication"; an address request gives back the address
/// and port written in it; a name request gives a service that prints and
/// parses back equal; only CONNECT gets a target.
pub fn socks5_negotiation(data: &[u8]) {
    use hbone::authority::{Target, parse_target};
    use hbone::entry::socks5::{NegotiationError, Parsed, Reply, parse_greeting, parse_request};

    socks5_user_password(data);

    let greeting = parse_greeting(data);
    let used = match greeting {
        Ok(Parsed::Incomplete) => {
            assert!(data.is_empty() || data[0] == 5);
            assert!(data.len() < 2 || data.len() < 2 + usize::from(data[1]));
            return;
        }
        Err(NegotiationError::NotSocks5) => {
            assert_ne!(data[0], 5);
            return;
        }
        Err(NegotiationError::NoAcceptableMethod) => {
            let count = usize::from(data[1]);
            assert!(data[0] == 5 && data.len() >= 2 + count);
            assert!(!data[2..2 + count].contains(&0));
            return;
        }
        Err(other) => panic!("a greeting cannot fail with {other:?}"),
        Ok(Parsed::Complete((), used)) => used,
    };
    assert_eq!(used, 2 + usize::from(data[1]));
    assert!(data[0] == 5 && used <= data.len() && data[2..used].contains(&0));
    assert_eq!(parse_greeting(&data[..used]), greeting);
    for short in 0..used {
        assert_eq!(parse_greeting(&data[..short]), Ok(Parsed::Incomplete));
    }

    let request = &data[used..];
    let parsed = parse_request(request);
    let mut extended = request.to_vec();
    extended.extend_from_slice(b"\x05\x01\x00\x01after");
    let (target, used) = match &parsed {
        Ok(Parsed::Incomplete) => {
            for short in 0..request.len() {
                assert_eq!(parse_request(&request[..short]), Ok(Parsed::Incomplete));
            }
            return;
        }
        Err(NegotiationError::BadRequestVersion) => {
            assert!(request.len() >= 4 && request[0] != 5);
            assert_eq!(parse_request(&extended), parsed);
            return;
        }
        Err(other) => panic!("a request cannot fail with {other:?}"),
        Ok(Parsed::Complete(target, used)) => (target.clone(), *used),
    };
    assert!(4 <= used && used <= request.len() && request[0] == 5);
    let own = &request[..used];
    assert_eq!(parse_request(own), parsed);
    assert_eq!(parse_request(&extended), parsed);
    for short in 0..used {
        assert_eq!(parse_request(&own[..short]), Ok(Parsed::Incomplete));
    }
    let (command, address_type) = (own[1], own[3]);
    if command != 1 {
        assert_eq!(target, Err(Reply::CommandNotSupported));
    }
    let port = |bytes: &[u8]| u16::from_be_bytes([bytes[used - 2], bytes[used - 1]]);
    match target {
        Err(Reply::CommandNotSupported) => assert_ne!(command, 1),
        Err(Reply::AddressTypeNotSupported) => {
            assert!(!matches!(address_type, 1 | 4), "{address_type}");
            if address_type == 3 {
                let host = String::from_utf8_lossy(&own[5..used - 2]);
                assert!(parse_target(&format!("{host}:{}", port(own))).is_err());
            } else {
                assert_eq!(used, 4);
            }
        }
        Err(other) => panic!("the parser never answers {other:?}"),
        Ok(Target::Addr(addr)) => {
            assert_eq!(addr.port(), port(own));
            match (address_type, addr.ip()) {
                (1, IpAddr::V4(ip)) => {
                    assert_eq!(used, 10);
                    assert_eq!(own[4..8], ip.octets());
                }
                (4, IpAddr::V6(ip)) => {
                    assert_eq!(used, 22);
                    assert_eq!(own[4..20], ip.octets());
                }
                // An address written out as a name.
                (3, ip) => {
                    let host = String::from_utf8_lossy(&own[5..used - 2]);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    assert_eq!(host.parse::<IpAddr>().ok(), Some(ip), "{host}");
                }
                other => panic!("address type and address disagree: {other:?}"),
            }
        }
        Ok(Target::Service(service)) => {
            assert_eq!(address_type, 3);
            assert_eq!(used, 4 + 1 + usize::from(own[4]) + 2);
            assert_eq!(service.port(), port(own));
            let printed = service.to_string();
            assert_eq!(
                parse_target(&printed).ok(),
                Some(Target::Service(service.clone())),
                "{printed}"
            );
        }
    }
}
