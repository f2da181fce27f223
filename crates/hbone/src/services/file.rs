//! Services tables from TOML files (the `files` feature).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::ServiceTable;

/// A services file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServicesFileError {
    /// The file could not be read.
    #[error("cannot read services file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or not a services table (an unknown
    /// key, a value of the wrong type).
    #[error("{path}: {message}")]
    Syntax {
        /// The file, or the name given for the text.
        path: String,
        /// What the TOML parser said, with the line.
        message: String,
    },
    /// An entry's value is not usable (a bad host, port or address).
    #[error("{path}, line {line}: {message}")]
    Entry {
        /// The file, or the name given for the text.
        path: String,
        /// The line of the offending value, counting from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
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
            message: crate::toml_error::one_line(text, &e),
        })?;
        let fail = |span: std::ops::Range<usize>, message: String| ServicesFileError::Entry {
            path: name.to_owned(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
            message,
        };
        let mut table = ServiceTable::new();
        for entry in file.service {
            let span = entry.span();
            let entry = entry.into_inner();
            let mut ports = Vec::with_capacity(entry.ports.len());
            for (service_port, target_port) in &entry.ports {
                let service = service_port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0 && service_port.bytes().all(|b| b.is_ascii_digit()));
                let target = u16::try_from(*target_port).ok().filter(|p| *p != 0);
                match (service, target) {
                    (Some(service), Some(target)) => ports.push((service, target)),
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
            table
                .add_service(&entry.host, ports, address)
                .map_err(|e| fail(span, e.to_string()))?;
        }
        for domain in file.resolve_domains {
            table
                .add_resolve_domain(domain.get_ref())
                .map_err(|e| fail(domain.span(), format!("resolve-domains: {e}")))?;
        }
        Ok(table)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ServiceName;
    use crate::authority::{Target, parse_target};
    use crate::services::{Resolution, ServiceError};

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
