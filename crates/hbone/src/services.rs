//! The services table of a server: which service host names it answers
//! for, and where each one's traffic goes.
//!
//! ztunnel names a service rather than an address on the inner CONNECT of
//! double HBONE (`:authority echo.default.svc.cluster.local:8081`), and so
//! do waypoints. Its own inbound side looks the service up by host name,
//! takes the address the connection arrived on and maps the service port to
//! the workload's port. This table does the same from a file:
//!
//! ```toml
//! [[service]]
//! host = "echo.default.svc.cluster.local"
//! ports = { 8081 = 8080 }     # service port = target port; default: any port, unchanged
//! address = "127.0.0.1"       # default: the address the HBONE connection arrived on
//!
//! # Names under these domains that no [[service]] lists are resolved with
//! # the system resolver; every other name is refused without a lookup.
//! resolve-domains = ["internal.example"]
//! ```
//!
//! The policy still judges the address a name resolves to (and may also
//! name the service). Names the table does not know are refused with
//! `503` and the reason `unknown_service`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use toml::Spanned;

use crate::authority::{ServiceName, normalize_host};

/// A services file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ServicesFileError {
    #[error("cannot read services file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}, line {line}: {message}")]
    Entry {
        path: String,
        line: usize,
        message: String,
    },
}

/// Why a service name has no target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("unknown service {0}: not in this server's services table")]
    Unknown(ServiceName),
    #[error("service {name} has no port {port} (it serves {known})")]
    UnknownPort {
        name: String,
        port: u16,
        known: String,
    },
    #[error("cannot resolve {name}: {reason}")]
    Resolve { name: ServiceName, reason: String },
}

/// Where a service's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// This address.
    Addr(SocketAddr),
    /// Whatever the system resolver says of this name (a domain the
    /// operator listed), at this port.
    Lookup(ServiceName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Service {
    host: String,
    /// Service port to target port; empty means any port, unchanged.
    ports: BTreeMap<u16, u16>,
    /// `None`: the address the HBONE connection arrived on.
    address: Option<IpAddr>,
}

/// Service host names and where they lead. The default table is empty:
/// every name is unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    services: Vec<Service>,
    resolve_domains: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    service: Vec<Spanned<Entry>>,
    #[serde(default)]
    resolve_domains: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    host: String,
    #[serde(default)]
    ports: BTreeMap<String, i64>,
    address: Option<String>,
}

impl ServiceTable {
    /// Reads and checks a services file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ServicesFileError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ServicesFileError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    /// Parses a services file's text; `name` labels errors.
    pub fn parse(text: &str, name: &str) -> Result<Self, ServicesFileError> {
        let file: File = toml::from_str(text).map_err(|e| ServicesFileError::Syntax {
            path: name.to_owned(),
            message: e.to_string(),
        })?;
        let fail = |span: std::ops::Range<usize>, message: String| ServicesFileError::Entry {
            path: name.to_owned(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
            message,
        };
        let mut services: Vec<Service> = Vec::with_capacity(file.service.len());
        for entry in file.service {
            let span = entry.span();
            let entry = entry.into_inner();
            let host = normalize_host(&entry.host).ok_or_else(|| {
                fail(
                    span.clone(),
                    format!(
                        "host {:?} is not a host name (letters, digits, '-' and '.', e.g. echo.default.svc.cluster.local)",
                        entry.host
                    ),
                )
            })?;
            if services.iter().any(|s| s.host == host) {
                return Err(fail(
                    span,
                    format!("host {host} is listed twice; give one entry all its ports"),
                ));
            }
            let mut ports = BTreeMap::new();
            for (service_port, target_port) in &entry.ports {
                let service = service_port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0 && service_port.bytes().all(|b| b.is_ascii_digit()));
                let target = u16::try_from(*target_port).ok().filter(|p| *p != 0);
                match (service, target) {
                    (Some(service), Some(target)) => {
                        ports.insert(service, target);
                    }
                    _ => {
                        return Err(fail(
                            span,
                            format!(
                                "ports: {service_port:?} = {target_port} is not SERVICE_PORT = TARGET_PORT (1-65535), e.g. ports = {{ 8081 = 8080 }}"
                            ),
                        ));
                    }
                }
            }
            let address = match entry.address {
                None => None,
                Some(text) => Some(parse_ip(&text).ok_or_else(|| {
                    fail(
                        span.clone(),
                        format!("address {text:?} is not an IP address, e.g. 127.0.0.1 or ::1"),
                    )
                })?),
            };
            services.push(Service {
                host,
                ports,
                address,
            });
        }
        let mut resolve_domains = Vec::with_capacity(file.resolve_domains.len());
        for domain in file.resolve_domains {
            let normalized = normalize_host(domain.get_ref()).ok_or_else(|| {
                fail(
                    domain.span(),
                    format!(
                        "resolve-domains: {:?} is not a domain name, e.g. internal.example",
                        domain.get_ref()
                    ),
                )
            })?;
            resolve_domains.push(normalized);
        }
        Ok(ServiceTable {
            services,
            resolve_domains,
        })
    }

    /// How many services are listed.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether no service is listed and no domain is resolved.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.resolve_domains.is_empty()
    }

    /// Where `name` leads for a connection that arrived on `arrived_on`.
    pub fn resolve(
        &self,
        name: &ServiceName,
        arrived_on: IpAddr,
    ) -> Result<Resolution, ServiceError> {
        if let Some(service) = self.services.iter().find(|s| s.host == name.host()) {
            let port = if service.ports.is_empty() {
                name.port()
            } else {
                *service
                    .ports
                    .get(&name.port())
                    .ok_or_else(|| ServiceError::UnknownPort {
                        name: service.host.clone(),
                        port: name.port(),
                        known: service
                            .ports
                            .keys()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?
            };
            let ip = service.address.unwrap_or(arrived_on.to_canonical());
            return Ok(Resolution::Addr(SocketAddr::new(ip, port)));
        }
        let host = name.host();
        let listed = self.resolve_domains.iter().any(|domain| {
            host == domain
                || (host.len() > domain.len()
                    && host.ends_with(domain.as_str())
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.')
        });
        if listed {
            Ok(Resolution::Lookup(name.clone()))
        } else {
            Err(ServiceError::Unknown(name.clone()))
        }
    }
}

/// An IP address, IPv6 with or without brackets.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().ok()
}

/// The services table in force, replaceable while the server runs.
#[derive(Debug, Clone, Default)]
pub struct ServicesHandle {
    current: Arc<RwLock<Arc<ServiceTable>>>,
}

impl ServicesHandle {
    pub fn new(table: ServiceTable) -> Self {
        ServicesHandle {
            current: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// The table now; keep it for one lookup.
    pub fn current(&self) -> Arc<ServiceTable> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `table` in force for every tunnel from now on.
    pub fn replace(&self, table: ServiceTable) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{Target, parse_target};

    const TABLE: &str = r#"
        resolve-domains = ["internal.example"]

        [[service]]
        host = "echo.default.svc.cluster.local"
        ports = { 8081 = 8080, 9090 = 9090 }

        [[service]]
        host = "DB.demo."
        address = "::1"
    "#;

    fn name(text: &str) -> ServiceName {
        match parse_target(text).unwrap() {
            Target::Service(name) => name,
            Target::Addr(addr) => panic!("{addr} is not a name"),
        }
    }

    const ARRIVED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn names_resolve_as_listed() {
        let table = ServiceTable::parse(TABLE, "services.toml").unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.resolve(&name("echo.default.svc.cluster.local:8081"), ARRIVED),
            Ok(Resolution::Addr("127.0.0.2:8080".parse().unwrap()))
        );
        assert_eq!(
            table.resolve(&name("ECHO.default.svc.cluster.local:9090"), ARRIVED),
            Ok(Resolution::Addr("127.0.0.2:9090".parse().unwrap()))
        );
        assert!(matches!(
            table.resolve(&name("echo.default.svc.cluster.local:1234"), ARRIVED),
            Err(ServiceError::UnknownPort { port: 1234, .. })
        ));
        assert_eq!(
            table.resolve(&name("db.demo:5432"), ARRIVED),
            Ok(Resolution::Addr("[::1]:5432".parse().unwrap()))
        );
        // The arrived-on address in its plain form, not IPv4-mapped.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            table.resolve(&name("echo.default.svc.cluster.local:8081"), mapped),
            Ok(Resolution::Addr("10.1.2.3:8080".parse().unwrap()))
        );
    }

    #[test]
    fn only_listed_domains_are_looked_up() {
        let table = ServiceTable::parse(TABLE, "services.toml").unwrap();
        for listed in ["internal.example:80", "db.internal.example:5432"] {
            assert_eq!(
                table.resolve(&name(listed), ARRIVED),
                Ok(Resolution::Lookup(name(listed)))
            );
        }
        for unknown in [
            "xinternal.example:80",
            "example:80",
            "internal.example.evil:80",
            "echo.default.svc.cluster.local.evil:8081",
        ] {
            assert!(
                matches!(
                    table.resolve(&name(unknown), ARRIVED),
                    Err(ServiceError::Unknown(_))
                ),
                "{unknown}"
            );
        }
        let empty = ServiceTable::default();
        assert!(empty.is_empty());
        assert!(empty.resolve(&name("localhost:80"), ARRIVED).is_err());
    }

    #[test]
    fn bad_files_name_line_and_fix() {
        let cases = [
            ("[[service]]\nhost = \"a b\"", 1, "not a host name"),
            (
                "\n[[service]]\nhost = \"a\"\nports = { x = 1 }",
                2,
                "SERVICE_PORT = TARGET_PORT",
            ),
            (
                "[[service]]\nhost = \"a\"\nports = { 80 = 0 }",
                1,
                "SERVICE_PORT = TARGET_PORT",
            ),
            (
                "[[service]]\nhost = \"a\"\nports = { 80 = 70000 }",
                1,
                "1-65535",
            ),
            (
                "[[service]]\nhost = \"a\"\naddress = \"a.b\"",
                1,
                "not an IP address",
            ),
            (
                "[[service]]\nhost = \"a\"\n[[service]]\nhost = \"A.\"",
                3,
                "listed twice",
            ),
            ("resolve-domains = [\"-x\"]", 1, "not a domain name"),
        ];
        for (text, line, needle) in cases {
            let error = ServiceTable::parse(text, "s.toml").unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("s.toml, line {line}: ")) && error.contains(needle),
                "{text:?}: {error}"
            );
        }
        for (text, needle) in [
            ("[[service]]\nhost = \"a\"\nport = 80", "unknown field"),
            ("[[service]]\nports = { 80 = 81 }", "missing field"),
            ("[[services]]\nhost = \"a\"", "unknown field"),
        ] {
            let error = ServiceTable::parse(text, "s.toml").unwrap_err().to_string();
            assert!(
                error.starts_with("s.toml: ") && error.contains(needle),
                "{error}"
            );
        }
    }
}
