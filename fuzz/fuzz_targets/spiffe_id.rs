#![no_main]
//! `cargo fuzz run spiffe_id`: see `hbone_fuzz::spiffe_id` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::spiffe_id(data));
