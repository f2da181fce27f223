//! Property tests for the parsers of untrusted or hand-written input:
//! SPIFFE IDs, the CONNECT `:authority`, `--allow-target`/`--allow-id`
//! rules and the policy decision, the `forwarded`, `traceparent` and
//! `baggage` headers, PROXY protocol v2 and the gateway's routing table.
//!
//! Each property runs on 128 generated cases, so the file takes seconds in
//! a debug build; `PROPTEST_CASES=N` asks for more (FUZZING.md). Bugs these
//! properties found stay as regression tests (FUZZING.md lists them).

use std::collections::BTreeMap;
use std::mem::discriminant;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use hbone::SpiffeId;
use hbone::authority::{AuthorityError, parse_authority};
use hbone::gateway::{RouteError, Routes};
use hbone::headers::{Baggage, ForwardedFor, TraceParent, forwarded_for, parse_forwarded_for};
use hbone::identity::SpiffeIdError;
use hbone::policy::{Action, IdPattern, IpNet, Policy, Rule, TargetRule, TargetRuleError};
use hbone::proxy_protocol::{self, SIGNATURE};
use proptest::prelude::*;
use proptest::sample::Index;

/// 128 cases per property unless `PROPTEST_CASES` says otherwise.
///
/// Every failure can be replayed: each property prints its RNG seed (shown
/// with a failing test's output), and `PROPTEST_RNG_SEED=N` runs the same
/// cases again; a failure is also saved in `tests/properties.regressions`,
/// whose cases run first on every later run, so commit it with the fix.
fn config() -> ProptestConfig {
    use proptest::test_runner::{FileFailurePersistence, RngSeed};
    use std::hash::{BuildHasher, Hasher};
    // Reads the PROPTEST_* variables, PROPTEST_RNG_SEED included.
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 128;
    }
    if config.rng_seed == RngSeed::Random {
        // A fresh seed each run, as proptest would pick, but known.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        config.rng_seed = RngSeed::Fixed(seed);
    }
    eprintln!(
        "proptest: PROPTEST_RNG_SEED={} replays these cases",
        config.rng_seed
    );
    config.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource("regressions")));
    config
}

// ---------------------------------------------------------------------------
// Shared strategies
// ---------------------------------------------------------------------------

fn trust_domain() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,20}"
}

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,10}".prop_filter("dot segment", |s| s != "." && s != "..")
}

/// A valid SPIFFE ID as text, with its trust domain and path segments.
fn spiffe_text() -> impl Strategy<Value = (String, String, Vec<String>)> {
    (trust_domain(), prop::collection::vec(segment(), 0..6)).prop_map(|(td, segments)| {
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        (format!("spiffe://{td}{path}"), td, segments)
    })
}

fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
    spiffe_text().prop_map(|(text, _, _)| SpiffeId::parse(&text).unwrap())
}

/// `text` with `insert` put in at a generated position (on a char boundary).
fn insert_at(text: &str, at: Index, insert: &str) -> String {
    let boundaries: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let i = boundaries[at.index(boundaries.len())];
    format!("{}{insert}{}", &text[..i], &text[i..])
}

/// Valid text with one printable ASCII character inserted somewhere: the
/// inputs closest to the edge of a grammar.
fn mutated(valid: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (valid, any::<Index>(), "[ -~]").prop_map(|(text, at, c)| insert_at(&text, at, &c))
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<u128>().prop_map(Ipv6Addr::from),
        // Runs of zeros, so that `::` compression is exercised.
        prop::array::uniform8(prop_oneof![Just(0u16), Just(0xffff), any::<u16>()])
            .prop_map(Ipv6Addr::from),
        any::<u32>().prop_map(|v4| Ipv4Addr::from(v4).to_ipv6_mapped()),
        Just(Ipv6Addr::LOCALHOST),
        Just(Ipv6Addr::UNSPECIFIED),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v4| IpAddr::V4(v4.into())),
        ipv6().prop_map(IpAddr::V6),
    ]
}

/// Socket addresses without scope id or flow info (which text cannot carry
/// through `Display` and back).
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// An IPv4 network as (address bits, prefix) with no host bits set.
fn v4_net() -> impl Strategy<Value = (u32, u8)> {
    (any::<u32>(), 0u8..=32).prop_map(|(bits, prefix)| (bits & mask4(prefix), prefix))
}

/// An IPv6 network as (address bits, prefix) with no host bits set, not
/// inside `::ffff:0:0/96` (IPv4-mapped networks are judged as IPv4: see
/// `ipv4_mapped_target_rule_matches_its_ipv4_targets`).
fn v6_net() -> impl Strategy<Value = (u128, u8)> {
    (ipv6(), 0u8..=128)
        .prop_map(|(ip, prefix)| (u128::from(ip) & mask6(prefix), prefix))
        .prop_filter("IPv4-mapped network", |&(bits, prefix)| {
            !(prefix >= 96 && Ipv6Addr::from(bits).to_ipv4_mapped().is_some())
        })
}

fn ports() -> impl Strategy<Value = (u16, u16)> {
    prop_oneof![
        Just((1, u16::MAX)),
        (1..=u16::MAX).prop_map(|p| (p, p)),
        (1..=u16::MAX, 1..=u16::MAX).prop_map(|(a, b)| (a.min(b), a.max(b))),
    ]
}

fn target_rule() -> impl Strategy<Value = TargetRule> {
    let net = prop_oneof![
        v4_net().prop_map(|(bits, p)| IpNet::new(IpAddr::V4(bits.into()), p).unwrap()),
        v6_net().prop_map(|(bits, p)| IpNet::new(IpAddr::V6(bits.into()), p).unwrap()),
    ];
    (net, ports()).prop_map(|(net, ports)| TargetRule { net, ports })
}

// ---------------------------------------------------------------------------
// SpiffeId::parse
// ---------------------------------------------------------------------------

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

fn spiffe_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(spiffe://|SPIFFE://|spiffe:/|spiffe:|)[a-zA-Z0-9./_*%:@?#-]{0,40}",
        mutated(spiffe_text().prop_map(|(text, _, _)| text)),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn spiffe_parse_agrees_with_the_grammar(s in spiffe_like()) {
        let parsed = SpiffeId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), spiffe_grammar(&s), "{:?} gave {:?}", s, parsed);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
            prop_assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
        }
    }

    #[test]
    fn valid_spiffe_ids_parse_into_their_parts((text, td, segments) in spiffe_text()) {
        let id = SpiffeId::parse(&text).unwrap();
        prop_assert_eq!(id.trust_domain(), td.as_str());
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        prop_assert_eq!(id.path(), path.as_str());
        prop_assert_eq!(text.parse::<SpiffeId>(), Ok(id));
    }

    #[test]
    fn istio_ids_give_namespace_and_service_account(
        td in trust_domain(),
        ns in segment(),
        sa in segment(),
    ) {
        let id = SpiffeId::istio(&td, &ns, &sa).unwrap();
        prop_assert_eq!(id.to_string(), format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
        prop_assert_eq!(id.namespace(), Some(ns.as_str()));
        prop_assert_eq!(id.service_account(), Some(sa.as_str()));
        let longer = SpiffeId::parse(&format!("{id}/x")).unwrap();
        prop_assert_eq!(longer.namespace(), None);
    }

    #[test]
    fn upper_case_in_the_trust_domain_is_refused(
        (_, td, segments) in spiffe_text(),
        at in any::<Index>(),
        upper in "[A-Z]",
    ) {
        let td = insert_at(&td, at, &upper);
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        let upper = upper.chars().next().unwrap();
        prop_assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}{path}")),
            Err(SpiffeIdError::TrustDomainChar(upper))
        );
    }

    #[test]
    fn empty_and_dot_segments_are_refused(
        (_, td, segments) in spiffe_text(),
        at in any::<Index>(),
        bad in prop_oneof![Just(""), Just("."), Just("..")],
    ) {
        let mut segments = segments;
        segments.insert(at.index(segments.len() + 1), bad.to_owned());
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        let expected = if bad.is_empty() {
            SpiffeIdError::EmptySegment
        } else {
            SpiffeIdError::DotSegment
        };
        prop_assert_eq!(SpiffeId::parse(&format!("spiffe://{td}{path}")), Err(expected));
        // A trailing '/' is an empty last segment.
        prop_assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}/")),
            Err(SpiffeIdError::EmptySegment)
        );
    }

    #[test]
    fn other_schemes_and_empty_trust_domains_are_refused(
        (text, _, _) in spiffe_text(),
        scheme in prop_oneof![
            Just("SPIFFE://"), Just("Spiffe://"), Just("spiffe:/"), Just("spiffe:"),
            Just("https://"), Just(" spiffe://"), Just(""),
        ],
    ) {
        let rest = text.strip_prefix("spiffe://").unwrap();
        prop_assert_eq!(SpiffeId::parse(&format!("{scheme}{rest}")), Err(SpiffeIdError::Scheme));
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        prop_assert_eq!(
            SpiffeId::parse(&format!("spiffe://{path}")),
            Err(SpiffeIdError::EmptyTrustDomain)
        );
    }

    #[test]
    fn ids_longer_than_2048_bytes_are_refused(td in trust_domain(), len in 0usize..64) {
        let base = format!("spiffe://{td}/");
        let longest = format!("{base}{}", "a".repeat(2048 - base.len()));
        prop_assert!(SpiffeId::parse(&longest).is_ok());
        let longer = format!("{longest}{}", "a".repeat(len + 1));
        prop_assert_eq!(SpiffeId::parse(&longer), Err(SpiffeIdError::TooLong));
    }
}

// ---------------------------------------------------------------------------
// IdPattern
// ---------------------------------------------------------------------------

fn id_pattern() -> impl Strategy<Value = IdPattern> {
    prop_oneof![
        spiffe_id().prop_map(IdPattern::Exact),
        trust_domain().prop_map(IdPattern::TrustDomain),
        (trust_domain(), segment()).prop_map(|(trust_domain, namespace)| IdPattern::Namespace {
            trust_domain,
            namespace
        }),
        (trust_domain(), segment()).prop_map(|(trust_domain, service_account)| {
            IdPattern::ServiceAccount {
                trust_domain,
                service_account,
            }
        }),
    ]
}

fn id_pattern_like() -> impl Strategy<Value = String> {
    prop_oneof![
        spiffe_like(),
        spiffe_like().prop_map(|s| format!("{s}/*")),
        mutated(id_pattern().prop_map(|p| p.to_string())),
        "spiffe://[a-z]{1,3}(/[a-z*]{1,3}){0,4}/\\*",
        "spiffe://[a-z]{1,3}(/[a-z]{1,3})?/ns/\\*/sa(/[a-z*.]{0,3}){1,2}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn id_patterns_round_trip(pattern in id_pattern()) {
        prop_assert_eq!(pattern.to_string().parse::<IdPattern>(), Ok(pattern));
    }

    #[test]
    fn parsed_id_patterns_print_as_written(s in id_pattern_like()) {
        if let Ok(pattern) = s.parse::<IdPattern>() {
            prop_assert_eq!(pattern.to_string(), s.clone());
            match &pattern {
                IdPattern::Exact(id) => prop_assert_eq!(id.as_str(), s.as_str()),
                IdPattern::TrustDomain(td) => prop_assert_eq!(format!("spiffe://{td}/*"), s),
                IdPattern::Namespace { trust_domain, namespace } => {
                    prop_assert_eq!(format!("spiffe://{trust_domain}/ns/{namespace}/*"), s)
                }
                IdPattern::ServiceAccount { trust_domain, service_account } => {
                    prop_assert_eq!(format!("spiffe://{trust_domain}/ns/*/sa/{service_account}"), s)
                }
                other => prop_assert!(false, "a pattern form this test does not know: {other:?}"),
            }
        }
    }

    #[test]
    fn id_patterns_match_their_members(
        td in trust_domain(),
        ns in segment(),
        sa in segment(),
        other in segment(),
    ) {
        let peer = SpiffeId::istio(&td, &ns, &sa).unwrap();
        let pattern = |s: String| s.parse::<IdPattern>().unwrap();
        let exact = pattern(peer.to_string());
        let domain = pattern(format!("spiffe://{td}/*"));
        let namespace = pattern(format!("spiffe://{td}/ns/{ns}/*"));
        let other_namespace = pattern(format!("spiffe://{td}/ns/{other}/*"));
        let other_domain = pattern(format!("spiffe://{td}x/*"));
        let namespace_in_other_domain = pattern(format!("spiffe://{td}x/ns/{ns}/*"));
        let service_account = pattern(format!("spiffe://{td}/ns/*/sa/{sa}"));
        let other_service_account = pattern(format!("spiffe://{td}/ns/*/sa/{other}"));
        let service_account_in_other_domain = pattern(format!("spiffe://{td}x/ns/*/sa/{sa}"));
        prop_assert!(service_account.matches(&peer));
        prop_assert_eq!(other_service_account.matches(&peer), other == sa);
        prop_assert!(!service_account_in_other_domain.matches(&peer));
        prop_assert!(exact.matches(&peer));
        prop_assert!(domain.matches(&peer));
        prop_assert!(namespace.matches(&peer));
        prop_assert_eq!(other_namespace.matches(&peer), other == ns);
        prop_assert!(!other_domain.matches(&peer));
        prop_assert!(!namespace_in_other_domain.matches(&peer));
        // The namespace pattern is for Istio-form IDs only.
        let longer = SpiffeId::parse(&format!("{peer}/{other}")).unwrap();
        prop_assert!(!namespace.matches(&longer));
        prop_assert!(!service_account.matches(&longer));
        prop_assert!(domain.matches(&longer));
        prop_assert!(!exact.matches(&longer));
    }

    #[test]
    fn wildcards_elsewhere_are_refused(
        td in trust_domain(),
        segments in prop::collection::vec(segment(), 1..4),
        at in any::<Index>(),
    ) {
        let path: String = segments.iter().map(|s| format!("/{s}")).collect();
        let pattern = format!("spiffe://{td}{path}/*");
        let result = pattern.parse::<IdPattern>();
        if segments.len() == 2 && segments[0] == "ns" {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err(), "{pattern:?} parsed");
        }
        // A '*' anywhere but as the whole last segment is refused.
        let starred = insert_at(&format!("spiffe://{td}{path}"), at, "*");
        if !starred.ends_with("/*") {
            prop_assert!(starred.parse::<IdPattern>().is_err(), "{starred:?} parsed");
        }
    }
}

// ---------------------------------------------------------------------------
// TargetRule
// ---------------------------------------------------------------------------

/// A valid rule written the ways a person may write it.
fn rule_text(ip: IpAddr, prefix: u8, ports: (u16, u16), style: u8) -> String {
    let full = if ip.is_ipv4() { 32 } else { 128 };
    let net = if prefix == full && style & 1 == 1 {
        ip.to_string()
    } else {
        format!("{ip}/{prefix}")
    };
    let suffix = match ports {
        (1, u16::MAX) if style & 2 == 2 => ":1-65535".to_owned(),
        (1, u16::MAX) => String::new(),
        (low, high) if low == high && style & 4 == 4 => format!(":{low}-{high}"),
        (low, high) if low == high => format!(":{low}"),
        (low, high) => format!(":{low}-{high}"),
    };
    match ip {
        IpAddr::V6(_) if suffix.is_empty() && style & 8 == 8 => net,
        IpAddr::V6(_) => format!("[{net}]{suffix}"),
        IpAddr::V4(_) => format!("{net}{suffix}"),
    }
}

fn rule_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\[?[0-9a-f.:]{0,20}(/[0-9]{1,3})?\\]?(:[0-9+]{1,6}(-[0-9]{1,6})?)?",
        mutated(target_rule().prop_map(|r| r.to_string())),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn target_rules_round_trip(rule in target_rule()) {
        prop_assert_eq!(rule.to_string().parse::<TargetRule>(), Ok(rule));
    }

    #[test]
    fn valid_rule_texts_parse(rule in target_rule(), style in any::<u8>()) {
        let text = rule_text(rule.net.addr(), rule.net.prefix(), rule.ports, style);
        prop_assert_eq!(text.parse::<TargetRule>(), Ok(rule), "{}", text);
    }

    #[test]
    fn parsed_rules_are_well_formed_and_round_trip(s in rule_like()) {
        if let Ok(rule) = s.parse::<TargetRule>() {
            let printed = rule.to_string();
            prop_assert_eq!(printed.parse::<TargetRule>(), Ok(rule), "{:?} printed as {:?}", s, printed);
            prop_assert!(1 <= rule.ports.0 && rule.ports.0 <= rule.ports.1);
            prop_assert_eq!(IpNet::new(rule.net.addr(), rule.net.prefix()), Ok(rule.net));
        }
    }

    #[test]
    fn host_bits_are_refused((bits, prefix) in v4_net(), host in any::<u32>(), ports in ports()) {
        let host = host & !mask4(prefix);
        prop_assume!(host != 0);
        let ip = IpAddr::V4((bits | host).into());
        let text = rule_text(ip, prefix, ports, 0);
        prop_assert!(
            matches!(text.parse::<TargetRule>(), Err(TargetRuleError::HostBits(_))),
            "{text:?} parsed"
        );
    }

    #[test]
    fn long_prefixes_and_bad_ports_are_refused(rule in target_rule(), extra in 1u8..=100) {
        let ip = rule.net.addr();
        let full: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let too_long = rule_text(ip, full + extra, rule.ports, 0);
        prop_assert!(too_long.parse::<TargetRule>().is_err(), "{too_long:?} parsed");
        let net = match ip {
            IpAddr::V4(_) => rule.net.to_string(),
            IpAddr::V6(_) => format!("[{}]", rule.net),
        };
        let (low, high) = rule.ports;
        let mut bad_ports = vec![
            "0".to_owned(),
            format!("0-{high}"),
            format!("{low}-{}", u32::from(u16::MAX) + u32::from(extra)),
            format!("{}", u32::from(u16::MAX) + u32::from(extra)),
            format!("{low}-"),
            format!("-{high}"),
            format!("{low}-{high}-{high}"),
            String::new(),
            "x".to_owned(),
        ];
        if low < high {
            bad_ports.push(format!("{high}-{low}"));
        }
        for ports in bad_ports {
            let text = format!("{net}:{ports}");
            prop_assert!(text.parse::<TargetRule>().is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn host_names_are_refused(
        host in "[g-z][a-z0-9-]{0,10}(\\.[a-z]{1,5}){0,3}",
        prefix in proptest::option::of(0u8..=32),
        port in proptest::option::of(1u16..),
    ) {
        let mut text = host;
        if let Some(prefix) = prefix {
            text.push_str(&format!("/{prefix}"));
        }
        if let Some(port) = port {
            text.push_str(&format!(":{port}"));
        }
        prop_assert!(text.parse::<TargetRule>().is_err(), "{text:?} parsed");
    }

    /// `a.b.c.d/p` matches exactly the addresses whose first p bits agree,
    /// on the ports of its range, also when written IPv4-mapped.
    #[test]
    fn v4_rules_match_exactly_their_network(
        (bits, prefix) in v4_net(),
        ports in ports(),
        host in any::<u32>(),
        flip in proptest::option::of(0u8..32),
        port in any::<u16>(),
    ) {
        let rule: TargetRule = rule_text(IpAddr::V4(bits.into()), prefix, ports, 0).parse().unwrap();
        // Inside the network, then maybe one bit flipped (inside or out).
        let target = (bits | (host & !mask4(prefix))) ^ flip.map_or(0, |k| 1u32 << k);
        let expected = (target & mask4(prefix)) == bits && (ports.0..=ports.1).contains(&port);
        let v4 = Ipv4Addr::from(target);
        prop_assert_eq!(rule.matches(SocketAddr::new(v4.into(), port)), expected);
        prop_assert_eq!(rule.matches(SocketAddr::new(v4.to_ipv6_mapped().into(), port)), expected);
        // An IPv6 address that carries no IPv4 address never matches.
        let v6 = Ipv6Addr::from(u128::from(target) << 96 | 1);
        prop_assert!(!rule.matches(SocketAddr::new(v6.into(), port)));
    }

    #[test]
    fn v6_rules_match_exactly_their_network(
        (bits, prefix) in v6_net(),
        ports in ports(),
        host in any::<u128>(),
        flip in proptest::option::of(0u8..128),
        port in any::<u16>(),
        v4 in any::<u32>(),
    ) {
        let rule: TargetRule = rule_text(IpAddr::V6(bits.into()), prefix, ports, 0).parse().unwrap();
        let target = (bits | (host & !mask6(prefix))) ^ flip.map_or(0, |k| 1u128 << k);
        let target = Ipv6Addr::from(target);
        let expected = (u128::from(target) & mask6(prefix)) == bits
            && (ports.0..=ports.1).contains(&port)
            // IPv4-mapped targets are judged as IPv4 addresses.
            && target.to_ipv4_mapped().is_none();
        prop_assert_eq!(rule.matches(SocketAddr::new(target.into(), port)), expected);
        prop_assert!(!rule.matches(SocketAddr::new(Ipv4Addr::from(v4).into(), port)));
    }
}

/// A rule written as an IPv4-mapped IPv6 network matches the IPv4
/// addresses it carries (like `10.0.0.0/8`), or is refused when parsed:
/// targets are judged in IPv4 form, so a rule kept in IPv6 form would
/// match no target at all, not even the address it names.
#[test]
fn ipv4_mapped_target_rule_matches_its_ipv4_targets() {
    for (rule, target) in [
        ("[::ffff:10.0.0.0/104]:80", "[::ffff:10.1.2.3]:80"),
        ("[::ffff:10.0.0.0/104]:80", "10.1.2.3:80"),
        ("[::ffff:127.0.0.1]", "127.0.0.1:8080"),
        ("::ffff:0.0.0.0/96", "192.0.2.1:443"),
    ] {
        match rule.parse::<TargetRule>() {
            Err(_) => {}
            Ok(parsed) => assert!(
                parsed.matches(target.parse().unwrap()),
                "{rule} parses as {parsed:?} but does not match {target}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Policy::decide
// ---------------------------------------------------------------------------

/// The nets the README says stay denied under a covering rule.
const BUILT_IN: [&str; 5] = [
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/32",
    "::/128",
    "255.255.255.255/32",
];

fn built_in(ip: IpAddr) -> Option<TargetRule> {
    BUILT_IN
        .iter()
        .map(|net| net.parse::<TargetRule>().unwrap())
        .find(|net| net.net.contains(ip))
}

/// Rules that cover, name or miss the built-in denials and loopback, and
/// random ones.
fn policy_rule() -> impl Strategy<Value = TargetRule> {
    let named = prop::sample::select(vec![
        "0.0.0.0/0",
        "::/0",
        "10.0.0.0/8",
        "127.0.0.0/8",
        "[::1]",
        "169.254.0.0/15",
        "169.254.0.0/16",
        "169.254.169.254",
        "fe80::/9",
        "fe80::/10",
        "fe80::/64",
        "0.0.0.0",
        "::/128",
        "255.255.255.255",
        "255.255.255.0/24",
    ]);
    prop_oneof![
        (named, ports()).prop_map(|(net, ports)| {
            let rule: TargetRule = net.parse().unwrap();
            TargetRule { ports, ..rule }
        }),
        target_rule(),
    ]
}

/// Targets inside one of `rules` (picked by `pick`), inside a built-in
/// denial, on loopback, or anywhere; each maybe IPv4-mapped.
fn policy_target() -> impl Strategy<Value = (Index, u128, u8, u16, bool)> {
    (
        any::<Index>(),
        any::<u128>(),
        any::<u8>(),
        any::<u16>(),
        any::<bool>(),
    )
}

fn make_target(
    rules: &[TargetRule],
    (pick, host, kind, port, mapped): (Index, u128, u8, u16, bool),
) -> SocketAddr {
    let special = [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "0.0.0.0",
        "::",
        "255.255.255.255",
        "127.0.0.1",
        "::1",
        "10.0.0.1",
    ];
    let ip: IpAddr = match kind % 4 {
        0 | 1 if !rules.is_empty() => {
            let rule = rules[pick.index(rules.len())];
            match rule.net.addr() {
                IpAddr::V4(v4) => {
                    let p = rule.net.prefix();
                    IpAddr::V4((u32::from(v4) | (host as u32 & !mask4(p))).into())
                }
                IpAddr::V6(v6) => {
                    let p = rule.net.prefix();
                    IpAddr::V6((u128::from(v6) | (host & !mask6(p))).into())
                }
            }
        }
        2 => special[pick.index(special.len())].parse().unwrap(),
        _ if host % 2 == 0 => IpAddr::V4((host as u32).into()),
        _ => IpAddr::V6(host.into()),
    };
    let ip = match ip {
        IpAddr::V4(v4) if mapped => IpAddr::V6(v4.to_ipv6_mapped()),
        ip => ip,
    };
    SocketAddr::new(ip, port)
}

fn own_listener(target: SocketAddr, choice: u8) -> Option<SocketAddr> {
    let port = target.port();
    match choice % 5 {
        0 => None,
        1 => Some(target),
        2 => Some(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)),
        3 => Some(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)),
        _ => Some(SocketAddr::new(Ipv4Addr::new(10, 9, 8, 7).into(), port)),
    }
}

proptest! {
    #![proptest_config(config())]

    /// With `--allow-target` rules only: whatever is allowed is matched by
    /// a rule, and inside a built-in denial by a rule naming a network
    /// inside it.
    #[test]
    fn decide_allows_only_what_a_rule_matches(
        rules in prop::collection::vec(policy_rule(), 1..4),
        target in policy_target(),
        peer in spiffe_id(),
        source in ip(),
        listener in any::<u8>(),
    ) {
        let target = make_target(&rules, target);
        let mut policy = Policy::new(Vec::new(), rules.clone());
        if let Some(own) = own_listener(target, listener) {
            policy = policy.with_own_listener(own);
        }
        let decision = policy.decide(&peer, source, target);
        let matching: Vec<&TargetRule> = rules.iter().filter(|r| r.matches(target)).collect();
        if decision.is_ok() {
            prop_assert!(!matching.is_empty(), "{target} allowed by {rules:?}");
            if let Some(denied) = built_in(target.ip().to_canonical()) {
                prop_assert!(
                    matching.iter().any(|r| denied.net.contains(r.net.addr())
                        && r.net.prefix() >= denied.net.prefix()),
                    "{target} allowed by {rules:?} which only cover {denied}"
                );
            }
        } else if own_listener(target, listener).is_none()
            && !matching.is_empty()
            && built_in(target.ip().to_canonical()).is_none()
        {
            prop_assert!(false, "{} denied ({:?}) though {:?} match it", target, decision, matching);
        }
    }

    /// An IPv4-mapped IPv6 target gets the decision of its IPv4 address.
    #[test]
    fn mapped_targets_are_judged_as_ipv4(
        rules in prop::collection::vec(policy_rule(), 0..4),
        target in policy_target(),
        peer in spiffe_id(),
        source in ip(),
        listener in any::<u8>(),
    ) {
        let (pick, host, kind, port, _) = target;
        let target = make_target(&rules, (pick, host, kind, port, false));
        let IpAddr::V4(v4) = target.ip() else { return Ok(()) };
        let mapped = SocketAddr::new(v4.to_ipv6_mapped().into(), target.port());
        let mut policy = Policy::new(Vec::new(), rules);
        if let Some(own) = own_listener(target, listener) {
            policy = policy.with_own_listener(own);
        }
        let plain = policy.decide(&peer, source, target).map(|a| a.rule.to_owned());
        let as_v6 = policy.decide(&peer, source, mapped).map(|a| a.rule.to_owned());
        match (&plain, &as_v6) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(discriminant(a), discriminant(b), "{:?} vs {:?}", a, b),
            _ => prop_assert!(false, "{} gave {:?} but {} gave {:?}", target, plain, mapped, as_v6),
        }
    }

    /// No rules at all: loopback targets only (also IPv4-mapped loopback).
    #[test]
    fn no_rules_means_loopback_only(
        target in policy_target(),
        peer in spiffe_id(),
        source in ip(),
    ) {
        let loopback: Vec<TargetRule> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let target = make_target(&loopback, target);
        let allowed = Policy::default().decide(&peer, source, target).is_ok();
        prop_assert_eq!(allowed, target.ip().to_canonical().is_loopback(), "{}", target);
    }

    /// `--allow-id` patterns: exactly the peers one of them matches.
    #[test]
    fn id_patterns_narrow_the_peers(
        patterns in prop::collection::vec(
            ("[ab]", "[xy]", prop_oneof![Just(0u8), Just(1), Just(2)]).prop_map(|(td, ns, kind)| {
                match kind {
                    0 => format!("spiffe://{td}/*"),
                    1 => format!("spiffe://{td}/ns/{ns}/*"),
                    _ => format!("spiffe://{td}/ns/{ns}/sa/s"),
                }
                .parse::<IdPattern>()
                .unwrap()
            }),
            1..4,
        ),
        (td, ns, sa) in ("[ab]", "[xy]", "[st]"),
        source in ip(),
    ) {
        let peer = SpiffeId::istio(&td, &ns, &sa).unwrap();
        let policy = Policy::new(patterns.clone(), vec!["0.0.0.0/0".parse().unwrap()]);
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        prop_assert_eq!(
            policy.decide(&peer, source, target).is_ok(),
            patterns.iter().any(|p| p.matches(&peer)),
            "{} under {:?}", peer, patterns
        );
    }

    /// Ordered allow/deny rules: a tunnel is allowed only if some allow
    /// rule matches peer, source and target and no deny rule does.
    #[test]
    fn a_matching_deny_rule_wins_and_an_allow_rule_is_needed(
        rules in prop::collection::vec(
            (
                any::<bool>(),
                prop::collection::vec(
                    prop_oneof![Just("spiffe://td/*"), Just("spiffe://td/ns/a/*"), Just("spiffe://other/*")]
                        .prop_map(|p| p.parse::<IdPattern>().unwrap()),
                    0..2,
                ),
                prop::collection::vec(
                    prop_oneof![Just("10.0.0.0/8"), Just("192.168.0.0/16"), Just("::/0")]
                        .prop_map(|n| n.parse::<TargetRule>().unwrap().net),
                    0..2,
                ),
                prop::collection::vec(policy_rule(), 0..3),
            ),
            0..4,
        ),
        target in policy_target(),
        peer_ns in prop_oneof![Just("a"), Just("b")],
        source in prop_oneof![
            Just(IpAddr::from([10, 1, 1, 1])),
            Just(IpAddr::from([192, 168, 1, 1])),
            Just("::ffff:10.1.1.1".parse().unwrap()),
            Just("fd00::1".parse().unwrap()),
        ],
    ) {
        let all_targets: Vec<TargetRule> = rules.iter().flat_map(|r| r.3.clone()).collect();
        let target = make_target(&all_targets, target);
        let peer = SpiffeId::istio("td", peer_ns, "sa").unwrap();
        let rules: Vec<Rule> = rules
            .into_iter()
            .enumerate()
            .map(|(i, (allow, from, source, to))| {
                let name = format!("rule {i}");
                let rule = if allow { Rule::allow(name) } else { Rule::deny(name) };
                rule.from_ids(from).from_networks(source).to_targets(to)
            })
            .collect();
        let applies = |r: &Rule| {
            (r.from.is_empty() || r.from.iter().any(|p| p.matches(&peer)))
                && (r.source.is_empty() || r.source.iter().any(|n| n.contains(source)))
                && (r.to.is_empty() || r.to.iter().any(|t| t.matches(target)))
        };
        let policy = Policy::from_rules(rules.clone());
        let decision = policy.decide(&peer, source, target);
        if rules.iter().any(|r| r.action == Action::Deny && applies(r)) {
            prop_assert!(decision.is_err(), "{target} allowed despite a deny rule: {rules:?}");
        }
        if let Ok(allowed) = decision {
            let rule = rules.iter().find(|r| r.name == allowed.rule).unwrap();
            prop_assert!(rule.action == Action::Allow && applies(rule));
        } else if !rules.iter().any(|r| r.action == Action::Allow && applies(r)) {
            prop_assert!(decision.is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// parse_authority
// ---------------------------------------------------------------------------

fn authority_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\[?[0-9a-fA-F.:%]{0,24}\\]?:[0-9+-]{0,6}",
        mutated(socket_addr().prop_map(|a| a.to_string())),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn authority_round_trips(addr in socket_addr()) {
        prop_assume!(addr.port() != 0);
        prop_assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
    }

    #[test]
    fn authority_refuses_port_zero(ip in ip()) {
        let text = SocketAddr::new(ip, 0).to_string();
        prop_assert_eq!(parse_authority(&text), Err(AuthorityError::PortZero(text.clone())));
    }

    #[test]
    fn authority_refuses_zone_ids(ip in ipv6(), port in 1u16.., scope in 1u32..) {
        let text = SocketAddrV6::new(ip, port, 0, scope).to_string();
        prop_assert!(text.contains('%'));
        prop_assert_eq!(parse_authority(&text), Err(AuthorityError::ZoneId(text.clone())));
    }

    #[test]
    fn authority_refuses_host_names_and_bare_addresses(
        host in "[g-z][a-z0-9-]{0,10}(\\.[a-z]{1,5}){0,3}",
        ip in ip(),
        port in 1u16..,
    ) {
        let text = format!("{host}:{port}");
        prop_assert_eq!(parse_authority(&text), Err(AuthorityError::NotAnAddress(text.clone())));
        // No port, or IPv6 without brackets.
        prop_assert!(parse_authority(&ip.to_string()).is_err());
        if ip.is_ipv6() {
            let unbracketed = format!("{ip}:{port}");
            prop_assert!(parse_authority(&unbracketed).is_err(), "{:?} parsed", unbracketed);
        }
    }

    #[test]
    fn whatever_authority_parses_is_a_usable_target(s in authority_like()) {
        if let Ok(addr) = parse_authority(&s) {
            prop_assert_ne!(addr.port(), 0);
            if let SocketAddr::V6(v6) = addr {
                prop_assert_eq!(v6.scope_id(), 0);
            }
            prop_assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
            prop_assert_eq!(s.parse::<SocketAddr>(), Ok(addr));
        }
    }
}

// ---------------------------------------------------------------------------
// forwarded, traceparent, baggage
// ---------------------------------------------------------------------------

const TOKEN_CHARS: &str =
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~";

fn baggage_value_chars() -> Vec<char> {
    (0x21u8..=0x7e)
        .filter(|b| !b"\",;\\".contains(b))
        .map(char::from)
        .collect()
}

fn chars_from(chars: Vec<char>, len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(chars), len).prop_map(|v| v.into_iter().collect())
}

fn baggage_key() -> impl Strategy<Value = String> {
    chars_from(TOKEN_CHARS.chars().collect(), 1..16)
}

fn baggage_value() -> impl Strategy<Value = String> {
    chars_from(baggage_value_chars(), 1..16)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| TOKEN_CHARS.contains(c))
}

fn is_baggage_value(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| baggage_value_chars().contains(&c))
}

fn trace_parent() -> impl Strategy<Value = TraceParent> {
    (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
        .prop_filter("all-zero id", |(t, p, _)| *t != [0; 16] && *p != [0; 8])
        .prop_map(|(trace_id, parent_id, flags)| TraceParent {
            trace_id,
            parent_id,
            flags,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn forwarded_for_round_trips(addr in socket_addr(), flowinfo in any::<u32>(), scope in any::<u32>()) {
        let addr = match addr {
            SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), flowinfo, scope)),
            v4 => v4,
        };
        prop_assert_eq!(
            parse_forwarded_for(&forwarded_for(addr)),
            Some(ForwardedFor::Addr(SocketAddr::new(addr.ip(), addr.port())))
        );
    }

    #[test]
    fn forwarded_ip_forms_parse(
        ip in ip(),
        quoted in any::<bool>(),
        name in prop_oneof![Just("for"), Just("For"), Just("FOR"), Just(" for ")],
        before in prop_oneof![Just(""), Just("proto=https;"), Just("by=10.0.0.1;")],
        after in prop_oneof![Just(""), Just(";host=a.b"), Just(", for=192.0.2.1"), Just(";by=\"[::1]:80\"")],
    ) {
        let node = match ip {
            IpAddr::V6(v6) if quoted => format!("\"[{v6}]\""),
            ip if quoted => format!("\"{ip}\""),
            ip => ip.to_string(),
        };
        let header = format!("{before}{name}={node}{after}");
        prop_assert_eq!(parse_forwarded_for(&header), Some(ForwardedFor::Ip(ip)), "{}", header);
    }

    #[test]
    fn parsed_forwarded_nodes_reprint(
        s in prop_oneof![
            any::<String>(),
            "(for|For|by)=\"?\\[?[0-9a-f.:%]{0,20}\\]?(:[0-9]{1,5})?\"?[;,]?",
            mutated(socket_addr().prop_map(forwarded_for)),
        ]
    ) {
        if let Some(node) = parse_forwarded_for(&s) {
            prop_assert_eq!(parse_forwarded_for(&format!("for=\"{node}\"")), Some(node));
        }
    }

    #[test]
    fn traceparent_round_trips(trace in trace_parent()) {
        let text = trace.to_string();
        prop_assert_eq!(text.len(), 55);
        prop_assert!(text.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prop_assert_eq!(TraceParent::parse(&text), Some(trace));
        prop_assert_eq!(TraceParent::parse(&format!(" {text}\t")), Some(trace));
        prop_assert_eq!(trace.trace_id_hex(), hex(&trace.trace_id));
    }

    #[test]
    fn traceparent_later_versions_parse_by_their_prefix(
        trace in trace_parent(),
        version in "[0-9a-f]{2}".prop_filter("00 and ff", |v| v != "00" && v != "ff"),
        rest in "(-[a-z0-9]{0,8}){0,2}",
    ) {
        let text = format!(
            "{version}-{}-{}-{:02x}{rest}",
            hex(&trace.trace_id), hex(&trace.parent_id), trace.flags
        );
        prop_assert_eq!(TraceParent::parse(&text), Some(trace), "{}", text);
    }

    #[test]
    fn malformed_traceparents_are_refused(trace in trace_parent(), at in any::<Index>(), which in 0u8..6) {
        let text = trace.to_string();
        let bad = match which {
            0 => format!("00-AB{}-{}-{:02x}", &hex(&trace.trace_id)[2..], hex(&trace.parent_id), trace.flags),
            1 => format!("00-{}-{}-{:02x}", "0".repeat(32), hex(&trace.parent_id), trace.flags),
            2 => format!("00-{}-{}-{:02x}", hex(&trace.trace_id), "0".repeat(16), trace.flags),
            3 => format!("ff{}", &text[2..]),
            4 => format!("{text}-00"),
            _ => {
                // One character dropped.
                let i = at.index(text.len());
                format!("{}{}", &text[..i], &text[i + 1..])
            }
        };
        prop_assert_eq!(TraceParent::parse(&bad), None, "{}", bad);
    }

    #[test]
    fn parsed_traceparents_reprint(
        s in prop_oneof![
            any::<String>(),
            "[0-9a-fA-F]{2}-[0-9a-f]{30,33}-[0-9a-f]{15,17}-[0-9a-f]{1,3}(-.{0,3})?",
            mutated(trace_parent().prop_map(|t| t.to_string())),
        ]
    ) {
        if let Some(trace) = TraceParent::parse(&s) {
            prop_assert_eq!(TraceParent::parse(&trace.to_string()), Some(trace));
        }
    }

    #[test]
    fn baggage_round_trips(entries in prop::collection::btree_map(baggage_key(), baggage_value(), 0..12)) {
        let mut baggage = Baggage::default();
        for (key, value) in &entries {
            baggage.set(key, value);
        }
        let header = baggage.to_header();
        prop_assert_eq!(header.is_none(), entries.is_empty());
        if let Some(header) = header {
            let (parsed, malformed) = Baggage::parse(&header);
            prop_assert_eq!(malformed, 0);
            let got: BTreeMap<String, String> =
                parsed.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            prop_assert_eq!(got, entries);
            prop_assert_eq!(parsed, baggage);
        }
    }

    #[test]
    fn baggage_to_header_leaves_out_only_invalid_members(
        entries in prop::collection::vec(
            (
                prop_oneof![baggage_key(), ".{0,6}".prop_map(String::from)],
                prop_oneof![baggage_value(), ".{0,6}".prop_map(String::from)],
            ),
            0..10,
        )
    ) {
        let mut baggage = Baggage::default();
        let mut valid = BTreeMap::new();
        for (key, value) in &entries {
            baggage.set(key, value);
            if value.is_empty() {
                continue;
            }
            // A later valid set replaces an earlier one, an invalid one
            // hides it.
            if is_token(key) && is_baggage_value(value) {
                valid.insert(key.clone(), value.clone());
            } else {
                valid.remove(key);
            }
        }
        let (parsed, malformed) = Baggage::parse(&baggage.to_header().unwrap_or_default());
        prop_assert_eq!(malformed, 0);
        let got: BTreeMap<String, String> =
            parsed.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        prop_assert_eq!(got, valid);
    }

    #[test]
    fn parsed_baggage_is_valid_and_reprints(
        s in prop_oneof![
            any::<String>(),
            "([a-z.]{0,6}( ?= ?)?[a-zA-Z0-9%\"= ]{0,6}(;[a-z=]{0,4})?,?){0,6}",
        ]
    ) {
        let (parsed, malformed) = Baggage::parse(&s);
        prop_assert!(malformed <= s.split(',').count());
        for (key, value) in parsed.iter() {
            prop_assert!(is_token(key) && is_baggage_value(value), "{:?}={:?}", key, value);
        }
        match parsed.to_header() {
            None => prop_assert!(parsed.is_empty()),
            Some(header) => prop_assert_eq!(Baggage::parse(&header), (parsed, 0)),
        }
    }
}

/// `Baggage::parse` refuses a value longer than 8 KiB, so `to_header` keeps
/// within it, leaving out members past that: what our peer receives from
/// us always parses completely (a regression test for a bug this file
/// found, where a large baggage header was sent and then thrown away).
#[test]
fn baggage_larger_than_8_kib_stays_parseable() {
    let mut baggage = Baggage::default();
    for i in 0..100 {
        baggage.set(&format!("key{i}"), &"v".repeat(100));
    }
    let header = baggage.to_header().unwrap();
    assert!(header.len() <= 8 << 10, "{} bytes", header.len());
    let (parsed, malformed) = Baggage::parse(&header);
    assert_eq!(malformed, 0);
    assert!(
        parsed.iter().count() >= 70,
        "most members fit: {}",
        parsed.iter().count()
    );
    for (key, value) in parsed.iter() {
        assert_eq!(baggage.get(key), Some(value));
    }
}

// ---------------------------------------------------------------------------
// PROXY protocol v2
// ---------------------------------------------------------------------------

fn as_v6(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SocketAddr::new(ip.into(), addr.port())
}

fn proxy_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (
            prop_oneof![Just(0x21u8), any::<u8>()],
            prop_oneof![Just(0x11u8), Just(0x21), any::<u8>()],
            prop::collection::vec(any::<u8>(), 0..80),
            any::<bool>(),
        )
            .prop_map(|(version, family, body, honest)| {
                let mut data = SIGNATURE.to_vec();
                data.extend([version, family]);
                let len = if honest {
                    body.len() as u16
                } else {
                    u16::from(body.first().copied().unwrap_or(0))
                };
                data.extend(len.to_be_bytes());
                data.extend(body);
                data
            }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn proxy_v2_round_trips(
        source in socket_addr(),
        destination in socket_addr(),
        peer in proptest::option::of(spiffe_id()),
        trailing in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let header = proxy_protocol::encode(source, destination, peer.as_ref());
        prop_assert_eq!(&header[..12], &SIGNATURE[..]);
        prop_assert_eq!(usize::from(u16::from_be_bytes([header[14], header[15]])), header.len() - 16);
        let mut data = header.clone();
        data.extend(&trailing);
        let decoded = proxy_protocol::decode(&data).unwrap();
        let (source, destination) = if source.is_ipv4() && destination.is_ipv4() {
            (source, destination)
        } else {
            (as_v6(source), as_v6(destination))
        };
        prop_assert_eq!(decoded.source, source);
        prop_assert_eq!(decoded.destination, destination);
        prop_assert_eq!(decoded.peer_identity, peer.map(|p| p.to_string()));
        prop_assert_eq!(decoded.len, header.len());
    }

    #[test]
    fn truncated_proxy_headers_do_not_decode(
        source in socket_addr(),
        destination in socket_addr(),
        peer in proptest::option::of(spiffe_id()),
        cut in any::<Index>(),
    ) {
        let header = proxy_protocol::encode(source, destination, peer.as_ref());
        let cut = cut.index(header.len());
        prop_assert_eq!(proxy_protocol::decode(&header[..cut]), None);
    }

    #[test]
    fn decoded_proxy_headers_lie_within_the_input(data in proxy_like()) {
        if let Some(decoded) = proxy_protocol::decode(&data) {
            prop_assert!(16 <= decoded.len && decoded.len <= data.len());
            prop_assert_eq!(proxy_protocol::decode(&data[..decoded.len]), Some(decoded.clone()));
            prop_assert_eq!(decoded.source.is_ipv4(), data[13] == 0x11);
            prop_assert_eq!(decoded.destination.is_ipv4(), data[13] == 0x11);
        }
    }
}

// ---------------------------------------------------------------------------
// Routes::parse / resolve
// ---------------------------------------------------------------------------

/// A route as (host, port, endpoints written, endpoints meant).
type RouteSpec = (String, Option<u16>, Vec<(String, SocketAddr)>);

/// An endpoint as a table may write it; port 0 names no endpoint and is
/// refused, so a written port is 1 or more.
fn endpoint() -> impl Strategy<Value = (String, SocketAddr)> {
    (ip(), proptest::option::of(1..=u16::MAX), any::<bool>()).prop_map(|(ip, port, bare)| {
        let written = match (ip, port) {
            (IpAddr::V4(v4), None) => v4.to_string(),
            (IpAddr::V4(v4), Some(p)) => format!("{v4}:{p}"),
            (IpAddr::V6(v6), None) if bare => v6.to_string(),
            (IpAddr::V6(v6), None) => format!("[{v6}]"),
            (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
        };
        (written, SocketAddr::new(ip, port.unwrap_or(15008)))
    })
}

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (
        prop_oneof![
            Just("echo.demo"),
            Just("Echo.Demo"),
            Just("db"),
            Just("web.ns.svc.cluster.local")
        ]
        .prop_map(String::from),
        proptest::option::of(prop_oneof![Just(80u16), Just(8080), any::<u16>()]),
        prop::collection::vec(endpoint(), 1..4),
    )
}

fn render_routes(routes: &[RouteSpec]) -> String {
    let mut toml = String::new();
    for (host, port, endpoints) in routes {
        toml.push_str(&format!("[[route]]\nhost = \"{host}\"\n"));
        if let Some(port) = port {
            toml.push_str(&format!("port = {port}\n"));
        }
        let written: Vec<String> = endpoints.iter().map(|(w, _)| format!("{w:?}")).collect();
        toml.push_str(&format!("endpoints = [{}]\n\n", written.join(", ")));
    }
    toml
}

proptest! {
    #![proptest_config(config())]

    /// A generated table parses, and `resolve` picks the first route whose
    /// host (any case) and port match, taking its endpoints in turn.
    #[test]
    fn generated_tables_resolve_like_the_model(
        routes in prop::collection::vec(route_spec(), 0..5),
        queries in prop::collection::vec(
            (prop_oneof![Just("echo.demo"), Just("ECHO.DEMO"), Just("db"), Just("web.ns.svc.cluster.local"), Just("nope")],
             prop_oneof![Just(80u16), Just(8080), any::<u16>()]),
            0..16,
        ),
    ) {
        let toml = render_routes(&routes);
        let table = Routes::parse(&toml, "routes.toml").unwrap();
        prop_assert_eq!(table.len(), routes.len());
        let mut turns = vec![0usize; routes.len()];
        for (host, port) in queries {
            let authority = format!("{host}:{port}");
            let expected = routes
                .iter()
                .position(|(h, p, _)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port))
                .map(|i| {
                    let endpoints = &routes[i].2;
                    turns[i] += 1;
                    endpoints[(turns[i] - 1) % endpoints.len()].1
                })
                .ok_or_else(|| RouteError::Unknown(authority.clone()));
            prop_assert_eq!(table.resolve(&authority), expected, "{}", toml);
        }
        for malformed in ["echo.demo", ":80", "echo.demo:", "echo.demo:http", "echo.demo:65536"] {
            prop_assert_eq!(table.resolve(malformed), Err(RouteError::Malformed(malformed.to_owned())));
        }
    }

    #[test]
    fn tables_with_bad_hosts_or_endpoints_are_refused(
        routes in prop::collection::vec(route_spec(), 1..4),
        which in any::<Index>(),
        bad_host in prop_oneof![Just(""), Just("a:80"), Just("a/b"), Just("a b")],
        bad_endpoint in prop_oneof![Just("web"), Just("web:80"), Just("10.0.0.1:http"), Just("10.0.0.256"), Just("")],
        break_host in any::<bool>(),
    ) {
        let mut routes = routes;
        let i = which.index(routes.len());
        if break_host {
            routes[i].0 = bad_host.to_owned();
        } else {
            let addr = routes[i].2[0].1;
            routes[i].2.push((bad_endpoint.to_owned(), addr));
        }
        let toml = render_routes(&routes);
        let error = Routes::parse(&toml, "routes.toml").unwrap_err().to_string();
        prop_assert!(error.contains("routes.toml") && error.contains(&format!("route {}", i + 1)), "{}", error);
    }

    #[test]
    fn routes_parse_never_panics(
        text in prop_oneof![
            any::<String>(),
            mutated(prop::collection::vec(route_spec(), 1..3).prop_map(|r| render_routes(&r))),
        ],
        authority in prop_oneof![any::<String>(), "[a-zA-Z.]{0,8}:[0-9]{0,6}"],
    ) {
        if let Ok(table) = Routes::parse(&text, "routes.toml") {
            for _ in 0..3 {
                let _ = table.resolve(&authority);
            }
        }
    }
}

/// `Routes::parse` takes endpoints with stray or unbalanced brackets
/// (`parse_endpoint` trims any number of `[` and `]` from either end), so
/// a typo like `"10.0.0.1]"` or `"[[fd00::1]]"` loads silently. They are
/// not "IP or IP:PORT" and should be refused like other malformed ones.
#[test]
fn gateway_refuses_endpoints_with_stray_brackets() {
    for endpoint in [
        "10.0.0.1]",
        "[10.0.0.1",
        "[[fd00::1]]",
        "fd00::1]",
        "[fd00::1",
    ] {
        let toml = format!("[[route]]\nhost = \"a\"\nendpoints = [\"{endpoint}\"]\n");
        assert!(
            Routes::parse(&toml, "routes.toml").is_err(),
            "endpoint {endpoint:?} was accepted"
        );
    }
}
