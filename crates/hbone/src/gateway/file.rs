//! Routing tables from TOML files (the `files` feature).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use super::Routes;
use crate::HBONE_PORT;

/// Why a routing table could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoutesError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or not a routing table.
    #[error("{path}: {message}")]
    Parse {
        /// The file, or the name given for the text.
        path: String,
        /// What the TOML parser said.
        message: String,
    },
    /// One route is not usable (a bad host, endpoint or empty list).
    #[error("{path}: route {index} ({host}): {message}")]
    Route {
        /// The file, or the name given for the text.
        path: String,
        /// Which `[[route]]`, counting from 1.
        index: usize,
        /// The route's host.
        host: String,
        /// What is wrong with it.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    route: Vec<RouteEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    host: String,
    port: Option<u16>,
    endpoints: Vec<String>,
}

impl Routes {
    /// Loads and checks a TOML routing table.
    pub fn load(path: impl AsRef<Path>) -> Result<Routes, RoutesError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RoutesError::Read {
            path: name.clone(),
            source,
        })?;
        Routes::parse(&text, &name)
    }

    /// Parses a TOML routing table; `name` labels errors.
    pub fn parse(text: &str, name: &str) -> Result<Routes, RoutesError> {
        let file: File = toml::from_str(text).map_err(|e| RoutesError::Parse {
            path: name.to_owned(),
            message: crate::toml_error::one_line(text, &e),
        })?;
        let mut routes = Routes::new();
        for (index, entry) in file.route.into_iter().enumerate() {
            let fail = |message: String| RoutesError::Route {
                path: name.to_owned(),
                index: index + 1,
                host: entry.host.clone(),
                message,
            };
            let endpoints = entry
                .endpoints
                .iter()
                .map(|e| {
                    parse_endpoint(e)
                        .ok_or_else(|| fail(format!("endpoint {e:?} is not IP or IP:PORT")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            routes
                .add(&entry.host, entry.port, endpoints)
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(routes)
    }
}

/// `ip:port`, `[ipv6]:port`, a bare IP or a bracketed IPv6 (port 15008).
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return (addr.port() != 0).then_some(addr);
    }
    let ip = match text.strip_prefix('[') {
        Some(rest) => IpAddr::V6(rest.strip_suffix(']')?.parse().ok()?),
        None => text.parse::<IpAddr>().ok()?,
    };
    Some(SocketAddr::new(ip, HBONE_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::RouteError;

    const TABLE: &str = r#"
        [[route]]
        host = "echo.demo.svc.cluster.local"
        port = 8080
        endpoints = ["10.0.0.7", "10.0.0.8:15009"]

        [[route]]
        host = "db.demo"
        endpoints = ["[fd00::1]"]
    "#;

    #[test]
    fn resolves_in_turn() {
        let routes = Routes::parse(TABLE, "routes.toml").unwrap();
        assert_eq!(routes.len(), 2);
        let first = routes.resolve("echo.demo.svc.cluster.local:8080").unwrap();
        let second = routes.resolve("ECHO.demo.svc.cluster.local:8080").unwrap();
        assert_eq!(first, "10.0.0.7:15008".parse().unwrap());
        assert_eq!(second, "10.0.0.8:15009".parse().unwrap());
        assert_eq!(
            routes.resolve("db.demo:5432").unwrap(),
            "[fd00::1]:15008".parse().unwrap()
        );
        assert_eq!(
            routes.resolve("echo.demo.svc.cluster.local:9090"),
            Err(RouteError::Unknown(
                "echo.demo.svc.cluster.local:9090".into()
            ))
        );
        assert!(matches!(
            routes.resolve("nope:1"),
            Err(RouteError::Unknown(_))
        ));
        assert!(matches!(
            routes.resolve("no-port"),
            Err(RouteError::Malformed(_))
        ));
        assert!(matches!(
            routes.resolve(":80"),
            Err(RouteError::Malformed(_))
        ));
    }

    /// A capturing node asks for the address it was going to: routes
    /// name addresses as hosts, compared as addresses.
    #[test]
    fn ip_hosts_route_addresses() {
        let table = r#"
            [[route]]
            host = "10.78.1.2"
            port = 8080
            endpoints = ["10.78.1.2"]

            [[route]]
            host = "[fd78::2]"
            endpoints = ["[fd78::2]:15009"]
        "#;
        let routes = Routes::parse(table, "routes.toml").unwrap();
        assert_eq!(
            routes.resolve("10.78.1.2:8080").unwrap(),
            "10.78.1.2:15008".parse().unwrap()
        );
        assert_eq!(
            routes.resolve("[fd78:0::2]:443").unwrap(),
            "[fd78::2]:15009".parse().unwrap()
        );
        for unknown in ["10.78.1.2:9090", "10.78.1.3:8080", "[fd78::3]:443"] {
            assert_eq!(
                routes.resolve(unknown),
                Err(RouteError::Unknown(unknown.into())),
                "{unknown}"
            );
        }
        // IPv6 without brackets is no authority a client sends.
        assert!(routes.resolve("fd78::2:443").is_err());
        // A bare IPv6 host is unambiguous in the file, where no port
        // follows it.
        let bare = "[[route]]\nhost = \"fd78::2\"\nendpoints = [\"[fd78::2]\"]";
        let routes = Routes::parse(bare, "routes.toml").unwrap();
        assert!(routes.resolve("[fd78::2]:80").is_ok());
    }

    #[test]
    fn bad_tables_name_the_problem() {
        let cases = [
            (
                "[[route]]\nhost = \"a\"\nendpoints = []",
                "at least one endpoint",
            ),
            (
                "[[route]]\nhost = \"a\"\nendpoints = [\"web:80\"]",
                "not IP",
            ),
            (
                "[[route]]\nhost = \"a:80\"\nendpoints = [\"10.0.0.1\"]",
                "bare host",
            ),
            (
                "[[route]]\nhost = \"[10.0.0.1]\"\nendpoints = [\"10.0.0.1\"]",
                "IP address (IPv6 in brackets)",
            ),
            (
                "[[route]]\nhost = \"[fd00::1]:80\"\nendpoints = [\"10.0.0.1\"]",
                "bare host",
            ),
            (
                "[[route]]\nhost = \"a\"\nendpoint = [\"10.0.0.1\"]",
                "unknown field",
            ),
            ("[[route]]\nhost = 5", "invalid type"),
        ];
        for (text, needle) in cases {
            let error = Routes::parse(text, "routes.toml").unwrap_err().to_string();
            assert!(
                error.contains("routes.toml") && error.contains(needle),
                "{error}"
            );
        }
    }
}
