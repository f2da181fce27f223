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
use std::sync::{Arc, RwLock};

use crate::authority::{ServiceName, normalize_host};

#[cfg(feature = "files")]
mod file;
#[cfg(feature = "files")]
pub use file::ServicesFileError;

/// Why a service cannot be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceSpecError {
    /// The service's host is not a valid host name.
    #[error(
        "host {0:?} is not a host name (letters, digits, '-' and '.', e.g. echo.default.svc.cluster.local)"
    )]
    Host(String),
    /// The host is already in the table.
    #[error("host {0} is listed twice; give one entry all its ports")]
    Duplicate(String),
    /// A service or target port is 0.
    #[error("ports are 1-65535")]
    Port,
    /// A resolve domain is not a valid domain name.
    #[error("{0:?} is not a domain name, e.g. internal.example")]
    Domain(String),
}

/// Why a service name has no target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// No service lists the name, and it is under no resolve domain.
    #[error("unknown service {0}: not in this server's services table")]
    Unknown(ServiceName),
    /// The service is listed, but its port map lacks the port asked for.
    #[error("service {name} has no port {port} (it serves {known})")]
    UnknownPort {
        /// The service's host name.
        name: String,
        /// The service port asked for.
        port: u16,
        /// The service ports it does map, comma-separated.
        known: String,
    },
    /// Looking up a name under a resolve domain failed, timed out, or
    /// gave no usable address.
    #[error("cannot resolve {name}: {reason}")]
    Resolve {
        /// The name looked up.
        name: ServiceName,
        /// What went wrong.
        reason: String,
    },
}

/// Where a service's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

impl ServiceTable {
    /// An empty table: every name is unknown.
    pub fn new() -> Self {
        ServiceTable::default()
    }

    /// Lists a service: its `host` name, a map of service ports to target
    /// ports (empty: any port, unchanged) and the address it leads to
    /// (`None`: the address the HBONE connection arrived on).
    pub fn add_service(
        &mut self,
        host: &str,
        ports: impl IntoIterator<Item = (u16, u16)>,
        address: Option<IpAddr>,
    ) -> Result<(), ServiceSpecError> {
        let host = normalize_host(host).ok_or_else(|| ServiceSpecError::Host(host.to_owned()))?;
        if self.services.iter().any(|s| s.host == host) {
            return Err(ServiceSpecError::Duplicate(host));
        }
        let mut map = BTreeMap::new();
        for (service, target) in ports {
            if service == 0 || target == 0 {
                return Err(ServiceSpecError::Port);
            }
            map.insert(service, target);
        }
        self.services.push(Service {
            host,
            ports: map,
            address,
        });
        Ok(())
    }

    /// Lets names under `domain` (and `domain` itself) that no service
    /// lists be resolved with the system resolver.
    pub fn add_resolve_domain(&mut self, domain: &str) -> Result<(), ServiceSpecError> {
        let domain =
            normalize_host(domain).ok_or_else(|| ServiceSpecError::Domain(domain.to_owned()))?;
        self.resolve_domains.push(domain);
        Ok(())
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

/// The services table in force, replaceable while the server runs.
#[derive(Debug, Clone, Default)]
pub struct ServicesHandle {
    current: Arc<RwLock<Arc<ServiceTable>>>,
}

impl ServicesHandle {
    /// A handle that starts with `table`.
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
