#![no_main]
//! `cargo fuzz run peer_certificate`: see `hbone_fuzz::peer_certificate`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::peer_certificate(data));
