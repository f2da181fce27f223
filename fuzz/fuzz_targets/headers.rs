#![no_main]
//! `cargo fuzz run headers`: see `hbone_fuzz::headers` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::headers(data));
