#![no_main]
//! `cargo fuzz run proxy_protocol_decode`: see `hbone_fuzz::proxy_protocol_decode` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::proxy_protocol_decode(data));
