#![no_main]
//! `cargo fuzz run socks5_negotiation`: see `hbone_fuzz::socks5_negotiation`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::socks5_negotiation(data));
