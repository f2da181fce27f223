//! HBONE: TCP tunnelled through HTTP/2 `CONNECT` inside mutual TLS with
//! SPIFFE identities, wire-compatible with Istio ambient's ztunnel.
//!
//! What each part is for:
//!
//! - [`Dialer`] opens [`Tunnel`]s (`AsyncRead + AsyncWrite` byte streams)
//!   through an HBONE server, directly or through a gateway ([`Route`]),
//!   sharing pooled HTTP/2 connections; [`Dialer::close`] ends them cleanly.
//! - [`Server`] terminates tunnels: it proves its identity, checks the
//!   peer's, the request and the [`policy`], dials the target (an address,
//!   or a service from its [`services`] table) and relays; with
//!   [`gateway`] routes it is a double-HBONE gateway.
//! - [`Identity`] and [`SpiffeId`]: certificates, keys and trust bundles,
//!   and the SPIFFE IDs they prove; [`tls`] holds the verifiers.
//! - [`Tunnel::relay`] relays a tunnel to any local byte stream (a socket,
//!   a Unix stream, stdin/stdout), with the engine the entries and the
//!   server use: no buffer while idle, half-close, counts that survive
//!   errors.
//! - [`lifecycle::TunnelLifecycle`]: one record per tunnel (access log,
//!   Istio counters, open-tunnel list), for tunnels you relay yourself.
//! - [`entry`]: the ways traffic gets in (port forward, stdin/stdout,
//!   SOCKS5); [`access`] the access-log records.
//! - Optional, by Cargo feature: `metrics` (Prometheus), `admin` (the admin
//!   HTTP endpoint), `ca` (a development CA), `files` (policy, routing and
//!   services tables in TOML). All are on by default.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use hbone::{Dialer, Identity, SpiffeId};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let identity = Identity::from_dir("certs/client")?;
//! let dialer = Dialer::new(&identity)?;
//! let server_id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/server".parse()?;
//! let mut tunnel = dialer
//!     .connect("10.0.0.2:15008".parse()?, &[server_id], "127.0.0.1:8080".parse()?)
//!     .await?;
//! tunnel.write_all(b"hello").await?;
//! tunnel.shutdown().await?; // half-close: END_STREAM
//! let mut answer = Vec::new();
//! tunnel.read_to_end(&mut answer).await?;
//! # Ok(()) }
//! ```
//!
//! ## Configuration and stability
//!
//! Configuration types ([`ServerConfig`], [`DialerConfig`],
//! [`config::Timeouts`], [`config::H2Settings`], [`server::Limits`],
//! [`keepalive::Keepalive`], [`TunnelRequest`], [`Telemetry`], and
//! `admin::Admin` with the `admin` feature) are
//! `#[non_exhaustive]`: options may be added without breaking you, so
//! they are not built as struct literals. Start from their constructor or
//! `Default` and chain `with_<field>(value)` methods, each of which sets
//! the field of that name and returns the value; the fields stay public,
//! so reading one, or assigning one on a `let mut`, works too:
//!
//! ```
//! use std::time::Duration;
//! use hbone::DialerConfig;
//! use hbone::config::Timeouts;
//! use hbone::keepalive::Keepalive;
//!
//! let config = DialerConfig::default()
//!     .with_idle_timeout(Duration::from_secs(30))
//!     .with_timeouts(
//!         Timeouts::default()
//!             .with_connect(Duration::from_secs(2))
//!             .with_keepalive(Keepalive::default().with_interval(Duration::from_secs(5))),
//!     );
//! assert_eq!(config.timeouts.keepalive.interval, Duration::from_secs(5));
//! ```
//!
//! Error enums and most other enums (outcomes, reasons, flags) are
//! `#[non_exhaustive]` too: a `match` on one needs a wildcard arm.
//! Records the crate produces for you to read ([`access::TunnelRecord`],
//! [`server::StatsSnapshot`]) cannot be built outside it.
//!
//! A [`Server`] binds its own listener ([`Server::bind`]) or serves one
//! you hand it ([`Server::from_listener`]: systemd socket activation, a
//! port bound beforehand).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod active;
#[cfg(feature = "admin")]
pub mod admin;
pub mod authority;
#[cfg(feature = "ca")]
pub mod ca;
pub mod client;
pub mod config;
mod cork;
mod crypto;
pub mod entry;
mod frame_guard;
pub mod gateway;
pub mod headers;
pub mod identity;
#[cfg(feature = "istio-ca")]
pub mod istio_ca;
pub mod keepalive;
pub mod lifecycle;
mod listeners;
pub mod metrics;
mod phased;
pub mod policy;
mod pool;
pub mod proxy_protocol;
mod read_ahead;
mod relay;
pub mod revocation;
pub mod server;
pub mod services;
mod stream;
#[cfg(test)]
mod test_support;
pub mod tls;
#[cfg(feature = "files")]
mod toml_error;
mod verified_chains;
mod window;
mod woken;
pub mod workers;
#[cfg(feature = "workload-api")]
pub mod workload_api;
mod x509;

/// Istio's HBONE port: where ztunnel listens for tunnels, and where this
/// crate dials a target's HBONE server unless told otherwise.
pub const HBONE_PORT: u16 = 15008;

pub use client::{DialError, Dialer, DialerConfig, Route, Tunnel, TunnelRequest};
pub use identity::{Identity, SpiffeId};
pub use lifecycle::Telemetry;
pub use relay::{CopyError, Transferred};
pub use server::{Server, ServerConfig};
pub use workers::Workers;
