//! The `hbone` binary end to end, in one test binary: the command line,
//! config files, deployment files, operations (metrics, admin, logs), the
//! bench, interop with other HTTP/2 stacks and the network-namespace tests
//! (a black-holed peer, transparent capture, direct and through a gateway).

mod common;

mod bench;
mod capture;
mod capture_remote;
mod cli;
mod config;
mod deploy;
mod entry_access;
mod entry_rotation;
mod host_tools;
mod identity_sources;
mod interop;
mod netns;
mod operations;
mod revocation_cli;
mod sandbox;
