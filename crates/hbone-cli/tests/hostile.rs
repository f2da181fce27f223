//! The server driven with hostile input over real loopback sockets: bytes
//! that are not TLS, TLS that is not HBONE, HTTP/2 written by hand to abuse
//! the protocol (rapid reset, floods, oversized and endless headers, flow
//! control overflow, too many streams) and connection floods.
//!
//! Every case asserts the outcome the attacker gets (a status, a reset
//! code, a GOAWAY code or a closed connection), that the server still
//! serves new connections afterwards, and that a healthy tunnel on another
//! connection, opened before the attack and kept flowing through it, gets
//! every byte back intact ([`hostile::support::Alongside`]).
//!
//! SECURITY.md at the repository root lists every case with its expected
//! outcome. The cases live in `tests/hostile/`.

mod common;

mod hostile {
    pub mod support;
    pub mod wire;

    mod connections;
    mod control_frames;
    mod floods;
    mod frames;
    mod not_hbone;
    mod streams;
}
