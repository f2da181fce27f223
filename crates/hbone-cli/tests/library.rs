//! The library end to end, in one test binary: tunnels, pooling, the
//! server's answers to raw HTTP/2, handshakes, headers, identities, limits
//! and drain, double HBONE and clean close, all over real sockets on
//! loopback with real certificates.

mod common;

mod admin_limits;
mod clean_close;
mod double_hbone;
mod federation;
mod handshake;
mod headers;
mod identity_files;
mod istio_ca;
mod limits_and_drain;
mod per_core;
mod pool;
mod raw_h2;
mod revocation;
mod rotation;
mod shared_connection;
mod tunnel;
mod workload_api;
