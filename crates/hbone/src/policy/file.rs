//! Policy files (TOML): ordered allow and deny rules.
//!
//! ```toml
//! [[rule]]
//! name = "web reaches the database"   # shown in logs and `hbone policy test`
//! action = "allow"                    # or "deny"; default "allow"
//! from = ["spiffe://cluster.local/ns/web/*"]   # SPIFFE ID patterns; default: anyone
//! source = ["10.0.0.0/8"]             # TCP peer networks; default: anywhere
//! to = ["10.1.2.3:5432", "[fd00::/8]:80-90"]   # targets; default: anything
//! # a target may also be a service the CONNECT names: "db.demo.svc.cluster.local:5432"
//!
//! [[rule]]
//! name = "nobody reaches the metrics port"
//! action = "deny"
//! to = ["0.0.0.0/0:9090"]
//! ```
//!
//! Deny wins over allow; a tunnel no allow rule matches is denied. Errors
//! name the file, the line and what would be valid.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, IdPattern, IpNet, Policy, Rule, ServiceRule, TargetRule};

/// A policy file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFileError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or not a policy (an unknown key, a
    /// value of the wrong type).
    #[error("{path}: {message}")]
    Syntax {
        /// The file, or the name given for the text.
        path: String,
        /// What the TOML parser said, with the line.
        message: String,
    },
    /// A rule's value is not usable (a bad pattern, network or port).
    #[error("{path}, line {line}: {message}")]
    Rule {
        /// The file, or the name given for the text.
        path: String,
        /// The line of the offending value, counting from 1.
        line: usize,
        /// What is wrong, and what would be valid.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    #[serde(default)]
    from: Vec<Spanned<String>>,
    #[serde(default)]
    source: Vec<Spanned<String>>,
    #[serde(default)]
    to: Vec<Spanned<String>>,
}

/// Reads and checks a policy file.
pub fn load(path: impl AsRef<Path>) -> Result<Policy, PolicyFileError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: name.clone(),
        source,
    })?;
    parse(&text, &name)
}

/// Parses a policy file's text; `name` labels errors.
pub fn parse(text: &str, name: &str) -> Result<Policy, PolicyFileError> {
    let file: File = toml::from_str(text).map_err(|e| PolicyFileError::Syntax {
        path: name.to_owned(),
        message: crate::toml_error::one_line(text, &e),
    })?;
    let fail = |span: std::ops::Range<usize>, message: String| PolicyFileError::Rule {
        path: name.to_owned(),
        line: text[..span.start.min(text.len())].matches('\n').count() + 1,
        message,
    };
    let mut rules = Vec::with_capacity(file.rule.len());
    for (index, entry) in file.rule.into_iter().enumerate() {
        let action = match &entry.action {
            None => Action::Allow,
            Some(action) => match action.get_ref().as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => {
                    return Err(fail(
                        action.span(),
                        format!("action {other:?}: use \"allow\" or \"deny\""),
                    ));
                }
            },
        };
        let from = entry
            .from
            .iter()
            .map(|p| {
                let pattern = p
                    .get_ref()
                    .parse::<IdPattern>()
                    .map_err(|e| fail(p.span(), format!("from {:?}: {e}", p.get_ref())))?;
                match never_a_workload(&pattern) {
                    Some(hint) => Err(fail(p.span(), format!("from {:?}: {hint}", p.get_ref()))),
                    None => Ok(pattern),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let source = entry
            .source
            .iter()
            .map(|n| {
                parse_network(n.get_ref()).ok_or_else(|| {
                    fail(
                        n.span(),
                        format!(
                            "source {:?}: expected an IP or CIDR, e.g. 10.0.0.0/8",
                            n.get_ref()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut to = Vec::new();
        let mut services = Vec::new();
        for target in &entry.to {
            match parse_target(target.get_ref()) {
                Ok(Either::Addr(rule)) => to.push(rule),
                Ok(Either::Service(rule)) => services.push(rule),
                Err(e) => {
                    return Err(fail(
                        target.span(),
                        format!("to {:?}: {e}", target.get_ref()),
                    ));
                }
            }
        }
        let (name, name_span) = match entry.name {
            Some(name) => (name.get_ref().clone(), Some(name.span())),
            None => (format!("rule {}", index + 1), None),
        };
        if let Some(earlier) = rules.iter().position(|r: &Rule| r.name == name) {
            return Err(fail(
                name_span.unwrap_or(0..0),
                format!(
                    "rule name {name:?} is already used by rule {}; names label the policy metrics, so each must be unique",
                    earlier + 1
                ),
            ));
        }
        rules.push(Rule {
            name,
            action,
            from,
            source,
            to,
            services,
        });
    }
    Ok(Policy::from_rules(rules))
}

enum Either {
    Addr(TargetRule),
    Service(ServiceRule),
}

/// A target: `CIDR[:PORTS]`, or a service `HOST[:PORTS]` when it starts
/// like a host name (a letter, or digits followed by a letter or '-').
fn parse_target(text: &str) -> Result<Either, String> {
    match text.parse::<TargetRule>() {
        Ok(rule) => Ok(Either::Addr(rule)),
        Err(address_error) => {
            let host = text.split(':').next().unwrap_or_default();
            let looks_like_name = !text.starts_with('[')
                && !host.contains('/')
                && host.bytes().any(|b| b.is_ascii_alphabetic())
                && host.parse::<std::net::IpAddr>().is_err();
            if looks_like_name {
                text.parse::<ServiceRule>()
                    .map(Either::Service)
                    .map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "{address_error} (or a service HOST[:PORT], e.g. echo.default.svc.cluster.local:8081)"
                ))
            }
        }
    }
}

/// A pattern that can never match an Istio workload: an exact ID that is
/// only a namespace (`spiffe://TD/ns/NS`), which is nearly always the
/// namespace wildcard with its `/*` forgotten.
fn never_a_workload(pattern: &IdPattern) -> Option<String> {
    let IdPattern::Exact(id) = pattern else {
        return None;
    };
    let segments: Vec<&str> = id.path().split('/').skip(1).collect();
    match segments.as_slice() {
        ["ns", namespace] => Some(format!(
            "matches only that exact ID, which no workload has; for every workload of the namespace write spiffe://{}/ns/{namespace}/*",
            id.trust_domain()
        )),
        _ => None,
    }
}

/// An IP network: a CIDR, or one address.
fn parse_network(text: &str) -> Option<IpNet> {
    let rule: TargetRule = text.parse().ok()?;
    // A network has no ports; a port given here is a mistake.
    (rule.ports == (1, u16::MAX) && !text.contains(']') && text.matches(':').count() != 1)
        .then_some(rule.net)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::SpiffeId;
    use crate::policy::Denial;

    const POLICY: &str = r#"
[[rule]]
name = "web to db"
from = ["spiffe://td/ns/web/*"]
to = ["10.1.2.3:5432"]

[[rule]]
name = "no intruder"
action = "deny"
from = ["spiffe://td/ns/web/sa/intruder"]

[[rule]]
name = "office to anything internal"
source = ["192.0.2.0/24"]
to = ["10.0.0.0/8"]
"#;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }
    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_decide_in_order_with_deny_winning() {
        let policy = parse(POLICY, "policy.toml").unwrap();
        let web = id("spiffe://td/ns/web/sa/app");
        let intruder = id("spiffe://td/ns/web/sa/intruder");
        let other = id("spiffe://td/ns/other/sa/app");
        let inside = ip("10.9.9.9");
        let office = ip("192.0.2.7");
        assert_eq!(
            policy
                .decide(&web, inside, addr("10.1.2.3:5432"))
                .unwrap()
                .rule,
            "web to db"
        );
        assert_eq!(
            policy.decide(&web, inside, addr("10.1.2.3:22")),
            Err(Denial::Target(addr("10.1.2.3:22")))
        );
        assert_eq!(
            policy.decide(&intruder, office, addr("10.1.2.3:5432")),
            Err(Denial::Rule {
                rule: "no intruder".into()
            })
        );
        assert_eq!(
            policy
                .decide(&other, office, addr("10.5.5.5:80"))
                .unwrap()
                .rule,
            "office to anything internal"
        );
        // The office rule allows any identity, but only from the office.
        assert_eq!(
            policy.decide(&other, inside, addr("10.5.5.5:80")),
            Err(Denial::Source(inside))
        );
        // The office rule names no identity: from the office, anyone.
        let intruder_web = id("spiffe://elsewhere/ns/x/sa/y");
        assert!(
            policy
                .decide(&intruder_web, office, addr("10.5.5.5:80"))
                .is_ok()
        );
        // Loopback is not allowed by any rule here.
        assert!(policy.decide(&web, inside, addr("127.0.0.1:5432")).is_err());
    }

    #[test]
    fn rules_may_name_services() {
        let policy = parse(
            r#"
[[rule]]
name = "no secrets"
action = "deny"
to = ["secret.demo.svc.cluster.local"]

[[rule]]
name = "echo by name"
to = ["Echo.demo.svc.cluster.local:8080-8081", "10.9.0.0/16:22"]
"#,
            "policy.toml",
        )
        .unwrap();
        let rule = &policy.rules()[1];
        assert_eq!(rule.to.len(), 1);
        assert_eq!(
            rule.services[0].to_string(),
            "echo.demo.svc.cluster.local:8080-8081"
        );
        let peer = id("spiffe://td/ns/web/sa/app");
        let from = ip("10.0.0.1");
        let service = |text: &str| match crate::authority::parse_target(text).unwrap() {
            crate::authority::Target::Service(name) => name,
            crate::authority::Target::Addr(_) => unreachable!(),
        };
        let target = addr("10.1.1.1:8080");
        let echo = service("echo.demo.svc.cluster.local:8080");
        assert_eq!(
            policy
                .decide_service(&peer, from, target, Some(&echo))
                .unwrap()
                .rule,
            "echo by name"
        );
        // The same address asked for directly matches no rule.
        assert!(policy.decide(&peer, from, target).is_err());
        // Another port of the service, or another service, is not allowed.
        let other_port = service("echo.demo.svc.cluster.local:9090");
        assert!(
            policy
                .decide_service(&peer, from, target, Some(&other_port))
                .is_err()
        );
        let secret = service("secret.demo.svc.cluster.local:8080");
        assert_eq!(
            policy.decide_service(&peer, from, target, Some(&secret)),
            Err(Denial::Rule {
                rule: "no secrets".into()
            })
        );
        // Address rules still judge what a name resolved to.
        assert!(
            policy
                .decide_service(&peer, from, addr("10.9.1.1:22"), Some(&secret))
                .is_err(),
            "the deny rule naming the service wins"
        );
        assert_eq!(
            policy
                .decide_service(&peer, from, addr("10.9.1.1:22"), Some(&other_port))
                .unwrap()
                .rule,
            "echo by name"
        );
        // Built-in denials hold whatever the name.
        assert!(matches!(
            policy.decide_service(&peer, from, addr("169.254.169.254:8080"), Some(&echo)),
            Err(Denial::BuiltIn(_))
        ));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[[rule]]\nto = [\"10.0.0.0/8\"]\nfrom = [\"spiffe://td/a*\"]\n",
                3,
                "from",
            ),
            ("[[rule]]\n\nto = [\"10.0.0.1/8\"]\n", 3, "host bits"),
            ("[[rule]]\naction = \"permit\"\n", 2, "allow"),
            ("[[rule]]\nsource = [\"10.0.0.0/8:80\"]\n", 2, "CIDR"),
            (
                "[[rule]]\nto = [\"10.0.0.300\"]\n",
                2,
                "or a service HOST[:PORT]",
            ),
            ("[[rule]]\nto = [\"echo.demo:0\"]\n", 2, "port"),
            (
                "[[rule]]\nto = [\"echo_demo:80\"]\n",
                2,
                "HOST[:PORT|:PORT-PORT]",
            ),
            (
                "[[rule]]\nto = [\"not-an-address\"]\n",
                2,
                "qualified service",
            ),
            (
                "[[rule]]\nfrom = [\"spiffe://td/ns/web\"]\n",
                2,
                "write spiffe://td/ns/web/*",
            ),
            (
                "[[rule]]\nname = \"a\"\n\n[[rule]]\nname = \"a\"\n",
                5,
                "already used by rule 1",
            ),
        ];
        for (text, line, needle) in cases {
            match parse(text, "p.toml") {
                Err(PolicyFileError::Rule {
                    line: got, message, ..
                }) => {
                    assert_eq!(got, line, "{message}");
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("expected a rule error for {text:?}, got {other:?}"),
            }
        }
        let syntax = parse("[[rule]]\nfrom = \"not a list\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            syntax.contains("p.toml") && syntax.contains("line 2"),
            "{syntax}"
        );
        assert!(!syntax.contains('\n'), "one line: {syntax}");
        let unknown = parse("[[rule]]\nallow = true\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field"), "{unknown}");
    }
}
