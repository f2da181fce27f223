//! HBONE: TCP tunnelled through HTTP/2 `CONNECT` inside mutual TLS with
//! SPIFFE identities, wire-compatible with Istio ambient's ztunnel.
//!
//! - [`Dialer`] opens [`Tunnel`]s (byte streams) through an HBONE server,
//!   sharing HTTP/2 connections between tunnels.
//! - [`Server`] terminates tunnels: it checks the peer's identity, the
//!   request and the [`policy`], dials the target and copies bytes.
//! - [`entry`] has the ways traffic gets in (port forward, stdin/stdout,
//!   SOCKS5); [`ca`] issues development certificates.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use hbone::{Dialer, Identity, SpiffeId};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let identity = Identity::from_dir("certs/client".as_ref())?;
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

pub mod access;
pub mod active;
#[cfg(feature = "admin")]
pub mod admin;
pub mod authority;
#[cfg(feature = "ca")]
pub mod ca;
pub mod client;
pub mod config;
pub mod copy;
pub mod entry;
pub mod gateway;
pub mod headers;
pub mod identity;
pub mod keepalive;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
mod pool;
pub mod proxy_protocol;
pub mod server;
pub mod services;
pub mod stream;
pub mod tls;
mod x509;

/// Istio's HBONE port: where ztunnel listens for tunnels, and where this
/// crate dials a target's HBONE server unless told otherwise.
pub const HBONE_PORT: u16 = 15008;

pub use client::{DialError, Dialer, DialerConfig, Route, Tunnel, TunnelRequest};
pub use identity::{Identity, SpiffeId};
pub use server::{Server, ServerConfig};
