#![no_main]
//! `cargo fuzz run gateway_routes`: see `hbone_fuzz::gateway_routes` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::gateway_routes(data));
